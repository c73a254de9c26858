//! The SMTP client dialogue for one message and one next hop: try each host in order
//! (refused connections, 4xx/5xx greetings and session-level 4xx move on to the next
//! host), EHLO as `server_smtp_name` (HELO if EHLO is refused), opportunistic STARTTLS
//! (certificates not verified, as Postfix's `may` level; a failed handshake retries that
//! host in plain text), `MAIL FROM`, one `RCPT TO` per recipient with its own result,
//! and DATA only when some recipient was accepted.
//!
//! Connections are reused as Postfix's connection cache does: a session whose
//! transaction ended cleanly (250 after the final dot, or every recipient refused and a
//! successful RSET) goes idle in a `ConnectionCache` keyed by the host's address and
//! whether TLS was wanted, instead of QUIT. The next message for that address starts at
//! `MAIL FROM`, skipping connect, greeting, EHLO and STARTTLS. A cached connection the
//! server closed meanwhile (EOF, reset or 421 before any recipient was accepted) is
//! replaced by a fresh one to the same host without counting as that host's failure.
//! Idle connections are closed with QUIT after `CONNECTION_CACHE_TIME_LIMIT`; any other
//! ending closes the connection and never caches it. QUIT always runs in a spawned task,
//! so the results are returned as soon as they are known.
//!
//! Written directly over tokio rather than through mail-send's `SmtpClient`, whose
//! `write_message` does not stuff a dot on the first line and adds a blank line before
//! the terminator, and whose reader drops bytes after a reply; mail-send still provides
//! the certificate-ignoring TLS connector.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::seven_bit;
use super::wire::{data_payload, ehlo_keywords, Fed, ReplyBuilder, MAX_REPLY_LINE};
use crate::queue::outcome::{FailureCause, Outcome, RcptStatus, SmtpReply};

/// One recipient with the DSN parameters its client gave (RFC 3461 §4), passed on to a
/// next hop that offers DSN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeRcpt {
    /// The forward-path.
    pub address: String,
    /// `NOTIFY=` as received.
    pub notify: Option<String>,
    /// `ORCPT=` as received (`addr-type;xtext`).
    pub orcpt: Option<String>,
}

/// What `MAIL FROM` and the `RCPT TO`s carry: the addresses and the parameters the
/// client gave that travel on (RFC 3461 DSN, RFC 6531 SMTPUTF8). `BODY` and `SIZE` are
/// the client's to work out from the text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse-path (`""` for `<>`).
    pub sender: String,
    /// The recipients, in order.
    pub rcpts: Vec<EnvelopeRcpt>,
    /// `RET=` as received.
    pub ret: Option<String>,
    /// `ENVID=` as received (xtext).
    pub envid: Option<String>,
    /// The client declared `SMTPUTF8`.
    pub smtputf8: bool,
}

impl Envelope {
    /// An envelope with addresses only.
    pub fn plain(sender: &str, rcpts: &[String]) -> Self {
        Envelope {
            sender: sender.to_string(),
            rcpts: rcpts
                .iter()
                .map(|a| EnvelopeRcpt {
                    address: a.clone(),
                    ..EnvelopeRcpt::default()
                })
                .collect(),
            ..Envelope::default()
        }
    }

    /// The recipients' addresses, in order.
    pub fn addresses(&self) -> Vec<String> {
        self.rcpts.iter().map(|r| r.address.clone()).collect()
    }

    /// The same envelope for the recipients at `members` (indexes into `rcpts`).
    pub fn subset(&self, members: &[usize]) -> Self {
        Envelope {
            rcpts: members.iter().map(|i| self.rcpts[*i].clone()).collect(),
            ..self.clone()
        }
    }

    /// Whether a next hop must offer SMTPUTF8 for this message (RFC 6531 §3.2): the
    /// client declared it and an address or a header field of `body` is not ASCII. A
    /// message that declared it without needing it goes to any hop, as Postfix sends it.
    fn needs_smtputf8(&self, body: &[u8]) -> bool {
        self.smtputf8
            && (!self.sender.is_ascii()
                || self.rcpts.iter().any(|r| !r.address.is_ascii())
                || !seven_bit::header_section(body).is_ascii())
    }
}

/// One host to try: its name (for `Remote-MTA` and TLS SNI) and address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hop {
    /// The host name as routing found it (MX exchange, route host, or the IP itself).
    pub host: String,
    /// The address to connect to.
    pub addr: SocketAddr,
}

impl Hop {
    /// A hop named by its own address (tests, address literals).
    pub fn addr(addr: SocketAddr) -> Self {
        Hop {
            host: addr.ip().to_string(),
            addr,
        }
    }
}

/// Timeouts and TLS policy of the SMTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOptions {
    /// How long to wait for the TCP connection (and the TLS handshake).
    pub connect_timeout: Duration,
    /// How long to wait for each reply (greeting, EHLO, MAIL, RCPT, DATA).
    pub command_timeout: Duration,
    /// How long to wait for the reply after the message's final dot.
    pub data_timeout: Duration,
    /// Whether to use STARTTLS when the server offers it.
    pub starttls: bool,
    /// Deliver only over TLS (`server_smtp_tls_outbound: require`): a host that does not
    /// offer STARTTLS, or whose handshake fails, is a temporary failure, never a
    /// plain-text delivery.
    pub require_tls: bool,
    /// Where erlmail itself listens for SMTP: a next hop at one of these is this host,
    /// and the mail fails at once as a loop (`5.4.6`). An unspecified address (`::`,
    /// `0.0.0.0`) stands for every address of this host on that port.
    pub own_addrs: Vec<SocketAddr>,
    /// This host's name (`server_smtp_name`): a next hop whose greeting or EHLO reply
    /// names it is a loop. `None`: the EHLO name.
    pub own_name: Option<String>,
}

impl DeliveryOptions {
    /// Whether `addr` is one erlmail listens on (see `own_addrs`).
    pub fn is_own_address(&self, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        self.own_addrs.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == ip
                    || (own.ip().is_unspecified()
                        && (own.is_ipv6() || ip.is_ipv4())
                        && is_local_address(ip)))
        })
    }

    /// Every timeout set to `timeout` (`server_smtp_timeout`), STARTTLS on.
    pub fn with_timeout(timeout: Duration) -> Self {
        DeliveryOptions {
            connect_timeout: timeout,
            command_timeout: timeout,
            data_timeout: timeout,
            starttls: true,
            require_tls: false,
            own_addrs: Vec::new(),
            own_name: None,
        }
    }
}

impl Default for DeliveryOptions {
    /// Postfix-like: 30 s to connect, 300 s per reply, 600 s after the final dot.
    fn default() -> Self {
        DeliveryOptions {
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            starttls: true,
            require_tls: false,
            own_addrs: Vec::new(),
            own_name: None,
        }
    }
}

/// One recipient's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    /// The recipient address as given.
    pub rcpt: String,
    /// Delivered, temporary or permanent, with the reply or reason.
    pub status: RcptStatus,
    /// The name of the host whose answer decided the status (`Remote-MTA`), if any.
    pub remote_mta: Option<String>,
    /// That host's address.
    pub remote_addr: Option<SocketAddr>,
    /// Whether that session ran over TLS.
    pub tls: bool,
    /// The host that decided the status offered DSN, so it was given the recipient's
    /// `NOTIFY` and `ORCPT`: reports of success from here on are its to send.
    pub dsn: bool,
}

/// The outcome of one `deliver` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// One result per recipient, in the order given.
    pub results: Vec<RcptResult>,
    /// The host whose session decided the results (None when no host got that far).
    pub remote: Option<Hop>,
    /// Whether that session used TLS.
    pub tls: bool,
    /// Hosts given up on before, and why (for logs and the queue's last error).
    pub skipped: Vec<(Hop, FailureCause)>,
}

/// Delivers one message to `rcpts` through the first of `hops` that takes the
/// transaction. `sender` may be empty (`MAIL FROM:<>`). `body` is the message as
/// queued; it is sent with CRLF line ends and dot-stuffing.
///
/// With a `cache`, a host's idle connection from an earlier delivery is used when there
/// is one, and a connection that ends its transaction cleanly is left there for the
/// next; without one every call opens its own connections and QUITs them.
pub async fn deliver(
    hops: &[Hop],
    helo: &str,
    sender: &str,
    rcpts: &[String],
    body: &[u8],
    opts: &DeliveryOptions,
    cache: Option<&ConnectionCache>,
) -> DeliveryReport {
    let envelope = Envelope::plain(sender, rcpts);
    deliver_with(hops, helo, &envelope, body, opts, cache, &GoAhead::new()).await
}

/// [`deliver`] with the envelope's parameters, the text sent only while `go_ahead` is
/// given.
pub async fn deliver_with(
    hops: &[Hop],
    helo: &str,
    envelope: &Envelope,
    body: &[u8],
    opts: &DeliveryOptions,
    cache: Option<&ConnectionCache>,
    go_ahead: &GoAhead,
) -> DeliveryReport {
    let rcpts = &envelope.addresses();
    let msg = Message {
        helo,
        envelope,
        rcpts,
        body,
        go_ahead,
        eight_bit: seven_bit::has_eight_bit(body),
        needs_smtputf8: envelope.needs_smtputf8(body),
        seven_bit: OnceLock::new(),
    };
    let mut skipped = Vec::new();
    for hop in hops {
        if opts.is_own_address(hop.addr) {
            // The next hop is where erlmail itself listens: the mail would come back.
            tracing::warn!(host = %hop.host, addr = %hop.addr, "next hop is this host's own listening address");
            return failed_at(
                hop,
                rcpts,
                FailureCause::Loop(hop.host.clone()),
                false,
                skipped,
            );
        }
        let mut use_tls = opts.starttls;
        loop {
            match attempt_host(hop, &msg, opts, cache, use_tls).await {
                Ok(s) => return s.into_report(hop, rcpts, skipped),
                Err(HostError::TlsFailed(cause)) if use_tls && !opts.require_tls => {
                    tracing::info!(host = %hop.host, addr = %hop.addr, %cause, "TLS failed; retrying in plain text");
                    use_tls = false;
                }
                Err(HostError::Fatal { cause, tls }) => {
                    // The server refused the sender itself, or the mail cannot go there
                    // at all: all recipients fail alike.
                    return failed_at(hop, rcpts, cause, tls, skipped);
                }
                Err(
                    HostError::Skip { cause }
                    | HostError::TlsFailed(cause)
                    | HostError::Stale(cause),
                ) => {
                    tracing::info!(host = %hop.host, addr = %hop.addr, %cause, "host skipped");
                    skipped.push((hop.clone(), cause));
                    break;
                }
            }
        }
    }
    // No host took the transaction: every recipient shares the last host's failure.
    let (remote, cause) = match skipped.last() {
        Some((hop, cause)) => (Some(hop.clone()), cause.clone()),
        None => (None, FailureCause::Local("no host to deliver to".into())),
    };
    let answered = matches!(cause, FailureCause::Reply(_));
    let results = rcpts
        .iter()
        .map(|r| RcptResult {
            rcpt: r.clone(),
            status: RcptStatus::failed(cause.clone()),
            remote_mta: remote.as_ref().filter(|_| answered).map(|h| h.host.clone()),
            remote_addr: remote.as_ref().filter(|_| answered).map(|h| h.addr),
            tls: false,
            dsn: false,
        })
        .collect();
    DeliveryReport {
        results,
        remote: None,
        tls: false,
        skipped,
    }
}

/// Every recipient failed alike at `hop` for `cause`.
fn failed_at(
    hop: &Hop,
    rcpts: &[String],
    cause: FailureCause,
    tls: bool,
    skipped: Vec<(Hop, FailureCause)>,
) -> DeliveryReport {
    let results = rcpts
        .iter()
        .map(|r| RcptResult {
            rcpt: r.clone(),
            status: RcptStatus::failed(cause.clone()),
            remote_mta: Some(hop.host.clone()),
            remote_addr: Some(hop.addr),
            tls,
            dsn: false,
        })
        .collect();
    DeliveryReport::decided_by(hop, results, tls, skipped)
}

impl DeliveryReport {
    /// The report of a delivery that `hop`'s session decided.
    fn decided_by(
        hop: &Hop,
        results: Vec<RcptResult>,
        tls: bool,
        skipped: Vec<(Hop, FailureCause)>,
    ) -> Self {
        DeliveryReport {
            results,
            remote: Some(hop.clone()),
            tls,
            skipped,
        }
    }
}

/// What one `deliver` call hands over: the same for every host tried.
struct Message<'a> {
    helo: &'a str,
    envelope: &'a Envelope,
    rcpts: &'a [String],
    body: &'a [u8],
    go_ahead: &'a GoAhead,
    /// The text holds an octet above 127.
    eight_bit: bool,
    /// Only a hop offering SMTPUTF8 may take it (see `Envelope::needs_smtputf8`).
    needs_smtputf8: bool,
    /// The text made 7-bit for hops without 8BITMIME, worked out once when first needed.
    seven_bit: OnceLock<Result<Option<Vec<u8>>, seven_bit::Unconvertible>>,
}

impl Message<'_> {
    /// The text to send to a hop offering `keywords`, and whether it goes as
    /// `BODY=8BITMIME`; or why it cannot go there at all (RFC 6531 §3.2, RFC 6152).
    fn text_for(&self, keywords: &[String], host: &str) -> Result<(&[u8], bool), FailureCause> {
        if self.needs_smtputf8 && !offers(keywords, "SMTPUTF8") {
            return Err(FailureCause::NotOffered {
                extension: "SMTPUTF8",
                host: host.to_string(),
            });
        }
        if !self.eight_bit {
            return Ok((self.body, false));
        }
        if offers(keywords, "8BITMIME") {
            return Ok((self.body, true));
        }
        // Postfix converts rather than bounce: every 8-bit MIME part quoted-printable.
        match self
            .seven_bit
            .get_or_init(|| seven_bit::to_seven_bit(self.body))
        {
            Ok(Some(converted)) => Ok((converted, false)),
            // 8-bit octets in the header only: sent as they are, as Postfix does.
            Ok(None) => Ok((self.body, false)),
            Err(_) => Err(FailureCause::NotOffered {
                extension: "8BITMIME",
                host: host.to_string(),
            }),
        }
    }
}

/// Permission to send the message text, checked once the server has answered DATA with
/// 354 and before a byte of the text goes out. The sender holds the message's lease and
/// withdraws this when the lease is lost (deleted, held, or taken by another node after
/// it lapsed): the connection is then closed without the text, so the server never gets
/// the message from us. Up to that point nothing is delivered, so stopping is safe.
#[derive(Debug, Clone, Default)]
pub struct GoAhead(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl GoAhead {
    /// Permission given (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Withdraw the permission, for good.
    pub fn withdraw(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the text may still be sent.
    pub fn given(&self) -> bool {
        !self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// How a session with one host ended without deciding the recipients.
enum HostError {
    /// Try the next host.
    Skip { cause: FailureCause },
    /// The TLS handshake failed: try this host again without TLS.
    TlsFailed(FailureCause),
    /// A permanent refusal of the whole transaction (5xx to MAIL FROM): stop here.
    Fatal { cause: FailureCause, tls: bool },
    /// A cached connection turned out closed before any recipient was accepted: try
    /// this host again on a fresh connection. Only transactions on reused connections
    /// end this way.
    Stale(FailureCause),
}

/// The per-recipient statuses a session decided.
struct SessionResult {
    statuses: Vec<RcptStatus>,
    tls: bool,
    /// The host offered DSN (the recipients' parameters went with them).
    dsn: bool,
}

impl SessionResult {
    fn into_report(
        self,
        hop: &Hop,
        rcpts: &[String],
        skipped: Vec<(Hop, FailureCause)>,
    ) -> DeliveryReport {
        let (tls, dsn) = (self.tls, self.dsn);
        let results = rcpts
            .iter()
            .zip(self.statuses)
            .map(|(r, status)| RcptResult {
                rcpt: r.clone(),
                status,
                remote_mta: Some(hop.host.clone()),
                remote_addr: Some(hop.addr),
                tls,
                dsn,
            })
            .collect();
        DeliveryReport::decided_by(hop, results, tls, skipped)
    }
}

/// One host, one mode (TLS wanted or not): the transaction on a cached connection when
/// there is a live one, else on a fresh one; a cached connection found closed is
/// replaced by a fresh one once.
async fn attempt_host(
    hop: &Hop,
    msg: &Message<'_>,
    opts: &DeliveryOptions,
    cache: Option<&ConnectionCache>,
    use_tls: bool,
) -> Result<SessionResult, HostError> {
    let key = CacheKey {
        addr: hop.addr,
        tls: use_tls,
    };
    if let Some(cache) = cache {
        if let Some(session) = cache.take(key, msg.helo, opts.require_tls) {
            tracing::debug!(
                host = %hop.host,
                addr = %hop.addr,
                tls = session.tls,
                transactions = session.transactions,
                keywords = session.keywords.len(),
                "reusing cached connection"
            );
            match transaction(session, true, Some(cache.limits()), &hop.host, msg, opts).await {
                Ok((result, kept)) => {
                    if let Some(session) = kept {
                        cache.put(key, session);
                    }
                    return Ok(result);
                }
                Err(HostError::Stale(cause)) => {
                    tracing::debug!(host = %hop.host, addr = %hop.addr, %cause, "cached connection was closed; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
    }
    let session = open(hop, msg.helo, opts, use_tls).await?;
    let limits = cache.map(ConnectionCache::limits);
    let (result, kept) = transaction(session, false, limits, &hop.host, msg, opts).await?;
    if let Some(session) = kept {
        match cache {
            Some(cache) => cache.put(key, session),
            None => spawn_quit(session.conn),
        }
    }
    Ok(result)
}

/// Anything the connection can be: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a read or write on the connection failed.
#[derive(Debug)]
enum ConnError {
    Io(std::io::Error),
    Timeout(&'static str),
    Protocol(String),
    /// We chose to stop (the go-ahead was withdrawn).
    Local(String),
}

impl ConnError {
    fn cause(&self, host: &str) -> FailureCause {
        match self {
            ConnError::Io(e) => FailureCause::Connection(format!("{host}: {e}")),
            ConnError::Timeout(stage) => {
                FailureCause::Timeout(format!("{host}: no answer {stage}"))
            }
            ConnError::Protocol(s) => FailureCause::Protocol(format!("{host}: {s}")),
            ConnError::Local(s) => FailureCause::Local(s.clone()),
        }
    }
}

/// Whether `ip` belongs to this host: a loopback address, or one a socket can be bound
/// to (the kernel allows that only for its own addresses).
fn is_local_address(ip: std::net::IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// One SMTP connection with its read buffer.
struct Conn {
    io: BufReader<Box<dyn Io>>,
    timeout: Duration,
}

impl Conn {
    async fn read_reply_within(
        &mut self,
        limit: Duration,
        stage: &'static str,
    ) -> Result<SmtpReply, ConnError> {
        tokio::time::timeout(limit, async {
            let mut builder = ReplyBuilder::default();
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = (&mut self.io)
                    .take(MAX_REPLY_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(ConnError::Io)?;
                if n == 0 {
                    return Err(ConnError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed by server",
                    )));
                }
                if !line.ends_with(b"\n") {
                    return Err(ConnError::Protocol("reply line too long".into()));
                }
                match builder.feed(&line) {
                    Ok(Fed::More) => {}
                    Ok(Fed::Done(reply)) => return Ok(reply),
                    Err(e) => return Err(ConnError::Protocol(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| ConnError::Timeout(stage))?
    }

    async fn read_reply(&mut self, stage: &'static str) -> Result<SmtpReply, ConnError> {
        self.read_reply_within(self.timeout, stage).await
    }

    async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), ConnError> {
        tokio::time::timeout(self.timeout, async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| ConnError::Timeout(stage))?
        .map_err(ConnError::Io)
    }

    async fn command(&mut self, line: &str, stage: &'static str) -> Result<SmtpReply, ConnError> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.read_reply(stage).await
    }

    /// The reply to `line`: sent already in a pipelined group (`sent`), or sent now.
    async fn answer(
        &mut self,
        sent: bool,
        line: &str,
        stage: &'static str,
    ) -> Result<SmtpReply, ConnError> {
        if sent {
            self.read_reply(stage).await
        } else {
            self.command(line, stage).await
        }
    }

    /// Whether an idle connection still looks usable without a round trip: nothing
    /// buffered and nothing to read. A server that closed it (EOF, reset) or said
    /// something unasked (typically `421` on its own idle timeout) fails this. One
    /// non-blocking read attempt; a connection that merely has nothing to say passes.
    fn still_open(&mut self) -> bool {
        if !self.io.buffer().is_empty() {
            return false;
        }
        // Pending means no data and no EOF yet: the only good answer.
        self.io.fill_buf().now_or_never().is_none()
    }

    /// QUIT politely, without caring how it goes: the results are already decided.
    async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if self.io.write_all(b"QUIT\r\n").await.is_ok() && self.io.flush().await.is_ok() {
                let mut sink = Vec::new();
                let _ = (&mut self.io).take(1024).read_until(b'\n', &mut sink).await;
            }
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// QUIT and close `conn` in the background, so whoever decided to close it need not
/// wait for the server's 221.
fn spawn_quit(conn: Conn) {
    tokio::spawn(conn.quit());
}

/// The TLS client configuration for opportunistic STARTTLS: no certificate checks.
fn tls_connector() -> Option<TlsConnector> {
    static CONNECTOR: OnceLock<Option<TlsConnector>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| match mail_send::smtp::tls::build_tls_connector(true) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no TLS client configuration; STARTTLS disabled");
                None
            }
        })
        .clone()
}

/// The name to present in the TLS handshake: the host name, or its address.
fn server_name(hop: &Hop) -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from(hop.host.clone())
        .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(hop.addr.ip().into()))
}

/// What [`greet`] found.
enum Greeted {
    /// Ready for a transaction: the keywords offered (none after HELO).
    Ready(Vec<String>),
    /// EHLO and HELO both refused: the HELO reply.
    Refused(SmtpReply),
    /// The EHLO reply names this host (see [`names_me`]).
    Me,
}

/// EHLO, falling back to HELO when EHLO is refused.
async fn greet(conn: &mut Conn, helo: &str, me: &str) -> Result<Greeted, ConnError> {
    let ehlo = conn.command(&format!("EHLO {helo}"), "to EHLO").await?;
    if ehlo.outcome() == Outcome::Delivered {
        if names_me(&ehlo, me) {
            return Ok(Greeted::Me);
        }
        return Ok(Greeted::Ready(ehlo_keywords(&ehlo)));
    }
    let helo_reply = conn.command(&format!("HELO {helo}"), "to HELO").await?;
    if helo_reply.outcome() == Outcome::Delivered {
        Ok(Greeted::Ready(Vec::new()))
    } else {
        Ok(Greeted::Refused(helo_reply))
    }
}

/// Whether a server's greeting or EHLO reply begins with our own name `me`
/// (`server_smtp_name`): the next hop is this host, and the mail would loop.
fn names_me(reply: &SmtpReply, me: &str) -> bool {
    let me = me.trim_end_matches('.');
    reply
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .is_some_and(|name| name.trim_end_matches('.').eq_ignore_ascii_case(me))
}

/// A connection past its greeting, EHLO and (when wanted and offered) STARTTLS: ready
/// for `MAIL FROM`, whether just opened or taken from the cache.
struct Session {
    conn: Conn,
    /// Whether it runs over TLS.
    tls: bool,
    /// What the server offered in its (last) EHLO reply; kept with the connection so a
    /// reuse knows it without asking again.
    keywords: Vec<String>,
    /// The name it greeted the server with: a connection is only reused under that name.
    helo: String,
    /// When the TCP connection was made (`smtp_connection_reuse_time_limit` counts from
    /// here).
    opened: Instant,
    /// Transactions it completed cleanly (`smtp_connection_reuse_count_limit`).
    transactions: u32,
}

impl Session {
    /// What becomes of the connection after a transaction: `Ok(true)`, ended cleanly, it
    /// is kept for the next one; `Ok(false)`, the server answered but the connection is
    /// not to be reused, it is QUIT in the background; `Err(())`, its state is unknown
    /// (a read or write failed), it is just closed.
    fn settle(mut self, ending: Result<bool, ()>) -> Option<Session> {
        match ending {
            Ok(true) => {
                self.transactions += 1;
                Some(self)
            }
            Ok(false) => {
                spawn_quit(self.conn);
                None
            }
            Err(()) => None,
        }
    }
}

/// Connect to `hop`, read the greeting, EHLO, and STARTTLS then EHLO again when
/// `use_tls` and the server offers it.
async fn open(
    hop: &Hop,
    helo: &str,
    opts: &DeliveryOptions,
    use_tls: bool,
) -> Result<Session, HostError> {
    let host = hop.host.as_str();
    let skip = |e: ConnError| HostError::Skip {
        cause: e.cause(host),
    };
    let opened = Instant::now();
    let tcp = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(hop.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(skip(ConnError::Io(e))),
        Err(_) => return Err(skip(ConnError::Timeout("to connect"))),
    };
    // Every write is a whole command group or a whole message text: Nagle's algorithm
    // could only hold back the tail of a long text until the server's ACK.
    let _ = tcp.set_nodelay(true);
    let mut conn = Conn {
        io: BufReader::new(Box::new(tcp) as Box<dyn Io>),
        timeout: opts.command_timeout,
    };

    let greeting = conn.read_reply("to the greeting").await.map_err(skip)?;
    if greeting.outcome() != Outcome::Delivered {
        spawn_quit(conn);
        return Err(HostError::Skip {
            cause: FailureCause::Reply(greeting),
        });
    }
    // A next hop that is this host (a stale MX, a route or relay host pointing back
    // here) fails the mail at once rather than pass it round until the hop limit.
    let looping = |conn: Conn| -> Result<Session, HostError> {
        spawn_quit(conn);
        Err(HostError::Fatal {
            cause: FailureCause::Loop(host.to_string()),
            tls: false,
        })
    };
    // This host's name: `server_smtp_name`, which the EHLO name may differ from.
    let me = opts.own_name.as_deref().unwrap_or(helo);
    if names_me(&greeting, me) {
        return looping(conn);
    }
    let mut keywords = match greet(&mut conn, helo, me).await.map_err(skip)? {
        Greeted::Ready(k) => k,
        Greeted::Me => return looping(conn),
        Greeted::Refused(reply) => {
            spawn_quit(conn);
            return Err(HostError::Skip {
                cause: FailureCause::Reply(reply),
            });
        }
    };

    let mut tls = false;
    let connector = if use_tls && offers(&keywords, "STARTTLS") {
        tls_connector()
    } else {
        None
    };
    if opts.require_tls && connector.is_none() {
        spawn_quit(conn);
        return Err(HostError::Skip {
            cause: FailureCause::Connection(format!(
                "{host}: TLS required but STARTTLS not offered"
            )),
        });
    }
    if let Some(connector) = connector {
        let reply = conn
            .command("STARTTLS", "to STARTTLS")
            .await
            .map_err(skip)?;
        if reply.code == 220 {
            // Bytes already buffered after the 220 would be read as if they came over
            // TLS: a STARTTLS injection. Refuse the host rather than trust them.
            if !conn.io.buffer().is_empty() {
                return Err(HostError::Skip {
                    cause: FailureCause::Protocol(format!("{host}: data after STARTTLS reply")),
                });
            }
            let plain = conn.io.into_inner();
            let handshake = tokio::time::timeout(
                opts.connect_timeout,
                connector.connect(server_name(hop), plain),
            )
            .await;
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(HostError::TlsFailed(FailureCause::Connection(format!(
                        "{host}: TLS handshake failed: {e}"
                    ))))
                }
                Err(_) => {
                    return Err(HostError::TlsFailed(FailureCause::Timeout(format!(
                        "{host}: no answer in the TLS handshake"
                    ))))
                }
            };
            conn = Conn {
                io: BufReader::new(Box::new(stream) as Box<dyn Io>),
                timeout: opts.command_timeout,
            };
            tls = true;
            keywords = match greet(&mut conn, helo, me).await.map_err(skip)? {
                Greeted::Ready(k) => k,
                Greeted::Me => return looping(conn),
                Greeted::Refused(reply) => {
                    spawn_quit(conn);
                    return Err(HostError::Skip {
                        cause: FailureCause::Reply(reply),
                    });
                }
            };
        }
        // Otherwise STARTTLS was refused: carry on in plain text, as Postfix's `may`
        // does, unless TLS is required.
        if !tls && opts.require_tls {
            spawn_quit(conn);
            return Err(HostError::Skip {
                cause: FailureCause::Connection(format!(
                    "{host}: TLS required but STARTTLS refused: {}",
                    reply.one_line()
                )),
            });
        }
    }
    Ok(Session {
        conn,
        tls,
        keywords,
        helo: helo.to_string(),
        opened,
        transactions: 0,
    })
}

/// One transaction on an open session: `MAIL FROM`, the `RCPT TO`s, and DATA when some
/// recipient was accepted. `reused` says the session came from the cache: then a
/// connection found closed (I/O error or 421) before any recipient was accepted ends in
/// `HostError::Stale` rather than a host failure. `limits` (present when a cache will
/// take the session back) decides whether to keep the connection after a clean end;
/// the session is returned for that, and is otherwise QUIT (or just dropped after an
/// I/O error) here.
async fn transaction(
    mut s: Session,
    reused: bool,
    limits: Option<CacheLimits>,
    host: &str,
    msg: &Message<'_>,
    opts: &DeliveryOptions,
) -> Result<(SessionResult, Option<Session>), HostError> {
    let tls = s.tls;
    s.conn.timeout = opts.command_timeout;
    // Before any recipient is accepted nothing is lost by starting over, and a cached
    // connection that the server has since closed fails exactly here.
    let early = |e: ConnError| match e {
        ConnError::Io(_) if reused => HostError::Stale(e.cause(host)),
        e => HostError::Skip {
            cause: e.cause(host),
        },
    };

    // RFC 2920, as Postfix's client does: with PIPELINING, MAIL, every RCPT and DATA go
    // out in one write and their replies are read in order, two round trips a message
    // (this group, then the text) instead of three plus one per recipient.
    let pipelined = offers(&s.keywords, "PIPELINING");
    let (text, body_8bit) = match msg.text_for(&s.keywords, host) {
        Ok(t) => t,
        Err(cause) => {
            spawn_quit(s.conn);
            return Err(HostError::Fatal { cause, tls });
        }
    };
    let dsn = offers(&s.keywords, "DSN");
    let mail_line = mail_command(&s.keywords, msg.envelope, text.len(), body_8bit);
    let rcpt_lines: Vec<String> = msg
        .envelope
        .rcpts
        .iter()
        .map(|r| rcpt_command(r, dsn))
        .collect();
    if pipelined {
        let mut group = String::new();
        for line in std::iter::once(&mail_line).chain(&rcpt_lines) {
            group.push_str(line);
            group.push_str("\r\n");
        }
        group.push_str("DATA\r\n");
        s.conn
            .write(group.as_bytes(), "to MAIL FROM")
            .await
            .map_err(early)?;
    }
    let mail = s
        .conn
        .answer(pipelined, &mail_line, "to MAIL FROM")
        .await
        .map_err(early)?;
    if reused && mail.code == 421 {
        return Err(HostError::Stale(FailureCause::Reply(mail)));
    }
    match mail.outcome() {
        Outcome::Delivered => {}
        Outcome::Permanent => {
            spawn_quit(s.conn);
            return Err(HostError::Fatal {
                cause: FailureCause::Reply(mail),
                tls,
            });
        }
        Outcome::Temporary => {
            spawn_quit(s.conn);
            return Err(HostError::Skip {
                cause: FailureCause::Reply(mail),
            });
        }
    }

    // None = accepted, waiting for the DATA verdict.
    let mut statuses: Vec<Option<RcptStatus>> = Vec::with_capacity(msg.rcpts.len());
    // A server announcing it is closing (421) is never given another transaction.
    let mut closing = false;
    for line in &rcpt_lines {
        let none_accepted = statuses.iter().all(Option::is_some);
        let sent = s.conn.answer(pipelined, line, "to RCPT TO").await;
        let reply = match sent {
            Ok(reply) => reply,
            Err(e) if none_accepted => return Err(early(e)),
            Err(e) => {
                return Err(HostError::Skip {
                    cause: e.cause(host),
                })
            }
        };
        if reply.code == 421 {
            if reused && none_accepted {
                return Err(HostError::Stale(FailureCause::Reply(reply)));
            }
            closing = true;
        }
        statuses.push(match reply.outcome() {
            Outcome::Delivered => None,
            _ => Some(RcptStatus::failed(FailureCause::Reply(reply))),
        });
    }
    let keep = !closing && limits.is_some_and(|l| l.reusable(&s, 1));

    if statuses.iter().all(Option::is_some) {
        // A pipelined DATA still has its answer coming: normally a refusal (no valid
        // recipients). A server that said 354 all the same waits for a text that is not
        // coming: that connection is closed without a dot, so no empty message goes out.
        let data = if pipelined {
            Some(s.conn.read_reply("to DATA").await)
        } else {
            None
        };
        let ending = match data {
            Some(Ok(r)) if r.code == 354 => Err(()),
            Some(Err(_)) => Err(()),
            // No transaction was completed: RSET so the connection is clean for the next.
            _ if keep => match s.conn.command("RSET", "to RSET").await {
                Ok(r) => Ok(r.outcome() == Outcome::Delivered),
                Err(_) => Err(()),
            },
            _ => Ok(false),
        };
        let kept = s.settle(ending);
        return Ok((
            SessionResult {
                statuses: statuses.into_iter().flatten().collect(),
                tls,
                dsn,
            },
            kept,
        ));
    }

    // From here on the server may have the message: a failure no longer moves to the
    // next host but leaves the accepted recipients temporarily failed. The flag says
    // whether the reply is the one to the final dot.
    let verdict: Result<(SmtpReply, bool), ConnError> = async {
        let go = s.conn.answer(pipelined, "DATA", "to DATA").await?;
        if go.code != 354 {
            return Ok((go, false));
        }
        if !msg.go_ahead.given() {
            // The lease was lost while we talked: hang up without the text (the server
            // discards a transaction whose DATA never ends).
            return Err(ConnError::Local(
                "the lease on this message was lost; not sent".into(),
            ));
        }
        s.conn
            .write(&data_payload(text), "while sending the message")
            .await?;
        let reply = s
            .conn
            .read_reply_within(opts.data_timeout, "after the final dot")
            .await?;
        Ok((reply, true))
    }
    .await;
    let accepted_status = match &verdict {
        Ok((reply, _)) if reply.outcome() == Outcome::Delivered && reply.code != 354 => {
            RcptStatus::Delivered {
                reply: reply.clone(),
            }
        }
        Ok((reply, _)) if reply.code == 354 => {
            RcptStatus::failed(FailureCause::Protocol(format!("{host}: unexpected 354")))
        }
        Ok((reply, _)) => RcptStatus::failed(FailureCause::Reply(reply.clone())),
        Err(e) => RcptStatus::failed(e.cause(host)),
    };
    let kept = s.settle(match &verdict {
        Ok((reply, after_dot)) => Ok(keep && *after_dot && reply.outcome() == Outcome::Delivered),
        Err(_) => Err(()),
    });
    Ok((
        SessionResult {
            statuses: statuses
                .into_iter()
                .map(|st| st.unwrap_or_else(|| accepted_status.clone()))
                .collect(),
            tls,
            dsn,
        },
        kept,
    ))
}

/// Whether a server's EHLO `keywords` (upper case) include `extension`.
fn offers(keywords: &[String], extension: &str) -> bool {
    keywords.iter().any(|k| k == extension)
}

/// `MAIL FROM` for `envelope` to a server offering `keywords`: `SIZE` of the text as
/// sent, `BODY=8BITMIME` for 8-bit text, `SMTPUTF8` and the DSN parameters as the client
/// gave them, each only where the server offers its extension (RFC 1870, 6152, 6531,
/// 3461 §4).
fn mail_command(keywords: &[String], envelope: &Envelope, size: usize, body_8bit: bool) -> String {
    let mut line = format!("MAIL FROM:<{}>", envelope.sender);
    if offers(keywords, "SIZE") {
        line.push_str(&format!(" SIZE={size}"));
    }
    if body_8bit {
        line.push_str(" BODY=8BITMIME");
    }
    if envelope.smtputf8 && offers(keywords, "SMTPUTF8") {
        line.push_str(" SMTPUTF8");
    }
    if offers(keywords, "DSN") {
        if let Some(ret) = &envelope.ret {
            line.push_str(&format!(" RET={ret}"));
        }
        if let Some(envid) = &envelope.envid {
            line.push_str(&format!(" ENVID={envid}"));
        }
    }
    line
}

/// `RCPT TO` for `rcpt`, with its `NOTIFY` and `ORCPT` when the server offers DSN.
fn rcpt_command(rcpt: &EnvelopeRcpt, dsn: bool) -> String {
    let mut line = format!("RCPT TO:<{}>", rcpt.address);
    if dsn {
        if let Some(notify) = &rcpt.notify {
            line.push_str(&format!(" NOTIFY={notify}"));
        }
        if let Some(orcpt) = &rcpt.orcpt {
            line.push_str(&format!(" ORCPT={orcpt}"));
        }
    }
    line
}

/// `smtp_connection_cache_time_limit` (Postfix default 2 s): how long a connection may
/// sit idle in the cache before it is closed with QUIT.
pub const CONNECTION_CACHE_TIME_LIMIT: Duration = Duration::from_secs(2);

/// `smtp_connection_reuse_time_limit` (Postfix default 300 s): a connection older than
/// this (counted from when it was opened) is not given another transaction.
pub const CONNECTION_REUSE_TIME_LIMIT: Duration = Duration::from_secs(300);

/// `smtp_connection_reuse_count_limit`: how many transactions one connection carries at
/// most. Postfix's default (0) means no limit; erlmail stops at 100 so that a long run
/// to one hop still moves to new connections now and then.
pub const CONNECTION_REUSE_COUNT_LIMIT: u32 = 100;

/// Idle connections kept per host address and TLS mode. Postfix bounds these through
/// the per-destination concurrency (`default_destination_concurrency_limit`, 20); this
/// is the cache's own cap, a little above that.
pub const CONNECTION_CACHE_PER_HOP: usize = 32;

/// The limits a `ConnectionCache` applies. `Default` gives the Postfix-like constants
/// above; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Longest idle time in the cache (`CONNECTION_CACHE_TIME_LIMIT`).
    pub idle_time: Duration,
    /// Longest time since the connection was opened for it to be reused
    /// (`CONNECTION_REUSE_TIME_LIMIT`).
    pub reuse_time: Duration,
    /// Most transactions per connection (`CONNECTION_REUSE_COUNT_LIMIT`).
    pub reuse_count: u32,
    /// Most idle connections per host address and TLS mode (`CONNECTION_CACHE_PER_HOP`);
    /// 0 turns caching off.
    pub per_hop: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            idle_time: CONNECTION_CACHE_TIME_LIMIT,
            reuse_time: CONNECTION_REUSE_TIME_LIMIT,
            reuse_count: CONNECTION_REUSE_COUNT_LIMIT,
            per_hop: CONNECTION_CACHE_PER_HOP,
        }
    }
}

impl CacheLimits {
    /// Whether `s`, after `more` further transactions, may still carry another.
    fn reusable(&self, s: &Session, more: u32) -> bool {
        self.per_hop > 0
            && s.transactions.saturating_add(more) < self.reuse_count
            && s.opened.elapsed() < self.reuse_time
    }
}

/// What idle connections are filed under: the host's address and whether TLS was
/// wanted (a connection that wanted TLS but was not offered it is plain, yet it is what
/// a later delivery wanting TLS would get from that host anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CacheKey {
    addr: SocketAddr,
    tls: bool,
}

/// One idle connection and since when it is idle.
struct Idle {
    session: Session,
    since: Instant,
}

/// Idle SMTP connections ready for another transaction, per host address (Postfix's
/// `scache`). One lives in each `Router`, so a configuration reload starts a new one.
/// Idle connections are QUIT by a background task once `CacheLimits::idle_time` has
/// passed, and when the cache is dropped.
pub struct ConnectionCache {
    shared: Arc<CacheShared>,
}

struct CacheShared {
    limits: CacheLimits,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Per key, oldest idle first: taking from the back reuses the most recently used
    /// connection (the least likely to have been timed out by the server), and the
    /// reaper expires from the front.
    idle: HashMap<CacheKey, VecDeque<Idle>>,
    /// The task closing expired connections, while there are any to watch.
    reaper: Option<JoinHandle<()>>,
}

impl Default for ConnectionCache {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ConnectionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionCache")
            .field("limits", &self.shared.limits)
            .field("idle", &self.idle())
            .finish()
    }
}

impl ConnectionCache {
    /// An empty cache with the Postfix-like limits.
    pub fn new() -> Self {
        Self::with_limits(CacheLimits::default())
    }

    /// An empty cache with the given limits.
    pub fn with_limits(limits: CacheLimits) -> Self {
        ConnectionCache {
            shared: Arc::new(CacheShared {
                limits,
                state: Mutex::new(CacheState::default()),
            }),
        }
    }

    /// The limits it applies.
    pub fn limits(&self) -> CacheLimits {
        self.shared.limits
    }

    /// How many idle connections it holds right now.
    pub fn idle(&self) -> usize {
        self.shared.lock().idle.values().map(VecDeque::len).sum()
    }

    /// Closes every idle connection (QUIT in the background).
    pub fn clear(&self) {
        let drained: Vec<Idle> = {
            let mut st = self.shared.lock();
            st.idle.drain().flat_map(|(_, q)| q).collect()
        };
        for e in drained {
            spawn_quit(e.session.conn);
        }
    }

    /// A live idle connection for `key` greeted as `helo`, most recently used first.
    /// Connections past their limits, greeted under another name, not under TLS when TLS
    /// is required, or found closed by the server are closed on the way.
    fn take(&self, key: CacheKey, helo: &str, require_tls: bool) -> Option<Session> {
        let limits = self.shared.limits;
        loop {
            let idle = {
                let mut st = self.shared.lock();
                let q = st.idle.get_mut(&key)?;
                let idle = q.pop_back();
                if q.is_empty() {
                    st.idle.remove(&key);
                }
                idle?
            };
            let Idle { mut session, since } = idle;
            let fits = since.elapsed() < limits.idle_time
                && limits.reusable(&session, 0)
                && session.helo == helo
                && (session.tls || !require_tls);
            if !fits {
                spawn_quit(session.conn);
                continue;
            }
            if !session.conn.still_open() {
                // Closed or talking out of turn: nothing worth a QUIT.
                continue;
            }
            return Some(session);
        }
    }

    /// Files a session that ended its transaction cleanly, or closes it when its limits
    /// are reached or it has unread data. Past the per-hop cap the oldest idle
    /// connection of that key is closed.
    fn put(&self, key: CacheKey, session: Session) {
        let limits = self.shared.limits;
        if !limits.reusable(&session, 0) || !session.conn.io.buffer().is_empty() {
            spawn_quit(session.conn);
            return;
        }
        let evicted = {
            let mut st = self.shared.lock();
            let q = st.idle.entry(key).or_default();
            q.push_back(Idle {
                session,
                since: Instant::now(),
            });
            let evicted = if q.len() > limits.per_hop {
                q.pop_front()
            } else {
                None
            };
            if st.reaper.as_ref().is_none_or(JoinHandle::is_finished) {
                let weak = Arc::downgrade(&self.shared);
                st.reaper = Some(tokio::spawn(reap(weak)));
            }
            evicted
        };
        if let Some(e) = evicted {
            spawn_quit(e.session.conn);
        }
    }
}

impl CacheShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // The state stays consistent across a panic elsewhere: every change is one
        // push or pop.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for CacheShared {
    /// The router is going away (shutdown, reload): QUIT whatever is idle, when there
    /// is a runtime to do it on; otherwise the connections just close.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(reaper) = st.reaper.take() {
            reaper.abort();
        }
        let drained: Vec<Idle> = st.idle.drain().flat_map(|(_, q)| q).collect();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for e in drained {
                rt.spawn(e.session.conn.quit());
            }
        }
    }
}

/// The reaper: sleeps until the oldest idle connection's time is up, closes every
/// expired one, and ends when nothing is left to watch (the next `put` starts a new
/// one) or the cache is gone. It holds the cache only while sweeping.
async fn reap(cache: Weak<CacheShared>) {
    loop {
        let Some(shared) = cache.upgrade() else {
            return;
        };
        let limit = shared.limits.idle_time;
        let now = Instant::now();
        let mut expired = Vec::new();
        let next = {
            let mut st = shared.lock();
            st.idle.retain(|_, q| {
                while q.front().is_some_and(|e| e.since + limit <= now) {
                    expired.extend(q.pop_front());
                }
                !q.is_empty()
            });
            // Every queue is oldest first, so its front expires first.
            let next = st
                .idle
                .values()
                .filter_map(VecDeque::front)
                .map(|e| e.since + limit)
                .min();
            if next.is_none() {
                st.reaper = None;
            }
            next
        };
        drop(shared);
        for e in expired {
            spawn_quit(e.session.conn);
        }
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    const HELO: &str = "erlmail.test";

    fn key() -> CacheKey {
        CacheKey {
            addr: "127.0.0.1:2525".parse().unwrap(),
            tls: false,
        }
    }

    /// A session over an in-memory pipe: what the client writes, `peer` reads.
    fn session(transactions: u32) -> (Session, DuplexStream) {
        let (ours, peer) = duplex(4096);
        let s = Session {
            conn: Conn {
                io: BufReader::new(Box::new(ours) as Box<dyn Io>),
                timeout: Duration::from_secs(5),
            },
            tls: false,
            keywords: vec!["PIPELINING".into()],
            helo: HELO.into(),
            opened: Instant::now(),
            transactions,
        };
        (s, peer)
    }

    /// The next line the peer receives ("" at EOF), waiting at most 20 s.
    async fn line(peer: &mut DuplexStream) -> String {
        let mut buf = Vec::new();
        let mut reader = BufReader::new(peer);
        tokio::time::timeout(Duration::from_secs(20), reader.read_until(b'\n', &mut buf))
            .await
            .expect("a line or EOF in time")
            .expect("read");
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn idle_connections_are_quit_after_the_idle_time() {
        let limits = CacheLimits {
            idle_time: Duration::from_millis(200),
            ..CacheLimits::default()
        };
        let cache = ConnectionCache::with_limits(limits);
        // Twice: the reaper ends when the cache empties and the next put starts another.
        for _ in 0..2 {
            let (s, mut peer) = session(1);
            let put_at = Instant::now();
            cache.put(key(), s);
            assert_eq!(cache.idle(), 1);
            assert_eq!(line(&mut peer).await, "QUIT\r\n");
            assert!(put_at.elapsed() >= limits.idle_time);
            assert_eq!(cache.idle(), 0);
        }
    }

    #[tokio::test]
    async fn take_passes_over_closed_and_talking_connections() {
        let cache = ConnectionCache::new();
        let (live, mut live_peer) = session(1);
        let (talking, mut talking_peer) = session(1);
        let (closed, closed_peer) = session(1);
        // Taken newest first: closed, then talking, then live.
        cache.put(key(), live);
        cache.put(key(), talking);
        cache.put(key(), closed);
        drop(closed_peer);
        talking_peer
            .write_all(b"421 4.4.2 idle too long\r\n")
            .await
            .unwrap();
        let mut s = cache.take(key(), HELO, false).expect("the live connection");
        assert_eq!(cache.idle(), 0);
        s.conn.write(b"NOOP\r\n", "test").await.unwrap();
        assert_eq!(line(&mut live_peer).await, "NOOP\r\n");
        assert!(cache.take(key(), HELO, false).is_none());
        // The other mode and another address have nothing.
        cache.put(key(), s);
        let tls_key = CacheKey { tls: true, ..key() };
        assert!(cache.take(tls_key, HELO, false).is_none());
        assert_eq!(cache.idle(), 1);
    }

    #[tokio::test]
    async fn take_refuses_another_name_or_plain_text_when_tls_is_required() {
        let cache = ConnectionCache::new();
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        assert!(cache.take(key(), HELO, true).is_none());
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        assert!(cache.take(key(), "other.test", false).is_none());
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        assert_eq!(cache.idle(), 0);
    }

    #[tokio::test]
    async fn limits_close_instead_of_caching() {
        let limits = CacheLimits {
            reuse_count: 3,
            per_hop: 2,
            ..CacheLimits::default()
        };
        let cache = ConnectionCache::with_limits(limits);
        // At the transaction limit: closed at once.
        let (s, mut peer) = session(3);
        cache.put(key(), s);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        assert_eq!(cache.idle(), 0);
        // Past the per-hop cap the oldest goes.
        let (a, mut peer_a) = session(1);
        let (b, _peer_b) = session(1);
        let (c, _peer_c) = session(1);
        cache.put(key(), a);
        cache.put(key(), b);
        cache.put(key(), c);
        assert_eq!(cache.idle(), 2);
        assert_eq!(line(&mut peer_a).await, "QUIT\r\n");
        // Too old to reuse: closed rather than cached.
        let old = ConnectionCache::with_limits(CacheLimits {
            reuse_time: Duration::ZERO,
            ..CacheLimits::default()
        });
        let (s, mut peer) = session(1);
        old.put(key(), s);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        assert_eq!(old.idle(), 0);
        let (s, _) = session(1);
        assert!(limits.reusable(&s, 1));
        assert!(!limits.reusable(&s, 2));
    }

    #[tokio::test]
    async fn dropping_the_cache_quits_its_connections() {
        let cache = ConnectionCache::new();
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        drop(cache);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        let cache = ConnectionCache::new();
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        cache.clear();
        assert_eq!(cache.idle(), 0);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
    }
}
