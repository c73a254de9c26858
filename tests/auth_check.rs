//! SPF, DKIM and DMARC on mail for local users, through the real binary, over a DNS
//! server the test runs on 127.0.0.1 (SPF, DKIM key and DMARC records as TXT), with
//! incoming signatures made by an independent implementation (Python's dkimpy) under a
//! key openssl generated: a signed, SPF-listed message passes all three; an unlisted
//! address fails SPF; DMARC `p=reject` gets 550 5.7.1 and nothing is stored;
//! `p=quarantine` lands in Junk; a forged `Authentication-Results:` for our name is
//! removed; a DNS server that never answers gives `temperror`, not a refusal; a relay
//! client's mail, and this host's own (127.0.0.1), is not checked. The checked client
//! connects from 127.0.0.3.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/dns.rs"]
mod dns;
#[path = "support/python.rs"]
mod python;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use daemon::{Daemon, Smtp};

const ME: &str = "mx.example.test";
/// The checked client's address (127.0.0.1 is this host's own, never checked).
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// An RSA key from openssl: the PEM file and the public key for the DKIM TXT record.
fn rsa_key(dir: &Path) -> (std::path::PathBuf, String) {
    let key = dir.join("dkim.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(ok.success());
    let der = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(der.status.success());
    (key, daemon::b64(&der.stdout))
}

/// `message` with a DKIM-Signature by dkimpy (d=`domain`, s=sel, relaxed/relaxed).
fn dkimpy_sign(message: &str, domain: &str, key: &Path) -> String {
    let script = format!(
        "import sys, dkim\n\
         msg = open(sys.argv[1], 'rb').read()\n\
         key = open({key:?}, 'rb').read()\n\
         sig = dkim.sign(msg, b'sel', b'{domain}', key, canonicalize=(b'relaxed', b'relaxed'),\n\
                         include_headers=[b'from', b'to', b'subject'])\n\
         sys.stdout.buffer.write(sig + msg)\n",
        key = key.display().to_string()
    );
    let out = python::python3_on(message.as_bytes(), &script, &[], "dkimpy signing");
    String::from_utf8(out)
        .unwrap()
        .replace("\r\n", "\n")
        .replace('\n', "\r\n")
}

fn message(from: &str, subject: &str) -> String {
    format!("From: {from}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n")
}

/// One transaction; the reply to the final dot.
fn send(s: &mut Smtp, mail_from: &str, text: &str) -> String {
    let mail = format!("MAIL FROM:<{mail_from}>");
    s.transaction(&mail, &["RCPT TO:<alice@example.test>"], text.as_bytes())
}

/// The stored messages of alice's `mailbox`, oldest first: (subject line, whole text).
fn stored(d: &Daemon, mailbox: &str) -> Vec<String> {
    let (ok, out, err) = d.admin(
        &[
            "mailbox",
            "list",
            "alice@example.test",
            "--mailbox",
            mailbox,
        ],
        None,
    );
    assert!(ok.success(), "{err}");
    out.lines()
        .skip(1)
        .map(|l| {
            let id = l.split_whitespace().next().unwrap();
            let (ok, text, err) = d.admin(&["mailbox", "show", "alice@example.test", id], None);
            assert!(ok.success(), "{err}");
            text
        })
        .collect()
}

fn with_subject<'a>(all: &'a [String], subject: &str) -> &'a str {
    all.iter()
        .find(|m| m.contains(&format!("Subject: {subject}\r\n")))
        .unwrap_or_else(|| panic!("no stored message {subject:?} among {all:#?}"))
}

/// Our `Authentication-Results:` field (unfolded), the first line of the message.
fn results(text: &str) -> String {
    assert!(
        text.starts_with(&format!("Authentication-Results: {ME};")),
        "ours on top: {text}"
    );
    let end = text.find("\r\nReceived:").expect("our Received follows");
    text[..end].replace("\r\n\t", " ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_dkim_and_dmarc_decide_what_local_users_get() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = rsa_key(dir.path());
    let zone = dns::Zone::new()
        // Signed and SPF-listed: everything passes.
        .txt("good.test", "v=spf1 ip4:127.0.0.3 -all")
        .txt(
            "sel._domainkey.good.test",
            &format!("v=DKIM1; k=rsa; p={public}"),
        )
        .txt("_dmarc.good.test", "v=DMARC1; p=reject")
        // SPF only, and 127.0.0.1 is not listed.
        .txt("spf-only.test", "v=spf1 ip4:192.0.2.1 -all")
        // Failing DMARC under each policy.
        .txt("rejecting.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.rejecting.test", "v=DMARC1; p=reject")
        .txt("quarantine.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
        // A signature by good.test's key does not make evil.test's mail aligned.
        .txt("evil.test", "v=spf1 -all")
        .txt("_dmarc.evil.test", "v=DMARC1; p=reject")
        // A name server that never answers.
        .silent("slow.test")
        .silent("_dmarc.slow.test");
    let dns = dns::DnsServer::start(zone).await;
    let mut d = Daemon::start(&format!(
        "server_smtp_name: \"{ME}\"\n\
         dns_nameservers: [\"{}\"]\n\
         admin_listen: \"127.0.0.1:0\"\n\
         server_smtp_relay_clients: [\"127.0.0.2/32\"]\n",
        dns.addr()
    ));
    d.add_user("alice@example.test");

    let mut s = Smtp::connect_from(d.addr, CLIENT);
    assert!(s.cmd("EHLO client.test").starts_with("250"));
    // A pass, with a forged result for our name that must not survive, and one for
    // another host that stays.
    let forged = format!(
        "Authentication-Results: {ME}; dkim=pass header.d=forged\r\n\
         Authentication-Results: elsewhere.test; spf=pass\r\n{}",
        message("a@good.test", "good")
    );
    let signed = dkimpy_sign(&forged, "good.test", &key);
    assert!(send(&mut s, "a@good.test", &signed).starts_with("250"));
    assert!(send(
        &mut s,
        "b@spf-only.test",
        &message("b@spf-only.test", "spf-only")
    )
    .starts_with("250"));
    let r = send(
        &mut s,
        "c@rejecting.test",
        &message("c@rejecting.test", "rejected"),
    );
    assert!(r.starts_with("550 5.7.1"), "{r}");
    assert!(r.contains("rejecting.test"), "{r}");
    let r = send(
        &mut s,
        "q@quarantine.test",
        &message("q@quarantine.test", "junk"),
    );
    assert!(r.starts_with("250"), "{r}");
    let evil = dkimpy_sign(&message("e@evil.test", "evil"), "good.test", &key);
    let r = send(&mut s, "e@evil.test", &evil);
    assert!(
        r.starts_with("550 5.7.1"),
        "an unaligned signature is no pass: {r}"
    );
    let r = send(&mut s, "t@slow.test", &message("t@slow.test", "slow"));
    assert!(r.starts_with("250"), "DNS trouble never refuses: {r}");
    let _ = s.cmd("QUIT");

    // A relay client's mail is not checked, nor is this host's own.
    let relay_client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    for (from, hello, subject) in [
        (Some(relay_client), "relay.test", "trusted"),
        (None, "localhost", "own"),
    ] {
        let mut s = match from {
            Some(ip) => Smtp::connect_from(d.addr, ip),
            None => d.connect(),
        };
        assert!(s.cmd(&format!("EHLO {hello}")).starts_with("250"));
        let r = send(
            &mut s,
            "c@rejecting.test",
            &message("c@rejecting.test", subject),
        );
        assert!(r.starts_with("250"), "{subject}: {r}");
        let _ = s.cmd("QUIT");
    }

    let inbox = stored(&d, "INBOX");
    assert_eq!(
        inbox.len(),
        5,
        "good, spf-only, slow, trusted, own: {inbox:#?}"
    );
    let good = with_subject(&inbox, "good");
    let ar = results(good);
    assert!(
        ar.contains("dkim=pass header.i=@good.test header.s=sel"),
        "{ar}"
    );
    assert!(ar.contains("spf=pass"), "{ar}");
    assert!(ar.contains("smtp.mailfrom=a@good.test"), "{ar}");
    assert!(ar.contains("dmarc=pass header.from=good.test"), "{ar}");
    assert_eq!(
        good.matches(&format!("Authentication-Results: {ME}"))
            .count(),
        1,
        "the forged one is gone: {good}"
    );
    assert!(!good.contains("header.d=forged"), "{good}");
    assert!(good.contains("Authentication-Results: elsewhere.test; spf=pass"));

    let ar = results(with_subject(&inbox, "spf-only"));
    assert!(ar.contains("dkim=none"), "{ar}");
    assert!(ar.contains("spf=fail"), "{ar}");
    assert!(ar.contains("smtp.mailfrom=b@spf-only.test"), "{ar}");
    assert!(ar.contains("dmarc=none"), "{ar}");

    let ar = results(with_subject(&inbox, "slow"));
    assert!(ar.contains("spf=temperror"), "{ar}");
    assert!(ar.contains("dmarc=temperror"), "{ar}");

    for unchecked in ["trusted", "own"] {
        let m = with_subject(&inbox, unchecked);
        assert!(!m.contains("Authentication-Results"), "{m}");
    }

    let junk = stored(&d, "Junk");
    assert_eq!(junk.len(), 1, "{junk:#?}");
    let ar = results(with_subject(&junk, "junk"));
    assert!(ar.contains("dmarc=fail"), "{ar}");
    assert!(ar.contains("policy.dmarc=quarantine"), "{ar}");
    for m in &inbox {
        assert!(!m.contains("Subject: rejected") && !m.contains("Subject: evil"));
    }

    assert!(d.log_text().contains("refused: DMARC p=reject"), "logged");
    let metrics = daemon::http_get(d.admin_addr(), "/metrics");
    for line in [
        "erlmail_dmarc_actions_total{action=\"reject\"} 2",
        "erlmail_dmarc_actions_total{action=\"junk\"} 1",
        "erlmail_auth_results_total{method=\"dkim\",result=\"pass\"} 2",
        "erlmail_auth_results_total{method=\"spf\",result=\"pass\"} 1",
        "erlmail_auth_results_total{method=\"dmarc\",result=\"temperror\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_only_records_the_verdict() {
    let zone = dns::Zone::new()
        .txt("rejecting.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.rejecting.test", "v=DMARC1; p=reject");
    let dns = dns::DnsServer::start(zone).await;
    let d = Daemon::start(&format!(
        "server_smtp_name: \"{ME}\"\n\
         dns_nameservers: [\"{}\"]\n\
         server_smtp_dmarc_policy: report\n",
        dns.addr()
    ));
    d.add_user("alice@example.test");
    let mut s = Smtp::connect_from(d.addr, CLIENT);
    assert!(s.cmd("EHLO client.test").starts_with("250"));
    let r = send(
        &mut s,
        "c@rejecting.test",
        &message("c@rejecting.test", "kept"),
    );
    assert!(r.starts_with("250"), "{r}");
    let inbox = stored(&d, "INBOX");
    let ar = results(with_subject(&inbox, "kept"));
    assert!(ar.contains("dmarc=fail"), "{ar}");
    assert!(ar.contains("policy.dmarc=reject"), "{ar}");
}
