//! The store contract suite against PostgreSQL, through `erlmail::store::open` on a
//! `postgres://` URL as the daemon opens it.
//!
//! `ERLMAIL_TEST_PG` names a server and an existing database to administer from (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`). Unset: every test prints a note and passes
//! without running. Set: an unreachable server fails the tests. Each test creates its own
//! database `erlmail_test_<random>` and drops it at the end (also when it panics), so the
//! tests run in parallel and repeatedly.

#[path = "support/messages.rs"]
mod messages;
#[path = "support/pg.rs"]
mod pg;

use erlmail::store::postgres::PostgresStore;
use erlmail::store::{AccountStore, MessageStore, QueueStore, StoreError};
use pg::{with_database, TestDb};

#[test]
fn test_database_urls() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgresql://u:p@h/test?sslmode=disable", "x"),
        "postgresql://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}

#[cfg(feature = "test-support")]
#[tokio::test]
async fn contract_suite_through_open() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let store = erlmail::store::open(&db.url).await.unwrap();
    assert_eq!(store.backend(), "postgres");
    erlmail::store::contract::run_all(store.as_ref()).await;
}

#[cfg(feature = "test-support")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_on_one_database_never_claim_the_same_message() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let a = erlmail::store::open(&db.url).await.unwrap();
    let b = erlmail::store::open(&db.url).await.unwrap();
    erlmail::store::contract::concurrent_claims(a.as_ref(), b.as_ref(), 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_opening_a_fresh_database_at_once_migrate_it_once() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let opens = (0..4).map(|_| PostgresStore::open(&db.url));
    let stores = futures::future::join_all(opens).await;
    for s in &stores {
        let s = s.as_ref().unwrap();
        assert_eq!(s.schema_version().await.unwrap(), 3);
    }
    let s = stores[0].as_ref().unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM erlmail_schema")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(applied, 3, "each migration recorded exactly once");
    // Data written through one node is seen by another (domains are cluster-wide).
    assert!(s.add_domain("shared.test").await.unwrap());
    let other = stores[3].as_ref().unwrap();
    assert!(other.is_local_domain("SHARED.test").await.unwrap());
    for s in &stores {
        s.as_ref().unwrap().close().await;
    }
    // Re-opening applies nothing twice and keeps the data.
    let again = PostgresStore::open(&db.url).await.unwrap();
    assert_eq!(again.schema_version().await.unwrap(), 3);
    assert_eq!(again.list_domains().await.unwrap(), vec!["shared.test"]);
    again.close().await;
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let store = PostgresStore::open(&db.url).await.unwrap();
    sqlx::query("INSERT INTO erlmail_schema (version, name, applied_at) VALUES (99, 'future', 0)")
        .execute(store.pool())
        .await
        .unwrap();
    store.close().await;
    let err = PostgresStore::open(&db.url).await.err().unwrap();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("99")),
        "{err:?}"
    );
}

#[tokio::test]
async fn pool_size_comes_from_the_url() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let store = PostgresStore::open(&db.url_with("pool_size=3&connect_timeout=2"))
        .await
        .unwrap();
    assert_eq!(store.pool().options().get_max_connections(), 3);
    assert_eq!(
        store.pool().options().get_acquire_timeout(),
        std::time::Duration::from_secs(2)
    );
    store.close().await;
}

#[tokio::test]
async fn a_terminated_connection_is_unavailable_then_service_resumes() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let store = PostgresStore::open(&db.url_with("pool_size=1"))
        .await
        .unwrap();
    assert!(store.add_domain("before.test").await.unwrap());
    // Kill the backend of the one pooled connection from the outside, as an administrator
    // (or a server restart) would: SQLSTATE 57P01 or a closed socket.
    let admin = db.admin_pool().await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND application_name = 'erlmail') t",
    )
    .bind(&db.name)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    admin.close().await;
    // The next statement either sees the dead connection (Unavailable) or is given a new
    // one by the pool's liveness check; after at most one failure, it works again.
    match store.add_domain("after.test").await {
        Ok(added) => assert!(added),
        Err(e) => {
            assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
            assert!(store.add_domain("after.test").await.unwrap());
        }
    }
    assert_eq!(
        store.list_domains().await.unwrap(),
        vec!["after.test", "before.test"]
    );
    store.close().await;
}

#[tokio::test]
async fn accepted_and_flushed_messages_are_announced_to_every_node() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let a = PostgresStore::open(&db.url).await.unwrap();
    let b = PostgresStore::open(&db.url).await.unwrap();
    let mut heard = b.queue_listener().await.unwrap();
    let msg = |rcpt: Option<&str>| {
        messages::relayed("s@x.test", rcpt.as_slice(), "h", None, b"x".to_vec())
    };
    // A failed batch announces nothing: notices are sent on commit only.
    let mut bad = msg(Some("r@far.test"));
    bad.local_rcpts = vec!["nobody@nowhere.test".into()];
    assert!(a.accept_batch(vec![bad]).await.is_err());
    let acc = a
        .accept_batch(vec![msg(Some("r1@far.test")), msg(Some("r2@far.test"))])
        .await
        .unwrap();
    let ids: Vec<String> = acc.into_iter().map(|x| x.queue_id.unwrap()).collect();
    let wait = std::time::Duration::from_secs(10);
    for id in &ids {
        let n = tokio::time::timeout(wait, heard.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.channel(), n.payload()),
            (erlmail::store::postgres::QUEUE_CHANNEL, id.as_str())
        );
    }
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(a.flush(None, later).await.unwrap(), 2);
    let n = tokio::time::timeout(wait, heard.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.payload(), "*");
    assert_eq!(a.flush(Some(&ids[1]), later).await.unwrap(), 1);
    let n = tokio::time::timeout(wait, heard.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.payload(), ids[1]);
    // Nothing else was announced (the failed batch included).
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), heard.recv())
            .await
            .is_err()
    );
    drop(heard);
    a.close().await;
    b.close().await;
}

/// A node answers "not a local domain" from memory once its listener has read the
/// domains, and a domain added or removed through another node's store is heard at once:
/// the look-up then goes to the database (or answers from the new list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_domains_follow_changes_made_by_other_nodes() {
    let Some(db) = TestDb::create("this PostgreSQL test").await else {
        return;
    };
    let a = PostgresStore::open(&db.url).await.unwrap();
    let b = PostgresStore::open(&db.url).await.unwrap();
    b.add_domain("old.test").await.unwrap();
    assert_eq!(
        a.recipient_now("x@far.test"),
        None,
        "nothing read before listening"
    );
    let _wake = a.wake_ups().expect("PostgreSQL has wake-ups");
    let within = |what: &'static str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    within("the listener reads the domains", &|| {
        a.recipient_now("x@far.test") == Some(Ok((false, false)))
    });
    assert_eq!(
        a.recipient_now("u@OLD.test"),
        None,
        "a local domain's users are looked up in the database"
    );
    b.add_domain("new.test").await.unwrap();
    within("a domain added on another node is heard", &|| {
        a.recipient_now("u@new.test").is_none()
    });
    assert!(a.is_local_domain("new.test").await.unwrap());
    b.remove_domain("old.test").await.unwrap();
    within("a domain removed on another node is heard", &|| {
        a.recipient_now("u@old.test") == Some(Ok((false, false)))
    });
    a.close().await;
    b.close().await;
}
