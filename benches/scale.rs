//! Scale bench of the SQLite store's outgoing queue: a queue of 1,000,000 deferred
//! messages, the time of a scheduler tick that finds nothing due (`claim_due` with
//! nothing due) and the time of claiming a batch of 100 due messages.
//!
//! It drives the library's `MessageStore` exactly as `smtpd_queue` does through the store
//! actor (same node/lease/limit arguments), on a real file with the daemon's pragmas
//! (WAL, `synchronous=FULL`). It must not change the store's code or schema: the only SQL
//! it runs itself is the set-up (making messages deferred or due) on a second connection.
//!
//! A `harness = false` bench, run by `scripts/bench-scale` (or by hand:
//! `cargo bench --bench scale`). Settings come from the environment:
//! `SCALE_DB` (database file, default `/tmp/erlmail-scale-1m.db`; reused when it already
//! holds the right queue, so the slow fill is paid once), `SCALE_MESSAGES` (default
//! 1,000,000), `SCALE_IDLE_RUNS` (default 200), `SCALE_CLAIM_RUNS` (default 30) and
//! `SCALE_OUT` (a JSON file the results are written to, for the script's table).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use erlmail::store::{self, IncomingMessage, SharedStore};
use rusqlite::{params, Connection};

#[path = "../tests/support/messages.rs"]
mod messages;

/// Node name stamped by the claims (any string; the daemon uses `node:pid`).
const NODE: &str = "scale-bench:1";
/// The daemon's default lease.
const LEASE: Duration = Duration::from_secs(300);
/// Messages per `accept_batch` while filling: one transaction (one fsync) each.
const FILL_BATCH: usize = 1_000;
/// Claim limit of a tick (`CLAIM_BATCH` in actors/queue.rs).
const CLAIM_LIMIT: usize = 100;
/// "Deferred" means due in ten years: the daemon sharing a copy never tries them.
const FAR_FUTURE_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

struct Settings {
    db: PathBuf,
    messages: usize,
    idle_runs: usize,
    claim_runs: usize,
    out: Option<PathBuf>,
}

fn env_or<T: FromStr>(key: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{key}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn settings() -> anyhow::Result<Settings> {
    Ok(Settings {
        db: env_or("SCALE_DB", PathBuf::from("/tmp/erlmail-scale-1m.db"))?,
        messages: env_or("SCALE_MESSAGES", 1_000_000)?,
        idle_runs: env_or("SCALE_IDLE_RUNS", 200)?,
        claim_runs: env_or("SCALE_CLAIM_RUNS", 30)?,
        out: std::env::var("SCALE_OUT").ok().map(PathBuf::from),
    })
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A second connection on the same file for the set-up statements (WAL lets it share the
/// file with the store's own connections).
fn raw_conn(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.busy_timeout(Duration::from_secs(30))?;
    Ok(conn)
}

/// Whether the file already holds `n` queued messages, all deferred and unlocked.
fn is_ready(path: &Path, n: usize) -> anyhow::Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let conn = raw_conn(path)?;
    let total: Result<i64, _> = conn.query_row("SELECT COUNT(*) FROM outgoing", [], |r| r.get(0));
    let not_deferred: Result<i64, _> = conn.query_row(
        "SELECT COUNT(*) FROM outgoing WHERE next_retry_at < ?1 OR lock_owner IS NOT NULL",
        [now_ms() + FAR_FUTURE_MS / 2],
        |r| r.get(0),
    );
    drop(conn);
    Ok(matches!((total, not_deferred), (Ok(t), Ok(0)) if usize::try_from(t) == Ok(n)))
}

fn message(i: usize) -> IncomingMessage {
    let body = format!(
        "Received: from client.x.test by scale.test; scale bench\r\n\
         From: a@x.test\r\nTo: b@remote.test\r\nSubject: scale {i}\r\n\r\n\
         A small body for message {i} of the scale bench.\r\n"
    );
    messages::relayed(
        "a@x.test",
        &["b@remote.test"],
        "client.x.test",
        Some(format!("scale {i}")),
        body.into_bytes(),
    )
}

/// Fill a fresh file with `n` messages and make them all deferred. Returns seconds taken.
async fn fill(path: &Path, n: usize) -> anyhow::Result<f64> {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    let t0 = Instant::now();
    let store = store::open(&format!("sqlite://{}", path.display())).await?;
    let mut done = 0;
    while done < n {
        let k = FILL_BATCH.min(n - done);
        let batch = (done..done + k).map(message).collect();
        let accepted = store.accept_batch(batch).await?;
        if accepted.len() != k {
            bail!("accept_batch stored {} of {k}", accepted.len());
        }
        done += k;
        if done % 100_000 == 0 {
            eprintln!(
                "scale: filled {done}/{n} in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    drop(store);
    let conn = raw_conn(path)?;
    let t1 = Instant::now();
    let deferred = conn.execute(
        "UPDATE outgoing SET tries = 1, last_try_at = ?1, next_retry_at = ?2, \
         last_error = 'scale bench: deferred'",
        params![now_ms(), now_ms() + FAR_FUTURE_MS],
    )?;
    eprintln!(
        "scale: deferred {deferred} messages in {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    checkpoint(&conn)?;
    drop(conn);
    Ok(t0.elapsed().as_secs_f64())
}

/// Fold the WAL back into the database file and truncate it.
fn checkpoint(conn: &Connection) -> anyhow::Result<()> {
    // The pragma answers with a row (busy, log and checkpointed page counts).
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank: p99 of 200 runs is the 198th value.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (
        quantile(&v, 0.5),
        quantile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

/// Times of `claim_due` finding nothing due, in milliseconds.
async fn idle_ticks(store: &SharedStore, runs: usize) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let got = store
            .claim_due(NODE, Utc::now(), LEASE, CLAIM_LIMIT)
            .await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if !got.is_empty() {
            bail!(
                "idle tick claimed {} messages: the queue is not all deferred",
                got.len()
            );
        }
    }
    Ok(times)
}

/// Times of claiming 100 freshly due messages, in milliseconds. Each round makes a
/// different 100 due, claims them, then defers and unlocks them again (as
/// `record_attempt` would) so the next round sees the same queue shape.
async fn claims(
    store: &SharedStore, conn: &Connection, runs: usize, n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(runs);
    let stride = (n / runs.max(1)).max(CLAIM_LIMIT);
    for round in 0..runs {
        let made = conn.execute(
            "UPDATE outgoing SET next_retry_at = ?1 WHERE rowid IN \
             (SELECT rowid FROM outgoing ORDER BY rowid LIMIT ?2 OFFSET ?3)",
            params![
                now_ms() - 1_000,
                CLAIM_LIMIT as i64,
                ((round * stride) % n.saturating_sub(CLAIM_LIMIT).max(1)) as i64
            ],
        )?;
        if made != CLAIM_LIMIT {
            bail!("made {made} messages due, not {CLAIM_LIMIT}");
        }
        let t = Instant::now();
        let got = store
            .claim_due(NODE, Utc::now(), LEASE, CLAIM_LIMIT)
            .await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if got.len() != CLAIM_LIMIT {
            bail!("claimed {} messages, not {CLAIM_LIMIT}", got.len());
        }
        // Put them back: deferred, unlocked. The index on next_retry_at finds them.
        conn.execute(
            "UPDATE outgoing SET next_retry_at = ?1, lock_owner = NULL, lock_expires_at = NULL \
             WHERE next_retry_at <= ?2",
            params![now_ms() + FAR_FUTURE_MS, now_ms()],
        )?;
    }
    Ok(times)
}

/// SQLite's plan for the claim's inner select, so a full scan would be visible.
fn claim_plan(conn: &Connection) -> anyhow::Result<String> {
    let mut stmt = conn.prepare(
        "EXPLAIN QUERY PLAN SELECT id FROM outgoing \
         WHERE next_retry_at <= 1 AND held = 0 \
           AND (lock_owner IS NULL OR lock_expires_at IS NULL OR lock_expires_at <= 1) \
         ORDER BY next_retry_at, id LIMIT 100",
    )?;
    // Rows of (id, parent, notused, detail).
    let details = stmt
        .query_map([], |r| r.get::<_, String>(3))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(details.join("; "))
}

async fn run(s: Settings) -> anyhow::Result<serde_json::Value> {
    let fill_seconds = if is_ready(&s.db, s.messages)? {
        eprintln!(
            "scale: reusing {} ({} deferred messages)",
            s.db.display(),
            s.messages
        );
        None
    } else {
        eprintln!(
            "scale: filling {} with {} messages",
            s.db.display(),
            s.messages
        );
        Some(fill(&s.db, s.messages).await?)
    };
    let store = store::open(&format!("sqlite://{}", s.db.display()))
        .await
        .context("opening the filled store")?;
    let conn = raw_conn(&s.db)?;
    let plan = claim_plan(&conn)?;

    // A few untimed rounds first: the pool's connections are opened lazily.
    idle_ticks(&store, 5).await?;
    let (idle_med, idle_p99, idle_max) = summary(idle_ticks(&store, s.idle_runs).await?);
    let (claim_med, claim_p99, claim_max) =
        summary(claims(&store, &conn, s.claim_runs, s.messages).await?);

    // The same idle tick on an empty store, as the baseline.
    let empty_dir =
        std::env::temp_dir().join(format!("erlmail-scale-empty-{}", std::process::id()));
    let empty = store::open(&format!("sqlite://{}/erlmail.db", empty_dir.display())).await?;
    idle_ticks(&empty, 5).await?;
    let (empty_med, _, _) = summary(idle_ticks(&empty, s.idle_runs).await?);
    drop(empty);
    let _ = std::fs::remove_dir_all(&empty_dir);

    drop(store);
    checkpoint(&conn)?;
    drop(conn);
    let db_bytes = std::fs::metadata(&s.db).map(|m| m.len()).unwrap_or(0);
    Ok(serde_json::json!({
        "messages": s.messages,
        "db": s.db.display().to_string(),
        "db_bytes": db_bytes,
        "fill_seconds": fill_seconds,
        "idle_runs": s.idle_runs,
        "idle_median_ms": idle_med,
        "idle_p99_ms": idle_p99,
        "idle_max_ms": idle_max,
        "idle_empty_median_ms": empty_med,
        "claim_runs": s.claim_runs,
        "claim_median_ms": claim_med,
        "claim_p99_ms": claim_p99,
        "claim_max_ms": claim_max,
        "claim_plan": plan,
    }))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench` (and maybe a filter); this program takes its
    // settings from the environment only.
    let s = settings()?;
    let out = s.out.clone();
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(run(s))?;
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(out) = out {
        std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
