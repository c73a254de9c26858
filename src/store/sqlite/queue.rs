//! The SQLite store's outgoing queue: claims and leases on the writer, reads and
//! administration on the pool. A claim is one `UPDATE ... WHERE id IN (SELECT ... LIMIT n)
//! RETURNING id` inside a `BEGIN IMMEDIATE` transaction, so no row is given to two
//! processes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use super::conn::{all, col0, execute, one, sql_err, write_tx};
use super::SqliteStore;
use crate::store::common::{
    due_order, lease_end, ms, node_prefixes, read_outgoing_rcpt, read_queue_rcpt, read_queued,
    read_queued_body, summaries,
};
use crate::store::sql::{self, outgoing_cols};
use crate::store::{QueueCounts, QueueStore, QueueSummary, QueuedMessage, StoreError, StoreResult};

/// One queued message with its pending recipients and body, read on `conn` (inside the
/// caller's transaction, so the reads agree).
fn load_queued(conn: &Connection, id: &str) -> StoreResult<Option<QueuedMessage>> {
    let sql = concat!(
        "SELECT ",
        outgoing_cols!(),
        ", body FROM outgoing WHERE id = ?1"
    );
    let Some(o) = one(conn, sql, [id], |r| read_queued_body(r))? else {
        return Ok(None);
    };
    let rcpts = all(
        conn,
        "SELECT address, orcpt, notify FROM outgoing_rcpts
         WHERE queue_id = ?1 AND state = 'pending' ORDER BY seq",
        [id],
        |r| read_outgoing_rcpt(r),
    )?;
    Ok(Some(QueuedMessage { rcpts, ..o }))
}

impl SqliteStore {
    async fn set_held(&self, id: &str, held: bool) -> StoreResult<bool> {
        let id = id.to_string();
        let done = self
            .pool
            .run(move |c| execute(c, sql::SET_HELD, params![held, id]))
            .await?;
        Ok(done == 1)
    }
}

#[async_trait::async_trait]
impl QueueStore for SqliteStore {
    async fn claim_due(
        &self, node: &str, now: DateTime<Utc>, lease: Duration, limit: usize,
    ) -> StoreResult<Vec<QueuedMessage>> {
        let node = node.to_string();
        let mut claimed = self
            .locked(move |conn| {
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
        due_order(&mut claimed);
        Ok(claimed)
    }

    async fn claim(
        &self, id: &str, node: &str, now: DateTime<Utc>, lease: Duration,
    ) -> StoreResult<Option<QueuedMessage>> {
        let (id, node) = (id.to_string(), node.to_string());
        self.locked(move |conn| {
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
        &self, id: &str, node: &str, now: DateTime<Utc>, lease: Duration,
    ) -> StoreResult<bool> {
        let (id, node) = (id.to_string(), node.to_string());
        let done = self
            .locked(move |c| {
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
        self.locked(move |c| {
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
        self.locked(move |c| {
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
                let rcpts = all(&tx, sql::ALL_QUEUE_RCPTS, [], |r| read_queue_rcpt(r))?;
                tx.commit().map_err(sql_err)?;
                Ok((rows, rcpts))
            })
            .await?;
        Ok(summaries(rows, rcpts))
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
        self.set_held(id, true).await
    }

    async fn release_hold(&self, id: &str) -> StoreResult<bool> {
        self.set_held(id, false).await
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

    async fn queue_counts(&self, now: DateTime<Utc>) -> StoreResult<QueueCounts> {
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
                        Ok(QueueCounts {
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
