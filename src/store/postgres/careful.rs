//! The PostgreSQL group commit the careful way: one accepted message, or one attempt's
//! record, statement by statement inside the caller's transaction. Used where the
//! one-statement commit (`batch`) cannot go: mail with a folder or flags, records that owe
//! notifications, and a batch redone message by message after one failed.

use sqlx::postgres::PgConnection;

use super::{batch, db_err, exec};
use crate::store::common::{lease_cols, ms, new_queue_id, norm_address, refused_record, stored};
use crate::store::sql;
use crate::store::{
    AcceptLease, Accepted, AttemptRecord, IncomingMessage, StoreError, StoreResult,
};

/// Store one accepted message inside the batch transaction.
pub(super) async fn accept_one(
    conn: &mut PgConnection, m: &IncomingMessage, lease: Option<&AcceptLease>,
) -> StoreResult<Accepted> {
    let stored = stored(m)?;
    let (received, mailbox) = (stored.received, stored.mailbox);
    let mut message_ids = Vec::with_capacity(m.local_rcpts.len());
    for rcpt in &m.local_rcpts {
        let (address, _, _) = norm_address(rcpt)?;
        let user_id: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE address = $1")
            .bind(&address)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
        let user_id = user_id
            .ok_or_else(|| StoreError::Invalid(format!("unknown local recipient {rcpt:?}")))?;
        exec(
            conn,
            sqlx::query(
                "INSERT INTO mailboxes (user_id, name) VALUES ($1, $2)
             ON CONFLICT (user_id, name) DO NOTHING",
            )
            .bind(user_id)
            .bind(mailbox),
        )
        .await?;
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
        .bind(stored.size)
        .bind(received)
        .bind(&m.body)
        .bind(&stored.flags)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
        message_ids.push(id);
    }
    let mut queue_id = None;
    if !m.remote_rcpts.is_empty() {
        // A clash of ids is unlikely (see `new_queue_id`); ON CONFLICT lets us draw again
        // without aborting the transaction (a unique violation would abort it on PostgreSQL).
        let (owner, expires) = lease_cols(lease);
        let mut inserted = None;
        for _ in 0..8 {
            let id = new_queue_id();
            let done = exec(
                conn,
                sqlx::query(
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
                .bind(stored.size)
                .bind(&m.body)
                .bind(owner)
                .bind(expires)
                .bind(m.smtputf8),
            )
            .await?;
            if done == 1 {
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
        exec(
            conn,
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
            .bind(&notifies),
        )
        .await?;
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
pub(super) async fn record_one(
    conn: &mut PgConnection, id: &str, node: &str, outcome: &AttemptRecord,
) -> StoreResult<StoreResult<()>> {
    // FOR UPDATE: no other node can claim the row between this check and our commit.
    let owner: Option<Option<String>> =
        sqlx::query_scalar("SELECT lock_owner FROM outgoing WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
    if let Some(refused) = refused_record(id, node, owner) {
        return Ok(Err(refused));
    }
    let at = ms(outcome.at);
    for (address, state, response) in &outcome.rcpt_results {
        exec(
            conn,
            sqlx::query(
                "UPDATE outgoing_rcpts SET state = $1, last_response = $2, updated_at = $3
             WHERE queue_id = $4 AND address = $5 AND state = 'pending'",
            )
            .bind(state.as_str())
            .bind(response)
            .bind(at)
            .bind(id)
            .bind(address),
        )
        .await?;
    }
    let pending: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outgoing_rcpts WHERE queue_id = $1 AND state = 'pending'",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    if pending == 0 {
        exec(conn, sqlx::query(sql::DELETE_QUEUED).bind(id)).await?;
    } else {
        exec(
            conn,
            sqlx::query(
                "UPDATE outgoing SET tries = tries + 1, last_try_at = $1, last_error = $2,
                 next_retry_at = COALESCE($3, next_retry_at),
                 lock_owner = NULL, lock_expires_at = NULL
             WHERE id = $4",
            )
            .bind(at)
            .bind(&outcome.error)
            .bind(outcome.next_retry_at.map(ms))
            .bind(id),
        )
        .await?;
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
