//! Contract checks of the accounts: domains, users and their passwords, and recipient
//! look-ups.

use super::*;
use crate::store::password::{hash_password, verify_password};
use crate::store::*;

/// Domains: case-insensitive, trailing dot ignored, duplicates reported, sorted listing,
/// removal.
pub async fn domains(store: &dyn MessageStore) {
    assert!(
        store.add_domain("Example.COM").await.expect("add"),
        "new domain"
    );
    assert!(
        !store.add_domain("example.com").await.expect("add"),
        "duplicate domain"
    );
    assert!(
        !store.add_domain("EXAMPLE.com.").await.expect("add"),
        "trailing dot"
    );
    assert!(store.add_domain("b.example").await.expect("add"));
    assert!(store
        .is_local_domain("eXample.Com")
        .await
        .expect("is_local"));
    assert!(!store.is_local_domain("other.test").await.expect("is_local"));
    let listed: Vec<String> = store
        .list_domains()
        .await
        .expect("list")
        .into_iter()
        .filter(|d| d == "example.com" || d == "b.example")
        .collect();
    assert_eq!(
        listed,
        vec!["b.example".to_string(), "example.com".to_string()]
    );
    assert!(is_invalid(store.add_domain("").await), "empty domain");
    assert!(
        is_invalid(store.add_domain("a b").await),
        "domain with a space"
    );
    assert!(store.remove_domain("EXAMPLE.com").await.expect("remove"));
    assert!(!store.remove_domain("example.com").await.expect("remove"));
    assert!(!store
        .is_local_domain("example.com")
        .await
        .expect("is_local"));
    assert!(store.remove_domain("b.example").await.expect("remove"));
}

/// Users: domain must exist, duplicates refused, only PHC hashes accepted, passwd,
/// listing, and removal (of a user or its domain) taking mailboxes with it.
pub async fn users(store: &dyn MessageStore) {
    store.add_domain("users.test").await.expect("add domain");
    let h1 = hash_password("s3cret").expect("hash");
    store
        .add_user("Alice@Users.Test", &h1)
        .await
        .expect("add alice");
    assert!(store.user_exists("alice@USERS.TEST").await.expect("exists"));
    assert!(!store
        .user_exists("alice2@users.test")
        .await
        .expect("exists"));
    assert!(!store.user_exists("not an address").await.expect("exists"));
    assert!(
        is_invalid(store.add_user("alice@users.test", &h1).await),
        "duplicate"
    );
    assert!(
        is_invalid(store.add_user("bob@unknown.test", &h1).await),
        "unknown domain"
    );
    assert!(
        is_invalid(store.add_user("carol@users.test", "s3cret").await),
        "clear-text password refused"
    );
    assert!(!store.user_exists("carol@users.test").await.expect("exists"));
    let stored = store
        .password_hash("ALICE@users.test")
        .await
        .expect("hash")
        .expect("alice has a hash");
    assert_eq!(stored, h1);
    assert!(verify_password("s3cret", &stored));
    assert_eq!(
        store
            .password_hash("nobody@users.test")
            .await
            .expect("hash"),
        None
    );

    let h2 = hash_password("n3w").expect("hash");
    assert!(store
        .set_password("alice@users.test", &h2)
        .await
        .expect("passwd"));
    assert_eq!(
        store.password_hash("alice@users.test").await.expect("hash"),
        Some(h2.clone())
    );
    assert!(!store
        .set_password("nobody@users.test", &h2)
        .await
        .expect("passwd"));
    assert!(is_invalid(
        store.set_password("alice@users.test", "plain").await
    ));

    store
        .add_user("carol@users.test", &h2)
        .await
        .expect("add carol");
    store
        .add_domain("other-users.test")
        .await
        .expect("add domain");
    store
        .add_user("zed@other-users.test", &h2)
        .await
        .expect("add zed");
    assert_eq!(
        store.list_users(Some("USERS.test")).await.expect("list"),
        vec![
            "alice@users.test".to_string(),
            "carol@users.test".to_string()
        ]
    );
    let all = store.list_users(None).await.expect("list");
    for u in [
        "alice@users.test",
        "carol@users.test",
        "zed@other-users.test",
    ] {
        assert!(all.contains(&u.to_string()), "{u} listed");
    }

    // Removing a user removes its mailbox and messages.
    let acc = store
        .accept_batch(vec![incoming(
            "s@x.test",
            &["carol@users.test"],
            vec![],
            t0(),
            b"hi\r\n",
        )])
        .await
        .expect("deliver to carol");
    let carol_msg = acc[0].message_ids[0];
    assert_eq!(mailbox(store, "carol@users.test", "INBOX").await.len(), 1);
    assert!(store.remove_user("Carol@users.test").await.expect("remove"));
    assert!(!store.remove_user("carol@users.test").await.expect("remove"));
    assert!(!store.user_exists("carol@users.test").await.expect("exists"));
    assert_eq!(
        store
            .get_message("carol@users.test", carol_msg)
            .await
            .expect("get"),
        None
    );
    store
        .add_user("carol@users.test", &h2)
        .await
        .expect("re-add carol");
    assert!(
        mailbox(store, "carol@users.test", "INBOX").await.is_empty(),
        "a re-created user does not inherit the old mailbox"
    );

    // Removing a domain removes its users.
    assert!(store
        .remove_domain("other-users.test")
        .await
        .expect("remove"));
    assert!(!store
        .user_exists("zed@other-users.test")
        .await
        .expect("exists"));
    assert!(store
        .list_users(Some("other-users.test"))
        .await
        .expect("list")
        .is_empty());
}

/// A backend's immediate recipient look-up (`recipient_now`), where it has one, gives
/// what `is_local_domain` and `user_exists` give, for the same spellings; and it sees a
/// user added a moment ago.
pub async fn recipient_look_ups(store: &dyn MessageStore) {
    let h = user_of_new_domain(store, "lookup.test", "dora@lookup.test").await;
    let cases = [
        "dora@lookup.test",
        "Dora@LOOKUP.TEST",
        "dora@lookup.test.",
        "eve@lookup.test",
        "dora@elsewhere.test",
        "not an address",
        "@lookup.test",
        "dora@",
    ];
    for address in cases {
        let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        let local = store.is_local_domain(domain).await.expect("domain");
        let exists = local && store.user_exists(address).await.expect("user");
        if let Some(now) = store.recipient_now(address) {
            assert_eq!(now.expect("look-up"), (local, exists), "{address}");
        }
    }
    store
        .add_user("fred@lookup.test", &h)
        .await
        .expect("add fred");
    if let Some(now) = store.recipient_now("fred@lookup.test") {
        assert_eq!(now.expect("look-up"), (true, true), "a new user is seen");
    }
    assert!(store.remove_domain("lookup.test").await.expect("remove"));
    if let Some(now) = store.recipient_now("dora@lookup.test") {
        assert_eq!(
            now.expect("look-up"),
            (false, false),
            "a removed domain is gone"
        );
    }
}
