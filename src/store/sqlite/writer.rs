//! The SQLite store's writer: one connection on a thread of its own that runs jobs in
//! turn, each group commit as one `BEGIN IMMEDIATE` transaction ([`Writer::commit`]) and
//! the store's other locked writes ([`Writer::run`]). It is used under the store's writer
//! lock, so it never races this process's other writers; other processes meet SQLite's
//! file locks. Its page cache stays warm, as no other connection of ours changes the file.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

use super::batch::run_batch;
use super::conn::{open_connection, WRITER_CACHE_KIB};
use crate::store::{StoreError, StoreResult, WriteBatch, WriteOutcome};

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The writer thread's handle. Dropping it ends the thread once its queue is empty.
/// Should the thread die (a panic), the batch it held fails as `Unavailable` (nothing of
/// it was committed) and the next batch gets a new thread and connection.
pub(crate) struct Writer {
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    path: PathBuf,
    busy_timeout: Duration,
    extra: Vec<(&'static str, String)>,
}

impl Writer {
    /// Open `path` on a new thread with the store's pragmas plus `extra` ones.
    pub(crate) fn open(
        path: &Path, busy_timeout: Duration, extra: &[(&'static str, String)],
    ) -> StoreResult<Writer> {
        Ok(Writer {
            jobs: std::sync::Mutex::new(start(path, busy_timeout, extra)?),
            path: path.to_path_buf(),
            busy_timeout,
            extra: extra.to_vec(),
        })
    }

    /// Hand `job` to the thread; `false` if the thread is gone.
    pub(super) fn send(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.send(job).is_ok()
    }

    /// Replace a dead thread (its connection went with it).
    fn restart(&self) {
        match start(&self.path, self.busy_timeout, &self.extra) {
            Ok(jobs) => {
                *self.jobs.lock().unwrap_or_else(|e| e.into_inner()) = jobs;
                tracing::warn!(path = %self.path.display(), "SQLite writer restarted");
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "SQLite writer could not restart")
            }
        }
    }

    /// Run `batch` as one `BEGIN IMMEDIATE` transaction and answer when it committed
    /// (or failed and rolled back). The messages come back either way. Each message is
    /// isolated in a savepoint (one that fails leaves the others to commit), unless the
    /// batch is `atomic`: then one that fails rolls the whole batch back.
    pub(crate) async fn commit(&self, batch: WriteBatch) -> WriteOutcome {
        let isolate = !batch.atomic;
        let outcome = self
            .call(move |conn| {
                let outcome = run_batch(conn, &batch, isolate);
                let (accepted, recorded) = match outcome {
                    Ok((a, r)) => (Ok(a), Ok(r)),
                    Err(e) => (Err(e.clone()), Err(e)),
                };
                WriteOutcome {
                    messages: batch.messages,
                    accepted,
                    recorded,
                }
            })
            .await;
        outcome.unwrap_or_else(|gone| WriteOutcome {
            messages: Vec::new(),
            accepted: Err(gone.clone()),
            recorded: Err(gone),
        })
    }

    /// Run `f` on the writer's connection, after the jobs queued before it. `f` opens
    /// its own transaction if it needs one (`BEGIN IMMEDIATE` for read-then-write).
    pub(crate) async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        self.call(f).await?
    }

    /// Run `f` on the thread and wait for its answer; `Unavailable` (and a new thread)
    /// when the thread died before answering.
    async fn call<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> T + Send + 'static,
    {
        let (answer, result) = tokio::sync::oneshot::channel();
        // A send fails only when the thread is gone; the answer below then fails too.
        self.send(Box::new(move |conn| {
            let _ = answer.send(f(conn));
        }));
        match result.await {
            Ok(value) => Ok(value),
            Err(_) => {
                self.restart();
                Err(StoreError::Unavailable("the SQLite writer stopped".into()))
            }
        }
    }
}

/// Open the connection and start its thread; returns where its jobs go.
fn start(
    path: &Path, busy_timeout: Duration, extra: &[(&'static str, String)],
) -> StoreResult<mpsc::Sender<Job>> {
    let mut conn = open_connection(path, busy_timeout, extra)?;
    // A negative cache size is in KiB.
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
        .map_err(super::conn::sql_err)?;
    let (jobs, queue) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("erlmail-sqlite-writer".into())
        .spawn(move || {
            for job in queue {
                job(&mut conn);
                // A job's transaction ends with it (dropping a rusqlite transaction rolls
                // it back); should a failed rollback have left one open, end it here, so
                // that the next `BEGIN IMMEDIATE` does not fail for ever.
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite writer: {e}")))?;
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Writer {
        /// Read one pragma on the writer's own connection.
        async fn pragma(&self, name: &'static str) -> String {
            let (answer, result) = tokio::sync::oneshot::channel();
            self.send(Box::new(move |conn: &mut Connection| {
                let v: rusqlite::types::Value = conn
                    .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                    .expect("pragma");
                let _ = answer.send(format!("{v:?}"));
            }));
            result.await.expect("writer answers")
        }
    }

    #[tokio::test]
    async fn the_writer_commits_with_full_sync_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::open(&dir.path().join("w.db"), Duration::from_secs(1), &[]).unwrap();
        assert_eq!(w.pragma("journal_mode").await, "Text(\"wal\")");
        assert_eq!(w.pragma("synchronous").await, "Integer(2)", "FULL");
        assert_eq!(w.pragma("foreign_keys").await, "Integer(1)");
        assert_eq!(w.pragma("wal_autocheckpoint").await, "Integer(10000)");
        assert_eq!(w.pragma("cache_size").await, "Integer(-16384)");
    }

    #[tokio::test]
    async fn a_dead_writer_thread_fails_its_batch_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::open(&dir.path().join("w.db"), Duration::from_secs(1), &[]).unwrap();
        // A job that panics takes the thread down, as a bug would.
        let (answer, result) = tokio::sync::oneshot::channel::<()>();
        w.send(Box::new(move |_conn: &mut Connection| {
            let _keep = answer;
            panic!("test: writer thread dies");
        }));
        assert!(result.await.is_err(), "the thread died");
        let empty = WriteBatch {
            messages: Vec::new(),
            lease: None,
            records: Vec::new(),
            atomic: false,
        };
        let first = w.commit(empty.clone()).await;
        assert!(
            matches!(first.accepted, Err(StoreError::Unavailable(_))),
            "{first:?}"
        );
        let second = w.commit(empty).await;
        assert!(
            second.accepted.is_ok(),
            "a new thread took over: {second:?}"
        );
        assert_eq!(w.pragma("synchronous").await, "Integer(2)");
    }
}
