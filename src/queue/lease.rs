//! Message locks as leases (ARCHITECTURE §4): a sender claims a message by stamping it
//! with its node name and an expiry; the lock lapses by itself when the holder dies.
//! These are the pure rules the store's claim statement and the sender's renewals follow;
//! the store applies them atomically, this module only decides. Time is an argument.

use chrono::{DateTime, Utc};
use std::time::Duration;

/// A lock on one queued message: who holds it and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node (`node_name`) whose sender holds the message.
    pub owner: String,
    /// The instant the lock lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// A lease for `owner` taken at `now` for `length`.
    pub fn new(owner: impl Into<String>, now: DateTime<Utc>, length: Duration) -> Self {
        Lease {
            owner: owner.into(),
            expires_at: expiry(now, length),
        }
    }

    /// The same lease renewed at `now` for `length` (the holder is still working).
    pub fn renewed(&self, now: DateTime<Utc>, length: Duration) -> Self {
        Lease {
            owner: self.owner.clone(),
            expires_at: expiry(now, length),
        }
    }

    /// Whether this lease still protects the message at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        !lease_expired(self.expires_at, now)
    }

    /// Whether `owner` holds this lease at `now` (and may renew or release it).
    pub fn is_held_by(&self, owner: &str, now: DateTime<Utc>) -> bool {
        self.owner == owner && self.is_live(now)
    }
}

/// `now + length`, saturating instead of overflowing on absurd lengths.
pub fn expiry(now: DateTime<Utc>, length: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(length)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whether a lease expiring at `expires_at` has lapsed at `now`. The expiry instant
/// itself counts as expired, so a claim made exactly at the expiry succeeds: the store's
/// SQL uses the same `expires_at <= now` comparison.
pub fn lease_expired(expires_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    expires_at <= now
}

/// How long a lease expiring at `expires_at` still runs at `now` (zero once expired).
pub fn lease_remaining(expires_at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (expires_at - now).to_std().unwrap_or(Duration::ZERO)
}

/// Whether a message whose current lock is `current` (None = unlocked), which is
/// `held` (postsuper -h) or not, and next due at `next_retry_at`, may be claimed at `now`.
pub fn can_claim(
    current: Option<&Lease>,
    held: bool,
    next_retry_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    !held && next_retry_at <= now && current.is_none_or(|l| !l.is_live(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, s).unwrap()
    }

    #[test]
    fn expiry_boundary() {
        assert!(!lease_expired(t(10), t(9)));
        assert!(
            lease_expired(t(10), t(10)),
            "the expiry instant counts as expired"
        );
        assert!(lease_expired(t(10), t(11)));
    }

    #[test]
    fn remaining_time() {
        assert_eq!(lease_remaining(t(10), t(4)), Duration::from_secs(6));
        assert_eq!(lease_remaining(t(10), t(10)), Duration::ZERO);
        assert_eq!(lease_remaining(t(10), t(20)), Duration::ZERO);
    }

    #[test]
    fn new_renew_and_holder() {
        let l = Lease::new("node-a", t(0), Duration::from_secs(30));
        assert_eq!(l.expires_at, t(30));
        assert!(l.is_held_by("node-a", t(29)));
        assert!(!l.is_held_by("node-b", t(29)));
        assert!(!l.is_held_by("node-a", t(30)));
        let r = l.renewed(t(20), Duration::from_secs(30));
        assert_eq!(r.expires_at, t(50));
        assert_eq!(r.owner, "node-a");
    }

    #[test]
    fn claim_rules() {
        let live = Lease::new("a", t(0), Duration::from_secs(10));
        // unlocked and due
        assert!(can_claim(None, false, t(5), t(5)));
        // not yet due
        assert!(!can_claim(None, false, t(6), t(5)));
        // held by the administrator
        assert!(!can_claim(None, true, t(0), t(5)));
        // locked by a live lease
        assert!(!can_claim(Some(&live), false, t(0), t(9)));
        // the lease lapsed exactly now: claimable
        assert!(can_claim(Some(&live), false, t(0), t(10)));
    }
}
