//! The PostgreSQL group commit in as few round trips as the protocol allows: every
//! message of a batch (mailbox copies, queued rows and their recipients) in one
//! statement, every plain attempt record in one more, both in one transaction.
//!
//! The statements take parallel arrays (`UNNEST`) and do their checks inside: a message
//! with a local recipient who no longer exists is left out and reported, a record whose
//! lease was lost changes nothing and is reported. Anything else that fails here
//! (a unique clash of queue ids, a user removed in the instant between the check and the
//! insert) rolls the whole transaction back, and the caller redoes the batch the slow
//! way, one message per savepoint.

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::{db_err, QUEUE_CHANNEL};
use crate::store::common::{ms, new_queue_id, norm_address};
use crate::store::{
    AcceptLease, Accepted, AttemptRecord, IncomingMessage, StoreError, StoreResult,
};

/// Every message of a batch in one statement. Per message, in order: what was stored,
/// or `Invalid` when one of its local recipients is not a user (then nothing of it is).
/// `notify`: wake the other nodes for the queued rows (unleased mail).
const ACCEPT_ALL: &str = "
WITH m AS (
    SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                         $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BYTEA[], $10::TEXT[])
        WITH ORDINALITY AS m (qid, sender, ret, envid, client_ip, helo, received_at, size,
                              body, subject, mi)
), l AS (
    SELECT l.mi, l.ord, l.address, u.id AS user_id, b.id AS mailbox_id
    FROM UNNEST($11::BIGINT[], $12::TEXT[]) WITH ORDINALITY AS l (mi, address, ord)
    LEFT JOIN users u ON u.address = l.address
    LEFT JOIN mailboxes b ON b.user_id = u.id AND b.name = 'INBOX'
), bad AS (
    SELECT DISTINCT mi FROM l WHERE user_id IS NULL
), inbox AS (
    INSERT INTO mailboxes (user_id, name)
    SELECT DISTINCT user_id, 'INBOX' FROM l
    WHERE user_id IS NOT NULL AND mailbox_id IS NULL AND mi NOT IN (SELECT mi FROM bad)
    ON CONFLICT (user_id, name) DO UPDATE SET name = EXCLUDED.name
    RETURNING id, user_id
), lm AS (
    SELECT l.mi, l.ord, l.address, COALESCE(l.mailbox_id, n.id) AS mailbox_id,
           nextval(pg_get_serial_sequence('messages', 'id')) AS id
    FROM l LEFT JOIN inbox n ON n.user_id = l.user_id
    WHERE l.user_id IS NOT NULL AND l.mi NOT IN (SELECT mi FROM bad)
), copies AS (
    INSERT INTO messages (id, mailbox_id, sender, recipients, subject, size, internal_date, body)
    SELECT lm.id, lm.mailbox_id, m.sender, lm.address, m.subject, m.size, m.received_at, m.body
    FROM lm JOIN m ON m.mi = lm.mi
), queued AS (
    INSERT INTO outgoing (id, sender, ret, envid, client_ip, helo, received_at, tries,
                          next_retry_at, held, size, body, lock_owner, lock_expires_at)
    SELECT qid, sender, ret, envid, client_ip, helo, received_at, 0,
           COALESCE($14, received_at), FALSE, size, body, $13, $14
    FROM m WHERE qid IS NOT NULL AND mi NOT IN (SELECT mi FROM bad)
    RETURNING id
), rcpts AS (
    INSERT INTO outgoing_rcpts (queue_id, seq, address, orcpt, notify, state, updated_at)
    SELECT m.qid, r.seq, r.address, r.orcpt, r.notify, 'pending', m.received_at
    FROM UNNEST($15::BIGINT[], $16::BIGINT[], $17::TEXT[], $18::TEXT[], $19::TEXT[])
        AS r (mi, seq, address, orcpt, notify)
    JOIN m ON m.mi = r.mi
    WHERE m.qid IS NOT NULL AND m.mi NOT IN (SELECT mi FROM bad)
)
SELECT 0 AS kind, mi, 0::BIGINT AS ord, 0::BIGINT AS id FROM bad
UNION ALL
SELECT 1, mi, ord, id FROM lm
UNION ALL
SELECT 2, 0, 0, 0 FROM (SELECT pg_notify($20, id) FROM queued WHERE $21) AS woken
";

/// Every plain record (no notifications) in one statement: the lease is checked under a
/// row lock, the listed recipients updated, and the message deleted when none stays
/// pending, or released for its next try. Returns the index (1-based) of each record
/// that held its lease; the others changed nothing.
const RECORD_ALL: &str = "
WITH r AS (
    SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::BIGINT[])
        WITH ORDINALITY AS r (id, node, at, error, next_retry_at, ri)
), x AS (
    SELECT * FROM UNNEST($6::BIGINT[], $7::TEXT[], $8::TEXT[], $9::TEXT[])
        AS x (ri, address, state, response)
), own AS (
    SELECT o.id, r.ri FROM outgoing o JOIN r ON r.id = o.id
    WHERE o.lock_owner = r.node
    FOR UPDATE OF o
), rest AS (
    SELECT own.id, own.ri,
           (SELECT COUNT(*) FROM outgoing_rcpts p
            WHERE p.queue_id = own.id AND p.state = 'pending'
              AND NOT EXISTS (SELECT 1 FROM x WHERE x.ri = own.ri AND x.address = p.address
                                                AND x.state <> 'pending')) AS pending
    FROM own
), done AS (
    DELETE FROM outgoing o USING rest WHERE o.id = rest.id AND rest.pending = 0
), states AS (
    UPDATE outgoing_rcpts p
    SET state = x.state, last_response = x.response, updated_at = r.at
    FROM rest JOIN x ON x.ri = rest.ri JOIN r ON r.ri = rest.ri
    WHERE rest.pending > 0 AND p.queue_id = rest.id AND p.address = x.address
      AND p.state = 'pending'
), retried AS (
    UPDATE outgoing o
    SET tries = o.tries + 1, last_try_at = r.at, last_error = r.error,
        next_retry_at = COALESCE(r.next_retry_at, o.next_retry_at),
        lock_owner = NULL, lock_expires_at = NULL
    FROM rest JOIN r ON r.ri = rest.ri
    WHERE rest.pending > 0 AND o.id = rest.id
)
SELECT ri FROM own
";

/// Store every message of a batch with one statement on `conn`, under `lease` if given.
/// Per message, in order: what was stored, or `Invalid` (a local recipient is no user;
/// nothing of that message was stored). An `Err` means the statement failed as a whole.
pub(super) async fn accept_all(
    conn: &mut PgConnection,
    messages: &[IncomingMessage],
    lease: Option<&AcceptLease>,
) -> StoreResult<Vec<StoreResult<Accepted>>> {
    let n = messages.len();
    let mut qid: Vec<Option<String>> = Vec::with_capacity(n);
    let (mut sender, mut ret, mut envid, mut ip, mut helo) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut received, mut size, mut body, mut subject) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut l_mi, mut l_addr) = (Vec::new(), Vec::new());
    let (mut r_mi, mut r_seq, mut r_addr, mut r_orcpt, mut r_notify) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, m) in messages.iter().enumerate() {
        let mi = i as i64 + 1;
        qid.push((!m.remote_rcpts.is_empty()).then(new_queue_id));
        sender.push(m.sender.as_str());
        ret.push(m.ret.as_deref());
        envid.push(m.envid.as_deref());
        ip.push(m.client_ip.as_str());
        helo.push(m.helo.as_str());
        received.push(ms(m.received_at));
        size.push(i64::try_from(m.body.len()).unwrap_or(i64::MAX));
        body.push(m.body.as_slice());
        subject.push(m.subject.as_deref());
        for rcpt in &m.local_rcpts {
            let (address, _, _) = norm_address(rcpt)?;
            l_mi.push(mi);
            l_addr.push(address);
        }
        for (seq, r) in m.remote_rcpts.iter().enumerate() {
            r_mi.push(mi);
            r_seq.push(seq as i64);
            r_addr.push(r.address.as_str());
            r_orcpt.push(r.orcpt.as_deref());
            r_notify.push(r.notify.as_deref());
        }
    }
    let rows = sqlx::query(ACCEPT_ALL)
        .bind(&qid)
        .bind(&sender)
        .bind(&ret)
        .bind(&envid)
        .bind(&ip)
        .bind(&helo)
        .bind(&received)
        .bind(&size)
        .bind(&body)
        .bind(&subject)
        .bind(&l_mi)
        .bind(&l_addr)
        .bind(lease.map(|l| l.node.as_str()))
        .bind(lease.map(|l| ms(l.expires_at)))
        .bind(&r_mi)
        .bind(&r_seq)
        .bind(&r_addr)
        .bind(&r_orcpt)
        .bind(&r_notify)
        .bind(QUEUE_CHANNEL)
        .bind(lease.is_none())
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    let mut refused = vec![false; n];
    let mut copies: Vec<Vec<(i64, i64)>> = vec![Vec::new(); n];
    let g = |e: sqlx::Error| StoreError::Backend(format!("accept row: {e}"));
    for row in &rows {
        let kind: i32 = row.try_get("kind").map_err(g)?;
        let mi: i64 = row.try_get("mi").map_err(g)?;
        let slot = usize::try_from(mi - 1).ok().filter(|&s| s < n);
        match (kind, slot) {
            (0, Some(s)) => refused[s] = true,
            (1, Some(s)) => copies[s].push((
                row.try_get("ord").map_err(g)?,
                row.try_get("id").map_err(g)?,
            )),
            _ => {}
        }
    }
    let mut out = Vec::with_capacity(n);
    for (i, m) in messages.iter().enumerate() {
        if refused[i] {
            out.push(Err(StoreError::Invalid(format!(
                "unknown local recipient among {:?}",
                m.local_rcpts
            ))));
            continue;
        }
        let mut mine = std::mem::take(&mut copies[i]);
        // A copy missing means the statement did not do what it was asked: fail the
        // batch, so that it is redone the careful way.
        if mine.len() != m.local_rcpts.len() {
            return Err(StoreError::Backend(format!(
                "group commit stored {} of {} mailbox copies",
                mine.len(),
                m.local_rcpts.len()
            )));
        }
        mine.sort_unstable();
        out.push(Ok(Accepted {
            queue_id: qid[i].clone(),
            message_ids: mine.into_iter().map(|(_, id)| id).collect(),
        }));
    }
    Ok(out)
}

/// Record every attempt of `records` (none may owe notifications) with one statement on
/// `conn`. Per record, in order: done, or `Invalid` when the lease was lost or the
/// message is gone (then nothing of it changed).
pub(super) async fn record_all(
    conn: &mut PgConnection,
    records: &[(String, String, AttemptRecord)],
) -> StoreResult<Vec<StoreResult<()>>> {
    let n = records.len();
    let (mut id, mut node, mut at, mut error, mut next) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut x_ri, mut x_addr, mut x_state, mut x_resp) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, (qid, owner, rec)) in records.iter().enumerate() {
        id.push(qid.as_str());
        node.push(owner.as_str());
        at.push(ms(rec.at));
        error.push(rec.error.as_deref());
        next.push(rec.next_retry_at.map(ms));
        for (address, state, response) in &rec.rcpt_results {
            x_ri.push(i as i64 + 1);
            x_addr.push(address.as_str());
            x_state.push(state.as_str());
            x_resp.push(response.as_deref());
        }
    }
    let held: Vec<i64> = sqlx::query_scalar(RECORD_ALL)
        .bind(&id)
        .bind(&node)
        .bind(&at)
        .bind(&error)
        .bind(&next)
        .bind(&x_ri)
        .bind(&x_addr)
        .bind(&x_state)
        .bind(&x_resp)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    let mut ok = vec![false; n];
    for ri in held {
        if let Some(slot) = usize::try_from(ri - 1).ok().filter(|&s| s < n) {
            ok[slot] = true;
        }
    }
    Ok(records
        .iter()
        .zip(ok)
        .map(|((qid, owner, _), held)| {
            if held {
                Ok(())
            } else {
                Err(StoreError::Invalid(format!(
                    "queued message {qid} is gone or not locked by {owner} (lease lost)"
                )))
            }
        })
        .collect())
}

/// Whether `record_all` may take these records: none owes a notification (those queue
/// messages of their own, done one by one) and no message appears twice.
pub(super) fn plain_records(records: &[(String, String, AttemptRecord)]) -> bool {
    let mut ids: Vec<&str> = records.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.sort_unstable();
    let unique = ids.windows(2).all(|w| w[0] != w[1]);
    unique && records.iter().all(|(_, _, r)| r.notifications.is_empty())
}
