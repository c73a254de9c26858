//! The administration commands through the real binary: configuration check and
//! convert on ErlMail's own files and on malformed ones, and domains and users on the
//! SQLite store (passwords only ever as argon2 hashes).

#[path = "support/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};

use daemon::erlmail;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn erlmail_files_load_and_convert_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["erlmail.app", "erlmail.config"] {
        let (status, checked, err) = erlmail(&fixture(name), &["config", "check"], None);
        assert!(status.success(), "{name}: {err}");
        assert!(
            err.contains("server_imap_start"),
            "ignored keys reported: {err}"
        );
        let (status, yaml, err) = erlmail(
            &fixture(name),
            &["config", "convert", fixture(name).to_str().unwrap()],
            None,
        );
        assert!(status.success(), "{name}: {err}");
        let converted = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&converted, &yaml).unwrap();
        let (status, rechecked, err) = erlmail(&converted, &["config", "check"], None);
        assert!(status.success(), "{name} converted: {err}\n{yaml}");
        assert_eq!(checked, rechecked, "{name}: same effective configuration");
    }
    let (_, site, _) = erlmail(&fixture("erlmail.config"), &["config", "check"], None);
    assert!(site.contains("server_smtp_port: 2525"), "{site}");
    assert!(site.contains("203.0.113.7/32"), "{site}");
    assert!(site.contains("10.0.0.0/8"), "{site}");
}

#[test]
fn every_malformed_file_names_file_line_and_column_and_exits_non_zero() {
    let dir = fixture("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with("bad") {
            continue;
        }
        seen += 1;
        let (status, out, err) = erlmail(&path, &["config", "check"], None);
        assert!(!status.success(), "{name} was accepted:\n{out}");
        assert_eq!(status.code(), Some(78), "{name}: EX_CONFIG");
        // `FILE:LINE:COL: message`
        let at = err
            .find(&name)
            .unwrap_or_else(|| panic!("{name}: no file name in {err:?}"));
        let rest = &err[at + name.len()..];
        let mut parts = rest.splitn(4, ':');
        assert_eq!(parts.next(), Some(""), "{name}: {err}");
        let line: usize = parts.next().unwrap_or("").parse().unwrap_or(0);
        let col: usize = parts.next().unwrap_or("").parse().unwrap_or(0);
        assert!(line >= 1 && col >= 1, "{name}: no line/column in {err:?}");
        assert!(
            !parts.next().unwrap_or("").trim().is_empty(),
            "{name}: no message"
        );
    }
    assert!(seen >= 12, "only {seen} malformed fixtures");
}

fn store_config(dir: &Path) -> PathBuf {
    let config = dir.join("erlmail.yaml");
    std::fs::write(
        &config,
        format!("spool_dir: \"{}\"\n", dir.join("spool").display()),
    )
    .unwrap();
    config
}

#[test]
fn domains_and_users_end_to_end_with_hashed_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(dir.path());
    let ok = |args: &[&str], stdin: Option<&str>| {
        let (status, out, err) = erlmail(&config, args, stdin);
        assert!(status.success(), "{args:?}: {err}");
        (out, err)
    };
    ok(&["domain", "add", "Example.COM"], None);
    ok(&["domain", "add", "example.org"], None);
    assert_eq!(
        ok(&["domain", "list"], None).0,
        "example.com\nexample.org\n"
    );

    let password = "correct horse battery staple";
    let (out, err) = ok(
        &["user", "add", "alice@example.com"],
        Some(&format!("{password}\n")),
    );
    assert!(!out.contains(password) && !err.contains(password));
    ok(
        &["user", "add", "bob@example.org"],
        Some("hunter2hunter2\n"),
    );
    assert_eq!(
        ok(&["user", "list"], None).0,
        "alice@example.com\nbob@example.org\n"
    );
    assert_eq!(
        ok(&["user", "list", "example.org"], None).0,
        "bob@example.org\n"
    );

    // Unknown domain and duplicate user are refused.
    let (status, _, err) = erlmail(
        &config,
        &["user", "add", "carol@nowhere.test"],
        Some("pw\n"),
    );
    assert!(!status.success() && !err.is_empty());
    let (status, _, _) = erlmail(&config, &["user", "add", "alice@example.com"], Some("pw\n"));
    assert!(!status.success());

    ok(
        &["user", "passwd", "alice@example.com"],
        Some("a new secret value\n"),
    );

    // Nothing in the spool holds a password in clear; the hash is argon2.
    let mut found_hash = false;
    for entry in std::fs::read_dir(dir.path().join("spool")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for secret in [password, "hunter2hunter2", "a new secret value"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "password {secret:?} stored in clear"
            );
        }
        found_hash |= bytes.windows(9).any(|w| w == b"$argon2id");
    }
    assert!(found_hash, "an argon2id hash is stored");

    ok(&["user", "remove", "bob@example.org"], None);
    assert_eq!(ok(&["user", "list"], None).0, "alice@example.com\n");
    let (status, _, _) = erlmail(&config, &["user", "remove", "bob@example.org"], None);
    assert!(!status.success(), "removing a missing user fails");
    ok(&["domain", "remove", "example.com"], None);
    assert_eq!(ok(&["domain", "list"], None).0, "example.org\n");
    assert_eq!(
        ok(&["user", "list"], None).0,
        "",
        "users go with their domain"
    );
}

#[test]
fn every_printing_command_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(dir.path());
    let (status, _, err) = erlmail(&config, &["domain", "add", "pipe.test"], None);
    assert!(status.success(), "{err}");
    for args in [
        &["config", "check"][..],
        &["config", "convert", config.to_str().unwrap()],
        &["domain", "list"],
        &["queue", "list"],
        &["user", "list"],
        &["--help"],
    ] {
        let (status, err) = daemon::into_closed_pipe(&config, args);
        assert!(status.success(), "{args:?}: {status:?} {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
