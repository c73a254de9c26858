//! The retry schedule (ErlMail's design, REFERENCE "Retries"): `retries` retries after
//! the first try, the wait before retry `i + 1` being `intervals[i]`, the last interval
//! repeating. Pure: the time of the last try is an argument.

use chrono::{DateTime, Utc};
use std::time::Duration;

/// When a message (or recipient) that has been tried `tries_done` times, the last time
/// at `last_try`, is due again; `None` when the retries are used up and it has failed.
///
/// `tries_done` counts every try including the first, so with `retries == 0` the answer
/// after the first try is `None`. An empty `intervals` means "retry at once" rather than
/// never: the count of retries, not the intervals, decides failure.
pub fn next_retry(
    tries_done: u32, retries: u32, intervals: &[Duration], last_try: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    // tries_done == 0 means it was never tried: it is due now.
    if tries_done == 0 {
        return Some(last_try);
    }
    let retries_done = tries_done - 1;
    if retries_done >= retries {
        return None;
    }
    let wait = interval_before_retry(retries_done, intervals);
    let wait = chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
    Some(
        last_try
            .checked_add_signed(wait)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    )
}

/// The wait before retry number `retry_index + 1` (0-based index), the last value
/// repeating; zero when no intervals are configured.
pub fn interval_before_retry(retry_index: u32, intervals: &[Duration]) -> Duration {
    let i = usize::try_from(retry_index).unwrap_or(usize::MAX);
    intervals
        .get(i)
        .or_else(|| intervals.last())
        .copied()
        .unwrap_or(Duration::ZERO)
}

/// The total wait over the whole schedule: the time from the first try to the last
/// retry if every try fails temporarily (and each try took no time).
pub fn schedule_total(retries: u32, intervals: &[Duration]) -> Duration {
    (0..retries)
        .map(|i| interval_before_retry(i, intervals))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn mins(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_secs(m * 60)).collect()
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn default_schedule_totals_1785_minutes_over_10_retries() {
        let intervals = mins(&[15, 30, 60, 240]);
        assert_eq!(
            schedule_total(10, &intervals),
            Duration::from_secs(1_785 * 60)
        );
        // Walk the schedule as the queue would: each try fails, the next is due.
        let mut last = t0();
        let mut tries = 1;
        let mut waits = Vec::new();
        while let Some(next) = next_retry(tries, 10, &intervals, last) {
            waits.push((next - last).num_minutes());
            last = next;
            tries += 1;
        }
        assert_eq!(waits, vec![15, 30, 60, 240, 240, 240, 240, 240, 240, 240]);
        assert_eq!(tries, 11, "one first try plus 10 retries");
        assert_eq!((last - t0()).num_minutes(), 1_785);
    }

    #[test]
    fn zero_retries_fails_after_first_try() {
        let intervals = mins(&[15]);
        assert_eq!(next_retry(1, 0, &intervals, t0()), None);
        assert_eq!(next_retry(0, 0, &intervals, t0()), Some(t0()));
    }

    #[test]
    fn intervals_in_seconds() {
        let intervals = vec![Duration::from_secs(1), Duration::from_secs(2)];
        let t1 = next_retry(1, 3, &intervals, t0()).unwrap();
        assert_eq!((t1 - t0()).num_seconds(), 1);
        let t2 = next_retry(2, 3, &intervals, t1).unwrap();
        assert_eq!((t2 - t1).num_seconds(), 2);
        let t3 = next_retry(3, 3, &intervals, t2).unwrap();
        assert_eq!((t3 - t2).num_seconds(), 2, "last interval repeats");
        assert_eq!(next_retry(4, 3, &intervals, t3), None);
    }

    #[test]
    fn sub_second_intervals_are_kept() {
        let intervals = vec![Duration::from_millis(250)];
        let t1 = next_retry(1, 1, &intervals, t0()).unwrap();
        assert_eq!((t1 - t0()).num_milliseconds(), 250);
    }

    #[test]
    fn empty_intervals_retry_at_once() {
        assert_eq!(next_retry(1, 2, &[], t0()), Some(t0()));
        assert_eq!(next_retry(3, 2, &[], t0()), None);
    }
}
