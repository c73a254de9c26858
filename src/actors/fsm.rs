//! `smtpd_fsm#<n>`: one SMTP session, driving the pure session machine with real I/O.
//!
//! A reader task owns the read half of the socket and forwards bytes as messages; it
//! reads the next chunk only when this actor says so, so a client that floods us while a
//! commit is in flight cannot grow our memory. The actor owns the write half, answers the
//! machine's look-up and store requests by asking `erlmail_store`, and writes replies in
//! order. The idle timeout (`server_smtp_timeout`) is enforced by the reader. A session is
//! a temporary child: when it ends or fails it is gone, and the client may reconnect.
//!
//! TLS: on the machine's `StartTls` the actor stops the reader (which is idle, waiting for
//! permission to read), takes the read half back, joins it with the write half and runs
//! the handshake on the plain socket; whatever the client pipelined after STARTTLS is
//! either already discarded by the machine or still unread in the socket, where it breaks
//! the handshake rather than run as a command. A connection to
//! `server_smtp_tls_port` (implicit TLS, told by the listener that accepted it) does the handshake
//! before the greeting. AUTH passwords are checked against the store's argon2 hashes on
//! the blocking pool; a failure is answered only after [`AUTH_FAILURE_DELAY`]. Nothing
//! here logs a command line, so credentials never reach a log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::store::{RecipientFacts, StoreMsg};
use crate::config::Config;
use crate::session::{
    client_is_relay_authorised, Action, PeerInfo, RecipientInfo, Secret, Session, SessionPolicy,
    StoreOutcome, Transaction,
};
use crate::store::{IncomingMessage, OutgoingRcpt, StoreError};
use crate::telemetry::{self, names};

/// How long a session waits for the store before answering 451.
const STORE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one reply may take to write before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest TLS handshake (further capped by `server_smtp_timeout`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failed AUTH waits before its 535, to slow password guessing.
pub const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);

/// The server side of a TLS connection.
type TlsIo = tokio_rustls::server::TlsStream<TcpStream>;

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
    /// The connection came in on the implicit-TLS listener (`server_smtp_tls_port`).
    pub implicit_tls: bool,
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

/// What the actor tells its reader after each chunk.
enum Next {
    /// Read the next chunk.
    More,
    /// Stop reading and hand the read half back (STARTTLS).
    Stop,
}

/// The write half of the connection, plain or encrypted.
enum Writer {
    Plain(WriteHalf<TcpStream>),
    Tls(WriteHalf<TlsIo>),
}

impl Writer {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Plain(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
            Writer::Tls(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Writer::Plain(w) => w.shutdown().await,
            Writer::Tls(w) => w.shutdown().await,
        };
    }
}

/// The reader task; a plain one can give its half back for the TLS upgrade.
enum Reader {
    /// Not started yet (before the greeting) or stopped.
    None,
    Plain(JoinHandle<Option<ReadHalf<TcpStream>>>),
    Tls(JoinHandle<Option<ReadHalf<TlsIo>>>),
}

impl Reader {
    fn abort(&self) {
        match self {
            Reader::None => {}
            Reader::Plain(h) => h.abort(),
            Reader::Tls(h) => h.abort(),
        }
    }
}

/// The session actor's state.
pub struct FsmState {
    session: Session,
    writer: Option<Writer>,
    more: mpsc::Sender<Next>,
    reader: Reader,
    path: String,
    /// Set once the daemon asked us to stop: no new transaction may start.
    stopping: bool,
    /// The accepted socket, until `post_start` splits it (after the TLS handshake when
    /// `implicit_tls`).
    stream: Option<TcpStream>,
    /// The certificate in force when the session began; `None`: no TLS.
    acceptor: Option<TlsAcceptor>,
    /// The connection came in on `server_smtp_tls_port`: TLS from the first byte.
    implicit_tls: bool,
    /// `server_smtp_timeout`.
    idle: Duration,
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
        let acceptor = match crate::net::tls::acceptor_for(&config) {
            Ok(a) => a,
            Err(e) => {
                warn!(path = %args.path, error = %e, "TLS certificate unusable; STARTTLS not offered");
                None
            }
        };
        let implicit_tls = args.implicit_tls;
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
            tls_available: acceptor.is_some() && !implicit_tls,
            auth_relay: config.server_smtp_relay_auth,
        };
        let peer = PeerInfo {
            ip,
            port: args.peer.port(),
        };
        let session = if implicit_tls {
            Session::new_tls(policy, peer)
        } else {
            Session::new(policy, peer)
        };
        metrics::gauge!(names::SESSIONS_OPEN).increment(1.0);
        metrics::counter!(names::SESSIONS_TOTAL).increment(1);
        // The real channel is made when the reader starts, in `post_start`.
        let (more_tx, _) = mpsc::channel(1);
        let _ = myself;
        Ok(FsmState {
            session,
            writer: None,
            more: more_tx,
            reader: Reader::None,
            path: args.path,
            stopping: false,
            stream: Some(args.stream),
            acceptor,
            implicit_tls,
            idle: config.server_smtp_timeout,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The handshake happens here rather than in `pre_start` so that a slow client
        // never holds up `smtpd_sup`, which waits for `pre_start` of each session.
        let Some(stream) = state.stream.take() else {
            myself.stop(None);
            return Ok(());
        };
        if state.implicit_tls {
            match handshake(state, stream).await {
                Ok(tls) => start_tls_io(&myself, state, tls),
                Err(e) => {
                    info!(path = %state.path, error = %e, "implicit TLS handshake failed");
                    myself.stop(None);
                    return Ok(());
                }
            }
        } else {
            start_plain_io(&myself, state, stream);
        }
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
            w.shutdown().await;
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
            let _ = state.more.try_send(Next::More);
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
                    w.shutdown().await;
                }
                return;
            }
            Action::StartTls => match upgrade(myself, state).await {
                Ok(()) => {
                    debug!(path = %state.path, "STARTTLS: TLS established");
                    work.extend(state.session.tls_started());
                }
                Err(e) => {
                    info!(path = %state.path, error = %e, "STARTTLS handshake failed");
                    state.writer = None;
                    return;
                }
            },
            Action::Authenticate { user, password } => {
                let ok = check_password(&user, password).await;
                if ok {
                    // The user name is logged on success only (as Postfix's
                    // sasl_username): a failed name may be a mistyped password.
                    info!(path = %state.path, user = %user, "AUTH succeeded");
                } else {
                    info!(path = %state.path, "AUTH failed");
                    tokio::time::sleep(AUTH_FAILURE_DELAY).await;
                }
                work.extend(state.session.authenticated(ok, Utc::now()));
            }
        }
    }
}

/// Splits a plain connection and starts its reader.
fn start_plain_io(myself: &ActorRef<FsmMsg>, state: &mut FsmState, stream: TcpStream) {
    let (read_half, write_half) = tokio::io::split(stream);
    let (more_tx, more_rx) = mpsc::channel(1);
    state.more = more_tx;
    state.writer = Some(Writer::Plain(write_half));
    state.reader = Reader::Plain(tokio::spawn(read_loop(
        read_half,
        myself.clone(),
        more_rx,
        state.idle,
    )));
}

/// Splits an encrypted connection and starts its reader.
fn start_tls_io(myself: &ActorRef<FsmMsg>, state: &mut FsmState, stream: TlsIo) {
    let (read_half, write_half) = tokio::io::split(stream);
    let (more_tx, more_rx) = mpsc::channel(1);
    state.more = more_tx;
    state.writer = Some(Writer::Tls(write_half));
    state.reader = Reader::Tls(tokio::spawn(read_loop(
        read_half,
        myself.clone(),
        more_rx,
        state.idle,
    )));
}

/// Runs the server side of the TLS handshake on `stream`.
async fn handshake(state: &FsmState, stream: TcpStream) -> Result<TlsIo, String> {
    let acceptor = state
        .acceptor
        .clone()
        .ok_or("no TLS certificate configured")?;
    let limit = HANDSHAKE_TIMEOUT.min(state.idle);
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// STARTTLS: take the plain socket back from the reader and the writer, and run the
/// handshake on it. The reader is idle (it sent the chunk holding STARTTLS and waits for
/// [`Next`]), so stopping it reads nothing more in plain text.
async fn upgrade(myself: &ActorRef<FsmMsg>, state: &mut FsmState) -> Result<(), String> {
    let reader = std::mem::replace(&mut state.reader, Reader::None);
    let Reader::Plain(handle) = reader else {
        state.reader = reader;
        return Err("not a plain connection".into());
    };
    let _ = state.more.send(Next::Stop).await;
    let read_half = match handle.await {
        Ok(Some(r)) => r,
        _ => return Err("the reader had already stopped".into()),
    };
    let Some(Writer::Plain(write_half)) = state.writer.take() else {
        return Err("no plain writer".into());
    };
    let stream = read_half.unsplit(write_half);
    let tls = handshake(state, stream).await?;
    start_tls_io(myself, state, tls);
    Ok(())
}

/// Whether `password` is `user`'s: the store's argon2 hash, verified on the blocking
/// pool (argon2 is slow on purpose). Unknown users and store failures are `false`.
async fn check_password(user: &str, password: Secret) -> bool {
    let Some(cell) = ractor::registry::where_is(super::STORE) else {
        return false;
    };
    let store: ActorRef<StoreMsg> = cell.into();
    let address = user.to_string();
    let hash = match store
        .call(
            |reply| StoreMsg::PasswordHash { address, reply },
            Some(STORE_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(Ok(Some(hash)))) => hash,
        Ok(ractor::rpc::CallResult::Success(Ok(None))) => return false,
        _ => {
            warn!("password look-up failed");
            return false;
        }
    };
    tokio::task::spawn_blocking(move || {
        crate::store::password::verify_password(password.expose(), &hash)
    })
    .await
    .unwrap_or(false)
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
    let destination = match (
        message.local_rcpts.is_empty(),
        message.remote_rcpts.is_empty(),
    ) {
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

/// Reads chunks and sends them to the actor, one at a time. Returns the read half when
/// the actor says [`Next::Stop`], `None` when the connection ended.
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    fsm: ActorRef<FsmMsg>,
    mut more: mpsc::Receiver<Next>,
    idle: Duration,
) -> Option<R> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(idle, reader.read(&mut buf)).await {
            Err(_) => {
                let _ = fsm.send_message(FsmMsg::IdleTimeout);
                return None;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                let _ = fsm.send_message(FsmMsg::Eof);
                return None;
            }
            Ok(Ok(n)) => {
                if fsm.send_message(FsmMsg::Bytes(buf[..n].to_vec())).is_err() {
                    return None;
                }
            }
        }
        // Wait until the session has dealt with what we sent.
        match more.recv().await {
            Some(Next::More) => {}
            Some(Next::Stop) => return Some(reader),
            None => return None,
        }
    }
}
