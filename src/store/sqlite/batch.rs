//! The SQLite group commit: a batch's accepted messages (each in a savepoint of its
//! own unless the batch is atomic) and its attempt records in one `BEGIN IMMEDIATE`
//! transaction, statement by statement on cached prepared statements. Its results match
//! the PostgreSQL backend's.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::conn::sql_err;
use crate::store::common::{
    lease_cols, ms, new_queue_id, norm_address, refused_record, stored, Stored,
};
use crate::store::{
    AcceptLease, Accepted, AttemptRecord, IncomingMessage, RcptState, StoreError, StoreResult,
    WriteBatch,
};

/// The per-message results of a batch's accepts and its records.
type BatchResults = (Vec<StoreResult<Accepted>>, Vec<StoreResult<()>>);

pub(super) fn run_batch(
    conn: &mut Connection, batch: &WriteBatch, isolate: bool,
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
    tx: &rusqlite::Connection, m: &IncomingMessage, lease: Option<&AcceptLease>,
) -> StoreResult<Accepted> {
    let stored = stored(m)?;
    let message_ids = m
        .local_rcpts
        .iter()
        .map(|rcpt| local_copy(tx, m, &stored, rcpt))
        .collect::<StoreResult<Vec<i64>>>()?;
    let queue_id = if m.remote_rcpts.is_empty() {
        None
    } else {
        Some(queue_row(tx, m, &stored, lease)?)
    };
    Ok(Accepted {
        queue_id,
        message_ids,
    })
}

/// The copy of `m` in the mailbox of local recipient `rcpt`; its message id.
fn local_copy(
    tx: &rusqlite::Connection, m: &IncomingMessage, stored: &Stored<'_>, rcpt: &str,
) -> StoreResult<i64> {
    let (received, mailbox) = (stored.received, stored.mailbox);
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
                    mailbox_id,
                    m.sender,
                    address,
                    m.subject,
                    stored.size,
                    received,
                    m.body,
                    stored.flags
                ],
                |r| r.get(0),
            )
        })
        .map_err(sql_err)?;
    Ok(id)
}

/// The queued row of `m` and its recipients, under `lease` if given; its queue id.
fn queue_row(
    tx: &rusqlite::Connection, m: &IncomingMessage, stored: &Stored<'_>,
    lease: Option<&AcceptLease>,
) -> StoreResult<String> {
    let received = stored.received;
    let (owner, expires) = lease_cols(lease);
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
                    stored.size,
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
    Ok(id)
}

/// Record attempts (see `MessageStore::record_attempts`): the outer error aborts the
/// transaction, the inner results are per attempt.
fn records(
    tx: &rusqlite::Transaction<'_>, batch: &[(String, String, AttemptRecord)],
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
        if let Some(refused) = refused_record(id, node, owner) {
            out.push(Err(refused));
            continue;
        }
        // A failure here is the database's, not this attempt's: abort the batch.
        record_one(tx, id, record)?;
        queue_notifications(tx, record)?;
        out.push(Ok(()));
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
    tx: &rusqlite::Transaction<'_>, id: &str, outcome: &AttemptRecord,
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
