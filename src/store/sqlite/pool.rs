//! The SQLite store's pool of connections for reads and for the writes that need no lock
//! of ours, and the read-only connection for recipient look-ups on the async side. Each
//! use of the pool runs on a blocking thread, so SQLite's calls never hold up the async
//! workers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::conn::open_connection;
use super::BUSY_TIMEOUT;
use crate::store::{StoreError, StoreResult};

/// Connections per process in the pool. SQLite has one writer at a time; a few
/// connections let reads (listings, user look-ups) proceed beside a write.
const POOL_SIZE: usize = 4;

/// How long a caller waits for a free pool connection before failing as `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(20);

/// Connections for reads and for the writes that need no lock of ours, opened lazily
/// (up to `POOL_SIZE`) with the store's pragmas. Each use checks one out on a blocking
/// thread (`spawn_blocking`), so SQLite's calls never hold up the async workers.
pub(super) struct Pool {
    path: PathBuf,
    extra: Vec<(&'static str, String)>,
    idle: std::sync::Mutex<Vec<Connection>>,
    /// One permit per connection that may be in use; closed by `close`.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Pool {
    pub(super) fn new(path: &Path, extra: &[(&'static str, String)]) -> Pool {
        Pool {
            path: path.to_path_buf(),
            extra: extra.to_vec(),
            idle: std::sync::Mutex::new(Vec::with_capacity(POOL_SIZE)),
            permits: Arc::new(tokio::sync::Semaphore::new(POOL_SIZE)),
        }
    }

    /// Run `f` on a pool connection on a blocking thread. `f` opens its own transaction
    /// if it needs one; a statement outside one commits on its own.
    pub(super) async fn run<T, F>(self: &Arc<Self>, f: F) -> StoreResult<T>
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
    pub(super) async fn close(&self) {
        let _all = self.permits.acquire_many(POOL_SIZE as u32).await;
        self.permits.close();
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The read-only connection behind `AccountStore::recipient_now`, or `None` (logged)
/// when it cannot be opened. It never waits on a lock: a busy read falls back to the pool.
pub(super) fn open_reader(path: &Path) -> Option<Connection> {
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
