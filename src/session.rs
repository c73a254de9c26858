//! The pure SMTP session state machine: bytes and answers in, [`Action`]s out.
//!
//! A [`Session`] is driven by the `smtpd_fsm` actor, which owns the socket, the clock and
//! the store. The actor writes [`Session::greeting`], then feeds every read to
//! [`Session::receive`] and carries out the returned actions in order: `Send` bytes,
//! answer a `LookupRecipient` with [`Session::recipient_info`], commit a `Store` and
//! answer with [`Session::stored`], and `Close` after writing what came before.
//!
//! Input is a stream: a command may arrive split over many reads and many pipelined
//! commands in one read. The session processes as much buffered input as it can; when a
//! command needs an answer from outside, the batch ends with that request and the rest of
//! the input waits in the buffer (further `receive` calls only buffer) until the answer
//! resumes processing. Replies therefore always come out in command order, and for a
//! client that keeps to the pipelining rules below the output is the same however its
//! input is split (tested by `tests::split_invariance`).
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
//! so a violation split across reads may go unnoticed; that is the price of having no
//! clock (the actor may still read greedily before feeding). Detection therefore depends
//! on the split for violating input, never for conforming input.
//!
//! Decisions documented here rather than scattered:
//! - `RCPT TO:<postmaster>` (no domain, RFC 5321 §4.5.1) is looked up as
//!   `postmaster@<hostname>` and then judged like any recipient: the operator must have
//!   that user (or alias) for it to be accepted.
//! - Relay tricks (see [`relay`]) from an unauthorised client are refused with 554 5.7.1
//!   without asking the store. Authorised clients may use source routes (the route is
//!   ignored, RFC 5321 §3.6.1) and address literals (the recipient is remote).
//! - Errors counted toward `hard_error_limit`: every 4xx/5xx reply to a client command
//!   except `452 4.5.3 too many recipients` (as Postfix, so a legitimate client with a
//!   long list is not cut off) and store failures (not the client's fault).
//! - HELO/EHLO replies carry no enhanced status code (RFC 2034 §3); all other replies
//!   after the greeting do, except `354`, which is not 2xx/4xx/5xx.
//! - The end of DATA refuses, in this order: a bare CR or LF (`550 5.5.2 Error: bare
//!   <LF> received` or `<CR>`), then a NUL byte (`550 5.6.0 Error: message contains NUL
//!   character`), then the size (`552 5.3.4`); each counts as an error and nothing is
//!   stored. A bare line end comes first because it is the smuggling signal.
//! - A limit of `0` in [`SessionPolicy`] for size, recipients or errors means "none".
//! - STARTTLS (RFC 3207): the reply `220` is followed by [`Action::StartTls`], and every
//!   byte the client sent after the command line is discarded, never executed (the
//!   CVE-2011-0411 class of command injection); the actor must not feed bytes again until
//!   it calls [`Session::tls_started`], which resets the session to just after the
//!   greeting (EHLO again; STARTTLS no longer offered; AUTH offered).
//! - AUTH PLAIN and LOGIN (RFC 4954) are offered and accepted only over TLS (`530 5.7.0`
//!   before); the credentials go out in [`Action::Authenticate`] with the password as a
//!   [`Secret`] (never printed by `Debug`), and [`Session::authenticated`] answers. A
//!   failure is `535 5.7.8` and counts toward `hard_error_limit`; slowing failures down
//!   is the actor's business (it owns time). An authenticated client may relay when
//!   `SessionPolicy::auth_relay` says so.
//!
//! No tokio, no sockets, no clock (time comes in as `now`), no store access.

pub mod driver;
pub mod received;
pub mod relay;

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use crate::protocol::address::parse_domain;
use crate::protocol::{
    auth, parse_command, BareNewline, Body, Command, CommandError, DataDecoder, DataOutcome,
    LineEvent, LineReader, MailParams, Path, RcptParams, Reply,
};
pub use crate::protocol::{ForwardPath, Mailbox, ReversePath, Secret};
pub use relay::{client_is_relay_authorised, relay_trick, RelayTrick};

/// What the session needs to know about the server's configuration (built by the actor
/// from `Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy {
    /// `server_smtp_name`: in the greeting, EHLO, `Received:` and 421 replies.
    pub hostname: String,
    /// `server_smtp_greeting`: the greeting is `220 <hostname> ESMTP <greeting>`.
    pub greeting: String,
    /// Largest message accepted, octets after dot-unstuffing (`SIZE` advertised; 552
    /// 5.3.4 at `MAIL SIZE=` and after the dot). 0: no limit.
    pub max_message_size: u64,
    /// Recipients per message; more get 452 4.5.3. 0: no limit.
    pub max_recipients: usize,
    /// Errors before `421 4.7.0 <host> Error: too many errors` and close. 0: no limit.
    pub hard_error_limit: u32,
    /// A message with more `Received:` headers than this gets 554 5.4.0.
    pub max_hops: u32,
    /// Whether this client may relay (from [`client_is_relay_authorised`]).
    pub relay_authorised: bool,
    /// Longest command line accepted, octets including CRLF (at least 512, RFC 5321
    /// §4.5.3.1.4; Postfix reads 2048).
    pub max_line_length: usize,
    /// STARTTLS can be offered: a certificate is configured and loaded.
    pub tls_available: bool,
    /// A client that authenticated with SMTP AUTH may relay (`server_smtp_relay_auth`).
    pub auth_relay: bool,
}

impl SessionPolicy {
    /// REFERENCE's defaults (ErlMail's and Postfix's) for `hostname`, not authorised.
    pub fn with_defaults(hostname: impl Into<String>) -> Self {
        SessionPolicy {
            hostname: hostname.into(),
            greeting: "erlmail".to_string(),
            max_message_size: 10_240_000,
            max_recipients: 100,
            hard_error_limit: 20,
            max_hops: 50,
            relay_authorised: false,
            max_line_length: 2048,
            tls_available: false,
            auth_relay: true,
        }
    }
}

/// The client end of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Client address as the socket reports it (may be IPv4-mapped IPv6).
    pub ip: IpAddr,
    /// Client port.
    pub port: u16,
}

/// What the actor must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these reply bytes (CRLF-terminated, possibly several replies).
    Send(Vec<u8>),
    /// Ask the store about this recipient, then call [`Session::recipient_info`].
    /// Always the last action of its batch.
    LookupRecipient(ForwardPath),
    /// Commit this message durably, then call [`Session::stored`].
    /// Always the last action of its batch.
    Store(Transaction),
    /// Close the connection once everything before has been written.
    Close,
    /// Write what came before (the `220` to STARTTLS), discard any input not yet fed,
    /// perform the TLS handshake, then call [`Session::tls_started`] (or close the
    /// connection if the handshake fails). Always the last action of its batch.
    StartTls,
    /// Check these credentials against the store's users, then call
    /// [`Session::authenticated`]. Always the last action of its batch. Never log it
    /// beyond the user name; the password's `Debug` is redacted.
    Authenticate {
        /// The user name given (an address such as `alice@example.com`).
        user: String,
        /// The password given.
        password: Secret,
    },
}

/// The store's answer to [`Action::LookupRecipient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientInfo {
    /// The domain is one of ours.
    pub local_domain: bool,
    /// The user exists in that domain (meaningless when the domain is not local).
    pub user_exists: bool,
    /// The look-up itself failed (store unreachable): answer 451, never a permanent
    /// verdict, so the client tries again later.
    pub temporary_failure: bool,
}

/// The store's answer to [`Action::Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Committed durably: `250 2.0.0 Ok: queued as <id>`.
    Stored {
        /// The name shown to the client, if the store has one.
        queue_id: Option<String>,
    },
    /// Nothing was stored: `451 4.3.0 Error: queue file write error`.
    Failed,
    /// Nothing was stored, out of space: `452 4.3.1 Insufficient system storage`.
    DiskFull,
    /// Refused by policy (a DMARC `p=reject` failure): `550` with this text.
    Refused(String),
}

/// One accepted recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecipient {
    /// Where to deliver.
    pub path: ForwardPath,
    /// Local user (INBOX) rather than remote (outgoing queue).
    pub local: bool,
    /// Raw `NOTIFY=` value, upper-cased.
    pub notify: Option<String>,
    /// Raw `ORCPT=` value.
    pub orcpt: Option<String>,
}

/// Everything the store needs to keep an accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Envelope sender; `ReversePath::Null` for `<>`.
    pub reverse_path: ReversePath,
    /// Accepted recipients, in RCPT order, without duplicates.
    pub recipients: Vec<AcceptedRecipient>,
    /// `RET=FULL|HDRS`.
    pub ret: Option<String>,
    /// `ENVID=` xtext.
    pub envid: Option<String>,
    /// `BODY=8BITMIME` was given.
    pub body_8bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// The HELO/EHLO argument.
    pub helo: String,
    /// The client address, as the socket reported it.
    pub client_ip: IpAddr,
    /// The client may relay (listed in `server_smtp_relay_clients` or authenticated):
    /// its mail is not put through the SPF/DKIM/DMARC checks.
    pub trusted: bool,
    /// Decoded `Subject:` header, for mailbox listings; `None` when no recipient is
    /// local (relayed mail keeps no subject of its own).
    pub subject: Option<String>,
    /// The message: our `Received:` header, then the client's text, dots unstuffed,
    /// CRLF line ends.
    pub data: Vec<u8>,
}

#[derive(Debug)]
enum Mode {
    /// Reading command lines.
    Command,
    /// Reading the DATA section.
    Data(DataDecoder),
    /// Waiting for `recipient_info` about this recipient.
    AwaitRecipient(PendingRcpt),
    /// Waiting for `stored`.
    AwaitStore,
    /// Waiting for `tls_started`; input is discarded.
    AwaitTls,
    /// Waiting for the PLAIN response after `334 `.
    AuthPlain,
    /// Waiting for the LOGIN user name after `334 VXNlcm5hbWU6`.
    AuthLoginUser,
    /// Waiting for the LOGIN password after `334 UGFzc3dvcmQ6`; holds the user name.
    AuthLoginPassword(String),
    /// Waiting for `authenticated` about this user.
    AwaitAuth(String),
    /// Done: nothing more is read or sent.
    Closed,
}

#[derive(Debug)]
struct PendingRcpt {
    path: ForwardPath,
    params: RcptParams,
}

#[derive(Debug)]
struct Helo {
    name: String,
    esmtp: bool,
}

/// The transaction being built between MAIL and the end of DATA.
#[derive(Debug)]
struct Envelope {
    reverse_path: ReversePath,
    params: MailParams,
    recipients: Vec<AcceptedRecipient>,
    /// Some RCPT was tried (tells "need RCPT" from "no valid recipients" at DATA).
    rcpt_seen: bool,
}

/// One SMTP server session. See the module documentation for the protocol with the actor.
#[derive(Debug)]
pub struct Session {
    policy: SessionPolicy,
    peer: PeerInfo,
    /// Input not yet processed starts at `pos`.
    input: Vec<u8>,
    pos: usize,
    lines: LineReader,
    mode: Mode,
    helo: Option<Helo>,
    envelope: Option<Envelope>,
    errors: u32,
    /// The connection is encrypted (after STARTTLS, or an implicit-TLS listener).
    tls: bool,
    /// The TLS protocol and cipher, for the `Received:` header (see
    /// [`Session::set_tls_summary`]).
    tls_summary: Option<String>,
    /// The user who authenticated with AUTH, if any.
    user: Option<String>,
    /// Stress mode: the error limit is 1 (see [`Session::set_stress`]).
    stress: bool,
}

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

/// Appends reply bytes, merging with a preceding `Send` so a pipelined batch is written
/// at once.
fn send(out: &mut Vec<Action>, bytes: Vec<u8>) {
    if let Some(Action::Send(prev)) = out.last_mut() {
        prev.extend_from_slice(&bytes);
    } else {
        out.push(Action::Send(bytes));
    }
}

impl Session {
    /// A new session for `peer`, in the state right after connection.
    pub fn new(policy: SessionPolicy, peer: PeerInfo) -> Self {
        Session {
            lines: LineReader::new(policy.max_line_length),
            policy,
            peer,
            input: Vec::new(),
            pos: 0,
            mode: Mode::Command,
            helo: None,
            envelope: None,
            errors: 0,
            tls: false,
            tls_summary: None,
            user: None,
            stress: false,
        }
    }

    /// What the connection negotiated (`TLSv1.3 with cipher TLS_AES_256_GCM_SHA384
    /// (256/256 bits)`), once encrypted: written in the `Received:` header.
    pub fn set_tls_summary(&mut self, summary: Option<String>) {
        self.tls_summary = summary;
    }

    /// A session on a connection that is encrypted from the start (implicit TLS, e.g.
    /// port 465): STARTTLS is not offered, AUTH is.
    pub fn new_tls(policy: SessionPolicy, peer: PeerInfo) -> Self {
        let mut s = Session::new(policy, peer);
        s.tls = true;
        s
    }

    /// The `220 <hostname> ESMTP <greeting>` banner, to write before reading.
    pub fn greeting(&mut self) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        let text = format!("{} ESMTP {}", self.policy.hostname, self.policy.greeting);
        vec![Action::Send(Reply::new(220, text.trim_end()).to_bytes())]
    }

    /// Feeds bytes read from the client; returns what to do. While an answer
    /// (`recipient_info`/`stored`) is due, only buffers and returns nothing.
    pub fn receive(&mut self, bytes: &[u8], now: DateTime<Utc>) -> Vec<Action> {
        if self.is_closed() || matches!(self.mode, Mode::AwaitTls) {
            // During the upgrade nothing read in plain text may survive into the TLS
            // session: drop it.
            return Vec::new();
        }
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        self.run(&mut out, now);
        out
    }

    /// The answer to [`Action::LookupRecipient`]; replies to that RCPT and resumes
    /// buffered input. Ignored (empty) if no lookup is pending.
    pub fn recipient_info(&mut self, info: RecipientInfo, now: DateTime<Utc>) -> Vec<Action> {
        let pending = match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::AwaitRecipient(p) => p,
            other => {
                self.mode = other;
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        let raw = &pending.path.raw;
        if info.temporary_failure {
            let r = Reply::new(451, format!("4.3.0 <{raw}>: Temporary lookup failure"));
            self.error(&mut out, r);
            self.run(&mut out, now);
            return out;
        }
        let local = match (info.local_domain, info.user_exists) {
            (true, true) => Some(true),
            (true, false) => None,
            (false, _) if self.may_relay() => Some(false),
            (false, _) => {
                let r = Reply::new(554, format!("5.7.1 <{raw}>: Relay access denied"));
                self.error(&mut out, r);
                self.run(&mut out, now);
                return out;
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
                self.reply(&mut out, Reply::new(250, "2.1.5 Ok"));
            }
            (None, _) => {
                let r = Reply::new(
                    550,
                    format!("5.1.1 <{raw}>: Recipient address rejected: User unknown"),
                );
                self.error(&mut out, r);
            }
            // Cannot happen: a lookup is only asked inside a transaction, and nothing
            // ends the transaction while it is pending.
            (Some(_), None) => {
                self.error(&mut out, Reply::new(503, "5.5.1 Error: need MAIL command"))
            }
        }
        self.run(&mut out, now);
        out
    }

    /// The answer to [`Action::Store`]; replies to the end of DATA and resumes buffered
    /// input. Ignored (empty) if no store is pending.
    pub fn stored(&mut self, result: StoreOutcome, now: DateTime<Utc>) -> Vec<Action> {
        if !matches!(self.mode, Mode::AwaitStore) {
            return Vec::new();
        }
        self.mode = Mode::Command;
        let mut out = Vec::new();
        let reply = match result {
            StoreOutcome::Stored { queue_id: Some(id) } => {
                Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
            }
            StoreOutcome::Stored { queue_id: None } => Reply::new(250, "2.0.0 Ok: queued"),
            StoreOutcome::Failed => Reply::new(451, "4.3.0 Error: queue file write error"),
            StoreOutcome::DiskFull => Reply::new(452, "4.3.1 Insufficient system storage"),
            StoreOutcome::Refused(text) => Reply::new(550, text),
        };
        self.reply(&mut out, reply);
        self.run(&mut out, now);
        out
    }

    /// The TLS handshake after [`Action::StartTls`] succeeded: the session starts over as
    /// RFC 3207 §4.2 requires (no HELO, no transaction, not authenticated, nothing
    /// buffered); the client must send EHLO again. No reply is sent. Ignored (empty) if
    /// no upgrade is pending.
    pub fn tls_started(&mut self) -> Vec<Action> {
        if !matches!(self.mode, Mode::AwaitTls) {
            return Vec::new();
        }
        self.mode = Mode::Command;
        self.tls = true;
        self.helo = None;
        self.envelope = None;
        self.user = None;
        self.input = Vec::new();
        self.pos = 0;
        self.lines = LineReader::new(self.policy.max_line_length);
        Vec::new()
    }

    /// The answer to [`Action::Authenticate`]: `235 2.7.0` and the user is logged in,
    /// or `535 5.7.8` (counted as an error). Resumes buffered input. Ignored (empty) if
    /// no check is pending.
    pub fn authenticated(&mut self, ok: bool, now: DateTime<Utc>) -> Vec<Action> {
        let user = match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::AwaitAuth(user) => user,
            other => {
                self.mode = other;
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        if ok {
            self.user = Some(user);
            self.reply(&mut out, Reply::new(235, "2.7.0 Authentication successful"));
        } else {
            self.error(&mut out, auth_failed());
        }
        self.run(&mut out, now);
        out
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether this client may send to remote recipients now: by address
    /// (`server_smtp_relay_clients`) or by AUTH (when `auth_relay`).
    pub fn may_relay(&self) -> bool {
        self.policy.relay_authorised || (self.user.is_some() && self.policy.auth_relay)
    }

    /// The idle timeout fired: `421 4.4.2 <host> Error: timeout exceeded`, then close.
    pub fn timeout(&mut self) -> Vec<Action> {
        let text = format!("4.4.2 {} Error: timeout exceeded", self.policy.hostname);
        self.close_now(Reply::new(421, text))
    }

    /// The server is stopping: `421 4.3.2 <host> Service shutting down`, then close.
    pub fn shutdown(&mut self) -> Vec<Action> {
        let text = format!("4.3.2 {} Service shutting down", self.policy.hostname);
        self.close_now(Reply::new(421, text))
    }

    /// Whether the session has ended (after `Close` was emitted).
    pub fn is_closed(&self) -> bool {
        matches!(self.mode, Mode::Closed)
    }

    /// Whether the session waits for `recipient_info` or `stored`.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self.mode,
            Mode::AwaitRecipient(_) | Mode::AwaitStore | Mode::AwaitTls | Mode::AwaitAuth(_)
        )
    }

    /// Whether the session is inside DATA (useful for the actor's logging).
    pub fn in_data(&self) -> bool {
        matches!(self.mode, Mode::Data(_))
    }

    /// Errors counted so far toward `hard_error_limit`.
    pub fn error_count(&self) -> u32 {
        self.errors
    }

    /// Input received but not yet processed: a partial command line, or commands waiting
    /// behind an answer from outside. The actor keeps the read deadline of a partial line
    /// instead of starting a new one, so a line that trickles in byte by byte still has
    /// to arrive within one timeout.
    pub fn buffered(&self) -> usize {
        self.input.len() - self.pos
    }

    /// Stress mode (Postfix's): while on, the first error closes the session (error limit
    /// 1); off restores `policy.hard_error_limit`. A session already past the limit is
    /// closed at its next error.
    pub fn set_stress(&mut self, on: bool) {
        self.stress = on;
    }

    /// The answer to [`Action::Authenticate`] when the client's address has too many
    /// failed attempts (the actor's rate limit, not this password): `454 4.7.0`, counted
    /// as an error; no password was checked. Resumes buffered input. Ignored (empty) if no
    /// check is pending.
    pub fn auth_throttled(&mut self, now: DateTime<Utc>) -> Vec<Action> {
        if !matches!(self.mode, Mode::AwaitAuth(_)) {
            return Vec::new();
        }
        self.mode = Mode::Command;
        let mut out = Vec::new();
        let text = format!(
            "4.7.0 Error: too many failed authentications from {}; try again later",
            self.peer.ip
        );
        self.error(&mut out, Reply::new(454, text));
        self.run(&mut out, now);
        out
    }

    /// The client this session serves.
    pub fn peer(&self) -> PeerInfo {
        self.peer
    }

    /// The policy this session runs under.
    pub fn policy(&self) -> &SessionPolicy {
        &self.policy
    }

    fn close_now(&mut self, reply: Reply) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.close_with(&mut out, reply);
        out
    }

    fn close_with(&mut self, out: &mut Vec<Action>, reply: Reply) {
        send(out, reply.to_bytes());
        out.push(Action::Close);
        self.mode = Mode::Closed;
        self.input = Vec::new();
        self.pos = 0;
    }

    fn reply(&mut self, out: &mut Vec<Action>, reply: Reply) {
        send(out, reply.to_bytes());
    }

    /// Sends an error reply and enforces the hard error limit.
    fn error(&mut self, out: &mut Vec<Action>, reply: Reply) {
        self.reply(out, reply);
        self.errors += 1;
        let limit = if self.stress {
            1
        } else {
            self.policy.hard_error_limit
        };
        if limit > 0 && self.errors >= limit {
            let text = format!("4.7.0 {} Error: too many errors", self.policy.hostname);
            self.close_with(out, Reply::new(421, text));
        }
    }

    /// Processes buffered input until it runs out or an answer from outside is needed.
    fn run(&mut self, out: &mut Vec<Action>, now: DateTime<Utc>) {
        loop {
            match &mut self.mode {
                Mode::Closed
                | Mode::AwaitRecipient(_)
                | Mode::AwaitStore
                | Mode::AwaitTls
                | Mode::AwaitAuth(_) => break,
                Mode::AuthPlain | Mode::AuthLoginUser | Mode::AuthLoginPassword(_) => {
                    let start = self.pos;
                    let (n, event) = self.lines.next(&self.input[start..]);
                    self.pos += n;
                    match event {
                        None => break,
                        Some(LineEvent::Line(range)) => {
                            let line = self.input[start + range.start..start + range.end].to_vec();
                            self.auth_response(&line, out);
                        }
                        Some(_) => {
                            // Too long or a bare line end: the exchange is over.
                            self.mode = Mode::Command;
                            self.error(out, Reply::new(501, "5.5.2 Cannot decode response"));
                        }
                    }
                }
                Mode::Data(decoder) => {
                    let (n, done) = decoder.feed(&self.input[self.pos..]);
                    self.pos += n;
                    if !done {
                        break;
                    }
                    if let Mode::Data(decoder) = std::mem::replace(&mut self.mode, Mode::Command) {
                        self.end_of_data(decoder.finish(), out, now);
                    }
                }
                Mode::Command => {
                    let start = self.pos;
                    let (n, event) = self.lines.next(&self.input[start..]);
                    self.pos += n;
                    match event {
                        None => break,
                        Some(LineEvent::Line(range)) => {
                            let parsed =
                                parse_command(&self.input[start + range.start..start + range.end]);
                            // Bytes already here behind the line were sent before its
                            // reply: pipelined.
                            let pipelined = self.pos < self.input.len();
                            self.command(parsed, pipelined, out);
                        }
                        Some(LineEvent::TooLong) => {
                            self.error(out, Reply::new(500, "5.5.2 Error: command too long"));
                        }
                        Some(LineEvent::BareLf) => {
                            self.error(out, Reply::new(550, "5.5.2 Error: bare <LF> received"));
                        }
                        Some(LineEvent::BareCr) => {
                            self.error(out, Reply::new(550, "5.5.2 Error: bare <CR> received"));
                        }
                    }
                }
            }
        }
        self.compact();
    }

    /// Drops processed input, without shifting large buffers on every command.
    fn compact(&mut self) {
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        } else if self.pos > 4096 && self.pos * 2 > self.input.len() {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Runs one command line; `pipelined` says more input was already buffered behind it.
    fn command(
        &mut self,
        parsed: Result<Command, CommandError>,
        pipelined: bool,
        out: &mut Vec<Action>,
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
            Command::Data => self.data(out),
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

    fn auth(&mut self, mechanism: &str, initial: Option<Secret>, out: &mut Vec<Action>) {
        if !self.tls {
            let r = Reply::new(530, "5.7.0 Must issue a STARTTLS command first");
            return self.error(out, r);
        }
        if self.helo.is_none() {
            return self.error(out, Reply::new(503, "5.5.1 Error: send HELO/EHLO first"));
        }
        if self.user.is_some() {
            return self.error(out, Reply::new(503, "5.5.1 Error: already authenticated"));
        }
        if self.envelope.is_some() {
            let r = Reply::new(503, "5.5.1 Error: MAIL transaction in progress");
            return self.error(out, r);
        }
        match (mechanism, initial) {
            ("PLAIN", Some(response)) => self.auth_plain(response.expose(), out),
            ("PLAIN", None) => {
                self.mode = Mode::AuthPlain;
                self.reply(out, Reply::new(334, ""));
            }
            ("LOGIN", Some(user)) => self.auth_login_user(user.expose(), out),
            ("LOGIN", None) => {
                self.mode = Mode::AuthLoginUser;
                self.reply(out, Reply::new(334, auth::LOGIN_USERNAME_PROMPT));
            }
            _ => self.error(
                out,
                Reply::new(504, "5.5.4 Unrecognized authentication type"),
            ),
        }
    }

    /// One line of a SASL exchange, in an `Auth*` mode.
    fn auth_response(&mut self, line: &[u8], out: &mut Vec<Action>) {
        let mode = std::mem::replace(&mut self.mode, Mode::Command);
        if auth::is_cancel(line) {
            return self.error(out, Reply::new(501, "5.7.0 Authentication aborted"));
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return self.error(out, Reply::new(501, "5.5.2 Cannot decode response"));
        };
        match mode {
            Mode::AuthPlain => self.auth_plain(text, out),
            Mode::AuthLoginUser => self.auth_login_user(text, out),
            Mode::AuthLoginPassword(user) => match auth::decode_text(text) {
                Some(password) => self.request_auth(user, Secret(password), out),
                None => self.error(out, Reply::new(501, "5.5.2 Cannot decode response")),
            },
            other => self.mode = other,
        }
    }

    fn auth_plain(&mut self, response: &str, out: &mut Vec<Action>) {
        // `=` is an empty initial response (RFC 4954 §4), which PLAIN cannot use.
        match auth::decode_plain(response) {
            Some((user, password)) => self.request_auth(user, password, out),
            None => self.error(out, Reply::new(501, "5.5.2 Cannot decode response")),
        }
    }

    fn auth_login_user(&mut self, response: &str, out: &mut Vec<Action>) {
        match auth::decode_text(response) {
            Some(user) if !user.is_empty() => {
                self.mode = Mode::AuthLoginPassword(user);
                self.reply(out, Reply::new(334, auth::LOGIN_PASSWORD_PROMPT));
            }
            _ => self.error(out, Reply::new(501, "5.5.2 Cannot decode response")),
        }
    }

    fn request_auth(&mut self, user: String, password: Secret, out: &mut Vec<Action>) {
        out.push(Action::Authenticate {
            user: user.clone(),
            password,
        });
        self.mode = Mode::AwaitAuth(user);
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

    fn data(&mut self, out: &mut Vec<Action>) {
        let reply = match &self.envelope {
            None => Reply::new(503, "5.5.1 Error: need MAIL command"),
            Some(env) if !env.rcpt_seen => Reply::new(503, "5.5.1 Error: need RCPT command"),
            Some(env) if env.recipients.is_empty() => {
                Reply::new(554, "5.5.1 Error: no valid recipients")
            }
            Some(_) => {
                self.mode = Mode::Data(DataDecoder::new(self.policy.max_message_size));
                return self.reply(out, Reply::new(354, "End data with <CR><LF>.<CR><LF>"));
            }
        };
        self.error(out, reply);
    }

    fn end_of_data(&mut self, outcome: DataOutcome, out: &mut Vec<Action>, now: DateTime<Utc>) {
        // The transaction ends here whatever the outcome; HELO is kept.
        let (Some(env), Some(helo)) = (self.envelope.take(), self.helo.as_ref()) else {
            return self.error(out, Reply::new(503, "5.5.1 Error: need MAIL command"));
        };
        let body = match outcome {
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
            DataOutcome::Message(body) => body,
        };
        if received::hop_count(&body) > self.policy.max_hops as usize {
            return self.error(out, Reply::new(554, "5.4.0 Error: too many hops"));
        }
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
        let header = received::received_header(
            &helo.name,
            self.peer.ip,
            &self.policy.hostname,
            protocol,
            self.tls_summary.as_deref(),
            single.as_deref(),
            now,
        );
        let mut data = Vec::with_capacity(header.len() + body.len());
        data.extend_from_slice(header.as_bytes());
        data.extend_from_slice(&body);
        // Only a local copy keeps its subject (for mailbox listings): relayed mail need
        // not have its header parsed.
        let subject = if env.recipients.iter().any(|r| r.local) {
            received::subject(&body)
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

fn auth_failed() -> Reply {
    Reply::new(535, "5.7.8 Error: authentication failed")
}

/// A UTF-8 address in a transaction that did not declare SMTPUTF8 (RFC 6531 §3.4),
/// in Postfix's words.
fn unicode_without_smtputf8() -> Reply {
    Reply::new(553, "5.6.7 Must declare SMTPUTF8 to send unicode address")
}

fn too_big() -> Reply {
    Reply::new(552, "5.3.4 Message size exceeds fixed limit")
}

#[cfg(test)]
mod tests;
