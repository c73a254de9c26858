//! `smtpd_sup`: supervises the listener (permanent) and one `smtpd_fsm` per session
//! (temporary: a session that ends or fails is never restarted).
//!
//! The listener hands each accepted connection here; this supervisor enforces
//! `server_smtp_max_connection` (ErlMail never did), names the session
//! `smtpd_fsm#<n>` and spawns it linked to itself, so the live tree shows every session.
//! On shutdown it stops accepting, tells every session to finish (a commit in flight
//! completes; an idle session gets `421 4.3.2`), and answers once all are gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::net::TcpStream;
use tracing::{error, info, warn};

use super::{child_path, fsm, listener, RestartIntensity};
use crate::config::Config;

/// The SMTP supervisor.
pub struct SmtpdSup;

/// Start-up arguments.
pub struct SmtpdSupArgs {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Path in the tree, for logs.
    pub path: String,
}

/// Requests the SMTP supervisor serves.
pub enum SmtpdSupMsg {
    /// A connection a listener accepted (the flag: on the implicit-TLS port).
    Accepted(TcpStream, SocketAddr, bool),
    /// A new configuration: new sessions use it; the listener rebinds if its address
    /// changed. The reply, if asked for, comes once it applies.
    Reload(Arc<Config>, Option<RpcReplyPort<()>>),
    /// Stop accepting, drain the sessions, then reply.
    Shutdown(RpcReplyPort<()>),
    /// The drain deadline passed: end the sessions that remain.
    DrainDeadline,
}

/// The supervisor's state.
pub struct SmtpdSupState {
    config: Arc<Config>,
    path: String,
    /// The live listeners: the plain one and, with `server_smtp_tls_port`, the
    /// implicit-TLS one (the flag).
    listeners: Vec<(bool, ActorCell)>,
    listener_addr: (std::net::IpAddr, u16, Option<u16>),
    sessions: HashMap<ActorId, (String, ActorCell)>,
    next_session: u64,
    intensity: RestartIntensity,
    draining: Option<RpcReplyPort<()>>,
}

/// Registry name of the implicit-TLS listener.
const TLS_LISTENER: &str = "smtpd_listener_tls";

fn listener_addr(config: &Config) -> (std::net::IpAddr, u16, Option<u16>) {
    (
        config.server_smtp_address,
        config.server_smtp_port,
        config.server_smtp_tls_port,
    )
}

fn listener_name(implicit_tls: bool) -> &'static str {
    if implicit_tls {
        TLS_LISTENER
    } else {
        super::LISTENER
    }
}

/// Start one listener: the plain one, or the implicit-TLS one.
async fn spawn_listener(
    myself: &ActorRef<SmtpdSupMsg>,
    config: &Arc<Config>,
    path: &str,
    implicit_tls: bool,
) -> Result<ActorCell, ActorProcessingErr> {
    let port = if implicit_tls {
        config.server_smtp_tls_port.unwrap_or(465)
    } else {
        config.server_smtp_port
    };
    let name = listener_name(implicit_tls);
    let args = listener::ListenerArgs {
        addr: SocketAddr::new(config.server_smtp_address, port),
        path: child_path(path, name),
        sup: myself.clone(),
        implicit_tls,
    };
    let (r, _) = Actor::spawn_linked(
        Some(name.into()),
        listener::Listener,
        args,
        myself.get_cell(),
    )
    .await?;
    Ok(r.get_cell())
}

/// Start every listener the configuration asks for.
async fn spawn_listeners(
    myself: &ActorRef<SmtpdSupMsg>,
    config: &Arc<Config>,
    path: &str,
) -> Result<Vec<(bool, ActorCell)>, ActorProcessingErr> {
    if !config.server_smtp_start {
        warn!(path = %path, "server_smtp_start is false: the SMTP listener is not started");
        return Ok(Vec::new());
    }
    let mut out = vec![(false, spawn_listener(myself, config, path, false).await?)];
    if config.server_smtp_tls_port.is_some() {
        out.push((true, spawn_listener(myself, config, path, true).await?));
    }
    Ok(out)
}

impl Actor for SmtpdSup {
    type Msg = SmtpdSupMsg;
    type State = SmtpdSupState;
    type Arguments = SmtpdSupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SmtpdSupArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        info!(path = %args.path, "started");
        let listeners = spawn_listeners(&myself, &args.config, &args.path).await?;
        Ok(SmtpdSupState {
            listener_addr: listener_addr(&args.config),
            config: args.config,
            path: args.path,
            listeners,
            sessions: HashMap::new(),
            next_session: 0,
            intensity: RestartIntensity::otp_default(),
            draining: None,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children(Some("smtpd_sup stopping".into()));
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
            SmtpdSupMsg::Accepted(stream, peer, implicit_tls) => {
                let host = state.config.server_smtp_name.clone();
                if state.draining.is_some() {
                    refuse(
                        stream,
                        format!("421 4.3.2 {host} Service shutting down\r\n"),
                    );
                } else if state.sessions.len() >= state.config.server_smtp_max_connection {
                    warn!(path = %state.path, client = %peer, limit = state.config.server_smtp_max_connection, "too many connections");
                    refuse(
                        stream,
                        format!("421 4.7.0 {host} Error: too many connections\r\n"),
                    );
                } else {
                    state.next_session += 1;
                    let name = format!("smtpd_fsm#{}", state.next_session);
                    let args = fsm::FsmArgs {
                        stream,
                        peer,
                        config: state.config.clone(),
                        path: child_path(&state.path, &name),
                        implicit_tls,
                    };
                    match Actor::spawn_linked(Some(name.clone()), fsm::Fsm, args, myself.get_cell())
                        .await
                    {
                        Ok((r, _)) => {
                            state.sessions.insert(r.get_id(), (name, r.get_cell()));
                        }
                        Err(e) => {
                            error!(path = %state.path, error = %e, "could not start a session")
                        }
                    }
                }
            }
            SmtpdSupMsg::Reload(config, applied) => {
                let new_addr = listener_addr(&config);
                state.config = config;
                if new_addr != state.listener_addr && state.draining.is_none() {
                    info!(path = %state.path, "listening address changed; restarting the listeners");
                    state.listener_addr = new_addr;
                    for (tls, old) in state.listeners.drain(..) {
                        old.stop_and_wait(Some("rebinding".into()), Some(Duration::from_secs(2)))
                            .await
                            .ok();
                        super::wait_unregistered(listener_name(tls)).await;
                    }
                    state.listeners = spawn_listeners(&myself, &state.config, &state.path).await?;
                }
                if let Some(reply) = applied {
                    let _ = reply.send(());
                }
            }
            SmtpdSupMsg::Shutdown(reply) => {
                for (_, l) in state.listeners.drain(..) {
                    l.stop(Some("shutdown".into()));
                }
                info!(path = %state.path, sessions = state.sessions.len(), "draining sessions");
                for (_, cell) in state.sessions.values() {
                    let _ = cell.send_message(fsm::FsmMsg::Shutdown);
                }
                if state.sessions.is_empty() {
                    let _ = reply.send(());
                } else {
                    state.draining = Some(reply);
                    let me = myself.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        let _ = me.send_message(SmtpdSupMsg::DrainDeadline);
                    });
                }
            }
            SmtpdSupMsg::DrainDeadline => {
                if let Some(reply) = state.draining.take() {
                    for (name, cell) in state.sessions.values() {
                        warn!(path = %child_path(&state.path, name), "did not finish in time; stopping it");
                        cell.kill();
                    }
                    let _ = reply.send(());
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell.clone(), Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell.clone(), None),
            _ => return Ok(()),
        };
        if let Some((name, _)) = state.sessions.remove(&cell.get_id()) {
            // Temporary children: logged, never restarted.
            if let Some(err) = failure {
                error!(path = %child_path(&state.path, &name), error = %err, "session failed");
            }
            if state.sessions.is_empty() {
                if let Some(reply) = state.draining.take() {
                    let _ = reply.send(());
                }
            }
            return Ok(());
        }
        let Some(i) = state
            .listeners
            .iter()
            .position(|(_, l)| l.get_id() == cell.get_id())
        else {
            return Ok(());
        };
        let (tls, _) = state.listeners.remove(i);
        if state.draining.is_some() {
            return Ok(());
        }
        let name = listener_name(tls);
        let path = child_path(&state.path, name);
        error!(path = %path, reason = failure.as_deref().unwrap_or("terminated"), "child failed");
        if !state.intensity.allow(Instant::now()) {
            // Escalate: our own failure lets the root decide.
            return Err(format!("{path}: restart intensity exceeded").into());
        }
        super::wait_unregistered(name).await;
        warn!(path = %path, "restarting");
        metrics::counter!(crate::telemetry::names::RESTARTS, "path" => path.clone()).increment(1);
        let cell = spawn_listener(&myself, &state.config, &state.path, tls).await?;
        state.listeners.push((tls, cell));
        info!(path = %path, "restarted");
        Ok(())
    }
}

/// Answer and close a connection we will not serve, off the actor.
fn refuse(mut stream: TcpStream, reply: String) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}
