//! The embedded SQLite backend of `MessageStore`: one file in the spool directory.
//!
//! Owns the schema migrations (`migrations/sqlite/*.sql`, embedded, versioned in
//! `erlmail_schema`) and every SQL statement against the file. It talks to SQLite through
//! rusqlite only, whose calls block: reads and the writes that need no lock of ours run
//! on tokio's blocking threads with a small pool of connections ([`Pool`]); the writes
//! that read and then write (claims, leases, users, migrations) and the group commits run
//! on the writer thread of `sqlite_writer`, one connection that this process writes
//! through under its writer lock. The file is in WAL mode with `synchronous=FULL`, so a
//! committed transaction survives a power cut; several erlmail processes may share it:
//! every write transaction starts with `BEGIN IMMEDIATE` (it takes the write lock up
//! front, so two writers never deadlock on a lock upgrade) and waits out a busy file for
//! `BUSY_TIMEOUT`. Queue claims are one `UPDATE ... WHERE id IN (SELECT ... LIMIT n)
//! RETURNING id` inside such a transaction, so no row is given to two processes. Times
//! are unix milliseconds. It must not decide policy (retry schedule, who is local):
//! callers pass those in.

use super::common::{
    from_ms, lease_end, ms, node_prefixes, norm_address, norm_domain, norm_mailbox, read_flags,
    read_queued, to_u64, Columns,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, Params, Row, TransactionBehavior};

use super::password::is_phc_hash;
use super::sql::{self, outgoing_cols};
use super::sqlite_writer::{open_connection, sql_err, Writer};
use super::*;

/// How long a statement waits for another process's write lock before failing as
/// `Unavailable`. Generous: a commit with `synchronous=FULL` on a slow disk can take a
/// while, and an SMTP client waits minutes for the reply to DATA anyway.
const BUSY_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections per process in the pool. SQLite has one writer at a time; a few
/// connections let reads (listings, user look-ups) proceed beside a write.
const POOL_SIZE: usize = 4;

/// How long a caller waits for a free pool connection before failing as `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(20);

/// The schema migrations, in order: (version, name, SQL). Never edit a released one; add
/// the next file instead.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "smtputf8",
        include_str!("../../migrations/sqlite/0002_smtputf8.sql"),
    ),
    (
        3,
        "message_flags",
        include_str!("../../migrations/sqlite/0003_message_flags.sql"),
    ),
];

/// The SQLite store: a small connection pool and a writer thread on one database file.
pub struct SqliteStore {
    pool: Arc<Pool>,
    /// The one connection this process writes through under `writer`, on a thread of its
    /// own: group commits (accepts and attempt records) and the other locked writes. Its
    /// page cache stays warm, as no other connection of ours changes the file under it.
    writes: Writer,
    path: PathBuf,
    /// Writers of this process queue here rather than in SQLite's busy handler, which
    /// polls the lock with sleeps (measured: half the time of a relay run went to those
    /// sleeps). Other processes on the same file still meet the busy timeout.
    writer: tokio::sync::Mutex<()>,
    /// A read-only connection for recipient look-ups on the async side
    /// ([`MessageStore::recipient_now`]): a WAL reader never waits for the writer, and a
    /// point look-up on cached statements costs microseconds where a trip to a blocking
    /// thread and back costs tens of them on every RCPT. `None`: it could not be opened,
    /// and look-ups take the pool.
    reader: std::sync::Mutex<Option<Connection>>,
}

/// Connections for reads and for the writes that need no lock of ours, opened lazily
/// (up to `POOL_SIZE`) with the store's pragmas. Each use checks one out on a blocking
/// thread (`spawn_blocking`), so SQLite's calls never hold up the async workers.
struct Pool {
    path: PathBuf,
    extra: Vec<(&'static str, String)>,
    idle: std::sync::Mutex<Vec<Connection>>,
    /// One permit per connection that may be in use; closed by `close`.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Pool {
    fn new(path: &Path, extra: &[(&'static str, String)]) -> Pool {
        Pool {
            path: path.to_path_buf(),
            extra: extra.to_vec(),
            idle: std::sync::Mutex::new(Vec::with_capacity(POOL_SIZE)),
            permits: Arc::new(tokio::sync::Semaphore::new(POOL_SIZE)),
        }
    }

    /// Run `f` on a pool connection on a blocking thread. `f` opens its own transaction
    /// if it needs one; a statement outside one commits on its own.
    async fn run<T, F>(self: &Arc<Self>, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let permit =
            match tokio::time::timeout(ACQUIRE_TIMEOUT, self.permits.clone().acquire_owned()).await
            {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(StoreError::Unavailable("SQLite store closed".into())),
                Err(_) => {
                    return Err(StoreError::Unavailable(
                        "timed out waiting for a SQLite connection".into(),
                    ))
                }
            };
        let pool = Arc::clone(self);
        // The permit goes with the work: a caller that gives up leaves it to finish and
        // hand its connection back.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut conn = match idle {
                Some(conn) => conn,
                None => open_connection(&pool.path, BUSY_TIMEOUT, &pool.extra)?,
            };
            let out = f(&mut conn);
            // A connection still inside a transaction (one whose rollback failed) is
            // closed rather than reused: its next `BEGIN` would fail.
            if conn.is_autocommit() {
                pool.idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn);
            }
            out
        })
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Unavailable(format!(
                "SQLite worker failed: {e}"
            )))
        })
    }

    /// Wait for the connections in use, close them all, and refuse later uses.
    async fn close(&self) {
        let _all = self.permits.acquire_many(POOL_SIZE as u32).await;
        self.permits.close();
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The read-only connection behind [`MessageStore::recipient_now`], or `None` (logged)
/// when it cannot be opened. It never waits on a lock: a busy read falls back to the pool.
fn open_reader(path: &Path) -> Option<Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let opened = Connection::open_with_flags(path, flags).and_then(|c| {
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
        let opened = |e| match e {
            StoreError::Backend(m) => {
                StoreError::Unavailable(format!("cannot open SQLite store {}: {m}", path.display()))
            }
            other => other,
        };
        let pool = Arc::new(Pool::new(path, pragmas));
        // One connection at once (it creates the file), so that a file that cannot be
        // opened fails here rather than at first use; it stays in the pool.
        pool.run(|_| Ok(())).await.map_err(opened)?;
        let (writes, reader) = {
            let (path, pragmas) = (path.to_path_buf(), pragmas.to_vec());
            tokio::task::spawn_blocking(move || {
                // The reader is opened before the migrations: SQLite prepares its
                // statements again when it sees the schema changed.
                Writer::open(&path, BUSY_TIMEOUT, &pragmas).map(|w| (w, open_reader(&path)))
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("SQLite worker failed: {e}")))?
            .map_err(opened)?
        };
        let store = SqliteStore {
            writer: tokio::sync::Mutex::new(()),
            pool,
            writes,
            path: path.to_path_buf(),
            reader: std::sync::Mutex::new(reader),
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
        let v: Option<i64> = self
            .pool
            .run(|c| one(c, sql::SCHEMA_VERSION, [], col0))
            .await?
            .flatten();
        Ok(v.unwrap_or(0))
    }

    /// Close the pool's connections (waits for those in use and for this process's
    /// write in progress).
    pub async fn close(&self) {
        let _writer = self.writer.lock().await;
        self.pool.close().await;
    }

    /// Apply the missing migrations in one write transaction, so that two processes
    /// opening a fresh file at once apply them exactly once.
    async fn migrate(&self) -> StoreResult<()> {
        let _writer = self.writer.lock().await;
        let path = self.path.clone();
        self.writes
            .run(move |conn| {
                let tx = write_tx(conn)?;
                tx.execute_batch(
                    "CREATE TABLE IF NOT EXISTS erlmail_schema (
                         version     INTEGER PRIMARY KEY,
                         name        TEXT NOT NULL,
                         applied_at  INTEGER NOT NULL
                     )",
                )
                .map_err(sql_err)?;
                let current: Option<i64> =
                    one(&tx, sql::SCHEMA_VERSION, [], col0)?.flatten();
                let current = current.unwrap_or(0);
                let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
                if current > latest {
                    return Err(StoreError::Invalid(format!(
                        "store schema version {current} is newer than this erlmail knows \
                         ({latest}); upgrade erlmail"
                    )));
                }
                for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
                    tx.execute_batch(sql).map_err(|e| {
                        StoreError::Backend(format!("migration {version} ({name}): {e}"))
                    })?;
                    execute(
                        &tx,
                        sql::RECORD_MIGRATION,
                        params![version, name, Utc::now().timestamp_millis()],
                    )?;
                    tracing::info!(version, name, path = %path.display(), "store migration applied");
                }
                tx.commit().map_err(sql_err)
            })
            .await
    }
}

// ----- helpers -----

/// A transaction holding the write lock from its first statement.
fn write_tx(conn: &mut Connection) -> StoreResult<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)
}

/// Run one statement (through the connection's statement cache); the rows it changed.
fn execute(conn: &Connection, sql: &str, params: impl Params) -> StoreResult<u64> {
    let n = conn
        .prepare_cached(sql)
        .and_then(|mut s| s.execute(params))
        .map_err(sql_err)?;
    Ok(n as u64)
}

/// Every row of `sql`, each read by `read`.
fn all<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    mut read: impl FnMut(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    let mut rows = stmt.query(params).map_err(sql_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql_err)? {
        out.push(read(row)?);
    }
    Ok(out)
}

/// The first row of `sql`, read by `read`, if there is one.
fn one<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    read: impl FnOnce(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    let mut rows = stmt.query(params).map_err(sql_err)?;
    rows.next().map_err(sql_err)?.map(read).transpose()
}

/// The first column of a row.
fn col0<T: rusqlite::types::FromSql>(r: &Row<'_>) -> StoreResult<T> {
    r.get(0).map_err(sql_err)
}

impl Columns for Row<'_> {
    fn text(&self, col: &str) -> StoreResult<Option<String>> {
        self.get(col)
            .map_err(|e| StoreError::Backend(format!("column {col}: {e}")))
    }

    fn int(&self, col: &str) -> StoreResult<Option<i64>> {
        self.get(col)
            .map_err(|e| StoreError::Backend(format!("column {col}: {e}")))
    }

    fn flag(&self, col: &str) -> StoreResult<bool> {
        Ok(self.int(col)?.unwrap_or(0) != 0)
    }
}

/// One queued message with its pending recipients and body, read on `conn` (inside the
/// caller's transaction, so the reads agree).
fn load_queued(conn: &Connection, id: &str) -> StoreResult<Option<QueuedMessage>> {
    let row = one(
        conn,
        concat!(
            "SELECT ",
            outgoing_cols!(),
            ", body FROM outgoing WHERE id = ?1"
        ),
        [id],
        |r| {
            let o = read_queued(r)?;
            let body: Vec<u8> = r
                .get("body")
                .map_err(|e| StoreError::Backend(format!("outgoing body: {e}")))?;
            Ok((o, body))
        },
    )?;
    let Some((o, body)) = row else {
        return Ok(None);
    };
    let g = |e: rusqlite::Error| StoreError::Backend(format!("outgoing_rcpts row: {e}"));
    let rcpts = all(
        conn,
        "SELECT address, orcpt, notify FROM outgoing_rcpts
         WHERE queue_id = ?1 AND state = 'pending' ORDER BY seq",
        [id],
        |r| {
            Ok(OutgoingRcpt {
                address: r.get("address").map_err(g)?,
                orcpt: r.get("orcpt").map_err(g)?,
                notify: r.get("notify").map_err(g)?,
            })
        },
    )?;
    Ok(Some(QueuedMessage { rcpts, body, ..o }))
}

fn message_summary(r: &Row<'_>) -> StoreResult<MessageSummary> {
    let g = |e: rusqlite::Error| StoreError::Backend(format!("messages row: {e}"));
    Ok(MessageSummary {
        id: r.get("id").map_err(g)?,
        mailbox: r.get("mailbox").map_err(g)?,
        sender: r.get("sender").map_err(g)?,
        subject: r.get("subject").map_err(g)?,
        size: to_u64(r.get("size").map_err(g)?),
        internal_date: from_ms(r.get("internal_date").map_err(g)?)?,
        flags: read_flags(r.get::<_, Option<String>>("flags").map_err(g)?),
    })
}

#[async_trait::async_trait]
impl AccountStore for SqliteStore {
    async fn add_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        let done = self
            .pool
            .run(move |c| {
                execute(
                    c,
                    "INSERT INTO domains (name, created_at) VALUES (?1, ?2)
                     ON CONFLICT (name) DO NOTHING",
                    params![name, Utc::now().timestamp_millis()],
                )
            })
            .await?;
        Ok(done == 1)
    }

    async fn remove_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        // Users, their mailboxes and messages go with it (ON DELETE CASCADE).
        let done = self
            .pool
            .run(move |c| execute(c, "DELETE FROM domains WHERE name = ?1", [name]))
            .await?;
        Ok(done == 1)
    }

    async fn list_domains(&self) -> StoreResult<Vec<String>> {
        self.pool
            .run(|c| all(c, "SELECT name FROM domains ORDER BY name", [], col0))
            .await
    }

    async fn is_local_domain(&self, name: &str) -> StoreResult<bool> {
        let Ok(name) = norm_domain(name) else {
            return Ok(false);
        };
        let found: Option<i64> = self
            .pool
            .run(move |c| one(c, sql::DOMAIN_EXISTS, [name], col0))
            .await?;
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
        let password_hash = password_hash.to_string();
        let _writer = self.writer.lock().await;
        self.writes
            .run(move |conn| {
                let tx = write_tx(conn)?;
                let known: Option<i64> = one(&tx, sql::DOMAIN_EXISTS, [&domain], col0)?;
                if known.is_none() {
                    return Err(StoreError::Invalid(format!("unknown domain {domain}")));
                }
                let done = execute(
                    &tx,
                    sql::INSERT_USER,
                    params![
                        address,
                        local,
                        domain,
                        password_hash,
                        Utc::now().timestamp_millis()
                    ],
                )?;
                if done != 1 {
                    return Err(StoreError::Invalid(format!(
                        "user {address} already exists"
                    )));
                }
                tx.commit().map_err(sql_err)
            })
            .await
    }

    async fn set_password(&self, address: &str, password_hash: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        if !is_phc_hash(password_hash) {
            return Err(StoreError::Invalid(
                "password must be given as an argon2 PHC hash".into(),
            ));
        }
        let password_hash = password_hash.to_string();
        let done = self
            .pool
            .run(move |c| execute(c, sql::SET_PASSWORD, [password_hash, address]))
            .await?;
        Ok(done == 1)
    }

    async fn remove_user(&self, address: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        let done = self
            .pool
            .run(move |c| execute(c, sql::DELETE_USER, [address]))
            .await?;
        Ok(done == 1)
    }

    async fn list_users(&self, domain: Option<&str>) -> StoreResult<Vec<String>> {
        let domain = domain.map(norm_domain).transpose()?;
        self.pool
            .run(move |c| match domain {
                Some(d) => all(
                    c,
                    "SELECT address FROM users WHERE domain = ?1 ORDER BY address",
                    [d],
                    col0,
                ),
                None => all(c, "SELECT address FROM users ORDER BY address", [], col0),
            })
            .await
    }

    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        self.pool
            .run(move |c| one(c, sql::PASSWORD_HASH, [address], col0))
            .await
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
                s.query_row(params![domain, user], |r| {
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
        let found: Option<i64> = self
            .pool
            .run(move |c| one(c, sql::USER_EXISTS, [address], col0))
            .await?;
        Ok(found.is_some())
    }
}

#[async_trait::async_trait]
impl MailboxStore for SqliteStore {
    async fn list_mailbox(&self, address: &str, mailbox: &str) -> StoreResult<Vec<MessageSummary>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(Vec::new());
        };
        let mailbox = norm_mailbox(mailbox).to_string();
        self.pool
            .run(move |c| all(c, sql::LIST_MAILBOX, [address, mailbox], message_summary))
            .await
    }

    async fn get_message(&self, address: &str, id: i64) -> StoreResult<Option<StoredMessage>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        self.pool
            .run(move |c| {
                one(c, sql::GET_MESSAGE, params![address, id], |row| {
                    let g = |e: rusqlite::Error| StoreError::Backend(format!("messages row: {e}"));
                    let recipients: String = row.get("recipients").map_err(g)?;
                    Ok(StoredMessage {
                        summary: message_summary(row)?,
                        recipients: recipients.lines().map(str::to_string).collect(),
                        body: row.get("body").map_err(g)?,
                    })
                })
            })
            .await
    }
}

#[async_trait::async_trait]
impl QueueStore for SqliteStore {
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
        let node = node.to_string();
        let _writer = self.writer.lock().await;
        let mut claimed = self
            .writes
            .run(move |conn| {
                let tx = write_tx(conn)?;
                // The claim itself is this one statement; the write lock taken by BEGIN
                // IMMEDIATE keeps any other process out until we commit. (PostgreSQL:
                // FOR UPDATE SKIP LOCKED in the sub-select.)
                let ids: Vec<String> = all(
                    &tx,
                    "UPDATE outgoing SET lock_owner = ?1, lock_expires_at = ?2
                     WHERE id IN (
                         SELECT id FROM outgoing
                         WHERE next_retry_at <= ?3 AND held = 0
                           AND (lock_owner IS NULL OR lock_expires_at IS NULL
                                OR lock_expires_at <= ?3)
                         ORDER BY next_retry_at, id
                         LIMIT ?4)
                     RETURNING id",
                    params![
                        node,
                        lease_end(now, lease),
                        ms(now),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    col0,
                )?;
                let mut claimed = Vec::with_capacity(ids.len());
                for id in &ids {
                    if let Some(m) = load_queued(&tx, id)? {
                        claimed.push(m);
                    }
                }
                tx.commit().map_err(sql_err)?;
                Ok(claimed)
            })
            .await?;
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
        let (id, node) = (id.to_string(), node.to_string());
        let _writer = self.writer.lock().await;
        self.writes
            .run(move |conn| {
                let tx = write_tx(conn)?;
                let done = execute(
                    &tx,
                    "UPDATE outgoing SET lock_owner = ?1, lock_expires_at = ?2
                     WHERE id = ?3 AND next_retry_at <= ?4 AND held = 0
                       AND (lock_owner IS NULL OR lock_expires_at IS NULL
                            OR lock_expires_at <= ?4)",
                    params![node, lease_end(now, lease), id, ms(now)],
                )?;
                if done != 1 {
                    return Ok(None);
                }
                let m = load_queued(&tx, &id)?;
                tx.commit().map_err(sql_err)?;
                Ok(m)
            })
            .await
    }

    async fn renew_lease(
        &self,
        id: &str,
        node: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> StoreResult<bool> {
        let (id, node) = (id.to_string(), node.to_string());
        let _writer = self.writer.lock().await;
        let done = self
            .writes
            .run(move |c| {
                execute(
                    c,
                    "UPDATE outgoing SET lock_expires_at = ?1
                     WHERE id = ?2 AND lock_owner = ?3 AND held = 0",
                    params![lease_end(now, lease), id, node],
                )
            })
            .await?;
        Ok(done == 1)
    }

    async fn release(&self, id: &str, node: &str) -> StoreResult<()> {
        let (id, node) = (id.to_string(), node.to_string());
        let _writer = self.writer.lock().await;
        self.writes
            .run(move |c| {
                execute(
                    c,
                    "UPDATE outgoing SET lock_owner = NULL, lock_expires_at = NULL,
                         next_retry_at = MIN(next_retry_at, ?3)
                     WHERE id = ?1 AND lock_owner = ?2",
                    params![id, node, ms(Utc::now())],
                )
            })
            .await?;
        Ok(())
    }

    async fn release_node(&self, node: &str, current: &str) -> StoreResult<u64> {
        let (len, booted, legacy) = node_prefixes(node);
        let current = current.to_string();
        let _writer = self.writer.lock().await;
        self.writes
            .run(move |c| {
                execute(
                    c,
                    "UPDATE outgoing SET lock_owner = NULL, lock_expires_at = NULL,
                         next_retry_at = MIN(next_retry_at, ?1)
                     WHERE lock_owner IS NOT NULL AND lock_owner <> ?2
                       AND (substr(lock_owner, 1, ?3) = ?4 OR substr(lock_owner, 1, ?3) = ?5)",
                    params![ms(Utc::now()), current, len, booted, legacy],
                )
            })
            .await
    }

    async fn still_leased(&self, id: &str, node: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let (id, node) = (id.to_string(), node.to_string());
        let row: Option<i64> = self
            .pool
            .run(move |c| {
                one(
                    c,
                    "SELECT 1 FROM outgoing
                     WHERE id = ?1 AND lock_owner = ?2 AND held = 0 AND lock_expires_at > ?3",
                    params![id, node, ms(now)],
                    col0,
                )
            })
            .await?;
        Ok(row.is_some())
    }

    async fn list_queue(&self) -> StoreResult<Vec<QueueSummary>> {
        let (rows, rcpts) = self
            .pool
            .run(|conn| {
                // One read transaction: rows and recipients from the same snapshot.
                let tx = conn.transaction().map_err(sql_err)?;
                let rows = all(
                    &tx,
                    concat!(
                        "SELECT ",
                        outgoing_cols!(),
                        " FROM outgoing ORDER BY received_at, id"
                    ),
                    [],
                    |r| read_queued(r),
                )?;
                let g =
                    |e: rusqlite::Error| StoreError::Backend(format!("outgoing_rcpts row: {e}"));
                let rcpts = all(&tx, sql::ALL_QUEUE_RCPTS, [], |r| {
                    let state: String = r.get("state").map_err(g)?;
                    let state = RcptState::parse(&state).ok_or_else(|| {
                        StoreError::Backend(format!("unknown recipient state {state:?}"))
                    })?;
                    let queue_id: String = r.get("queue_id").map_err(g)?;
                    Ok((
                        queue_id,
                        QueueRcpt {
                            address: r.get("address").map_err(g)?,
                            orcpt: r.get("orcpt").map_err(g)?,
                            notify: r.get("notify").map_err(g)?,
                            state,
                            last_response: r.get("last_response").map_err(g)?,
                        },
                    ))
                })?;
                tx.commit().map_err(sql_err)?;
                Ok((rows, rcpts))
            })
            .await?;
        let mut by_id: HashMap<String, Vec<QueueRcpt>> = HashMap::new();
        for (queue_id, rcpt) in rcpts {
            by_id.entry(queue_id).or_default().push(rcpt);
        }
        Ok(rows
            .into_iter()
            .map(|o| {
                let rcpts = by_id.remove(&o.id).unwrap_or_default();
                o.into_summary(rcpts)
            })
            .collect())
    }

    async fn get_queued(&self, id: &str) -> StoreResult<Option<QueuedMessage>> {
        let id = id.to_string();
        self.pool
            .run(move |conn| {
                let tx = conn.transaction().map_err(sql_err)?;
                let m = load_queued(&tx, &id)?;
                tx.commit().map_err(sql_err)?;
                Ok(m)
            })
            .await
    }

    async fn delete_queued(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        let done = self
            .pool
            .run(move |c| execute(c, sql::DELETE_QUEUED, [id]))
            .await?;
        Ok(done == 1)
    }

    async fn delete_all_queued(&self) -> StoreResult<u64> {
        self.pool
            .run(|c| execute(c, sql::DELETE_ALL_QUEUED, []))
            .await
    }

    async fn hold(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        let done = self
            .pool
            .run(move |c| execute(c, "UPDATE outgoing SET held = 1 WHERE id = ?1", [id]))
            .await?;
        Ok(done == 1)
    }

    async fn release_hold(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        let done = self
            .pool
            .run(move |c| execute(c, "UPDATE outgoing SET held = 0 WHERE id = ?1", [id]))
            .await?;
        Ok(done == 1)
    }

    async fn flush(&self, id: Option<&str>, now: DateTime<Utc>) -> StoreResult<u64> {
        let id = id.map(str::to_string);
        self.pool
            .run(move |c| match id {
                Some(id) => execute(
                    c,
                    "UPDATE outgoing
                     SET next_retry_at = CASE WHEN next_retry_at > ?1 THEN ?1 ELSE next_retry_at END
                     WHERE id = ?2 AND held = 0",
                    params![ms(now), id],
                ),
                None => execute(
                    c,
                    "UPDATE outgoing
                     SET next_retry_at = CASE WHEN next_retry_at > ?1 THEN ?1 ELSE next_retry_at END
                     WHERE held = 0",
                    [ms(now)],
                ),
            })
            .await
    }

    async fn queue_counts(&self, now: DateTime<Utc>) -> StoreResult<super::QueueCounts> {
        let counts = self
            .pool
            .run(move |c| {
                one(
                    c,
                    "SELECT
                       COALESCE(SUM(CASE WHEN held = 1 THEN 1 ELSE 0 END), 0),
                       COALESCE(SUM(CASE WHEN held = 0 AND lock_expires_at > ?1 THEN 1 ELSE 0 END), 0),
                       COALESCE(SUM(CASE WHEN held = 0 AND NOT COALESCE(lock_expires_at > ?1, 0) AND tries > 0 THEN 1 ELSE 0 END), 0),
                       COALESCE(SUM(CASE WHEN held = 0 AND NOT COALESCE(lock_expires_at > ?1, 0) AND tries = 0 THEN 1 ELSE 0 END), 0)
                     FROM outgoing",
                    [ms(now)],
                    |r| {
                        let n = |i: usize| {
                            r.get::<_, i64>(i)
                                .map(|v| v.max(0) as u64)
                                .map_err(sql_err)
                        };
                        Ok(super::QueueCounts {
                            held: n(0)?,
                            active: n(1)?,
                            deferred: n(2)?,
                            incoming: n(3)?,
                        })
                    },
                )
            })
            .await?;
        counts.ok_or_else(|| StoreError::Backend("queue counts: no row".into()))
    }
}

#[async_trait::async_trait]
impl MessageStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn commit_batch(&self, batch: WriteBatch) -> WriteOutcome {
        let _writer = self.writer.lock().await;
        self.writes.commit(batch).await
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

    /// The first column of the first row of `sql`, read on a pool connection.
    async fn scalar<T>(store: &SqliteStore, sql: &'static str) -> T
    where
        T: rusqlite::types::FromSql + Send + 'static,
    {
        store
            .pool
            .run(move |c| one(c, sql, [], col0))
            .await
            .unwrap()
            .expect("a row")
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
        let mode: String = scalar(&store, "PRAGMA journal_mode").await;
        assert_eq!(mode, "wal");
        let sync: i64 = scalar(&store, "PRAGMA synchronous").await;
        assert_eq!(sync, 2, "FULL");
        let fk: i64 = scalar(&store, "PRAGMA foreign_keys").await;
        assert_eq!(fk, 1);
        assert_eq!(store.schema_version().await.unwrap(), 3);
        store.add_domain("keep.test").await.unwrap();
        store.close().await;
        // Re-opening applies nothing twice and keeps the data.
        let again = SqliteStore::open(&path).await.unwrap();
        assert_eq!(again.schema_version().await.unwrap(), 3);
        assert_eq!(
            again.list_domains().await.unwrap(),
            vec!["keep.test".to_string()]
        );
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let (dir, store) = fresh().await;
        store
            .pool
            .run(|c| {
                execute(
                    c,
                    "INSERT INTO erlmail_schema (version, name, applied_at) VALUES (99, 'future', 0)",
                    [],
                )
            })
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
            let n = scalar(&s, "PRAGMA page_count").await;
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
            mailbox: None,
            flags: Vec::new(),
            ret: None,
            envid: None,
            smtputf8: false,
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
