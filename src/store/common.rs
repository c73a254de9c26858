//! What both store backends share, so that SQLite and PostgreSQL store and read the same
//! names, ids and times: unix-millisecond times, normalised domains, addresses and
//! mailbox names, Postfix-like queue ids, and the rows both read alike through either
//! driver's row as [`Columns`]. No database access.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngCore;

use super::password::is_phc_hash;
use super::{
    AcceptLease, IncomingMessage, MessageSummary, OutgoingRcpt, QueueRcpt, QueueSummary,
    QueuedMessage, RcptState, StoreError, StoreResult, StoredMessage,
};

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(v: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v)
        .ok_or_else(|| StoreError::Backend(format!("stored time {v} out of range")))
}

pub(crate) fn opt_from_ms(v: Option<i64>) -> StoreResult<Option<DateTime<Utc>>> {
    v.map(from_ms).transpose()
}

/// `now + lease` in milliseconds, saturating rather than wrapping on absurd leases.
pub(crate) fn lease_end(now: DateTime<Utc>, lease: Duration) -> i64 {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    ms(now).saturating_add(lease_ms)
}

/// A domain name as stored: trimmed, lower-case, without a trailing dot.
pub(crate) fn norm_domain(name: &str) -> StoreResult<String> {
    let d = name.trim().trim_end_matches('.').to_lowercase();
    if d.is_empty() || d.chars().any(|c| c.is_whitespace() || c == '@' || c == '/') {
        return Err(StoreError::Invalid(format!("invalid domain name {name:?}")));
    }
    Ok(d)
}

/// A user address as stored: `local@domain`, lower-case (look-ups are case-insensitive,
/// as Postfix's are). Returns (address, local part, domain).
pub(crate) fn norm_address(address: &str) -> StoreResult<(String, String, String)> {
    let a = address.trim();
    let (local, domain) = a
        .rsplit_once('@')
        .ok_or_else(|| StoreError::Invalid(format!("invalid address {address:?}: no @domain")))?;
    if local.is_empty() || local.chars().any(char::is_whitespace) {
        return Err(StoreError::Invalid(format!("invalid address {address:?}")));
    }
    let local = local.to_lowercase();
    let domain = norm_domain(domain)?;
    Ok((format!("{local}@{domain}"), local, domain))
}

/// The IMAP rule: `INBOX` is case-insensitive; other names are as given.
pub(crate) fn norm_mailbox(name: &str) -> &str {
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX"
    } else {
        name
    }
}

/// What both backends write for accepted message `m`: its time and size as stored, where
/// its local copies go and their `messages.flags` column (the flags space-separated,
/// `None` when there are none). Refuses an empty mailbox name, and a flag that is empty or
/// holds white space or a parenthesis (an IMAP flag is an atom; the column separates
/// flags by spaces).
pub(crate) struct Stored<'a> {
    pub received: i64,
    pub size: i64,
    pub mailbox: &'a str,
    pub flags: Option<String>,
}

pub(crate) fn stored(m: &IncomingMessage) -> StoreResult<Stored<'_>> {
    let mailbox = m.mailbox();
    if mailbox.trim().is_empty() {
        return Err(StoreError::Invalid("empty mailbox name".into()));
    }
    for f in &m.flags {
        if f.is_empty() || f.chars().any(|c| c.is_whitespace() || c == '(' || c == ')') {
            return Err(StoreError::Invalid(format!("invalid IMAP flag {f:?}")));
        }
    }
    Ok(Stored {
        received: ms(m.received_at),
        size: size_of(&m.body),
        mailbox,
        flags: (!m.flags.is_empty()).then(|| m.flags.join(" ")),
    })
}

/// The `lock_owner` and `lock_expires_at` of a row queued under `lease`, if any.
pub(crate) fn lease_cols(lease: Option<&AcceptLease>) -> (Option<&str>, Option<i64>) {
    match lease {
        Some(l) => (Some(l.node.as_str()), Some(ms(l.expires_at))),
        None => (None, None),
    }
}

/// A body's size as stored.
pub(crate) fn size_of(body: &[u8]) -> i64 {
    i64::try_from(body.len()).unwrap_or(i64::MAX)
}

/// Refuse a hash that is not an argon2 PHC string. Never echoes the value: it might be a
/// clear-text password passed by mistake.
pub(crate) fn check_hash(password_hash: &str) -> StoreResult<()> {
    if is_phc_hash(password_hash) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "password must be given as an argon2 PHC hash".into(),
        ))
    }
}

/// Why an attempt's record is refused, given the `lock_owner` of its row (`None`: no
/// row): the message is gone, or its lock is not `node`'s. `None`: the lock is ours.
pub(crate) fn refused_record(
    id: &str, node: &str, owner: Option<Option<String>>,
) -> Option<StoreError> {
    match owner {
        None => Some(StoreError::Invalid(format!("no queued message {id}"))),
        Some(owner) if owner.as_deref() != Some(node) => Some(StoreError::Invalid(format!(
            "queued message {id} is not locked by {node} (lease lost)"
        ))),
        Some(_) => None,
    }
}

/// The flags of a `messages.flags` column, as `stored` wrote them.
fn read_flags(column: Option<String>) -> Vec<String> {
    column
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A Postfix-like queue id: 16 upper-case hex digits, the milliseconds since 1970 (44
/// bits, 11 digits) then 20 random bits. Like Postfix's long queue ids they grow with
/// time, so new rows go to the end of the id indexes rather than to a random page. A
/// clash (same millisecond and the same 20 bits) is drawn again by the callers.
pub(crate) fn new_queue_id() -> String {
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    queue_id_at(now, rand::rng().next_u64())
}

fn queue_id_at(millis: u64, random: u64) -> String {
    format!("{:011X}{:05X}", millis & 0xFFF_FFFF_FFFF, random & 0xF_FFFF)
}

pub(crate) fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The owner prefixes of node `node`'s leases, for `release_node`: their length in
/// characters, `node#` (owners with a boot number) and `node:` (owners from before boot
/// numbers, `node:pid`).
pub(crate) fn node_prefixes(node: &str) -> (i64, String, String) {
    (
        node.chars().count() as i64 + 1,
        format!("{node}#"),
        format!("{node}:"),
    )
}

/// A result row of either driver, read by column name; `None` is SQL NULL.
pub(crate) trait Columns {
    /// A text column.
    fn text(&self, col: &str) -> StoreResult<Option<String>>;
    /// An integer column.
    fn int(&self, col: &str) -> StoreResult<Option<i64>>;
    /// A flag (SQLite keeps 0/1, PostgreSQL a BOOLEAN).
    fn flag(&self, col: &str) -> StoreResult<bool>;
    /// A byte column.
    fn bytes(&self, col: &str) -> StoreResult<Vec<u8>>;

    /// A text column that is never NULL.
    fn need_text(&self, col: &str) -> StoreResult<String> {
        self.text(col)?.ok_or_else(|| null(col))
    }

    /// An integer column that is never NULL.
    fn need_int(&self, col: &str) -> StoreResult<i64> {
        self.int(col)?.ok_or_else(|| null(col))
    }
}

fn null(col: &str) -> StoreError {
    StoreError::Backend(format!("column {col} is NULL"))
}

/// A `Backend` error (the driver's catch-all) as `wrap` puts it, with what the caller was
/// doing; the other kinds stay as they are.
pub(crate) fn recast(e: StoreError, wrap: impl FnOnce(String) -> StoreError) -> StoreError {
    match e {
        StoreError::Backend(m) => wrap(m),
        other => other,
    }
}

/// The error of a driver reading column `col`.
pub(crate) fn column_err(col: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("column {col}: {e}"))
}

/// A queued message from its row's `outgoing_cols!`; its recipients and body are the
/// caller's to fill in (they are read separately, or not at all for a listing).
pub(crate) fn read_queued(r: &impl Columns) -> StoreResult<QueuedMessage> {
    Ok(QueuedMessage {
        id: r.need_text("id")?,
        sender: r.need_text("sender")?,
        ret: r.text("ret")?,
        envid: r.text("envid")?,
        client_ip: r.need_text("client_ip")?,
        helo: r.need_text("helo")?,
        received_at: from_ms(r.need_int("received_at")?)?,
        tries: to_u32(r.need_int("tries")?),
        last_try_at: opt_from_ms(r.int("last_try_at")?)?,
        last_error: r.text("last_error")?,
        next_retry_at: from_ms(r.need_int("next_retry_at")?)?,
        lock_owner: r.text("lock_owner")?,
        lock_expires_at: opt_from_ms(r.int("lock_expires_at")?)?,
        held: r.flag("held")?,
        size: to_u64(r.need_int("size")?),
        smtputf8: r.flag("smtputf8")?,
        rcpts: Vec::new(),
        body: Vec::new(),
    })
}

/// A queued message from its `outgoing_cols!` and `body`, still without recipients.
pub(crate) fn read_queued_body(r: &impl Columns) -> StoreResult<QueuedMessage> {
    Ok(QueuedMessage {
        body: r.bytes("body")?,
        ..read_queued(r)?
    })
}

/// A pending recipient (`address, orcpt, notify`).
pub(crate) fn read_outgoing_rcpt(r: &impl Columns) -> StoreResult<OutgoingRcpt> {
    Ok(OutgoingRcpt {
        address: r.need_text("address")?,
        orcpt: r.text("orcpt")?,
        notify: r.text("notify")?,
    })
}

/// A recipient of `sql::ALL_QUEUE_RCPTS` with its queue id.
pub(crate) fn read_queue_rcpt(r: &impl Columns) -> StoreResult<(String, QueueRcpt)> {
    let state = r.need_text("state")?;
    let state = RcptState::parse(&state)
        .ok_or_else(|| StoreError::Backend(format!("unknown recipient state {state:?}")))?;
    Ok((
        r.need_text("queue_id")?,
        QueueRcpt {
            address: r.need_text("address")?,
            orcpt: r.text("orcpt")?,
            notify: r.text("notify")?,
            state,
            last_response: r.text("last_response")?,
        },
    ))
}

/// Values by queue id, each id's in the order given.
pub(crate) fn by_queue_id<T>(
    rows: impl IntoIterator<Item = (String, T)>,
) -> HashMap<String, Vec<T>> {
    let mut by_id: HashMap<String, Vec<T>> = HashMap::new();
    for (queue_id, v) in rows {
        by_id.entry(queue_id).or_default().push(v);
    }
    by_id
}

/// The queue listing: each message with its recipients (`sql::ALL_QUEUE_RCPTS`).
pub(crate) fn summaries(
    messages: Vec<QueuedMessage>, rcpts: Vec<(String, QueueRcpt)>,
) -> Vec<QueueSummary> {
    let mut by_id = by_queue_id(rcpts);
    messages
        .into_iter()
        .map(|o| {
            let rcpts = by_id.remove(&o.id).unwrap_or_default();
            o.into_summary(rcpts)
        })
        .collect()
}

/// Claimed messages in due order (`RETURNING` gives none).
pub(crate) fn due_order(claimed: &mut [QueuedMessage]) {
    claimed.sort_by(|a, b| (a.next_retry_at, &a.id).cmp(&(b.next_retry_at, &b.id)));
}

/// A mailbox message for listings (`sql::LIST_MAILBOX`).
pub(crate) fn read_message_summary(r: &impl Columns) -> StoreResult<MessageSummary> {
    Ok(MessageSummary {
        id: r.need_int("id")?,
        mailbox: r.need_text("mailbox")?,
        sender: r.need_text("sender")?,
        subject: r.text("subject")?,
        size: to_u64(r.need_int("size")?),
        internal_date: from_ms(r.need_int("internal_date")?)?,
        flags: read_flags(r.text("flags")?),
    })
}

/// A mailbox message with its recipients and bytes (`sql::GET_MESSAGE`).
pub(crate) fn read_stored_message(r: &impl Columns) -> StoreResult<StoredMessage> {
    Ok(StoredMessage {
        summary: read_message_summary(r)?,
        recipients: r
            .need_text("recipients")?
            .lines()
            .map(str::to_string)
            .collect(),
        body: r.bytes("body")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(
            norm_address(" Alice@Example.COM. ").unwrap(),
            (
                "alice@example.com".into(),
                "alice".into(),
                "example.com".into()
            )
        );
        assert!(norm_address("alice").is_err());
        assert!(norm_address("@example.com").is_err());
        assert!(norm_address("a b@example.com").is_err());
        assert_eq!(norm_mailbox("inbox"), "INBOX");
        assert_eq!(norm_mailbox("Sent"), "Sent");
    }

    #[test]
    fn queue_ids_are_16_upper_hex() {
        let a = new_queue_id();
        assert_eq!(a.len(), 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c)),
            "{a}"
        );
        assert_ne!(a, new_queue_id());
    }

    #[test]
    fn queue_ids_grow_with_time() {
        assert_eq!(
            queue_id_at(0x123_4567_89AB, 0xFFFF_FFFF_FFF1),
            "123456789ABFFFF1"
        );
        let earlier = queue_id_at(1_764_000_000_000, u64::MAX);
        let later = queue_id_at(1_764_000_000_001, 0);
        assert!(earlier < later, "{earlier} < {later}");
        assert_eq!(later.len(), 16);
    }
}
