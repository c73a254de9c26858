//! Unit tests of DKIM signing: key loading and its errors, the choice of key, the
//! signed header list, the 8-bit rule, keygen's records and files, the cache. The
//! signatures themselves are verified by an independent implementation (dkimpy) in
//! tests/dkim_sign.rs.

use super::*;
use rsa::pkcs1::EncodeRsaPrivateKey;

fn rsa_key(bits: usize) -> RsaPrivateKey {
    RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).unwrap()
}

fn entry(domain: &str, selector: &str, path: &Path) -> DkimKeyConfig {
    DkimKeyConfig {
        domain: domain.into(),
        selector: selector.into(),
        private_key: path.to_path_buf(),
    }
}

/// Writes `pem` to `name` in `dir` and returns the path.
fn file(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

fn new_key_file(dir: &Path, name: &str, kind: KeyKind) -> PathBuf {
    file(dir, name, &generate(kind, "example.org", "s").unwrap().pem)
}

fn message(from: &str, body: &str) -> Vec<u8> {
    format!(
        "Received: from client.test by relay.test; Tue, 1 Dec 2026 02:44:15 +0000\r\n\
         From: {from}\r\nTo: b@remote.test\r\nSubject: hello\r\n\
         Date: Tue, 1 Dec 2026 02:44:15 +0000\r\nMessage-ID: <1@client.test>\r\n\r\n{body}"
    )
    .into_bytes()
}

/// The value of tag `name` in a DKIM-Signature field, unfolded and without spaces.
fn tag(header: &[u8], name: &str) -> String {
    let text: String = String::from_utf8_lossy(header)
        .split_once(':')
        .unwrap()
        .1
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    text.split(';')
        .find_map(|t| t.strip_prefix(&format!("{name}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {name}= in {text}"))
}

/// Signers with an RSA key for `example.org` (selector `r`) and an Ed25519 key for
/// `ed_domain` (selector `e`), their files in `dir`.
fn rsa_and_ed25519(dir: &Path, ed_domain: &str) -> Signers {
    let rsa = new_key_file(dir, "rsa.pem", KeyKind::Rsa);
    let ed = new_key_file(dir, "ed.pem", KeyKind::Ed25519);
    Signers::from_keys(&[entry("example.org", "r", &rsa), entry(ed_domain, "e", &ed)]).unwrap()
}

#[test]
fn unusable_keys_are_errors_that_name_the_file_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let short = rsa_key(1024);
    let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let cases: Vec<(PathBuf, &str)> = vec![
        (d.join("missing.pem"), "cannot read it"),
        (file(d, "text.pem", "hello\n"), "no private key in it"),
        (
            file(d, "short.pem", &short.to_pkcs1_pem(LineEnding::LF).unwrap()),
            "an RSA key of 1024 bits: at least 2048 are needed",
        ),
        (
            file(
                d,
                "short8.pem",
                &short.to_pkcs8_pem(LineEnding::LF).unwrap(),
            ),
            "an RSA key of 1024 bits",
        ),
        (file(d, "ec.pem", &ec), "RSA or Ed25519 keys only"),
        (
            file(
                d,
                "broken.pem",
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ),
            "not a valid PKCS#8 private key",
        ),
    ];
    for (path, why) in cases {
        let err = Signers::from_keys(&[entry("example.org", "s1", &path)]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "server_smtp_dkim_keys: private_key {} (domain example.org, selector s1): ",
                path.display()
            )),
            "{text}"
        );
        assert!(text.contains(why), "{text} should say {why:?}");
    }
    let good = new_key_file(d, "good.pem", KeyKind::Ed25519);
    let err = Signers::from_keys(&[entry("example.org", "bad selector", &good)]).unwrap_err();
    assert!(err.to_string().contains("is not a DNS label"), "{err}");
    // One bad key among good ones fails the whole set.
    let err = Signers::from_keys(&[
        entry("example.org", "s1", &good),
        entry("example.net", "s1", &d.join("missing.pem")),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[test]
fn rsa_pkcs1_and_pkcs8_and_ed25519_keys_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rsa = rsa_key(2048);
    let pkcs1 = file(d, "pkcs1.pem", &rsa.to_pkcs1_pem(LineEnding::LF).unwrap());
    let pkcs8 = file(d, "pkcs8.pem", &rsa.to_pkcs8_pem(LineEnding::CRLF).unwrap());
    let ed = new_key_file(d, "ed.pem", KeyKind::Ed25519);
    let signers = Signers::from_keys(&[
        entry("a.test", "one", &pkcs1),
        entry("b.test", "two", &pkcs8),
        entry("c.test", "three", &ed),
    ])
    .unwrap();
    assert_eq!(
        signers.key_names(),
        vec![
            "one._domainkey.a.test",
            "three._domainkey.c.test",
            "two._domainkey.b.test"
        ]
    );
    for (domain, algorithm) in [
        ("a.test", "rsa-sha256"),
        ("b.test", "rsa-sha256"),
        ("c.test", "ed25519-sha256"),
    ] {
        let signed = signers
            .signature(&message(&format!("x@{domain}"), "hi\r\n"))
            .unwrap();
        assert_eq!(signed.signatures[0].algorithm, algorithm);
        assert_eq!(tag(&signed.headers, "a"), algorithm);
        assert_eq!(tag(&signed.headers, "c"), "relaxed/relaxed");
    }
    // The key material never reaches a log through Debug.
    let debug = format!("{signers:?}");
    assert!(!debug.contains("PRIVATE") && debug.contains("one._domainkey.a.test"));
}

#[test]
fn the_from_domain_or_its_nearest_parent_with_a_key_signs() {
    let dir = tempfile::tempdir().unwrap();
    let signers = rsa_and_ed25519(dir.path(), "mail.example.org");
    for (from, expect) in [
        ("a@example.org", Some(("example.org", "r"))),
        ("\"A B\" <a@EXAMPLE.Org.>", Some(("example.org", "r"))),
        ("a@mail.example.org", Some(("mail.example.org", "e"))),
        ("a@x.y.mail.example.org", Some(("mail.example.org", "e"))),
        ("a@news.example.org", Some(("example.org", "r"))),
        // Parents by whole labels only, never by suffix.
        ("a@notexample.org", None),
        ("a@org", None),
        ("a@example.org.evil.test", None),
        ("no-domain", None),
    ] {
        let m = message(from, "hi\r\n");
        let signed = signers.signature(&m);
        let got = signed.as_ref().map(|s| {
            (
                s.signatures[0].domain.as_str(),
                s.signatures[0].selector.as_str(),
            )
        });
        assert_eq!(got, expect, "From: {from}");
        if let Some(s) = &signed {
            assert_eq!(tag(&s.headers, "d"), expect.unwrap().0);
            assert_eq!(tag(&s.headers, "s"), expect.unwrap().1);
            assert_eq!(signers.signing_domain(&m), Some(expect.unwrap().0));
        }
    }
}

#[test]
fn without_a_from_domain_nothing_is_signed() {
    let dir = tempfile::tempdir().unwrap();
    let ed = new_key_file(dir.path(), "ed.pem", KeyKind::Ed25519);
    let signers = Signers::from_keys(&[entry("example.org", "e", &ed)]).unwrap();
    let mut no_from =
        b"To: b@example.org\r\nSender: a@example.org\r\nSubject: x\r\n\r\nhi\r\n".to_vec();
    let before = no_from.clone();
    assert!(signers.sign(&mut no_from).is_none());
    assert_eq!(no_from, before, "left untouched");
    let mut other = message("a@other.test", "h\u{e9}llo\r\n");
    let before = other.clone();
    assert!(signers.sign(&mut other).is_none());
    assert_eq!(other, before, "no key: not even converted to 7-bit");
    assert!(Signers::default().is_empty());
    assert!(Signers::default()
        .signature(&message("a@example.org", "hi\r\n"))
        .is_none());
}

#[test]
fn the_header_list_has_the_present_fields_and_from_once_more() {
    let dir = tempfile::tempdir().unwrap();
    let ed = new_key_file(dir.path(), "ed.pem", KeyKind::Ed25519);
    let signers = Signers::from_keys(&[entry("example.org", "e", &ed)]).unwrap();
    let m = message("a@example.org", "hi\r\n");
    let signed = signers.signature(&m).unwrap();
    let h: Vec<String> = tag(&signed.headers, "h")
        .split(':')
        .map(str::to_ascii_lowercase)
        .collect();
    assert_eq!(h.iter().filter(|x| *x == "from").count(), 2, "{h:?}");
    for name in ["to", "subject", "date", "message-id"] {
        assert_eq!(h.iter().filter(|x| *x == name).count(), 1, "{name}: {h:?}");
    }
    // Absent fields are not signed (a list may add them); Received never is.
    for name in ["received", "cc", "reply-to", "sender", "mime-version"] {
        assert!(!h.contains(&name.to_string()), "{name}: {h:?}");
    }
    // Each instance of a repeated field is signed, From still once more than present.
    let two =
        b"From: a@example.org\r\nFrom: b@example.org\r\nCc: x@y.test\r\nCc: z@y.test\r\n\r\nhi\r\n";
    let h = tag(&signers.signature(two).unwrap().headers, "h").to_ascii_lowercase();
    assert_eq!(h.matches("from").count(), 3, "{h}");
    assert_eq!(h.matches("cc").count(), 2, "{h}");
    // The field is folded, CRLF-terminated, and goes on top of the message.
    let text = String::from_utf8(signed.headers.clone()).unwrap();
    assert!(
        text.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; "),
        "{text}"
    );
    assert!(text.ends_with(";\r\n"), "{text}");
    assert!(text.lines().all(|l| l.len() <= 78), "{text}");
    let mut relayed = m.clone();
    let signed = signers.sign(&mut relayed).unwrap();
    assert!(!signed.converted);
    assert_eq!(&relayed[..signed.headers.len()], &signed.headers[..]);
    assert_eq!(&relayed[signed.headers.len()..], &m[..]);
}

#[test]
fn an_eight_bit_body_is_made_seven_bit_before_it_is_signed() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = new_key_file(dir.path(), "rsa.pem", KeyKind::Rsa);
    let signers = Signers::from_keys(&[entry("example.org", "r", &rsa)]).unwrap();
    let mut m = b"From: a@example.org\r\nTo: b@remote.test\r\nSubject: x\r\n\
                  MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
                  Content-Transfer-Encoding: 8bit\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\r\n"
        .to_vec();
    let signed = signers.sign(&mut m).unwrap();
    assert!(signed.converted);
    assert!(
        !seven_bit::has_eight_bit(&m),
        "{}",
        String::from_utf8_lossy(&m)
    );
    let text = String::from_utf8_lossy(&m).into_owned();
    assert!(
        text.contains("Content-Transfer-Encoding: quoted-printable"),
        "{text}"
    );
    assert!(text.contains("d=C3=A9j=C3=A0 vu"), "{text}");
    // What the sender would do for a 7-bit hop now changes nothing.
    assert_eq!(seven_bit::to_seven_bit(&m), Ok(None));
    // The converted header is signed.
    let h = tag(&signed.headers, "h").to_ascii_lowercase();
    assert!(h.contains("content-transfer-encoding"), "{h}");

    // A body that cannot be converted (raw 8-bit in a base64 part) is signed as it is.
    let mut bad = b"From: a@example.org\r\nMIME-Version: 1.0\r\n\
                    Content-Transfer-Encoding: base64\r\n\r\n\xff\xfe\r\n"
        .to_vec();
    let original = bad.clone();
    let signed = signers.sign(&mut bad).unwrap();
    assert!(!signed.converted);
    assert_eq!(&bad[signed.headers.len()..], &original[..]);
}

#[test]
fn two_keys_of_one_domain_give_two_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let signers = rsa_and_ed25519(dir.path(), "example.org");
    let signed = signers
        .signature(&message("a@example.org", "hi\r\n"))
        .unwrap();
    let algorithms: Vec<_> = signed.signatures.iter().map(|s| s.algorithm).collect();
    assert_eq!(algorithms, ["rsa-sha256", "ed25519-sha256"]);
    let text = String::from_utf8(signed.headers).unwrap();
    assert_eq!(text.matches("DKIM-Signature:").count(), 2, "{text}");
}

#[test]
fn keygen_makes_loadable_keys_and_their_records() {
    use base64ct::Encoding;
    let dir = tempfile::tempdir().unwrap();
    let rsa = generate(KeyKind::Rsa, "Example.ORG.", "sel-1").unwrap();
    assert_eq!(rsa.record_name, "sel-1._domainkey.example.org");
    let p = rsa.record.strip_prefix("v=DKIM1; k=rsa; p=").unwrap();
    // The published key is the private key's public half (SubjectPublicKeyInfo).
    let private = RsaPrivateKey::from_pkcs8_pem(&rsa.pem).unwrap();
    assert_eq!(private.n().bits(), KEYGEN_RSA_BITS);
    let public = <rsa::RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(
        &base64ct::Base64::decode_vec(p).unwrap(),
    )
    .unwrap();
    assert_eq!(public, private.to_public_key());
    // Zone-file form: strings of at most 255 octets that join back into the record.
    let zone = rsa.zone_line();
    assert!(
        zone.starts_with("sel-1._domainkey.example.org. IN TXT ( \""),
        "{zone}"
    );
    let strings: Vec<&str> = zone.split('"').skip(1).step_by(2).collect();
    assert!(
        strings.len() >= 2 && strings.iter().all(|s| s.len() <= 255),
        "{zone}"
    );
    assert_eq!(strings.concat(), rsa.record);

    let ed = generate(KeyKind::Ed25519, "example.org", "e").unwrap();
    let p = ed.record.strip_prefix("v=DKIM1; k=ed25519; p=").unwrap();
    assert_eq!(base64ct::Base64::decode_vec(p).unwrap().len(), 32);
    assert!(!ed.zone_line().contains("\" \""), "one string");

    // Both load as configured keys.
    let rsa_file = dir.path().join("rsa.pem");
    let ed_file = dir.path().join("ed.pem");
    write_private_key(&rsa_file, &rsa.pem).unwrap();
    write_private_key(&ed_file, &ed.pem).unwrap();
    Signers::from_keys(&[
        entry("example.org", "sel-1", &rsa_file),
        entry("example.org", "e", &ed_file),
    ])
    .unwrap();

    assert!(generate(KeyKind::Rsa, "bad domain", "s").is_err());
    assert!(generate(KeyKind::Ed25519, "example.org", "a/b").is_err());
}

#[test]
fn a_private_key_file_is_0600_and_never_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    write_private_key(&path, "first").unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let err = write_private_key(&path, "second").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
}

#[test]
fn signers_are_built_once_per_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let ed = new_key_file(dir.path(), "ed.pem", KeyKind::Ed25519);
    let config = Arc::new(Config {
        server_smtp_dkim_keys: vec![entry("example.org", "e", &ed)],
        ..Config::default()
    });
    let first = signers_for(&config).unwrap();
    // Cached: the file is not read again for the same configuration...
    std::fs::remove_file(&ed).unwrap();
    assert!(Arc::ptr_eq(&first, &signers_for(&config).unwrap()));
    // ...but a reloaded configuration (a new Arc) reads it.
    let reloaded = Arc::new((*config).clone());
    let err = signers_for(&reloaded).unwrap_err();
    assert!(
        err.contains("ed.pem") && err.contains("cannot read it"),
        "{err}"
    );
    // The running configuration keeps its keys.
    assert!(Arc::ptr_eq(&first, &signers_for(&config).unwrap()));
    // Keys built by the caller (main, before start or reload) are the ones used.
    let other = Arc::new((*config).clone());
    let given = cache_for(&other, Signers::default());
    assert!(Arc::ptr_eq(&given, &signers_for(&other).unwrap()));
    assert!(signers_for(&other).unwrap().is_empty());
}
