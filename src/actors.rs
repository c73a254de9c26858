//! The actor tree: ErlMail's OTP supervision tree, rebuilt on ractor.
//!
//! ```text
//! erlmail_sup                      root supervisor, one_for_one, at most 5 restarts in 60 s
//! ├── erlmail_store                owns the store backend; group commit
//! ├── smtpd_queue                  Leased casts + periodic Tick
//! │   └── smtpc_sender#<queue-id>  delivers one message
//! └── smtpd_sup                    one_for_one
//!     ├── smtpd_anvil              per-client counts and rates (Postfix's anvil)
//!     ├── smtpd_listener           owns the listening socket; hands connections to smtpd_sup
//!     └── smtpd_fsm#<n>            one per SMTP session; temporary: never restarted
//! ```
//!
//! One file per actor. The messages they exchange live in `msg`, below all of them;
//! restarts are handled through `supervision`, and requests to the store go through
//! `store_client`. This module holds what the rest share: the singletons' registry names,
//! the store's clock, the lock owner, actor paths for logs and the live tree. Only
//! `actors` imports ractor; durable state lives in the store, so any actor can die and be
//! re-created from it.

pub mod admin;
pub mod anvil;
pub mod fsm;
pub mod listener;
pub mod msg;
pub mod queue;
pub mod root;
pub mod sender;
pub mod smtpd_sup;
pub mod store;
pub mod store_client;
pub mod supervision;

use ractor::{ActorCell, ActorProcessingErr};

use crate::config::Config;

/// Registry name of the root supervisor.
pub const ROOT: &str = "erlmail_sup";
/// Registry name of the store actor.
pub const STORE: &str = "erlmail_store";
/// Registry name of the SMTP supervisor.
pub const SMTPD_SUP: &str = "smtpd_sup";
/// Registry name of the per-client limits actor.
pub const ANVIL: &str = "smtpd_anvil";
/// Registry name of the listener.
pub const LISTENER: &str = "smtpd_listener";
/// Registry name of the queue actor.
pub const QUEUE: &str = "smtpd_queue";

/// What an actor's `pre_start` returns: its state, or why it could not start.
pub type Started<S> = Result<S, ActorProcessingErr>;

/// What an actor's other callbacks return: `Err` is a broken invariant, for its
/// supervisor to deal with.
pub type Handled = Result<(), ActorProcessingErr>;

/// The store's clock minus this host's, in milliseconds, as `erlmail_store` last
/// measured it (see [`store_now`]).
static STORE_CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// This host's clock. Debug builds add `ERLMAIL_TEST_CLOCK_SKEW_SECS` so tests can run a
/// node whose clock is wrong.
pub fn local_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + test_clock_skew()
}

#[cfg(debug_assertions)]
fn test_clock_skew() -> chrono::Duration {
    static SKEW: std::sync::OnceLock<chrono::Duration> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var("ERLMAIL_TEST_CLOCK_SKEW_SECS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .map_or(chrono::Duration::zero(), chrono::Duration::seconds)
    })
}

#[cfg(not(debug_assertions))]
fn test_clock_skew() -> chrono::Duration {
    chrono::Duration::zero()
}

/// The store's clock, read as this host's clock plus the last measured offset: what
/// leases, due times and claims are stamped with, so that nodes whose clocks differ
/// (by minutes, even) agree on when a lease lapses and never take a live one.
pub fn store_now() -> chrono::DateTime<chrono::Utc> {
    let offset = STORE_CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed);
    local_now() + chrono::Duration::milliseconds(offset)
}

/// Record a new measurement of the store's clock minus this host's.
pub(crate) fn set_store_clock_offset(millis: i64) {
    STORE_CLOCK_OFFSET_MS.store(millis, std::sync::atomic::Ordering::Relaxed);
}

/// The lock owner this process stamps on claimed messages: the node name plus a boot
/// number (this run's start, in milliseconds), `node#boot`. One process holds a node
/// name at a time (the spool lock, or a PostgreSQL advisory lock), so at start a node
/// takes back every lease an earlier run of it left, instead of waiting them out.
pub fn lock_owner(config: &Config) -> String {
    static BOOT: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let boot = BOOT.get_or_init(|| chrono::Utc::now().timestamp_millis());
    format!("{}#{boot}", config.node_name)
}

/// The tasks an actor runs beside its mailbox (queries, commits), kept so that they end
/// with it: its `post_stop` calls [`Tasks::finish`].
#[derive(Default)]
pub(crate) struct Tasks(tokio::task::JoinSet<()>);

impl Tasks {
    /// Run `task` beside the actor.
    pub(crate) fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        // Forget the ones already done, so the set holds only what still runs.
        while self.0.try_join_next().is_some() {}
        self.0.spawn(task);
    }

    /// Let the running tasks finish, for at most `limit`; abort the rest.
    pub(crate) async fn finish(&mut self, limit: std::time::Duration) {
        let all_done = async { while self.0.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(limit, all_done).await;
        self.0.abort_all();
    }
}

/// `parent/child`, the form every lifecycle log line carries.
pub fn child_path(parent: &str, name: &str) -> String {
    format!("{parent}/{name}")
}

/// One node of the live actor tree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TreeNode {
    /// Registry name of the actor (or its id when it has none).
    pub name: String,
    /// Live children, sorted by name.
    pub children: Vec<TreeNode>,
}

impl TreeNode {
    /// Snapshot the live tree below `cell` from ractor's supervision links.
    pub fn of(cell: &ActorCell) -> TreeNode {
        let name = cell
            .get_name()
            .unwrap_or_else(|| format!("<{}>", cell.get_id()));
        let mut children: Vec<TreeNode> = cell
            .get_children()
            .iter()
            // A child still in `post_start` counts as live: the tree logged at start-up
            // must show a listener that has bound its port but not yet finished starting.
            .filter(|c| ractor::ACTIVE_STATES.contains(&c.get_status()))
            .map(TreeNode::of)
            .collect();
        children.sort_by_key(|c| natural_key(&c.name));
        TreeNode { name, children }
    }

    /// The tree drawn with box characters, one actor per line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&self.name);
        out.push('\n');
        self.render_children("", &mut out);
        out
    }

    fn render_children(&self, prefix: &str, out: &mut String) {
        for (i, child) in self.children.iter().enumerate() {
            let last = i + 1 == self.children.len();
            out.push_str(prefix);
            out.push_str(if last { "└── " } else { "├── " });
            out.push_str(&child.name);
            out.push('\n');
            let deeper = format!("{prefix}{}", if last { "    " } else { "│   " });
            child.render_children(&deeper, out);
        }
    }

    /// Every path in the tree, `erlmail_sup/smtpd_sup/smtpd_listener` style.
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_paths("", &mut out);
        out
    }

    fn collect_paths(&self, parent: &str, out: &mut Vec<String>) {
        let me = if parent.is_empty() {
            self.name.clone()
        } else {
            child_path(parent, &self.name)
        };
        out.push(me.clone());
        for c in &self.children {
            c.collect_paths(&me, out);
        }
    }
}

/// Sort `smtpd_fsm#10` after `smtpd_fsm#9`, and the permanent children first.
fn natural_key(name: &str) -> (bool, String, u64) {
    match name.split_once('#') {
        Some((base, n)) => (true, base.to_string(), n.parse().unwrap_or(u64::MAX)),
        None => (false, name.to_string(), 0),
    }
}

/// The live tree of a running daemon, when its root is registered in this process.
pub fn live_tree() -> Option<TreeNode> {
    ractor::registry::where_is(ROOT).map(|cell| TreeNode::of(&cell))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_renders_with_box_characters_and_paths() {
        let t = TreeNode {
            name: "erlmail_sup".into(),
            children: vec![
                TreeNode {
                    name: "erlmail_store".into(),
                    children: vec![],
                },
                TreeNode {
                    name: "smtpd_sup".into(),
                    children: vec![TreeNode {
                        name: "smtpd_listener".into(),
                        children: vec![],
                    }],
                },
            ],
        };
        assert_eq!(
            t.render(),
            "erlmail_sup\n├── erlmail_store\n└── smtpd_sup\n    └── smtpd_listener\n"
        );
        assert_eq!(
            t.paths(),
            vec![
                "erlmail_sup",
                "erlmail_sup/erlmail_store",
                "erlmail_sup/smtpd_sup",
                "erlmail_sup/smtpd_sup/smtpd_listener"
            ]
        );
    }

    #[test]
    fn natural_order_puts_numbered_sessions_in_number_order() {
        let mut v = ["smtpd_fsm#10", "smtpd_listener", "smtpd_fsm#9"];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(v, ["smtpd_listener", "smtpd_fsm#9", "smtpd_fsm#10"]);
    }
}
