//! `erlmail domain`, `user` and `mailbox`: the local domains and users the server accepts
//! mail for, and the mail kept for them. Passwords come from standard input, are stored
//! as argon2 hashes, and are never echoed or logged.

use std::io::BufRead;

use anyhow::{bail, ensure};

use erlmail::config::Config;
use erlmail::store::password;

use super::{rfc3339, sender_or_null, with_store};

#[derive(clap::Subcommand, Debug)]
pub(super) enum DomainCmd {
    /// Add a local domain.
    Add { name: String },
    /// List local domains.
    List,
    /// Remove a local domain and its users.
    Remove { name: String },
}

#[derive(clap::Subcommand, Debug)]
pub(super) enum UserCmd {
    /// Add a user; the password is read from standard input.
    Add { address: String },
    /// List users, optionally of one domain.
    List { domain: Option<String> },
    /// Remove a user and its mail.
    Remove { address: String },
    /// Change a user's password (read from standard input).
    Passwd { address: String },
}

#[derive(clap::Subcommand, Debug)]
pub(super) enum MailboxCmd {
    /// List the messages in a user's INBOX, or in another of their mailboxes (`Junk`
    /// holds mail that failed DMARC under `p=quarantine`).
    List {
        address: String,
        /// The mailbox to list.
        #[arg(long, default_value = "INBOX")]
        mailbox: String,
    },
    /// Print one message exactly as stored.
    Show { address: String, id: i64 },
}

pub(super) fn domain(config: &Config, action: DomainCmd) -> anyhow::Result<()> {
    with_store(config, |store| async move {
        match action {
            DomainCmd::Add { name } => {
                if store.add_domain(&name).await? {
                    println!("added domain {}", name.to_ascii_lowercase());
                } else {
                    println!("domain {} already exists", name.to_ascii_lowercase());
                }
            }
            DomainCmd::List => {
                for d in store.list_domains().await? {
                    println!("{d}");
                }
            }
            DomainCmd::Remove { name } => {
                ensure!(store.remove_domain(&name).await?, "no such domain: {name}");
                println!("removed domain {}", name.to_ascii_lowercase());
            }
        }
        Ok(())
    })
}

pub(super) fn user(config: &Config, action: UserCmd) -> anyhow::Result<()> {
    with_store(config, |store| async move {
        match action {
            UserCmd::Add { address } => {
                let address = check_address(&address)?;
                let hash = password::hash_password(&read_password()?)?;
                store.add_user(&address, &hash).await?;
                println!("added user {address}");
            }
            UserCmd::List { domain } => {
                for u in store.list_users(domain.as_deref()).await? {
                    println!("{u}");
                }
            }
            UserCmd::Remove { address } => {
                ensure!(
                    store.remove_user(&address).await?,
                    "no such user: {address}"
                );
                println!("removed user {address}");
            }
            UserCmd::Passwd { address } => {
                let hash = password::hash_password(&read_password()?)?;
                ensure!(
                    store.set_password(&address, &hash).await?,
                    "no such user: {address}"
                );
                println!("changed the password of {address}");
            }
        }
        Ok(())
    })
}

pub(super) fn mailbox(config: &Config, action: MailboxCmd) -> anyhow::Result<()> {
    with_store(config, |store| async move {
        match action {
            MailboxCmd::List { address, mailbox } => {
                println!(
                    "{:>6}  {:<25}  {:>8}  {:<30}  SUBJECT",
                    "ID", "DATE", "SIZE", "FROM"
                );
                for m in store.list_mailbox(&address, &mailbox).await? {
                    println!(
                        "{:>6}  {:<25}  {:>8}  {:<30}  {}",
                        m.id,
                        rfc3339(m.internal_date),
                        m.size,
                        sender_or_null(&m.sender),
                        m.subject.unwrap_or_default()
                    );
                }
            }
            MailboxCmd::Show { address, id } => {
                let Some(m) = store.get_message(&address, id).await? else {
                    bail!("no message {id} for {address}");
                };
                // Standard output is the message exactly; its flags go beside it.
                if !m.summary.flags.is_empty() {
                    eprintln!("flags: {}", m.summary.flags.join(" "));
                }
                super::out_bytes(&m.body);
            }
        }
        Ok(())
    })
}

/// `local@domain`, with a domain part, or an error.
fn check_address(address: &str) -> anyhow::Result<String> {
    match address.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
            Ok(format!("{local}@{}", domain.to_ascii_lowercase()))
        }
        _ => bail!("expected USER@DOMAIN, got {address:?}"),
    }
}

/// One line from standard input, without its line end. Never echoed or logged.
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    Ok(pw)
}
