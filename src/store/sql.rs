//! SQL that both backends run as it stands: the statements where SQLite's and
//! PostgreSQL's dialects agree. Parameters are `$1`, `$2`, ... in the order they first
//! appear, which SQLite numbers the same way. Statements that differ (types, locking,
//! collation) stay with their backend.

/// The columns of `outgoing` that a `QueuedMessage`/`QueueSummary` reads, body excluded.
macro_rules! outgoing_cols {
    () => {
        "id, sender, ret, envid, client_ip, helo, received_at, tries, last_try_at, \
         last_error, next_retry_at, lock_owner, lock_expires_at, held, size, smtputf8"
    };
}
pub(super) use outgoing_cols;

/// Every queued message (recipients by cascade).
pub(super) const DELETE_ALL_QUEUED: &str = "DELETE FROM outgoing";

/// One queued message by id (recipients by cascade).
pub(super) const DELETE_QUEUED: &str = "DELETE FROM outgoing WHERE id = $1";

/// Hold a queued message ($1 true) or take it off hold.
pub(super) const SET_HELD: &str = "UPDATE outgoing SET held = $1 WHERE id = $2";

/// A user by address (mailboxes and messages by cascade).
pub(super) const DELETE_USER: &str = "DELETE FROM users WHERE address = $1";

/// A migration applied: version, name, when.
pub(super) const RECORD_MIGRATION: &str =
    "INSERT INTO erlmail_schema (version, name, applied_at) VALUES ($1, $2, $3)";

/// A new user; nothing when the address exists.
pub(super) const INSERT_USER: &str = "INSERT INTO users (address, local_part, domain, password_hash, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (address) DO NOTHING";

/// Whether a domain is local.
pub(super) const DOMAIN_EXISTS: &str = "SELECT 1 FROM domains WHERE name = $1";

/// Whether a user exists.
pub(super) const USER_EXISTS: &str = "SELECT 1 FROM users WHERE address = $1";

/// The schema version: the last migration applied.
pub(super) const SCHEMA_VERSION: &str = "SELECT MAX(version) FROM erlmail_schema";

/// A user's password hash.
pub(super) const PASSWORD_HASH: &str = "SELECT password_hash FROM users WHERE address = $1";

/// Every queued recipient with its state, for the queue listing.
pub(super) const ALL_QUEUE_RCPTS: &str = "SELECT queue_id, address, orcpt, notify, state, last_response FROM outgoing_rcpts ORDER BY queue_id, seq";

/// Replace a user's password hash.
pub(super) const SET_PASSWORD: &str = "UPDATE users SET password_hash = $1 WHERE address = $2";

/// A user's mailbox listing, oldest first.
pub(super) const LIST_MAILBOX: &str = "SELECT m.id, b.name AS mailbox, m.sender, m.subject, m.size, m.internal_date, m.flags FROM messages m JOIN mailboxes b ON m.mailbox_id = b.id JOIN users u ON b.user_id = u.id WHERE u.address = $1 AND b.name = $2 ORDER BY m.id";

/// One message of a user, with its recipients and bytes.
pub(super) const GET_MESSAGE: &str = "SELECT m.id, b.name AS mailbox, m.sender, m.subject, m.size, m.internal_date, m.flags, m.recipients, m.body FROM messages m JOIN mailboxes b ON m.mailbox_id = b.id JOIN users u ON b.user_id = u.id WHERE u.address = $1 AND m.id = $2";
