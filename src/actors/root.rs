//! `erlmail_sup`: the root supervisor (one_for_one, at most 5 restarts in 60 s).
//!
//! It starts the permanent children in order (store, SMTP supervisor, queue), re-creates
//! any of them that fails, and gives up — stopping itself, which ends the daemon with a
//! non-zero exit — when restarts exceed the intensity. It also carries the daemon-wide
//! requests: reload, tree logging and the ordered shutdown (sessions drain first, then the
//! queue, then the store so that commits in flight finish).

use std::sync::Arc;
use std::time::Duration;

use super::{Handled, Started};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{error, info, warn};

use super::msg::{QueueMsg, SmtpdSupMsg, StoreMsg};
use super::supervision::{self, Ended, RestartIntensity};
use super::{child_path, queue, smtpd_sup, store, TreeNode};
use crate::config::Config;

/// The root supervisor.
pub struct Root;

/// Why the root stopped; read by `main` to choose the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootExit {
    /// Still running.
    Running,
    /// Stopped on request (SIGTERM/SIGINT): exit 0.
    Shutdown,
    /// Restart intensity exceeded: exit non-zero.
    GaveUp(String),
}

/// Start-up arguments of the root.
pub struct RootArgs {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Where the root says why it stopped.
    pub exit: tokio::sync::watch::Sender<RootExit>,
}

/// Requests the root serves.
pub enum RootMsg {
    /// A new configuration was loaded (SIGHUP); pass it down.
    Reload(Arc<Config>),
    /// Log the live tree (SIGUSR1).
    LogTree,
    /// The live tree, for status displays.
    Tree(RpcReplyPort<TreeNode>),
    /// Stop everything in order; the reply comes when all is stopped.
    Shutdown(RpcReplyPort<()>),
    /// Test-only fault injection: make the named permanent child panic.
    #[cfg(debug_assertions)]
    InjectPanic(String),
}

/// The permanent children, in the order they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Store,
    Queue,
    SmtpdSup,
}

impl Child {
    /// Store first: the SMTP side and the queue both need it.
    const ALL: [Child; 3] = [Child::Store, Child::Queue, Child::SmtpdSup];

    fn name(self) -> &'static str {
        match self {
            Child::Store => super::STORE,
            Child::SmtpdSup => super::SMTPD_SUP,
            Child::Queue => super::QUEUE,
        }
    }
}

/// The root's state.
pub struct RootState {
    config: Arc<Config>,
    exit: tokio::sync::watch::Sender<RootExit>,
    intensity: RestartIntensity,
    /// The permanent children, by [`Child`]; `None` while one is replaced or stopped.
    children: [Option<ActorCell>; 3],
    shutting_down: bool,
}

impl RootState {
    fn cell(&self, child: Child) -> Option<&ActorCell> {
        self.children[child as usize].as_ref()
    }

    fn take(&mut self, child: Child) -> Option<ActorCell> {
        self.children[child as usize].take()
    }

    fn which(&self, cell: &ActorCell) -> Option<Child> {
        Child::ALL
            .into_iter()
            .find(|c| self.cell(*c).map(|x| x.get_id()) == Some(cell.get_id()))
    }
}

async fn spawn_child(
    child: Child, myself: &ActorRef<RootMsg>, config: &Arc<Config>,
) -> Result<ActorCell, ActorProcessingErr> {
    let (path, config) = (child_path(super::ROOT, child.name()), config.clone());
    let (sup, name) = (myself.get_cell(), child.name());
    Ok(match child {
        Child::Store => {
            let args = store::StoreArgs { config, path };
            supervision::spawn_child(&sup, name, store::StoreActor, args)
                .await?
                .get_cell()
        }
        Child::SmtpdSup => {
            let args = smtpd_sup::SmtpdSupArgs { config, path };
            supervision::spawn_child(&sup, name, smtpd_sup::SmtpdSup, args)
                .await?
                .get_cell()
        }
        Child::Queue => {
            let args = queue::QueueArgs { config, path };
            supervision::spawn_child(&sup, name, queue::QueueActor, args)
                .await?
                .get_cell()
        }
    })
}

impl Actor for Root {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(&self, myself: ActorRef<RootMsg>, args: RootArgs) -> Started<RootState> {
        info!(path = super::ROOT, "starting");
        let mut state = RootState {
            config: args.config,
            exit: args.exit,
            intensity: RestartIntensity::otp_default(),
            children: [None, None, None],
            shutting_down: false,
        };
        for child in Child::ALL {
            state.children[child as usize] =
                Some(spawn_child(child, &myself, &state.config).await?);
        }
        Ok(state)
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        log_tree(&state.config, "started; actor tree", &myself);
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        info!(path = super::ROOT, "stopped");
        state.exit.send_if_modified(|e| {
            if *e == RootExit::Running {
                *e = RootExit::Shutdown;
                true
            } else {
                false
            }
        });
        Ok(())
    }

    async fn handle(
        &self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State,
    ) -> Handled {
        match msg {
            RootMsg::Reload(config) => {
                state.config = config.clone();
                if let Some(c) = state.cell(Child::SmtpdSup) {
                    // Logged as reloaded once new sessions get the new configuration.
                    let sup: ActorRef<SmtpdSupMsg> = c.clone().into();
                    let applied = sup
                        .call(
                            |reply| SmtpdSupMsg::Reload(config.clone(), Some(reply)),
                            Some(Duration::from_secs(10)),
                        )
                        .await;
                    if !matches!(applied, Ok(ractor::rpc::CallResult::Success(()))) {
                        warn!(
                            path = super::ROOT,
                            "smtpd_sup did not confirm the new configuration"
                        );
                    }
                }
                if let Some(c) = state.cell(Child::Queue) {
                    let _ = c.send_message(QueueMsg::Reload(config.clone()));
                }
                if let Some(c) = state.cell(Child::Store) {
                    let _ = c.send_message(StoreMsg::Reload(config));
                }
                info!(path = super::ROOT, "configuration reloaded");
            }
            RootMsg::LogTree => log_tree(&state.config, "actor tree", &myself),
            RootMsg::Tree(reply) => {
                let _ = reply.send(TreeNode::of(&myself.get_cell()));
            }
            RootMsg::Shutdown(reply) => {
                info!(path = super::ROOT, "shutting down");
                state.shutting_down = true;
                // Sessions first: each finishes its commit or gets a 421.
                if let Some(c) = state.take(Child::SmtpdSup) {
                    let sup: ActorRef<SmtpdSupMsg> = c.clone().into();
                    let _ = sup
                        .call(SmtpdSupMsg::Shutdown, Some(Duration::from_secs(4)))
                        .await;
                    c.stop_and_wait(Some("shutdown".into()), Some(Duration::from_millis(500)))
                        .await
                        .ok();
                }
                if let Some(c) = state.take(Child::Queue) {
                    // Deliveries on the wire finish (bounded); what waits is given back.
                    let queue: ActorRef<QueueMsg> = c.clone().into();
                    let limit = state.config.server_smtp_shutdown_timeout;
                    let _ = queue.call(QueueMsg::Drain, Some(limit)).await;
                    c.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(1)))
                        .await
                        .ok();
                }
                if let Some(c) = state.take(Child::Store) {
                    c.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(2)))
                        .await
                        .ok();
                }
                let _ = state.exit.send(RootExit::Shutdown);
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
            #[cfg(debug_assertions)]
            RootMsg::InjectPanic(target) => {
                warn!(path = super::ROOT, target = %target, "test hook: injecting a panic");
                match target.as_str() {
                    super::STORE => {
                        if let Some(c) = state.cell(Child::Store) {
                            let _ = c.send_message(StoreMsg::InjectPanic);
                        }
                    }
                    super::QUEUE => {
                        if let Some(c) = state.cell(Child::Queue) {
                            let _ = c.send_message(QueueMsg::InjectPanic);
                        }
                    }
                    other => warn!(path = super::ROOT, "test hook: no such target {other}"),
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self, myself: ActorRef<Self::Msg>, event: SupervisionEvent, state: &mut Self::State,
    ) -> Handled {
        let Some(ended) = Ended::of(&event) else {
            return Ok(());
        };
        let Some(child) = state.which(&ended.cell) else {
            return Ok(());
        };
        let (path, why) = (child_path(super::ROOT, child.name()), ended.why());
        if state.shutting_down {
            info!(path = %path, "stopped");
            return Ok(());
        }
        error!(path = %path, reason = %why, "child {why}");
        state.children[child as usize] = None;
        let cell = loop {
            if !state.intensity.restart(&path) {
                let msg = format!(
                    "restart intensity exceeded (more than 5 restarts in 60 s, last: {path} {why}); giving up"
                );
                error!(path = super::ROOT, "{msg}");
                state.shutting_down = true;
                let _ = state.exit.send(RootExit::GaveUp(msg.clone()));
                myself.stop_children(Some("root giving up".into()));
                myself.stop(Some(msg));
                return Ok(());
            }
            match spawn_child(child, &myself, &state.config).await {
                Ok(cell) => break cell,
                // A failed start counts as a restart too (OTP does the same), after a
                // pause so that a missing database is not hammered.
                Err(e) => {
                    error!(path = %path, error = %e, "restart failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        state.children[child as usize] = Some(cell);
        info!(path = %path, "restarted");
        Ok(())
    }
}

/// Log the live tree once: in the message of a text log (one line per actor below it),
/// as the `tree` field of a JSON log.
fn log_tree(config: &Config, what: &str, root: &ActorRef<RootMsg>) {
    let tree = TreeNode::of(&root.get_cell()).render();
    match config.log_format {
        crate::config::LogFormat::Json => info!(path = super::ROOT, tree = %tree, "{what}"),
        crate::config::LogFormat::Text => info!(path = super::ROOT, "{what}:\n{tree}"),
    }
}

/// Why the tree could not start, in plain words: the innermost cause of a start-up
/// failure that each supervisor on the way wrapped again (`cannot listen on
/// 127.0.0.1:25: Address already in use`).
pub fn startup_cause(e: &ractor::SpawnErr) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    loop {
        match cause.downcast_ref::<ractor::SpawnErr>() {
            Some(ractor::SpawnErr::StartupFailed(inner)) => cause = inner.as_ref(),
            _ => return cause.to_string(),
        }
    }
}

/// Start the whole tree; returns the root's ref, its join handle and its exit watch.
pub async fn start(
    config: Arc<Config>,
) -> Result<
    (
        ActorRef<RootMsg>,
        ractor::concurrency::JoinHandle<()>,
        tokio::sync::watch::Receiver<RootExit>,
    ),
    ractor::SpawnErr,
> {
    let (tx, rx) = tokio::sync::watch::channel(RootExit::Running);
    let (root, handle) = Actor::spawn(
        Some(super::ROOT.into()),
        Root,
        RootArgs { config, exit: tx },
    )
    .await?;
    Ok((root, handle, rx))
}
