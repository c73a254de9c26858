//! Coming from ErlMail (issue 9, acceptance 4; issue 19 item 5): an ErlMail-shaped Mnesia
//! database is made with Erlang/OTP (`tests/fixtures/mnesia/make_db.escript`), exported
//! with `contrib/erlmail-export.escript` (which must write its file 0600: it holds
//! plaintext passwords) and loaded with the `erlmail import` command, with `maildir_root`
//! set. Every domain, user (the old password logs in) and message (byte for byte, in its
//! ErlMail folder with its flags, in the store and in the Maildir) arrives, and a second
//! import changes nothing, in the store or on disk.
//!
//! Needs `escript` and Mnesia (Debian: `erlang-base` and `erlang-mnesia`, or the
//! `erlang-nox` bundle); the test fails, not skips, without them.

#[path = "support/daemon.rs"]
mod daemon;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use erlmail::store::password::verify_password;
use erlmail::store::MessageStore;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run an escript; panics with its output when it fails or `escript` is missing. Returns
/// its standard error.
fn escript(script: &Path, args: &[&Path], erl_flags: Option<&str>) -> String {
    let mut cmd = Command::new("escript");
    cmd.arg(script).args(args);
    match erl_flags {
        Some(f) => cmd.env("ERL_FLAGS", f),
        None => cmd.env_remove("ERL_FLAGS"),
    };
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run escript ({e}): install Erlang/OTP (Debian: erlang-base erlang-mnesia)")
    });
    assert!(
        out.status.success(),
        "{} failed: {}\nstdout: {}\nstderr: {}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run the `erlmail` binary; panics unless it succeeds. Returns (stdout, stderr).
fn erlmail(config: &Path, args: &[&str]) -> (String, String) {
    let (status, out, err) = daemon::erlmail(config, args, None);
    assert!(status.success(), "erlmail {args:?}: {status}\n{out}\n{err}");
    (out, err)
}

/// The users of the fixture and their ErlMail plain-text passwords.
const USERS: [(&str, &str); 3] = [
    ("alice@example.com", "wonderland"),
    ("bob@example.com", "builder-b0b"),
    ("carol@example.org", "p\u{e4}ssw\u{f6}rd"),
];

/// A message as the test compares it: its bytes and its IMAP flags.
type Msg = (Vec<u8>, Vec<String>);

/// Each user's mailboxes after the import: per mailbox, the bodies oldest first (ErlMail
/// uid order) with their IMAP flags (ErlMail's `recent` is no stored flag).
fn expected_mailboxes() -> Vec<(&'static str, &'static str, Vec<Msg>)> {
    let mut dots = b"From: <x@example.net>\r\nSubject: dots\r\n\r\n\
.leading dot\r\n..two dots\r\ncaf"
        .to_vec();
    dots.push(0xe9);
    dots.extend_from_slice(b" latin-1 byte\r\n.\r\nend\r\n");
    let twice = b"Subject: twice\r\n\r\nSame bytes.\r\n".to_vec();
    let seen = || vec!["\\Seen".to_string()];
    vec![
        (
            "alice@example.com",
            "INBOX",
            vec![
                (
                    b"From: Bob <bob@example.com>\r\nTo: alice@example.com\r\n\
Subject: hello\r\n\r\nHi Alice.\r\n"
                        .to_vec(),
                    Vec::new(),
                ),
                (dots, seen()),
            ],
        ),
        (
            "alice@example.com",
            "Sent",
            vec![(
                b"From: Alice <alice@example.com>\r\nTo: bob@example.com\r\n\
Subject: sent\r\n\r\nHi Bob.\r\n"
                    .to_vec(),
                seen(),
            )],
        ),
        (
            "bob@example.com",
            "INBOX",
            vec![(
                b"Subject: binary body\r\n\r\nStored as a binary.\r\n".to_vec(),
                Vec::new(),
            )],
        ),
        (
            "bob@example.com",
            "Archive",
            vec![(
                b"Subject: archived\r\n\r\nFrom the Archive folder.\r\n".to_vec(),
                seen(),
            )],
        ),
        (
            "carol@example.org",
            "INBOX",
            vec![(twice.clone(), Vec::new()), (twice, Vec::new())],
        ),
    ]
}

async fn mailbox_contents(store: &dyn MessageStore, user: &str, mailbox: &str) -> Vec<Msg> {
    let mut out = Vec::new();
    for s in store.list_mailbox(user, mailbox).await.unwrap() {
        assert_eq!(s.mailbox, mailbox);
        let m = store.get_message(user, s.id).await.unwrap().unwrap();
        assert_eq!(m.summary.flags, s.flags, "list and get agree");
        out.push((m.body, s.flags));
    }
    out
}

/// Every file under `dir`, relative to it, with its bytes, sorted.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The Maildir files the import must have written, as `maildir_messages` shows them,
/// with the messages of `expected_mailboxes`: seen ones in `cur/` as `:2,S`, the others
/// in `new/`.
fn expected_maildir_files() -> Vec<(String, String, String, Vec<u8>)> {
    let mut want = Vec::new();
    for (user, mailbox, msgs) in expected_mailboxes() {
        let (local, domain) = user.split_once('@').unwrap();
        let dir = match mailbox {
            "INBOX" => format!("{domain}/{local}"),
            f => format!("{domain}/{local}/.{f}"),
        };
        for (body, flags) in msgs {
            let (sub, info) = if flags.is_empty() {
                ("new", String::new())
            } else {
                ("cur", ":2,S".to_string())
            };
            want.push((dir.clone(), sub.to_string(), info, body));
        }
    }
    want.sort();
    want
}

/// Maildir files as (folder directory, `new`/`cur`/`tmp`, info suffix, bytes), sorted;
/// the `maildirfolder` markers left out.
fn maildir_messages(root: &Path) -> Vec<(String, String, String, Vec<u8>)> {
    let mut got: Vec<_> = files(root)
        .into_iter()
        .filter(|(p, _)| !p.ends_with("/maildirfolder"))
        .map(|(p, bytes)| {
            let (dir, name) = p.rsplit_once('/').unwrap();
            let (folder, sub) = dir.rsplit_once('/').unwrap();
            let info = name.find(":2,").map_or("", |i| &name[i..]).to_string();
            (folder.to_string(), sub.to_string(), info, bytes)
        })
        .collect();
    got.sort();
    got
}

async fn export_and_import(erl_flags: Option<String>) {
    let erl_flags = erl_flags.as_deref();
    let dir = tempfile::tempdir().unwrap();
    let mnesia = dir.path().join("mnesia");
    let json = dir.path().join("erlmail-export.json");
    escript(
        &root().join("tests/fixtures/mnesia/make_db.escript"),
        &[&mnesia],
        erl_flags,
    );
    // A file already there, readable by all: it is replaced, and the export is 0600.
    std::fs::write(&json, b"old").unwrap();
    std::fs::set_permissions(&json, std::fs::Permissions::from_mode(0o644)).unwrap();
    let said = escript(
        &root().join("contrib/erlmail-export.escript"),
        &[&mnesia, &json],
        None,
    );
    let mode = std::fs::metadata(&json).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the export holds plaintext passwords: {mode:o}"
    );
    assert!(
        said.contains("plaintext passwords") && said.contains("0600"),
        "the escript says what the file holds and how it was written: {said}"
    );
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "mnesia")
        .collect();
    assert_eq!(beside, ["erlmail-export.json"], "no temporary file left");

    let spool = dir.path().join("spool");
    let maildir = dir.path().join("Maildir");
    let config = dir.path().join("erlmail.yaml");
    std::fs::write(
        &config,
        format!(
            "spool_dir: \"{}\"\nmaildir_root: \"{}\"\n",
            spool.display(),
            maildir.display()
        ),
    )
    .unwrap();
    let json_arg = json.to_str().unwrap();
    let (report, _) = erlmail(&config, &["import", json_arg]);
    assert_eq!(
        report.trim_end(),
        "imported 2 domains, 3 users, 7 messages; 0 skipped (already present); \
         2 messages kept in their mailbox other than INBOX; 7 written to the Maildir"
    );

    // What the operator sees: the Sent folder is alice's mailbox Sent, INBOX mail stays
    // in INBOX, and the flags come with the message.
    let subjects = |user: &str, mailbox: &str| -> Vec<String> {
        let (out, _) = erlmail(&config, &["mailbox", "list", user, "--mailbox", mailbox]);
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(subjects("alice@example.com", "Sent"), ["sent"]);
    assert_eq!(subjects("alice@example.com", "INBOX"), ["hello", "dots"]);
    assert_eq!(subjects("bob@example.com", "Archive"), ["archived"]);
    assert_eq!(subjects("bob@example.com", "INBOX"), ["binary body"]);
    let (list, _) = erlmail(
        &config,
        &["mailbox", "list", "alice@example.com", "--mailbox", "Sent"],
    );
    let id = daemon::first_listed_id(&list);
    let (body, err) = erlmail(&config, &["mailbox", "show", "alice@example.com", id]);
    assert!(body.starts_with("From: Alice"), "{body}");
    assert_eq!(err, "flags: \\Seen\n");

    let maildir_before = files(&maildir);
    assert_eq!(maildir_messages(&maildir), expected_maildir_files());
    assert!(
        maildir
            .join("example.com/alice/.Sent/maildirfolder")
            .is_file(),
        "a Maildir++ folder"
    );

    let url = format!("sqlite://{}", spool.join("erlmail.db").display());
    let store = erlmail::store::open(&url).await.unwrap();
    assert_eq!(
        store.list_domains().await.unwrap(),
        vec!["example.com".to_string(), "example.org".to_string()]
    );
    assert_eq!(
        store.list_users(None).await.unwrap(),
        USERS.iter().map(|(u, _)| u.to_string()).collect::<Vec<_>>()
    );
    let mut hashes_before = Vec::new();
    for (user, password) in USERS {
        let hash = store.password_hash(user).await.unwrap().unwrap();
        assert!(hash.starts_with("$argon2id$"), "{user}: {hash}");
        assert!(verify_password(password, &hash), "{user}: old password");
        assert!(!verify_password("wrong", &hash), "{user}");
        hashes_before.push(hash);
    }
    for (user, mailbox, want) in expected_mailboxes() {
        assert_eq!(
            mailbox_contents(store.as_ref(), user, mailbox).await,
            want,
            "{user} {mailbox}"
        );
    }
    let senders: Vec<String> = store
        .list_mailbox("alice@example.com", "INBOX")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.sender)
        .collect();
    assert_eq!(senders, vec!["bob@example.com", "x@example.net"]);
    drop(store);

    // Twice: nothing new, everything counted as already present, no file written.
    let (again, _) = erlmail(&config, &["import", json_arg]);
    assert_eq!(
        again.trim_end(),
        format!(
            "imported 0 domains, 0 users, 0 messages; {} skipped (already present)",
            2 + 3 + 7
        )
    );
    assert_eq!(files(&maildir), maildir_before, "the Maildir is unchanged");
    let store = erlmail::store::open(&url).await.unwrap();
    assert_eq!(store.list_domains().await.unwrap().len(), 2);
    assert_eq!(store.list_users(None).await.unwrap().len(), 3);
    for (user, mailbox, want) in expected_mailboxes() {
        assert_eq!(
            mailbox_contents(store.as_ref(), user, mailbox).await,
            want,
            "{user} {mailbox}"
        );
    }
    let mut hashes_after = Vec::new();
    for (u, _) in USERS {
        hashes_after.push(store.password_hash(u).await.unwrap().unwrap());
    }
    assert_eq!(
        hashes_before, hashes_after,
        "existing users are left as they are"
    );
}

/// The database of a node without a name (`nonode@nohost`, as the export itself runs).
#[tokio::test]
async fn erlmail_mnesia_export_then_import_twice() {
    export_and_import(None).await;
}

/// ErlMail ran as a named node: the export must take the tables over from that name.
#[tokio::test]
async fn export_of_a_named_node_database() {
    // Unique per process: two runs at once must not clash in epmd.
    export_and_import(Some(format!(
        "-sname erlmail_import_{}",
        std::process::id()
    )))
    .await;
}
