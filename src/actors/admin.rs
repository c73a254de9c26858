//! What the admin endpoint serves: `/metrics` (Prometheus text), `/tree` (the live actor
//! tree, text or `?format=json`), `/queue` (a summary by destination domain and by last
//! error, text or JSON). The HTTP plumbing is in `net::admin`; this module only gathers
//! the answers from the running actors, asking the store actor for queue data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::RpcReplyPort;

use super::msg::QueueOp;
use super::store_client::StoreClient;
use crate::net::admin::{Handler, Response};
use crate::store::{QueueCounts, QueueSummary, RcptState, StoreResult};
use crate::telemetry::names;

const STORE: StoreClient = StoreClient::new(Duration::from_secs(10));

async fn ask<T: Send + 'static>(
    build: impl FnOnce(RpcReplyPort<StoreResult<T>>) -> QueueOp,
) -> Result<T, String> {
    STORE.queue(build).await.map_err(|e| e.to_string())
}

/// The queue summary served at `/queue`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct QueueReport {
    /// Messages by state.
    pub counts: QueueCounts,
    /// Pending recipients by destination domain.
    pub by_domain: BTreeMap<String, u64>,
    /// Messages by last error (`(none)` for never-failed ones).
    pub by_error: BTreeMap<String, u64>,
}

impl QueueReport {
    /// Summarise a queue listing at `now`.
    pub fn from_listing(list: &[QueueSummary], now: chrono::DateTime<chrono::Utc>) -> Self {
        let mut r = QueueReport::default();
        for m in list {
            r.counts
                .add(m.held, m.lock_expires_at.is_some_and(|t| t > now), m.tries);
            for rc in m.rcpts.iter().filter(|r| r.state == RcptState::Pending) {
                let domain = rc
                    .address
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_ascii_lowercase())
                    .unwrap_or_default();
                *r.by_domain.entry(domain).or_default() += 1;
            }
            let err = m
                .last_error
                .as_deref()
                .map_or_else(|| "(none)".to_string(), error_class);
            *r.by_error.entry(err).or_default() += 1;
        }
        r
    }

    /// The report as text, one count per line.
    pub fn render(&self) -> String {
        let c = &self.counts;
        let mut out = format!(
            "queued {} (incoming {}, active {}, deferred {}, held {})\n",
            c.total(),
            c.incoming,
            c.active,
            c.deferred,
            c.held
        );
        out.push_str("\nby destination domain (pending recipients):\n");
        for (d, n) in &self.by_domain {
            out.push_str(&format!("{n:>8}  {d}\n"));
        }
        out.push_str("\nby last error (messages):\n");
        for (e, n) in &self.by_error {
            out.push_str(&format!("{n:>8}  {e}\n"));
        }
        out
    }
}

/// The class of a queued message's last error, to group by: the reply code and enhanced
/// status (`451 4.3.0`) of a refusal, or the kind of a local failure (`connection
/// failed`, `timeout`, `DNS look-up failed`...), without the recipient or the host's
/// own words, so a thousand messages deferred alike make one row.
pub fn error_class(last_error: &str) -> String {
    // "<rcpt>: <status>"; the recipient has no ": " in it.
    let status = last_error.split_once(": ").map_or(last_error, |(_, s)| s);
    let mut words = status.split_whitespace();
    match words.next() {
        Some(code) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => {
            match words.next() {
                Some(enh) if enh.split('.').count() == 3 && enh.starts_with(&code[..1]) => {
                    format!("{code} {enh}")
                }
                _ => code.to_string(),
            }
        }
        _ => status
            .split_once(':')
            .map_or(status, |(kind, _)| kind)
            .trim()
            .to_string(),
    }
}

/// The request handler for `net::admin::serve`.
pub fn handler(metrics: metrics_exporter_prometheus::PrometheusHandle) -> Handler {
    let metrics = Arc::new(metrics);
    Arc::new(move |target: String| {
        let metrics = metrics.clone();
        Box::pin(async move {
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let json = query.split('&').any(|kv| kv == "format=json");
            match path {
                "/metrics" => {
                    if let Ok(c) = ask(|reply| QueueOp::Counts { reply }).await {
                        for (state, n) in [
                            ("incoming", c.incoming),
                            ("active", c.active),
                            ("deferred", c.deferred),
                            ("held", c.held),
                        ] {
                            metrics::gauge!(names::QUEUE, "state" => state).set(n as f64);
                        }
                    }
                    Response::ok("text/plain; version=0.0.4; charset=utf-8", metrics.render())
                }
                "/tree" => match super::live_tree() {
                    Some(t) if json => Response::ok(
                        "application/json",
                        serde_json::to_string_pretty(&t).unwrap_or_default(),
                    ),
                    Some(t) => Response::ok("text/plain; charset=utf-8", t.render()),
                    None => Response::error(503, "the actor tree is not running"),
                },
                "/queue" => match ask(|reply| QueueOp::List { reply }).await {
                    Ok(list) => {
                        let report = QueueReport::from_listing(&list, chrono::Utc::now());
                        if json {
                            Response::ok(
                                "application/json",
                                serde_json::to_string_pretty(&report).unwrap_or_default(),
                            )
                        } else {
                            Response::ok("text/plain; charset=utf-8", report.render())
                        }
                    }
                    Err(e) => Response::error(503, &e),
                },
                "/" => Response::ok(
                    "text/plain; charset=utf-8",
                    "erlmail admin: /metrics /tree /tree?format=json /queue /queue?format=json\n",
                ),
                _ => Response::error(404, "not found"),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::error_class;

    #[test]
    fn last_errors_group_by_reply_code_and_status_or_kind() {
        for (error, class) in [
            ("a@x.test: 451 4.3.0 Error: try again later", "451 4.3.0"),
            ("b@y.test: 451 4.3.0 busy, queue id 1234", "451 4.3.0"),
            ("c@z.test: 421 closing", "421"),
            ("d@x.test: 550 4.1.1 odd", "550"),
            (
                "e@x.test: connection failed: mx.x.test: Connection refused (os error 111)",
                "connection failed",
            ),
            ("f@x.test: timeout: mx.x.test: no answer to EHLO", "timeout"),
            (
                "g@x.test: DNS look-up failed: servfail",
                "DNS look-up failed",
            ),
        ] {
            assert_eq!(error_class(error), class, "{error}");
        }
    }
}
