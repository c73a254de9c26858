//! Private files and one daemon per spool, through the real binary: whatever umask it is
//! started with, erlmail creates its store, spool, Maildirs, log, lock and pid files
//! for its own user only; a second `serve` on a spool in use is refused with one line
//! naming the running pid and changes nothing of the running daemon's; a pid file left
//! by a dead daemon is taken over.

#[path = "support/daemon.rs"]
mod daemon;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use daemon::{Daemon, Smtp};

/// A command running the binary under `umask 022`, as a distribution's init script or a
/// user's shell would: the files can only come out private if erlmail sets its own.
fn permissive(args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 022; exec \"$@\"")
        .arg("sh")
        .arg(daemon::bin())
        .args(args)
        .env_remove("ERLMAIL_CONFIG")
        .env("RUST_LOG", "info");
    cmd
}

/// Run an admin command under `umask 022`; panics unless it succeeds.
fn admin(config: &Path, args: &[&str], stdin: &str) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), config.as_os_str()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    let mut child = permissive(&all)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn assert_mode(path: &Path, want: u32) {
    let got = mode(path);
    assert_eq!(got, want, "{} is {got:o}, want {want:o}", path.display());
}

/// Wait until `log` holds the listener's `listening on ADDR` line; return ADDR.
fn listener_in(log: &Path, d: &mut Daemon) -> std::net::SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("listening on ")) {
            let rest = line.rsplit("listening on ").next().unwrap();
            let addr: String = rest
                .chars()
                .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
                .collect();
            return addr.parse().unwrap();
        }
        if let Ok(Some(status)) = d.child.try_wait() {
            panic!("erlmail exited ({status}):\n{text}\n{}", d.log_text());
        }
        assert!(Instant::now() < deadline, "no listener in the log:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A config in a fresh temporary directory (spool at `<dir>/spool`, ephemeral port on
/// 127.0.0.1) plus `yaml`.
fn setup(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    setup_with(|_| yaml.to_string())
}

/// As `setup`, the extra YAML made from the directory's path.
fn setup_with(yaml: impl FnOnce(&Path) -> String) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("erlmail.yaml");
    let text = Daemon::complete_yaml(&yaml(dir.path()), dir.path());
    std::fs::write(&config, text).unwrap();
    (dir, config)
}

/// Start `erlmail serve ARGS` on `config` under `umask 022` with logs to `log`.
fn serve_logging_to(
    dir: tempfile::TempDir, config: PathBuf, log: &Path, extra: &[&std::ffi::OsStr],
) -> Daemon {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--config".as_ref(),
        config.as_os_str(),
        "serve".as_ref(),
        "--log-file".as_ref(),
        log.as_os_str(),
    ];
    args.extend_from_slice(extra);
    let mut cmd = permissive(&args);
    cmd.current_dir(dir.path());
    let mut d = Daemon::spawn_cmd(cmd, dir, config);
    d.addr = listener_in(log, &mut d);
    d
}

fn walk(path: &Path, dirs: &mut Vec<PathBuf>, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(path).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            dirs.push(p.clone());
            walk(&p, dirs, files);
        } else {
            files.push(p);
        }
    }
}

#[test]
fn store_spool_maildir_log_and_pid_files_are_private_under_a_permissive_umask() {
    let (dir, config) =
        setup_with(|dir| format!("maildir_root: \"{}\"\n", dir.join("mail").display()));
    let root = dir.path().join("mail");
    let spool = dir.path().join("spool");
    let log = dir.path().join("erlmail.log");
    let pidfile = dir.path().join("erlmail.pid");
    let d = serve_logging_to(
        dir,
        config.clone(),
        &log,
        &["--pidfile".as_ref(), pidfile.as_os_str()],
    );
    admin(&config, &["domain", "add", "example.test"], "");
    admin(
        &config,
        &["user", "add", "alice@example.test"],
        "pw-alice\n",
    );

    let mut s = d.connect_ehlo("client.test");
    s.send_ok(
        "bob@remote.test",
        &["alice@example.test"],
        "Subject: private\r\n\r\nFor Alice only.\r\n",
    );
    let _ = s.cmd("QUIT");

    assert_mode(&spool, 0o700);
    let db = spool.join("erlmail.db");
    assert_mode(&db, 0o600);
    for suffix in ["-wal", "-shm"] {
        let p = spool.join(format!("erlmail.db{suffix}"));
        // SQLite keeps both while a WAL connection is open: the daemon's is.
        assert!(p.exists(), "{} missing", p.display());
        assert_mode(&p, 0o600);
    }
    assert_mode(&spool.join("erlmail.lock"), 0o600);
    assert_mode(&log, 0o600);
    assert_mode(&pidfile, 0o600);

    assert_mode(&root, 0o700);
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    walk(&root, &mut dirs, &mut files);
    assert!(
        dirs.iter().any(|p| p.ends_with("example.test/alice/new")),
        "{dirs:?}"
    );
    assert_eq!(files.len(), 1, "one delivered message: {files:?}");
    for p in &dirs {
        assert_mode(p, 0o700);
    }
    for p in &files {
        assert_mode(p, 0o600);
    }
}

#[test]
fn an_admin_command_on_a_fresh_spool_creates_a_private_store() {
    let (dir, config) = setup("");
    admin(&config, &["domain", "add", "example.test"], "");
    let spool = dir.path().join("spool");
    assert_mode(&spool, 0o700);
    assert_mode(&spool.join("erlmail.db"), 0o600);
}

/// Run a second `erlmail serve ARGS` to completion (killed after 10 s).
fn second_serve(config: &Path, cwd: &Path, args: &[&std::ffi::OsStr]) -> (Output, Duration) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), config.as_os_str()];
    all.push("serve".as_ref());
    all.extend_from_slice(args);
    let started = Instant::now();
    let mut child = permissive(&all)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    (child.wait_with_output().unwrap(), took)
}

#[test]
fn a_second_serve_on_the_same_spool_is_refused_and_the_first_is_untouched() {
    let (dir, config) = setup("");
    let cwd = dir.path().to_path_buf();
    let log = cwd.join("erlmail.log");
    let pidfile = cwd.join("erlmail.pid");
    let d = serve_logging_to(
        dir,
        config.clone(),
        &log,
        &["--pidfile".as_ref(), pidfile.as_os_str()],
    );
    let first = d.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&pidfile).unwrap_or_default() != format!("{first}\n") {
        assert!(Instant::now() < deadline, "pid file never named {first}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid_meta = std::fs::metadata(&pidfile).unwrap();
    let log_before = std::fs::read_to_string(&log).unwrap();

    let other_pidfile = cwd.join("other.pid");
    let other_log = cwd.join("other.log");
    // The same pid file and log file; another pid file and log; no pid file; detached.
    let runs: [Vec<&std::ffi::OsStr>; 4] = [
        vec![
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
            "--log-file".as_ref(),
            log.as_os_str(),
        ],
        vec![
            "--pidfile".as_ref(),
            other_pidfile.as_os_str(),
            "--log-file".as_ref(),
            other_log.as_os_str(),
        ],
        vec![],
        vec![
            "--daemon".as_ref(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
        ],
    ];
    for args in &runs {
        let (out, took) = second_serve(&config, &cwd, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(75),
            "{args:?}: EX_TEMPFAIL; stderr:\n{stderr}"
        );
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line:\n{stderr}");
        assert!(
            lines[0].starts_with("erlmail: another erlmail (pid ")
                && lines[0].contains(&format!("(pid {first})"))
                && lines[0].contains("is running on spool"),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: stdout");
    }

    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{first}\n"),
        "the first daemon's pid file is unchanged"
    );
    let after = std::fs::metadata(&pidfile).unwrap();
    assert_eq!(
        after.modified().unwrap(),
        pid_meta.modified().unwrap(),
        "nor rewritten"
    );
    assert!(!other_pidfile.exists(), "no pid file for a refused daemon");
    assert!(!other_log.exists(), "no log for a refused daemon");
    let log_after = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_after.starts_with(&log_before),
        "the first daemon's log is only appended to"
    );
    let started = format!("erlmail {} starting", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        log_after.matches(&started).count(),
        1,
        "nothing of the refused daemons in the first one's log:\n{log_after}"
    );

    let mut s = Smtp::connect(d.addr);
    assert!(s.greeting.starts_with("220"), "{}", s.greeting);
    assert!(s.cmd("EHLO client.test").starts_with("250"));
    assert!(s.cmd("QUIT").starts_with("221"));
    drop(d);
}

#[test]
fn a_stale_pid_file_and_spool_lock_do_not_stop_a_new_daemon() {
    // A pid that ran and is gone: what a crashed daemon leaves in its files.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();

    let (dir, config) = setup("");
    let cwd = dir.path().to_path_buf();
    let pidfile = cwd.join("erlmail.pid");
    std::fs::write(&pidfile, format!("{dead}\n")).unwrap();
    std::fs::create_dir(cwd.join("spool")).unwrap();
    std::fs::write(cwd.join("spool/erlmail.lock"), format!("{dead}\n")).unwrap();

    let mut cmd = Command::new(daemon::bin());
    cmd.arg("--config")
        .arg(&config)
        .arg("serve")
        .arg("--pidfile")
        .arg(&pidfile)
        .env_remove("ERLMAIL_CONFIG")
        .env("RUST_LOG", "info")
        .current_dir(&cwd);
    let mut d = Daemon::spawn_cmd(cmd, dir, config);
    d.addr = d.wait_for_listener();
    let pid = d.child.id();
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{pid}\n"),
        "the stale pid file is taken over"
    );
    assert_eq!(
        std::fs::read_to_string(cwd.join("spool/erlmail.lock")).unwrap(),
        format!("{pid}\n")
    );
    let mut s = d.connect();
    assert!(s.greeting.starts_with("220"), "{}", s.greeting);
    let _ = s.cmd("QUIT");

    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(status.success(), "{status}");
    assert!(!pidfile.exists(), "the owner removes its pid file at exit");
}
