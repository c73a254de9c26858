//! erlmail's YAML format: reading a document or a `-o key=value` override onto a
//! [`Config`], and writing a configuration back as YAML.
//!
//! This module owns the mapping between serde_yaml_ng's errors and erlmail's positioned
//! messages, and the canonical YAML form (`to_yaml`) that `config convert` prints. Which
//! keys exist and how values are typed is `apply.rs`'s business, not this module's.

use serde::de::DeserializeSeed;
use serde_yaml_ng::{Mapping, Value};

use super::apply::{Apply, SERVED_KEYS};
use super::values::format_duration;
use super::Config;

/// A YAML error: 1-based line and column when known, and the message without them.
pub(crate) struct YamlError {
    pub position: Option<(usize, usize)>,
    pub message: String,
}

fn convert(e: serde_yaml_ng::Error) -> YamlError {
    let position = e.location().map(|l| (l.line(), l.column()));
    let mut message = e.to_string();
    if let Some((line, column)) = position {
        // serde_yaml_ng appends the position in its own words; ours goes in front.
        message = message.replace(&format!(" at line {line} column {column}"), "");
    }
    // libyaml reports an unterminated quoted string at the end of the file; the opening
    // quote, which it names in the context, is where the mistake is.
    const QUOTED: &str = ", while scanning a quoted scalar at line ";
    if let Some(i) = message.find(QUOTED) {
        let rest = &message[i + QUOTED.len()..];
        let mut nums = rest.split(" column ").map(|n| n.trim().parse::<usize>());
        if let (Some(Ok(line)), Some(Ok(column))) = (nums.next(), nums.next()) {
            return YamlError {
                position: Some((line, column)),
                message: "unterminated quoted string: no closing quote before the end of the file"
                    .into(),
            };
        }
    }
    YamlError { position, message }
}

/// Applies the YAML document `src` onto `config`; returns the served keys it set.
pub(crate) fn apply_yaml(src: &str, config: &mut Config) -> Result<Vec<&'static str>, YamlError> {
    let mut apply = Apply::new(config);
    (&mut apply)
        .deserialize(serde_yaml_ng::Deserializer::from_str(src))
        .map_err(convert)?;
    Ok(apply.set_keys)
}

/// Applies one override `key` = `value`, the value read as a YAML scalar or flow
/// collection (`0`, `[127.0.0.1/32]`, `["1s","2s"]`); text that is not valid YAML, or that
/// YAML would read as a mapping, is taken as a plain string (`Hello: world`).
pub(crate) fn apply_override(key: &str, value: &str, config: &mut Config) -> Result<(), String> {
    let parsed = match serde_yaml_ng::from_str::<Value>(value) {
        Ok(Value::Mapping(_)) if !value.trim_start().starts_with('{') => {
            Value::String(value.to_string())
        }
        Ok(v) => v,
        Err(_) => Value::String(value.to_string()),
    };
    let mut map = Mapping::new();
    map.insert(Value::String(key.to_string()), parsed);
    let mut apply = Apply::new(config);
    (&mut apply)
        .deserialize(Value::Mapping(map))
        .map_err(|e| convert(e).message)
}

fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

fn opt<T>(v: &Option<T>, f: impl Fn(&T) -> String) -> Value {
    v.as_ref().map_or(Value::Null, |x| Value::String(f(x)))
}

fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> Value {
    Value::Sequence(items.iter().map(|x| Value::String(f(x))).collect())
}

/// The value of served key `key` as YAML, in the form `apply.rs` reads back.
fn value_of(c: &Config, key: &str) -> Value {
    match key {
        "server_list" => list(&c.server_list, |s| s.clone()),
        "server_smtp_start" => Value::Bool(c.server_smtp_start),
        "server_smtp_name" => string(&c.server_smtp_name),
        "server_smtp_port" => c.server_smtp_port.into(),
        "server_smtp_max_connection" => (c.server_smtp_max_connection as u64).into(),
        "server_smtp_greeting" => string(&c.server_smtp_greeting),
        "server_smtp_relay_clients" => list(&c.server_smtp_relay_clients, |n| n.to_string()),
        "server_smtp_retries" => c.server_smtp_retries.into(),
        "server_smtp_retry_interval" => {
            list(&c.server_smtp_retry_interval, |d| format_duration(*d))
        }
        "server_stmp_failure_notification" => Value::Bool(c.server_stmp_failure_notification),
        "server_smtp_address" => string(&c.server_smtp_address.to_string()),
        "store_url" => opt(&c.store_url, |s| s.clone()),
        "server_smtp_relay_host" => opt(&c.server_smtp_relay_host, |s| s.clone()),
        "server_smtp_routes" => Value::Mapping(
            c.server_smtp_routes
                .iter()
                .map(|(k, v)| (string(k), string(v)))
                .collect(),
        ),
        "server_smtp_queue_interval" => string(&format_duration(c.server_smtp_queue_interval)),
        "server_smtp_lock_lease" => string(&format_duration(c.server_smtp_lock_lease)),
        "server_smtp_max_message_size" => c.server_smtp_max_message_size.into(),
        "server_smtp_max_recipients" => (c.server_smtp_max_recipients as u64).into(),
        "server_smtp_timeout" => string(&format_duration(c.server_smtp_timeout)),
        "server_smtp_hard_error_limit" => c.server_smtp_hard_error_limit.into(),
        "server_smtp_client_connection_limit" => {
            (c.server_smtp_client_connection_limit as u64).into()
        }
        "server_smtp_client_connection_rate" => c.server_smtp_client_connection_rate.into(),
        "server_smtp_min_data_rate" => c.server_smtp_min_data_rate.into(),
        "server_smtp_auth_failure_limit" => c.server_smtp_auth_failure_limit.into(),
        "server_smtp_max_hops" => c.server_smtp_max_hops.into(),
        "server_smtp_max_senders" => (c.server_smtp_max_senders as u64).into(),
        "server_smtp_shutdown_timeout" => string(&format_duration(c.server_smtp_shutdown_timeout)),
        "server_smtp_remote_port" => c.server_smtp_remote_port.into(),
        "server_smtp_delay_warning" => opt(&c.server_smtp_delay_warning, |d| format_duration(*d)),
        "server_smtp_tls_cert" => opt(&c.server_smtp_tls_cert, |p| p.display().to_string()),
        "server_smtp_tls_key" => opt(&c.server_smtp_tls_key, |p| p.display().to_string()),
        "server_smtp_tls_port" => c.server_smtp_tls_port.map_or(Value::Null, Value::from),
        "server_smtp_relay_auth" => Value::Bool(c.server_smtp_relay_auth),
        "server_smtp_tls_outbound" => string(c.server_smtp_tls_outbound.as_str()),
        "server_smtp_dkim_keys" => Value::Sequence(
            c.server_smtp_dkim_keys
                .iter()
                .map(|k| {
                    Value::Mapping(
                        [
                            ("domain", k.domain.clone()),
                            ("selector", k.selector.clone()),
                            ("private_key", k.private_key.display().to_string()),
                        ]
                        .into_iter()
                        .map(|(name, v)| (string(name), string(&v)))
                        .collect(),
                    )
                })
                .collect(),
        ),
        "server_smtp_dmarc_policy" => string(c.server_smtp_dmarc_policy.as_str()),
        "server_smtp_ehlo_name" => opt(&c.server_smtp_ehlo_name, |s| s.clone()),
        "dns_nameservers" => list(&c.dns_nameservers, |a| a.to_string()),
        "node_name" => string(&c.node_name),
        "admin_listen" => opt(&c.admin_listen, |a| a.to_string()),
        "log_format" => string(match c.log_format {
            super::LogFormat::Text => "text",
            super::LogFormat::Json => "json",
        }),
        "spool_dir" => string(&c.spool_dir.display().to_string()),
        "maildir_root" => opt(&c.maildir_root, |p| p.display().to_string()),
        _ => Value::Null,
    }
}

/// The whole configuration as erlmail YAML, every served key in `SERVED_KEYS` order.
pub(crate) fn to_yaml(c: &Config) -> String {
    let map: Mapping = SERVED_KEYS
        .iter()
        .map(|k| (string(k), value_of(c, k)))
        .collect();
    // Serializing a Value built from strings, numbers and booleans cannot fail; fall back
    // to an empty document rather than panic if it ever did.
    serde_yaml_ng::to_string(&Value::Mapping(map)).unwrap_or_default()
}
