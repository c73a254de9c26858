//! Logging set-up: human-readable lines by default, JSON lines with `log_format: json`.
//!
//! Every actor lifecycle line carries a `path` field (`erlmail_sup/smtpd_sup/smtpd_listener`);
//! the level comes from `RUST_LOG` (default `info`). Logs go to stderr, or to a file when the
//! daemon detaches. Nothing here may log a password: callers never pass one.

use std::path::Path;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber. Call once, before the runtime starts work.
pub fn init(format: LogFormat, log_file: Option<&Path>) -> std::io::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let writer: tracing_subscriber::fmt::writer::BoxMakeWriter = match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).with_writer(writer).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
    Ok(())
}
