//! The outgoing queue end to end through the real binary: immediate tries, the retry
//! schedule, notifications, crashed senders, two processes on one store, and the
//! `erlmail queue` commands. Every next hop is a sink on 127.0.0.1.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/python.rs"]
mod python;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::time::Duration;

use daemon::{wait_until, Daemon, Smtp};
use mail_parser::MimeHeaders;
use sink::{Sink, SinkConfig};

fn relay_yaml(sink: &Sink, extra: &str) -> String {
    let interval = if extra.contains("server_smtp_queue_interval") {
        ""
    } else {
        "server_smtp_queue_interval: \"100ms\"\n"
    };
    format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{}\"\n\
         server_smtp_name: \"relay.test\"\n{interval}{extra}",
        sink.port()
    )
}

/// Waits until `sink` holds `n` messages; fails the test after `timeout` with the log of
/// `d`.
async fn arrived(sink: &Sink, n: usize, timeout: Duration, d: &Daemon) {
    assert!(sink.wait_for(n, timeout).await, "{}", d.log_text());
}

fn body(subject: &str) -> String {
    format!("From: a@client.test\r\nTo: b@remote.test\r\nSubject: {subject}\r\n\r\nhello\r\n")
}

fn relay_one(d: &Daemon, from: &str, to: &[&str], subject: &str) -> String {
    let mut s = d.connect_ehlo("client.test");
    let r = s.send_mail(from, to, &body(subject));
    assert!(r.starts_with("250"), "{r}");
    let _ = s.cmd("QUIT");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_message_is_tried_at_once_and_leaves_the_queue() {
    let sink = Sink::start(SinkConfig::default()).await;
    let d = Daemon::start(&relay_yaml(&sink, "server_smtp_queue_interval: \"1h\"\n"));
    relay_one(&d, "a@client.test", &["b@remote.test"], "immediate");
    // The tick is an hour away: only the NewMessage cast can have tried it.
    arrived(&sink, 1, Duration::from_secs(10), &d).await;
    let m = &sink.messages()[0];
    assert_eq!(m.rcpts, vec!["b@remote.test".to_string()]);
    assert_eq!(m.helo, "relay.test");
    assert!(m.tls, "opportunistic STARTTLS used");
    let text = String::from_utf8_lossy(&m.data).into_owned();
    assert!(text.starts_with("Received: from client.test"), "{text}");
    d.wait_queue_empty(Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failures_follow_the_schedule_and_deliver_once() {
    let sink = Sink::start(SinkConfig::default().defer_first(2)).await;
    let d = Daemon::start(&relay_yaml(
        &sink,
        "server_smtp_retry_interval: [\"2s\", \"3s\"]\nserver_smtp_retries: 5\n",
    ));
    relay_one(&d, "a@client.test", &["b@remote.test"], "retry");
    // Meanwhile the reason is visible in the queue listing.
    wait_until("first deferral", Duration::from_secs(10), || {
        sink.transactions().len() == 1
    });
    wait_until("listing with error", Duration::from_secs(5), || {
        let l = d.queue_list();
        l.contains("451") && l.contains("b@remote.test")
    });
    arrived(&sink, 1, Duration::from_secs(20), &d).await;
    let t = sink.transactions();
    assert_eq!(t.len(), 3, "{t:?}");
    assert_eq!(
        t.iter().map(|x| x.code).collect::<Vec<_>>(),
        vec![451, 451, 250]
    );
    let gap1 = (t[1].at - t[0].at).to_std().unwrap();
    let gap2 = (t[2].at - t[1].at).to_std().unwrap();
    // The schedule: 2 s before the first retry, 3 s before the second; the queue tick
    // (100 ms) and the attempt itself add a little.
    assert!(
        gap1 >= Duration::from_millis(1950) && gap1 < Duration::from_millis(3500),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(2950) && gap2 < Duration::from_millis(4500),
        "{gap2:?}"
    );
    assert_eq!(sink.count(), 1);
    d.wait_queue_empty(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 1, "delivered exactly once");
}

fn check_dsn_with_python(dsn: &[u8], expect: &[&str]) {
    let script = r#"
import email, sys
from email import policy
m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=policy.default)
assert m.get_content_type() == 'multipart/report', m.get_content_type()
assert m.get_param('report-type') == 'delivery-status'
parts = list(m.iter_parts())
assert parts[1].get_content_type() == 'message/delivery-status', parts[1].get_content_type()
fields = []
for block in parts[1].get_payload():
    for k, v in block.items():
        fields.append('%s: %s' % (k, v))
print('\n'.join(fields))
"#;
    let out = python::python3_on(dsn, script, &[], "the DSN as Python's email reads it");
    let fields = String::from_utf8_lossy(&out);
    for e in expect {
        assert!(fields.contains(e), "{e:?} not in\n{fields}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_and_exhaustion_each_send_one_dsn_and_never_for_null_sender() {
    // Mail for remote.test goes to the refusing sink; reports to the sender's domain
    // (origin.test) go to the report sink.
    let refusing = Sink::start(
        SinkConfig::default()
            .rcpt_reply(
                "fail",
                "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
            )
            .rcpt_reply("slow", "450 4.2.0 <{rcpt}>: mailbox busy"),
    )
    .await;
    let reports = Sink::start(SinkConfig::default()).await;
    let d = Daemon::start(&format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_routes: {{\"remote.test\": \"127.0.0.1:{}\", \"origin.test\": \"127.0.0.1:{}\"}}\n\
         server_smtp_queue_interval: \"100ms\"\n\
         server_smtp_retries: 1\n\
         server_smtp_retry_interval: [\"1s\"]\n\
         server_smtp_name: \"relay.test\"\n",
        refusing.port(),
        reports.port()
    ));
    // 5xx: one DSN at once. Exhausted 4xx: one DSN after the single retry.
    let mut s = d.connect_ehlo("client.test");
    for (mail, rcpt, subject) in [
        (
            "MAIL FROM:<sender@origin.test> RET=HDRS ENVID=env-1",
            "RCPT TO:<fail@remote.test> ORCPT=rfc822;fail@remote.test",
            "will bounce",
        ),
        (
            "MAIL FROM:<sender@origin.test>",
            "RCPT TO:<slow@remote.test>",
            "will expire",
        ),
        // Null sender, and NOTIFY=NEVER: no report whatever happens.
        (
            "MAIL FROM:<>",
            "RCPT TO:<fail@remote.test>",
            "bounce of a bounce",
        ),
        (
            "MAIL FROM:<sender@origin.test>",
            "RCPT TO:<fail@remote.test> NOTIFY=NEVER",
            "never tell",
        ),
    ] {
        s.begin_data(mail, &[rcpt]);
        s.send_raw(body(subject).as_bytes());
        assert!(s.cmd(".").starts_with("250"));
    }
    let _ = s.cmd("QUIT");

    arrived(&reports, 2, Duration::from_secs(20), &d).await;
    d.wait_queue_empty(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dsns = reports.messages();
    assert_eq!(dsns.len(), 2, "exactly two reports");
    for m in &dsns {
        assert_eq!(m.mail_from, "", "reports come from <>");
        assert_eq!(m.rcpts, vec!["sender@origin.test".to_string()]);
    }
    let bounce = dsns
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("fail@remote.test"))
        .expect("report for the 5xx");
    let expired = dsns
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("slow@remote.test"))
        .expect("report for the exhausted message");

    // mail-parser reads it as multipart/report.
    let parsed = mail_parser::MessageParser::default()
        .parse(&bounce.data)
        .expect("parse");
    let ct = parsed.content_type().expect("content type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(text.contains("text/rfc822-headers"), "RET=HDRS honoured");
    assert!(!text.contains("\r\nhello\r\n"), "RET=HDRS: no body");

    check_dsn_with_python(
        &bounce.data,
        &[
            "Reporting-MTA: dns; relay.test",
            "Original-Envelope-Id: env-1",
            "Arrival-Date:",
            "Final-Recipient: rfc822; fail@remote.test",
            "Original-Recipient: rfc822; fail@remote.test",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; 127.0.0.1",
            "Diagnostic-Code: smtp; 550 5.1.1",
            "Last-Attempt-Date:",
        ],
    );
    check_dsn_with_python(
        &expired.data,
        &[
            "Final-Recipient: rfc822; slow@remote.test",
            "Action: failed",
            "Status: 4.2.0",
            "Diagnostic-Code: smtp; 450 4.2.0",
        ],
    );
    assert!(
        String::from_utf8_lossy(&expired.data).contains("will expire"),
        "RET absent: full message returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_panics_twice_then_succeeds_delivers_once() {
    let sink = Sink::start(SinkConfig::default()).await;
    let d = Daemon::start_with_env(
        &relay_yaml(&sink, ""),
        &[("ERLMAIL_TEST_SENDER_PANICS", "2")],
    );
    relay_one(&d, "a@client.test", &["b@remote.test"], "crashy");
    arrived(&sink, 1, Duration::from_secs(15), &d).await;
    d.wait_queue_empty(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 1);
    let log = d.log_text();
    assert_eq!(log.matches("sender failed").count(), 2, "{log}");
    assert!(
        log.contains("erlmail_sup/smtpd_queue/smtpc_sender#"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_always_panics_ends_as_a_temporary_failure_still_queued_and_unlocked() {
    let sink = Sink::start(SinkConfig::default()).await;
    let mut d = Daemon::start_with_env(
        &relay_yaml(&sink, "server_smtp_retry_interval: [\"1h\"]\n"),
        &[("ERLMAIL_TEST_SENDER_PANICS", "1000")],
    );
    relay_one(&d, "a@client.test", &["b@remote.test"], "always crashes");
    d.wait_for_log(
        "counting the try as a temporary failure",
        Duration::from_secs(15),
    );
    // The log line comes before the record commits (records wait a few ms for company).
    let mut listing = String::new();
    wait_until("the crash recorded", Duration::from_secs(5), || {
        listing = d.queue_list();
        listing.contains("delivery agent crashed")
    });
    assert!(!listing.contains("being delivered"), "unlocked: {listing}");
    assert!(listing.contains("b@remote.test [pending]"), "{listing}");
    assert_eq!(sink.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_list_show_hold_release_delete_and_flush_wakes_the_daemon() {
    let sink = Sink::start(SinkConfig::plain().defer_first(2)).await;
    let d = Daemon::start(&relay_yaml(
        &sink,
        "server_smtp_retry_interval: [\"1h\"]\nserver_smtp_queue_interval: \"200ms\"\n",
    ));
    relay_one(&d, "a@client.test", &["b@remote.test"], "first");
    relay_one(&d, "a@client.test", &["c@remote.test"], "second");
    wait_until("two deferrals", Duration::from_secs(10), || {
        sink.transactions().len() == 2
    });
    let mut listing = String::new();
    wait_until("both listed with errors", Duration::from_secs(5), || {
        listing = d.queue_list();
        listing.matches("451 4.3.0").count() >= 2
    });
    assert!(
        listing.contains("-- 1 Kbytes in 2 Requests.") || listing.contains("in 2 Requests."),
        "{listing}"
    );
    let ids: Vec<String> = listing
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with(' ') && !l.starts_with("--"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{listing}");

    let (status, shown, _) = d.admin(&["queue", "show", &ids[0]], None);
    assert!(status.success());
    assert!(
        shown.contains("sender: <a@client.test>") && shown.contains("Subject: first"),
        "{shown}"
    );

    // Hold the first, delete the second, flush: nothing is sent.
    assert!(d.admin(&["queue", "hold", &ids[0]], None).0.success());
    assert!(d.admin(&["queue", "delete", &ids[1]], None).0.success());
    assert!(d.queue_list().contains("held"));
    let (status, out, _) = d.admin(&["queue", "flush"], None);
    assert!(status.success(), "{out}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.count(), 0, "held and deleted messages are not sent");

    // Release and flush: the running daemon delivers within a second or so.
    assert!(d.admin(&["queue", "release", &ids[0]], None).0.success());
    assert!(d.admin(&["queue", "flush", &ids[0]], None).0.success());
    assert!(
        sink.wait_for(1, Duration::from_secs(2)).await,
        "flush woke the daemon"
    );
    assert!(String::from_utf8_lossy(&sink.messages()[0].data).contains("Subject: first"));
    d.wait_queue_empty(Duration::from_secs(5));
    let (status, _, err) = d.admin(&["queue", "show", &ids[1]], None);
    assert!(!status.success() && err.contains("no queued message"));

    // delete --all
    relay_one(&d, "a@client.test", &["defer-d@remote.test"], "third");
    wait_until("third deferred", Duration::from_secs(10), || {
        d.queue_list().contains("450 4.2.0")
    });
    let (status, out, _) = d.admin(&["queue", "delete", "--all"], None);
    assert!(status.success() && out.contains("Deleted: 1"), "{out}");
    assert!(d.queue_is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_sqlite_store_never_send_a_message_twice() {
    const N: usize = 2000;
    let sink = Sink::start(SinkConfig::plain()).await;
    let a = Daemon::start(&relay_yaml(&sink, "node_name: \"node-a\"\n"));
    // One store file, two spools: a spool belongs to one daemon (its lock), but two
    // nodes may share a SQLite store through store_url.
    let store_line = format!(
        "store_url: \"sqlite://{}\"\n",
        a.dir.path().join("spool/erlmail.db").display()
    );
    let b = Daemon::start(&relay_yaml(
        &sink,
        &format!("node_name: \"node-b\"\n{store_line}"),
    ));
    // Half the messages into each node, pipelined in batches.
    let send = |d: &Daemon, tag: &str| {
        let mut s: Smtp = d.connect_ehlo("client.test");
        for i in 0..N / 2 {
            s.send_ok(
                "a@client.test",
                &["b@remote.test"],
                &format!("Subject: {tag}-{i}\r\nX-Seq: {tag}-{i}\r\n\r\nbody\r\n"),
            );
        }
    };
    std::thread::scope(|sc| {
        sc.spawn(|| send(&a, "a"));
        sc.spawn(|| send(&b, "b"));
    });
    assert!(
        sink.wait_for(N, Duration::from_secs(120)).await,
        "only {} of {N} delivered",
        sink.count()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = std::collections::HashMap::new();
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let seq = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Seq: "))
            .expect("sequence header")
            .to_string();
        *seen.entry(seq).or_insert(0) += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "sent twice: {dups:?}");
    assert_eq!(seen.len(), N);
    let la = a.log_text();
    let lb = b.log_text();
    let sent_a = la.matches("status=\"sent\"").count() + la.matches("status=sent").count();
    let sent_b = lb.matches("status=\"sent\"").count() + lb.matches("status=sent").count();
    eprintln!("node-a sent {sent_a}, node-b sent {sent_b}");
    assert!(
        sent_a > 0 && sent_b > 0,
        "both nodes took part ({sent_a}/{sent_b})"
    );
}
