//! What `MAIL FROM` and the `RCPT TO`s of one message carry, and their wire form: the
//! addresses and the parameters the client gave that travel on (RFC 3461 DSN, RFC 6531
//! SMTPUTF8), each sent only where the next hop offers its extension. No I/O.

use super::seven_bit;
use super::wire::offers;

/// One recipient with the DSN parameters its client gave (RFC 3461 §4), passed on to a
/// next hop that offers DSN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeRcpt {
    /// The forward-path.
    pub address: String,
    /// `NOTIFY=` as received.
    pub notify: Option<String>,
    /// `ORCPT=` as received (`addr-type;xtext`).
    pub orcpt: Option<String>,
}

/// What `MAIL FROM` and the `RCPT TO`s carry: the addresses and the parameters the
/// client gave that travel on (RFC 3461 DSN, RFC 6531 SMTPUTF8). `BODY` and `SIZE` are
/// the client's to work out from the text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse-path (`""` for `<>`).
    pub sender: String,
    /// The recipients, in order.
    pub rcpts: Vec<EnvelopeRcpt>,
    /// `RET=` as received.
    pub ret: Option<String>,
    /// `ENVID=` as received (xtext).
    pub envid: Option<String>,
    /// The client declared `SMTPUTF8`.
    pub smtputf8: bool,
}

impl Envelope {
    /// An envelope with addresses only.
    pub fn plain(sender: &str, rcpts: &[String]) -> Self {
        Envelope {
            sender: sender.to_string(),
            rcpts: rcpts
                .iter()
                .map(|a| EnvelopeRcpt {
                    address: a.clone(),
                    ..EnvelopeRcpt::default()
                })
                .collect(),
            ..Envelope::default()
        }
    }

    /// The recipients' addresses, in order.
    pub fn addresses(&self) -> Vec<String> {
        self.rcpts.iter().map(|r| r.address.clone()).collect()
    }

    /// The same envelope for the recipients at `members` (indexes into `rcpts`).
    pub fn subset(&self, members: &[usize]) -> Self {
        Envelope {
            rcpts: members.iter().map(|i| self.rcpts[*i].clone()).collect(),
            ..self.clone()
        }
    }

    /// Whether a next hop must offer SMTPUTF8 for this message (RFC 6531 §3.2): the
    /// client declared it and an address or a header field of `body` is not ASCII. A
    /// message that declared it without needing it goes to any hop, as Postfix sends it.
    pub(super) fn needs_smtputf8(&self, body: &[u8]) -> bool {
        self.smtputf8
            && (!self.sender.is_ascii()
                || self.rcpts.iter().any(|r| !r.address.is_ascii())
                || !seven_bit::header_section(body).is_ascii())
    }
}

/// `MAIL FROM` for `envelope` to a server offering `keywords`: `SIZE` of the text as
/// sent, `BODY=8BITMIME` for 8-bit text, `SMTPUTF8` and the DSN parameters as the client
/// gave them, each only where the server offers its extension (RFC 1870, 6152, 6531,
/// 3461 §4).
pub(super) fn mail_command(
    keywords: &[String], envelope: &Envelope, size: usize, body_8bit: bool,
) -> String {
    let mut line = format!("MAIL FROM:<{}>", envelope.sender);
    if offers(keywords, "SIZE") {
        line.push_str(&format!(" SIZE={size}"));
    }
    if body_8bit {
        line.push_str(" BODY=8BITMIME");
    }
    if envelope.smtputf8 && offers(keywords, "SMTPUTF8") {
        line.push_str(" SMTPUTF8");
    }
    if offers(keywords, "DSN") {
        if let Some(ret) = &envelope.ret {
            line.push_str(&format!(" RET={ret}"));
        }
        if let Some(envid) = &envelope.envid {
            line.push_str(&format!(" ENVID={envid}"));
        }
    }
    line
}

/// `RCPT TO` for `rcpt`, with its `NOTIFY` and `ORCPT` when the server offers DSN.
pub(super) fn rcpt_command(rcpt: &EnvelopeRcpt, dsn: bool) -> String {
    let mut line = format!("RCPT TO:<{}>", rcpt.address);
    if dsn {
        if let Some(notify) = &rcpt.notify {
            line.push_str(&format!(" NOTIFY={notify}"));
        }
        if let Some(orcpt) = &rcpt.orcpt {
            line.push_str(&format!(" ORCPT={orcpt}"));
        }
    }
    line
}
