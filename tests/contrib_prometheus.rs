//! The monitoring files in `contrib/`: the Prometheus alert rules
//! (`contrib/prometheus/erlmail-alerts.yml`) and the Grafana dashboard
//! (`contrib/grafana/erlmail-dashboard.json`). promtool accepts the rules and their unit
//! tests pass (`tests/fixtures/erlmail-alerts.test.yml`: each alert fires on what it is
//! about and not on what it must ignore); every dashboard query parses as PromQL; and every
//! metric, label and label value either file uses is one a running daemon serves at
//! `/metrics` once local mail, a relay denial, a delivery after a sender crash and a bounce
//! have gone through. promtool comes from Debian's `prometheus` package, which
//! `scripts/test` installs: without it these tests fail rather than skip.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use daemon::{http_get, Daemon, Smtp};
use serde::Deserialize;
use sink::{Sink, SinkConfig};

const RULES: &str = "contrib/prometheus/erlmail-alerts.yml";
const RULE_TESTS: &str = "tests/fixtures/erlmail-alerts.test.yml";
const DASHBOARD: &str = "contrib/grafana/erlmail-dashboard.json";

/// Label values the rules use that no cheap traffic produces: each is shown to be the one
/// the code gives in `label_values_no_traffic_drives_are_the_ones_the_code_gives`.
const UNDRIVEN_VALUES: &[(&str, &str, &str)] = &[(
    "erlmail_smtp_rejections_total",
    "reason",
    // A 451/452 from a failed store look-up or commit.
    "store_failure",
)];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Run promtool; a missing promtool is a failure that says how to get it.
fn promtool(args: &[&str]) -> Output {
    match Command::new("promtool").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run scripts/test, which installs it \
             (Debian's prometheus package: apt-get install --no-install-recommends prometheus)"
        ),
        Err(e) => panic!("promtool: {e}"),
    }
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    pending: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn rules() -> RuleFile {
    let text = std::fs::read_to_string(repo(RULES)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{RULES}: {e}"))
}

/// `(where, query)` for every rule expression.
fn rule_queries() -> Vec<(String, String)> {
    rules()
        .groups
        .into_iter()
        .flat_map(|g| g.rules)
        .map(|r| (format!("{RULES}: {}", r.alert.unwrap_or_default()), r.expr))
        .collect()
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, those inside rows included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// `(where, query)` for every panel target and every templating query.
fn dashboard_queries() -> Vec<(String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((format!("{DASHBOARD}: {}", p["title"]), expr.to_string()));
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let query = v["query"]["query"].as_str().or(v["query"].as_str());
        if let Some(q) = query {
            out.push((
                format!("{DASHBOARD}: variable {}", v["name"]),
                q.to_string(),
            ));
        }
    }
    out
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let out = promtool(&["check", "rules", repo(RULES).to_str().unwrap()]);
    assert_success("promtool check rules", &out);

    // The unit tests expect labels only: run them on a copy of the rules without their
    // annotations, beside a copy of the tests (rule_files is relative to the test file).
    let dir = tempfile::tempdir().unwrap();
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo(RULES)).unwrap()).unwrap();
    for group in doc["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            rule.as_mapping_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(
        dir.path().join("erlmail-alerts.yml"),
        serde_yaml_ng::to_string(&doc).unwrap(),
    )
    .unwrap();
    let tests = dir.path().join("erlmail-alerts.test.yml");
    std::fs::copy(repo(RULE_TESTS), &tests).unwrap();
    let out = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert_success("promtool test rules", &out);
}

#[test]
fn every_alert_is_one_an_operator_can_act_on() {
    let file = rules();
    assert_eq!(file.groups.len(), 1);
    assert_eq!(file.groups[0].name, "erlmail");
    let mut alerts = BTreeSet::new();
    for r in &file.groups[0].rules {
        let name = r.alert.clone().expect("alerting rules only");
        assert!(r.pending.is_some(), "{name}: no `for:`");
        let severity = r.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                r.annotations.get(key).is_some_and(|t| t.len() > 20),
                "{name}: no {key}"
            );
        }
        alerts.insert(name);
    }
    // The rule unit tests cover every alert.
    let tests = std::fs::read_to_string(repo(RULE_TESTS)).unwrap();
    for a in &alerts {
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "{a} has no unit test"
        );
    }
}

#[test]
fn the_dashboard_parses_every_panel_has_a_query_and_every_query_is_promql() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(
        d["__inputs"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i["name"] == "DS_PROMETHEUS")),
        "a DS_PROMETHEUS datasource input"
    );
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| e.contains("erlmail_")),
                "panel {}: target without an erlmail expr: {t}",
                p["title"]
            );
        }
    }

    // promtool parses PromQL in rule files: make each query a recording rule, with
    // Grafana's variables given values.
    let queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .filter(|(_, q)| !q.starts_with("label_values("))
        .collect();
    assert!(queries.len() >= 9, "{queries:?}");
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, q))| {
            let q = q
                .replace("$__rate_interval", "5m")
                .replace("$job", ".*")
                .replace("$instance", ".*");
            serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": q })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    let doc = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    std::fs::write(&file, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()]);
    let which: Vec<String> = queries
        .iter()
        .enumerate()
        .map(|(i, (place, _))| format!("dashboard:query_{i} is {place}"))
        .collect();
    assert_success(
        &format!(
            "promtool check rules (the dashboard's queries: {})",
            which.join(", ")
        ),
        &out,
    );
}

#[test]
fn label_values_no_traffic_drives_are_the_ones_the_code_gives() {
    use erlmail::telemetry::rejection_reason;
    // A new entry needs its own check here.
    assert_eq!(UNDRIVEN_VALUES.len(), 1);
    // The store's two refusals (session.rs), and a failed recipient look-up.
    for reply in [
        &b"451 4.3.0 Error: queue file write error\r\n"[..],
        b"452 4.3.1 Insufficient system storage\r\n",
        b"451 4.3.0 <a@b>: Temporary lookup failure\r\n",
    ] {
        assert_eq!(rejection_reason(reply), Some("store_failure"));
    }
}

/// One `name{label op "value", ...}` in a query (or a sample line of a scrape).
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// What a query refers to: erlmail's metrics with their matchers, and the labels named in
/// `by`, `without`, `on` and `ignoring`.
#[derive(Debug, Default)]
struct Refs {
    selectors: Vec<Selector>,
    grouping: BTreeSet<String>,
}

/// A small PromQL scanner: identifiers outside strings, label matchers after a metric
/// name, label lists after grouping keywords. Enough for the queries in these files;
/// promtool checks their syntax.
fn refs(query: &str) -> Refs {
    let s: Vec<char> = query.chars().collect();
    let mut out = Refs::default();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_whitespace() {
            *i += 1;
        }
    };
    let ident = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == '_' || s[*i] == ':') {
            *i += 1;
        }
        s[start..*i].iter().collect::<String>()
    };
    let string = |i: &mut usize| {
        let quote = s[*i];
        *i += 1;
        let mut v = String::new();
        while *i < s.len() && s[*i] != quote {
            if s[*i] == '\\' {
                *i += 1;
            }
            v.push(s[*i]);
            *i += 1;
        }
        *i += 1;
        v
    };
    // A bracketed, comma-separated list that starts at `i` and ends with `close`: `item`
    // reads each element; `i` ends past the closing bracket.
    let list = |i: &mut usize, close: char, item: &mut dyn FnMut(&mut usize)| {
        *i += 1;
        loop {
            skip_ws(i);
            match s.get(*i) {
                Some(',') => *i += 1,
                Some(&c) if c != close => item(i),
                _ => break,
            }
        }
        *i += 1;
    };
    while i < s.len() {
        let c = s[i];
        if c == '"' || c == '\'' {
            string(&mut i);
        } else if c == '[' {
            // A range or subquery duration.
            while i < s.len() && s[i] != ']' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let word = ident(&mut i);
            skip_ws(&mut i);
            let next = s.get(i).copied();
            if ["by", "without", "on", "ignoring"].contains(&word.as_str()) && next == Some('(') {
                list(&mut i, ')', &mut |i| {
                    out.grouping.insert(ident(i));
                });
            } else if word.starts_with("erlmail_") {
                let mut sel = Selector {
                    name: word,
                    matchers: Vec::new(),
                };
                if next == Some('{') {
                    list(&mut i, '}', &mut |i| {
                        let label = ident(i);
                        skip_ws(i);
                        let op_start = *i;
                        while *i < s.len() && "=!~".contains(s[*i]) {
                            *i += 1;
                        }
                        let op: String = s[op_start..*i].iter().collect();
                        skip_ws(i);
                        let value = string(i);
                        sel.matchers.push((label, op, value));
                    });
                }
                out.selectors.push(sel);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// A scrape: sample name -> label -> the values seen.
type Scrape = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn parse_scrape(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text.lines().filter(|l| l.starts_with("erlmail_")) {
        let refs = refs(line);
        let sample = &refs.selectors[0];
        let labels = out.entry(sample.name.clone()).or_default();
        for (label, _, value) in &sample.matchers {
            labels
                .entry(label.clone())
                .or_default()
                .insert(value.clone());
        }
    }
    out
}

/// Everything in `queries` that `scrape` does not back: metrics not exported, labels they
/// do not carry, label values never seen (bar `UNDRIVEN_VALUES`).
fn problems(queries: &[(String, String)], scrape: &Scrape) -> Vec<String> {
    let mut out = Vec::new();
    for (place, query) in queries {
        let refs = refs(query);
        let mut labels_here: BTreeSet<&str> = ["job", "instance"].into();
        for sel in &refs.selectors {
            // A histogram's `_bucket`, `_sum` and `_count` are samples of their own here.
            let Some(labels) = scrape.get(&sel.name) else {
                out.push(format!("{place}: `{}` is not exported", sel.name));
                continue;
            };
            labels_here.extend(labels.keys().map(String::as_str));
            for (label, op, value) in &sel.matchers {
                let Some(seen) = labels.get(label) else {
                    if !["job", "instance"].contains(&label.as_str()) {
                        out.push(format!("{place}: `{}` has no label `{label}`", sel.name));
                    }
                    continue;
                };
                let wanted: Vec<&str> = match op.as_str() {
                    "=" | "!=" => vec![value.as_str()],
                    // Alternatives of plain words; patterns and variables are not values.
                    _ => value
                        .split('|')
                        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                        .collect(),
                };
                for w in wanted {
                    let undriven =
                        UNDRIVEN_VALUES.contains(&(sel.name.as_str(), label.as_str(), w));
                    if !w.is_empty() && !seen.contains(w) && !undriven {
                        out.push(format!(
                            "{place}: `{}{{{label}=\"{w}\"}}` never seen (values: {seen:?})",
                            sel.name
                        ));
                    }
                }
            }
        }
        for g in &refs.grouping {
            if !labels_here.contains(g.as_str()) {
                out.push(format!(
                    "{place}: grouping by `{g}`, a label none of its metrics has"
                ));
            }
        }
    }
    out
}

#[test]
fn the_scanner_finds_metrics_matchers_and_grouping_labels() {
    let r = refs(
        r#"histogram_quantile(0.99, sum by (job, le) (rate(erlmail_a_seconds_bucket{state=~"x|y", path="erlmail_sup/b"}[5m])))
           / on (instance) erlmail_b_total offset 15m"#,
    );
    let names: Vec<_> = r.selectors.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["erlmail_a_seconds_bucket", "erlmail_b_total"]);
    assert_eq!(
        r.selectors[0].matchers,
        [
            ("state".into(), "=~".into(), "x|y".into()),
            ("path".into(), "=".into(), "erlmail_sup/b".into())
        ]
    );
    assert_eq!(
        r.grouping,
        ["instance", "job", "le"].map(String::from).into()
    );
    let scrape = parse_scrape(
        "# TYPE erlmail_b_total counter\nerlmail_b_total 3\n\
         erlmail_a_seconds_bucket{state=\"x\",path=\"erlmail_sup/b\",le=\"+Inf\"} 1\n",
    );
    let queries = |q: &str| vec![("q".to_string(), q.to_string())];
    assert!(problems(&queries("erlmail_b_total"), &scrape).is_empty());
    assert_eq!(problems(&queries("erlmail_c_total"), &scrape).len(), 1);
    assert_eq!(
        problems(
            &queries(r#"erlmail_a_seconds_bucket{state=~"x|z"}"#),
            &scrape
        )
        .len(),
        1
    );
    assert_eq!(
        problems(&queries("sum by (kind) (erlmail_b_total)"), &scrape).len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_label_and_value_the_rules_and_dashboard_use_is_exported() {
    let mut queries = rule_queries();
    queries.extend(dashboard_queries());
    let used: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, q)| refs(q).selectors)
        .map(|s| s.name)
        .collect();
    assert!(used.len() >= 15, "{used:?}");

    // Recipients whose local part starts with `fail` are refused 550 by the sink.
    let sink = Sink::start(SinkConfig::default()).await;
    let mut d = Daemon::start_with_env(
        &format!(
            "admin_listen: \"127.0.0.1:0\"\n\
             server_smtp_relay_clients: [\"127.0.0.2/32\"]\n\
             server_smtp_routes: {{\"remote.test\": \"127.0.0.1:{0}\", \"origin.test\": \"127.0.0.1:{0}\"}}\n\
             server_smtp_queue_interval: \"100ms\"\n",
            sink.port()
        ),
        // The first sender of the message saying so panics: one actor restart.
        &[
            ("ERLMAIL_TEST_SENDER_PANICS", "1"),
            ("ERLMAIL_TEST_SENDER_PANIC_MATCH", "crash once"),
        ],
    );
    let admin = d.admin_addr();
    d.add_user("alice@example.test");

    // From 127.0.0.1: local mail, and a relay attempt denied.
    let mut s = d.connect_ehlo("a.test");
    s.send_ok(
        "x@origin.test",
        &["alice@example.test"],
        "Subject: l\r\n\r\nx\r\n",
    );
    assert!(s.cmd("MAIL FROM:<x@origin.test>").starts_with("250"));
    assert!(s.cmd("RCPT TO:<far@remote.test>").starts_with("554"));
    assert!(s.cmd("QUIT").starts_with("221"));
    // From the relay client: one delivered after its sender crashed, one bounced (its
    // failure notice goes back to origin.test, the same sink).
    let mut s = Smtp::connect_from(d.addr, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    assert!(s.cmd("EHLO b.test").starts_with("250"));
    for (to, body) in [
        ("ok@remote.test", "Subject: r\r\n\r\ncrash once\r\n"),
        ("fail@remote.test", "Subject: b\r\n\r\nbounce\r\n"),
    ] {
        let r = s.send_mail("x@origin.test", &[to], body);
        assert!(r.starts_with("250"), "{to}: {r}");
    }
    assert!(s.cmd("QUIT").starts_with("221"));
    assert!(
        sink.wait_for(2, Duration::from_secs(20)).await,
        "the relayed message and the failure notice:\n{}",
        d.log_text()
    );

    // Counters move after the deliveries are recorded: scrape until all is there.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut text, mut missing);
    loop {
        text = http_get(admin, "/metrics");
        missing = problems(&queries, &parse_scrape(&text));
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        missing.is_empty(),
        "used by the rules or the dashboard but not exported:\n{}\n\n/metrics:\n{text}",
        missing.join("\n")
    );
}
