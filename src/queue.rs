//! The outgoing queue's policy, as pure functions: when a message is tried again
//! (`retry`), what an attempt's results mean for the message and which notifications it
//! owes (`plan`), what a delivery attempt's outcome means for a recipient (`outcome`), the
//! notifications themselves (`dsn`), which waiting message goes next (`scheduler`), and
//! what follows a delivery agent's crash (`crash`). Leases are the store's.
//!
//! Like `protocol` and `session`, this module does no I/O and never reads the clock:
//! every instant is an argument. The actors (`actors::queue`, `actors::sender`) ask it and
//! act; `outbound` does the network work.

pub mod crash;
pub mod dsn;
pub mod outcome;
pub mod plan;
pub mod retry;
pub mod scheduler;

pub use dsn::{build_dsn, should_notify, DsnInput, DsnKind, DsnRecipient, Ret};
pub use outcome::{classify_reply, FailureCause, Outcome, RcptStatus};
pub use retry::{next_retry, schedule_total};
