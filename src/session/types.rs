//! The values that cross between a [`Session`](super::Session) and the actor driving it:
//! the policy it runs under, the actions it asks for and the answers it gets back.
//! Plain data; no behaviour beyond defaults.

use std::net::IpAddr;

use crate::protocol::{ForwardPath, ReversePath, Secret};

/// What the session needs to know about the server's configuration (built by the actor
/// from `Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy {
    /// `server_smtp_name`: in the greeting, EHLO, `Received:` and 421 replies.
    pub hostname: String,
    /// `server_smtp_greeting`: the greeting is `220 <hostname> ESMTP <greeting>`.
    pub greeting: String,
    /// Largest message accepted, octets after dot-unstuffing (`SIZE` advertised; 552
    /// 5.3.4 at `MAIL SIZE=` and after the dot). 0: no limit.
    pub max_message_size: u64,
    /// Recipients per message; more get 452 4.5.3. 0: no limit.
    pub max_recipients: usize,
    /// Errors before `421 4.7.0 <host> Error: too many errors` and close. 0: no limit.
    pub hard_error_limit: u32,
    /// A message with more `Received:` headers than this gets 554 5.4.0.
    pub max_hops: u32,
    /// Whether this client may relay (from [`client_is_relay_authorised`](super::client_is_relay_authorised)).
    pub relay_authorised: bool,
    /// Longest command line accepted, octets including CRLF (at least 512, RFC 5321
    /// §4.5.3.1.4; Postfix reads 2048).
    pub max_line_length: usize,
    /// STARTTLS can be offered: a certificate is configured and loaded.
    pub tls_available: bool,
    /// A client that authenticated with SMTP AUTH may relay (`server_smtp_relay_auth`).
    pub auth_relay: bool,
}

impl SessionPolicy {
    /// REFERENCE's defaults (ErlMail's and Postfix's) for `hostname`, not authorised.
    pub fn with_defaults(hostname: impl Into<String>) -> Self {
        SessionPolicy {
            hostname: hostname.into(),
            greeting: "erlmail".to_string(),
            max_message_size: 10_240_000,
            max_recipients: 100,
            hard_error_limit: 20,
            max_hops: 50,
            relay_authorised: false,
            max_line_length: 2048,
            tls_available: false,
            auth_relay: true,
        }
    }
}

/// The client end of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Client address as the socket reports it (may be IPv4-mapped IPv6).
    pub ip: IpAddr,
    /// Client port.
    pub port: u16,
}

/// What the actor must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these reply bytes (CRLF-terminated, possibly several replies).
    Send(Vec<u8>),
    /// Ask the store about this recipient, then call [`Session::recipient_info`].
    /// Always the last action of its batch.
    LookupRecipient(ForwardPath),
    /// Commit this message durably, then call [`Session::stored`].
    /// Always the last action of its batch.
    Store(Transaction),
    /// Close the connection once everything before has been written.
    Close,
    /// Write what came before (the `220` to STARTTLS), discard any input not yet fed,
    /// perform the TLS handshake, then call [`Session::tls_started`] (or close the
    /// connection if the handshake fails). Always the last action of its batch.
    StartTls,
    /// Check these credentials against the store's users, then call
    /// [`Session::authenticated`]. Always the last action of its batch. Never log it
    /// beyond the user name; the password's `Debug` is redacted.
    Authenticate {
        /// The user name given (an address such as `alice@example.com`).
        user: String,
        /// The password given.
        password: Secret,
    },
}

/// The store's answer to [`Action::LookupRecipient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientInfo {
    /// The domain is one of ours.
    pub local_domain: bool,
    /// The user exists in that domain (meaningless when the domain is not local).
    pub user_exists: bool,
    /// The look-up itself failed (store unreachable): answer 451, never a permanent
    /// verdict, so the client tries again later.
    pub temporary_failure: bool,
}

/// The store's answer to [`Action::Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Committed durably: `250 2.0.0 Ok: queued as <id>`.
    Stored {
        /// The name shown to the client, if the store has one.
        queue_id: Option<String>,
    },
    /// Nothing was stored: `451 4.3.0 Error: queue file write error`.
    Failed,
    /// Nothing was stored, out of space: `452 4.3.1 Insufficient system storage`.
    DiskFull,
    /// Refused by policy (a DMARC `p=reject` failure): `550` with this text.
    Refused(String),
}

/// One accepted recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecipient {
    /// Where to deliver.
    pub path: ForwardPath,
    /// Local user (INBOX) rather than remote (outgoing queue).
    pub local: bool,
    /// Raw `NOTIFY=` value, upper-cased.
    pub notify: Option<String>,
    /// Raw `ORCPT=` value.
    pub orcpt: Option<String>,
}

/// Everything the store needs to keep an accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Envelope sender; `ReversePath::Null` for `<>`.
    pub reverse_path: ReversePath,
    /// Accepted recipients, in RCPT order, without duplicates.
    pub recipients: Vec<AcceptedRecipient>,
    /// `RET=FULL|HDRS`.
    pub ret: Option<String>,
    /// `ENVID=` xtext.
    pub envid: Option<String>,
    /// `BODY=8BITMIME` was given.
    pub body_8bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// The HELO/EHLO argument.
    pub helo: String,
    /// The client address, as the socket reported it.
    pub client_ip: IpAddr,
    /// The client may relay (listed in `server_smtp_relay_clients` or authenticated):
    /// its mail is not put through the SPF/DKIM/DMARC checks.
    pub trusted: bool,
    /// Decoded `Subject:` header, for mailbox listings; `None` when no recipient is
    /// local (relayed mail keeps no subject of its own).
    pub subject: Option<String>,
    /// The message: our `Received:` header, then the client's text, dots unstuffed,
    /// CRLF line ends.
    pub data: Vec<u8>,
}
