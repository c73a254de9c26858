//! The records the store takes and gives back: accepted mail and what it stored, the
//! group commit's batch and outcome, queued messages and their recipients, mailbox
//! listings, attempt records and queue counts. Plain data; no storage.

use chrono::{DateTime, Utc};

use super::{common, StoreResult};

/// Per-recipient DSN request (RFC 3461 NOTIFY).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notify {
    /// NOTIFY=NEVER.
    pub never: bool,
    /// SUCCESS requested.
    pub success: bool,
    /// FAILURE requested (also the default when NOTIFY is absent).
    pub failure: bool,
    /// DELAY requested.
    pub delay: bool,
}

/// One recipient of a message bound for the outgoing queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRcpt {
    /// Forward-path address, `local@domain`.
    pub address: String,
    /// ORCPT parameter as received (`rfc822;addr`), if any.
    pub orcpt: Option<String>,
    /// NOTIFY parameter as received (e.g. `SUCCESS,FAILURE`), if any.
    pub notify: Option<String>,
}

/// A message the SMTP server has accepted, to be committed in one transaction: delivered
/// into a mailbox (the INBOX unless `mailbox` says otherwise) of each local recipient and
/// queued once for all remote recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    /// Reverse-path (`""` for the null sender `<>`).
    pub sender: String,
    /// Local recipients (`user@domain`, already known to exist).
    pub local_rcpts: Vec<String>,
    /// Recipients for the outgoing queue.
    pub remote_rcpts: Vec<OutgoingRcpt>,
    /// The mailbox the local copies go to instead of the INBOX: `Some(JUNK)` for mail that
    /// failed DMARC under `p=quarantine`, an ErlMail folder for an imported message.
    /// `None` (or any spelling of `INBOX`) is the INBOX.
    pub mailbox: Option<String>,
    /// IMAP flags the local copies start with (`\Seen`, `\Answered`, keywords), as an
    /// imported message had them; empty for new mail. Each an IMAP atom: no spaces.
    pub flags: Vec<String>,
    /// MAIL FROM RET= (`FULL`/`HDRS`), if given.
    pub ret: Option<String>,
    /// MAIL FROM ENVID=, if given.
    pub envid: Option<String>,
    /// MAIL FROM SMTPUTF8 was given (RFC 6531): passed on, and required of the next hop
    /// when the envelope or the header holds UTF-8.
    pub smtputf8: bool,
    /// Client IP address as text.
    pub client_ip: String,
    /// HELO/EHLO argument.
    pub helo: String,
    /// When the DATA was complete.
    pub received_at: DateTime<Utc>,
    /// Subject header, for mailbox listings.
    pub subject: Option<String>,
    /// The whole message, CRLF line ends, `Received:` header already prepended.
    pub body: Vec<u8>,
}

/// What `accept` stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Id of the outgoing row, if any remote recipients.
    pub queue_id: Option<String>,
    /// Ids of the mailbox messages created, one per local recipient, in order.
    pub message_ids: Vec<i64>,
}

/// One group commit of the store actor (see `MessageStore::commit_batch`).
#[derive(Debug, Clone)]
pub struct WriteBatch {
    /// Accepted messages, in order.
    pub messages: Vec<IncomingMessage>,
    /// The lease to stamp on their queued rows (claim at accept), if any.
    pub lease: Option<AcceptLease>,
    /// Finished attempts: queue id, lock owner, what happened.
    pub records: Vec<(String, String, AttemptRecord)>,
    /// Every message or none: one that fails rolls all of them back (the records are
    /// not affected). Otherwise each message is isolated (a savepoint each).
    pub atomic: bool,
}

/// What `commit_batch` did.
#[derive(Debug)]
pub struct WriteOutcome {
    /// The batch's messages, handed back.
    pub messages: Vec<IncomingMessage>,
    /// Per message, in order (each in a savepoint of its own: one that fails, say a
    /// local user removed since RCPT, leaves the others committed), or why none was
    /// stored (the transaction as a whole failed).
    pub accepted: StoreResult<Vec<StoreResult<Accepted>>>,
    /// Per record, in order, or why none was recorded.
    pub recorded: StoreResult<Vec<StoreResult<()>>>,
}

/// The claim stamped on queued rows as they are inserted (see `MessageStore::commit_batch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptLease {
    /// Lock owner (`node#boot`).
    pub node: String,
    /// When the lease lapses.
    pub expires_at: DateTime<Utc>,
}

impl IncomingMessage {
    /// The mailbox the local copies go to, `INBOX` spelled as IMAP spells it.
    pub fn mailbox(&self) -> &str {
        self.mailbox
            .as_deref()
            .map_or("INBOX", common::norm_mailbox)
    }

    /// The Maildir++ folder of the local copies: `None` for the INBOX (the Maildir itself).
    pub fn maildir_folder(&self) -> Option<&str> {
        Some(self.mailbox()).filter(|m| *m != "INBOX")
    }

    /// Whether the local copies go anywhere but an INBOX without flags, which is all that
    /// PostgreSQL's one-statement group commit writes.
    pub fn needs_more_than_inbox(&self) -> bool {
        self.maildir_folder().is_some() || !self.flags.is_empty()
    }
}

/// The mailbox for mail that failed DMARC under `p=quarantine` (Maildir++ `.Junk`).
pub const JUNK: &str = "Junk";

impl QueuedMessage {
    /// The queued message that `commit_batch` stored for `m` under `queue_id` with
    /// `lease`, built from the accepted message itself rather than read back.
    pub fn from_accepted(m: IncomingMessage, queue_id: String, lease: &AcceptLease) -> Self {
        // Times as the store keeps them: whole milliseconds.
        let ms =
            |t: DateTime<Utc>| DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t);
        let received_at = ms(m.received_at);
        QueuedMessage {
            id: queue_id,
            sender: m.sender,
            ret: m.ret,
            envid: m.envid,
            smtputf8: m.smtputf8,
            client_ip: m.client_ip,
            helo: m.helo,
            received_at,
            tries: 0,
            last_try_at: None,
            last_error: None,
            next_retry_at: ms(lease.expires_at),
            lock_owner: Some(lease.node.clone()),
            lock_expires_at: Some(ms(lease.expires_at)),
            held: false,
            size: m.body.len() as u64,
            rcpts: m.remote_rcpts,
            body: m.body,
        }
    }
}

impl QueuedMessage {
    /// The administrator's view of this message, with all its recipients and their
    /// states (`rcpts`) in place of the pending ones, and no body.
    pub(crate) fn into_summary(self, rcpts: Vec<QueueRcpt>) -> QueueSummary {
        QueueSummary {
            rcpts,
            id: self.id,
            size: self.size,
            received_at: self.received_at,
            sender: self.sender,
            tries: self.tries,
            last_try_at: self.last_try_at,
            next_retry_at: self.next_retry_at,
            last_error: self.last_error,
            held: self.held,
            lock_owner: self.lock_owner,
            lock_expires_at: self.lock_expires_at,
        }
    }
}

/// A message in a user's mailbox, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary {
    /// Id within the store.
    pub id: i64,
    /// Mailbox name (`INBOX`, `Junk`, an imported folder).
    pub mailbox: String,
    /// Envelope sender.
    pub sender: String,
    /// Subject header, if any.
    pub subject: Option<String>,
    /// Size in octets.
    pub size: u64,
    /// Internal date.
    pub internal_date: DateTime<Utc>,
    /// IMAP flags (`\Seen`, keywords), in the order they were stored; empty when none.
    pub flags: Vec<String>,
}

/// A mailbox message with its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Listing data.
    pub summary: MessageSummary,
    /// Envelope recipients of this delivery.
    pub recipients: Vec<String>,
    /// The raw message as stored.
    pub body: Vec<u8>,
}

/// The delivery state of one recipient of a queued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RcptState {
    /// Not delivered yet; the message stays queued while any recipient is pending.
    Pending,
    /// Accepted by the next hop.
    Delivered,
    /// Permanently failed (5xx, or retries exhausted).
    Failed,
}

impl RcptState {
    /// The word stored in the database (`pending`, `delivered`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            RcptState::Pending => "pending",
            RcptState::Delivered => "delivered",
            RcptState::Failed => "failed",
        }
    }

    /// Parse the stored word; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(RcptState::Pending),
            "delivered" => Some(RcptState::Delivered),
            "failed" => Some(RcptState::Failed),
            _ => None,
        }
    }
}

/// A message of the outgoing queue as a sender needs it: the envelope, the retry and lock
/// data of its row, its still-pending recipients and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Queue id (16 upper-case hex digits, Postfix-like).
    pub id: String,
    /// Reverse-path (`""` for `<>`, e.g. a DSN).
    pub sender: String,
    /// MAIL FROM RET=, if given.
    pub ret: Option<String>,
    /// MAIL FROM ENVID=, if given.
    pub envid: Option<String>,
    /// Client IP address as text.
    pub client_ip: String,
    /// HELO/EHLO argument of the client.
    pub helo: String,
    /// When the message was accepted.
    pub received_at: DateTime<Utc>,
    /// Delivery attempts recorded so far.
    pub tries: u32,
    /// When the last attempt was recorded.
    pub last_try_at: Option<DateTime<Utc>>,
    /// Error text of the last attempt.
    pub last_error: Option<String>,
    /// When the message is next due.
    pub next_retry_at: DateTime<Utc>,
    /// Node holding the lease, if any (possibly expired).
    pub lock_owner: Option<String>,
    /// When that lease expires.
    pub lock_expires_at: Option<DateTime<Utc>>,
    /// Held by the administrator: never claimed while set.
    pub held: bool,
    /// Size of the body in octets.
    pub size: u64,
    /// MAIL FROM SMTPUTF8 was given.
    pub smtputf8: bool,
    /// Recipients still pending, in the order they were received.
    pub rcpts: Vec<OutgoingRcpt>,
    /// The whole message as accepted.
    pub body: Vec<u8>,
}

/// One recipient of a queued message with its state, for administration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRcpt {
    /// Forward-path address.
    pub address: String,
    /// ORCPT parameter, if any.
    pub orcpt: Option<String>,
    /// NOTIFY parameter, if any.
    pub notify: Option<String>,
    /// Delivery state.
    pub state: RcptState,
    /// The last reply of the remote server (or local error) for this recipient.
    pub last_response: Option<String>,
}

/// A queued message without its body, for `erlmail queue list`: why it waits is visible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSummary {
    /// Queue id.
    pub id: String,
    /// Size of the body in octets.
    pub size: u64,
    /// When the message was accepted.
    pub received_at: DateTime<Utc>,
    /// Reverse-path (`""` for `<>`).
    pub sender: String,
    /// All recipients, in received order, with their states.
    pub rcpts: Vec<QueueRcpt>,
    /// Delivery attempts recorded so far.
    pub tries: u32,
    /// When the last attempt was recorded.
    pub last_try_at: Option<DateTime<Utc>>,
    /// When the message is next due.
    pub next_retry_at: DateTime<Utc>,
    /// Error text of the last attempt.
    pub last_error: Option<String>,
    /// Held by the administrator.
    pub held: bool,
    /// Node holding the lease, if any (possibly expired).
    pub lock_owner: Option<String>,
    /// When that lease expires.
    pub lock_expires_at: Option<DateTime<Utc>>,
}

/// The result of one delivery attempt, recorded by `record_attempt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When the attempt ended (becomes `last_try_at`).
    pub at: DateTime<Utc>,
    /// Per recipient: address, new state, the server's response. Recipients not listed
    /// keep their state; only pending recipients are updated.
    pub rcpt_results: Vec<(String, RcptState, Option<String>)>,
    /// Becomes `last_error` (`None` clears it).
    pub error: Option<String>,
    /// The next due time; `None` leaves it unchanged (meant for the case where no
    /// recipient stays pending, which deletes the message anyway).
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Delivery status notifications this attempt owes, queued (unleased, due now) in
    /// the same transaction as the record: a record that is refused or fails takes them
    /// with it, so a notification is never lost nor sent twice for one outcome.
    pub notifications: Vec<IncomingMessage>,
}

/// Queued messages by state (each message in exactly one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct QueueCounts {
    /// Never tried yet and not being tried.
    pub incoming: u64,
    /// Being tried now (a live lease).
    pub active: u64,
    /// Tried before, waiting for a retry.
    pub deferred: u64,
    /// On hold.
    pub held: u64,
}

impl QueueCounts {
    /// Count one message.
    pub fn add(&mut self, held: bool, locked: bool, tries: u32) {
        if held {
            self.held += 1;
        } else if locked {
            self.active += 1;
        } else if tries > 0 {
            self.deferred += 1;
        } else {
            self.incoming += 1;
        }
    }

    /// All queued messages.
    pub fn total(&self) -> u64 {
        self.incoming + self.active + self.deferred + self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcpt_state_words_round_trip() {
        for s in [RcptState::Pending, RcptState::Delivered, RcptState::Failed] {
            assert_eq!(RcptState::parse(s.as_str()), Some(s));
        }
        assert_eq!(RcptState::parse("bounced"), None);
    }
}
