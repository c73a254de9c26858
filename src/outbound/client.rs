//! The SMTP client dialogue for one message and one next hop: try each host in order
//! (refused connections, 4xx/5xx greetings and session-level 4xx move on to the next
//! host), EHLO as `server_smtp_name` (HELO if EHLO is refused), opportunistic STARTTLS
//! (certificates not verified, as Postfix's `may` level; a failed handshake retries that
//! host in plain text), `MAIL FROM`, one `RCPT TO` per recipient with its own result,
//! and DATA only when some recipient was accepted.
//!
//! Written directly over tokio rather than through mail-send's `SmtpClient`, whose
//! `write_message` does not stuff a dot on the first line and adds a blank line before
//! the terminator, and whose reader drops bytes after a reply; mail-send still provides
//! the certificate-ignoring TLS connector.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::wire::{data_payload, ehlo_keywords, Fed, ReplyBuilder, MAX_REPLY_LINE};
use crate::queue::outcome::{FailureCause, Outcome, RcptStatus, SmtpReply};

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
}

impl DeliveryOptions {
    /// Every timeout set to `timeout` (`server_smtp_timeout`), STARTTLS on.
    pub fn with_timeout(timeout: Duration) -> Self {
        DeliveryOptions {
            connect_timeout: timeout,
            command_timeout: timeout,
            data_timeout: timeout,
            starttls: true,
            require_tls: false,
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
pub async fn deliver(
    hops: &[Hop],
    helo: &str,
    sender: &str,
    rcpts: &[String],
    body: &[u8],
    opts: &DeliveryOptions,
) -> DeliveryReport {
    let mut skipped = Vec::new();
    for hop in hops {
        let mut use_tls = opts.starttls;
        loop {
            match session(hop, helo, sender, rcpts, body, opts, use_tls).await {
                Ok(s) => return s.into_report(hop, rcpts, skipped),
                Err(HostError::TlsFailed(cause)) if use_tls && !opts.require_tls => {
                    tracing::info!(host = %hop.host, addr = %hop.addr, %cause, "TLS failed; retrying in plain text");
                    use_tls = false;
                }
                Err(HostError::Fatal { cause, tls }) => {
                    // The server refused the sender itself: all recipients fail alike.
                    let results = rcpts
                        .iter()
                        .map(|r| RcptResult {
                            rcpt: r.clone(),
                            status: RcptStatus::failed(cause.clone()),
                            remote_mta: Some(hop.host.clone()),
                            remote_addr: Some(hop.addr),
                            tls,
                        })
                        .collect();
                    return DeliveryReport {
                        results,
                        remote: Some(hop.clone()),
                        tls,
                        skipped,
                    };
                }
                Err(HostError::Skip { cause, .. } | HostError::TlsFailed(cause)) => {
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
        })
        .collect();
    DeliveryReport {
        results,
        remote: None,
        tls: false,
        skipped,
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
}

/// The per-recipient statuses a session decided.
struct SessionResult {
    statuses: Vec<RcptStatus>,
    tls: bool,
}

impl SessionResult {
    fn into_report(
        self,
        hop: &Hop,
        rcpts: &[String],
        skipped: Vec<(Hop, FailureCause)>,
    ) -> DeliveryReport {
        let tls = self.tls;
        let results = rcpts
            .iter()
            .zip(self.statuses)
            .map(|(r, status)| RcptResult {
                rcpt: r.clone(),
                status,
                remote_mta: Some(hop.host.clone()),
                remote_addr: Some(hop.addr),
                tls,
            })
            .collect();
        DeliveryReport {
            results,
            remote: Some(hop.clone()),
            tls,
            skipped,
        }
    }
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
}

impl ConnError {
    fn cause(&self, host: &str) -> FailureCause {
        match self {
            ConnError::Io(e) => FailureCause::Connection(format!("{host}: {e}")),
            ConnError::Timeout(stage) => {
                FailureCause::Timeout(format!("{host}: no answer {stage}"))
            }
            ConnError::Protocol(s) => FailureCause::Protocol(format!("{host}: {s}")),
        }
    }
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

/// EHLO, falling back to HELO when EHLO is refused; the keywords offered (none after
/// HELO).
async fn greet(conn: &mut Conn, helo: &str) -> Result<Result<Vec<String>, SmtpReply>, ConnError> {
    let ehlo = conn.command(&format!("EHLO {helo}"), "to EHLO").await?;
    if ehlo.outcome() == Outcome::Delivered {
        return Ok(Ok(ehlo_keywords(&ehlo)));
    }
    let helo_reply = conn.command(&format!("HELO {helo}"), "to HELO").await?;
    if helo_reply.outcome() == Outcome::Delivered {
        Ok(Ok(Vec::new()))
    } else {
        Ok(Err(helo_reply))
    }
}

/// One session with one host.
#[allow(clippy::too_many_arguments)]
async fn session(
    hop: &Hop,
    helo: &str,
    sender: &str,
    rcpts: &[String],
    body: &[u8],
    opts: &DeliveryOptions,
    use_tls: bool,
) -> Result<SessionResult, HostError> {
    let host = hop.host.as_str();
    let skip = |e: ConnError| HostError::Skip {
        cause: e.cause(host),
    };
    let tcp = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(hop.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(skip(ConnError::Io(e))),
        Err(_) => return Err(skip(ConnError::Timeout("to connect"))),
    };
    let mut conn = Conn {
        io: BufReader::new(Box::new(tcp) as Box<dyn Io>),
        timeout: opts.command_timeout,
    };

    let greeting = conn.read_reply("to the greeting").await.map_err(skip)?;
    if greeting.outcome() != Outcome::Delivered {
        conn.quit().await;
        return Err(HostError::Skip {
            cause: FailureCause::Reply(greeting),
        });
    }
    let keywords = match greet(&mut conn, helo).await.map_err(skip)? {
        Ok(k) => k,
        Err(reply) => {
            conn.quit().await;
            return Err(HostError::Skip {
                cause: FailureCause::Reply(reply),
            });
        }
    };

    let mut tls = false;
    let connector = if use_tls && keywords.iter().any(|k| k == "STARTTLS") {
        tls_connector()
    } else {
        None
    };
    if opts.require_tls && connector.is_none() {
        conn.quit().await;
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
            match greet(&mut conn, helo).await.map_err(skip)? {
                Ok(_) => {}
                Err(reply) => {
                    conn.quit().await;
                    return Err(HostError::Skip {
                        cause: FailureCause::Reply(reply),
                    });
                }
            };
        }
        // Otherwise STARTTLS was refused: carry on in plain text, as Postfix's `may`
        // does, unless TLS is required.
        if !tls && opts.require_tls {
            conn.quit().await;
            return Err(HostError::Skip {
                cause: FailureCause::Connection(format!(
                    "{host}: TLS required but STARTTLS refused: {}",
                    reply.one_line()
                )),
            });
        }
    }

    let mail = conn
        .command(&format!("MAIL FROM:<{sender}>"), "to MAIL FROM")
        .await
        .map_err(skip)?;
    match mail.outcome() {
        Outcome::Delivered => {}
        Outcome::Permanent => {
            conn.quit().await;
            return Err(HostError::Fatal {
                cause: FailureCause::Reply(mail),
                tls,
            });
        }
        Outcome::Temporary => {
            conn.quit().await;
            return Err(HostError::Skip {
                cause: FailureCause::Reply(mail),
            });
        }
    }

    // None = accepted, waiting for the DATA verdict.
    let mut statuses: Vec<Option<RcptStatus>> = Vec::with_capacity(rcpts.len());
    for rcpt in rcpts {
        let reply = conn
            .command(&format!("RCPT TO:<{rcpt}>"), "to RCPT TO")
            .await
            .map_err(skip)?;
        statuses.push(match reply.outcome() {
            Outcome::Delivered => None,
            _ => Some(RcptStatus::failed(FailureCause::Reply(reply))),
        });
    }

    if statuses.iter().all(Option::is_some) {
        conn.quit().await;
        return Ok(SessionResult {
            statuses: statuses.into_iter().flatten().collect(),
            tls,
        });
    }

    // From here on the server may have the message: a failure no longer moves to the
    // next host but leaves the accepted recipients temporarily failed.
    let verdict: Result<SmtpReply, ConnError> = async {
        let go = conn.command("DATA", "to DATA").await?;
        if go.code != 354 {
            return Ok(go);
        }
        conn.write(&data_payload(body), "while sending the message")
            .await?;
        conn.read_reply_within(opts.data_timeout, "after the final dot")
            .await
    }
    .await;
    let accepted_status = match &verdict {
        Ok(reply) if reply.outcome() == Outcome::Delivered && reply.code != 354 => {
            RcptStatus::Delivered {
                reply: reply.clone(),
            }
        }
        Ok(reply) if reply.code == 354 => {
            RcptStatus::failed(FailureCause::Protocol(format!("{host}: unexpected 354")))
        }
        Ok(reply) => RcptStatus::failed(FailureCause::Reply(reply.clone())),
        Err(e) => RcptStatus::failed(e.cause(host)),
    };
    if verdict.is_ok() {
        conn.quit().await;
    }
    Ok(SessionResult {
        statuses: statuses
            .into_iter()
            .map(|s| s.unwrap_or_else(|| accepted_status.clone()))
            .collect(),
        tls,
    })
}
