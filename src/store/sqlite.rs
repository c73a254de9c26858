//! The embedded SQLite backend of `MessageStore`: one file in the spool directory, in WAL
//! mode with `synchronous=FULL`, so a committed transaction survives a power cut.
//!
//! Owns the schema migrations (`migrations/sqlite/*.sql`, embedded, versioned in
//! `erlmail_schema`) and every SQL statement against the file, through rusqlite, whose
//! calls block: reads and unlocked writes run on a small pool of connections on tokio's
//! blocking threads (`pool`); writes that read then write, and the group commits, run on
//! one writer thread (`writer`, `batch`) under this process's writer lock. Several erlmail
//! processes may share the file: every write transaction starts with `BEGIN IMMEDIATE`
//! and waits out a busy file for `BUSY_TIMEOUT`. Times are unix milliseconds. It must not
//! decide policy (retry schedule, who is local): callers pass those in.

mod accounts;
mod batch;
mod conn;
mod pool;
mod queue;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rusqlite::{params, Connection};

use self::conn::{col0, execute, one, sql_err, write_tx};
use self::pool::{open_reader, Pool};
use self::writer::Writer;
use super::common::recast;
use super::sql;
use super::{MessageStore, StoreError, StoreResult, WriteBatch, WriteOutcome};

/// How long a statement waits for another process's write lock before failing as
/// `Unavailable`. Generous: a commit with `synchronous=FULL` on a slow disk can take a
/// while, and an SMTP client waits minutes for the reply to DATA anyway.
const BUSY_TIMEOUT: Duration = Duration::from_secs(15);

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
    /// polls the lock with sleeps. Other processes on the same file still meet the busy
    /// timeout.
    writer: tokio::sync::Mutex<()>,
    /// A read-only connection for recipient look-ups on the async side
    /// ([`MessageStore::recipient_now`]): a WAL reader never waits for the writer, and it
    /// spares every RCPT a trip to a blocking thread. `None`: it could not be opened, and
    /// look-ups take the pool.
    reader: std::sync::Mutex<Option<Connection>>,
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
        path: &Path, pragmas: &[(&'static str, String)],
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
        let opened = |e| {
            recast(e, |m| {
                StoreError::Unavailable(format!("cannot open SQLite store {}: {m}", path.display()))
            })
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

    /// Run `f` on the writer's connection under this process's writer lock: the writes
    /// that read then write.
    async fn locked<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let _writer = self.writer.lock().await;
        self.writes.run(f).await
    }

    /// Apply the missing migrations in one write transaction, so that two processes
    /// opening a fresh file at once apply them exactly once.
    async fn migrate(&self) -> StoreResult<()> {
        let path = self.path.clone();
        self.locked(move |conn| {
            let tx = write_tx(conn)?;
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS erlmail_schema (
                         version     INTEGER PRIMARY KEY,
                         name        TEXT NOT NULL,
                         applied_at  INTEGER NOT NULL
                     )",
            )
            .map_err(sql_err)?;
            let current: Option<i64> = one(&tx, sql::SCHEMA_VERSION, [], col0)?.flatten();
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
    use crate::store::{contract, AccountStore, QueueStore};

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
        contract::run_all(&store).await;
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
        contract::concurrent_claims(&a, &b, 200).await;
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
        let msg = contract::incoming(
            "s@x.test",
            &[],
            vec![contract::rcpt("r@far.test")],
            Utc::now(),
            &vec![b'x'; 1 << 20],
        );
        let err = store.accept_batch(vec![msg]).await.unwrap_err();
        assert!(matches!(err, StoreError::Full(_)), "{err:?}");
        assert!(
            store.list_queue().await.unwrap().is_empty(),
            "nothing half-stored"
        );
    }
}
