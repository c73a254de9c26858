//! The daemon as an operator sees it: start-up on the defaults, the actor tree in the
//! log, supervision after injected panics, the restart intensity cap, SIGHUP reloads and
//! a clean SIGTERM.

#[path = "support/daemon.rs"]
mod daemon;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::Daemon;

/// `erlmail serve` with no config file and no options, in an empty directory: the
/// embedded SQLite default, ErlMail's port 25 when this user may bind it.
#[test]
fn serve_with_no_setup_starts_on_sqlite_and_logs_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let port_25_free = TcpListener::bind("0.0.0.0:25").is_ok();
    let mut cmd = Command::new(daemon::bin());
    cmd.arg("serve")
        .current_dir(dir.path())
        .env_remove("ERLMAIL_CONFIG");
    if !port_25_free {
        // Not root, or port 25 taken: the only change is the port.
        eprintln!("port 25 unavailable here; running the same command with -o server_smtp_port=0");
        cmd.args(["-o", "server_smtp_port=0"]);
    }
    let config = dir.path().join("none.yaml");
    let mut d = Daemon::spawn_cmd(cmd, dir, config);
    let addr = d.wait_for_listener();
    if port_25_free {
        assert_eq!(addr.port(), 25);
    }
    d.wait_for_log("actor tree", Duration::from_secs(10));
    let log = d.log_text();
    daemon::assert_contains_all(
        &log,
        &[
            "erlmail_sup",
            "├── erlmail_store",
            "├── smtpd_queue",
            "└── smtpd_sup",
            "    └── smtpd_listener",
        ],
    );
    assert!(
        d.dir.path().join("spool/erlmail.db").exists(),
        "the SQLite store is created in ./spool"
    );
    let mut s = daemon::Smtp::connect(std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())));
    assert!(
        s.greeting
            .starts_with("220 smtp.erlsoft.net ESMTP ErlMail http://erlsoft.org (NO UCE)"),
        "{}",
        s.greeting
    );
    let _ = s.cmd("QUIT");
    readme_first_steps(d.dir.path(), addr.port());
    d.signal("TERM");
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("exit after SIGTERM");
    assert!(status.success(), "{status}");
}

/// README's first steps after `serve`, run exactly as written (the command at the path
/// the build leaves, in the server's directory; port 25 replaced by the server's).
fn readme_first_steps(dir: &std::path::Path, port: u16) {
    let readme = include_str!("../README.md");
    let start = readme
        .find("send yourself mail:")
        .expect("README's first steps");
    let block = &readme[start..];
    let block = &block[block.find("```sh\n").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    let mut last = String::new();
    for line in block.lines() {
        let (stdin, command) = match line.split_once(" | ") {
            Some((echo, cmd)) => (
                Some(
                    echo.trim_start_matches("echo '")
                        .trim_end_matches('\'')
                        .to_string(),
                ),
                cmd,
            ),
            None => (None, line),
        };
        let mut words = command.split_whitespace();
        let program = words.next().unwrap();
        let args: Vec<String> = words
            .map(|w| w.replace("127.0.0.1:25", &format!("127.0.0.1:{port}")))
            .collect();
        let mut cmd = match program {
            "./target/release/erlmail" => Command::new(daemon::bin()),
            "swaks" => Command::new("swaks"),
            other => panic!("README step runs {other:?}: say how it gets on the PATH"),
        };
        cmd.args(&args)
            .current_dir(dir)
            .env_remove("ERLMAIL_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{line}: {e}"));
        if let Some(text) = stdin {
            use std::io::Write;
            writeln!(child.stdin.take().unwrap(), "{text}").unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        last = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    assert!(
        last.lines().count() == 2 && last.contains("  test "),
        "the mail sent with swaks is listed: {last}"
    );
}

#[test]
fn lifecycle_lines_carry_actor_paths_and_json_format_works() {
    let mut d = Daemon::start("log_format: json\n");
    d.wait_for_log("actor tree", Duration::from_secs(10));
    let log = d.log_text();
    let mut paths = std::collections::BTreeSet::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(p) = v.get("path").and_then(|p| p.as_str()) {
            paths.insert(p.to_string());
        }
    }
    for p in [
        "erlmail_sup",
        "erlmail_sup/erlmail_store",
        "erlmail_sup/smtpd_queue",
        "erlmail_sup/smtpd_sup",
        "erlmail_sup/smtpd_sup/smtpd_listener",
    ] {
        assert!(paths.contains(p), "no log line with path {p}: {paths:?}");
    }
}

#[test]
fn sigusr1_logs_the_live_tree_with_sessions() {
    let mut d = Daemon::start("");
    let _held = d.connect();
    // The session is registered once its greeting is out; its own start line is read
    // before the mark, so that what follows the mark is the tree alone.
    d.wait_for_log_after(0, "session started", Duration::from_secs(10));
    let mark = d.log_len();
    d.signal("USR1");
    let line = d.wait_for_log_after(mark, "actor tree", Duration::from_secs(10));
    assert!(line.contains("actor tree"));
    std::thread::sleep(Duration::from_millis(100));
    let after = d.log.lock().unwrap()[mark..].join("\n");
    assert_eq!(
        after.matches("smtpd_fsm#1").count(),
        1,
        "the live session, and the tree only once:\n{after}"
    );
    assert!(!after.contains("tree="), "no copy in a field:\n{after}");
}

fn fault_daemon() -> (Daemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    let d = Daemon::start_with_env("", &[("ERLMAIL_TEST_FAULT_FILE", fault.to_str().unwrap())]);
    std::mem::forget(dir);
    (d, fault)
}

#[test]
fn store_and_queue_panics_are_restarted_and_the_daemon_keeps_serving() {
    let (mut d, fault) = fault_daemon();
    for target in ["erlmail_store", "smtpd_queue"] {
        std::fs::write(&fault, target).unwrap();
        let mark = d.log_len();
        d.signal("USR2");
        let failed = d.wait_for_log_after(mark, "injected panic", Duration::from_secs(10));
        assert!(
            failed.contains(&format!("erlmail_sup/{target}")),
            "{failed}"
        );
        let restarted = d.wait_for_log_after(mark, "restarted", Duration::from_secs(10));
        assert!(
            restarted.contains(&format!("erlmail_sup/{target}")),
            "{restarted}"
        );
    }
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "daemon still running"
    );
    let mut s = d.connect();
    assert!(s.greeting.starts_with("220 "), "{}", s.greeting);
    assert!(s.cmd("NOOP").starts_with("250"));
}

#[test]
fn exceeding_the_restart_intensity_stops_the_daemon_non_zero() {
    let (mut d, fault) = fault_daemon();
    std::fs::write(&fault, "erlmail_store").unwrap();
    let start = Instant::now();
    for _ in 0..6 {
        let mark = d.log_len();
        d.signal("USR2");
        if d.child.try_wait().unwrap().is_some() {
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        // Wait for this panic to be handled (restart or give-up) before the next one.
        loop {
            let log = d.log.lock().unwrap()[mark..].join("\n");
            if log.contains("restarted") || log.contains("giving up") {
                break;
            }
            if d.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("daemon still running:\n{}", d.log_text()));
    assert!(!status.success(), "exit status {status}");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(
        d.log_text().contains("restart intensity exceeded"),
        "{}",
        d.log_text()
    );
}

/// `config` with `server_smtp_port` changed from `from` to `to`.
fn moved_port(config: &str, from: u16, to: u16) -> String {
    config.replace(
        &format!("server_smtp_port: {from}"),
        &format!("server_smtp_port: {to}"),
    )
}

/// One session: its greeting, and the reply to a remote recipient after EHLO and MAIL.
fn relay_attempt(d: &Daemon) -> (String, String) {
    let mut s = d.connect_ehlo("client.test");
    assert!(s.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
    let rcpt = s.cmd("RCPT TO:<someone@remote.example>");
    (s.greeting.clone(), rcpt)
}

#[test]
fn sighup_applies_a_new_greeting_and_relay_list_and_keeps_the_old_on_error() {
    let mut d = Daemon::start(
        "server_smtp_greeting: \"first greeting\"\nserver_smtp_relay_clients: [\"192.0.2.0/24\"]\n",
    );
    let (greeting, denied) = relay_attempt(&d);
    assert!(greeting.ends_with("first greeting"), "{greeting}");
    assert!(denied.starts_with("554 5.7.1"), "{denied}");

    let text = d.config_text().replace(
        "server_smtp_greeting: \"first greeting\"\nserver_smtp_relay_clients: [\"192.0.2.0/24\"]",
        "server_smtp_greeting: \"second greeting\"\nserver_smtp_relay_clients: [\"127.0.0.1/32\"]",
    );
    d.reload(&text, "configuration reloaded");
    let (greeting, ok) = relay_attempt(&d);
    assert!(greeting.ends_with("second greeting"), "{greeting}");
    assert!(ok.starts_with("250"), "{ok}");

    // A broken file: reported, the running configuration stays.
    let err = d.reload("server_smtp_greeting: \"unterminated\n", "not reloaded");
    assert!(err.contains("erlmail.yaml:"), "error names the file: {err}");
    let s = d.connect();
    assert!(s.greeting.ends_with("second greeting"), "{}", s.greeting);
    drop(s);

    let t = Instant::now();
    d.signal("TERM");
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("exit within 5 s");
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn daemon_mode_detaches_and_writes_a_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("erlmail.yaml");
    std::fs::write(&config, Daemon::complete_yaml("", dir.path())).unwrap();
    let pidfile = dir.path().join("erlmail.pid");
    let log = dir.path().join("erlmail.log");
    let status = Command::new(daemon::bin())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--daemon", "--pidfile"])
        .arg(&pidfile)
        .arg("--log-file")
        .arg(&log)
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "the parent returns at once with 0");
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        if let Ok(text) = std::fs::read_to_string(&pidfile) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let logged = std::fs::read_to_string(&log).unwrap_or_default();
                if logged.contains("listening on") {
                    break pid;
                }
            }
        }
        assert!(Instant::now() < deadline, "no pidfile/listener");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while pidfile.exists() {
        assert!(
            Instant::now() < deadline,
            "pidfile not removed after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("erlmail stopped"));
}

#[test]
fn a_taken_port_is_one_plain_line_and_ex_unavailable() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("erlmail.yaml");
    let yaml = format!("server_smtp_port: {port}\n");
    std::fs::write(&config, Daemon::complete_yaml(&yaml, dir.path())).unwrap();
    let out = std::process::Command::new(daemon::bin())
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("ERLMAIL_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = format!("erlmail: cannot listen on 127.0.0.1:{port}: Address already in use");
    assert!(
        err.lines().any(|l| l.starts_with(&line)),
        "one plain line: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sighup_to_a_taken_port_keeps_serving_and_names_restart_only_keys() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut d = Daemon::start(&format!(
        "server_smtp_greeting: \"before\"\nserver_smtp_port: {port}\n"
    ));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    // The new port is taken, and the greeting changes too: nothing of it applies.
    let text = moved_port(&d.config_text(), port, taken_port).replace("\"before\"", "\"after\"");
    let line = d.reload(&text, "not reloaded");
    assert!(
        line.contains(&format!("cannot listen on 127.0.0.1:{taken_port}")),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let s = daemon::Smtp::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(
        s.greeting.ends_with("before"),
        "still serving as before: {}",
        s.greeting
    );
    drop(s);
    assert!(
        d.wait_exit(Duration::from_millis(200)).is_none(),
        "still running"
    );

    // A key only a restart can apply is named; the rest applies.
    let text = moved_port(&d.config_text(), taken_port, port)
        .replace("admin_listen: \"\"", "admin_listen: \"127.0.0.1:0\"");
    let mark = d.log_len();
    let line = d.reload(&text, "takes effect at the next start");
    assert!(line.contains("admin_listen"), "{line}");
    d.wait_for_log_after(mark, "configuration reloaded", Duration::from_secs(10));
    let s = daemon::Smtp::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(s.greeting.ends_with("after"), "{}", s.greeting);
    drop(taken);
}
