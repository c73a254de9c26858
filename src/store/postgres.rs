//! The PostgreSQL backend of `MessageStore`: one database shared by a cluster of nodes.
//!
//! Owns the connection pool, the schema migrations (`migrations/postgres/*.sql`, embedded,
//! versioned in `erlmail_schema`, applied at open inside one transaction under an advisory
//! lock so that several nodes starting at once apply each exactly once) and every SQL
//! statement against the database. The schema and the meaning of every column are those
//! of the SQLite backend (times are unix milliseconds), so the two behave alike under the
//! contract suite. Queue claims are one `UPDATE` over a sub-select taken with
//! `FOR UPDATE SKIP LOCKED`: concurrent claimers on other nodes skip each other's rows
//! instead of waiting, and a row is never given to two nodes while its lease runs.
//! Accepting or flushing queued messages also sends a `NOTIFY` on `QUEUE_CHANNEL`, so that
//! every node can hear of new work at once (`PostgresStore::queue_listener`).
//! A database outage is reported as `StoreError::Unavailable` (the pool fails fast, after
//! `connect_timeout`), a full disk as `StoreError::Full`. It must not decide policy
//! (retry schedule, who is local): callers pass those in.

use super::common::{
    from_ms, lease_end, local_copy, ms, new_queue_id, node_prefixes, norm_address, norm_domain,
    norm_mailbox, read_flags, read_queued, to_u64, Columns,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;

use super::password::is_phc_hash;
use super::sql::{self, outgoing_cols};
use super::*;

mod batch;

/// Connections per node unless the URL says `pool_size=N`. Each sender, session commit
/// and admin command holds one only for a statement or a short transaction.
pub const DEFAULT_POOL_SIZE: u32 = 10;

/// How long connecting (and waiting for a free pooled connection) may take unless the URL
/// says `connect_timeout=SECONDS`. Short, so that an outage turns into a quick `451`
/// instead of a hung SMTP session.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `LISTEN`/`NOTIFY` channel on which every node hears of queue work: the payload is
/// a queue id (a message newly accepted, or flushed, on some node: whoever claims it first
/// tries it at once) or `*` (`queue flush` of everything: run the due scan now). Sent on
/// commit only, so a listener never hears of a message it cannot read yet.
pub const QUEUE_CHANNEL: &str = "erlmail_queue";

/// The channel on which every node hears that the local domains changed (payload: the
/// domain), so that its cached list ([`PostgresStore`]'s `domains`) is read again.
pub const ACCOUNTS_CHANNEL: &str = "erlmail_accounts";

/// Key of the advisory lock held while migrating (any fixed 64-bit number; this one spells
/// "erlmail" in ASCII).
const MIGRATION_LOCK: i64 = 0x65_72_6c_6d_61_69_6c;

/// The schema migrations, in order: (version, name, SQL). Never edit a released one; add
/// the next file instead.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "smtputf8",
        include_str!("../../migrations/postgres/0002_smtputf8.sql"),
    ),
    (
        3,
        "message_flags",
        include_str!("../../migrations/postgres/0003_message_flags.sql"),
    ),
];

/// The settings `PostgresStore::open` takes from a store URL besides what libpq-style
/// URLs already carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// The URL without erlmail's own query parameters, as handed to sqlx.
    pub url: String,
    /// Maximum connections of the pool (`pool_size=N`, default `DEFAULT_POOL_SIZE`).
    pub pool_size: u32,
    /// Connect and acquire timeout (`connect_timeout=SECONDS`, default
    /// `DEFAULT_CONNECT_TIMEOUT`).
    pub connect_timeout: Duration,
}

impl PgSettings {
    /// Split erlmail's query parameters (`pool_size`, `connect_timeout`) off a
    /// `postgres://` URL; the others are left for sqlx. `Invalid` on a bad value.
    pub fn from_url(url: &str) -> StoreResult<PgSettings> {
        let mut settings = PgSettings {
            url: url.to_string(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        let Some((base, query)) = url.split_once('?') else {
            return Ok(settings);
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "pool_size" => {
                    settings.pool_size =
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| {
                                StoreError::Invalid(format!(
                                    "store_url: pool_size={value:?} is not a positive number"
                                ))
                            })?;
                }
                "connect_timeout" => {
                    let secs = value
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            StoreError::Invalid(format!(
                                "store_url: connect_timeout={value:?} is not a positive \
                                 number of seconds"
                            ))
                        })?;
                    settings.connect_timeout = Duration::from_secs(secs);
                }
                _ => kept.push(pair),
            }
        }
        settings.url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(settings)
    }
}

/// The PostgreSQL store: a connection pool on one database shared by every node.
/// The database server's clock in the store's time unit (milliseconds since the epoch),
/// for statements that must not trust the calling host's clock.
macro_rules! db_now {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

pub struct PostgresStore {
    pool: PgPool,
    /// How to reach the server, for the node lock's own connection.
    options: PgConnectOptions,
    /// The connection holding this process's node-name advisory lock (`lock_node`).
    node_lock: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    /// The local domains, for recipient look-ups without a round trip
    /// (`recipient_now`): `None` unless the notification listener is connected and has
    /// read them since its last (re)connection or domain change.
    domains: Arc<std::sync::RwLock<Option<HashSet<String>>>>,
}

impl PostgresStore {
    /// Connect to the database named by a `postgres://` or `postgresql://` URL and bring
    /// its schema up to date. Fails with `Unavailable` when the server cannot be reached
    /// within the connect timeout.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let settings = PgSettings::from_url(url)?;
        let options: PgConnectOptions = settings
            .url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("store_url: {e}")))?;
        let options = options
            .application_name("erlmail")
            .options([("plan_cache_mode", "force_generic_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool_size)
            .min_connections(0)
            // sqlx has no separate connect timeout: the acquire deadline bounds connecting.
            .acquire_timeout(settings.connect_timeout)
            .connect_with(options.clone())
            .await
            .map_err(|e| match db_err(e) {
                StoreError::Backend(m) => {
                    StoreError::Unavailable(format!("cannot open PostgreSQL store: {m}"))
                }
                other => other,
            })?;
        let store = PostgresStore {
            pool,
            options,
            node_lock: tokio::sync::Mutex::new(None),
            domains: Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// `accept_leased` for the group commit, where one message that fails (a local user
    /// removed since RCPT) must leave the others to commit. A savepoint costs two round
    /// trips per message, so the batch is first tried without them; only when that
    /// fails is it run again with each message in a savepoint of its own.
    async fn accept_isolated(
        &self,
        messages: &[IncomingMessage],
        lease: Option<&AcceptLease>,
    ) -> StoreResult<Vec<StoreResult<Accepted>>> {
        match self.accept_leased(messages, lease).await {
            Ok(all) => return Ok(all.into_iter().map(Ok).collect()),
            // One message was refused (a local user removed since RCPT): isolate it.
            Err(StoreError::Invalid(_)) => {}
            // The database failed (unreachable, broken connection): the savepoints would
            // fare no better, and the sessions must get their 451 now, not after a
            // second timeout.
            Err(e) => return Err(e),
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            sqlx::query("SAVEPOINT accept_one")
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            match accept_one(&mut tx, m, lease).await {
                Ok(a) => {
                    sqlx::query("RELEASE SAVEPOINT accept_one")
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                    out.push(Ok(a));
                }
                Err(e) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT accept_one")
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                    out.push(Err(e));
                }
            }
        }
        // Other nodes need waking only for mail nobody holds (a front node's): a leased
        // row is being tried by its node already.
        let queued: Vec<&str> = out
            .iter()
            .filter_map(|a| a.as_ref().ok().and_then(|a| a.queue_id.as_deref()))
            .collect();
        if !queued.is_empty() && lease.is_none() {
            notify(&mut tx, &queued).await?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(out)
    }

    /// The group commit the quick way ([`batch`]): one statement for the messages and
    /// the plain records, which commits on its own. Records that owe notifications
    /// (messages of their own to queue) join it in one transaction, one by one. `Err`:
    /// nothing was committed.
    async fn commit_fast(
        &self,
        messages: &[IncomingMessage],
        lease: Option<&AcceptLease>,
        records: &[(String, String, AttemptRecord)],
    ) -> StoreResult<batch::Committed> {
        if batch::plain_records(records) {
            let mut conn = self.pool.acquire().await.map_err(db_err)?;
            return batch::commit_all(&mut conn, messages, lease, records).await;
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let done = async {
            let (accepted, _) = batch::commit_all(&mut tx, messages, lease, &[]).await?;
            let mut recorded = Vec::with_capacity(records.len());
            for (id, node, record) in records {
                recorded.push(record_one(&mut tx, id, node, record).await?);
            }
            Ok::<_, StoreError>((accepted, recorded))
        }
        .await;
        match done {
            Ok(done) => {
                tx.commit().await.map_err(db_err)?;
                Ok(done)
            }
            Err(e) => {
                // Roll back now, not when the connection is next used: until then the
                // row locks taken would hold up the redo and other nodes' claims.
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// The schema version of the database (the last migration applied).
    pub async fn schema_version(&self) -> StoreResult<i64> {
        let v: Option<i64> = sqlx::query_scalar(sql::SCHEMA_VERSION)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(v.unwrap_or(0))
    }

    /// The connection pool (tests and administration look at the database directly).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A listener on `QUEUE_CHANNEL`, on a connection of the pool kept for it (it
    /// reconnects by itself after an outage; notices sent meanwhile are lost, which the
    /// periodic due scan covers). `wake_ups` runs one for the queue.
    pub async fn queue_listener(&self) -> StoreResult<sqlx::postgres::PgListener> {
        queue_listener(&self.pool).await
    }

    /// Close every connection (waits for those in use).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Apply the missing migrations in one transaction holding a transaction-scoped
    /// advisory lock: a second node opening at the same time waits, then finds them
    /// applied. PostgreSQL's DDL is transactional, so a failed migration leaves nothing.
    async fn migrate(&self) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS erlmail_schema (
                 version     BIGINT PRIMARY KEY,
                 name        TEXT NOT NULL,
                 applied_at  BIGINT NOT NULL
             )",
        )
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let current: Option<i64> = sqlx::query_scalar(sql::SCHEMA_VERSION)
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
                .map_err(|e| match db_err(e) {
                    StoreError::Backend(m) => {
                        StoreError::Backend(format!("migration {version} ({name}): {m}"))
                    }
                    other => other,
                })?;
            sqlx::query(sql::RECORD_MIGRATION)
                .bind(version)
                .bind(name)
                .bind(Utc::now().timestamp_millis())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tracing::info!(version, name, "store migration applied (postgres)");
        }
        tx.commit().await.map_err(db_err)
    }
}

// ----- helpers -----

/// Map a sqlx error to a `StoreError` by SQLSTATE: a full disk is `Full`; a lost or
/// refused connection, a server shutting down, too many connections, a deadlock or
/// serialization failure (all worth retrying) and pool trouble are `Unavailable`; the
/// rest `Backend`.
fn db_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(dbe) => {
            let code = dbe.code().map(|c| c.into_owned()).unwrap_or_default();
            let msg = format!("{} (SQLSTATE {code})", dbe.message());
            match code.as_str() {
                // disk_full
                "53100" => StoreError::Full(msg),
                // class 08 connection_exception; admin_shutdown, crash_shutdown,
                // cannot_connect_now, database_dropped; insufficient_resources,
                // out_of_memory, too_many_connections; serialization_failure,
                // deadlock_detected; read_only_sql_transaction (a standby after failover).
                c if c.starts_with("08") => StoreError::Unavailable(msg),
                "57P01" | "57P02" | "57P03" | "57P04" | "53000" | "53200" | "53300" | "40001"
                | "40P01" | "25006" => StoreError::Unavailable(msg),
                _ => StoreError::Backend(msg),
            }
        }
        sqlx::Error::Io(io) => StoreError::Unavailable(io.to_string()),
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        other => StoreError::Backend(other.to_string()),
    }
}

/// Queue `NOTIFY`s on `QUEUE_CHANNEL` inside the caller's transaction, one per payload;
/// PostgreSQL delivers them when (and only if) it commits.
/// A listener on `QUEUE_CHANNEL` over a connection of `pool`.
async fn queue_listener(pool: &PgPool) -> StoreResult<sqlx::postgres::PgListener> {
    let mut l = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .map_err(db_err)?;
    l.listen(QUEUE_CHANNEL).await.map_err(db_err)?;
    Ok(l)
}

/// The wake-ups' listener: queue work and domain changes.
async fn notification_listener(pool: &PgPool) -> StoreResult<sqlx::postgres::PgListener> {
    let mut l = queue_listener(pool).await?;
    l.listen(ACCOUNTS_CHANNEL).await.map_err(db_err)?;
    Ok(l)
}

/// Read the local domains into `cache`; on failure it stays empty (look-ups ask the
/// database) until the next change or reconnection.
async fn read_domains(pool: &PgPool, cache: &std::sync::RwLock<Option<HashSet<String>>>) {
    match sqlx::query_scalar::<_, String>("SELECT name FROM domains")
        .fetch_all(pool)
        .await
    {
        Ok(names) => {
            *cache.write().unwrap_or_else(|e| e.into_inner()) = Some(names.into_iter().collect());
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the local domains; look-ups ask the database")
        }
    }
}

async fn notify(conn: &mut PgConnection, payloads: &[&str]) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::TEXT[]) AS p")
        .bind(QUEUE_CHANNEL)
        .bind(payloads)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

impl Columns for PgRow {
    fn text(&self, col: &str) -> StoreResult<Option<String>> {
        self.try_get(col)
            .map_err(|e| StoreError::Backend(format!("column {col}: {e}")))
    }

    fn int(&self, col: &str) -> StoreResult<Option<i64>> {
        self.try_get(col)
            .map_err(|e| StoreError::Backend(format!("column {col}: {e}")))
    }

    fn flag(&self, col: &str) -> StoreResult<bool> {
        self.try_get(col)
            .map_err(|e| StoreError::Backend(format!("column {col}: {e}")))
    }
}

fn body_of(r: &PgRow) -> StoreResult<Vec<u8>> {
    r.try_get("body")
        .map_err(|e| StoreError::Backend(format!("outgoing body: {e}")))
}

/// The pending recipients of the messages `ids`, in received order, by queue id. One
/// query for a whole claimed batch.
async fn pending_rcpts(
    conn: &mut PgConnection,
    ids: &[String],
) -> StoreResult<HashMap<String, Vec<OutgoingRcpt>>> {
    let rows = sqlx::query(
        "SELECT queue_id, address, orcpt, notify FROM outgoing_rcpts
         WHERE queue_id = ANY($1) AND state = 'pending' ORDER BY queue_id, seq",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    let g = |e: sqlx::Error| StoreError::Backend(format!("outgoing_rcpts row: {e}"));
    let mut by_id: HashMap<String, Vec<OutgoingRcpt>> = HashMap::new();
    for r in &rows {
        by_id
            .entry(r.try_get("queue_id").map_err(g)?)
            .or_default()
            .push(OutgoingRcpt {
                address: r.try_get("address").map_err(g)?,
                orcpt: r.try_get("orcpt").map_err(g)?,
                notify: r.try_get("notify").map_err(g)?,
            });
    }
    Ok(by_id)
}

/// Turn claimed/read rows (outgoing columns plus body) into queued messages with their
/// pending recipients, read on `conn` inside the caller's transaction.
async fn with_rcpts(conn: &mut PgConnection, rows: &[PgRow]) -> StoreResult<Vec<QueuedMessage>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let parsed = rows
        .iter()
        .map(|r| Ok((read_queued(r)?, body_of(r)?)))
        .collect::<StoreResult<Vec<_>>>()?;
    let ids: Vec<String> = parsed.iter().map(|(o, _)| o.id.clone()).collect();
    let mut rcpts = pending_rcpts(conn, &ids).await?;
    Ok(parsed
        .into_iter()
        .map(|(o, body)| {
            let rcpts = rcpts.remove(&o.id).unwrap_or_default();
            QueuedMessage { rcpts, body, ..o }
        })
        .collect())
}

fn message_summary(r: &PgRow) -> StoreResult<MessageSummary> {
    let g = |e: sqlx::Error| StoreError::Backend(format!("messages row: {e}"));
    Ok(MessageSummary {
        id: r.try_get("id").map_err(g)?,
        mailbox: r.try_get("mailbox").map_err(g)?,
        sender: r.try_get("sender").map_err(g)?,
        subject: r.try_get("subject").map_err(g)?,
        size: to_u64(r.try_get("size").map_err(g)?),
        internal_date: from_ms(r.try_get("internal_date").map_err(g)?)?,
        flags: read_flags(r.try_get::<Option<String>, _>("flags").map_err(g)?),
    })
}

/// Store one accepted message inside the batch transaction.
async fn accept_one(
    conn: &mut PgConnection,
    m: &IncomingMessage,
    lease: Option<&AcceptLease>,
) -> StoreResult<Accepted> {
    let received = ms(m.received_at);
    let size = i64::try_from(m.body.len()).unwrap_or(i64::MAX);
    let mut message_ids = Vec::with_capacity(m.local_rcpts.len());
    let (mailbox, flags) = local_copy(m)?;
    for rcpt in &m.local_rcpts {
        let (address, _, _) = norm_address(rcpt)?;
        let user_id: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE address = $1")
            .bind(&address)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
        let user_id = user_id
            .ok_or_else(|| StoreError::Invalid(format!("unknown local recipient {rcpt:?}")))?;
        sqlx::query(
            "INSERT INTO mailboxes (user_id, name) VALUES ($1, $2)
             ON CONFLICT (user_id, name) DO NOTHING",
        )
        .bind(user_id)
        .bind(mailbox)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        let mailbox_id: i64 =
            sqlx::query_scalar("SELECT id FROM mailboxes WHERE user_id = $1 AND name = $2")
                .bind(user_id)
                .bind(mailbox)
                .fetch_one(&mut *conn)
                .await
                .map_err(db_err)?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO messages
                 (mailbox_id, sender, recipients, subject, size, internal_date, body, flags)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(mailbox_id)
        .bind(&m.sender)
        .bind(&address)
        .bind(&m.subject)
        .bind(size)
        .bind(received)
        .bind(&m.body)
        .bind(&flags)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
        message_ids.push(id);
    }
    let mut queue_id = None;
    if !m.remote_rcpts.is_empty() {
        // A clash of ids is unlikely (see `new_queue_id`); ON CONFLICT lets us draw again
        // without aborting the transaction (a unique violation would abort it on PostgreSQL).
        let mut inserted = None;
        for _ in 0..8 {
            let id = new_queue_id();
            let done = sqlx::query(
                "INSERT INTO outgoing
                     (id, sender, ret, envid, client_ip, helo, received_at, tries,
                      next_retry_at, held, size, body, lock_owner, lock_expires_at, smtputf8)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 0, COALESCE($11, $7), FALSE, $8, $9, $10, $11,
                         $12)
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&id)
            .bind(&m.sender)
            .bind(&m.ret)
            .bind(&m.envid)
            .bind(&m.client_ip)
            .bind(&m.helo)
            .bind(received)
            .bind(size)
            .bind(&m.body)
            .bind(lease.map(|l| l.node.as_str()))
            .bind(lease.map(|l| ms(l.expires_at)))
            .bind(m.smtputf8)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
            if done.rows_affected() == 1 {
                inserted = Some(id);
                break;
            }
        }
        let id =
            inserted.ok_or_else(|| StoreError::Backend("could not draw a free queue id".into()))?;
        // All recipients in one statement: parallel arrays unnested in order.
        let seqs: Vec<i64> = (0..m.remote_rcpts.len())
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX))
            .collect();
        let addresses: Vec<&str> = m.remote_rcpts.iter().map(|r| r.address.as_str()).collect();
        let orcpts: Vec<Option<&str>> = m.remote_rcpts.iter().map(|r| r.orcpt.as_deref()).collect();
        let notifies: Vec<Option<&str>> =
            m.remote_rcpts.iter().map(|r| r.notify.as_deref()).collect();
        sqlx::query(
            "INSERT INTO outgoing_rcpts
                 (queue_id, seq, address, orcpt, notify, state, updated_at)
             SELECT $1, r.seq, r.address, r.orcpt, r.notify, 'pending', $2
             FROM UNNEST($3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[])
                  AS r (seq, address, orcpt, notify)",
        )
        .bind(&id)
        .bind(received)
        .bind(&seqs)
        .bind(&addresses)
        .bind(&orcpts)
        .bind(&notifies)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        queue_id = Some(id);
    }
    Ok(Accepted {
        queue_id,
        message_ids,
    })
}

/// One attempt's record inside the caller's transaction (see
/// `MessageStore::record_attempt`). The inner `Err` (`Invalid`): the lease was lost or
/// the message is gone, and nothing was changed; the outer: the database failed, or a
/// notification could not be queued (the caller must roll back).
async fn record_one(
    conn: &mut PgConnection,
    id: &str,
    node: &str,
    outcome: &AttemptRecord,
) -> StoreResult<StoreResult<()>> {
    // FOR UPDATE: no other node can claim the row between this check and our commit.
    let owner: Option<Option<String>> =
        sqlx::query_scalar("SELECT lock_owner FROM outgoing WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
    let refused = match owner {
        None => Some(format!("no queued message {id}")),
        Some(owner) if owner.as_deref() != Some(node) => Some(format!(
            "queued message {id} is not locked by {node} (lease lost)"
        )),
        Some(_) => None,
    };
    if let Some(why) = refused {
        return Ok(Err(StoreError::Invalid(why)));
    }
    let at = ms(outcome.at);
    for (address, state, response) in &outcome.rcpt_results {
        sqlx::query(
            "UPDATE outgoing_rcpts SET state = $1, last_response = $2, updated_at = $3
             WHERE queue_id = $4 AND address = $5 AND state = 'pending'",
        )
        .bind(state.as_str())
        .bind(response)
        .bind(at)
        .bind(id)
        .bind(address)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    }
    let pending: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outgoing_rcpts WHERE queue_id = $1 AND state = 'pending'",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    if pending == 0 {
        sqlx::query(sql::DELETE_QUEUED)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    } else {
        sqlx::query(
            "UPDATE outgoing SET tries = tries + 1, last_try_at = $1, last_error = $2,
                 next_retry_at = COALESCE($3, next_retry_at),
                 lock_owner = NULL, lock_expires_at = NULL
             WHERE id = $4",
        )
        .bind(at)
        .bind(&outcome.error)
        .bind(outcome.next_retry_at.map(ms))
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    }
    // The notifications this attempt owes commit with its record, or not at all (they
    // are queued unleased, and wake the other nodes).
    if !outcome.notifications.is_empty() {
        let (queued, _) = batch::commit_all(conn, &outcome.notifications, None, &[]).await?;
        for queued in queued {
            queued?;
        }
    }
    Ok(Ok(()))
}

#[async_trait::async_trait]
impl AccountStore for PostgresStore {
    async fn add_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        // Every node's cached list is read again once this commits.
        let added = sqlx::query(
            "WITH added AS (INSERT INTO domains (name, created_at) VALUES ($1, $2)
                            ON CONFLICT (name) DO NOTHING RETURNING name)
             SELECT pg_notify($3, name) FROM added",
        )
        .bind(&name)
        .bind(Utc::now().timestamp_millis())
        .bind(ACCOUNTS_CHANNEL)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(added.len() == 1)
    }

    async fn remove_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        // Users, their mailboxes and messages go with it (ON DELETE CASCADE).
        let removed = sqlx::query(
            "WITH removed AS (DELETE FROM domains WHERE name = $1 RETURNING name)
             SELECT pg_notify($2, name) FROM removed",
        )
        .bind(&name)
        .bind(ACCOUNTS_CHANNEL)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(removed.len() == 1)
    }

    async fn list_domains(&self) -> StoreResult<Vec<String>> {
        // COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
        sqlx::query_scalar("SELECT name FROM domains ORDER BY name COLLATE \"C\"")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn is_local_domain(&self, name: &str) -> StoreResult<bool> {
        let Ok(name) = norm_domain(name) else {
            return Ok(false);
        };
        let found: Option<i32> = sqlx::query_scalar(sql::DOMAIN_EXISTS)
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
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // FOR SHARE keeps the domain from being removed by another node before we commit.
        let known: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM domains WHERE name = $1 FOR SHARE")
                .bind(&domain)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if known.is_none() {
            return Err(StoreError::Invalid(format!("unknown domain {domain}")));
        }
        let done = sqlx::query(sql::INSERT_USER)
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
        let done = sqlx::query(sql::SET_PASSWORD)
            .bind(password_hash)
            .bind(&address)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_user(&self, address: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        let done = sqlx::query(sql::DELETE_USER)
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
                sqlx::query_scalar(
                    "SELECT address FROM users WHERE domain = $1 ORDER BY address COLLATE \"C\"",
                )
                .bind(d)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query_scalar("SELECT address FROM users ORDER BY address COLLATE \"C\"")
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
        sqlx::query_scalar(sql::PASSWORD_HASH)
            .bind(&address)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn user_exists(&self, address: &str) -> StoreResult<bool> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(false);
        };
        let found: Option<i32> = sqlx::query_scalar(sql::USER_EXISTS)
            .bind(&address)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(found.is_some())
    }

    fn recipient_now(&self, address: &str) -> Option<StoreResult<(bool, bool)>> {
        // Only "not a local domain" is answered here (relayed mail, the common case); a
        // local domain's user is looked up in the database.
        let (_, domain) = address.rsplit_once('@')?;
        let domain = norm_domain(domain).ok()?;
        let domains = self.domains.read().unwrap_or_else(|e| e.into_inner());
        match domains.as_ref() {
            Some(known) if !known.contains(&domain) => Some(Ok((false, false))),
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl MailboxStore for PostgresStore {
    async fn list_mailbox(&self, address: &str, mailbox: &str) -> StoreResult<Vec<MessageSummary>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(sql::LIST_MAILBOX)
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
        let row = sqlx::query(sql::GET_MESSAGE)
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
}

#[async_trait::async_trait]
impl QueueStore for PostgresStore {
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
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // The claim is this one statement. SKIP LOCKED: rows another node is claiming or
        // recording right now are passed over instead of waited for; once its transaction
        // commits they carry its unexpired lease, which the WHERE clause refuses.
        // MATERIALIZED keeps the locking sub-select from being inlined and re-run.
        let rows = sqlx::query(concat!(
            // `due_id`, not `id`: the RETURNING list is `outgoing_cols!` unqualified.
            "WITH due AS MATERIALIZED (
                 SELECT id AS due_id FROM outgoing
                 WHERE next_retry_at <= $3 AND NOT held
                   AND (lock_owner IS NULL OR lock_expires_at IS NULL OR lock_expires_at <= $3)
                 ORDER BY next_retry_at, id
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED)
             UPDATE outgoing SET lock_owner = $1, lock_expires_at = $2
             FROM due WHERE id = due.due_id
             RETURNING ",
            outgoing_cols!(),
            ", body"
        ))
        .bind(node)
        .bind(lease_end(now, lease))
        .bind(ms(now))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut claimed = with_rcpts(&mut tx, &rows).await?;
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
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // A concurrent claimer of the same row makes this one wait for its commit; the
        // conditions are then re-checked on the new row version, so only one wins.
        let row = sqlx::query(concat!(
            "UPDATE outgoing SET lock_owner = $1, lock_expires_at = $2
             WHERE id = $3 AND next_retry_at <= $4 AND NOT held
               AND (lock_owner IS NULL OR lock_expires_at IS NULL OR lock_expires_at <= $4)
             RETURNING ",
            outgoing_cols!(),
            ", body"
        ))
        .bind(node)
        .bind(lease_end(now, lease))
        .bind(id)
        .bind(ms(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let m = with_rcpts(&mut tx, std::slice::from_ref(&row)).await?.pop();
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
        let done = sqlx::query(
            "UPDATE outgoing SET lock_expires_at = $1
             WHERE id = $2 AND lock_owner = $3 AND NOT held",
        )
        .bind(lease_end(now, lease))
        .bind(id)
        .bind(node)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(&self, id: &str, node: &str) -> StoreResult<()> {
        // "Due now" by the database's clock, not this host's (hosts' clocks differ); what
        // was given back wakes the other nodes, in the same statement.
        sqlx::query(concat!(
            "WITH freed AS (UPDATE outgoing SET lock_owner = NULL, lock_expires_at = NULL,
                 next_retry_at = LEAST(next_retry_at, ",
            db_now!(),
            ") WHERE id = $1 AND lock_owner = $2 RETURNING id)
             SELECT pg_notify($3, id) FROM freed"
        ))
        .bind(id)
        .bind(node)
        .bind(QUEUE_CHANNEL)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn release_node(&self, node: &str, current: &str) -> StoreResult<u64> {
        let (len, booted, legacy) = node_prefixes(node);
        let done = sqlx::query(concat!(
            "UPDATE outgoing SET lock_owner = NULL, lock_expires_at = NULL,
                 next_retry_at = LEAST(next_retry_at, ",
            db_now!(),
            ") WHERE lock_owner IS NOT NULL AND lock_owner <> $1
               AND (substr(lock_owner, 1, $2) = $3 OR substr(lock_owner, 1, $2) = $4)"
        ))
        .bind(current)
        .bind(len as i32)
        .bind(booted)
        .bind(legacy)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    fn wake_ups(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let pool = self.pool.clone();
        let domains = self.domains.clone();
        tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            while !tx.is_closed() {
                // No listener, no cached domains: a change would go unheard.
                *domains.write().unwrap_or_else(|e| e.into_inner()) = None;
                let mut listener = match notification_listener(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "queue notifications: cannot listen; the periodic scan covers meanwhile");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                        continue;
                    }
                };
                backoff = std::time::Duration::from_millis(100);
                // After a (re)connection something may have been missed: wake once, and
                // read the domains (after LISTEN, so no change falls in between).
                let _ = tx.try_send(());
                read_domains(&pool, &domains).await;
                loop {
                    tokio::select! {
                        _ = tx.closed() => return,
                        n = listener.try_recv() => match n {
                            Ok(Some(n)) if n.channel() == ACCOUNTS_CHANNEL => {
                                *domains.write().unwrap_or_else(|e| e.into_inner()) = None;
                                read_domains(&pool, &domains).await;
                            }
                            // A full channel already holds a wake-up: coalesced.
                            Ok(Some(_)) => { let _ = tx.try_send(()); }
                            // The connection was lost: reconnect (with the wake-up).
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "queue notifications: connection lost; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
        });
        Some(rx)
    }

    async fn clock(&self) -> StoreResult<DateTime<Utc>> {
        let now: i64 = sqlx::query_scalar(concat!("SELECT ", db_now!()))
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        from_ms(now)
    }

    async fn lock_node(&self, node: &str) -> StoreResult<bool> {
        use sqlx::Connection;
        let mut slot = self.node_lock.lock().await;
        if slot.is_some() {
            return Ok(true);
        }
        let mut conn = sqlx::PgConnection::connect_with(&self.options)
            .await
            .map_err(db_err)?;
        // A session-level advisory lock lives as long as this connection: a process that
        // dies (even by SIGKILL) loses its connection and so its lock, at once.
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("erlmail node {node}"))
            .fetch_one(&mut conn)
            .await
            .map_err(db_err)?;
        if got {
            *slot = Some(conn);
        }
        Ok(got)
    }

    async fn still_leased(&self, id: &str, node: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let row: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM outgoing
             WHERE id = $1 AND lock_owner = $2 AND NOT held AND lock_expires_at > $3",
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
        // REPEATABLE READ: rows and recipients from one snapshot (READ COMMITTED, the
        // default, takes a new snapshot per statement).
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(db_err)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            outgoing_cols!(),
            " FROM outgoing ORDER BY received_at, id COLLATE \"C\""
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let rrows = sqlx::query(sql::ALL_QUEUE_RCPTS)
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
                let o = read_queued(r)?;
                let rcpts = by_id.remove(&o.id).unwrap_or_default();
                Ok(o.into_summary(rcpts))
            })
            .collect()
    }

    async fn get_queued(&self, id: &str) -> StoreResult<Option<QueuedMessage>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(db_err)?;
        let row = sqlx::query(concat!(
            "SELECT ",
            outgoing_cols!(),
            ", body FROM outgoing WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let m = match row {
            Some(row) => with_rcpts(&mut tx, std::slice::from_ref(&row)).await?.pop(),
            None => None,
        };
        tx.commit().await.map_err(db_err)?;
        Ok(m)
    }

    async fn delete_queued(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query(sql::DELETE_QUEUED)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_all_queued(&self) -> StoreResult<u64> {
        let done = sqlx::query(sql::DELETE_ALL_QUEUED)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn hold(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE outgoing SET held = TRUE WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_hold(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE outgoing SET held = FALSE WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn flush(&self, id: Option<&str>, now: DateTime<Utc>) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let done = match id {
            Some(id) => {
                sqlx::query(
                    "UPDATE outgoing SET next_retry_at = LEAST(next_retry_at, $1)
                     WHERE id = $2 AND NOT held",
                )
                .bind(ms(now))
                .bind(id)
                .execute(&mut *tx)
                .await
            }
            None => {
                sqlx::query(
                    "UPDATE outgoing SET next_retry_at = LEAST(next_retry_at, $1)
                     WHERE NOT held",
                )
                .bind(ms(now))
                .execute(&mut *tx)
                .await
            }
        }
        .map_err(db_err)?;
        // Every node hears of it, not only the one the administrator asked.
        if done.rows_affected() > 0 {
            notify(&mut tx, &[id.unwrap_or("*")]).await?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(done.rows_affected())
    }
}

#[async_trait::async_trait]
impl MessageStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn commit_batch(&self, batch: WriteBatch) -> WriteOutcome {
        let WriteBatch {
            messages,
            lease,
            records,
            atomic,
        } = batch;
        if atomic {
            // All or nothing (import): the careful way, which has no savepoints to drop.
            let accepted = self
                .accept_leased(&messages, lease.as_ref())
                .await
                .map(|all| all.into_iter().map(Ok).collect());
            let recorded = Ok(self.record_each(records).await);
            return WriteOutcome {
                messages,
                accepted,
                recorded,
            };
        }
        // The one-statement commit files mail in the INBOX without flags; the rare Junk
        // copy (or imported message with a folder or flags) goes the careful way below.
        let fast = if messages.iter().any(IncomingMessage::needs_more_than_inbox) {
            Err(StoreError::Backend("a copy outside the plain INBOX".into()))
        } else {
            self.commit_fast(&messages, lease.as_ref(), &records).await
        };
        match fast {
            Ok((accepted, recorded)) => {
                return WriteOutcome {
                    messages,
                    accepted: Ok(accepted),
                    recorded: Ok(recorded),
                }
            }
            // The database is unreachable or full: the careful way would fare no better,
            // and the sessions must have their 451 now.
            Err(e @ (StoreError::Unavailable(_) | StoreError::Full(_))) => {
                return WriteOutcome {
                    messages,
                    accepted: Err(e.clone()),
                    recorded: Err(e),
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "group commit redone one message at a time");
            }
        }
        let accepted = if messages.is_empty() {
            Ok(Vec::new())
        } else {
            self.accept_isolated(&messages, lease.as_ref()).await
        };
        let recorded = Ok(self.record_each(records).await);
        WriteOutcome {
            messages,
            accepted,
            recorded,
        }
    }
}

/// The careful way, one transaction per record and no savepoints, for batches that
/// cannot take the quick one ([`PostgresStore::commit_fast`]).
impl PostgresStore {
    /// Store `messages` in one transaction, all or nothing, one message at a time.
    async fn accept_leased(
        &self,
        messages: &[IncomingMessage],
        lease: Option<&AcceptLease>,
    ) -> StoreResult<Vec<Accepted>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            // An error drops `tx`, which rolls the whole batch back.
            out.push(accept_one(&mut tx, m, lease).await?);
        }
        let queued: Vec<&str> = out.iter().filter_map(|a| a.queue_id.as_deref()).collect();
        if !queued.is_empty() && lease.is_none() {
            notify(&mut tx, &queued).await?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(out)
    }

    /// Record each attempt in a transaction of its own.
    async fn record_each(
        &self,
        records: Vec<(String, String, AttemptRecord)>,
    ) -> Vec<StoreResult<()>> {
        let mut out = Vec::with_capacity(records.len());
        for (id, node, record) in records {
            out.push(self.record_alone(&id, &node, &record).await);
        }
        out
    }

    /// Record one attempt in a transaction of its own.
    async fn record_alone(&self, id: &str, node: &str, outcome: &AttemptRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        if let Err(refused) = record_one(&mut tx, id, node, outcome).await? {
            // Roll back now: a dropped transaction is rolled back only when its
            // connection is next used, and until then its FOR UPDATE lock makes a claim
            // (SKIP LOCKED) on another connection pass over the row.
            tx.rollback().await.map_err(db_err)?;
            return Err(refused);
        }
        tx.commit().await.map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_url_parameters_are_split_off() {
        let s = PgSettings::from_url("postgres://u@h:5432/db").unwrap();
        assert_eq!(
            s,
            PgSettings {
                url: "postgres://u@h:5432/db".into(),
                pool_size: DEFAULT_POOL_SIZE,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            }
        );
        let s = PgSettings::from_url(
            "postgresql://u@h/db?sslmode=disable&pool_size=3&connect_timeout=2&application_name=x",
        )
        .unwrap();
        assert_eq!(
            s.url,
            "postgresql://u@h/db?sslmode=disable&application_name=x"
        );
        assert_eq!(s.pool_size, 3);
        assert_eq!(s.connect_timeout, Duration::from_secs(2));
        let s = PgSettings::from_url("postgres://u@h/db?pool_size=7").unwrap();
        assert_eq!((s.url.as_str(), s.pool_size), ("postgres://u@h/db", 7));
        for bad in [
            "postgres://h/db?pool_size=0",
            "postgres://h/db?pool_size=x",
            "postgres://h/db?connect_timeout=",
        ] {
            assert!(
                matches!(PgSettings::from_url(bad), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_map_by_kind() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(db_err(io), StoreError::Unavailable(_)));
        assert!(matches!(
            db_err(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            db_err(sqlx::Error::RowNotFound),
            StoreError::Backend(_)
        ));
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        // Port 1 on the loopback: nothing listens, the connection is refused at once.
        let err = PostgresStore::open("postgres://postgres@127.0.0.1:1/erlmail?connect_timeout=2")
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
