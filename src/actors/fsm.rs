//! `smtpd_fsm#<n>`: one SMTP session, driving the pure session machine with real I/O.
//!
//! The socket belongs to a [`Connection`] (`net::connection`), which reads the next chunk
//! only when this actor says so, so a client that floods us cannot grow our memory. This
//! actor feeds the machine, answers its look-up, store and AUTH requests by asking
//! `erlmail_store` (and `smtpd_anvil` for AUTH), writes replies in order, and sets each
//! read's deadline from where the machine stands ([`Deadlines`]); under stress the
//! timeout drops to [`STRESS_TIMEOUT`]. A session is a temporary child: never restarted.
//!
//! A failed AUTH is answered only after [`AUTH_FAILURE_DELAY`] (an unknown user costs the
//! same as a known one). Nothing here logs a command line, so credentials never reach a
//! log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::{Handled, Started};
use chrono::Utc;
use ractor::{Actor, ActorRef};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::anvil::AnvilMsg;
use super::msg::{RecipientFacts, StoreMsg};
use super::store_client::{StoreClient, Unanswered};
use crate::auth::check::{Checker, Disposition};
use crate::config::Config;
use crate::net::connection::{Connection, Deadlines, Input, InputSink, Phase};
use crate::session::{
    client_is_relay_authorised, Action, PeerInfo, RecipientInfo, Secret, Session, SessionPolicy,
    StoreOutcome, Transaction,
};
use crate::store::{IncomingMessage, OutgoingRcpt, StoreError};
use crate::telemetry::{self, names};

/// The store, asked with a session's patience (then 451).
const STORE: StoreClient = StoreClient::new(Duration::from_secs(60));
/// Longest TLS handshake (further capped by `server_smtp_timeout`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failed AUTH waits before its 535, to slow password guessing.
pub const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);
/// `server_smtp_timeout` under stress (Postfix's stress-mode `smtpd_timeout`).
pub const STRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session waits for `smtpd_anvil` before going ahead without it.
const ANVIL_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The server is under stress now.
    pub stress: bool,
}

/// What the session actor hears.
pub enum FsmMsg {
    /// From the connection's reader: bytes, end of input, or a missed deadline.
    Input(Input),
    /// The server entered (`true`) or left stress mode.
    Stress(bool),
    /// The daemon is stopping.
    Shutdown,
}

/// The session actor's state.
pub struct FsmState {
    session: Session,
    /// The connection, once `post_start` has set it up.
    conn: Option<Connection>,
    path: String,
    /// Set once the daemon asked us to stop: no new transaction may start.
    stopping: bool,
    /// The accepted socket, until `post_start` hands it to the [`Connection`] (after the
    /// TLS handshake when `implicit_tls`).
    stream: Option<TcpStream>,
    /// The certificate in force when the session began; `None`: no TLS.
    acceptor: Option<TlsAcceptor>,
    /// The connection came in on `server_smtp_tls_port`: TLS from the first byte.
    implicit_tls: bool,
    /// `server_smtp_timeout` as configured.
    timeout: Duration,
    /// `server_smtp_min_data_rate`.
    min_data_rate: u64,
    /// Under stress: shorter timeouts, error limit 1.
    stress: bool,
    /// The client, as anvil counts it.
    ip: IpAddr,
    /// The last batch of actions waited for the store, a password check or TLS, so the
    /// deadline of a partial line read before that wait starts afresh.
    waited: bool,
    /// SPF, DKIM and DMARC for mail to local users from untrusted clients; `None`: the
    /// resolver could not be set up (the mail is then stored unchecked).
    checker: Option<Arc<Checker>>,
    /// The DKIM keys of the configuration the session began with (built once per
    /// configuration, never per message).
    signers: Arc<crate::auth::sign::Signers>,
}

impl FsmState {
    /// The deadline rules in force now.
    fn rules(&self) -> Deadlines {
        Deadlines {
            timeout: if self.stress {
                self.timeout.min(STRESS_TIMEOUT)
            } else {
                self.timeout
            },
            min_data_rate: self.min_data_rate,
        }
    }
}

impl Actor for Fsm {
    type Msg = FsmMsg;
    type State = FsmState;
    type Arguments = FsmArgs;

    async fn pre_start(&self, _myself: ActorRef<FsmMsg>, args: FsmArgs) -> Started<FsmState> {
        let config = args.config;
        let acceptor = match crate::net::tls::acceptor_for(&config) {
            Ok(a) => a,
            Err(e) => {
                warn!(path = %args.path, error = %e, "TLS certificate unusable; STARTTLS not offered");
                None
            }
        };
        let signers = crate::auth::sign::signers_for(&config).unwrap_or_else(|e| {
            warn!(path = %args.path, error = %e, "DKIM keys unusable; relayed mail not signed");
            Arc::default()
        });
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
        let mut session = if implicit_tls {
            Session::new_tls(policy, peer)
        } else {
            Session::new(policy, peer)
        };
        session.set_stress(args.stress);
        let checker = match Checker::for_config(&config) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(path = %args.path, error = %e, "SPF/DKIM/DMARC checks unavailable");
                None
            }
        };
        metrics::gauge!(names::SESSIONS_OPEN).increment(1.0);
        metrics::counter!(names::SESSIONS_TOTAL).increment(1);
        Ok(FsmState {
            session,
            conn: None,
            path: args.path,
            stopping: false,
            stream: Some(args.stream),
            acceptor,
            implicit_tls,
            timeout: config.server_smtp_timeout,
            min_data_rate: config.server_smtp_min_data_rate,
            stress: args.stress,
            ip,
            waited: false,
            checker,
            signers,
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        // The handshake happens here rather than in `pre_start` so that a slow client
        // never holds up `smtpd_sup`, which waits for `pre_start` of each session.
        let Some(stream) = state.stream.take() else {
            myself.stop(None);
            return Ok(());
        };
        let me = myself.clone();
        let sink: InputSink = Arc::new(move |input| me.send_message(FsmMsg::Input(input)).is_ok());
        let rules = state.rules();
        let now = Instant::now();
        let deadline = rules.next(now, now, Phase::NewCommand);
        let conn = if state.implicit_tls {
            let Some(acceptor) = state.acceptor.clone() else {
                myself.stop(None);
                return Ok(());
            };
            let limit = HANDSHAKE_TIMEOUT.min(rules.timeout);
            match Connection::implicit_tls(stream, &acceptor, limit, sink, deadline, rules.timeout)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    info!(path = %state.path, error = %e, "implicit TLS handshake failed");
                    myself.stop(None);
                    return Ok(());
                }
            }
        } else {
            Connection::plain(stream, sink, deadline, rules.timeout)
        };
        state.session.set_tls_summary(conn.tls_summary());
        state.conn = Some(conn);
        let actions = state.session.greeting();
        run(state, actions).await;
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Handled {
        metrics::gauge!(names::SESSIONS_OPEN).decrement(1.0);
        if let Some(mut c) = state.conn.take() {
            c.close().await;
        }
        debug!(path = %state.path, "session ended");
        Ok(())
    }

    async fn handle(
        &self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State,
    ) -> Handled {
        match msg {
            FsmMsg::Input(Input::Bytes(bytes)) => {
                let was_in_data = state.session.in_data();
                let actions = state.session.receive(&bytes, Utc::now());
                state.waited = false;
                run(state, actions).await;
                let phase = if state.session.in_data() {
                    if was_in_data && !state.waited {
                        Phase::Data { bytes: bytes.len() }
                    } else {
                        Phase::DataStart
                    }
                } else if state.session.buffered() > 0 && !state.waited {
                    Phase::PartialCommand
                } else {
                    Phase::NewCommand
                };
                if !state.session.is_closed() {
                    if let Some(conn) = state.conn.as_ref() {
                        let now = Instant::now();
                        conn.read_more(state.rules().next(conn.deadline(), now, phase));
                    }
                }
            }
            FsmMsg::Input(Input::Eof) => {
                debug!(path = %state.path, "client closed the connection");
                myself.stop(None);
                return Ok(());
            }
            FsmMsg::Input(Input::Timeout) => {
                info!(path = %state.path, stress = state.stress, "deadline passed: timeout");
                let actions = state.session.timeout();
                run(state, actions).await;
            }
            FsmMsg::Stress(on) => {
                state.stress = on;
                state.session.set_stress(on);
                let rules = state.rules();
                if let Some(conn) = state.conn.as_mut() {
                    conn.set_write_limit(rules.timeout);
                    if on {
                        let sooner = Instant::now() + rules.timeout;
                        conn.set_deadline(conn.deadline().min(sooner));
                    }
                }
            }
            FsmMsg::Shutdown => {
                state.stopping = true;
                let actions = state.session.shutdown();
                run(state, actions).await;
            }
        }
        if state.session.is_closed() || !state.conn.as_ref().is_some_and(Connection::is_open) {
            myself.stop(None);
        }
        Ok(())
    }
}

/// Carry out the machine's actions in order; look-ups and commits feed their answers back
/// into the machine, whose further actions join the work list.
async fn run(state: &mut FsmState, actions: Vec<Action>) {
    let mut work: std::collections::VecDeque<Action> = actions.into();
    while let Some(action) = work.pop_front() {
        let handshake_limit = HANDSHAKE_TIMEOUT.min(state.rules().timeout);
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        match action {
            Action::Send(bytes) => {
                count_rejections(&bytes);
                if !conn.write(&bytes).await {
                    debug!(path = %state.path, "client gone while writing");
                    return;
                }
            }
            Action::LookupRecipient(path) => {
                state.waited = true;
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
                state.waited = true;
                let outcome = match checked(state.checker.as_deref(), tx, &state.path).await {
                    Ok((tx, junk)) => store(&state.path, &state.signers, tx, junk).await,
                    Err(refused) => refused,
                };
                work.extend(state.session.stored(outcome, Utc::now()));
            }
            Action::Close => {
                conn.close().await;
                return;
            }
            Action::StartTls => {
                state.waited = true;
                let Some(acceptor) = state.acceptor.clone() else {
                    conn.close().await;
                    return;
                };
                match conn.start_tls(&acceptor, handshake_limit).await {
                    Ok(()) => {
                        debug!(path = %state.path, "STARTTLS: TLS established");
                        state.session.set_tls_summary(conn.tls_summary());
                        work.extend(state.session.tls_started());
                    }
                    Err(e) => {
                        info!(path = %state.path, error = %e, "STARTTLS handshake failed");
                        conn.close().await;
                        return;
                    }
                }
            }
            Action::Authenticate { user, password } => {
                state.waited = true;
                if !auth_begin(state.ip).await {
                    info!(path = %state.path, "AUTH refused: too many failures from this client");
                    work.extend(state.session.auth_throttled(Utc::now()));
                    continue;
                }
                let checked = check_password(&user, password).await;
                // A store failure is not the client's guess: anvil does not count it.
                auth_end(state.ip, checked.unwrap_or(true));
                let ok = checked.unwrap_or(false);
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

/// Asks `smtpd_anvil` whether this client may check a password now. Without an answer
/// (anvil restarting) the check goes ahead: the failure delay still applies.
async fn auth_begin(ip: IpAddr) -> bool {
    let Some(cell) = ractor::registry::where_is(super::ANVIL) else {
        return true;
    };
    let anvil: ActorRef<AnvilMsg> = cell.into();
    match anvil
        .call(
            |reply| AnvilMsg::AuthBegin { ip, reply },
            Some(ANVIL_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(allowed)) => allowed,
        _ => true,
    }
}

/// Tells `smtpd_anvil` how the check allowed by [`auth_begin`] ended.
fn auth_end(ip: IpAddr, ok: bool) {
    if let Some(cell) = ractor::registry::where_is(super::ANVIL) {
        let _ = cell.send_message(AnvilMsg::AuthEnd { ip, ok });
    }
}

/// Whether `password` is `user`'s: the store's argon2 hash, verified on the blocking
/// pool (argon2 is slow on purpose). An unknown user is verified against a dummy hash,
/// so it costs the same time as a known one and its answer does not tell who exists.
/// `Err` when the store could not be asked (not the client's fault: not counted as a
/// failure by anvil, answered 535 all the same).
async fn check_password(user: &str, password: Secret) -> Result<bool, ()> {
    let address = user.to_string();
    let hash = match STORE
        .ask(|reply| StoreMsg::PasswordHash { address, reply })
        .await
    {
        Ok(hash) => hash,
        Err(Unanswered::NotRunning) => return Err(()),
        Err(_) => {
            warn!("password look-up failed");
            return Err(());
        }
    };
    tokio::task::spawn_blocking(move || match hash {
        Some(hash) => crate::store::password::verify_password(password.expose(), &hash),
        None => crate::store::password::verify_unknown_user(password.expose()),
    })
    .await
    .map_err(|_| ())
}

async fn lookup(address: &str) -> Result<RecipientFacts, String> {
    let address = address.to_string();
    STORE
        .ask(|reply| StoreMsg::LookupRecipient { address, reply })
        .await
        .map_err(|e| e.to_string())
}

/// Mail for local users from a client that may not relay goes through SPF, DKIM and
/// DMARC (`auth::check`): the transaction comes back with our `Authentication-Results:`
/// on top and whether it belongs in Junk, or the refusal of a DMARC `p=reject` failure.
async fn checked(
    checker: Option<&Checker>, mut tx: Transaction, path: &str,
) -> Result<(Transaction, bool), StoreOutcome> {
    let Some(checker) = checker else {
        return Ok((tx, false));
    };
    let internal = crate::auth::check::internal_host(tx.client_ip);
    if tx.trusted || internal || !tx.recipients.iter().any(|r| r.local) {
        return Ok((tx, false));
    }
    let sender = tx.reverse_path.to_string();
    let c = checker
        .check(&tx.data, tx.client_ip, &tx.helo, &sender)
        .await;
    for (method, result) in [("spf", c.spf), ("dkim", c.dkim), ("dmarc", c.dmarc)] {
        metrics::counter!(names::AUTH_RESULTS, "method" => method, "result" => result).increment(1);
    }
    info!(path = %path, spf = c.spf, dkim = c.dkim, dmarc = c.dmarc, from_domain = %c.from_domain, "authentication results");
    match c.disposition {
        Disposition::Reject(text) => {
            metrics::counter!(names::DMARC_ACTIONS, "action" => "reject").increment(1);
            info!(path = %path, from_domain = %c.from_domain, "refused: DMARC p=reject");
            Err(StoreOutcome::Refused(text))
        }
        Disposition::Junk => {
            metrics::counter!(names::DMARC_ACTIONS, "action" => "junk").increment(1);
            tx.data = c.message;
            Ok((tx, true))
        }
        Disposition::Deliver => {
            tx.data = c.message;
            Ok((tx, false))
        }
    }
}

/// Hand the transaction to the store actor and wait for its group commit; `junk` puts
/// the local copies in the Junk mailbox. Relayed mail is DKIM-signed first when a key
/// applies.
async fn store(
    path: &str, signers: &Arc<crate::auth::sign::Signers>, tx: Transaction, junk: bool,
) -> StoreOutcome {
    let mut message = to_incoming(tx);
    message.mailbox = junk.then(|| crate::store::JUNK.to_string());
    if !message.remote_rcpts.is_empty() && !signers.is_empty() {
        let Some(body) = dkim_sign(path, signers, message.body).await else {
            return StoreOutcome::Failed;
        };
        message.body = body;
    }
    let destination = match (
        message.local_rcpts.is_empty(),
        message.remote_rcpts.is_empty(),
    ) {
        (false, true) => "local",
        (true, false) => "relay",
        _ => "both",
    };
    match STORE.ask(|reply| StoreMsg::Accept(message, reply)).await {
        Ok(accepted) => {
            metrics::counter!(names::ACCEPTED, "destination" => destination).increment(1);
            StoreOutcome::Stored {
                queue_id: accepted
                    .queue_id
                    .or_else(|| accepted.message_ids.first().map(|id| format!("L{id}"))),
            }
        }
        Err(Unanswered::NotRunning) => {
            warn!(path = %path, "store not running");
            StoreOutcome::Failed
        }
        Err(Unanswered::Store(StoreError::Full(e))) => {
            warn!(path = %path, error = %e, "store full");
            StoreOutcome::DiskFull
        }
        Err(Unanswered::Store(e)) => {
            warn!(path = %path, error = %e, "store failed");
            StoreOutcome::Failed
        }
        _ => {
            warn!(path = %path, "store did not answer");
            StoreOutcome::Failed
        }
    }
}

/// The message with its DKIM signatures on top (or as it was when no key applies). The
/// RSA operation takes a millisecond or more, so it runs on the blocking pool rather
/// than hold up the sessions sharing this worker. `None`: the signing task panicked.
async fn dkim_sign(
    path: &str, signers: &Arc<crate::auth::sign::Signers>, mut body: Vec<u8>,
) -> Option<Vec<u8>> {
    let signers = signers.clone();
    let (body, signed) = match tokio::task::spawn_blocking(move || {
        let signed = signers.sign(&mut body);
        (body, signed)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            warn!(path = %path, error = %e, "DKIM signing failed");
            return None;
        }
    };
    for s in signed.iter().flat_map(|s| &s.signatures) {
        debug!(path = %path, d = %s.domain, s = %s.selector, a = s.algorithm, "DKIM-Signature added");
        metrics::counter!(names::DKIM_SIGNED, "algorithm" => s.algorithm).increment(1);
    }
    Some(body)
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
        mailbox: None,
        flags: Vec::new(),
        ret: tx.ret,
        envid: tx.envid,
        smtputf8: tx.smtputf8,
        client_ip: tx.client_ip.to_string(),
        helo: tx.helo,
        received_at: super::store_now(),
        subject: tx.subject,
        body: tx.data,
    }
}

/// IPv4-mapped IPv6 clients (`::ffff:a.b.c.d`) are IPv4 clients.
pub(crate) fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
