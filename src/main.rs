//! The `erlmail` command: the daemon (`serve`) and the administration commands that work
//! on the store the configuration names (`config`, `domain`, `user`, `mailbox`, `queue`).
//!
//! This file alone builds the tokio runtime; it forks before doing so when asked to
//! detach. It loads the configuration, starts the actor tree and maps signals onto it:
//! SIGTERM/SIGINT stop cleanly (exit 0), SIGHUP reloads the configuration (a bad file is
//! reported and the running one kept), SIGUSR1 logs the live actor tree.

use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Everything the commands print goes through [`out`]: a reader that went away
/// (`erlmail queue list | head -1`) ends the command quietly, as `ls | head` does,
/// instead of the panic std's `println!` gives on a closed pipe.
macro_rules! println {
    () => { out(format_args!("\n")) };
    ($($arg:tt)*) => { out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// See [`println`].
macro_rules! print {
    ($($arg:tt)*) => { out(format_args!($($arg)*)) };
}

/// Write to standard output; exit 0 at once when the reader has gone (EPIPE), and with
/// EX_IOERR (74) and one line on standard error for any other write failure.
fn out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("erlmail: writing to standard output: {e}");
        std::process::exit(74);
    }
}
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use erlmail::actors::root::{self, RootExit, RootMsg};
use erlmail::auth::sign::{self, Signers};
use erlmail::config::Config;
use erlmail::spool_lock::LockFile;
use erlmail::store::{self, password, SharedStore};

/// erlmail: an SMTP server and relay queue that runs ErlMail's configuration files.
#[derive(Parser, Debug)]
#[command(name = "erlmail", version, about)]
struct Cli {
    /// Configuration file (YAML, or ErlMail's .app / sys.config). Default: $ERLMAIL_CONFIG,
    /// else /etc/erlmail/erlmail.yaml when it exists, else the built-in defaults.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// Override one key, like Postfix's `-o`: `-o server_smtp_port=2525`.
    #[arg(short = 'o', value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the mail server.
    Serve {
        /// Detach from the terminal and run in the background.
        #[arg(long)]
        daemon: bool,
        /// Write the process id here (removed at exit).
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Append logs to this file instead of stderr (default with --daemon:
        /// <spool_dir>/erlmail.log).
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Check or convert configuration files.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// Local domains.
    Domain {
        #[command(subcommand)]
        action: DomainCmd,
    },
    /// Local users (passwords are read from standard input and stored as argon2 hashes).
    User {
        #[command(subcommand)]
        action: UserCmd,
    },
    /// Read local mailboxes.
    Mailbox {
        #[command(subcommand)]
        action: MailboxCmd,
    },
    /// Load a file written by contrib/erlmail-export.escript (ErlMail's Mnesia domains,
    /// users and messages, each into its ErlMail folder with its flags, and into the
    /// Maildirs too when `maildir_root` is set). Importing twice changes nothing.
    Import {
        /// The exported file.
        file: PathBuf,
    },
    /// The live actor tree, queue summary and key counters of the running daemon
    /// (through its admin endpoint, `admin_listen`).
    Status,
    /// The outgoing queue (like mailq, postqueue and postsuper).
    Queue {
        #[command(subcommand)]
        action: QueueCmd,
    },
    /// DKIM signing keys (`server_smtp_dkim_keys`).
    Dkim {
        #[command(subcommand)]
        action: DkimCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DkimCmd {
    /// Make a signing key for DOMAIN under SELECTOR (RSA 2048 unless --ed25519), write it
    /// (mode 0600, never over an existing file) and print the DNS TXT record to publish.
    Keygen {
        /// The signing domain (`d=`): mail from it and its subdomains is signed.
        domain: String,
        /// The selector (`s=`): the record goes at SELECTOR._domainkey.DOMAIN.
        selector: String,
        /// An Ed25519 key (ed25519-sha256, RFC 8463) instead of RSA.
        #[arg(long)]
        ed25519: bool,
        /// The private key file (default: <spool_dir>/dkim/DOMAIN.SELECTOR.pem).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Which queued messages a queue command applies to (all given filters must match).
#[derive(clap::Args, Debug, Default, Clone)]
struct QueueFilter {
    /// Envelope sender contains this (case-insensitive; `<>` for the null sender).
    #[arg(long)]
    sender: Option<String>,
    /// Some recipient contains this (case-insensitive).
    #[arg(long)]
    rcpt: Option<String>,
    /// Some recipient is in this domain.
    #[arg(long)]
    domain: Option<String>,
    /// Received longer ago than this (`30m`, `4h`, `2d`).
    #[arg(long, value_parser = parse_age)]
    older_than: Option<Duration>,
    /// The last error contains this (case-insensitive).
    #[arg(long)]
    error: Option<String>,
}

fn parse_age(s: &str) -> Result<Duration, String> {
    erlmail::config::values::parse_duration(s)
}

impl QueueFilter {
    fn is_empty(&self) -> bool {
        self.sender.is_none()
            && self.rcpt.is_none()
            && self.domain.is_none()
            && self.older_than.is_none()
            && self.error.is_none()
    }

    fn matches(
        &self,
        m: &erlmail::store::QueueSummary,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        let has = |hay: &str, needle: &str| hay.to_lowercase().contains(&needle.to_lowercase());
        if let Some(s) = &self.sender {
            let sender = if m.sender.is_empty() {
                "<>"
            } else {
                m.sender.as_str()
            };
            if !has(sender, s) {
                return false;
            }
        }
        if let Some(r) = &self.rcpt {
            if !m.rcpts.iter().any(|x| has(&x.address, r)) {
                return false;
            }
        }
        if let Some(d) = &self.domain {
            let d = d.trim_end_matches('.').to_lowercase();
            if !m.rcpts.iter().any(|x| {
                x.address
                    .rsplit_once('@')
                    .is_some_and(|(_, dom)| dom.to_lowercase() == d)
            }) {
                return false;
            }
        }
        if let Some(age) = self.older_than {
            if (now - m.received_at).to_std().unwrap_or_default() < age {
                return false;
            }
        }
        if let Some(e) = &self.error {
            if !m.last_error.as_deref().is_some_and(|x| has(x, e)) {
                return false;
            }
        }
        true
    }
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// List queued messages and why each waits (like `mailq`).
    List {
        #[command(flatten)]
        filter: QueueFilter,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print one queued message: envelope, state and body.
    Show { id: String },
    /// Make one message, the filtered ones, or all due now (like `postqueue -f` / `-i ID`).
    Flush {
        /// The queue id (default: every message the filters select).
        id: Option<String>,
        #[command(flatten)]
        filter: QueueFilter,
    },
    /// Delete one message, or with --all every message the filters select (like
    /// `postsuper -d`).
    Delete {
        /// The queue id.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Delete every queued message (that the filters select).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[command(flatten)]
        filter: QueueFilter,
    },
    /// Keep a message from being tried (like `postsuper -h`).
    Hold { id: String },
    /// Let a held message be tried again (like `postsuper -H`).
    Release { id: String },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the effective configuration (or the error, with file, line and column).
    Check {
        /// The file to check (default: the one `--config` names).
        file: Option<PathBuf>,
    },
    /// Print an ErlMail (or erlmail) file as erlmail YAML.
    Convert {
        /// The file to convert.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DomainCmd {
    /// Add a local domain.
    Add { name: String },
    /// List local domains.
    List,
    /// Remove a local domain and its users.
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Add a user; the password is read from standard input.
    Add { address: String },
    /// List users, optionally of one domain.
    List { domain: Option<String> },
    /// Remove a user and its mail.
    Remove { address: String },
    /// Change a user's password (read from standard input).
    Passwd { address: String },
}

#[derive(Subcommand, Debug)]
enum MailboxCmd {
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

/// Tokio worker threads for `serve`: one per core but one, and at least one. SQLite
/// runs on its own connection threads beside the workers, and the kernel's TCP work
/// needs a core too: on 2 cores, one worker relayed 10-20% more per second than two
/// (fewer cross-thread wake-ups). `TOKIO_WORKER_THREADS` (a positive number) overrides.
fn worker_threads(cores: usize, env: Option<&str>) -> usize {
    env.and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| cores.saturating_sub(1).max(1))
}

/// Whether `new` can be applied over `running` as a whole: every listening address that
/// changes can be bound now (a taken port refuses the reload, never stops the daemon).
fn reload_applies(running: &Config, new: &Config) -> anyhow::Result<()> {
    let now = running.smtp_listen_addrs();
    // A running port of 0 was chosen by the kernel and is not known here; only a port
    // given in the configuration can be compared (and only tests give 0).
    let ephemeral = now.iter().any(|a| a.port() == 0);
    for addr in new.smtp_listen_addrs() {
        if addr.port() != 0 && !ephemeral && !now.contains(&addr) {
            erlmail::net::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        }
    }
    Ok(())
}

/// The keys a reload cannot apply that differ between `running` and `new`.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("store_url", running.store_url != new.store_url);
    check("spool_dir", running.spool_dir != new.spool_dir);
    check(
        "server_smtp_start",
        running.server_smtp_start != new.server_smtp_start,
    );
    check("log_format", running.log_format != new.log_format);
    check("admin_listen", running.admin_listen != new.admin_listen);
    check("node_name", running.node_name != new.node_name);
    changed
}

/// sysexits.h: another daemon holds the spool or pid file; trying later may work.
const EX_TEMPFAIL: u8 = 75;
/// sysexits.h: the spool directory, its lock file or the pid file cannot be created.
const EX_CANTCREAT: u8 = 73;

fn main() -> ExitCode {
    // Mail, credentials and logs are nobody else's business: every file and directory
    // erlmail creates (store, spool, Maildirs, logs, pid file) is 0600/0700 whatever
    // umask it was started with. Set before anything is created or any thread exists,
    // and for the admin commands too, since `domain add` on a fresh spool creates the
    // store.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("erlmail: {e:#}");
            // sysexits.h: EX_CONFIG for a configuration that cannot be used, else 2.
            if e.downcast_ref::<erlmail::config::ConfigError>().is_some() {
                ExitCode::from(78)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

/// The configuration file in force: `--config`, `$ERLMAIL_CONFIG`, or the system file.
fn config_path(cli: &Cli) -> Option<PathBuf> {
    if let Some(p) = &cli.config {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os("ERLMAIL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let system = Path::new("/etc/erlmail/erlmail.yaml");
    system.exists().then(|| system.to_path_buf())
}

fn load_config(path: Option<&Path>, overrides: &[String]) -> anyhow::Result<Config> {
    let config = Config::load_with_overrides(path, overrides)?;
    config.validate()?;
    Ok(config)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let path = config_path(&cli);
    match &cli.command {
        Command::Config { action } => match action {
            ConfigCmd::Check { file } => {
                let file = file.clone().or(path);
                let config = load_config(file.as_deref(), &cli.set)?;
                // The keys are part of the configuration: `serve` would refuse them too.
                Signers::load(&config)?;
                for key in &config.ignored_keys {
                    eprintln!("note: {key} is accepted and ignored (erlmail does not serve it)");
                }
                print!("{}", config.to_yaml());
                Ok(ExitCode::SUCCESS)
            }
            ConfigCmd::Convert { file } => {
                let config = load_config(Some(file), &cli.set)?;
                print!("{}", config.to_yaml());
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Serve {
            daemon,
            pidfile,
            log_file,
        } => {
            let config = load_config(path.as_deref(), &cli.set)?;
            // An unusable key stops the start here, with one line naming its file.
            let signers = Signers::load(&config)?;
            let log_file = log_file
                .clone()
                .or_else(|| daemon.then(|| config.spool_dir.join("erlmail.log")));
            // One daemon per spool. The locks are taken before the log, the store, a port
            // or the pid file is touched, so a second `serve` changes nothing of the
            // running one's; and before forking, so `--daemon` reports a refusal on the
            // terminal with a non-zero status. The spool holds the lock even when the
            // store is elsewhere (store_url). Declared spool first so that the pid file
            // is dropped (removed) first, while the spool is still ours.
            let (mut spool_lock, mut pid_lock) =
                match take_locks(&config.spool_dir, pidfile.as_deref()) {
                    Ok(locks) => locks,
                    Err((code, message)) => {
                        eprintln!("erlmail: {message}");
                        return Ok(ExitCode::from(code));
                    }
                };
            if *daemon {
                // Fork before any thread exists: the runtime is built after this. The
                // child inherits the locked descriptors (flock belongs to the open file,
                // which the exiting parent merely stops sharing), so the locks are held
                // without a gap.
                nix::unistd::daemon(true, false).context("detaching")?;
            }
            // Written after the fork, so the pid named is the daemon's.
            let pid = std::process::id();
            spool_lock
                .write_pid(pid)
                .with_context(|| format!("writing {}", spool_lock.path().display()))?;
            if let Some(l) = pid_lock.as_mut() {
                l.write_pid(pid)
                    .with_context(|| format!("writing {}", l.path().display()))?;
            }
            erlmail::telemetry::init(config.log_format, log_file.as_deref())
                .context("opening the log")?;
            warn_if_spool_is_shared(&config.spool_dir);
            raise_open_file_limit(config.server_smtp_max_connection);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_threads(
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                    std::env::var("TOKIO_WORKER_THREADS").ok().as_deref(),
                ))
                .enable_all()
                .build()?;
            let code = runtime.block_on(serve(config, signers, path, cli.set.clone()));
            runtime.shutdown_timeout(Duration::from_secs(1));
            // Removes the pid file (ours: we hold its lock), then frees the spool.
            drop(pid_lock);
            drop(spool_lock);
            Ok(code)
        }
        Command::Domain { action } => admin(path.as_deref(), &cli.set, |store| async move {
            match action {
                DomainCmd::Add { name } => {
                    if store.add_domain(name).await? {
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
                    if !store.remove_domain(name).await? {
                        bail!("no such domain: {name}");
                    }
                    println!("removed domain {}", name.to_ascii_lowercase());
                }
            }
            Ok(())
        }),
        Command::User { action } => admin(path.as_deref(), &cli.set, |store| async move {
            match action {
                UserCmd::Add { address } => {
                    let address = check_address(address)?;
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
                    if !store.remove_user(address).await? {
                        bail!("no such user: {address}");
                    }
                    println!("removed user {address}");
                }
                UserCmd::Passwd { address } => {
                    let hash = password::hash_password(&read_password()?)?;
                    if !store.set_password(address, &hash).await? {
                        bail!("no such user: {address}");
                    }
                    println!("changed the password of {address}");
                }
            }
            Ok(())
        }),
        Command::Import { file } => {
            // The messages also go into the Maildirs when the configuration keeps them.
            let config = load_config(path.as_deref(), &cli.set)?;
            let maildir_root = config.maildir_root.clone();
            admin_with(&config, |store| async move {
                use std::io::IsTerminal;
                let report = erlmail::import::import(
                    &*store,
                    file,
                    maildir_root.as_deref(),
                    std::io::stderr().is_terminal(),
                )
                .await?;
                println!("{report}");
                Ok(())
            })
        }
        Command::Status => {
            let config = load_config(path.as_deref(), &cli.set)?;
            let Some(addr) = config.admin_listen else {
                bail!("admin_listen is off in this configuration; status needs it");
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(status(addr))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue { action } => admin(path.as_deref(), &cli.set, |store| async move {
            queue_command(&*store, action).await
        }),
        Command::Dkim {
            action:
                DkimCmd::Keygen {
                    domain,
                    selector,
                    ed25519,
                    out,
                },
        } => {
            dkim_keygen(
                path.as_deref(),
                &cli.set,
                domain,
                selector,
                *ed25519,
                out.clone(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Mailbox { action } => admin(path.as_deref(), &cli.set, |store| async move {
            use std::io::Write;
            match action {
                MailboxCmd::List { address, mailbox } => {
                    println!(
                        "{:>6}  {:<25}  {:>8}  {:<30}  SUBJECT",
                        "ID", "DATE", "SIZE", "FROM"
                    );
                    for m in store.list_mailbox(address, mailbox).await? {
                        println!(
                            "{:>6}  {:<25}  {:>8}  {:<30}  {}",
                            m.id,
                            m.internal_date
                                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            m.size,
                            if m.sender.is_empty() { "<>" } else { &m.sender },
                            m.subject.unwrap_or_default()
                        );
                    }
                }
                MailboxCmd::Show { address, id } => {
                    let Some(m) = store.get_message(address, *id).await? else {
                        bail!("no message {id} for {address}");
                    };
                    // Standard output is the message exactly; its flags go beside it.
                    if !m.summary.flags.is_empty() {
                        eprintln!("flags: {}", m.summary.flags.join(" "));
                    }
                    std::io::stdout().write_all(&m.body)?;
                }
            }
            Ok(())
        }),
    }
}

async fn queue_command(
    store: &dyn erlmail::store::MessageStore,
    action: &QueueCmd,
) -> anyhow::Result<()> {
    use std::io::Write;
    let now = chrono::Utc::now();
    let when =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    match action {
        QueueCmd::List { filter, json } => {
            let queue: Vec<_> = store
                .list_queue()
                .await?
                .into_iter()
                .filter(|m| filter.matches(m, now))
                .collect();
            if *json {
                println!("{}", serde_json::to_string_pretty(&queue_json(&queue))?);
                return Ok(());
            }
            if queue.is_empty() {
                println!("Mail queue is empty");
                return Ok(());
            }
            println!(
                "{:<16} {:>9} {:<20}  {:<6} {:<20}  SENDER",
                "QUEUE-ID", "SIZE", "ARRIVAL", "TRIES", "NEXT-RETRY"
            );
            for m in &queue {
                let status = if m.held {
                    "held".to_string()
                } else if m.next_retry_at <= now {
                    "due".to_string()
                } else {
                    when(m.next_retry_at)
                };
                println!(
                    "{:<16} {:>9} {:<20}  {:<6} {:<20}  {}",
                    m.id,
                    m.size,
                    when(m.received_at),
                    m.tries,
                    status,
                    if m.sender.is_empty() { "<>" } else { &m.sender }
                );
                if let Some(err) = &m.last_error {
                    println!("  ({err})");
                }
                if let (Some(owner), Some(until)) = (&m.lock_owner, m.lock_expires_at) {
                    if until > now {
                        println!("  [being delivered by {owner} until {}]", when(until));
                    }
                }
                for r in &m.rcpts {
                    let state = format!("{:?}", r.state).to_lowercase();
                    match &r.last_response {
                        Some(resp) => println!("    {} [{state}] {resp}", r.address),
                        None => println!("    {} [{state}]", r.address),
                    }
                }
            }
            let total: u64 = queue.iter().map(|m| m.size).sum();
            println!(
                "-- {} Kbytes in {} Requests.",
                total.div_ceil(1024),
                queue.len()
            );
        }
        QueueCmd::Show { id } => {
            let Some(m) = store.get_queued(id).await? else {
                bail!("no queued message {id}");
            };
            println!("queue-id: {}", m.id);
            println!("sender: <{}>", m.sender);
            println!(
                "received: {} from {} (helo {})",
                when(m.received_at),
                m.client_ip,
                m.helo
            );
            if let Some(r) = &m.ret {
                println!("ret: {r}");
            }
            if let Some(e) = &m.envid {
                println!("envid: {e}");
            }
            println!("tries: {}", m.tries);
            println!("next-retry: {}", when(m.next_retry_at));
            if let Some(e) = &m.last_error {
                println!("last-error: {e}");
            }
            println!("held: {}", m.held);
            for r in &m.rcpts {
                let mut line = format!("recipient: <{}>", r.address);
                if let Some(n) = &r.notify {
                    line.push_str(&format!(" NOTIFY={n}"));
                }
                if let Some(o) = &r.orcpt {
                    line.push_str(&format!(" ORCPT={o}"));
                }
                println!("{line}");
            }
            println!();
            std::io::stdout().write_all(&m.body)?;
        }
        QueueCmd::Flush { id, filter } => {
            if let Some(id) = id {
                if store.flush(Some(id), now).await? == 0 {
                    bail!("no queued message {id} (or it is held)");
                }
                println!("1 message(s) due now");
            } else if filter.is_empty() {
                let n = store.flush(None, now).await?;
                println!("{n} message(s) due now");
            } else {
                let ids = selected(store, filter, now).await?;
                let n = bulk(&ids, "flushing", |id| async move {
                    Ok(store.flush(Some(&id), now).await? > 0)
                })
                .await?;
                println!("{n} message(s) due now");
            }
        }
        QueueCmd::Delete { id, all, filter } => {
            if *all && filter.is_empty() {
                let n = store.delete_all_queued().await?;
                println!("postsuper: Deleted: {n} message(s)");
            } else if *all {
                let ids = selected(store, filter, now).await?;
                let n = bulk(&ids, "deleting", |id| async move {
                    Ok(store.delete_queued(&id).await?)
                })
                .await?;
                println!("postsuper: Deleted: {n} message(s)");
            } else if let Some(id) = id {
                if !store.delete_queued(id).await? {
                    bail!("no queued message {id}");
                }
                println!("postsuper: {id}: removed");
            }
        }
        QueueCmd::Hold { id } => {
            if !store.hold(id).await? {
                bail!("no queued message {id}");
            }
            println!("postsuper: {id}: placed on hold");
        }
        QueueCmd::Release { id } => {
            if !store.release_hold(id).await? {
                bail!("no queued message {id}");
            }
            println!("postsuper: {id}: released from hold");
        }
    }
    Ok(())
}

/// The ids of the queued messages a filter selects.
async fn selected(
    store: &dyn erlmail::store::MessageStore,
    filter: &QueueFilter,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Vec<String>> {
    Ok(store
        .list_queue()
        .await?
        .into_iter()
        .filter(|m| filter.matches(m, now))
        .map(|m| m.id)
        .collect())
}

/// Apply `op` to each id with a progress bar (on a terminal); how many it applied to.
async fn bulk<F, Fut>(ids: &[String], what: &str, op: F) -> anyhow::Result<u64>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    let mut n = 0;
    for id in ids {
        if op(id.clone()).await? {
            n += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(n)
}

/// The queue listing as JSON: every field of the table, recipients with their states.
fn queue_json(queue: &[erlmail::store::QueueSummary]) -> serde_json::Value {
    let t = |d: chrono::DateTime<chrono::Utc>| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    serde_json::Value::Array(
        queue
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id,
                    "size": m.size,
                    "received_at": t(m.received_at),
                    "sender": m.sender,
                    "tries": m.tries,
                    "last_try_at": m.last_try_at.map(t),
                    "next_retry_at": t(m.next_retry_at),
                    "last_error": m.last_error,
                    "held": m.held,
                    "lock_owner": m.lock_owner,
                    "lock_expires_at": m.lock_expires_at.map(t),
                    "recipients": m.rcpts.iter().map(|r| serde_json::json!({
                        "address": r.address,
                        "state": r.state.as_str(),
                        "notify": r.notify,
                        "orcpt": r.orcpt,
                        "last_response": r.last_response,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
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

/// Lock the spool (creating its directory) and then the pid file, if any. On failure, the
/// exit code and the one line to print: `EX_TEMPFAIL` naming the running daemon's pid when
/// another erlmail holds either lock, `EX_CANTCREAT` when a file cannot be created.
fn take_locks(
    spool_dir: &Path,
    pidfile: Option<&Path>,
) -> Result<(LockFile, Option<LockFile>), (u8, String)> {
    use erlmail::spool_lock::{lock_pidfile, lock_spool, LockError};
    if let Err(e) = std::fs::create_dir_all(spool_dir) {
        return Err((
            EX_CANTCREAT,
            format!("cannot create spool_dir {}: {e}", spool_dir.display()),
        ));
    }
    // Absolute in the message, so it names the spool wherever the reader runs from.
    let spool = std::fs::canonicalize(spool_dir).unwrap_or_else(|_| spool_dir.to_path_buf());
    let refused = |e: LockError, what: String| match e {
        LockError::Held { pid: Some(pid), .. } => {
            (EX_TEMPFAIL, format!("another erlmail (pid {pid}) {what}"))
        }
        LockError::Held { pid: None, path } => (
            EX_TEMPFAIL,
            format!("another erlmail {what} (it holds {})", path.display()),
        ),
        LockError::Io { path, error } => (
            EX_CANTCREAT,
            format!("cannot create or lock {}: {error}", path.display()),
        ),
    };
    let spool_lock = lock_spool(&spool)
        .map_err(|e| refused(e, format!("is running on spool {}", spool.display())))?;
    let pid_lock = match pidfile {
        Some(p) => Some(
            lock_pidfile(p)
                .map_err(|e| refused(e, format!("holds the pid file {}", p.display())))?,
        ),
        None => None,
    };
    Ok((spool_lock, pid_lock))
}

/// Each session holds a socket: with the default 1000 sessions, a soft limit of 1024 open
/// files (common under systemd) would make `accept` fail before
/// `server_smtp_max_connection` is reached. Raise the soft limit to the hard one; if
/// that is still too low, say so once.
fn raise_open_file_limit(max_connection: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        return;
    }
    // Sockets for the sessions, plus the store, the queue's outbound connections, logs.
    let want = max_connection as u64 + 256;
    if hard < want {
        warn!(
            "the open-file limit ({hard}) is below server_smtp_max_connection + 256 ({want}): \
             raise it (LimitNOFILE= in the systemd unit) or lower server_smtp_max_connection"
        );
    }
}

/// A spool made by an older erlmail, or by hand, may still be open to other users; the
/// umask only protects what is created from now on, so say so once at start-up.
fn warn_if_spool_is_shared(spool_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(spool_dir) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(
                "spool_dir {} is mode {mode:o}: other users may read the mail in it (chmod 700)",
                spool_dir.display()
            );
        }
    }
}

/// Run one administration command against the configured store.
fn admin<F, Fut>(path: Option<&Path>, overrides: &[String], f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(SharedStore) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    admin_with(&load_config(path, overrides)?, f)
}

/// [`admin`] on a configuration already loaded.
fn admin_with<F, Fut>(config: &Config, f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(SharedStore) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = store::open(&config.effective_store_url()).await?;
        f(store).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Print what a running daemon's admin endpoint knows.
async fn status(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use erlmail::net::admin::get;
    let tree = get(addr, "/tree")
        .await
        .with_context(|| format!("no erlmail admin endpoint answers at {addr}"))?;
    println!("actor tree:\n{tree}");
    println!("{}", get(addr, "/queue").await?);
    println!("counters:");
    for line in get(addr, "/metrics").await?.lines() {
        let wanted = !line.starts_with('#')
            && !line.contains("_bucket")
            && (line.starts_with("erlmail_smtp_sessions")
                || line.starts_with("erlmail_messages_accepted")
                || line.starts_with("erlmail_relay_denied")
                || line.starts_with("erlmail_deliveries")
                || line.starts_with("erlmail_dsn_sent")
                || line.starts_with("erlmail_dkim_signed")
                || line.starts_with("erlmail_actor_restarts")
                || line.starts_with("erlmail_queue_messages"));
        if wanted {
            println!("  {line}");
        }
    }
    Ok(())
}

/// `erlmail dkim keygen`: the key written, the record and the configuration printed.
fn dkim_keygen(
    path: Option<&Path>,
    overrides: &[String],
    domain: &str,
    selector: &str,
    ed25519: bool,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use erlmail::auth::sign::{generate, write_private_key, KeyKind};
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let kind = if ed25519 {
        KeyKind::Ed25519
    } else {
        KeyKind::Rsa
    };
    // Checked before the configuration is read or a directory made.
    let key = generate(kind, &domain, selector)?;
    let out = match out {
        Some(p) => p,
        None => {
            let config = load_config(path, overrides)?;
            let dir = config.spool_dir.join("dkim");
            // 0700 like every directory erlmail makes (the umask set in main).
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.join(format!("{domain}.{selector}.pem"))
        }
    };
    write_private_key(&out, &key.pem)
        .with_context(|| format!("cannot write the private key to {}", out.display()))?;
    // Absolute, so that the configuration line works whatever directory serve runs in.
    let out = std::fs::canonicalize(&out).unwrap_or(out);
    println!("Private key written to {} (mode 0600).", out.display());
    println!();
    println!("Publish this TXT record in the DNS zone of {domain}:");
    println!("{}", key.zone_line());
    println!();
    println!("Its text as one string (for DNS providers' web forms):");
    println!("{}", key.record);
    println!();
    println!("Then add to the configuration and reload (SIGHUP):");
    println!(
        "server_smtp_dkim_keys: [{{domain: {domain}, selector: {selector}, private_key: {:?}}}]",
        out.display().to_string()
    );
    Ok(())
}

async fn serve(
    config: Config,
    signers: Signers,
    path: Option<PathBuf>,
    overrides: Vec<String>,
) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let shutdown_limit = config.server_smtp_shutdown_timeout + Duration::from_secs(8);
    let source = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in defaults".into());
    info!(config = %source, store = %erlmail::actors::store::redact_url(&config.effective_store_url()), node = %config.node_name, "erlmail {} starting", env!("CARGO_PKG_VERSION"));
    for key in &config.ignored_keys {
        warn!(key = %key, "configuration key accepted and ignored: erlmail does not serve it");
    }
    if config.store_url.is_none() {
        if let Err(e) = std::fs::create_dir_all(&config.spool_dir) {
            error!(error = %e, "cannot create spool_dir {}", config.spool_dir.display());
            return ExitCode::from(1);
        }
    }
    let metrics = match erlmail::telemetry::install_metrics() {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "cannot install the metrics recorder");
            return ExitCode::from(1);
        }
    };
    let admin_listen = config.admin_listen;
    let mut running = Arc::new(config);
    if !signers.is_empty() {
        info!(keys = ?signers.key_names(), "DKIM: relayed mail is signed with {} key(s)", signers.key_names().len());
    }
    sign::cache_for(&running, signers);
    let (root, handle, mut exit) = match root::start(running.clone()).await {
        Ok(r) => r,
        Err(e) => {
            let cause = root::startup_cause(&e);
            error!(error = %cause, "start-up failed");
            eprintln!("erlmail: {cause}");
            // sysexits.h EX_UNAVAILABLE: a port, the store or a file was not available.
            return ExitCode::from(69);
        }
    };
    let (mut term, mut int, mut hup, mut usr1, mut usr2) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e)) => (a, b, c, d, e),
        _ => {
            error!("cannot install signal handlers");
            return ExitCode::from(1);
        }
    };
    // The admin endpoint is a convenience: a taken port is logged, not fatal.
    let _admin = match admin_listen {
        Some(addr) => {
            match erlmail::net::admin::serve(addr, erlmail::actors::admin::handler(metrics)).await {
                Ok((local, task)) => {
                    info!(addr = %local, "admin endpoint listening on {local}");
                    Some(task)
                }
                Err(e) => {
                    error!(error = %e, "admin endpoint not started on {addr}");
                    None
                }
            }
        }
        None => None,
    };
    let mut handle = std::pin::pin!(handle);
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                // A key that cannot be read, or a listening address that cannot be
                // bound, refuses the whole reload: the running configuration stays.
                let loaded = load_config(path.as_deref(), &overrides)
                    .and_then(|c| reload_applies(&running, &c).map(|()| c))
                    .and_then(|c| Ok((Signers::load(&c)?, c)));
                match loaded {
                    Ok((signers, c)) => {
                        info!("SIGHUP: configuration read from {source}; applying it");
                        for key in restart_only_changes(&running, &c) {
                            warn!(key, "SIGHUP: {key} changed; it takes effect at the next start");
                        }
                        running = Arc::new(c);
                        sign::cache_for(&running, signers);
                        let _ = root.send_message(RootMsg::Reload(running.clone()));
                    }
                    Err(e) => error!(error = %format!("{e:#}"), "SIGHUP: configuration not reloaded; keeping the running one"),
                }
            }
            _ = usr1.recv() => { let _ = root.send_message(RootMsg::LogTree); }
            _ = usr2.recv() => inject_fault(&root),
            _ = &mut handle => {
                return match exit.borrow_and_update().clone() {
                    RootExit::GaveUp(why) => { error!("erlmail stopped: {why}"); ExitCode::from(1) }
                    _ => { error!("erlmail stopped unexpectedly"); ExitCode::from(1) }
                };
            }
        }
    }
    // Sessions drain (4 s), deliveries on the wire finish (the shutdown timeout), then
    // the queue and the store stop.
    let stopped = root.call(RootMsg::Shutdown, Some(shutdown_limit)).await;
    if !matches!(stopped, Ok(ractor::rpc::CallResult::Success(()))) {
        warn!("shutdown did not finish in time");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut handle).await;
    info!("erlmail stopped");
    ExitCode::SUCCESS
}

/// Test hook (debug builds only): SIGUSR2 makes the actor named in the file
/// `$ERLMAIL_TEST_FAULT_FILE` panic, so tests can watch supervision work.
#[cfg(debug_assertions)]
fn inject_fault(root: &ractor::ActorRef<RootMsg>) {
    let Some(file) = std::env::var_os("ERLMAIL_TEST_FAULT_FILE") else {
        return;
    };
    match std::fs::read_to_string(&file) {
        Ok(target) => {
            let _ = root.send_message(RootMsg::InjectPanic(target.trim().to_string()));
        }
        Err(e) => warn!(error = %e, "test hook: cannot read the fault file"),
    }
}

#[cfg(not(debug_assertions))]
fn inject_fault(_root: &ractor::ActorRef<RootMsg>) {}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn one_worker_per_core_but_one() {
        assert_eq!(worker_threads(1, None), 1);
        assert_eq!(worker_threads(2, None), 1);
        assert_eq!(worker_threads(8, None), 7);
        assert_eq!(worker_threads(2, Some("4")), 4);
        assert_eq!(worker_threads(2, Some("0")), 1, "zero is ignored");
        assert_eq!(worker_threads(2, Some("many")), 1, "junk is ignored");
    }
}
