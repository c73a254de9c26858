//! Logging set-up: human-readable lines by default, JSON lines with `log_format: json`.
//!
//! Every actor lifecycle line carries a `path` field (`erlmail_sup/smtpd_sup/smtpd_listener`);
//! the level comes from `RUST_LOG` (default [`DEFAULT_FILTER`]). Logs go to stderr, or to
//! a file when the daemon detaches. Nothing here may log a password: callers never pass one.

use std::path::Path;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The log filter when `RUST_LOG` is unset: `info`, but not ractor's own per-actor
/// spans (`Actor{id,name}`), which every actor's every message would enter and leave;
/// erlmail's lines carry the actor's place in the tree as `path=` instead.
pub const DEFAULT_FILTER: &str = "info,ractor=warn";

/// Install the global subscriber. Call once, before the runtime starts work.
pub fn init(format: LogFormat, log_file: Option<&Path>) -> std::io::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
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

/// Metric names, in one place so the scrape format stays stable.
pub mod names {
    /// Gauge: SMTP sessions open now.
    pub const SESSIONS_OPEN: &str = "erlmail_smtp_sessions_open";
    /// Counter: SMTP sessions since start.
    pub const SESSIONS_TOTAL: &str = "erlmail_smtp_sessions_total";
    /// Counter: messages accepted with 250, by `destination` (local, relay, both).
    pub const ACCEPTED: &str = "erlmail_messages_accepted_total";
    /// Counter: replies refusing something, by `reason`.
    pub const REJECTED: &str = "erlmail_smtp_rejections_total";
    /// Counter: connections (and AUTH attempts) refused before a session could use them,
    /// by `reason`: max_connection, client_limit, client_rate, shutdown, auth_failures.
    pub const CONNECTIONS_REFUSED: &str = "erlmail_smtp_connections_refused_total";
    /// Gauge: 1 while the SMTP server is under stress (sessions above 80% of
    /// `server_smtp_max_connection`), else 0.
    pub const STRESS: &str = "erlmail_smtp_stress";
    /// Counter: relay attempts denied (554 5.7.1).
    pub const RELAY_DENIED: &str = "erlmail_relay_denied_total";
    /// Gauge: queued messages by `state` (incoming, active, deferred, held), at scrape.
    pub const QUEUE: &str = "erlmail_queue_messages";
    /// Counter: per-recipient delivery results by `result` (sent, deferred, bounced).
    pub const DELIVERIES: &str = "erlmail_deliveries_total";
    /// Counter: delivery attempts that were retries (the message had been tried before).
    pub const RETRIES: &str = "erlmail_delivery_retries_total";
    /// Counter: notifications queued, by `kind` (failed, delayed, delivered).
    pub const DSNS: &str = "erlmail_dsn_sent_total";
    /// Counter: DKIM signatures put on relayed mail at accept, by `algorithm`
    /// (rsa-sha256, ed25519-sha256): one per message and signing key.
    pub const DKIM_SIGNED: &str = "erlmail_dkim_signed_total";
    /// Counter: actor restarts by `path`.
    pub const RESTARTS: &str = "erlmail_actor_restarts_total";
    /// Histogram: seconds per group commit.
    pub const COMMIT_SECONDS: &str = "erlmail_store_commit_seconds";
    /// Histogram: messages per group commit.
    pub const COMMIT_BATCH: &str = "erlmail_store_commit_messages";
    /// Histogram: seconds per delivery attempt.
    pub const ATTEMPT_SECONDS: &str = "erlmail_delivery_attempt_seconds";
    /// Histogram: seconds from acceptance to delivery, per delivered recipient.
    pub const DELIVERY_LATENCY: &str = "erlmail_delivery_latency_seconds";
    /// Checks of mail for local users, by method (spf, dkim, dmarc) and result.
    pub const AUTH_RESULTS: &str = "erlmail_auth_results_total";
    /// DMARC failures acted on, by action (reject, junk).
    pub const DMARC_ACTIONS: &str = "erlmail_dmarc_actions_total";
}

/// Install the Prometheus recorder (once per process) and describe every metric.
pub fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0, 3600.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::COMMIT_BATCH.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            )
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(names::SESSIONS_OPEN, "SMTP sessions open now");
    describe_counter!(names::SESSIONS_TOTAL, "SMTP sessions since start");
    describe_counter!(
        names::ACCEPTED,
        "Messages accepted with 250, by destination"
    );
    describe_counter!(
        names::REJECTED,
        "SMTP replies refusing a command or message, by reason"
    );
    describe_counter!(names::RELAY_DENIED, "Relay attempts denied with 554 5.7.1");
    describe_counter!(
        names::CONNECTIONS_REFUSED,
        "Connections and AUTH attempts refused by limits, by reason"
    );
    describe_gauge!(
        names::STRESS,
        "1 while sessions are above 80% of server_smtp_max_connection"
    );
    describe_gauge!(names::QUEUE, "Queued messages by state");
    describe_counter!(names::DELIVERIES, "Per-recipient delivery results");
    describe_counter!(names::RETRIES, "Delivery attempts of messages tried before");
    describe_counter!(names::DSNS, "Delivery status notifications queued, by kind");
    describe_counter!(
        names::DKIM_SIGNED,
        "DKIM signatures put on relayed mail, by algorithm"
    );
    describe_counter!(names::RESTARTS, "Actor restarts by path in the tree");
    describe_counter!(
        names::AUTH_RESULTS,
        "SPF, DKIM and DMARC results of mail for local users, by method and result"
    );
    describe_counter!(
        names::DMARC_ACTIONS,
        "DMARC failures acted on under server_smtp_dmarc_policy: enforce, by action"
    );
    describe_histogram!(
        names::COMMIT_SECONDS,
        Unit::Seconds,
        "Group commit duration"
    );
    describe_histogram!(
        names::COMMIT_BATCH,
        Unit::Count,
        "Messages per group commit"
    );
    describe_histogram!(
        names::ATTEMPT_SECONDS,
        Unit::Seconds,
        "Delivery attempt duration"
    );
    describe_histogram!(
        names::DELIVERY_LATENCY,
        Unit::Seconds,
        "Acceptance to delivery"
    );
    // Counters exist from the start, at zero, so that a scrape (and `erlmail status`)
    // shows them before the first event and rates are defined.
    metrics::gauge!(names::SESSIONS_OPEN).set(0.0);
    metrics::counter!(names::SESSIONS_TOTAL).absolute(0);
    metrics::counter!(names::RELAY_DENIED).absolute(0);
    metrics::gauge!(names::STRESS).set(0.0);
    for reason in [
        "max_connection",
        "client_limit",
        "client_rate",
        "shutdown",
        "auth_failures",
    ] {
        metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => reason).absolute(0);
    }
    metrics::counter!(names::RETRIES).absolute(0);
    for d in ["local", "relay", "both"] {
        metrics::counter!(names::ACCEPTED, "destination" => d).absolute(0);
    }
    for r in ["sent", "deferred", "bounced"] {
        metrics::counter!(names::DELIVERIES, "result" => r).absolute(0);
    }
    for a in ["rsa-sha256", "ed25519-sha256"] {
        metrics::counter!(names::DKIM_SIGNED, "algorithm" => a).absolute(0);
    }
    Ok(handle)
}

/// The reason label of an SMTP reply that refuses something, from its code and enhanced
/// status; `None` for positive and intermediate replies.
pub fn rejection_reason(reply: &[u8]) -> Option<&'static str> {
    let text = std::str::from_utf8(reply.get(..reply.len().min(16))?).ok()?;
    let code = text.get(..3)?;
    if !(code.starts_with('4') || code.starts_with('5')) {
        return None;
    }
    let enhanced = text
        .get(4..)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or("");
    Some(match (code, enhanced) {
        ("554", "5.7.1") => "relay_denied",
        ("550", "5.7.1") => "dmarc_reject",
        ("550", "5.1.1") => "user_unknown",
        ("552", _) => "message_too_big",
        ("452", "4.5.3") => "too_many_recipients",
        ("550", "5.5.2") => "bare_line_feed",
        ("554", "5.4.0") => "too_many_hops",
        ("500", _) | ("501", _) | ("502", _) | ("503", _) | ("504", _) | ("555", _) => {
            "protocol_error"
        }
        ("451", _) | ("452", _) => "store_failure",
        ("421", _) => "session_closed",
        ("530", _) | ("535", _) | ("538", _) => "auth",
        (c, _) if c.starts_with('4') => "other_temporary",
        _ => "other_permanent",
    })
}

#[cfg(test)]
mod tests {
    use super::rejection_reason;

    #[test]
    fn reasons_from_replies() {
        assert_eq!(
            rejection_reason(b"554 5.7.1 <a@b>: Relay access denied\r\n"),
            Some("relay_denied")
        );
        assert_eq!(
            rejection_reason(b"550 5.1.1 <a@b>: User unknown\r\n"),
            Some("user_unknown")
        );
        assert_eq!(rejection_reason(b"250 2.0.0 Ok\r\n"), None);
        assert_eq!(rejection_reason(b"354 End data\r\n"), None);
        assert_eq!(
            rejection_reason(b"500 5.5.2 Error\r\n"),
            Some("protocol_error")
        );
        assert_eq!(
            rejection_reason(b"451 4.3.0 Error\r\n"),
            Some("store_failure")
        );
        assert_eq!(rejection_reason(b""), None);
    }
}
