//! The crash budget: a message whose delivery agent crashes again and again is bounced,
//! never retried forever (Postfix's qmgr throttles a transport whose agent dies; a
//! message that kills every agent it meets is the worst case of that).
//!
//! The count of crashes in a row lives in the message's `last_error`, the one field an
//! attempt always writes: a crashed attempt records `delivery agent crashed (N in a
//! row): ...`, and any attempt that did not crash writes something else, which resets
//! the count. Pure: no clock, no store.

/// Crashes in a row after which the message is bounced (5.3.0).
pub const CRASH_BUDGET: u32 = 5;

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

#[cfg(test)]
mod tests {
    use super::*;

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
