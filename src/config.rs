//! Typed configuration: every ErlMail key at its ErlMail default plus erlmail's own keys.
//!
//! This module owns the `Config` struct, its defaults and its validation. YAML is the
//! primary format; ErlMail's own Erlang term files (`.app` and sys.config shapes) are read
//! by `config/erlang.rs`. Errors always name the file, line and column. Nothing here
//! opens sockets or touches the store.

pub mod erlang;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
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
    /// Most SMTP sessions open at once (ErlMail never enforced it; erlmail does).
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
    /// Address the SMTP listener binds.
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
    /// Most `Received:` headers before a message is refused as looping.
    pub server_smtp_max_hops: u32,
    /// Most senders at once.
    pub server_smtp_max_senders: usize,
    /// Port for MX deliveries.
    pub server_smtp_remote_port: u16,
    /// When a delay DSN is sent; `None` means never.
    pub server_smtp_delay_warning: Option<Duration>,
    /// PEM certificate chain for STARTTLS.
    pub server_smtp_tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    pub server_smtp_tls_key: Option<PathBuf>,
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
            server_smtp_max_connection: 25,
            server_smtp_greeting: "ErlMail http://erlsoft.org (NO UCE)".into(),
            server_smtp_relay_clients: Vec::new(),
            server_smtp_retries: 10,
            server_smtp_retry_interval: [15u64, 30, 60, 240]
                .iter()
                .map(|m| Duration::from_secs(m * 60))
                .collect(),
            server_stmp_failure_notification: true,
            server_smtp_address: IpAddr::from([0, 0, 0, 0]),
            store_url: None,
            server_smtp_relay_host: None,
            server_smtp_routes: BTreeMap::new(),
            server_smtp_queue_interval: Duration::from_secs(60),
            server_smtp_lock_lease: Duration::from_secs(300),
            server_smtp_max_message_size: 10_240_000,
            server_smtp_max_recipients: 100,
            server_smtp_timeout: Duration::from_secs(300),
            server_smtp_hard_error_limit: 20,
            server_smtp_max_hops: 50,
            server_smtp_max_senders: 20,
            server_smtp_remote_port: 25,
            server_smtp_delay_warning: None,
            server_smtp_tls_cert: None,
            server_smtp_tls_key: None,
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
