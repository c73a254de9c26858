//! Delivery status notifications (RFC 3461, RFC 3464), as Postfix's `bounce` writes
//! them: a `multipart/report; report-type=delivery-status` with a human-readable part, a
//! `message/delivery-status` part, and the original message (`message/rfc822`) or only
//! its headers (`text/rfc822-headers`, for `RET=HDRS`). Also the rule for whether a
//! notification is due at all. Pure: hostname, dates and Message-ID are arguments; the
//! caller queues the result from `<>` like any other message.
//!
//! Built by hand rather than with mail-builder: the report parts must go out as they are
//! (7bit/8bit, never base64 or quoted-printable), which is simplest to guarantee here.

use chrono::{DateTime, Utc};

use super::outcome::{Outcome, RcptStatus};

/// Which notification this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DsnKind {
    /// Some recipients failed for good (`Action: failed`).
    Failure,
    /// Some recipients are still being retried after `server_smtp_delay_warning`.
    Delay,
    /// Some recipients were delivered and asked to hear so (`NOTIFY=SUCCESS`).
    Success,
    /// Some recipients asked to hear of success (`NOTIFY=SUCCESS`) and were handed to a
    /// next hop that does not offer DSN, so no later success report can come (RFC 3461
    /// §6.2.3.4, `Action: relayed`). A hop that offers DSN is given the `NOTIFY` instead
    /// and reports on its own.
    Relayed,
}

impl DsnKind {
    /// The `Action:` value of each recipient in this kind of report.
    pub fn action(self) -> &'static str {
        match self {
            DsnKind::Failure => "failed",
            DsnKind::Delay => "delayed",
            DsnKind::Success => "delivered",
            DsnKind::Relayed => "relayed",
        }
    }

    /// The Subject of this kind of report (Postfix's wording).
    pub fn subject(self) -> &'static str {
        match self {
            DsnKind::Failure => "Undelivered Mail Returned to Sender",
            DsnKind::Delay => "Delayed Mail (still being retried)",
            DsnKind::Success | DsnKind::Relayed => "Successful Mail Delivery Report",
        }
    }

    /// The kind of report due for a recipient status: failed for permanent, delayed for
    /// temporary, delivered for delivered.
    pub fn for_outcome(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Delivered => DsnKind::Success,
            Outcome::Temporary => DsnKind::Delay,
            Outcome::Permanent => DsnKind::Failure,
        }
    }
}

/// The `RET=` parameter of the original `MAIL FROM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ret {
    /// Return the whole message.
    Full,
    /// Return only its headers.
    Hdrs,
}

impl Ret {
    /// Parses a `RET=` value (case-insensitive); None for anything else.
    pub fn parse(value: &str) -> Option<Ret> {
        if value.eq_ignore_ascii_case("FULL") {
            Some(Ret::Full)
        } else if value.eq_ignore_ascii_case("HDRS") {
            Some(Ret::Hdrs)
        } else {
            None
        }
    }
}

/// One recipient's part of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The recipient address as delivered to (`Final-Recipient: rfc822; addr`).
    pub final_recipient: String,
    /// The `ORCPT=` parameter as given by the client (`rfc822;addr`, xtext-encoded);
    /// printed as `Original-Recipient`.
    pub original_recipient: Option<String>,
    /// The RFC 3463 status (`5.1.1`, `4.4.1`, `2.0.0`).
    pub status: String,
    /// The host that answered (`Remote-MTA: dns; host`), if any did.
    pub remote_mta: Option<String>,
    /// The remote server's reply (`Diagnostic-Code: smtp; reply`), if there was one.
    pub diagnostic: Option<String>,
    /// When delivery was last tried (`Last-Attempt-Date`).
    pub last_attempt: Option<DateTime<Utc>>,
    /// A human-readable reason for the text part (the reply or the local error).
    pub reason: String,
}

impl DsnRecipient {
    /// A recipient entry from the result of its last try.
    pub fn from_status(
        rcpt: &str, orcpt: Option<&str>, status: &RcptStatus, remote_mta: Option<&str>,
        last_attempt: Option<DateTime<Utc>>,
    ) -> Self {
        DsnRecipient {
            final_recipient: rcpt.to_string(),
            original_recipient: orcpt.map(str::to_string),
            status: status.status(),
            remote_mta: remote_mta.map(str::to_string),
            diagnostic: status.reply().map(|r| r.one_line()),
            last_attempt,
            reason: status.describe(),
        }
    }
}

/// Everything a notification is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnInput {
    /// Failure, delay or success.
    pub kind: DsnKind,
    /// This MTA's name (`server_smtp_name`): `Reporting-MTA` and `MAILER-DAEMON@` host.
    pub reporting_mta: String,
    /// The original envelope sender: the report's `To` (never empty; see `should_notify`).
    pub original_sender: String,
    /// The `ENVID=` of the original `MAIL FROM` (xtext-encoded as received).
    pub envid: Option<String>,
    /// When the original message arrived (`Arrival-Date`).
    pub arrival_date: DateTime<Utc>,
    /// The report's `Date`.
    pub date: DateTime<Utc>,
    /// The report's `Message-ID`, with or without angle brackets.
    pub message_id: String,
    /// `RET=` of the original message; absent returns the full message, as Postfix does.
    pub ret: Option<Ret>,
    /// The recipients this report is about (at least one).
    pub recipients: Vec<DsnRecipient>,
    /// The original message as queued (headers and body, CRLF line ends).
    pub original: Vec<u8>,
}

/// Whether a notification of `kind` is due for a recipient whose message came from
/// `sender` with RCPT parameter `notify` (`NOTIFY=` value, None when absent).
///
/// Never for the null sender (no bounce loops) nor under `NOTIFY=NEVER`. Without
/// `NOTIFY` the default of RFC 3461 applies: failure and delay, never success. Success
/// only when asked for. Failure reports also need `server_stmp_failure_notification`
/// (`failure_notification_enabled`); whether delay warnings are on at all
/// (`server_smtp_delay_warning`) is the caller's check.
pub fn should_notify(
    sender: &str, notify: Option<&str>, kind: DsnKind, failure_notification_enabled: bool,
) -> bool {
    let sender = sender.trim();
    if sender.is_empty() || sender == "<>" {
        return false;
    }
    if kind == DsnKind::Failure && !failure_notification_enabled {
        return false;
    }
    let success = matches!(kind, DsnKind::Success | DsnKind::Relayed);
    let Some(notify) = notify else {
        return !success;
    };
    let mut asked = notify.split(',').map(str::trim);
    let wanted = match kind {
        DsnKind::Failure => "FAILURE",
        DsnKind::Delay => "DELAY",
        DsnKind::Success | DsnKind::Relayed => "SUCCESS",
    };
    let mut any = false;
    let mut hit = false;
    for word in &mut asked {
        if word.eq_ignore_ascii_case("NEVER") {
            return false;
        }
        any |= !word.is_empty();
        hit |= word.eq_ignore_ascii_case(wanted);
    }
    // An empty NOTIFY= value is malformed; treat it as absent rather than as NEVER.
    if !any {
        return !success;
    }
    hit
}

/// Builds the notification: a complete RFC 5322 message with CRLF line ends, to be sent
/// from `<>` to `input.original_sender`.
pub fn build_dsn(input: &DsnInput) -> Vec<u8> {
    let host = clean(&input.reporting_mta);
    let boundary = boundary_for(input);
    let message_id = {
        let id = clean(input.message_id.trim());
        let id = id.trim_start_matches('<').trim_end_matches('>');
        format!("<{id}>")
    };

    let mut out = String::new();
    let mut header = |name: &str, value: &str| {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    };
    header("Date", &input.date.to_rfc2822());
    header(
        "From",
        &format!("MAIL DELIVERY SYSTEM <MAILER-DAEMON@{host}>"),
    );
    header("To", &format!("<{}>", clean(&input.original_sender)));
    header("Subject", input.kind.subject());
    header("Message-ID", &message_id);
    header("Auto-Submitted", "auto-replied");
    header("MIME-Version", "1.0");
    header(
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""),
    );
    header("Content-Transfer-Encoding", "8bit");
    out.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    // Part 1: for people.
    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Description: Notification\r\n");
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    out.push_str("Content-Transfer-Encoding: 8bit\r\n\r\n");
    out.push_str(&human_text(input, &host));

    // Part 2: for programs.
    out.push_str(&format!("\r\n--{boundary}\r\n"));
    out.push_str("Content-Description: Delivery report\r\n");
    out.push_str("Content-Type: message/delivery-status\r\n\r\n");
    out.push_str(&delivery_status(input, &host));

    // Part 3: the original, whole or its headers.
    let headers_only = input.ret == Some(Ret::Hdrs);
    let original: &[u8] = if headers_only {
        header_block(&input.original)
    } else {
        &input.original
    };
    out.push_str(&format!("\r\n--{boundary}\r\n"));
    if headers_only {
        out.push_str("Content-Description: Undelivered Message Headers\r\n");
        out.push_str("Content-Type: text/rfc822-headers\r\n");
    } else {
        out.push_str("Content-Description: Undelivered Message\r\n");
        out.push_str("Content-Type: message/rfc822\r\n");
    }
    let eight_bit = original.iter().any(|b| *b >= 0x80);
    out.push_str(if eight_bit {
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    } else {
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    });

    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&to_crlf(original));
    if !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// The human-readable part, after Postfix's bounce template.
fn human_text(input: &DsnInput, host: &str) -> String {
    let mut t = format!("This is the mail system at host {host}.\r\n\r\n");
    t.push_str(match input.kind {
        DsnKind::Failure => {
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n\r\n\
             For further assistance, please send mail to postmaster.\r\n\r\n\
             If you do so, please include this problem report. You can\r\n\
             delete your own text from the attached returned message.\r\n\r\n"
        }
        DsnKind::Delay => {
            "####################################################################\r\n\
             # THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n\
             ####################################################################\r\n\r\n\
             Your message could not be delivered for some time.\r\n\
             It will be retried until it is too old.\r\n\r\n"
        }
        DsnKind::Success => {
            "Your message was successfully delivered to the destination(s)\r\n\
             listed below.\r\n\r\n"
        }
        DsnKind::Relayed => {
            "Your message was successfully delivered to the destination(s)\r\n\
             listed below. If the message was delivered to mailbox you will\r\n\
             receive no further notifications. Otherwise you may still receive\r\n\
             notifications of mail delivery errors from other systems.\r\n\r\n"
        }
    });
    t.push_str("                   The mail system\r\n\r\n");
    for r in &input.recipients {
        let reason = clean(&r.reason);
        let addr = clean(&r.final_recipient);
        match &r.remote_mta {
            Some(mta) => t.push_str(&format!("<{addr}>: host {} said: {reason}\r\n", clean(mta))),
            None => t.push_str(&format!("<{addr}>: {reason}\r\n")),
        }
    }
    t
}

/// The `message/delivery-status` body: per-message fields, then a blank line before
/// each recipient's group (RFC 3464 §2.1).
fn delivery_status(input: &DsnInput, host: &str) -> String {
    let mut s = format!("Reporting-MTA: dns; {host}\r\n");
    if let Some(envid) = &input.envid {
        s.push_str(&format!("Original-Envelope-Id: {}\r\n", clean(envid)));
    }
    s.push_str(&format!(
        "Arrival-Date: {}\r\n",
        input.arrival_date.to_rfc2822()
    ));
    for r in &input.recipients {
        s.push_str("\r\n");
        s.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            clean(&r.final_recipient)
        ));
        if let Some(orcpt) = &r.original_recipient {
            s.push_str(&format!(
                "Original-Recipient: {}\r\n",
                original_recipient(orcpt)
            ));
        }
        s.push_str(&format!("Action: {}\r\n", input.kind.action()));
        s.push_str(&format!("Status: {}\r\n", clean(&r.status)));
        if let Some(mta) = &r.remote_mta {
            s.push_str(&format!("Remote-MTA: dns; {}\r\n", clean(mta)));
        }
        if let Some(diag) = &r.diagnostic {
            s.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", clean(diag)));
        }
        if let Some(at) = r.last_attempt {
            s.push_str(&format!("Last-Attempt-Date: {}\r\n", at.to_rfc2822()));
        }
    }
    s
}

/// `Original-Recipient: addr-type; address` from an `ORCPT=` value (`rfc822;a+2Bb@c`):
/// the xtext is decoded (RFC 3461 §4.2) and a missing type taken as rfc822.
fn original_recipient(orcpt: &str) -> String {
    let (kind, addr) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
    format!(
        "{}; {}",
        clean(kind.trim()),
        clean(&xtext_decode(addr.trim()))
    )
}

/// Decodes RFC 3461 xtext (`+HH` escapes); malformed escapes are kept as they are.
fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A value made safe for one header line: control characters (CR, LF above all, which
/// a remote reply could use to forge fields) become spaces, and the length is capped
/// below the 998-octet line limit.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 900 {
        let mut cut = 900;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// The original's header block, up to and including the blank line that ends it (the
/// whole message when it has no body).
fn header_block(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") {
        return &msg[..2];
    }
    match memchr::memmem::find(msg, b"\r\n\r\n") {
        Some(i) => &msg[..i + 4],
        None => match memchr::memmem::find(msg, b"\n\n") {
            Some(i) => &msg[..i + 2],
            None => msg,
        },
    }
}

/// Bare LF and bare CR become CRLF: erlmail only ever emits CRLF.
fn to_crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 16);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' if b.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// A MIME boundary that does not occur in the original message: derived from the
/// report's Message-ID and date, lengthened until it is unique.
fn boundary_for(input: &DsnInput) -> String {
    let seed: String = input
        .message_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(40)
        .collect();
    let mut boundary = format!(
        "{}.{}/{}",
        input.date.timestamp(),
        seed,
        clean(&input.reporting_mta).replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "")
    );
    let mut n = 0u32;
    while memchr::memmem::find(&input.original, boundary.as_bytes()).is_some() {
        n += 1;
        boundary = format!("{boundary}.{n}");
    }
    boundary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Reply;
    use crate::queue::outcome::FailureCause;
    use chrono::TimeZone;
    use mail_parser::{Message, MessageParser, MimeHeaders};

    const ORIGINAL: &[u8] = b"From: alice@example.org\r\nTo: bob@remote.test\r\nSubject: hello\r\nMessage-ID: <orig@example.org>\r\n\r\nBody line\r\n.leading dot\r\n";

    fn input(kind: DsnKind, ret: Option<Ret>) -> DsnInput {
        let at = Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 0).unwrap();
        let status = RcptStatus::failed(FailureCause::Reply(Reply::new(
            550,
            "5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
        )));
        DsnInput {
            kind,
            reporting_mta: "mx.example.org".into(),
            original_sender: "alice@example.org".into(),
            envid: Some("QQ314159".into()),
            arrival_date: at,
            date: at + chrono::Duration::minutes(5),
            message_id: "dsn.1@mx.example.org".into(),
            ret,
            recipients: vec![DsnRecipient::from_status(
                "bob@remote.test",
                Some("rfc822;Bob+2BTag@remote.test"),
                &status,
                Some("mx1.remote.test"),
                Some(at + chrono::Duration::minutes(4)),
            )],
            original: ORIGINAL.to_vec(),
        }
    }

    /// The text of `msg`'s first part of type `kind`/`subtype`, if it has one.
    fn part_text(msg: &Message, kind: &str, subtype: &str) -> Option<String> {
        let part = msg
            .parts
            .iter()
            .find(|p| p.is_content_type(kind, subtype))?;
        Some(String::from_utf8(part.contents().to_vec()).unwrap())
    }

    /// The `message/delivery-status` body split into its field groups.
    fn status_groups(bytes: &[u8]) -> Vec<Vec<(String, String)>> {
        let msg = MessageParser::default().parse(bytes).unwrap();
        let text = part_text(&msg, "message", "delivery-status").expect("a delivery-status part");
        text.split("\r\n\r\n")
            .filter(|g| !g.trim().is_empty())
            .map(|g| {
                g.lines()
                    .filter_map(|l| l.split_once(": "))
                    .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                    .collect()
            })
            .collect()
    }

    fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
        group
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn failure_dsn_structure() {
        let bytes = build_dsn(&input(DsnKind::Failure, None));
        // CRLF only
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'\n' {
                assert_eq!(bytes[i - 1], b'\r', "bare LF at {i}");
            }
        }
        let msg = MessageParser::default().parse(&bytes).unwrap();
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(
            msg.from().unwrap().first().unwrap().address(),
            Some("MAILER-DAEMON@mx.example.org")
        );
        assert_eq!(
            msg.to().unwrap().first().unwrap().address(),
            Some("alice@example.org")
        );
        assert_eq!(msg.message_id(), Some("dsn.1@mx.example.org"));
        let subs = msg.root_part().sub_parts().unwrap();
        assert_eq!(subs.len(), 3);
        let kinds: Vec<(String, String)> = subs
            .iter()
            .map(|id| {
                let ct = msg.parts[*id as usize].content_type().unwrap();
                (
                    ct.ctype().to_string(),
                    ct.subtype().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("text".into(), "plain".into()),
                ("message".into(), "delivery-status".into()),
                ("message".into(), "rfc822".into()),
            ]
        );
        // The returned message is whole, dot line included.
        let inner = msg.parts[subs[2] as usize].message().unwrap();
        assert_eq!(inner.subject(), Some("hello"));
        assert_eq!(
            inner.body_text(0).as_deref(),
            Some("Body line\r\n.leading dot\r\n")
        );

        let groups = status_groups(&bytes);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            field(&groups[0], "Reporting-MTA"),
            Some("dns; mx.example.org")
        );
        assert_eq!(field(&groups[0], "Original-Envelope-Id"), Some("QQ314159"));
        assert_eq!(
            field(&groups[0], "Arrival-Date"),
            Some("Fri, 1 Mar 2024 12:00:00 +0000")
        );
        let r = &groups[1];
        assert_eq!(field(r, "Final-Recipient"), Some("rfc822; bob@remote.test"));
        assert_eq!(
            field(r, "Original-Recipient"),
            Some("rfc822; Bob+Tag@remote.test")
        );
        assert_eq!(field(r, "Action"), Some("failed"));
        assert_eq!(field(r, "Status"), Some("5.1.1"));
        assert_eq!(field(r, "Remote-MTA"), Some("dns; mx1.remote.test"));
        assert_eq!(
            field(r, "Diagnostic-Code"),
            Some("smtp; 550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown")
        );
        assert_eq!(
            field(r, "Last-Attempt-Date"),
            Some("Fri, 1 Mar 2024 12:04:00 +0000")
        );
    }

    #[test]
    fn ret_hdrs_returns_headers_only() {
        let bytes = build_dsn(&input(DsnKind::Failure, Some(Ret::Hdrs)));
        let msg = MessageParser::default().parse(&bytes).unwrap();
        let text = part_text(&msg, "text", "rfc822-headers").expect("headers part");
        assert!(text.starts_with("From: alice@example.org\r\n"));
        assert!(text.contains("Subject: hello\r\n"));
        assert!(!text.contains("Body line"));
        assert!(part_text(&msg, "message", "rfc822").is_none());
    }

    #[test]
    fn delay_and_success_kinds() {
        let d = build_dsn(&input(DsnKind::Delay, None));
        let msg = MessageParser::default().parse(&d).unwrap();
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        assert_eq!(field(&status_groups(&d)[1], "Action"), Some("delayed"));

        let mut i = input(DsnKind::Success, None);
        let ok = RcptStatus::Delivered {
            reply: Reply::new(250, "2.0.0 Ok: queued as 123"),
        };
        i.recipients = vec![DsnRecipient::from_status(
            "bob@remote.test",
            None,
            &ok,
            Some("mx1.remote.test"),
            None,
        )];
        i.envid = None;
        let s = build_dsn(&i);
        let msg = MessageParser::default().parse(&s).unwrap();
        assert_eq!(msg.subject(), Some("Successful Mail Delivery Report"));
        let groups = status_groups(&s);
        assert_eq!(field(&groups[0], "Original-Envelope-Id"), None);
        assert_eq!(field(&groups[1], "Action"), Some("delivered"));
        assert_eq!(field(&groups[1], "Status"), Some("2.0.0"));
        assert_eq!(field(&groups[1], "Original-Recipient"), None);

        i.kind = DsnKind::Relayed;
        let s = build_dsn(&i);
        assert_eq!(field(&status_groups(&s)[1], "Action"), Some("relayed"));
        assert!(String::from_utf8_lossy(&s).contains("you may still receive"));
    }

    #[test]
    fn remote_reply_cannot_inject_fields() {
        let mut i = input(DsnKind::Failure, None);
        i.recipients[0].diagnostic = Some("550 no\r\nAction: delivered".into());
        let bytes = build_dsn(&i);
        let groups = status_groups(&bytes);
        assert_eq!(field(&groups[1], "Action"), Some("failed"));
        assert_eq!(groups[1].iter().filter(|(k, _)| k == "Action").count(), 1);
    }

    #[test]
    fn boundary_avoids_original_content() {
        let mut i = input(DsnKind::Failure, None);
        let first = boundary_for(&i);
        i.original = format!("Subject: x\r\n\r\n--{first}\r\n").into_bytes();
        let second = boundary_for(&i);
        assert_ne!(first, second);
        assert!(!String::from_utf8_lossy(&i.original).contains(&second));
    }

    #[test]
    fn notify_rules() {
        use DsnKind::*;
        // never for the null sender
        assert!(!should_notify("", None, Failure, true));
        assert!(!should_notify("<>", Some("SUCCESS"), Success, true));
        // absent NOTIFY: failure and delay, not success
        assert!(should_notify("a@b", None, Failure, true));
        assert!(should_notify("a@b", None, Delay, true));
        assert!(!should_notify("a@b", None, Success, true));
        // failure notifications switched off
        assert!(!should_notify("a@b", None, Failure, false));
        assert!(!should_notify("a@b", Some("FAILURE"), Failure, false));
        // NEVER
        assert!(!should_notify("a@b", Some("NEVER"), Failure, true));
        assert!(!should_notify("a@b", Some("never"), Delay, true));
        // explicit lists
        assert!(should_notify("a@b", Some("SUCCESS"), Success, true));
        assert!(should_notify("a@b", Some("SUCCESS"), Relayed, true));
        assert!(!should_notify("a@b", None, Relayed, true));
        assert!(!should_notify("a@b", Some("NEVER"), Relayed, true));
        assert!(!should_notify("a@b", Some("SUCCESS"), Failure, true));
        assert!(should_notify("a@b", Some("SUCCESS,FAILURE"), Failure, true));
        assert!(!should_notify("a@b", Some("FAILURE"), Delay, true));
        assert!(should_notify("a@b", Some("failure, delay"), Delay, true));
    }

    #[test]
    fn ret_parse_and_xtext() {
        assert_eq!(Ret::parse("full"), Some(Ret::Full));
        assert_eq!(Ret::parse("HDRS"), Some(Ret::Hdrs));
        assert_eq!(Ret::parse("x"), None);
        assert_eq!(xtext_decode("a+2Bb+3Dc"), "a+b=c");
        assert_eq!(xtext_decode("bad+Z"), "bad+Z");
        assert_eq!(xtext_decode("end+4"), "end+4");
    }
}
