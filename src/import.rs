//! `erlmail import FILE`: load an ErlMail export into the store.
//!
//! This module owns the reading of the JSON file that `contrib/erlmail-export.escript`
//! writes from ErlMail's Mnesia tables, and its loading through the `MessageStore` trait:
//! domains, users (ErlMail's plain-text passwords become argon2 hashes here; no clear-text
//! password is stored, logged or printed) and messages. It must not touch the database
//! other than through the trait, and it never changes what already exists: domains and
//! users already present are left as they are, and messages already imported are
//! recognised and skipped, so running it twice changes nothing.
//!
//! Mailboxes: the store's accept path writes only the INBOX, so a message that lived in
//! another ErlMail mailbox (its `folder`, or a `mailbox_store` listing it) lands in the
//! user's INBOX; `ImportReport::into_inbox` counts them and `warnings` names the folders.
//!
//! Recognising an imported message: a message counts as present when the user's INBOX
//! holds a message with the same bytes (same length and 64-bit SipHash), counted with
//! multiplicity, so two identical ErlMail messages arrive as two and stay two.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;

use chrono::Utc;
use serde::Deserialize;

use crate::store::{IncomingMessage, MessageStore, StoreError};

/// How many messages go into one store transaction.
const BATCH: usize = 100;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Domains added.
    pub domains: u64,
    /// Users added.
    pub users: u64,
    /// Messages delivered.
    pub messages: u64,
    /// Domains, users and messages that were already present (or could not be imported;
    /// see `warnings`) and were left alone.
    pub skipped: u64,
    /// Of `messages`, how many came from an ErlMail mailbox other than INBOX.
    pub into_inbox: u64,
    /// Things an operator must know (hashed passwords that could not be carried over,
    /// folders merged into INBOX, messages of unknown users). Never contains a password.
    pub warnings: Vec<String>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {} domains, {} users, {} messages; {} skipped (already present)",
            self.domains, self.users, self.messages, self.skipped
        )?;
        if self.into_inbox > 0 {
            write!(
                f,
                "; {} messages from other mailboxes were put in INBOX",
                self.into_inbox
            )?;
        }
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// Why an import failed. What was committed before the failure stays; running the import
/// again completes it.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file named.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not an ErlMail export this version understands.
    #[error("{path} is not an erlmail export: {reason}")]
    Format {
        /// The file named.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The export file, as `contrib/erlmail-export.escript` writes it (format version 1).
#[derive(Debug, Deserialize)]
struct Export {
    format: String,
    version: u32,
    #[serde(default)]
    domains: Vec<ExDomain>,
    #[serde(default)]
    users: Vec<ExUser>,
    #[serde(default)]
    messages: Vec<ExMessage>,
}

#[derive(Debug, Deserialize)]
struct ExDomain {
    name: String,
}

#[derive(Debug, Deserialize)]
struct ExUser {
    name: String,
    domain: String,
    password: String,
    /// The hash type ErlMail's user options named; `None` for plain text.
    password_hash: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ExMessage {
    name: String,
    user: String,
    domain: String,
    mailbox: String,
    body_base64: String,
}

/// Load the export at `path` into `store`, showing a progress bar on stderr when
/// `progress` is true. Idempotent: a second run adds nothing and counts everything as
/// skipped.
pub async fn import(
    store: &dyn MessageStore,
    path: &Path,
    progress: bool,
) -> Result<ImportReport, ImportError> {
    let shown = path.display().to_string();
    let raw = tokio::fs::read(path)
        .await
        .map_err(|source| ImportError::Io {
            path: shown.clone(),
            source,
        })?;
    let format_err = |reason: String| ImportError::Format {
        path: shown.clone(),
        reason,
    };
    let export: Export = serde_json::from_slice(&raw).map_err(|e| format_err(e.to_string()))?;
    if export.format != "erlmail-export" || export.version != 1 {
        return Err(format_err(format!(
            "format {:?} version {}, expected \"erlmail-export\" version 1",
            export.format, export.version
        )));
    }

    let total = (export.domains.len() + export.users.len() + export.messages.len()) as u64;
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:>9} [{bar:40}] {pos}/{len} {elapsed}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut report = ImportReport::default();

    bar.set_message("domains");
    for d in &export.domains {
        if store.add_domain(&d.name).await? {
            report.domains += 1;
        } else {
            report.skipped += 1;
        }
        bar.inc(1);
    }

    bar.set_message("users");
    for u in &export.users {
        import_user(store, u, &mut report).await?;
        bar.inc(1);
    }

    bar.set_message("messages");
    import_messages(store, &shown, &export.messages, &bar, &mut report).await?;

    bar.finish_and_clear();
    Ok(report)
}

async fn import_user(
    store: &dyn MessageStore,
    u: &ExUser,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    let address = format!("{}@{}", u.name, u.domain);
    if store.user_exists(&address).await? {
        // Left as it is: its password may have been changed since.
        report.skipped += 1;
        return Ok(());
    }
    if !store.is_local_domain(&u.domain).await? {
        report.skipped += 1;
        report.warnings.push(format!(
            "user {address} not imported: ErlMail had no domain {} for it",
            u.domain
        ));
        return Ok(());
    }
    let secret = match &u.password_hash {
        None => u.password.clone(),
        Some(kind) => {
            // ErlMail's hash cannot be turned into argon2. The account still arrives (its
            // mail needs it) with a random password nobody knows, until an admin sets one.
            report.warnings.push(format!(
                "user {address} had a {kind}-hashed password, which cannot be carried \
                 over; set a new one"
            ));
            random_secret()
        }
    };
    // argon2 is deliberately slow: keep it off the async worker threads.
    let hash = tokio::task::spawn_blocking(move || crate::store::password::hash_password(&secret))
        .await
        .map_err(|e| StoreError::Backend(format!("password hashing task: {e}")))??;
    store.add_user(&address, &hash).await?;
    report.users += 1;
    Ok(())
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Identity of a body for duplicate detection: length and SipHash (std's fixed keys).
fn body_key(body: &[u8]) -> (usize, u64) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    (body.len(), h.finish())
}

async fn import_messages(
    store: &dyn MessageStore,
    path: &str,
    messages: &[ExMessage],
    bar: &indicatif::ProgressBar,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    // Per user, in file order (the escript sorts by mailbox and uid: oldest first).
    let mut by_user: BTreeMap<String, Vec<&ExMessage>> = BTreeMap::new();
    for m in messages {
        by_user
            .entry(format!("{}@{}", m.user, m.domain))
            .or_default()
            .push(m);
    }
    let mut folders: BTreeMap<String, u64> = BTreeMap::new();
    let mut batch: Vec<IncomingMessage> = Vec::with_capacity(BATCH);
    for (address, msgs) in by_user {
        if !store.user_exists(&address).await? {
            report.skipped += msgs.len() as u64;
            report.warnings.push(format!(
                "{} messages of {address} not imported: no such user",
                msgs.len()
            ));
            bar.inc(msgs.len() as u64);
            continue;
        }
        let mut present: HashMap<(usize, u64), usize> = HashMap::new();
        for summary in store.list_mailbox(&address, "INBOX").await? {
            if let Some(stored) = store.get_message(&address, summary.id).await? {
                *present.entry(body_key(&stored.body)).or_default() += 1;
            }
        }
        for m in msgs {
            // mail-parser's MIME decoder: the crate is here already, and the escript
            // writes plain unwrapped base64, which it decodes exactly.
            let body = mail_parser::decoders::base64::base64_decode(m.body_base64.as_bytes())
                .ok_or_else(|| ImportError::Format {
                    path: path.to_string(),
                    reason: format!("message {:?} of {address}: bad base64", m.name),
                })?;
            if let Some(n) = present.get_mut(&body_key(&body)).filter(|n| **n > 0) {
                *n -= 1;
                report.skipped += 1;
                bar.inc(1);
                continue;
            }
            if !m.mailbox.eq_ignore_ascii_case("INBOX") {
                report.into_inbox += 1;
                *folders
                    .entry(format!("{address}: {}", m.mailbox))
                    .or_default() += 1;
            }
            batch.push(incoming(&address, body));
            if batch.len() >= BATCH {
                flush(store, &mut batch, bar, report).await?;
            }
        }
        // Each user's messages are committed before the next user's INBOX is read.
        flush(store, &mut batch, bar, report).await?;
    }
    for (folder, n) in folders {
        report.warnings.push(format!(
            "{n} messages of ErlMail mailbox {folder} were put in INBOX (only INBOX is kept)"
        ));
    }
    Ok(())
}

async fn flush(
    store: &dyn MessageStore,
    batch: &mut Vec<IncomingMessage>,
    bar: &indicatif::ProgressBar,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    if batch.is_empty() {
        return Ok(());
    }
    let n = batch.len() as u64;
    store.accept_batch(std::mem::take(batch)).await?;
    report.messages += n;
    bar.inc(n);
    Ok(())
}

/// An INBOX delivery of an ErlMail message, its envelope rebuilt from its headers (ErlMail
/// kept none): sender from Return-Path or From, internal date from Date (else now).
fn incoming(address: &str, body: Vec<u8>) -> IncomingMessage {
    let parsed = mail_parser::MessageParser::new().parse_headers(&body[..]);
    let subject = parsed
        .as_ref()
        .and_then(|p| p.subject())
        .map(str::to_string);
    let sender = parsed
        .as_ref()
        .and_then(|p| {
            p.return_path()
                .as_text()
                .map(|s| {
                    s.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_string()
                })
                .or_else(|| {
                    p.from()
                        .and_then(|a| a.first())
                        .and_then(|a| a.address())
                        .map(str::to_string)
                })
        })
        .unwrap_or_default();
    let received_at = parsed
        .as_ref()
        .and_then(|p| p.date())
        .and_then(|d| chrono::DateTime::from_timestamp(d.to_timestamp(), 0))
        .unwrap_or_else(Utc::now);
    IncomingMessage {
        sender,
        local_rcpts: vec![address.to_string()],
        remote_rcpts: Vec::new(),
        junk: false,
        ret: None,
        envid: None,
        smtputf8: false,
        client_ip: String::new(),
        helo: "erlmail-import".to_string(),
        received_at,
        subject,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_takes_envelope_from_headers() {
        let body = b"Return-Path: <bounce@example.net>\r\nFrom: A <a@example.net>\r\n\
Date: Thu, 01 Jan 2009 00:00:10 +0000\r\nSubject: hi\r\n\r\nx\r\n"
            .to_vec();
        let m = incoming("u@example.com", body.clone());
        assert_eq!(m.sender, "bounce@example.net");
        assert_eq!(m.subject.as_deref(), Some("hi"));
        assert_eq!(m.received_at.timestamp(), 1_230_768_010);
        assert_eq!(m.local_rcpts, vec!["u@example.com".to_string()]);
        assert_eq!(m.body, body);
        let m = incoming("u@example.com", b"From: <f@example.org>\r\n\r\n".to_vec());
        assert_eq!(m.sender, "f@example.org");
        assert_eq!(m.subject, None);
    }

    #[test]
    fn report_display() {
        let r = ImportReport {
            domains: 2,
            users: 3,
            messages: 6,
            skipped: 1,
            into_inbox: 1,
            warnings: vec!["w".into()],
        };
        assert_eq!(
            r.to_string(),
            "imported 2 domains, 3 users, 6 messages; 1 skipped (already present); \
             1 messages from other mailboxes were put in INBOX\nwarning: w"
        );
    }
}
