//! `smtpd_fsm#<n>`: one SMTP session, driving the pure session machine with real I/O.
//!
//! A reader task owns the read half of the socket and forwards bytes as messages; it
//! reads the next chunk only when this actor says so, so a client that floods us while a
//! commit is in flight cannot grow our memory. The actor owns the write half, answers the
//! machine's look-up and store requests by asking `erlmail_store`, and writes replies in
//! order. The idle timeout (`server_smtp_timeout`) is enforced by the reader. A session is
//! a temporary child: when it ends or fails it is gone, and the client may reconnect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::store::{RecipientFacts, StoreMsg};
use crate::config::Config;
use crate::telemetry::{self, names};
use crate::session::{
    client_is_relay_authorised, Action, PeerInfo, RecipientInfo, Session, SessionPolicy,
    StoreOutcome, Transaction,
};
use crate::store::{IncomingMessage, OutgoingRcpt, StoreError};

/// How long a session waits for the store before answering 451.
const STORE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one reply may take to write before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The session actor.
pub struct Fsm;

/// Start-up arguments.
pub struct FsmArgs {
    /// The accepted connection.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The configuration in force when the session began.
    pub config: Arc<Config>,
    /// Path in the tree, for logs.
    pub path: String,
}

/// What the session actor hears.
pub enum FsmMsg {
    /// Bytes from the client.
    Bytes(Vec<u8>),
    /// The client closed its side, or reading failed.
    Eof,
    /// No input for `server_smtp_timeout`.
    IdleTimeout,
    /// The daemon is stopping.
    Shutdown,
}

/// The session actor's state.
pub struct FsmState {
    session: Session,
    writer: Option<OwnedWriteHalf>,
    more: mpsc::Sender<()>,
    reader: tokio::task::JoinHandle<()>,
    path: String,
    /// Set once the daemon asked us to stop: no new transaction may start.
    stopping: bool,
}

impl Actor for Fsm {
    type Msg = FsmMsg;
    type State = FsmState;
    type Arguments = FsmArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FsmArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let config = args.config;
        let ip = canonical_ip(args.peer.ip());
        let authorised = client_is_relay_authorised(ip, &config.server_smtp_relay_clients);
        info!(
            path = %args.path,
            client = %args.peer,
            relay = if authorised { "authorised" } else { "local only" },
            "session started; relay {}",
            if authorised { "authorised by server_smtp_relay_clients" } else { "not authorised: local recipients only" }
        );
        let policy = SessionPolicy {
            hostname: config.server_smtp_name.clone(),
            greeting: config.server_smtp_greeting.clone(),
            max_message_size: config.server_smtp_max_message_size,
            max_recipients: config.server_smtp_max_recipients,
            hard_error_limit: config.server_smtp_hard_error_limit,
            max_hops: config.server_smtp_max_hops,
            relay_authorised: authorised,
            max_line_length: 2048,
        };
        let session = Session::new(
            policy,
            PeerInfo {
                ip,
                port: args.peer.port(),
            },
        );
        metrics::gauge!(names::SESSIONS_OPEN).increment(1.0);
        metrics::counter!(names::SESSIONS_TOTAL).increment(1);
        let (read_half, writer) = args.stream.into_split();
        let (more_tx, more_rx) = mpsc::channel(1);
        let reader = tokio::spawn(read_loop(
            read_half,
            myself.clone(),
            more_rx,
            config.server_smtp_timeout,
        ));
        Ok(FsmState {
            session,
            writer: Some(writer),
            more: more_tx,
            reader,
            path: args.path,
            stopping: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let actions = state.session.greeting();
        run(&myself, state, actions).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.reader.abort();
        metrics::gauge!(names::SESSIONS_OPEN).decrement(1.0);
        if let Some(mut w) = state.writer.take() {
            let _ = w.shutdown().await;
        }
        debug!(path = %state.path, "session ended");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FsmMsg::Bytes(bytes) => {
                let actions = state.session.receive(&bytes, Utc::now());
                run(&myself, state, actions).await;
            }
            FsmMsg::Eof => {
                debug!(path = %state.path, "client closed the connection");
                myself.stop(None);
                return Ok(());
            }
            FsmMsg::IdleTimeout => {
                info!(path = %state.path, "idle timeout");
                let actions = state.session.timeout();
                run(&myself, state, actions).await;
            }
            FsmMsg::Shutdown => {
                state.stopping = true;
                let actions = state.session.shutdown();
                run(&myself, state, actions).await;
            }
        }
        if state.session.is_closed() || state.writer.is_none() {
            myself.stop(None);
        } else {
            // Ready for the next chunk of input.
            let _ = state.more.try_send(());
        }
        Ok(())
    }
}

/// Carry out the machine's actions in order; look-ups and commits feed their answers back
/// into the machine, whose further actions join the work list.
async fn run(myself: &ActorRef<FsmMsg>, state: &mut FsmState, actions: Vec<Action>) {
    let mut work: std::collections::VecDeque<Action> = actions.into();
    while let Some(action) = work.pop_front() {
        match action {
            Action::Send(bytes) => {
                count_rejections(&bytes);
                let Some(w) = state.writer.as_mut() else {
                    return;
                };
                let ok = matches!(
                    tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&bytes)).await,
                    Ok(Ok(()))
                );
                if !ok {
                    debug!(path = %state.path, "client gone while writing");
                    state.writer = None;
                    return;
                }
            }
            Action::LookupRecipient(path) => {
                let address = path.to_string();
                let info = lookup(&address).await;
                let info = match info {
                    Ok(f) => RecipientInfo {
                        local_domain: f.local_domain,
                        user_exists: f.user_exists,
                        temporary_failure: false,
                    },
                    Err(e) => {
                        warn!(path = %state.path, error = %e, "recipient look-up failed");
                        RecipientInfo {
                            local_domain: false,
                            user_exists: false,
                            temporary_failure: true,
                        }
                    }
                };
                work.extend(state.session.recipient_info(info, Utc::now()));
            }
            Action::Store(tx) => {
                let outcome = store(&state.path, tx).await;
                work.extend(state.session.stored(outcome, Utc::now()));
            }
            Action::Close => {
                if let Some(mut w) = state.writer.take() {
                    let _ = w.shutdown().await;
                }
                let _ = myself;
                return;
            }
        }
    }
}

async fn lookup(address: &str) -> Result<RecipientFacts, String> {
    let store: ActorRef<StoreMsg> = ractor::registry::where_is(super::STORE)
        .ok_or("store not running")?
        .into();
    let address = address.to_string();
    match store
        .call(
            |reply: RpcReplyPort<_>| StoreMsg::LookupRecipient { address, reply },
            Some(STORE_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(Ok(f))) => Ok(f),
        Ok(ractor::rpc::CallResult::Success(Err(e))) => Err(e.to_string()),
        Ok(_) => Err("store did not answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Hand the transaction to the store actor and wait for its group commit.
async fn store(path: &str, tx: Transaction) -> StoreOutcome {
    let message = to_incoming(tx);
    let destination = match (message.local_rcpts.is_empty(), message.remote_rcpts.is_empty()) {
        (false, true) => "local",
        (true, false) => "relay",
        _ => "both",
    };
    let Some(cell) = ractor::registry::where_is(super::STORE) else {
        warn!(path = %path, "store not running");
        return StoreOutcome::Failed;
    };
    let store: ActorRef<StoreMsg> = cell.into();
    match store
        .call(
            |reply| StoreMsg::Accept(message, reply),
            Some(STORE_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(Ok(accepted))) => {
            metrics::counter!(names::ACCEPTED, "destination" => destination).increment(1);
            StoreOutcome::Stored {
            queue_id: accepted
                .queue_id
                .or_else(|| accepted.message_ids.first().map(|id| format!("L{id}"))),
            }
        }
        Ok(ractor::rpc::CallResult::Success(Err(StoreError::Full(e)))) => {
            warn!(path = %path, error = %e, "store full");
            StoreOutcome::DiskFull
        }
        Ok(ractor::rpc::CallResult::Success(Err(e))) => {
            warn!(path = %path, error = %e, "store failed");
            StoreOutcome::Failed
        }
        _ => {
            warn!(path = %path, "store did not answer");
            StoreOutcome::Failed
        }
    }
}

/// Count each refusing reply among the (possibly pipelined) replies in `bytes`.
fn count_rejections(bytes: &[u8]) {
    for line in bytes.split(|b| *b == b'\n') {
        // Only the last line of a multi-line reply (`250 ` not `250-`) counts.
        if line.get(3) != Some(&b' ') {
            continue;
        }
        if let Some(reason) = telemetry::rejection_reason(line) {
            metrics::counter!(names::REJECTED, "reason" => reason).increment(1);
            if reason == "relay_denied" {
                metrics::counter!(names::RELAY_DENIED).increment(1);
            }
        }
    }
}

fn to_incoming(tx: Transaction) -> IncomingMessage {
    let mut local_rcpts = Vec::new();
    let mut remote_rcpts = Vec::new();
    for r in tx.recipients {
        if r.local {
            local_rcpts.push(r.path.to_string());
        } else {
            remote_rcpts.push(OutgoingRcpt {
                address: r.path.to_string(),
                orcpt: r.orcpt,
                notify: r.notify,
            });
        }
    }
    IncomingMessage {
        sender: tx.reverse_path.to_string(),
        local_rcpts,
        remote_rcpts,
        ret: tx.ret,
        envid: tx.envid,
        client_ip: tx.client_ip.to_string(),
        helo: tx.helo,
        received_at: Utc::now(),
        subject: tx.subject,
        body: tx.data,
    }
}

/// IPv4-mapped IPv6 clients (`::ffff:a.b.c.d`) are IPv4 clients.
fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn read_loop(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    fsm: ActorRef<FsmMsg>,
    mut more: mpsc::Receiver<()>,
    idle: Duration,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(idle, reader.read(&mut buf)).await {
            Err(_) => {
                let _ = fsm.send_message(FsmMsg::IdleTimeout);
                return;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                let _ = fsm.send_message(FsmMsg::Eof);
                return;
            }
            Ok(Ok(n)) => {
                if fsm.send_message(FsmMsg::Bytes(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
        // Wait until the session has dealt with what we sent.
        if more.recv().await.is_none() {
            return;
        }
    }
}
