//! Contract checks of the queue's claims and leases, and of recording attempts.

use super::*;
use crate::store::*;

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

    let early = due(store, "n1", secs(-1), 10).await;
    assert!(early.is_empty(), "nothing is due before it was received");
    assert!(due(store, "n1", secs(10), 0).await.is_empty());

    let first = due(store, "n1", secs(10), 2).await;
    assert_eq!(
        ids(&first),
        vec![a.clone(), b.clone()],
        "oldest due first, limited"
    );
    assert_eq!(first[0].lock_owner.as_deref(), Some("n1"));
    assert_eq!(first[0].lock_expires_at, Some(secs(70)));
    assert_eq!(first[0].rcpts, vec![rcpt("a@far.test")]);

    let second = due(store, "n2", secs(15), 10).await;
    assert_eq!(
        ids(&second),
        vec![c.clone()],
        "locked and held messages are skipped"
    );
    assert!(due(store, "n1", secs(15), 10).await.is_empty());
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
    let taken = due(store, "n2", secs(70), 10).await;
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
    assert!(due(store, "n1", secs(899), 10).await.is_empty());
    let due = due(store, "n1", secs(900), 10).await;
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
