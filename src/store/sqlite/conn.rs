//! The SQLite backend's connections and statements, on rusqlite: opening the file with
//! the store's pragmas, running one statement through the statement cache, and mapping
//! rusqlite's errors to `StoreError`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, Params, Row, TransactionBehavior};

use crate::store::common::{column_err, Columns};
use crate::store::{StoreError, StoreResult};

/// WAL pages after which a commit copies the log back into the database file (SQLite's
/// default is 1,000). Queue rows and message bodies are deleted soon after they are
/// written, and their pages are reused, so the same pages come back in the log again
/// and again: a checkpoint copies each page once however often it was written since
/// the last one. Ten times the default (a log of up to about 40 MB at 4 KiB pages) cut
/// the writer's system time per 100 KiB message by a third (issue #21); the log is
/// reused from its start after each checkpoint, never grown without bound.
pub(crate) const WAL_AUTOCHECKPOINT: i64 = 10_000;

/// The writer's page cache in KiB (SQLite's default is 2 MiB): enough to keep the pages
/// a burst of large messages reuses, which it would otherwise read back from the file.
pub(crate) const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// Open the database file at `path` (creating it if missing) with the store's pragmas:
/// WAL, `synchronous=FULL`, foreign keys on, `busy_timeout`, the checkpoint interval
/// ([`WAL_AUTOCHECKPOINT`]), then the `extra` ones.
pub(crate) fn open_connection(
    path: &Path, busy_timeout: Duration, extra: &[(&'static str, String)],
) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(sql_err)?;
    conn.busy_timeout(busy_timeout).map_err(sql_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(sql_err)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT)
        .map_err(sql_err)?;
    for (key, value) in extra {
        conn.pragma_update(None, key, value).map_err(sql_err)?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
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

/// A transaction holding the write lock from its first statement.
pub(super) fn write_tx(conn: &mut Connection) -> StoreResult<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)
}

/// Run one statement (through the connection's statement cache); the rows it changed.
pub(super) fn execute(conn: &Connection, sql: &str, params: impl Params) -> StoreResult<u64> {
    let n = conn
        .prepare_cached(sql)
        .and_then(|mut s| s.execute(params))
        .map_err(sql_err)?;
    Ok(n as u64)
}

/// Every row of `sql`, each read by `read`.
pub(super) fn all<T>(
    conn: &Connection, sql: &str, params: impl Params,
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
pub(super) fn one<T>(
    conn: &Connection, sql: &str, params: impl Params,
    read: impl FnOnce(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    let mut rows = stmt.query(params).map_err(sql_err)?;
    rows.next().map_err(sql_err)?.map(read).transpose()
}

/// The first column of a row.
pub(super) fn col0<T: rusqlite::types::FromSql>(r: &Row<'_>) -> StoreResult<T> {
    r.get(0).map_err(sql_err)
}

impl Columns for Row<'_> {
    fn text(&self, col: &str) -> StoreResult<Option<String>> {
        self.get(col).map_err(|e| column_err(col, e))
    }

    fn int(&self, col: &str) -> StoreResult<Option<i64>> {
        self.get(col).map_err(|e| column_err(col, e))
    }

    fn flag(&self, col: &str) -> StoreResult<bool> {
        Ok(self.int(col)?.unwrap_or(0) != 0)
    }

    fn bytes(&self, col: &str) -> StoreResult<Vec<u8>> {
        self.get(col).map_err(|e| column_err(col, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
