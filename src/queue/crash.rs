//! The crash budget: a message whose delivery agent crashes again and again is bounced,
//! never retried forever (Postfix's qmgr throttles a transport whose agent dies; a
//! message that kills every agent it meets is the worst case of that).
//!
//! The count of crashes in a row lives in the message's `last_error`, the one field an
//! attempt always writes: a crashed attempt records `delivery agent crashed (N in a
//! row): ...`, and any attempt that did not crash writes something else, which resets
//! the count.
//!
//! [`after_crash`] is what `smtpd_queue` does when a sender crashes: re-spawn it for the
//! same attempt a few times, then count the try as a temporary failure; bounce once the
//! budget is spent. Pure: no clock, no store.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::Config;

/// Crashes in a row after which the message is bounced (5.3.0).
pub const CRASH_BUDGET: u32 = 5;

/// Re-spawns of a crashed sender for one attempt before it counts as a temporary failure.
pub const MAX_SENDER_RESPAWNS: u32 = 3;

const PREFIX: &str = "delivery agent crashed (";

/// Crashes in a row recorded in `last_error` by earlier attempts (0 when the last
/// attempt did not crash).
pub fn crashes_so_far(last_error: Option<&str>) -> u32 {
    last_error
        .and_then(|e| e.strip_prefix(PREFIX))
        .and_then(|rest| rest.split_once(" in a row)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// The `last_error` of an attempt that ended with `total` crashes in a row.
pub fn crash_error(total: u32, error: &str) -> String {
    format!("{PREFIX}{total} in a row): {error}")
}

/// Whether `total` crashes in a row spend the budget.
pub fn budget_spent(total: u32) -> bool {
    total >= CRASH_BUDGET
}

/// Crashes counted when a sender has just crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashCount {
    /// Senders crashed on this attempt, this one included.
    pub this_attempt: u32,
    /// Crashes in a row on this message, earlier attempts' included.
    pub in_a_row: u32,
}

impl CrashCount {
    /// The count after one more crash, `earlier` senders having crashed on this attempt
    /// before it, the message's last recorded error being `last_error`.
    pub fn after(earlier: u32, last_error: Option<&str>) -> Self {
        let this_attempt = earlier + 1;
        CrashCount {
            this_attempt,
            in_a_row: crashes_so_far(last_error) + this_attempt,
        }
    }
}

/// What follows a sender's crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterCrash {
    /// The budget is spent: one more sender bounces the message (5.3.0) with this
    /// diagnostic, without delivering.
    GiveUp(String),
    /// A new sender tries the same attempt again (the lease is still held).
    Respawn,
    /// The try counts as a temporary failure: every recipient stays pending, `error`
    /// becomes the message's `last_error`, and it is due again at `next_retry_at`.
    Defer {
        /// The `last_error` to record ([`crash_error`]).
        error: String,
        /// When the message is due again.
        next_retry_at: DateTime<Utc>,
    },
}

/// The crash fallback: a sender of a message tried `tries` times before crashed with
/// `error` at `now`. `settling` when no further sender may start for it (it was the one
/// bouncing the message, or the queue is stopping).
pub fn after_crash(
    count: CrashCount, error: &str, settling: bool, tries: u32, config: &Config, now: DateTime<Utc>,
) -> AfterCrash {
    if budget_spent(count.in_a_row) && !settling {
        return AfterCrash::GiveUp(format!(
            "the delivery agent crashed {} times in a row on this message; \
             it was given up ({error})",
            count.in_a_row
        ));
    }
    if count.this_attempt <= MAX_SENDER_RESPAWNS && !settling {
        return AfterCrash::Respawn;
    }
    let intervals = &config.server_smtp_retry_interval;
    let next_retry_at = super::next_retry(tries + 1, config.server_smtp_retries, intervals, now)
        // A crash is our fault, not the recipient's: never bounce for the retry schedule
        // (the crash budget decides that).
        .unwrap_or(
            now + chrono::Duration::from_std(
                intervals
                    .last()
                    .copied()
                    .unwrap_or(Duration::from_secs(900)),
            )
            .unwrap_or(chrono::Duration::minutes(15)),
        );
    AfterCrash::Defer {
        error: crash_error(count.in_a_row, error),
        next_retry_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn a_crashed_sender_is_respawned_three_times_then_the_try_is_deferred() {
        let config = Config::default();
        for earlier in 0..MAX_SENDER_RESPAWNS {
            let count = CrashCount::after(earlier, None);
            assert_eq!(
                after_crash(count, "boom", false, 0, &config, t0()),
                AfterCrash::Respawn,
                "crash {}",
                earlier + 1
            );
        }
        let count = CrashCount::after(MAX_SENDER_RESPAWNS, None);
        assert_eq!(count.in_a_row, 4);
        assert_eq!(
            after_crash(count, "boom", false, 0, &config, t0()),
            AfterCrash::Defer {
                error: crash_error(4, "boom"),
                next_retry_at: t0() + chrono::Duration::minutes(15),
            }
        );
    }

    #[test]
    fn crashes_of_earlier_attempts_count_towards_the_budget() {
        let config = Config::default();
        let last = crash_error(4, "boom");
        let count = CrashCount::after(0, Some(&last));
        assert_eq!(
            count,
            CrashCount {
                this_attempt: 1,
                in_a_row: 5
            }
        );
        match after_crash(count, "boom again", false, 4, &config, t0()) {
            AfterCrash::GiveUp(why) => {
                assert!(why.contains("crashed 5 times in a row"), "{why}");
                assert!(why.ends_with("(boom again)"), "{why}");
            }
            other => panic!("not given up: {other:?}"),
        }
    }

    #[test]
    fn a_settling_sender_is_never_replaced_and_a_crash_never_bounces_for_the_schedule() {
        let config = Config {
            server_smtp_retries: 0,
            ..Config::default()
        };
        // Bouncing (or stopping): no new sender, even within the budget or the re-spawns.
        let count = CrashCount::after(0, Some(&crash_error(4, "x")));
        match after_crash(count, "boom", true, 9, &config, t0()) {
            AfterCrash::Defer {
                error,
                next_retry_at,
            } => {
                assert_eq!(crashes_so_far(Some(&error)), 5);
                // Retries used up: the last interval, not a bounce.
                assert_eq!(next_retry_at, t0() + chrono::Duration::minutes(240));
            }
            other => panic!("not deferred: {other:?}"),
        }
    }

    #[test]
    fn counts_round_trip_and_other_errors_reset_them() {
        assert_eq!(crashes_so_far(None), 0);
        assert_eq!(crashes_so_far(Some("451 4.3.0 try later")), 0);
        let e = crash_error(3, "panicked at x");
        assert_eq!(crashes_so_far(Some(&e)), 3);
        assert_eq!(crashes_so_far(Some(&crash_error(4, "a (2 in a row) b"))), 4);
        // The old wording, from before the count, is no count.
        assert_eq!(crashes_so_far(Some("delivery agent crashed: boom")), 0);
    }

    #[test]
    fn the_budget_is_five() {
        assert!(!budget_spent(4));
        assert!(budget_spent(5));
        assert!(budget_spent(9));
    }
}
