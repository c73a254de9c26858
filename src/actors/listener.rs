//! `smtpd_listener`: owns the listening socket and hands each connection to `smtpd_sup`.
//!
//! The accept loop runs in a task owned by this actor and ends with it, so a restarted
//! listener rebinds cleanly. It does no SMTP: the session actor does. The bound address is
//! logged (`listening on ...`), which is how tests find an ephemeral port.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Handled, Started};
use ractor::{Actor, ActorRef};
use tracing::{info, warn};

use super::msg::SmtpdSupMsg;

/// The listener actor.
pub struct Listener;

/// Start-up arguments.
pub struct ListenerArgs {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Path in the tree, for logs.
    pub path: String,
    /// Where accepted connections go.
    pub sup: ActorRef<SmtpdSupMsg>,
    /// Connections here speak TLS from the first byte (`server_smtp_tls_port`).
    pub implicit_tls: bool,
}

/// The listener takes no requests; it only lives and dies.
pub enum ListenerMsg {}

/// The listener's state.
pub struct ListenerState {
    path: String,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Actor for Listener {
    type Msg = ListenerMsg;
    type State = ListenerState;
    type Arguments = ListenerArgs;

    async fn pre_start(
        &self, myself: ActorRef<ListenerMsg>, args: ListenerArgs,
    ) -> Started<ListenerState> {
        let listener = crate::net::bind(args.addr)
            .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
        let local = listener.local_addr()?;
        info!(path = %args.path, addr = %local, "started; listening on {local}");
        let sup = args.sup;
        let implicit_tls = args.implicit_tls;
        let path = args.path.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        if sup
                            .send_message(SmtpdSupMsg::Accepted(stream, peer, implicit_tls))
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(path = %path, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            myself.stop(Some("supervisor gone".into()));
        });
        Ok(ListenerState {
            path: args.path,
            accept_task,
        })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        // Wait until the task (and the socket it owns) is gone: a successor binding the
        // same address right after must find it free.
        state.accept_task.abort();
        let _ = (&mut state.accept_task).await;
        info!(path = %state.path, "stopped");
        Ok(())
    }
}
