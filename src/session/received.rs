//! What the session adds to and reads from an accepted message: the `Received:` trace
//! header (RFC 5321 §4.4), the hop count, and the subject for listings.
//!
//! Pure functions of their arguments; the time comes in as `now`.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

/// How the message came in, for the `with` clause of `Received:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Protocol {
    /// The client greeted with EHLO.
    pub esmtp: bool,
    /// The transaction asked for SMTPUTF8 (RFC 6531).
    pub utf8: bool,
    /// Under TLS (STARTTLS or implicit).
    pub tls: bool,
    /// The client authenticated (AUTH).
    pub auth: bool,
}

impl Protocol {
    /// The protocol keyword: `SMTP` after HELO; `ESMTP` with RFC 3848's `S` (TLS) and
    /// `A` (authenticated) suffixes; `UTF8SMTP` and its variants for SMTPUTF8 mail
    /// (RFC 6531 §3.7.3).
    pub fn keyword(self) -> String {
        if !self.esmtp {
            return "SMTP".into();
        }
        let base = if self.utf8 { "UTF8SMTP" } else { "ESMTP" };
        let mut k = String::from(base);
        if self.tls {
            k.push('S');
        }
        if self.auth {
            k.push('A');
        }
        k
    }
}

/// Builds the `Received:` header prepended to every accepted message, CRLF-terminated.
/// `tls` is the session's TLS summary (protocol and cipher), written in a comment as
/// Postfix writes it.
///
/// `for <rcpt>` is only written for a single recipient, so that a message to many does
/// not disclose the whole list to each of them.
pub fn received_header(
    helo: &str, client_ip: IpAddr, hostname: &str, protocol: Protocol, tls: Option<&str>,
    single_recipient: Option<&str>, now: DateTime<Utc>,
) -> String {
    let ip = match client_ip.to_canonical() {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    };
    // The HELO name is the client's text; keep it to printable ASCII in a header.
    let helo: String = helo
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    let with = protocol.keyword();
    let using = match tls {
        Some(t) => format!("\r\n\t(using {t})"),
        None => String::new(),
    };
    let date = now.to_rfc2822();
    match single_recipient {
        Some(rcpt) => format!(
            "Received: from {helo} ({ip}){using}\r\n\tby {hostname} with {with}\r\n\tfor <{rcpt}>; {date}\r\n"
        ),
        None => format!(
            "Received: from {helo} ({ip}){using}\r\n\tby {hostname} with {with}; {date}\r\n"
        ),
    }
}

/// Counts `Received:` headers in the header section of `message` (up to the first empty
/// line), for the hop limit that breaks mail loops.
pub fn hop_count(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

/// The decoded `Subject:` header (RFC 2047 words decoded), if any.
pub fn subject(message: &[u8]) -> Option<String> {
    mail_parser::MessageParser::new()
        .parse_headers(message)
        .and_then(|m| m.subject().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, 5, 14, 7, 9).unwrap()
    }

    /// The header for a client at `ip`, received now.
    fn header(
        helo: &str, ip: &str, host: &str, protocol: Protocol, tls: Option<&str>, rcpt: Option<&str>,
    ) -> String {
        received_header(helo, ip.parse().unwrap(), host, protocol, tls, rcpt, now())
    }

    fn esmtp() -> Protocol {
        Protocol {
            esmtp: true,
            ..Protocol::default()
        }
    }

    #[test]
    fn protocol_keywords_follow_rfc_3848_and_6531() {
        let k = |esmtp, utf8, tls, auth| {
            Protocol {
                esmtp,
                utf8,
                tls,
                auth,
            }
            .keyword()
        };
        assert_eq!(k(false, false, false, false), "SMTP");
        assert_eq!(k(true, false, false, false), "ESMTP");
        assert_eq!(k(true, false, true, false), "ESMTPS");
        assert_eq!(k(true, false, false, true), "ESMTPA");
        assert_eq!(k(true, false, true, true), "ESMTPSA");
        assert_eq!(k(true, true, false, false), "UTF8SMTP");
        assert_eq!(k(true, true, true, false), "UTF8SMTPS");
        assert_eq!(k(true, true, false, true), "UTF8SMTPA");
        assert_eq!(k(true, true, true, true), "UTF8SMTPSA");
    }

    #[test]
    fn tls_is_described_in_a_comment() {
        let h = header(
            "c",
            "192.0.2.1",
            "mx",
            Protocol {
                esmtp: true,
                tls: true,
                auth: true,
                utf8: false,
            },
            Some("TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"),
            None,
        );
        assert_eq!(
            h,
            "Received: from c ([192.0.2.1])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\tby mx with ESMTPSA; Tue, 5 Mar 2024 14:07:09 +0000\r\n"
        );
    }

    #[test]
    fn header_for_one_recipient() {
        let h = header(
            "client.example",
            "192.0.2.1",
            "mx.local.example",
            esmtp(),
            None,
            Some("bob@local.example"),
        );
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.1])\r\n\tby mx.local.example with ESMTP\r\n\tfor <bob@local.example>; Tue, 5 Mar 2024 14:07:09 +0000\r\n"
        );
    }

    #[test]
    fn header_for_many_and_ipv6_and_mapped() {
        let h = header("c", "2001:db8::1", "mx", Protocol::default(), None, None);
        assert_eq!(
            h,
            "Received: from c ([IPv6:2001:db8::1])\r\n\tby mx with SMTP; Tue, 5 Mar 2024 14:07:09 +0000\r\n"
        );
        let h = header("c d", "::ffff:10.0.0.1", "mx", esmtp(), None, None);
        assert!(h.starts_with("Received: from c?d ([10.0.0.1])\r\n"), "{h}");
    }

    #[test]
    fn hops() {
        let m = b"Received: a\r\nreceived: b\r\n\tcont\r\nX-Received: no\r\nSubject: s\r\n\r\nReceived: body\r\n";
        assert_eq!(hop_count(m), 2);
        assert_eq!(hop_count(b""), 0);
        assert_eq!(hop_count(b"\r\nReceived: x\r\n"), 0);
    }

    #[test]
    fn subjects() {
        assert_eq!(
            subject(b"Subject: hello\r\n\r\nbody\r\n").as_deref(),
            Some("hello")
        );
        assert_eq!(
            subject(b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n").as_deref(),
            Some("caf\u{e9}")
        );
        assert_eq!(subject(b"From: a@b\r\n\r\n"), None);
    }
}
