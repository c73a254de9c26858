//! The active queue (Postfix's qmgr): leased messages waiting in memory for a free
//! sender, one line per next hop, the lines served in turn so that one slow destination
//! cannot take every sender ([`DESTINATION_CONCURRENCY`] at most each). Bounded in count
//! and bytes: what does not fit is handed back to the caller to release to the store.
//!
//! Pure: `smtpd_queue` says which next hop a message goes to, how many senders each
//! has at work, and what time it is.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};

/// Most senders at once for one next hop (Postfix's `default_destination_concurrency_limit`).
pub const DESTINATION_CONCURRENCY: usize = 20;
/// Most leased messages waiting in memory (Postfix's `qmgr_message_active_limit` is
/// 20,000; ours hold their bodies, hence also a byte bound).
pub const ACTIVE_LIMIT: usize = 10_000;
/// Most body bytes waiting in memory.
pub const ACTIVE_BYTES_LIMIT: usize = 128 << 20;

/// What the scheduler needs to know of a waiting message.
pub trait Waiting {
    /// Its size in memory (the body).
    fn bytes(&self) -> usize;
    /// When its lease lapses (`None`: it holds none).
    fn lease_expires_at(&self) -> Option<DateTime<Utc>>;
}

/// A message whose turn has come.
#[derive(Debug, PartialEq, Eq)]
pub struct Ready<M> {
    /// The message.
    pub message: M,
    /// It waited across a request of the queue: `queue delete` or `hold` may have
    /// reached it meanwhile, so the store is asked before it is tried.
    pub check_first: bool,
}

/// Leased messages waiting for a sender, per next hop.
#[derive(Debug)]
pub struct Scheduler<M> {
    /// One line per next hop (never an empty line), each message with the generation
    /// it arrived in.
    lines: HashMap<String, VecDeque<(M, u64)>>,
    /// Next hops with waiting messages, served in turn.
    turns: VecDeque<String>,
    /// Body bytes waiting.
    bytes: usize,
    /// Counts the queue's requests (see [`Ready::check_first`]).
    generation: u64,
    max_count: usize,
    max_bytes: usize,
}

impl<M: Waiting> Default for Scheduler<M> {
    fn default() -> Self {
        Self::with_limits(ACTIVE_LIMIT, ACTIVE_BYTES_LIMIT)
    }
}

impl<M: Waiting> Scheduler<M> {
    /// An empty active queue holding at most `max_count` messages and `max_bytes`.
    pub fn with_limits(max_count: usize, max_bytes: usize) -> Self {
        Scheduler {
            lines: HashMap::new(),
            turns: VecDeque::new(),
            bytes: 0,
            generation: 0,
            max_count,
            max_bytes,
        }
    }

    /// The queue handles another request: what waits from now on waited across one.
    pub fn next_generation(&mut self) {
        self.generation += 1;
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.lines.values().map(VecDeque::len).sum()
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Put a message in the line of next hop `destination`; `Err` gives it back when
    /// the active queue is full (it is to be released).
    pub fn push(&mut self, message: M, destination: String) -> Result<(), M> {
        if self.len() >= self.max_count || self.bytes + message.bytes() > self.max_bytes {
            return Err(message);
        }
        self.bytes += message.bytes();
        let line = self.lines.entry(destination.clone()).or_default();
        if line.is_empty() {
            self.turns.push_back(destination);
        }
        line.push_back((message, self.generation));
        Ok(())
    }

    /// The next message to try: from the next hop whose turn it is among those with
    /// fewer than [`DESTINATION_CONCURRENCY`] senders at work (`busy`); `None` when
    /// nothing waits or every next hop with waiting mail is at its limit.
    pub fn next(&mut self, busy: impl Fn(&str) -> usize) -> Option<Ready<M>> {
        for _ in 0..self.turns.len() {
            let dest = self.turns.pop_front()?;
            if busy(&dest) >= DESTINATION_CONCURRENCY {
                self.turns.push_back(dest);
                continue;
            }
            let line = self.lines.get_mut(&dest)?;
            let (message, arrived) = line.pop_front()?;
            if line.is_empty() {
                self.lines.remove(&dest);
            } else {
                self.turns.push_back(dest);
            }
            self.bytes -= message.bytes();
            return Some(Ready {
                message,
                check_first: arrived != self.generation,
            });
        }
        None
    }

    /// Take out the messages whose lease lapses at or before `limit` (they would
    /// otherwise be tried by us and, after the lapse, by another process too).
    pub fn take_stale(&mut self, limit: DateTime<Utc>) -> Vec<M> {
        let mut stale = Vec::new();
        for line in self.lines.values_mut() {
            let (keep, gone): (VecDeque<_>, VecDeque<_>) = std::mem::take(line)
                .into_iter()
                .partition(|(m, _)| m.lease_expires_at().is_some_and(|t| t > limit));
            *line = keep;
            stale.extend(gone.into_iter().map(|(m, _)| m));
        }
        self.lines.retain(|_, l| !l.is_empty());
        let lines = &self.lines;
        self.turns.retain(|d| lines.contains_key(d));
        self.bytes -= stale.iter().map(Waiting::bytes).sum::<usize>();
        stale
    }

    /// Empty the active queue; what waited.
    pub fn take_all(&mut self) -> Vec<M> {
        self.turns.clear();
        self.bytes = 0;
        self.lines
            .drain()
            .flat_map(|(_, line)| line.into_iter().map(|(m, _)| m))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[derive(Debug, PartialEq, Eq)]
    struct M(&'static str, usize, Option<DateTime<Utc>>);

    impl Waiting for M {
        fn bytes(&self) -> usize {
            self.1
        }
        fn lease_expires_at(&self) -> Option<DateTime<Utc>> {
            self.2
        }
    }

    fn t(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(min)
    }

    fn m(id: &'static str) -> M {
        M(id, 10, Some(t(5)))
    }

    fn drain(s: &mut Scheduler<M>, busy: impl Fn(&str) -> usize) -> Vec<&'static str> {
        std::iter::from_fn(|| s.next(&busy).map(|r| r.message.0)).collect()
    }

    #[test]
    fn next_hops_take_turns() {
        let mut s = Scheduler::default();
        for (id, dest) in [
            ("a1", "a"),
            ("a2", "a"),
            ("a3", "a"),
            ("b1", "b"),
            ("c1", "c"),
        ] {
            s.push(m(id), dest.into()).unwrap();
        }
        assert_eq!(s.len(), 5);
        assert_eq!(drain(&mut s, |_| 0), ["a1", "b1", "c1", "a2", "a3"]);
        assert!(s.is_empty());
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn a_next_hop_at_its_limit_waits_and_the_others_go_ahead() {
        let mut s = Scheduler::default();
        for (id, dest) in [("slow1", "slow"), ("slow2", "slow"), ("fast1", "fast")] {
            s.push(m(id), dest.into()).unwrap();
        }
        let busy = |d: &str| {
            if d == "slow" {
                DESTINATION_CONCURRENCY
            } else {
                0
            }
        };
        assert_eq!(drain(&mut s, busy), ["fast1"]);
        assert_eq!(s.len(), 2, "the slow next hop's mail still waits");
        assert_eq!(
            drain(&mut s, |_| DESTINATION_CONCURRENCY - 1),
            ["slow1", "slow2"]
        );
    }

    #[test]
    fn the_active_queue_is_bounded_in_count_and_bytes() {
        let mut s = Scheduler::with_limits(2, 25);
        s.push(m("1"), "a".into()).unwrap();
        s.push(m("2"), "a".into()).unwrap();
        assert_eq!(s.push(m("3"), "b".into()), Err(m("3")), "count");
        let mut s = Scheduler::with_limits(10, 25);
        s.push(m("1"), "a".into()).unwrap();
        s.push(m("2"), "a".into()).unwrap();
        assert_eq!(s.push(m("3"), "b".into()), Err(m("3")), "bytes");
        assert!(s.push(M("small", 5, None), "b".into()).is_ok());
    }

    #[test]
    fn what_waited_across_a_request_is_checked_first() {
        let mut s = Scheduler::default();
        s.push(m("now"), "a".into()).unwrap();
        assert!(!s.next(|_| 0).unwrap().check_first);
        s.push(m("later"), "a".into()).unwrap();
        s.next_generation();
        assert!(s.next(|_| 0).unwrap().check_first);
    }

    #[test]
    fn messages_whose_lease_would_lapse_are_taken_out() {
        let mut s = Scheduler::default();
        s.push(M("old", 10, Some(t(1))), "a".into()).unwrap();
        s.push(M("none", 10, None), "b".into()).unwrap();
        s.push(M("fresh", 10, Some(t(9))), "a".into()).unwrap();
        let stale: Vec<_> = s.take_stale(t(5)).into_iter().map(|m| m.0).collect();
        assert_eq!(stale.len(), 2);
        assert!(stale.contains(&"old") && stale.contains(&"none"));
        assert_eq!(s.bytes, 10);
        assert_eq!(drain(&mut s, |_| 0), ["fresh"]);
    }

    #[test]
    fn taking_all_empties_it() {
        let mut s = Scheduler::default();
        s.push(m("1"), "a".into()).unwrap();
        s.push(m("2"), "b".into()).unwrap();
        assert_eq!(s.take_all().len(), 2);
        assert!(s.is_empty());
        assert_eq!(s.next(|_| 0), None);
    }
}
