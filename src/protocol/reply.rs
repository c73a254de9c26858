//! SMTP replies (RFC 5321 §4.2) and their exact wire form.
//!
//! A [`Reply`] is a code plus one or more text lines; the text already carries the
//! enhanced status code (RFC 3463) where one applies, so every reply string the server
//! sends is spelled out in exactly one place in the code that builds it. This module only
//! formats: it knows nothing of sessions or policy.

use std::fmt;

/// One SMTP reply: a three-digit code and one or more lines of text.
///
/// Each line of a multi-line reply repeats the code (`250-...` then `250 ...`). The text
/// never contains CR or LF; callers only echo data that the line reader has already
/// checked for bare line ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The basic reply code, 200..=599.
    pub code: u16,
    /// The text lines, at least one (an empty text is sent as `250 ` + CRLF).
    pub lines: Vec<String>,
}

impl Reply {
    /// A single-line reply, e.g. `Reply::new(250, "2.1.0 Ok")`.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply (EHLO): every line gets the same code.
    pub fn multi(code: u16, lines: Vec<String>) -> Self {
        Reply { code, lines }
    }

    /// True for 4xx and 5xx replies (those count toward the hard error limit).
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// The exact bytes sent on the wire, CRLF-terminated.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            return write!(f, "{} \r\n", self.code);
        }
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Strip any line break defensively: a reply must never let text become a
            // second reply line or a fake reply.
            let clean: String = line.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            write!(f, "{}{}{}\r\n", self.code, sep, clean)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line() {
        assert_eq!(Reply::new(250, "2.1.0 Ok").to_bytes(), b"250 2.1.0 Ok\r\n");
    }

    #[test]
    fn multi_line() {
        let r = Reply::multi(250, vec!["mx".into(), "PIPELINING".into(), "DSN".into()]);
        assert_eq!(r.to_string(), "250-mx\r\n250-PIPELINING\r\n250 DSN\r\n");
    }

    #[test]
    fn line_breaks_in_text_are_removed() {
        assert_eq!(Reply::new(550, "a\r\nb").to_string(), "550 ab\r\n");
    }

    #[test]
    fn error_classes() {
        assert!(Reply::new(421, "x").is_error());
        assert!(Reply::new(550, "x").is_error());
        assert!(!Reply::new(354, "x").is_error());
        assert!(!Reply::new(250, "x").is_error());
    }
}
