//! Operating erlmail: the admin endpoint (`/metrics` parsed by Prometheus's own Python
//! parser, `/tree` live, `/queue`), `erlmail status`, and the filters and JSON output of
//! `erlmail queue list`.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/python.rs"]
mod python;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

use daemon::{http_get, wait_until, Daemon};
use sink::{Sink, SinkConfig};

/// Parse a scrape with prometheus_client's parser; samples as `name{labels}` -> value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print("%s{%s}\t%r" % (s.name, labels, s.value))
"#;
    let out = python::python3_on(
        text.as_bytes(),
        script,
        &[],
        &format!("not valid Prometheus text format:\n{text}\n"),
    );
    String::from_utf8_lossy(&out)
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('\t').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_mail_is_sent_rejected_relayed_and_bounced() {
    let sink =
        Sink::start(SinkConfig::default().rcpt_reply("fail", "550 5.1.1 no such user")).await;
    let reports = Sink::start(SinkConfig::default()).await;
    let mut d = Daemon::start(&format!(
        "admin_listen: \"127.0.0.1:0\"\n\
         server_smtp_relay_clients: [\"127.0.0.2/32\"]\n\
         server_smtp_routes: {{\"remote.test\": \"127.0.0.1:{}\", \"origin.test\": \"127.0.0.1:{}\"}}\n\
         server_smtp_queue_interval: \"100ms\"\n",
        sink.port(),
        reports.port()
    ));
    let admin = d.admin_addr();
    d.add_user("alice@example.test");
    let before = parse_metrics(&http_get(admin, "/metrics"));

    // 127.0.0.1 may not relay: one local delivery and one relay denial.
    let mut s = d.connect_ehlo("a.test");
    assert!(s
        .send_mail(
            "x@origin.test",
            &["alice@example.test"],
            "Subject: m\r\n\r\nx\r\n"
        )
        .starts_with("250"));
    assert!(s.cmd("MAIL FROM:<x@origin.test>").starts_with("250"));
    assert!(s.cmd("RCPT TO:<far@remote.test>").starts_with("554"));
    assert!(s.cmd("RSET").starts_with("250"));
    drop(s);
    // 127.0.0.2 may: one relayed and delivered, one bounced (with a report).
    let mut s = {
        use std::io::{BufRead, BufReader};
        // Connect from 127.0.0.2, the one relay client.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let stream = socket.connect(d.addr).await.unwrap().into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        let mut r = BufReader::new(stream.try_clone().unwrap());
        let mut greeting = String::new();
        r.read_line(&mut greeting).unwrap();
        assert!(greeting.starts_with("220"));
        RawClient { stream, reader: r }
    };
    assert!(s.cmd("EHLO b.test").starts_with("250"));
    for to in ["ok@remote.test", "fail@remote.test"] {
        assert!(s.cmd("MAIL FROM:<x@origin.test>").starts_with("250"));
        assert!(s.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
        assert!(s.cmd("DATA").starts_with("354"));
        assert!(s.cmd("Subject: r\r\n\r\nbody\r\n.").starts_with("250"));
    }
    drop(s);
    assert!(sink.wait_for(1, Duration::from_secs(10)).await);
    assert!(reports.wait_for(1, Duration::from_secs(10)).await);
    let mut after = BTreeMap::new();
    wait_until("counters", Duration::from_secs(10), || {
        after = parse_metrics(&http_get(admin, "/metrics"));
        metric(&after, "erlmail_dsn_sent_total{kind=failed}") >= 1.0
            && metric(&after, "erlmail_deliveries_total{result=sent}") >= 2.0
    });
    let grew = |key: &str, by: f64| {
        let (b, a) = (metric(&before, key), metric(&after, key));
        assert!(a - b >= by, "{key}: {b} -> {a}\n{after:#?}");
    };
    grew("erlmail_smtp_sessions_total{}", 2.0);
    grew("erlmail_messages_accepted_total{destination=local}", 1.0);
    grew("erlmail_messages_accepted_total{destination=relay}", 2.0);
    grew("erlmail_relay_denied_total{}", 1.0);
    grew("erlmail_smtp_rejections_total{reason=relay_denied}", 1.0);
    grew("erlmail_deliveries_total{result=bounced}", 1.0);
    // The relayed message and the report were both sent.
    grew("erlmail_deliveries_total{result=sent}", 2.0);
    grew("erlmail_dsn_sent_total{kind=failed}", 1.0);
    grew("erlmail_store_commit_seconds_count{}", 3.0);
    grew("erlmail_delivery_latency_seconds_count{}", 2.0);
    assert!(after.contains_key("erlmail_queue_messages{state=deferred}"));
    assert!(after.contains_key("erlmail_smtp_sessions_open{}"));
}

struct RawClient {
    stream: std::net::TcpStream,
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl RawClient {
    fn cmd(&mut self, line: &str) -> String {
        use std::io::{BufRead, Write};
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        let mut out = Vec::new();
        loop {
            let mut l = String::new();
            self.reader.read_line(&mut l).unwrap();
            let more = l.as_bytes().get(3) == Some(&b'-');
            out.push(l.trim_end().to_string());
            if !more {
                break;
            }
        }
        out.join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_shows_live_sessions_and_senders_during_a_run_and_not_after() {
    // A next hop that accepts the connection and then says nothing: the sender waits
    // for its greeting until the timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let conns: Vec<_> = silent.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(4));
        drop(conns);
    });
    let mut d = Daemon::start(&format!(
        "admin_listen: \"127.0.0.1:0\"\n\
         server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{port}\"\n\
         server_smtp_retry_interval: [\"1h\"]\n\
         server_smtp_timeout: \"3s\"\n"
    ));
    let admin = d.admin_addr();
    let mut s = d.connect_ehlo("t.test");
    let r = s.send_mail("a@t.test", &["b@far.test"], "Subject: t\r\n\r\nx\r\n");
    let id = r.rsplit(' ').next().unwrap().to_string();
    let mut tree = String::new();
    // The sender starts once the queue has claimed the message, just after the 250.
    wait_until("sender in the tree", Duration::from_secs(3), || {
        tree = http_get(admin, "/tree");
        tree.contains(&format!("smtpc_sender#{id}"))
    });
    assert!(tree.contains("smtpd_fsm#1"), "{tree}");
    let json: serde_json::Value =
        serde_json::from_str(&http_get(admin, "/tree?format=json")).unwrap();
    assert_eq!(json["name"], "erlmail_sup");
    let _ = s.cmd("QUIT");
    drop(s);
    held.join().unwrap();
    wait_until("session and sender gone", Duration::from_secs(15), || {
        let t = http_get(admin, "/tree");
        !t.contains("smtpd_fsm#") && !t.contains("smtpc_sender#")
    });
    let tree = http_get(admin, "/tree");
    assert!(
        tree.contains("smtpd_listener") && tree.contains("smtpd_queue"),
        "{tree}"
    );
    let queue = http_get(admin, "/queue");
    assert!(
        queue.contains("queued 1 (incoming 0, active 0, deferred 1, held 0)"),
        "{queue}"
    );
    assert!(queue.contains("far.test"), "{queue}");
}

#[test]
fn erlmail_status_prints_tree_queue_and_counters() {
    let mut d = Daemon::start("admin_listen: \"127.0.0.1:0\"\n");
    let admin = d.admin_addr();
    let config = d.dir.path().join("status.yaml");
    std::fs::write(&config, format!("admin_listen: \"{admin}\"\n")).unwrap();
    let (status, out, err) = daemon::erlmail(&config, &["status"], None);
    assert!(status.success(), "{err}");
    assert!(
        out.contains("erlmail_sup") && out.contains("smtpd_listener"),
        "{out}"
    );
    assert!(out.contains("queued 0"), "{out}");
    assert!(out.contains("erlmail_smtp_sessions_total"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_filters_and_json() {
    // Everything defers: 450 for every recipient keeps the messages queued.
    let sink = Sink::start(SinkConfig::plain().rcpt_reply("", "450 4.2.1 mailbox busy")).await;
    let d = Daemon::start(&format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_routes: {{\"a.test\": \"127.0.0.1:{}\", \"b.test\": \"127.0.0.1:9\"}}\n\
         server_smtp_retry_interval: [\"1h\"]\n",
        sink.port()
    ));
    let mut s = d.connect_ehlo("c.test");
    for (from, to) in [
        ("alice@one.test", "x@a.test"),
        ("bob@two.test", "y@b.test"),
        ("", "z@a.test"),
    ] {
        assert!(s
            .send_mail(from, &[to], "Subject: f\r\n\r\nx\r\n")
            .starts_with("250"));
    }
    drop(s);
    let list = |args: &[&str]| {
        let mut all = vec!["queue", "list"];
        all.extend_from_slice(args);
        let (status, out, err) = d.admin(&all, None);
        assert!(status.success(), "{args:?}: {err}");
        out
    };
    wait_until("three tried", Duration::from_secs(15), || {
        let v: serde_json::Value = serde_json::from_str(&list(&["--json"])).unwrap();
        v.as_array().unwrap().len() == 3 && v.as_array().unwrap().iter().all(|m| m["tries"] == 1)
    });
    let json: serde_json::Value = serde_json::from_str(&list(&["--json"])).unwrap();
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    for m in arr {
        for key in [
            "id",
            "size",
            "received_at",
            "sender",
            "tries",
            "next_retry_at",
            "last_error",
            "held",
            "recipients",
        ] {
            assert!(m.get(key).is_some(), "{key} missing in {m}");
        }
        assert_eq!(m["recipients"][0]["state"], "pending");
    }
    let count = |args: &[&str]| {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str::<serde_json::Value>(&list(&a))
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(count(&["--sender", "alice"]), 1);
    assert_eq!(count(&["--sender", "<>"]), 1);
    assert_eq!(count(&["--rcpt", "y@b"]), 1);
    assert_eq!(count(&["--domain", "a.test"]), 2);
    assert_eq!(count(&["--domain", "A.TEST."]), 2);
    assert_eq!(count(&["--error", "mailbox busy"]), 2);
    assert_eq!(
        count(&["--error", "connect"]),
        1,
        "b.test's port 9 refuses connections"
    );
    assert_eq!(count(&["--older-than", "1h"]), 0);
    assert_eq!(count(&["--older-than", "0s", "--domain", "b.test"]), 1);
    let table = list(&["--domain", "b.test"]);
    assert!(
        table.contains("y@b.test") && !table.contains("x@a.test"),
        "{table}"
    );

    // A filtered bulk delete, with a count at the end.
    let (status, out, _) = d.admin(&["queue", "delete", "--all", "--domain", "a.test"], None);
    assert!(status.success());
    assert!(out.contains("Deleted: 2"), "{out}");
    assert_eq!(count(&[]), 1);
}
