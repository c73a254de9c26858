//! Attempt planning: what one delivery attempt's per-recipient results mean for the
//! message (each recipient's new state, the error kept, when it is due again) and which
//! notifications it owes. The sender applies the plan; it does not decide it.
//!
//! Pure: the message's history, the results and `now` are arguments.

use chrono::{DateTime, Utc};

use super::{next_retry, should_notify, DsnKind, DsnRecipient, RcptStatus};
use crate::config::Config;

/// What the policy needs to know of the message tried.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    /// Reverse-path (`""` for `<>`: never notified).
    pub sender: &'a str,
    /// Tries recorded before this one.
    pub tries: u32,
    /// When the message was accepted.
    pub received_at: DateTime<Utc>,
    /// When the previous try was recorded, if any.
    pub last_try_at: Option<DateTime<Utc>>,
}

/// One recipient's result, with what the sender asked for it at MAIL/RCPT time.
#[derive(Debug, Clone, Copy)]
pub struct Tried<'a> {
    /// The recipient address.
    pub rcpt: &'a str,
    /// Its NOTIFY parameter, if any.
    pub notify: Option<&'a str>,
    /// Its ORCPT parameter, if any.
    pub orcpt: Option<&'a str>,
    /// Delivered, temporary or permanent.
    pub status: &'a RcptStatus,
    /// The host whose answer decided the status, if any.
    pub remote_mta: Option<&'a str>,
    /// That answer came over TLS.
    pub tls: bool,
    /// That host offered DSN, so it was given the NOTIFY: reports of success are its.
    pub dsn: bool,
}

/// A recipient's state after the attempt (the store's `RcptState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Still to deliver: tried again at the next retry.
    Pending,
    /// Accepted by the next hop.
    Delivered,
    /// Permanently failed, or its retries are used up.
    Failed,
}

/// What one attempt leads to: the record's contents and the notifications owed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptPlan {
    /// Per recipient: address, new state, the answer as listed (`(TLS)` when it was).
    pub rcpt_results: Vec<(String, Verdict, Option<String>)>,
    /// The first temporary failure, kept as the message's `last_error`.
    pub error: Option<String>,
    /// When the message is due again; `None` when no recipient stays pending.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Recipients to report as failed.
    pub failed: Vec<DsnRecipient>,
    /// Recipients to warn about (still being retried past `server_smtp_delay_warning`).
    pub delayed: Vec<DsnRecipient>,
    /// Recipients to report as relayed (NOTIFY=SUCCESS, and the next hop does not
    /// offer DSN: it was not given the NOTIFY and will not report).
    pub relayed: Vec<DsnRecipient>,
}

/// The retry and notification policy applied to one attempt's results at `now`.
pub fn plan_attempt(
    msg: &History<'_>, results: &[Tried<'_>], config: &Config, now: DateTime<Utc>,
) -> AttemptPlan {
    let next = next_retry(
        msg.tries + 1,
        config.server_smtp_retries,
        &config.server_smtp_retry_interval,
        now,
    );
    let mut rcpt_results = Vec::new();
    let mut failed = Vec::new();
    let mut relayed = Vec::new();
    let mut delayed = Vec::new();
    let mut first_error = None;
    // The delay warning goes out with the one attempt that crosses the threshold: the
    // previous try was before it and this one is at or after it. No flag to keep.
    let warn_now = config.server_smtp_delay_warning.is_some_and(|w| {
        let threshold =
            msg.received_at + chrono::Duration::from_std(w).unwrap_or(chrono::Duration::MAX);
        msg.last_try_at.unwrap_or(msg.received_at) < threshold && threshold <= now
    });
    let failure_notice = |notify| {
        should_notify(
            msg.sender,
            notify,
            DsnKind::Failure,
            config.server_stmp_failure_notification,
        )
    };
    for r in results {
        let dsn_rcpt =
            || DsnRecipient::from_status(r.rcpt, r.orcpt, r.status, r.remote_mta, Some(now));
        // The listing shows whether the answer came over TLS.
        let response = Some(if r.tls {
            format!("{} (TLS)", r.status.describe())
        } else {
            r.status.describe()
        });
        let state = match r.status {
            RcptStatus::Delivered { .. } => {
                if !r.dsn && should_notify(msg.sender, r.notify, DsnKind::Relayed, true) {
                    relayed.push(dsn_rcpt());
                }
                Verdict::Delivered
            }
            RcptStatus::Permanent { .. } => {
                if failure_notice(r.notify) {
                    failed.push(dsn_rcpt());
                }
                Verdict::Failed
            }
            RcptStatus::Temporary { .. } => {
                if first_error.is_none() {
                    first_error = Some(format!("{}: {}", r.rcpt, r.status.describe()));
                }
                if next.is_some() {
                    if warn_now && should_notify(msg.sender, r.notify, DsnKind::Delay, true) {
                        delayed.push(dsn_rcpt());
                    }
                    Verdict::Pending
                } else {
                    if failure_notice(r.notify) {
                        failed.push(dsn_rcpt());
                    }
                    Verdict::Failed
                }
            }
        };
        rcpt_results.push((r.rcpt.to_string(), state, response));
    }
    let any_pending = rcpt_results.iter().any(|(_, s, _)| *s == Verdict::Pending);
    AttemptPlan {
        rcpt_results,
        error: first_error,
        next_retry_at: if any_pending { next } else { None },
        failed,
        delayed,
        relayed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Reply;
    use crate::queue::FailureCause;
    use std::time::Duration;

    fn history(tries: u32, sender: &str) -> History<'_> {
        History {
            sender,
            tries,
            received_at: Utc::now(),
            last_try_at: None,
        }
    }

    fn result<'a>(rcpt: &'a str, notify: Option<&'a str>, status: &'a RcptStatus) -> Tried<'a> {
        Tried {
            rcpt,
            notify,
            orcpt: None,
            status,
            remote_mta: Some("mx.test"),
            tls: false,
            dsn: false,
        }
    }

    /// The plan under the default configuration, now.
    fn plan(m: &History<'_>, results: &[Tried<'_>]) -> AttemptPlan {
        plan_attempt(m, results, &Config::default(), Utc::now())
    }

    fn temp() -> RcptStatus {
        RcptStatus::Temporary {
            cause: FailureCause::Reply(Reply::new(451, "4.3.0 try later")),
        }
    }

    fn perm() -> RcptStatus {
        RcptStatus::Permanent {
            cause: FailureCause::Reply(Reply::new(550, "5.1.1 no such user")),
        }
    }

    fn ok() -> RcptStatus {
        RcptStatus::Delivered {
            reply: Reply::new(250, "2.0.0 ok"),
        }
    }

    #[test]
    fn temporary_failure_stays_pending_until_retries_are_used_up() {
        let config = Config {
            server_smtp_retries: 2,
            ..Config::default()
        };
        let now = Utc::now();
        let t = temp();
        let m = history(0, "s@a.test");
        let p = plan_attempt(&m, &[result("r@b.test", None, &t)], &config, now);
        assert_eq!(p.rcpt_results[0].1, Verdict::Pending);
        assert_eq!(p.next_retry_at, Some(now + chrono::Duration::minutes(15)));
        assert!(p.failed.is_empty());
        assert!(p.error.as_deref().unwrap().contains("451"));

        // The third try (second retry) was the last.
        let m = history(2, "s@a.test");
        let p = plan_attempt(&m, &[result("r@b.test", None, &t)], &config, now);
        assert_eq!(p.rcpt_results[0].1, Verdict::Failed);
        assert_eq!(p.next_retry_at, None);
        assert_eq!(p.failed.len(), 1);
    }

    #[test]
    fn permanent_failure_notifies_unless_never_or_null_sender_or_disabled() {
        let p5 = perm();
        let m = history(0, "s@a.test");
        let p = plan(
            &m,
            &[
                result("x@b.test", None, &p5),
                result("y@b.test", Some("NEVER"), &p5),
            ],
        );
        assert_eq!(p.failed.len(), 1);
        assert_eq!(p.failed[0].final_recipient, "x@b.test");
        assert_eq!(p.next_retry_at, None);

        let m = history(0, "");
        let p = plan(&m, &[result("x@b.test", None, &p5)]);
        assert!(p.failed.is_empty(), "never a bounce for <>");

        let off = Config {
            server_stmp_failure_notification: false,
            ..Config::default()
        };
        let m = history(0, "s@a.test");
        let p = plan_attempt(&m, &[result("x@b.test", None, &p5)], &off, Utc::now());
        assert!(p.failed.is_empty());
    }

    #[test]
    fn success_notification_only_when_asked() {
        let good = ok();
        let m = history(0, "s@a.test");
        let asked = result("x@b.test", Some("SUCCESS,FAILURE"), &good);
        let p = plan(&m, &[asked, result("y@b.test", None, &good)]);
        assert_eq!(p.relayed.len(), 1);
        assert_eq!(p.relayed[0].final_recipient, "x@b.test");
        assert_eq!(p.next_retry_at, None);

        // A next hop that offers DSN was given the NOTIFY: the report is its to send.
        let passed_on = Tried { dsn: true, ..asked };
        let p = plan(&m, &[passed_on, result("y@b.test", None, &good)]);
        assert!(p.relayed.is_empty());
    }

    #[test]
    fn delay_warning_goes_out_once_with_the_attempt_that_crosses_the_threshold() {
        let config = Config {
            server_smtp_delay_warning: Some(Duration::from_secs(4 * 3600)),
            ..Config::default()
        };
        let t0 = Utc::now();
        let t = temp();
        let mut m = history(3, "s@a.test");
        m.received_at = t0;
        let results = [
            result("r@b.test", None, &t),
            result("q@b.test", Some("FAILURE"), &t),
        ];
        // Before the threshold: nothing.
        m.last_try_at = Some(t0 + chrono::Duration::hours(2));
        let p = plan_attempt(&m, &results, &config, t0 + chrono::Duration::hours(3));
        assert!(p.delayed.is_empty());
        // Crossing it: one warning, only where NOTIFY allows DELAY.
        m.last_try_at = Some(t0 + chrono::Duration::hours(3));
        let p = plan_attempt(&m, &results, &config, t0 + chrono::Duration::hours(5));
        assert_eq!(p.delayed.len(), 1);
        assert_eq!(p.delayed[0].final_recipient, "r@b.test");
        // Already past it at the previous try: no second warning.
        m.last_try_at = Some(t0 + chrono::Duration::hours(5));
        let p = plan_attempt(&m, &results, &config, t0 + chrono::Duration::hours(9));
        assert!(p.delayed.is_empty());
        // Off when unset.
        m.last_try_at = Some(t0 + chrono::Duration::hours(3));
        let p = plan_attempt(
            &m,
            &results,
            &Config::default(),
            t0 + chrono::Duration::hours(5),
        );
        assert!(p.delayed.is_empty());
    }

    #[test]
    fn retries_zero_fails_after_the_first_try() {
        let config = Config {
            server_smtp_retries: 0,
            ..Config::default()
        };
        let t = temp();
        let m = history(0, "s@a.test");
        let p = plan_attempt(&m, &[result("r@b.test", None, &t)], &config, Utc::now());
        assert_eq!(p.rcpt_results[0].1, Verdict::Failed);
        assert_eq!(p.failed.len(), 1);
    }

    #[test]
    fn answers_over_tls_say_so_in_the_listing() {
        let good = ok();
        let m = history(0, "s@a.test");
        let over_tls = Tried {
            tls: true,
            ..result("x@b.test", None, &good)
        };
        let p = plan(&m, &[over_tls]);
        assert_eq!(p.rcpt_results[0].2.as_deref(), Some("250 2.0.0 ok (TLS)"));
    }
}
