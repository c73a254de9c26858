//! Downgrade of 8-bit message text to 7-bit MIME for next hops that do not offer
//! 8BITMIME (RFC 6152). Like Postfix's smtp client we convert rather than bounce: every
//! MIME leaf part whose body holds octets >= 0x80 is re-encoded as quoted-printable
//! (RFC 2045 §6.7). Only what cannot be encoded is refused ([`Unconvertible`]). Pure.

use std::fmt;

/// How many nested multipart/message levels are converted at most.
const MAX_DEPTH: usize = 20;

/// Whether `message` (headers and body, CRLF line ends) holds any octet >= 0x80.
pub fn has_eight_bit(message: &[u8]) -> bool {
    // `is_ascii` looks at a word at a time; a byte loop was 8% of the relay's CPU at
    // 100 KiB per message.
    !message.is_ascii()
}

/// Why a message cannot be made 7-bit. In each case some part's body holds
/// 8-bit octets that no MIME re-encoding can legally carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unconvertible {
    /// A leaf part declares quoted-printable or base64 yet holds raw 8-bit
    /// octets: it is already corrupt, and encoding it again would change it.
    EncodedEightBit,
    /// A multipart/* or message/rfc822 part declares an encoding other than
    /// 7bit, 8bit or binary (forbidden by RFC 2045 §6.4) and holds 8-bit.
    CompositeEncoded,
    /// A message/* part that must be 7-bit and cannot be encoded
    /// (message/partial, message/external-body, message/delivery-status, ...)
    /// holds 8-bit octets.
    OpaqueMessage,
    /// 8-bit octets inside multipart/message parts nested more than 20 deep.
    TooDeep,
}

impl fmt::Display for Unconvertible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EncodedEightBit => "8-bit octets in a quoted-printable or base64 part",
            Self::CompositeEncoded => "8-bit octets in an encoded multipart or message part",
            Self::OpaqueMessage => "8-bit octets in a message part that must be 7-bit",
            Self::TooDeep => "8-bit octets in MIME parts nested too deeply",
        })
    }
}

impl std::error::Error for Unconvertible {}

/// The message with every 8-bit leaf part re-encoded as quoted-printable and
/// its Content-Transfer-Encoding header set to match;
/// `Ok(None)` when there is nothing to convert (no 8-bit octet anywhere in the
/// body). The result may still hold 8-bit octets in header fields (also those
/// of enclosed messages and parts) and in multipart preambles and epilogues.
///
/// multipart/* and message/rfc822 are recursed into, never encoded themselves
/// (RFC 2045 §6.4), and relabelled `7bit` when they said `8bit`/`binary` and now
/// hold only 7-bit data. Header lines are copied unchanged (8-bit octets in them
/// stay: the caller decides), except for the Content-Transfer-Encoding field
/// replaced or added and a `MIME-Version: 1.0` added to a (top-level or
/// enclosed) message that lacks one once its body was converted. Output lines
/// end in CRLF (bare LF input lines are normalised); a part without 8-bit octets
/// is otherwise copied byte for byte. Preamble and epilogue of a multipart are
/// copied as they are, even if they hold 8-bit octets: MIME has no way to encode
/// them. message/global (RFC 6532) and its relatives are leaves, since they may
/// be quoted-printable encoded. 8-bit octets below more than 20 nested composite
/// levels are refused, which bounds recursion; the work is linear in the size of
/// the message times that depth.
pub fn to_seven_bit(message: &[u8]) -> Result<Option<Vec<u8>>, Unconvertible> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 4 + 64);
    let converted = entity(message, 0, false, true, &mut out)?;
    Ok(converted.then_some(out))
}

/// The header section of `message`: its fields up to (not including) the blank line.
pub fn header_section(message: &[u8]) -> &[u8] {
    let (fields, _) = parse_head(message);
    &message[..fields.last().map_or(0, |f| f.end)]
}

/// The line of `s` at `pos`: its content (without CR LF or LF), where the
/// next line starts, and whether it ended with LF.
fn line(s: &[u8], pos: usize) -> (&[u8], usize, bool) {
    let rest = &s[pos..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (
            rest[..i].strip_suffix(b"\r").unwrap_or(&rest[..i]),
            pos + i + 1,
            true,
        ),
        None => (rest, s.len(), false),
    }
}

/// Appends the lines of `s`, each line end written as CRLF.
fn copy(s: &[u8], out: &mut Vec<u8>) {
    let mut pos = 0;
    while pos < s.len() {
        let (c, next, eol) = line(s, pos);
        out.extend_from_slice(c);
        if eol {
            out.extend_from_slice(b"\r\n");
        }
        pos = next;
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let ws = |b: &u8| !b.is_ascii_whitespace();
    let s = v.iter().position(ws).unwrap_or(v.len());
    &v[s..v.iter().rposition(ws).map_or(s, |i| i + 1)]
}

/// A header field: its lowercase name and its raw lines `s[start..end]`.
struct Field {
    name: Vec<u8>,
    start: usize,
    end: usize,
}

/// Splits entity `s` into header fields and the offset where its body starts
/// (after the blank line, or at the first line that is no header field).
fn parse_head(s: &[u8]) -> (Vec<Field>, usize) {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = 0;
    while pos < s.len() {
        let (c, next, _) = line(s, pos);
        if c.is_empty() {
            return (fields, next);
        } else if c[0] == b' ' || c[0] == b'\t' {
            match fields.last_mut() {
                Some(f) => f.end = next,
                None => return (fields, pos),
            }
        } else {
            let name = trim(&c[..c.iter().position(|&b| b == b':').unwrap_or(0)]);
            if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
                return (fields, pos);
            }
            let name = name.to_ascii_lowercase();
            fields.push(Field {
                name,
                start: pos,
                end: next,
            });
        }
        pos = next;
    }
    (fields, s.len())
}

/// The unfolded value of a field, with comments turned into spaces.
fn value(raw: &[u8]) -> Vec<u8> {
    let mut raw = raw.to_vec();
    raw.retain(|&b| b != b'\r' && b != b'\n');
    let colon = raw
        .iter()
        .position(|&b| b == b':')
        .map_or(raw.len(), |i| i + 1);
    let (mut out, mut depth, mut quoted, mut escaped) = (Vec::new(), 0usize, false, false);
    for &b in &raw[colon..] {
        if escaped {
            escaped = false;
        } else if b == b'\\' && (quoted || depth > 0) {
            escaped = true;
        } else if b == b'"' && depth == 0 {
            quoted = !quoted;
        } else if b == b'(' && !quoted {
            depth += 1;
            out.push(b' ');
            continue;
        } else if b == b')' && depth > 0 {
            depth -= 1;
            continue;
        }
        if depth == 0 {
            out.push(b);
        }
    }
    out
}

/// The value of parameter `want` in `params` (`;name=value...`), unquoted.
fn param(params: &[u8], want: &[u8]) -> Option<Vec<u8>> {
    let (mut quoted, mut escaped) = (false, false);
    let separator = |&b: &u8| {
        let sep = b == b';' && !quoted;
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = quoted;
        } else if b == b'"' {
            quoted = !quoted;
        }
        sep
    };
    for item in params.split(separator) {
        let Some(eq) = item.iter().position(|&b| b == b'=') else {
            continue;
        };
        if !trim(&item[..eq]).eq_ignore_ascii_case(want) {
            continue;
        }
        let v = trim(&item[eq + 1..]);
        let Some(q) = v.strip_prefix(b"\"") else {
            return Some(v.to_vec());
        };
        let (mut val, mut bytes) = (Vec::new(), q.iter());
        while let Some(&b) = bytes.next() {
            match b {
                b'"' => break,
                b'\\' => val.extend(bytes.next()),
                _ => val.push(b),
            }
        }
        return Some(val);
    }
    None
}

enum Kind {
    Leaf,
    Multipart { boundary: Vec<u8>, digest: bool },
    Message,
    Opaque,
}

/// Classifies an entity by its Content-Type value (`None`: absent).
fn classify(ct: Option<&[u8]>, in_digest: bool) -> Kind {
    let Some(v) = ct else {
        return if in_digest { Kind::Message } else { Kind::Leaf };
    };
    let semi = v.iter().position(|&b| b == b';').unwrap_or(v.len());
    let mut ty = v[..semi].to_ascii_lowercase();
    ty.retain(|b| !b.is_ascii_whitespace());
    let (top, sub) = ty.split_at(ty.iter().position(|&b| b == b'/').unwrap_or(ty.len()));
    let sub = sub.get(1..).unwrap_or_default();
    match top {
        b"multipart" => match param(&v[semi..], b"boundary") {
            Some(boundary) if !boundary.is_empty() => Kind::Multipart {
                boundary,
                digest: sub == b"digest",
            },
            _ => Kind::Leaf,
        },
        b"message" if sub == b"rfc822" || sub == b"news" => Kind::Message,
        b"message" if sub.starts_with(b"global") => Kind::Leaf,
        b"message" => Kind::Opaque,
        _ => Kind::Leaf,
    }
}

/// Converts the entity (header and body) `s` into `out`. Returns whether its
/// body held 8-bit octets (and so was converted).
fn entity(
    s: &[u8], depth: usize, in_digest: bool, is_message: bool, out: &mut Vec<u8>,
) -> Result<bool, Unconvertible> {
    let (fields, body_start) = parse_head(s);
    let src = &s[body_start..];
    if !has_eight_bit(src) {
        copy(s, out);
        return Ok(false);
    }
    let field = |n: &[u8]| {
        fields
            .iter()
            .find(|f| f.name == n)
            .map(|f| value(&s[f.start..f.end]))
    };
    let cte = field(b"content-transfer-encoding").map(|v| trim(&v).to_ascii_lowercase());
    let cte = cte.as_deref();
    let mut body = Vec::with_capacity(src.len() + src.len() / 4);
    let new_cte: Option<&[u8]> = match classify(field(b"content-type").as_deref(), in_digest) {
        Kind::Opaque => return Err(Unconvertible::OpaqueMessage),
        Kind::Leaf if matches!(cte, Some(b"quoted-printable" | b"base64")) => {
            return Err(Unconvertible::EncodedEightBit)
        }
        Kind::Leaf => {
            let mut pos = 0;
            while pos < src.len() {
                let (c, next, eol) = line(src, pos);
                qp_line(c, &mut body);
                body.extend_from_slice(if eol { b"\r\n" } else { b"" });
                pos = next;
            }
            Some(b"quoted-printable")
        }
        _ if depth >= MAX_DEPTH => return Err(Unconvertible::TooDeep),
        _ if !matches!(cte, None | Some(b"7bit" | b"8bit" | b"binary")) => {
            return Err(Unconvertible::CompositeEncoded)
        }
        Kind::Multipart { boundary, digest } => {
            multipart(src, &boundary, digest, depth + 1, &mut body)?;
            (matches!(cte, Some(b"8bit" | b"binary")) && !has_eight_bit(&body)).then_some(b"7bit")
        }
        Kind::Message => {
            entity(src, depth + 1, false, true, &mut body)?;
            (matches!(cte, Some(b"8bit" | b"binary")) && !has_eight_bit(&body)).then_some(b"7bit")
        }
    };
    let cte_line = |v: &[u8]| [b"Content-Transfer-Encoding: ", v, b"\r\n"].concat();
    let mut cte_written = false;
    for f in &fields {
        match new_cte {
            Some(v) if f.name == b"content-transfer-encoding" => {
                if !cte_written {
                    out.extend(cte_line(v));
                }
                cte_written = true;
            }
            _ => copy(&s[f.start..f.end], out),
        }
    }
    if is_message && !fields.iter().any(|f| f.name == b"mime-version") {
        out.extend_from_slice(b"MIME-Version: 1.0\r\n");
    }
    if let (Some(v), false) = (new_cte, cte_written) {
        out.extend(cte_line(v));
    }
    out.extend_from_slice(b"\r\n"); // the blank line, added if the body began without one
    out.extend(body);
    Ok(true)
}

/// Whether `line` delimits parts of `boundary`: `Some(true)` for the close
/// delimiter, `Some(false)` for the others (RFC 2046 §5.1.1).
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    let (close, rest) = rest
        .strip_prefix(b"--")
        .map_or((false, rest), |r| (true, r));
    rest.iter()
        .all(|&b| b == b' ' || b == b'\t')
        .then_some(close)
}

/// Converts the body `s` of a multipart entity part by part.
fn multipart(
    s: &[u8], boundary: &[u8], digest: bool, depth: usize, out: &mut Vec<u8>,
) -> Result<(), Unconvertible> {
    let (mut pos, mut part) = (0, None);
    while pos < s.len() {
        let (c, next, _) = line(s, pos);
        if let Some(close) = delimiter(c, boundary) {
            if let Some(p) = part {
                entity(&s[p..pos], depth, digest, false, out)?;
            }
            if close {
                copy(&s[pos..], out); // the close delimiter and the epilogue
                return Ok(());
            }
            copy(&s[pos..next], out);
            part = Some(next);
        } else if part.is_none() {
            copy(&s[pos..next], out); // preamble
        }
        pos = next;
    }
    if let Some(p) = part {
        entity(&s[p..], depth, digest, false, out)?; // no close delimiter
    }
    Ok(())
}

/// Appends one line of text (without its line end) as quoted-printable:
/// at most 76 characters per output line, soft breaks as `=` CRLF.
fn qp_line(line: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut col = 0;
    for (i, &b) in line.iter().enumerate() {
        let last = i + 1 == line.len();
        let mut encode = match b {
            b' ' | b'\t' => last,
            b'=' => true,
            0x21..=0x7e => false,
            _ => true,
        };
        let width = if encode { 3 } else { 1 };
        if col + width > if last { 76 } else { 75 } {
            out.extend_from_slice(b"=\r\n");
            col = 0;
            // A continuation line must not look like a boundary delimiter.
            encode |= b == b'-';
        }
        if encode {
            out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            col += 3;
        } else {
            out.push(b);
            col += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp_decode(s: &[u8]) -> Vec<u8> {
        let hex = |b: u8| (b as char).to_digit(16).expect("hex digit") as u8;
        let mut out = Vec::new();
        let lines: Vec<&[u8]> = s.split(|&b| b == b'\n').collect();
        for (n, l) in lines.iter().enumerate() {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let (l, soft) = l.strip_suffix(b"=").map_or((l, false), |l| (l, true));
            let mut i = 0;
            while i < l.len() {
                if l[i] == b'=' {
                    out.push(hex(l[i + 1]) << 4 | hex(l[i + 2]));
                    i += 3;
                } else {
                    out.push(l[i]);
                    i += 1;
                }
            }
            if !soft && n + 1 < lines.len() {
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    fn convert(m: &str) -> String {
        let out = to_seven_bit(m.as_bytes()).unwrap().expect("converted");
        String::from_utf8(out).unwrap()
    }

    fn body_of(m: &str) -> &str {
        &m[m.find("\r\n\r\n").unwrap() + 4..]
    }

    #[test]
    fn plain_text_message() {
        let m = "Received: from x\r\nSubject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nX-A: b\r\n\r\nGrüße = 1\r\nline two\r\n";
        let out = convert(m);
        let want = "Received: from x\r\nSubject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\nX-A: b\r\n\r\nGr=C3=BC=C3=9Fe =3D 1\r\nline two\r\n";
        assert_eq!(out, want);
        assert_eq!(qp_decode(body_of(&out).as_bytes()), body_of(m).as_bytes());
    }

    #[test]
    fn no_content_type_gets_mime_headers() {
        let out = convert("Subject: x\r\n\r\ncaf\u{e9}\r\n");
        assert_eq!(out, "Subject: x\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n");
        let out = convert("caf\u{e9}\r\n"); // no header at all, no blank line
        assert_eq!(
            out,
            "MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n"
        );
    }

    const MIXED: &str = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary=\"b 1\" (comment)\r\nContent-Transfer-Encoding: 8bit\r\n\r\npreamble\r\n--b 1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nh\u{e9}\r\n--b 1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nseven bit \r\n--b 1--\r\nepilogue\r\n";

    #[test]
    fn multipart_mixed() {
        let out = convert(MIXED);
        let want = MIXED
            .replace("8bit\r\n\r\npreamble", "7bit\r\n\r\npreamble")
            .replace(
                "utf-8\r\n\r\nh\u{e9}",
                "utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9",
            );
        assert_eq!(out, want);
        assert!(out.contains("Content-Transfer-Encoding: 8bit\r\n\r\nseven bit \r\n--b 1--"));
    }

    #[test]
    fn nested_alternative_in_mixed() {
        let m = "Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n--inner\r\nContent-Type: text/plain\r\n\r\n\u{e4}\r\n--inner\r\nContent-Type: text/html\r\n\r\n<p>\u{f6}</p>\r\n--inner--\r\n--outer\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--outer--\r\n";
        let out = convert(m);
        let want = m
            .replace(
                "Content-Type: multipart/mixed; boundary=outer\r\n",
                "Content-Type: multipart/mixed; boundary=outer\r\nMIME-Version: 1.0\r\n",
            )
            .replace(
                "text/plain\r\n\r\n\u{e4}",
                "text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A4",
            )
            .replace(
                "text/html\r\n\r\n<p>\u{f6}",
                "text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>=C3=B6",
            );
        assert_eq!(out, want);
    }

    #[test]
    fn message_rfc822_attachment() {
        let inner = "Subject: x\r\nMIME-Version: 1.0\r\n\r\nbody \u{fc}\r\n";
        let m = format!("Content-Type: multipart/mixed; boundary=b\r\nMIME-Version: 1.0\r\n\r\n--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{inner}--b--\r\n");
        let want = m
            .replace("8bit\r\n\r\nSubject", "7bit\r\n\r\nSubject")
            .replace(
                "1.0\r\n\r\nbody \u{fc}",
                "1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nbody =C3=BC",
            );
        assert_eq!(convert(&m), want);
        // 8-bit left in the enclosed header: the part keeps its 8bit label.
        let m = m.replace("Subject: x", "Subject: h\u{e9}");
        let want = want
            .replace("Subject: x", "Subject: h\u{e9}")
            .replace("7bit", "8bit");
        assert_eq!(convert(&m), want);
    }

    #[test]
    fn seven_bit_message_is_none() {
        assert_eq!(to_seven_bit(b"Subject: x\r\n\r\nhello\r\n"), Ok(None));
        assert_eq!(
            to_seven_bit(MIXED.replace('\u{e9}', "e").as_bytes()),
            Ok(None)
        );
        assert_eq!(to_seven_bit(b""), Ok(None));
        assert_eq!(to_seven_bit(b"Subject: only headers\r\n"), Ok(None));
        assert!(!has_eight_bit(b"abc") && has_eight_bit(b"a\xffc"));
    }

    #[test]
    fn eight_bit_headers_untouched() {
        let m = "Subject: \u{e9}t\u{e9}\r\nX-Long: a\r\n \u{e9}\r\n\r\nplain\r\n";
        assert_eq!(to_seven_bit(m.as_bytes()), Ok(None));
        let m = "Subject: \u{e9}t\u{e9}\r\nX-Long: a\r\n \u{e9}\r\n\r\npl\u{e2}in\r\n";
        assert!(convert(m)
            .starts_with("Subject: \u{e9}t\u{e9}\r\nX-Long: a\r\n \u{e9}\r\nMIME-Version"));
    }

    #[test]
    fn missing_close_delimiter_and_boundary() {
        let m = "Content-Type: multipart/mixed; boundary=zz\r\nMime-Version: 1.0\r\n\r\n--zz\r\n\r\n\u{e9}\r\n";
        assert_eq!(
            convert(m),
            m.replace(
                "\r\n\r\n\u{e9}",
                "\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9"
            )
        );
        let m = "Content-Type: multipart/mixed; boundary=zz\r\nMime-Version: 1.0\r\n\r\n\u{e9}\r\n";
        assert_eq!(convert(m), m); // preamble only: left as is
    }

    #[test]
    fn trailing_whitespace_and_long_lines() {
        let out = convert("Subject: x\r\nMIME-Version: 1\r\n\r\n\u{e9} \r\ntab\t\r\n");
        assert!(out.ends_with("\r\n\r\n=C3=A9=20\r\ntab=09\r\n"));
        let text = format!("{}\u{e9}{}--b   \r\n", "x".repeat(200), "y".repeat(72));
        let out = convert(&format!("MIME-Version: 1.0\r\n\r\n{text}"));
        let body = body_of(&out);
        assert!(body
            .split("\r\n")
            .all(|l| l.len() <= 76 && !l.starts_with('-')));
        assert_eq!(qp_decode(body.as_bytes()), text.as_bytes());
    }

    #[test]
    fn huge_line() {
        let text = "\u{e9}".repeat(1 << 19);
        let out = convert(&text);
        assert!(body_of(&out).split("\r\n").all(|l| l.len() <= 76));
        assert_eq!(qp_decode(body_of(&out).as_bytes()), text.as_bytes());
    }

    #[test]
    fn bare_lf_and_no_final_newline() {
        let out = convert("Subject: x\nMIME-Version: 1.0\n\n\u{e9}\nend");
        assert_eq!(out, "Subject: x\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\nend");
    }

    #[test]
    fn refusals() {
        let e = |m: &str| to_seven_bit(m.as_bytes()).unwrap_err();
        assert_eq!(
            e("Content-Transfer-Encoding: base64\r\n\r\n\u{e9}\r\n"),
            Unconvertible::EncodedEightBit
        );
        assert_eq!(
            e("Content-Type: multipart/mixed; boundary=a\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n--a\r\n\r\n\u{e9}\r\n"),
            Unconvertible::CompositeEncoded
        );
        assert_eq!(
            e("Content-Type: message/partial; id=1\r\n\r\n\u{e9}\r\n"),
            Unconvertible::OpaqueMessage
        );
        let mut deep = String::new();
        for i in 0..1000 {
            deep.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n"
            ));
        }
        assert_eq!(to_seven_bit(deep.as_bytes()), Ok(None));
        deep.push_str("\r\n\u{e9}\r\n");
        assert_eq!(e(&deep), Unconvertible::TooDeep);
    }

    #[test]
    fn message_global_and_digest() {
        let out = convert(
            "MIME-Version: 1.0\r\nContent-Type: message/global\r\n\r\nSubject: \u{e9}\r\n\r\nx\r\n",
        );
        assert!(out.ends_with(
            "Content-Transfer-Encoding: quoted-printable\r\n\r\nSubject: =C3=A9\r\n\r\nx\r\n"
        ));
        let m = "MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: a\r\nMIME-Version: 1.0\r\n\r\n\u{e9}\r\n--d--\r\n";
        let want = m.replace(
            "1.0\r\n\r\n\u{e9}",
            "1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9",
        );
        assert_eq!(convert(m), want);
    }

    #[test]
    fn param_parsing() {
        assert_eq!(
            param(b"; charset=x; Boundary = \"a\\\"b;c\" ", b"boundary"),
            Some(b"a\"b;c".to_vec())
        );
        assert_eq!(
            param(b";charset;boundary=abc;x=y", b"boundary"),
            Some(b"abc".to_vec())
        );
        assert_eq!(
            param(b";boundary=\"unterminated", b"boundary"),
            Some(b"unterminated".to_vec())
        );
        assert_eq!(param(b";x=\"", b"boundary"), None);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn text_round_trips(body in proptest::collection::vec(any::<u8>(), 0..600)) {
                let mut m = b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n".to_vec();
                m.extend_from_slice(&body);
                match to_seven_bit(&m).unwrap() {
                    None => prop_assert!(!has_eight_bit(&body)),
                    Some(out) => {
                        let head = b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n";
                        prop_assert!(out.starts_with(head));
                        let enc = &out[head.len()..];
                        prop_assert!(!has_eight_bit(enc));
                        prop_assert!(enc.split(|&b| b == b'\n').all(|l| l.len() <= 78));
                        let mut want = Vec::new();
                        copy(&body, &mut want);
                        prop_assert_eq!(qp_decode(enc), want);
                    }
                }
            }

            #[test]
            fn never_panics(parts in proptest::collection::vec(prop_oneof![
                Just(&b"--a\r\n"[..]), Just(&b"--a--\r\n"[..]), Just(&b"--b\n"[..]), Just(&b"\r\n"[..]),
                Just(&b"Content-Type: multipart/mixed; boundary=b\r\n"[..]),
                Just(&b"Content-Type: message/rfc822\r\n"[..]), Just(&b" folded\r\n"[..]),
                Just(&b"Content-Transfer-Encoding: 8bit\r\n"[..]), Just(&b"\xe9 text\r"[..]),
                Just(&b"Content-Type: multipart/digest; boundary=\"a\"\r\n"[..]), Just(&b"x"[..]),
                Just(&b"Content-Type: message/global\r\n"[..]), Just(&b"--a\xe9\r\n"[..]),
                Just(&b"Content-Transfer-Encoding: base64\r\n"[..]),
            ], 0..40), tail in proptest::collection::vec(any::<u8>(), 0..50)) {
                let mut m = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n".to_vec();
                m.extend(parts.concat());
                m.extend(tail);
                if let Ok(Some(out)) = to_seven_bit(&m) {
                    // Converting again changes nothing.
                    let again = to_seven_bit(&out).unwrap();
                    prop_assert!(again.is_none() || again.as_ref() == Some(&out));
                }
            }
        }
    }
}
