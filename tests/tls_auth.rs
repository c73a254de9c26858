//! STARTTLS and SMTP AUTH acceptance (issue 6), against the real `erlmail serve` binary
//! on 127.0.0.1 with a certificate made by rcgen: swaks and Python's smtplib complete
//! STARTTLS + AUTH PLAIN/LOGIN + relay to a sink; wrong passwords get 535 and relay
//! nothing; AUTH before TLS gets 530; commands pipelined after STARTTLS never run; the
//! open-relay cases are refused over TLS; no password (nor its base64) reaches the log;
//! the outbound policy `require` refuses a next hop without STARTTLS and `may` uses it.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/peers.rs"]
mod peers;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::process::Command;
use std::time::Duration;

use daemon::{b64, wait_until, Daemon};
use peers::{require, run};
use sink::{Sink, SinkConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BOB: &str = "bob@local.test";
/// Distinctive, so the log check cannot match anything else.
const PASSWORD: &str = "Zq7-horse-Battery!staple";
const REMOTE: &str = "someone@remote.test";

/// A daemon with a test certificate, a relay host and user bob; not a relay client
/// (the relay list is empty), logging at trace level.
struct Setup {
    d: Daemon,
    _certs: tempfile::TempDir,
}

fn start(extra: &str) -> Setup {
    let (certs, tls_yaml) = daemon::test_certificate();
    let yaml = format!(
        "server_smtp_name: \"mx.local.test\"\n\
         {tls_yaml}\
         server_smtp_queue_interval: \"100ms\"\n{extra}"
    );
    let d = Daemon::start_with_env(&yaml, &[("RUST_LOG", "trace")]);
    d.add_user_with_password(BOB, PASSWORD);
    Setup { d, _certs: certs }
}

fn relay_to(sink: &Sink) -> String {
    format!("server_smtp_relay_host: \"127.0.0.1:{}\"\n", sink.port())
}

/// The log must hold no password, no base64 of it, and no PLAIN blob.
fn assert_log_clean(d: &Daemon) {
    let log = d.log_text();
    assert!(!log.is_empty());
    for secret in [
        PASSWORD.to_string(),
        b64(PASSWORD.as_bytes()),
        b64(format!("\0{BOB}\0{PASSWORD}").as_bytes()),
        b64(format!("\0{BOB}\0wrong-{PASSWORD}").as_bytes()),
    ] {
        assert!(!log.contains(&secret), "log contains {secret:?}");
    }
}

fn swaks(d: &Daemon, args: &[&str]) -> peers::Output {
    let mut cmd = Command::new(require("swaks"));
    cmd.arg("--server")
        .arg(d.addr.to_string())
        .args(["--helo", "client.remote.test", "--tls"])
        .args(args);
    run(cmd, None, Duration::from_secs(60))
}

// ---------------------------------------------------------------------------------------
// A small async client that can switch to TLS.

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Client {
    io: BufReader<Box<dyn Io>>,
}

impl Client {
    async fn connect(d: &Daemon) -> (Client, String) {
        let tcp = TcpStream::connect(d.addr).await.unwrap();
        let mut c = Client {
            io: BufReader::new(Box::new(tcp)),
        };
        let greeting = c.reply().await;
        (c, greeting)
    }

    /// One reply, lines joined with `\n`.
    async fn reply(&mut self) -> String {
        let (lines, open) = wire::read_reply_lines(&mut self.io, Duration::from_secs(20)).await;
        assert!(open, "connection closed after {lines:?}");
        lines.join("\n")
    }

    async fn send(&mut self, bytes: &str) {
        self.io.get_mut().write_all(bytes.as_bytes()).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }

    /// The TLS handshake (no certificate check: the test certificate is self-signed).
    async fn tls(self) -> Client {
        assert!(self.io.buffer().is_empty(), "bytes after the 220");
        let plain = self.io.into_inner();
        let connector = mail_send::smtp::tls::build_tls_connector(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, plain).await.expect("TLS handshake");
        Client {
            io: BufReader::new(Box::new(tls)),
        }
    }

    /// Connect, EHLO, STARTTLS, handshake, EHLO again; returns the second EHLO reply.
    async fn connect_tls(d: &Daemon) -> (Client, String) {
        let (mut c, _) = Client::connect(d).await;
        let ehlo = c.cmd("EHLO client.remote.test").await;
        assert!(
            ehlo.contains("250-STARTTLS") || ehlo.ends_with("250 STARTTLS"),
            "{ehlo}"
        );
        assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
        assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS");
        let mut c = c.tls().await;
        let ehlo = c.cmd("EHLO client.remote.test").await;
        (c, ehlo)
    }
}

// ---------------------------------------------------------------------------------------
// 1. swaks and smtplib: STARTTLS + AUTH + relay; 535; 530

#[tokio::test(flavor = "multi_thread")]
async fn swaks_starttls_auth_plain_and_login_relay() {
    let sink = Sink::start(SinkConfig::default()).await;
    let s = start(&relay_to(&sink));
    for (n, mech) in ["PLAIN", "LOGIN"].into_iter().enumerate() {
        let out = swaks(
            &s.d,
            &[
                "--auth",
                mech,
                "--auth-user",
                BOB,
                "--auth-password",
                PASSWORD,
                "--from",
                BOB,
                "--to",
                REMOTE,
                "--header",
                &format!("Subject: via swaks {mech}"),
            ],
        );
        out.assert_success(&format!("swaks --auth {mech}"));
        assert!(
            out.stdout.contains("235 2.7.0 Authentication successful"),
            "{}",
            out.stdout
        );
        assert!(
            sink.wait_for(n + 1, Duration::from_secs(30)).await,
            "relayed {mech}"
        );
        let m = &sink.messages()[n];
        assert_eq!(m.rcpts, vec![REMOTE.to_string()]);
        let text = String::from_utf8_lossy(&m.data);
        assert!(
            text.contains(&format!("Subject: via swaks {mech}")),
            "{text}"
        );
        // RFC 3848: TLS and AUTH in the protocol keyword; the cipher as Postfix says it.
        let received = text.split("\r\n\r\n").next().unwrap_or_default();
        assert!(received.contains(" with ESMTPSA"), "{received}");
        assert!(
            received.contains("\t(using TLSv1.") && received.contains(" with cipher TLS_"),
            "{received}"
        );
    }
    // Wrong password: 535, and nothing is queued or relayed.
    let out = swaks(
        &s.d,
        &[
            "--auth",
            "PLAIN",
            "--auth-user",
            BOB,
            "--auth-password",
            &format!("wrong-{PASSWORD}"),
            "--from",
            BOB,
            "--to",
            REMOTE,
        ],
    );
    assert!(!out.status.success());
    assert!(
        out.stdout
            .contains("535 5.7.8 Error: authentication failed"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("354 "), "{}", out.stdout);
    assert_eq!(sink.count(), 2);
    assert_log_clean(&s.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn smtplib_starttls_auth_plain_and_login_relay() {
    let sink = Sink::start(SinkConfig::default()).await;
    let s = start(&relay_to(&sink));
    let script = r#"
import smtplib, ssl, sys
host, port, user, pw, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
for mech in ("PLAIN", "LOGIN"):
    s = smtplib.SMTP(host, port, timeout=30)
    s.ehlo("client.remote.test")
    s.starttls(context=ssl._create_unverified_context())
    s.ehlo("client.remote.test")
    assert "auth" in s.esmtp_features, s.esmtp_features
    s.user, s.password = user, pw
    code, _ = s.auth(mech, s.auth_plain if mech == "PLAIN" else s.auth_login)
    print("AUTH", mech, code)
    s.sendmail(user, [rcpt], "Subject: via smtplib %s\r\n\r\nhello\r\n" % mech)
    s.quit()
s = smtplib.SMTP(host, port, timeout=30)
s.ehlo("client.remote.test")
s.starttls(context=ssl._create_unverified_context())
s.ehlo("client.remote.test")
try:
    s.login(user, "wrong-" + pw)
except smtplib.SMTPAuthenticationError as e:
    print("FAILED", e.smtp_code, e.smtp_error.decode())
try:
    s.sendmail(user, [rcpt], "Subject: not relayed\r\n\r\nx\r\n")
except smtplib.SMTPRecipientsRefused as e:
    print("REFUSED", e.recipients[rcpt][0])
s.quit()
"#;
    let mut cmd = Command::new(require("python3"));
    cmd.arg("-c").arg(script).args([
        "127.0.0.1",
        &s.d.addr.port().to_string(),
        BOB,
        PASSWORD,
        REMOTE,
    ]);
    let out = run(cmd, None, Duration::from_secs(60));
    out.assert_success("smtplib");
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        vec![
            "AUTH PLAIN 235",
            "AUTH LOGIN 235",
            "FAILED 535 5.7.8 Error: authentication failed",
            "REFUSED 554",
        ],
        "{}",
        out.stderr
    );
    assert!(sink.wait_for(2, Duration::from_secs(30)).await);
    let subjects: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| {
            let t = String::from_utf8_lossy(&m.data).into_owned();
            t.lines()
                .find(|l| l.starts_with("Subject:"))
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let mut sorted = subjects.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["Subject: via smtplib LOGIN", "Subject: via smtplib PLAIN"]
    );
    assert_log_clean(&s.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_before_tls_gets_530() {
    let s = start("");
    let (mut c, greeting) = Client::connect(&s.d).await;
    assert!(
        greeting.starts_with("220 mx.local.test ESMTP"),
        "{greeting}"
    );
    c.cmd("EHLO client.remote.test").await;
    let blob = b64(format!("\0{BOB}\0{PASSWORD}").as_bytes());
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {blob}")).await,
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    assert_eq!(
        c.cmd("AUTH LOGIN").await,
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    assert_log_clean(&s.d);
}

// ---------------------------------------------------------------------------------------
// 2. STARTTLS command injection

#[tokio::test(flavor = "multi_thread")]
async fn commands_pipelined_after_starttls_are_not_executed() {
    let s = start("");
    let (mut c, _) = Client::connect(&s.d).await;
    c.cmd("EHLO client.remote.test").await;
    c.send("STARTTLS\r\nRSET\r\nMAIL FROM:<x@y.test>\r\n").await;
    assert_eq!(c.reply().await, "220 2.0.0 Ready to start TLS");
    let mut c = c.tls().await;
    // Had RSET or MAIL run, their 250s would come first; MAIL without EHLO is refused
    // because the session was reset.
    assert_eq!(
        c.cmd("MAIL FROM:<x@y.test>").await,
        "503 5.5.1 Error: send HELO/EHLO first"
    );
    let ehlo = c.cmd("EHLO client.remote.test").await;
    assert!(ehlo.ends_with("250 AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok");
    assert_eq!(c.cmd("MAIL FROM:<x@y.test>").await, "250 2.1.0 Ok");
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
}

// ---------------------------------------------------------------------------------------
// 4. No open relay over TLS

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_tls_client_cannot_relay() {
    let s = start("");
    let (mut c, ehlo) = Client::connect_tls(&s.d).await;
    assert!(ehlo.ends_with("250 AUTH PLAIN LOGIN"), "{ehlo}");
    for rcpt in [
        "user%remote.test@local.test",
        "remote.test!user@local.test",
        "@local.test:user@remote.test",
        "\"user@remote.test\"@local.test",
        "user@[127.0.0.2]",
        "user@remote.test",
    ] {
        assert_eq!(c.cmd("MAIL FROM:<>").await, "250 2.1.0 Ok");
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{rcpt}>")).await,
            format!("554 5.7.1 <{rcpt}>: Relay access denied"),
        );
        assert_eq!(c.cmd("RSET").await, "250 2.0.0 Ok");
    }
    // A local user is still fine.
    assert_eq!(c.cmd("MAIL FROM:<>").await, "250 2.1.0 Ok");
    assert_eq!(c.cmd(&format!("RCPT TO:<{BOB}>")).await, "250 2.1.5 Ok");
    // A wrong password does not unlock relaying either.
    c.cmd("RSET").await;
    let blob = b64(format!("\0{BOB}\0wrong-{PASSWORD}").as_bytes());
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {blob}")).await,
        "535 5.7.8 Error: authentication failed"
    );
    assert_eq!(c.cmd("MAIL FROM:<>").await, "250 2.1.0 Ok");
    assert_eq!(
        c.cmd(&format!("RCPT TO:<{REMOTE}>")).await,
        format!("554 5.7.1 <{REMOTE}>: Relay access denied"),
    );
    assert_log_clean(&s.d);
}

// ---------------------------------------------------------------------------------------
// 5. Outbound TLS policy

async fn relay_one(s: &Setup, subject: &str) {
    let (mut c, _) = Client::connect_tls(&s.d).await;
    let blob = b64(format!("\0{BOB}\0{PASSWORD}").as_bytes());
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {blob}")).await,
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(c.cmd(&format!("MAIL FROM:<{BOB}>")).await, "250 2.1.0 Ok");
    assert_eq!(c.cmd(&format!("RCPT TO:<{REMOTE}>")).await, "250 2.1.5 Ok");
    assert!(c.cmd("DATA").await.starts_with("354"));
    let r = c.cmd(&format!("Subject: {subject}\r\n\r\nbody\r\n.")).await;
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
    c.cmd("QUIT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_require_refuses_a_hop_without_starttls() {
    let sink = Sink::start(SinkConfig::plain()).await;
    let s = start(&format!(
        "{}server_smtp_tls_outbound: require\nserver_smtp_retry_interval: [\"1h\"]\n",
        relay_to(&sink)
    ));
    relay_one(&s, "must be encrypted").await;
    let mut listing = String::new();
    wait_until(
        "the refused attempt in queue list",
        Duration::from_secs(30),
        || {
            listing = s.d.queue_list();
            listing.contains("TLS required but STARTTLS not offered")
        },
    );
    assert_eq!(sink.count(), 0, "delivered in plain text: {listing}");
    assert!(sink.connections() >= 1);
    assert_log_clean(&s.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_may_uses_tls_when_offered() {
    let sink = Sink::start(SinkConfig::default()).await;
    let s = start(&relay_to(&sink));
    relay_one(&s, "encrypted when possible").await;
    assert!(sink.wait_for(1, Duration::from_secs(30)).await);
    assert!(sink.messages()[0].tls, "delivered without TLS");
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_port_speaks_tls_from_the_first_byte_and_offers_auth() {
    let sink = Sink::start(SinkConfig::default()).await;
    let mut s = start(&format!("server_smtp_tls_port: 0\n{}", relay_to(&sink)));
    let port = s.d.tls_port();
    assert_ne!(port, s.d.addr.port(), "a second listener");
    let script = r#"
import smtplib, ssl, sys
host, port, user, pw, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
s = smtplib.SMTP_SSL(host, port, timeout=30, context=ssl._create_unverified_context())
s.ehlo("client.remote.test")
print("STARTTLS" if "starttls" in s.esmtp_features else "NO-STARTTLS")
s.login(user, pw)
s.sendmail(user, [rcpt], "Subject: via implicit TLS\r\n\r\nhello\r\n")
print("SENT", s.sock.version())
s.quit()
"#;
    let mut cmd = Command::new(require("python3"));
    cmd.arg("-c")
        .arg(script)
        .args(["127.0.0.1", &port.to_string(), BOB, PASSWORD, REMOTE]);
    let out = run(cmd, None, Duration::from_secs(60));
    out.assert_success("smtplib SMTP_SSL");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "NO-STARTTLS", "already under TLS");
    assert!(
        lines[1] == "SENT TLSv1.3" || lines[1] == "SENT TLSv1.2",
        "{}",
        out.stdout
    );
    assert!(sink.wait_for(1, Duration::from_secs(30)).await);
    assert_log_clean(&s.d);
}
