//! The SMTP client dialogue for one message and one next hop: try each host in order
//! (refused connections, 4xx/5xx greetings and session-level 4xx move on to the next
//! host; a failed TLS handshake retries that host in plain text unless TLS is
//! required), then `MAIL FROM`, one `RCPT TO` per recipient with its own result, and DATA
//! only when some recipient was accepted, all in one pipelined write where the host
//! offers PIPELINING. A host's session comes from the connection cache when it holds a
//! live one, else from `connection::open`; a transaction that ends cleanly leaves the
//! session in the cache for the next message. Nothing here decides about retries.
//!
//! Written over tokio rather than with mail-send's `SmtpClient` because that client
//! stops at the first refused `RCPT TO`: a message gets one error for all its
//! recipients, where the queue and the DSNs need a result per recipient. Lesser
//! reasons: its `write_message` does not stuff a dot on the first line and adds a blank
//! line before the terminator, and its reader drops bytes after a reply, which
//! pipelining cannot afford.

use std::net::SocketAddr;
use std::sync::OnceLock;

use super::cache::{CacheKey, CacheLimits, ConnectionCache};
use super::connection::{open, spawn_quit, ConnError, DeliveryOptions, Hop, HostError, Session};
use super::envelope::{mail_command, rcpt_command, Envelope};
use super::seven_bit;
use super::wire::{data_payload, offers};
use crate::protocol::Reply;
use crate::queue::outcome::{classify_reply, FailureCause, Outcome, RcptStatus};

/// One recipient's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    /// The recipient address as given.
    pub rcpt: String,
    /// Delivered, temporary or permanent, with the reply or reason.
    pub status: RcptStatus,
    /// The name of the host whose answer decided the status (`Remote-MTA`), if any.
    pub remote_mta: Option<String>,
    /// That host's address.
    pub remote_addr: Option<SocketAddr>,
    /// Whether that session ran over TLS.
    pub tls: bool,
    /// The host that decided the status offered DSN, so it was given the recipient's
    /// `NOTIFY` and `ORCPT`: reports of success from here on are its to send.
    pub dsn: bool,
}

impl RcptResult {
    /// `rcpt` failed for `cause` before any session decided it; `answered_by` is the
    /// host whose reply the cause is, if it is one.
    pub(crate) fn failed(rcpt: &str, cause: FailureCause, answered_by: Option<&Hop>) -> Self {
        RcptResult {
            rcpt: rcpt.to_string(),
            status: RcptStatus::failed(cause),
            remote_mta: answered_by.map(|h| h.host.clone()),
            remote_addr: answered_by.map(|h| h.addr),
            tls: false,
            dsn: false,
        }
    }
}

/// The outcome of one `deliver` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// One result per recipient, in the order given.
    pub results: Vec<RcptResult>,
    /// The host whose session decided the results (None when no host got that far).
    pub remote: Option<Hop>,
    /// Whether that session used TLS.
    pub tls: bool,
    /// Hosts given up on before, and why (for logs and the queue's last error).
    pub skipped: Vec<(Hop, FailureCause)>,
}

/// Delivers one message to `rcpts` through the first of `hops` that takes the
/// transaction. `sender` may be empty (`MAIL FROM:<>`). `body` is the message as
/// queued; it is sent with CRLF line ends and dot-stuffing.
///
/// With a `cache`, a host's idle connection from an earlier delivery is used when there
/// is one, and a connection that ends its transaction cleanly is left there for the
/// next; without one every call opens its own connections and QUITs them.
pub async fn deliver(
    hops: &[Hop], helo: &str, sender: &str, rcpts: &[String], body: &[u8], opts: &DeliveryOptions,
    cache: Option<&ConnectionCache>,
) -> DeliveryReport {
    let envelope = Envelope::plain(sender, rcpts);
    deliver_with(hops, helo, &envelope, body, opts, cache, &GoAhead::new()).await
}

/// [`deliver`] with the envelope's parameters, the text sent only while `go_ahead` is
/// given.
pub async fn deliver_with(
    hops: &[Hop], helo: &str, envelope: &Envelope, body: &[u8], opts: &DeliveryOptions,
    cache: Option<&ConnectionCache>, go_ahead: &GoAhead,
) -> DeliveryReport {
    let rcpts = &envelope.addresses();
    let msg = Message {
        helo,
        envelope,
        rcpts,
        body,
        go_ahead,
        eight_bit: seven_bit::has_eight_bit(body),
        needs_smtputf8: envelope.needs_smtputf8(body),
        seven_bit: OnceLock::new(),
    };
    let mut skipped = Vec::new();
    for hop in hops {
        if opts.is_own_address(hop.addr) {
            // The next hop is where erlmail itself listens: the mail would come back.
            tracing::warn!(host = %hop.host, addr = %hop.addr, "next hop is this host's own listening address");
            return failed_at(
                hop,
                rcpts,
                FailureCause::Loop(hop.host.clone()),
                false,
                skipped,
            );
        }
        let mut use_tls = opts.starttls;
        loop {
            match attempt_host(hop, &msg, opts, cache, use_tls).await {
                Ok(s) => return s.into_report(hop, rcpts, skipped),
                Err(HostError::TlsFailed(cause)) if use_tls && !opts.require_tls => {
                    tracing::info!(host = %hop.host, addr = %hop.addr, %cause, "TLS failed; retrying in plain text");
                    use_tls = false;
                }
                Err(HostError::Fatal { cause, tls }) => {
                    // The server refused the sender itself, or the mail cannot go there
                    // at all: all recipients fail alike.
                    return failed_at(hop, rcpts, cause, tls, skipped);
                }
                Err(
                    HostError::Skip { cause }
                    | HostError::TlsFailed(cause)
                    | HostError::Stale(cause),
                ) => {
                    tracing::info!(host = %hop.host, addr = %hop.addr, %cause, "host skipped");
                    skipped.push((hop.clone(), cause));
                    break;
                }
            }
        }
    }
    // No host took the transaction: every recipient shares the last host's failure.
    let (remote, cause) = match skipped.last() {
        Some((hop, cause)) => (Some(hop.clone()), cause.clone()),
        None => (None, FailureCause::Local("no host to deliver to".into())),
    };
    let answered = matches!(cause, FailureCause::Reply(_));
    let answered_by = remote.as_ref().filter(|_| answered);
    let results = rcpts
        .iter()
        .map(|r| RcptResult::failed(r, cause.clone(), answered_by))
        .collect();
    DeliveryReport {
        results,
        remote: None,
        tls: false,
        skipped,
    }
}

/// Every recipient failed alike at `hop` for `cause`.
fn failed_at(
    hop: &Hop, rcpts: &[String], cause: FailureCause, tls: bool, skipped: Vec<(Hop, FailureCause)>,
) -> DeliveryReport {
    SessionResult {
        statuses: vec![RcptStatus::failed(cause); rcpts.len()],
        tls,
        dsn: false,
    }
    .into_report(hop, rcpts, skipped)
}

/// What one `deliver` call hands over: the same for every host tried.
struct Message<'a> {
    helo: &'a str,
    envelope: &'a Envelope,
    rcpts: &'a [String],
    body: &'a [u8],
    go_ahead: &'a GoAhead,
    /// The text holds an octet above 127.
    eight_bit: bool,
    /// Only a hop offering SMTPUTF8 may take it (see `Envelope::needs_smtputf8`).
    needs_smtputf8: bool,
    /// The text made 7-bit for hops without 8BITMIME, worked out once when first needed.
    seven_bit: OnceLock<Result<Option<Vec<u8>>, seven_bit::Unconvertible>>,
}

impl Message<'_> {
    /// The text to send to a hop offering `keywords`, and whether it goes as
    /// `BODY=8BITMIME`; or why it cannot go there at all (RFC 6531 §3.2, RFC 6152).
    fn text_for(&self, keywords: &[String], host: &str) -> Result<(&[u8], bool), FailureCause> {
        if self.needs_smtputf8 && !offers(keywords, "SMTPUTF8") {
            return Err(FailureCause::NotOffered {
                extension: "SMTPUTF8",
                host: host.to_string(),
            });
        }
        if !self.eight_bit {
            return Ok((self.body, false));
        }
        if offers(keywords, "8BITMIME") {
            return Ok((self.body, true));
        }
        // Postfix converts rather than bounce: every 8-bit MIME part quoted-printable.
        match self
            .seven_bit
            .get_or_init(|| seven_bit::to_seven_bit(self.body))
        {
            Ok(Some(converted)) => Ok((converted, false)),
            // 8-bit octets in the header only: sent as they are, as Postfix does.
            Ok(None) => Ok((self.body, false)),
            Err(_) => Err(FailureCause::NotOffered {
                extension: "8BITMIME",
                host: host.to_string(),
            }),
        }
    }
}

/// Permission to send the message text, checked once the server has answered DATA with
/// 354 and before a byte of the text goes out. The sender holds the message's lease and
/// withdraws this when the lease is lost (deleted, held, or taken by another node after
/// it lapsed): the connection is then closed without the text, so the server never gets
/// the message from us. Up to that point nothing is delivered, so stopping is safe.
#[derive(Debug, Clone, Default)]
pub struct GoAhead(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl GoAhead {
    /// Permission given (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Withdraw the permission, for good.
    pub fn withdraw(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the text may still be sent.
    pub fn given(&self) -> bool {
        !self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The per-recipient statuses a session decided.
struct SessionResult {
    statuses: Vec<RcptStatus>,
    tls: bool,
    /// The host offered DSN (the recipients' parameters went with them).
    dsn: bool,
}

impl SessionResult {
    /// The report of a delivery that `hop`'s session decided.
    fn into_report(
        self, hop: &Hop, rcpts: &[String], skipped: Vec<(Hop, FailureCause)>,
    ) -> DeliveryReport {
        let (tls, dsn) = (self.tls, self.dsn);
        let results = rcpts
            .iter()
            .zip(self.statuses)
            .map(|(r, status)| RcptResult {
                rcpt: r.clone(),
                status,
                remote_mta: Some(hop.host.clone()),
                remote_addr: Some(hop.addr),
                tls,
                dsn,
            })
            .collect();
        DeliveryReport {
            results,
            remote: Some(hop.clone()),
            tls,
            skipped,
        }
    }
}

/// One host, one mode (TLS wanted or not): the transaction on a cached connection when
/// there is a live one, else on a fresh one; a cached connection found closed is
/// replaced by a fresh one once.
async fn attempt_host(
    hop: &Hop, msg: &Message<'_>, opts: &DeliveryOptions, cache: Option<&ConnectionCache>,
    use_tls: bool,
) -> Result<SessionResult, HostError> {
    let key = CacheKey {
        addr: hop.addr,
        tls: use_tls,
    };
    if let Some(cache) = cache {
        if let Some(session) = cache.take(key, msg.helo, opts.require_tls) {
            tracing::debug!(
                host = %hop.host,
                addr = %hop.addr,
                tls = session.tls,
                transactions = session.transactions,
                keywords = session.keywords.len(),
                "reusing cached connection"
            );
            match transaction(session, true, Some(cache.limits()), &hop.host, msg, opts).await {
                Ok((result, kept)) => {
                    if let Some(session) = kept {
                        cache.put(key, session);
                    }
                    return Ok(result);
                }
                Err(HostError::Stale(cause)) => {
                    tracing::debug!(host = %hop.host, addr = %hop.addr, %cause, "cached connection was closed; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
    }
    let session = open(hop, msg.helo, opts, use_tls).await?;
    let limits = cache.map(ConnectionCache::limits);
    let (result, kept) = transaction(session, false, limits, &hop.host, msg, opts).await?;
    if let Some(session) = kept {
        match cache {
            Some(cache) => cache.put(key, session),
            None => spawn_quit(session.conn),
        }
    }
    Ok(result)
}

/// One transaction on an open session: `MAIL FROM`, the `RCPT TO`s, and DATA when some
/// recipient was accepted. `reused` says the session came from the cache: then a
/// connection found closed (I/O error or 421) before any recipient was accepted ends in
/// `HostError::Stale` rather than a host failure. `limits` (present when a cache will
/// take the session back) decides whether to keep the connection after a clean end;
/// the session is returned for that, and is otherwise QUIT (or just dropped after an
/// I/O error) here.
async fn transaction(
    mut s: Session, reused: bool, limits: Option<CacheLimits>, host: &str, msg: &Message<'_>,
    opts: &DeliveryOptions,
) -> Result<(SessionResult, Option<Session>), HostError> {
    let tls = s.tls;
    s.conn.timeout = opts.command_timeout;
    // Before any recipient is accepted nothing is lost by starting over, and a cached
    // connection that the server has since closed fails exactly here.
    let early = |e: ConnError| match e {
        ConnError::Io(_) if reused => HostError::Stale(e.cause(host)),
        e => HostError::Skip {
            cause: e.cause(host),
        },
    };

    // RFC 2920, as Postfix's client does: with PIPELINING, MAIL, every RCPT and DATA go
    // out in one write and their replies are read in order, two round trips a message
    // (this group, then the text) instead of three plus one per recipient.
    let pipelined = offers(&s.keywords, "PIPELINING");
    let (text, body_8bit) = match msg.text_for(&s.keywords, host) {
        Ok(t) => t,
        Err(cause) => {
            spawn_quit(s.conn);
            return Err(HostError::Fatal { cause, tls });
        }
    };
    let dsn = offers(&s.keywords, "DSN");
    let mail_line = mail_command(&s.keywords, msg.envelope, text.len(), body_8bit);
    let rcpt_lines: Vec<String> = msg
        .envelope
        .rcpts
        .iter()
        .map(|r| rcpt_command(r, dsn))
        .collect();
    if pipelined {
        let mut group = String::new();
        for line in std::iter::once(&mail_line).chain(&rcpt_lines) {
            group.push_str(line);
            group.push_str("\r\n");
        }
        group.push_str("DATA\r\n");
        s.conn
            .write(group.as_bytes(), "to MAIL FROM")
            .await
            .map_err(early)?;
    }
    let mail = s
        .conn
        .answer(pipelined, &mail_line, "to MAIL FROM")
        .await
        .map_err(early)?;
    if reused && mail.code == 421 {
        return Err(HostError::Stale(FailureCause::Reply(mail)));
    }
    match classify_reply(mail.code) {
        Outcome::Delivered => {}
        Outcome::Permanent => {
            spawn_quit(s.conn);
            return Err(HostError::Fatal {
                cause: FailureCause::Reply(mail),
                tls,
            });
        }
        Outcome::Temporary => {
            spawn_quit(s.conn);
            return Err(HostError::Skip {
                cause: FailureCause::Reply(mail),
            });
        }
    }

    // None = accepted, waiting for the DATA verdict.
    let mut statuses: Vec<Option<RcptStatus>> = Vec::with_capacity(msg.rcpts.len());
    // A server announcing it is closing (421) is never given another transaction.
    let mut closing = false;
    for line in &rcpt_lines {
        let none_accepted = statuses.iter().all(Option::is_some);
        let sent = s.conn.answer(pipelined, line, "to RCPT TO").await;
        let reply = match sent {
            Ok(reply) => reply,
            Err(e) if none_accepted => return Err(early(e)),
            Err(e) => {
                return Err(HostError::Skip {
                    cause: e.cause(host),
                })
            }
        };
        if reply.code == 421 {
            if reused && none_accepted {
                return Err(HostError::Stale(FailureCause::Reply(reply)));
            }
            closing = true;
        }
        statuses.push(if reply.is_positive() {
            None
        } else {
            Some(RcptStatus::failed(FailureCause::Reply(reply)))
        });
    }
    let keep = !closing && limits.is_some_and(|l| l.reusable(&s, 1));

    if statuses.iter().all(Option::is_some) {
        // A pipelined DATA still has its answer coming: normally a refusal (no valid
        // recipients). A server that said 354 all the same waits for a text that is not
        // coming: that connection is closed without a dot, so no empty message goes out.
        let data = if pipelined {
            Some(s.conn.read_reply("to DATA").await)
        } else {
            None
        };
        let ending = match data {
            Some(Ok(r)) if r.code == 354 => Err(()),
            Some(Err(_)) => Err(()),
            // No transaction was completed: RSET so the connection is clean for the next.
            _ if keep => match s.conn.command("RSET", "to RSET").await {
                Ok(r) => Ok(r.is_positive()),
                Err(_) => Err(()),
            },
            _ => Ok(false),
        };
        let kept = s.settle(ending);
        return Ok((
            SessionResult {
                statuses: statuses.into_iter().flatten().collect(),
                tls,
                dsn,
            },
            kept,
        ));
    }

    // From here on the server may have the message: a failure no longer moves to the
    // next host but leaves the accepted recipients temporarily failed. The flag says
    // whether the reply is the one to the final dot.
    let verdict: Result<(Reply, bool), ConnError> = async {
        let go = s.conn.answer(pipelined, "DATA", "to DATA").await?;
        if go.code != 354 {
            return Ok((go, false));
        }
        if !msg.go_ahead.given() {
            // The lease was lost while we talked: hang up without the text (the server
            // discards a transaction whose DATA never ends).
            return Err(ConnError::Local(
                "the lease on this message was lost; not sent".into(),
            ));
        }
        s.conn
            .write(&data_payload(text), "while sending the message")
            .await?;
        let reply = s
            .conn
            .read_reply_within(opts.data_timeout, "after the final dot")
            .await?;
        Ok((reply, true))
    }
    .await;
    let accepted_status = match &verdict {
        Ok((reply, _)) if reply.is_positive() => RcptStatus::Delivered {
            reply: reply.clone(),
        },
        Ok((reply, _)) if reply.code == 354 => {
            RcptStatus::failed(FailureCause::Protocol(format!("{host}: unexpected 354")))
        }
        Ok((reply, _)) => RcptStatus::failed(FailureCause::Reply(reply.clone())),
        Err(e) => RcptStatus::failed(e.cause(host)),
    };
    let kept = s.settle(match &verdict {
        Ok((reply, after_dot)) => Ok(keep && *after_dot && reply.is_positive()),
        Err(_) => Err(()),
    });
    Ok((
        SessionResult {
            statuses: statuses
                .into_iter()
                .map(|st| st.unwrap_or_else(|| accepted_status.clone()))
                .collect(),
            tls,
            dsn,
        },
        kept,
    ))
}
