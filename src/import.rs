//! `erlmail import FILE`: load an ErlMail export into the store.
//!
//! This module owns the reading of the JSON file that `contrib/erlmail-export.escript`
//! writes from ErlMail's Mnesia tables, and its loading through the `MessageStore` trait:
//! domains, users (ErlMail's plain-text passwords become argon2 hashes here; no clear-text
//! password is stored, logged or printed) and messages, each into the user's mailbox of
//! the same name as its ErlMail mailbox (`INBOX` in any case is the INBOX) and, with
//! `maildir_root` set, also into the user's Maildir once the store has committed it.
//!
//! It must not touch the database other than through the trait, and it never changes
//! what already exists: domains and users already present are left as they are, and
//! messages already imported are recognised (see `stored_bodies`) and skipped, so running
//! it twice changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;

use chrono::Utc;
use serde::Deserialize;

use crate::store::common::norm_mailbox;
use crate::store::{maildir, IncomingMessage, MessageStore, StoreError};

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
    /// Of `messages`, how many went to a mailbox other than INBOX (their ErlMail folder).
    pub other_mailboxes: u64,
    /// Maildir files written (with `maildir_root`): one per message imported by this run.
    pub maildir_files: u64,
    /// Things an operator must know (hashed passwords that could not be carried over,
    /// messages of unknown users, Maildir copies that failed). Never contains a password.
    pub warnings: Vec<String>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {} domains, {} users, {} messages; {} skipped (already present)",
            self.domains, self.users, self.messages, self.skipped
        )?;
        if self.other_mailboxes > 0 {
            write!(
                f,
                "; {} messages kept in their mailbox other than INBOX",
                self.other_mailboxes
            )?;
        }
        if self.maildir_files > 0 {
            write!(f, "; {} written to the Maildir", self.maildir_files)?;
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
    /// The ErlMail mailbox holding it (its `folder`, or the `mailbox_store` listing it),
    /// created on first use.
    mailbox: String,
    /// ErlMail's flag atoms as text (`seen`, `answered`, ...).
    #[serde(default)]
    flags: Vec<String>,
    body_base64: String,
}

/// Load the export at `path` into `store` (and the messages into the Maildirs under
/// `maildir_root`, when given), showing a progress bar on stderr when `progress` is
/// true. Idempotent: a second run adds nothing and counts everything as skipped.
pub async fn import(
    store: &dyn MessageStore, path: &Path, maildir_root: Option<&Path>, progress: bool,
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
    let to = Target {
        store,
        maildir_root,
        bar: &bar,
    };
    import_messages(&to, &shown, &export.messages, &mut report).await?;

    bar.finish_and_clear();
    Ok(report)
}

async fn import_user(
    store: &dyn MessageStore, u: &ExUser, report: &mut ImportReport,
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

/// Where messages go: the store, the Maildirs (if any), and the progress bar.
struct Target<'a> {
    store: &'a dyn MessageStore,
    maildir_root: Option<&'a Path>,
    bar: &'a indicatif::ProgressBar,
}

async fn import_messages(
    to: &Target<'_>, path: &str, messages: &[ExMessage], report: &mut ImportReport,
) -> Result<(), ImportError> {
    let store = to.store;
    // Per user, in file order (the escript sorts by mailbox and uid: oldest first).
    let mut by_user: BTreeMap<String, Vec<&ExMessage>> = BTreeMap::new();
    for m in messages {
        by_user
            .entry(format!("{}@{}", m.user, m.domain))
            .or_default()
            .push(m);
    }
    let mut batch: Vec<IncomingMessage> = Vec::with_capacity(BATCH);
    for (address, msgs) in by_user {
        if !store.user_exists(&address).await? {
            report.skipped += msgs.len() as u64;
            report.warnings.push(format!(
                "{} messages of {address} not imported: no such user",
                msgs.len()
            ));
            to.bar.inc(msgs.len() as u64);
            continue;
        }
        // Per mailbox, the bodies it holds. A mailbox is read the first time one of its
        // messages comes up, before any of them is in `batch`: what it holds then is
        // what earlier runs stored.
        let mut present: HashMap<String, HashMap<(usize, u64), usize>> = HashMap::new();
        for m in msgs {
            // mail-parser's MIME decoder: the crate is here already, and the escript
            // writes plain unwrapped base64, which it decodes exactly.
            let body = mail_parser::decoders::base64::base64_decode(m.body_base64.as_bytes())
                .ok_or_else(|| ImportError::Format {
                    path: path.to_string(),
                    reason: format!("message {:?} of {address}: bad base64", m.name),
                })?;
            let mailbox = match m.mailbox.trim() {
                "" => "INBOX",
                name => norm_mailbox(name),
            };
            let held = match present.get_mut(mailbox) {
                Some(held) => held,
                None => present
                    .entry(mailbox.to_string())
                    .or_insert(stored_bodies(store, &address, mailbox).await?),
            };
            if let Some(n) = held.get_mut(&body_key(&body)).filter(|n| **n > 0) {
                *n -= 1;
                report.skipped += 1;
                to.bar.inc(1);
                continue;
            }
            if mailbox != "INBOX" {
                report.other_mailboxes += 1;
            }
            let flags = imap_flags(&m.flags, |f| {
                report.warnings.push(format!(
                    "flag {f:?} of message {:?} of {address} dropped: not an IMAP keyword",
                    m.name
                ))
            });
            batch.push(incoming(&address, body, mailbox, flags));
            if batch.len() >= BATCH {
                flush(to, &mut batch, report).await?;
            }
        }
        flush(to, &mut batch, report).await?;
    }
    Ok(())
}

/// The bodies `address`'s mailbox holds, by `body_key`, with their counts. A message
/// counts as present when its mailbox holds one with the same bytes, with multiplicity,
/// so two identical ErlMail messages arrive as two and stay two.
async fn stored_bodies(
    store: &dyn MessageStore, address: &str, mailbox: &str,
) -> Result<HashMap<(usize, u64), usize>, StoreError> {
    let mut held = HashMap::new();
    for summary in store.list_mailbox(address, mailbox).await? {
        if let Some(stored) = store.get_message(address, summary.id).await? {
            *held.entry(body_key(&stored.body)).or_default() += 1;
        }
    }
    Ok(held)
}

/// ErlMail's flags as IMAP flags: its atoms for the system flags (`seen`, or already
/// `\Seen`) become `\Seen` and so on; `recent` is dropped (IMAP's `\Recent` belongs to a
/// session, it is not stored); other names are keywords, kept as they are when they are
/// IMAP atoms, else handed to `dropped`.
fn imap_flags(flags: &[String], mut dropped: impl FnMut(&str)) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(flags.len());
    for f in flags {
        let system = match f.trim_start_matches('\\').to_ascii_lowercase().as_str() {
            "seen" => Some("\\Seen"),
            "answered" => Some("\\Answered"),
            "flagged" => Some("\\Flagged"),
            "deleted" => Some("\\Deleted"),
            "draft" => Some("\\Draft"),
            "recent" => continue,
            _ => None,
        };
        let flag = match system {
            Some(s) => s.to_string(),
            // RFC 3501 atom: no controls, spaces or atom-specials.
            None if !f.is_empty()
                && f.chars().enumerate().all(|(i, c)| {
                    (c == '\\' && i == 0) || (c.is_ascii_graphic() && !"(){%*\"\\]".contains(c))
                }) =>
            {
                f.clone()
            }
            None => {
                dropped(f);
                continue;
            }
        };
        if !out.contains(&flag) {
            out.push(flag);
        }
    }
    out
}

/// Commit `batch` in one store transaction, then write its Maildir copies (when the
/// import has a `maildir_root`).
async fn flush(
    to: &Target<'_>, batch: &mut Vec<IncomingMessage>, report: &mut ImportReport,
) -> Result<(), ImportError> {
    if batch.is_empty() {
        return Ok(());
    }
    let messages = std::mem::take(batch);
    let n = messages.len() as u64;
    let copies = to
        .maildir_root
        .map(|root| (root.to_path_buf(), messages.clone()));
    to.store.accept_batch(messages).await?;
    report.messages += n;
    if let Some((root, copies)) = copies {
        let (written, failed) = tokio::task::spawn_blocking(move || write_maildir(&root, &copies))
            .await
            .map_err(|e| StoreError::Backend(format!("maildir task: {e}")))?;
        report.maildir_files += written;
        report.warnings.extend(failed);
    }
    to.bar.inc(n);
    Ok(())
}

/// Write each message into its recipient's Maildir under `root` (its folder as a
/// Maildir++ `.Folder`, its flags as the Maildir info: `cur/`, `:2,S`); returns how many
/// files were written and a warning for each that failed (the store has those messages,
/// so a second run will not write them either: the warning says so).
fn write_maildir(root: &Path, messages: &[IncomingMessage]) -> (u64, Vec<String>) {
    let mut written = 0;
    let mut failed = Vec::new();
    for m in messages {
        // ErlMail's hierarchy separator is `/`; Maildir++ separates folders with `.`.
        let folder = m.maildir_folder().map(|f| f.replace('/', "."));
        for rcpt in &m.local_rcpts {
            match maildir::deliver_with_flags(
                root,
                rcpt,
                folder.as_deref(),
                &m.body,
                &m.flags,
                m.received_at,
            ) {
                Ok(_) => written += 1,
                Err(e) => failed.push(format!(
                    "a message of {rcpt} in mailbox {} is in the store but not in the \
                     Maildir: {e}",
                    m.mailbox()
                )),
            }
        }
    }
    (written, failed)
}

/// The delivery of an ErlMail message into `mailbox` with `flags`, its envelope rebuilt
/// from its headers (ErlMail kept none): sender from Return-Path or From, internal date
/// from Date (else now).
fn incoming(address: &str, body: Vec<u8>, mailbox: &str, flags: Vec<String>) -> IncomingMessage {
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
        mailbox: Some(mailbox.to_string()),
        flags,
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
        let m = incoming("u@example.com", body.clone(), "Sent", vec!["\\Seen".into()]);
        assert_eq!(m.sender, "bounce@example.net");
        assert_eq!(m.subject.as_deref(), Some("hi"));
        assert_eq!(m.received_at.timestamp(), 1_230_768_010);
        assert_eq!(m.local_rcpts, vec!["u@example.com".to_string()]);
        assert_eq!(m.body, body);
        assert_eq!(m.mailbox(), "Sent");
        assert_eq!(m.flags, vec!["\\Seen".to_string()]);
        let m = incoming(
            "u@example.com",
            b"From: <f@example.org>\r\n\r\n".to_vec(),
            "INBOX",
            Vec::new(),
        );
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
            other_mailboxes: 1,
            maildir_files: 6,
            warnings: vec!["w".into()],
        };
        assert_eq!(
            r.to_string(),
            "imported 2 domains, 3 users, 6 messages; 1 skipped (already present); \
             1 messages kept in their mailbox other than INBOX; 6 written to the Maildir\n\
             warning: w"
        );
    }

    #[test]
    fn erlmail_flags_become_imap_flags() {
        let given: Vec<String> = [
            "seen",
            "recent",
            "answered",
            "Flagged",
            "\\Deleted",
            "draft",
            "$Work",
            "seen",
            "two words",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut dropped = Vec::new();
        let flags = imap_flags(&given, |f| dropped.push(f.to_string()));
        assert_eq!(
            flags,
            [
                "\\Seen",
                "\\Answered",
                "\\Flagged",
                "\\Deleted",
                "\\Draft",
                "$Work"
            ]
        );
        assert_eq!(dropped, ["two words", ""]);
    }
}
