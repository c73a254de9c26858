//! PostgreSQL's LISTEN/NOTIFY: the wake-ups every node hears of queue work on
//! `QUEUE_CHANNEL`, and the cached list of local domains kept fresh through
//! `ACCOUNTS_CHANNEL`.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgListener, PgPool};

use super::{db_err, exec, ACCOUNTS_CHANNEL, QUEUE_CHANNEL};
use crate::store::StoreResult;

/// The local domains as last read, or `None` while they may be stale.
pub(super) type Domains = Arc<RwLock<Option<HashSet<String>>>>;

/// Queue `NOTIFY`s on `QUEUE_CHANNEL` inside the caller's transaction, one per payload;
/// PostgreSQL delivers them when (and only if) it commits.
pub(super) async fn notify(conn: &mut PgConnection, payloads: &[&str]) -> StoreResult<()> {
    let q = sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::TEXT[]) AS p");
    exec(conn, q.bind(QUEUE_CHANNEL).bind(payloads)).await?;
    Ok(())
}

/// A listener on `QUEUE_CHANNEL` over a connection of `pool`.
pub(super) async fn queue_listener(pool: &PgPool) -> StoreResult<PgListener> {
    let mut l = PgListener::connect_with(pool).await.map_err(db_err)?;
    l.listen(QUEUE_CHANNEL).await.map_err(db_err)?;
    Ok(l)
}

/// The wake-ups' listener: queue work and domain changes.
async fn notification_listener(pool: &PgPool) -> StoreResult<PgListener> {
    let mut l = queue_listener(pool).await?;
    l.listen(ACCOUNTS_CHANNEL).await.map_err(db_err)?;
    Ok(l)
}

/// Read the local domains into `cache`; on failure it stays empty (look-ups ask the
/// database) until the next change or reconnection.
async fn read_domains(pool: &PgPool, cache: &RwLock<Option<HashSet<String>>>) {
    match sqlx::query_scalar::<_, String>("SELECT name FROM domains")
        .fetch_all(pool)
        .await
    {
        Ok(names) => {
            *cache.write().unwrap_or_else(|e| e.into_inner()) = Some(names.into_iter().collect());
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the local domains; look-ups ask the database")
        }
    }
}

/// Wake-ups for the queue from a listener that reconnects after an outage (with one
/// wake-up, as something may have been missed) and keeps `domains` fresh meanwhile.
pub(super) fn wake_ups(pool: PgPool, domains: Domains) -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        while !tx.is_closed() {
            // No listener, no cached domains: a change would go unheard.
            *domains.write().unwrap_or_else(|e| e.into_inner()) = None;
            let mut listener = match notification_listener(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "queue notifications: cannot listen; the periodic scan covers meanwhile");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // After a (re)connection something may have been missed: wake once, and
            // read the domains (after LISTEN, so no change falls in between).
            let _ = tx.try_send(());
            read_domains(&pool, &domains).await;
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) if n.channel() == ACCOUNTS_CHANNEL => {
                            *domains.write().unwrap_or_else(|e| e.into_inner()) = None;
                            read_domains(&pool, &domains).await;
                        }
                        // A full channel already holds a wake-up: coalesced.
                        Ok(Some(_)) => { let _ = tx.try_send(()); }
                        // The connection was lost: reconnect (with the wake-up).
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "queue notifications: connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
    });
    rx
}
