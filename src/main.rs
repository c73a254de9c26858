//! The `erlmail` command: the daemon (`serve`) and the administration commands that work
//! on the store the configuration names. This file only sets the process up, parses the
//! command line and hands over to `cli/`; it maps a failure onto the exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Mail, credentials and logs are nobody else's business: every file and directory
    // erlmail creates (store, spool, Maildirs, logs, pid file) is 0600/0700 whatever
    // umask it was started with. Set before anything is created or any thread exists,
    // and for the admin commands too, since `domain add` on a fresh spool creates the
    // store.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    match cli::run(cli::Cli::parse()) {
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
