//! The PostgreSQL group commit in one round trip: every message of a batch (mailbox
//! copies, queued rows and their recipients) and every plain attempt record in one
//! statement, which commits on its own.
//!
//! The statements take parallel arrays (`UNNEST`) and do their checks inside: a message
//! with a local recipient who no longer exists is left out and reported, a record whose
//! lease was lost changes nothing and is reported. Anything else that fails here
//! (a unique clash of queue ids, a user removed in the instant between the check and the
//! insert) rolls the whole transaction back, and the caller redoes the batch the slow
//! way, one message per savepoint.

use std::sync::LazyLock;

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::{db_err, PgQuery, QUEUE_CHANNEL};
use crate::store::common::{lease_cols, ms, new_queue_id, norm_address, size_of};
use crate::store::{
    AcceptLease, Accepted, AttemptRecord, IncomingMessage, StoreError, StoreResult,
};

/// The messages' envelopes and bodies, one row each (`mi`: its index from 1).
macro_rules! messages_cte {
    () => {
        "
m AS (
    SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                         $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BYTEA[], $10::TEXT[],
                         $22::BOOLEAN[])
        WITH ORDINALITY AS m (qid, sender, ret, envid, client_ip, helo, received_at, size,
                              body, subject, smtputf8, mi)
)"
    };
}

/// Queued rows and their recipients for the messages with remote recipients that pass
/// `$ok`.
macro_rules! queue_ctes {
    ($ok:literal) => {
        concat!(
            "
queued AS (
    INSERT INTO outgoing (id, sender, ret, envid, client_ip, helo, received_at, tries,
                          next_retry_at, held, size, body, lock_owner, lock_expires_at,
                          smtputf8)
    SELECT qid, sender, ret, envid, client_ip, helo, received_at, 0,
           COALESCE($14, received_at), FALSE, size, body, $13, $14, smtputf8
    FROM m WHERE qid IS NOT NULL AND ",
            $ok,
            "
    RETURNING id
), rcpts AS (
    INSERT INTO outgoing_rcpts (queue_id, seq, address, orcpt, notify, state, updated_at)
    SELECT m.qid, rc.seq, rc.address, rc.orcpt, rc.notify, 'pending', m.received_at
    FROM UNNEST($15::BIGINT[], $16::BIGINT[], $17::TEXT[], $18::TEXT[], $19::TEXT[])
        AS rc (mi, seq, address, orcpt, notify)
    JOIN m ON m.mi = rc.mi
    WHERE m.qid IS NOT NULL AND ",
            $ok,
            "
)"
        )
    };
}

/// Every message of a batch: mailbox copies (a message with a local recipient who is no
/// user is left out whole), queued rows and their recipients, under the lease $13/$14 if
/// given, and wake-ups for unleased rows when $21.
const ACCEPT_CTES: &str = concat!(
    messages_cte!(),
    ",
l AS (
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
),",
    queue_ctes!("m.mi NOT IN (SELECT mi FROM bad)")
);

/// The rows of [`ACCEPT_CTES`]: `kind` 0, a refused message (`mi`); 1, a mailbox copy
/// (`mi`, its order `ord`, its `id`); 2, a wake-up sent.
const ACCEPT_ROWS: &str = "
SELECT 0 AS kind, mi, 0::BIGINT AS ord, 0::BIGINT AS id FROM bad
UNION ALL
SELECT 1, mi, ord, id FROM lm
UNION ALL
SELECT 2, 0, 0, 0 FROM (SELECT pg_notify($20, id) FROM queued WHERE $21) AS woken
";

/// Every plain record (no notifications): the lease is checked under a row lock, the
/// listed recipients updated, and the message deleted when none stays pending, or
/// released for its next try. A record whose lease was lost changes nothing. `$Rn`
/// stands for the n-th of its parameters.
const RECORD_CTES: &str = "
r AS (
    SELECT * FROM UNNEST($R1::TEXT[], $R2::TEXT[], $R3::BIGINT[], $R4::TEXT[], $R5::BIGINT[])
        WITH ORDINALITY AS r (id, node, at, error, next_retry_at, ri)
), x AS (
    SELECT * FROM UNNEST($R6::BIGINT[], $R7::TEXT[], $R8::TEXT[], $R9::TEXT[])
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
)";

/// The rows of [`RECORD_CTES`]: `kind` 3, a record that held its lease (`mi`: its index).
const RECORD_ROWS: &str =
    "SELECT 3 AS kind, ri AS mi, 0::BIGINT AS ord, 0::BIGINT AS id FROM own\n";

/// Messages without local recipients (relayed mail), the common case: [`ACCEPT_CTES`]
/// without the mailbox parts, whose executor set-up costs even when they insert nothing.
/// The same parameters ($11 and $12 unused).
const REMOTE_CTES: &str = concat!(messages_cte!(), ",", queue_ctes!("TRUE"));

/// The rows of [`REMOTE_CTES`]: wake-ups sent (`kind` 2).
const REMOTE_ROWS: &str = "
SELECT 2 AS kind, 0::BIGINT AS mi, 0::BIGINT AS ord, 0::BIGINT AS id
FROM (SELECT pg_notify($20, id) FROM queued WHERE $21) AS woken
";

/// The statements, by [`statement`]: each kind of accept alone and with records, and
/// records alone (the records' parameters numbered after the accepts' 22).
static STATEMENTS: LazyLock<[String; 5]> = LazyLock::new(|| {
    let records = |first: usize| {
        (1..=9).rev().fold(RECORD_CTES.to_string(), |sql, n| {
            sql.replace(&format!("$R{n}"), &format!("${}", first + n - 1))
        })
    };
    let both = |ctes: &str, rows: &str| {
        format!(
            "WITH {ctes},{}\n{rows}UNION ALL\n{RECORD_ROWS}",
            records(23)
        )
    };
    [
        format!("WITH {ACCEPT_CTES}{ACCEPT_ROWS}"),
        both(ACCEPT_CTES, ACCEPT_ROWS),
        format!("WITH {REMOTE_CTES}{REMOTE_ROWS}"),
        both(REMOTE_CTES, REMOTE_ROWS),
        format!("WITH {}\n{RECORD_ROWS}", records(1)),
    ]
});

/// The statement for a batch: `local` when a message has local recipients.
fn statement(messages: bool, local: bool, records: bool) -> &'static str {
    let i = match (messages, local, records) {
        (false, _, _) => 4,
        (true, true, r) => usize::from(r),
        (true, false, r) => 2 + usize::from(r),
    };
    STATEMENTS[i].as_str()
}

/// What a batch commits: per message, what was stored or `Invalid` (a local recipient is
/// no user; nothing of that message was stored); per record, done or `Invalid` (the lease
/// was lost or the message is gone; nothing of it changed).
pub(super) type Committed = (Vec<StoreResult<Accepted>>, Vec<StoreResult<()>>);

/// Commit the messages of a batch (under `lease` if given) and its plain records (see
/// [`plain_records`]) with one statement on `conn`: on a connection outside a
/// transaction it commits on its own. An `Err` means the statement failed as a whole
/// and nothing of it was done.
pub(super) async fn commit_all(
    conn: &mut PgConnection, messages: &[IncomingMessage], lease: Option<&AcceptLease>,
    records: &[(String, String, AttemptRecord)],
) -> StoreResult<Committed> {
    if messages.is_empty() && records.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let local = messages.iter().any(|m| !m.local_rcpts.is_empty());
    let sql = statement(!messages.is_empty(), local, !records.is_empty());
    let accepts = AcceptArgs::new(messages)?;
    let recs = RecordArgs::new(records);
    let mut q = sqlx::query(sql);
    if !messages.is_empty() {
        q = accepts.bind(q, lease);
    }
    if !records.is_empty() {
        q = recs.bind(q);
    }
    let rows = q.fetch_all(&mut *conn).await.map_err(db_err)?;

    let n = messages.len();
    let mut refused = vec![false; n];
    let mut copies: Vec<Vec<(i64, i64)>> = vec![Vec::new(); n];
    let mut held = vec![false; records.len()];
    let g = |e: sqlx::Error| StoreError::Backend(format!("group commit row: {e}"));
    for row in &rows {
        let kind: i32 = row.try_get("kind").map_err(g)?;
        let index: i64 = row.try_get("mi").map_err(g)?;
        let slot = usize::try_from(index - 1).ok();
        match (kind, slot) {
            (0, Some(s)) if s < n => refused[s] = true,
            (1, Some(s)) if s < n => copies[s].push((
                row.try_get("ord").map_err(g)?,
                row.try_get("id").map_err(g)?,
            )),
            (3, Some(s)) if s < held.len() => held[s] = true,
            _ => {}
        }
    }
    let mut accepted = Vec::with_capacity(n);
    for (i, m) in messages.iter().enumerate() {
        if refused[i] {
            accepted.push(Err(StoreError::Invalid(format!(
                "unknown local recipient among {:?}",
                m.local_rcpts
            ))));
            continue;
        }
        let mut mine = std::mem::take(&mut copies[i]);
        // A copy missing means the statement did not do what it was asked. It has run
        // (and committed, if alone): this message fails, the batch is not redone.
        if mine.len() != m.local_rcpts.len() {
            accepted.push(Err(StoreError::Backend(format!(
                "group commit stored {} of {} mailbox copies",
                mine.len(),
                m.local_rcpts.len()
            ))));
            continue;
        }
        mine.sort_unstable();
        accepted.push(Ok(Accepted {
            queue_id: accepts.qid[i].clone(),
            message_ids: mine.into_iter().map(|(_, id)| id).collect(),
        }));
    }
    let recorded = records
        .iter()
        .zip(held)
        .map(|((qid, owner, _), held)| {
            if held {
                Ok(())
            } else {
                Err(StoreError::Invalid(format!(
                    "queued message {qid} is gone or not locked by {owner} (lease lost)"
                )))
            }
        })
        .collect();
    Ok((accepted, recorded))
}

/// The parameters of [`ACCEPT_CTES`], as parallel arrays.
#[derive(Default)]
struct AcceptArgs<'a> {
    qid: Vec<Option<String>>,
    sender: Vec<&'a str>,
    ret: Vec<Option<&'a str>>,
    envid: Vec<Option<&'a str>>,
    ip: Vec<&'a str>,
    helo: Vec<&'a str>,
    received: Vec<i64>,
    size: Vec<i64>,
    body: Vec<&'a [u8]>,
    subject: Vec<Option<&'a str>>,
    smtputf8: Vec<bool>,
    l_mi: Vec<i64>,
    l_addr: Vec<String>,
    r_mi: Vec<i64>,
    r_seq: Vec<i64>,
    r_addr: Vec<&'a str>,
    r_orcpt: Vec<Option<&'a str>>,
    r_notify: Vec<Option<&'a str>>,
}

impl<'a> AcceptArgs<'a> {
    /// The arrays for `messages`, with a new queue id for each that has remote
    /// recipients.
    fn new(messages: &'a [IncomingMessage]) -> StoreResult<Self> {
        let mut a = AcceptArgs::default();
        for (i, m) in messages.iter().enumerate() {
            let mi = i as i64 + 1;
            a.qid.push((!m.remote_rcpts.is_empty()).then(new_queue_id));
            a.sender.push(&m.sender);
            a.ret.push(m.ret.as_deref());
            a.envid.push(m.envid.as_deref());
            a.ip.push(&m.client_ip);
            a.helo.push(&m.helo);
            a.received.push(ms(m.received_at));
            a.size.push(size_of(&m.body));
            a.body.push(&m.body);
            a.subject.push(m.subject.as_deref());
            a.smtputf8.push(m.smtputf8);
            for rcpt in &m.local_rcpts {
                a.l_mi.push(mi);
                a.l_addr.push(norm_address(rcpt)?.0);
            }
            for (seq, r) in m.remote_rcpts.iter().enumerate() {
                a.r_mi.push(mi);
                a.r_seq.push(seq as i64);
                a.r_addr.push(&r.address);
                a.r_orcpt.push(r.orcpt.as_deref());
                a.r_notify.push(r.notify.as_deref());
            }
        }
        Ok(a)
    }

    /// Bind $1 to $22.
    fn bind<'q>(&'q self, q: PgQuery<'q>, lease: Option<&'q AcceptLease>) -> PgQuery<'q> {
        let (owner, expires) = lease_cols(lease);
        q.bind(&self.qid)
            .bind(&self.sender)
            .bind(&self.ret)
            .bind(&self.envid)
            .bind(&self.ip)
            .bind(&self.helo)
            .bind(&self.received)
            .bind(&self.size)
            .bind(&self.body)
            .bind(&self.subject)
            .bind(&self.l_mi)
            .bind(&self.l_addr)
            .bind(owner)
            .bind(expires)
            .bind(&self.r_mi)
            .bind(&self.r_seq)
            .bind(&self.r_addr)
            .bind(&self.r_orcpt)
            .bind(&self.r_notify)
            .bind(QUEUE_CHANNEL)
            .bind(lease.is_none())
            .bind(&self.smtputf8)
    }
}

/// The parameters of [`RECORD_CTES`], as parallel arrays.
#[derive(Default)]
struct RecordArgs<'a> {
    id: Vec<&'a str>,
    node: Vec<&'a str>,
    at: Vec<i64>,
    error: Vec<Option<&'a str>>,
    next: Vec<Option<i64>>,
    x_ri: Vec<i64>,
    x_addr: Vec<&'a str>,
    x_state: Vec<&'static str>,
    x_resp: Vec<Option<&'a str>>,
}

impl<'a> RecordArgs<'a> {
    fn new(records: &'a [(String, String, AttemptRecord)]) -> Self {
        let mut a = RecordArgs::default();
        for (i, (qid, owner, rec)) in records.iter().enumerate() {
            a.id.push(qid);
            a.node.push(owner);
            a.at.push(ms(rec.at));
            a.error.push(rec.error.as_deref());
            a.next.push(rec.next_retry_at.map(ms));
            for (address, state, response) in &rec.rcpt_results {
                a.x_ri.push(i as i64 + 1);
                a.x_addr.push(address);
                a.x_state.push(state.as_str());
                a.x_resp.push(response.as_deref());
            }
        }
        a
    }

    /// Bind the nine record parameters, after whatever came before.
    fn bind<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.id)
            .bind(&self.node)
            .bind(&self.at)
            .bind(&self.error)
            .bind(&self.next)
            .bind(&self.x_ri)
            .bind(&self.x_addr)
            .bind(&self.x_state)
            .bind(&self.x_resp)
    }
}

/// Whether `record_all` may take these records: none owes a notification (those queue
/// messages of their own, done one by one) and no message appears twice.
pub(super) fn plain_records(records: &[(String, String, AttemptRecord)]) -> bool {
    let mut ids: Vec<&str> = records.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.sort_unstable();
    let unique = ids.windows(2).all(|w| w[0] != w[1]);
    unique && records.iter().all(|(_, _, r)| r.notifications.is_empty())
}
