//! What the session adds to and reads from an accepted message: the `Received:` trace
//! header (RFC 5321 §4.4), the hop count, and the subject for listings.
//!
//! Pure functions of their arguments; the time comes in as `now`.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

/// Builds the `Received:` header prepended to every accepted message, CRLF-terminated.
///
/// `for <rcpt>` is only written for a single recipient, so that a message to many does
/// not disclose the whole list to each of them.
pub fn received_header(
    helo: &str,
    client_ip: IpAddr,
    hostname: &str,
    esmtp: bool,
    single_recipient: Option<&str>,
    now: DateTime<Utc>,
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
    let with = if esmtp { "ESMTP" } else { "SMTP" };
    let date = now.to_rfc2822();
    match single_recipient {
        Some(rcpt) => format!(
            "Received: from {helo} ({ip})\r\n\tby {hostname} with {with}\r\n\tfor <{rcpt}>; {date}\r\n"
        ),
        None => format!("Received: from {helo} ({ip})\r\n\tby {hostname} with {with}; {date}\r\n"),
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

    #[test]
    fn header_for_one_recipient() {
        let h = received_header(
            "client.example",
            "192.0.2.1".parse().unwrap(),
            "mx.local.example",
            true,
            Some("bob@local.example"),
            now(),
        );
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.1])\r\n\tby mx.local.example with ESMTP\r\n\tfor <bob@local.example>; Tue, 5 Mar 2024 14:07:09 +0000\r\n"
        );
    }

    #[test]
    fn header_for_many_and_ipv6_and_mapped() {
        let h = received_header(
            "c",
            "2001:db8::1".parse().unwrap(),
            "mx",
            false,
            None,
            now(),
        );
        assert_eq!(
            h,
            "Received: from c ([IPv6:2001:db8::1])\r\n\tby mx with SMTP; Tue, 5 Mar 2024 14:07:09 +0000\r\n"
        );
        let h = received_header(
            "c d",
            "::ffff:10.0.0.1".parse().unwrap(),
            "mx",
            true,
            None,
            now(),
        );
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
