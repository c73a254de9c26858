//! erlmail: ErlMail's SMTP server and outgoing relay queue, rebuilt in Rust on actors.
//!
//! # Layout
//!
//! ```text
//! erlmail_sup                      root supervisor (actors/root.rs)
//! ├── erlmail_store                owns the store backend; group commit (actors/store.rs)
//! ├── smtpd_sup                    (actors/smtpd_sup.rs)
//! │   ├── smtpd_listener           accepts connections (actors/listener.rs)
//! │   └── smtpd_fsm#<n>            one per SMTP session (actors/fsm.rs)
//! └── smtpd_queue                  outgoing queue (actors/queue.rs)
//!     └── smtpc_sender#<queue-id>  delivers one message (actors/sender.rs)
//! ```
//!
//! Data flow: bytes from a socket (`net`) feed the pure session machine (`session`, built
//! on the sans-I/O grammar in `protocol`); an accepted message goes to the store actor,
//! which commits it (`store`) before the 250; queued messages are announced to
//! `smtpd_queue`, whose senders deliver them (`outbound`) following the pure retry and DSN
//! policy in `queue`. `protocol`, `session` and `queue` are pure: no I/O, no clock.

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
