//! The `erlmail` command: the daemon (`serve`) and the administration commands that work
//! on the store the configuration names (`config`, `domain`, `user`, `mailbox`, `queue`).
//!
//! This file alone builds the tokio runtime; it forks before doing so when asked to
//! detach. It loads the configuration, starts the actor tree and maps signals onto it:
//! SIGTERM/SIGINT stop cleanly (exit 0), SIGHUP reloads the configuration (a bad file is
//! reported and the running one kept), SIGUSR1 logs the live actor tree.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use erlmail::actors::root::{self, RootExit, RootMsg};
use erlmail::config::Config;
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
    /// The outgoing queue (like mailq, postqueue and postsuper).
    Queue {
        #[command(subcommand)]
        action: QueueCmd,
    },
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// List queued messages and why each waits (like `mailq`).
    List,
    /// Print one queued message: envelope, state and body.
    Show { id: String },
    /// Make one or all messages due now (like `postqueue -f` / `-i ID`).
    Flush { id: Option<String> },
    /// Delete one message, or all with --all (like `postsuper -d`).
    Delete {
        /// The queue id.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Delete every queued message.
        #[arg(long, conflicts_with = "id")]
        all: bool,
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
    /// List the messages in a user's INBOX.
    List { address: String },
    /// Print one message exactly as stored.
    Show { address: String, id: i64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("erlmail: {e:#}");
            ExitCode::from(2)
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
            let log_file = log_file
                .clone()
                .or_else(|| daemon.then(|| config.spool_dir.join("erlmail.log")));
            if *daemon {
                std::fs::create_dir_all(&config.spool_dir)
                    .with_context(|| format!("creating {}", config.spool_dir.display()))?;
                // Fork before any thread exists: the runtime is built after this.
                nix::unistd::daemon(true, false).context("detaching")?;
            }
            erlmail::telemetry::init(config.log_format, log_file.as_deref())
                .context("opening the log")?;
            if let Some(p) = pidfile {
                std::fs::write(p, format!("{}\n", std::process::id()))
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let code = runtime.block_on(serve(config, path, cli.set.clone()));
            runtime.shutdown_timeout(Duration::from_secs(1));
            if let Some(p) = pidfile {
                let _ = std::fs::remove_file(p);
            }
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
        Command::Queue { action } => admin(path.as_deref(), &cli.set, |store| async move {
            queue_command(&*store, action).await
        }),
        Command::Mailbox { action } => admin(path.as_deref(), &cli.set, |store| async move {
            use std::io::Write;
            match action {
                MailboxCmd::List { address } => {
                    println!(
                        "{:>6}  {:<25}  {:>8}  {:<30}  SUBJECT",
                        "ID", "DATE", "SIZE", "FROM"
                    );
                    for m in store.list_mailbox(address, "INBOX").await? {
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
        QueueCmd::List => {
            let queue = store.list_queue().await?;
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
        QueueCmd::Flush { id } => {
            let n = store.flush(id.as_deref(), now).await?;
            if let Some(id) = id {
                if n == 0 {
                    bail!("no queued message {id} (or it is held)");
                }
            }
            println!("{n} message(s) due now");
        }
        QueueCmd::Delete { id, all } => {
            if *all {
                let n = store.delete_all_queued().await?;
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

/// Run one administration command against the configured store.
fn admin<F, Fut>(path: Option<&Path>, overrides: &[String], f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(SharedStore) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = load_config(path, overrides)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = store::open(&config.effective_store_url()).await?;
        f(store).await
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config, path: Option<PathBuf>, overrides: Vec<String>) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
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
    let (root, handle, mut exit) = match root::start(Arc::new(config)).await {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "start-up failed");
            return ExitCode::from(1);
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
    let mut handle = std::pin::pin!(handle);
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                match load_config(path.as_deref(), &overrides) {
                    Ok(c) => {
                        info!("SIGHUP: configuration reloaded from {source}");
                        let _ = root.send_message(RootMsg::Reload(Arc::new(c)));
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
    let stopped = root
        .call(RootMsg::Shutdown, Some(Duration::from_secs(8)))
        .await;
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
