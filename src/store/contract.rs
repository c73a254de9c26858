//! The contract suite every `MessageStore` backend must pass, by subject.
//!
//! Each backend's tests open a fresh, empty store and call `run_all` (and
//! `concurrent_claims` with two handles on the same database). The checks panic on the
//! first broken promise, naming it. They use fixed times (no clock), their own domain
//! names, and clear the queue before each queue check, so they may run one after another
//! on one store. This module must not depend on any backend.

mod accounts;
mod admin;
mod commit;
mod mailboxes;
mod queue;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

pub use self::accounts::{domains, recipient_look_ups, users};
pub use self::admin::{concurrent_claims, queue_admin};
pub use self::commit::{
    commit_batch_isolates_each_message, commit_batch_mixes_accepts_and_records,
    queue_claim_at_accept,
};
pub use self::mailboxes::{
    accept_and_read_back, batch_atomicity, junk_copies, named_mailboxes_and_flags,
};
pub use self::queue::{queue_claims_and_leases, queue_record_attempt};
use super::password::hash_password;
use super::{
    AcceptLease, Accepted, AttemptRecord, IncomingMessage, MessageStore, MessageSummary,
    OutgoingRcpt, QueuedMessage, StoreError, StoreResult, WriteBatch,
};

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

/// A recipient without ORCPT or NOTIFY.
pub(crate) fn rcpt(address: &str) -> OutgoingRcpt {
    OutgoingRcpt {
        address: address.to_string(),
        orcpt: None,
        notify: None,
    }
}

/// A message as a session hands it over, received at `at`.
pub(crate) fn incoming(
    sender: &str, local: &[&str], remote: Vec<OutgoingRcpt>, at: DateTime<Utc>, body: &[u8],
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

/// Claim what is due at `at` for `node`, up to `limit`.
async fn due(
    store: &dyn MessageStore, node: &str, at: DateTime<Utc>, limit: usize,
) -> Vec<QueuedMessage> {
    store
        .claim_due(node, at, LEASE, limit)
        .await
        .expect("claim")
}

/// The listing of a user's mailbox.
async fn mailbox(store: &dyn MessageStore, user: &str, mailbox: &str) -> Vec<MessageSummary> {
    store.list_mailbox(user, mailbox).await.expect("list")
}

/// A new local domain with one user (password `pw`); returns the user's hash.
async fn user_of_new_domain(store: &dyn MessageStore, domain: &str, user: &str) -> String {
    store.add_domain(domain).await.expect("add domain");
    let h = hash_password("pw").expect("hash");
    store.add_user(user, &h).await.expect("add user");
    h
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
    store: &dyn MessageStore, messages: &[IncomingMessage], lease: Option<&AcceptLease>,
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
    store: &dyn MessageStore, records: Vec<(String, String, AttemptRecord)>,
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
