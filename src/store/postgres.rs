//! The PostgreSQL backend of `MessageStore`: one database shared by a cluster of nodes.
//!
//! Owns the connection pool, the schema migrations (`migrations/postgres/*.sql`, embedded,
//! versioned in `erlmail_schema`, applied at open inside one transaction under an advisory
//! lock so that several nodes starting at once apply each exactly once) and every SQL
//! statement against the database. The schema and the meaning of every column are those
//! of the SQLite backend (times are unix milliseconds), so the two behave alike under the
//! contract suite. A database outage is `StoreError::Unavailable` (the pool fails fast,
//! after `connect_timeout`), a full disk `StoreError::Full`. It must not decide policy
//! (retry schedule, who is local): callers pass those in.

/// The database server's clock in the store's time unit (milliseconds since the epoch),
/// for statements that must not trust the calling host's clock.
macro_rules! db_now {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

mod accounts;
mod batch;
mod careful;
mod commit;
mod notify;
mod queue;
mod settings;

use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;

pub use self::settings::PgSettings;
use super::common::{column_err, recast, Columns};
use super::sql;
use super::{StoreError, StoreResult};

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

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

/// The PostgreSQL store: a connection pool on one database shared by every node.
pub struct PostgresStore {
    pool: PgPool,
    /// How to reach the server, for the node lock's own connection.
    options: PgConnectOptions,
    /// The connection holding this process's node-name advisory lock (`lock_node`).
    node_lock: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    /// The local domains, for recipient look-ups without a round trip
    /// (`recipient_now`): `None` unless the notification listener is connected and has
    /// read them since its last (re)connection or domain change.
    domains: notify::Domains,
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
            .map_err(|e| {
                recast(db_err(e), |m| {
                    StoreError::Unavailable(format!("cannot open PostgreSQL store: {m}"))
                })
            })?;
        let store = PostgresStore {
            pool,
            options,
            node_lock: tokio::sync::Mutex::new(None),
            domains: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Run `q` on the pool; the rows it changed.
    async fn changed(&self, q: PgQuery<'_>) -> StoreResult<u64> {
        let done = q.execute(&self.pool).await.map_err(db_err)?;
        Ok(done.rows_affected())
    }

    /// Whether `sql` finds a row for `key`.
    async fn exists(&self, sql: &'static str, key: &str) -> StoreResult<bool> {
        let found: Option<i32> = sqlx::query_scalar(sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(found.is_some())
    }

    /// A read-only transaction whose statements all see one snapshot (READ COMMITTED,
    /// the default, takes a new snapshot per statement).
    async fn read_tx(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(db_err)
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
        notify::queue_listener(&self.pool).await
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
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|e| {
                recast(db_err(e), |m| {
                    StoreError::Backend(format!("migration {version} ({name}): {m}"))
                })
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

impl Columns for PgRow {
    fn text(&self, col: &str) -> StoreResult<Option<String>> {
        self.try_get(col).map_err(|e| column_err(col, e))
    }

    fn int(&self, col: &str) -> StoreResult<Option<i64>> {
        self.try_get(col).map_err(|e| column_err(col, e))
    }

    fn flag(&self, col: &str) -> StoreResult<bool> {
        self.try_get(col).map_err(|e| column_err(col, e))
    }

    fn bytes(&self, col: &str) -> StoreResult<Vec<u8>> {
        self.try_get(col).map_err(|e| column_err(col, e))
    }
}

/// Run `q` on `conn`; the rows it changed.
async fn exec(conn: &mut PgConnection, q: PgQuery<'_>) -> StoreResult<u64> {
    let done = q.execute(conn).await.map_err(db_err)?;
    Ok(done.rows_affected())
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
