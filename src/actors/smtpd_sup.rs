//! `smtpd_sup`: supervises `smtpd_anvil` and the listeners (permanent) and one `smtpd_fsm`
//! per session (temporary: a session that ends or fails is never restarted).
//!
//! Each accepted connection comes here: this supervisor enforces
//! `server_smtp_max_connection`, asks `smtpd_anvil` whether the client is within its own
//! limits, and spawns the session `smtpd_fsm#<n>` linked to itself; a refused connection
//! gets its `421` off this actor. Stress mode (Postfix's) starts at 80% of the limit and
//! ends below 70%; every session is told. On shutdown it stops accepting, tells every
//! session to finish, and answers once all are gone.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::net::TcpStream;
use tracing::{error, info, warn};

use super::anvil::{self, AnvilMsg, ClientKey, Limits};
use super::msg::SmtpdSupMsg;
use super::supervision::{spawn_child, Ended, RestartIntensity};
use super::{child_path, fsm, listener, Handled, Started};
use crate::config::Config;
use crate::net::connection::refuse;
use crate::session::client_is_relay_authorised;
use crate::telemetry::names;

/// The SMTP supervisor.
pub struct SmtpdSup;

/// Start-up arguments.
pub struct SmtpdSupArgs {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Path in the tree, for logs.
    pub path: String,
}

/// The supervisor's state.
pub struct SmtpdSupState {
    config: Arc<Config>,
    path: String,
    /// The live listeners: the plain one and, with `server_smtp_tls_port`, the
    /// implicit-TLS one (the flag).
    listeners: Vec<(bool, ActorCell)>,
    listener_addr: (std::net::IpAddr, u16, Option<u16>),
    /// Live sessions: name, cell, and the client address when anvil counted it.
    sessions: HashMap<ActorId, (String, ActorCell, Option<IpAddr>)>,
    anvil: Option<ActorRef<AnvilMsg>>,
    /// Sessions are above 80% of `server_smtp_max_connection`.
    stress: bool,
    /// When `too many connections` was last logged (once a minute).
    full_logged: Option<Instant>,
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
    myself: &ActorRef<SmtpdSupMsg>, config: &Arc<Config>, path: &str, implicit_tls: bool,
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
    let listener = spawn_child(&myself.get_cell(), name, listener::Listener, args).await?;
    Ok(listener.get_cell())
}

/// Start `smtpd_anvil`.
async fn spawn_anvil(
    myself: &ActorRef<SmtpdSupMsg>, config: &Config, path: &str,
) -> Result<ActorRef<AnvilMsg>, ActorProcessingErr> {
    let args = anvil::AnvilArgs {
        limits: Limits::of(config),
        path: child_path(path, super::ANVIL),
    };
    spawn_child(&myself.get_cell(), super::ANVIL, anvil::Anvil, args).await
}

/// Whether `sessions` open of at most `max` put the server under stress: on at 80%, off
/// below 70% (the gap keeps a load near the line from flapping in and out).
fn stressed(was: bool, sessions: usize, max: usize) -> bool {
    if was {
        sessions * 10 >= max * 7
    } else {
        sessions * 5 >= max * 4
    }
}

/// Start every listener the configuration asks for.
async fn spawn_listeners(
    myself: &ActorRef<SmtpdSupMsg>, config: &Arc<Config>, path: &str,
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
        &self, myself: ActorRef<SmtpdSupMsg>, args: SmtpdSupArgs,
    ) -> Started<SmtpdSupState> {
        info!(path = %args.path, "started");
        let anvil = spawn_anvil(&myself, &args.config, &args.path).await?;
        let listeners = spawn_listeners(&myself, &args.config, &args.path).await?;
        Ok(SmtpdSupState {
            listener_addr: listener_addr(&args.config),
            config: args.config,
            path: args.path,
            listeners,
            sessions: HashMap::new(),
            anvil: Some(anvil),
            stress: false,
            full_logged: None,
            next_session: 0,
            intensity: RestartIntensity::otp_default(),
            draining: None,
        })
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        myself.stop_children(Some("smtpd_sup stopping".into()));
        info!(path = %state.path, "stopped");
        Ok(())
    }

    async fn handle(
        &self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State,
    ) -> Handled {
        match msg {
            SmtpdSupMsg::Accepted(stream, peer, implicit_tls) => {
                accept(&myself, state, stream, peer, implicit_tls).await;
            }
            SmtpdSupMsg::Reload(config, applied) => {
                let new_addr = listener_addr(&config);
                let (old_addr, old_config) = (state.listener_addr, state.config.clone());
                if let Some(anvil) = &state.anvil {
                    let _ = anvil.send_message(AnvilMsg::Reload(Limits::of(&config)));
                }
                state.config = config;
                update_stress(state);
                if new_addr != state.listener_addr && state.draining.is_none() {
                    info!(path = %state.path, "listening address changed; restarting the listeners");
                    state.listener_addr = new_addr;
                    // Stopped means unregistered too: the successors can take the names.
                    for (_, old) in state.listeners.drain(..) {
                        old.stop_and_wait(Some("rebinding".into()), Some(Duration::from_secs(2)))
                            .await
                            .ok();
                    }
                    state.listeners = match spawn_listeners(&myself, &state.config, &state.path)
                        .await
                    {
                        Ok(l) => l,
                        Err(e) => {
                            // Taken since it was checked: keep serving where we were.
                            error!(path = %state.path, error = %e, "new listening address unusable; listening where before");
                            state.listener_addr = old_addr;
                            spawn_listeners(&myself, &old_config, &state.path).await?
                        }
                    };
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
                for (_, cell, _) in state.sessions.values() {
                    let _ = cell.send_message(fsm::FsmMsg::Shutdown);
                }
                if state.sessions.is_empty() {
                    let _ = reply.send(());
                } else {
                    state.draining = Some(reply);
                    myself.send_after(Duration::from_secs(3), || SmtpdSupMsg::DrainDeadline);
                }
            }
            SmtpdSupMsg::DrainDeadline => {
                if let Some(reply) = state.draining.take() {
                    for (name, cell, _) in state.sessions.values() {
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
        &self, myself: ActorRef<Self::Msg>, event: SupervisionEvent, state: &mut Self::State,
    ) -> Handled {
        let Some(Ended { cell, failure, .. }) = Ended::of(&event) else {
            return Ok(());
        };
        if let Some((name, _, counted)) = state.sessions.remove(&cell.get_id()) {
            // Temporary children: logged, never restarted.
            if let Some(err) = failure {
                error!(path = %child_path(&state.path, &name), error = %err, "session failed");
            }
            if let (Some(ip), Some(anvil)) = (counted, &state.anvil) {
                let _ = anvil.send_message(AnvilMsg::Disconnect(ip));
            }
            update_stress(state);
            if state.sessions.is_empty() {
                if let Some(reply) = state.draining.take() {
                    let _ = reply.send(());
                }
            }
            return Ok(());
        }
        if state
            .anvil
            .as_ref()
            .is_some_and(|a| a.get_id() == cell.get_id())
        {
            state.anvil = None;
            if state.draining.is_some() {
                return Ok(());
            }
            let path = before_restart(state, super::ANVIL, failure.as_deref()).await?;
            let anvil = spawn_anvil(&myself, &state.config, &state.path).await?;
            // The counts were only memory: tell the new anvil which sessions are open.
            let open: Vec<IpAddr> = state.sessions.values().filter_map(|s| s.2).collect();
            let _ = anvil.send_message(AnvilMsg::Opened(open));
            state.anvil = Some(anvil);
            info!(path = %path, "restarted");
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
        let path = before_restart(state, listener_name(tls), failure.as_deref()).await?;
        let cell = spawn_listener(&myself, &state.config, &state.path, tls).await?;
        state.listeners.push((tls, cell));
        info!(path = %path, "restarted");
        Ok(())
    }
}

/// A permanent child `name` ended: log it, and either escalate (restart intensity spent:
/// our own failure lets the root decide) or log and count the restart. Returns the
/// child's path.
async fn before_restart(
    state: &mut SmtpdSupState, name: &str, failure: Option<&str>,
) -> Result<String, ActorProcessingErr> {
    let path = child_path(&state.path, name);
    error!(path = %path, reason = failure.unwrap_or("terminated"), "child failed");
    if !state.intensity.restart(&path) {
        return Err(format!("{path}: restart intensity exceeded").into());
    }
    Ok(path)
}

/// How long `smtpd_sup` waits for anvil's verdict before admitting the client anyway
/// (the global limit still holds).
const ANVIL_TIMEOUT: Duration = Duration::from_secs(1);

/// One accepted connection: refused (shutting down, server full, client over its limits)
/// or served by a new session.
async fn accept(
    myself: &ActorRef<SmtpdSupMsg>, state: &mut SmtpdSupState, stream: TcpStream, peer: SocketAddr,
    implicit_tls: bool,
) {
    let host = state.config.server_smtp_name.clone();
    if state.draining.is_some() {
        metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => "shutdown").increment(1);
        return refuse(
            stream,
            format!("421 4.3.2 {host} Service shutting down\r\n"),
        );
    }
    let max = state.config.server_smtp_max_connection;
    if state.sessions.len() >= max {
        metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => "max_connection").increment(1);
        let now = Instant::now();
        if state
            .full_logged
            .is_none_or(|at| now.duration_since(at) >= anvil::RATE_WINDOW)
        {
            state.full_logged = Some(now);
            warn!(path = %state.path, client = %peer, limit = max,
                "too many connections: server_smtp_max_connection reached (logged once a minute)");
        }
        return refuse(
            stream,
            format!("421 4.7.0 {host} Error: too many connections\r\n"),
        );
    }
    let ip = peer.ip();
    let exempt = client_is_relay_authorised(
        fsm::canonical_ip(ip),
        &state.config.server_smtp_relay_clients,
    );
    let mut counted = None;
    if let (false, Some(anvil)) = (exempt, &state.anvil) {
        match anvil
            .call(|reply| AnvilMsg::Connect { ip, reply }, Some(ANVIL_TIMEOUT))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(Ok(()))) => counted = Some(ip),
            Ok(ractor::rpc::CallResult::Success(Err(refusal))) => {
                return refuse(stream, refusal.reply(&host, ClientKey::of(ip)));
            }
            // Anvil is restarting: admit; the global limit still holds.
            _ => {}
        }
    }
    state.next_session += 1;
    let name = format!("smtpd_fsm#{}", state.next_session);
    let args = fsm::FsmArgs {
        stream,
        peer,
        config: state.config.clone(),
        path: child_path(&state.path, &name),
        implicit_tls,
        stress: state.stress,
    };
    match Actor::spawn_linked(Some(name.clone()), fsm::Fsm, args, myself.get_cell()).await {
        Ok((r, _)) => {
            state
                .sessions
                .insert(r.get_id(), (name, r.get_cell(), counted));
            update_stress(state);
        }
        Err(e) => {
            if let (Some(ip), Some(anvil)) = (counted, &state.anvil) {
                let _ = anvil.send_message(AnvilMsg::Disconnect(ip));
            }
            error!(path = %state.path, error = %e, "could not start a session")
        }
    }
}

/// Enters or leaves stress mode as the session count crosses its lines; logs the change
/// and tells every session.
fn update_stress(state: &mut SmtpdSupState) {
    let max = state.config.server_smtp_max_connection;
    let now = stressed(state.stress, state.sessions.len(), max);
    if now == state.stress {
        return;
    }
    state.stress = now;
    metrics::gauge!(names::STRESS).set(if now { 1.0 } else { 0.0 });
    if now {
        warn!(path = %state.path, sessions = state.sessions.len(), limit = max,
            "entering stress mode: {} sessions of server_smtp_max_connection {max}; timeouts {}s, error limit 1",
            state.sessions.len(), fsm::STRESS_TIMEOUT.as_secs());
    } else {
        info!(path = %state.path, sessions = state.sessions.len(), limit = max,
            "leaving stress mode: {} sessions of server_smtp_max_connection {max}",
            state.sessions.len());
    }
    for (_, cell, _) in state.sessions.values() {
        let _ = cell.send_message(fsm::FsmMsg::Stress(now));
    }
}

#[cfg(test)]
mod tests {
    use super::stressed;

    #[test]
    fn stress_starts_at_80_percent_and_ends_below_70() {
        assert!(!stressed(false, 799, 1000));
        assert!(stressed(false, 800, 1000));
        assert!(stressed(true, 700, 1000));
        assert!(!stressed(true, 699, 1000));
        // Small limits: 4 of 5 is 80%.
        assert!(!stressed(false, 3, 5));
        assert!(stressed(false, 4, 5));
    }
}
