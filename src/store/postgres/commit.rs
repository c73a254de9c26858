//! The PostgreSQL backend's one write path, `commit_batch`: the quick way first (one
//! statement, `batch`), and the careful way (`careful`, a savepoint per message, a
//! transaction per record) when a batch cannot take it or it failed.

use super::careful::{accept_one, record_one};
use super::notify::notify;
use super::{batch, db_err, exec, PostgresStore};
use crate::store::{
    AcceptLease, Accepted, AttemptRecord, IncomingMessage, MessageStore, StoreError, StoreResult,
    WriteBatch, WriteOutcome,
};

#[async_trait::async_trait]
impl MessageStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn commit_batch(&self, batch: WriteBatch) -> WriteOutcome {
        let WriteBatch {
            messages,
            lease,
            records,
            atomic,
        } = batch;
        if atomic {
            // All or nothing (import): the careful way, which has no savepoints to drop.
            let accepted = self
                .accept_leased(&messages, lease.as_ref())
                .await
                .map(|all| all.into_iter().map(Ok).collect());
            let recorded = Ok(self.record_each(records).await);
            return WriteOutcome {
                messages,
                accepted,
                recorded,
            };
        }
        // The one-statement commit files mail in the INBOX without flags; the rare Junk
        // copy (or imported message with a folder or flags) goes the careful way below.
        let fast = if messages.iter().any(IncomingMessage::needs_more_than_inbox) {
            Err(StoreError::Backend("a copy outside the plain INBOX".into()))
        } else {
            self.commit_fast(&messages, lease.as_ref(), &records).await
        };
        match fast {
            Ok((accepted, recorded)) => {
                return WriteOutcome {
                    messages,
                    accepted: Ok(accepted),
                    recorded: Ok(recorded),
                }
            }
            // The database is unreachable or full: the careful way would fare no better,
            // and the sessions must have their 451 now.
            Err(e @ (StoreError::Unavailable(_) | StoreError::Full(_))) => {
                return WriteOutcome {
                    messages,
                    accepted: Err(e.clone()),
                    recorded: Err(e),
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "group commit redone one message at a time");
            }
        }
        let accepted = if messages.is_empty() {
            Ok(Vec::new())
        } else {
            self.accept_isolated(&messages, lease.as_ref()).await
        };
        let recorded = Ok(self.record_each(records).await);
        WriteOutcome {
            messages,
            accepted,
            recorded,
        }
    }
}

/// The careful way, one transaction per record and no savepoints, for batches that
/// cannot take the quick one ([`PostgresStore::commit_fast`]).
impl PostgresStore {
    /// `accept_leased` for the group commit, where one message that fails (a local user
    /// removed since RCPT) must leave the others to commit. A savepoint costs two round
    /// trips per message, so the batch is first tried without them; only when that
    /// fails is it run again with each message in a savepoint of its own.
    async fn accept_isolated(
        &self, messages: &[IncomingMessage], lease: Option<&AcceptLease>,
    ) -> StoreResult<Vec<StoreResult<Accepted>>> {
        match self.accept_leased(messages, lease).await {
            Ok(all) => return Ok(all.into_iter().map(Ok).collect()),
            // One message was refused (a local user removed since RCPT): isolate it.
            Err(StoreError::Invalid(_)) => {}
            // The database failed (unreachable, broken connection): the savepoints would
            // fare no better, and the sessions must get their 451 now, not after a
            // second timeout.
            Err(e) => return Err(e),
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            exec(&mut tx, sqlx::query("SAVEPOINT accept_one")).await?;
            match accept_one(&mut tx, m, lease).await {
                Ok(a) => {
                    exec(&mut tx, sqlx::query("RELEASE SAVEPOINT accept_one")).await?;
                    out.push(Ok(a));
                }
                Err(e) => {
                    exec(&mut tx, sqlx::query("ROLLBACK TO SAVEPOINT accept_one")).await?;
                    out.push(Err(e));
                }
            }
        }
        let queued = out
            .iter()
            .filter_map(|a| a.as_ref().ok().and_then(|a| a.queue_id.as_deref()));
        commit_queued(tx, queued, lease).await?;
        Ok(out)
    }

    /// The group commit the quick way ([`batch`]): one statement for the messages and
    /// the plain records, which commits on its own. Records that owe notifications
    /// (messages of their own to queue) join it in one transaction, one by one. `Err`:
    /// nothing was committed.
    async fn commit_fast(
        &self, messages: &[IncomingMessage], lease: Option<&AcceptLease>,
        records: &[(String, String, AttemptRecord)],
    ) -> StoreResult<batch::Committed> {
        if batch::plain_records(records) {
            let mut conn = self.pool.acquire().await.map_err(db_err)?;
            return batch::commit_all(&mut conn, messages, lease, records).await;
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let done = async {
            let (accepted, _) = batch::commit_all(&mut tx, messages, lease, &[]).await?;
            let mut recorded = Vec::with_capacity(records.len());
            for (id, node, record) in records {
                recorded.push(record_one(&mut tx, id, node, record).await?);
            }
            Ok::<_, StoreError>((accepted, recorded))
        }
        .await;
        match done {
            Ok(done) => {
                tx.commit().await.map_err(db_err)?;
                Ok(done)
            }
            Err(e) => {
                // Roll back now, not when the connection is next used: until then the
                // row locks taken would hold up the redo and other nodes' claims.
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// Store `messages` in one transaction, all or nothing, one message at a time.
    async fn accept_leased(
        &self, messages: &[IncomingMessage], lease: Option<&AcceptLease>,
    ) -> StoreResult<Vec<Accepted>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            // An error drops `tx`, which rolls the whole batch back.
            out.push(accept_one(&mut tx, m, lease).await?);
        }
        let queued = out.iter().filter_map(|a| a.queue_id.as_deref());
        commit_queued(tx, queued, lease).await?;
        Ok(out)
    }

    /// Record each attempt in a transaction of its own.
    async fn record_each(
        &self, records: Vec<(String, String, AttemptRecord)>,
    ) -> Vec<StoreResult<()>> {
        let mut out = Vec::with_capacity(records.len());
        for (id, node, record) in records {
            out.push(self.record_alone(&id, &node, &record).await);
        }
        out
    }

    /// Record one attempt in a transaction of its own.
    async fn record_alone(&self, id: &str, node: &str, outcome: &AttemptRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        if let Err(refused) = record_one(&mut tx, id, node, outcome).await? {
            // Roll back now: a dropped transaction is rolled back only when its
            // connection is next used, and until then its FOR UPDATE lock makes a claim
            // (SKIP LOCKED) on another connection pass over the row.
            tx.rollback().await.map_err(db_err)?;
            return Err(refused);
        }
        tx.commit().await.map_err(db_err)
    }
}

/// Commit `tx`, which queued the messages `queued`. Other nodes need waking only for mail
/// nobody holds (a front node's, without `lease`): a leased row is being tried by its node
/// already.
async fn commit_queued<'a>(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>, queued: impl Iterator<Item = &'a str>,
    lease: Option<&AcceptLease>,
) -> StoreResult<()> {
    let queued: Vec<&str> = queued.collect();
    if !queued.is_empty() && lease.is_none() {
        notify(&mut tx, &queued).await?;
    }
    tx.commit().await.map_err(db_err)
}
