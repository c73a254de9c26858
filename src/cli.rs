//! The command line: the clap types, where the configuration comes from, and the hand-over
//! to one file per command family (`serve`, `config`, `accounts`, `queue`, `import`,
//! `status`, `dkim`). What every command prints goes through [`out`]; failures come back
//! as errors for `main` to map onto an exit code.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use erlmail::config::Config;
use erlmail::store::{self, SharedStore};

/// Everything the commands print goes through [`out`]: a reader that went away
/// (`erlmail queue list | head -1`) ends the command quietly, as `ls | head` does,
/// instead of the panic std's `println!` gives on a closed pipe. Defined before the
/// command modules so that they print through it too.
macro_rules! println {
    () => { $crate::cli::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// See [`println`].
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::out(format_args!($($arg)*)) };
}

mod accounts;
mod config;
mod dkim;
mod import;
mod queue;
mod serve;
mod status;

/// Write to standard output; exit 0 at once when the reader has gone (EPIPE), and with
/// EX_IOERR (74) and one line on standard error for any other write failure.
fn out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    written(stdout.write_fmt(args).and_then(|()| stdout.flush()));
}

/// [`out`] for bytes that are not text of ours (a message exactly as stored).
fn out_bytes(bytes: &[u8]) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    written(stdout.write_all(bytes).and_then(|()| stdout.flush()));
}

fn written(result: std::io::Result<()>) {
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("erlmail: writing to standard output: {e}");
        std::process::exit(74);
    }
}

/// erlmail: an SMTP server and relay queue that runs ErlMail's configuration files.
#[derive(Parser, Debug)]
#[command(name = "erlmail", version, about)]
pub struct Cli {
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
    Serve(serve::ServeArgs),
    /// Check or convert configuration files.
    Config {
        #[command(subcommand)]
        action: config::ConfigCmd,
    },
    /// Local domains.
    Domain {
        #[command(subcommand)]
        action: accounts::DomainCmd,
    },
    /// Local users (passwords are read from standard input and stored as argon2 hashes).
    User {
        #[command(subcommand)]
        action: accounts::UserCmd,
    },
    /// Read local mailboxes.
    Mailbox {
        #[command(subcommand)]
        action: accounts::MailboxCmd,
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
        action: queue::QueueCmd,
    },
    /// DKIM signing keys (`server_smtp_dkim_keys`).
    Dkim {
        #[command(subcommand)]
        action: dkim::DkimCmd,
    },
}

/// Where the configuration comes from: the file in force and the `-o` overrides. `serve`
/// keeps it to read the configuration again on SIGHUP.
#[derive(Debug, Clone)]
struct ConfigSource {
    /// `--config`, `$ERLMAIL_CONFIG`, or the system file when it exists.
    path: Option<PathBuf>,
    overrides: Vec<String>,
}

impl ConfigSource {
    fn new(config: Option<PathBuf>, overrides: Vec<String>) -> Self {
        let path = config
            .or_else(|| std::env::var_os("ERLMAIL_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let system = Path::new("/etc/erlmail/erlmail.yaml");
                system.exists().then(|| system.to_path_buf())
            });
        ConfigSource { path, overrides }
    }

    /// The configuration in force, validated.
    fn load(&self) -> anyhow::Result<Config> {
        self.load_file(self.path.as_deref())
    }

    /// Another file (or the built-in defaults) under the same overrides, validated.
    fn load_file(&self, file: Option<&Path>) -> anyhow::Result<Config> {
        let config = Config::load_with_overrides(file, &self.overrides)?;
        config.validate()?;
        Ok(config)
    }
}

/// Run one command; `main` maps an error onto the exit code.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let source = ConfigSource::new(cli.config, cli.set);
    match cli.command {
        Command::Serve(args) => return serve::run(source, args),
        Command::Config { action } => config::run(&source, action)?,
        Command::Domain { action } => accounts::domain(&source.load()?, action)?,
        Command::User { action } => accounts::user(&source.load()?, action)?,
        Command::Mailbox { action } => accounts::mailbox(&source.load()?, action)?,
        Command::Import { file } => import::run(&source.load()?, &file)?,
        Command::Status => status::run(&source.load()?)?,
        Command::Queue { action } => queue::run(&source.load()?, action)?,
        Command::Dkim { action } => dkim::run(&source, action)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Run `f` to completion on a runtime of the calling thread (the administration commands
/// need no more than one).
fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Run one administration command against the store `config` names.
fn with_store<F, Fut>(config: &Config, f: F) -> anyhow::Result<()>
where
    F: FnOnce(SharedStore) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    block_on(async {
        let store = store::open(&config.effective_store_url()).await?;
        f(store).await
    })
}

/// The envelope sender as the listings print it: `<>` for the null sender.
fn sender_or_null(sender: &str) -> &str {
    if sender.is_empty() {
        "<>"
    } else {
        sender
    }
}

/// A time as the listings print it: RFC 3339 in UTC, to the second.
fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
