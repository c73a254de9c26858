//! `erlmail status`: what a running daemon's admin endpoint (`admin_listen`) knows: the
//! live actor tree, the queue summary and the key counters. It asks over HTTP only.

use anyhow::{bail, Context};

use erlmail::config::Config;
use erlmail::net::admin::get;

/// The counters worth a glance, by metric name prefix (histogram buckets left out).
const COUNTERS: [&str; 8] = [
    "erlmail_smtp_sessions",
    "erlmail_messages_accepted",
    "erlmail_relay_denied",
    "erlmail_deliveries",
    "erlmail_dsn_sent",
    "erlmail_dkim_signed",
    "erlmail_actor_restarts",
    "erlmail_queue_messages",
];

pub(super) fn run(config: &Config) -> anyhow::Result<()> {
    let Some(addr) = config.admin_listen else {
        bail!("admin_listen is off in this configuration; status needs it");
    };
    super::block_on(async move {
        let tree = get(addr, "/tree")
            .await
            .with_context(|| format!("no erlmail admin endpoint answers at {addr}"))?;
        println!("actor tree:\n{tree}");
        println!("{}", get(addr, "/queue").await?);
        println!("counters:");
        for line in get(addr, "/metrics").await?.lines() {
            let wanted = !line.starts_with('#')
                && !line.contains("_bucket")
                && COUNTERS.iter().any(|c| line.starts_with(c));
            if wanted {
                println!("  {line}");
            }
        }
        Ok(())
    })
}
