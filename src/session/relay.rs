//! Relay policy, pure: which clients may relay, and which recipient addresses smuggle a
//! remote destination through a local-looking one.
//!
//! The actor decides [`client_is_relay_authorised`] once per connection from the peer
//! address and `server_smtp_relay_clients`; the session applies [`relay_trick`] to every
//! `RCPT TO` from an unauthorised client before any store lookup (REFERENCE, "Open
//! relay"). Nothing here does I/O or knows the store.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::protocol::Path;

/// Whether `ip` is inside one of `clients` (ErlMail's `server_smtp_relay_clients`).
///
/// An IPv4-mapped IPv6 client (`::ffff:192.0.2.1`, what a dual-stack socket reports)
/// matches IPv4 networks, and an IPv4 client matches networks written in mapped form;
/// host entries (`/32`, `/128`) match their one address (ErlMail's check never did).
pub fn client_is_relay_authorised(ip: IpAddr, clients: &[IpNet]) -> bool {
    let canonical = ip.to_canonical();
    let mapped = match canonical {
        IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        IpAddr::V6(_) => None,
    };
    clients.iter().any(|net| {
        net.contains(&ip) || net.contains(&canonical) || mapped.is_some_and(|m| net.contains(&m))
    })
}

/// A way of writing an address that routes mail onward through this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTrick {
    /// `@local:user@remote`: an RFC 821 source route.
    SourceRoute,
    /// `user%remote@local`: the "percent hack".
    Percent,
    /// `remote!user` or `remote!user@local`: a UUCP bang path.
    Bang,
    /// `user@remote@local` or `"user@remote"@local`: an `@` inside the local part.
    AtInLocalPart,
    /// `user@[192.0.2.1]`: an address literal, which may name any host.
    AddressLiteral,
}

/// The first relay trick in `path`, if any. Checked before the store is asked, for
/// unauthorised clients only: such an address is refused as relaying even when its
/// domain is local, because some downstream hop might honour the embedded route.
pub fn relay_trick(path: &Path) -> Option<RelayTrick> {
    if !path.source_route.is_empty() {
        Some(RelayTrick::SourceRoute)
    } else if path.local_part.contains('%') {
        Some(RelayTrick::Percent)
    } else if path.local_part.contains('!') {
        Some(RelayTrick::Bang)
    } else if path.local_part.contains('@') {
        Some(RelayTrick::AtInLocalPart)
    } else if path.has_address_literal() {
        Some(RelayTrick::AddressLiteral)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::address::parse_path;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Asserts that the networks `list` let each of `allowed` relay and none of `refused`.
    fn check(list: &[&str], allowed: &[&str], refused: &[&str]) {
        let nets: Vec<IpNet> = list.iter().map(|s| s.parse().unwrap()).collect();
        for c in allowed {
            assert!(client_is_relay_authorised(ip(c), &nets), "{c} in {list:?}");
        }
        for c in refused {
            assert!(
                !client_is_relay_authorised(ip(c), &nets),
                "{c} not in {list:?}"
            );
        }
    }

    #[test]
    fn ipv4_networks() {
        check(
            &["192.0.2.0/24"],
            &["192.0.2.77"],
            &["192.0.3.1", "2001:db8::1"],
        );
    }

    #[test]
    fn host_entries_match() {
        check(
            &["198.51.100.7/32", "2001:db8::7/128"],
            &["198.51.100.7", "2001:db8::7"],
            &["198.51.100.8", "2001:db8::8"],
        );
        // /31 (ErlMail never matched it either).
        check(&["198.51.100.6/31"], &["198.51.100.7"], &["198.51.100.8"]);
    }

    #[test]
    fn ipv6_networks() {
        check(
            &["2001:db8:1::/48"],
            &["2001:db8:1:2::3"],
            &["2001:db8:2::1", "192.0.2.1"],
        );
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_networks() {
        check(
            &["127.0.0.0/8", "203.0.113.5/32"],
            &["::ffff:127.0.0.1", "::ffff:203.0.113.5"],
            &["::ffff:203.0.113.6"],
        );
        // A mapped network written in IPv6 form matches the plain IPv4 client too.
        check(
            &["::ffff:10.0.0.0/104"],
            &["10.1.2.3", "::ffff:10.1.2.3"],
            &["11.1.2.3"],
        );
    }

    #[test]
    fn empty_list_authorises_nobody() {
        assert!(!client_is_relay_authorised(ip("127.0.0.1"), &[]));
    }

    #[test]
    fn tricks() {
        let t = |s: &str| relay_trick(&parse_path(s).unwrap().0.unwrap());
        assert_eq!(t("<user@local.example>"), None);
        assert_eq!(t("<postmaster>"), None);
        assert_eq!(
            t("<@local.example:user@remote.example>"),
            Some(RelayTrick::SourceRoute)
        );
        assert_eq!(
            t("<user%remote.example@local.example>"),
            Some(RelayTrick::Percent)
        );
        assert_eq!(t("<remote.example!user>"), Some(RelayTrick::Bang));
        assert_eq!(
            t("<remote.example!user@local.example>"),
            Some(RelayTrick::Bang)
        );
        assert_eq!(
            t("<user@remote.example@local.example>"),
            Some(RelayTrick::AtInLocalPart)
        );
        assert_eq!(
            t("<\"user@remote.example\"@local.example>"),
            Some(RelayTrick::AtInLocalPart)
        );
        assert_eq!(t("<user@[192.0.2.1]>"), Some(RelayTrick::AddressLiteral));
    }
}
