//! Typed configuration: every ErlMail key at its ErlMail default plus erlmail's own keys.
//!
//! This module owns the `Config` struct, its defaults and its validation. YAML is the
//! primary format; ErlMail's own Erlang term files (`.app` and sys.config shapes) are read
//! by `config/erlang.rs`. Errors always name the file, line and column. Nothing here
//! opens sockets or touches the store; the only file read is the one `Config::load` is
//! asked to load.
//!
//! Layout: `values.rs` (typed values: durations, CIDRs, next hops), `apply.rs` (the key
//! table, applied through serde so every format shares it), `yaml.rs` (YAML in and out),
//! `erlang.rs` (ErlMail's Erlang term files), `per_config.rs` (what is built once per
//! configuration).

mod apply;
pub mod erlang;
mod per_config;
#[cfg(test)]
mod tests;
pub mod values;
mod yaml;

pub use apply::{is_ignored_key, IGNORED_PREFIXES, SERVED_KEYS};
pub use per_config::PerConfig;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Outbound STARTTLS policy (`server_smtp_tls_outbound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsOutbound {
    /// Use STARTTLS when the next hop offers it; deliver in plain text otherwise.
    #[default]
    May,
    /// Deliver only over TLS: a next hop without STARTTLS is a temporary failure.
    Require,
    /// Never use STARTTLS.
    None,
}

impl TlsOutbound {
    /// The configuration spelling: `may`, `require` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsOutbound::May => "may",
            TlsOutbound::Require => "require",
            TlsOutbound::None => "none",
        }
    }
}

impl values::Scalar for TlsOutbound {
    const EXPECTING: &'static str = "may, require or none";
    fn from_text(s: &str) -> Result<Self, String> {
        match s {
            "may" => Ok(TlsOutbound::May),
            "require" => Ok(TlsOutbound::Require),
            "none" => Ok(TlsOutbound::None),
            _ => Err(format!(
                "bad server_smtp_tls_outbound `{s}`: expected may, require or none"
            )),
        }
    }
}

/// One DKIM signing key (`server_smtp_dkim_keys`): mail whose `From:` domain is
/// `domain` or below it is signed as `d=domain; s=selector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeyConfig {
    /// The signing domain (`d=`), lower case.
    pub domain: String,
    /// The selector (`s=`): the key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM file with the private key (RSA, PKCS#1 or PKCS#8; Ed25519, PKCS#8).
    pub private_key: PathBuf,
}

/// What a DMARC failure under `p=reject` or `p=quarantine` does to mail for local users
/// (`server_smtp_dmarc_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmarcPolicy {
    /// Follow the domain's policy: `reject` gets `550 5.7.1`, `quarantine` goes to the
    /// recipient's Junk mailbox.
    #[default]
    Enforce,
    /// Only record the result in `Authentication-Results:`.
    Report,
}

impl DmarcPolicy {
    /// The configuration spelling: `enforce` or `report`.
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::Enforce => "enforce",
            DmarcPolicy::Report => "report",
        }
    }
}

impl values::Scalar for DmarcPolicy {
    const EXPECTING: &'static str = "enforce or report";
    fn from_text(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(DmarcPolicy::Enforce),
            "report" => Ok(DmarcPolicy::Report),
            _ => Err(format!(
                "bad server_smtp_dmarc_policy `{s}`: expected enforce or report"
            )),
        }
    }
}

/// The effective configuration of an erlmail node.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    // ---- ErlMail's keys (defaults from erlmail.app) ----
    /// Servers ErlMail starts; erlmail serves `smtp` only.
    pub server_list: Vec<String>,
    /// Whether the SMTP listener starts. ErlMail's default was `false`; erlmail's is `true`
    /// because serving SMTP is all it does (a documented difference). An explicit `false`
    /// is honoured.
    pub server_smtp_start: bool,
    /// Host name in the banner, EHLO reply, `Received:` headers and outbound EHLO.
    pub server_smtp_name: String,
    /// SMTP listening port.
    pub server_smtp_port: u16,
    /// Most SMTP sessions open at once (ErlMail never enforced it; erlmail does). Above
    /// 80% of it the daemon is under stress: shorter timeouts, error limit 1.
    pub server_smtp_max_connection: usize,
    /// Text after `220 <name> ESMTP `.
    pub server_smtp_greeting: String,
    /// Networks allowed to relay to any address.
    pub server_smtp_relay_clients: Vec<IpNet>,
    /// Retries after the first try; 0 fails after the first try.
    pub server_smtp_retries: u32,
    /// Wait before each retry; the last value repeats.
    pub server_smtp_retry_interval: Vec<Duration>,
    /// Whether failed deliveries produce a DSN to the sender (ErlMail's historic spelling).
    pub server_stmp_failure_notification: bool,

    // ---- erlmail's own keys ----
    /// Address the SMTP listener binds; `::` (the default) is IPv4 and IPv6 on one
    /// dual-stack socket.
    pub server_smtp_address: IpAddr,
    /// Store location: `sqlite://PATH` or `postgres://...`; `None` means the SQLite file
    /// `erlmail.db` inside `spool_dir`.
    pub store_url: Option<String>,
    /// Smarthost (`host:port`) for every non-routed domain.
    pub server_smtp_relay_host: Option<String>,
    /// Per-domain next hop (`domain -> host:port`), consulted first.
    pub server_smtp_routes: BTreeMap<String, String>,
    /// How often the queue looks for due messages.
    pub server_smtp_queue_interval: Duration,
    /// How long a claimed message stays locked to this node without renewal.
    pub server_smtp_lock_lease: Duration,
    /// Largest message accepted, in octets.
    pub server_smtp_max_message_size: u64,
    /// Most recipients per transaction (ErlMail: 100).
    pub server_smtp_max_recipients: usize,
    /// Idle timeout of an SMTP session.
    pub server_smtp_timeout: Duration,
    /// Errors after which a session is closed.
    pub server_smtp_hard_error_limit: u32,
    /// Most sessions open at once from one client address (an IPv6 client counts per
    /// /64); 0: no per-client limit. Postfix: `smtpd_client_connection_count_limit`.
    pub server_smtp_client_connection_limit: usize,
    /// Most new sessions per client address per minute; 0: unlimited. Postfix:
    /// `smtpd_client_connection_rate_limit`.
    pub server_smtp_client_connection_rate: u32,
    /// Slowest DATA transfer a session may keep up, in bytes per second; 0: no minimum
    /// (DATA is then bounded by `server_smtp_timeout` alone). Postfix:
    /// `smtpd_min_data_rate`.
    pub server_smtp_min_data_rate: u64,
    /// Failed AUTH attempts allowed per client address in five minutes; then `454 4.7.0`
    /// for that address until the window passes. 0: no limit.
    pub server_smtp_auth_failure_limit: u32,
    /// Most `Received:` headers before a message is refused as looping.
    pub server_smtp_max_hops: u32,
    /// Most senders at once; 0 makes a front node: it accepts and queues mail, never
    /// delivers it (the other nodes sharing its store do).
    pub server_smtp_max_senders: usize,
    /// How long a graceful stop waits for deliveries already on the wire to finish
    /// before exiting (their leases are then left to lapse, never handed to another
    /// node while the transaction may still complete).
    pub server_smtp_shutdown_timeout: Duration,
    /// Port for MX deliveries.
    pub server_smtp_remote_port: u16,
    /// When a delay DSN is sent; `None` means never.
    pub server_smtp_delay_warning: Option<Duration>,
    /// PEM certificate chain for STARTTLS.
    pub server_smtp_tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    pub server_smtp_tls_key: Option<PathBuf>,
    /// Port of an implicit-TLS (SMTPS, e.g. 465) listener; `None` means none. Needs the
    /// certificate and key.
    pub server_smtp_tls_port: Option<u16>,
    /// Whether a client authenticated with SMTP AUTH may relay.
    pub server_smtp_relay_auth: bool,
    /// Outbound STARTTLS policy.
    pub server_smtp_tls_outbound: TlsOutbound,
    /// The name in the EHLO erlmail sends to next hops; `None` is `server_smtp_name`
    /// (ErlMail's `ehlo`). A next hop that names `server_smtp_name` is still a loop.
    pub server_smtp_ehlo_name: Option<String>,
    /// DKIM keys: relayed mail whose `From:` domain has one is signed at accept.
    pub server_smtp_dkim_keys: Vec<DkimKeyConfig>,
    /// What a DMARC failure does to mail for local users.
    pub server_smtp_dmarc_policy: DmarcPolicy,
    /// DNS servers for MX look-ups; empty means the system resolver.
    pub dns_nameservers: Vec<SocketAddr>,
    /// This node's name, stamped on the queue locks it takes.
    pub node_name: String,
    /// Admin HTTP endpoint; `None` means off.
    pub admin_listen: Option<SocketAddr>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Directory for the SQLite store and other spool files.
    pub spool_dir: PathBuf,
    /// When set, local deliveries are also written to `<root>/<domain>/<user>/` Maildirs.
    pub maildir_root: Option<PathBuf>,

    /// Keys that were read but that erlmail does not serve (IMAP, POP, Mnesia, antispam);
    /// reported once at start-up. Not part of the effective configuration.
    pub ignored_keys: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_list: vec!["smtp".into(), "imap".into(), "pop".into()],
            server_smtp_start: true,
            server_smtp_name: "smtp.erlsoft.net".into(),
            server_smtp_port: 25,
            server_smtp_max_connection: 1000,
            server_smtp_greeting: "ErlMail http://erlsoft.org (NO UCE)".into(),
            server_smtp_relay_clients: Vec::new(),
            server_smtp_retries: 10,
            server_smtp_retry_interval: [15u64, 30, 60, 240]
                .iter()
                .map(|m| Duration::from_secs(m * 60))
                .collect(),
            server_stmp_failure_notification: true,
            server_smtp_address: IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            store_url: None,
            server_smtp_relay_host: None,
            server_smtp_routes: BTreeMap::new(),
            server_smtp_queue_interval: Duration::from_secs(1),
            server_smtp_lock_lease: Duration::from_secs(300),
            server_smtp_max_message_size: 10_240_000,
            server_smtp_max_recipients: 100,
            server_smtp_timeout: Duration::from_secs(300),
            server_smtp_hard_error_limit: 20,
            server_smtp_client_connection_limit: 10,
            server_smtp_client_connection_rate: 0,
            server_smtp_min_data_rate: 500,
            server_smtp_auth_failure_limit: 5,
            server_smtp_max_hops: 50,
            server_smtp_max_senders: 20,
            server_smtp_shutdown_timeout: Duration::from_secs(30),
            server_smtp_remote_port: 25,
            server_smtp_delay_warning: None,
            server_smtp_tls_cert: None,
            server_smtp_tls_key: None,
            server_smtp_tls_port: None,
            server_smtp_relay_auth: true,
            server_smtp_tls_outbound: TlsOutbound::May,
            server_smtp_ehlo_name: None,
            server_smtp_dkim_keys: Vec::new(),
            server_smtp_dmarc_policy: DmarcPolicy::Enforce,
            dns_nameservers: Vec::new(),
            node_name: default_node_name(),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8025))),
            log_format: LogFormat::Text,
            spool_dir: PathBuf::from("spool"),
            maildir_root: None,
            ignored_keys: Vec::new(),
        }
    }
}

impl Config {
    /// Where the SMTP listeners are: `server_smtp_address` with `server_smtp_port`, and
    /// with `server_smtp_tls_port` when there is one (a port of 0 is the kernel's choice).
    pub fn smtp_listen_addrs(&self) -> Vec<std::net::SocketAddr> {
        std::iter::once(self.server_smtp_port)
            .chain(self.server_smtp_tls_port)
            .map(|port| std::net::SocketAddr::new(self.server_smtp_address, port))
            .collect()
    }

    /// The store URL in effect: `store_url`, or the SQLite file in `spool_dir`.
    pub fn effective_store_url(&self) -> String {
        match &self.store_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.spool_dir.join("erlmail.db").display()),
        }
    }
}

fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "erlmail".into())
}

/// A configuration error, at the file, line and column of the offending token.
///
/// `line` and `column` are 1-based; both are 0 when the error has no position (a missing
/// file, or a rule that spans keys that were left at their defaults). For `-o key=value`
/// overrides, `file` is `-o key=value`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", position_suffix(*.line, *.column))]
pub struct ConfigError {
    /// The file (as given), or `-o key=value` for an override.
    pub file: String,
    /// 1-based line, or 0 when unknown.
    pub line: usize,
    /// 1-based column, or 0 when unknown. YAML columns count characters; Erlang columns
    /// count bytes (a tab is one column).
    pub column: usize,
    /// What is wrong, without the position.
    pub message: String,
}

fn position_suffix(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

impl ConfigError {
    fn new(file: &str, line: usize, column: usize, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// The two file formats a configuration can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Yaml,
    Erlang,
}

impl Format {
    /// By extension first (.app/.config/.erl/.term are Erlang, .yaml/.yml YAML), otherwise
    /// by content: a first non-comment character `{`, or `[` followed by `{` or `]`, is an
    /// Erlang term.
    fn detect(path: &Path, src: &str) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("app" | "config" | "erl" | "term") => return Format::Erlang,
            Some("yaml" | "yml") => return Format::Yaml,
            _ => {}
        }
        let body: String = src
            .lines()
            .map(str::trim_start)
            .filter(|l| !l.starts_with('#') && !l.starts_with('%'))
            .collect::<Vec<_>>()
            .join("\n");
        let mut chars = body.chars().filter(|c| !c.is_whitespace());
        match (chars.next(), chars.next()) {
            (Some('{'), _) | (Some('['), Some('{' | ']')) => Format::Erlang,
            _ => Format::Yaml,
        }
    }
}

/// Applies a whole document onto `config`; returns the served keys it set.
fn apply_document(
    config: &mut Config, src: &str, file: &str, format: Format,
) -> Result<Vec<&'static str>, ConfigError> {
    match format {
        Format::Yaml => yaml::apply_yaml(src, config).map_err(|e| {
            let (line, column) = e.position.unwrap_or((0, 0));
            ConfigError::new(file, line, column, e.message)
        }),
        Format::Erlang => {
            let term_err =
                |e: erlang::TermError| ConfigError::new(file, e.pos.line, e.pos.column, e.message);
            let doc = erlang::parse_document(src).map_err(term_err)?;
            let Some(env) = erlang::erlmail_env(&doc).map_err(term_err)? else {
                return Ok(Vec::new());
            };
            let mut apply = apply::Apply::new(config);
            apply.lenient = true;
            serde::de::DeserializeSeed::deserialize(&mut apply, erlang::TermDe(env)).map_err(
                |e| {
                    let pos = e.pos.unwrap_or(env.pos);
                    ConfigError::new(file, pos.line, pos.column, e.message)
                },
            )?;
            Ok(apply.set_keys)
        }
    }
}

/// Where each key that was set came from, to place errors found by `validate`.
#[derive(Default)]
struct Origins<'a> {
    file: Option<(&'a str, &'a str, Format)>,
    /// Served keys set by overrides, with the override text, last one winning.
    overrides: Vec<(&'static str, String)>,
}

impl Origins<'_> {
    fn place(&self, key: &str, message: String) -> ConfigError {
        if let Some((_, text)) = self.overrides.iter().rev().find(|(k, _)| *k == key) {
            return ConfigError::new(&format!("-o {text}"), 0, 0, message);
        }
        match self.file {
            Some((file, src, format)) => {
                let (line, column) = find_key(src, key, format).unwrap_or((0, 0));
                ConfigError::new(file, line, column, message)
            }
            None => ConfigError::new("configuration", 0, 0, message),
        }
    }
}

/// The first place `key` is written as a key in `src` (comments skipped), 1-based.
fn find_key(src: &str, key: &str, format: Format) -> Option<(usize, usize)> {
    let comment = if format == Format::Yaml { '#' } else { '%' };
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '@';
    for (n, line) in src.lines().enumerate() {
        let code = line.split(comment).next().unwrap_or("");
        let mut from = 0;
        while let Some(i) = code[from..].find(key) {
            let at = from + i;
            let before = code[..at].chars().next_back();
            let after = code[at + key.len()..].chars().next();
            if !before.is_some_and(ident) && !after.is_some_and(ident) {
                return Some((n + 1, at + 1));
            }
            from = at + key.len();
        }
    }
    None
}

impl Config {
    /// Loads a configuration file (YAML, or ErlMail's `.app` / sys.config Erlang terms)
    /// over the defaults, and validates it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_overrides(Some(path), &[])
    }

    /// Loads `path` (or starts from the defaults when `None`), then applies `key=value`
    /// overrides in order (values read as YAML scalars or flow collections, like
    /// `server_smtp_port=0` or `server_smtp_relay_clients=[127.0.0.1/32]`), then validates.
    pub fn load_with_overrides(
        path: Option<&Path>, overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let file = path.map(|p| p.display().to_string());
        let src = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                ConfigError::new(&p.display().to_string(), 0, 0, format!("cannot read: {e}"))
            })?,
            None => String::new(),
        };
        let mut origins = Origins::default();
        if let (Some(p), Some(file)) = (path, file.as_deref()) {
            let format = Format::detect(p, &src);
            apply_document(&mut config, &src, file, format)?;
            origins.file = Some((file, &src, format));
        }
        for text in overrides {
            let override_err = |m: String| ConfigError::new(&format!("-o {text}"), 0, 0, m);
            let Some((key, value)) = text.split_once('=') else {
                return Err(override_err("expected key=value".into()));
            };
            let key = key.trim();
            yaml::apply_override(key, value, &mut config).map_err(override_err)?;
            if let Some(k) = SERVED_KEYS.iter().find(|k| **k == key) {
                origins.overrides.push((k, text.clone()));
            }
        }
        config.check().map_err(|(key, m)| origins.place(key, m))?;
        Ok(config)
    }

    /// Reads a YAML document over the defaults and validates it; `file` names it in errors.
    pub fn from_yaml_str(src: &str, file: &str) -> Result<Config, ConfigError> {
        Config::from_str_as(src, file, Format::Yaml)
    }

    /// Reads an ErlMail Erlang term document (`.app` or sys.config shape) over the
    /// defaults and validates it; `file` names it in errors.
    pub fn from_erlang_str(src: &str, file: &str) -> Result<Config, ConfigError> {
        Config::from_str_as(src, file, Format::Erlang)
    }

    fn from_str_as(src: &str, file: &str, format: Format) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        apply_document(&mut config, src, file, format)?;
        let origins = Origins {
            file: Some((file, src, format)),
            overrides: Vec::new(),
        };
        config.check().map_err(|(key, m)| origins.place(key, m))?;
        Ok(config)
    }

    /// The effective configuration as erlmail YAML: every key (ErlMail's first), durations
    /// as unit strings (`"15m"`), unset options as `null`; `ignored_keys` is left out.
    /// `from_yaml_str` reads it back to an equal configuration.
    pub fn to_yaml(&self) -> String {
        yaml::to_yaml(self)
    }

    /// Checks rules that span keys or that types cannot express (no retry interval,
    /// zero limits, a TLS certificate without its key, an unknown store URL scheme, ...).
    /// The error has no file position; `load` and the `from_*_str` functions run the same
    /// checks and place the error at the key in the file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check()
            .map_err(|(_, m)| ConfigError::new("configuration", 0, 0, m))
    }

    /// The validation rules; the error names the key to blame.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let fail = |key: &'static str, m: &str| Err((key, format!("{key}: {m}")));
        if self.server_smtp_retry_interval.is_empty() {
            return fail(
                "server_smtp_retry_interval",
                "needs at least one interval (the last one repeats)",
            );
        }
        // server_smtp_max_senders may be 0: a front node, which accepts and queues but
        // leaves delivery to the other nodes sharing its store.
        let zero_counts: [(&'static str, u64); 4] = [
            (
                "server_smtp_max_connection",
                self.server_smtp_max_connection as u64,
            ),
            (
                "server_smtp_max_recipients",
                self.server_smtp_max_recipients as u64,
            ),
            ("server_smtp_max_hops", u64::from(self.server_smtp_max_hops)),
            (
                "server_smtp_hard_error_limit",
                u64::from(self.server_smtp_hard_error_limit),
            ),
        ];
        if let Some((key, _)) = zero_counts.iter().find(|(_, v)| *v == 0) {
            return fail(key, "must be at least 1");
        }
        let zero_times = [
            (
                "server_smtp_queue_interval",
                self.server_smtp_queue_interval,
            ),
            ("server_smtp_lock_lease", self.server_smtp_lock_lease),
            ("server_smtp_timeout", self.server_smtp_timeout),
        ];
        if let Some((key, _)) = zero_times.iter().find(|(_, d)| d.is_zero()) {
            return fail(key, "must be longer than 0s");
        }
        if self.server_smtp_name.is_empty()
            || self.server_smtp_name.contains(|c: char| c.is_whitespace())
        {
            return fail("server_smtp_name", "must be a host name without spaces");
        }
        if self.node_name.trim().is_empty() {
            return fail("node_name", "must not be empty");
        }
        match (&self.server_smtp_tls_cert, &self.server_smtp_tls_key) {
            (Some(_), None) => {
                return fail(
                    "server_smtp_tls_cert",
                    "is set but server_smtp_tls_key is not",
                )
            }
            (None, Some(_)) => {
                return fail(
                    "server_smtp_tls_key",
                    "is set but server_smtp_tls_cert is not",
                )
            }
            _ => {}
        }
        if self
            .server_smtp_tls_port
            .is_some_and(|p| p != 0 && p == self.server_smtp_port)
        {
            return fail(
                "server_smtp_tls_port",
                "must differ from server_smtp_port (one port cannot be both plain and implicit TLS)",
            );
        }
        if self.server_smtp_tls_port.is_some() && self.server_smtp_tls_cert.is_none() {
            return fail(
                "server_smtp_tls_port",
                "is set but server_smtp_tls_cert and server_smtp_tls_key are not",
            );
        }
        if let Some(url) = &self.store_url {
            let known = ["sqlite:", "postgres://", "postgresql://"];
            if !known.iter().any(|p| url.starts_with(p)) {
                return fail(
                    "store_url",
                    &format!("unknown scheme in `{url}` (use sqlite://PATH or postgres://...)"),
                );
            }
        }
        Ok(())
    }
}
