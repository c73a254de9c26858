//! Facing the internet (issue 14): hostile clients, crowds and password guessers cannot
//! lock others out. Real sockets from many loopback addresses (127.0.0.2-127.0.0.250 act
//! as other hosts) against the real `erlmail serve` binary:
//! - a crowd of 60 sessions from one address and 200 drippers from 200 others, while a
//!   good client delivers 50 messages (each greeted within 2 s);
//! - per-client concurrency and rate limits, their 421s, logs and metrics; relay clients
//!   exempt;
//! - deadlines: a command line trickling in byte by byte, DATA below the minimum rate, a
//!   slow but steady upload that outlives the timeout;
//! - stress mode: entered and left with a log line, open sessions shed, error limit 1;
//! - AUTH guessing from parallel sessions: refused with 454 after the limit, the right
//!   password too, other addresses unaffected.
//!
//! Limits are the defaults unless the test is about the limit.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/wire.rs"]
mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon::{b64, Daemon};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const ALICE: &str = "alice@example.test";
const PASSWORD: &str = "Right-horse-7-staple";

fn local_daemon(yaml: &str) -> Daemon {
    Daemon::start_with_user(yaml, ALICE, PASSWORD)
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(addr).await
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A small SMTP client over any stream.
struct Client {
    io: BufReader<Box<dyn Io>>,
}

impl Client {
    fn new(io: impl Io + 'static) -> Client {
        Client {
            io: BufReader::new(Box::new(io)),
        }
    }

    /// One reply, lines joined with `\n`; empty when the server closed.
    async fn reply(&mut self) -> String {
        let (lines, _) = wire::read_reply_lines(&mut self.io, Duration::from_secs(30)).await;
        lines.join("\n")
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.io.get_mut().write_all(bytes).await.is_ok()
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends each piece `next` gives, waiting up to `wait` after each for the server to
    /// say something; what it said (empty if `next` ran out or the connection broke
    /// first).
    async fn send_until_answered(
        &mut self, mut next: impl FnMut() -> Option<Vec<u8>>, wait: Duration,
    ) -> String {
        while let Some(piece) = next() {
            if !self.send(&piece).await {
                break;
            }
            let mut buf = [0u8; 256];
            if let Ok(Ok(n)) = tokio::time::timeout(wait, self.io.read(&mut buf)).await {
                return String::from_utf8_lossy(&buf[..n]).into_owned();
            }
        }
        String::new()
    }

    /// Whether the server has closed the connection (reads EOF within `wait`).
    async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut buf = [0u8; 256];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// MAIL from bob, RCPT to alice and DATA, each asserted accepted.
    async fn begin_to_alice(&mut self) {
        for (line, want) in [
            ("MAIL FROM:<bob@remote.test>".to_string(), "250"),
            (format!("RCPT TO:<{ALICE}>"), "250"),
            ("DATA".to_string(), "354"),
        ] {
            let r = self.cmd(&line).await;
            assert!(r.starts_with(want), "{line}: {r}");
        }
    }

    /// A whole transaction to alice; the reply to the final dot.
    async fn deliver(&mut self, subject: &str) -> String {
        self.begin_to_alice().await;
        self.send(format!("Subject: {subject}\r\n\r\nhello\r\n.\r\n").as_bytes())
            .await;
        self.reply().await
    }
}

fn inbox_count(d: &Daemon) -> usize {
    let (ok, out, err) = d.admin(&["mailbox", "list", ALICE], None);
    assert!(ok.success(), "mailbox list: {err}");
    out.lines().filter(|l| l.contains("good ")).count()
}

/// A dripper: greeted or refused; if greeted, it sends one byte of a line that never
/// ends every `every`, until the server closes the connection. Returns (greeting, how
/// long after the greeting the server closed it; None if it never did within `give_up`).
async fn drip(
    from: Ipv4Addr, addr: SocketAddr, every: Duration, give_up: Duration,
) -> (String, Option<Duration>) {
    let Ok(stream) = connect_from(from, addr).await else {
        return ("connect failed".into(), None);
    };
    let mut c = Client::new(stream);
    let greeting = c.reply().await;
    if !greeting.starts_with("220") {
        return (greeting, None);
    }
    let greeted = Instant::now();
    let mut buf = [0u8; 512];
    while greeted.elapsed() < give_up {
        if !c.send(b"X").await {
            return (greeting, Some(greeted.elapsed()));
        }
        match tokio::time::timeout(every, c.io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (greeting, Some(greeted.elapsed())),
            _ => {}
        }
    }
    (greeting, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crowd_and_200_drippers_cannot_lock_out_a_good_client() {
    let d = local_daemon("server_smtp_timeout: 10s\n");
    let addr = d.addr;
    let every = Duration::from_secs(2);
    let give_up = Duration::from_secs(60);
    // 60 sessions from one address, and one from each of 200 others, all dripping.
    let crowd: Vec<_> = (0..60)
        .map(|_| tokio::spawn(drip(ip(2), addr, every, give_up)))
        .collect();
    let drippers: Vec<_> = (3..=202u8)
        .map(|last| tokio::spawn(drip(ip(last), addr, every, give_up)))
        .collect();
    // Let the crowd settle in before the good client comes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut slowest_greeting = Duration::ZERO;
    for i in 0..50 {
        let t = Instant::now();
        let stream = connect_from(ip(1), addr).await.expect("connect");
        let mut c = Client::new(stream);
        let greeting = c.reply().await;
        let took = t.elapsed();
        slowest_greeting = slowest_greeting.max(took);
        assert!(greeting.starts_with("220"), "message {i}: {greeting}");
        assert!(
            took < Duration::from_secs(2),
            "message {i}: 220 after {took:?}"
        );
        assert!(c.cmd("EHLO good.test").await.starts_with("250"));
        let r = c.deliver(&format!("good {i}")).await;
        assert!(r.starts_with("250"), "message {i}: {r}");
        let _ = c.cmd("QUIT").await;
    }
    let mut crowd_greeted = 0;
    let mut crowd_refused = 0;
    for h in crowd {
        let (greeting, closed) = h.await.unwrap();
        if greeting.starts_with("220") {
            crowd_greeted += 1;
            let closed = closed.expect("a crowd session was never closed");
            assert!(
                closed < Duration::from_secs(25),
                "a crowd session closed {closed:?} after its greeting"
            );
        } else {
            assert!(
                greeting.starts_with("421 4.7.0") && greeting.contains("127.0.0.2"),
                "{greeting}"
            );
            crowd_refused += 1;
        }
    }
    // The one address holds at most the (default) limit of 10.
    assert!(
        crowd_greeted <= 10,
        "{crowd_greeted} sessions from one address"
    );
    assert_eq!(crowd_greeted + crowd_refused, 60);
    let mut latest_close = Duration::ZERO;
    for h in drippers {
        let (greeting, closed) = h.await.unwrap();
        assert!(greeting.starts_with("220"), "{greeting}");
        let closed = closed.expect("a dripper was never closed");
        latest_close = latest_close.max(closed);
    }
    // With server_smtp_timeout 10s every dripper is gone within 25 s of its greeting,
    // however steadily its bytes keep coming.
    assert!(
        latest_close < Duration::from_secs(25),
        "last dripper closed {latest_close:?} after its greeting"
    );
    assert_eq!(inbox_count(&d), 50);
    let log = d.log_text();
    assert_eq!(
        log.matches("refusing connections from 127.0.0.2").count(),
        1,
        "refusals are logged once per client per minute"
    );
    println!(
        "crowd: {crowd_greeted} greeted, {crowd_refused} refused; good client's slowest 220: \
         {slowest_greeting:?}; last dripper closed {latest_close:?} after its greeting"
    );
}

/// One sample of a counter from `/metrics`, `name{labels}` as written by the exporter.
fn metric(admin: SocketAddr, sample: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn per_client_limit_refuses_with_421_logged_once_and_counted() {
    let mut d = local_daemon(
        "server_smtp_client_connection_limit: 3\n\
         server_smtp_relay_clients: [\"127.0.0.21/32\"]\n\
         admin_listen: \"127.0.0.1:0\"\n",
    );
    let admin = d.admin_addr();
    let addr = d.addr;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Client::new(connect_from(ip(20), addr).await.unwrap());
        assert!(c.reply().await.starts_with("220"));
        held.push(c);
    }
    for _ in 0..5 {
        let mut c = Client::new(connect_from(ip(20), addr).await.unwrap());
        let r = c.reply().await;
        assert_eq!(
            r,
            "421 4.7.0 smtp.erlsoft.net Error: too many connections from 127.0.0.20"
        );
        assert!(c.closed_within(Duration::from_secs(5)).await);
    }
    // Another address is served; a relay client is exempt, as Postfix exempts
    // $mynetworks.
    let mut other = Client::new(connect_from(ip(22), addr).await.unwrap());
    assert!(other.reply().await.starts_with("220"));
    let mut exempt = Vec::new();
    for _ in 0..6 {
        let mut c = Client::new(connect_from(ip(21), addr).await.unwrap());
        assert!(c.reply().await.starts_with("220"), "relay client refused");
        exempt.push(c);
    }
    // A slot freed is a slot again.
    let mut first = held.remove(0);
    assert!(first.cmd("QUIT").await.starts_with("221"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::new(connect_from(ip(20), addr).await.unwrap());
        if c.reply().await.starts_with("220") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = d.log_text();
    assert_eq!(
        log.matches("refusing connections from 127.0.0.20").count(),
        1,
        "{log}"
    );
    assert!(
        metric(
            admin,
            "erlmail_smtp_connections_refused_total{reason=\"client_limit\"}"
        ) >= 5.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn per_client_rate_refuses_the_fourth_session_in_a_minute() {
    let d = local_daemon("server_smtp_client_connection_rate: 3\n");
    for i in 0..5 {
        let mut c = Client::new(connect_from(ip(30), d.addr).await.unwrap());
        let r = c.reply().await;
        if i < 3 {
            assert!(r.starts_with("220"), "session {i}: {r}");
            assert!(c.cmd("QUIT").await.starts_with("221"));
        } else {
            assert!(
                r.starts_with("421 4.7.0") && r.contains("per minute"),
                "session {i}: {r}"
            );
        }
    }
    // The limit is per client.
    let mut c = Client::new(connect_from(ip(31), d.addr).await.unwrap());
    assert!(c.reply().await.starts_with("220"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_line_trickling_in_meets_its_deadline() {
    let d = local_daemon("server_smtp_timeout: 3s\n");
    let mut c = Client::new(connect_from(ip(40), d.addr).await.unwrap());
    assert!(c.reply().await.starts_with("220"));
    let t = Instant::now();
    // "NOOP NOOP NOOP ..." one byte every 200 ms: well inside any idle timer, but the
    // line never ends.
    let line = b"NOOP ".repeat(200);
    let mut bytes = line.iter();
    let reply = c
        .send_until_answered(
            || bytes.next().map(|b| vec![*b]),
            Duration::from_millis(200),
        )
        .await;
    let took = t.elapsed();
    assert!(
        reply.starts_with("421 4.4.2 smtp.erlsoft.net Error: timeout exceeded"),
        "{reply:?} after {took:?}"
    );
    assert!(took >= Duration::from_millis(2900), "{took:?}");
    assert!(c.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn data_below_the_minimum_rate_is_cut_off_and_a_steady_upload_is_not() {
    let d = local_daemon("server_smtp_timeout: 3s\nserver_smtp_min_data_rate: 500\n");
    // Slow: 50 bytes every 500 ms (100 B/s, a fifth of the minimum).
    let mut slow = Client::new(connect_from(ip(41), d.addr).await.unwrap());
    assert!(slow.reply().await.starts_with("220"));
    assert!(slow.cmd("EHLO slow.test").await.starts_with("250"));
    slow.begin_to_alice().await;
    let t = Instant::now();
    let chunk = format!("Subject: good slow\r\n{}\r\n", "s".repeat(28));
    assert_eq!(chunk.len(), 50);
    let reply = slow
        .send_until_answered(
            || (t.elapsed() < Duration::from_secs(60)).then(|| chunk.as_bytes().to_vec()),
            Duration::from_millis(500),
        )
        .await;
    let took = t.elapsed();
    assert!(reply.starts_with("421 4.4.2"), "{reply:?} after {took:?}");
    // 3 s of credit lost at 0.8 s per second: about 3.75 s, well before the minute.
    assert!(took < Duration::from_secs(20), "{took:?}");
    // Steady: 1,000 bytes every 100 ms (10 kB/s) for 6 s, twice the timeout: fine.
    let mut steady = Client::new(connect_from(ip(42), d.addr).await.unwrap());
    assert!(steady.reply().await.starts_with("220"));
    assert!(steady.cmd("EHLO steady.test").await.starts_with("250"));
    steady.begin_to_alice().await;
    assert!(steady.send(b"Subject: good steady\r\n\r\n").await);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        let line = format!("{}\r\n", "y".repeat(998));
        assert!(steady.send(line.as_bytes()).await, "cut off mid-upload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(steady.send(b".\r\n").await);
    let r = steady.reply().await;
    assert!(r.starts_with("250"), "{r}");
    // Only the steady message was stored.
    assert_eq!(inbox_count(&d), 1);
    let (_, out, _) = d.admin(&["mailbox", "list", ALICE], None);
    assert!(
        out.contains("good steady") && !out.contains("good slow"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stress_mode_sheds_idle_sessions_limits_errors_and_is_logged() {
    // 10 slots: stress at 8 sessions. The timeout (60 s) is far longer than stress's 10 s.
    let mut d = local_daemon("server_smtp_max_connection: 10\nserver_smtp_timeout: 60s\n");
    let addr = d.addr;
    // Seven idle sessions, each from its own address (the per-client limit is not the
    // subject here).
    let mut idle = Vec::new();
    for i in 0..7u8 {
        let mut c = Client::new(connect_from(ip(50 + i), addr).await.unwrap());
        assert!(c.reply().await.starts_with("220"));
        idle.push(c);
    }
    assert!(!d.log_text().contains("entering stress mode"));
    let t = Instant::now();
    // The eighth session tips it over.
    let mut eighth = Client::new(connect_from(ip(60), addr).await.unwrap());
    assert!(eighth.reply().await.starts_with("220"));
    d.wait_for_log("entering stress mode", Duration::from_secs(5));
    // Under stress one error ends a session.
    let r = eighth.cmd("BOGUS").await;
    assert!(r.starts_with("500") || r.starts_with("502"), "{r}");
    let r = eighth.reply().await;
    assert!(
        r.starts_with("421 4.7.0") && r.contains("too many errors"),
        "{r}"
    );
    // Sessions opened before stress lose their long deadline: gone within 10 s, not 60.
    for c in idle.iter_mut() {
        let r = c.reply().await;
        assert!(r.starts_with("421 4.4.2"), "{r}");
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "idle sessions shed after {took:?}"
    );
    d.wait_for_log("leaving stress mode", Duration::from_secs(10));
}

/// Connect from `from` to the implicit-TLS port and return a client under TLS. A
/// refusal (the previous round's sessions from this address not yet counted out: the
/// 421 arrives in plain text, so the handshake fails) is retried for a few seconds.
async fn tls_client(from: Ipv4Addr, port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = connect_from(from, SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        let connector = mail_send::smtp::tls::build_tls_connector(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        match connector.connect(name, tcp).await {
            Ok(tls) => {
                let mut c = Client::new(tls);
                assert!(c.reply().await.starts_with("220"));
                assert!(c.cmd("EHLO guesser.test").await.contains("AUTH"));
                return c;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "TLS handshake: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn auth_plain(user: &str, password: &str) -> String {
    format!(
        "AUTH PLAIN {}",
        b64(format!("\0{user}\0{password}").as_bytes())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_guessing_in_parallel_is_stopped_per_address() {
    let (_certs, tls_yaml) = daemon::test_certificate();
    let mut d = local_daemon(&format!("{tls_yaml}server_smtp_tls_port: 0\n"));
    let port = d.tls_port();
    // 40 wrong passwords from one address, each in its own session: four rounds of ten
    // sessions at once (ten is the default per-client session limit).
    let failed = Arc::new(AtomicUsize::new(0));
    let throttled = Arc::new(AtomicUsize::new(0));
    for _round in 0..4 {
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let (failed, throttled) = (failed.clone(), throttled.clone());
                tokio::spawn(async move {
                    let mut c = tls_client(ip(70), port).await;
                    let r = c.cmd(&auth_plain(ALICE, &format!("guess-{i}"))).await;
                    if r.starts_with("535 5.7.8") {
                        failed.fetch_add(1, Ordering::SeqCst);
                    } else if r.starts_with("454 4.7.0") {
                        throttled.fetch_add(1, Ordering::SeqCst);
                    } else {
                        panic!("unexpected reply to a wrong password: {r}");
                    }
                    let _ = c.cmd("QUIT").await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        5,
        "only the limit's worth of passwords is ever checked"
    );
    assert_eq!(throttled.load(Ordering::SeqCst), 35);
    // The 41st, with the right password, from the same address: refused too.
    let mut c = tls_client(ip(70), port).await;
    let r = c.cmd(&auth_plain(ALICE, PASSWORD)).await;
    assert!(r.starts_with("454 4.7.0"), "{r}");
    // The account is not locked for everyone: another address logs in.
    let mut c = tls_client(ip(71), port).await;
    let r = c.cmd(&auth_plain(ALICE, PASSWORD)).await;
    assert!(r.starts_with("235"), "{r}");
    // Unknown users are answered like known ones.
    let mut c = tls_client(ip(72), port).await;
    let r = c.cmd(&auth_plain("nobody@example.test", "x")).await;
    assert!(r.starts_with("535 5.7.8"), "{r}");
    assert_eq!(
        d.log_text()
            .matches("refusing AUTH from 127.0.0.70")
            .count(),
        1
    );
}
