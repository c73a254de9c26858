//! Integration tests of the outbound layer (routing over DNS, the SMTP client and its
//! connection cache) and of the DSN builder read back by Python's `email` package, all
//! on loopback: an in-process DNS server (`support/dns.rs`), scriptable SMTP sinks
//! (`support/sink.rs`) and, for connection reuse, a small server here (`Probe`) that
//! numbers its connections and notes how each one ended.

#[path = "support/dns.rs"]
mod dns;
#[path = "support/python.rs"]
mod python;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::TimeZone;
use erlmail::outbound::{
    deliver, deliver_message, CacheLimits, ConnectionCache, DeliveryOptions, DeliveryReport, Hop,
    NextHop, RcptResult, RouteError, Router, RouterConfig, CONNECTION_CACHE_TIME_LIMIT,
};
use erlmail::protocol::Reply;
use erlmail::queue::dsn::{build_dsn, DsnInput, DsnKind, DsnRecipient, Ret};
use erlmail::queue::outcome::{FailureCause, Outcome, RcptStatus};
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
    dns: &dns::DnsServer, port: u16, routes: BTreeMap<String, String>, relay_host: Option<String>,
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

/// `BODY` from a@origin.test to `to`, greeting as erlmail.test.
async fn send_from_a(r: &Router, to: &[&str]) -> Vec<RcptResult> {
    deliver_message(r, "erlmail.test", "a@origin.test", &rcpts(to), BODY).await
}

/// `BODY` from a@origin.test to b@example.test, greeting as erlmail.test.
async fn send_to_b(r: &Router) -> Vec<RcptResult> {
    send_from_a(r, &["b@example.test"]).await
}

/// `body` from a@origin.test to `to` over `hops`, greeting as erlmail.test, through
/// `cache` if given.
async fn deliver_via(
    hops: &[Hop], to: &[&str], body: &[u8], cache: Option<&ConnectionCache>,
) -> DeliveryReport {
    deliver(
        hops,
        "erlmail.test",
        "a@origin.test",
        &rcpts(to),
        body,
        &opts(),
        cache,
    )
    .await
}

/// `body` from a@origin.test to `to` straight to `sink`, without a connection cache.
async fn deliver_to(sink: &Sink, to: &[&str], body: &[u8]) -> DeliveryReport {
    deliver_via(&[Hop::addr(sink.addr())], to, body, None).await
}

/// Asserts that the recipient was delivered.
fn assert_delivered(r: &RcptResult) {
    assert!(matches!(r.status, RcptStatus::Delivered { .. }), "{r:?}");
}

/// A router to example.test's two MX hosts, mx-a (preference 10) at `a` and mx-b (20) at
/// `b`, both on `port`, with the DNS server that tells it so.
async fn two_mx_router(a: IpAddr, b: IpAddr, port: u16) -> (dns::DnsServer, Router) {
    let zone = dns::Zone::new()
        .mx("example.test", 10, "mx-a.example.test")
        .mx("example.test", 20, "mx-b.example.test");
    let zone = [("mx-a.example.test", a), ("mx-b.example.test", b)]
        .into_iter()
        .fold(zone, |zone, (host, ip)| match ip {
            IpAddr::V4(v4) => zone.a(host, v4),
            IpAddr::V6(v6) => zone.aaaa(host, v6),
        });
    let dns = dns::DnsServer::start(zone).await;
    let r = router(&dns, port);
    (dns, r)
}

fn wait() -> Duration {
    Duration::from_secs(10)
}

/// Waits until `cond` holds, for at most 20 s (only a bound on something that must
/// happen); false if it never did.
async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many QUITs the sink received.
fn quits(sink: &Sink) -> usize {
    sink.commands()
        .iter()
        .filter(|c| c.eq_ignore_ascii_case("QUIT"))
        .count()
}

/// How many EHLOs the sink received.
fn ehlos(sink: &Sink) -> usize {
    sink.commands()
        .iter()
        .filter(|c| c.starts_with("EHLO "))
        .count()
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

    let res = send_to_b(&r).await;
    assert_eq!(res.len(), 1);
    assert_delivered(&res[0]);
    assert_eq!(res[0].remote_mta.as_deref(), Some("mx-a.example.test"));
    assert!(sink6.wait_for(1, wait()).await);
    assert_eq!(sink4.count(), 0);
    let m = &sink6.messages()[0];
    assert_eq!(m.helo, "erlmail.test");
    assert_eq!(m.mail_from, "a@origin.test");
    assert_eq!(m.rcpts, vec!["b@example.test"]);
    assert_eq!(m.data, BODY);
}

/// RFC 5321 §5.1: hosts of equal preference are tried in random order, so 40 messages
/// reach both, and a worse preference is only tried after them.
#[tokio::test]
async fn equal_preference_mx_hosts_share_the_messages() {
    let (sink4, sink6) = Sink::start_pair(SinkConfig::default(), SinkConfig::default()).await;
    let zone = dns::Zone::new()
        .mx("example.test", 10, "mx-a.example.test")
        .mx("example.test", 10, "mx-b.example.test")
        .mx("example.test", 20, "mx-c.example.test")
        .a("mx-a.example.test", V4)
        .aaaa("mx-b.example.test", V6)
        .a("mx-c.example.test", Ipv4Addr::new(127, 0, 0, 9));
    let dns = dns::DnsServer::start(zone).await;
    let r = router(&dns, sink4.port());
    for _ in 0..40 {
        let hops = r.resolve(&r.next_hop("example.test")).await.unwrap();
        assert_eq!(
            hops[2].host, "mx-c.example.test",
            "the worse preference last"
        );
        let res = send_to_b(&r).await;
        assert_delivered(&res[0]);
    }
    assert_eq!(sink4.count() + sink6.count(), 40);
    assert!(
        sink4.count() >= 5 && sink6.count() >= 5,
        "both equal MX hosts take a share: {} and {}",
        sink4.count(),
        sink6.count()
    );
}

/// A next hop whose greeting or EHLO reply names us (our `server_smtp_name`, here the
/// HELO name `erlmail.test`) is this host: the mail fails at once with 5.4.6, nothing
/// is sent, and the next MX is not tried (it would loop the same way).
#[tokio::test]
async fn a_next_hop_that_names_this_host_is_a_loop() {
    for (greeting, name) in [
        ("220 ERLMAIL.test. ESMTP", "elsewhere.test"),
        ("220 elsewhere.test ESMTP", "erlmail.test"),
    ] {
        let (sink4, sink6) = Sink::start_pair(
            SinkConfig::default()
                .named(name)
                .greeting(greeting)
                .starttls(StartTls::Off),
            SinkConfig::default(),
        )
        .await;
        let (_dns, r) = two_mx_router(V4.into(), V6.into(), sink4.port()).await;
        let res = send_to_b(&r).await;
        match &res[0].status {
            RcptStatus::Permanent { cause } => {
                assert_eq!(cause.status(), "5.4.6", "{cause}");
                assert!(
                    cause.to_string().contains("loops back to myself"),
                    "{cause}"
                );
            }
            other => panic!("{greeting} / {name}: {other:?}"),
        }
        assert_eq!(sink4.count() + sink6.count(), 0, "nothing sent");
        assert_eq!(sink6.commands().len(), 0, "the next MX is not tried");
    }
}

#[tokio::test]
async fn a_next_hop_at_an_address_erlmail_listens_on_is_a_loop() {
    // The MX resolves to 127.0.0.1 on the port this erlmail listens on (on every
    // address: `::`). A sink stands there only to show that nobody is connected to.
    let me = Sink::start(SinkConfig::default().named("not-my-name.test")).await;
    let zone = dns::Zone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", V4);
    let dns = dns::DnsServer::start(zone).await;
    for listening in [
        SocketAddr::new(V6.into(), me.port()).to_string(),
        format!("[::]:{}", me.port()),
        format!("0.0.0.0:{}", me.port()),
        format!("127.0.0.1:{}", me.port()),
    ] {
        let r = Router::new(RouterConfig {
            routes: BTreeMap::new(),
            relay_host: None,
            remote_port: me.port(),
            dns_nameservers: vec![dns.addr()],
            delivery: DeliveryOptions {
                own_addrs: vec![listening.parse().unwrap()],
                ..opts()
            },
        })
        .unwrap();
        let res = send_to_b(&r).await;
        if listening.starts_with("[::1]") {
            // Another address of this host: not where the hop is.
            assert!(
                matches!(res[0].status, RcptStatus::Delivered { .. }),
                "{listening}: {:?}",
                res[0]
            );
            continue;
        }
        match &res[0].status {
            RcptStatus::Permanent { cause } => {
                assert_eq!(cause.status(), "5.4.6", "{listening}: {cause}");
                assert!(cause.to_string().contains("loops back to myself"));
            }
            other => panic!("{listening}: {other:?}"),
        }
    }
    assert_eq!(
        me.connections(),
        1,
        "only the delivery past [::1] connected"
    );
}

#[tokio::test]
async fn falls_back_to_next_mx_when_first_refuses_connections() {
    let sink = Sink::start(SinkConfig::default()).await;
    // mx-a resolves to ::1 on the sink's port, where nothing listens.
    let (_dns, r) = two_mx_router(V6.into(), V4.into(), sink.port()).await;
    let res = send_to_b(&r).await;
    assert_delivered(&res[0]);
    assert_eq!(res[0].remote_mta.as_deref(), Some("mx-b.example.test"));
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn falls_back_to_next_mx_on_421_greeting() {
    let busy = SinkConfig::default().greeting("421 4.3.2 busy.test Service not available");
    let (busy4, good6) = Sink::start_pair(busy, SinkConfig::default()).await;
    let (_dns, r) = two_mx_router(V4.into(), V6.into(), busy4.port()).await;
    let res = send_to_b(&r).await;
    assert_delivered(&res[0]);
    assert_eq!(res[0].remote_mta.as_deref(), Some("mx-b.example.test"));
    assert_eq!(busy4.connections(), 1);
    assert_eq!(good6.count(), 1);
}

#[tokio::test]
async fn all_hosts_failing_is_temporary_with_last_reply() {
    let busy = SinkConfig::default().greeting("421 4.3.2 busy.test Service not available");
    let sink = Sink::start(busy).await;
    let closed = sink::closed_addr().await;
    let report = deliver_via(
        &[Hop::addr(closed), Hop::addr(sink.addr())],
        &["b@example.test"],
        BODY,
        None,
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
    assert_delivered(&res[0]);
    let m = &sink.messages()[0];
    assert_eq!(m.mail_from, "", "null sender sent as MAIL FROM:<>");
    assert!(sink
        .commands()
        .iter()
        .any(|c| c.starts_with("MAIL FROM:<> SIZE=")));
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

    let res = send_from_a(&r, &["x@nullmx.test", "y@gone.test", "z@broken.test"]).await;
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
    let res = send_from_a(&r, &["u@routed.test"]).await;
    assert_delivered(&res[0]);
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
    let res = send_from_a(
        &r,
        &[
            "one@nowhere.test",
            "two@elsewhere.test",
            "three@special.test",
        ],
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
    let report = deliver_to(
        &sink,
        &["ok@example.test", "defer@example.test", "fail@example.test"],
        BODY,
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
    let report = deliver_to(&sink, &["fail1@example.test", "defer1@example.test"], BODY).await;
    assert_eq!(report.results[0].status.outcome(), Outcome::Permanent);
    assert_eq!(report.results[1].status.outcome(), Outcome::Temporary);
    // The sink offers PIPELINING, so DATA went out in the group with MAIL and RCPT (RFC
    // 2920) and was refused for want of recipients: no message text followed.
    assert_eq!(sink.commands().iter().filter(|c| *c == "DATA").count(), 1);
    assert_eq!(sink.transactions().len(), 0);
}

#[tokio::test]
async fn deferred_transaction_is_temporary_then_delivered() {
    let sink = Sink::start(SinkConfig::default().defer_first(1)).await;
    let hops = [Hop::addr(sink.addr())];
    let to = rcpts(&["b@example.test"]);
    let o = opts();
    let cache = ConnectionCache::new();
    let go = || {
        deliver(
            &hops,
            "erlmail.test",
            "a@origin.test",
            &to,
            BODY,
            &o,
            Some(&cache),
        )
    };
    let first = go().await;
    match &first.results[0].status {
        RcptStatus::Temporary {
            cause: FailureCause::Reply(r),
        } => assert_eq!(r.code, 451),
        other => panic!("{other:?}"),
    }
    let second = go().await;
    assert_delivered(&second.results[0]);
    assert_eq!(sink.count(), 1);
    assert_eq!(
        sink.transactions()
            .iter()
            .map(|t| t.code)
            .collect::<Vec<_>>(),
        vec![451, 250]
    );
    // A 451 after the dot ends the connection: the retry needed a new one.
    assert_eq!(sink.connections(), 2);
    assert!(
        wait_until(|| quits(&sink) >= 1).await,
        "the 451 session was QUIT"
    );
}

#[tokio::test]
async fn mail_from_5xx_fails_all_recipients_permanently() {
    let sink = Sink::start(
        SinkConfig::default().mail_reply("553 5.7.1 <a@origin.test>: Sender address rejected"),
    )
    .await;
    let report = deliver_to(&sink, &["b@example.test", "c@example.test"], BODY).await;
    for r in &report.results {
        assert_eq!(r.status.outcome(), Outcome::Permanent);
        assert_eq!(r.status.status(), "5.7.1");
    }
}

#[tokio::test]
async fn dot_stuffing_round_trip() {
    let sink = Sink::start(SinkConfig::plain()).await;
    let body =
        b".starts with a dot\r\nSubject: x\r\n\r\n.\r\n..two dots\r\nmiddle . dot\r\n.\r\nend\r\n";
    let report = deliver_to(&sink, &["b@example.test"], body).await;
    assert_delivered(&report.results[0]);
    assert!(!report.tls);
    assert_eq!(sink.messages()[0].data, body.to_vec());
    assert!(!sink.messages()[0].tls);
}

#[tokio::test]
async fn broken_tls_retries_host_in_plain_text() {
    let sink = Sink::start(SinkConfig::default().starttls(StartTls::Broken)).await;
    let report = deliver_to(&sink, &["b@example.test"], BODY).await;
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
    let report = deliver_to(&sink, &["b@example.test"], BODY).await;
    assert!(report.tls);
    assert!(sink.messages()[0].tls);
    assert_eq!(
        sink.messages()[0].helo,
        "erlmail.test",
        "EHLO again after STARTTLS"
    );
    assert_eq!(ehlos(&sink), 2);
}

/// The DSN read by Python's `email` package: multipart/report, its three parts, and the
/// delivery-status fields.
#[test]
fn dsn_parsed_by_python_email() {
    let at = chrono::Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 0).unwrap();
    let status = RcptStatus::failed(FailureCause::Reply(Reply::new(
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
    let out = python::python3_on(&dsn, script, &[], "the DSN as Python's email reads it");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
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

// ---------------------------------------------------------------------------------------
// Connection reuse.

/// How the probe server misbehaves, always on its first connection only and only after
/// that connection's first transaction (so the client has cached it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quirk {
    /// None: a plain, well-behaved server.
    Polite,
    /// Close without a reply when the second MAIL FROM arrives, as a server whose idle
    /// timeout struck just as the client reused the connection.
    DropOnReusedMail,
    /// Answer that MAIL FROM with `421` and close.
    Reply421OnReusedMail,
    /// Close right after the `250` of the first transaction, while the connection sits
    /// in the client's cache.
    CloseWhileIdle,
}

/// How a probe connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client sent QUIT.
    Quit,
    /// The client closed without QUIT.
    Eof,
    /// The server closed it (a quirk).
    ByServer,
}

#[derive(Default)]
struct ProbeLog {
    connections: usize,
    /// (connection number from 1, command line)
    commands: Vec<(usize, String)>,
    /// (connection number, how it ended, when)
    endings: Vec<(usize, Ending, Instant)>,
    /// The connection number of each accepted message.
    delivered: Vec<usize>,
}

/// A plain-text SMTP server on 127.0.0.1 that numbers its connections and records which
/// connection carried each command and message, and how each connection ended.
struct Probe {
    addr: SocketAddr,
    log: Arc<Mutex<ProbeLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    async fn start(quirk: Quirk) -> Probe {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(ProbeLog::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = {
                    let mut log = l.lock().unwrap();
                    log.connections += 1;
                    log.connections
                };
                let l = l.clone();
                tokio::spawn(async move {
                    let ending = probe_session(stream, n, quirk, &l)
                        .await
                        .unwrap_or(Ending::Eof);
                    l.lock().unwrap().endings.push((n, ending, Instant::now()));
                });
            }
        });
        Probe { addr, log, task }
    }

    fn hop(&self) -> Hop {
        Hop::addr(self.addr)
    }

    fn connections(&self) -> usize {
        self.log.lock().unwrap().connections
    }

    fn delivered(&self) -> Vec<usize> {
        self.log.lock().unwrap().delivered.clone()
    }

    fn ending(&self, conn: usize) -> Option<(Ending, Instant)> {
        let log = self.log.lock().unwrap();
        log.endings
            .iter()
            .find(|(n, _, _)| *n == conn)
            .map(|(_, e, at)| (*e, *at))
    }

    fn count(&self, verb: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .commands
            .iter()
            .filter(|(_, c)| c.to_ascii_uppercase().starts_with(verb))
            .count()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn probe_session(
    stream: tokio::net::TcpStream, n: usize, quirk: Quirk, log: &Mutex<ProbeLog>,
) -> std::io::Result<Ending> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut io = BufReader::new(stream);
    io.get_mut().write_all(b"220 probe.test ESMTP\r\n").await?;
    let mut mails = 0;
    let mut rcpts = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Ok(Ending::Eof);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        log.lock().unwrap().commands.push((n, text.clone()));
        let upper = text.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO ") {
            "250-probe.test\r\n250-PIPELINING\r\n250 8BITMIME".to_string()
        } else if upper.starts_with("MAIL FROM:") {
            mails += 1;
            rcpts = 0;
            if n == 1 && mails == 2 {
                match quirk {
                    Quirk::DropOnReusedMail => return Ok(Ending::ByServer),
                    Quirk::Reply421OnReusedMail => {
                        io.get_mut()
                            .write_all(b"421 4.4.2 probe.test idle too long\r\n")
                            .await?;
                        return Ok(Ending::ByServer);
                    }
                    _ => {}
                }
            }
            "250 2.1.0 Ok".into()
        } else if upper.starts_with("RCPT TO:") {
            if upper.contains("<FAIL") {
                "550 5.1.1 User unknown".into()
            } else {
                rcpts += 1;
                "250 2.1.5 Ok".into()
            }
        } else if upper == "DATA" {
            if rcpts == 0 {
                "554 5.5.1 no valid recipients".into()
            } else {
                io.get_mut().write_all(b"354 go ahead\r\n").await?;
                loop {
                    line.clear();
                    if io.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(Ending::Eof);
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                log.lock().unwrap().delivered.push(n);
                if n == 1 && quirk == Quirk::CloseWhileIdle {
                    io.get_mut().write_all(b"250 2.0.0 Ok: queued\r\n").await?;
                    return Ok(Ending::ByServer);
                }
                "250 2.0.0 Ok: queued".into()
            }
        } else if upper == "RSET" || upper == "NOOP" {
            "250 2.0.0 Ok".into()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(Ending::Quit);
        } else {
            "502 5.5.2 command not recognized".into()
        };
        io.get_mut()
            .write_all(format!("{reply}\r\n").as_bytes())
            .await?;
    }
}

/// One message to `hops` through `cache`.
async fn send_via(hops: &[Hop], cache: &ConnectionCache) -> DeliveryReport {
    deliver_via(hops, &["b@example.test"], BODY, Some(cache)).await
}

fn delivered(report: &DeliveryReport) -> bool {
    report
        .results
        .iter()
        .all(|r| matches!(r.status, RcptStatus::Delivered { .. }))
}

#[tokio::test]
async fn consecutive_messages_share_one_tls_connection() {
    let sink = Sink::start(SinkConfig::default()).await;
    let dns = dns::DnsServer::start(dns::Zone::new()).await;
    let r = router_with(
        &dns,
        25,
        BTreeMap::new(),
        Some(format!("127.0.0.1:{}", sink.port())),
    );
    for to in ["one@example.test", "two@other.test"] {
        let res = deliver_message(&r, "erlmail.test", "a@origin.test", &rcpts(&[to]), BODY).await;
        assert!(
            matches!(res[0].status, RcptStatus::Delivered { .. }),
            "{res:?}"
        );
        assert!(res[0].tls);
        assert_eq!(res[0].remote_addr, Some(sink.addr()));
    }
    assert_eq!(sink.count(), 2);
    assert_eq!(
        sink.connections(),
        1,
        "the second message reused the first's"
    );
    // One EHLO before STARTTLS and one after, for both messages.
    assert_eq!(ehlos(&sink), 2);
    assert!(sink.messages().iter().all(|m| m.tls));
    assert_eq!(
        sink.commands()
            .iter()
            .filter(|c| c.as_str() == "STARTTLS")
            .count(),
        1
    );
    assert_eq!(quits(&sink), 0, "kept open, not QUIT");
    assert_eq!(r.connection_cache().idle(), 1);
    // Another router (a reload) has a cache of its own.
    let r2 = router_with(
        &dns,
        25,
        BTreeMap::new(),
        Some(format!("127.0.0.1:{}", sink.port())),
    );
    assert_eq!(r2.connection_cache().idle(), 0);
    let res = deliver_message(
        &r2,
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["x@y.test"]),
        BODY,
    )
    .await;
    assert!(matches!(res[0].status, RcptStatus::Delivered { .. }));
    assert_eq!(sink.connections(), 2);
}

#[tokio::test]
async fn reuse_count_limit_moves_to_a_new_connection() {
    let probe = Probe::start(Quirk::Polite).await;
    let cache = ConnectionCache::with_limits(CacheLimits {
        reuse_count: 2,
        ..CacheLimits::default()
    });
    for _ in 0..3 {
        assert!(delivered(&send_via(&[probe.hop()], &cache).await));
    }
    assert_eq!(probe.delivered(), vec![1, 1, 2]);
    assert_eq!(probe.count("EHLO"), 2);
    assert!(wait_until(|| probe.ending(1).is_some()).await);
    assert_eq!(
        probe.ending(1).map(|(e, _)| e),
        Some(Ending::Quit),
        "closed with QUIT after its second transaction"
    );
    assert_eq!(cache.idle(), 1);
}

#[tokio::test]
async fn cached_connection_closed_by_the_server_is_replaced_on_the_same_host() {
    for quirk in [Quirk::DropOnReusedMail, Quirk::Reply421OnReusedMail] {
        let probe = Probe::start(quirk).await;
        // A second host that must not be tried: the stale connection is no host failure.
        let backup = Sink::start(SinkConfig::default()).await;
        let hops = [probe.hop(), Hop::addr(backup.addr())];
        let cache = ConnectionCache::new();
        assert!(delivered(&send_via(&hops, &cache).await));
        assert_eq!(cache.idle(), 1);
        let report = send_via(&hops, &cache).await;
        assert!(delivered(&report), "{quirk:?}: {report:?}");
        assert!(report.skipped.is_empty(), "{quirk:?}: {report:?}");
        assert_eq!(report.remote, Some(probe.hop()));
        assert_eq!(probe.delivered(), vec![1, 2], "{quirk:?}");
        assert_eq!(probe.connections(), 2);
        assert_eq!(probe.ending(1).map(|(e, _)| e), Some(Ending::ByServer));
        assert_eq!(backup.connections(), 0, "{quirk:?}: went to the next host");
        assert_eq!(cache.idle(), 1, "the fresh connection is cached in turn");
    }
}

#[tokio::test]
async fn connection_closed_while_idle_is_replaced() {
    let probe = Probe::start(Quirk::CloseWhileIdle).await;
    let cache = ConnectionCache::new();
    assert!(delivered(&send_via(&[probe.hop()], &cache).await));
    assert!(wait_until(|| probe.ending(1).is_some()).await);
    let report = send_via(&[probe.hop()], &cache).await;
    assert!(delivered(&report), "{report:?}");
    assert!(report.skipped.is_empty(), "{report:?}");
    assert_eq!(probe.delivered(), vec![1, 2]);
}

#[tokio::test]
async fn idle_connection_is_quit_after_the_idle_time_limit() {
    let probe = Probe::start(Quirk::Polite).await;
    let dns = dns::DnsServer::start(dns::Zone::new()).await;
    let r = router_with(
        &dns,
        25,
        BTreeMap::new(),
        Some(format!("127.0.0.1:{}", probe.addr.port())),
    );
    let started = Instant::now();
    let res = send_from_a(&r, &["b@x.test"]).await;
    assert!(matches!(res[0].status, RcptStatus::Delivered { .. }));
    assert!(
        wait_until(|| probe.ending(1).is_some()).await,
        "idle connection never closed"
    );
    let (ending, at) = probe.ending(1).unwrap();
    assert_eq!(ending, Ending::Quit);
    assert!(
        at.duration_since(started) >= CONNECTION_CACHE_TIME_LIMIT,
        "closed after {:?}, before the idle limit",
        at.duration_since(started)
    );
    assert_eq!(r.connection_cache().idle(), 0);
    assert_eq!(probe.count("QUIT"), 1);
}

#[tokio::test]
async fn refused_sender_is_not_reused() {
    let sink = Sink::start(
        SinkConfig::default()
            .mail_reply("553 5.7.1 <a@origin.test>: Sender address rejected")
            .starttls(StartTls::Off),
    )
    .await;
    let cache = ConnectionCache::new();
    for _ in 0..2 {
        let report = send_via(&[Hop::addr(sink.addr())], &cache).await;
        assert_eq!(report.results[0].status.outcome(), Outcome::Permanent);
    }
    assert_eq!(sink.connections(), 2);
    assert_eq!(cache.idle(), 0);
    assert!(wait_until(|| quits(&sink) == 2).await, "each session QUIT");
}

#[tokio::test]
async fn all_recipients_refused_then_rset_keeps_the_connection() {
    let sink = Sink::start(SinkConfig::plain()).await;
    let cache = ConnectionCache::new();
    let hops = [Hop::addr(sink.addr())];
    let first = deliver_via(
        &hops,
        &["fail@example.test", "defer@example.test"],
        BODY,
        Some(&cache),
    )
    .await;
    assert_eq!(first.results[0].status.outcome(), Outcome::Permanent);
    assert_eq!(first.results[1].status.outcome(), Outcome::Temporary);
    assert!(sink.commands().iter().any(|c| c == "RSET"));
    assert_eq!(cache.idle(), 1);
    assert!(delivered(&send_via(&hops, &cache).await));
    assert_eq!(sink.connections(), 1);
    assert_eq!(sink.count(), 1);
    assert_eq!(ehlos(&sink), 1);
}

/// A one-connection server that checks how the client groups its commands. With
/// `pipelining` it offers PIPELINING and answers nothing until DATA has arrived: a
/// client waiting for the MAIL reply first would stall (and fail on its timeout). Without
/// it, every command must come alone: nothing further may be buffered when a reply is
/// due. Returns the commands it read, in order.
async fn grouping_server(pipelining: bool) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind((V4, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut io = BufReader::new(stream);
        io.get_mut()
            .write_all(b"220 group.test ESMTP\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut held = String::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if io.read_until(b'\n', &mut line).await.unwrap() == 0 {
                return seen;
            }
            let cmd = String::from_utf8_lossy(&line).trim_end().to_string();
            let upper = cmd.to_ascii_uppercase();
            seen.push(cmd);
            let reply = if upper.starts_with("EHLO") {
                if pipelining {
                    "250-group.test\r\n250 PIPELINING"
                } else {
                    "250-group.test\r\n250 8BITMIME"
                }
            } else if upper.starts_with("MAIL") {
                "250 2.1.0 Ok"
            } else if upper.starts_with("RCPT") && upper.contains("<NO") {
                "550 5.1.1 no such user"
            } else if upper.starts_with("RCPT") {
                "250 2.1.5 Ok"
            } else if upper == "DATA" {
                "354 go ahead"
            } else if upper == "QUIT" {
                io.get_mut().write_all(b"221 bye\r\n").await.unwrap();
                return seen;
            } else {
                "502 5.5.2 what"
            };
            if !pipelining {
                assert!(
                    io.buffer().is_empty(),
                    "a command came before the reply to {:?}",
                    seen.last()
                );
            }
            let in_group = upper.starts_with("MAIL") || upper.starts_with("RCPT");
            if pipelining && in_group {
                // Held back until DATA: only a pipelining client gets that far.
                held.push_str(reply);
                held.push_str("\r\n");
                continue;
            }
            held.push_str(reply);
            held.push_str("\r\n");
            io.get_mut().write_all(held.as_bytes()).await.unwrap();
            held.clear();
            if upper == "DATA" {
                loop {
                    line.clear();
                    if io.read_until(b'\n', &mut line).await.unwrap() == 0 {
                        return seen;
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                io.get_mut()
                    .write_all(b"250 2.0.0 queued\r\n")
                    .await
                    .unwrap();
            }
        }
    });
    (addr, task)
}

async fn deliver_grouped(pipelining: bool) -> (DeliveryReport, Vec<String>) {
    let (addr, server) = grouping_server(pipelining).await;
    let report = deliver(
        &[Hop::addr(addr)],
        "erlmail.test",
        "a@origin.test",
        &rcpts(&["b@example.test", "nobody@example.test", "c@example.test"]),
        BODY,
        &DeliveryOptions::with_timeout(Duration::from_secs(5)),
        None,
    )
    .await;
    let seen = tokio::time::timeout(wait(), server).await.unwrap().unwrap();
    (report, seen)
}

#[tokio::test]
async fn pipelining_server_gets_mail_rcpts_and_data_in_one_group() {
    let (report, seen) = deliver_grouped(true).await;
    let outcomes: Vec<Outcome> = report.results.iter().map(|r| r.status.outcome()).collect();
    assert_eq!(
        outcomes,
        [Outcome::Delivered, Outcome::Permanent, Outcome::Delivered],
        "each RCPT reply is matched to its recipient: {report:?}"
    );
    assert_eq!(
        seen[1..5],
        [
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<b@example.test>",
            "RCPT TO:<nobody@example.test>",
            "RCPT TO:<c@example.test>",
        ]
    );
    assert_eq!(seen[5], "DATA");
}

#[tokio::test]
async fn server_without_pipelining_gets_one_command_at_a_time() {
    let (report, seen) = deliver_grouped(false).await;
    let outcomes: Vec<Outcome> = report.results.iter().map(|r| r.status.outcome()).collect();
    assert_eq!(
        outcomes,
        [Outcome::Delivered, Outcome::Permanent, Outcome::Delivered]
    );
    assert_eq!(seen[5], "DATA");
}

#[tokio::test]
async fn pipelined_data_refused_when_every_recipient_was_refused() {
    // The Probe offers PIPELINING and refuses DATA without recipients: the DATA reply
    // is read, RSET follows and the connection carries the next message.
    let probe = Probe::start(Quirk::Polite).await;
    let cache = ConnectionCache::new();
    let hops = [Hop::addr(probe.addr)];
    let first = deliver_via(
        &hops,
        &["fail1@example.test", "fail2@example.test"],
        BODY,
        Some(&cache),
    )
    .await;
    assert!(first
        .results
        .iter()
        .all(|r| r.status.outcome() == Outcome::Permanent));
    assert!(delivered(&send_via(&hops, &cache).await));
    assert_eq!(probe.count("DATA"), 2);
    assert_eq!(probe.count("RSET"), 1);
    assert_eq!(probe.count("EHLO"), 1, "one connection");
}
