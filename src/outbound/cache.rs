//! Idle SMTP connections kept for the next message, as Postfix's connection cache
//! (`scache`) does. A session whose transaction ended cleanly (250 after the final dot,
//! or every recipient refused and a successful RSET) goes idle here, keyed by the host's
//! address and whether TLS was wanted, instead of QUIT; the next message for that
//! address starts at `MAIL FROM`. Idle connections are closed with QUIT after
//! `CONNECTION_CACHE_TIME_LIMIT` by a reaper task that ends with the cache. The cache
//! holds connections; it never talks SMTP beyond QUIT.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::connection::{spawn_quit, Session};

/// `smtp_connection_cache_time_limit` (Postfix default 2 s): how long a connection may
/// sit idle in the cache before it is closed with QUIT.
pub const CONNECTION_CACHE_TIME_LIMIT: Duration = Duration::from_secs(2);

/// `smtp_connection_reuse_time_limit` (Postfix default 300 s): a connection older than
/// this (counted from when it was opened) is not given another transaction.
pub const CONNECTION_REUSE_TIME_LIMIT: Duration = Duration::from_secs(300);

/// `smtp_connection_reuse_count_limit`: how many transactions one connection carries at
/// most. Postfix's default (0) means no limit; erlmail stops at 100 so that a long run
/// to one hop still moves to new connections now and then.
pub const CONNECTION_REUSE_COUNT_LIMIT: u32 = 100;

/// Idle connections kept per host address and TLS mode. Postfix bounds these through
/// the per-destination concurrency (`default_destination_concurrency_limit`, 20); this
/// is the cache's own cap, a little above that.
pub const CONNECTION_CACHE_PER_HOP: usize = 32;

/// The limits a `ConnectionCache` applies. `Default` gives the Postfix-like constants
/// above; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Longest idle time in the cache (`CONNECTION_CACHE_TIME_LIMIT`).
    pub idle_time: Duration,
    /// Longest time since the connection was opened for it to be reused
    /// (`CONNECTION_REUSE_TIME_LIMIT`).
    pub reuse_time: Duration,
    /// Most transactions per connection (`CONNECTION_REUSE_COUNT_LIMIT`).
    pub reuse_count: u32,
    /// Most idle connections per host address and TLS mode (`CONNECTION_CACHE_PER_HOP`);
    /// 0 turns caching off.
    pub per_hop: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            idle_time: CONNECTION_CACHE_TIME_LIMIT,
            reuse_time: CONNECTION_REUSE_TIME_LIMIT,
            reuse_count: CONNECTION_REUSE_COUNT_LIMIT,
            per_hop: CONNECTION_CACHE_PER_HOP,
        }
    }
}

impl CacheLimits {
    /// Whether `s`, after `more` further transactions, may still carry another.
    pub(super) fn reusable(&self, s: &Session, more: u32) -> bool {
        self.per_hop > 0
            && s.transactions.saturating_add(more) < self.reuse_count
            && s.opened.elapsed() < self.reuse_time
    }
}

/// What idle connections are filed under: the host's address and whether TLS was
/// wanted (a connection that wanted TLS but was not offered it is plain, yet it is what
/// a later delivery wanting TLS would get from that host anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct CacheKey {
    pub(super) addr: SocketAddr,
    pub(super) tls: bool,
}

/// One idle connection and since when it is idle.
struct Idle {
    session: Session,
    since: Instant,
}

/// Idle SMTP connections ready for another transaction, per host address (Postfix's
/// `scache`). One lives in each `Router`, so a configuration reload starts a new one.
/// Idle connections are QUIT by a background task once `CacheLimits::idle_time` has
/// passed, and when the cache is dropped.
pub struct ConnectionCache {
    shared: Arc<CacheShared>,
}

struct CacheShared {
    limits: CacheLimits,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Per key, oldest idle first: taking from the back reuses the most recently used
    /// connection (the least likely to have been timed out by the server), and the
    /// reaper expires from the front.
    idle: HashMap<CacheKey, VecDeque<Idle>>,
    /// The task closing expired connections, while there are any to watch.
    reaper: Option<JoinHandle<()>>,
}

impl Default for ConnectionCache {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ConnectionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionCache")
            .field("limits", &self.shared.limits)
            .field("idle", &self.idle())
            .finish()
    }
}

impl ConnectionCache {
    /// An empty cache with the Postfix-like limits.
    pub fn new() -> Self {
        Self::with_limits(CacheLimits::default())
    }

    /// An empty cache with the given limits.
    pub fn with_limits(limits: CacheLimits) -> Self {
        ConnectionCache {
            shared: Arc::new(CacheShared {
                limits,
                state: Mutex::new(CacheState::default()),
            }),
        }
    }

    /// The limits it applies.
    pub fn limits(&self) -> CacheLimits {
        self.shared.limits
    }

    /// How many idle connections it holds right now.
    pub fn idle(&self) -> usize {
        self.shared.lock().idle.values().map(VecDeque::len).sum()
    }

    /// Closes every idle connection (QUIT in the background).
    pub fn clear(&self) {
        let drained: Vec<Idle> = {
            let mut st = self.shared.lock();
            st.idle.drain().flat_map(|(_, q)| q).collect()
        };
        for e in drained {
            spawn_quit(e.session.conn);
        }
    }

    /// A live idle connection for `key` greeted as `helo`, most recently used first.
    /// Connections past their limits, greeted under another name, not under TLS when TLS
    /// is required, or found closed by the server are closed on the way.
    pub(super) fn take(&self, key: CacheKey, helo: &str, require_tls: bool) -> Option<Session> {
        let limits = self.shared.limits;
        loop {
            let idle = {
                let mut st = self.shared.lock();
                let q = st.idle.get_mut(&key)?;
                let idle = q.pop_back();
                if q.is_empty() {
                    st.idle.remove(&key);
                }
                idle?
            };
            let Idle { mut session, since } = idle;
            let fits = since.elapsed() < limits.idle_time
                && limits.reusable(&session, 0)
                && session.helo == helo
                && (session.tls || !require_tls);
            if !fits {
                spawn_quit(session.conn);
                continue;
            }
            if !session.conn.still_open() {
                // Closed or talking out of turn: nothing worth a QUIT.
                continue;
            }
            return Some(session);
        }
    }

    /// Files a session that ended its transaction cleanly, or closes it when its limits
    /// are reached or it has unread data. Past the per-hop cap the oldest idle
    /// connection of that key is closed.
    pub(super) fn put(&self, key: CacheKey, session: Session) {
        let limits = self.shared.limits;
        if !limits.reusable(&session, 0) || session.conn.buffered() {
            spawn_quit(session.conn);
            return;
        }
        let evicted = {
            let mut st = self.shared.lock();
            let q = st.idle.entry(key).or_default();
            q.push_back(Idle {
                session,
                since: Instant::now(),
            });
            let evicted = if q.len() > limits.per_hop {
                q.pop_front()
            } else {
                None
            };
            if st.reaper.as_ref().is_none_or(JoinHandle::is_finished) {
                let weak = Arc::downgrade(&self.shared);
                st.reaper = Some(tokio::spawn(reap(weak)));
            }
            evicted
        };
        if let Some(e) = evicted {
            spawn_quit(e.session.conn);
        }
    }
}

impl CacheShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // The state stays consistent across a panic elsewhere: every change is one
        // push or pop.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for CacheShared {
    /// The router is going away (shutdown, reload): QUIT whatever is idle, when there
    /// is a runtime to do it on; otherwise the connections just close.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(reaper) = st.reaper.take() {
            reaper.abort();
        }
        let drained: Vec<Idle> = st.idle.drain().flat_map(|(_, q)| q).collect();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for e in drained {
                rt.spawn(e.session.conn.quit());
            }
        }
    }
}

/// The reaper: sleeps until the oldest idle connection's time is up, closes every
/// expired one, and ends when nothing is left to watch (the next `put` starts a new
/// one) or the cache is gone. It holds the cache only while sweeping.
async fn reap(cache: Weak<CacheShared>) {
    loop {
        let Some(shared) = cache.upgrade() else {
            return;
        };
        let limit = shared.limits.idle_time;
        let now = Instant::now();
        let mut expired = Vec::new();
        let next = {
            let mut st = shared.lock();
            st.idle.retain(|_, q| {
                while q.front().is_some_and(|e| e.since + limit <= now) {
                    expired.extend(q.pop_front());
                }
                !q.is_empty()
            });
            // Every queue is oldest first, so its front expires first.
            let next = st
                .idle
                .values()
                .filter_map(VecDeque::front)
                .map(|e| e.since + limit)
                .min();
            if next.is_none() {
                st.reaper = None;
            }
            next
        };
        drop(shared);
        for e in expired {
            spawn_quit(e.session.conn);
        }
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::connection::Conn;
    use tokio::io::{duplex, AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

    const HELO: &str = "erlmail.test";

    fn key() -> CacheKey {
        CacheKey {
            addr: "127.0.0.1:2525".parse().unwrap(),
            tls: false,
        }
    }

    /// A session over an in-memory pipe: what the client writes, `peer` reads.
    fn session(transactions: u32) -> (Session, DuplexStream) {
        let (ours, peer) = duplex(4096);
        let s = Session {
            conn: Conn::new(Box::new(ours), Duration::from_secs(5)),
            tls: false,
            keywords: vec!["PIPELINING".into()],
            helo: HELO.into(),
            opened: Instant::now(),
            transactions,
        };
        (s, peer)
    }

    /// The next line the peer receives ("" at EOF), waiting at most 20 s.
    async fn line(peer: &mut DuplexStream) -> String {
        let mut buf = Vec::new();
        let mut reader = BufReader::new(peer);
        tokio::time::timeout(Duration::from_secs(20), reader.read_until(b'\n', &mut buf))
            .await
            .expect("a line or EOF in time")
            .expect("read");
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn idle_connections_are_quit_after_the_idle_time() {
        let limits = CacheLimits {
            idle_time: Duration::from_millis(200),
            ..CacheLimits::default()
        };
        let cache = ConnectionCache::with_limits(limits);
        // Twice: the reaper ends when the cache empties and the next put starts another.
        for _ in 0..2 {
            let (s, mut peer) = session(1);
            let put_at = Instant::now();
            cache.put(key(), s);
            assert_eq!(cache.idle(), 1);
            assert_eq!(line(&mut peer).await, "QUIT\r\n");
            assert!(put_at.elapsed() >= limits.idle_time);
            assert_eq!(cache.idle(), 0);
        }
    }

    #[tokio::test]
    async fn take_passes_over_closed_and_talking_connections() {
        let cache = ConnectionCache::new();
        let (live, mut live_peer) = session(1);
        let (talking, mut talking_peer) = session(1);
        let (closed, closed_peer) = session(1);
        // Taken newest first: closed, then talking, then live.
        cache.put(key(), live);
        cache.put(key(), talking);
        cache.put(key(), closed);
        drop(closed_peer);
        talking_peer
            .write_all(b"421 4.4.2 idle too long\r\n")
            .await
            .unwrap();
        let mut s = cache.take(key(), HELO, false).expect("the live connection");
        assert_eq!(cache.idle(), 0);
        s.conn.write(b"NOOP\r\n", "test").await.unwrap();
        assert_eq!(line(&mut live_peer).await, "NOOP\r\n");
        assert!(cache.take(key(), HELO, false).is_none());
        // The other mode and another address have nothing.
        cache.put(key(), s);
        let tls_key = CacheKey { tls: true, ..key() };
        assert!(cache.take(tls_key, HELO, false).is_none());
        assert_eq!(cache.idle(), 1);
    }

    #[tokio::test]
    async fn take_refuses_another_name_or_plain_text_when_tls_is_required() {
        let cache = ConnectionCache::new();
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        assert!(cache.take(key(), HELO, true).is_none());
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        assert!(cache.take(key(), "other.test", false).is_none());
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        assert_eq!(cache.idle(), 0);
    }

    #[tokio::test]
    async fn limits_close_instead_of_caching() {
        let limits = CacheLimits {
            reuse_count: 3,
            per_hop: 2,
            ..CacheLimits::default()
        };
        let cache = ConnectionCache::with_limits(limits);
        // At the transaction limit: closed at once.
        let (s, mut peer) = session(3);
        cache.put(key(), s);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        assert_eq!(cache.idle(), 0);
        // Past the per-hop cap the oldest goes.
        let (a, mut peer_a) = session(1);
        let (b, _peer_b) = session(1);
        let (c, _peer_c) = session(1);
        cache.put(key(), a);
        cache.put(key(), b);
        cache.put(key(), c);
        assert_eq!(cache.idle(), 2);
        assert_eq!(line(&mut peer_a).await, "QUIT\r\n");
        // Too old to reuse: closed rather than cached.
        let old = ConnectionCache::with_limits(CacheLimits {
            reuse_time: Duration::ZERO,
            ..CacheLimits::default()
        });
        let (s, mut peer) = session(1);
        old.put(key(), s);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        assert_eq!(old.idle(), 0);
        let (s, _) = session(1);
        assert!(limits.reusable(&s, 1));
        assert!(!limits.reusable(&s, 2));
    }

    #[tokio::test]
    async fn dropping_the_cache_quits_its_connections() {
        let cache = ConnectionCache::new();
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        drop(cache);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
        let cache = ConnectionCache::new();
        let (s, mut peer) = session(1);
        cache.put(key(), s);
        cache.clear();
        assert_eq!(cache.idle(), 0);
        assert_eq!(line(&mut peer).await, "QUIT\r\n");
    }
}
