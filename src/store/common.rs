//! Helpers both store backends share, so that SQLite and PostgreSQL store the same
//! names, ids and times: unix-millisecond times, normalised domains, addresses and
//! mailbox names, and Postfix-like queue ids, and the queue row both read alike
//! ([`read_queued`], through either driver's row as [`Columns`]). No database access.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngCore;

use super::{IncomingMessage, QueuedMessage, StoreError, StoreResult};

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

/// Where the local copies of `m` go and their `messages.flags` column: the mailbox
/// name, and the flags space-separated (`None` when there are none). Refuses an empty
/// mailbox name, and a flag that is empty or holds white space or a parenthesis (an IMAP
/// flag is an atom; the column separates flags by spaces).
pub(crate) fn local_copy(m: &IncomingMessage) -> StoreResult<(&str, Option<String>)> {
    let mailbox = m.mailbox();
    if mailbox.trim().is_empty() {
        return Err(StoreError::Invalid("empty mailbox name".into()));
    }
    for f in &m.flags {
        if f.is_empty() || f.chars().any(|c| c.is_whitespace() || c == '(' || c == ')') {
            return Err(StoreError::Invalid(format!("invalid IMAP flag {f:?}")));
        }
    }
    let flags = (!m.flags.is_empty()).then(|| m.flags.join(" "));
    Ok((mailbox, flags))
}

/// The flags of a `messages.flags` column, as `local_copy` wrote them.
pub(crate) fn read_flags(column: Option<String>) -> Vec<String> {
    column
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A Postfix-like queue id: 16 upper-case hex digits, the milliseconds since 1970 (44
/// bits, 11 digits) then 20 random bits. Like Postfix's long queue ids they grow with
/// time, so new rows go to the end of the id indexes: with random ids every insert and
/// delete landed on a different index page, and accepts ran a quarter slower with a
/// million messages queued than with none. A clash (same millisecond and the same 20
/// bits) is drawn again by the callers.
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
}

/// A queued message from its row's `outgoing_cols!`, read through either driver's row;
/// its recipients and body are the caller's to fill in (they are read separately, or
/// not at all for a listing).
pub(crate) fn read_queued(r: &impl Columns) -> StoreResult<QueuedMessage> {
    let text = |c: &str| {
        r.text(c)?
            .ok_or_else(|| StoreError::Backend(format!("outgoing row: {c} is NULL")))
    };
    let int = |c: &str| {
        r.int(c)?
            .ok_or_else(|| StoreError::Backend(format!("outgoing row: {c} is NULL")))
    };
    Ok(QueuedMessage {
        id: text("id")?,
        sender: text("sender")?,
        ret: r.text("ret")?,
        envid: r.text("envid")?,
        client_ip: text("client_ip")?,
        helo: text("helo")?,
        received_at: from_ms(int("received_at")?)?,
        tries: to_u32(int("tries")?),
        last_try_at: opt_from_ms(r.int("last_try_at")?)?,
        last_error: r.text("last_error")?,
        next_retry_at: from_ms(int("next_retry_at")?)?,
        lock_owner: r.text("lock_owner")?,
        lock_expires_at: opt_from_ms(r.int("lock_expires_at")?)?,
        held: r.flag("held")?,
        size: to_u64(int("size")?),
        smtputf8: r.flag("smtputf8")?,
        rcpts: Vec::new(),
        body: Vec::new(),
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
