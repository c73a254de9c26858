//! The SQLite store's connections and its writer thread, on rusqlite (the SQLite backend's
//! one driver).
//!
//! [`open_connection`] opens the database file with the store's pragmas (WAL,
//! `synchronous=FULL`, foreign keys, the busy timeout, plus any extra ones) for every
//! connection the store uses, and [`sql_err`] maps rusqlite's errors to `StoreError`.
//!
//! The [`Writer`] is one connection on a thread of its own that runs jobs in turn: each
//! group-commit batch (accepted messages plus finished attempts) as one `BEGIN IMMEDIATE`
//! transaction, and the store's other locked writes ([`Writer::run`]). A job runs its
//! statements back to back on cached prepared statements, and the async side waits for
//! one answer. It is used under the store's writer lock, so it never races this
//! process's other writers; other processes meet SQLite's file locks. Its SQL and results
//! match the PostgreSQL backend's `accept_one` and `record_attempt`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::common::{local_copy, ms, new_queue_id, norm_address};
use super::{
    AcceptLease, Accepted, AttemptRecord, IncomingMessage, RcptState, StoreError, StoreResult,
    WriteBatch, WriteOutcome,
};

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
        path: &Path,
        busy_timeout: Duration,
        extra: &[(&'static str, String)],
    ) -> StoreResult<Writer> {
        Ok(Writer {
            jobs: std::sync::Mutex::new(start(path, busy_timeout, extra)?),
            path: path.to_path_buf(),
            busy_timeout,
            extra: extra.to_vec(),
        })
    }

    /// Hand `job` to the thread; `false` if the thread is gone.
    fn send(&self, job: Job) -> bool {
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

/// Open the database file at `path` (creating it if missing) with the store's pragmas:
/// WAL, `synchronous=FULL`, foreign keys on, `busy_timeout`, then the `extra` ones.
pub(crate) fn open_connection(
    path: &Path,
    busy_timeout: Duration,
    extra: &[(&'static str, String)],
) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(sql_err)?;
    conn.busy_timeout(busy_timeout).map_err(sql_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(sql_err)?;
    for (key, value) in extra {
        conn.pragma_update(None, key, value).map_err(sql_err)?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Open the connection and start its thread; returns where its jobs go.
fn start(
    path: &Path,
    busy_timeout: Duration,
    extra: &[(&'static str, String)],
) -> StoreResult<mpsc::Sender<Job>> {
    let mut conn = open_connection(path, busy_timeout, extra)?;
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

/// Map a rusqlite error to a `StoreError` by SQLite's result code (`result_code_err`);
/// an error of rusqlite's own (a column of an unexpected type, say) is `Backend`.
pub(crate) fn sql_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, msg) => result_code_err(
            Some(f.extended_code),
            msg.clone().unwrap_or_else(|| f.to_string()),
        ),
        _ => StoreError::Backend(e.to_string()),
    }
}

/// The error for SQLite result code `code` (extended or primary; the primary code is its
/// low byte) with message `msg`: a full disk or database is `Full`, a busy or locked
/// file `Unavailable`, the rest `Backend`.
pub(crate) fn result_code_err(code: Option<i32>, msg: String) -> StoreError {
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

/// The per-message results of a batch's accepts and its records.
type BatchResults = (Vec<StoreResult<Accepted>>, Vec<StoreResult<()>>);

fn run_batch(
    conn: &mut Connection,
    batch: &WriteBatch,
    isolate: bool,
) -> StoreResult<BatchResults> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    // An error here drops `tx`, which rolls the whole batch back; an error inside one
    // message's savepoint rolls back that message only.
    let mut accepted = Vec::with_capacity(batch.messages.len());
    for m in &batch.messages {
        if !isolate {
            accepted.push(Ok(accept_one(&tx, m, batch.lease.as_ref())?));
            continue;
        }
        let sp = tx.savepoint().map_err(sql_err)?;
        match accept_one(&sp, m, batch.lease.as_ref()) {
            Ok(a) => {
                sp.commit().map_err(sql_err)?;
                accepted.push(Ok(a));
            }
            // Dropping the savepoint rolls it back.
            Err(e) => accepted.push(Err(e)),
        }
    }
    let recorded = if batch.records.is_empty() {
        Vec::new()
    } else {
        records(&tx, &batch.records)?
    };
    tx.commit().map_err(sql_err)?;
    Ok((accepted, recorded))
}

fn accept_one(
    tx: &rusqlite::Connection,
    m: &IncomingMessage,
    lease: Option<&AcceptLease>,
) -> StoreResult<Accepted> {
    let received = ms(m.received_at);
    let size = i64::try_from(m.body.len()).unwrap_or(i64::MAX);
    let mut message_ids = Vec::with_capacity(m.local_rcpts.len());
    let (mailbox, flags) = local_copy(m)?;
    for rcpt in &m.local_rcpts {
        let (address, _, _) = norm_address(rcpt)?;
        let user_id: i64 = tx
            .prepare_cached("SELECT id FROM users WHERE address = ?1")
            .and_then(|mut s| s.query_row([&address], |r| r.get(0)).optional())
            .map_err(sql_err)?
            .ok_or_else(|| StoreError::Invalid(format!("unknown local recipient {rcpt:?}")))?;
        tx.prepare_cached(
            "INSERT INTO mailboxes (user_id, name) VALUES (?1, ?2)
             ON CONFLICT (user_id, name) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![user_id, mailbox]))
        .map_err(sql_err)?;
        let mailbox_id: i64 = tx
            .prepare_cached("SELECT id FROM mailboxes WHERE user_id = ?1 AND name = ?2")
            .and_then(|mut s| s.query_row(params![user_id, mailbox], |r| r.get(0)))
            .map_err(sql_err)?;
        let id: i64 = tx
            .prepare_cached(
                "INSERT INTO messages
                     (mailbox_id, sender, recipients, subject, size, internal_date, body,
                      flags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![
                        mailbox_id, m.sender, address, m.subject, size, received, m.body, flags
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(sql_err)?;
        message_ids.push(id);
    }
    if m.remote_rcpts.is_empty() {
        return Ok(Accepted {
            queue_id: None,
            message_ids,
        });
    }
    let (owner, expires) = match lease {
        Some(l) => (Some(l.node.as_str()), Some(ms(l.expires_at))),
        None => (None, None),
    };
    // A clash (same millisecond, same 20 random bits) is unlikely; ON CONFLICT draws again.
    let mut queue_id = None;
    for _ in 0..8 {
        let id = new_queue_id();
        let n = tx
            .prepare_cached(
                "INSERT INTO outgoing (id, sender, ret, envid, client_ip, helo, received_at,
                     tries, next_retry_at, held, size, body, lock_owner, lock_expires_at,
                     smtputf8)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, 0, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT (id) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    m.sender,
                    m.ret,
                    m.envid,
                    m.client_ip,
                    m.helo,
                    received,
                    // A leased row falls due when its lease lapses.
                    expires.unwrap_or(received),
                    size,
                    m.body,
                    owner,
                    expires,
                    m.smtputf8
                ])
            })
            .map_err(sql_err)?;
        if n == 1 {
            queue_id = Some(id);
            break;
        }
    }
    let id =
        queue_id.ok_or_else(|| StoreError::Backend("could not draw a free queue id".into()))?;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO outgoing_rcpts (queue_id, seq, address, orcpt, notify, state, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)",
        )
        .map_err(sql_err)?;
    for (seq, r) in m.remote_rcpts.iter().enumerate() {
        insert
            .execute(params![
                id,
                i64::try_from(seq).unwrap_or(i64::MAX),
                r.address,
                r.orcpt,
                r.notify,
                received
            ])
            .map_err(sql_err)?;
    }
    Ok(Accepted {
        queue_id: Some(id),
        message_ids,
    })
}

/// Record attempts (see `MessageStore::record_attempts`): the outer error aborts the
/// transaction, the inner results are per attempt.
fn records(
    tx: &rusqlite::Transaction<'_>,
    batch: &[(String, String, AttemptRecord)],
) -> StoreResult<Vec<StoreResult<()>>> {
    let mut out = Vec::with_capacity(batch.len());
    let mut delete = tx
        .prepare_cached("DELETE FROM outgoing WHERE id = ?1 AND lock_owner = ?2")
        .map_err(sql_err)?;
    for (id, node, record) in batch {
        // An attempt that leaves no recipient pending deletes its message outright
        // (recipients go by cascade), when the lock is ours.
        let finished = !record
            .rcpt_results
            .iter()
            .any(|(_, st, _)| *st == RcptState::Pending);
        if finished && delete.execute([id, node]).map_err(sql_err)? == 1 {
            queue_notifications(tx, record)?;
            out.push(Ok(()));
            continue;
        }
        let owner: Option<Option<String>> = tx
            .prepare_cached("SELECT lock_owner FROM outgoing WHERE id = ?1")
            .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
            .map_err(sql_err)?;
        out.push(match owner {
            None => Err(StoreError::Invalid(format!("no queued message {id}"))),
            Some(owner) if owner.as_deref() != Some(node.as_str()) => Err(StoreError::Invalid(
                format!("queued message {id} is not locked by {node} (lease lost)"),
            )),
            Some(_) => {
                // A failure here is the database's, not this attempt's: abort the batch.
                record_one(tx, id, record)?;
                queue_notifications(tx, record)?;
                Ok(())
            }
        });
    }
    Ok(out)
}

/// Queue the notifications an attempt owes, unleased and due now, in the record's
/// transaction.
fn queue_notifications(tx: &rusqlite::Connection, record: &AttemptRecord) -> StoreResult<()> {
    for n in &record.notifications {
        accept_one(tx, n, None)?;
    }
    Ok(())
}

/// Record one attempt whose lock is ours (as `PostgresStore::record_attempt` does).
fn record_one(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    outcome: &AttemptRecord,
) -> StoreResult<()> {
    let at = ms(outcome.at);
    let mut update = tx
        .prepare_cached(
            "UPDATE outgoing_rcpts SET state = ?1, last_response = ?2, updated_at = ?3
             WHERE queue_id = ?4 AND address = ?5 AND state = 'pending'",
        )
        .map_err(sql_err)?;
    for (address, state, response) in &outcome.rcpt_results {
        update
            .execute(params![state.as_str(), response, at, id, address])
            .map_err(sql_err)?;
    }
    tx.prepare_cached(
        "UPDATE outgoing SET tries = tries + 1, last_try_at = ?1, last_error = ?2,
             next_retry_at = COALESCE(?3, next_retry_at),
             lock_owner = NULL, lock_expires_at = NULL
         WHERE id = ?4",
    )
    .and_then(|mut s| {
        s.execute(params![
            at,
            outcome.error,
            outcome.next_retry_at.map(ms),
            id
        ])
    })
    .map_err(sql_err)?;
    let pending: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM outgoing_rcpts WHERE queue_id = ?1 AND state = 'pending'",
        )
        .and_then(|mut s| s.query_row([id], |r| r.get(0)))
        .map_err(sql_err)?;
    if pending == 0 {
        tx.prepare_cached("DELETE FROM outgoing WHERE id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map_err(sql_err)?;
    }
    Ok(())
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

    #[test]
    fn errors_map_by_kind() {
        let fail = |code: i32| {
            sql_err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                Some("x".into()),
            ))
        };
        assert!(matches!(fail(13), StoreError::Full(_)), "SQLITE_FULL");
        assert!(matches!(fail(5), StoreError::Unavailable(_)), "SQLITE_BUSY");
        assert!(
            matches!(fail(6), StoreError::Unavailable(_)),
            "SQLITE_LOCKED"
        );
        assert!(matches!(fail(1), StoreError::Backend(_)), "SQLITE_ERROR");
    }
}
