//! One SMTP connection to one host: connect, read the greeting, EHLO (HELO if EHLO is
//! refused), opportunistic STARTTLS (certificates not verified, as Postfix's `may`
//! level, through mail-send's TLS connector), reading replies within their timeouts,
//! and QUIT. `open` hands back a `Session` ready for `MAIL FROM`; what is said in
//! a transaction is the dialogue's business, and whether a connection is kept the
//! cache's.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::wire::{ehlo_keywords, offers, Fed, ReplyBuilder, MAX_REPLY_LINE};
use crate::protocol::Reply;
use crate::queue::outcome::FailureCause;

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
            ..Self::with_timeout(Duration::ZERO)
        }
    }
}

/// How a session with one host ended without deciding the recipients.
pub(super) enum HostError {
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

/// Anything the connection can be: plain TCP or TLS over it.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a read or write on the connection failed.
#[derive(Debug)]
pub(super) enum ConnError {
    Io(std::io::Error),
    Timeout(&'static str),
    Protocol(String),
    /// We chose to stop (the go-ahead was withdrawn).
    Local(String),
}

impl ConnError {
    pub(super) fn cause(&self, host: &str) -> FailureCause {
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
pub(super) struct Conn {
    io: BufReader<Box<dyn Io>>,
    pub(super) timeout: Duration,
}

impl Conn {
    pub(super) fn new(io: Box<dyn Io>, timeout: Duration) -> Self {
        Conn {
            io: BufReader::new(io),
            timeout,
        }
    }

    /// Whether the server has sent bytes nobody has read yet.
    pub(super) fn buffered(&self) -> bool {
        !self.io.buffer().is_empty()
    }

    pub(super) async fn read_reply_within(
        &mut self, limit: Duration, stage: &'static str,
    ) -> Result<Reply, ConnError> {
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

    pub(super) async fn read_reply(&mut self, stage: &'static str) -> Result<Reply, ConnError> {
        self.read_reply_within(self.timeout, stage).await
    }

    pub(super) async fn write(
        &mut self, bytes: &[u8], stage: &'static str,
    ) -> Result<(), ConnError> {
        tokio::time::timeout(self.timeout, async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| ConnError::Timeout(stage))?
        .map_err(ConnError::Io)
    }

    pub(super) async fn command(
        &mut self, line: &str, stage: &'static str,
    ) -> Result<Reply, ConnError> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.read_reply(stage).await
    }

    /// The reply to `line`: sent already in a pipelined group (`sent`), or sent now.
    pub(super) async fn answer(
        &mut self, sent: bool, line: &str, stage: &'static str,
    ) -> Result<Reply, ConnError> {
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
    pub(super) fn still_open(&mut self) -> bool {
        if self.buffered() {
            return false;
        }
        // Pending means no data and no EOF yet: the only good answer.
        self.io.fill_buf().now_or_never().is_none()
    }

    /// QUIT politely, without caring how it goes: the results are already decided.
    pub(super) async fn quit(mut self) {
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
pub(super) fn spawn_quit(conn: Conn) {
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

/// EHLO, falling back to HELO when EHLO is refused: the connection back with the
/// keywords offered (none after HELO), or why this host is not to be used.
async fn greet(
    mut conn: Conn, helo: &str, me: &str, host: &str,
) -> Result<(Conn, Vec<String>), HostError> {
    let skip = |e: ConnError| HostError::Skip {
        cause: e.cause(host),
    };
    let ehlo = conn
        .command(&format!("EHLO {helo}"), "to EHLO")
        .await
        .map_err(skip)?;
    if ehlo.is_positive() {
        if names_me(&ehlo, me) {
            return Err(looping(conn, host));
        }
        let keywords = ehlo_keywords(&ehlo);
        return Ok((conn, keywords));
    }
    let helo_reply = conn
        .command(&format!("HELO {helo}"), "to HELO")
        .await
        .map_err(skip)?;
    if helo_reply.is_positive() {
        Ok((conn, Vec::new()))
    } else {
        Err(give_up(conn, FailureCause::Reply(helo_reply)))
    }
}

/// Move on to the next host for `cause`, QUITting this one in the background.
fn give_up(conn: Conn, cause: FailureCause) -> HostError {
    spawn_quit(conn);
    HostError::Skip { cause }
}

/// A next hop that is this host (a stale MX, a route or relay host pointing back here)
/// fails the mail at once rather than pass it round until the hop limit.
fn looping(conn: Conn, host: &str) -> HostError {
    spawn_quit(conn);
    HostError::Fatal {
        cause: FailureCause::Loop(host.to_string()),
        tls: false,
    }
}

/// Whether a server's greeting or EHLO reply begins with our own name `me`
/// (`server_smtp_name`): the next hop is this host, and the mail would loop.
fn names_me(reply: &Reply, me: &str) -> bool {
    let me = me.trim_end_matches('.');
    reply
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .is_some_and(|name| name.trim_end_matches('.').eq_ignore_ascii_case(me))
}

/// A connection past its greeting, EHLO and (when wanted and offered) STARTTLS: ready
/// for `MAIL FROM`, whether just opened or taken from the cache.
pub(super) struct Session {
    pub(super) conn: Conn,
    /// Whether it runs over TLS.
    pub(super) tls: bool,
    /// What the server offered in its (last) EHLO reply; kept with the connection so a
    /// reuse knows it without asking again.
    pub(super) keywords: Vec<String>,
    /// The name it greeted the server with: a connection is only reused under that name.
    pub(super) helo: String,
    /// When the TCP connection was made (`smtp_connection_reuse_time_limit` counts from
    /// here).
    pub(super) opened: Instant,
    /// Transactions it completed cleanly (`smtp_connection_reuse_count_limit`).
    pub(super) transactions: u32,
}

impl Session {
    /// What becomes of the connection after a transaction: `Ok(true)`, ended cleanly, it
    /// is kept for the next one; `Ok(false)`, the server answered but the connection is
    /// not to be reused, it is QUIT in the background; `Err(())`, its state is unknown
    /// (a read or write failed), it is just closed.
    pub(super) fn settle(mut self, ending: Result<bool, ()>) -> Option<Session> {
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
pub(super) async fn open(
    hop: &Hop, helo: &str, opts: &DeliveryOptions, use_tls: bool,
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
    let mut conn = Conn::new(Box::new(tcp), opts.command_timeout);

    let greeting = conn.read_reply("to the greeting").await.map_err(skip)?;
    if !greeting.is_positive() {
        return Err(give_up(conn, FailureCause::Reply(greeting)));
    }
    // This host's name: `server_smtp_name`, which the EHLO name may differ from.
    let me = opts.own_name.as_deref().unwrap_or(helo);
    if names_me(&greeting, me) {
        return Err(looping(conn, host));
    }
    let (mut conn, mut keywords) = greet(conn, helo, me, host).await?;

    let mut tls = false;
    let connector = if use_tls && offers(&keywords, "STARTTLS") {
        tls_connector()
    } else {
        None
    };
    if opts.require_tls && connector.is_none() {
        let cause = format!("{host}: TLS required but STARTTLS not offered");
        return Err(give_up(conn, FailureCause::Connection(cause)));
    }
    if let Some(connector) = connector {
        let reply = conn
            .command("STARTTLS", "to STARTTLS")
            .await
            .map_err(skip)?;
        if reply.code == 220 {
            // Bytes already buffered after the 220 would be read as if they came over
            // TLS: a STARTTLS injection. Refuse the host rather than trust them.
            if conn.buffered() {
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
            let secured = Conn::new(Box::new(stream), opts.command_timeout);
            (conn, keywords) = greet(secured, helo, me, host).await?;
            tls = true;
        }
        // Otherwise STARTTLS was refused: carry on in plain text, as Postfix's `may`
        // does, unless TLS is required.
        if !tls && opts.require_tls {
            let cause = format!(
                "{host}: TLS required but STARTTLS refused: {}",
                reply.one_line()
            );
            return Err(give_up(conn, FailureCause::Connection(cause)));
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
