//! DKIM signing of relayed mail (RFC 6376, RFC 8463): the keys of `server_smtp_dkim_keys`
//! read and checked, the key that applies to a message chosen, the `DKIM-Signature:`
//! header computed, and `erlmail dkim keygen`'s new keys with the DNS record to publish.
//!
//! Keys are PEM files: RSA (PKCS#1 or PKCS#8, at least [`MIN_RSA_BITS`] bits, RFC 8301)
//! or Ed25519 (PKCS#8). A key that cannot be used is an error naming its file, so `serve`
//! refuses to start and a `SIGHUP` reload is refused (the running keys stay). [`Signers`]
//! holds every key of one configuration and is built once per configuration `Arc`
//! ([`signers_for`], [`cache_for`]), so the sessions never read a key file. mail-auth
//! canonicalizes and hashes; the RSA operation is ring's, Ed25519 is mail-auth's.
//!
//! This module computes; it holds no socket and keeps no state but the cache. The session
//! actor decides which messages to sign (relayed ones) and puts the header on top.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mail_auth::common::crypto::{Algorithm, CryptoError, Ed25519Key, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::der::zeroize::Zeroizing;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use crate::config::{Config, DkimKeyConfig, PerConfig};
use crate::outbound::seven_bit;

/// The header fields a signature covers when the message has them, all their instances
/// (`From` is always there and is listed once more than it occurs, so that no second
/// `From:` can be added). Absent ones are not signed, so a list or a forwarder may still
/// add `Reply-To:` or `Sender:`.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
];

/// The smallest RSA key accepted (RFC 8301: signers must use at least 1024 bits and
/// should use 2048; receivers increasingly ignore shorter ones).
pub const MIN_RSA_BITS: usize = 2048;

/// The size of the RSA keys `erlmail dkim keygen` makes.
pub const KEYGEN_RSA_BITS: usize = 2048;

/// The PKCS#8 algorithm of Ed25519 keys (RFC 8410).
const ED25519_OID: rsa::pkcs8::ObjectIdentifier =
    rsa::pkcs8::ObjectIdentifier::new_unwrap("1.3.101.112");

/// A key of `server_smtp_dkim_keys` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("server_smtp_dkim_keys: private_key {} (domain {domain}, selector {selector}): {reason}", path.display())]
pub struct KeyError {
    /// The key file.
    pub path: PathBuf,
    /// The signing domain it is configured for.
    pub domain: String,
    /// Its selector.
    pub selector: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// One usable key: a signing key and the name it is published under.
struct Key {
    domain: String,
    selector: String,
    key: Arc<PrivateKey>,
}

/// A private key as mail-auth's signer uses it. RSA signs with ring rather than with
/// mail-auth's own pure-Rust RSA (the `rust-crypto` backend): the private-key operation
/// is nearly all of what signing costs, and ring's is several times faster. mail-auth
/// still canonicalizes and hashes.
enum PrivateKey {
    Rsa(RingRsa),
    Ed25519(Ed25519Key),
}

/// An RSA key pair for `rsa-sha256` (RSASSA-PKCS1-v1_5 with SHA-256, RFC 6376 §3.3.1).
struct RingRsa {
    pair: ring::rsa::KeyPair,
    rng: ring::rand::SystemRandom,
}

impl SigningKey for PrivateKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match self {
            PrivateKey::Rsa(k) => {
                // The canonical header fields and the signature field: a few hundred
                // octets, which ring hashes itself.
                let mut data = Vec::with_capacity(1024);
                input.write(&mut data);
                let mut signature = vec![0; k.pair.public().modulus_len()];
                k.pair
                    .sign(
                        &ring::signature::RSA_PKCS1_SHA256,
                        &k.rng,
                        &data,
                        &mut signature,
                    )
                    .map_err(|_| {
                        mail_auth::Error::Crypto(CryptoError::Library("RSA signing failed".into()))
                    })?;
                Ok(signature)
            }
            PrivateKey::Ed25519(k) => k.sign(input),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            PrivateKey::Rsa(_) => Algorithm::RsaSha256,
            PrivateKey::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }
}

/// A shared [`PrivateKey`], so that a signer can be built per message (its header list
/// depends on the message) without copying the key.
struct SharedKey(Arc<PrivateKey>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

/// The `a=` name of an algorithm (also the metric label).
fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

/// One signature put on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInfo {
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// `a=`: `rsa-sha256` or `ed25519-sha256`.
    pub algorithm: &'static str,
}

/// What signing a message produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The `DKIM-Signature:` fields to put above the message, each folded and ending in
    /// CRLF.
    pub headers: Vec<u8>,
    /// Each signature, in the order of `headers`.
    pub signatures: Vec<SignatureInfo>,
    /// The body was converted to 7-bit MIME before signing.
    pub converted: bool,
}

/// Every signing key of one configuration, by signing domain.
#[derive(Default)]
pub struct Signers {
    by_domain: HashMap<String, Vec<Key>>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key material stays out of any log.
        f.debug_struct("Signers")
            .field("keys", &self.key_names())
            .finish()
    }
}

impl Signers {
    /// Reads and checks every key of `server_smtp_dkim_keys`; the first unusable one is
    /// the error.
    pub fn load(config: &Config) -> Result<Signers, KeyError> {
        Self::from_keys(&config.server_smtp_dkim_keys)
    }

    /// [`Signers::load`] from the key list alone.
    pub fn from_keys(keys: &[DkimKeyConfig]) -> Result<Signers, KeyError> {
        let mut by_domain: HashMap<String, Vec<Key>> = HashMap::new();
        for k in keys {
            let key = load_key(k)?;
            by_domain.entry(key.domain.clone()).or_default().push(key);
        }
        Ok(Signers { by_domain })
    }

    /// Where each key's public half is published (`<selector>._domainkey.<domain>`),
    /// sorted: for logs.
    pub fn key_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_domain
            .values()
            .flatten()
            .map(|k| format!("{}._domainkey.{}", k.selector, k.domain))
            .collect();
        names.sort();
        names
    }

    /// No key is configured: nothing is ever signed.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The keys for mail from `domain`: those of the domain itself, else of its nearest
    /// parent domain that has keys; empty when none has. Every key of that domain signs
    /// (an RSA and an Ed25519 key under two selectors give two signatures, as RFC 8463
    /// suggests).
    fn keys_for(&self, domain: &str) -> &[Key] {
        let mut d = domain;
        loop {
            if let Some(keys) = self.by_domain.get(d) {
                return keys;
            }
            match d.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => d = parent,
                _ => return &[],
            }
        }
    }

    /// The signing domain (`d=`) `message` would be signed for, if any.
    pub fn signing_domain(&self, message: &[u8]) -> Option<&str> {
        let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
        self.keys_for(&from_domain(&parsed)?)
            .first()
            .map(|k| k.domain.as_str())
    }

    /// The `DKIM-Signature:` fields for `message` exactly as it is (CRLF line ends), or
    /// `None` when it has no `From:` domain with a key. Relaxed/relaxed, over the headers
    /// `headers_to_sign` lists. See [`Signers::sign`] for the message as relayed.
    pub fn signature(&self, message: &[u8]) -> Option<Signed> {
        let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
        let keys = self.keys_for(&from_domain(&parsed)?);
        if keys.is_empty() {
            return None;
        }
        let headers = headers_to_sign(&parsed);
        let mut out = Signed {
            headers: Vec::new(),
            signatures: Vec::new(),
            converted: false,
        };
        for k in keys {
            let signer = DkimSigner::from_key(SharedKey(k.key.clone()))
                .domain(k.domain.clone())
                .selector(k.selector.clone())
                .headers(headers.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            match signer.sign(message) {
                Ok(signature) => {
                    out.headers
                        .extend_from_slice(signature.to_header().as_bytes());
                    out.signatures.push(SignatureInfo {
                        domain: k.domain.clone(),
                        selector: k.selector.clone(),
                        algorithm: algorithm_name(k.key.algorithm()),
                    });
                }
                Err(e) => tracing::warn!(
                    domain = %k.domain, selector = %k.selector, error = %e,
                    "DKIM signing failed; this signature left out"
                ),
            }
        }
        (!out.signatures.is_empty()).then_some(out)
    }

    /// Signs a message to be relayed: when a key applies, an 8-bit body is first made
    /// 7-bit and the signature fields are put on top of `message`. `None` (and `message`
    /// untouched) when no key applies.
    ///
    /// Why 7-bit first: erlmail converts an 8-bit body to quoted-printable for a next hop
    /// without 8BITMIME (`outbound::seven_bit`), which would break a signature made over
    /// the 8-bit text, so the message is signed as every hop will get it. One that cannot
    /// be converted is signed as it is (it can only go to hops offering 8BITMIME anyway).
    pub fn sign(&self, message: &mut Vec<u8>) -> Option<Signed> {
        self.signing_domain(message)?;
        let mut converted = false;
        if seven_bit::has_eight_bit(message) {
            match seven_bit::to_seven_bit(message) {
                Ok(Some(seven)) => {
                    *message = seven;
                    converted = true;
                }
                // 8-bit octets in header fields only: nothing to convert.
                Ok(None) => {}
                Err(e) => tracing::debug!(
                    error = %e,
                    "8-bit body cannot be made 7-bit; signed as it is"
                ),
            }
        }
        let mut signed = self.signature(message)?;
        signed.converted = converted;
        let mut out = Vec::with_capacity(signed.headers.len() + message.len());
        out.extend_from_slice(&signed.headers);
        out.extend_from_slice(message);
        *message = out;
        Some(signed)
    }
}

/// The domain of the (first) `From:` address, lower case, without a trailing dot.
fn from_domain(parsed: &mail_parser::Message<'_>) -> Option<String> {
    let address = parsed.from()?.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.').to_lowercase();
    (!domain.is_empty()).then_some(domain)
}

/// The `h=` list for `message`: each of [`SIGNED_HEADERS`] it has (mail-auth then signs
/// every instance of a listed name), and `From` once more. mail-auth adds a listed name
/// that the message lacks once to `h=` (signing its absence), which is exactly the one
/// extra `From`.
fn headers_to_sign(parsed: &mail_parser::Message<'_>) -> Vec<&'static str> {
    let mut present = vec![false; SIGNED_HEADERS.len()];
    for h in parsed.headers() {
        let name = h.name();
        if let Some(i) = SIGNED_HEADERS
            .iter()
            .position(|s| s.eq_ignore_ascii_case(name))
        {
            present[i] = true;
        }
    }
    let mut list: Vec<&'static str> = SIGNED_HEADERS
        .iter()
        .zip(&present)
        .filter(|(_, p)| **p)
        .map(|(s, _)| *s)
        .collect();
    list.push("From");
    list
}

/// Reads one configured key.
fn load_key(k: &DkimKeyConfig) -> Result<Key, KeyError> {
    let fail = |reason: String| KeyError {
        path: k.private_key.clone(),
        domain: k.domain.clone(),
        selector: k.selector.clone(),
        reason,
    };
    if !is_dns_name(&k.domain) {
        return Err(fail(format!("`{}` is not a domain name", k.domain)));
    }
    if !is_dns_name(&k.selector) {
        return Err(fail(format!(
            "selector `{}` is not a DNS label (letters, digits, `-`, `.`)",
            k.selector
        )));
    }
    let pem = std::fs::read(&k.private_key).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let key = parse_private_key(&pem).map_err(fail)?;
    Ok(Key {
        domain: k.domain.clone(),
        selector: k.selector.clone(),
        key: Arc::new(key),
    })
}

/// A signing key from PEM text; the error says why not (never quoting the key).
fn parse_private_key(pem: &[u8]) -> Result<PrivateKey, String> {
    use rustls::pki_types::pem::Error as PemError;
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        PemError::NoItemsFound => "no private key in it (expected a PEM `PRIVATE KEY` or \
                                   `RSA PRIVATE KEY` block, not encrypted)"
            .to_string(),
        e => format!("not a PEM private key: {e}"),
    })?;
    match der {
        PrivateKeyDer::Pkcs1(der) => {
            let rsa = RsaPrivateKey::from_pkcs1_der(der.secret_pkcs1_der())
                .map_err(|e| format!("not a valid RSA private key: {e}"))?;
            check_rsa(&rsa)?;
            ring_rsa(ring::rsa::KeyPair::from_der(der.secret_pkcs1_der()))
        }
        PrivateKeyDer::Pkcs8(der) => {
            let bytes = der.secret_pkcs8_der();
            let info = rsa::pkcs8::PrivateKeyInfo::try_from(bytes)
                .map_err(|e| format!("not a valid PKCS#8 private key: {e}"))?;
            if info.algorithm.oid == rsa::pkcs1::ALGORITHM_OID {
                let rsa = RsaPrivateKey::from_pkcs8_der(bytes)
                    .map_err(|e| format!("not a valid RSA private key: {e}"))?;
                check_rsa(&rsa)?;
                ring_rsa(ring::rsa::KeyPair::from_pkcs8(bytes))
            } else if info.algorithm.oid == ED25519_OID {
                let key = Ed25519Key::from_pkcs8_der(bytes)
                    .map_err(|e| format!("not a valid Ed25519 private key: {e}"))?;
                Ok(PrivateKey::Ed25519(key))
            } else {
                Err(format!(
                    "a key of algorithm {}: DKIM signs with RSA or Ed25519 keys only",
                    info.algorithm.oid
                ))
            }
        }
        PrivateKeyDer::Sec1(_) => {
            Err("an EC key: DKIM signs with RSA or Ed25519 keys only".to_string())
        }
        _ => Err("an unsupported kind of private key".to_string()),
    }
}

/// The RSA key ring made of a key the `rsa` crate has already read and checked.
fn ring_rsa(
    pair: Result<ring::rsa::KeyPair, ring::error::KeyRejected>,
) -> Result<PrivateKey, String> {
    let pair = pair.map_err(|e| format!("RSA key refused: {e}"))?;
    Ok(PrivateKey::Rsa(RingRsa {
        pair,
        rng: ring::rand::SystemRandom::new(),
    }))
}

/// RSA keys below [`MIN_RSA_BITS`] are refused.
fn check_rsa(key: &RsaPrivateKey) -> Result<(), String> {
    let bits = key.n().bits();
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "an RSA key of {bits} bits: at least {MIN_RSA_BITS} are needed"
        ));
    }
    Ok(())
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1 to 63 octets.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The [`Signers`] of each live configuration. Several may be live at once: sessions of
/// the configuration before a reload finish with its keys.
static CACHE: PerConfig<Result<Arc<Signers>, String>> = PerConfig::new();

/// Remembers `signers` (built by the caller from `config`'s keys, e.g. to refuse a bad
/// key before starting or reloading) as those of `config`, and returns them shared.
pub fn cache_for(config: &Arc<Config>, signers: Signers) -> Arc<Signers> {
    let signers = Arc::new(signers);
    CACHE.insert(config, Ok(signers.clone()));
    signers
}

/// The signers of `config`: those given to [`cache_for`], else built from its keys now
/// (once per configuration `Arc`); the error, as text, when a key is unusable.
pub fn signers_for(config: &Arc<Config>) -> Result<Arc<Signers>, String> {
    CACHE.get_or_build(config, || {
        Signers::load(config)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
}

/// The kind of key `erlmail dkim keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA, [`KEYGEN_RSA_BITS`] bits, `rsa-sha256` (every verifier knows it).
    Rsa,
    /// Ed25519, `ed25519-sha256` (RFC 8463; short, but not every verifier knows it).
    Ed25519,
}

/// A new key pair and its DNS record.
pub struct NewKey {
    /// The private key as PKCS#8 PEM.
    pub pem: Zeroizing<String>,
    /// Where the record goes: `<selector>._domainkey.<domain>`.
    pub record_name: String,
    /// The TXT record's text: `v=DKIM1; k=rsa; p=...`.
    pub record: String,
}

impl NewKey {
    /// The record in zone-file form, its text cut into strings of at most 255 octets
    /// (RFC 1035 character-strings; DNS joins them back, RFC 6376 §3.6.2.2).
    pub fn zone_line(&self) -> String {
        let strings: Vec<String> = self
            .record
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!(
            "{}. IN TXT ( {} )",
            self.record_name,
            strings.join("\n        ")
        )
    }
}

/// Why no key was made.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// The domain or selector is not a DNS name.
    #[error("{0}")]
    Name(String),
    /// The cryptography library failed.
    #[error("generating the key: {0}")]
    Crypto(String),
}

/// Makes a key pair for `selector._domainkey.domain`.
pub fn generate(kind: KeyKind, domain: &str, selector: &str) -> Result<NewKey, KeygenError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if !is_dns_name(&domain) {
        return Err(KeygenError::Name(format!(
            "`{domain}` is not a domain name"
        )));
    }
    if !is_dns_name(selector) {
        return Err(KeygenError::Name(format!(
            "selector `{selector}` is not a DNS label (letters, digits, `-`, `.`)"
        )));
    }
    let crypto = |e: &dyn std::fmt::Display| KeygenError::Crypto(e.to_string());
    let (pem, k, public) = match kind {
        KeyKind::Rsa => {
            let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, KEYGEN_RSA_BITS)
                .map_err(|e| crypto(&e))?;
            let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| crypto(&e))?;
            // SubjectPublicKeyInfo, as OpenSSL and every published DKIM key have it.
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| crypto(&e))?
                .into_vec();
            (pem, "rsa", public)
        }
        KeyKind::Ed25519 => {
            let der = Zeroizing::new(Ed25519Key::generate_pkcs8().map_err(|e| crypto(&e))?);
            let key = Ed25519Key::from_pkcs8_der(&der).map_err(|e| crypto(&e))?;
            let pem = rsa::pkcs8::der::pem::encode_string("PRIVATE KEY", LineEnding::LF, &der)
                .map_err(|e| crypto(&e))?;
            // RFC 8463 §4.2: the bare 32-octet public key.
            (Zeroizing::new(pem), "ed25519", key.public_key())
        }
    };
    use base64ct::Encoding;
    Ok(NewKey {
        pem,
        record_name: format!("{selector}._domainkey.{domain}"),
        record: format!(
            "v=DKIM1; k={k}; p={}",
            base64ct::Base64::encode_string(&public)
        ),
    })
}

/// Writes a new private key to `path`, created with mode 0600; an existing file is
/// never replaced.
pub fn write_private_key(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests;
