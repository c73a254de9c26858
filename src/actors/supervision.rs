//! Supervision written once, for every supervisor of the tree: what ended (ractor's
//! events), OTP's restart intensity, and the log line and counter every restart gets.
//!
//! ractor has no restart strategies of its own: each supervisor decides in its
//! `handle_supervisor_evt` which child ended and re-creates it through these pieces.
//! A child's registry name is already free when its supervisor hears of its end (ractor
//! unregisters it before notifying), so a successor can take the name at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::warn;

use crate::telemetry::names;

/// A child that ended, as its supervisor hears of it.
pub struct Ended {
    /// The child.
    pub cell: ActorCell,
    /// Its panic or error, when it failed.
    pub failure: Option<String>,
    /// The reason it gave, when it stopped.
    pub reason: Option<String>,
}

impl Ended {
    /// The child that `event` says ended; `None` for other events (a start).
    pub fn of(event: &SupervisionEvent) -> Option<Ended> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => Some(Ended {
                cell: cell.clone(),
                failure: Some(err.to_string()),
                reason: None,
            }),
            SupervisionEvent::ActorTerminated(cell, _, reason) => Some(Ended {
                cell: cell.clone(),
                failure: None,
                reason: reason.clone(),
            }),
            _ => None,
        }
    }

    /// `failed: <error>` or `terminated: <reason>` (`normal` when none was given).
    pub fn why(&self) -> String {
        match &self.failure {
            Some(err) => format!("failed: {err}"),
            None => format!("terminated: {}", self.reason.as_deref().unwrap_or("normal")),
        }
    }
}

/// OTP's restart intensity: at most `max_restarts` within `period`, else the supervisor
/// gives up and stops itself (and so, at the root, the daemon exits non-zero).
#[derive(Debug, Clone)]
pub struct RestartIntensity {
    max_restarts: usize,
    period: Duration,
    recent: VecDeque<Instant>,
}

impl RestartIntensity {
    /// ErlMail's root supervisor: 5 restarts in 60 s.
    pub fn otp_default() -> Self {
        Self::new(5, Duration::from_secs(60))
    }

    /// An intensity of `max_restarts` within `period`.
    pub fn new(max_restarts: usize, period: Duration) -> Self {
        RestartIntensity {
            max_restarts,
            period,
            recent: VecDeque::new(),
        }
    }

    /// Record a restart at `now`; `false` when this one exceeds the intensity.
    pub fn allow(&mut self, now: Instant) -> bool {
        while let Some(first) = self.recent.front() {
            if now.duration_since(*first) > self.period {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        self.recent.len() <= self.max_restarts
    }

    /// A restart of the child at `path`, now: logged and counted when the intensity
    /// allows it; `false` (nothing logged) when it does not.
    pub fn restart(&mut self, path: &str) -> bool {
        if !self.allow(Instant::now()) {
            return false;
        }
        restarting(path, path.to_string());
        true
    }
}

/// Log a restart of the actor at `path` and count it under `label`.
pub fn restarting(path: &str, label: impl Into<metrics::SharedString>) {
    warn!(path = %path, "restarting");
    metrics::counter!(names::RESTARTS, "path" => label.into()).increment(1);
}

/// Start `actor` as the child `name` of `sup`.
pub async fn spawn_child<A: Actor>(
    sup: &ActorCell, name: &str, actor: A, args: A::Arguments,
) -> Result<ActorRef<A::Msg>, ActorProcessingErr> {
    let (child, _) = Actor::spawn_linked(Some(name.into()), actor, args, sup.clone()).await?;
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intensity_allows_five_in_a_minute_then_refuses() {
        let mut i = RestartIntensity::otp_default();
        let t0 = Instant::now();
        for k in 0..5 {
            assert!(i.allow(t0 + Duration::from_secs(k)), "restart {k}");
        }
        assert!(!i.allow(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn intensity_forgets_restarts_older_than_the_period() {
        let mut i = RestartIntensity::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(i.allow(t0));
        assert!(i.allow(t0 + Duration::from_secs(1)));
        // Both earlier restarts are over a minute old by now.
        assert!(i.allow(t0 + Duration::from_secs(62)));
        assert!(i.allow(t0 + Duration::from_secs(63)));
        assert!(
            !i.allow(t0 + Duration::from_secs(64)),
            "three within a minute"
        );
    }
}
