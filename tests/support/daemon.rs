//! Test support: run the real `erlmail` binary, watch its log, talk to it.
//!
//! `Daemon::start` spawns `erlmail serve` in a private temporary spool with an ephemeral
//! port on 127.0.0.1, collects every stderr line, and waits for the listener's
//! `listening on ADDR` line. Dropping it kills the process. Include it from an integration
//! test with `#[path = "support/daemon.rs"] mod daemon;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_erlmail")
}

/// Run an admin command with a config file; returns (status, stdout, stderr).
pub fn erlmail(config: &Path, args: &[&str], stdin: Option<&str>) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(config).args(args);
    cmd.env_remove("ERLMAIL_CONFIG");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn erlmail");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The standard base64 encoding (AUTH PLAIN by hand, and looking for a secret's
/// encoding in logs).
pub fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A running `erlmail serve`.
pub struct Daemon {
    /// The child process.
    pub child: Child,
    /// Every log line so far.
    pub log: Arc<Mutex<Vec<String>>>,
    /// The SMTP listener's address.
    pub addr: SocketAddr,
    /// The temporary directory holding config and spool.
    pub dir: tempfile::TempDir,
    /// The config file in use.
    pub config: PathBuf,
}

impl Daemon {
    /// Write `yaml` (plus spool_dir and an ephemeral port unless given) to a config file in
    /// a fresh temporary directory and start the daemon on it.
    pub fn start(yaml: &str) -> Daemon {
        Self::start_with_env(yaml, &[])
    }

    /// As `start`, with extra environment variables.
    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("erlmail.yaml");
        std::fs::write(&config, Self::complete_yaml(yaml, dir.path())).unwrap();
        let mut d = Self::spawn(dir, config, env);
        d.addr = d.wait_for_listener();
        d
    }

    /// The config text with the test defaults added.
    pub fn complete_yaml(yaml: &str, dir: &Path) -> String {
        let mut text = yaml.to_string();
        if !text.ends_with('\n') && !text.is_empty() {
            text.push('\n');
        }
        if !yaml.contains("spool_dir") {
            text.push_str(&format!("spool_dir: \"{}\"\n", dir.join("spool").display()));
        }
        if !yaml.contains("server_smtp_port") {
            text.push_str("server_smtp_port: 0\n");
        }
        if !yaml.contains("server_smtp_address") {
            text.push_str("server_smtp_address: \"127.0.0.1\"\n");
        }
        if !yaml.contains("admin_listen") {
            text.push_str("admin_listen: \"\"\n");
        }
        // Never the system resolver: SPF/DKIM/DMARC look-ups for local mail (and any MX
        // look-up) go to a loopback port where nothing answers, unless the test runs a
        // DNS server of its own.
        if !yaml.contains("dns_nameservers") {
            text.push_str("dns_nameservers: [\"127.0.0.1:9\"]\n");
        }
        text
    }

    /// Spawn `erlmail serve` on an existing config, without waiting.
    pub fn spawn(dir: tempfile::TempDir, config: PathBuf, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(bin());
        cmd.arg("--config").arg(&config).arg("serve");
        cmd.env_remove("ERLMAIL_CONFIG");
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.current_dir(dir.path());
        Self::spawn_cmd(cmd, dir, config)
    }

    /// Spawn any prepared command, collecting its stderr.
    pub fn spawn_cmd(mut cmd: Command, dir: tempfile::TempDir, config: PathBuf) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn erlmail serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("ERLMAIL_TEST_ECHO").is_some() {
                        eprintln!("[erlmail] {line}");
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        Daemon {
            child,
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            config,
        }
    }

    /// Wait for the `listening on ADDR` line and return ADDR.
    pub fn wait_for_listener(&mut self) -> SocketAddr {
        let line = self.wait_for_log("listening on ", Duration::from_secs(30));
        let rest = line.rsplit("listening on ").next().unwrap();
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        addr.parse()
            .unwrap_or_else(|e| panic!("listener address in {line:?}: {e}"))
    }

    /// Wait until a log line contains `needle`; panics with the log on timeout.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_after(0, needle, timeout)
    }

    /// Wait until a log line at index >= `from` contains `needle`.
    pub fn wait_for_log_after(&mut self, from: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let found = |log: &Mutex<Vec<String>>| {
            log.lock()
                .unwrap()
                .iter()
                .skip(from)
                .find(|l| l.contains(needle))
                .cloned()
        };
        loop {
            if let Some(l) = found(&self.log) {
                return l;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to drain.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(l) = found(&self.log) {
                    return l;
                }
                panic!(
                    "erlmail exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line with {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of log lines so far (a mark for `wait_for_log_after`).
    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Replaces the config file with `config`, sends SIGHUP and waits (10 s at most) for
    /// a log line after the signal that contains `expect`; returns that line.
    pub fn reload(&mut self, config: &str, expect: &str) -> String {
        std::fs::write(&self.config, config).unwrap();
        let mark = self.log_len();
        self.signal("HUP");
        self.wait_for_log_after(mark, expect, Duration::from_secs(10))
    }

    /// The config file as it is now.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }

    /// Send a signal to the daemon.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    /// Wait for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Run an admin command against this daemon's configuration.
    pub fn admin(&self, args: &[&str], stdin: Option<&str>) -> (ExitStatus, String, String) {
        erlmail(&self.config, args, stdin)
    }

    /// The admin endpoint's address (`admin_listen` with port 0), from the log.
    pub fn admin_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_log("admin endpoint listening on", Duration::from_secs(10));
        let rest = line.rsplit("listening on ").next().unwrap();
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | ':'))
            .collect();
        addr.parse().unwrap()
    }

    /// The port of the implicit-TLS listener (`server_smtp_tls_port: 0`), from the log.
    pub fn tls_port(&mut self) -> u16 {
        let line = self.wait_for_log("smtpd_listener_tls", Duration::from_secs(10));
        let line = if line.contains("listening on") {
            line
        } else {
            self.wait_for_log("listening on 127.0.0.1", Duration::from_secs(10))
        };
        line.rsplit(':')
            .next()
            .unwrap()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    }

    /// Open an SMTP connection and read the greeting.
    pub fn connect(&self) -> Smtp {
        Smtp::connect(self.addr)
    }

    /// Open an SMTP connection, read the greeting and say `EHLO name` (asserted accepted).
    pub fn connect_ehlo(&self, name: &str) -> Smtp {
        let mut s = self.connect();
        let r = s.cmd(&format!("EHLO {name}"));
        assert!(r.starts_with("250"), "EHLO {name}: {r}");
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal line-oriented SMTP client for tests.
pub struct Smtp {
    /// The connection.
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The greeting line(s).
    pub greeting: String,
}

impl Smtp {
    /// Connect and read the greeting.
    pub fn connect(addr: SocketAddr) -> Smtp {
        Smtp::over(TcpStream::connect(addr).expect("connect"))
    }

    /// Connect from the loopback address `from` (another host, as the server sees it)
    /// and read the greeting.
    pub fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> Smtp {
        let domain = socket2::Domain::for_address(addr);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).expect("socket");
        socket
            .bind(&SocketAddr::new(from, 0).into())
            .expect("bind the client address");
        socket.connect(&addr.into()).expect("connect");
        Smtp::over(socket.into())
    }

    fn over(stream: TcpStream) -> Smtp {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut s = Smtp {
            stream,
            reader,
            greeting: String::new(),
        };
        s.greeting = s.read_reply();
        s
    }

    /// Read one (possibly multi-line) reply, lines joined with `\n`.
    pub fn read_reply(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read reply");
            if n == 0 {
                break;
            }
            let l = line.trim_end_matches(['\r', '\n']).to_string();
            let more = l.len() > 3 && l.as_bytes()[3] == b'-';
            out.push(l);
            if !more {
                break;
            }
        }
        out.join("\n")
    }

    /// Send one command line (CRLF added) and read its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        self.read_reply()
    }

    /// Send raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// `mail` (`MAIL FROM:…`), each of `rcpts` (`RCPT TO:…`) and `DATA`, each asserted
    /// accepted; the message text comes next.
    pub fn begin_data(&mut self, mail: &str, rcpts: &[&str]) {
        for line in std::iter::once(mail).chain(rcpts.iter().copied()) {
            let r = self.cmd(line);
            assert!(r.starts_with("250"), "{line}: {r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
    }

    /// `send_mail`, asserting that the message was accepted.
    pub fn send_ok(&mut self, from: &str, to: &[&str], body: &str) {
        let r = self.send_mail(from, to, body);
        assert!(r.starts_with("250"), "{r}");
    }

    /// A whole transaction; returns the reply to the final dot.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        let rcpts: Vec<String> = to.iter().map(|t| format!("RCPT TO:<{t}>")).collect();
        let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        self.transaction(&format!("MAIL FROM:<{from}>"), &rcpts, body.as_bytes())
    }

    /// A whole transaction with the given `MAIL` and `RCPT` lines (see `begin_data`) and
    /// message text (CRLF-terminated); returns the reply to the final dot.
    pub fn transaction(&mut self, mail: &str, rcpts: &[&str], text: &[u8]) -> String {
        self.begin_data(mail, rcpts);
        self.send_raw(text);
        self.cmd(".")
    }
}

/// `GET path` on the admin endpoint at `addr`; the body of its 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the admin endpoint");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    body.to_string()
}

impl Daemon {
    /// `erlmail domain add` the domain of `address`, then `erlmail user add address`
    /// with password `pw`.
    pub fn add_user(&self, address: &str) {
        self.add_user_with_password(address, "pw");
    }

    /// As `add_user`, with password `password`.
    pub fn add_user_with_password(&self, address: &str, password: &str) {
        let domain = address.rsplit_once('@').expect("an address").1;
        let (ok, _, err) = self.admin(&["domain", "add", domain], None);
        assert!(ok.success(), "domain add {domain}: {err}");
        let (ok, _, err) = self.admin(&["user", "add", address], Some(&format!("{password}\n")));
        assert!(ok.success(), "user add {address}: {err}");
    }

    /// `Daemon::start(yaml)` with the user `address` (password `password`) added.
    pub fn start_with_user(yaml: &str, address: &str, password: &str) -> Daemon {
        let d = Daemon::start(yaml);
        d.add_user_with_password(address, password);
        d
    }

    /// Whether `erlmail queue list` says the queue is empty.
    pub fn queue_is_empty(&self) -> bool {
        self.queue_list().contains("Mail queue is empty")
    }

    /// Waits until the queue is empty; fails the test after `timeout`.
    pub fn wait_queue_empty(&self, timeout: Duration) {
        wait_until("empty queue", timeout, || self.queue_is_empty());
    }

    /// The output of `erlmail queue list` (which must succeed).
    pub fn queue_list(&self) -> String {
        let (status, out, err) = self.admin(&["queue", "list"], None);
        assert!(status.success(), "queue list: {err}");
        out
    }
}

/// Polls `f` every 50 ms until it holds; fails the test after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that `text` contains each of `wanted`, naming the first one missing.
pub fn assert_contains_all(text: &str, wanted: &[&str]) {
    for want in wanted {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
}

/// The first word of the first entry under the heading of an `erlmail … list` table (its
/// id).
pub fn first_listed_id(list: &str) -> &str {
    list.lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
}

/// A self-signed certificate for `localhost` in a fresh temporary directory (keep it
/// while the daemon runs), and the configuration lines that point the daemon at it
/// (`server_smtp_tls_cert`, `server_smtp_tls_key`).
pub fn test_certificate() -> (tempfile::TempDir, String) {
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let yaml = format!(
        "server_smtp_tls_cert: \"{}\"\nserver_smtp_tls_key: \"{}\"\n",
        cert.display(),
        key.display()
    );
    (certs, yaml)
}

/// `erlmail ARGS | head -0`: the reader is gone before the first line.
pub fn into_closed_pipe(config: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("ERLMAIL_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn erlmail");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
