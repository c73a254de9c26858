//! SMTP AUTH (RFC 4954) grammar: base64 and the PLAIN and LOGIN mechanisms (RFC 4616,
//! draft-murchison-sasl-login).
//!
//! Pure decoding and encoding only. Credentials pass through here, so nothing in this
//! module logs, and [`Secret`] keeps a password out of every `Debug` output: a value
//! printed by `{:?}` (in a log line, a panic or an assertion) shows `<redacted>`.

use std::fmt;

/// A credential that must never be printed: `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    /// The secret text, for the one place that checks it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The SASL mechanisms offered after TLS, in the `250-AUTH` line's order.
pub const MECHANISMS: &str = "PLAIN LOGIN";

/// The LOGIN mechanism's prompts, base64 of `Username:` and `Password:`.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// See [`LOGIN_USERNAME_PROMPT`].
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64; `None` when the text is not canonical base64 (wrong length,
/// a character outside the alphabet, padding in the middle).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| ALPHABET.iter().position(|a| *a == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

/// The client's answer to a `334` challenge: `*` cancels (RFC 4954 §4).
pub fn is_cancel(line: &[u8]) -> bool {
    line == b"*"
}

/// Decodes a PLAIN response (`authzid NUL authcid NUL passwd`, base64) into the user
/// (authcid) and password. An authzid other than empty or the user itself is refused:
/// erlmail does not let one user act as another.
pub fn decode_plain(response: &str) -> Option<(String, Secret)> {
    let raw = base64_decode(response)?;
    let mut parts = raw.split(|b| *b == 0);
    let (authzid, user, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || user.is_empty() || (!authzid.is_empty() && authzid != user) {
        return None;
    }
    let user = String::from_utf8(user.to_vec()).ok()?;
    let password = String::from_utf8(password.to_vec()).ok()?;
    Some((user, Secret(password)))
}

/// Decodes one base64 LOGIN answer (the user name or the password) as UTF-8 text.
pub fn decode_text(response: &str) -> Option<String> {
    String::from_utf8(base64_decode(response)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
            ("Username:", LOGIN_USERNAME_PROMPT),
            ("Password:", LOGIN_PASSWORD_PROMPT),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn base64_refuses_malformed() {
        for bad in ["Zg=", "Zg=a", "Z===", "Zm9v!A==", "Zg==Zg==", "a"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn plain_decoding() {
        let enc = |s: &[u8]| base64_encode(s);
        assert_eq!(
            decode_plain(&enc(b"\0alice@local.example\0s3cret")),
            Some(("alice@local.example".into(), Secret("s3cret".into())))
        );
        assert_eq!(
            decode_plain(&enc(b"alice@x\0alice@x\0pw")),
            Some(("alice@x".into(), Secret("pw".into())))
        );
        assert_eq!(decode_plain(&enc(b"bob@x\0alice@x\0pw")), None);
        assert_eq!(decode_plain(&enc(b"\0\0pw")), None);
        assert_eq!(decode_plain(&enc(b"alice@x\0pw")), None);
        assert_eq!(decode_plain(&enc(b"\0a\0b\0c")), None);
        assert_eq!(decode_plain("not base64"), None);
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2");
    }
}
