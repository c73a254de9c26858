//! `smtpd_queue`: tries at once every message this process queued (claimed at accept, it
//! arrives already leased) and, every `server_smtp_queue_interval`, claims what is due in
//! the store, up to `server_smtp_max_senders` senders at once, each an
//! `smtpc_sender#<queue-id>` child.
//!
//! The policy is pure and lives in `queue`: which waiting message goes next
//! (`queue::scheduler`, Postfix's active queue) and what follows a sender's crash
//! (`queue::crash`). This actor claims, releases and spawns. Durable queue state lives
//! only in the store: this actor can die and be re-created, and unfinished leases lapse.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Handled, Started};
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{debug, error, info, warn};

use super::msg::{QueueMsg, QueueOp, StoreMsg};
use super::sender::{self, Sender, SenderArgs};
use super::store_client::{StoreClient, Unanswered};
use super::supervision::{restarting, spawn_child, Ended};
use crate::config::Config;
use crate::outbound::{Router, RouterConfig};
use crate::queue::crash::{after_crash, AfterCrash, CrashCount};
use crate::queue::scheduler::{Scheduler, Waiting};
use crate::store::{AttemptRecord, QueuedMessage, RcptState};

/// Most messages claimed by one tick.
const CLAIM_BATCH: usize = 100;
/// The store, asked with the patience the queue has for a claim.
const STORE: StoreClient = StoreClient::new(Duration::from_secs(30));

/// The queue actor.
pub struct QueueActor;

/// Start-up arguments.
pub struct QueueArgs {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Path in the tree, for logs.
    pub path: String,
}

struct Running {
    message: Arc<QueuedMessage>,
    crashes: u32,
    destination: String,
    /// The sender bounces the message (crash budget spent) instead of delivering it.
    giving_up: bool,
}

/// How a sender is started.
struct Start {
    /// Senders that crashed on this attempt so far.
    crashes: u32,
    /// The message waited in memory: check it is still ours before trying it.
    check_first: bool,
    /// The crash budget is spent: bounce the message with this diagnostic.
    give_up: Option<String>,
}

/// The queue's state.
pub struct QueueState {
    config: Arc<Config>,
    path: String,
    owner: String,
    router: Arc<Router>,
    ticker: JoinHandle<()>,
    senders: HashMap<ActorId, Running>,
    /// The last claim was full: more may be due, so claim again as senders finish.
    backlog: bool,
    /// The active queue: leased messages waiting for a sender, per next hop.
    waiting: Scheduler<QueuedMessage>,
    /// A graceful stop is under way: answered once no sender is left.
    draining: Option<RpcReplyPort<()>>,
    /// Set once draining began (the reply may already be sent).
    stopping: bool,
}

/// Tick now and every `server_smtp_queue_interval` (a ractor timer: it ends with us).
fn start_ticker(myself: &ActorRef<QueueMsg>, config: &Config) -> JoinHandle<()> {
    let every = config
        .server_smtp_queue_interval
        .max(Duration::from_millis(10));
    let _ = myself.send_message(QueueMsg::Tick);
    myself.send_interval(every, || QueueMsg::Tick)
}

fn build_router(config: &Config) -> Result<Arc<Router>, ActorProcessingErr> {
    Ok(Arc::new(Router::new(RouterConfig::from_config(config))?))
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
            .saturating_sub(self.senders.len())
    }

    /// Give a lease back to the store (the message is claimed again later).
    fn release(&self, id: String) {
        sender::release_lease(id, self.owner.clone());
    }

    /// Give these leases back and wait until the store has done so: when the daemon
    /// stops, the store stops right after the queue, and a release still in its mailbox
    /// would be lost (the message would then wait out its lease).
    async fn release_all(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let node = self.owner.clone();
        let released =
            STORE.call(|reply| StoreMsg::Queue(QueueOp::ReleaseAll { ids, node, reply }));
        if released.await.is_err() {
            warn!(path = %self.path, "the store did not confirm giving back waiting messages; their leases will lapse");
        }
    }

    /// Empty the active queue; the ids of what waited.
    fn take_waiting(&mut self) -> Vec<String> {
        self.waiting.take_all().into_iter().map(|m| m.id).collect()
    }

    /// Put a leased message in the active queue, or release it when the queue is full.
    fn enqueue(&mut self, message: QueuedMessage) {
        let dest = self.destination(&message);
        if let Err(message) = self.waiting.push(message, dest) {
            debug!(path = %self.path, queue_id = %message.id, "active queue full; releasing the message");
            self.backlog = true;
            self.release(message.id);
        }
    }

    /// Start senders for waiting messages while senders are free, as the scheduler
    /// picks them.
    async fn pump(&mut self, myself: &ActorRef<QueueMsg>) {
        while self.free_slots() > 0 {
            let senders = &self.senders;
            let busy = |dest: &str| senders.values().filter(|r| r.destination == dest).count();
            let Some(ready) = self.waiting.next(busy) else {
                break;
            };
            let start = Start {
                crashes: 0,
                check_first: ready.check_first,
                give_up: None,
            };
            self.spawn_sender(myself, Arc::new(ready.message), start)
                .await;
        }
    }

    /// Release the waiting messages whose lease would lapse within half a lease: they
    /// would otherwise be tried by us and, after the lapse, by another process too.
    fn release_stale(&mut self) {
        let margin = chrono::Duration::from_std(self.config.server_smtp_lock_lease / 2)
            .unwrap_or(chrono::Duration::seconds(60));
        for m in self.waiting.take_stale(super::store_now() + margin) {
            self.backlog = true;
            self.release(m.id);
        }
    }

    async fn spawn_sender(
        &mut self, myself: &ActorRef<QueueMsg>, message: Arc<QueuedMessage>, start: Start,
    ) {
        let Start {
            crashes,
            check_first,
            give_up,
        } = start;
        let name = format!("smtpc_sender#{}", message.id);
        let destination = self.destination(&message);
        let args = SenderArgs {
            message: message.clone(),
            config: self.config.clone(),
            router: self.router.clone(),
            owner: self.owner.clone(),
            path: super::child_path(&self.path, &name),
            crashes,
            check_first,
            give_up: give_up.clone(),
        };
        match spawn_child(&myself.get_cell(), &name, Sender, args).await {
            Ok(r) => {
                debug!(path = %super::child_path(&self.path, &name), "started");
                self.senders.insert(
                    r.get_id(),
                    Running {
                        message,
                        crashes,
                        destination,
                        giving_up: give_up.is_some(),
                    },
                );
            }
            Err(e) => {
                error!(path = %self.path, queue_id = %message.id, error = %e, "could not start a sender; releasing the message");
                self.release(message.id.clone());
            }
        }
    }

    async fn claim_due(&mut self, myself: &ActorRef<QueueMsg>) {
        self.release_stale();
        // Local work first; senders still free after that (what waits is for busy next
        // hops) take due messages from the store, so retries and mail for other
        // destinations never starve behind one slow destination.
        self.pump(myself).await;
        let limit = self.free_slots().min(CLAIM_BATCH);
        if limit == 0 {
            self.backlog = true;
            return;
        }
        let (node, lease) = (self.owner.clone(), self.config.server_smtp_lock_lease);
        let claimed = STORE.queue(|reply| QueueOp::ClaimDue {
            node,
            lease,
            limit,
            reply,
        });
        match claimed.await {
            Ok(messages) => {
                self.backlog = messages.len() == limit;
                for m in messages {
                    self.enqueue(m);
                }
                self.pump(myself).await;
            }
            Err(Unanswered::Store(e)) => {
                warn!(path = %self.path, error = %e, "claiming due messages failed")
            }
            Err(_) => warn!(path = %self.path, "store did not answer a claim"),
        }
    }
}

impl Actor for QueueActor {
    type Msg = QueueMsg;
    type State = QueueState;
    type Arguments = QueueArgs;

    async fn pre_start(&self, myself: ActorRef<QueueMsg>, args: QueueArgs) -> Started<QueueState> {
        let router = build_router(&args.config)?;
        let owner = super::lock_owner(&args.config);
        info!(path = %args.path, owner = %owner, "started");
        if args.config.server_smtp_max_senders == 0 {
            info!(path = %args.path, "server_smtp_max_senders is 0: a front node; mail is accepted and queued here and delivered by the other nodes");
        }
        let ticker = start_ticker(&myself, &args.config);
        Ok(QueueState {
            config: args.config,
            path: args.path,
            owner,
            router,
            ticker,
            senders: HashMap::new(),
            backlog: true,
            waiting: Scheduler::default(),
            draining: None,
            stopping: false,
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        // Take back what an earlier run of this node was delivering when it stopped
        // (crash, kill -9, power cut): this process holds the node name, so nobody is
        // using those leases, and the mail goes out now rather than a lease later.
        let (node, current) = (state.config.node_name.clone(), state.owner.clone());
        let released = STORE.queue(|reply| QueueOp::ReleaseNode {
            node,
            current,
            reply,
        });
        match released.await {
            Ok(0) => {}
            Ok(n) => {
                info!(path = %state.path, messages = n, "took back {n} messages leased by an earlier run of this node")
            }
            Err(Unanswered::Store(e)) => {
                warn!(path = %state.path, error = %e, "could not take back an earlier run's leases; they will lapse")
            }
            Err(_) => {
                warn!(path = %state.path, "store did not answer; an earlier run's leases will lapse")
            }
        }
        let _ = myself.send_message(QueueMsg::Tick);
        Ok(())
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        state.ticker.abort();
        myself.stop_children(Some("smtpd_queue stopping".into()));
        // Messages waiting in memory go back to the store for anyone to claim. Messages
        // whose sender was still on the wire keep their lease: the transaction may have
        // completed, and handing the message to another node now could send it twice.
        // The lease lapses, or this node takes it back when it starts again.
        let waiting = state.take_waiting();
        state.release_all(waiting).await;
        if !state.senders.is_empty() {
            warn!(path = %state.path, senders = state.senders.len(),
                "stopped with deliveries still on the wire; their leases are kept until they lapse or this node restarts");
        }
        info!(path = %state.path, "stopped");
        Ok(())
    }

    async fn handle(
        &self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State,
    ) -> Handled {
        state.waiting.next_generation();
        match msg {
            QueueMsg::Leased(messages) if state.stopping => {
                for m in messages {
                    state.release(m.id);
                }
            }
            QueueMsg::Leased(messages) => {
                for m in messages {
                    state.enqueue(m);
                }
                state.pump(&myself).await;
            }
            QueueMsg::Tick if state.stopping => {}
            QueueMsg::Tick => state.claim_due(&myself).await,
            QueueMsg::Drain(reply) => {
                state.stopping = true;
                state.ticker.abort();
                let waiting = state.take_waiting();
                info!(path = %state.path, on_the_wire = state.senders.len(), given_back = waiting.len(),
                    "stopping: waiting for deliveries on the wire; giving back {} waiting messages", waiting.len());
                state.release_all(waiting).await;
                if state.senders.is_empty() {
                    let _ = reply.send(());
                } else {
                    state.draining = Some(reply);
                }
            }
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
        &self, myself: ActorRef<Self::Msg>, event: SupervisionEvent, state: &mut Self::State,
    ) -> Handled {
        let Some(Ended { cell, failure, .. }) = Ended::of(&event) else {
            return Ok(());
        };
        let Some(running) = state.senders.remove(&cell.get_id()) else {
            return Ok(());
        };
        let name = format!("smtpc_sender#{}", running.message.id);
        let path = super::child_path(&state.path, &name);
        if let Some(err) = failure {
            let m = running.message.clone();
            let count = CrashCount::after(running.crashes, m.last_error.as_deref());
            let crashes = count.this_attempt;
            let total = count.in_a_row;
            error!(path = %path, error = %err, crashes, in_a_row = total, "sender failed");
            let settling = running.giving_up || state.stopping;
            let now = super::store_now();
            match after_crash(count, &err, settling, m.tries, &state.config, now) {
                AfterCrash::GiveUp(why) => {
                    // A message that kills every sender it meets is given up: bounced
                    // (5.3.0) by one more sender that does not deliver, only reports.
                    error!(path = %path, "sender crashed {total} times in a row on this message; bouncing it");
                    let start = Start {
                        crashes,
                        check_first: false,
                        give_up: Some(why),
                    };
                    state.spawn_sender(&myself, m, start).await;
                    return Ok(());
                }
                AfterCrash::Respawn => {
                    restarting(&path, "smtpd_queue/smtpc_sender");
                    let start = Start {
                        crashes,
                        check_first: false,
                        give_up: None,
                    };
                    state.spawn_sender(&myself, m, start).await;
                    return Ok(());
                }
                AfterCrash::Defer {
                    error,
                    next_retry_at,
                } => {
                    error!(path = %path, "sender failed {crashes} times; counting the try as a temporary failure");
                    let record = AttemptRecord {
                        at: now,
                        rcpt_results: m
                            .rcpts
                            .iter()
                            .map(|r| (r.address.clone(), RcptState::Pending, None))
                            .collect(),
                        error: Some(error),
                        next_retry_at: Some(next_retry_at),
                        notifications: Vec::new(),
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
            }
        }
        if state.stopping {
            if state.senders.is_empty() {
                if let Some(reply) = state.draining.take() {
                    let _ = reply.send(());
                }
            }
            return Ok(());
        }
        state.pump(&myself).await;
        if state.waiting.is_empty() && state.backlog && state.free_slots() > 0 {
            let _ = myself.send_message(QueueMsg::Tick);
        }
        Ok(())
    }
}

impl Waiting for QueuedMessage {
    fn bytes(&self) -> usize {
        self.body.len()
    }

    fn lease_expires_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.lock_expires_at
    }
}
