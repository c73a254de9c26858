//! `erlmail_store`: owns the store backend and serialises its writes with group commit.
//!
//! Accepts and attempt records that arrive while a commit is in flight go into the next
//! transaction together, so concurrent sessions and senders share one fsync. A record
//! alone waits up to [`RECORD_WAIT`] for an accept to ride with (or for [`RECORD_BATCH`]
//! records): nobody waits on it but its sender, and a crash meanwhile can only cause a
//! second delivery, never a loss. A session's 250 goes out only after the transaction
//! holding its message committed; then `smtpd_queue` gets the new messages, already
//! leased to it. Reads run beside the writes; every task ends with this actor. It does
//! not speak SMTP and does not decide policy.

use std::sync::Arc;

use super::{Handled, Started};
use ractor::{Actor, ActorRef, RpcReplyPort};
use tracing::{debug, error, info, warn};

use super::msg::{QueueMsg, QueueOp, RecipientFacts, StoreMsg};
use super::Tasks;
use crate::config::Config;
use crate::store::{
    self, AcceptLease, Accepted, IncomingMessage, QueuedMessage, SharedStore, StoreError,
    StoreResult,
};

/// The store actor.
pub struct StoreActor;

/// How long attempt records wait for an accepted message to share their commit.
pub const RECORD_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// This many waiting records commit at once, without waiting for an accept.
pub const RECORD_BATCH: usize = 64;

/// How long the store, stopping, tries to commit the records still waiting.
const SHUTDOWN_RECORD_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Start-up arguments.
pub struct StoreArgs {
    /// The configuration in force (store URL, Maildir root).
    pub config: Arc<Config>,
    /// Path in the tree, for logs.
    pub path: String,
}

type PendingRecord = (
    String,
    String,
    store::AttemptRecord,
    RpcReplyPort<StoreResult<()>>,
);

type Waiting = (IncomingMessage, RpcReplyPort<StoreResult<Accepted>>);

/// The store actor's state.
pub struct StoreState {
    store: SharedStore,
    config: Arc<Config>,
    path: String,
    pending: Vec<Waiting>,
    /// Attempt records waiting for the next commit (they share it with the accepts).
    records: Vec<PendingRecord>,
    in_flight: bool,
    /// A `FlushRecords` is on its way.
    flush_armed: bool,
    /// Forwards the store's wake-ups (other nodes' new, flushed or released mail) to
    /// the queue as ticks; ends with this actor.
    wake_ups: Option<tokio::task::JoinHandle<()>>,
    /// Commits, reads and queue operations running beside the mailbox.
    tasks: Tasks,
}

impl Actor for StoreActor {
    type Msg = StoreMsg;
    type State = StoreState;
    type Arguments = StoreArgs;

    async fn pre_start(&self, myself: ActorRef<StoreMsg>, args: StoreArgs) -> Started<StoreState> {
        let url = args.config.effective_store_url();
        let store = store::open(&url).await?;
        // One process per node name: its leases are its own, and a restart takes back
        // those of its earlier run at once (SQLite: the spool lock does this). A restart
        // of this actor waits briefly for the lock of the store it replaces.
        let node = &args.config.node_name;
        let mut locked = store.lock_node(node).await?;
        for _ in 0..50 {
            if locked {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            locked = store.lock_node(node).await?;
        }
        if !locked {
            return Err(format!(
                "node_name {node} is in use by another erlmail process on this store \
                 (each node needs its own node_name)"
            )
            .into());
        }
        // Leases and due times are stamped by the store's clock, measured now (before
        // the queue starts) and every few seconds after.
        sync_clock(store.as_ref(), &args.path).await;
        myself.send_interval(CLOCK_SYNC_EVERY, || StoreMsg::SyncClock);
        // Mail another node queued, flushed or released wakes our queue at once; the
        // periodic scan stays the safety net.
        let wake_ups = store.wake_ups().map(|mut rx| {
            tokio::spawn(async move {
                while rx.recv().await.is_some() {
                    if let Some(q) = ractor::registry::where_is(super::QUEUE) {
                        let _ = q.send_message(QueueMsg::Tick);
                    }
                }
            })
        });
        info!(path = %args.path, backend = store.backend(), url = %redact_url(&url), "started");
        Ok(StoreState {
            store,
            config: args.config,
            path: args.path,
            pending: Vec::new(),
            records: Vec::new(),
            in_flight: false,
            flush_armed: false,
            wake_ups,
            tasks: Tasks::default(),
        })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        if let Some(task) = state.wake_ups.take() {
            task.abort();
        }
        // Anything still waiting was never committed: its session answers 451.
        for (_, reply) in state.pending.drain(..) {
            let _ = reply.send(Err(StoreError::Unavailable("store stopping".into())));
        }
        // The commit in flight (and any read) ends before we do, its replies sent.
        state.tasks.finish(SHUTDOWN_RECORD_LIMIT).await;
        // Records waiting for company are finished deliveries: commit them on the way
        // out, or they would be delivered again once their leases lapse. Bounded: a
        // store that cannot be reached must not hold up the shutdown.
        let (records, replies) = take_records(state);
        if !records.is_empty() {
            let commit = state.store.commit_batch(store::WriteBatch {
                messages: Vec::new(),
                lease: None,
                records,
                atomic: false,
            });
            match tokio::time::timeout(SHUTDOWN_RECORD_LIMIT, commit).await {
                Ok(outcome) => answer_records(outcome.recorded, replies),
                Err(_) => {
                    warn!(path = %state.path, "attempt records not committed before stopping; those messages will be tried again")
                }
            }
        }
        info!(path = %state.path, "stopped");
        Ok(())
    }

    async fn handle(
        &self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State,
    ) -> Handled {
        match msg {
            StoreMsg::Accept(message, reply) => {
                state.pending.push((message, reply));
                commit_or_wait(&myself, state);
            }
            StoreMsg::CommitDone => {
                state.in_flight = false;
                commit_or_wait(&myself, state);
            }
            StoreMsg::FlushRecords => {
                state.flush_armed = false;
                if !state.in_flight && (!state.pending.is_empty() || !state.records.is_empty()) {
                    start_commit(&myself, state);
                }
            }
            StoreMsg::LookupRecipient { address, reply } => {
                if let Some(found) = state.store.recipient_now(&address) {
                    let _ = reply.send(found.map(|(local_domain, user_exists)| RecipientFacts {
                        local_domain,
                        user_exists,
                    }));
                    return Ok(());
                }
                let store = state.store.clone();
                state.tasks.spawn(async move {
                    let _ = reply.send(lookup(&*store, &address).await);
                });
            }
            StoreMsg::PasswordHash { address, reply } => {
                let store = state.store.clone();
                state.tasks.spawn(async move {
                    let _ = reply.send(store.password_hash(&address).await);
                });
            }
            StoreMsg::Queue(QueueOp::Record {
                id,
                node,
                record,
                reply,
            }) => {
                if test_hook_fail_record() {
                    let _ = reply.send(Err(StoreError::Unavailable(
                        "test hook: injected store failure".into(),
                    )));
                    return Ok(());
                }
                state.records.push((id, node, record, reply));
                commit_or_wait(&myself, state);
            }
            StoreMsg::Queue(op) => {
                let store = state.store.clone();
                state.tasks.spawn(run_queue_op(store, op));
            }
            StoreMsg::Reload(config) => state.config = config,
            StoreMsg::SyncClock => {
                let store = state.store.clone();
                let path = state.path.clone();
                state
                    .tasks
                    .spawn(async move { sync_clock(store.as_ref(), &path).await });
            }
            #[cfg(debug_assertions)]
            StoreMsg::InjectPanic => {
                panic!("test hook: injected panic in {}", state.path);
            }
        }
        Ok(())
    }
}

/// Test hook (debug builds only): `ERLMAIL_TEST_FAIL_RECORDS=N` fails the first N
/// attempt records offered (as a store outage between an attempt and its record would).
#[cfg(debug_assertions)]
fn test_hook_fail_record() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static FAILED: AtomicU64 = AtomicU64::new(0);
    let Some(n) = std::env::var("ERLMAIL_TEST_FAIL_RECORDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return false;
    };
    FAILED.fetch_add(1, Ordering::SeqCst) < n
}

#[cfg(not(debug_assertions))]
fn test_hook_fail_record() -> bool {
    false
}

/// How often the store's clock is measured against this host's.
const CLOCK_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Measure the store's clock minus this host's (at the midpoint of the round trip) and
/// make it what `store_now` adds. An offset over a second is worth a warning: the host's
/// clock is wrong, and the store's clock is what counts.
async fn sync_clock(store: &dyn store::MessageStore, path: &str) {
    let before = super::local_now();
    let Ok(theirs) = store.clock().await else {
        return;
    };
    let after = super::local_now();
    let midpoint = before + (after - before) / 2;
    let offset = (theirs - midpoint).num_milliseconds();
    super::set_store_clock_offset(offset);
    if offset.abs() > 1000 {
        warn!(path = %path, offset_ms = offset,
            "this host's clock is {:.1} s off the store's; leases and due times follow the store's clock",
            offset as f64 / 1000.0);
    }
}

async fn run_queue_op(store: SharedStore, op: QueueOp) {
    let now = super::store_now();
    match op {
        QueueOp::ClaimDue {
            node,
            lease,
            limit,
            reply,
        } => {
            let _ = reply.send(store.claim_due(&node, now, lease, limit).await);
        }
        QueueOp::Renew {
            id,
            node,
            lease,
            reply,
        } => {
            let _ = reply.send(store.renew_lease(&id, &node, now, lease).await);
        }
        QueueOp::Record {
            id,
            node,
            record,
            reply,
        } => {
            let _ = reply.send(store.record_attempt(&id, &node, record).await);
        }
        QueueOp::List { reply } => {
            let _ = reply.send(store.list_queue().await);
        }
        QueueOp::Counts { reply } => {
            let _ = reply.send(store.queue_counts(now).await);
        }
        QueueOp::Release { id, node } => {
            if let Err(e) = store.release(&id, &node).await {
                warn!(queue_id = %id, error = %e, "could not release a lease; it will lapse");
            }
        }
        QueueOp::ReleaseAll { ids, node, reply } => {
            for id in ids {
                if let Err(e) = store.release(&id, &node).await {
                    warn!(queue_id = %id, error = %e, "could not release a lease; it will lapse");
                }
            }
            let _ = reply.send(());
        }
        QueueOp::ReleaseNode {
            node,
            current,
            reply,
        } => {
            let _ = reply.send(store.release_node(&node, &current).await);
        }
        QueueOp::StillLeased { id, node, reply } => {
            let _ = reply.send(store.still_leased(&id, &node, now).await);
        }
    }
}

async fn lookup(store: &dyn store::MessageStore, address: &str) -> StoreResult<RecipientFacts> {
    let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    let local_domain = store.is_local_domain(domain).await?;
    let user_exists = local_domain && store.user_exists(address).await?;
    Ok(RecipientFacts {
        local_domain,
        user_exists,
    })
}

type RecordReplies = Vec<RpcReplyPort<StoreResult<()>>>;

/// The waiting records and, apart, where their answers go.
fn take_records(
    state: &mut StoreState,
) -> (Vec<(String, String, store::AttemptRecord)>, RecordReplies) {
    std::mem::take(&mut state.records)
        .into_iter()
        .map(|(id, node, record, reply)| ((id, node, record), reply))
        .unzip()
}

/// Tell each sender how its record went.
fn answer_records(recorded: StoreResult<Vec<StoreResult<()>>>, replies: RecordReplies) {
    match recorded {
        Ok(results) => {
            for (r, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// What the actor does next about its waiting writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Start a commit now.
    Commit,
    /// Records wait alone: ask for a `FlushRecords` in [`RECORD_WAIT`].
    Arm,
    /// Nothing to do (a commit is in flight, nothing waits, or the flush is armed).
    Wait,
}

/// The group-commit decision: accepts go at once (a session waits for its 250);
/// records alone wait for company, up to [`RECORD_WAIT`] or [`RECORD_BATCH`] of them.
fn next(accepts: usize, records: usize, in_flight: bool, armed: bool) -> Next {
    if in_flight {
        Next::Wait
    } else if accepts > 0 || records >= RECORD_BATCH {
        Next::Commit
    } else if records > 0 && !armed {
        Next::Arm
    } else {
        Next::Wait
    }
}

/// Start the next commit or arm the records' flush, as [`next`] says.
fn commit_or_wait(myself: &ActorRef<StoreMsg>, state: &mut StoreState) {
    match next(
        state.pending.len(),
        state.records.len(),
        state.in_flight,
        state.flush_armed,
    ) {
        Next::Commit => start_commit(myself, state),
        Next::Arm => {
            state.flush_armed = true;
            myself.send_after(RECORD_WAIT, || StoreMsg::FlushRecords);
        }
        Next::Wait => {}
    }
}

/// Take everything pending into one transaction, run it off the actor, and answer each
/// waiting session when it has committed.
fn start_commit(myself: &ActorRef<StoreMsg>, state: &mut StoreState) {
    state.in_flight = true;
    let batch = std::mem::take(&mut state.pending);
    let (records, record_replies) = take_records(state);
    let store = state.store.clone();
    let maildir_root = state.config.maildir_root.clone();
    let me = myself.clone();
    let path = state.path.clone();
    // Claim at accept: when this process's queue runs, the queued rows are inserted
    // already leased to it, and the messages go straight to the queue after the commit.
    let queue = ractor::registry::where_is(super::QUEUE);
    // A front node (no senders) leaves its mail unleased and due at once, for the
    // nodes that deliver.
    let delivers = state.config.server_smtp_max_senders > 0;
    let lease = queue.as_ref().filter(|_| delivers).map(|_| AcceptLease {
        node: super::lock_owner(&state.config),
        expires_at: super::store_now()
            + chrono::Duration::from_std(state.config.server_smtp_lock_lease)
                .unwrap_or(chrono::Duration::minutes(5)),
    });
    // Notifications committed with their records are due at once: wake the queue.
    let notified = records.iter().any(|(_, _, r)| !r.notifications.is_empty());
    state.tasks.spawn(async move {
        let (messages, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = messages.len();
        let started = std::time::Instant::now();
        let store::WriteOutcome {
            messages,
            accepted,
            recorded,
        } = store
            .commit_batch(store::WriteBatch {
                messages,
                lease: lease.clone(),
                records,
                atomic: false,
            })
            .await;
        let recorded_some = recorded.as_ref().is_ok_and(|r| r.iter().any(Result::is_ok));
        answer_records(recorded, record_replies);
        if notified && recorded_some {
            if let Some(q) = &queue {
                let _ = q.send_message(QueueMsg::Tick);
            }
        }
        match accepted {
            Ok(_) if n == 0 => {}
            Ok(results) => {
                let took = started.elapsed();
                metrics::histogram!(crate::telemetry::names::COMMIT_SECONDS)
                    .record(took.as_secs_f64());
                metrics::histogram!(crate::telemetry::names::COMMIT_BATCH).record(n as f64);
                debug!(path = %path, messages = n, micros = took.as_micros() as u64, "group commit");
                let messages = match maildir_root {
                    // The store copy is committed; the Maildir is an extra copy, written
                    // (tmp, fsync, rename) before the 250 all the same.
                    Some(root) => {
                        let path = path.clone();
                        tokio::task::spawn_blocking(move || {
                            for m in &messages {
                                for rcpt in &m.local_rcpts {
                                    if let Err(e) = store::maildir::deliver(
                                        &root,
                                        rcpt,
                                        m.maildir_folder(),
                                        &m.body,
                                        chrono::Utc::now(),
                                    ) {
                                        error!(path = %path, rcpt = %rcpt, error = %e, "maildir delivery failed");
                                    }
                                }
                            }
                            messages
                        })
                        .await
                        .unwrap_or_default()
                    }
                    None => messages,
                };
                let mut leased = Vec::new();
                let mut messages = messages.into_iter();
                // Every session is answered, whatever happened to the Maildir copies.
                for (result, reply) in results.into_iter().zip(replies) {
                    let m = messages.next();
                    match result {
                        Ok(accepted) => {
                            if let (Some(m), Some(id), Some(lease)) =
                                (m, &accepted.queue_id, &lease)
                            {
                                leased.push(QueuedMessage::from_accepted(m, id.clone(), lease));
                            }
                            let _ = reply.send(Ok(accepted));
                        }
                        // This message alone was rolled back (its savepoint); the
                        // others of the batch are committed.
                        Err(e) => {
                            warn!(path = %path, error = %e, "one message of a group commit failed; the rest committed");
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                if let (false, Some(q)) = (leased.is_empty(), &queue) {
                    let _ = q.send_message(QueueMsg::Leased(leased));
                }
            }
            Err(e) => {
                warn!(path = %path, messages = n, error = %e, "commit failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        let _ = me.send_message(StoreMsg::CommitDone);
    });
}

/// Hide a password in a `postgres://user:pass@host` URL before logging it.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{next, redact_url, Next, RECORD_BATCH};

    #[test]
    fn accepts_commit_at_once_and_records_wait_for_company() {
        assert_eq!(next(1, 0, false, false), Next::Commit, "a session waits");
        assert_eq!(next(1, 3, false, true), Next::Commit, "records ride along");
        assert_eq!(next(0, 1, false, false), Next::Arm, "a record alone waits");
        assert_eq!(next(0, 2, false, true), Next::Wait, "the flush is armed");
        assert_eq!(
            next(0, RECORD_BATCH, false, true),
            Next::Commit,
            "enough for one"
        );
        assert_eq!(next(5, 5, true, false), Next::Wait, "one commit at a time");
        assert_eq!(next(0, 0, false, false), Next::Wait);
    }

    #[test]
    fn passwords_in_store_urls_are_not_logged() {
        assert_eq!(
            redact_url("postgres://postgres:secret@127.0.0.1/test"),
            "postgres://postgres:***@127.0.0.1/test"
        );
        assert_eq!(
            redact_url("sqlite://spool/erlmail.db"),
            "sqlite://spool/erlmail.db"
        );
    }
}
