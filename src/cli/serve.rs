//! `erlmail serve`: the daemon. Takes the spool and pid-file locks, forks when asked to
//! detach, builds the tokio runtime (the only place that does), starts the actor tree and
//! maps signals onto it: SIGTERM/SIGINT stop cleanly (exit 0), SIGHUP reloads the
//! configuration (a bad file is reported and the running one kept), SIGUSR1 logs the live
//! actor tree. It does none of the actors' work: it starts the tree and sends its root
//! messages.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{error, info, warn};

use erlmail::actors::root::{self, RootExit, RootMsg};
use erlmail::auth::sign::{self, Signers};
use erlmail::config::Config;
use erlmail::spool_lock::LockFile;

use super::ConfigSource;

#[derive(clap::Args, Debug)]
pub(super) struct ServeArgs {
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
}

/// sysexits.h: another daemon holds the spool or pid file; trying later may work.
const EX_TEMPFAIL: u8 = 75;
/// sysexits.h: the spool directory, its lock file or the pid file cannot be created.
const EX_CANTCREAT: u8 = 73;

pub(super) fn run(source: ConfigSource, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = source.load()?;
    // An unusable key stops the start here, with one line naming its file.
    let signers = Signers::load(&config)?;
    let log_file = args
        .log_file
        .or_else(|| args.daemon.then(|| config.spool_dir.join("erlmail.log")));
    // One daemon per spool. The locks are taken before the log, the store, a port or the
    // pid file is touched, so a second `serve` changes nothing of the running one's; and
    // before forking, so `--daemon` reports a refusal on the terminal with a non-zero
    // status. The spool holds the lock even when the store is elsewhere (store_url).
    // Declared spool first so that the pid file is dropped (removed) first, while the
    // spool is still ours.
    let (mut spool_lock, mut pid_lock) =
        match take_locks(&config.spool_dir, args.pidfile.as_deref()) {
            Ok(locks) => locks,
            Err((code, message)) => {
                eprintln!("erlmail: {message}");
                return Ok(ExitCode::from(code));
            }
        };
    if args.daemon {
        // Fork before any thread exists: the runtime is built after this. The child
        // inherits the locked descriptors (flock belongs to the open file, which the
        // exiting parent merely stops sharing), so the locks are held without a gap.
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
    erlmail::telemetry::init(config.log_format, log_file.as_deref()).context("opening the log")?;
    warn_if_spool_is_shared(&config.spool_dir);
    raise_open_file_limit(config.server_smtp_max_connection);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            std::env::var("TOKIO_WORKER_THREADS").ok().as_deref(),
        ))
        .enable_all()
        .build()?;
    let code = runtime.block_on(serve(config, signers, source));
    runtime.shutdown_timeout(Duration::from_secs(1));
    // Removes the pid file (ours: we hold its lock), then frees the spool.
    drop(pid_lock);
    drop(spool_lock);
    Ok(code)
}

/// Tokio worker threads for `serve`: one per core but one, and at least one (SQLite's
/// connection threads and the kernel's TCP work need a core too).
/// `TOKIO_WORKER_THREADS` (a positive number) overrides.
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

/// Lock the spool (creating its directory) and then the pid file, if any. On failure, the
/// exit code and the one line to print: `EX_TEMPFAIL` naming the running daemon's pid when
/// another erlmail holds either lock, `EX_CANTCREAT` when a file cannot be created.
fn take_locks(
    spool_dir: &Path, pidfile: Option<&Path>,
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

/// The daemon on its runtime: start the tree, then follow the signals until a stop.
async fn serve(config: Config, signers: Signers, source: ConfigSource) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let shutdown_limit = config.server_smtp_shutdown_timeout + Duration::from_secs(8);
    let from = source
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in defaults".into());
    info!(config = %from, store = %erlmail::actors::store::redact_url(&config.effective_store_url()), node = %config.node_name, "erlmail {} starting", env!("CARGO_PKG_VERSION"));
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
                let loaded = source
                    .load()
                    .and_then(|c| reload_applies(&running, &c).map(|()| c))
                    .and_then(|c| Ok((Signers::load(&c)?, c)));
                match loaded {
                    Ok((signers, c)) => {
                        info!("SIGHUP: configuration read from {from}; applying it");
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
