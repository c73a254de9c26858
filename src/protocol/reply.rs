//! SMTP replies (RFC 5321 §4.2): the one reply type, for both directions. The server
//! builds a [`Reply`] and sends its exact wire form; the client's reader
//! (`outbound::wire`) builds one from what a next hop sent, and the queue keeps it as
//! what decided a recipient (the enhanced status and the one-line form for DSNs and
//! logs). The server's text already carries its enhanced status code (RFC 3463), so
//! every reply string it sends is spelled out in one place. Formats and reads only:
//! what a reply means for delivery is `queue::outcome`'s business.

use std::fmt;

/// One SMTP reply: a three-digit code and one or more lines of text.
///
/// Each line of a multi-line reply repeats the code (`250-...` then `250 ...`). The text
/// holds neither the code nor CR or LF: the server echoes only data its line reader has
/// checked for bare line ends, and the client's reader strips them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The basic reply code, 200..=599 from this server; whatever three digits a next
    /// hop sent.
    pub code: u16,
    /// The text of each line, code and separator removed; at least one, maybe empty
    /// (an empty text is sent as `250 ` + CRLF).
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

    /// True for 2xx replies: the command succeeded.
    pub fn is_positive(&self) -> bool {
        (200..=299).contains(&self.code)
    }

    /// The exact bytes sent on the wire, CRLF-terminated.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }

    /// The RFC 3463 enhanced status code at the start of the first line (`5.1.1`), if
    /// there is one whose class agrees with the reply code.
    pub fn enhanced_status(&self) -> Option<String> {
        let first = self.lines.first()?;
        let token = first.split_whitespace().next()?;
        let mut parts = token.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let class_ok = matches!(class, "2" | "4" | "5")
            && class.as_bytes().first().copied() == Some(b'0' + (self.code / 100) as u8);
        let num = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
        (class_ok && num(subject) && num(detail)).then(|| token.to_string())
    }

    /// The whole reply on one line, `550 5.1.1 text more text`: what a DSN's
    /// Diagnostic-Code and the queue's last error show. Control characters from the
    /// remote server are replaced so the text can never break a header.
    pub fn one_line(&self) -> String {
        let text = self.lines.join(" ");
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let text = text.trim();
        if text.is_empty() {
            self.code.to_string()
        } else {
            format!("{} {}", self.code, text)
        }
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
        assert!(Reply::new(250, "x").is_positive());
        assert!(!Reply::new(354, "x").is_positive());
        assert!(!Reply::new(550, "x").is_positive());
    }

    #[test]
    fn enhanced_status() {
        assert_eq!(
            Reply::new(550, "5.1.1 <a@b>: User unknown").enhanced_status(),
            Some("5.1.1".to_string())
        );
        assert_eq!(Reply::new(451, "try later").enhanced_status(), None);
        // a class that contradicts the reply code is no enhanced status
        assert_eq!(Reply::new(450, "5.1.1 odd").enhanced_status(), None);
    }

    #[test]
    fn one_line_strips_controls() {
        let r = Reply {
            code: 550,
            lines: vec!["5.7.1 no\r\nInjected: yes".into(), "second".into()],
        };
        assert_eq!(r.one_line(), "550 5.7.1 no  Injected: yes second");
        assert_eq!(Reply::new(250, "").one_line(), "250");
    }
}
