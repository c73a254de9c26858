//! A scriptable SMTP sink for tests, on 127.0.0.1 (tokio). It records every message it
//! accepts (envelope, data with dot-stuffing undone, time, whether TLS was on) and every
//! transaction's verdict, and can be told how to answer:
//! - per recipient: by default a local part starting with `fail` gets
//!   `550 5.1.1 ... User unknown` and one starting with `defer` gets `450 4.2.0 ...`;
//!   `SinkConfig::rcpt_reply` adds rules;
//! - `defer_first: N`: the first N transactions get `451 4.3.0` after the final dot,
//!   later ones `250` (for retry tests);
//! - `greeting`: e.g. `421 4.3.2 busy` to refuse sessions;
//! - `starttls`: `Off`, `On` (self-signed certificate from rcgen) or `Broken`
//!   (advertises and accepts STARTTLS, then closes instead of a handshake).
//!
//! Use it from an integration test with `#[path = "support/sink.rs"] mod sink;` (and
//! `support/wire.rs` as `mod wire`, which it uses):
//!
//! ```ignore
//! let sink = sink::Sink::start(sink::SinkConfig::default()).await;
//! // ... deliver to sink.addr() ...
//! assert!(sink.wait_for(1, Duration::from_secs(10)).await);
//! let m = &sink.messages()[0];
//! ```
//!
//! The sink runs until dropped. `closed_addr()` gives a loopback address nobody
//! listens on (connections are refused).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How the sink treats STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTls {
    /// Not advertised.
    Off,
    /// Advertised and working (self-signed certificate).
    On,
    /// Advertised, answered 220, then the connection is closed: a failed handshake.
    Broken,
}

/// How the sink answers.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Host name in the greeting and EHLO reply.
    pub name: String,
    /// The whole greeting line; a non-2xx greeting closes the session after sending it.
    pub greeting: String,
    /// STARTTLS behaviour.
    pub starttls: StartTls,
    /// Rules for RCPT replies: (local-part prefix, full reply line). Checked in order,
    /// before the built-in `fail`/`defer` rules; the reply may contain `{rcpt}`.
    pub rcpt_rules: Vec<(String, String)>,
    /// The first N transactions that reach the final dot are answered with
    /// `defer_reply` instead of 250.
    pub defer_first: usize,
    /// The reply for deferred transactions.
    pub defer_reply: String,
    /// The reply to MAIL FROM (normally 250).
    pub mail_reply: String,
    /// EHLO keywords offered after PIPELINING, SIZE, STARTTLS and ENHANCEDSTATUSCODES
    /// (`8BITMIME` by default; add `DSN` or `SMTPUTF8`, or none for a 7-bit hop).
    pub extensions: Vec<String>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            name: "sink.test".into(),
            greeting: "220 sink.test ESMTP test sink".into(),
            starttls: StartTls::On,
            rcpt_rules: Vec::new(),
            defer_first: 0,
            defer_reply: "451 4.3.0 Error: try again later".into(),
            mail_reply: "250 2.1.0 Ok".into(),
            extensions: vec!["8BITMIME".into()],
        }
    }
}

impl SinkConfig {
    /// The default sink without STARTTLS (mail in plain text).
    pub fn plain() -> Self {
        SinkConfig::default().starttls(StartTls::Off)
    }

    /// Adds a RCPT rule: recipients whose local part starts with `prefix` get `reply`.
    pub fn rcpt_reply(mut self, prefix: &str, reply: &str) -> Self {
        self.rcpt_rules.push((prefix.into(), reply.into()));
        self
    }

    /// Uses `name` in the greeting and EHLO reply.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Greets with this whole line (see `greeting`).
    pub fn greeting(mut self, line: impl Into<String>) -> Self {
        self.greeting = line.into();
        self
    }

    /// Treats STARTTLS this way.
    pub fn starttls(mut self, mode: StartTls) -> Self {
        self.starttls = mode;
        self
    }

    /// Defers the first `n` transactions after the final dot (see `defer_first`).
    pub fn defer_first(mut self, n: usize) -> Self {
        self.defer_first = n;
        self
    }

    /// Answers MAIL FROM with `reply`.
    pub fn mail_reply(mut self, reply: impl Into<String>) -> Self {
        self.mail_reply = reply.into();
        self
    }

    /// Offers exactly these extensions besides the fixed ones (see `extensions`).
    pub fn offering(mut self, extensions: &[&str]) -> Self {
        self.extensions = extensions.iter().map(|e| e.to_string()).collect();
        self
    }
}

/// One accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// When the final dot arrived.
    pub at: DateTime<Utc>,
    /// The EHLO/HELO argument.
    pub helo: String,
    /// The MAIL FROM address (without angle brackets; empty for `<>`).
    pub mail_from: String,
    /// The accepted RCPT TO addresses.
    pub rcpts: Vec<String>,
    /// The message as sent, dot-stuffing undone, without the terminating `.CRLF`.
    pub data: Vec<u8>,
    /// Whether the session was under TLS.
    pub tls: bool,
}

/// One transaction that reached the final dot, accepted or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// When the final dot arrived.
    pub at: DateTime<Utc>,
    /// The MAIL FROM address.
    pub mail_from: String,
    /// The accepted recipients.
    pub rcpts: Vec<String>,
    /// The reply code given after the dot (250, or the defer code).
    pub code: u16,
}

#[derive(Default)]
struct State {
    messages: Vec<Received>,
    transactions: Vec<Transaction>,
    connections: usize,
    commands: Vec<String>,
}

struct Shared {
    config: SinkConfig,
    state: Mutex<State>,
    changed: Notify,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A running sink.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Sink {
    /// Starts a sink on 127.0.0.1:<ephemeral>.
    pub async fn start(config: SinkConfig) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        Self::serve_on(listener, config)
    }

    /// Two sinks on the same port, one on 127.0.0.1 and one on ::1: MX deliveries all
    /// use one port (`server_smtp_remote_port`), so two MX hosts on loopback differ only
    /// by address family. Returns (IPv4 sink, IPv6 sink).
    pub async fn start_pair(v4: SinkConfig, v6: SinkConfig) -> (Sink, Sink) {
        loop {
            let l4 = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
            let port = l4.local_addr().unwrap().port();
            if let Ok(l6) = TcpListener::bind(("::1", port)).await {
                return (Self::serve_on(l4, v4), Self::serve_on(l6, v6));
            }
        }
    }

    fn serve_on(listener: TcpListener, config: SinkConfig) -> Sink {
        let addr = listener.local_addr().unwrap();
        let tls = (config.starttls == StartTls::On).then(acceptor);
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            tls,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                s.state.lock().unwrap().connections += 1;
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(Box::new(stream), s).await;
                });
            }
        });
        Sink { addr, shared, task }
    }

    /// The sink's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The sink's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every accepted message so far, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        self.shared.state.lock().unwrap().messages.clone()
    }

    /// How many messages were accepted.
    pub fn count(&self) -> usize {
        self.shared.state.lock().unwrap().messages.len()
    }

    /// Every transaction that reached the final dot (accepted or deferred).
    pub fn transactions(&self) -> Vec<Transaction> {
        self.shared.state.lock().unwrap().transactions.clone()
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> usize {
        self.shared.state.lock().unwrap().connections
    }

    /// Every command line received, in order (for dialogue checks).
    pub fn commands(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().commands.clone()
    }

    /// Waits until at least `n` messages were accepted; false on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if self.count() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() >= n;
            }
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address with nothing listening: connecting to it is refused.
pub async fn closed_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

fn acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "sink.test".into()])
        .expect("self-signed certificate");
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .expect("server TLS config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// One SMTP session.
async fn serve(stream: Box<dyn Io>, s: Arc<Shared>) -> std::io::Result<()> {
    let cfg = &s.config;
    let mut io = BufReader::new(stream);
    io.write_all(format!("{}\r\n", cfg.greeting).as_bytes())
        .await?;
    if !cfg.greeting.starts_with('2') {
        let _ = io.shutdown().await;
        return Ok(());
    }
    let mut tls = false;
    let mut helo = String::new();
    let mut mail: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let Some(text) = crate::wire::read_command(&mut io).await? else {
            return Ok(());
        };
        s.state.lock().unwrap().commands.push(text.clone());
        let upper = text.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO ") || upper.starts_with("HELO ") {
            helo = text[5..].trim().to_string();
            mail = None;
            rcpts.clear();
            if upper.starts_with("HELO") {
                format!("250 {}", cfg.name)
            } else {
                let mut r = format!(
                    "250-{}\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n",
                    cfg.name
                );
                if cfg.starttls != StartTls::Off && !tls {
                    r.push_str("250-STARTTLS\r\n");
                }
                r.push_str("250-ENHANCEDSTATUSCODES");
                for e in &cfg.extensions {
                    r.push_str("\r\n250-");
                    r.push_str(e);
                }
                // The last line of the reply has a space after its code.
                let cut = r.rfind("250-").expect("a line");
                r.replace_range(cut..cut + 4, "250 ");
                r
            }
        } else if upper == "STARTTLS" {
            if cfg.starttls == StartTls::Off || tls {
                "502 5.5.1 Error: command not implemented".into()
            } else {
                io.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
                io.flush().await?;
                match (&s.tls, cfg.starttls) {
                    (Some(acc), StartTls::On) => {
                        let inner = io.into_inner();
                        let stream = acc.accept(inner).await?;
                        io = BufReader::new(Box::new(stream) as Box<dyn Io>);
                        tls = true;
                        helo.clear();
                        mail = None;
                        rcpts.clear();
                        continue;
                    }
                    _ => {
                        // Broken: drop the connection where the handshake should be.
                        let _ = io.shutdown().await;
                        return Ok(());
                    }
                }
            }
        } else if upper.starts_with("MAIL FROM:") {
            if helo.is_empty() {
                "503 5.5.1 Error: send HELO/EHLO first".into()
            } else if cfg.mail_reply.starts_with('2') {
                mail = Some(crate::wire::angle(&text[10..]));
                rcpts.clear();
                cfg.mail_reply.clone()
            } else {
                cfg.mail_reply.clone()
            }
        } else if upper.starts_with("RCPT TO:") {
            if mail.is_none() {
                "503 5.5.1 Error: need MAIL command".into()
            } else {
                let rcpt = crate::wire::angle(&text[8..]);
                let local = rcpt.split('@').next().unwrap_or("").to_ascii_lowercase();
                let rule = cfg
                    .rcpt_rules
                    .iter()
                    .find(|(p, _)| local.starts_with(&p.to_ascii_lowercase()))
                    .map(|(_, r)| r.replace("{rcpt}", &rcpt));
                let r = rule.unwrap_or_else(|| {
                    if local.starts_with("fail") {
                        format!("550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown")
                    } else if local.starts_with("defer") {
                        format!("450 4.2.0 <{rcpt}>: Recipient address rejected: try again later")
                    } else {
                        "250 2.1.5 Ok".into()
                    }
                });
                if r.starts_with('2') {
                    rcpts.push(rcpt);
                }
                r
            }
        } else if upper == "DATA" {
            if mail.is_none() || rcpts.is_empty() {
                "554 5.5.1 Error: no valid recipients".into()
            } else {
                io.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                io.flush().await?;
                let Some(data) = crate::wire::read_data(&mut io).await? else {
                    return Ok(());
                };
                let at = Utc::now();
                let from = mail.take().unwrap_or_default();
                let accepted = std::mem::take(&mut rcpts);
                let reply = {
                    let mut st = s.state.lock().unwrap();
                    let deferred = st.transactions.len() < cfg.defer_first;
                    let reply = if deferred {
                        cfg.defer_reply.clone()
                    } else {
                        "250 2.0.0 Ok: queued".to_string()
                    };
                    let code = reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                    st.transactions.push(Transaction {
                        at,
                        mail_from: from.clone(),
                        rcpts: accepted.clone(),
                        code,
                    });
                    if !deferred {
                        st.messages.push(Received {
                            at,
                            helo: helo.clone(),
                            mail_from: from,
                            rcpts: accepted,
                            data,
                            tls,
                        });
                    }
                    reply
                };
                s.changed.notify_waiters();
                reply
            }
        } else if let Some(r) = crate::wire::reset_or_noop(&upper, &mut mail, &mut rcpts) {
            r.into()
        } else if upper == "QUIT" {
            io.write_all(b"221 2.0.0 Bye\r\n").await?;
            io.flush().await?;
            let _ = io.shutdown().await;
            return Ok(());
        } else {
            "502 5.5.2 Error: command not recognized".into()
        };
        io.write_all(format!("{reply}\r\n").as_bytes()).await?;
        io.flush().await?;
    }
}
