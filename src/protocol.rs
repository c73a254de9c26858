//! Sans-I/O SMTP grammar: command lines, commands, addresses, DATA and replies.
//!
//! Bytes go in, values come out; nothing here reads a socket, a clock or the store, and
//! nothing here knows what state a session is in (that is `session`). Each step is its
//! own module, in the order input flows through them:
//!
//! - [`line`](mod@line): where a command line ends (CRLF only; bare CR/LF and over-long lines).
//! - [`command`]: a line becomes a [`Command`] with its ESMTP parameters.
//! - [`address`]: RFC 5321 paths, [`Mailbox`], [`ReversePath`], [`ForwardPath`].
//! - [`data`]: the DATA section becomes a message (dot-unstuffing, smuggling defence).
//! - [`reply`]: the one [`Reply`] type, the server's exact reply bytes and what the
//!   client reads from a next hop.
//! - [`auth`]: SMTP AUTH's base64 and the PLAIN and LOGIN mechanisms.

pub mod address;
pub mod auth;
pub mod command;
pub mod data;
pub mod line;
pub mod reply;

pub use address::{AddressError, ForwardPath, Mailbox, Path, ReversePath};
pub use auth::Secret;
pub use command::{parse_command, Body, Command, CommandError, MailParams, RcptParams};
pub use data::{BareNewline, DataDecoder, DataOutcome};
pub use line::{LineEvent, LineReader};
pub use reply::Reply;
