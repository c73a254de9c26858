//! The contract suite every `MessageStore` backend must pass.
//!
//! Each backend's tests open a fresh, empty store and call `run_all` (and
//! `concurrent_claims` with two handles on the same database). The functions panic on the
//! first broken promise, naming it. They use fixed times (no clock), their own domain
//! names, and clear the queue before each queue check, so they may run one after another
//! on one store. This module must not depend on any backend.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::password::{hash_password, verify_password};
use super::*;

/// The fixed start time of every check.
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date")
}

fn secs(s: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::seconds(s)
}

const LEASE: Duration = Duration::from_secs(60);

fn rcpt(address: &str) -> OutgoingRcpt {
    OutgoingRcpt {
        address: address.to_string(),
        orcpt: None,
        notify: None,
    }
}

fn incoming(
    sender: &str,
    local: &[&str],
    remote: Vec<OutgoingRcpt>,
    at: DateTime<Utc>,
    body: &[u8],
) -> IncomingMessage {
    IncomingMessage {
        sender: sender.to_string(),
        local_rcpts: local.iter().map(|s| s.to_string()).collect(),
        remote_rcpts: remote,
        mailbox: None,
        flags: Vec::new(),
        ret: None,
        envid: None,
        smtputf8: false,
        client_ip: "127.0.0.1".to_string(),
        helo: "client.test".to_string(),
        received_at: at,
        subject: Some("contract".to_string()),
        body: body.to_vec(),
    }
}

/// Queue one remote-only message received at `at`; returns its queue id.
async fn enqueue(store: &dyn MessageStore, at: DateTime<Utc>, rcpts: &[&str]) -> String {
    let msg = incoming(
        "sender@origin.test",
        &[],
        rcpts.iter().map(|a| rcpt(a)).collect(),
        at,
        format!("Subject: queued at {at}\r\n\r\nbody\r\n").as_bytes(),
    );
    let mut acc = store.accept_batch(vec![msg]).await.expect("enqueue");
    acc.pop()
        .and_then(|a| a.queue_id)
        .expect("a remote recipient makes a queue id")
}

fn ids(msgs: &[QueuedMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.id.clone()).collect()
}

fn is_invalid<T: std::fmt::Debug>(r: StoreResult<T>) -> bool {
    matches!(r, Err(StoreError::Invalid(_)))
}

/// Accept through the one write path as the store actor does: each message isolated,
/// all results or the batch's failure.
async fn accept_leased(
    store: &dyn MessageStore,
    messages: &[IncomingMessage],
    lease: Option<&AcceptLease>,
) -> StoreResult<Vec<Accepted>> {
    store
        .commit_batch(WriteBatch {
            messages: messages.to_vec(),
            lease: lease.cloned(),
            records: Vec::new(),
            atomic: false,
        })
        .await
        .accepted?
        .into_iter()
        .collect()
}

/// Record several attempts through the one write path, in one batch.
async fn record_all(
    store: &dyn MessageStore,
    records: Vec<(String, String, AttemptRecord)>,
) -> StoreResult<Vec<StoreResult<()>>> {
    store
        .commit_batch(WriteBatch {
            messages: Vec::new(),
            lease: None,
            records,
            atomic: false,
        })
        .await
        .recorded
}

/// Run every check in order on one fresh store.
pub async fn run_all(store: &dyn MessageStore) {
    domains(store).await;
    users(store).await;
    recipient_look_ups(store).await;
    accept_and_read_back(store).await;
    batch_atomicity(store).await;
    queue_claims_and_leases(store).await;
    queue_record_attempt(store).await;
    queue_claim_at_accept(store).await;
    commit_batch_mixes_accepts_and_records(store).await;
    commit_batch_isolates_each_message(store).await;
    junk_copies(store).await;
    named_mailboxes_and_flags(store).await;
    queue_admin(store).await;
}

/// A message accepted into a named mailbox with IMAP flags (an imported ErlMail message)
/// is listed there, and read back, with its flags in order; flags in the INBOX survive the
/// group commit beside plain mail; `inbox` is the INBOX; a flag with a space is refused.
pub async fn named_mailboxes_and_flags(store: &dyn MessageStore) {
    store.add_domain("folders.test").await.expect("add domain");
    let h = hash_password("pw").expect("hash");
    store
        .add_user("f@folders.test", &h)
        .await
        .expect("add user");
    let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut sent = incoming(
        "f@folders.test",
        &["f@folders.test"],
        vec![],
        t0(),
        b"Subject: sent\r\n\r\nx\r\n",
    );
    sent.mailbox = Some("Sent".to_string());
    sent.flags = flags(&["\\Seen", "\\Answered", "$Work"]);
    let ids = store
        .accept_batch(vec![sent])
        .await
        .expect("accept into Sent");
    let listed = store
        .list_mailbox("f@folders.test", "Sent")
        .await
        .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].mailbox, "Sent");
    assert_eq!(listed[0].id, ids[0].message_ids[0]);
    assert_eq!(listed[0].flags, flags(&["\\Seen", "\\Answered", "$Work"]));
    let got = store
        .get_message("f@folders.test", listed[0].id)
        .await
        .expect("get")
        .expect("the message");
    assert_eq!(got.summary, listed[0]);

    // Through the group commit, flags in the INBOX (spelled `inbox`) beside plain mail.
    let mut flagged = incoming(
        "a@origin.test",
        &["f@folders.test"],
        vec![],
        t0(),
        b"Subject: flagged\r\n\r\ny\r\n",
    );
    flagged.mailbox = Some("inbox".to_string());
    flagged.flags = flags(&["\\Flagged"]);
    let plain = incoming(
        "b@origin.test",
        &["f@folders.test"],
        vec![],
        t0(),
        b"Subject: plain\r\n\r\nz\r\n",
    );
    accept_leased(store, &[flagged, plain], None)
        .await
        .expect("group commit");
    let inbox = store
        .list_mailbox("f@folders.test", "INBOX")
        .await
        .expect("list");
    let got: Vec<(&str, &str, Vec<String>)> = inbox
        .iter()
        .map(|m| (m.mailbox.as_str(), m.sender.as_str(), m.flags.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("INBOX", "a@origin.test", flags(&["\\Flagged"])),
            ("INBOX", "b@origin.test", Vec::new()),
        ]
    );
    assert_eq!(
        store
            .list_mailbox("f@folders.test", "Sent")
            .await
            .expect("list")
            .len(),
        1,
        "INBOX mail stays out of Sent"
    );

    let mut bad = incoming("c@origin.test", &["f@folders.test"], vec![], t0(), b"x");
    bad.flags = flags(&["two words"]);
    assert!(is_invalid(store.accept_batch(vec![bad]).await));
}

/// A message for the `Junk` mailbox (DMARC quarantine) puts its local copies in each recipient's
/// `Junk` mailbox, created on first use, in a group commit beside INBOX mail.
pub async fn junk_copies(store: &dyn MessageStore) {
    store.add_domain("junk.test").await.expect("add domain");
    let h = hash_password("pw").expect("hash");
    store.add_user("j@junk.test", &h).await.expect("add user");
    let mut spam = incoming(
        "s@forged.test",
        &["j@junk.test"],
        vec![],
        t0(),
        b"Subject: spam\r\n\r\nx\r\n",
    );
    spam.mailbox = Some(JUNK.to_string());
    let ham = incoming(
        "s@good.test",
        &["j@junk.test"],
        vec![],
        t0(),
        b"Subject: ham\r\n\r\ny\r\n",
    );
    let out = store
        .commit_batch(WriteBatch {
            messages: vec![spam, ham],
            lease: None,
            records: Vec::new(),
            atomic: false,
        })
        .await;
    let accepted = out.accepted.expect("the batch committed");
    assert!(accepted.iter().all(|a| a.is_ok()), "{accepted:?}");
    let junk = store
        .list_mailbox("j@junk.test", "Junk")
        .await
        .expect("list");
    assert_eq!(junk.len(), 1);
    assert_eq!(junk[0].sender, "s@forged.test");
    assert_eq!(junk[0].mailbox, "Junk");
    let inbox = store
        .list_mailbox("j@junk.test", "INBOX")
        .await
        .expect("list");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].sender, "s@good.test");
}

/// commit_batch: each message in its own savepoint. A batch of 20 where one message
/// names a local user that no longer exists (removed between RCPT and DATA) commits the
/// other 19, and the failed one alone gets its error; a lease and its leased rows stay
/// right for the rest.
pub async fn commit_batch_isolates_each_message(store: &dyn MessageStore) {
    store.add_domain("iso.test").await.expect("add domain");
    let h = hash_password("pw").expect("hash");
    store.add_user("u@iso.test", &h).await.expect("add user");
    store.delete_all_queued().await.expect("clear queue");
    let before = store
        .list_mailbox("u@iso.test", "INBOX")
        .await
        .expect("list")
        .len();
    let messages: Vec<IncomingMessage> = (0..20)
        .map(|i| {
            let local = if i == 7 {
                "gone@iso.test"
            } else {
                "u@iso.test"
            };
            incoming(
                "s@x.test",
                &[local],
                vec![rcpt(&format!("r{i}@far.test"))],
                t0(),
                format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes(),
            )
        })
        .collect();
    let out = store
        .commit_batch(WriteBatch {
            messages,
            lease: Some(AcceptLease {
                node: "n1".into(),
                expires_at: secs(65),
            }),
            records: Vec::new(),
            atomic: false,
        })
        .await;
    let accepted = out.accepted.expect("the batch committed");
    assert_eq!(accepted.len(), 20);
    for (i, a) in accepted.iter().enumerate() {
        if i == 7 {
            assert!(matches!(a, Err(StoreError::Invalid(_))), "{i}: {a:?}");
        } else {
            let a = a.as_ref().unwrap_or_else(|e| panic!("{i}: {e}"));
            assert_eq!(a.message_ids.len(), 1, "{i}");
            assert!(a.queue_id.is_some(), "{i}");
        }
    }
    let inbox = store
        .list_mailbox("u@iso.test", "INBOX")
        .await
        .expect("list");
    assert_eq!(inbox.len() - before, 19, "19 local copies");
    let queue = store.list_queue().await.expect("list");
    assert_eq!(queue.len(), 19, "19 queued, none for the failed one");
    assert!(queue.iter().all(|q| q.lock_owner.as_deref() == Some("n1")));
    assert!(!queue
        .iter()
        .any(|q| q.rcpts.iter().any(|r| r.address == "r7@far.test")));
    store.delete_all_queued().await.expect("clean up");
}

/// A backend's immediate recipient look-up (`recipient_now`), where it has one, gives
/// what `is_local_domain` and `user_exists` give, for the same spellings; and it sees a
/// user added a moment ago.
pub async fn recipient_look_ups(store: &dyn MessageStore) {
    store.add_domain("lookup.test").await.expect("add domain");
    let h = hash_password("pw").expect("hash");
    store
        .add_user("dora@lookup.test", &h)
        .await
        .expect("add dora");
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
    assert_eq!(
        store
            .list_mailbox("carol@users.test", "INBOX")
            .await
            .expect("list")
            .len(),
        1
    );
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
        store
            .list_mailbox("carol@users.test", "INBOX")
            .await
            .expect("list")
            .is_empty(),
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

/// accept_batch: local and remote recipients of one message, byte-exact read-back from
/// the mailbox and the queue, results in input order, the null sender.
pub async fn accept_and_read_back(store: &dyn MessageStore) {
    store.add_domain("mail.test").await.expect("add domain");
    let h = hash_password("pw").expect("hash");
    store.add_user("u1@mail.test", &h).await.expect("add u1");
    store.add_user("u2@mail.test", &h).await.expect("add u2");

    assert!(store
        .accept_batch(vec![])
        .await
        .expect("empty batch")
        .is_empty());

    // Every byte value, bare LF and CR, a lone dot line: stored exactly as given.
    let mut body = b"Subject: all bytes\r\n\r\n.\r\n..x\nbare\rcr\r\n".to_vec();
    body.extend(0u8..=255);
    let at = t0() + chrono::Duration::milliseconds(123);
    let mut m = incoming(
        "s@remote.test",
        &["u1@mail.test", "U2@MAIL.TEST"],
        vec![
            OutgoingRcpt {
                address: "r1@far.test".into(),
                orcpt: Some("rfc822;r1@far.test".into()),
                notify: Some("SUCCESS,FAILURE".into()),
            },
            rcpt("R2@far.test"),
        ],
        at,
        &body,
    );
    m.ret = Some("HDRS".into());
    m.envid = Some("ENV-1".into());
    m.smtputf8 = true;
    m.client_ip = "::1".into();
    m.helo = "helo.test".into();
    m.subject = Some("all bytes".into());
    let local_only = incoming(
        "s2@remote.test",
        &["u1@mail.test"],
        vec![],
        secs(1),
        b"second\r\n",
    );
    let acc = store
        .accept_batch(vec![m, local_only])
        .await
        .expect("accept");
    assert_eq!(acc.len(), 2);
    assert_eq!(acc[0].message_ids.len(), 2);
    let qid = acc[0].queue_id.clone().expect("remote recipients queue");
    assert_eq!(qid.len(), 16, "{qid}");
    assert!(
        qid.chars()
            .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c)),
        "{qid}"
    );
    assert_eq!(acc[1].queue_id, None);
    assert_eq!(acc[1].message_ids.len(), 1);

    let inbox = store
        .list_mailbox("U1@mail.test", "inbox")
        .await
        .expect("list");
    assert_eq!(
        inbox,
        vec![
            MessageSummary {
                id: acc[0].message_ids[0],
                mailbox: "INBOX".into(),
                sender: "s@remote.test".into(),
                subject: Some("all bytes".into()),
                size: body.len() as u64,
                internal_date: at,
                flags: Vec::new(),
            },
            MessageSummary {
                id: acc[1].message_ids[0],
                mailbox: "INBOX".into(),
                sender: "s2@remote.test".into(),
                subject: Some("contract".into()),
                size: 8,
                internal_date: secs(1),
                flags: Vec::new(),
            },
        ]
    );
    let got = store
        .get_message("u2@mail.test", acc[0].message_ids[1])
        .await
        .expect("get")
        .expect("u2's copy");
    assert_eq!(got.body, body);
    assert_eq!(got.recipients, vec!["u2@mail.test".to_string()]);
    assert_eq!(got.summary.mailbox, "INBOX");
    assert_eq!(
        store
            .get_message("u2@mail.test", acc[0].message_ids[0])
            .await
            .expect("get"),
        None,
        "u1's copy is not u2's"
    );
    assert!(store
        .list_mailbox("u1@mail.test", "Archive")
        .await
        .expect("list")
        .is_empty());
    assert!(store
        .list_mailbox("ghost@mail.test", "INBOX")
        .await
        .expect("list")
        .is_empty());

    let q = store
        .get_queued(&qid)
        .await
        .expect("get_queued")
        .expect("queued");
    assert_eq!(
        q,
        QueuedMessage {
            id: qid.clone(),
            sender: "s@remote.test".into(),
            ret: Some("HDRS".into()),
            envid: Some("ENV-1".into()),
            smtputf8: true,
            client_ip: "::1".into(),
            helo: "helo.test".into(),
            received_at: at,
            tries: 0,
            last_try_at: None,
            last_error: None,
            next_retry_at: at,
            lock_owner: None,
            lock_expires_at: None,
            held: false,
            size: body.len() as u64,
            rcpts: vec![
                OutgoingRcpt {
                    address: "r1@far.test".into(),
                    orcpt: Some("rfc822;r1@far.test".into()),
                    notify: Some("SUCCESS,FAILURE".into()),
                },
                rcpt("R2@far.test"),
            ],
            body: body.clone(),
        }
    );

    // A DSN is queued from the null sender.
    let dsn = store
        .accept_batch(vec![incoming(
            "",
            &[],
            vec![rcpt("s@remote.test")],
            secs(2),
            b"dsn",
        )])
        .await
        .expect("queue dsn");
    assert!(dsn[0].message_ids.is_empty());
    let dsn_id = dsn[0].queue_id.clone().expect("dsn queued");
    assert_ne!(dsn_id, qid);
    let d = store.get_queued(&dsn_id).await.expect("get").expect("dsn");
    assert_eq!(d.sender, "");
    assert_eq!(d.body, b"dsn".to_vec());
    store.delete_all_queued().await.expect("clean up");
}

/// A batch with one bad message stores none of its messages.
pub async fn batch_atomicity(store: &dyn MessageStore) {
    store.add_domain("atomic.test").await.expect("add domain");
    let h = hash_password("pw").expect("hash");
    store.add_user("a@atomic.test", &h).await.expect("add user");
    store.delete_all_queued().await.expect("clear queue");
    let good = incoming(
        "s@x.test",
        &["a@atomic.test"],
        vec![rcpt("r@far.test")],
        t0(),
        b"good",
    );
    let bad = incoming("s@x.test", &["nobody@atomic.test"], vec![], t0(), b"bad");
    let r = store.accept_batch(vec![good.clone(), bad]).await;
    assert!(is_invalid(r), "unknown local recipient fails the batch");
    assert!(
        store
            .list_mailbox("a@atomic.test", "INBOX")
            .await
            .expect("list")
            .is_empty(),
        "the good message of a failed batch is not stored"
    );
    assert!(
        store.list_queue().await.expect("list").is_empty(),
        "nor queued"
    );
    let acc = store.accept_batch(vec![good]).await.expect("good alone");
    assert_eq!(acc[0].message_ids.len(), 1);
    assert_eq!(store.list_queue().await.expect("list").len(), 1);
    store.delete_all_queued().await.expect("clean up");
}

/// claim_due / claim / renew_lease / release: due order, limits, held messages, locks
/// that block and leases that expire.
pub async fn queue_claims_and_leases(store: &dyn MessageStore) {
    store.delete_all_queued().await.expect("clear queue");
    let a = enqueue(store, secs(0), &["a@far.test"]).await;
    let b = enqueue(store, secs(1), &["b@far.test"]).await;
    let c = enqueue(store, secs(2), &["c@far.test"]).await;
    let d = enqueue(store, secs(3), &["d@far.test"]).await;
    assert!(store.hold(&d).await.expect("hold"));
    assert!(!store.hold("0000000000000000").await.expect("hold unknown"));

    let early = store
        .claim_due("n1", secs(-1), LEASE, 10)
        .await
        .expect("claim");
    assert!(early.is_empty(), "nothing is due before it was received");
    assert!(store
        .claim_due("n1", secs(10), LEASE, 0)
        .await
        .expect("claim")
        .is_empty());

    let first = store
        .claim_due("n1", secs(10), LEASE, 2)
        .await
        .expect("claim");
    assert_eq!(
        ids(&first),
        vec![a.clone(), b.clone()],
        "oldest due first, limited"
    );
    assert_eq!(first[0].lock_owner.as_deref(), Some("n1"));
    assert_eq!(first[0].lock_expires_at, Some(secs(70)));
    assert_eq!(first[0].rcpts, vec![rcpt("a@far.test")]);

    let second = store
        .claim_due("n2", secs(15), LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(
        ids(&second),
        vec![c.clone()],
        "locked and held messages are skipped"
    );
    assert!(store
        .claim_due("n1", secs(15), LEASE, 10)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        store.claim(&a, "n2", secs(20), LEASE).await.expect("claim"),
        None
    );
    assert_eq!(
        store.claim(&a, "n1", secs(20), LEASE).await.expect("claim"),
        None
    );
    assert_eq!(
        store.claim(&d, "n1", secs(20), LEASE).await.expect("claim"),
        None,
        "held"
    );
    assert_eq!(
        store
            .claim("0000000000000000", "n1", secs(20), LEASE)
            .await
            .expect("claim"),
        None
    );

    // At 70 s the leases of a and b (taken at 10 s) have expired; c's (15 s) has not.
    let taken = store
        .claim_due("n2", secs(70), LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(
        ids(&taken),
        vec![a.clone(), b.clone()],
        "expired leases are claimable"
    );
    assert!(taken.iter().all(|m| m.lock_owner.as_deref() == Some("n2")));

    assert!(
        !store
            .renew_lease(&a, "n1", secs(80), LEASE)
            .await
            .expect("renew"),
        "lost"
    );
    assert!(store
        .renew_lease(&a, "n2", secs(80), LEASE)
        .await
        .expect("renew"));
    let got = store.get_queued(&a).await.expect("get").expect("a");
    assert_eq!(got.lock_owner.as_deref(), Some("n2"));
    assert_eq!(got.lock_expires_at, Some(secs(140)));
    assert!(!store
        .renew_lease("0000000000000000", "n2", secs(80), LEASE)
        .await
        .expect("renew"));

    store
        .release(&a, "n1")
        .await
        .expect("release by another node");
    assert_eq!(
        store
            .get_queued(&a)
            .await
            .expect("get")
            .expect("a")
            .lock_owner
            .as_deref(),
        Some("n2"),
        "release by a node that does not hold the lock changes nothing"
    );
    store.release(&a, "n2").await.expect("release");
    let got = store.get_queued(&a).await.expect("get").expect("a");
    assert_eq!(
        (got.lock_owner, got.lock_expires_at, got.tries),
        (None, None, 0)
    );
    let again = store.claim(&a, "n1", secs(81), LEASE).await.expect("claim");
    assert_eq!(
        again.map(|m| (m.id, m.lock_owner)),
        Some((a.clone(), Some("n1".into())))
    );

    assert!(store.release_hold(&d).await.expect("release hold"));
    assert!(!store
        .release_hold("0000000000000000")
        .await
        .expect("release hold"));
    let dm = store
        .claim(&d, "n1", secs(81), LEASE)
        .await
        .expect("claim")
        .expect("d");
    assert!(!dm.held);
    assert_eq!(dm.rcpts, vec![rcpt("d@far.test")]);
    store.delete_all_queued().await.expect("clean up");
}

/// record_attempt: per-recipient results, retry data, lock checks, deletion when done.
pub async fn queue_record_attempt(store: &dyn MessageStore) {
    store.delete_all_queued().await.expect("clear queue");
    let m = enqueue(store, t0(), &["r1@far.test", "r2@far.test", "r3@far.test"]).await;
    store
        .claim(&m, "n1", t0(), LEASE)
        .await
        .expect("claim")
        .expect("due");

    let outcome = AttemptRecord {
        at: secs(5),
        rcpt_results: vec![
            (
                "r1@far.test".into(),
                RcptState::Delivered,
                Some("250 2.0.0 ok".into()),
            ),
            (
                "r2@far.test".into(),
                RcptState::Failed,
                Some("550 5.1.1 no".into()),
            ),
            (
                "r3@far.test".into(),
                RcptState::Pending,
                Some("451 4.3.0 later".into()),
            ),
        ],
        error: Some("451 4.3.0 later".into()),
        next_retry_at: Some(secs(900)),
        notifications: Vec::new(),
    };
    assert!(
        is_invalid(store.record_attempt(&m, "n2", outcome.clone()).await),
        "another node cannot record"
    );
    let untouched = store.get_queued(&m).await.expect("get").expect("m");
    assert_eq!((untouched.tries, untouched.rcpts.len()), (0, 3));
    assert_eq!(untouched.lock_owner.as_deref(), Some("n1"));

    store
        .record_attempt(&m, "n1", outcome.clone())
        .await
        .expect("record");
    let q = store
        .get_queued(&m)
        .await
        .expect("get")
        .expect("still queued");
    assert_eq!(q.rcpts, vec![rcpt("r3@far.test")]);
    assert_eq!(q.tries, 1);
    assert_eq!(q.last_try_at, Some(secs(5)));
    assert_eq!(q.last_error.as_deref(), Some("451 4.3.0 later"));
    assert_eq!(q.next_retry_at, secs(900));
    assert_eq!((q.lock_owner, q.lock_expires_at), (None, None));

    let listed = store.list_queue().await.expect("list");
    assert_eq!(listed.len(), 1);
    let states: Vec<(String, RcptState, Option<String>)> = listed[0]
        .rcpts
        .iter()
        .map(|r| (r.address.clone(), r.state, r.last_response.clone()))
        .collect();
    assert_eq!(
        states,
        vec![
            (
                "r1@far.test".into(),
                RcptState::Delivered,
                Some("250 2.0.0 ok".into())
            ),
            (
                "r2@far.test".into(),
                RcptState::Failed,
                Some("550 5.1.1 no".into())
            ),
            (
                "r3@far.test".into(),
                RcptState::Pending,
                Some("451 4.3.0 later".into())
            ),
        ]
    );
    assert!(
        is_invalid(store.record_attempt(&m, "n1", outcome.clone()).await),
        "recording needs the lock"
    );
    assert!(store
        .claim_due("n1", secs(899), LEASE, 10)
        .await
        .expect("claim")
        .is_empty());
    let due = store
        .claim_due("n1", secs(900), LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(ids(&due), vec![m.clone()]);

    // The last pending recipient delivered: the message leaves the queue.
    let done = AttemptRecord {
        at: secs(905),
        rcpt_results: vec![(
            "r3@far.test".into(),
            RcptState::Delivered,
            Some("250 ok".into()),
        )],
        error: None,
        next_retry_at: None,
        notifications: Vec::new(),
    };
    store
        .record_attempt(&m, "n1", done.clone())
        .await
        .expect("record");
    assert_eq!(store.get_queued(&m).await.expect("get"), None);
    assert!(store.list_queue().await.expect("list").is_empty());
    assert!(
        is_invalid(store.record_attempt(&m, "n1", done).await),
        "gone"
    );
}

/// Administration: list, flush (one/all, held skipped, earlier due time kept), hold,
/// accept_leased: rows inserted already claimed, due only when the lease lapses, the
/// in-memory `QueuedMessage::from_accepted` equal to the stored row, batched records of
/// finished attempts (and a refused one among them), and release making a leased
/// message due at once.
pub async fn queue_claim_at_accept(store: &dyn MessageStore) {
    store.delete_all_queued().await.expect("clear queue");
    let lease = AcceptLease {
        node: "n1".into(),
        expires_at: secs(60),
    };
    let mut msgs = vec![
        incoming(
            "s@origin.test",
            &[],
            vec![rcpt("a@far.test")],
            t0(),
            b"one\r\n",
        ),
        incoming(
            "s@origin.test",
            &[],
            vec![rcpt("b@far.test"), rcpt("c@far.test")],
            t0(),
            b"two\r\n",
        ),
    ];
    // The SMTPUTF8 flag travels through the batched insert too.
    msgs[1].smtputf8 = true;
    let acc = accept_leased(store, &msgs, Some(&lease))
        .await
        .expect("accept leased");
    let ids: Vec<String> = acc
        .iter()
        .map(|a| a.queue_id.clone().expect("queued"))
        .collect();
    for (m, id) in msgs.iter().zip(&ids) {
        let stored = store.get_queued(id).await.expect("get").expect("stored");
        assert_eq!(stored.lock_owner.as_deref(), Some("n1"));
        assert_eq!(stored.lock_expires_at, Some(secs(60)));
        assert_eq!(stored.next_retry_at, secs(60), "due when the lease lapses");
        assert_eq!(
            QueuedMessage::from_accepted(m.clone(), id.clone(), &lease),
            stored,
            "the message handed to the queue is the one stored"
        );
    }
    assert!(
        store
            .claim_due("n2", secs(30), LEASE, 10)
            .await
            .expect("claim")
            .is_empty(),
        "a leased message is not due for others"
    );
    assert!(store
        .claim(&ids[0], "n2", secs(30), LEASE)
        .await
        .expect("claim")
        .is_none());

    let done = |rcpts: &[&str]| AttemptRecord {
        at: secs(5),
        rcpt_results: rcpts
            .iter()
            .map(|r| (r.to_string(), RcptState::Delivered, Some("250 ok".into())))
            .collect(),
        error: None,
        next_retry_at: None,
        notifications: Vec::new(),
    };
    let results = record_all(
        store,
        vec![
            (ids[0].clone(), "n1".into(), done(&["a@far.test"])),
            (
                ids[1].clone(),
                "n2".into(),
                done(&["b@far.test", "c@far.test"]),
            ),
            (
                "FFFFFFFFFFFFFFFF".into(),
                "n1".into(),
                done(&["x@far.test"]),
            ),
        ],
    )
    .await
    .expect("record batch");
    assert!(results[0].is_ok(), "finished attempt recorded: {results:?}");
    assert!(
        matches!(results[1], Err(StoreError::Invalid(_))),
        "not our lease: {results:?}"
    );
    assert!(
        matches!(results[2], Err(StoreError::Invalid(_))),
        "no such message: {results:?}"
    );
    assert!(store.get_queued(&ids[0]).await.expect("get").is_none());
    let kept = store.get_queued(&ids[1]).await.expect("get").expect("kept");
    assert_eq!(kept.tries, 0, "a refused record changes nothing");
    assert_eq!(kept.lock_owner.as_deref(), Some("n1"));
    let lapsed = store
        .claim_due("n2", secs(61), LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(
        lapsed.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![ids[1].clone()],
        "taken by another node once the lease lapsed"
    );

    // Release: a leased message (times of the real clock here) falls due at once.
    store.delete_all_queued().await.expect("clear queue");
    let now = Utc::now();
    let far = AcceptLease {
        node: "n1".into(),
        expires_at: now + chrono::Duration::days(1),
    };
    let acc = accept_leased(
        store,
        &[incoming(
            "s@origin.test",
            &[],
            vec![rcpt("d@far.test")],
            now,
            b"3\r\n",
        )],
        Some(&far),
    )
    .await
    .expect("accept leased");
    let id = acc[0].queue_id.clone().expect("queued");
    let soon = now + chrono::Duration::seconds(5);
    assert!(store
        .claim_due("n2", soon, LEASE, 10)
        .await
        .expect("claim")
        .is_empty());
    store.release(&id, "n1").await.expect("release");
    let taken = store.claim_due("n2", soon, LEASE, 10).await.expect("claim");
    assert_eq!(taken.len(), 1, "released: due now");
    store.delete_all_queued().await.expect("clean up");
}

/// commit_batch: new messages and finished attempts in one call; a refused record (lease
/// not ours) does not keep the accepts from committing, and the messages come back.
pub async fn commit_batch_mixes_accepts_and_records(store: &dyn MessageStore) {
    store.delete_all_queued().await.expect("clear queue");
    let old = enqueue(store, t0(), &["old@far.test"]).await;
    let other = enqueue(store, t0(), &["other@far.test"]).await;
    for id in [&old, &other] {
        store
            .claim(id, "n1", t0(), LEASE)
            .await
            .expect("claim")
            .expect("due");
    }
    let delivered = |rcpt: &str| AttemptRecord {
        at: secs(5),
        rcpt_results: vec![(
            rcpt.to_string(),
            RcptState::Delivered,
            Some("250 ok".into()),
        )],
        error: None,
        next_retry_at: None,
        notifications: Vec::new(),
    };
    let new = incoming(
        "s@origin.test",
        &[],
        vec![rcpt("new@far.test")],
        secs(5),
        b"new\r\n",
    );
    let out = store
        .commit_batch(WriteBatch {
            messages: vec![new.clone()],
            lease: Some(AcceptLease {
                node: "n1".into(),
                expires_at: secs(65),
            }),
            records: vec![
                (old.clone(), "n1".into(), delivered("old@far.test")),
                (other.clone(), "n2".into(), delivered("other@far.test")),
            ],
            atomic: false,
        })
        .await;
    assert_eq!(out.messages, vec![new], "the messages are handed back");
    let accepted = out.accepted.expect("accepted");
    let recorded = out.recorded.expect("recorded");
    assert!(recorded[0].is_ok(), "{recorded:?}");
    assert!(
        matches!(recorded[1], Err(StoreError::Invalid(_))),
        "{recorded:?}"
    );
    assert!(store.get_queued(&old).await.expect("get").is_none());
    assert!(store.get_queued(&other).await.expect("get").is_some());
    let id = accepted[0]
        .as_ref()
        .expect("accepted")
        .queue_id
        .clone()
        .expect("queued");
    let stored = store.get_queued(&id).await.expect("get").expect("stored");
    assert_eq!(stored.lock_owner.as_deref(), Some("n1"));
    assert_eq!(stored.rcpts, vec![rcpt("new@far.test")]);
    store.delete_all_queued().await.expect("clean up");
}

/// delete one and all.
pub async fn queue_admin(store: &dyn MessageStore) {
    store.delete_all_queued().await.expect("clear queue");
    let x = enqueue(store, secs(3600), &["x@far.test"]).await;
    let y = enqueue(store, secs(7200), &["y@far.test"]).await;
    assert!(store
        .claim_due("n1", t0(), LEASE, 10)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(store.flush(Some(&x), t0()).await.expect("flush"), 1);
    assert_eq!(
        store
            .get_queued(&x)
            .await
            .expect("get")
            .expect("x")
            .next_retry_at,
        t0()
    );
    assert_eq!(store.flush(Some(&x), secs(99_999)).await.expect("flush"), 1);
    assert_eq!(
        store
            .get_queued(&x)
            .await
            .expect("get")
            .expect("x")
            .next_retry_at,
        t0(),
        "flush never delays a message"
    );
    assert_eq!(
        ids(&store.claim_due("n1", t0(), LEASE, 10).await.expect("claim")),
        vec![x.clone()]
    );

    assert!(store.hold(&y).await.expect("hold"));
    assert_eq!(
        store.flush(None, t0()).await.expect("flush all"),
        1,
        "held y skipped"
    );
    assert_eq!(store.flush(Some(&y), t0()).await.expect("flush y"), 0);
    assert_eq!(
        store
            .get_queued(&y)
            .await
            .expect("get")
            .expect("y")
            .next_retry_at,
        secs(7200)
    );
    assert_eq!(
        store
            .flush(Some("0000000000000000"), t0())
            .await
            .expect("flush"),
        0
    );

    let listed = store.list_queue().await.expect("list");
    let view: Vec<(String, bool, Option<String>, u64)> = listed
        .iter()
        .map(|s| (s.id.clone(), s.held, s.lock_owner.clone(), s.size))
        .collect();
    let size = |at: DateTime<Utc>| format!("Subject: queued at {at}\r\n\r\nbody\r\n").len() as u64;
    assert_eq!(
        view,
        vec![
            (x.clone(), false, Some("n1".into()), size(secs(3600))),
            (y.clone(), true, None, size(secs(7200))),
        ]
    );
    assert_eq!(listed[0].sender, "sender@origin.test");
    assert_eq!(listed[0].received_at, secs(3600));

    assert!(store.delete_queued(&x).await.expect("delete"));
    assert!(!store.delete_queued(&x).await.expect("delete again"));
    assert_eq!(store.get_queued(&x).await.expect("get"), None);
    enqueue(store, secs(1), &["z@far.test"]).await;
    assert_eq!(store.delete_all_queued().await.expect("delete all"), 2);
    assert!(store.list_queue().await.expect("list").is_empty());
    assert_eq!(store.delete_all_queued().await.expect("delete all"), 0);
}

/// Two handles on the same database (as two processes would have) claim the same queue
/// at once in batches of 10, recording each message as delivered: no message is handed
/// out twice and every one is handed out once. `a` and `b` must share one database.
pub async fn concurrent_claims(a: &dyn MessageStore, b: &dyn MessageStore, messages: usize) {
    a.delete_all_queued().await.expect("clear queue");
    let mut all = HashSet::new();
    for chunk in (0..messages).collect::<Vec<_>>().chunks(50) {
        let batch = chunk
            .iter()
            .map(|i| {
                incoming(
                    "s@x.test",
                    &[],
                    vec![rcpt(&format!("r{i}@far.test"))],
                    t0(),
                    b"m",
                )
            })
            .collect();
        for acc in a.accept_batch(batch).await.expect("enqueue") {
            all.insert(acc.queue_id.expect("queued"));
        }
    }
    assert_eq!(all.len(), messages);

    async fn worker(store: &dyn MessageStore, node: &str) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let batch = store
                .claim_due(node, secs(1), LEASE, 10)
                .await
                .expect("claim");
            if batch.is_empty() {
                return got;
            }
            for m in batch {
                let results = m
                    .rcpts
                    .iter()
                    .map(|r| (r.address.clone(), RcptState::Delivered, None))
                    .collect();
                let outcome = AttemptRecord {
                    at: secs(2),
                    rcpt_results: results,
                    error: None,
                    next_retry_at: None,
                    notifications: Vec::new(),
                };
                store
                    .record_attempt(&m.id, node, outcome)
                    .await
                    .expect("record");
                got.push(m.id);
            }
        }
    }
    let (ga, gb) = futures::join!(worker(a, "node-a"), worker(b, "node-b"));
    let mut seen = HashSet::new();
    for id in ga.iter().chain(gb.iter()) {
        assert!(seen.insert(id.clone()), "message {id} claimed twice");
    }
    assert_eq!(seen, all, "every message claimed exactly once");
    assert!(a.list_queue().await.expect("list").is_empty());
}
