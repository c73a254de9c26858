//! The PostgreSQL store's outgoing queue: claims and leases, taken with
//! `FOR UPDATE SKIP LOCKED` so that concurrent claimers on other nodes skip each other's
//! rows instead of waiting, and administration. What frees or flushes mail wakes the other
//! nodes (`notify`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};

use super::notify::{self, notify};
use super::{db_err, PostgresStore, QUEUE_CHANNEL};
use crate::store::common::{
    by_queue_id, due_order, from_ms, lease_end, ms, node_prefixes, read_outgoing_rcpt,
    read_queue_rcpt, read_queued, read_queued_body, summaries, Columns,
};
use crate::store::sql::{self, outgoing_cols};
use crate::store::{QueueStore, QueueSummary, QueuedMessage, StoreResult};

/// Turn claimed/read rows (outgoing columns plus body) into queued messages with their
/// pending recipients, read on `conn` inside the caller's transaction: one query for the
/// recipients of a whole claimed batch.
async fn with_rcpts(conn: &mut PgConnection, rows: &[PgRow]) -> StoreResult<Vec<QueuedMessage>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let parsed = rows
        .iter()
        .map(read_queued_body)
        .collect::<StoreResult<Vec<_>>>()?;
    let ids: Vec<&str> = parsed.iter().map(|o| o.id.as_str()).collect();
    let rcpt_rows = sqlx::query(
        "SELECT queue_id, address, orcpt, notify FROM outgoing_rcpts
         WHERE queue_id = ANY($1) AND state = 'pending' ORDER BY queue_id, seq",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    let mut rcpts = by_queue_id(
        rcpt_rows
            .iter()
            .map(|r| Ok((r.need_text("queue_id")?, read_outgoing_rcpt(r)?)))
            .collect::<StoreResult<Vec<_>>>()?,
    );
    Ok(parsed
        .into_iter()
        .map(|o| {
            let rcpts = rcpts.remove(&o.id).unwrap_or_default();
            QueuedMessage { rcpts, ..o }
        })
        .collect())
}

#[async_trait::async_trait]
impl QueueStore for PostgresStore {
    async fn claim_due(
        &self, node: &str, now: DateTime<Utc>, lease: Duration, limit: usize,
    ) -> StoreResult<Vec<QueuedMessage>> {
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
        due_order(&mut claimed);
        Ok(claimed)
    }

    async fn claim(
        &self, id: &str, node: &str, now: DateTime<Utc>, lease: Duration,
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
        &self, id: &str, node: &str, now: DateTime<Utc>, lease: Duration,
    ) -> StoreResult<bool> {
        let done = self
            .changed(
                sqlx::query(
                    "UPDATE outgoing SET lock_expires_at = $1
             WHERE id = $2 AND lock_owner = $3 AND NOT held",
                )
                .bind(lease_end(now, lease))
                .bind(id)
                .bind(node),
            )
            .await?;
        Ok(done == 1)
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
        let done = self
            .changed(
                sqlx::query(concat!(
                    "UPDATE outgoing SET lock_owner = NULL, lock_expires_at = NULL,
                 next_retry_at = LEAST(next_retry_at, ",
                    db_now!(),
                    ") WHERE lock_owner IS NOT NULL AND lock_owner <> $1
               AND (substr(lock_owner, 1, $2) = $3 OR substr(lock_owner, 1, $2) = $4)"
                ))
                .bind(current)
                .bind(len as i32)
                .bind(booted)
                .bind(legacy),
            )
            .await?;
        Ok(done)
    }

    fn wake_ups(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        Some(notify::wake_ups(self.pool.clone(), self.domains.clone()))
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
        let mut tx = self.read_tx().await?;
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
        let rows = rows.iter().map(read_queued).collect::<StoreResult<_>>()?;
        let rcpts = rrows
            .iter()
            .map(read_queue_rcpt)
            .collect::<StoreResult<_>>()?;
        Ok(summaries(rows, rcpts))
    }

    async fn get_queued(&self, id: &str) -> StoreResult<Option<QueuedMessage>> {
        let mut tx = self.read_tx().await?;
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
        let done = self
            .changed(sqlx::query(sql::DELETE_QUEUED).bind(id))
            .await?;
        Ok(done == 1)
    }

    async fn delete_all_queued(&self) -> StoreResult<u64> {
        let done = self.changed(sqlx::query(sql::DELETE_ALL_QUEUED)).await?;
        Ok(done)
    }

    async fn hold(&self, id: &str) -> StoreResult<bool> {
        Ok(self
            .changed(sqlx::query(sql::SET_HELD).bind(true).bind(id))
            .await?
            == 1)
    }

    async fn release_hold(&self, id: &str) -> StoreResult<bool> {
        Ok(self
            .changed(sqlx::query(sql::SET_HELD).bind(false).bind(id))
            .await?
            == 1)
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
