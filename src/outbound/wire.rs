//! Byte-level pieces of the SMTP client: reading reply lines into a `Reply`, EHLO
//! keywords, and the message text as sent in DATA. Pure functions, unit tested here;
//! `connection` does the reading and writing.
//!
//! Nothing unsafe leaves erlmail (REFERENCE, "Facing the internet"): the text as sent
//! never holds a NUL byte nor a line longer than [`MAX_LINE`] octets (see
//! [`data_payload`]).

use crate::protocol::Reply;

/// The longest reply line accepted from a server (RFC 5321 says 512; be lenient).
pub const MAX_REPLY_LINE: usize = 4096;
/// The most lines accepted in one multi-line reply (EHLO lists are the longest).
pub const MAX_REPLY_LINES: usize = 128;

/// One parsed reply line: its code, whether it is the last line of the reply (`250 `
/// rather than `250-`), and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    /// The three-digit code.
    pub code: u16,
    /// True for the final line of a reply.
    pub last: bool,
    /// The text after the separator, without the line end.
    pub text: String,
}

/// Parses one reply line (with or without its CRLF). None when it does not start with a
/// three-digit code followed by space, hyphen or the line end.
pub fn parse_reply_line(line: &[u8]) -> Option<ReplyLine> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return None,
    };
    Some(ReplyLine {
        code,
        last,
        text: String::from_utf8_lossy(text).into_owned(),
    })
}

/// Accumulates reply lines into a reply.
#[derive(Debug, Default)]
pub struct ReplyBuilder {
    code: Option<u16>,
    lines: Vec<String>,
}

/// What feeding a line to a `ReplyBuilder` gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// More lines follow.
    More,
    /// The reply is complete.
    Done(Reply),
}

/// Why a reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line that is not a reply line.
    #[error("unparseable reply line: {0:?}")]
    Unparseable(String),
    /// The lines of one reply carry different codes.
    #[error("reply lines with different codes ({0} then {1})")]
    MixedCodes(u16, u16),
    /// Too many lines.
    #[error("reply longer than {MAX_REPLY_LINES} lines")]
    TooLong,
}

impl ReplyBuilder {
    /// Feeds one raw line (as read, CRLF included).
    pub fn feed(&mut self, raw: &[u8]) -> Result<Fed, ReplyError> {
        let line = parse_reply_line(raw).ok_or_else(|| {
            ReplyError::Unparseable(String::from_utf8_lossy(&raw[..raw.len().min(80)]).into())
        })?;
        if let Some(code) = self.code {
            if code != line.code {
                return Err(ReplyError::MixedCodes(code, line.code));
            }
        }
        self.code = Some(line.code);
        self.lines.push(line.text);
        if line.last {
            return Ok(Fed::Done(Reply {
                code: line.code,
                lines: std::mem::take(&mut self.lines),
            }));
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooLong);
        }
        Ok(Fed::More)
    }
}

/// The EHLO keywords a server offered (upper-cased first word of each line after the
/// first), e.g. `["PIPELINING", "SIZE", "STARTTLS"]`.
pub fn ehlo_keywords(reply: &Reply) -> Vec<String> {
    reply
        .lines
        .iter()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_ascii_uppercase)
        .collect()
}

/// Whether a server's EHLO `keywords` (upper case) include `extension`.
pub fn offers(keywords: &[String], extension: &str) -> bool {
    keywords.iter().any(|k| k == extension)
}

/// The longest line sent in DATA, in octets before the CRLF (RFC 5321 §4.5.3.1.6;
/// Postfix's `smtp_line_length_limit`).
pub const MAX_LINE: usize = 998;

/// The DATA payload for `body`: line ends made CRLF (bare CR or LF become CRLF, since
/// erlmail only ever emits CRLF), NUL bytes dropped, lines over [`MAX_LINE`] octets
/// broken with CRLF SP, a `.` doubled at the start of every line (RFC 5321 §4.5.2,
/// including the first line), a final CRLF added if missing, and the `.CRLF`
/// terminator appended.
///
/// The SMTP server already refuses NUL at the final dot; dropping it here covers what
/// reached the queue another way (an import). A long line is broken as Postfix does
/// with `smtp_line_length_limit = 998`: after 998 octets on the wire (a stuffed dot
/// included) a CRLF and a single space are inserted, and the continuation is held to
/// the same limit, so a long header becomes a folded header (RFC 5322 §2.2.3) that a
/// receiver unfolds with only an added space. A continuation starts with the space, so
/// it never needs a dot doubled. Local deliveries are stored as received.
pub fn data_payload(body: &[u8]) -> Vec<u8> {
    payload_with_limit(body, MAX_LINE)
}

/// [`data_payload`] with the line limit as a parameter, so the tests can reach it with
/// short bodies. `limit` is at least 2 (a stuffed dot and one octet).
fn payload_with_limit(body: &[u8], limit: usize) -> Vec<u8> {
    debug_assert!(limit >= 2);
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 8);
    // Octets on the current output line; 0 exactly at the start of a line of the body
    // (a continuation starts at 1, with its space).
    let mut col = 0;
    // Run by run between CR, LF and NUL (memchr finds them), not byte by byte.
    let mut rest = body;
    while !rest.is_empty() {
        let end = memchr::memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len());
        put_text(&mut out, &mut col, &rest[..end], limit);
        match rest.get(end) {
            None => rest = &[],
            Some(0) => rest = &rest[end + 1..],
            Some(b) => {
                out.extend_from_slice(b"\r\n");
                col = 0;
                let crlf = *b == b'\r' && rest.get(end + 1) == Some(&b'\n');
                rest = &rest[end + if crlf { 2 } else { 1 }..];
            }
        }
    }
    if col > 0 {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Appends `text` (no CR, LF or NUL) to the current line, stuffing a leading dot and
/// breaking with CRLF SP whenever the line would pass `limit`.
fn put_text(out: &mut Vec<u8>, col: &mut usize, mut text: &[u8], limit: usize) {
    while let Some(&first) = text.first() {
        if *col == 0 && first == b'.' {
            out.push(b'.');
            *col = 1;
        }
        if *col >= limit {
            out.extend_from_slice(b"\r\n ");
            *col = 1;
        }
        let n = (limit - *col).min(text.len());
        out.extend_from_slice(&text[..n]);
        *col += n;
        text = &text[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_reply_line(b"250-mx.test Hello\r\n"),
            Some(ReplyLine {
                code: 250,
                last: false,
                text: "mx.test Hello".into()
            })
        );
        assert_eq!(
            parse_reply_line(b"550 5.1.1 no\r\n").map(|l| (l.code, l.last)),
            Some((550, true))
        );
        assert_eq!(parse_reply_line(b"250\r\n").map(|l| l.last), Some(true));
        assert_eq!(parse_reply_line(b"25x ok\r\n"), None);
        assert_eq!(parse_reply_line(b"250:ok\r\n"), None);
        assert_eq!(parse_reply_line(b"650 ok\r\n"), None);
        assert_eq!(parse_reply_line(b"hello\r\n"), None);
    }

    #[test]
    fn multi_line_reply_and_keywords() {
        let mut b = ReplyBuilder::default();
        assert_eq!(b.feed(b"250-mx.test\r\n").unwrap(), Fed::More);
        assert_eq!(b.feed(b"250-STARTTLS\r\n").unwrap(), Fed::More);
        let Fed::Done(r) = b.feed(b"250 size 1000\r\n").unwrap() else {
            panic!("not done")
        };
        assert_eq!(r.code, 250);
        assert_eq!(ehlo_keywords(&r), vec!["STARTTLS", "SIZE"]);
        let mut b = ReplyBuilder::default();
        b.feed(b"250-a\r\n").unwrap();
        assert_eq!(b.feed(b"251 b\r\n"), Err(ReplyError::MixedCodes(250, 251)));
    }

    #[test]
    fn dot_stuffing_and_crlf() {
        assert_eq!(data_payload(b".a\r\nb\r\n"), b"..a\r\nb\r\n.\r\n");
        assert_eq!(
            data_payload(b"a\r\n.\r\n..b\r\n"),
            b"a\r\n..\r\n...b\r\n.\r\n"
        );
        assert_eq!(data_payload(b"a\nb\rc"), b"a\r\nb\r\nc\r\n.\r\n");
        assert_eq!(data_payload(b"a\n.x"), b"a\r\n..x\r\n.\r\n");
        assert_eq!(data_payload(b""), b".\r\n");
        assert_eq!(data_payload(b"x.y\r\n"), b"x.y\r\n.\r\n");
    }

    #[test]
    fn nul_is_dropped() {
        assert_eq!(data_payload(b"a\0b\r\n\0"), b"ab\r\n.\r\n");
        // A dot behind a NUL still starts the line: stuffed.
        assert_eq!(data_payload(b"\0.x\r\n"), b"..x\r\n.\r\n");
        assert_eq!(data_payload(b"\0"), b".\r\n");
    }

    /// Every line of a payload (its terminator included) is at most `limit` octets.
    fn lines_within(payload: &[u8], limit: usize) -> bool {
        payload
            .split(|b| *b == b'\n')
            .all(|l| l.strip_suffix(b"\r").unwrap_or(l).len() <= limit)
    }

    #[test]
    fn long_lines_are_broken_with_crlf_space() {
        let exact = "x".repeat(MAX_LINE);
        assert_eq!(
            data_payload(exact.as_bytes()),
            format!("{exact}\r\n.\r\n").as_bytes()
        );
        let long = "y".repeat(5000);
        let sent = data_payload(format!("Subject: {long}\r\nbody\r\n").as_bytes());
        assert!(lines_within(&sent, MAX_LINE));
        let text = String::from_utf8(sent).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0].len(), MAX_LINE);
        assert!(lines[1].starts_with(" y") && lines[1].len() == MAX_LINE);
        // Removing every inserted CRLF SP gives the line back.
        assert_eq!(
            text.replace("\r\n ", ""),
            format!("Subject: {long}\r\nbody\r\n.\r\n")
        );
        // The stuffed dot counts: 998 octets starting with a dot is 999 on the wire.
        let dotted = format!(".{}", "z".repeat(MAX_LINE - 1));
        let sent = data_payload(dotted.as_bytes());
        assert!(lines_within(&sent, MAX_LINE));
        assert_eq!(
            sent,
            format!(".{}\r\n z\r\n.\r\n", &dotted[..MAX_LINE - 1]).as_bytes()
        );
    }

    #[test]
    fn a_break_never_makes_a_line_start_with_a_dot() {
        // The 999th octet is a dot: it opens the continuation, after the space.
        let line = format!("{}.\r\n", "a".repeat(MAX_LINE));
        let sent = data_payload(line.as_bytes());
        assert_eq!(
            sent,
            format!("{}\r\n .\r\n.\r\n", "a".repeat(MAX_LINE)).as_bytes()
        );
        assert_eq!(
            payload_with_limit(b"ab..c", 2),
            b"ab\r\n .\r\n .\r\n c\r\n.\r\n"
        );
    }

    /// The plain byte-by-byte statement of `data_payload`'s rules, as a model.
    fn payload_model(body: &[u8], limit: usize) -> Vec<u8> {
        let mut out = Vec::new();
        // Octets on the current output line; 0 only at the start of a body line.
        let mut col = 0;
        let mut i = 0;
        while i < body.len() {
            let b = body[i];
            if b == b'\r' || b == b'\n' {
                if b == b'\r' && body.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                out.extend_from_slice(b"\r\n");
                col = 0;
            } else if b != 0 {
                if col == 0 && b == b'.' {
                    out.push(b'.');
                    col += 1;
                }
                if col == limit {
                    out.extend_from_slice(b"\r\n ");
                    col = 1;
                }
                out.push(b);
                col += 1;
            }
            i += 1;
        }
        if col > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    proptest::proptest! {
        #[test]
        fn payload_matches_the_bytewise_model(
            body in proptest::collection::vec(
                proptest::sample::select(vec![b'.', b'\r', b'\n', b'a', b' ', 0]),
                0..64,
            ),
            limit in 2..8usize,
        ) {
            let sent = payload_with_limit(&body, limit);
            proptest::prop_assert_eq!(&sent, &payload_model(&body, limit));
            proptest::prop_assert!(lines_within(&sent, limit));
            proptest::prop_assert!(!sent.contains(&0));
        }

        #[test]
        fn payload_at_the_real_limit_matches_the_model(
            runs in proptest::collection::vec(
                (proptest::sample::select(vec![b'.', b'\r', b'\n', b'a', 0]), 0..2100usize),
                0..6,
            ),
        ) {
            let body: Vec<u8> = runs.iter().flat_map(|(b, n)| std::iter::repeat_n(*b, *n)).collect();
            let sent = data_payload(&body);
            proptest::prop_assert_eq!(&sent, &payload_model(&body, MAX_LINE));
            proptest::prop_assert!(lines_within(&sent, MAX_LINE));
        }
    }
}
