//! What a delivery attempt means for one recipient: delivered, temporary failure (try
//! again later) or permanent failure (give up and notify), following REFERENCE
//! "Retries": a 4xx reply, a refused or dropped connection, a timeout or a failed DNS
//! look-up is temporary; a 5xx reply, a null MX (RFC 7505) or a domain that does not
//! exist is permanent. Also the RFC 3463 status code each outcome carries in a DSN.
//! Pure: `outbound` produces these values, the queue and the DSN builder consume them.

use std::fmt;

use crate::protocol::Reply;

/// The three fates of a recipient after one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The remote server took responsibility (2xx after DATA).
    Delivered,
    /// Try again later (4xx, network or DNS trouble).
    Temporary,
    /// Give up on this recipient (5xx, null MX, no such domain).
    Permanent,
}

/// The outcome an SMTP reply code means for the command it answers: 2xx delivered or
/// accepted, 5xx permanent; 4xx and anything unexpected (1xx, 3xx where a final reply was
/// due, garbage) temporary, because an odd server is no reason to bounce mail.
pub fn classify_reply(code: u16) -> Outcome {
    match code {
        200..=299 => Outcome::Delivered,
        500..=599 => Outcome::Permanent,
        _ => Outcome::Temporary,
    }
}

/// Why a recipient was not delivered on this try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureCause {
    /// The remote server answered this (4xx temporary, 5xx permanent).
    Reply(Reply),
    /// The connection could not be made or broke (refused, reset, TLS trouble).
    Connection(String),
    /// The remote server did not answer in time.
    Timeout(String),
    /// The DNS look-up failed for now (SERVFAIL, timeout, no answer from servers).
    DnsTemporary(String),
    /// The domain (or the MX host) does not exist: NXDOMAIN.
    NoSuchDomain(String),
    /// The domain publishes a null MX (`MX 0 .`, RFC 7505): it takes no mail.
    NullMx(String),
    /// The remote server broke the protocol (unparseable reply and the like).
    Protocol(String),
    /// erlmail's own set-up is at fault (an unusable route); temporary so a fixed
    /// configuration gets the message through.
    Local(String),
    /// The delivery agent crashed on this message again and again (the crash budget is
    /// spent): permanent, `5.3.0`, so a message that kills its sender is not retried
    /// forever.
    Crashed(String),
    /// The next hop is this host (its greeting or EHLO reply names us): the mail would
    /// loop, so it fails at once (`5.4.6`), as Postfix's "loops back to myself".
    Loop(String),
    /// The message needs an extension the next hop does not offer and cannot go without
    /// it: `SMTPUTF8` (`5.6.7`, RFC 6531 §3.2) or `8BITMIME` for 8-bit text that cannot
    /// be made 7-bit (`5.6.3`, RFC 6152). Permanent, as Postfix bounces it.
    NotOffered {
        /// The extension's EHLO keyword.
        extension: &'static str,
        /// The host that did not offer it.
        host: String,
    },
}

impl FailureCause {
    /// Temporary or permanent (never `Delivered`).
    pub fn outcome(&self) -> Outcome {
        match self {
            FailureCause::Reply(r) => match classify_reply(r.code) {
                Outcome::Permanent => Outcome::Permanent,
                _ => Outcome::Temporary,
            },
            FailureCause::NoSuchDomain(_)
            | FailureCause::NullMx(_)
            | FailureCause::Crashed(_)
            | FailureCause::Loop(_)
            | FailureCause::NotOffered { .. } => Outcome::Permanent,
            FailureCause::Connection(_)
            | FailureCause::Timeout(_)
            | FailureCause::DnsTemporary(_)
            | FailureCause::Protocol(_)
            | FailureCause::Local(_) => Outcome::Temporary,
        }
    }

    /// The RFC 3463 status for a DSN: the server's enhanced code when it sent one that
    /// fits, else one chosen by cause.
    pub fn status(&self) -> String {
        match self {
            FailureCause::Reply(r) => r.enhanced_status().unwrap_or_else(|| {
                if classify_reply(r.code) == Outcome::Permanent {
                    "5.0.0".into()
                } else {
                    "4.0.0".into()
                }
            }),
            FailureCause::Connection(_) => "4.4.1".into(),
            FailureCause::Timeout(_) => "4.4.2".into(),
            FailureCause::DnsTemporary(_) => "4.4.3".into(),
            FailureCause::NoSuchDomain(_) => "5.1.2".into(),
            FailureCause::NullMx(_) => "5.1.10".into(),
            FailureCause::Protocol(_) => "4.5.0".into(),
            FailureCause::Local(_) => "4.3.0".into(),
            FailureCause::Crashed(_) => "5.3.0".into(),
            FailureCause::Loop(_) => "5.4.6".into(),
            FailureCause::NotOffered { extension, .. } if *extension == "SMTPUTF8" => {
                "5.6.7".into()
            }
            FailureCause::NotOffered { .. } => "5.6.3".into(),
        }
    }

    /// The remote server's reply, when the failure is one (for Diagnostic-Code).
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            FailureCause::Reply(r) => Some(r),
            _ => None,
        }
    }
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Reply(r) => f.write_str(&r.one_line()),
            FailureCause::Connection(s) => write!(f, "connection failed: {s}"),
            FailureCause::Timeout(s) => write!(f, "timeout: {s}"),
            FailureCause::DnsTemporary(s) => write!(f, "DNS look-up failed: {s}"),
            FailureCause::NoSuchDomain(s) => write!(f, "Host or domain name not found: {s}"),
            FailureCause::NullMx(s) => write!(f, "Domain {s} does not accept mail (nullMX)"),
            FailureCause::Protocol(s) => write!(f, "protocol error: {s}"),
            FailureCause::Local(s) => write!(f, "local configuration error: {s}"),
            FailureCause::Crashed(s) => write!(f, "delivery agent crashed: {s}"),
            FailureCause::Loop(s) => write!(f, "mail for {s} loops back to myself"),
            FailureCause::NotOffered { extension, host } if *extension == "SMTPUTF8" => {
                write!(
                    f,
                    "SMTPUTF8 is required, but was not offered by host {host}"
                )
            }
            FailureCause::NotOffered { extension, host } => write!(
                f,
                "8-bit content cannot be sent to host {host}, which does not offer \
                 {extension}, nor converted to 7-bit"
            ),
        }
    }
}

/// The result of one try for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptStatus {
    /// Accepted by the remote server; the reply to the end of DATA.
    Delivered {
        /// The remote server's final reply.
        reply: Reply,
    },
    /// Try again later.
    Temporary {
        /// Why.
        cause: FailureCause,
    },
    /// Failed for good.
    Permanent {
        /// Why.
        cause: FailureCause,
    },
}

impl RcptStatus {
    /// A failure status from its cause, temporary or permanent as the cause says.
    pub fn failed(cause: FailureCause) -> Self {
        match cause.outcome() {
            Outcome::Permanent => RcptStatus::Permanent { cause },
            _ => RcptStatus::Temporary { cause },
        }
    }

    /// Which of the three fates this is.
    pub fn outcome(&self) -> Outcome {
        match self {
            RcptStatus::Delivered { .. } => Outcome::Delivered,
            RcptStatus::Temporary { .. } => Outcome::Temporary,
            RcptStatus::Permanent { .. } => Outcome::Permanent,
        }
    }

    /// The RFC 3463 status for a DSN (`2.0.0` when delivered).
    pub fn status(&self) -> String {
        match self {
            RcptStatus::Delivered { reply } => reply
                .enhanced_status()
                .unwrap_or_else(|| "2.0.0".to_string()),
            RcptStatus::Temporary { cause } | RcptStatus::Permanent { cause } => cause.status(),
        }
    }

    /// The remote server's reply, if one decided this status (for Diagnostic-Code).
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            RcptStatus::Delivered { reply } => Some(reply),
            RcptStatus::Temporary { cause } | RcptStatus::Permanent { cause } => cause.reply(),
        }
    }

    /// One line for logs and the queue's `last error`.
    pub fn describe(&self) -> String {
        match self {
            RcptStatus::Delivered { reply } => reply.one_line(),
            RcptStatus::Temporary { cause } | RcptStatus::Permanent { cause } => cause.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes() {
        assert_eq!(classify_reply(250), Outcome::Delivered);
        assert_eq!(classify_reply(450), Outcome::Temporary);
        assert_eq!(classify_reply(421), Outcome::Temporary);
        assert_eq!(classify_reply(550), Outcome::Permanent);
        assert_eq!(classify_reply(554), Outcome::Permanent);
        assert_eq!(classify_reply(354), Outcome::Temporary);
        assert_eq!(classify_reply(999), Outcome::Temporary);
    }

    #[test]
    fn causes() {
        let c = |x: FailureCause| (x.outcome(), x.status());
        assert_eq!(
            c(FailureCause::Reply(Reply::new(
                550,
                "5.1.1 <a@b>: User unknown"
            ))),
            (Outcome::Permanent, "5.1.1".to_string())
        );
        assert_eq!(
            c(FailureCause::Reply(Reply::new(451, "try later"))),
            (Outcome::Temporary, "4.0.0".to_string())
        );
        // an enhanced code whose class contradicts the reply code is ignored
        assert_eq!(
            c(FailureCause::Reply(Reply::new(450, "5.1.1 odd"))),
            (Outcome::Temporary, "4.0.0".to_string())
        );
        assert_eq!(
            c(FailureCause::Connection("refused".into())).0,
            Outcome::Temporary
        );
        assert_eq!(c(FailureCause::Timeout("x".into())).0, Outcome::Temporary);
        assert_eq!(
            c(FailureCause::DnsTemporary("SERVFAIL".into())),
            (Outcome::Temporary, "4.4.3".to_string())
        );
        assert_eq!(
            c(FailureCause::NoSuchDomain("x.test".into())),
            (Outcome::Permanent, "5.1.2".to_string())
        );
        assert_eq!(
            c(FailureCause::NullMx("x.test".into())),
            (Outcome::Permanent, "5.1.10".to_string())
        );
    }

    #[test]
    fn status_from_cause() {
        let s = RcptStatus::failed(FailureCause::Reply(Reply::new(552, "5.3.4 too big")));
        assert_eq!(s.outcome(), Outcome::Permanent);
        let s = RcptStatus::failed(FailureCause::Reply(Reply::new(452, "4.5.3 too many")));
        assert_eq!(s.outcome(), Outcome::Temporary);
        assert_eq!(s.status(), "4.5.3");
        let d = RcptStatus::Delivered {
            reply: Reply::new(250, "ok queued"),
        };
        assert_eq!(d.status(), "2.0.0");
    }
}
