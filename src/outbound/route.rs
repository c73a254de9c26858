//! Where a recipient's mail goes (REFERENCE "Outbound routing"): `server_smtp_routes`
//! (domain -> host:port) first, else `server_smtp_relay_host`, else DNS MX records by
//! preference, falling back to the domain's own A/AAAA (implicit MX) when it has none.
//! A null MX (`MX 0 .`, RFC 7505) and a domain that does not exist (NXDOMAIN) are
//! permanent failures; SERVFAIL, timeouts and other DNS trouble are temporary.
//!
//! DNS goes through hickory-resolver: only the servers in `dns_nameservers` when some
//! are given (tests point it at a loopback server, with caching off), the system's
//! configuration otherwise.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::TokioResolver;

use super::cache::ConnectionCache;
use super::connection::{DeliveryOptions, Hop};
use crate::config::{Config, TlsOutbound};
use crate::queue::outcome::FailureCause;

/// Where one recipient domain's mail is sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// A fixed host and port (`server_smtp_routes`, `server_smtp_relay_host`, or an
    /// address literal): no MX look-up; the host may be a name or an IP address.
    Route(String, u16),
    /// Look up the domain's MX records (port `server_smtp_remote_port`).
    Mx(String),
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NextHop::Route(h, p) if h.contains(':') => write!(f, "[{h}]:{p}"),
            NextHop::Route(h, p) => write!(f, "{h}:{p}"),
            NextHop::Mx(d) => write!(f, "MX of {d}"),
        }
    }
}

/// Why a next hop gave no address to try.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The domain publishes a null MX: it accepts no mail (permanent).
    #[error("domain {0} does not accept mail (null MX)")]
    NullMx(String),
    /// The domain, or the host a route names, does not exist (permanent).
    #[error("host or domain name not found: {0} (NXDOMAIN)")]
    NoSuchDomain(String),
    /// The domain exists but has neither MX nor address records (permanent).
    #[error("no MX and no address records for {0}")]
    NoAddress(String),
    /// DNS failed for now: SERVFAIL, timeout, unreachable servers (temporary).
    #[error("DNS look-up for {name} failed: {detail}")]
    DnsTemporary {
        /// The name looked up.
        name: String,
        /// What the resolver said.
        detail: String,
    },
    /// A route or relay host that is not `host:port` (temporary: fix the config).
    #[error("unusable route {0:?}")]
    BadRoute(String),
}

impl RouteError {
    /// The failure this means for the recipients behind the hop.
    pub fn cause(&self) -> FailureCause {
        match self {
            RouteError::NullMx(d) => FailureCause::NullMx(d.clone()),
            RouteError::NoSuchDomain(_) | RouteError::NoAddress(_) => {
                FailureCause::NoSuchDomain(self.to_string())
            }
            RouteError::DnsTemporary { .. } => FailureCause::DnsTemporary(self.to_string()),
            RouteError::BadRoute(_) => FailureCause::Local(self.to_string()),
        }
    }
}

/// The routing settings, taken from `Config` or built directly in tests.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// `server_smtp_routes`: domain -> `host:port`, checked first.
    pub routes: BTreeMap<String, String>,
    /// `server_smtp_relay_host`: `host:port` for every domain without a route.
    pub relay_host: Option<String>,
    /// `server_smtp_remote_port`: the port for MX (and address-literal) deliveries.
    pub remote_port: u16,
    /// `dns_nameservers`: when not empty, the only DNS servers asked.
    pub dns_nameservers: Vec<SocketAddr>,
    /// Timeouts and TLS policy for the SMTP client.
    pub delivery: DeliveryOptions,
}

impl RouterConfig {
    /// The routing settings of a loaded configuration.
    pub fn from_config(config: &Config) -> Self {
        RouterConfig {
            routes: config.server_smtp_routes.clone(),
            relay_host: config.server_smtp_relay_host.clone(),
            remote_port: config.server_smtp_remote_port,
            dns_nameservers: config.dns_nameservers.clone(),
            delivery: DeliveryOptions {
                starttls: config.server_smtp_tls_outbound != TlsOutbound::None,
                require_tls: config.server_smtp_tls_outbound == TlsOutbound::Require,
                own_name: Some(config.server_smtp_name.clone()),
                // Where this erlmail listens: a next hop there is a loop.
                own_addrs: config
                    .smtp_listen_addrs()
                    .into_iter()
                    .filter(|a| a.port() != 0)
                    .collect(),
                ..DeliveryOptions::with_timeout(config.server_smtp_timeout)
            },
        }
    }
}

/// Decides and resolves next hops, and holds the SMTP connections idle between
/// deliveries. Cheap to share (`Arc<Router>`); one per sender process is enough. A new
/// router (a configuration reload, each test's own) starts with an empty connection
/// cache, and dropping one closes its idle connections.
pub struct Router {
    config: RouterConfig,
    /// Routes keyed by lower-case domain without trailing dot.
    routes: BTreeMap<String, String>,
    resolver: TokioResolver,
    /// Connections that finished a transaction cleanly, ready for the next message to
    /// the same host; tied to this configuration so a reload never reuses a connection
    /// made under the old TLS policy or name.
    cache: ConnectionCache,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.config)
            .field("cache", &self.cache)
            .finish()
    }
}

/// Why a router could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RouterBuildError {
    /// The system resolver configuration could not be read or used.
    #[error("DNS resolver: {0}")]
    Resolver(#[from] NetError),
}

/// The resolver erlmail asks: only `nameservers` (UDP and TCP, no hosts file, no cache,
/// 2 s a try, two tries) when given, the system configuration otherwise.
pub fn resolver_for(nameservers: &[SocketAddr]) -> Result<TokioResolver, NetError> {
    if nameservers.is_empty() {
        let mut builder = TokioResolver::builder_tokio()?;
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        return builder.build();
    }
    let servers = nameservers
        .iter()
        .map(|sa| {
            let mut udp = ConnectionConfig::udp();
            udp.port = sa.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = sa.port();
            NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = 0;
    opts.timeout = std::time::Duration::from_secs(2);
    opts.attempts = 2;
    let rc = ResolverConfig::from_name_servers(servers);
    TokioResolver::builder_with_config(rc, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
}

impl Router {
    /// A router with its resolver: only `dns_nameservers` (UDP and TCP, no hosts file,
    /// no cache) when given, the system configuration otherwise.
    pub fn new(config: RouterConfig) -> Result<Self, RouterBuildError> {
        let resolver = resolver_for(&config.dns_nameservers)?;
        let routes = config
            .routes
            .iter()
            .map(|(d, r)| (normalise_domain(d), r.clone()))
            .collect();
        Ok(Router {
            config,
            routes,
            resolver,
            cache: ConnectionCache::new(),
        })
    }

    /// The SMTP client options deliveries through this router use.
    pub fn delivery_options(&self) -> &DeliveryOptions {
        &self.config.delivery
    }

    /// The idle connections deliveries through this router reuse.
    pub fn connection_cache(&self) -> &ConnectionCache {
        &self.cache
    }

    /// The next hop for a recipient domain (as `recipient_domain` gives it): its route,
    /// else the relay host, else its MX. Address literals (`[192.0.2.1]`,
    /// `[IPv6:2001:db8::1]`) go straight to that address when no route or relay applies.
    /// An unparseable route is kept as a `Route` with port 0 and fails in `resolve`.
    pub fn next_hop(&self, domain: &str) -> NextHop {
        let domain = normalise_domain(domain);
        if let Some(route) = self.routes.get(&domain) {
            return parse_route(route, self.config.remote_port);
        }
        if let Some(relay) = &self.config.relay_host {
            return parse_route(relay, self.config.remote_port);
        }
        if let Some(ip) = address_literal(&domain) {
            return NextHop::Route(ip.to_string(), self.config.remote_port);
        }
        NextHop::Mx(domain)
    }

    /// The hosts to try for a next hop, in order: for a route its host's addresses; for
    /// an MX hop each MX host's addresses by preference (ties in a new random order each
    /// call, so each attempt spreads the load), or the domain's own addresses when it
    /// has no MX. Duplicate addresses are dropped.
    pub async fn resolve(&self, hop: &NextHop) -> Result<Vec<Hop>, RouteError> {
        let hops = match hop {
            NextHop::Route(host, port) => {
                if *port == 0 || host.is_empty() {
                    return Err(RouteError::BadRoute(host.clone()));
                }
                self.host_addresses(host, *port).await?
            }
            NextHop::Mx(domain) => self.mx_hosts(domain).await?,
        };
        let mut seen = std::collections::HashSet::new();
        Ok(hops.into_iter().filter(|h| seen.insert(h.addr)).collect())
    }

    /// The next hop and its hosts for a recipient domain in one call.
    pub async fn resolve_domain(&self, domain: &str) -> Result<Vec<Hop>, RouteError> {
        self.resolve(&self.next_hop(domain)).await
    }

    async fn mx_hosts(&self, domain: &str) -> Result<Vec<Hop>, RouteError> {
        let port = self.config.remote_port;
        let mxs: Vec<(u16, Name)> = match self.resolver.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => return Err(RouteError::NoSuchDomain(domain.into())),
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => {
                return Err(RouteError::DnsTemporary {
                    name: domain.into(),
                    detail: e.to_string(),
                })
            }
        };
        if mxs.iter().any(|(_, ex)| ex.is_root()) {
            return Err(RouteError::NullMx(domain.into()));
        }
        if mxs.is_empty() {
            // Implicit MX (RFC 5321 §5.1): the domain itself, if it has addresses.
            return match self.host_addresses(domain, port).await {
                Err(RouteError::NoSuchDomain(_)) => Err(RouteError::NoAddress(domain.into())),
                other => other,
            };
        }
        // Ordered before any await: the thread's random generator must not be held
        // across one.
        let ordered = order_mx(mxs, &mut rand::rng());
        let mut hops = Vec::new();
        let mut last_err = None;
        for exchange in ordered {
            let host = exchange.to_ascii();
            let host = host.trim_end_matches('.').to_string();
            match self.host_addresses(&host, port).await {
                Ok(mut h) => hops.append(&mut h),
                Err(e) => {
                    tracing::debug!(mx = %host, error = %e, "MX host not resolved");
                    // A temporary failure outweighs "does not exist" when nothing resolves.
                    if !matches!(last_err, Some(RouteError::DnsTemporary { .. })) {
                        last_err = Some(e);
                    }
                }
            }
        }
        if hops.is_empty() {
            return Err(last_err.unwrap_or(RouteError::NoAddress(domain.into())));
        }
        Ok(hops)
    }

    /// A host's addresses: itself if it is an IP address, else its A and AAAA records.
    async fn host_addresses(&self, host: &str, port: u16) -> Result<Vec<Hop>, RouteError> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![Hop {
                host: host.to_string(),
                addr: SocketAddr::new(ip, port),
            }]);
        }
        match self.resolver.lookup_ip(fqdn(host)).await {
            Ok(ips) => {
                let hops: Vec<Hop> = ips
                    .iter()
                    .map(|ip| Hop {
                        host: host.to_string(),
                        addr: SocketAddr::new(ip, port),
                    })
                    .collect();
                if hops.is_empty() {
                    Err(RouteError::NoSuchDomain(host.into()))
                } else {
                    Ok(hops)
                }
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                Err(RouteError::NoSuchDomain(host.into()))
            }
            Err(e) => Err(RouteError::DnsTemporary {
                name: host.into(),
                detail: e.to_string(),
            }),
        }
    }
}

/// The domain of a recipient address: after the last `@`, lower-cased, without a
/// trailing dot; empty when there is no `@`.
pub fn recipient_domain(rcpt: &str) -> String {
    let rcpt = rcpt.trim().trim_start_matches('<').trim_end_matches('>');
    rcpt.rsplit_once('@')
        .map(|(_, d)| normalise_domain(d))
        .unwrap_or_default()
}

fn normalise_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// A name as a fully qualified DNS name, so no search domain is ever appended.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// `host:port`, `[v6]:port`, `v4:port`, or a bare `host` (port `default_port`).
/// Unparseable input gives port 0, which `resolve` rejects.
fn parse_route(route: &str, default_port: u16) -> NextHop {
    let route = route.trim();
    if let Ok(sa) = route.parse::<SocketAddr>() {
        return NextHop::Route(sa.ip().to_string(), sa.port());
    }
    if let Some(rest) = route.strip_prefix('[') {
        // [host]:port or [host]
        if let Some((host, tail)) = rest.split_once(']') {
            let port = match tail.strip_prefix(':') {
                Some(p) => p.parse().unwrap_or(0),
                None if tail.is_empty() => default_port,
                None => 0,
            };
            return NextHop::Route(host.to_string(), port);
        }
        return NextHop::Route(route.to_string(), 0);
    }
    if route.parse::<IpAddr>().is_ok() {
        return NextHop::Route(route.to_string(), default_port);
    }
    match route.rsplit_once(':') {
        Some((host, port)) => NextHop::Route(host.to_string(), port.parse().unwrap_or(0)),
        None => NextHop::Route(route.to_string(), default_port),
    }
}

/// The address in a domain literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner
        .strip_prefix("ipv6:")
        .or_else(|| inner.strip_prefix("IPv6:"))
        .unwrap_or(inner);
    inner.parse().ok()
}

/// MX hosts by preference, hosts of equal preference in random order (RFC 5321 §5.1:
/// the sender must spread the load across them).
fn order_mx<T>(mut mxs: Vec<(u16, T)>, rng: &mut impl rand::Rng) -> Vec<T> {
    use rand::seq::SliceRandom;
    mxs.shuffle(rng);
    // A stable sort: the shuffled order stays within each preference.
    mxs.sort_by_key(|(pref, _)| *pref);
    mxs.into_iter().map(|(_, host)| host).collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_listening_addresses_are_where_a_next_hop_would_loop() {
        let config = crate::config::Config {
            server_smtp_address: "::".parse().unwrap(),
            server_smtp_port: 2525,
            server_smtp_tls_port: Some(4650),
            ..crate::config::Config::default()
        };
        let opts = super::RouterConfig::from_config(&config).delivery;
        let at = |s: &str| opts.is_own_address(s.parse().unwrap());
        assert!(at("127.0.0.1:2525") && at("127.0.0.9:4650") && at("[::1]:2525"));
        assert!(at("[::ffff:127.0.0.1]:2525"), "IPv4-mapped");
        assert!(!at("127.0.0.1:25"), "another port");
        assert_eq!(
            opts.own_name.as_deref(),
            Some(config.server_smtp_name.as_str())
        );
        // Not an address of this host (TEST-NET-3, never assigned here).
        assert!(!at("203.0.113.7:2525"));
        let ephemeral = crate::config::Config {
            server_smtp_port: 0,
            ..crate::config::Config::default()
        };
        let opts = super::RouterConfig::from_config(&ephemeral).delivery;
        assert!(opts.own_addrs.is_empty(), "port 0 is no address to compare");
    }

    #[test]
    fn equal_preferences_come_in_every_order_lower_ones_first() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let order = order_mx(vec![(20, "c"), (10, "a"), (10, "b"), (30, "d")], &mut rng);
            assert_eq!(&order[2..], &["c", "d"], "preferences keep their order");
            firsts.insert(order[0]);
        }
        assert_eq!(
            firsts.len(),
            2,
            "both hosts of preference 10 come first at times"
        );
    }
    use super::*;

    #[test]
    fn route_parsing() {
        for (route, host, port) in [
            ("relay.test:2525", "relay.test", 2525),
            ("127.0.0.1:2525", "127.0.0.1", 2525),
            ("[::1]:26", "::1", 26),
            ("relay.test", "relay.test", 25),
            ("::1", "::1", 25),
            ("relay:x", "relay", 0),
        ] {
            let want = NextHop::Route(host.into(), port);
            assert_eq!(parse_route(route, 25), want, "{route}");
        }
    }

    #[test]
    fn domains() {
        assert_eq!(recipient_domain("Bob@Example.ORG."), "example.org");
        assert_eq!(recipient_domain("<a@b.test>"), "b.test");
        assert_eq!(recipient_domain("postmaster"), "");
        assert_eq!(address_literal("[ipv6:::1]"), Some("::1".parse().unwrap()));
        assert_eq!(
            address_literal("[127.0.0.1]"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(address_literal("example.org"), None);
    }

    #[test]
    fn route_error_causes() {
        use crate::queue::outcome::Outcome;
        assert_eq!(
            RouteError::NullMx("a".into()).cause().outcome(),
            Outcome::Permanent
        );
        assert_eq!(
            RouteError::NoSuchDomain("a".into()).cause().outcome(),
            Outcome::Permanent
        );
        assert_eq!(
            RouteError::DnsTemporary {
                name: "a".into(),
                detail: "SERVFAIL".into()
            }
            .cause()
            .outcome(),
            Outcome::Temporary
        );
        assert_eq!(
            RouteError::BadRoute("x".into()).cause().outcome(),
            Outcome::Temporary
        );
    }
}
