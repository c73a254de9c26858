//! The message store: the storage traits (`AccountStore`, `MailboxStore`, `QueueStore`,
//! and `MessageStore` with its one write path), the types they exchange, and `open`.
//!
//! The store owns every piece of durable state: domains, users (argon2 hashes only),
//! mailboxes and their messages (local delivery), and the outgoing queue with its
//! per-recipient rows and leases. Only this module touches the database and spool files.
//! Backends: `sqlite` (embedded default) and `postgres` (shared by a cluster); both pass
//! the contract suite in `store/contract`. It must not decide policy (retry schedule,
//! who is local): callers pass those in.

pub mod common;
#[cfg(any(test, feature = "test-support"))]
pub mod contract;
pub mod maildir;
pub mod password;
pub mod postgres;
mod sql;
pub mod sqlite;
mod types;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use self::types::*;

/// Errors from a store backend. `Clone` so an actor can answer several waiters with one
/// failed commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused the operation; temporary.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The operation broke a rule of the data (unknown domain, duplicate user, ...).
    #[error("{0}")]
    Invalid(String),
    /// The disk (or the database) is full: SQLite's `SQLITE_FULL` or an `ENOSPC` I/O
    /// error. Temporary; the SMTP side answers `452 4.3.1`.
    #[error("store full: {0}")]
    Full(String),
    /// Anything else from the backend.
    #[error("store error: {0}")]
    Backend(String),
}

impl From<std::io::Error> for StoreError {
    /// File errors (Maildir, spool directory): a full disk becomes `Full`, so that it can be
    /// told apart from a broken store.
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull {
            StoreError::Full(e.to_string())
        } else {
            StoreError::Backend(e.to_string())
        }
    }
}

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// Local domains and users: the accounts an operator keeps (Postfix's virtual maps).
#[async_trait::async_trait]
pub trait AccountStore: Send + Sync {
    /// Add a local domain (lower-cased). `Ok(false)` when it already existed.
    async fn add_domain(&self, name: &str) -> StoreResult<bool>;
    /// Remove a domain and its users. `Ok(false)` when it did not exist.
    async fn remove_domain(&self, name: &str) -> StoreResult<bool>;
    /// All local domains, sorted.
    async fn list_domains(&self) -> StoreResult<Vec<String>>;
    /// Whether `name` (case-insensitive) is a local domain.
    async fn is_local_domain(&self, name: &str) -> StoreResult<bool>;

    /// Add a user `local@domain` with an argon2 PHC hash. The domain must exist;
    /// `Invalid` if the user already exists.
    async fn add_user(&self, address: &str, password_hash: &str) -> StoreResult<()>;
    /// Replace a user's hash; `Ok(false)` when there is no such user.
    async fn set_password(&self, address: &str, password_hash: &str) -> StoreResult<bool>;
    /// Remove a user and its mailboxes; `Ok(false)` when there is no such user.
    async fn remove_user(&self, address: &str) -> StoreResult<bool>;
    /// Users (`local@domain`), sorted, optionally of one domain.
    async fn list_users(&self, domain: Option<&str>) -> StoreResult<Vec<String>>;
    /// The stored hash of a user, if the user exists.
    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>>;
    /// Whether `local@domain` is a known user (domain case-insensitive).
    async fn user_exists(&self, address: &str) -> StoreResult<bool>;

    /// Answers a recipient look-up without waiting, when the backend can read at once
    /// (an embedded database on this host): `(local domain, user exists)` as
    /// [`is_local_domain`](Self::is_local_domain) of the address's domain and
    /// [`user_exists`](Self::user_exists) would give them. `None`: not possible now, ask
    /// those two instead. Must never block for long: callers run it on the async side.
    fn recipient_now(&self, _address: &str) -> Option<StoreResult<(bool, bool)>> {
        None
    }
}

/// What local delivery stored, for reading.
#[async_trait::async_trait]
pub trait MailboxStore: Send + Sync {
    /// Messages of a user's mailbox, oldest first.
    async fn list_mailbox(&self, address: &str, mailbox: &str) -> StoreResult<Vec<MessageSummary>>;
    /// One message of a user, by id.
    async fn get_message(&self, address: &str, id: i64) -> StoreResult<Option<StoredMessage>>;
}

/// The outgoing queue: the leases senders take and give back, and administration
/// (postqueue/postsuper). What an attempt did is written through
/// [`MessageStore::commit_batch`].
#[async_trait::async_trait]
pub trait QueueStore: Send + Sync {
    /// Claim up to `limit` messages that are due (`next_retry_at <= now`), not held, and
    /// unlocked or with a lease expired at `now`, oldest due first. Each is stamped with
    /// `lock_owner = node`, `lock_expires_at = now + lease` atomically: two processes
    /// sharing the store never get the same message. Returned with their pending
    /// recipients and body, in due order.
    async fn claim_due(
        &self, node: &str, now: DateTime<Utc>, lease: Duration, limit: usize,
    ) -> StoreResult<Vec<QueuedMessage>>;
    /// Claim one message by id under the same conditions as `claim_due`. `None` if it
    /// does not exist, is held, not due, or locked by anyone (this node included) with an
    /// unexpired lease.
    async fn claim(
        &self, id: &str, node: &str, now: DateTime<Utc>, lease: Duration,
    ) -> StoreResult<Option<QueuedMessage>>;
    /// Extend our lease to `now + lease`. `Ok(false)` if the message is gone, held, or its
    /// lock is no longer `node`'s (another node claimed it after our lease lapsed).
    async fn renew_lease(
        &self, id: &str, node: &str, now: DateTime<Utc>, lease: Duration,
    ) -> StoreResult<bool>;
    /// Clear our lock without recording a try (shutdown, no free sender, or a crash
    /// counted elsewhere); a message not yet due falls due now. Does nothing if the lock
    /// is not `node`'s.
    async fn release(&self, id: &str, node: &str) -> StoreResult<()>;
    /// Clear every lock held by an earlier run of the node `node` (owners `node#<boot>`,
    /// and `node:<pid>` from before boot numbers), except `current`, this run's own; what
    /// they held falls due now. Only safe while this process holds the node's name
    /// exclusively ([`lock_node`](Self::lock_node) or the spool lock), so no live process
    /// is using those leases. Returns how many messages were freed.
    async fn release_node(&self, node: &str, current: &str) -> StoreResult<u64>;
    /// Wake-ups from other processes sharing this store: a `()` whenever one of them
    /// queued, flushed or released mail that is due now (PostgreSQL's LISTEN/NOTIFY).
    /// `None` where the store has no such channel (SQLite: the periodic scan covers it).
    /// Bursts are coalesced; a wake-up is a hint, the scan stays the safety net.
    fn wake_ups(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        None
    }
    /// The store's clock: leases and due times are stamped by it, so nodes whose clocks
    /// differ agree on when a lease lapses. SQLite's store is on this host: its clock.
    async fn clock(&self) -> StoreResult<DateTime<Utc>> {
        Ok(Utc::now())
    }
    /// Take the node name `node` for this process for as long as the store lives:
    /// `Ok(false)` if another live process holds it. Backends whose store is reached by
    /// one host (SQLite, where the spool lock does this) need not do anything.
    async fn lock_node(&self, _node: &str) -> StoreResult<bool> {
        Ok(true)
    }
    /// Whether the message is still leased to `node` at `now` and not held: a message
    /// that waited in memory is checked before it starts, so `queue delete` and `queue
    /// hold` reach it. A read, no write.
    async fn still_leased(&self, id: &str, node: &str, now: DateTime<Utc>) -> StoreResult<bool>;

    /// Every queued message, oldest received first, with all recipients and states.
    async fn list_queue(&self) -> StoreResult<Vec<QueueSummary>>;
    /// One queued message with its pending recipients and body, locked or not.
    async fn get_queued(&self, id: &str) -> StoreResult<Option<QueuedMessage>>;
    /// Delete one queued message (and its recipients); `Ok(false)` if there was none.
    async fn delete_queued(&self, id: &str) -> StoreResult<bool>;
    /// Delete every queued message; returns how many.
    async fn delete_all_queued(&self) -> StoreResult<u64>;
    /// Put a message on hold (never claimed); `Ok(false)` if there is no such message.
    async fn hold(&self, id: &str) -> StoreResult<bool>;
    /// Take a message off hold; `Ok(false)` if there is no such message.
    async fn release_hold(&self, id: &str) -> StoreResult<bool>;
    /// Make one message (`Some(id)`) or all messages due at `now` (an earlier due time is
    /// kept). Held messages are skipped. Returns how many messages are now due.
    async fn flush(&self, id: Option<&str>, now: DateTime<Utc>) -> StoreResult<u64>;

    /// How many queued messages are in each state at `now`, for metrics and status.
    /// The default counts through `list_queue`; backends override it with one query.
    async fn queue_counts(&self, now: DateTime<Utc>) -> StoreResult<QueueCounts> {
        let mut c = QueueCounts::default();
        for m in self.list_queue().await? {
            c.add(m.held, m.lock_expires_at.is_some_and(|t| t > now), m.tries);
        }
        Ok(c)
    }
}

/// The storage every backend implements: its three roles, and the one write path that
/// stores accepted mail and what delivery attempts did.
#[async_trait::async_trait]
pub trait MessageStore: AccountStore + MailboxStore + QueueStore + 'static {
    /// Short backend name for logs (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// The one write of accepted mail and finished attempts: the messages (each stored
    /// as a mailbox copy per local recipient and a queued row for the remote ones, under
    /// `lease` if given: claim at accept, the row inserted already claimed and due at
    /// the lease's end) and the records (per attempt: the listed pending recipients
    /// updated, `tries + 1`, the lock cleared, the message deleted when no recipient stays
    /// pending, and its notifications queued; only while the lock is the record's node's,
    /// else `Invalid` and nothing changes), in one transaction where the backend can.
    /// Each message and each record gets its own result: unless `batch.atomic`, one
    /// message that fails (a local user removed since RCPT) leaves the others to commit.
    /// An accept is never reported stored unless its transaction committed. The
    /// messages are handed back.
    async fn commit_batch(&self, batch: WriteBatch) -> WriteOutcome;

    /// Store `messages` all or nothing (import, tools): one atomic `commit_batch`.
    async fn accept_batch(&self, messages: Vec<IncomingMessage>) -> StoreResult<Vec<Accepted>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.commit_batch(WriteBatch {
            messages,
            lease: None,
            records: Vec::new(),
            atomic: true,
        })
        .await
        .accepted?
        .into_iter()
        .collect()
    }

    /// Record one attempt: a `commit_batch` of one record.
    async fn record_attempt(
        &self, id: &str, node: &str, outcome: AttemptRecord,
    ) -> StoreResult<()> {
        self.commit_batch(WriteBatch {
            messages: Vec::new(),
            lease: None,
            records: vec![(id.to_string(), node.to_string(), outcome)],
            atomic: false,
        })
        .await
        .recorded?
        .pop()
        .unwrap_or_else(|| Err(StoreError::Backend("no record result".into())))
    }
}

/// A shared handle to whichever backend the configuration names.
pub type SharedStore = Arc<dyn MessageStore>;

/// Open the store named by `url`, creating and migrating it as needed.
///
/// `sqlite://PATH` opens (or creates, with its parent directories) the SQLite file at
/// PATH, relative to the working directory unless absolute (`sqlite:///var/spool/x.db`).
/// `postgres://` and `postgresql://` connect to a shared PostgreSQL database (see
/// `postgres::PgSettings` for the `pool_size` and `connect_timeout` query parameters).
pub async fn open(url: &str) -> StoreResult<SharedStore> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Invalid(format!(
                "store_url {url:?} names no file: expected sqlite://PATH"
            )));
        }
        let store = sqlite::SqliteStore::open(std::path::Path::new(path)).await?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = postgres::PostgresStore::open(url).await?;
        Ok(Arc::new(store))
    } else {
        Err(StoreError::Invalid(format!(
            "unsupported store_url {url:?}: expected sqlite://PATH"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_sqlite_url() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/erlmail.db");
        let url = format!("sqlite://{}", path.display());
        let store = open(&url).await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        assert!(store.add_domain("example.com").await.unwrap());
        assert!(path.is_file());
    }

    #[tokio::test]
    async fn open_refuses_other_urls() {
        // Nothing listens on port 1: a PostgreSQL URL is tried and found unreachable.
        let pg = open("postgres://postgres@127.0.0.1:1/erlmail")
            .await
            .err()
            .unwrap();
        assert!(matches!(pg, StoreError::Unavailable(_)), "{pg}");
        let other = open("mysql://x").await.err().unwrap();
        assert!(matches!(other, StoreError::Invalid(_)), "{other}");
        let empty = open("sqlite://").await.err().unwrap();
        assert!(matches!(empty, StoreError::Invalid(_)), "{empty}");
    }

    #[test]
    fn enospc_is_full() {
        let e = StoreError::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(matches!(e, StoreError::Full(_)));
        let e = StoreError::from(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(e, StoreError::Backend(_)));
    }
}
