//! erlmail: ErlMail's SMTP server and outgoing relay queue, rebuilt in Rust on actors.
//!
//! # The actor tree
//!
//! ```text
//! erlmail_sup                      root supervisor (actors/root.rs)
//! ├── erlmail_store                owns the store backend; group commit (actors/store.rs)
//! ├── smtpd_queue                  outgoing queue (actors/queue.rs)
//! │   └── smtpc_sender#<queue-id>  delivers one message (actors/sender.rs)
//! └── smtpd_sup                    (actors/smtpd_sup.rs)
//!     ├── smtpd_anvil              per-client counts and rates (actors/anvil.rs)
//!     ├── smtpd_listener           accepts connections (actors/listener.rs)
//!     └── smtpd_fsm#<n>            one per SMTP session (actors/fsm.rs)
//! ```
//!
//! The messages they exchange live in `actors::msg`, below every actor; restarts go
//! through `actors::supervision`, calls to the store through `actors::store_client`.
//!
//! # Data flow
//!
//! Bytes from a socket (`net`) feed the pure session machine (`session`, built on the
//! sans-I/O grammar in `protocol`); an accepted message goes to the store actor, which
//! commits it (`store`) before the 250; queued messages are announced to `smtpd_queue`,
//! which asks the pure queue policy (`queue`: scheduler, attempt planning, retries, DSNs,
//! crash fallback) and spawns senders that deliver (`outbound`). `auth` signs and checks
//! mail (DKIM, SPF, DMARC). `protocol`, `session` and `queue` are pure: no I/O, no clock.
//! The command line (`erlmail serve`, the admin commands) is the binary's `cli` module.

pub mod actors;
pub mod auth;
pub mod config;
pub mod import;
pub mod net;
pub mod outbound;
pub mod protocol;
pub mod queue;
pub mod session;
pub mod spool_lock;
pub mod store;
pub mod telemetry;
