//! Contract checks of queue administration (list, flush, hold, delete), and of two
//! handles on one database claiming one queue at once.

use std::collections::HashSet;

use super::*;
use crate::store::*;

/// Administration: list, flush (one/all, held skipped, earlier due time kept), hold,
/// delete one and all.
pub async fn queue_admin(store: &dyn MessageStore) {
    store.delete_all_queued().await.expect("clear queue");
    let x = enqueue(store, secs(3600), &["x@far.test"]).await;
    let y = enqueue(store, secs(7200), &["y@far.test"]).await;
    assert!(due(store, "n1", t0(), 10).await.is_empty());
    assert_eq!(store.flush(Some(&x), t0()).await.expect("flush"), 1);
    assert_eq!(due_at(store, &x).await, t0());
    assert_eq!(store.flush(Some(&x), secs(99_999)).await.expect("flush"), 1);
    assert_eq!(
        due_at(store, &x).await,
        t0(),
        "flush never delays a message"
    );
    assert_eq!(ids(&due(store, "n1", t0(), 10).await), vec![x.clone()]);

    assert!(store.hold(&y).await.expect("hold"));
    assert_eq!(
        store.flush(None, t0()).await.expect("flush all"),
        1,
        "held y skipped"
    );
    assert_eq!(store.flush(Some(&y), t0()).await.expect("flush y"), 0);
    assert_eq!(due_at(store, &y).await, secs(7200));
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

/// When the queued message `id` is due.
async fn due_at(store: &dyn MessageStore, id: &str) -> DateTime<Utc> {
    let m = store.get_queued(id).await.expect("get").expect("queued");
    m.next_retry_at
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
            let batch = due(store, node, secs(1), 10).await;
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
