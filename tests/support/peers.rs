//! Test support: real SMTP peers that nobody here wrote (swaks, Python's smtplib,
//! Postfix's smtp-source and smtp-sink), run as child processes on 127.0.0.1 only.
//!
//! A missing peer is a test failure, never a skip: `require` panics with the install
//! hint. `run` runs a command with a deadline and returns its output; `SmtpSink` runs
//! `smtp-sink` with one dump file per transaction in a private directory and parses
//! those files back, so a test counts exactly what arrived. Include it from an
//! integration test with `#[path = "support/peers.rs"] mod peers;`.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/test` installs the peers, for the failure message.
const INSTALL_HINT: &str = "install the interop peers with scripts/test (Debian packages \
     postfix and swaks, PyPI aiosmtpd)";

/// The full path of a peer program; panics (the test fails) when it is not installed.
pub fn require(program: &str) -> PathBuf {
    // smtp-source and smtp-sink live in /usr/sbin, which is not always on a user's PATH.
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("interop peer {program:?} is not installed: {INSTALL_HINT}");
}

/// What a finished child process said.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// Wall time it took.
    pub elapsed: Duration,
}

impl Output {
    /// Panics with everything the command said unless it exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

fn drain(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut s) = stream {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    })
}

/// Run `cmd` to completion, killing it (and panicking with its output) after `timeout`.
/// Standard input is the bytes given, or empty.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let start = Instant::now();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {shown}: {e} ({INSTALL_HINT})"));
    let input = stdin.map(<[u8]>::to_vec).unwrap_or_default();
    let mut child_stdin = child.stdin.take();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        if let Some(s) = child_stdin.as_mut() {
            let _ = s.write_all(&input);
        }
        drop(child_stdin);
    });
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("{shown} did not finish within {timeout:?}:\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: String::from_utf8_lossy(&out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// A loopback port that was free a moment ago (for peers that cannot report the port
/// they bound).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Whether this process runs as root (smtp-sink then needs `-u nobody`).
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// One transaction as smtp-sink dumped it.
#[derive(Debug, Clone)]
pub struct Dump {
    /// The file it came from.
    pub file: PathBuf,
    /// `X-Helo-Args`, if the client greeted.
    pub helo: Option<String>,
    /// `X-Mail-Args`: the MAIL FROM arguments, e.g. `<a@b.test>` or `<a@b.test> SIZE=10`.
    pub mail: String,
    /// One `X-Rcpt-Args` per RCPT, in order.
    pub rcpts: Vec<String>,
    /// The message as received (lines joined with `\n`), after smtp-sink's own
    /// three-line `Received:` header.
    pub message: String,
}

/// Postfix's smtp-sink on 127.0.0.1, dumping each transaction to its own file.
pub struct SmtpSink {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The dump directory (one file per transaction).
    pub dir: tempfile::TempDir,
}

impl SmtpSink {
    /// Start smtp-sink and wait until it accepts connections; `extra` are more options
    /// (e.g. `["-p"]`). Panics if the program is missing.
    pub fn start(extra: &[&str]) -> SmtpSink {
        let program = require("smtp-sink");
        let mut last_err = String::new();
        // The port is picked free and then handed over, so a rare race can lose it:
        // try a few ports.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let root = running_as_root();
            if root {
                // smtp-sink drops to `nobody`, who must be able to create the dump files.
                let status = Command::new("chmod")
                    .arg("0777")
                    .arg(dir.path())
                    .status()
                    .unwrap();
                assert!(status.success(), "chmod dump dir");
            }
            let port = free_port();
            let mut cmd = Command::new(&program);
            if root {
                cmd.args(["-u", "nobody"]);
            }
            // One file per transaction: template directory plus "m." and smtp-sink's
            // random hex suffix; the time part keeps name collisions out of the question.
            let template = format!("{}/%H%M%S.m.", dir.path().display());
            cmd.arg("-d").arg(template).args(extra);
            cmd.arg(format!("127.0.0.1:{port}")).arg("256");
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn smtp-sink: {e} ({INSTALL_HINT})"));
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    last_err = format!("smtp-sink exited {status}: {err}");
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    // That probe was a session of its own; it carried no transaction.
                    return SmtpSink { child, addr, dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = "smtp-sink did not listen within 10s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start smtp-sink: {last_err}");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Number of dump files (transactions that reached MAIL FROM).
    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Wait until at least `n` transactions are dumped; false on timeout.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count() >= n {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the count has stayed the same for `quiet`, and return it.
    pub fn settle(&self, quiet: Duration) -> usize {
        let mut last = self.count();
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.count();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return now;
            }
        }
    }

    /// Every dumped transaction, parsed.
    pub fn dumps(&self) -> Vec<Dump> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files.iter().map(|f| parse_dump(f)).collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parse one smtp-sink dump file (format in smtp-sink(1), DUMP FILE FORMAT).
pub fn parse_dump(file: &Path) -> Dump {
    let bytes = std::fs::read(file).unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let mut helo = None;
    let mut mail = String::new();
    let mut rcpts = Vec::new();
    let mut lines = text.split('\n').peekable();
    // smtp-sink's records, up to and including its three-line Received: header.
    while let Some(line) = lines.next() {
        if let Some(v) = line.strip_prefix("X-Helo-Args: ") {
            helo = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("X-Mail-Args: ") {
            mail = v.to_string();
        } else if let Some(v) = line.strip_prefix("X-Rcpt-Args: ") {
            rcpts.push(v.to_string());
        } else if line.starts_with("Received: ") {
            while lines.peek().is_some_and(|l| l.starts_with('\t')) {
                lines.next();
            }
            break;
        }
    }
    let message = lines.collect::<Vec<_>>().join("\n");
    Dump {
        file: file.to_path_buf(),
        helo,
        mail,
        rcpts,
        message,
    }
}

/// A message as the aiosmtpd sink received it.
#[derive(Debug, Clone)]
pub struct AioMessage {
    /// HELO/EHLO name the client gave.
    pub helo: String,
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub rcpts: Vec<String>,
    /// MAIL FROM parameters.
    pub mail_options: Vec<String>,
    /// The content exactly as received, with dot-stuffing undone.
    pub data: Vec<u8>,
}

/// A second, independent next hop: an SMTP sink written on Python's aiosmtpd, appending
/// one JSON line per accepted message to a file.
const AIOSMTPD_SINK: &str = r#"
import asyncio, json, sys
from aiosmtpd.smtp import SMTP
out_path = sys.argv[1]
class Handler:
    async def handle_DATA(self, server, session, envelope):
        line = json.dumps({
            "helo": session.host_name or "",
            "from": envelope.mail_from,
            "rcpts": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "data": envelope.original_content.decode("latin-1"),
        }) + "\n"
        with open(out_path, "a") as f:
            f.write(line)
        return "250 2.0.0 Ok: stored"
async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: SMTP(Handler(), decode_data=False, enable_SMTPUTF8=True),
        "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
"#;

/// The aiosmtpd sink on 127.0.0.1.
pub struct AioSink {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl AioSink {
    /// Start it and wait for its port; panics if python3 or aiosmtpd is missing.
    pub fn start() -> AioSink {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("messages.jsonl");
        let mut child = Command::new(require("python3"))
            .arg("-c")
            .arg(AIOSMTPD_SINK)
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3: {e} ({INSTALL_HINT})"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Ok(port) = line.trim().parse::<u16>() else {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("aiosmtpd sink did not start ({line:?}): {err}\n{INSTALL_HINT}");
        };
        AioSink {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            file,
            _dir: dir,
        }
    }

    /// Every message accepted so far.
    pub fn messages(&self) -> Vec<AioMessage> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let strings = |k: &str| -> Vec<String> {
                    v[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_str().unwrap().to_string())
                        .collect()
                };
                AioMessage {
                    helo: v["helo"].as_str().unwrap().to_string(),
                    from: v["from"].as_str().unwrap().to_string(),
                    rcpts: strings("rcpts"),
                    mail_options: strings("mail_options"),
                    // latin-1 maps each byte to the char of the same value.
                    data: v["data"]
                        .as_str()
                        .unwrap()
                        .chars()
                        .map(|c| c as u8)
                        .collect(),
                }
            })
            .collect()
    }

    /// Wait until at least `n` messages arrived; false on timeout.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.messages().len() < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

impl Drop for AioSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
