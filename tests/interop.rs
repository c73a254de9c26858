//! Interoperability acceptance (issue 3 point 7, issue 4 point 7): SMTP clients and
//! servers that nobody here wrote drive the real `erlmail serve` binary on 127.0.0.1:
//! swaks, Python's smtplib, Postfix's smtp-source (into local mailboxes and through the
//! relay queue) and Postfix's smtp-sink as the next hop. Every test checks what arrived
//! (mailbox rows, stored bytes, sink dumps), not only exit codes. A missing peer fails
//! the test; it is never skipped.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/peers.rs"]
mod peers;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::Daemon;
use peers::{require, run, AioSink, SmtpSink};

/// The local user every test delivers to.
const ALICE: &str = "alice@example.test";

/// Extra settings for load: enough sessions for 20 parallel clients.
/// The load tests run 20 sessions at once from one trusted address (127.0.0.1, a bulk
/// sender such as a web application's relay): the operator lets that client have them,
/// as Postfix's default `smtpd_client_connection_count_limit` of 50 would.
const LOAD_YAML: &str = "server_smtp_max_connection: 100\nserver_smtp_max_senders: 20\nserver_smtp_client_connection_limit: 20\n";

/// Start a daemon with `yaml` and create the local domain and user.
fn local_daemon(yaml: &str) -> Daemon {
    Daemon::start_with_user(yaml, ALICE, "secret-pw")
}

/// Config for a relay client (127.0.0.1) whose smarthost is 127.0.0.1:`port`.
fn relay_yaml(port: u16) -> String {
    format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{port}\"\n\
         server_smtp_queue_interval: \"100ms\"\n\
         server_smtp_name: \"relay.test\"\n{LOAD_YAML}"
    )
}

/// One row of `erlmail mailbox list`.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    size: u64,
    from: String,
    subject: String,
}

/// `erlmail mailbox list USER`, parsed; asserts the header line is there.
fn mailbox(d: &Daemon, user: &str) -> Vec<Row> {
    let (status, out, err) = d.admin(&["mailbox", "list", user], None);
    assert!(status.success(), "mailbox list {user}: {err}");
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.trim_start().starts_with("ID"), "header: {out}");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 4, "row {l:?}");
            Row {
                id: f[0].parse().unwrap_or_else(|_| panic!("id in {l:?}")),
                size: f[2].parse().unwrap_or_else(|_| panic!("size in {l:?}")),
                from: f[3].to_string(),
                subject: f[4..].join(" "),
            }
        })
        .collect()
}

/// `erlmail mailbox show USER ID`: the stored message.
fn show(d: &Daemon, user: &str, id: i64) -> String {
    let (status, out, err) = d.admin(&["mailbox", "show", user, &id.to_string()], None);
    assert!(status.success(), "mailbox show {user} {id}: {err}");
    out
}

/// Poll until `f` holds; panics with `what` and the daemon log on timeout.
fn wait_until(d: &Daemon, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; log tail:\n{}",
            log_tail(d, 60)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_tail(d: &Daemon, n: usize) -> String {
    let text = d.log_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The stored message must be erlmail's `Received:` header(s) followed by exactly `sent`.
fn assert_stored_as_sent(stored: &str, sent: &str) {
    assert!(
        stored.starts_with("Received: "),
        "stored message does not start with a Received: header:\n{stored}"
    );
    assert!(
        stored.ends_with(sent),
        "stored message is not the sent message plus a Received: header\n--- sent\n{sent:?}\n--- stored\n{stored:?}"
    );
    let prefix = &stored[..stored.len() - sent.len()];
    assert!(
        prefix.ends_with("\r\n")
            && prefix
                .lines()
                .all(|l| l.starts_with("Received: ") || l.starts_with([' ', '\t'])),
        "only trace headers may be prepended, got:\n{prefix}"
    );
}

/// Asserts that the relayed message `arrived` at the next hop `sink` (named), then waits
/// until the queue of `d` is empty.
fn relayed(d: &Daemon, arrived: bool, sink: &str) {
    assert!(arrived, "nothing reached {sink}; log:\n{}", d.log_text());
    wait_until(d, "an empty queue", Duration::from_secs(30), || {
        d.queue_is_empty()
    });
}

/// `python3 -c script HOST PORT SENT` against `d`: an smtplib script that writes what it
/// sent to `sent`.
fn smtplib(script: &str, d: &Daemon, sent: &std::path::Path) -> Command {
    let mut cmd = Command::new(require("python3"));
    cmd.arg("-c")
        .arg(script)
        .arg(d.addr.ip().to_string())
        .arg(d.addr.port().to_string())
        .arg(sent);
    cmd
}

/// swaks against `d_addr` as swaks.remote.test: one message from x@remote.test to `to`
/// with `subject` and `body`, after the options in `extra`.
fn swaks(
    d_addr: std::net::SocketAddr, extra: &[&str], to: &str, subject: &str, body: &str,
) -> peers::Output {
    let mut cmd = Command::new(require("swaks"));
    cmd.arg("--server")
        .arg(d_addr.to_string())
        .args(["--helo", "swaks.remote.test"])
        .args(extra)
        .args(["--to", to, "--from", "x@remote.test"])
        .args(["--header", &format!("Subject: {subject}"), "--body", body]);
    run(cmd, None, Duration::from_secs(60))
}

// ---------------------------------------------------------------------------------------
// swaks

#[test]
fn swaks_delivers_to_a_local_user() {
    let d = local_daemon("");
    let out = swaks(
        d.addr,
        &[],
        ALICE,
        "via swaks",
        "hello from swaks\nsecond line of the body",
    );
    out.assert_success("swaks");
    assert!(out.stdout.contains("<-  250"), "{}", out.stdout);

    let rows = mailbox(&d, ALICE);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].from, "x@remote.test");
    assert_eq!(rows[0].subject, "via swaks");
    let stored = show(&d, ALICE, rows[0].id);
    assert_eq!(
        rows[0].size,
        stored.len() as u64,
        "listed size is the stored size"
    );
    assert!(
        stored.starts_with("Received: from swaks.remote.test"),
        "{stored}"
    );
    assert!(stored.contains("\r\nSubject: via swaks\r\n"), "{stored}");
    assert!(
        stored.contains("\r\nTo: alice@example.test\r\n"),
        "{stored}"
    );
    assert!(
        stored.contains("\r\n\r\nhello from swaks\r\nsecond line of the body\r\n"),
        "{stored:?}"
    );
}

#[test]
fn swaks_pipelines_a_whole_transaction() {
    let d = local_daemon("");
    let out = swaks(
        d.addr,
        &["--pipeline"],
        ALICE,
        "pipelined",
        "sent with PIPELINING",
    );
    out.assert_success("swaks --pipeline");
    assert!(out.stdout.contains("<-  250-PIPELINING"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("does not support"),
        "swaks fell back: {}",
        out.stdout
    );
    // swaks really pipelined: MAIL, RCPT and DATA went out before the first reply.
    assert!(
        out.stdout.contains(
            " -> MAIL FROM:<x@remote.test>\n -> RCPT TO:<alice@example.test>\n -> DATA\n<-  250"
        ),
        "{}",
        out.stdout
    );
    let rows = mailbox(&d, ALICE);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].subject, "pipelined");
    let stored = show(&d, ALICE, rows[0].id);
    assert!(stored.starts_with("Received: "), "{stored}");
    assert!(
        stored.contains("\r\n\r\nsent with PIPELINING\r\n"),
        "{stored:?}"
    );
}

#[test]
fn swaks_relays_from_an_authorised_client_to_smtp_sink() {
    let sink = SmtpSink::start(&[]);
    let d = local_daemon(&relay_yaml(sink.port()));
    let out = swaks(
        d.addr,
        &[],
        "bob@far.test",
        "relayed by swaks",
        "through the queue",
    );
    out.assert_success("swaks relay");
    relayed(&d, sink.wait_for(1, Duration::from_secs(30)), "smtp-sink");
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 1, "{dumps:?}");
    let m = &dumps[0];
    assert_eq!(m.helo.as_deref(), Some("relay.test"));
    assert!(m.mail.starts_with("<x@remote.test>"), "{}", m.mail);
    assert_eq!(m.rcpts.len(), 1, "{:?}", m.rcpts);
    assert!(m.rcpts[0].starts_with("<bob@far.test>"), "{:?}", m.rcpts);
    assert!(
        m.message.starts_with("Received: from swaks.remote.test"),
        "{}",
        m.message
    );
    assert!(
        m.message.contains("\nSubject: relayed by swaks\n"),
        "{}",
        m.message
    );
    assert!(
        m.message.contains("\n\nthrough the queue\n"),
        "{}",
        m.message
    );
    // Nothing was delivered locally.
    assert!(mailbox(&d, ALICE).is_empty());
}

// ---------------------------------------------------------------------------------------
// Python smtplib

/// Drives erlmail with smtplib and prints one JSON object of observations.
const SMTPLIB_SCRIPT: &str = r#"
import json, smtplib, sys
host, port, sent_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {}
s = smtplib.SMTP(host, port, local_hostname="python.remote.test", timeout=30)
code, _ = s.ehlo()
out["ehlo"] = code
out["features"] = sorted(s.esmtp_features.keys())
out["size"] = s.esmtp_features.get("size", "")

# Lines that need dot-stuffing, sent as bytes so smtplib only stuffs and fixes EOLs.
plain = (b"From: py@remote.test\r\nTo: alice@example.test\r\nSubject: via smtplib\r\n\r\n"
         b"first line\r\n.leading dot\r\n..two dots\r\n.\r\n. dot space\r\nlast line\r\n")
out["local"] = {k: [c, m.decode()] for k, (c, m) in s.sendmail("py@remote.test", ["alice@example.test"], plain).items()}

eight = ("From: j\u00fcrgen@remote.test\r\nTo: alice@example.test\r\nSubject: Gr\u00fc\u00dfe\r\n\r\n"
         "8-bit body: \u00e4\u00f6\u00fc \u20ac\r\n").encode("utf-8")
out["utf8"] = {k: [c, m.decode()] for k, (c, m) in s.sendmail(
    "j\u00fcrgen@remote.test", ["alice@example.test"], eight,
    mail_options=["SMTPUTF8", "BODY=8BITMIME"]).items()}

try:
    s.sendmail("py@remote.test", ["bob@elsewhere.test"], plain)
    out["relay"] = "accepted"
except smtplib.SMTPRecipientsRefused as e:
    out["relay"] = {k: [c, m.decode()] for k, (c, m) in e.recipients.items()}

code, _ = s.noop()
out["noop_after_refusal"] = code
out["quit"] = s.quit()[0]
with open(sent_path, "wb") as f:
    f.write(plain + b"\0" + eight)
print(json.dumps(out))
"#;

#[test]
fn python_smtplib_sees_the_extensions_delivers_and_is_refused_relaying() {
    // No relay_clients: 127.0.0.1 is not authorised.
    let d = local_daemon("");
    let sent_path = d.dir.path().join("smtplib-sent.bin");
    let cmd = smtplib(SMTPLIB_SCRIPT, &d, &sent_path);
    let out = run(cmd, None, Duration::from_secs(60));
    out.assert_success("python3 smtplib script");
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("script output {:?}: {e}", out.stdout));

    assert_eq!(v["ehlo"], 250);
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for ext in [
        "pipelining",
        "size",
        "8bitmime",
        "enhancedstatuscodes",
        "smtputf8",
        "dsn",
    ] {
        assert!(features.contains(&ext), "EHLO lacks {ext}: {features:?}");
    }
    let size: u64 = v["size"].as_str().unwrap().trim().parse().unwrap_or(0);
    assert!(size > 0, "SIZE advertises a limit: {:?}", v["size"]);

    // sendmail returns the refused recipients: none.
    assert_eq!(v["local"], serde_json::json!({}));
    assert_eq!(v["utf8"], serde_json::json!({}));
    // The relay attempt: 554 5.7.1 for the one recipient, and the session goes on.
    let refused = &v["relay"]["bob@elsewhere.test"];
    assert_eq!(refused[0], 554, "relay attempt: {}", v["relay"]);
    assert!(
        refused[1].as_str().unwrap().starts_with("5.7.1"),
        "relay attempt: {}",
        v["relay"]
    );
    assert_eq!(v["noop_after_refusal"], 250);
    assert_eq!(v["quit"], 221);

    // Exactly the two local messages arrived, byte for byte.
    let raw = std::fs::read(&sent_path).unwrap();
    let split = raw.iter().position(|&b| b == 0).unwrap();
    let plain = String::from_utf8(raw[..split].to_vec()).unwrap();
    let eight = String::from_utf8(raw[split + 1..].to_vec()).unwrap();
    let rows = mailbox(&d, ALICE);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let by_subject: BTreeMap<&str, &Row> = rows.iter().map(|r| (r.subject.as_str(), r)).collect();
    let r = by_subject
        .get("via smtplib")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(r.from, "py@remote.test");
    let stored = show(&d, ALICE, r.id);
    // Dot-stuffing round trip: the leading dots are back as they were sent.
    assert_stored_as_sent(&stored, &plain);
    assert!(stored.contains("\r\n.leading dot\r\n..two dots\r\n.\r\n. dot space\r\n"));

    let r = rows
        .iter()
        .find(|r| r.from == "jürgen@remote.test")
        .unwrap_or_else(|| panic!("no SMTPUTF8 message from jürgen: {rows:?}"));
    let stored = show(&d, ALICE, r.id);
    assert_stored_as_sent(&stored, &eight);
    // No stray message for the refused relay recipient was stored or queued.
    assert!(d.queue_is_empty());
}

/// Sends one message with dot lines through erlmail with smtplib, as a relay client.
const SMTPLIB_RELAY_SCRIPT: &str = r#"
import smtplib, sys
host, port, sent_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
msg = (b"From: py@client.test\r\nTo: carol@far.test\r\nSubject: relayed by smtplib\r\n\r\n"
       b".leading dot\r\n..two dots\r\n.\r\nend of body\r\n")
s = smtplib.SMTP(host, port, local_hostname="python.client.test", timeout=30)
refused = s.sendmail("py@client.test", ["carol@far.test", "dave@far.test"], msg)
assert refused == {}, refused
s.quit()
open(sent_path, "wb").write(msg)
"#;

/// smtplib -> erlmail (relay client) -> a Python aiosmtpd next hop: the relayed message
/// arrives byte for byte (dot-stuffing undone and redone correctly on both legs), once,
/// with both recipients in one transaction.
#[test]
fn smtplib_relays_byte_for_byte_to_an_aiosmtpd_next_hop() {
    let sink = AioSink::start();
    let d = Daemon::start(&relay_yaml(sink.addr.port()));
    let sent_path = d.dir.path().join("relay-sent.bin");
    let cmd = smtplib(SMTPLIB_RELAY_SCRIPT, &d, &sent_path);
    run(cmd, None, Duration::from_secs(60)).assert_success("python3 smtplib relay script");
    let sent = String::from_utf8(std::fs::read(&sent_path).unwrap()).unwrap();

    relayed(
        &d,
        sink.wait_for(1, Duration::from_secs(30)),
        "the aiosmtpd sink",
    );
    std::thread::sleep(Duration::from_millis(500));
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let m = &msgs[0];
    assert_eq!(m.helo, "relay.test");
    assert_eq!(m.from, "py@client.test");
    let mut rcpts = m.rcpts.clone();
    rcpts.sort();
    assert_eq!(rcpts, vec!["carol@far.test", "dave@far.test"]);
    let data = String::from_utf8(m.data.clone()).unwrap();
    assert!(
        data.starts_with("Received: from python.client.test"),
        "{data}"
    );
    assert_stored_as_sent(&data, &sent);
}

// ---------------------------------------------------------------------------------------
// Postfix smtp-source and smtp-sink

/// smtp-source: `n` messages over 20 sessions from x@remote.test to `to`, greeting as
/// source.remote.test, with the options in `extra`, against `target`.
fn smtp_source(
    n: usize, extra: &[&str], to: &str, target: std::net::SocketAddr, timeout: Duration,
) -> peers::Output {
    let mut cmd = Command::new(require("smtp-source"));
    cmd.args(extra)
        .args(["-s", "20", "-m", &n.to_string(), "-M", "source.remote.test"])
        .args(["-f", "x@remote.test", "-t", to])
        .arg(format!("127.0.0.1:{}", target.port()));
    run(cmd, None, timeout)
}

#[test]
fn smtp_source_1000_messages_over_20_sessions_are_all_stored() {
    const N: usize = 1000;
    let d = local_daemon(LOAD_YAML);
    let out = smtp_source(
        N,
        &["-S", "interop load"],
        ALICE,
        d.addr,
        Duration::from_secs(300),
    );
    out.assert_success("smtp-source");
    let secs = out.elapsed.as_secs_f64();
    eprintln!(
        "smtp-source -> local: {N} messages / 20 sessions in {secs:.2}s ({:.0} msg/s)",
        N as f64 / secs
    );

    // Each 250 went out after the store committed, so everything is there already.
    let rows = mailbox(&d, ALICE);
    assert_eq!(rows.len(), N, "stored messages");
    let mut ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), N, "distinct ids");
    for r in &rows {
        assert_eq!(r.from, "x@remote.test", "{r:?}");
        assert_eq!(r.subject, "interop load", "{r:?}");
    }
    for id in [ids[0], ids[N - 1]] {
        let stored = show(&d, ALICE, id);
        assert!(
            stored.starts_with("Received: from source.remote.test"),
            "{stored}"
        );
        assert!(stored.contains("\r\nSubject: interop load\r\n"), "{stored}");
        assert!(stored.ends_with("La de da de da 4.\r\n"), "{stored:?}");
    }
    assert!(d.queue_is_empty());
}

/// Issue 4 point 7: smtp-source -> erlmail (relay client) -> smtp-sink, 10,000 messages,
/// each delivered exactly once, queue empty. `-N` numbers the recipients 1..=N, so the
/// sink's dumps tell every message apart.
#[test]
fn smtp_source_through_the_relay_queue_to_smtp_sink_10000_exactly_once() {
    const N: usize = 10_000;
    let sink = SmtpSink::start(&[]);
    let d = Daemon::start(&relay_yaml(sink.port()));
    let start = Instant::now();
    let out = smtp_source(
        N,
        &["-N"],
        "rcpt@far.test",
        d.addr,
        Duration::from_secs(900),
    );
    out.assert_success("smtp-source");
    let accepted = start.elapsed().as_secs_f64();
    eprintln!(
        "relay: erlmail accepted {N} messages over 20 sessions in {accepted:.1}s ({:.0} msg/s); {} at the sink so far",
        N as f64 / accepted,
        sink.count()
    );

    let deadline = Duration::from_secs(900);
    let mut last_report = Instant::now();
    while sink.count() < N {
        assert!(
            start.elapsed() < deadline,
            "only {} of {N} messages reached smtp-sink after {:?}; queue:\n{}\nlog tail:\n{}",
            sink.count(),
            start.elapsed(),
            d.queue_list()
                .lines()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n"),
            log_tail(&d, 60)
        );
        if last_report.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "relay: {} at the sink after {:.0}s",
                sink.count(),
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let delivered = start.elapsed().as_secs_f64();
    eprintln!(
        "relay: all {N} at smtp-sink after {delivered:.1}s end to end ({:.0} msg/s)",
        N as f64 / delivered
    );
    wait_until(&d, "an empty queue", Duration::from_secs(120), || {
        d.queue_is_empty()
    });
    // Give any duplicate a chance to show up before counting for good.
    let total = sink.settle(Duration::from_secs(3));
    assert_eq!(total, N, "transactions at smtp-sink");

    let dumps = sink.dumps();
    eprintln!(
        "relay: queue empty and sink settled at {:.1}s; checking {} dumps",
        start.elapsed().as_secs_f64(),
        dumps.len()
    );
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in dumps {
        assert_eq!(
            m.helo.as_deref(),
            Some("relay.test"),
            "{}",
            m.file.display()
        );
        assert!(
            m.mail.starts_with("<x@remote.test>"),
            "{}: {}",
            m.file.display(),
            m.mail
        );
        assert_eq!(m.rcpts.len(), 1, "{}: {:?}", m.file.display(), m.rcpts);
        assert!(
            m.message.starts_with("Received: from source.remote.test"),
            "{}: {}",
            m.file.display(),
            m.message
        );
        assert!(
            m.message.contains("\nLa de da de da 4.\n"),
            "{}: {}",
            m.file.display(),
            m.message
        );
        let rcpt = m.rcpts[0].split_whitespace().next().unwrap().to_string();
        *seen.entry(rcpt).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, &c)| c > 1).take(10).collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    let expected: Vec<String> = (1..=N).map(|i| format!("<{i}rcpt@far.test>")).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|r| !seen.contains_key(*r))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(seen.len(), N);
    assert!(d.queue_is_empty());
}
