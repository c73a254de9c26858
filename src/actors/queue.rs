//! `smtpd_queue`: hears of every newly queued message and tries it at once, and every
//! `server_smtp_queue_interval` claims what is due, in bounded batches, up to
//! `server_smtp_max_senders` senders at once.
//!
//! Claiming stamps the message with this process's lock owner and a lease in the store,
//! so several erlmail processes sharing a store never try the same message at once. Each
//! claimed message gets an `smtpc_sender#<queue-id>` child. A sender that panics is
//! re-spawned for the same message (its lease still held) up to `MAX_SENDER_RESPAWNS`
//! times; after that the try counts as a temporary failure and the message waits for its
//! next retry, unlocked. Durable queue state lives only in the store: this actor can die
//! and be re-created, and unfinished leases simply lapse.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{debug, error, info, warn};

use super::sender::{self, Sender, SenderArgs};
use super::store::{QueueOp, StoreMsg};
use crate::config::Config;
use crate::outbound::{Router, RouterConfig};
use crate::store::{AttemptRecord, QueuedMessage, RcptState, StoreResult};

/// Re-spawns of a crashed sender for one attempt before it counts as a temporary failure.
pub const MAX_SENDER_RESPAWNS: u32 = 3;
/// Most senders at once for one next hop (Postfix's `default_destination_concurrency_limit`),
/// so one slow destination cannot take every sender.
pub const DESTINATION_CONCURRENCY: usize = 20;
/// Most messages claimed by one tick.
const CLAIM_BATCH: usize = 100;
/// How long the queue waits for a claim from the store.
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// The queue actor.
pub struct QueueActor;

/// Start-up arguments.
pub struct QueueArgs {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Path in the tree, for logs.
    pub path: String,
}

/// Requests the queue serves.
pub enum QueueMsg {
    /// A message was committed to the outgoing queue: try it now.
    NewMessage(String),
    /// Periodic scan for due messages.
    Tick,
    /// A new configuration.
    Reload(Arc<Config>),
    /// The answer to a claim of new messages.
    Claimed(Option<StoreResult<Vec<QueuedMessage>>>),
    /// Number of senders at work (for status and tests).
    Active(RpcReplyPort<usize>),
    /// Test-only fault injection.
    #[cfg(debug_assertions)]
    InjectPanic,
}

struct Running {
    message: QueuedMessage,
    crashes: u32,
}

/// The queue's state.
pub struct QueueState {
    config: Arc<Config>,
    path: String,
    owner: String,
    router: Arc<Router>,
    ticker: tokio::task::JoinHandle<()>,
    senders: HashMap<ActorId, Running>,
    /// The last claim was full: more may be due, so claim again as senders finish.
    backlog: bool,
    /// New messages announced by the store, waiting to be claimed.
    new_ids: Vec<String>,
    /// Sender slots reserved by the claim in flight (0: none in flight).
    claiming: usize,
}

fn start_ticker(myself: &ActorRef<QueueMsg>, config: &Config) -> tokio::task::JoinHandle<()> {
    let me = myself.clone();
    let every = config
        .server_smtp_queue_interval
        .max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if me.send_message(QueueMsg::Tick).is_err() {
                break;
            }
        }
    })
}

fn build_router(config: &Config) -> Result<Arc<Router>, ActorProcessingErr> {
    Ok(Arc::new(Router::new(RouterConfig::from_config(config))?))
}

/// The lock owner this process stamps on claimed messages: the node name plus the
/// process id, so that two processes on one host never take each other's leases for
/// their own.
pub fn lock_owner(config: &Config) -> String {
    format!("{}:{}", config.node_name, std::process::id())
}

async fn store_call<T: Send + 'static>(
    build: impl FnOnce(RpcReplyPort<T>) -> QueueOp,
) -> Option<T> {
    let cell = ractor::registry::where_is(super::STORE)?;
    let store: ActorRef<StoreMsg> = cell.into();
    match store
        .call(|reply| StoreMsg::Queue(build(reply)), Some(STORE_TIMEOUT))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(v)) => Some(v),
        _ => None,
    }
}

impl QueueState {
    /// The next hop a message's first recipient goes to: the unit of the
    /// per-destination limit.
    fn destination(&self, message: &QueuedMessage) -> String {
        let domain = message
            .rcpts
            .first()
            .map(|r| crate::outbound::recipient_domain(&r.address))
            .unwrap_or_default();
        self.router.next_hop(&domain).to_string()
    }

    fn free_slots(&self) -> usize {
        self.config
            .server_smtp_max_senders
            .saturating_sub(self.senders.len() + self.claiming)
    }

    /// Claim the new messages waiting, as many as there are free senders, off the actor;
    /// the answer comes back as `Claimed`. Those beyond capacity are left to the tick.
    fn claim_new(&mut self, myself: &ActorRef<QueueMsg>) {
        let room = self.free_slots();
        if room == 0 {
            self.new_ids.clear();
            self.backlog = true;
            return;
        }
        let take = room.min(self.new_ids.len());
        let ids: Vec<String> = self.new_ids.drain(..take).collect();
        if !self.new_ids.is_empty() {
            self.new_ids.clear();
            self.backlog = true;
        }
        self.claiming = ids.len();
        let (node, lease) = (self.owner.clone(), self.config.server_smtp_lock_lease);
        let me = myself.clone();
        tokio::spawn(async move {
            let result = store_call(|reply| QueueOp::ClaimMany {
                ids,
                node,
                lease,
                reply,
            })
            .await;
            let _ = me.send_message(QueueMsg::Claimed(result));
        });
    }

    async fn spawn_sender(
        &mut self,
        myself: &ActorRef<QueueMsg>,
        message: QueuedMessage,
        crashes: u32,
    ) {
        if crashes == 0 {
            let dest = self.destination(&message);
            let busy = self
                .senders
                .values()
                .filter(|r| self.destination(&r.message) == dest)
                .count();
            if busy >= DESTINATION_CONCURRENCY {
                debug!(path = %self.path, queue_id = %message.id, destination = %dest, "destination busy; leaving the message for later");
                self.backlog = true;
                if let Some(cell) = ractor::registry::where_is(super::STORE) {
                    let _ = cell.send_message(StoreMsg::Queue(QueueOp::Release {
                        id: message.id.clone(),
                        node: self.owner.clone(),
                    }));
                }
                return;
            }
        }
        let name = format!("smtpc_sender#{}", message.id);
        super::wait_unregistered(&name).await;
        let args = SenderArgs {
            message: message.clone(),
            config: self.config.clone(),
            router: self.router.clone(),
            owner: self.owner.clone(),
            path: super::child_path(&self.path, &name),
            crashes,
        };
        match Actor::spawn_linked(Some(name.clone()), Sender, args, myself.get_cell()).await {
            Ok((r, _)) => {
                debug!(path = %super::child_path(&self.path, &name), "started");
                self.senders
                    .insert(r.get_id(), Running { message, crashes });
            }
            Err(e) => {
                error!(path = %self.path, queue_id = %message.id, error = %e, "could not start a sender; releasing the message");
                let (id, node) = (message.id.clone(), self.owner.clone());
                if let Some(cell) = ractor::registry::where_is(super::STORE) {
                    let _ = cell.send_message(StoreMsg::Queue(QueueOp::Release { id, node }));
                }
            }
        }
    }

    async fn claim_due(&mut self, myself: &ActorRef<QueueMsg>) {
        let limit = self.free_slots().min(CLAIM_BATCH);
        if limit == 0 {
            self.backlog = true;
            return;
        }
        let (node, lease) = (self.owner.clone(), self.config.server_smtp_lock_lease);
        let claimed = store_call(|reply| QueueOp::ClaimDue {
            node,
            lease,
            limit,
            reply,
        })
        .await;
        match claimed {
            Some(Ok(messages)) => {
                self.backlog = messages.len() == limit;
                for m in messages {
                    self.spawn_sender(myself, m, 0).await;
                }
            }
            Some(Err(e)) => warn!(path = %self.path, error = %e, "claiming due messages failed"),
            None => warn!(path = %self.path, "store did not answer a claim"),
        }
    }
}

impl Actor for QueueActor {
    type Msg = QueueMsg;
    type State = QueueState;
    type Arguments = QueueArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: QueueArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let router = build_router(&args.config)?;
        let owner = lock_owner(&args.config);
        info!(path = %args.path, owner = %owner, "started");
        let ticker = start_ticker(&myself, &args.config);
        Ok(QueueState {
            config: args.config,
            path: args.path,
            owner,
            router,
            ticker,
            senders: HashMap::new(),
            backlog: true,
            new_ids: Vec::new(),
            claiming: 0,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        myself.stop_children(Some("smtpd_queue stopping".into()));
        // Messages being tried stay locked until their lease lapses, unless we give
        // them back now.
        if let Some(cell) = ractor::registry::where_is(super::STORE) {
            for r in state.senders.values() {
                let _ = cell.send_message(StoreMsg::Queue(QueueOp::Release {
                    id: r.message.id.clone(),
                    node: state.owner.clone(),
                }));
            }
        }
        info!(path = %state.path, "stopped");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            QueueMsg::NewMessage(id) => {
                // New messages that arrive while a claim is in flight are claimed
                // together by the next one: one transaction for many.
                state.new_ids.push(id);
                if state.claiming == 0 {
                    state.claim_new(&myself);
                }
            }
            QueueMsg::Claimed(result) => {
                state.claiming = 0;
                match result {
                    Some(Ok(messages)) => {
                        for m in messages {
                            state.spawn_sender(&myself, m, 0).await;
                        }
                    }
                    Some(Err(e)) => warn!(path = %state.path, error = %e, "claim failed"),
                    None => warn!(path = %state.path, "store did not answer a claim"),
                }
                if !state.new_ids.is_empty() {
                    state.claim_new(&myself);
                }
            }
            QueueMsg::Tick => state.claim_due(&myself).await,
            QueueMsg::Reload(config) => {
                if config.server_smtp_queue_interval != state.config.server_smtp_queue_interval {
                    state.ticker.abort();
                    state.ticker = start_ticker(&myself, &config);
                }
                match build_router(&config) {
                    Ok(r) => state.router = r,
                    Err(e) => error!(path = %state.path, error = %e, "routing not reloaded"),
                }
                state.config = config;
            }
            QueueMsg::Active(reply) => {
                let _ = reply.send(state.senders.len());
            }
            #[cfg(debug_assertions)]
            QueueMsg::InjectPanic => panic!("test hook: injected panic in {}", state.path),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let Some(running) = state.senders.remove(&cell.get_id()) else {
            return Ok(());
        };
        let name = format!("smtpc_sender#{}", running.message.id);
        let path = super::child_path(&state.path, &name);
        if let Some(err) = failure {
            let crashes = running.crashes + 1;
            error!(path = %path, error = %err, crashes, "sender failed");
            if crashes <= MAX_SENDER_RESPAWNS {
                warn!(path = %path, "restarting");
                metrics::counter!(crate::telemetry::names::RESTARTS, "path" => path.clone())
                    .increment(1);
                state.spawn_sender(&myself, running.message, crashes).await;
                return Ok(());
            }
            error!(path = %path, "sender failed {crashes} times; counting the try as a temporary failure");
            let m = &running.message;
            let now = Utc::now();
            let next = crate::queue::next_retry(
                m.tries + 1,
                state.config.server_smtp_retries,
                &state.config.server_smtp_retry_interval,
                now,
            )
            // A crash is our fault, not the recipient's: never bounce for it.
            .unwrap_or(
                now + chrono::Duration::from_std(
                    state
                        .config
                        .server_smtp_retry_interval
                        .last()
                        .copied()
                        .unwrap_or(Duration::from_secs(900)),
                )
                .unwrap_or(chrono::Duration::minutes(15)),
            );
            let record = AttemptRecord {
                at: now,
                rcpt_results: m
                    .rcpts
                    .iter()
                    .map(|r| (r.address.clone(), RcptState::Pending, None))
                    .collect(),
                error: Some(format!("delivery agent crashed: {err}")),
                next_retry_at: Some(next),
            };
            sender::record(
                &m.id,
                &state.owner,
                record,
                &path,
                state.config.server_smtp_lock_lease,
            )
            .await;
        }
        if state.backlog && state.free_slots() > 0 {
            let _ = myself.send_message(QueueMsg::Tick);
        }
        Ok(())
    }
}
