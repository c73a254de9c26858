//! The outgoing queue's policy, as pure functions: when a message is tried again
//! (`retry`), what a delivery attempt's outcome means for a recipient (`outcome`), the
//! delivery status notifications sent back to the sender (`dsn`), and when a message
//! that keeps crashing its delivery agent is given up (`crash`). Leases are the store's:
//! its claim, renewal and record statements apply them atomically, by its clock.
//!
//! Like `protocol` and `session`, this module does no I/O and never reads the clock:
//! every instant is an argument, so the whole policy is tested without sleeping. The
//! actors (`actors::queue`, `actors::sender`) and the store apply it; `outbound` does
//! the network work.

pub mod crash;
pub mod dsn;
pub mod outcome;
pub mod plan;
pub mod retry;
pub mod scheduler;

pub use dsn::{build_dsn, should_notify, DsnInput, DsnKind, DsnRecipient, Ret};
pub use outcome::{classify_reply, FailureCause, Outcome, RcptStatus, SmtpReply};
pub use retry::{next_retry, schedule_total};
