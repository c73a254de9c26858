//! `erlmail queue`: the outgoing queue as an operator sees it, in Postfix's words (`mailq`,
//! `postqueue -f`, `postsuper -d/-h/-H`). It reads and changes the queue only through the
//! store; the running daemon picks the changes up from there.

use std::time::Duration;

use anyhow::{bail, ensure};
use chrono::{DateTime, Utc};

use erlmail::config::Config;
use erlmail::store::{MessageStore, QueueSummary};

use super::{rfc3339, sender_or_null, with_store};

#[derive(clap::Subcommand, Debug)]
pub(super) enum QueueCmd {
    /// List queued messages and why each waits (like `mailq`).
    List {
        #[command(flatten)]
        filter: QueueFilter,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print one queued message: envelope, state and body.
    Show { id: String },
    /// Make one message, the filtered ones, or all due now (like `postqueue -f` / `-i ID`).
    Flush {
        /// The queue id (default: every message the filters select).
        id: Option<String>,
        #[command(flatten)]
        filter: QueueFilter,
    },
    /// Delete one message, or with --all every message the filters select (like
    /// `postsuper -d`).
    Delete {
        /// The queue id.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Delete every queued message (that the filters select).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[command(flatten)]
        filter: QueueFilter,
    },
    /// Keep a message from being tried (like `postsuper -h`).
    Hold { id: String },
    /// Let a held message be tried again (like `postsuper -H`).
    Release { id: String },
}

/// Which queued messages a queue command applies to (all given filters must match).
#[derive(clap::Args, Debug, Default, Clone)]
pub(super) struct QueueFilter {
    /// Envelope sender contains this (case-insensitive; `<>` for the null sender).
    #[arg(long)]
    sender: Option<String>,
    /// Some recipient contains this (case-insensitive).
    #[arg(long)]
    rcpt: Option<String>,
    /// Some recipient is in this domain.
    #[arg(long)]
    domain: Option<String>,
    /// Received longer ago than this (`30m`, `4h`, `2d`).
    #[arg(long, value_parser = parse_age)]
    older_than: Option<Duration>,
    /// The last error contains this (case-insensitive).
    #[arg(long)]
    error: Option<String>,
}

fn parse_age(s: &str) -> Result<Duration, String> {
    erlmail::config::values::parse_duration(s)
}

impl QueueFilter {
    fn is_empty(&self) -> bool {
        self.sender.is_none()
            && self.rcpt.is_none()
            && self.domain.is_none()
            && self.older_than.is_none()
            && self.error.is_none()
    }

    fn matches(&self, m: &QueueSummary, now: DateTime<Utc>) -> bool {
        let has = |hay: &str, needle: &str| hay.to_lowercase().contains(&needle.to_lowercase());
        if let Some(s) = &self.sender {
            if !has(sender_or_null(&m.sender), s) {
                return false;
            }
        }
        if let Some(r) = &self.rcpt {
            if !m.rcpts.iter().any(|x| has(&x.address, r)) {
                return false;
            }
        }
        if let Some(d) = &self.domain {
            let d = d.trim_end_matches('.').to_lowercase();
            if !m.rcpts.iter().any(|x| {
                x.address
                    .rsplit_once('@')
                    .is_some_and(|(_, dom)| dom.to_lowercase() == d)
            }) {
                return false;
            }
        }
        if let Some(age) = self.older_than {
            if (now - m.received_at).to_std().unwrap_or_default() < age {
                return false;
            }
        }
        if let Some(e) = &self.error {
            if !m.last_error.as_deref().is_some_and(|x| has(x, e)) {
                return false;
            }
        }
        true
    }
}

pub(super) fn run(config: &Config, action: QueueCmd) -> anyhow::Result<()> {
    with_store(
        config,
        |store| async move { command(&*store, &action).await },
    )
}

async fn command(store: &dyn MessageStore, action: &QueueCmd) -> anyhow::Result<()> {
    let now = Utc::now();
    match action {
        QueueCmd::List { filter, json } => {
            let queue = selected(store, filter, now).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&queue_json(&queue))?);
            } else {
                list(&queue, now);
            }
        }
        QueueCmd::Show { id } => {
            let Some(m) = store.get_queued(id).await? else {
                bail!("no queued message {id}");
            };
            show(&m)?;
        }
        QueueCmd::Flush { id, filter } => {
            let n = if let Some(id) = id {
                ensure!(
                    store.flush(Some(id), now).await? != 0,
                    "no queued message {id} (or it is held)"
                );
                1
            } else if filter.is_empty() {
                store.flush(None, now).await?
            } else {
                let ids = selected_ids(store, filter, now).await?;
                bulk(&ids, "flushing", |id| async move {
                    Ok(store.flush(Some(&id), now).await? > 0)
                })
                .await?
            };
            println!("{n} message(s) due now");
        }
        QueueCmd::Delete { id, all, filter } => {
            if *all {
                let n = if filter.is_empty() {
                    store.delete_all_queued().await?
                } else {
                    let ids = selected_ids(store, filter, now).await?;
                    bulk(&ids, "deleting", |id| async move {
                        Ok(store.delete_queued(&id).await?)
                    })
                    .await?
                };
                println!("postsuper: Deleted: {n} message(s)");
            } else if let Some(id) = id {
                ensure!(store.delete_queued(id).await?, "no queued message {id}");
                println!("postsuper: {id}: removed");
            }
        }
        QueueCmd::Hold { id } => {
            ensure!(store.hold(id).await?, "no queued message {id}");
            println!("postsuper: {id}: placed on hold");
        }
        QueueCmd::Release { id } => {
            ensure!(store.release_hold(id).await?, "no queued message {id}");
            println!("postsuper: {id}: released from hold");
        }
    }
    Ok(())
}

/// The queue as `mailq` prints it: a line a message, its last error, its lease, its
/// recipients, and the total.
fn list(queue: &[QueueSummary], now: DateTime<Utc>) {
    if queue.is_empty() {
        println!("Mail queue is empty");
        return;
    }
    println!(
        "{:<16} {:>9} {:<20}  {:<6} {:<20}  SENDER",
        "QUEUE-ID", "SIZE", "ARRIVAL", "TRIES", "NEXT-RETRY"
    );
    for m in queue {
        let status = if m.held {
            "held".to_string()
        } else if m.next_retry_at <= now {
            "due".to_string()
        } else {
            rfc3339(m.next_retry_at)
        };
        println!(
            "{:<16} {:>9} {:<20}  {:<6} {:<20}  {}",
            m.id,
            m.size,
            rfc3339(m.received_at),
            m.tries,
            status,
            sender_or_null(&m.sender)
        );
        if let Some(err) = &m.last_error {
            println!("  ({err})");
        }
        if let (Some(owner), Some(until)) = (&m.lock_owner, m.lock_expires_at) {
            if until > now {
                println!("  [being delivered by {owner} until {}]", rfc3339(until));
            }
        }
        for r in &m.rcpts {
            let state = format!("{:?}", r.state).to_lowercase();
            match &r.last_response {
                Some(resp) => println!("    {} [{state}] {resp}", r.address),
                None => println!("    {} [{state}]", r.address),
            }
        }
    }
    let total: u64 = queue.iter().map(|m| m.size).sum();
    println!(
        "-- {} Kbytes in {} Requests.",
        total.div_ceil(1024),
        queue.len()
    );
}

/// One queued message: its envelope and state, a blank line, then the body as stored.
fn show(m: &erlmail::store::QueuedMessage) -> anyhow::Result<()> {
    println!("queue-id: {}", m.id);
    println!("sender: <{}>", m.sender);
    println!(
        "received: {} from {} (helo {})",
        rfc3339(m.received_at),
        m.client_ip,
        m.helo
    );
    if let Some(r) = &m.ret {
        println!("ret: {r}");
    }
    if let Some(e) = &m.envid {
        println!("envid: {e}");
    }
    println!("tries: {}", m.tries);
    println!("next-retry: {}", rfc3339(m.next_retry_at));
    if let Some(e) = &m.last_error {
        println!("last-error: {e}");
    }
    println!("held: {}", m.held);
    for r in &m.rcpts {
        let mut line = format!("recipient: <{}>", r.address);
        if let Some(n) = &r.notify {
            line.push_str(&format!(" NOTIFY={n}"));
        }
        if let Some(o) = &r.orcpt {
            line.push_str(&format!(" ORCPT={o}"));
        }
        println!("{line}");
    }
    println!();
    super::out_bytes(&m.body);
    Ok(())
}

/// The queued messages a filter selects.
async fn selected(
    store: &dyn MessageStore, filter: &QueueFilter, now: DateTime<Utc>,
) -> anyhow::Result<Vec<QueueSummary>> {
    Ok(store
        .list_queue()
        .await?
        .into_iter()
        .filter(|m| filter.matches(m, now))
        .collect())
}

/// The ids of the queued messages a filter selects.
async fn selected_ids(
    store: &dyn MessageStore, filter: &QueueFilter, now: DateTime<Utc>,
) -> anyhow::Result<Vec<String>> {
    let queue = selected(store, filter, now).await?;
    Ok(queue.into_iter().map(|m| m.id).collect())
}

/// Apply `op` to each id with a progress bar (on a terminal); how many it applied to.
async fn bulk<F, Fut>(ids: &[String], what: &str, op: F) -> anyhow::Result<u64>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    let mut n = 0;
    for id in ids {
        if op(id.clone()).await? {
            n += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(n)
}

/// The queue listing as JSON: every field of the table, recipients with their states.
fn queue_json(queue: &[QueueSummary]) -> serde_json::Value {
    serde_json::Value::Array(
        queue
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id,
                    "size": m.size,
                    "received_at": rfc3339(m.received_at),
                    "sender": m.sender,
                    "tries": m.tries,
                    "last_try_at": m.last_try_at.map(rfc3339),
                    "next_retry_at": rfc3339(m.next_retry_at),
                    "last_error": m.last_error,
                    "held": m.held,
                    "lock_owner": m.lock_owner,
                    "lock_expires_at": m.lock_expires_at.map(rfc3339),
                    "recipients": m.rcpts.iter().map(|r| serde_json::json!({
                        "address": r.address,
                        "state": r.state.as_str(),
                        "notify": r.notify,
                        "orcpt": r.orcpt,
                        "last_response": r.last_response,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
