//! Integration tests of the outbound layer (routing over DNS, the SMTP client) and of
//! the DSN builder read back by Python's `email` package, all on loopback: an
//! in-process DNS server (`support/dns.rs`) and scriptable SMTP sinks
//! (`support/sink.rs`).

#[path = "support/dns.rs"]
mod dns;
#[path = "support/sink.rs"]
mod sink;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use chrono::TimeZone;
use erlmail::outbound::{
    deliver, deliver_message, DeliveryOptions, Hop, NextHop, RouteError, Router, RouterConfig,
};
use erlmail::queue::dsn::{build_dsn, DsnInput, DsnKind, DsnRecipient, Ret};
use erlmail::queue::outcome::{FailureCause, Outcome, RcptStatus, SmtpReply};
use sink::{Sink, SinkConfig, StartTls};

const V4: Ipv4Addr = Ipv4Addr::LOCALHOST;
const V6: Ipv6Addr = Ipv6Addr::LOCALHOST;
const BODY: &[u8] = b"From: a@origin.test\r\nTo: b@example.test\r\nSubject: t\r\n\r\nhello\r\n";

fn opts() -> DeliveryOptions {
    DeliveryOptions::with_timeout(Duration::from_secs(10))
}

fn router(dns: &dns::DnsServer, port: u16) -> Router {
    router_with(dns, port, BTreeMap::new(), None)
}

fn router_with(
    dns: &dns::DnsServer,
    port: u16,
    routes: BTreeMap<String, String>,
    relay_host: Option<String>,
) -> Router {
    Router::new(RouterConfig {
        routes,
        relay_host,
        remote_port: port,
        dns_nameservers: vec![dns.addr()],
        delivery: opts(),
    })
    .unwrap()
}

fn rcpts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn wait() -> Duration {
    Duration::from_secs(10)
}

#[tokio::test]
async fn mx_preference_lower_value_wins() {
    let (sink4, sink6) = Sink::start_pair(SinkConfig::default(), SinkConfig::default()).await;
    // The worse MX is listed first, so order of the answer is not what decides.
    let zone = dns::Zone::new()
        .mx("example.test", 20, "mx-b.example.test")
        .mx("example.test", 10, "mx-a.example.test")
        .a("mx-b.example.test", V4)
        .aaaa("mx-a.example.test", V6);
    let dns = dns::DnsServer::start(zone).await;
    let r = router(&dns, sink4.port());

    assert_eq!(
        r.next_hop("example.test"),
        NextHop::Mx("example.test".into())
    );
    let hops = r.resolve(&r.next_hop("Example.TEST")).await.unwrap();
    assert_eq!(
        hops.iter()
            .map(|h| (h.host.as_str(), h.addr))
            .collect::<Vec<_>>(),
        vec![
            (
                "mx-a.example.test",
                SocketAddr::new(V6.into(), sink4.port())
            ),
            (
                "mx-b.example.test",
                SocketAddr::new(V4.into(), sink4.port())
            ),
        ]
    );

    let res = deliver_message(
        &r,
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test"]),
        BODY,
    )
    .await;
    assert_eq!(res.len(), 1);
    assert!(
        matches!(res[0].status, RcptStatus::Delivered { .. }),
        "{:?}",
        res[0]
    );
    assert_eq!(res[0].remote_mta.as_deref(), Some("mx-a.example.test"));
    assert!(sink6.wait_for(1, wait()).await);
    assert_eq!(sink4.count(), 0);
    let m = &sink6.messages()[0];
    assert_eq!(m.helo, "erlmail.test");
    assert_eq!(m.mail_from, "a@origin.test");
    assert_eq!(m.rcpts, vec!["b@example.test"]);
    assert_eq!(m.data, BODY);
}

#[tokio::test]
async fn falls_back_to_next_mx_when_first_refuses_connections() {
    let sink = Sink::start(SinkConfig::default()).await;
    // mx-a resolves to ::1 on the sink's port, where nothing listens.
    let zone = dns::Zone::new()
        .mx("example.test", 10, "mx-a.example.test")
        .mx("example.test", 20, "mx-b.example.test")
        .aaaa("mx-a.example.test", V6)
        .a("mx-b.example.test", V4);
    let dns = dns::DnsServer::start(zone).await;
    let r = router(&dns, sink.port());
    let res = deliver_message(
        &r,
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test"]),
        BODY,
    )
    .await;
    assert!(
        matches!(res[0].status, RcptStatus::Delivered { .. }),
        "{:?}",
        res[0]
    );
    assert_eq!(res[0].remote_mta.as_deref(), Some("mx-b.example.test"));
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn falls_back_to_next_mx_on_421_greeting() {
    let busy = SinkConfig {
        greeting: "421 4.3.2 busy.test Service not available".into(),
        ..SinkConfig::default()
    };
    let (busy4, good6) = Sink::start_pair(busy, SinkConfig::default()).await;
    let zone = dns::Zone::new()
        .mx("example.test", 10, "mx-a.example.test")
        .mx("example.test", 20, "mx-b.example.test")
        .a("mx-a.example.test", V4)
        .aaaa("mx-b.example.test", V6);
    let dns = dns::DnsServer::start(zone).await;
    let r = router(&dns, busy4.port());
    let res = deliver_message(
        &r,
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test"]),
        BODY,
    )
    .await;
    assert!(
        matches!(res[0].status, RcptStatus::Delivered { .. }),
        "{:?}",
        res[0]
    );
    assert_eq!(res[0].remote_mta.as_deref(), Some("mx-b.example.test"));
    assert_eq!(busy4.connections(), 1);
    assert_eq!(good6.count(), 1);
}

#[tokio::test]
async fn all_hosts_failing_is_temporary_with_last_reply() {
    let busy = SinkConfig {
        greeting: "421 4.3.2 busy.test Service not available".into(),
        ..SinkConfig::default()
    };
    let sink = Sink::start(busy).await;
    let closed = sink::closed_addr().await;
    let report = deliver(
        &[Hop::addr(closed), Hop::addr(sink.addr())],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test"]),
        BODY,
        &opts(),
    )
    .await;
    assert_eq!(report.skipped.len(), 2);
    assert!(matches!(report.skipped[0].1, FailureCause::Connection(_)));
    match &report.results[0].status {
        RcptStatus::Temporary {
            cause: FailureCause::Reply(r),
        } => assert_eq!(r.code, 421),
        other => panic!("{other:?}"),
    }
    assert_eq!(report.results[0].status.status(), "4.3.2");
}

#[tokio::test]
async fn a_only_domain_uses_implicit_mx() {
    let sink = Sink::start(SinkConfig::default()).await;
    let zone = dns::Zone::new().a("aonly.test", V4);
    let dns = dns::DnsServer::start(zone).await;
    let r = router(&dns, sink.port());
    let hops = r.resolve_domain("aonly.test").await.unwrap();
    assert_eq!(
        hops,
        vec![Hop {
            host: "aonly.test".into(),
            addr: sink.addr()
        }]
    );
    let res = deliver_message(&r, "erlmail.test", "", &rcpts(&["x@aonly.test"]), BODY).await;
    assert!(
        matches!(res[0].status, RcptStatus::Delivered { .. }),
        "{:?}",
        res[0]
    );
    let m = &sink.messages()[0];
    assert_eq!(m.mail_from, "", "null sender sent as MAIL FROM:<>");
    assert!(sink.commands().iter().any(|c| c == "MAIL FROM:<>"));
}

#[tokio::test]
async fn null_mx_nxdomain_and_servfail() {
    let zone = dns::Zone::new()
        .null_mx("nullmx.test")
        .a("nullmx.test", V4)
        .nxdomain("gone.test")
        .servfail("broken.test")
        .empty("norecords.test");
    let dns = dns::DnsServer::start(zone).await;
    let r = router(&dns, 25);
    assert_eq!(
        r.resolve_domain("nullmx.test").await,
        Err(RouteError::NullMx("nullmx.test".into()))
    );
    assert_eq!(
        r.resolve_domain("gone.test").await,
        Err(RouteError::NoSuchDomain("gone.test".into()))
    );
    assert_eq!(
        r.resolve_domain("norecords.test").await,
        Err(RouteError::NoAddress("norecords.test".into()))
    );
    assert!(matches!(
        r.resolve_domain("broken.test").await,
        Err(RouteError::DnsTemporary { .. })
    ));

    let res = deliver_message(
        &r,
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["x@nullmx.test", "y@gone.test", "z@broken.test"]),
        BODY,
    )
    .await;
    let got: Vec<(Outcome, String)> = res
        .iter()
        .map(|r| (r.status.outcome(), r.status.status()))
        .collect();
    assert_eq!(
        got,
        vec![
            (Outcome::Permanent, "5.1.10".to_string()),
            (Outcome::Permanent, "5.1.2".to_string()),
            (Outcome::Temporary, "4.4.3".to_string()),
        ]
    );
    assert!(res.iter().all(|r| r.remote_mta.is_none()));
}

#[tokio::test]
async fn routes_override_dns() {
    let (by_dns, by_route) = (
        Sink::start(SinkConfig::default()).await,
        Sink::start(SinkConfig::default()).await,
    );
    let zone = dns::Zone::new()
        .mx("routed.test", 10, "mx.routed.test")
        .a("mx.routed.test", V4);
    let dns = dns::DnsServer::start(zone).await;
    let mut routes = BTreeMap::new();
    routes.insert(
        "Routed.Test".to_string(),
        format!("127.0.0.1:{}", by_route.port()),
    );
    let r = router_with(&dns, by_dns.port(), routes, None);
    assert_eq!(
        r.next_hop("routed.test"),
        NextHop::Route("127.0.0.1".into(), by_route.port())
    );
    let res = deliver_message(
        &r,
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["u@routed.test"]),
        BODY,
    )
    .await;
    assert!(
        matches!(res[0].status, RcptStatus::Delivered { .. }),
        "{:?}",
        res[0]
    );
    assert_eq!(by_route.count(), 1);
    assert_eq!(by_dns.count(), 0);
    assert!(
        dns.queries().is_empty(),
        "a route needs no DNS: {:?}",
        dns.queries()
    );
}

#[tokio::test]
async fn relay_host_used_for_every_domain_without_route() {
    let relay = Sink::start(SinkConfig::default()).await;
    let routed = Sink::start(SinkConfig::default()).await;
    let dns = dns::DnsServer::start(dns::Zone::new()).await; // every name NXDOMAIN
    let mut routes = BTreeMap::new();
    routes.insert(
        "special.test".to_string(),
        format!("127.0.0.1:{}", routed.port()),
    );
    // The relay host is a name: resolved by A record, no MX look-up.
    dns.set_zone(dns::Zone::new().a("smarthost.test", V4));
    let r = router_with(
        &dns,
        25,
        routes,
        Some(format!("smarthost.test:{}", relay.port())),
    );
    let res = deliver_message(
        &r,
        "erlmail.test",
        "a@origin.test",
        &rcpts(&[
            "one@nowhere.test",
            "two@elsewhere.test",
            "three@special.test",
        ]),
        BODY,
    )
    .await;
    assert!(
        res.iter()
            .all(|r| matches!(r.status, RcptStatus::Delivered { .. })),
        "{res:?}"
    );
    // Both relayed recipients share one transaction at the relay.
    assert_eq!(relay.count(), 1);
    assert_eq!(
        relay.messages()[0].rcpts,
        vec!["one@nowhere.test", "two@elsewhere.test"]
    );
    assert_eq!(routed.messages()[0].rcpts, vec!["three@special.test"]);
    assert_eq!(res[0].remote_mta.as_deref(), Some("smarthost.test"));
    assert!(dns
        .queries()
        .iter()
        .all(|(name, _)| name == "smarthost.test"));
}

#[tokio::test]
async fn per_recipient_results_in_one_transaction() {
    let sink = Sink::start(SinkConfig::default()).await;
    let report = deliver(
        &[Hop::addr(sink.addr())],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["ok@example.test", "defer@example.test", "fail@example.test"]),
        BODY,
        &opts(),
    )
    .await;
    let codes: Vec<(Outcome, Option<u16>)> = report
        .results
        .iter()
        .map(|r| (r.status.outcome(), r.status.reply().map(|x| x.code)))
        .collect();
    assert_eq!(
        codes,
        vec![
            (Outcome::Delivered, Some(250)),
            (Outcome::Temporary, Some(450)),
            (Outcome::Permanent, Some(550)),
        ]
    );
    assert_eq!(report.results[2].status.status(), "5.1.1");
    assert_eq!(sink.transactions().len(), 1);
    assert_eq!(sink.messages()[0].rcpts, vec!["ok@example.test"]);
    assert!(report.tls, "STARTTLS offered, so used");
    assert!(report.results.iter().all(|r| r.tls));
}

#[tokio::test]
async fn no_data_when_every_recipient_is_refused() {
    let sink = Sink::start(SinkConfig::default()).await;
    let report = deliver(
        &[Hop::addr(sink.addr())],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["fail1@example.test", "defer1@example.test"]),
        BODY,
        &opts(),
    )
    .await;
    assert_eq!(report.results[0].status.outcome(), Outcome::Permanent);
    assert_eq!(report.results[1].status.outcome(), Outcome::Temporary);
    assert!(!sink.commands().iter().any(|c| c == "DATA"));
    assert_eq!(sink.transactions().len(), 0);
}

#[tokio::test]
async fn deferred_transaction_is_temporary_then_delivered() {
    let sink = Sink::start(SinkConfig {
        defer_first: 1,
        ..SinkConfig::default()
    })
    .await;
    let hops = [Hop::addr(sink.addr())];
    let to = rcpts(&["b@example.test"]);
    let o = opts();
    let go = || deliver(&hops, "erlmail.test", "a@origin.test", &to, BODY, &o);
    let first = go().await;
    match &first.results[0].status {
        RcptStatus::Temporary {
            cause: FailureCause::Reply(r),
        } => assert_eq!(r.code, 451),
        other => panic!("{other:?}"),
    }
    let second = go().await;
    assert!(matches!(
        second.results[0].status,
        RcptStatus::Delivered { .. }
    ));
    assert_eq!(sink.count(), 1);
    assert_eq!(
        sink.transactions()
            .iter()
            .map(|t| t.code)
            .collect::<Vec<_>>(),
        vec![451, 250]
    );
}

#[tokio::test]
async fn mail_from_5xx_fails_all_recipients_permanently() {
    let sink = Sink::start(SinkConfig {
        mail_reply: "553 5.7.1 <a@origin.test>: Sender address rejected".into(),
        ..SinkConfig::default()
    })
    .await;
    let report = deliver(
        &[Hop::addr(sink.addr())],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test", "c@example.test"]),
        BODY,
        &opts(),
    )
    .await;
    for r in &report.results {
        assert_eq!(r.status.outcome(), Outcome::Permanent);
        assert_eq!(r.status.status(), "5.7.1");
    }
}

#[tokio::test]
async fn dot_stuffing_round_trip() {
    let sink = Sink::start(SinkConfig {
        starttls: StartTls::Off,
        ..SinkConfig::default()
    })
    .await;
    let body =
        b".starts with a dot\r\nSubject: x\r\n\r\n.\r\n..two dots\r\nmiddle . dot\r\n.\r\nend\r\n";
    let report = deliver(
        &[Hop::addr(sink.addr())],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test"]),
        body,
        &opts(),
    )
    .await;
    assert!(matches!(
        report.results[0].status,
        RcptStatus::Delivered { .. }
    ));
    assert!(!report.tls);
    assert_eq!(sink.messages()[0].data, body.to_vec());
    assert!(!sink.messages()[0].tls);
}

#[tokio::test]
async fn broken_tls_retries_host_in_plain_text() {
    let sink = Sink::start(SinkConfig {
        starttls: StartTls::Broken,
        ..SinkConfig::default()
    })
    .await;
    let report = deliver(
        &[Hop::addr(sink.addr())],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test"]),
        BODY,
        &opts(),
    )
    .await;
    assert!(
        matches!(report.results[0].status, RcptStatus::Delivered { .. }),
        "{report:?}"
    );
    assert!(!report.tls);
    assert_eq!(sink.connections(), 2);
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn working_tls_is_used() {
    let sink = Sink::start(SinkConfig::default()).await;
    let report = deliver(
        &[Hop::addr(sink.addr())],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test"]),
        BODY,
        &opts(),
    )
    .await;
    assert!(report.tls);
    assert!(sink.messages()[0].tls);
    assert_eq!(
        sink.messages()[0].helo,
        "erlmail.test",
        "EHLO again after STARTTLS"
    );
    let ehlos = sink
        .commands()
        .iter()
        .filter(|c| c.starts_with("EHLO "))
        .count();
    assert_eq!(ehlos, 2);
}

/// The DSN read by Python's `email` package: multipart/report, its three parts, and the
/// delivery-status fields.
#[test]
fn dsn_parsed_by_python_email() {
    let at = chrono::Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 0).unwrap();
    let status = RcptStatus::failed(FailureCause::Reply(SmtpReply::new(
        550,
        "5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
    )));
    let input = DsnInput {
        kind: DsnKind::Failure,
        reporting_mta: "mx.example.org".into(),
        original_sender: "alice@example.org".into(),
        envid: Some("ENV123".into()),
        arrival_date: at,
        date: at,
        message_id: "<dsn.42@mx.example.org>".into(),
        ret: Some(Ret::Full),
        recipients: vec![DsnRecipient::from_status(
            "bob@remote.test",
            Some("rfc822;bob@remote.test"),
            &status,
            Some("mx1.remote.test"),
            Some(at),
        )],
        original: BODY.to_vec(),
    };
    let dsn = build_dsn(&input);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dsn.eml");
    std::fs::write(&path, &dsn).unwrap();
    let script = r#"
import email, json, sys
from email import policy
m = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=policy.default)
parts = m.get_payload()
ds = parts[1].get_payload()
out = {
  'type': m.get_content_type(),
  'report_type': m.get_param('report-type'),
  'parts': [p.get_content_type() for p in parts],
  'subject': str(m['Subject']),
  'from': str(m['From']),
  'to': str(m['To']),
  'per_message': {k: str(v) for k, v in ds[0].items()},
  'per_rcpt': {k: str(v) for k, v in ds[1].items()},
  'inner_subject': str(parts[2].get_payload()[0]['Subject']),
  'defects': len(m.defects),
}
print(json.dumps(out, sort_keys=True))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "multipart/report");
    assert_eq!(v["report_type"], "delivery-status");
    assert_eq!(
        v["parts"],
        serde_json::json!(["text/plain", "message/delivery-status", "message/rfc822"])
    );
    assert_eq!(v["subject"], "Undelivered Mail Returned to Sender");
    assert_eq!(
        v["from"],
        "MAIL DELIVERY SYSTEM <MAILER-DAEMON@mx.example.org>"
    );
    assert_eq!(v["to"], "alice@example.org");
    assert_eq!(v["defects"], 0);
    assert_eq!(v["inner_subject"], "t");
    assert_eq!(
        v["per_message"],
        serde_json::json!({
            "Reporting-MTA": "dns; mx.example.org",
            "Original-Envelope-Id": "ENV123",
            "Arrival-Date": "Fri, 1 Mar 2024 12:00:00 +0000",
        })
    );
    assert_eq!(
        v["per_rcpt"],
        serde_json::json!({
            "Final-Recipient": "rfc822; bob@remote.test",
            "Original-Recipient": "rfc822; bob@remote.test",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; mx1.remote.test",
            "Diagnostic-Code": "smtp; 550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
            "Last-Attempt-Date": "Fri, 1 Mar 2024 12:00:00 +0000",
        })
    );
}
