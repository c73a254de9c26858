//! The embedded SQLite backend of `MessageStore`: one file in the spool directory.
//!
//! Owns the connection pool, the schema migrations (`migrations/sqlite/*.sql`, embedded,
//! versioned in `erlmail_schema`) and every SQL statement against the file. The file is in
//! WAL mode with `synchronous=FULL`, so a committed transaction survives a power cut;
//! several erlmail processes may share it: every write transaction starts with
//! `BEGIN IMMEDIATE` (it takes the write lock up front, so two writers never deadlock on
//! a lock upgrade) and waits out a busy file for `BUSY_TIMEOUT`. Queue claims are one
//! `UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING id` inside such a transaction,
//! so no row is given to two processes. Times are unix milliseconds. It must not decide
//! policy (retry schedule, who is local): callers pass those in.

use super::common::{
    from_ms, lease_end, ms, node_prefixes, norm_address, norm_domain, norm_mailbox, opt_from_ms,
    to_u32, to_u64,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::Row;

use super::password::is_phc_hash;
use super::*;

/// How long a statement waits for another process's write lock before failing as
/// `Unavailable`. Generous: a commit with `synchronous=FULL` on a slow disk can take a
/// while, and an SMTP client waits minutes for the reply to DATA anyway.
const BUSY_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections per process. SQLite has one writer at a time; a few connections let reads
/// (listings, user look-ups) proceed beside a write.
const POOL_SIZE: u32 = 4;

/// The schema migrations, in order: (version, name, SQL). Never edit a released one; add
/// the next file instead.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../../migrations/sqlite/0001_initial.sql"),
)];

/// The columns of `outgoing` that a `QueuedMessage`/`QueueSummary` reads, body excluded.
macro_rules! outgoing_cols {
    () => {
        "id, sender, ret, envid, client_ip, helo, received_at, tries, last_try_at, \
         last_error, next_retry_at, lock_owner, lock_expires_at, held, size"
    };
}

/// The SQLite store: a small connection pool on one database file.
pub struct SqliteStore {
    pool: SqlitePool,
    /// The one connection this process writes through (taken under `writer`): its page
    /// cache stays warm, as no other connection of ours changes the file under it.
    writes: SqlitePool,
    /// The group-commit writer (accepts and attempt records), on its own thread.
    fast: super::sqlite_writer::Writer,
    path: PathBuf,
    /// Writers of this process queue here rather than in SQLite's busy handler, which
    /// polls the lock with sleeps (measured: half the time of a relay run went to those
    /// sleeps). Other processes on the same file still meet the busy timeout.
    writer: tokio::sync::Mutex<()>,
    /// A read-only connection for recipient look-ups on the async side
    /// ([`MessageStore::recipient_now`]): a WAL reader never waits for the writer, and a
    /// point look-up on cached statements costs microseconds where a trip to sqlx's
    /// connection thread and back costs tens of them on every RCPT. `None`: it could not
    /// be opened, and look-ups take the pool.
    reader: std::sync::Mutex<Option<rusqlite::Connection>>,
}

/// The read-only connection behind [`MessageStore::recipient_now`], or `None` (logged)
/// when it cannot be opened. It never waits on a lock: a busy read falls back to the pool.
fn open_reader(path: &Path) -> Option<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let opened = rusqlite::Connection::open_with_flags(path, flags).and_then(|c| {
        c.pragma_update(None, "query_only", true)?;
        c.busy_timeout(Duration::ZERO)?;
        c.set_prepared_statement_cache_capacity(4);
        Ok(c)
    });
    match opened {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no direct SQLite reader; look-ups use the pool");
            None
        }
    }
}

impl SqliteStore {
    /// Open the database file at `path`, creating it and its parent directories if
    /// missing, and bring its schema up to date.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with_pragmas(path, &[]).await
    }

    /// `open` with extra per-connection pragmas (tests use `max_page_count` to fill
    /// the database).
    pub(crate) async fn open_with_pragmas(
        path: &Path,
        pragmas: &[(&'static str, String)],
    ) -> StoreResult<Self> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                tokio::fs::create_dir_all(parent).await.map_err(|e| {
                    let e = StoreError::from(e);
                    match e {
                        StoreError::Full(m) => StoreError::Full(m),
                        other => StoreError::Unavailable(format!(
                            "cannot create directory {}: {other}",
                            parent.display()
                        )),
                    }
                })?;
            }
        }
        let mut options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        for (key, value) in pragmas {
            options = options.pragma(*key, value.clone());
        }
        let pool_options = |size: u32| {
            SqlitePoolOptions::new()
                .max_connections(size)
                .min_connections(0)
                .acquire_timeout(BUSY_TIMEOUT + Duration::from_secs(5))
                // On SQLITE_FULL (and I/O errors) SQLite rolls the transaction back by itself;
                // sqlx's own ROLLBACK then fails and the connection keeps a transaction depth
                // of 1, so every later `BEGIN IMMEDIATE` on it would fail for ever and a full
                // disk would never recover. Such a connection is closed instead of reused.
                // (One whose rollback is merely still queued is closed too: harmless.)
                .before_acquire(|conn, _| {
                    Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
                })
        };
        let opened = |e| match db_err(e) {
            StoreError::Backend(m) => {
                StoreError::Unavailable(format!("cannot open SQLite store {}: {m}", path.display()))
            }
            other => other,
        };
        let pool = pool_options(POOL_SIZE)
            .connect_with(options.clone())
            .await
            .map_err(opened)?;
        let writes = pool_options(1)
            .connect_with(options)
            .await
            .map_err(opened)?;
        let store = SqliteStore {
            writer: tokio::sync::Mutex::new(()),
            pool,
            writes,
            fast: super::sqlite_writer::Writer::open(path, BUSY_TIMEOUT, pragmas)?,
            path: path.to_path_buf(),
            // Opened before the migrations: SQLite prepares its statements again when it
            // sees the schema changed.
            reader: std::sync::Mutex::new(open_reader(path)),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the file (the last migration applied).
    pub async fn schema_version(&self) -> StoreResult<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM erlmail_schema")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(v.unwrap_or(0))
    }

    /// Close every connection (waits for those in use).
    pub async fn close(&self) {
        self.pool.close().await;
        self.writes.close().await;
    }

    /// Apply the missing migrations in one write transaction, so that two processes
    /// opening a fresh file at once apply them exactly once.
    async fn migrate(&self) -> StoreResult<()> {
        let _writer = self.writer.lock().await;
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS erlmail_schema (
                 version     INTEGER PRIMARY KEY,
                 name        TEXT NOT NULL,
                 applied_at  INTEGER NOT NULL
             )",
        )
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM erlmail_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        let current = current.unwrap_or(0);
        let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > latest {
            return Err(StoreError::Invalid(format!(
                "store schema version {current} is newer than this erlmail knows ({latest}); \
                 upgrade erlmail"
            )));
        }
        for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::Backend(format!("migration {version} ({name}): {e}")))?;
            sqlx::query(
                "INSERT INTO erlmail_schema (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(version)
            .bind(name)
            .bind(Utc::now().timestamp_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            tracing::info!(version, name, path = %self.path.display(), "store migration applied");
        }
        tx.commit().await.map_err(db_err)
    }

    /// A transaction holding the write lock from its first statement.
    async fn write_tx(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.writes
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)
    }
}

// ----- helpers -----

/// Map a sqlx error to a `StoreError`: a full disk/database is `Full`, a busy or locked
/// file and pool trouble are `Unavailable` (temporary), the rest `Backend`.
fn db_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(dbe) => {
            // sqlx reports SQLite's extended result code.
            let code = dbe.code().and_then(|c| c.parse::<i32>().ok());
            result_code_err(code, dbe.message().to_string())
        }
        sqlx::Error::Io(io) => match StoreError::from(io) {
            StoreError::Backend(m) => StoreError::Unavailable(m),
            other => other,
        },
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        other => StoreError::Backend(other.to_string()),
    }
}

/// The error for SQLite result code `code` (extended or primary; the primary code is its
/// low byte) with message `msg`: a full disk or database is `Full`, a busy or locked
/// file `Unavailable`, the rest `Backend`. Both client libraries' errors map through it.
pub(super) fn result_code_err(code: Option<i32>, msg: String) -> StoreError {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    const SQLITE_FULL: i32 = 13;
    const SQLITE_CANTOPEN: i32 = 14;
    match code.map(|c| c & 0xff) {
        Some(SQLITE_FULL) => StoreError::Full(msg),
        Some(SQLITE_BUSY) | Some(SQLITE_LOCKED) | Some(SQLITE_CANTOPEN) => {
            StoreError::Unavailable(msg)
        }
        _ => StoreError::Backend(msg),
    }
}

/// The row part of a queued message (body and recipients read separately).
struct OutgoingRow {
    id: String,
    sender: String,
    ret: Option<String>,
    envid: Option<String>,
    client_ip: String,
    helo: String,
    received_at: DateTime<Utc>,
    tries: u32,
    last_try_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    next_retry_at: DateTime<Utc>,
    lock_owner: Option<String>,
    lock_expires_at: Option<DateTime<Utc>>,
    held: bool,
    size: u64,
}

fn outgoing_row(r: &SqliteRow) -> StoreResult<OutgoingRow> {
    let g = |e: sqlx::Error| StoreError::Backend(format!("outgoing row: {e}"));
    Ok(OutgoingRow {
        id: r.try_get("id").map_err(g)?,
        sender: r.try_get("sender").map_err(g)?,
        ret: r.try_get("ret").map_err(g)?,
        envid: r.try_get("envid").map_err(g)?,
        client_ip: r.try_get("client_ip").map_err(g)?,
        helo: r.try_get("helo").map_err(g)?,
        received_at: from_ms(r.try_get("received_at").map_err(g)?)?,
        tries: to_u32(r.try_get("tries").map_err(g)?),
        last_try_at: opt_from_ms(r.try_get("last_try_at").map_err(g)?)?,
        last_error: r.try_get("last_error").map_err(g)?,
        next_retry_at: from_ms(r.try_get("next_retry_at").map_err(g)?)?,
        lock_owner: r.try_get("lock_owner").map_err(g)?,
        lock_expires_at: opt_from_ms(r.try_get("lock_expires_at").map_err(g)?)?,
        held: r.try_get::<i64, _>("held").map_err(g)? != 0,
        size: to_u64(r.try_get("size").map_err(g)?),
    })
}

/// One queued message with its pending recipients and body, read on `conn` (inside the
/// caller's transaction, so the three reads agree).
async fn load_queued(conn: &mut SqliteConnection, id: &str) -> StoreResult<Option<QueuedMessage>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        outgoing_cols!(),
        ", body FROM outgoing WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let o = outgoing_row(&row)?;
    let body: Vec<u8> = row
        .try_get("body")
        .map_err(|e| StoreError::Backend(format!("outgoing body: {e}")))?;
    let rows = sqlx::query(
        "SELECT address, orcpt, notify FROM outgoing_rcpts
         WHERE queue_id = $1 AND state = 'pending' ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    let g = |e: sqlx::Error| StoreError::Backend(format!("outgoing_rcpts row: {e}"));
    let rcpts = rows
        .iter()
        .map(|r| {
            Ok(OutgoingRcpt {
                address: r.try_get("address").map_err(g)?,
                orcpt: r.try_get("orcpt").map_err(g)?,
                notify: r.try_get("notify").map_err(g)?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(Some(QueuedMessage {
        id: o.id,
        sender: o.sender,
        ret: o.ret,
        envid: o.envid,
        client_ip: o.client_ip,
        helo: o.helo,
        received_at: o.received_at,
        tries: o.tries,
        last_try_at: o.last_try_at,
        last_error: o.last_error,
        next_retry_at: o.next_retry_at,
        lock_owner: o.lock_owner,
        lock_expires_at: o.lock_expires_at,
        held: o.held,
        size: o.size,
        rcpts,
        body,
    }))
}

fn message_summary(r: &SqliteRow) -> StoreResult<MessageSummary> {
    let g = |e: sqlx::Error| StoreError::Backend(format!("messages row: {e}"));
    Ok(MessageSummary {
        id: r.try_get("id").map_err(g)?,
        mailbox: r.try_get("mailbox").map_err(g)?,
        sender: r.try_get("sender").map_err(g)?,
        subject: r.try_get("subject").map_err(g)?,
        size: to_u64(r.try_get("size").map_err(g)?),
        internal_date: from_ms(r.try_get("internal_date").map_err(g)?)?,
    })
}

#[async_trait::async_trait]
impl MessageStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn add_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        let done = sqlx::query(
            "INSERT INTO domains (name, created_at) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&name)
        .bind(Utc::now().timestamp_millis())
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        // Users, their mailboxes and messages go with it (ON DELETE CASCADE).
        let done = sqlx::query("DELETE FROM domains WHERE name = $1")
            .bind(&name)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_domains(&self) -> StoreResult<Vec<String>> {
        sqlx::query_scalar("SELECT name FROM domains ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn is_local_domain(&self, name: &str) -> StoreResult<bool> {
        let Ok(name) = norm_domain(name) else {
            return Ok(false);
        };
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM domains WHERE name = $1")
            .bind(&name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(found.is_some())
    }

    async fn add_user(&self, address: &str, password_hash: &str) -> StoreResult<()> {
        let (address, local, domain) = norm_address(address)?;
        if !is_phc_hash(password_hash) {
            // Never echo the value: it might be a clear-text password passed by mistake.
            return Err(StoreError::Invalid(
                "password must be given as an argon2 PHC hash".into(),
            ));
        }
        let _writer = self.writer.lock().await;
        let mut tx = self.write_tx().await?;
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM domains WHERE name = $1")
            .bind(&domain)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
        if known.is_none() {
            return Err(StoreError::Invalid(format!("unknown domain {domain}")));
        }
        let done = sqlx::query(
            "INSERT INTO users (address, local_part, domain, password_hash, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (address) DO NOTHING",
        )
        .bind(&address)
        .bind(&local)
        .bind(&domain)
        .bind(password_hash)
        .bind(Utc::now().timestamp_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Invalid(format!(
                "user {address} already exists"
            )));
        }
        tx.commit().await.map_err(db_err)
    }

    async fn set_password(&self, address: &str, password_hash: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        if !is_phc_hash(password_hash) {
            return Err(StoreError::Invalid(
                "password must be given as an argon2 PHC hash".into(),
            ));
        }
        let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE address = $2")
            .bind(password_hash)
            .bind(&address)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_user(&self, address: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        let done = sqlx::query("DELETE FROM users WHERE address = $1")
            .bind(&address)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_users(&self, domain: Option<&str>) -> StoreResult<Vec<String>> {
        match domain {
            Some(d) => {
                let d = norm_domain(d)?;
                sqlx::query_scalar("SELECT address FROM users WHERE domain = $1 ORDER BY address")
                    .bind(d)
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query_scalar("SELECT address FROM users ORDER BY address")
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(db_err)
    }

    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        sqlx::query_scalar("SELECT password_hash FROM users WHERE address = $1")
            .bind(&address)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)
    }

    fn recipient_now(&self, address: &str) -> Option<StoreResult<(bool, bool)>> {
        // Another thread using the connection: take the pool rather than wait.
        let guard = self.reader.try_lock().ok()?;
        let conn = guard.as_ref()?;
        let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        let Ok(domain) = norm_domain(domain) else {
            return Some(Ok((false, false)));
        };
        let user = norm_address(address).map(|(a, _, _)| a).ok();
        let found = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM domains WHERE name = ?1),
                        EXISTS (SELECT 1 FROM users WHERE address = ?2)",
            )
            .and_then(|mut s| {
                s.query_row(rusqlite::params![domain, user], |r| {
                    Ok((r.get::<_, bool>(0)?, r.get::<_, bool>(1)?))
                })
            });
        match found {
            Ok((local, exists)) => Some(Ok((local, local && exists))),
            // Busy (a writer recovering the WAL index) or any other trouble: the pool's
            // path answers, with its busy timeout and error mapping.
            Err(_) => None,
        }
    }

    async fn user_exists(&self, address: &str) -> StoreResult<bool> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(false);
        };
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM users WHERE address = $1")
            .bind(&address)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(found.is_some())
    }

    async fn accept_leased(
        &self,
        messages: &[IncomingMessage],
        lease: Option<&AcceptLease>,
    ) -> StoreResult<Vec<Accepted>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let batch = WriteBatch {
            messages: messages.to_vec(),
            lease: lease.cloned(),
            records: Vec::new(),
        };
        let _writer = self.writer.lock().await;
        self.fast
            .commit_with(batch, false)
            .await
            .accepted?
            .into_iter()
            .collect()
    }

    async fn commit_batch(&self, batch: WriteBatch) -> WriteOutcome {
        let _writer = self.writer.lock().await;
        self.fast.commit(batch).await
    }

    async fn list_mailbox(&self, address: &str, mailbox: &str) -> StoreResult<Vec<MessageSummary>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(
            "SELECT m.id, b.name AS mailbox, m.sender, m.subject, m.size, m.internal_date
             FROM messages m
             JOIN mailboxes b ON m.mailbox_id = b.id
             JOIN users u ON b.user_id = u.id
             WHERE u.address = $1 AND b.name = $2
             ORDER BY m.id",
        )
        .bind(&address)
        .bind(norm_mailbox(mailbox))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(message_summary).collect()
    }

    async fn get_message(&self, address: &str, id: i64) -> StoreResult<Option<StoredMessage>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT m.id, b.name AS mailbox, m.sender, m.subject, m.size, m.internal_date,
                    m.recipients, m.body
             FROM messages m
             JOIN mailboxes b ON m.mailbox_id = b.id
             JOIN users u ON b.user_id = u.id
             WHERE u.address = $1 AND m.id = $2",
        )
        .bind(&address)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let g = |e: sqlx::Error| StoreError::Backend(format!("messages row: {e}"));
        let recipients: String = row.try_get("recipients").map_err(g)?;
        Ok(Some(StoredMessage {
            summary: message_summary(&row)?,
            recipients: recipients.lines().map(str::to_string).collect(),
            body: row.try_get("body").map_err(g)?,
        }))
    }

    async fn claim_due(
        &self,
        node: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<QueuedMessage>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let _writer = self.writer.lock().await;
        let mut tx = self.write_tx().await?;
        // The claim itself is this one statement; the write lock taken by BEGIN IMMEDIATE
        // keeps any other process out until we commit. (PostgreSQL: FOR UPDATE SKIP LOCKED
        // in the sub-select.)
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE outgoing SET lock_owner = $1, lock_expires_at = $2
             WHERE id IN (
                 SELECT id FROM outgoing
                 WHERE next_retry_at <= $3 AND held = 0
                   AND (lock_owner IS NULL OR lock_expires_at IS NULL OR lock_expires_at <= $3)
                 ORDER BY next_retry_at, id
                 LIMIT $4)
             RETURNING id",
        )
        .bind(node)
        .bind(lease_end(now, lease))
        .bind(ms(now))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(m) = load_queued(&mut tx, id).await? {
                claimed.push(m);
            }
        }
        tx.commit().await.map_err(db_err)?;
        // RETURNING gives no order; hand them out in due order.
        claimed.sort_by(|a, b| (a.next_retry_at, &a.id).cmp(&(b.next_retry_at, &b.id)));
        Ok(claimed)
    }

    async fn claim(
        &self,
        id: &str,
        node: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> StoreResult<Option<QueuedMessage>> {
        let _writer = self.writer.lock().await;
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(
            "UPDATE outgoing SET lock_owner = $1, lock_expires_at = $2
             WHERE id = $3 AND next_retry_at <= $4 AND held = 0
               AND (lock_owner IS NULL OR lock_expires_at IS NULL OR lock_expires_at <= $4)",
        )
        .bind(node)
        .bind(lease_end(now, lease))
        .bind(id)
        .bind(ms(now))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        let m = load_queued(&mut tx, id).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(m)
    }

    async fn renew_lease(
        &self,
        id: &str,
        node: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> StoreResult<bool> {
        let _writer = self.writer.lock().await;
        let done = sqlx::query(
            "UPDATE outgoing SET lock_expires_at = $1
             WHERE id = $2 AND lock_owner = $3 AND held = 0",
        )
        .bind(lease_end(now, lease))
        .bind(id)
        .bind(node)
        .execute(&self.writes)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_attempt(
        &self,
        id: &str,
        node: &str,
        outcome: AttemptRecord,
    ) -> StoreResult<()> {
        self.record_attempts(vec![(id.to_string(), node.to_string(), outcome)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Backend("no record result".into())))
    }

    async fn release(&self, id: &str, node: &str) -> StoreResult<()> {
        let _writer = self.writer.lock().await;
        sqlx::query(
            "UPDATE outgoing SET lock_owner = NULL, lock_expires_at = NULL,
                 next_retry_at = MIN(next_retry_at, $3)
             WHERE id = $1 AND lock_owner = $2",
        )
        .bind(id)
        .bind(node)
        .bind(ms(Utc::now()))
        .execute(&self.writes)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn release_node(&self, node: &str, current: &str) -> StoreResult<u64> {
        let _writer = self.writer.lock().await;
        let (len, booted, legacy) = node_prefixes(node);
        let done = sqlx::query(
            "UPDATE outgoing SET lock_owner = NULL, lock_expires_at = NULL,
                 next_retry_at = MIN(next_retry_at, $1)
             WHERE lock_owner IS NOT NULL AND lock_owner <> $2
               AND (substr(lock_owner, 1, $3) = $4 OR substr(lock_owner, 1, $3) = $5)",
        )
        .bind(ms(Utc::now()))
        .bind(current)
        .bind(len)
        .bind(booted)
        .bind(legacy)
        .execute(&self.writes)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn still_leased(&self, id: &str, node: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let row: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM outgoing
             WHERE id = $1 AND lock_owner = $2 AND held = 0 AND lock_expires_at > $3",
        )
        .bind(id)
        .bind(node)
        .bind(ms(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(row.is_some())
    }

    async fn list_queue(&self) -> StoreResult<Vec<QueueSummary>> {
        // One read transaction: rows and recipients from the same snapshot.
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            outgoing_cols!(),
            " FROM outgoing ORDER BY received_at, id"
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let rrows = sqlx::query(
            "SELECT queue_id, address, orcpt, notify, state, last_response
             FROM outgoing_rcpts ORDER BY queue_id, seq",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        let g = |e: sqlx::Error| StoreError::Backend(format!("outgoing_rcpts row: {e}"));
        let mut by_id: HashMap<String, Vec<QueueRcpt>> = HashMap::new();
        for r in &rrows {
            let state: String = r.try_get("state").map_err(g)?;
            let state = RcptState::parse(&state)
                .ok_or_else(|| StoreError::Backend(format!("unknown recipient state {state:?}")))?;
            by_id
                .entry(r.try_get("queue_id").map_err(g)?)
                .or_default()
                .push(QueueRcpt {
                    address: r.try_get("address").map_err(g)?,
                    orcpt: r.try_get("orcpt").map_err(g)?,
                    notify: r.try_get("notify").map_err(g)?,
                    state,
                    last_response: r.try_get("last_response").map_err(g)?,
                });
        }
        rows.iter()
            .map(|r| {
                let o = outgoing_row(r)?;
                Ok(QueueSummary {
                    rcpts: by_id.remove(&o.id).unwrap_or_default(),
                    id: o.id,
                    size: o.size,
                    received_at: o.received_at,
                    sender: o.sender,
                    tries: o.tries,
                    last_try_at: o.last_try_at,
                    next_retry_at: o.next_retry_at,
                    last_error: o.last_error,
                    held: o.held,
                    lock_owner: o.lock_owner,
                    lock_expires_at: o.lock_expires_at,
                })
            })
            .collect()
    }

    async fn get_queued(&self, id: &str) -> StoreResult<Option<QueuedMessage>> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let m = load_queued(&mut tx, id).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(m)
    }

    async fn delete_queued(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM outgoing WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_all_queued(&self) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM outgoing")
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn hold(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE outgoing SET held = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_hold(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE outgoing SET held = 0 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn flush(&self, id: Option<&str>, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = match id {
            Some(id) => {
                sqlx::query(
                    "UPDATE outgoing
                     SET next_retry_at = CASE WHEN next_retry_at > $1 THEN $1 ELSE next_retry_at END
                     WHERE id = $2 AND held = 0",
                )
                .bind(ms(now))
                .bind(id)
                .execute(&self.pool)
                .await
            }
            None => {
                sqlx::query(
                    "UPDATE outgoing
                     SET next_retry_at = CASE WHEN next_retry_at > $1 THEN $1 ELSE next_retry_at END
                     WHERE held = 0",
                )
                .bind(ms(now))
                .execute(&self.pool)
                .await
            }
        }
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn record_attempts(
        &self,
        batch: Vec<(String, String, AttemptRecord)>,
    ) -> StoreResult<Vec<StoreResult<()>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.commit_batch(WriteBatch {
            messages: Vec::new(),
            lease: None,
            records: batch,
        })
        .await
        .recorded
    }

    async fn queue_counts(&self, now: DateTime<Utc>) -> StoreResult<super::QueueCounts> {
        let row = sqlx::query(
            "SELECT
               COALESCE(SUM(CASE WHEN held = 1 THEN 1 ELSE 0 END), 0),
               COALESCE(SUM(CASE WHEN held = 0 AND lock_expires_at > $1 THEN 1 ELSE 0 END), 0),
               COALESCE(SUM(CASE WHEN held = 0 AND NOT COALESCE(lock_expires_at > $1, 0) AND tries > 0 THEN 1 ELSE 0 END), 0),
               COALESCE(SUM(CASE WHEN held = 0 AND NOT COALESCE(lock_expires_at > $1, 0) AND tries = 0 THEN 1 ELSE 0 END), 0)
             FROM outgoing",
        )
        .bind(ms(now))
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        let n = |i: usize| row.try_get::<i64, _>(i).map(|v| v.max(0) as u64);
        Ok(super::QueueCounts {
            held: n(0).map_err(db_err)?,
            active: n(1).map_err(db_err)?,
            deferred: n(2).map_err(db_err)?,
            incoming: n(3).map_err(db_err)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fresh() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("spool/sub/erlmail.db"))
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn contract_suite() {
        let (_dir, store) = fresh().await;
        super::super::contract::run_all(&store).await;
    }

    #[tokio::test]
    async fn recipient_look_ups_answer_at_once_and_see_other_processes_writes() {
        let (dir, store) = fresh().await;
        assert_eq!(
            store.recipient_now("x@nowhere.test").map(|r| r.unwrap()),
            Some((false, false)),
            "SQLite answers without the pool"
        );
        // Another handle on the file, as the admin CLI is: its writes are seen at once.
        let other = SqliteStore::open(&dir.path().join("spool/sub/erlmail.db"))
            .await
            .unwrap();
        other.add_domain("later.test").await.unwrap();
        let h = crate::store::password::hash_password("pw").unwrap();
        other.add_user("gus@later.test", &h).await.unwrap();
        assert_eq!(
            store.recipient_now("GUS@later.test").map(|r| r.unwrap()),
            Some((true, true))
        );
        assert_eq!(
            store.recipient_now("hal@later.test").map(|r| r.unwrap()),
            Some((true, false))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_handles_never_claim_the_same_message() {
        let (dir, a) = fresh().await;
        let b = SqliteStore::open(&dir.path().join("spool/sub/erlmail.db"))
            .await
            .unwrap();
        super::super::contract::concurrent_claims(&a, &b, 200).await;
    }

    #[tokio::test]
    async fn pragmas_and_schema_version() {
        let (dir, store) = fresh().await;
        let path = dir.path().join("spool/sub/erlmail.db");
        assert!(path.is_file());
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        assert_eq!(store.schema_version().await.unwrap(), 1);
        store.add_domain("keep.test").await.unwrap();
        store.close().await;
        // Re-opening applies nothing twice and keeps the data.
        let again = SqliteStore::open(&path).await.unwrap();
        assert_eq!(again.schema_version().await.unwrap(), 1);
        assert_eq!(
            again.list_domains().await.unwrap(),
            vec!["keep.test".to_string()]
        );
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let (dir, store) = fresh().await;
        sqlx::query(
            "INSERT INTO erlmail_schema (version, name, applied_at) VALUES (99, 'future', 0)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        store.close().await;
        let err = SqliteStore::open(&dir.path().join("spool/sub/erlmail.db"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, StoreError::Invalid(ref m) if m.contains("99")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn full_database_is_reported_as_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.db");
        // Create the schema first, then re-open with a page cap just above its size.
        let pages: i64 = {
            let s = SqliteStore::open(&path).await.unwrap();
            let n = sqlx::query_scalar("PRAGMA page_count")
                .fetch_one(&s.pool)
                .await
                .unwrap();
            s.close().await;
            n
        };
        let store =
            SqliteStore::open_with_pragmas(&path, &[("max_page_count", (pages + 2).to_string())])
                .await
                .unwrap();
        let msg = IncomingMessage {
            sender: "s@x.test".into(),
            local_rcpts: vec![],
            remote_rcpts: vec![OutgoingRcpt {
                address: "r@far.test".into(),
                orcpt: None,
                notify: None,
            }],
            ret: None,
            envid: None,
            client_ip: "127.0.0.1".into(),
            helo: "h".into(),
            received_at: Utc::now(),
            subject: None,
            body: vec![b'x'; 1 << 20],
        };
        let err = store.accept_batch(vec![msg]).await.unwrap_err();
        assert!(matches!(err, StoreError::Full(_)), "{err:?}");
        assert!(
            store.list_queue().await.unwrap().is_empty(),
            "nothing half-stored"
        );
    }
}
