//! The messages the actors exchange, below every actor that sends or serves them, so
//! that no two actors import each other: the store's requests ([`StoreMsg`], [`QueueOp`]),
//! the queue's ([`QueueMsg`]) and the SMTP supervisor's ([`SmtpdSupMsg`]). Types only: no
//! behaviour.

use std::net::SocketAddr;
use std::sync::Arc;

use ractor::RpcReplyPort;
use tokio::net::TcpStream;

use crate::config::Config;
use crate::store::{self, Accepted, IncomingMessage, QueuedMessage, StoreResult};

/// What a recipient look-up found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientFacts {
    /// The domain is one of ours.
    pub local_domain: bool,
    /// The user exists.
    pub user_exists: bool,
}

/// Requests the store actor serves.
pub enum StoreMsg {
    /// Measure the store's clock against this host's (timer).
    SyncClock,
    /// Commit an accepted message (joins the next group commit).
    Accept(IncomingMessage, RpcReplyPort<StoreResult<Accepted>>),
    /// Is `domain` local, and does `local@domain` exist?
    LookupRecipient {
        /// `local@domain`, domain normalised.
        address: String,
        /// Where the answer goes.
        reply: RpcReplyPort<StoreResult<RecipientFacts>>,
    },
    /// The argon2 PHC hash of a user's password (`None`: no such user), for SMTP AUTH.
    PasswordHash {
        /// `local@domain`.
        address: String,
        /// Where the answer goes.
        reply: RpcReplyPort<StoreResult<Option<String>>>,
    },
    /// An outgoing-queue operation for `smtpd_queue` or a sender.
    Queue(QueueOp),
    /// A new configuration.
    Reload(Arc<Config>),
    /// The commit in flight ended; start the next one if anything waits.
    CommitDone,
    /// `RECORD_WAIT` has passed since records began waiting: commit them now.
    FlushRecords,
    /// Test-only fault injection.
    #[cfg(debug_assertions)]
    InjectPanic,
}

/// Operations on the outgoing queue. Each runs beside the group commits (the backend
/// serialises them with its own locking) and answers on its port.
pub enum QueueOp {
    /// Claim up to `limit` due messages for `node`.
    ClaimDue {
        /// Lock owner to stamp.
        node: String,
        /// Lease length.
        lease: std::time::Duration,
        /// Most messages to claim.
        limit: usize,
        /// The claimed messages.
        reply: RpcReplyPort<StoreResult<Vec<store::QueuedMessage>>>,
    },
    /// Extend a lease we hold.
    Renew {
        /// Queue id.
        id: String,
        /// Our lock owner name.
        node: String,
        /// Lease length from now.
        lease: std::time::Duration,
        /// Whether the lease is still ours.
        reply: RpcReplyPort<StoreResult<bool>>,
    },
    /// Record a try and clear our lock.
    Record {
        /// Queue id.
        id: String,
        /// Our lock owner name.
        node: String,
        /// What happened.
        record: store::AttemptRecord,
        /// Done, or why not.
        reply: RpcReplyPort<StoreResult<()>>,
    },
    /// Every queued message, for the admin endpoint.
    List {
        /// The listing.
        reply: RpcReplyPort<StoreResult<Vec<store::QueueSummary>>>,
    },
    /// Queued messages by state, for metrics.
    Counts {
        /// The counts.
        reply: RpcReplyPort<StoreResult<store::QueueCounts>>,
    },
    /// Clear our lock without recording a try.
    Release {
        /// Queue id.
        id: String,
        /// Our lock owner name.
        node: String,
    },
    /// Clear our locks on these messages and answer once done (a stopping queue gives
    /// back what waits in memory before the store itself stops).
    ReleaseAll {
        /// Queue ids.
        ids: Vec<String>,
        /// Our lock owner name.
        node: String,
        /// Done.
        reply: RpcReplyPort<()>,
    },
    /// Free every lease an earlier run of this node left (`release_node`).
    ReleaseNode {
        /// `node_name`.
        node: String,
        /// This run's lock owner, kept.
        current: String,
        /// How many messages were freed.
        reply: RpcReplyPort<StoreResult<u64>>,
    },
    /// Whether a message that waited in memory is still ours to try (`still_leased`).
    StillLeased {
        /// Queue id.
        id: String,
        /// Our lock owner name.
        node: String,
        /// The answer.
        reply: RpcReplyPort<StoreResult<bool>>,
    },
}

/// Requests the queue serves.
pub enum QueueMsg {
    /// Messages committed already leased to this process (claim at accept): try them
    /// now, or keep them in the active queue until a sender is free.
    Leased(Vec<QueuedMessage>),
    /// Periodic scan for due messages.
    Tick,
    /// A new configuration.
    Reload(Arc<Config>),
    /// Number of senders at work (for status and tests).
    Active(RpcReplyPort<usize>),
    /// A graceful stop: claim nothing more, give back what waits in memory, and answer
    /// once the senders on the wire have finished.
    Drain(RpcReplyPort<()>),
    /// Test-only fault injection.
    #[cfg(debug_assertions)]
    InjectPanic,
}

/// Requests the SMTP supervisor serves.
pub enum SmtpdSupMsg {
    /// A connection a listener accepted (the flag: on the implicit-TLS port).
    Accepted(TcpStream, SocketAddr, bool),
    /// A new configuration: new sessions use it; the listener rebinds if its address
    /// changed. The reply, if asked for, comes once it applies.
    Reload(Arc<Config>, Option<RpcReplyPort<()>>),
    /// Stop accepting, drain the sessions, then reply.
    Shutdown(RpcReplyPort<()>),
    /// The drain deadline passed: end the sessions that remain.
    DrainDeadline,
}
