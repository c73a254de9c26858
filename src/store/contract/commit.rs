//! Contract checks of the one write path, `commit_batch`: claim at accept, records
//! batched with accepts, and each message isolated from its neighbours.

use super::*;
use crate::store::*;

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
        due(store, "n2", secs(30), 10).await.is_empty(),
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
    let lapsed = due(store, "n2", secs(61), 10).await;
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
    assert!(due(store, "n2", soon, 10).await.is_empty());
    store.release(&id, "n1").await.expect("release");
    let taken = due(store, "n2", soon, 10).await;
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

/// commit_batch: each message in its own savepoint. A batch of 20 where one message
/// names a local user that no longer exists (removed between RCPT and DATA) commits the
/// other 19, and the failed one alone gets its error; a lease and its leased rows stay
/// right for the rest.
pub async fn commit_batch_isolates_each_message(store: &dyn MessageStore) {
    user_of_new_domain(store, "iso.test", "u@iso.test").await;
    store.delete_all_queued().await.expect("clear queue");
    let before = mailbox(store, "u@iso.test", "INBOX").await.len();
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
    let inbox = mailbox(store, "u@iso.test", "INBOX").await;
    assert_eq!(inbox.len() - before, 19, "19 local copies");
    let queue = store.list_queue().await.expect("list");
    assert_eq!(queue.len(), 19, "19 queued, none for the failed one");
    assert!(queue.iter().all(|q| q.lock_owner.as_deref() == Some("n1")));
    assert!(!queue
        .iter()
        .any(|q| q.rcpts.iter().any(|r| r.address == "r7@far.test")));
    store.delete_all_queued().await.expect("clean up");
}
