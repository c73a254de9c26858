//! Test support for the reliability suite (issue 7): a load client that numbers every
//! message (`X-Seq:`) and records what the server answered to each, a fault-injecting
//! SMTP next hop, a ledger that compares what was accepted with what arrived, process
//! probes (RSS, open fds) and the `CHAOS-ROW` lines that `scripts/chaos` turns into a
//! table. Everything talks to 127.0.0.1 only. It never decides pass or fail by timing:
//! deadlines here only bound how long a test may wait for something that must happen.
//! Include it with `#[path = "support/chaos.rs"] mod chaos;` (and `support/wire.rs` as
//! `mod wire`, which it uses).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A scale knob: `ERLMAIL_CHAOS_LONG=1` (set by `scripts/chaos`) selects the long form.
pub fn long() -> bool {
    std::env::var_os("ERLMAIL_CHAOS_LONG").is_some()
}

/// `name` from the environment as a number, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Print one result row for `scripts/chaos`: `CHAOS-ROW case=NAME k=v ...`.
pub fn row(case: &str, fields: &[(&str, String)]) {
    let mut line = format!("CHAOS-ROW case={case}");
    for (k, v) in fields {
        line.push_str(&format!(" {k}={v}"));
    }
    println!("{line}");
}

/// A free loopback port (bound then released), for a daemon that must keep its port
/// across restarts.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Resident set size of `pid` in KiB (VmRSS).
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Number of open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The ledger: what the server said to each numbered message.

/// What the client knows about one numbered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 250 after the final dot: the server owns it.
    Accepted,
    /// An explicit non-2xx reply (to the dot or earlier in the transaction).
    Rejected(u16),
    /// The dot was never sent (connection refused or lost before it).
    Unsent,
    /// The dot was sent and the connection died before any reply: either is allowed.
    Uncertain,
}

/// Every numbered message's outcome.
#[derive(Default)]
pub struct Ledger {
    outcomes: Mutex<BTreeMap<u64, Outcome>>,
}

impl Ledger {
    /// Record `seq`'s outcome.
    pub fn set(&self, seq: u64, o: Outcome) {
        self.outcomes.lock().unwrap().insert(seq, o);
    }

    /// A copy of every outcome.
    pub fn snapshot(&self) -> BTreeMap<u64, Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Sequence numbers that got a 250.
    pub fn accepted(&self) -> Vec<u64> {
        self.snapshot()
            .into_iter()
            .filter(|(_, o)| *o == Outcome::Accepted)
            .map(|(s, _)| s)
            .collect()
    }

    /// How many outcomes match `f`.
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .values()
            .filter(|o| f(o))
            .count()
    }
}

/// The body of message `seq`, `pad` filler lines long; it ends with `END <seq>` so a
/// truncated copy is recognisable.
pub fn body(seq: u64, pad: usize) -> String {
    let mut b = format!(
        "From: load@client.test\r\nTo: sink@remote.test\r\nSubject: seq {seq}\r\nX-Seq: {seq}\r\n\r\n"
    );
    for i in 0..pad {
        b.push_str(&format!(
            "line {i} of message {seq}: the quick brown fox jumps over the lazy dog\r\n"
        ));
    }
    b.push_str(&format!("END {seq}\r\n"));
    b
}

/// The `X-Seq:` value in a delivered message.
pub fn seq_of(data: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(data);
    let header_end = text.find("\r\n\r\n").unwrap_or(text.len());
    text[..header_end]
        .lines()
        .find_map(|l| l.strip_prefix("X-Seq: "))
        .and_then(|v| v.trim().parse().ok())
}

/// What arrived compared with what the ledger says.
#[derive(Debug, Default)]
pub struct Tally {
    /// Messages that got a 250.
    pub accepted: usize,
    /// Explicit refusals.
    pub rejected: usize,
    /// Never sent.
    pub unsent: usize,
    /// No reply to the dot.
    pub uncertain: usize,
    /// Distinct messages that arrived.
    pub delivered: usize,
    /// Extra copies that arrived (total arrivals - distinct).
    pub duplicates: usize,
    /// Accepted but never arrived.
    pub lost: Vec<u64>,
    /// Arrived, but not byte for byte what was sent.
    pub cut_short: Vec<u64>,
    /// Arrived although refused or never sent.
    pub unexpected: Vec<u64>,
    /// Uncertain ones that arrived anyway (allowed).
    pub uncertain_delivered: usize,
    /// Sequence numbers that arrived more than once.
    pub duplicated: Vec<u64>,
}

/// Compare the arrivals (`data` of each delivered message) with the ledger; `pad` is
/// the body size used by the load.
pub fn tally(ledger: &Ledger, arrivals: &[Vec<u8>], pad: usize) -> Tally {
    let outcomes = ledger.snapshot();
    let mut t = Tally::default();
    for o in outcomes.values() {
        match o {
            Outcome::Accepted => t.accepted += 1,
            Outcome::Rejected(_) => t.rejected += 1,
            Outcome::Unsent => t.unsent += 1,
            Outcome::Uncertain => t.uncertain += 1,
        }
    }
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for data in arrivals {
        let Some(seq) = seq_of(data) else { continue };
        *seen.entry(seq).or_default() += 1;
        if !data.ends_with(body(seq, pad).as_bytes()) && !t.cut_short.contains(&seq) {
            t.cut_short.push(seq);
        }
    }
    t.delivered = seen.len();
    t.duplicates = seen.values().map(|n| n - 1).sum();
    t.duplicated = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    t.duplicated.sort_unstable();
    for (seq, o) in &outcomes {
        let arrived = seen.contains_key(seq);
        match o {
            Outcome::Accepted if !arrived => t.lost.push(*seq),
            Outcome::Rejected(_) | Outcome::Unsent if arrived => t.unexpected.push(*seq),
            Outcome::Uncertain if arrived => t.uncertain_delivered += 1,
            _ => {}
        }
    }
    for seq in seen.keys() {
        if !outcomes.contains_key(seq) {
            t.unexpected.push(*seq);
        }
    }
    t
}

// ---------------------------------------------------------------------------------------
// The load client.

/// How the load runs.
#[derive(Clone)]
pub struct Load {
    /// The server.
    pub addr: SocketAddr,
    /// Messages to send in all.
    pub total: u64,
    /// Parallel connections.
    pub concurrency: usize,
    /// Transactions per connection before QUIT.
    pub per_conn: usize,
    /// Filler lines per body.
    pub pad: usize,
    /// Overall rate limit (messages per second), if any.
    pub rate: Option<f64>,
    /// The recipient.
    pub rcpt: String,
}

/// A running load: the ledger fills as replies come back.
pub struct LoadRun {
    /// Outcomes so far.
    pub ledger: Arc<Ledger>,
    /// Set to stop sending new messages.
    pub stop: Arc<AtomicBool>,
    /// Messages begun.
    pub started: Arc<AtomicU64>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl LoadRun {
    /// Whether every worker finished.
    pub fn finished(&self) -> bool {
        self.handles.iter().all(|h| h.is_finished())
    }

    /// Wait for every worker.
    pub async fn join(self) -> Arc<Ledger> {
        for h in self.handles {
            let _ = h.await;
        }
        self.ledger
    }
}

/// Start the load on the current runtime.
pub fn start_load(load: Load) -> LoadRun {
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(1));
    let t0 = Instant::now();
    let handles = (0..load.concurrency)
        .map(|_| {
            let (load, ledger, stop, next) =
                (load.clone(), ledger.clone(), stop.clone(), next.clone());
            tokio::spawn(async move { worker(load, ledger, stop, next, t0).await })
        })
        .collect();
    LoadRun {
        ledger,
        stop,
        started: next,
        handles,
    }
}

/// Read one reply; the code of its last line and the whole text.
pub async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u16, String)> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        all.push_str(&line);
        let b = line.as_bytes();
        if b.len() < 4 || b[3] != b'-' {
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            return Ok((code, all));
        }
    }
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

async fn command(io: &mut BufReader<TcpStream>, line: &str) -> std::io::Result<(u16, String)> {
    io.get_mut().write_all(line.as_bytes()).await?;
    tokio::time::timeout(REPLY_TIMEOUT, read_reply(io))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn worker(
    load: Load, ledger: Arc<Ledger>, stop: Arc<AtomicBool>, next: Arc<AtomicU64>, t0: Instant,
) {
    let mut pending: Option<u64> = None;
    'conn: loop {
        if stop.load(Ordering::SeqCst) && pending.is_none() {
            return;
        }
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(load.addr)).await
        else {
            if let Some(seq) = pending.take() {
                ledger.set(seq, Outcome::Unsent);
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut io = BufReader::new(stream);
        let greeting = tokio::time::timeout(REPLY_TIMEOUT, read_reply(&mut io)).await;
        if !matches!(greeting, Ok(Ok((220, _)))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if !matches!(command(&mut io, "EHLO load.test\r\n").await, Ok((250, _))) {
            continue;
        }
        for _ in 0..load.per_conn {
            let seq = match pending.take() {
                Some(s) => s,
                None => {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let s = next.fetch_add(1, Ordering::SeqCst);
                    if s > load.total {
                        let _ = io.get_mut().write_all(b"QUIT\r\n").await;
                        return;
                    }
                    if let Some(rate) = load.rate {
                        let due = t0 + Duration::from_secs_f64((s - 1) as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    s
                }
            };
            match transaction(&mut io, &load, seq).await {
                Step::Done(o) => ledger.set(seq, o),
                Step::Lost(o) => {
                    ledger.set(seq, o);
                    continue 'conn;
                }
            }
        }
        let _ = command(&mut io, "QUIT\r\n").await;
    }
}

enum Step {
    /// The connection is still usable.
    Done(Outcome),
    /// The connection is gone (or unusable) after this outcome.
    Lost(Outcome),
}

async fn transaction(io: &mut BufReader<TcpStream>, load: &Load, seq: u64) -> Step {
    for line in [
        "MAIL FROM:<load@client.test>\r\n".to_string(),
        format!("RCPT TO:<{}>\r\n", load.rcpt),
    ] {
        match command(io, &line).await {
            Ok((250, _)) => {}
            Ok((code, _)) => {
                let _ = command(io, "RSET\r\n").await;
                return Step::Lost(Outcome::Rejected(code));
            }
            Err(_) => return Step::Lost(Outcome::Unsent),
        }
    }
    match command(io, "DATA\r\n").await {
        Ok((354, _)) => {}
        Ok((code, _)) => return Step::Lost(Outcome::Rejected(code)),
        Err(_) => return Step::Lost(Outcome::Unsent),
    }
    let text = body(seq, load.pad);
    if io.get_mut().write_all(text.as_bytes()).await.is_err() {
        return Step::Lost(Outcome::Unsent);
    }
    match command(io, ".\r\n").await {
        Ok((250, _)) => Step::Done(Outcome::Accepted),
        Ok((code, _)) if (400..600).contains(&code) => {
            // A 421 closes the session; others leave it usable.
            if code == 421 {
                Step::Lost(Outcome::Rejected(code))
            } else {
                Step::Done(Outcome::Rejected(code))
            }
        }
        _ => Step::Lost(Outcome::Uncertain),
    }
}

// ---------------------------------------------------------------------------------------
// The fault sink.

/// A fault the next hop can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Read the whole message, then close without a reply to the final dot.
    DropAfterDot,
    /// Answer `421 4.3.0` to the final dot and close.
    Reply421AfterDot,
    /// Say nothing for this long after RCPT TO (past the client's timeout).
    StallAtRcpt(Duration),
    /// Answer `452 4.2.2` to RCPT TO.
    Rcpt452,
    /// Take the message, but answer its final dot only after this long (a slow next
    /// hop: the sender stays mid-delivery meanwhile).
    SlowDot(Duration),
    /// Answer DATA with its 354 only after this long.
    SlowData(Duration),
}

/// Apply `fault` to the first `times` recipients (or transactions) whose local part
/// starts with `prefix`.
#[derive(Debug, Clone)]
pub struct FaultRule {
    /// Local-part prefix.
    pub prefix: String,
    /// What to do.
    pub fault: Fault,
    /// How many times (`usize::MAX`: always).
    pub times: usize,
}

/// One message the fault sink accepted.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When the 250 went out.
    pub at: Instant,
    /// When its MAIL FROM came: a copy whose sender is killed mid-transaction can still
    /// arrive (the kernel delivers what was written) after the kill.
    pub started: Instant,
    /// MAIL FROM.
    pub mail_from: String,
    /// Accepted recipients.
    pub rcpts: Vec<String>,
    /// The data, dot-stuffing undone.
    pub data: Vec<u8>,
}

#[derive(Default)]
struct FaultState {
    arrivals: Vec<Arrival>,
    /// (prefix, fault) -> times applied.
    applied: HashMap<(String, String), usize>,
    /// Log of injected faults, in order.
    injected: Vec<String>,
}

struct FaultShared {
    rules: Vec<FaultRule>,
    state: Mutex<FaultState>,
    active: AtomicUsize,
    sessions: AtomicUsize,
    /// While set, MAIL FROM gets `451 4.3.2` (the next hop is "down").
    closed: AtomicBool,
}

/// An SMTP next hop (no STARTTLS) that injects faults by rule and counts live sessions.
pub struct FaultSink {
    addr: SocketAddr,
    shared: Arc<FaultShared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultSink {
    /// Start with one rule: `fault` for every recipient whose local part starts with
    /// `prefix`, every time.
    pub async fn always(prefix: &str, fault: Fault) -> FaultSink {
        Self::start(vec![FaultRule {
            prefix: prefix.into(),
            fault,
            times: usize::MAX,
        }])
        .await
    }

    /// Start on 127.0.0.1:<ephemeral> with `rules`.
    pub async fn start(rules: Vec<FaultRule>) -> FaultSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(FaultShared {
            rules,
            state: Mutex::new(FaultState::default()),
            active: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                s.sessions.fetch_add(1, Ordering::SeqCst);
                s.active.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = fault_session(stream, &s).await;
                    s.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FaultSink { addr, shared, task }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sessions open right now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Sessions ever opened.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.load(Ordering::SeqCst)
    }

    /// Refuse (451 at MAIL) or accept mail.
    pub fn set_closed(&self, closed: bool) {
        self.shared.closed.store(closed, Ordering::SeqCst);
    }

    /// Every accepted message.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.state.lock().unwrap().arrivals.clone()
    }

    /// Just the data of every accepted message.
    pub fn datas(&self) -> Vec<Vec<u8>> {
        self.shared
            .state
            .lock()
            .unwrap()
            .arrivals
            .iter()
            .map(|a| a.data.clone())
            .collect()
    }

    /// How many messages were accepted.
    pub fn count(&self) -> usize {
        self.shared.state.lock().unwrap().arrivals.len()
    }

    /// The faults injected so far, e.g. `drop:drop2`.
    pub fn injected(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().injected.clone()
    }
}

impl Drop for FaultSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fault_name(f: Fault) -> &'static str {
    match f {
        Fault::DropAfterDot => "drop",
        Fault::Reply421AfterDot => "421",
        Fault::StallAtRcpt(_) => "stall",
        Fault::Rcpt452 => "452",
        Fault::SlowDot(_) => "slow-dot",
        Fault::SlowData(_) => "slow-data",
    }
}

impl FaultShared {
    /// The fault to apply to `local` at the stage `stage` selects, counting it.
    fn take_fault(&self, local: &str, stage: impl Fn(Fault) -> bool) -> Option<Fault> {
        let mut st = self.state.lock().unwrap();
        for r in &self.rules {
            if !local.starts_with(&r.prefix) || !stage(r.fault) {
                continue;
            }
            let key = (r.prefix.clone(), fault_name(r.fault).to_string());
            let n = st.applied.entry(key).or_default();
            if *n < r.times {
                *n += 1;
                st.injected
                    .push(format!("{}:{}", fault_name(r.fault), r.prefix));
                return Some(r.fault);
            }
        }
        None
    }
}

fn local_part(addr: &str) -> String {
    addr.split('@').next().unwrap_or("").to_ascii_lowercase()
}

async fn fault_session(stream: TcpStream, s: &FaultShared) -> std::io::Result<()> {
    let mut io = BufReader::new(stream);
    io.get_mut()
        .write_all(b"220 faults.test ESMTP fault sink\r\n")
        .await?;
    let mut mail: Option<String> = None;
    let mut started = Instant::now();
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let Some(text) = crate::wire::read_command(&mut io).await? else {
            return Ok(());
        };
        let upper = text.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            "250-faults.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES".into()
        } else if upper.starts_with("HELO") {
            "250 faults.test".into()
        } else if upper.starts_with("MAIL FROM:") {
            if s.closed.load(Ordering::SeqCst) {
                "451 4.3.2 next hop closed for the test".into()
            } else {
                mail = Some(crate::wire::angle(&text[10..]));
                started = Instant::now();
                rcpts.clear();
                "250 2.1.0 Ok".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = crate::wire::angle(&text[8..]);
            let local = local_part(&rcpt);
            match s.take_fault(&local, |f| {
                matches!(f, Fault::StallAtRcpt(_) | Fault::Rcpt452)
            }) {
                Some(Fault::StallAtRcpt(d)) => {
                    tokio::time::sleep(d).await;
                    return Ok(());
                }
                Some(_) => format!("452 4.2.2 <{rcpt}>: Mailbox full, try again later"),
                None => {
                    rcpts.push(rcpt);
                    "250 2.1.5 Ok".into()
                }
            }
        } else if upper == "DATA" {
            if mail.is_none() || rcpts.is_empty() {
                "554 5.5.1 Error: no valid recipients".into()
            } else {
                let slow = rcpts.iter().find_map(|r| {
                    s.take_fault(&local_part(r), |f| matches!(f, Fault::SlowData(_)))
                });
                if let Some(Fault::SlowData(d)) = slow {
                    tokio::time::sleep(d).await;
                }
                io.get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let Some(data) = crate::wire::read_data(&mut io).await? else {
                    return Ok(());
                };
                let after_dot = |f: Fault| {
                    matches!(
                        f,
                        Fault::DropAfterDot | Fault::Reply421AfterDot | Fault::SlowDot(_)
                    )
                };
                let fault = rcpts
                    .iter()
                    .find_map(|r| s.take_fault(&local_part(r), after_dot));
                match fault {
                    Some(Fault::DropAfterDot) => return Ok(()),
                    Some(Fault::SlowDot(d)) => tokio::time::sleep(d).await,
                    Some(_) => {
                        io.get_mut()
                            .write_all(b"421 4.3.0 faults.test closing on purpose\r\n")
                            .await?;
                        return Ok(());
                    }
                    None => {}
                }
                s.state.lock().unwrap().arrivals.push(Arrival {
                    at: Instant::now(),
                    started,
                    mail_from: mail.take().unwrap_or_default(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                });
                "250 2.0.0 Ok: queued".into()
            }
        } else if let Some(r) = crate::wire::reset_or_noop(&upper, &mut mail, &mut rcpts) {
            r.into()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Error: command not recognized".into()
        };
        io.get_mut()
            .write_all(format!("{reply}\r\n").as_bytes())
            .await?;
    }
}
