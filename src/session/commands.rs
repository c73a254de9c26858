//! The SMTP commands of a session: HELO/EHLO, MAIL, RCPT, DATA and its end, RSET, NOOP,
//! QUIT, VRFY, EXPN, HELP and STARTTLS, each checked against the session's state and
//! policy and answered with its reply.
//!
//! Pipelining discipline (RFC 2920 §3.1, Postfix 3.9 `smtpd_forbid_unauth_pipelining`):
//! when a command line is taken from the buffer and more input is already waiting behind
//! it, the client sent that input without waiting for the reply. That is refused, with
//! `554 5.5.0 Error: SMTP protocol synchronization` in place of the command's reply and
//! then [`Action::Close`], when the client has not yet been answered an EHLO (so never
//! got PIPELINING: before any HELO, after HELO, after STARTTLS), and for EHLO, HELO and
//! DATA from anyone: text sent behind DATA before the `354` is never taken as a message.
//! An EHLO client may still pipeline MAIL, RCPT, RSET, NOOP... and DATA as the last of
//! its group, and commands behind the final dot. The check sees only what is buffered,
//! so a violation split across reads may go unnoticed (the session has no clock);
//! detection depends on the split for violating input, never for conforming input.
//!
//! - `RCPT TO:<postmaster>` (no domain, RFC 5321 §4.5.1) is looked up as
//!   `postmaster@<hostname>` and then judged like any recipient.
//! - Relay tricks (see [`relay`](super::relay)) from an unauthorised client are refused
//!   with 554 5.7.1 without asking the store. Authorised clients may use source routes
//!   (the route is ignored, RFC 5321 §3.6.1) and address literals (the recipient is
//!   remote).
//! - The end of DATA refuses, in this order: a bare CR or LF (`550 5.5.2`), then a NUL
//!   byte (`550 5.6.0`), then the size (`552 5.3.4`); each counts as an error and nothing
//!   is stored. A bare line end comes first because it is the smuggling signal.

use chrono::{DateTime, Utc};

use super::{received, relay_trick, Action, Envelope, Helo, Mode, PendingRcpt, Session};
use super::{AcceptedRecipient, ForwardPath, Mailbox, RecipientInfo, ReversePath, Transaction};
use crate::protocol::address::parse_domain;
use crate::protocol::{
    auth, BareNewline, Body, Command, CommandError, DataDecoder, DataOutcome, MailParams, Path,
    RcptParams, Reply,
};

/// Whether two recipients reach one mailbox, compared as their store compares them:
/// the domain case-insensitively, and the local part too for a local user (users are
/// kept lower-case), exactly for a remote one (RFC 5321 §2.4 leaves that to its host).
/// A repeated recipient gets its 250 but one copy.
fn same_mailbox(a: &str, b: &str, local: bool) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => {
            da.eq_ignore_ascii_case(db)
                && if local {
                    la.to_lowercase() == lb.to_lowercase()
                } else {
                    la == lb
                }
        }
        _ => a == b,
    }
}

impl Session {
    /// Runs one command line; `pipelined` says more input was already buffered behind it.
    pub(super) fn command(
        &mut self, parsed: Result<Command, CommandError>, pipelined: bool, out: &mut Vec<Action>,
        now: DateTime<Utc>,
    ) {
        if pipelined && self.must_wait_for_reply(parsed.as_ref().ok()) {
            // The 554 replaces the command's own reply: the command is not run (Postfix
            // `smtpd_forbid_unauth_pipelining`).
            let r = Reply::new(554, "5.5.0 Error: SMTP protocol synchronization");
            return self.close_with(out, r);
        }
        let command = match parsed {
            Ok(c) => c,
            Err(e) => return self.error(out, e.reply()),
        };
        match command {
            Command::Helo(name) => {
                self.envelope = None;
                self.helo = Some(Helo { name, esmtp: false });
                let host = self.policy.hostname.clone();
                self.reply(out, Reply::new(250, host));
            }
            Command::Ehlo(name) => {
                // RFC 5321 §4.1.4: EHLO resets the transaction like RSET.
                self.envelope = None;
                self.helo = Some(Helo { name, esmtp: true });
                let reply = Reply::multi(250, self.ehlo_lines());
                self.reply(out, reply);
            }
            Command::Mail { from, params } => self.mail(from, params, out),
            Command::Rcpt { to, params } => self.rcpt(to, params, out),
            Command::Data => self.data(out, now),
            Command::Rset => {
                self.envelope = None;
                self.reply(out, Reply::new(250, "2.0.0 Ok"));
            }
            Command::Noop => self.reply(out, Reply::new(250, "2.0.0 Ok")),
            Command::Quit => self.close_with(out, Reply::new(221, "2.0.0 Bye")),
            Command::Vrfy(_) => self.reply(
                out,
                Reply::new(
                    252,
                    "2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
                ),
            ),
            Command::Expn(_) => {
                self.error(out, Reply::new(502, "5.5.1 Error: command not implemented"))
            }
            Command::Help => self.reply(
                out,
                Reply::new(
                    214,
                    "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
                ),
            ),
            Command::StartTls => self.starttls(out),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial, out),
        }
    }

    /// Whether the client had to wait for this command's reply before sending more
    /// (RFC 2920 §3.1). Only EHLO grants PIPELINING, so until an EHLO has been answered
    /// every command (or unparseable line) stands alone. After EHLO, HELO and EHLO still
    /// end a group (they change what the client may send next), and so does DATA: text
    /// sent before the 354 was sent blind, and taking it as the message is exactly what
    /// a smuggling or spam-cannon client wants. STARTTLS is not listed: its trailing
    /// input is discarded, never run (see [`Session::starttls`]). NOOP, QUIT, VRFY and
    /// AUTH are not enforced either, to spare sloppy but harmless clients (AUTH with an
    /// initial response may legally be followed by MAIL, RFC 4954 §4).
    fn must_wait_for_reply(&self, command: Option<&Command>) -> bool {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        !esmtp
            || matches!(
                command,
                Some(Command::Helo(_) | Command::Ehlo(_) | Command::Data)
            )
    }

    fn starttls(&mut self, out: &mut Vec<Action>) {
        if self.tls {
            return self.error(out, Reply::new(554, "5.5.1 Error: TLS already active"));
        }
        if !self.policy.tls_available {
            return self.error(out, Reply::new(502, "5.5.1 Error: command not implemented"));
        }
        self.reply(out, Reply::new(220, "2.0.0 Ready to start TLS"));
        // Whatever the client pipelined after STARTTLS was sent in plain text: discard
        // it so it can never run as if it came over TLS.
        self.input = Vec::new();
        self.pos = 0;
        out.push(Action::StartTls);
        self.mode = Mode::AwaitTls;
    }

    /// EHLO keywords: STARTTLS when a certificate is configured and the connection is
    /// not yet encrypted, AUTH only once it is (RFC 4954 §4: no plain-text passwords).
    fn ehlo_lines(&self) -> Vec<String> {
        let mut lines = vec![
            self.policy.hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.policy.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "SMTPUTF8".to_string(),
            "DSN".to_string(),
        ];
        if self.tls {
            lines.push(format!("AUTH {}", auth::MECHANISMS));
        } else if self.policy.tls_available {
            lines.push("STARTTLS".to_string());
        }
        lines
    }

    fn mail(&mut self, from: Option<Path>, params: MailParams, out: &mut Vec<Action>) {
        if self.helo.is_none() {
            return self.error(out, Reply::new(503, "5.5.1 Error: send HELO/EHLO first"));
        }
        if self.envelope.is_some() {
            return self.error(out, Reply::new(503, "5.5.1 Error: nested MAIL command"));
        }
        let max = self.policy.max_message_size;
        if max > 0 && params.size.is_some_and(|s| s > max) {
            return self.error(out, too_big());
        }
        if !params.smtputf8 && from.as_ref().is_some_and(|p| !p.raw.is_ascii()) {
            return self.error(out, unicode_without_smtputf8());
        }
        let reverse_path = match from {
            None => ReversePath::Null,
            Some(path) => match path.mailbox() {
                Some(m) => ReversePath::Mailbox(m),
                None => return self.error(out, CommandError::BadSender.reply()),
            },
        };
        self.envelope = Some(Envelope {
            reverse_path,
            params,
            recipients: Vec::new(),
            rcpt_seen: false,
        });
        self.reply(out, Reply::new(250, "2.1.0 Ok"));
    }

    fn rcpt(&mut self, to: Path, params: RcptParams, out: &mut Vec<Action>) {
        let Some(env) = self.envelope.as_mut() else {
            return self.error(out, Reply::new(503, "5.5.1 Error: need MAIL command"));
        };
        env.rcpt_seen = true;
        if !env.params.smtputf8 && !to.raw.is_ascii() {
            return self.error(out, unicode_without_smtputf8());
        }
        let max = self.policy.max_recipients;
        if max > 0 && env.recipients.len() >= max {
            // Not counted as an error: see the module documentation.
            return self.reply(out, Reply::new(452, "4.5.3 Error: too many recipients"));
        }
        if !self.may_relay() && relay_trick(&to).is_some() {
            let r = Reply::new(554, format!("5.7.1 <{}>: Relay access denied", to.raw));
            return self.error(out, r);
        }
        let mailbox = match to.mailbox() {
            Some(m) => m,
            None if !to.quoted && to.local_part.eq_ignore_ascii_case("postmaster") => Mailbox {
                local_part: "postmaster".to_string(),
                domain: parse_domain(&self.policy.hostname)
                    .unwrap_or_else(|_| self.policy.hostname.to_lowercase()),
            },
            None => return self.error(out, CommandError::BadRecipient.reply()),
        };
        let path = ForwardPath {
            mailbox,
            raw: to.raw,
        };
        out.push(Action::LookupRecipient(path.clone()));
        self.mode = Mode::AwaitRecipient(PendingRcpt { path, params });
    }

    /// Answers a RCPT once the store has said whom it names.
    pub(super) fn rcpt_verdict(
        &mut self, pending: PendingRcpt, info: RecipientInfo, out: &mut Vec<Action>,
    ) {
        let raw = &pending.path.raw;
        if info.temporary_failure {
            let r = Reply::new(451, format!("4.3.0 <{raw}>: Temporary lookup failure"));
            return self.error(out, r);
        }
        let local = match (info.local_domain, info.user_exists) {
            (true, true) => Some(true),
            (true, false) => None,
            (false, _) if self.may_relay() => Some(false),
            (false, _) => {
                let r = Reply::new(554, format!("5.7.1 <{raw}>: Relay access denied"));
                return self.error(out, r);
            }
        };
        match (local, self.envelope.as_mut()) {
            (Some(local), Some(env)) => {
                let new = pending.path.mailbox.to_string();
                let duplicate = env.recipients.iter().any(|r| {
                    r.local == local && same_mailbox(&r.path.mailbox.to_string(), &new, local)
                });
                if !duplicate {
                    env.recipients.push(AcceptedRecipient {
                        path: pending.path,
                        local,
                        notify: pending.params.notify,
                        orcpt: pending.params.orcpt,
                    });
                }
                self.reply(out, Reply::new(250, "2.1.5 Ok"));
            }
            (None, _) => {
                let r = Reply::new(
                    550,
                    format!("5.1.1 <{raw}>: Recipient address rejected: User unknown"),
                );
                self.error(out, r);
            }
            // Cannot happen: a lookup is only asked inside a transaction, and nothing
            // ends the transaction while it is pending.
            (Some(_), None) => self.error(out, Reply::new(503, "5.5.1 Error: need MAIL command")),
        }
    }

    fn data(&mut self, out: &mut Vec<Action>, now: DateTime<Utc>) {
        let reply = match (&self.envelope, &self.helo) {
            (None, _) => Reply::new(503, "5.5.1 Error: need MAIL command"),
            (Some(env), _) if !env.rcpt_seen => Reply::new(503, "5.5.1 Error: need RCPT command"),
            (Some(env), _) if env.recipients.is_empty() => {
                Reply::new(554, "5.5.1 Error: no valid recipients")
            }
            (Some(env), Some(helo)) => {
                // Our Received: header is written as DATA begins (as Postfix's smtpd
                // does) and the text is decoded behind it, so the message is never
                // copied again to put the header on top.
                let header = self.received_header(env, helo, now).into_bytes();
                let expected = env.params.size.unwrap_or(0);
                let decoder =
                    DataDecoder::with_prefix(self.policy.max_message_size, header, expected);
                self.mode = Mode::Data(decoder);
                return self.reply(out, Reply::new(354, "End data with <CR><LF>.<CR><LF>"));
            }
            // A transaction needs a MAIL, which needs a HELO.
            (Some(_), None) => Reply::new(503, "5.5.1 Error: send HELO/EHLO first"),
        };
        self.error(out, reply);
    }

    /// Our `Received:` header for the transaction `env` from `helo`, stamped `now`.
    fn received_header(&self, env: &Envelope, helo: &Helo, now: DateTime<Utc>) -> String {
        let single = match env.recipients.as_slice() {
            [only] => Some(only.path.mailbox.to_string()),
            _ => None,
        };
        let protocol = received::Protocol {
            esmtp: helo.esmtp,
            utf8: env.params.smtputf8,
            tls: self.tls,
            auth: self.user.is_some(),
        };
        received::received_header(
            &helo.name,
            self.peer.ip,
            &self.policy.hostname,
            protocol,
            self.tls_summary.as_deref(),
            single.as_deref(),
            now,
        )
    }

    pub(super) fn end_of_data(&mut self, decoder: DataDecoder, out: &mut Vec<Action>) {
        // The transaction ends here whatever the outcome; HELO is kept.
        let (Some(env), Some(helo)) = (self.envelope.take(), self.helo.as_ref()) else {
            return self.error(out, Reply::new(503, "5.5.1 Error: need MAIL command"));
        };
        let header_len = decoder.prefix_len();
        let data = match decoder.finish() {
            DataOutcome::Bare(BareNewline::Lf) => {
                return self.error(out, Reply::new(550, "5.5.2 Error: bare <LF> received"))
            }
            DataOutcome::Bare(BareNewline::Cr) => {
                return self.error(out, Reply::new(550, "5.5.2 Error: bare <CR> received"))
            }
            // Refused rather than stripped: the client learns its message was not sent as
            // written, and no next hop ever sees a NUL (REFERENCE, unsafe bytes onward).
            DataOutcome::Nul => {
                let r = Reply::new(550, "5.6.0 Error: message contains NUL character");
                return self.error(out, r);
            }
            DataOutcome::TooBig => return self.error(out, too_big()),
            DataOutcome::Message(data) => data,
        };
        // The client's text, behind our header.
        let body = &data[header_len..];
        if received::hop_count(body) > self.policy.max_hops as usize {
            return self.error(out, Reply::new(554, "5.4.0 Error: too many hops"));
        }
        // Only a local copy keeps its subject (for mailbox listings): relayed mail need
        // not have its header parsed.
        let subject = if env.recipients.iter().any(|r| r.local) {
            received::subject(body)
        } else {
            None
        };
        let transaction = Transaction {
            reverse_path: env.reverse_path,
            recipients: env.recipients,
            ret: env.params.ret,
            envid: env.params.envid,
            body_8bit: env.params.body == Some(Body::EightBitMime),
            smtputf8: env.params.smtputf8,
            helo: helo.name.clone(),
            client_ip: self.peer.ip,
            trusted: self.policy.relay_authorised || self.user.is_some(),
            subject,
            data,
        };
        out.push(Action::Store(transaction));
        self.mode = Mode::AwaitStore;
    }
}

/// A UTF-8 address in a transaction that did not declare SMTPUTF8 (RFC 6531 §3.4),
/// in Postfix's words.
fn unicode_without_smtputf8() -> Reply {
    Reply::new(553, "5.6.7 Must declare SMTPUTF8 to send unicode address")
}

fn too_big() -> Reply {
    Reply::new(552, "5.3.4 Message size exceeds fixed limit")
}
