//! Value types of the configuration keys and how each is read from text or numbers.
//!
//! This module owns the small parsers every front end shares (durations with units, CIDR
//! networks, `host:port` next hops, socket addresses) and the serde wrappers built on them.
//! The wrappers only use serde's data model, so the same code reads YAML (through
//! serde_yaml_ng, which adds line and column) and ErlMail's Erlang terms (through
//! `erlang::TermDe`, which does the same). Nothing here knows file names or positions.

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

use super::LogFormat;

/// Parses a duration written with a unit: `500ms`, `30s`, `15m`, `4h`, `1d`.
///
/// A string without a unit is refused: a bare number is only meaningful as a YAML or
/// Erlang integer, whose unit depends on the key.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "bad duration `{text}`: expected a number with a unit (ms, s, m, h, d), e.g. \"30s\""
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad duration `{text}`: number too large"))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => {
            return Err(format!(
                "bad duration `{text}`: missing unit (ms, s, m, h, d), e.g. \"{n}s\""
            ))
        }
        other => {
            return Err(format!(
                "unknown unit `{other}` in duration `{text}` (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("bad duration `{text}`: too large"))
}

/// Writes a duration with the largest unit that divides it exactly (`"15m"`, `"30s"`,
/// `"1500ms"`), so that [`parse_duration`] reads it back unchanged. Sub-millisecond parts
/// are not representable in the configuration and are dropped.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, per) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Parses `"10.0.0.0/8"`, `"2001:db8::/32"` or a bare address (`/32` or `/128`).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let s = text.trim();
    if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| format!("bad CIDR `{text}`: expected ADDRESS/BITS such as 10.0.0.0/8"))
    } else {
        s.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("bad CIDR `{text}`: not an IP address or ADDRESS/BITS"))
    }
}

/// Builds a network from an address and a prefix length, checking the length fits.
pub fn net_from_bits(addr: IpAddr, bits: u32) -> Result<IpNet, String> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = u8::try_from(bits)
        .ok()
        .filter(|b| u32::from(*b) <= max)
        .ok_or_else(|| format!("bad CIDR: prefix length {bits} is larger than {max}"))?;
    IpNet::new(addr, bits).map_err(|e| format!("bad CIDR: {e}"))
}

/// Turns a netmask such as 255.255.255.0 into its prefix length; refuses masks whose
/// one bits are not contiguous (255.0.255.0), which no CIDR range can express.
pub fn mask_to_bits(mask: IpAddr) -> Result<u32, String> {
    let (ones, total, bits) = match mask {
        IpAddr::V4(m) => {
            let v = u32::from(m);
            (v.leading_ones(), 32, u128::from(v) << 96)
        }
        IpAddr::V6(m) => {
            let v = u128::from(m);
            (v.leading_ones(), 128, v)
        }
    };
    // After the leading ones every bit must be zero.
    let rest = if ones >= 128 { 0 } else { bits << ones };
    if rest != 0 {
        return Err(format!("non-contiguous netmask {mask}"));
    }
    debug_assert!(ones <= total);
    Ok(ones)
}

/// Checks a next hop written `host:port` (`[v6]:port` for IPv6 literals) and returns it
/// unchanged.
pub fn parse_host_port(text: &str) -> Result<String, String> {
    let bad = || format!("bad next hop `{text}`: expected host:port, e.g. mx.example.net:25");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    };
    if !host_ok || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(text.to_string())
}

/// Parses `ip:port` (`[v6]:port`); a bare IP takes `default_port` when one is given.
pub fn parse_socket_addr(text: &str, default_port: Option<u16>) -> Result<SocketAddr, String> {
    let s = text.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    match (default_port, s.parse::<IpAddr>()) {
        (Some(port), Ok(ip)) => Ok(SocketAddr::new(ip, port)),
        _ => Err(format!(
            "bad socket address `{text}`: expected IP:PORT such as 127.0.0.1:8025"
        )),
    }
}

/// A value that can be written as a string (or, for some, as an integer).
pub(crate) trait Scalar: Sized {
    /// What the value looks like, for "expected ..." messages.
    const EXPECTING: &'static str;
    /// Reads the value from text.
    fn from_text(s: &str) -> Result<Self, String>;
    /// Reads the value from an integer; most values do not accept one.
    fn from_int(n: i128) -> Result<Self, String> {
        Err(format!(
            "expected {}, found the integer {n}",
            Self::EXPECTING
        ))
    }
}

/// Each value's [`Scalar`] impl: what it looks like, how it reads from text and, for
/// the durations, how a bare integer reads.
macro_rules! scalars {
    ($($ty:ty: $expecting:expr, |$s:ident| $text:expr $(, |$n:ident| $int:expr)?;)*) => {
        $(
            impl Scalar for $ty {
                const EXPECTING: &'static str = $expecting;
                fn from_text($s: &str) -> Result<Self, String> {
                    $text
                }
                $(
                    fn from_int($n: i128) -> Result<Self, String> {
                        $int
                    }
                )?
            }
        )*
    };
}

/// A `host:port` next hop.
pub(crate) struct HostPort(pub String);

/// A socket address that must name its port (`admin_listen`).
pub(crate) struct Listen(pub SocketAddr);

/// A DNS server address; the port defaults to 53.
pub(crate) struct NameServer(pub SocketAddr);

/// A duration whose bare integers are minutes (ErlMail's retry intervals).
pub(crate) struct Minutes(pub Duration);

/// A duration whose bare integers are seconds (erlmail's timers, as Postfix operators
/// expect).
pub(crate) struct Seconds(pub Duration);

scalars! {
    String: "a string", |s| Ok(s.to_string());
    PathBuf: "a path", |s| Ok(PathBuf::from(s));
    IpAddr: "an IP address", |s| s.trim().parse().map_err(|_| format!("bad IP address `{s}`"));
    LogFormat: "text or json", |s| match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("bad log_format `{s}`: expected text or json")),
    };
    HostPort: "host:port", |s| parse_host_port(s).map(HostPort);
    Listen: "IP:PORT", |s| parse_socket_addr(s, None).map(Listen);
    NameServer: "IP or IP:PORT", |s| parse_socket_addr(s, Some(53)).map(NameServer);
    Minutes: "minutes or a duration such as \"15m\"",
        |s| parse_duration(s).map(Minutes),
        |n| whole_units(n, 60, "minutes").map(Minutes);
    Seconds: "seconds or a duration such as \"30s\"",
        |s| parse_duration(s).map(Seconds),
        |n| whole_units(n, 1, "seconds").map(Seconds);
}

/// A bare integer duration: `n` units of `unit_secs` seconds each.
fn whole_units(n: i128, unit_secs: u64, unit: &str) -> Result<Duration, String> {
    u64::try_from(n)
        .ok()
        .and_then(|units| units.checked_mul(unit_secs))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("bad duration {n}: expected a non-negative number of {unit}"))
}

/// Serde adapter for a required [`Scalar`].
pub(crate) struct S<T>(pub T);

/// Serde adapter for an optional [`Scalar`]: null, Erlang's `undefined` and `""` mean
/// "not set".
pub(crate) struct Opt<T>(pub Option<T>);

struct ScalarVisitor<T> {
    empty_is_none: bool,
    _t: PhantomData<T>,
}

impl<'de, T: Scalar> Visitor<'de> for ScalarVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if self.empty_is_none && v.is_empty() {
            return Ok(None);
        }
        T::from_text(v).map(Some).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        T::from_int(i128::from(v)).map(Some).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        T::from_int(i128::from(v)).map(Some).map_err(E::custom)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        if self.empty_is_none {
            Ok(None)
        } else {
            Err(E::custom(format!(
                "expected {}, found nothing",
                T::EXPECTING
            )))
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    /// Erlang strings are lists of character codes; `[]` is the empty string.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut text = String::new();
        while let Some(code) = seq.next_element::<u32>()? {
            let c = char::from_u32(code).ok_or_else(|| {
                de::Error::custom(format!("{code} is not a character code in a string"))
            })?;
            text.push(c);
        }
        self.visit_str(&text)
    }
}

impl<'de, T: Scalar> Deserialize<'de> for S<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = d.deserialize_any(ScalarVisitor::<T> {
            empty_is_none: false,
            _t: PhantomData,
        })?;
        v.map(S)
            .ok_or_else(|| de::Error::custom(format!("expected {}", T::EXPECTING)))
    }
}

impl<'de, T: Scalar> Deserialize<'de> for Opt<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_option(ScalarVisitor::<T> {
            empty_is_none: true,
            _t: PhantomData,
        })
        .map(Opt)
    }
}

/// A relay client network: `"10.0.0.0/8"`, a bare IP, or ErlMail's tuples
/// `{{A,B,C,D},Bits}` and `{{A,B,C,D},{M1,M2,M3,M4}}` (IPv6: eight 16-bit groups).
pub(crate) struct Net(pub IpNet);

/// A `Deserialize` impl through a one-off visitor: the type, the `deserialize_*` hint it
/// gives the deserializer, what it expects (for error messages), then the visitor's
/// `visit_*` methods.
macro_rules! deserialize_via_visitor {
    ($ty:ident, $hint:ident, $expecting:expr, $($visits:tt)*) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    $($visits)*
                }
                d.$hint(V)
            }
        }
    };
}

/// An address written as a tuple (or YAML list) of 4 octets or 8 groups.
struct IpTuple(IpAddr);

deserialize_via_visitor! {
    IpTuple, deserialize_seq, "an address tuple {A,B,C,D} or {A,B,C,D,E,F,G,H}",
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<IpTuple, A::Error> {
        ip_from_seq(seq).map(IpTuple)
    }
}

/// An address written as a sequence of 4 octets or 8 groups.
fn ip_from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<IpAddr, A::Error> {
    let mut parts = Vec::new();
    while let Some(p) = seq.next_element::<u32>()? {
        parts.push(p);
    }
    ip_from_parts(&parts).map_err(de::Error::custom)
}

fn ip_from_parts(parts: &[u32]) -> Result<IpAddr, String> {
    let shown = parts
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    match parts.len() {
        4 => {
            let mut o = [0u8; 4];
            for (slot, p) in o.iter_mut().zip(parts) {
                *slot = u8::try_from(*p)
                    .map_err(|_| format!("bad IPv4 tuple {{{shown}}}: {p} is not an octet"))?;
            }
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        8 => {
            let mut g = [0u16; 8];
            for (slot, p) in g.iter_mut().zip(parts) {
                *slot = u16::try_from(*p).map_err(|_| {
                    format!("bad IPv6 tuple {{{shown}}}: {p} is not a 16-bit group")
                })?;
            }
            Ok(IpAddr::V6(Ipv6Addr::from(g)))
        }
        n => Err(format!(
            "bad IP tuple {{{shown}}}: expected 4 octets or 8 groups, found {n} elements"
        )),
    }
}

/// The second element of an ErlMail relay tuple: prefix bits or a netmask tuple.
enum MaskSpec {
    Bits(u32),
    Mask(IpAddr),
}

deserialize_via_visitor! {
    MaskSpec, deserialize_any, "prefix bits or a netmask tuple",
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaskSpec, E> {
        u32::try_from(v)
            .map(MaskSpec::Bits)
            .map_err(|_| E::custom(format!("bad CIDR: prefix length {v} is too large")))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaskSpec, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("bad CIDR: negative prefix length {v}")))
            .and_then(|v| self.visit_u64(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MaskSpec, A::Error> {
        let mask = ip_from_seq(seq)?;
        // Checked here so the error points at the mask tuple itself.
        mask_to_bits(mask).map_err(de::Error::custom)?;
        Ok(MaskSpec::Mask(mask))
    }
}

deserialize_via_visitor! {
    Net, deserialize_any, "a CIDR such as \"10.0.0.0/8\" or an ErlMail tuple {{10,0,0,0},8}",
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Net, E> {
        parse_net(v).map(Net).map_err(E::custom)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Net, A::Error> {
        let missing = || {
            de::Error::custom(
                "bad relay client: expected {{A,B,C,D},Bits} or {{A,B,C,D},{M1,M2,M3,M4}}",
            )
        };
        let IpTuple(addr) = seq.next_element()?.ok_or_else(missing)?;
        let mask: MaskSpec = seq.next_element()?.ok_or_else(missing)?;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(missing());
        }
        let bits = match mask {
            MaskSpec::Bits(b) => b,
            MaskSpec::Mask(m) => {
                if m.is_ipv4() != addr.is_ipv4() {
                    return Err(de::Error::custom(format!(
                        "bad relay client: netmask {m} does not match address {addr}"
                    )));
                }
                mask_to_bits(m).map_err(de::Error::custom)?
            }
        };
        net_from_bits(addr, bits)
            .map(Net)
            .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(14_400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn duration_errors() {
        let e = parse_duration("15x").unwrap_err();
        assert!(e.contains("unknown unit `x`"), "{e}");
        assert!(parse_duration("15").unwrap_err().contains("missing unit"));
        assert!(parse_duration("m")
            .unwrap_err()
            .contains("expected a number"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("999999999999999999d")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations_format_with_largest_unit() {
        assert_eq!(format_duration(Duration::from_secs(900)), "15m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(172_800)), "2d");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn nets() {
        assert_eq!(parse_net("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_net("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(parse_net("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert!(parse_net("10.0.0.0/33").unwrap_err().contains("bad CIDR"));
        assert!(parse_net("10.0.0/8").is_err());
        assert!(parse_net("example.com").is_err());
    }

    #[test]
    fn masks() {
        assert_eq!(mask_to_bits("255.255.255.0".parse().unwrap()), Ok(24));
        assert_eq!(mask_to_bits("255.255.255.255".parse().unwrap()), Ok(32));
        assert_eq!(mask_to_bits("0.0.0.0".parse().unwrap()), Ok(0));
        assert_eq!(mask_to_bits("ffff:ffff::".parse().unwrap()), Ok(32));
        assert_eq!(
            mask_to_bits("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap()),
            Ok(128)
        );
        assert!(mask_to_bits("255.0.255.0".parse().unwrap())
            .unwrap_err()
            .contains("non-contiguous"));
        assert!(mask_to_bits("255.255.255.1".parse().unwrap()).is_err());
        assert_eq!(
            net_from_bits("10.0.0.0".parse().unwrap(), 33).unwrap_err(),
            "bad CIDR: prefix length 33 is larger than 32"
        );
    }

    #[test]
    fn host_ports_and_sockets() {
        assert_eq!(
            parse_host_port("mx.example.net:25").unwrap(),
            "mx.example.net:25"
        );
        assert_eq!(parse_host_port("[::1]:2525").unwrap(), "[::1]:2525");
        assert!(parse_host_port("mx.example.net").is_err());
        assert!(parse_host_port(":25").is_err());
        assert!(parse_host_port("mx:99999").is_err());
        assert!(parse_host_port("a b:25").is_err());
        assert_eq!(
            parse_socket_addr("127.0.0.1:5353", Some(53)).unwrap(),
            "127.0.0.1:5353".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_socket_addr("::1", Some(53)).unwrap(),
            "[::1]:53".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_socket_addr("127.0.0.1", None).is_err());
    }

    proptest! {
        #[test]
        fn duration_format_round_trips(ms in 0u64..10_000_000_000u64) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn unit_strings_parse(n in 0u64..1_000_000u64, unit in 0usize..5) {
            let (u, per) = [("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)][unit];
            prop_assert_eq!(parse_duration(&format!("{n}{u}")), Ok(Duration::from_millis(n * per)));
        }

        #[test]
        fn v4_cidrs_round_trip(a in any::<u32>(), bits in 0u8..=32) {
            let net = IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), bits).unwrap();
            prop_assert_eq!(parse_net(&net.to_string()), Ok(net));
        }

        #[test]
        fn v6_cidrs_round_trip(a in any::<u128>(), bits in 0u8..=128) {
            let net = IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), bits).unwrap();
            prop_assert_eq!(parse_net(&net.to_string()), Ok(net));
        }

        #[test]
        fn contiguous_masks_give_their_length(bits in 0u32..=32) {
            let m = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            prop_assert_eq!(mask_to_bits(IpAddr::V4(Ipv4Addr::from(m))), Ok(bits));
        }
    }
}

/// One entry of `server_smtp_dkim_keys`: `{domain: D, selector: S, private_key: FILE}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DkimKey {
    domain: S<String>,
    selector: S<String>,
    private_key: S<PathBuf>,
}

impl DkimKey {
    /// The typed key: the domain lower case, without a trailing dot.
    pub(crate) fn into_config(self) -> super::DkimKeyConfig {
        super::DkimKeyConfig {
            domain: self.domain.0.trim_end_matches('.').to_ascii_lowercase(),
            selector: self.selector.0,
            private_key: self.private_key.0,
        }
    }
}

/// ErlMail's `smarthost`: `{{A,B,C,D}, Port}` (or eight numbers for IPv6) or
/// `{"host", Port}`, as `host:port` (`[v6]:port`).
pub(crate) struct SmartHost(pub String);

deserialize_via_visitor! {
    SmartHost, deserialize_any, "{{A,B,C,D}, Port} or {\"host\", Port}",
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SmartHost, A::Error> {
        let host: SmartHostName = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom("smarthost needs a host"))?;
        let port: u16 = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom("smarthost needs a port"))?;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("smarthost is {Host, Port}"));
        }
        Ok(SmartHost(match host.0 {
            IpAddr::V6(v6) if host.1.is_none() => format!("[{v6}]:{port}"),
            ip if host.1.is_none() => format!("{ip}:{port}"),
            _ => format!("{}:{port}", host.1.unwrap_or_default()),
        }))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<SmartHost, E> {
        HostPort::from_text(s)
            .map(|h| SmartHost(h.0))
            .map_err(E::custom)
    }
}

/// The host of a `smarthost`: an address tuple, or a name (kept as text).
struct SmartHostName(IpAddr, Option<String>);

deserialize_via_visitor! {
    SmartHostName, deserialize_any, "an address tuple {A,B,C,D} or a host name",
    fn visit_str<E: de::Error>(self, s: &str) -> Result<SmartHostName, E> {
        if s.is_empty() {
            return Err(E::custom("empty smarthost"));
        }
        Ok(SmartHostName(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(s.to_string()),
        ))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SmartHostName, A::Error> {
        let mut parts = Vec::new();
        while let Some(n) = seq.next_element::<u16>()? {
            parts.push(n);
        }
        let ip = match parts.as_slice() {
            [a, b, c, d] if parts.iter().all(|p| *p < 256) => {
                IpAddr::V4(Ipv4Addr::new(*a as u8, *b as u8, *c as u8, *d as u8))
            }
            [a, b, c, d, e, f, g, h] => {
                IpAddr::V6(Ipv6Addr::new(*a, *b, *c, *d, *e, *f, *g, *h))
            }
            _ => return Err(de::Error::custom("an address is {A,B,C,D} (or 8 numbers)")),
        };
        Ok(SmartHostName(ip, None))
    }
}
