//! Byte-level pieces of the SMTP client: parsing reply lines and preparing a message
//! body for DATA (dot-stuffing, CRLF only, the terminating dot). Pure functions, unit
//! tested here; `client` does the reading and writing.

use crate::queue::outcome::SmtpReply;

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
    Done(SmtpReply),
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
            return Ok(Fed::Done(SmtpReply {
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
pub fn ehlo_keywords(reply: &SmtpReply) -> Vec<String> {
    reply
        .lines
        .iter()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_ascii_uppercase)
        .collect()
}

/// The DATA payload for `body`: line ends made CRLF (bare CR or LF become CRLF, since
/// erlmail only ever emits CRLF), a `.` doubled at the start of every line (RFC 5321
/// §4.5.2, including the first line), a final CRLF added if missing, and the `.CRLF`
/// terminator appended.
pub fn data_payload(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 8);
    // Line by line (memchr finds the line ends), `rest` always at a line start.
    let mut rest = body;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            out.push(b'.');
        }
        match memchr::memchr2(b'\r', b'\n', rest) {
            Some(end) => {
                out.extend_from_slice(&rest[..end]);
                out.extend_from_slice(b"\r\n");
                let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
                rest = &rest[end + if crlf { 2 } else { 1 }..];
            }
            None => {
                out.extend_from_slice(rest);
                out.extend_from_slice(b"\r\n");
                rest = &[];
            }
        }
    }
    out.extend_from_slice(b".\r\n");
    out
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

    /// The plain byte-by-byte statement of `data_payload`'s rules, as a model.
    fn payload_model(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at_line_start = true;
        let mut i = 0;
        while i < body.len() {
            let b = body[i];
            if b == b'\r' || b == b'\n' {
                if b == b'\r' && body.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            } else {
                if at_line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                at_line_start = false;
            }
            i += 1;
        }
        if !at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    proptest::proptest! {
        #[test]
        fn payload_matches_the_bytewise_model(
            body in proptest::collection::vec(
                proptest::sample::select(vec![b'.', b'\r', b'\n', b'a', b' ']),
                0..64,
            )
        ) {
            proptest::prop_assert_eq!(data_payload(&body), payload_model(&body));
        }
    }
}
