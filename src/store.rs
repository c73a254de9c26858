//! The message store: one trait, `MessageStore`, and its backends.
//!
//! The store owns every piece of durable state: domains, users (argon2 hashes only),
//! mailboxes and their messages (local delivery), and the outgoing queue with its
//! per-recipient rows and leases. Only this module touches the database and spool files.
//! Backends: `sqlite` (embedded default) and, later, `postgres` (shared by a cluster).
//! Every backend passes the contract suite in `store/contract.rs`.

pub mod contract;
pub mod sqlite;

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// Errors from a store backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused the operation; temporary.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The operation broke a rule of the data (unknown domain, duplicate user, ...).
    #[error("{0}")]
    Invalid(String),
    /// Anything else from the backend.
    #[error("store error: {0}")]
    Backend(String),
}

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;

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
/// into the INBOX of each local recipient and queued once for all remote recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    /// Reverse-path (`""` for the null sender `<>`).
    pub sender: String,
    /// Local recipients (`user@domain`, already known to exist).
    pub local_rcpts: Vec<String>,
    /// Recipients for the outgoing queue.
    pub remote_rcpts: Vec<OutgoingRcpt>,
    /// MAIL FROM RET= (`FULL`/`HDRS`), if given.
    pub ret: Option<String>,
    /// MAIL FROM ENVID=, if given.
    pub envid: Option<String>,
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

/// A message in a user's mailbox, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary {
    /// Id within the store.
    pub id: i64,
    /// Mailbox name (`INBOX`).
    pub mailbox: String,
    /// Envelope sender.
    pub sender: String,
    /// Subject header, if any.
    pub subject: Option<String>,
    /// Size in octets.
    pub size: u64,
    /// Internal date.
    pub internal_date: DateTime<Utc>,
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

/// The storage trait every backend implements.
#[async_trait::async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Short backend name for logs (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

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

    /// Commit a batch of accepted messages in one transaction (group commit). Either all
    /// are durably stored or none is; results are in input order.
    async fn accept_batch(&self, messages: Vec<IncomingMessage>) -> StoreResult<Vec<Accepted>>;
    /// Messages of a user's mailbox, oldest first.
    async fn list_mailbox(&self, address: &str, mailbox: &str) -> StoreResult<Vec<MessageSummary>>;
    /// One message of a user, by id.
    async fn get_message(&self, address: &str, id: i64) -> StoreResult<Option<StoredMessage>>;
}

/// A shared handle to whichever backend the configuration names.
pub type SharedStore = Arc<dyn MessageStore>;

/// Open the store named by `url` (`sqlite://PATH`), creating and migrating it as needed.
pub async fn open(url: &str) -> StoreResult<SharedStore> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let _ = sqlite::SqliteStore::open(std::path::Path::new(path)).await?;
        Err(StoreError::Backend("sqlite backend not written yet".into()))
    } else {
        Err(StoreError::Invalid(format!(
            "unsupported store_url {url:?}: expected sqlite://PATH"
        )))
    }
}
