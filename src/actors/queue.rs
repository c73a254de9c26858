//! `smtpd_queue`: hears of every newly queued message and wakes up every
//! `server_smtp_queue_interval` to try what is due.
//!
//! Durable queue state lives only in the store; this actor holds nothing that a restart
//! would lose. Delivery (senders, leases, retries) is built on top of this skeleton.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{debug, info};

use crate::config::Config;

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
    /// Test-only fault injection.
    #[cfg(debug_assertions)]
    InjectPanic,
}

/// The queue's state.
pub struct QueueState {
    config: Arc<Config>,
    path: String,
    ticker: tokio::task::JoinHandle<()>,
}

fn start_ticker(myself: &ActorRef<QueueMsg>, config: &Config) -> tokio::task::JoinHandle<()> {
    let me = myself.clone();
    let every = config.server_smtp_queue_interval.max(std::time::Duration::from_millis(10));
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

impl Actor for QueueActor {
    type Msg = QueueMsg;
    type State = QueueState;
    type Arguments = QueueArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: QueueArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        info!(path = %args.path, "started");
        let ticker = start_ticker(&myself, &args.config);
        Ok(QueueState {
            config: args.config,
            path: args.path,
            ticker,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        myself.stop_children(Some("smtpd_queue stopping".into()));
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
            QueueMsg::NewMessage(id) => debug!(path = %state.path, queue_id = %id, "new message"),
            QueueMsg::Tick => {}
            QueueMsg::Reload(config) => {
                if config.server_smtp_queue_interval != state.config.server_smtp_queue_interval {
                    state.ticker.abort();
                    state.ticker = start_ticker(&myself, &config);
                }
                state.config = config;
            }
            #[cfg(debug_assertions)]
            QueueMsg::InjectPanic => panic!("test hook: injected panic in {}", state.path),
        }
        Ok(())
    }
}
