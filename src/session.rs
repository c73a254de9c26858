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
//! client that keeps to the pipelining rules (see [`commands`]) the output is the same
//! however its input is split (tested by `tests::split_invariance`).
//!
//! Decisions kept in one place:
//! - Errors counted toward `hard_error_limit`: every 4xx/5xx reply to a client command
//!   except `452 4.5.3 too many recipients` (as Postfix, so a legitimate client with a
//!   long list is not cut off) and store failures (not the client's fault).
//! - HELO/EHLO replies carry no enhanced status code (RFC 2034 §3); all other replies
//!   after the greeting do, except `354`, which is not 2xx/4xx/5xx.
//! - A limit of `0` in [`SessionPolicy`] for size, recipients or errors means "none".
//! - STARTTLS (RFC 3207): the reply `220` is followed by [`Action::StartTls`], and every
//!   byte the client sent after the command line is discarded, never executed (the
//!   CVE-2011-0411 class of command injection); the actor must not feed bytes again until
//!   it calls [`Session::tls_started`], which resets the session to just after the
//!   greeting (EHLO again; STARTTLS no longer offered; AUTH offered).
//! - AUTH (see [`sasl`]): a failure is `535 5.7.8` and counts toward `hard_error_limit`.
//!   An authenticated client may relay when `SessionPolicy::auth_relay` says so.
//!
//! Layout: `types.rs` (policy, actions, answers), `commands.rs` (the SMTP commands),
//! `sasl.rs` (AUTH), `received.rs` (the `Received:` header), `relay.rs` (who may relay),
//! `driver.rs` (a synchronous loop for tests and fuzzing).
//!
//! No tokio, no sockets, no clock (time comes in as `now`), no store access.

mod commands;
pub mod driver;
pub mod received;
pub mod relay;
mod sasl;
mod types;

use chrono::{DateTime, Utc};

use crate::protocol::{DataDecoder, LineEvent, LineReader, MailParams, RcptParams, Reply};
pub use crate::protocol::{ForwardPath, Mailbox, ReversePath, Secret};
pub use relay::{client_is_relay_authorised, relay_trick, RelayTrick};
pub use types::{
    AcceptedRecipient, Action, PeerInfo, RecipientInfo, SessionPolicy, StoreOutcome, Transaction,
};

/// What the session is reading, or which answer from outside it waits for.
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

/// A RCPT waiting for the store's verdict.
#[derive(Debug)]
struct PendingRcpt {
    path: ForwardPath,
    params: RcptParams,
}

/// What the client said in HELO or EHLO.
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
        let mut out = Vec::new();
        let bytes = self.feed_data_directly(bytes, &mut out);
        self.input.extend_from_slice(bytes);
        self.run(&mut out, now);
        out
    }

    /// Message text that arrives with nothing else buffered goes straight to the DATA
    /// decoder rather than through the input buffer (one copy of a message's text fewer);
    /// what follows the end of DATA is returned, to be buffered as usual. The verdict is
    /// the same either way: the decoder is a byte-level machine.
    fn feed_data_directly<'a>(&mut self, bytes: &'a [u8], out: &mut Vec<Action>) -> &'a [u8] {
        if self.pos != self.input.len() {
            return bytes;
        }
        let Mode::Data(decoder) = &mut self.mode else {
            return bytes;
        };
        let (n, done) = decoder.feed(bytes);
        if done {
            if let Mode::Data(decoder) = std::mem::replace(&mut self.mode, Mode::Command) {
                self.end_of_data(decoder, out);
            }
        }
        &bytes[n..]
    }

    /// The answer to [`Action::LookupRecipient`]; replies to that RCPT and resumes
    /// buffered input. Ignored (empty) if no lookup is pending.
    pub fn recipient_info(&mut self, info: RecipientInfo, now: DateTime<Utc>) -> Vec<Action> {
        let take = |mode| match mode {
            Mode::AwaitRecipient(pending) => Ok(pending),
            other => Err(other),
        };
        self.answer(now, take, |s, pending, out| {
            s.rcpt_verdict(pending, info, out)
        })
    }

    /// The answer to [`Action::Store`]; replies to the end of DATA and resumes buffered
    /// input. Ignored (empty) if no store is pending.
    pub fn stored(&mut self, result: StoreOutcome, now: DateTime<Utc>) -> Vec<Action> {
        let take = |mode| match mode {
            Mode::AwaitStore => Ok(()),
            other => Err(other),
        };
        self.answer(now, take, |s, (), out| {
            let reply = match result {
                StoreOutcome::Stored { queue_id: Some(id) } => {
                    Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
                }
                StoreOutcome::Stored { queue_id: None } => Reply::new(250, "2.0.0 Ok: queued"),
                StoreOutcome::Failed => Reply::new(451, "4.3.0 Error: queue file write error"),
                StoreOutcome::DiskFull => Reply::new(452, "4.3.1 Insufficient system storage"),
                StoreOutcome::Refused(text) => Reply::new(550, text),
            };
            s.reply(out, reply);
        })
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
        let take = |mode| match mode {
            Mode::AwaitAuth(user) => Ok(user),
            other => Err(other),
        };
        self.answer(now, take, |s, user, out| {
            if ok {
                s.user = Some(user);
                s.reply(out, Reply::new(235, "2.7.0 Authentication successful"));
            } else {
                s.error(out, sasl::auth_failed());
            }
        })
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
        let take = |mode| match mode {
            Mode::AwaitAuth(_) => Ok(()),
            other => Err(other),
        };
        self.answer(now, take, |s, (), out| {
            let text = format!(
                "4.7.0 Error: too many failed authentications from {}; try again later",
                s.peer.ip
            );
            s.error(out, Reply::new(454, text));
        })
    }

    /// The client this session serves.
    pub fn peer(&self) -> PeerInfo {
        self.peer
    }

    /// The policy this session runs under.
    pub fn policy(&self) -> &SessionPolicy {
        &self.policy
    }

    /// An answer from outside: leaves the waiting mode `take` accepts (taking what it
    /// held), lets `act` reply, then resumes buffered input. Empty, with the mode left as
    /// it was, when the session is not waiting for this answer.
    fn answer<T>(
        &mut self, now: DateTime<Utc>, take: impl FnOnce(Mode) -> Result<T, Mode>,
        act: impl FnOnce(&mut Self, T, &mut Vec<Action>),
    ) -> Vec<Action> {
        let held = match take(std::mem::replace(&mut self.mode, Mode::Command)) {
            Ok(held) => held,
            Err(mode) => {
                self.mode = mode;
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        act(self, held, &mut out);
        self.run(&mut out, now);
        out
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
                    match self.next_line() {
                        None => break,
                        Some(LineEvent::Line(range)) => {
                            let line = self.input[range].to_vec();
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
                        self.end_of_data(decoder, out);
                    }
                }
                Mode::Command => {
                    match self.next_line() {
                        None => break,
                        Some(LineEvent::Line(range)) => {
                            let parsed = crate::protocol::parse_command(&self.input[range]);
                            // Bytes already here behind the line were sent before its
                            // reply: pipelined.
                            let pipelined = self.pos < self.input.len();
                            self.command(parsed, pipelined, out, now);
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

    /// Takes the next line from the buffer, its range counted in `input`: `None` while no
    /// whole line is buffered.
    fn next_line(&mut self) -> Option<LineEvent> {
        let start = self.pos;
        let (n, event) = self.lines.next(&self.input[start..]);
        self.pos += n;
        event.map(|event| match event {
            LineEvent::Line(range) => LineEvent::Line(start + range.start..start + range.end),
            other => other,
        })
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
}

#[cfg(test)]
mod tests;
