//! An erlmail cluster: several `erlmail serve` processes (own `node_name`, own ports) on
//! one PostgreSQL database relay messages injected across all of them to one sink, and
//! each message is delivered exactly once; a node killed with SIGKILL loses nothing (the
//! others take over its leases when they lapse); a PostgreSQL restart during a run turns
//! into `451 4.3.0` answers and loses nothing; and domains and users added through one
//! node are served by all.
//!
//! The PostgreSQL-restart test stops and starts the local cluster with `pg_ctlcluster`
//! (as root); where there is no local cluster under /etc/postgresql it prints a note and
//! passes without running.
//!
//! Needs `ERLMAIL_TEST_PG` (e.g. `postgres://postgres@127.0.0.1:5432/test`): unset, the
//! tests print a note and pass without running; set and unreachable, they fail. Each test
//! runs on a database of its own, `erlmail_test_<random>`, dropped at the end.

#[path = "support/chaos.rs"]
mod chaos;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/pg.rs"]
mod pg;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::Daemon;
use pg::TestDb;
use sink::{Sink, SinkConfig};

// `pg::TestDb` is declared before the daemons of a test, so they are dropped first.

/// Sends message `i` (`X-Seq: i`) from a@client.test to b@remote.test for each of `seqs`
/// in one session with `d` (node `via`), each asserted accepted.
fn send_numbered(d: &Daemon, via: &str, seqs: impl Iterator<Item = usize>) {
    let mut s = d.connect_ehlo("client.test");
    for i in seqs {
        let r = s.send_mail(
            "a@client.test",
            &["b@remote.test"],
            &format!("Subject: m{i}\r\nX-Seq: {i}\r\n\r\nbody {i}\r\n"),
        );
        assert!(r.starts_with("250"), "message {i} via {via}: {r}");
    }
    let _ = s.cmd("QUIT");
}

/// Sends messages `0..n` at once over `lanes` sessions, lane `l` through node
/// `nodes[l % nodes.len()]`: message `i` goes through lane `i % lanes`.
fn send_in_lanes(nodes: &[(&Daemon, &str)], lanes: usize, n: usize) {
    std::thread::scope(|sc| {
        for lane in 0..lanes {
            let (d, via) = nodes[lane % nodes.len()];
            sc.spawn(move || send_numbered(d, via, (lane..n).step_by(lanes)));
        }
    });
}

/// How many copies of each `X-Seq:` number reached `sink`.
fn seqs_seen(sink: &Sink) -> HashMap<usize, usize> {
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let seq: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Seq: "))
            .expect("sequence header")
            .trim()
            .parse()
            .expect("numeric sequence");
        *seen.entry(seq).or_default() += 1;
    }
    seen
}

/// Sends `chaos::body(i, 1)` from load@client.test to `<prefix><i>@remote.test` for each
/// of `seqs` in one session with `d`, each asserted accepted.
fn send_load(d: &Daemon, prefix: &str, seqs: std::ops::Range<u64>) {
    let mut s = d.connect_ehlo("client.test");
    for i in seqs {
        s.send_ok(
            "load@client.test",
            &[&format!("{prefix}{i}@remote.test")],
            &chaos::body(i, 1),
        );
    }
    let _ = s.cmd("QUIT");
}

/// A next hop that answers every final dot to a `slow…` recipient after `delay`.
async fn slow_dot_sink(delay: Duration) -> chaos::FaultSink {
    chaos::FaultSink::always("slow", chaos::Fault::SlowDot(delay)).await
}

/// Waits until `sink` has `n` messages; fails the test after `timeout` with the log of
/// `d` (the node expected to deliver them).
async fn wait_delivered(sink: &chaos::FaultSink, n: usize, timeout: Duration, d: &Daemon) {
    let deadline = Instant::now() + timeout;
    while sink.count() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} delivered\n{}",
            sink.count(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `sink` has `n` deliveries on the wire at once; fails the test after
/// `timeout` saying `what`.
async fn wait_active(sink: &chaos::FaultSink, n: usize, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while sink.active() < n {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The configuration of one relaying node on the shared database.
fn node_yaml(db: &TestDb, sink: &Sink, node: &str) -> String {
    relay_yaml(&db.url, sink.port(), node)
}

/// The configuration of one node on store `store_url` relaying everything from
/// 127.0.0.1 to the sink on `sink_port`; its EHLO name is `<node>.relay.test`.
fn relay_yaml(store_url: &str, sink_port: u16, node: &str) -> String {
    format!(
        "store_url: \"{store_url}\"\n\
         node_name: \"{node}\"\n\
         server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{sink_port}\"\n\
         server_smtp_name: \"{node}.relay.test\"\n\
         server_smtp_queue_interval: \"100ms\"\n"
    )
}

/// How many messages each node's log says it sent.
fn sent_by(d: &Daemon) -> usize {
    let log = d.log_text();
    log.matches("status=\"sent\"").count() + log.matches("status=sent").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_database_deliver_each_message_exactly_once() {
    const N: usize = 5000;
    const SESSIONS: usize = 3;
    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    let sink = Sink::start(SinkConfig::plain()).await;
    let started = Instant::now();
    // All three start at once on the empty database: the migration runs exactly once.
    let daemons: Vec<Daemon> = std::thread::scope(|sc| {
        let handles: Vec<_> = NODES
            .iter()
            .map(|node| {
                let yaml = node_yaml(&db, &sink, node);
                sc.spawn(move || Daemon::start(&yaml))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The messages spread over all nodes, SESSIONS SMTP sessions per node, all at once:
    // message i goes through session i % (nodes * SESSIONS).
    let nodes: Vec<(&Daemon, &str)> = daemons.iter().zip(NODES).collect();
    send_in_lanes(&nodes, NODES.len() * SESSIONS, N);
    let injected = started.elapsed();
    assert!(
        sink.wait_for(N, Duration::from_secs(300)).await,
        "only {} of {N} delivered",
        sink.count()
    );
    // A little longer, so that a late duplicate would be seen too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = started.elapsed();

    let seen = seqs_seen(&sink);
    let mut dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    dups.sort();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    assert_eq!(seen.len(), N);
    assert!((0..N).all(|i| seen.get(&i) == Some(&1)));

    let sent: Vec<usize> = daemons.iter().map(sent_by).collect();
    eprintln!(
        "{N} messages: injected in {injected:?}, all delivered after {delivered:?}; \
         sent per node {sent:?}"
    );
    assert_eq!(sent.iter().sum::<usize>(), N, "each delivery logged once");
    assert!(
        sent.iter().all(|n| *n > 0),
        "every node took part: {sent:?}"
    );

    // Nothing is left in the shared queue, as seen from any node.
    for d in &daemons {
        let (status, out, err) = d.admin(&["queue", "list"], None);
        assert!(status.success(), "{err}");
        assert!(
            out.contains("Mail queue is empty"),
            "queue not empty: {out}"
        );
    }
    drop(daemons);
}

// ---------------------------------------------------------------------------------------
// Failures: a node killed, the database restarted; and administration through one node.
// ---------------------------------------------------------------------------------------

/// How long an injecting client waits for any one reply. A session that takes longer (the
/// daemon's own store timeout is 60 s) counts as hung.
const REPLY_PATIENCE: Duration = Duration::from_secs(30);

/// Start one daemon per configuration, all at once (as a cluster comes up).
fn start_all(yamls: Vec<String>) -> Vec<Daemon> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = yamls
            .iter()
            .map(|yaml| sc.spawn(move || Daemon::start(yaml)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One message the slow sink took.
#[derive(Clone)]
struct Got {
    /// The EHLO argument: which node delivered it.
    helo: String,
    /// The message, dot-stuffing undone.
    data: Vec<u8>,
    /// When its final dot arrived.
    at: Instant,
}

/// A plain SMTP sink on threads of its own (so it does not depend on the test's runtime)
/// that records each message when its final dot arrives and answers 250 only `delay`
/// later: for that long a delivery is received but not acknowledged, as on a slow link.
/// So a node killed mid-run surely holds leases, and a duplicate is possible.
struct SlowSink {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
}

impl SlowSink {
    fn start(delay: Duration) -> SlowSink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let g = g.clone();
                std::thread::spawn(move || {
                    let _ = sink_session(conn, &g, delay);
                });
            }
        });
        SlowSink { addr, got, stop }
    }

    fn messages(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// How many times each `X-Seq` tag arrived.
    fn tally(&self) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for m in self.got.lock().unwrap().iter() {
            *seen.entry(tag_of(&m.data)).or_insert(0) += 1;
        }
        seen
    }
}

impl Drop for SlowSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn sink_session(conn: TcpStream, got: &Mutex<Vec<Got>>, delay: Duration) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    w.write_all(b"220 slow.sink.test ESMTP\r\n")?;
    let mut helo = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let text = line.trim_end();
        let upper = text.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO ") || upper.starts_with("HELO ") {
            helo = text[5..].trim().to_string();
            "250-slow.sink.test\r\n250 8BITMIME".to_string()
        } else if upper.starts_with("MAIL ")
            || upper.starts_with("RCPT ")
            || upper == "RSET"
            || upper == "NOOP"
        {
            "250 2.0.0 Ok".to_string()
        } else if upper == "DATA" {
            w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
            let mut data = Vec::new();
            let mut l = Vec::new();
            loop {
                l.clear();
                if r.read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                data.extend_from_slice(if l.starts_with(b".") { &l[1..] } else { &l });
            }
            got.lock().unwrap().push(Got {
                helo: helo.clone(),
                data,
                at: Instant::now(),
            });
            std::thread::sleep(delay);
            "250 2.0.0 Ok: queued".to_string()
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else {
            "502 5.5.2 Error: command not recognized".to_string()
        };
        w.write_all(format!("{reply}\r\n").as_bytes())?;
    }
}

/// The `X-Seq:` header of a message: the tag naming one injection attempt.
fn tag_of(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .lines()
        .find_map(|l| l.strip_prefix("X-Seq: "))
        .expect("X-Seq header")
        .trim()
        .to_string()
}

/// An injecting SMTP client for which every failure is a value: nodes die and the
/// database goes away under it.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    /// Connect, read the greeting and say EHLO.
    fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(REPLY_PATIENCE))?;
        let mut c = Client {
            w: s.try_clone()?,
            r: BufReader::new(s),
        };
        for (step, reply) in [
            ("greeting", c.reply()?),
            ("EHLO", c.cmd("EHLO client.test")?),
        ] {
            if !reply.starts_with("2") {
                return Err(std::io::Error::other(format!("{step}: {reply}")));
            }
        }
        Ok(c)
    }

    fn reply(&mut self) -> std::io::Result<String> {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end().to_string();
            let more = l.as_bytes().get(3) == Some(&b'-');
            out.push(l);
            if !more {
                return Ok(out.join("\n"));
            }
        }
    }

    fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// One transaction for message `tag` to `rcpt`: the first reply that is not a
    /// success, else the reply to the final dot.
    fn send(&mut self, rcpt: &str, tag: &str) -> std::io::Result<String> {
        let r = self.cmd("MAIL FROM:<a@client.test>")?;
        if !r.starts_with("250") {
            return Ok(r);
        }
        let r = self.cmd(&format!("RCPT TO:<{rcpt}>"))?;
        if !r.starts_with("250") {
            self.cmd("RSET")?;
            return Ok(r);
        }
        let r = self.cmd("DATA")?;
        if !r.starts_with("354") {
            self.cmd("RSET")?;
            return Ok(r);
        }
        self.w.write_all(
            format!("Subject: m{tag}\r\nX-Seq: {tag}\r\n\r\nbody {tag}\r\n").as_bytes(),
        )?;
        self.cmd(".")
    }
}

/// What the injecting lanes saw, shared between them.
#[derive(Default)]
struct Injection {
    /// The next sequence number to hand out.
    next: AtomicUsize,
    /// Set to end lanes that run until told.
    stop: AtomicBool,
    /// (tag, node) of every message answered 250.
    accepted: Mutex<Vec<(String, usize)>>,
    /// (node, reply, how long the transaction took) of every transaction answered
    /// otherwise.
    refused: Mutex<Vec<(usize, String, Duration)>>,
    /// (node, error) of every broken or hung connection.
    broken: Mutex<Vec<(usize, String)>>,
}

impl Injection {
    fn accepted_tags(&self) -> HashSet<String> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// A lane that sends sequence numbers below `n` once each, through node `node` at
/// `addr`, until they run out; a broken connection ends it (its node died).
fn inject_once(addr: SocketAddr, node: usize, n: usize, inj: &Injection) {
    let mut c = match Client::connect(addr) {
        Ok(c) => c,
        Err(e) => {
            inj.broken.lock().unwrap().push((node, e.to_string()));
            return;
        }
    };
    loop {
        let seq = inj.next.fetch_add(1, Ordering::SeqCst);
        if seq >= n {
            let _ = c.cmd("QUIT");
            return;
        }
        let tag = seq.to_string();
        let started = Instant::now();
        match c.send("b@remote.test", &tag) {
            Ok(r) if r.starts_with("250") => inj.accepted.lock().unwrap().push((tag, node)),
            Ok(r) => inj
                .refused
                .lock()
                .unwrap()
                .push((node, r, started.elapsed())),
            Err(e) => {
                inj.broken.lock().unwrap().push((node, e.to_string()));
                return;
            }
        }
    }
}

/// A lane that sends until `stop`, through node `node` at `addr`: a refused message is
/// offered again (tag `<seq>.<try>`) in a new session after a short pause, as a client
/// retrying after a 4xx would; a broken connection is reconnected.
fn inject_until_stopped(addr: SocketAddr, node: usize, inj: &Injection) {
    let mut client: Option<Client> = None;
    while !inj.stop.load(Ordering::SeqCst) {
        let seq = inj.next.fetch_add(1, Ordering::SeqCst);
        let mut attempt = 0;
        while !inj.stop.load(Ordering::SeqCst) {
            let tag = format!("{seq}.{attempt}");
            attempt += 1;
            let c = match client.as_mut() {
                Some(c) => c,
                None => match Client::connect(addr) {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        inj.broken.lock().unwrap().push((node, e.to_string()));
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                },
            };
            let started = Instant::now();
            match c.send("b@remote.test", &tag) {
                Ok(r) if r.starts_with("250") => {
                    inj.accepted.lock().unwrap().push((tag, node));
                    break;
                }
                Ok(r) => {
                    inj.refused
                        .lock()
                        .unwrap()
                        .push((node, r, started.elapsed()));
                    // A new session for the retry, so that the hard error limit of one
                    // session is never what the test measures.
                    if let Some(mut c) = client.take() {
                        let _ = c.cmd("QUIT");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    inj.broken.lock().unwrap().push((node, e.to_string()));
                    client = None;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    if let Some(mut c) = client {
        let _ = c.cmd("QUIT");
    }
}

/// Wait (up to `timeout`) until every accepted tag has reached the sink and the shared
/// queue is empty; panics with what is missing otherwise.
async fn wait_until_all_delivered(
    sink: &SlowSink, pool: &sqlx::PgPool, accepted: &HashSet<String>, timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let tally = sink.tally();
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|t| !tally.contains_key(*t))
            .collect();
        let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outgoing")
            .fetch_one(pool)
            .await
            .unwrap();
        if missing.is_empty() && queued == 0 {
            return;
        }
        if Instant::now() > deadline {
            let mut some: Vec<_> = missing.iter().take(20).collect();
            some.sort();
            panic!(
                "after {timeout:?}: {} accepted messages not delivered (e.g. {some:?}), \
                 {queued} still queued",
                missing.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tags delivered more than once, with their counts, sorted.
fn duplicates(tally: &HashMap<String, usize>) -> Vec<(String, usize)> {
    let mut dups: Vec<(String, usize)> = tally
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, n)| (t.clone(), *n))
        .collect();
    dups.sort();
    dups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_loses_nothing_and_its_leases_pass_to_the_others() {
    const N: usize = 1500;
    const LANES_PER_NODE: usize = 2;
    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    const VICTIM: usize = 2;
    const VICTIM_SENDERS: usize = 8;
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    // 200 ms between a message's final dot and its 250: each node delivers at most
    // max_senders / 0.2 s, so a backlog builds up and every node holds leases all along.
    let sink = SlowSink::start(Duration::from_millis(200));
    let yamls = NODES
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let senders = if i == VICTIM { VICTIM_SENDERS } else { 10 };
            format!(
                "{}server_smtp_lock_lease: \"3s\"\nserver_smtp_max_senders: {senders}\n",
                relay_yaml(&db.url, sink.addr.port(), node)
            )
        })
        .collect();
    let mut daemons = start_all(yamls);
    let inj = Arc::new(Injection::default());
    let lanes: Vec<_> = (0..NODES.len() * LANES_PER_NODE)
        .map(|lane| {
            let node = lane % NODES.len();
            let (addr, inj) = (daemons[node].addr, inj.clone());
            std::thread::spawn(move || inject_once(addr, node, N, &inj))
        })
        .collect();

    // Mid-run: the victim has delivered some, and much is still to do.
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent_by(&daemons[VICTIM]) < 60 {
        assert!(
            Instant::now() < deadline,
            "{} never got going:\n{}",
            NODES[VICTIM],
            daemons[VICTIM].log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemons[VICTIM].signal("KILL");
    let killed_at = Instant::now();
    let status = daemons[VICTIM]
        .wait_exit(Duration::from_secs(10))
        .expect("the killed node exits");
    assert!(!status.success(), "{status}");
    let victim_sent = sent_by(&daemons[VICTIM]);

    // What it had in flight: the rows still leased to it. Its leases were renewed at
    // most a third of a lease ago, so none has lapsed (nor been taken over) yet.
    let pool = db.pool().await;
    let leased: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT id, body FROM outgoing WHERE lock_owner LIKE $1")
            .bind(format!("{}#%", NODES[VICTIM]))
            .fetch_all(&pool)
            .await
            .unwrap();
    let in_flight: HashSet<String> = leased.iter().map(|(_, body)| tag_of(body)).collect();
    assert_eq!(in_flight.len(), leased.len(), "one row per message");
    // Its senders' messages and those waiting in its active queue (leased at accept).
    assert!(
        !in_flight.is_empty(),
        "killed mid-run, {} must hold leases: {leased:?}",
        NODES[VICTIM],
        leased = leased.iter().map(|(id, _)| id).collect::<Vec<_>>()
    );

    tokio::task::block_in_place(|| {
        for lane in lanes {
            lane.join().unwrap();
        }
    });
    let accepted = inj.accepted_tags();
    wait_until_all_delivered(&sink, &pool, &accepted, Duration::from_secs(180)).await;
    // Longer than a lease: a late second delivery would show up too.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let tally = sink.tally();
    let dups = duplicates(&tally);
    let extra: usize = dups.iter().map(|(_, n)| n - 1).sum();
    let got = sink.messages();
    let victim_helo = format!("{}.relay.test", NODES[VICTIM]);
    // Every message it held was then delivered by another node (after its lease lapsed).
    let mut taken_over_after = Duration::ZERO;
    for tag in &in_flight {
        let by_other = got
            .iter()
            .filter(|m| tag_of(&m.data) == *tag && m.helo != victim_helo)
            .map(|m| m.at)
            .min();
        let at = by_other.unwrap_or_else(|| {
            panic!(
                "message {tag}, leased to {} when killed, never delivered by another node",
                NODES[VICTIM]
            )
        });
        taken_over_after = taken_over_after.max(at.saturating_duration_since(killed_at));
    }
    let broken = inj.broken.lock().unwrap().clone();
    let refused = inj.refused.lock().unwrap().clone();
    let per_node: Vec<usize> = (0..NODES.len())
        .map(|n| {
            inj.accepted
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, i)| *i == n)
                .count()
        })
        .collect();
    eprintln!(
        "SIGKILL of {}: {} of {N} messages accepted (per node {per_node:?}); it had sent \
         {victim_sent} and held {} leases ({:?}); the last of those was delivered by another \
         node {taken_over_after:?} after the kill (lease 3s); duplicates: {extra} {dups:?}; \
         {} sessions broken by the kill",
        NODES[VICTIM],
        accepted.len(),
        in_flight.len(),
        {
            let mut v: Vec<_> = in_flight.iter().collect();
            v.sort();
            v
        },
        broken.len()
    );

    // Nothing accepted was lost.
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|t| !tally.contains_key(*t))
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    // Duplicates only among what the victim had in flight, at most one each.
    assert!(
        dups.iter().all(|(t, n)| *n == 2 && in_flight.contains(t)),
        "duplicates outside the victim's leases: {dups:?} (leased: {in_flight:?})"
    );
    assert!(extra <= in_flight.len() && extra <= VICTIM_SENDERS);
    // The survivors served every client without a hitch.
    assert!(
        broken.iter().all(|(n, _)| *n == VICTIM),
        "a surviving node broke a session: {broken:?}"
    );
    assert!(refused.is_empty(), "refused: {refused:?}");
    for (i, d) in daemons.iter_mut().enumerate() {
        if i != VICTIM {
            assert!(d.child.try_wait().unwrap().is_none(), "{} died", NODES[i]);
        }
    }
    pool.close().await;
    drop(daemons);
}

/// The local PostgreSQL cluster (`pg_ctlcluster VERSION main`), stopped and started by a
/// test; started again on drop, even when the test panics.
struct PgCluster {
    version: String,
    down: bool,
}

impl PgCluster {
    /// The cluster under /etc/postgresql/<version>/main, or `None` (the server is not
    /// local, or not managed by pg_ctlcluster).
    fn local() -> Option<PgCluster> {
        let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("main").is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        versions.sort();
        Some(PgCluster {
            version: versions.pop()?,
            down: false,
        })
    }

    fn ctl(&self, action: &str) -> std::process::Output {
        let mut cmd = Command::new("pg_ctlcluster");
        cmd.args(["--skip-systemctl-redirect", &self.version, "main", action]);
        if action == "stop" {
            cmd.args(["-m", "fast"]);
        }
        cmd.output().expect("run pg_ctlcluster")
    }

    fn stop(&mut self) {
        self.down = true;
        let out = self.ctl("stop");
        assert!(
            out.status.success(),
            "pg_ctlcluster stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&mut self) {
        let out = self.ctl("start");
        assert!(
            out.status.success(),
            "pg_ctlcluster start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.down = false;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.down {
            let out = self.ctl("start");
            if !out.status.success() {
                eprintln!(
                    "PostgreSQL could not be started again: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_mid_run_is_a_451_and_loses_nothing() {
    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    const LANES_PER_NODE: usize = 2;
    /// How long PostgreSQL stays down (short: other tests may share the server).
    const OUTAGE: Duration = Duration::from_secs(3);
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    let Some(mut cluster) = PgCluster::local() else {
        // This test restarts the server it runs against; where it cannot, it says so
        // loudly rather than pass having tested nothing.
        if std::env::var_os("ERLMAIL_TEST_PG_NO_RESTART").is_some() {
            eprintln!("note: ERLMAIL_TEST_PG_NO_RESTART is set; skipping the restart test");
            return;
        }
        panic!(
            "cannot restart PostgreSQL: no local cluster under /etc/postgresql (pg_ctlcluster). \
             Run this test where the server is local, or set ERLMAIL_TEST_PG_NO_RESTART=1 to skip it"
        );
    };
    let sink = SlowSink::start(Duration::ZERO);
    // A lease far longer than the outage: every result is recorded once the database is
    // back, and no message is tried twice. connect_timeout=2: a store call during the
    // outage fails within 2 s and the session answers 451 instead of hanging.
    let store_url = db.url_with("connect_timeout=2");
    let yamls = NODES
        .iter()
        .map(|node| {
            format!(
                "{}server_smtp_lock_lease: \"30s\"\n",
                relay_yaml(&store_url, sink.addr.port(), node)
            )
        })
        .collect();
    let mut daemons = start_all(yamls);
    let pids: Vec<u32> = daemons.iter().map(|d| d.child.id()).collect();
    let inj = Arc::new(Injection::default());
    let lanes: Vec<_> = (0..NODES.len() * LANES_PER_NODE)
        .map(|lane| {
            let node = lane % NODES.len();
            let (addr, inj) = (daemons[node].addr, inj.clone());
            std::thread::spawn(move || inject_until_stopped(addr, node, &inj))
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.count() < 200 {
        assert!(Instant::now() < deadline, "no deliveries before the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down_at = Instant::now();
    tokio::task::block_in_place(|| cluster.stop());
    // Counted once the server is down: what was committed before is all in.
    let accepted_before = inj.accepted.lock().unwrap().len();
    let delivered_before = sink.count();
    let refused_before = inj.refused.lock().unwrap().len();
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
    let refused_during = inj.refused.lock().unwrap().len() - refused_before;
    let accepted_during = inj.accepted.lock().unwrap().len();
    tokio::task::block_in_place(|| cluster.start());
    let downtime = down_at.elapsed();

    // Service resumes by itself: new messages are accepted and delivered.
    let resumed = inj.accepted.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(120);
    while inj.accepted.lock().unwrap().len() < resumed + 300 {
        assert!(
            Instant::now() < deadline,
            "no new messages accepted after PostgreSQL came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed_after = down_at.elapsed() - downtime;
    inj.stop.store(true, Ordering::SeqCst);
    tokio::task::block_in_place(|| {
        for lane in lanes {
            lane.join().unwrap();
        }
    });
    let accepted = inj.accepted_tags();
    let pool = db.pool().await;
    wait_until_all_delivered(&sink, &pool, &accepted, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let tally = sink.tally();
    let dups = duplicates(&tally);
    let refused = inj.refused.lock().unwrap().clone();
    let broken = inj.broken.lock().unwrap().clone();
    let mut kinds: HashMap<String, usize> = HashMap::new();
    let slowest = refused.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    for (_, r, _) in &refused {
        let kind = r.split(['<', ':']).next().unwrap_or("").trim().to_string();
        *kinds.entry(kind).or_insert(0) += 1;
    }
    eprintln!(
        "PostgreSQL down for {downtime:?} (fast stop to started): {} accepted before it \
         ({delivered_before} delivered), {} during, {} in all; {refused_during} refusals \
         while down, {} in all {kinds:?} (slowest refused transaction {slowest:?}); accepting again {resumed_after:?} after the \
         restart; {} broken sessions {broken:?}; duplicates {dups:?}",
        accepted_before,
        accepted_during - accepted_before,
        accepted.len(),
        refused.len(),
        broken.len()
    );

    assert!(refused_during > 0, "no 451 while PostgreSQL was down");
    assert!(
        refused.iter().all(|(_, r, _)| r.starts_with("451 4.3.0")),
        "refusals other than 451 4.3.0: {refused:?}"
    );
    assert!(broken.is_empty(), "sessions broke or hung: {broken:?}");
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|t| !tally.contains_key(*t))
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(dups.is_empty(), "delivered twice: {dups:?}");
    // Still the same processes: nothing was restarted.
    for (d, pid) in daemons.iter_mut().zip(&pids) {
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "a node died:\n{}",
            d.log_text()
        );
        assert_eq!(d.child.id(), *pid);
    }
    pool.close().await;
    drop(daemons);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_and_users_added_on_one_node_are_served_by_all() {
    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    // No relay clients: a domain that is not local is refused (554), so a 250 shows the
    // node knows the domain and the user.
    let yamls = NODES
        .iter()
        .map(|node| {
            format!(
                "store_url: \"{}\"\nnode_name: \"{node}\"\nserver_smtp_name: \"{node}.test\"\n",
                db.url
            )
        })
        .collect();
    let daemons = start_all(yamls);
    let rcpt = |d: &Daemon, to: &str| {
        let mut c = Client::connect(d.addr).unwrap();
        c.cmd("MAIL FROM:<a@client.test>").unwrap();
        let r = c.cmd(&format!("RCPT TO:<{to}>")).unwrap();
        let _ = c.cmd("QUIT");
        r
    };
    let r = rcpt(&daemons[1], "carol@cluster.test");
    assert!(r.starts_with("554 5.7.1"), "before the domain exists: {r}");

    let ok = |d: &Daemon, args: &[&str], stdin: Option<&str>| {
        let (status, out, err) = d.admin(args, stdin);
        assert!(status.success(), "erlmail {args:?}: {err}");
        out
    };
    ok(&daemons[0], &["domain", "add", "cluster.test"], None);
    ok(
        &daemons[0],
        &["user", "add", "carol@cluster.test"],
        Some("secret\n"),
    );
    for d in &daemons {
        assert_eq!(ok(d, &["domain", "list"], None), "cluster.test\n");
        assert_eq!(ok(d, &["user", "list"], None), "carol@cluster.test\n");
    }

    // A message through each node (node 1's own too), all for carol.
    for (i, d) in daemons.iter().enumerate() {
        let mut c = Client::connect(d.addr).unwrap();
        let r = c
            .send("carol@cluster.test", &format!("via-{}", NODES[i]))
            .unwrap();
        assert!(r.starts_with("250"), "via {}: {r}", NODES[i]);
        // An unknown user of the new domain is refused by every node alike.
        c.cmd("MAIL FROM:<a@client.test>").unwrap();
        let r = c.cmd("RCPT TO:<nobody@cluster.test>").unwrap();
        assert!(
            r.starts_with("550 5.1.1"),
            "unknown user via {}: {r}",
            NODES[i]
        );
        let _ = c.cmd("QUIT");
    }
    // One INBOX, the same through every node's configuration.
    let listings: Vec<String> = daemons
        .iter()
        .map(|d| ok(d, &["mailbox", "list", "carol@cluster.test"], None))
        .collect();
    for l in &listings {
        assert_eq!(l, &listings[0]);
    }
    let rows: Vec<&str> = listings[0].lines().skip(1).collect();
    assert_eq!(rows.len(), NODES.len(), "{}", listings[0]);
    for node in NODES {
        assert_eq!(
            rows.iter()
                .filter(|r| r.ends_with(&format!("mvia-{node}")))
                .count(),
            1,
            "{}",
            listings[0]
        );
    }
    // Nothing was queued for relaying: all of it was local delivery.
    let (_, queue, _) = daemons[2].admin(&["queue", "list"], None);
    assert!(queue.contains("Mail queue is empty"), "{queue}");

    // A removal through node 3 is seen by the others at once.
    ok(&daemons[2], &["user", "remove", "carol@cluster.test"], None);
    let r = rcpt(&daemons[0], "carol@cluster.test");
    assert!(r.starts_with("550 5.1.1"), "after removal, via node-a: {r}");
    drop(daemons);
}

/// Copies of each `X-Seq` the fault sink took, and the seqs that came more than once.
fn copies_by_seq(sink: &chaos::FaultSink) -> (HashMap<u64, usize>, Vec<(u64, usize)>) {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for arrival in sink.arrivals() {
        *seen
            .entry(chaos::seq_of(&arrival.data).expect("X-Seq"))
            .or_default() += 1;
    }
    let dups = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| (*k, *n))
        .collect();
    (seen, dups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_gracefully_mid_data_finishes_the_wire_and_hands_over_the_rest() {
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    // A next hop that takes 3 s to answer each final dot. It keeps a message whose
    // client hung up before the 250: a sender killed mid-DATA whose lease was handed to
    // another node would make a duplicate.
    let sink = slow_dot_sink(Duration::from_secs(3)).await;
    let mut a = Daemon::start(&format!(
        "{}server_smtp_max_senders: 2\n",
        relay_yaml(&db.url, sink.port(), "node-a")
    ));
    let b = Daemon::start(&relay_yaml(&db.url, sink.port(), "node-b"));
    // Ten messages into node a: two on the wire at a time, eight waiting in its memory.
    const N: u64 = 10;
    send_load(&a, "slow", 0..N);
    wait_active(
        &sink,
        2,
        Duration::from_secs(10),
        "no deliveries on the wire",
    )
    .await;
    // Both are past their dot, waiting for the 250, when the stop comes.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    a.signal("TERM");
    let status = a
        .wait_exit(Duration::from_secs(40))
        .expect("node a stops within its shutdown timeout");
    assert!(status.success(), "{status}");
    let log_a = a.log_text();
    assert!(
        log_a.contains("stopping: waiting for deliveries on the wire"),
        "{log_a}"
    );
    // Node b delivers what node a gave back.
    wait_delivered(&sink, N as usize, Duration::from_secs(60), &b).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (seen, dups) = copies_by_seq(&sink);
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert_eq!(seen.len(), N as usize, "lost: {seen:?}");
    assert!(
        sent_by(&b) >= 1,
        "node b delivered nothing: the handover did not happen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_ten_minutes_ahead_takes_no_live_lease() {
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    // Node a's deliveries take 6 s each (the next hop answers each final dot late), under
    // a 60 s lease. Node b's clock is 10 minutes ahead: by its own clock those leases
    // lapsed long ago. Leases are stamped and judged by the database's clock, so b must
    // leave them alone.
    let sink = slow_dot_sink(Duration::from_secs(6)).await;
    let a = Daemon::start(&format!(
        "{}server_smtp_lock_lease: \"60s\"\nserver_smtp_max_senders: 4\n",
        relay_yaml(&db.url, sink.port(), "node-a")
    ));
    let mut b = Daemon::start_with_env(
        &format!(
            "{}server_smtp_lock_lease: \"60s\"\n",
            relay_yaml(&db.url, sink.port(), "node-b")
        ),
        &[("ERLMAIL_TEST_CLOCK_SKEW_SECS", "600")],
    );
    b.wait_for_log("off the store's", Duration::from_secs(10));
    send_load(&a, "slow", 0..4);
    wait_active(
        &sink,
        4,
        Duration::from_secs(10),
        "node a's deliveries did not start",
    )
    .await;
    // Node b scans every 100 ms while node a's four are on the wire; it also serves
    // mail of its own.
    send_load(&b, "fast", 100..102);
    wait_delivered(&sink, 6, Duration::from_secs(30), &b).await;
    // Longer than one more slow delivery: a stolen lease would show up as a second copy.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (seen, dups) = copies_by_seq(&sink);
    assert!(
        dups.is_empty(),
        "node b took live leases: {dups:?}\n{}",
        b.log_text()
    );
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert_eq!(sent_by(&b), 2, "node b sent only its own mail");
    assert_eq!(sent_by(&a), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_node_queues_and_two_back_nodes_deliver_each_message_exactly_once() {
    // Delivery must cross nodes here: the front node (server_smtp_max_senders: 0) never
    // delivers, so every message is claimed from the shared queue by one of the two back
    // nodes, racing each other. A locking bug shows up as a duplicate.
    const N: usize = 2000;
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    let sink = Sink::start(SinkConfig::plain()).await;
    let mut front = Daemon::start(&format!(
        "{}server_smtp_max_senders: 0\n",
        node_yaml(&db, &sink, "front")
    ));
    let backs: Vec<Daemon> = ["back-1", "back-2"]
        .iter()
        .map(|n| Daemon::start(&node_yaml(&db, &sink, n)))
        .collect();
    front.wait_for_log("a front node", Duration::from_secs(10));
    send_in_lanes(&[(&front, "front")], 4, N);
    assert!(
        sink.wait_for(N, Duration::from_secs(240)).await,
        "only {} of {N} delivered",
        sink.count()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = seqs_seen(&sink);
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "{} duplicates: {dups:?}", dups.len());
    assert_eq!(seen.len(), N, "lost {}", N - seen.len());
    assert_eq!(sent_by(&front), 0, "the front node delivered");
    let by_back: Vec<usize> = backs.iter().map(sent_by).collect();
    assert_eq!(by_back.iter().sum::<usize>(), N, "{by_back:?}");
    assert!(
        by_back.iter().all(|n| *n > 0),
        "both back nodes take part: {by_back:?}"
    );
    println!(
        "front node: {N} queued; delivered by back-1 {} and back-2 {}",
        by_back[0], by_back[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_queued_or_flushed_on_one_node_wakes_another_at_once() {
    // The back node scans only every 10 s: picking mail up in milliseconds takes the
    // PostgreSQL notification that the front's commit (or an administrator's flush) sends.
    let Some(db) = TestDb::create("this cluster test").await else {
        return;
    };
    let sink = Sink::start(SinkConfig::plain().defer_first(1)).await;
    let slow_scan = "server_smtp_queue_interval: \"10s\"\nserver_smtp_retry_interval: [\"1h\"]\n";
    let mut front = Daemon::start(&format!(
        "{}server_smtp_max_senders: 0\n",
        relay_yaml(&db.url, sink.port(), "front")
            .replace("server_smtp_queue_interval: \"100ms\"\n", slow_scan)
    ));
    let mut back = Daemon::start(
        &relay_yaml(&db.url, sink.port(), "back")
            .replace("server_smtp_queue_interval: \"100ms\"\n", slow_scan),
    );
    front.wait_for_log("a front node", Duration::from_secs(10));
    back.wait_for_log("listening on", Duration::from_secs(10));
    // Let both queues finish their start-up scans.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut s = front.connect_ehlo("client.test");
    // The first message is deferred by the next hop (and waits an hour): the flush below.
    s.send_ok(
        "a@client.test",
        &["b@remote.test"],
        "Subject: first\r\n\r\nx\r\n",
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while sink.transactions().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first message was never tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 20 messages, one at a time: from the front's 250 to the next hop's final dot.
    let mut waits = Vec::new();
    for i in 0..20 {
        let before = sink.count();
        s.send_ok(
            "a@client.test",
            &["b@remote.test"],
            &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"),
        );
        let t = Instant::now();
        while sink.count() == before {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "message {i} never crossed:\n{}",
                back.log_text()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        waits.push(t.elapsed());
    }
    waits.sort();
    let median = waits[waits.len() / 2];
    assert!(
        median < Duration::from_millis(300),
        "median 250 -> next hop across nodes: {median:?} ({waits:?})"
    );
    // The deferred one: `queue flush` from an administrator wakes the back node.
    let q = back.admin(&["queue", "list", "--json"], None).1;
    let list: serde_json::Value = serde_json::from_str(&q).unwrap();
    let id = list[0]["id"]
        .as_str()
        .expect("the deferred message")
        .to_string();
    let before = sink.count();
    let (ok, _, err) = back.admin(&["queue", "flush", &id], None);
    assert!(ok.success(), "flush: {err}");
    let t = Instant::now();
    while sink.count() == before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the flushed message was not picked up at once"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let flushed = t.elapsed();
    assert!(
        flushed < Duration::from_millis(300),
        "flush -> next hop: {flushed:?}"
    );
    println!("cross-node median {median:?}; flush to next hop {flushed:?}");
}
