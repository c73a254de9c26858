//! RFC-exact relaying through the real binary, each rule against a recording next hop
//! (the sink on 127.0.0.1, told which extensions to offer): DSN parameters passed on to
//! a hop that offers DSN and `relayed` reports from one that does not (RFC 3461),
//! SMTPUTF8 declared and required of the hop (RFC 6531), 8-bit text converted for a hop
//! without 8BITMIME (RFC 6152), and SIZE/BODY passed on.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::time::{Duration, Instant};

use daemon::{Daemon, Smtp};
use sink::{Received, Sink, SinkConfig};

/// A relay for 127.0.0.1 whose routes send each test domain to its sink, and reports
/// for origin.test to `reports`.
fn relay(routes: &[(&str, &Sink)], reports: &Sink) -> Daemon {
    let mut map: Vec<String> = routes
        .iter()
        .map(|(d, s)| format!("\"{d}\": \"127.0.0.1:{}\"", s.port()))
        .collect();
    map.push(format!("\"origin.test\": \"127.0.0.1:{}\"", reports.port()));
    Daemon::start(&format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_routes: {{{}}}\n\
         server_smtp_queue_interval: \"100ms\"\n\
         server_smtp_name: \"relay.test\"\n",
        map.join(", ")
    ))
}

fn client(d: &Daemon) -> Smtp {
    d.connect_ehlo("client.test")
}

/// The MAIL and RCPT commands a sink was given.
fn envelope_lines(sink: &Sink) -> Vec<String> {
    sink.commands()
        .into_iter()
        .filter(|c| c.starts_with("MAIL FROM:") || c.starts_with("RCPT TO:"))
        .collect()
}

/// The value of the first `name:` line of a report's text.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
}

async fn wait(sink: &Sink, n: usize, d: &Daemon) {
    assert!(
        sink.wait_for(n, Duration::from_secs(20)).await,
        "waiting for {n} at port {}; log:\n{}",
        sink.port(),
        d.log_text()
    );
}

/// Waits until the queue is empty (every message has had its outcome).
fn drained(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, out, err) = d.admin(&["queue", "list"], None);
        assert!(status.success(), "{err}");
        if out.contains("Mail queue is empty") {
            return;
        }
        assert!(Instant::now() < deadline, "queue not drained:\n{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const TEXT: &[u8] = b"From: s@origin.test\r\nSubject: dsn\r\n\r\nhello\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_go_to_a_hop_offering_dsn_and_others_get_relayed_reports() {
    let with_dsn = Sink::start(SinkConfig::default().offering(&["8BITMIME", "DSN"])).await;
    let without = Sink::start(SinkConfig::default()).await;
    let reports = Sink::start(SinkConfig::default()).await;
    let d = relay(
        &[("dsn.test", &with_dsn), ("plain.test", &without)],
        &reports,
    );
    let mut s = client(&d);
    let mail = "MAIL FROM:<s@origin.test> RET=HDRS ENVID=env+2B1";
    let r = s.transaction(
        mail,
        &["RCPT TO:<x@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40orig.test"],
        TEXT,
    );
    assert!(r.starts_with("250"), "{r}");
    wait(&with_dsn, 1, &d).await;
    assert_eq!(
        envelope_lines(&with_dsn),
        [
            format!(
                "MAIL FROM:<s@origin.test> SIZE={} RET=HDRS ENVID=env+2B1",
                with_dsn.messages()[0].data.len()
            ),
            "RCPT TO:<x@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40orig.test".to_string(),
        ],
        "every DSN parameter is passed on, SIZE is the size as sent"
    );

    // A hop without DSN: no DSN parameter goes there, and NOTIFY=SUCCESS gets a
    // `relayed` report from us, ORCPT kept; NOTIFY=NEVER gets nothing.
    let r = s.transaction(
        mail,
        &[
            "RCPT TO:<y@plain.test> NOTIFY=SUCCESS ORCPT=rfc822;first+40orig.test",
            "RCPT TO:<z@plain.test> NOTIFY=NEVER",
        ],
        TEXT,
    );
    assert!(r.starts_with("250"), "{r}");
    wait(&without, 1, &d).await;
    let lines = envelope_lines(&without);
    assert!(
        lines[0].starts_with("MAIL FROM:<s@origin.test> SIZE="),
        "{lines:?}"
    );
    assert!(!lines[0].contains("RET=") && !lines[0].contains("ENVID="));
    assert_eq!(
        lines[1..],
        ["RCPT TO:<y@plain.test>", "RCPT TO:<z@plain.test>"]
    );

    wait(&reports, 1, &d).await;
    drained(&d);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = reports.messages();
    assert_eq!(
        got.len(),
        1,
        "one report: the hop with DSN reports on its own"
    );
    let report = String::from_utf8_lossy(&got[0].data).into_owned();
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpts, ["s@origin.test"]);
    assert_eq!(field(&report, "Action"), Some("relayed"), "{report}");
    assert_eq!(
        field(&report, "Final-Recipient"),
        Some("rfc822; y@plain.test")
    );
    assert_eq!(
        field(&report, "Original-Recipient"),
        Some("rfc822; first@orig.test"),
        "ORCPT decoded from xtext"
    );
    assert_eq!(field(&report, "Original-Envelope-Id"), Some("env+2B1"));
    assert!(!report.contains("z@plain.test"), "NOTIFY=NEVER: {report}");
    assert!(!report.contains("x@dsn.test"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_is_declared_passed_on_and_required_of_the_next_hop() {
    let utf8 = Sink::start(SinkConfig::default().offering(&["8BITMIME", "SMTPUTF8"])).await;
    let plain = Sink::start(SinkConfig::default()).await;
    let reports = Sink::start(SinkConfig::default()).await;
    let d = relay(&[("utf8.test", &utf8), ("plain.test", &plain)], &reports);
    let mut s = client(&d);

    // A UTF-8 address needs the parameter (RFC 6531 §3.4).
    assert!(s
        .cmd("MAIL FROM:<jos\u{e9}@origin.test>")
        .starts_with("553 5.6.7"));
    assert!(s.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
    assert!(s
        .cmd("RCPT TO:<j\u{fc}rgen@utf8.test>")
        .starts_with("553 5.6.7"));
    assert!(s.cmd("RSET").starts_with("250"));

    // Declared: it reaches a hop that offers SMTPUTF8, parameter and all.
    let mail = "MAIL FROM:<s@origin.test> SMTPUTF8";
    let r = s.transaction(mail, &["RCPT TO:<j\u{fc}rgen@utf8.test>"], TEXT);
    assert!(r.starts_with("250"), "{r}");
    wait(&utf8, 1, &d).await;
    let lines = envelope_lines(&utf8);
    assert!(lines[0].ends_with(" SMTPUTF8"), "{lines:?}");
    assert_eq!(lines[1], "RCPT TO:<j\u{fc}rgen@utf8.test>");

    // A hop without it: a UTF-8 recipient, or a UTF-8 header, fails 5.6.7 without a
    // transaction there; declared but all ASCII goes through without the parameter.
    let r = s.transaction(mail, &["RCPT TO:<j\u{fc}rgen@plain.test>"], TEXT);
    assert!(r.starts_with("250"), "{r}");
    let utf8_subject = "From: s@origin.test\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nhello\r\n";
    let r = s.transaction(
        mail,
        &["RCPT TO:<header@plain.test>"],
        utf8_subject.as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    let r = s.transaction(mail, &["RCPT TO:<ascii@plain.test>"], TEXT);
    assert!(r.starts_with("250"), "{r}");
    wait(&plain, 1, &d).await;
    wait(&reports, 2, &d).await;
    drained(&d);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let delivered = plain.messages();
    assert_eq!(delivered.len(), 1, "only the all-ASCII message");
    assert_eq!(delivered[0].rcpts, ["ascii@plain.test"]);
    let lines = envelope_lines(&plain);
    assert!(lines.iter().all(|l| !l.contains("SMTPUTF8")), "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| !l.contains("header@") && !l.contains("rgen@")));

    let reports = reports.messages();
    assert_eq!(reports.len(), 2);
    for (who, r) in [
        ("rgen@plain.test", &reports),
        ("header@plain.test", &reports),
    ] {
        let report = r
            .iter()
            .map(|m| String::from_utf8_lossy(&m.data).into_owned())
            .find(|t| t.contains(who))
            .unwrap_or_else(|| panic!("a report for {who}"));
        assert_eq!(field(&report, "Action"), Some("failed"), "{report}");
        assert_eq!(field(&report, "Status"), Some("5.6.7"), "{report}");
        assert!(report.contains("SMTPUTF8 is required, but was not offered by host"));
    }
}

/// The data of the message whose recipients include `rcpt`.
fn data_for(sink: &Sink, rcpt: &str) -> Received {
    sink.messages()
        .into_iter()
        .find(|m| m.rcpts.iter().any(|r| r == rcpt))
        .unwrap_or_else(|| panic!("no message for {rcpt}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_text_is_converted_for_a_hop_without_8bitmime() {
    let seven = Sink::start(SinkConfig::default().offering(&[])).await;
    let eight = Sink::start(SinkConfig::default()).await;
    let reports = Sink::start(SinkConfig::default()).await;
    let d = relay(&[("seven.test", &seven), ("eight.test", &eight)], &reports);
    let mut s = client(&d);
    let text = "From: s@origin.test\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\n\
                Content-Type: text/plain; charset=utf-8\r\n\
                Content-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e, J\u{fc}rgen\r\n";
    let mail = "MAIL FROM:<s@origin.test> BODY=8BITMIME";
    for to in ["RCPT TO:<a@seven.test>", "RCPT TO:<a@eight.test>"] {
        let r = s.transaction(mail, &[to], text.as_bytes());
        assert!(r.starts_with("250"), "{r}");
    }
    // 8-bit octets in a part that says it is base64: no 7-bit form exists.
    let broken = "From: s@origin.test\r\nSubject: broken\r\nMIME-Version: 1.0\r\n\
                  Content-Type: text/plain; charset=utf-8\r\n\
                  Content-Transfer-Encoding: base64\r\n\r\nGr\u{fc}\u{df}e\r\n";
    let r = s.transaction(mail, &["RCPT TO:<b@seven.test>"], broken.as_bytes());
    assert!(r.starts_with("250"), "{r}");
    wait(&seven, 1, &d).await;
    wait(&eight, 1, &d).await;
    wait(&reports, 1, &d).await;
    drained(&d);

    // To the 7-bit hop: quoted-printable, no BODY parameter, headers otherwise as sent.
    let m = data_for(&seven, "a@seven.test");
    assert!(m.data.iter().all(|b| *b < 0x80), "all 7-bit");
    let got = String::from_utf8(m.data.clone()).unwrap();
    assert!(
        got.contains("Content-Transfer-Encoding: quoted-printable\r\n"),
        "{got}"
    );
    assert!(!got.contains("Content-Transfer-Encoding: 8bit"), "{got}");
    assert!(
        got.contains("\r\n\r\nGr=C3=BC=C3=9Fe, J=C3=BCrgen\r\n"),
        "{got}"
    );
    assert!(got.contains("Subject: 8bit\r\n"));
    let lines = envelope_lines(&seven);
    assert!(
        lines[0].starts_with("MAIL FROM:<s@origin.test> SIZE="),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| !l.contains("BODY=")), "{lines:?}");

    // To the hop with 8BITMIME: the text unchanged, declared 8-bit.
    let m = data_for(&eight, "a@eight.test");
    assert!(m.data.ends_with(text.as_bytes()), "sent as received");
    let lines = envelope_lines(&eight);
    assert!(lines[0].contains(" BODY=8BITMIME"), "{lines:?}");

    // The one that cannot be converted bounces 5.6.3.
    assert_eq!(seven.count(), 1);
    let report = String::from_utf8_lossy(&reports.messages()[0].data).into_owned();
    assert!(report.contains("b@seven.test"), "{report}");
    assert_eq!(field(&report, "Status"), Some("5.6.3"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ehlo_name_can_differ_from_the_name_a_loop_is_judged_by() {
    // ErlMail's `ehlo` (server_smtp_ehlo_name): the next hop is greeted as "localhost",
    // and a hop that calls itself "localhost" is not taken for this host.
    let sink = Sink::start(
        SinkConfig::default()
            .named("localhost")
            .greeting("220 localhost ESMTP"),
    )
    .await;
    let d = Daemon::start(&format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{}\"\n\
         server_smtp_queue_interval: \"100ms\"\n\
         server_smtp_name: \"relay.test\"\n\
         server_smtp_ehlo_name: \"localhost\"\n",
        sink.port()
    ));
    let mut s = client(&d);
    let r = s.transaction("MAIL FROM:<s@origin.test>", &["RCPT TO:<b@far.test>"], TEXT);
    assert!(r.starts_with("250"), "{r}");
    wait(&sink, 1, &d).await;
    assert_eq!(sink.messages()[0].helo, "localhost");
}
