//! `smtpc_sender#<queue-id>`: makes one delivery attempt of one queued message.
//!
//! The sender holds the message's lease (renewing it while it works), delivers through
//! `outbound`, asks `queue::plan` what the results mean, builds the notifications owed
//! and records the attempt with them, which clears the lease (notifications commit with
//! the record: never lost, never sent twice for one outcome). A sender that panics is
//! re-spawned by `smtpd_queue` for the same message a bounded number of times.

use std::sync::Arc;
use std::time::Duration;

use super::{Handled, Started};
use chrono::{DateTime, Utc};
use ractor::{Actor, ActorRef};
use tracing::{info, warn};

use super::msg::{QueueOp, StoreMsg};
use super::store_client::{self, StoreClient, Unanswered};
use crate::config::Config;
use crate::outbound::{self, RcptResult, Router};
use crate::queue::plan::{plan_attempt, AttemptPlan, History, Tried, Verdict};
use crate::queue::{self, DsnInput, DsnKind, DsnRecipient, RcptStatus};
use crate::store::{AttemptRecord, IncomingMessage, OutgoingRcpt, QueuedMessage, RcptState};
use crate::telemetry::names;

/// The store, asked with the patience a sender has for recording its result.
const STORE: StoreClient = StoreClient::new(Duration::from_secs(60));

/// The sender actor.
pub struct Sender;

/// Start-up arguments.
pub struct SenderArgs {
    /// The claimed message (its lease is ours), shared with `smtpd_queue`, which keeps
    /// it to re-spawn a crashed sender.
    pub message: Arc<QueuedMessage>,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Routing and DNS, shared by all senders.
    pub router: Arc<Router>,
    /// Our lock owner name.
    pub owner: String,
    /// Path in the tree, for logs.
    pub path: String,
    /// How many earlier senders crashed on this attempt (test hook input).
    pub crashes: u32,
    /// The message waited in memory: check that it is still ours (not deleted, held or
    /// lapsed) before trying it.
    pub check_first: bool,
    /// The crash budget is spent: do not deliver; fail every pending recipient with
    /// this diagnostic (5.3.0) and send the notifications owed.
    pub give_up: Option<String>,
}

/// The sender's only request: run the attempt (sent to itself at start).
pub enum SenderMsg {
    /// Make the attempt, then stop.
    Run,
}

/// The sender's state.
pub struct SenderState {
    args: SenderArgs,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for Sender {
    type Msg = SenderMsg;
    type State = SenderState;
    type Arguments = SenderArgs;

    async fn pre_start(
        &self, myself: ActorRef<SenderMsg>, args: SenderArgs,
    ) -> Started<SenderState> {
        myself.send_message(SenderMsg::Run)?;
        Ok(SenderState {
            args,
            renewer: None,
        })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        if let Some(r) = state.renewer.take() {
            r.abort();
        }
        Ok(())
    }

    async fn handle(
        &self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State,
    ) -> Handled {
        let SenderMsg::Run = msg;
        if state.args.check_first && !still_ours(&state.args).await {
            info!(path = %state.args.path, queue_id = %state.args.message.id,
                "no longer ours to try (deleted, held or lapsed while waiting); not tried");
            release_lease(state.args.message.id.clone(), state.args.owner.clone());
            myself.stop(None);
            return Ok(());
        }
        if state.args.give_up.is_none() {
            test_hook_panic(&state.args);
        }
        let go_ahead = outbound::GoAhead::new();
        state.renewer = Some(start_renewer(&state.args, go_ahead.clone()));
        // The lease is renewed until the result is recorded: recording may have to wait
        // for the store, and the message must stay ours meanwhile.
        if let Some((record, owed)) = attempt(&state.args, &go_ahead).await {
            // Notifications are counted once they are committed, with the record.
            if record_attempt(&state.args, record).await {
                for (kind, to) in owed {
                    metrics::counter!(names::DSNS, "kind" => kind.action()).increment(1);
                    info!(path = %state.args.path, queue_id = %state.args.message.id, to = %to, kind = kind.action(),
                        "delivery status notification queued");
                }
            }
        }
        if let Some(r) = state.renewer.take() {
            r.abort();
        }
        myself.stop(None);
        Ok(())
    }
}

/// Whether the message is still leased to us and not held (a read).
async fn still_ours(args: &SenderArgs) -> bool {
    let (id, node) = (args.message.id.clone(), args.owner.clone());
    let answer = STORE.queue(|reply| QueueOp::StillLeased { id, node, reply });
    matches!(answer.await, Ok(true))
}

/// Give the lease on message `id` back without recording a try (nothing happens if it
/// is not `node`'s); the message falls due at once.
pub(crate) fn release_lease(id: String, node: String) {
    store_client::cast(StoreMsg::Queue(QueueOp::Release { id, node }));
}

/// Test hook (debug builds only): `ERLMAIL_TEST_SENDER_PANICS=N` makes the first N
/// senders of each attempt panic, so tests can watch the bounded re-spawn; with
/// `ERLMAIL_TEST_SENDER_PANIC_MATCH=TEXT`, only for messages whose text holds TEXT.
#[cfg(debug_assertions)]
fn test_hook_panic(args: &SenderArgs) {
    if let Ok(needle) = std::env::var("ERLMAIL_TEST_SENDER_PANIC_MATCH") {
        let body = String::from_utf8_lossy(&args.message.body);
        if !body.contains(&needle) {
            return;
        }
    }
    if let Some(n) = std::env::var("ERLMAIL_TEST_SENDER_PANICS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        if args.crashes < n {
            panic!("test hook: injected panic in {}", args.path);
        }
    }
}

#[cfg(not(debug_assertions))]
fn test_hook_panic(_args: &SenderArgs) {}

/// Keep our lease alive while we work: renew at a third of its length. When a renewal
/// says the lease is gone (deleted, held, taken over), or no renewal has succeeded for
/// two thirds of a lease (it may lapse before we could know), withdraw `go_ahead`: the
/// text is not sent, and nothing is recorded.
fn start_renewer(args: &SenderArgs, go_ahead: outbound::GoAhead) -> tokio::task::JoinHandle<()> {
    let lease = args.config.server_smtp_lock_lease;
    let id = args.message.id.clone();
    let owner = args.owner.clone();
    let path = args.path.clone();
    tokio::spawn(async move {
        let every = (lease / 3).max(Duration::from_millis(100));
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            let (id, node) = (id.clone(), owner.clone());
            let renewed = STORE.queue(|reply| QueueOp::Renew {
                id,
                node,
                lease,
                reply,
            });
            match renewed.await {
                // No store registered (restarting): try again at the next turn.
                Err(Unanswered::NotRunning) => continue,
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(path = %path, "lease lost (deleted, held or taken over); stopping before the text");
                    go_ahead.withdraw();
                    return;
                }
                _ if last_ok.elapsed() >= lease * 2 / 3 => {
                    warn!(path = %path, "lease not renewed for two thirds of its length; stopping before the text");
                    go_ahead.withdraw();
                    return;
                }
                _ => warn!(path = %path, "lease renewal failed; trying again"),
            }
        }
    })
}

/// One delivery attempt: deliver, apply the retry policy, build the notifications owed
/// (they commit with the record; their kinds and addressees come back beside it for the
/// log). `None` when the lease was lost on the way: the message is not ours to record.
async fn attempt(
    args: &SenderArgs, go_ahead: &outbound::GoAhead,
) -> Option<(AttemptRecord, Vec<(DsnKind, String)>)> {
    let msg = &args.message;
    let config = &args.config;
    let rcpts: Vec<String> = msg.rcpts.iter().map(|r| r.address.clone()).collect();
    if msg.tries > 0 {
        metrics::counter!(names::RETRIES).increment(1);
    }
    let started = std::time::Instant::now();
    let results = match &args.give_up {
        // The crash budget is spent: report, do not deliver.
        Some(why) => rcpts
            .iter()
            .map(|rcpt| RcptResult {
                rcpt: rcpt.clone(),
                status: RcptStatus::Permanent {
                    cause: queue::FailureCause::Crashed(why.clone()),
                },
                remote_mta: None,
                remote_addr: None,
                tls: false,
                dsn: false,
            })
            .collect(),
        None => {
            let envelope = outbound::Envelope {
                sender: msg.sender.clone(),
                rcpts: msg
                    .rcpts
                    .iter()
                    .map(|r| outbound::EnvelopeRcpt {
                        address: r.address.clone(),
                        notify: r.notify.clone(),
                        orcpt: r.orcpt.clone(),
                    })
                    .collect(),
                ret: msg.ret.clone(),
                envid: msg.envid.clone(),
                smtputf8: msg.smtputf8,
            };
            let helo = config
                .server_smtp_ehlo_name
                .as_deref()
                .unwrap_or(&config.server_smtp_name);
            outbound::deliver_message_with(&args.router, helo, &envelope, &msg.body, go_ahead).await
        }
    };
    // Due times are stamped by the store's clock (see `actors::store_now`).
    if !go_ahead.given() {
        // Fencing: whatever happened on the wire, the message now belongs to whoever
        // holds its lease (or to nobody: deleted, held); recording or notifying here
        // could contradict them.
        warn!(path = %args.path, queue_id = %msg.id, "lease lost during the attempt; stopped before the text and recording nothing");
        return None;
    }
    let now = super::store_now();
    metrics::histogram!(names::ATTEMPT_SECONDS).record(started.elapsed().as_secs_f64());
    let plan = plan(msg, &results, config, now);
    let mut record = record_of(&plan, now);
    let mut owed = Vec::new();
    // The notifications travel with the record and commit with it (see AttemptRecord).
    for (kind, dsn_rcpts) in [
        (DsnKind::Failure, &plan.failed),
        (DsnKind::Delay, &plan.delayed),
        (DsnKind::Relayed, &plan.relayed),
    ] {
        if !dsn_rcpts.is_empty() {
            if let Some(dsn) = notification(args, kind, dsn_rcpts.clone(), now).await {
                owed.push((kind, msg.sender.clone()));
                record.notifications.push(dsn);
            }
        }
    }
    for r in &results {
        metrics::counter!(names::DELIVERIES, "result" => outcome_word(&r.status)).increment(1);
        if matches!(r.status, RcptStatus::Delivered { .. }) {
            let latency = (now - msg.received_at).to_std().unwrap_or_default();
            metrics::histogram!(names::DELIVERY_LATENCY).record(latency.as_secs_f64());
        }
        info!(
            path = %args.path,
            queue_id = %msg.id,
            to = %r.rcpt,
            relay = r.remote_mta.as_deref().unwrap_or("none"),
            tls = r.tls,
            status = ?outcome_word(&r.status),
            "{}",
            r.status.describe()
        );
    }
    Some((record, owed))
}

fn outcome_word(s: &RcptStatus) -> &'static str {
    match s {
        RcptStatus::Delivered { .. } => "sent",
        RcptStatus::Temporary { .. } => "deferred",
        RcptStatus::Permanent { .. } => "bounced",
    }
}

/// The pure attempt plan (`queue::plan`) for this message and these results.
fn plan(
    msg: &QueuedMessage, results: &[RcptResult], config: &Config, now: DateTime<Utc>,
) -> AttemptPlan {
    let history = History {
        sender: &msg.sender,
        tries: msg.tries,
        received_at: msg.received_at,
        last_try_at: msg.last_try_at,
    };
    let tried: Vec<Tried<'_>> = results
        .iter()
        .map(|r| {
            let orig = msg.rcpts.iter().find(|o| o.address == r.rcpt);
            Tried {
                rcpt: &r.rcpt,
                notify: orig.and_then(|o| o.notify.as_deref()),
                orcpt: orig.and_then(|o| o.orcpt.as_deref()),
                status: &r.status,
                remote_mta: r.remote_mta.as_deref(),
                tls: r.tls,
                dsn: r.dsn,
            }
        })
        .collect();
    plan_attempt(&history, &tried, config, now)
}

/// The store's record of a planned attempt (its notifications are added after).
fn record_of(plan: &AttemptPlan, now: DateTime<Utc>) -> AttemptRecord {
    AttemptRecord {
        at: now,
        rcpt_results: plan
            .rcpt_results
            .iter()
            .map(|(rcpt, verdict, response)| {
                let state = match verdict {
                    Verdict::Pending => RcptState::Pending,
                    Verdict::Delivered => RcptState::Delivered,
                    Verdict::Failed => RcptState::Failed,
                };
                (rcpt.clone(), state, response.clone())
            })
            .collect(),
        error: plan.error.clone(),
        next_retry_at: plan.next_retry_at,
        notifications: Vec::new(),
    }
}

/// Build a notification from `<>` to the original sender (local mailbox or queue); it is
/// queued with the attempt's record.
async fn notification(
    args: &SenderArgs, kind: DsnKind, recipients: Vec<DsnRecipient>, now: DateTime<Utc>,
) -> Option<IncomingMessage> {
    let msg = &args.message;
    let config = &args.config;
    let input = DsnInput {
        kind,
        reporting_mta: config.server_smtp_name.clone(),
        original_sender: msg.sender.clone(),
        envid: msg.envid.clone(),
        arrival_date: msg.received_at,
        date: now,
        message_id: format!(
            "{}.{}.dsn@{}",
            msg.id,
            now.timestamp_millis(),
            config.server_smtp_name
        ),
        ret: msg.ret.as_deref().and_then(queue::Ret::parse),
        recipients,
        original: msg.body.clone(),
    };
    let body = queue::build_dsn(&input);
    // A sender whose own domain is local gets the report in its mailbox.
    let address = msg.sender.clone();
    let facts = STORE.ask(|reply| StoreMsg::LookupRecipient {
        address: address.clone(),
        reply,
    });
    let (local_rcpts, remote_rcpts) = match facts.await {
        Err(Unanswered::NotRunning) => {
            warn!(path = %args.path, "store not running; notification not queued");
            return None;
        }
        Ok(f) if f.local_domain => {
            if f.user_exists {
                (vec![address.clone()], vec![])
            } else {
                warn!(path = %args.path, sender = %address, "notification for an unknown local user dropped");
                return None;
            }
        }
        _ => (
            vec![],
            vec![OutgoingRcpt {
                address: address.clone(),
                orcpt: None,
                notify: Some("NEVER".into()),
            }],
        ),
    };
    let dsn = IncomingMessage {
        sender: String::new(),
        local_rcpts,
        remote_rcpts,
        mailbox: None,
        flags: Vec::new(),
        ret: None,
        envid: None,
        // A report to a UTF-8 address needs SMTPUTF8 on its way (RFC 6533).
        smtputf8: !address.is_ascii(),
        client_ip: "127.0.0.1".into(),
        helo: config.server_smtp_name.clone(),
        received_at: now,
        subject: Some(kind.subject().to_string()),
        body,
    };
    Some(dsn)
}

/// Record the attempt through the store actor (which also clears our lease); whether it
/// was recorded.
pub(crate) async fn record_attempt(args: &SenderArgs, outcome: AttemptRecord) -> bool {
    // If the store is unreachable, renewals fail too: the lease then lapses at most a
    // lease after the last successful renewal, which came at most a third of a lease
    // ago. Give up before another node can have taken the message.
    let patience = args.config.server_smtp_lock_lease * 2 / 3;
    record(&args.message.id, &args.owner, outcome, &args.path, patience).await
}

/// Record an attempt for message `id` held by `owner`. While the store is unreachable
/// the result is kept and offered again, for as long as our lease would last
/// (`patience`): recording it late beats a second delivery after the lease lapses.
pub(crate) async fn record(
    id: &str, owner: &str, outcome: AttemptRecord, path: &str, patience: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(200);
    loop {
        let (queue_id, node, record) = (id.to_string(), owner.to_string(), outcome.clone());
        let recorded = STORE.queue(|reply| QueueOp::Record {
            id: queue_id,
            node,
            record,
            reply,
        });
        match recorded.await {
            Ok(()) => return true,
            Err(Unanswered::Store(crate::store::StoreError::Invalid(why))) => {
                warn!(path = %path, queue_id = %id, reason = %why, "attempt not recorded; another node owns the message now");
                return false;
            }
            Err(Unanswered::Store(e)) => {
                warn!(path = %path, queue_id = %id, error = %e, "attempt not recorded yet; will offer it again");
            }
            Err(_) => {
                warn!(path = %path, queue_id = %id, "store not answering; will offer the result again");
            }
        }
        if tokio::time::Instant::now() + pause > deadline {
            warn!(path = %path, queue_id = %id, "gave up recording the attempt; the lease lapses and the message will be tried again");
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
