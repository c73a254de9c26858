//! Coming from ErlMail (issue 9, acceptance 4): an ErlMail-shaped Mnesia database is made
//! with Erlang/OTP (`tests/fixtures/mnesia/make_db.escript`), exported with
//! `contrib/erlmail-export.escript` and loaded with `erlmail::import::import`. Every
//! domain, user (the old password logs in) and message (byte for byte, right INBOX)
//! arrives, and a second import changes nothing.
//!
//! Needs `escript` and Mnesia (Debian: `erlang-base` and `erlang-mnesia`, or the
//! `erlang-nox` bundle); the test fails, not skips, without them.

use std::path::{Path, PathBuf};
use std::process::Command;

use erlmail::store::password::verify_password;
use erlmail::store::MessageStore;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run an escript; panics with its output when it fails or `escript` is missing.
fn escript(script: &Path, args: &[&Path], erl_flags: Option<&str>) {
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
}

/// The users of the fixture and their ErlMail plain-text passwords.
const USERS: [(&str, &str); 3] = [
    ("alice@example.com", "wonderland"),
    ("bob@example.com", "builder-b0b"),
    ("carol@example.org", "p\u{e4}ssw\u{f6}rd"),
];

/// Each user's INBOX after the import, oldest first (ErlMail uid order per mailbox; bob's
/// Archive message lands in INBOX before his INBOX message, the mailboxes being sorted).
fn expected_inboxes() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut dots = b"From: <x@example.net>\r\nSubject: dots\r\n\r\n\
.leading dot\r\n..two dots\r\ncaf"
        .to_vec();
    dots.push(0xe9);
    dots.extend_from_slice(b" latin-1 byte\r\n.\r\nend\r\n");
    let twice = b"Subject: twice\r\n\r\nSame bytes.\r\n".to_vec();
    vec![
        (
            "alice@example.com",
            vec![
                b"From: Bob <bob@example.com>\r\nTo: alice@example.com\r\n\
Subject: hello\r\n\r\nHi Alice.\r\n"
                    .to_vec(),
                dots,
            ],
        ),
        (
            "bob@example.com",
            vec![
                b"Subject: archived\r\n\r\nFrom the Archive folder.\r\n".to_vec(),
                b"Subject: binary body\r\n\r\nStored as a binary.\r\n".to_vec(),
            ],
        ),
        ("carol@example.org", vec![twice.clone(), twice]),
    ]
}

async fn inbox_bodies(store: &dyn MessageStore, user: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for s in store.list_mailbox(user, "INBOX").await.unwrap() {
        assert_eq!(s.mailbox, "INBOX");
        out.push(store.get_message(user, s.id).await.unwrap().unwrap().body);
    }
    out
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
    escript(
        &root().join("contrib/erlmail-export.escript"),
        &[&mnesia, &json],
        None,
    );

    let url = format!("sqlite://{}", dir.path().join("erlmail.db").display());
    let store = erlmail::store::open(&url).await.unwrap();
    let store = store.as_ref();
    let report = erlmail::import::import(store, &json, false).await.unwrap();
    assert_eq!(
        (
            report.domains,
            report.users,
            report.messages,
            report.skipped,
            report.into_inbox
        ),
        (2, 3, 6, 0, 1),
        "{report}"
    );
    assert_eq!(
        report.warnings,
        vec![
            "1 messages of ErlMail mailbox bob@example.com: Archive were put in INBOX \
             (only INBOX is kept)"
                .to_string()
        ]
    );

    assert_eq!(
        store.list_domains().await.unwrap(),
        vec!["example.com".to_string(), "example.org".to_string()]
    );
    assert_eq!(
        store.list_users(None).await.unwrap(),
        USERS.iter().map(|(u, _)| u.to_string()).collect::<Vec<_>>()
    );
    for (user, password) in USERS {
        let hash = store.password_hash(user).await.unwrap().unwrap();
        assert!(hash.starts_with("$argon2id$"), "{user}: {hash}");
        assert!(verify_password(password, &hash), "{user}: old password");
        assert!(!verify_password("wrong", &hash), "{user}");
    }
    for (user, bodies) in expected_inboxes() {
        assert_eq!(inbox_bodies(store, user).await, bodies, "{user}");
    }
    let senders: Vec<String> = store
        .list_mailbox("alice@example.com", "INBOX")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.sender)
        .collect();
    assert_eq!(senders, vec!["bob@example.com", "x@example.net"]);

    // Twice: nothing new, everything counted as already present.
    let hashes_before: Vec<_> = {
        let mut v = Vec::new();
        for (u, _) in USERS {
            v.push(store.password_hash(u).await.unwrap());
        }
        v
    };
    let again = erlmail::import::import(store, &json, false).await.unwrap();
    assert_eq!(
        (
            again.domains,
            again.users,
            again.messages,
            again.skipped,
            again.into_inbox
        ),
        (0, 0, 0, 2 + 3 + 6, 0),
        "{again}"
    );
    assert!(again.warnings.is_empty(), "{again}");
    assert_eq!(store.list_domains().await.unwrap().len(), 2);
    assert_eq!(store.list_users(None).await.unwrap().len(), 3);
    for (user, bodies) in expected_inboxes() {
        assert_eq!(inbox_bodies(store, user).await, bodies, "{user}");
    }
    let mut hashes_after = Vec::new();
    for (u, _) in USERS {
        hashes_after.push(store.password_hash(u).await.unwrap());
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
