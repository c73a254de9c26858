//! DKIM signing through the real binary (#18 part 1): keys made with `erlmail dkim
//! keygen`, mail relayed to sinks on 127.0.0.1, and every signature checked by an
//! independent implementation, Python's dkimpy (PyNaCl for Ed25519), whose DNS look-up
//! answers with the TXT record the keygen printed. Also: an unusable key stops `serve`
//! and a SIGHUP reload, which keeps the old keys.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/python.rs"]
mod python;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::{wait_until, Daemon};
use sink::{Sink, SinkConfig};

/// A key made by `erlmail dkim keygen`: its file and its DNS record.
struct Key {
    file: PathBuf,
    /// `<selector>._domainkey.<domain>`.
    name: String,
    /// The TXT record's text.
    record: String,
}

/// Runs `erlmail dkim keygen` and checks what it wrote and printed.
fn keygen(dir: &Path, domain: &str, selector: &str, ed25519: bool) -> Key {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join(format!("{domain}.{selector}.pem"));
    let mut cmd = Command::new(daemon::bin());
    cmd.args(["dkim", "keygen", domain, selector, "--out"])
        .arg(&file)
        .env_remove("ERLMAIL_CONFIG");
    if ed25519 {
        cmd.arg("--ed25519");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the private key is the owner's only");
    assert!(stdout.contains(&file.display().to_string()), "{stdout}");
    let name = format!("{selector}._domainkey.{domain}");
    assert!(
        stdout.contains(&format!("{name}. IN TXT ( \"v=DKIM1; k=")),
        "zone-file line: {stdout}"
    );
    let record = stdout
        .lines()
        .find(|l| l.starts_with("v=DKIM1; "))
        .unwrap_or_else(|| panic!("no record in {stdout}"))
        .to_string();
    let k = if ed25519 { "ed25519" } else { "rsa" };
    assert!(
        record.starts_with(&format!("v=DKIM1; k={k}; p=")),
        "{record}"
    );
    // Running it again never replaces the key.
    let again = Command::new(daemon::bin())
        .args(["dkim", "keygen", domain, selector, "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!again.status.success(), "an existing key file is kept");
    Key { file, name, record }
}

fn key_yaml(keys: &[(&str, &str, &Key)]) -> String {
    let entries: Vec<String> = keys
        .iter()
        .map(|(domain, selector, k)| {
            format!(
                "{{domain: {domain}, selector: {selector}, private_key: \"{}\"}}",
                k.file.display()
            )
        })
        .collect();
    format!("server_smtp_dkim_keys: [{}]\n", entries.join(", "))
}

/// One signature as dkimpy sees it.
#[derive(Debug, serde::Deserialize)]
struct Verdict {
    ok: bool,
    d: String,
    s: String,
    a: String,
    /// `h=`, lower case, in order.
    h: Vec<String>,
}

/// Every DKIM-Signature of `message` verified by dkimpy, with `records` (name -> TXT
/// text) as the DNS.
fn dkimpy(message: &[u8], records: &[&Key]) -> Vec<Verdict> {
    let dns: BTreeMap<&str, &str> = records
        .iter()
        .map(|k| (k.name.as_str(), k.record.as_str()))
        .collect();
    let script = r#"
import json, sys
import dkim
from dkim.util import parse_tag_value
message = open(sys.argv[1], 'rb').read()
records = json.loads(sys.argv[2])
def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    return records.get(name.rstrip('.').lower(), '').encode()
d = dkim.DKIM(message, minkey=1024)
out = []
count = sum(1 for (k, v) in d.headers if k.lower() == b'dkim-signature')
for i, (k, v) in enumerate([h for h in d.headers if h[0].lower() == b'dkim-signature']):
    tags = parse_tag_value(v)
    try:
        ok = dkim.DKIM(message, minkey=1024).verify(idx=i, dnsfunc=dnsfunc)
    except dkim.DKIMException:
        ok = False
    out.append({
        'ok': bool(ok),
        'd': tags[b'd'].decode(),
        's': tags[b's'].decode(),
        'a': tags[b'a'].decode(),
        'h': [x.strip().decode().lower() for x in tags[b'h'].split(b':')],
    })
assert len(out) == count
print(json.dumps(out))
"#;
    let out = python::python3_on(
        message,
        script,
        &[&serde_json::to_string(&dns).unwrap()],
        "dkimpy failed (pip install dkimpy pynacl)",
    );
    serde_json::from_slice(&out).unwrap()
}

/// Asserts that `message` carries exactly one signature, that dkimpy verifies it with
/// `keys` in the DNS, and that it names (d=, s=, a=) `dsa`; returns dkimpy's verdicts.
fn one_valid_signature(message: &[u8], keys: &[&Key], dsa: (&str, &str, &str)) -> Vec<Verdict> {
    let v = dkimpy(message, keys);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].ok, "{v:?}\n{}", String::from_utf8_lossy(message));
    assert_eq!((v[0].d.as_str(), v[0].s.as_str(), v[0].a.as_str()), dsa);
    v
}

/// One transaction; the MAIL FROM line may carry parameters.
fn relay(d: &Daemon, mail_from: &str, rcpts: &[&str], text: &[u8]) {
    let mut s = d.connect_ehlo("client.test");
    let rcpts: Vec<String> = rcpts.iter().map(|r| format!("RCPT TO:<{r}>")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    s.begin_data(mail_from, &rcpts);
    s.send_raw(text);
    let r = s.cmd(".");
    assert!(r.starts_with("250"), "{r}");
    let _ = s.cmd("QUIT");
}

fn text(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: Alice <{from}>\r\nTo: b@remote.test\r\nSubject: {subject}\r\n\
         Date: Tue, 1 Dec 2026 02:44:15 +0000\r\nMessage-ID: <{subject}@client.test>\r\n\
         \r\nHello,   world \r\n\r\n\r\n"
    )
    .into_bytes()
}

/// The message with this subject among those a sink received.
fn received(sink: &Sink, subject: &str) -> Vec<u8> {
    sink.messages()
        .into_iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains(&format!("Subject: {subject}\r\n")))
        .unwrap_or_else(|| panic!("no message {subject}"))
        .data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_mail_is_signed_and_dkimpy_verifies_it() {
    let keys = tempfile::tempdir().unwrap();
    let rsa = keygen(keys.path(), "example.org", "rsa1", false);
    let ed = keygen(keys.path(), "example.net", "ed1", true);
    let sink = Sink::start(SinkConfig::default()).await;
    // A next hop without 8BITMIME, for the 8-bit message's second recipient.
    let seven = Sink::start(SinkConfig::default().offering(&[])).await;
    let mut d = Daemon::start(&format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{}\"\n\
         server_smtp_routes: {{seven.test: \"127.0.0.1:{}\"}}\n\
         server_smtp_name: \"relay.test\"\n\
         server_smtp_queue_interval: \"100ms\"\n\
         admin_listen: \"127.0.0.1:0\"\n{}",
        sink.port(),
        seven.port(),
        key_yaml(&[("example.org", "rsa1", &rsa), ("example.net", "ed1", &ed)])
    ));
    d.wait_for_log(
        "DKIM: relayed mail is signed with 2 key(s)",
        Duration::from_secs(5),
    );

    relay(
        &d,
        "MAIL FROM:<a@example.org>",
        &["b@remote.test"],
        &text("a@example.org", "rsa"),
    );
    relay(
        &d,
        "MAIL FROM:<a@news.example.net>",
        &["b@remote.test"],
        &text("a@news.example.net", "subdomain"),
    );
    relay(
        &d,
        "MAIL FROM:<a@other.test>",
        &["b@remote.test"],
        &text("a@other.test", "unkeyed"),
    );
    let eight_bit = "From: a@example.org\r\nTo: b@remote.test, c@seven.test\r\nSubject: eight\r\n\
                     MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
                     Content-Transfer-Encoding: 8bit\r\n\r\nD\u{e9}j\u{e0} vu, na\u{ef}ve caf\u{e9}\r\n";
    relay(
        &d,
        "MAIL FROM:<a@example.org> BODY=8BITMIME",
        &["b@remote.test", "c@seven.test"],
        eight_bit.as_bytes(),
    );
    assert!(
        sink.wait_for(4, Duration::from_secs(20)).await,
        "{}",
        d.log_text()
    );
    assert!(
        seven.wait_for(1, Duration::from_secs(20)).await,
        "{}",
        d.log_text()
    );

    // From: a@example.org: the RSA key, From oversigned, Received not signed.
    let m = received(&sink, "rsa");
    assert!(m.starts_with(b"DKIM-Signature: "), "on top of the message");
    let v = one_valid_signature(&m, &[&rsa, &ed], ("example.org", "rsa1", "rsa-sha256"));
    assert_eq!(v[0].h.iter().filter(|h| *h == "from").count(), 2, "{v:?}");
    for h in ["to", "subject", "date", "message-id"] {
        assert!(v[0].h.contains(&h.to_string()), "{h} signed: {v:?}");
    }
    assert!(!v[0].h.contains(&"received".to_string()), "{v:?}");
    // Without the right key in the DNS, dkimpy refuses it (the check can fail).
    assert!(!dkimpy(&m, &[]).iter().any(|v| v.ok));
    let wrong = Key {
        file: PathBuf::new(),
        name: rsa.name.clone(),
        record: keygen(keys.path(), "example.org", "other", false).record,
    };
    assert!(
        !dkimpy(&m, &[&wrong])[0].ok,
        "another key does not verify it"
    );
    // A changed body breaks it.
    let tampered = String::from_utf8(m.clone())
        .unwrap()
        .replace("world", "World");
    assert_ne!(tampered.as_bytes(), &m[..]);
    assert!(!dkimpy(tampered.as_bytes(), &[&rsa])[0].ok);

    // From: a@news.example.net: the parent domain's Ed25519 key.
    let m = received(&sink, "subdomain");
    one_valid_signature(&m, &[&rsa, &ed], ("example.net", "ed1", "ed25519-sha256"));

    // No key for other.test: no signature.
    let m = received(&sink, "unkeyed");
    assert!(
        dkimpy(&m, &[&rsa, &ed]).is_empty(),
        "{}",
        String::from_utf8_lossy(&m)
    );
    assert!(!String::from_utf8_lossy(&m)
        .to_ascii_lowercase()
        .contains("dkim-signature"));

    // The 8-bit message was made 7-bit before signing: the 8BITMIME hop and the 7-bit
    // hop got the same text, and the signature holds for both.
    let to_8bit_hop = received(&sink, "eight");
    let to_7bit_hop = received(&seven, "eight");
    assert_eq!(
        String::from_utf8_lossy(&to_8bit_hop),
        String::from_utf8_lossy(&to_7bit_hop),
        "both hops get the text that was signed"
    );
    assert!(
        to_7bit_hop.iter().all(|b| *b < 0x80),
        "{}",
        String::from_utf8_lossy(&to_7bit_hop)
    );
    let text = String::from_utf8_lossy(&to_7bit_hop).into_owned();
    assert!(
        text.contains("Content-Transfer-Encoding: quoted-printable"),
        "{text}"
    );
    assert!(text.contains("D=C3=A9j=C3=A0 vu"), "{text}");
    let v = dkimpy(&to_7bit_hop, &[&rsa, &ed]);
    assert!(
        v.len() == 1 && v[0].ok && v[0].d == "example.org",
        "{v:?}\n{text}"
    );
    assert!(
        v[0].h.contains(&"content-transfer-encoding".to_string()),
        "{v:?}"
    );

    // Three signatures: two RSA, one Ed25519.
    let metrics = erlmail::net::admin::get(d.admin_addr(), "/metrics")
        .await
        .unwrap();
    for (algorithm, n) in [("rsa-sha256", 2), ("ed25519-sha256", 1)] {
        let line = format!("erlmail_dkim_signed_total{{algorithm=\"{algorithm}\"}} {n}");
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[test]
fn an_unusable_key_stops_serve_and_config_check_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key\n").unwrap();
    for (file, why) in [
        (dir.path().join("missing.pem"), "cannot read it"),
        (garbage, "no private key in it"),
    ] {
        let config = dir.path().join("erlmail.yaml");
        std::fs::write(
            &config,
            Daemon::complete_yaml(
                &format!(
                    "server_smtp_dkim_keys: [{{domain: example.org, selector: s1, private_key: \"{}\"}}]\n",
                    file.display()
                ),
                dir.path(),
            ),
        )
        .unwrap();
        let mut serve = Command::new(daemon::bin());
        serve
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("ERLMAIL_CONFIG")
            .current_dir(dir.path());
        let started = Instant::now();
        let out = serve.output().unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "serve must not start: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains(why),
            "{stderr}"
        );
        let (status, _, stderr) = daemon::erlmail(&config, &["config", "check"], None);
        assert!(!status.success());
        assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_key_keeps_signing_with_the_old_one() {
    let keys = tempfile::tempdir().unwrap();
    let first = keygen(keys.path(), "example.org", "ed1", true);
    let sink = Sink::start(SinkConfig::default()).await;
    let base = format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{}\"\n\
         server_smtp_queue_interval: \"100ms\"\n",
        sink.port()
    );
    let mut d = Daemon::start(&format!(
        "{base}server_smtp_greeting: \"first\"\n{}",
        key_yaml(&[("example.org", "ed1", &first)])
    ));
    let spool = format!("spool_dir: \"{}\"\n", d.dir.path().join("spool").display());
    let port = format!("server_smtp_port: {}\n", d.addr.port());
    let config = |greeting: &str, keys: &str| {
        format!(
            "{base}{spool}{port}server_smtp_address: \"127.0.0.1\"\nadmin_listen: \"\"\n\
             server_smtp_greeting: \"{greeting}\"\n{keys}"
        )
    };

    relay(
        &d,
        "MAIL FROM:<a@example.org>",
        &["b@remote.test"],
        &text("a@example.org", "before"),
    );

    // The key file is broken and the configuration changed: the reload is refused as a
    // whole, naming the file, and the running key goes on signing.
    std::fs::write(
        &first.file,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = d.reload(
        &config("second", &key_yaml(&[("example.org", "ed1", &first)])),
        "not reloaded",
    );
    assert!(err.contains(&first.file.display().to_string()), "{err}");
    let s = d.connect();
    assert!(
        s.greeting.ends_with("first"),
        "old configuration kept: {}",
        s.greeting
    );
    drop(s);
    relay(
        &d,
        "MAIL FROM:<a@example.org>",
        &["b@remote.test"],
        &text("a@example.org", "refused"),
    );

    // A good new key: the reload goes through and the new key signs.
    let second = keygen(keys.path(), "example.org", "ed2", true);
    d.reload(
        &config("third", &key_yaml(&[("example.org", "ed2", &second)])),
        "configuration reloaded",
    );
    wait_until("the new greeting", Duration::from_secs(5), || {
        d.connect().greeting.ends_with("third")
    });
    relay(
        &d,
        "MAIL FROM:<a@example.org>",
        &["b@remote.test"],
        &text("a@example.org", "after"),
    );
    assert!(
        sink.wait_for(3, Duration::from_secs(20)).await,
        "{}",
        d.log_text()
    );

    for (subject, selector) in [("before", "ed1"), ("refused", "ed1"), ("after", "ed2")] {
        let m = received(&sink, subject);
        let v = dkimpy(&m, &[&first, &second]);
        assert_eq!(v.len(), 1, "{subject}: {v:?}");
        assert!(
            v[0].ok && v[0].s == selector,
            "{subject}: {v:?}\n{}",
            String::from_utf8_lossy(&m)
        );
    }
}
