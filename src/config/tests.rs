//! Tests of the configuration loader over real files: ErlMail's fixtures,
//! config/erlmail.yaml, the malformed files in tests/fixtures/config/, overrides,
//! validation and the YAML round trip.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn minutes(ms: &[u64]) -> Vec<Duration> {
    ms.iter().map(|m| Duration::from_secs(m * 60)).collect()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn defaults_survive_an_attack() {
    // An idle session costs about 21 KiB: 25 sessions (ErlMail's number) served no one
    // under attack; per-client limits keep one address from taking the rest.
    let c = Config::default();
    assert_eq!(c.server_smtp_max_connection, 1000);
    assert_eq!(c.server_smtp_client_connection_limit, 10);
    assert_eq!(c.server_smtp_client_connection_rate, 0);
    assert_eq!(c.server_smtp_min_data_rate, 500);
    assert_eq!(c.server_smtp_auth_failure_limit, 5);
    // An explicit value is honoured.
    let c = Config::from_yaml_str("server_smtp_max_connection: 25\n", "t.yaml").unwrap();
    assert_eq!(c.server_smtp_max_connection, 25);
}

#[test]
fn erlmail_app_loads_with_erlmail_defaults() {
    let c = Config::load(&fixture("erlmail.app")).unwrap();
    let expected = Config {
        server_smtp_start: false,
        // ErlMail's file says 25 explicitly; an explicit value is honoured (erlmail's own
        // default is 1000).
        server_smtp_max_connection: 25,
        ignored_keys: strings(&[
            "server_imap_start",
            "server_imap_name",
            "server_imap_greeting",
            "server_imap_greeting_capability",
            "server_imap_port",
            "server_imap_hierarchy",
            "server_imap_extentions",
            "server_pop_start",
            "server_pop_port",
            "server_pop_greeting",
            "store_type_domain",
            "store_type_user",
            "store_type_message",
            "store_type_mailbox_store",
            "mnesia_table_domain",
            "mnesia_table_user",
            "mnesia_table_message",
            "mnesia_table_mailbox_store",
            "antispam_rbl",
            "antispam_rbl_list",
            "antispam_default_action",
            "antispam_pre_deliver_action",
            "antispam_post_deliver_action",
        ]),
        ..Config::default()
    };
    assert_eq!(c, expected);
    assert_eq!(c.server_smtp_retry_interval, minutes(&[15, 30, 60, 240]));
    assert_eq!(c.server_list, strings(&["smtp", "imap", "pop"]));
}

#[test]
fn erlmail_sys_config_loads_its_overrides() {
    let c = Config::load(&fixture("erlmail.config")).unwrap();
    let expected = Config {
        server_smtp_start: true,
        server_smtp_port: 2525,
        server_smtp_name: "mail.example.com".into(),
        server_smtp_greeting: "mail.example.com ErlMail (NO UCE)".into(),
        server_smtp_relay_clients: nets(&["192.168.1.0/24", "203.0.113.7/32", "10.0.0.0/8"]),
        server_smtp_retries: 5,
        server_smtp_retry_interval: minutes(&[1, 5, 15]),
        server_stmp_failure_notification: false,
        ignored_keys: strings(&["server_imap_start", "store_type_user", "antispam_rbl_list"]),
        ..Config::default()
    };
    assert_eq!(c, expected);
}

#[test]
fn both_fixtures_load_through_the_str_api_too() {
    let src = std::fs::read_to_string(fixture("erlmail.config")).unwrap();
    let c = Config::from_erlang_str(&src, "erlmail.config").unwrap();
    assert_eq!(c, Config::load(&fixture("erlmail.config")).unwrap());
}

#[test]
fn convert_round_trips_both_fixtures() {
    for name in ["erlmail.app", "erlmail.config"] {
        let c = Config::load(&fixture(name)).unwrap();
        let yaml = c.to_yaml();
        let back = Config::from_yaml_str(&yaml, "converted.yaml").unwrap();
        assert_eq!(
            back,
            Config {
                ignored_keys: Vec::new(),
                ..c.clone()
            },
            "{name}:\n{yaml}"
        );
        assert!(yaml.contains("- 203.0.113.7/32") || name == "erlmail.app");
        assert!(!yaml.contains("server_imap"));
    }
}

#[test]
fn to_yaml_writes_durations_with_units() {
    let c = Config::load(&fixture("erlmail.config")).unwrap();
    let yaml = c.to_yaml();
    assert!(
        yaml.contains("server_smtp_retry_interval:\n- 1m\n- 5m\n- 15m\n"),
        "{yaml}"
    );
    assert!(yaml.contains("server_smtp_queue_interval: 1s\n"), "{yaml}");
    assert!(yaml.contains("server_smtp_port: 2525\n"), "{yaml}");
}

/// A configuration where every key differs from its default, so the round trip proves
/// every key is both written and read.
fn everything_changed() -> Config {
    let mut routes = BTreeMap::new();
    routes.insert(
        "example.net".to_string(),
        "mx1.example.net:2525".to_string(),
    );
    routes.insert("v6.example".to_string(), "[::1]:25".to_string());
    Config {
        server_list: strings(&["smtp"]),
        server_smtp_start: false,
        server_smtp_name: "mx.test".into(),
        server_smtp_port: 0,
        server_smtp_max_connection: 7,
        server_smtp_greeting: "true".into(),
        server_smtp_relay_clients: nets(&["127.0.0.0/8", "::1/128", "2001:db8::/32"]),
        server_smtp_retries: 0,
        server_smtp_retry_interval: vec![Duration::from_millis(1500), Duration::from_secs(2)],
        server_stmp_failure_notification: false,
        server_smtp_address: "::".parse().unwrap(),
        store_url: Some("postgres://postgres@127.0.0.1/erlmail".into()),
        server_smtp_relay_host: Some("127.0.0.1:2526".into()),
        server_smtp_routes: routes,
        server_smtp_queue_interval: Duration::from_millis(100),
        server_smtp_lock_lease: Duration::from_secs(90),
        server_smtp_max_message_size: 1024,
        server_smtp_max_recipients: 3,
        server_smtp_timeout: Duration::from_secs(86_400),
        server_smtp_hard_error_limit: 4,
        server_smtp_client_connection_limit: 8,
        server_smtp_client_connection_rate: 9,
        server_smtp_min_data_rate: 250,
        server_smtp_auth_failure_limit: 11,
        server_smtp_max_hops: 5,
        server_smtp_max_senders: 6,
        server_smtp_shutdown_timeout: Duration::from_secs(12),
        server_smtp_remote_port: 2527,
        server_smtp_delay_warning: Some(Duration::from_secs(4 * 3600)),
        server_smtp_tls_cert: Some("/etc/erlmail/cert.pem".into()),
        server_smtp_tls_key: Some("/etc/erlmail/key.pem".into()),
        server_smtp_tls_port: Some(465),
        server_smtp_relay_auth: false,
        server_smtp_tls_outbound: crate::config::TlsOutbound::Require,
        server_smtp_ehlo_name: Some("out.example.com".into()),
        server_smtp_dkim_keys: vec![crate::config::DkimKeyConfig {
            domain: "example.com".into(),
            selector: "s1".into(),
            private_key: "/etc/erlmail/dkim.pem".into(),
        }],
        server_smtp_dmarc_policy: crate::config::DmarcPolicy::Report,
        dns_nameservers: vec![
            "127.0.0.1:5353".parse().unwrap(),
            "[::1]:53".parse().unwrap(),
        ],
        node_name: "node-7".into(),
        admin_listen: None,
        log_format: LogFormat::Json,
        spool_dir: "/var/spool/erlmail".into(),
        maildir_root: Some("/var/mail".into()),
        ignored_keys: Vec::new(),
    }
}

#[test]
fn every_key_round_trips_through_yaml() {
    let c = everything_changed();
    let yaml = c.to_yaml();
    for key in SERVED_KEYS {
        assert!(
            yaml.contains(&format!("\n{key}:")) || yaml.starts_with(key),
            "{key} missing"
        );
    }
    assert_eq!(
        Config::from_yaml_str(&yaml, "all.yaml").unwrap(),
        c,
        "{yaml}"
    );
    // And the defaults round-trip too.
    let d = Config::default();
    assert_eq!(Config::from_yaml_str(&d.to_yaml(), "d.yaml").unwrap(), d);
}

#[test]
fn shipped_yaml_is_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/erlmail.yaml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c, Config::default());
    // Every served key is documented in the file (node_name commented out).
    let text = std::fs::read_to_string(&path).unwrap();
    for key in SERVED_KEYS {
        assert!(
            text.contains(&format!("{key}:")),
            "{key} is not in config/erlmail.yaml"
        );
    }
}

#[test]
fn dkim_keys_and_dmarc_policy() {
    let src = "\
server_smtp_dkim_keys:
  - {domain: Example.COM., selector: s2026, private_key: /etc/erlmail/dkim/example.pem}
  - domain: other.test
    selector: ed
    private_key: keys/ed.pem
server_smtp_dmarc_policy: report
";
    let c = Config::from_yaml_str(src, "t.yaml").unwrap();
    assert_eq!(
        c.server_smtp_dkim_keys,
        vec![
            crate::config::DkimKeyConfig {
                domain: "example.com".into(),
                selector: "s2026".into(),
                private_key: "/etc/erlmail/dkim/example.pem".into(),
            },
            crate::config::DkimKeyConfig {
                domain: "other.test".into(),
                selector: "ed".into(),
                private_key: "keys/ed.pem".into(),
            },
        ]
    );
    assert_eq!(
        c.server_smtp_dmarc_policy,
        crate::config::DmarcPolicy::Report
    );
    // What `config show` writes reads back the same.
    let again = Config::from_yaml_str(&c.to_yaml(), "again.yaml").unwrap();
    assert_eq!(again.server_smtp_dkim_keys, c.server_smtp_dkim_keys);
    assert_eq!(again.server_smtp_dmarc_policy, c.server_smtp_dmarc_policy);
    assert_eq!(
        Config::default().server_smtp_dmarc_policy,
        crate::config::DmarcPolicy::Enforce
    );

    let bad = Config::from_yaml_str(
        "server_smtp_dkim_keys:\n  - {domain: a.test, selector: s, key: x.pem}\n",
        "bad.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("bad.yaml:2:"), "{bad}");
    assert!(bad.contains("key"), "{bad}");
    let bad = Config::from_yaml_str("server_smtp_dmarc_policy: drop\n", "bad.yaml")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("enforce or report"), "{bad}");
}

#[test]
fn yaml_values_of_every_type() {
    let src = "\
server_smtp_retry_interval: [1, \"30s\", 2h, 1d]
server_smtp_queue_interval: 5
server_smtp_lock_lease: \"250ms\"
server_smtp_delay_warning: \"\"
server_smtp_relay_clients: [10.0.0.1, \"2001:db8::/32\", 192.168.0.0/16]
server_smtp_routes:
  example.com: mx.example.com:25
dns_nameservers: [127.0.0.1:5353, \"::1\"]
admin_listen: \"\"
store_url: sqlite://data/x.db
log_format: json
server_imap_port: 143
antispam_rbl_list: [[spamcop, bl.spamcop.net]]
";
    let c = Config::from_yaml_str(src, "t.yaml").unwrap();
    assert_eq!(
        c.server_smtp_retry_interval,
        vec![
            Duration::from_secs(60),
            Duration::from_secs(30),
            Duration::from_secs(7200),
            Duration::from_secs(86_400)
        ]
    );
    assert_eq!(c.server_smtp_queue_interval, Duration::from_secs(5));
    assert_eq!(c.server_smtp_lock_lease, Duration::from_millis(250));
    assert_eq!(c.server_smtp_delay_warning, None);
    assert_eq!(
        c.server_smtp_relay_clients,
        nets(&["10.0.0.1/32", "2001:db8::/32", "192.168.0.0/16"])
    );
    assert_eq!(c.server_smtp_routes["example.com"], "mx.example.com:25");
    assert_eq!(
        c.dns_nameservers,
        vec![
            "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );
    assert_eq!(c.admin_listen, None);
    assert_eq!(c.store_url.as_deref(), Some("sqlite://data/x.db"));
    assert_eq!(c.effective_store_url(), "sqlite://data/x.db");
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(
        c.ignored_keys,
        strings(&["server_imap_port", "antispam_rbl_list"])
    );
}

#[test]
fn empty_yaml_is_the_defaults() {
    assert_eq!(
        Config::from_yaml_str("", "e.yaml").unwrap(),
        Config::default()
    );
    assert_eq!(
        Config::from_yaml_str("# nothing\n", "e.yaml").unwrap(),
        Config::default()
    );
}

#[test]
fn erlmail_client_keys_map_and_unknown_erlang_keys_are_only_reported() {
    // An erlmail.app as ErlMail's forks ship it, with the smtpc keys.
    let src = r#"{application, erlmail, [{env, [
	{smarthost, {{127,0,0,1},25}},
	{ehlo, "localhost"},
	{server_list, []},
	{some_fork_option, true}
]}]}."#;
    let c = Config::from_erlang_str(src, "erlmail.app").unwrap();
    assert_eq!(c.server_smtp_relay_host.as_deref(), Some("127.0.0.1:25"));
    assert_eq!(c.server_smtp_ehlo_name.as_deref(), Some("localhost"));
    assert!(c.server_list.is_empty());
    assert_eq!(c.ignored_keys, vec!["some_fork_option".to_string()]);
    for (term, host) in [
        (r#"{"relay.example", 2525}"#, "relay.example:2525"),
        ("{{8193,3512,0,0,0,0,0,1},25}", "[2001:db8::1]:25"),
    ] {
        let src = format!("[{{erlmail, [{{smarthost, {term}}}]}}].");
        let c = Config::from_erlang_str(&src, "t.config").unwrap();
        assert_eq!(c.server_smtp_relay_host.as_deref(), Some(host), "{term}");
    }
    let bad = Config::from_erlang_str("[{erlmail, [{smarthost, {{1,2,3},25}}]}].", "t.config")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("t.config:1:"), "{bad}");
    // In YAML an unknown key is still a mistake.
    let bad = Config::from_yaml_str("some_fork_option: true\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("unknown key `some_fork_option`"), "{bad}");
    // What `config convert` writes reads back the same.
    let c = Config::from_erlang_str(src, "erlmail.app").unwrap();
    let again = Config::from_yaml_str(&c.to_yaml(), "again.yaml").unwrap();
    assert_eq!(again.server_smtp_relay_host, c.server_smtp_relay_host);
    assert_eq!(again.server_smtp_ehlo_name, c.server_smtp_ehlo_name);
}

#[test]
fn erlang_values_of_every_type() {
    let src = r#"
%% erlmail's own keys written the Erlang way
[{erlmail, [
	{server_smtp_greeting, [72,105]},
	{server_smtp_name, <<"bin.example">>},
	{server_smtp_relay_clients, [{{10,1,0,0},{255,255,0,0}}, "172.16.0.0/12",
	                             {{8193,3512,0,0,0,0,0,0},32}]},
	{server_smtp_retry_interval, [1, "30s"]},
	{server_smtp_timeout, 60},
	{server_smtp_relay_host, undefined},
	{server_smtp_routes, [{"example.com", "mx.example.com:25"}, {'other.example', "[::1]:25"}]},
	{admin_listen, ""},
	{log_format, json}
 ]}].
"#;
    let c = Config::from_erlang_str(src, "t.config").unwrap();
    assert_eq!(c.server_smtp_greeting, "Hi");
    assert_eq!(c.server_smtp_name, "bin.example");
    assert_eq!(
        c.server_smtp_relay_clients,
        nets(&["10.1.0.0/16", "172.16.0.0/12", "2001:db8::/32"])
    );
    assert_eq!(
        c.server_smtp_retry_interval,
        vec![Duration::from_secs(60), Duration::from_secs(30)]
    );
    assert_eq!(c.server_smtp_timeout, Duration::from_secs(60));
    assert_eq!(c.server_smtp_relay_host, None);
    assert_eq!(c.server_smtp_routes.len(), 2);
    assert_eq!(c.server_smtp_routes["other.example"], "[::1]:25");
    assert_eq!(c.admin_listen, None);
    assert_eq!(c.log_format, LogFormat::Json);
}

#[test]
fn server_smtp_start_takes_only_true_or_false() {
    let on = Config::from_erlang_str("[{erlmail, [{server_smtp_start, true}]}].", "a").unwrap();
    assert!(on.server_smtp_start);
    let off = Config::from_erlang_str("[{erlmail, [{server_smtp_start, false}]}].", "a").unwrap();
    assert!(!off.server_smtp_start);
    let e =
        Config::from_erlang_str("[{erlmail, [{server_smtp_start, \"true\"}]}].", "a").unwrap_err();
    assert_eq!((e.line, e.column), (1, 33));
    assert!(e.message.contains("expected a boolean"), "{e}");
}

#[test]
fn sys_config_without_erlmail_section_is_the_defaults() {
    let c = Config::from_erlang_str("[{kernel, [{x, 1}]}].", "k.config").unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn sniffs_the_format_without_a_known_extension() {
    let dir = tempfile::tempdir().unwrap();
    let erl = dir.path().join("site.conf");
    std::fs::write(
        &erl,
        "%% comment\n[\n {erlmail, [{server_smtp_port, 26}]}].\n",
    )
    .unwrap();
    assert_eq!(Config::load(&erl).unwrap().server_smtp_port, 26);
    let yml = dir.path().join("site.conf2");
    std::fs::write(&yml, "# comment\nserver_smtp_port: 27\n").unwrap();
    assert_eq!(Config::load(&yml).unwrap().server_smtp_port, 27);
}

#[test]
fn missing_file_names_the_file() {
    let e = Config::load(Path::new("/nonexistent/erlmail.yaml")).unwrap_err();
    assert_eq!((e.line, e.column), (0, 0));
    assert!(
        e.to_string()
            .starts_with("/nonexistent/erlmail.yaml: cannot read: "),
        "{e}"
    );
}

#[test]
fn overrides_apply_after_the_file() {
    let o = strings(&[
        "server_smtp_port=0",
        "server_smtp_relay_clients=[127.0.0.1/32]",
        "server_smtp_retry_interval=[\"1s\",\"2s\"]",
        "server_smtp_greeting=Hello: world",
        "admin_listen=",
        "server_imap_port=143",
    ]);
    let c = Config::load_with_overrides(Some(&fixture("erlmail.config")), &o).unwrap();
    assert_eq!(c.server_smtp_port, 0);
    assert_eq!(c.server_smtp_name, "mail.example.com");
    assert_eq!(c.server_smtp_relay_clients, nets(&["127.0.0.1/32"]));
    assert_eq!(
        c.server_smtp_retry_interval,
        vec![Duration::from_secs(1), Duration::from_secs(2)]
    );
    assert_eq!(c.server_smtp_greeting, "Hello: world");
    assert_eq!(c.admin_listen, None);
    assert!(c.ignored_keys.contains(&"server_imap_port".to_string()));

    let d = Config::load_with_overrides(None, &strings(&["server_smtp_port=2600"])).unwrap();
    assert_eq!(
        d,
        Config {
            server_smtp_port: 2600,
            ..Config::default()
        }
    );
}

#[test]
fn override_errors_name_the_override() {
    let e = Config::load_with_overrides(None, &strings(&["server_smtp_port=abc"])).unwrap_err();
    assert_eq!(e.file, "-o server_smtp_port=abc");
    assert!(
        e.to_string().starts_with("-o server_smtp_port=abc: "),
        "{e}"
    );
    assert!(e.message.contains("expected u16"), "{e}");
    let e = Config::load_with_overrides(None, &strings(&["nope=1"])).unwrap_err();
    assert!(e.message.contains("unknown key `nope`"), "{e}");
    let e = Config::load_with_overrides(None, &strings(&["server_smtp_port"])).unwrap_err();
    assert_eq!(e.to_string(), "-o server_smtp_port: expected key=value");
    let e = Config::load_with_overrides(None, &strings(&["server_smtp_retry_interval=[]"]))
        .unwrap_err();
    assert_eq!(e.file, "-o server_smtp_retry_interval=[]");
    assert!(e.message.contains("at least one interval"), "{e}");
}

#[test]
fn validate_rules() {
    assert!(Config::default().validate().is_ok());
    let cases: Vec<(Config, &str)> = vec![
        (
            Config {
                server_smtp_retry_interval: vec![],
                ..Config::default()
            },
            "server_smtp_retry_interval: needs at least one interval",
        ),
        (
            Config {
                server_smtp_max_recipients: 0,
                ..Config::default()
            },
            "server_smtp_max_recipients: must be at least 1",
        ),
        (
            Config {
                server_smtp_tls_cert: Some("c.pem".into()),
                ..Config::default()
            },
            "server_smtp_tls_cert: is set but server_smtp_tls_key is not",
        ),
        (
            Config {
                server_smtp_tls_key: Some("k.pem".into()),
                ..Config::default()
            },
            "server_smtp_tls_key: is set but server_smtp_tls_cert is not",
        ),
        (
            Config {
                store_url: Some("mysql://x".into()),
                ..Config::default()
            },
            "store_url: unknown scheme in `mysql://x`",
        ),
        (
            Config {
                server_smtp_queue_interval: Duration::ZERO,
                ..Config::default()
            },
            "server_smtp_queue_interval: must be longer than 0s",
        ),
        (
            Config {
                server_smtp_name: "two words".into(),
                ..Config::default()
            },
            "server_smtp_name: must be a host name",
        ),
    ];
    for (c, want) in cases {
        let e = c.validate().unwrap_err();
        assert!(
            e.message.starts_with(want),
            "{} does not start with {want}",
            e.message
        );
        assert_eq!(e.to_string(), format!("configuration: {}", e.message));
    }
    for ok in [
        "sqlite://spool/x.db",
        "sqlite::memory:",
        "postgres://u@127.0.0.1/db",
    ] {
        let c = Config {
            store_url: Some(ok.into()),
            ..Config::default()
        };
        assert!(c.validate().is_ok(), "{ok}");
    }
}

#[test]
fn error_display_formats() {
    let e = ConfigError {
        file: "a.yaml".into(),
        line: 3,
        column: 7,
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "a.yaml:3:7: bad");
    let e = ConfigError {
        line: 0,
        column: 0,
        ..e
    };
    assert_eq!(e.to_string(), "a.yaml: bad");
}

/// Each malformed file, the exact line and column reported, and a part of the message.
const MALFORMED: &[(&str, usize, usize, &str)] = &[
    (
        "bad-unterminated-string.config",
        4,
        24,
        "unterminated string",
    ),
    (
        "bad-unterminated-atom.config",
        2,
        24,
        "unterminated quoted atom",
    ),
    ("bad-missing-dot.config", 5, 2, "missing the final `.`"),
    (
        "bad-unbalanced-tuple.app",
        7,
        2,
        "the tuple opened at 6:2 must be closed with `}`",
    ),
    ("bad-atom.config", 3, 25, "bad atom `True`"),
    (
        "bad-wrong-type.config",
        3,
        24,
        "server_smtp_port: invalid type: string \"2525\", expected u16",
    ),
    (
        "bad-cidr.config",
        3,
        34,
        "prefix length 33 is larger than 32",
    ),
    (
        "bad-netmask.config",
        2,
        46,
        "non-contiguous netmask 255.0.255.0",
    ),
    ("bad-octet.config", 2, 35, "256 is not an octet"),
    (
        "bad-unit.config",
        2,
        44,
        "unknown unit `x` in duration `15x`",
    ),
    (
        "bad-duplicate.config",
        4,
        6,
        "duplicate key `server_smtp_port`",
    ),
    (
        "bad-garbage-after-dot.app",
        4,
        1,
        "unexpected `{` after the final `.`",
    ),
    (
        "bad-not-a-pair.config",
        3,
        5,
        "expected a {Key, Value} tuple, found atom `server_smtp_start`",
    ),
    ("bad-unit.yaml", 3, 44, "unknown unit `y` in duration `4y`"),
    ("bad-cidr.yaml", 3, 5, "bad CIDR `2001:db8::/129`"),
    (
        "bad-unknown-key.yaml",
        3,
        1,
        "unknown key `server_smtp_greting`",
    ),
    (
        "bad-wrong-type.yaml",
        2,
        29,
        "server_smtp_max_recipients: invalid type: string \"lots\"",
    ),
    ("bad-syntax.yaml", 4, 2, "did not find expected key"),
    (
        "bad-unterminated-string.yaml",
        2,
        23,
        "unterminated quoted string",
    ),
    (
        "bad-tls.yaml",
        2,
        1,
        "server_smtp_tls_cert: is set but server_smtp_tls_key is not",
    ),
    (
        "bad-store-url.yaml",
        1,
        1,
        "store_url: unknown scheme in `mysql://localhost/erlmail`",
    ),
];

#[test]
fn malformed_files_report_file_line_and_column() {
    for (name, line, column, part) in MALFORMED {
        let path = fixture(&format!("config/{name}"));
        let e = Config::load(&path).unwrap_err();
        assert_eq!((e.line, e.column), (*line, *column), "{name}: {e}");
        assert!(
            e.message.contains(part),
            "{name}: `{}` lacks `{part}`",
            e.message
        );
        assert_eq!(e.file, path.display().to_string());
        assert_eq!(
            e.to_string(),
            format!("{}:{line}:{column}: {}", path.display(), e.message)
        );
    }
}

#[test]
fn an_unknown_key_in_an_erlmail_file_is_reported_not_fatal() {
    // ErlMail ignored keys it did not know; its files still load (a typo shows in the
    // start-up warning and `config check`).
    let c = Config::load(&fixture("config/unknown-key.config")).unwrap();
    assert_eq!(c.ignored_keys, vec!["server_smtp_prot".to_string()]);
    assert_eq!(c.server_smtp_port, 2525, "the misspelt key changed nothing");
}

#[test]
fn every_malformed_fixture_is_tested() {
    let dir = fixture("config");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("bad-"))
        .collect();
    on_disk.sort();
    let mut tested: Vec<String> = MALFORMED.iter().map(|m| m.0.to_string()).collect();
    tested.sort();
    assert_eq!(on_disk, tested);
    assert!(tested.len() >= 12);
}
