//! The key table and the code that applies a map of `key: value` onto a [`Config`].
//!
//! This module owns which keys exist, which ErlMail keys are accepted but ignored, and the
//! type each key is read as. It is written against serde's data model only, so YAML
//! documents, `-o key=value` overrides and ErlMail's Erlang terms all go through the same
//! code and give the same messages. Errors raised while a key or a value is read are
//! created inside that key's or value's deserialization, so the front end attaches the
//! position of exactly that token.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::values::{
    DkimKey, HostPort, Listen, Minutes, NameServer, Net, Opt, Seconds, SmartHost, S,
};
use super::Config;

/// Every key erlmail serves, ErlMail's first, in the order `to_yaml` writes them.
pub const SERVED_KEYS: &[&str] = &[
    "server_list",
    "server_smtp_start",
    "server_smtp_name",
    "server_smtp_port",
    "server_smtp_max_connection",
    "server_smtp_greeting",
    "server_smtp_relay_clients",
    "server_smtp_retries",
    "server_smtp_retry_interval",
    "server_stmp_failure_notification",
    "server_smtp_address",
    "store_url",
    "server_smtp_relay_host",
    "server_smtp_routes",
    "server_smtp_queue_interval",
    "server_smtp_lock_lease",
    "server_smtp_max_message_size",
    "server_smtp_max_recipients",
    "server_smtp_timeout",
    "server_smtp_hard_error_limit",
    "server_smtp_client_connection_limit",
    "server_smtp_client_connection_rate",
    "server_smtp_min_data_rate",
    "server_smtp_auth_failure_limit",
    "server_smtp_max_hops",
    "server_smtp_max_senders",
    "server_smtp_shutdown_timeout",
    "server_smtp_remote_port",
    "server_smtp_delay_warning",
    "server_smtp_tls_cert",
    "server_smtp_tls_key",
    "server_smtp_tls_port",
    "server_smtp_relay_auth",
    "server_smtp_tls_outbound",
    "server_smtp_ehlo_name",
    "server_smtp_dkim_keys",
    "server_smtp_dmarc_policy",
    "dns_nameservers",
    "node_name",
    "admin_listen",
    "log_format",
    "spool_dir",
    "maildir_root",
];

/// Prefixes of ErlMail keys for parts erlmail does not have (IMAP, POP, Mnesia, antispam):
/// accepted so ErlMail files load, and reported as ignored.
pub const IGNORED_PREFIXES: &[&str] = &[
    "server_imap_",
    "server_pop_",
    "store_type_",
    "mnesia_table_",
    "antispam_",
];

/// Whether `key` is an ErlMail key that erlmail accepts and ignores.
pub fn is_ignored_key(key: &str) -> bool {
    IGNORED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Applies one map of settings onto a configuration; used as a serde seed.
pub(crate) struct Apply<'a> {
    /// The configuration being changed in place.
    pub config: &'a mut Config,
    /// Keys already seen in this map, to refuse duplicates.
    pub seen: HashSet<String>,
    /// Served keys set by this map, in order (callers use them to place later errors).
    pub set_keys: Vec<&'static str>,
    /// An unknown key is reported as ignored rather than refused: ErlMail's own files,
    /// whose applications ignored keys they did not know.
    pub lenient: bool,
}

impl<'a> Apply<'a> {
    /// A seed that applies a map onto `config`.
    pub fn new(config: &'a mut Config) -> Self {
        Apply {
            config,
            seen: HashSet::new(),
            set_keys: Vec::new(),
            lenient: false,
        }
    }
}

/// ErlMail's client keys (`smtpc` in its forks' `erlmail.app`), read into erlmail's own:
/// `smarthost` (`{{127,0,0,1},25}` or `{"host",25}`) is `server_smtp_relay_host`, `ehlo`
/// is `server_smtp_ehlo_name`.
const ERLMAIL_ALIASES: &[(&str, &str)] = &[
    ("smarthost", "server_smtp_relay_host"),
    ("ehlo", "server_smtp_ehlo_name"),
];

/// A key as classified while it is read.
enum Key {
    Served(&'static str),
    Ignored(String),
    /// `smarthost`: a host and port as ErlMail wrote them.
    SmartHost,
}

/// Reads one key, refusing unknown (unless `lenient`) and repeated ones at the key's own
/// position.
struct KeySeed<'s> {
    seen: &'s HashSet<String>,
    lenient: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a configuration key")
    }

    fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
        if self.seen.contains(k) {
            return Err(E::custom(format!("duplicate key `{k}`")));
        }
        let alias = ERLMAIL_ALIASES
            .iter()
            .find(|(a, _)| *a == k)
            .map(|(_, s)| *s);
        if let Some(served) = alias.filter(|s| self.seen.contains(*s)) {
            return Err(E::custom(format!("`{k}` repeats `{served}`")));
        }
        if k == "smarthost" {
            Ok(Key::SmartHost)
        } else if let Some(served) = SERVED_KEYS.iter().find(|s| **s == k || Some(**s) == alias) {
            Ok(Key::Served(served))
        } else if is_ignored_key(k) || self.lenient {
            Ok(Key::Ignored(k.to_string()))
        } else {
            Err(E::custom(format!(
                "unknown key `{k}` (not an ErlMail or erlmail key; see config/erlmail.yaml)"
            )))
        }
    }
}

impl<'de> DeserializeSeed<'de> for &mut Apply<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut Apply<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of configuration keys")
    }

    /// An empty document (only comments) leaves the configuration as it is.
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(KeySeed {
            seen: &self.seen,
            lenient: self.lenient,
        })? {
            match key {
                Key::SmartHost => {
                    let host = map.next_value::<SmartHost>()?;
                    self.config.server_smtp_relay_host = Some(host.0);
                    self.seen.insert("server_smtp_relay_host".to_string());
                    self.set_keys.push("server_smtp_relay_host");
                }
                Key::Ignored(name) => {
                    map.next_value::<IgnoredAny>()?;
                    self.seen.insert(name.clone());
                    if !self.config.ignored_keys.contains(&name) {
                        self.config.ignored_keys.push(name);
                    }
                }
                Key::Served(name) => {
                    apply_value(self.config, name, &mut map)?;
                    self.seen.insert(name.to_string());
                    self.set_keys.push(name);
                }
            }
        }
        Ok(())
    }
}

/// Reads the value of served key `key` from `map` into `c`.
/// The next value, a list, each item read as `W` and unwrapped by `f`.
fn next_list<'de, A: MapAccess<'de>, W: Deserialize<'de>, T>(
    map: &mut A, f: impl FnMut(W) -> T,
) -> Result<Vec<T>, A::Error> {
    Ok(map.next_value::<Vec<W>>()?.into_iter().map(f).collect())
}

fn apply_value<'de, A: MapAccess<'de>>(
    c: &mut Config, key: &'static str, map: &mut A,
) -> Result<(), A::Error> {
    match key {
        "server_list" => c.server_list = next_list(map, |s: S<String>| s.0)?,
        "server_smtp_start" => c.server_smtp_start = map.next_value()?,
        "server_smtp_name" => c.server_smtp_name = map.next_value::<S<String>>()?.0,
        "server_smtp_port" => c.server_smtp_port = map.next_value()?,
        "server_smtp_max_connection" => c.server_smtp_max_connection = map.next_value()?,
        "server_smtp_greeting" => c.server_smtp_greeting = map.next_value::<S<String>>()?.0,
        "server_smtp_relay_clients" => c.server_smtp_relay_clients = next_list(map, |n: Net| n.0)?,
        "server_smtp_retries" => c.server_smtp_retries = map.next_value()?,
        "server_smtp_retry_interval" => {
            c.server_smtp_retry_interval = next_list(map, |m: S<Minutes>| m.0 .0)?
        }
        "server_stmp_failure_notification" => {
            c.server_stmp_failure_notification = map.next_value()?
        }
        "server_smtp_address" => c.server_smtp_address = map.next_value::<S<_>>()?.0,
        "store_url" => c.store_url = map.next_value::<Opt<String>>()?.0,
        "server_smtp_relay_host" => {
            c.server_smtp_relay_host = map.next_value::<Opt<HostPort>>()?.0.map(|h| h.0)
        }
        "server_smtp_routes" => {
            c.server_smtp_routes = map
                .next_value::<BTreeMap<String, S<HostPort>>>()?
                .into_iter()
                .map(|(k, v)| (k, v.0 .0))
                .collect()
        }
        "server_smtp_queue_interval" => {
            c.server_smtp_queue_interval = map.next_value::<S<Seconds>>()?.0 .0
        }
        "server_smtp_lock_lease" => c.server_smtp_lock_lease = map.next_value::<S<Seconds>>()?.0 .0,
        "server_smtp_max_message_size" => c.server_smtp_max_message_size = map.next_value()?,
        "server_smtp_max_recipients" => c.server_smtp_max_recipients = map.next_value()?,
        "server_smtp_timeout" => c.server_smtp_timeout = map.next_value::<S<Seconds>>()?.0 .0,
        "server_smtp_hard_error_limit" => c.server_smtp_hard_error_limit = map.next_value()?,
        "server_smtp_client_connection_limit" => {
            c.server_smtp_client_connection_limit = map.next_value()?
        }
        "server_smtp_client_connection_rate" => {
            c.server_smtp_client_connection_rate = map.next_value()?
        }
        "server_smtp_min_data_rate" => c.server_smtp_min_data_rate = map.next_value()?,
        "server_smtp_auth_failure_limit" => c.server_smtp_auth_failure_limit = map.next_value()?,
        "server_smtp_max_hops" => c.server_smtp_max_hops = map.next_value()?,
        "server_smtp_max_senders" => c.server_smtp_max_senders = map.next_value()?,
        "server_smtp_shutdown_timeout" => {
            c.server_smtp_shutdown_timeout = map.next_value::<S<Seconds>>()?.0 .0
        }
        "server_smtp_remote_port" => c.server_smtp_remote_port = map.next_value()?,
        "server_smtp_delay_warning" => {
            c.server_smtp_delay_warning = map.next_value::<Opt<Seconds>>()?.0.map(|s| s.0)
        }
        "server_smtp_tls_cert" => c.server_smtp_tls_cert = map.next_value::<Opt<_>>()?.0,
        "server_smtp_tls_key" => c.server_smtp_tls_key = map.next_value::<Opt<_>>()?.0,
        "server_smtp_tls_port" => c.server_smtp_tls_port = map.next_value()?,
        "server_smtp_relay_auth" => c.server_smtp_relay_auth = map.next_value()?,
        "server_smtp_tls_outbound" => c.server_smtp_tls_outbound = map.next_value::<S<_>>()?.0,
        "server_smtp_ehlo_name" => c.server_smtp_ehlo_name = map.next_value::<Opt<String>>()?.0,
        "server_smtp_dkim_keys" => c.server_smtp_dkim_keys = next_list(map, DkimKey::into_config)?,
        "server_smtp_dmarc_policy" => c.server_smtp_dmarc_policy = map.next_value::<S<_>>()?.0,
        "dns_nameservers" => c.dns_nameservers = next_list(map, |n: S<NameServer>| n.0 .0)?,
        "node_name" => c.node_name = map.next_value::<S<String>>()?.0,
        "admin_listen" => c.admin_listen = map.next_value::<Opt<Listen>>()?.0.map(|l| l.0),
        "log_format" => c.log_format = map.next_value::<S<_>>()?.0,
        "spool_dir" => c.spool_dir = map.next_value::<S<_>>()?.0,
        "maildir_root" => c.maildir_root = map.next_value::<Opt<_>>()?.0,
        other => {
            // SERVED_KEYS and this match are kept in step by the `every_served_key_applies`
            // test; reaching here is a bug, reported rather than panicking.
            return Err(de::Error::custom(format!("key `{other}` is not handled")));
        }
    }
    Ok(())
}
