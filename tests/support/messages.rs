//! Messages as the SMTP server hands them to the store, for tests and benches that drive
//! a store directly: `#[path = "support/messages.rs"] mod messages;` (from a bench,
//! `#[path = "../tests/support/messages.rs"]`).

#![allow(dead_code)]

use erlmail::store::{IncomingMessage, OutgoingRcpt};

/// A message from `sender` for the remote recipients `rcpts` only (no DSN parameters),
/// received now from 127.0.0.1 greeting as `helo`, with `subject` and the text `body`.
pub fn relayed(
    sender: &str, rcpts: &[&str], helo: &str, subject: Option<String>, body: Vec<u8>,
) -> IncomingMessage {
    IncomingMessage {
        sender: sender.into(),
        local_rcpts: Vec::new(),
        remote_rcpts: rcpts
            .iter()
            .map(|r| OutgoingRcpt {
                address: r.to_string(),
                orcpt: None,
                notify: None,
            })
            .collect(),
        mailbox: None,
        flags: Vec::new(),
        ret: None,
        envid: None,
        smtputf8: false,
        client_ip: "127.0.0.1".into(),
        helo: helo.into(),
        received_at: chrono::Utc::now(),
        subject,
        body,
    }
}
