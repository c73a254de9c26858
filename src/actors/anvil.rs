//! `smtpd_anvil`: per-client counts and rates, Postfix's anvil under ErlMail's naming.
//!
//! `smtpd_sup` asks it about every new connection ([`AnvilMsg::Connect`]) and tells it
//! when a session ends ([`AnvilMsg::Disconnect`]); sessions ask it before checking a
//! password ([`AnvilMsg::AuthBegin`]) and report the result ([`AnvilMsg::AuthEnd`]). It
//! enforces, per client address (an IPv6 client counts per /64, so one host cannot dodge
//! the limit by rotating through its addresses):
//! - `server_smtp_client_connection_limit`: sessions open at once;
//! - `server_smtp_client_connection_rate`: new sessions in the last minute;
//! - `server_smtp_auth_failure_limit`: failed AUTH attempts in the last five minutes. An
//!   attempt still being checked counts as a failure until it is known, so forty guesses
//!   sent in parallel sessions cannot all slip in before the first is counted. While an
//!   address is over the limit even a right password is refused; no account is ever
//!   locked for everyone.
//!
//! Relay clients (`server_smtp_relay_clients`) are exempt from the connection limits, as
//! Postfix exempts `$mynetworks`. A refusal is logged once per client and reason per
//! minute and counted in `erlmail_smtp_connections_refused_total`. The counts are only
//! memory: after a restart `smtpd_sup` tells the new anvil which sessions are open.
//! [`ClientTable`] is the policy, pure and unit-tested here; the actor only adds the
//! clock, the logs and the metrics.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::{Handled, Started};
use ractor::{Actor, ActorRef, RpcReplyPort};
use tracing::{info, warn};

use crate::telemetry::names;

/// Window of `server_smtp_client_connection_rate`.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Window of `server_smtp_auth_failure_limit`.
pub const AUTH_WINDOW: Duration = Duration::from_secs(300);
/// How often idle entries are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The address a client is counted under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by
/// its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientKey(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// The per-client limits (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Sessions open at once.
    pub connections: usize,
    /// New sessions per [`RATE_WINDOW`].
    pub rate: u32,
    /// Failed AUTH attempts per [`AUTH_WINDOW`].
    pub auth_failures: u32,
}

impl Limits {
    /// The limits of `config`.
    pub fn of(config: &crate::config::Config) -> Self {
        Limits {
            connections: config.server_smtp_client_connection_limit,
            rate: config.server_smtp_client_connection_rate,
            auth_failures: config.server_smtp_auth_failure_limit,
        }
    }
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many sessions open from this client.
    Count,
    /// Too many new sessions from this client in the last minute.
    Rate,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Count => "client_limit",
            Refusal::Rate => "client_rate",
        }
    }

    /// The `421` reply for host `host` to client `client`.
    pub fn reply(self, host: &str, client: ClientKey) -> String {
        match self {
            Refusal::Count => {
                format!("421 4.7.0 {host} Error: too many connections from {client}\r\n")
            }
            Refusal::Rate => {
                format!("421 4.7.0 {host} Error: too many connections from {client} per minute; try again later\r\n")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Client {
    open: usize,
    /// Starts of admitted sessions within the rate window (at most `rate` kept).
    starts: VecDeque<Instant>,
    /// Failed AUTH attempts within the window.
    failures: VecDeque<Instant>,
    /// AUTH attempts being checked now.
    checking: u32,
    /// When each kind of refusal was last logged.
    logged: HashMap<&'static str, Instant>,
}

impl Client {
    fn idle(&self) -> bool {
        self.open == 0 && self.starts.is_empty() && self.failures.is_empty() && self.checking == 0
    }

    fn expire(&mut self, now: Instant) {
        drop_older(&mut self.starts, now, RATE_WINDOW);
        drop_older(&mut self.failures, now, AUTH_WINDOW);
        self.logged
            .retain(|_, at| now.duration_since(*at) < RATE_WINDOW);
    }
}

fn drop_older(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

/// The per-client counts: the pure policy of anvil. Time comes in as `now`.
#[derive(Debug, Default)]
pub struct ClientTable {
    limits: Limits,
    clients: HashMap<ClientKey, Client>,
}

impl ClientTable {
    /// An empty table under `limits`.
    pub fn new(limits: Limits) -> Self {
        ClientTable {
            limits,
            clients: HashMap::new(),
        }
    }

    /// New limits; the counts stay.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// A new session from `key` at `now`: admitted (and counted) or refused.
    pub fn connect(&mut self, key: ClientKey, now: Instant) -> Result<(), Refusal> {
        let limits = self.limits;
        let c = self.clients.entry(key).or_default();
        c.expire(now);
        if limits.connections > 0 && c.open >= limits.connections {
            return Err(Refusal::Count);
        }
        if limits.rate > 0 && c.starts.len() >= limits.rate as usize {
            return Err(Refusal::Rate);
        }
        c.open += 1;
        if limits.rate > 0 {
            c.starts.push_back(now);
        }
        Ok(())
    }

    /// A session of `key` that was counted (by [`connect`](Self::connect) or
    /// [`opened`](Self::opened)) ended.
    pub fn disconnect(&mut self, key: ClientKey) {
        if let Some(c) = self.clients.get_mut(&key) {
            c.open = c.open.saturating_sub(1);
            if c.idle() {
                self.clients.remove(&key);
            }
        }
    }

    /// Counts a session that is already open (a restarted anvil learning the state).
    pub fn opened(&mut self, key: ClientKey) {
        self.clients.entry(key).or_default().open += 1;
    }

    /// Sessions open from `key`.
    pub fn open(&self, key: ClientKey) -> usize {
        self.clients.get(&key).map_or(0, |c| c.open)
    }

    /// An AUTH attempt from `key` wants to check a password: `true` (and the attempt is
    /// counted as pending) unless failures plus pending checks reach the limit.
    pub fn auth_begin(&mut self, key: ClientKey, now: Instant) -> bool {
        let limit = self.limits.auth_failures;
        let c = self.clients.entry(key).or_default();
        c.expire(now);
        if limit > 0 && c.failures.len() as u32 + c.checking >= limit {
            return false;
        }
        c.checking += 1;
        true
    }

    /// The attempt begun by [`auth_begin`](Self::auth_begin) ended: `ok` or a failure.
    pub fn auth_end(&mut self, key: ClientKey, ok: bool, now: Instant) {
        let c = self.clients.entry(key).or_default();
        c.checking = c.checking.saturating_sub(1);
        if !ok {
            c.failures.push_back(now);
        }
        if c.idle() {
            self.clients.remove(&key);
        }
    }

    /// Whether a refusal of kind `what` for `key` should be logged now (once a minute).
    pub fn should_log(&mut self, key: ClientKey, what: &'static str, now: Instant) -> bool {
        let c = self.clients.entry(key).or_default();
        match c.logged.get(what) {
            Some(at) if now.duration_since(*at) < RATE_WINDOW => false,
            _ => {
                c.logged.insert(what, now);
                true
            }
        }
    }

    /// Drops what has expired and clients with nothing left.
    pub fn prune(&mut self, now: Instant) {
        self.clients.retain(|_, c| {
            c.expire(now);
            !c.idle() || !c.logged.is_empty()
        });
    }

    /// Clients tracked (for tests and the size of the table).
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is tracked.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// The anvil actor.
pub struct Anvil;

/// Start-up arguments.
pub struct AnvilArgs {
    /// The limits in force.
    pub limits: Limits,
    /// Path in the tree, for logs.
    pub path: String,
}

/// What anvil hears.
pub enum AnvilMsg {
    /// May `ip` open a new session? Counted when admitted.
    Connect {
        /// The client.
        ip: IpAddr,
        /// The answer.
        reply: RpcReplyPort<Result<(), Refusal>>,
    },
    /// A session admitted by `Connect` (or reported by `Opened`) ended.
    Disconnect(IpAddr),
    /// Sessions already open (sent to a restarted anvil).
    Opened(Vec<IpAddr>),
    /// May `ip` check a password now? `false`: too many failures.
    AuthBegin {
        /// The client.
        ip: IpAddr,
        /// The answer.
        reply: RpcReplyPort<bool>,
    },
    /// The password check allowed by `AuthBegin` ended.
    AuthEnd {
        /// The client.
        ip: IpAddr,
        /// The password was right.
        ok: bool,
    },
    /// New limits (SIGHUP).
    Reload(Limits),
    /// Drop expired entries (timer).
    Prune,
}

/// The actor's state.
pub struct AnvilState {
    table: ClientTable,
    path: String,
}

impl Actor for Anvil {
    type Msg = AnvilMsg;
    type State = AnvilState;
    type Arguments = AnvilArgs;

    async fn pre_start(&self, myself: ActorRef<AnvilMsg>, args: AnvilArgs) -> Started<AnvilState> {
        myself.send_interval(PRUNE_EVERY, || AnvilMsg::Prune);
        info!(path = %args.path, "started");
        Ok(AnvilState {
            table: ClientTable::new(args.limits),
            path: args.path,
        })
    }

    async fn handle(
        &self, _myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State,
    ) -> Handled {
        let now = Instant::now();
        match msg {
            AnvilMsg::Connect { ip, reply } => {
                let key = ClientKey::of(ip);
                let verdict = state.table.connect(key, now);
                if let Err(refusal) = verdict {
                    metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => refusal.label())
                        .increment(1);
                    if state.table.should_log(key, refusal.label(), now) {
                        warn!(path = %state.path, client = %key, reason = refusal.label(),
                        "refusing connections from {key}: {} (logged once a minute)",
                        match refusal {
                            Refusal::Count => "server_smtp_client_connection_limit reached",
                            Refusal::Rate => "server_smtp_client_connection_rate reached",
                        });
                    }
                }
                let _ = reply.send(verdict);
            }
            AnvilMsg::Disconnect(ip) => state.table.disconnect(ClientKey::of(ip)),
            AnvilMsg::Opened(ips) => {
                for ip in ips {
                    state.table.opened(ClientKey::of(ip));
                }
            }
            AnvilMsg::AuthBegin { ip, reply } => {
                let key = ClientKey::of(ip);
                let allowed = state.table.auth_begin(key, now);
                if !allowed {
                    metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => "auth_failures")
                        .increment(1);
                    if state.table.should_log(key, "auth_failures", now) {
                        warn!(path = %state.path, client = %key, reason = "auth_failures",
                            "refusing AUTH from {key}: server_smtp_auth_failure_limit reached (logged once a minute)");
                    }
                }
                let _ = reply.send(allowed);
            }
            AnvilMsg::AuthEnd { ip, ok } => state.table.auth_end(ClientKey::of(ip), ok, now),
            AnvilMsg::Reload(limits) => state.table.set_limits(limits),
            AnvilMsg::Prune => state.table.prune(now),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: usize, rate: u32, auth_failures: u32) -> Limits {
        Limits {
            connections,
            rate,
            auth_failures,
        }
    }

    fn key(s: &str) -> ClientKey {
        ClientKey::of(s.parse().unwrap())
    }

    /// A table with these limits, the one client most tests follow (192.0.2.1), and the
    /// instant the test starts at.
    fn one_client(limits: Limits) -> (ClientTable, ClientKey, Instant) {
        (ClientTable::new(limits), key("192.0.2.1"), Instant::now())
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(key("192.0.2.7").to_string(), "192.0.2.7");
    }

    #[test]
    fn concurrent_sessions_are_limited_per_client() {
        let mut t = ClientTable::new(limits(2, 0, 0));
        let now = Instant::now();
        let (a, b) = (key("192.0.2.1"), key("192.0.2.2"));
        assert_eq!(t.connect(a, now), Ok(()));
        assert_eq!(t.connect(a, now), Ok(()));
        assert_eq!(t.connect(a, now), Err(Refusal::Count));
        // Another client is not affected.
        assert_eq!(t.connect(b, now), Ok(()));
        t.disconnect(a);
        assert_eq!(t.open(a), 1);
        assert_eq!(t.connect(a, now), Ok(()));
        // Rotating through one /64 does not help.
        let mut t = ClientTable::new(limits(2, 0, 0));
        for (i, ip) in ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
            .iter()
            .enumerate()
        {
            let r = t.connect(key(ip), now);
            assert_eq!(r.is_ok(), i < 2, "{ip}");
        }
    }

    #[test]
    fn rate_is_per_minute() {
        let (mut t, a, t0) = one_client(limits(0, 3, 0));
        for i in 0..3 {
            assert_eq!(t.connect(a, t0 + Duration::from_secs(i)), Ok(()));
            t.disconnect(a);
        }
        assert_eq!(
            t.connect(a, t0 + Duration::from_secs(10)),
            Err(Refusal::Rate)
        );
        // The first start leaves the window at t0 + 60 s.
        assert_eq!(t.connect(a, t0 + Duration::from_secs(60)), Ok(()));
        assert_eq!(
            t.connect(a, t0 + Duration::from_secs(60)),
            Err(Refusal::Rate)
        );
    }

    #[test]
    fn no_limits_admit_everything_and_forget_clients() {
        let mut t = ClientTable::new(limits(0, 0, 0));
        let now = Instant::now();
        for i in 0..1000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            assert_eq!(t.connect(ClientKey::of(ip), now), Ok(()));
            t.disconnect(ClientKey::of(ip));
        }
        assert!(t.is_empty());
    }

    #[test]
    fn parallel_guesses_are_counted_before_they_are_checked() {
        let (mut t, a, now) = one_client(limits(0, 0, 5));
        // Forty attempts start at once: five may check a password, the rest are refused.
        let allowed = (0..40).filter(|_| t.auth_begin(a, now)).count();
        assert_eq!(allowed, 5);
        for _ in 0..5 {
            t.auth_end(a, false, now);
        }
        // The right password from that address is refused too while the block lasts.
        assert!(!t.auth_begin(a, now + Duration::from_secs(299)));
        // Another address is not blocked: no account is locked for everyone.
        assert!(t.auth_begin(key("192.0.2.2"), now));
        // After the window the address may try again.
        assert!(t.auth_begin(a, now + Duration::from_secs(300)));
    }

    #[test]
    fn successes_do_not_count_as_failures() {
        let (mut t, a, now) = one_client(limits(0, 0, 2));
        for _ in 0..10 {
            assert!(t.auth_begin(a, now));
            t.auth_end(a, true, now);
        }
        assert!(t.is_empty());
    }

    #[test]
    fn refusals_are_logged_once_a_minute() {
        let (mut t, a, t0) = one_client(limits(1, 0, 0));
        assert!(t.should_log(a, "client_limit", t0));
        assert!(!t.should_log(a, "client_limit", t0 + Duration::from_secs(59)));
        assert!(t.should_log(a, "client_rate", t0 + Duration::from_secs(59)));
        assert!(t.should_log(a, "client_limit", t0 + Duration::from_secs(60)));
        t.prune(t0 + Duration::from_secs(200));
        assert!(t.is_empty());
    }
}
