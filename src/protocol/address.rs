//! Envelope addresses: the RFC 5321 §4.1.2 path grammar, parsed leniently but exactly.
//!
//! [`parse_path`] turns the argument of `MAIL FROM:` / `RCPT TO:` into a [`Path`] that
//! keeps everything the relay check needs to see (source route, quoting, `%`/`!`/`@` in
//! the local part, address literals) and normalises the domain (lower case, trailing dot
//! removed). [`Mailbox`], [`ReversePath`] and [`ForwardPath`] are what the rest of
//! erlmail stores. This module decides syntax only; whether an address may be relayed to
//! is the session's business (`session::relay`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a path could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// `<` without a matching `>`.
    #[error("unterminated angle brackets")]
    Unterminated,
    /// A quoted local part that never closes, or a bad escape inside it.
    #[error("bad quoted string")]
    BadQuotedString,
    /// Empty or illegal characters in the local part.
    #[error("bad local part")]
    BadLocalPart,
    /// Empty label, illegal characters, or an unparseable address literal.
    #[error("bad domain")]
    BadDomain,
    /// A source route (`@a,@b:`) that does not follow the grammar.
    #[error("bad source route")]
    BadSourceRoute,
    /// `<>` where a mailbox is required.
    #[error("empty path")]
    Empty,
}

/// A path as the client wrote it, with only the domains normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Domains of an RFC 821 source route (`<@a,@b:user@c>` gives `["a", "b"]`).
    pub source_route: Vec<String>,
    /// The local part with quotes and backslash escapes removed.
    pub local_part: String,
    /// Whether the local part was a quoted string.
    pub quoted: bool,
    /// Normalised domain (lower case, no trailing dot), or an address literal kept with
    /// its brackets (`[192.0.2.1]`, `[IPv6:2001:db8::1]`). `None` for `<postmaster>` and
    /// other domain-less forms, which only the session can judge.
    pub domain: Option<String>,
    /// The text between the angle brackets exactly as sent (what replies echo).
    pub raw: String,
}

impl Path {
    /// Whether the domain is an address literal (`[...]`).
    pub fn has_address_literal(&self) -> bool {
        self.domain.as_deref().is_some_and(|d| d.starts_with('['))
    }

    /// The mailbox this path delivers to, ignoring any source route (RFC 5321 §3.6.1
    /// lets a server ignore it). `None` when there is no domain.
    pub fn mailbox(&self) -> Option<Mailbox> {
        self.domain.as_ref().map(|d| Mailbox {
            local_part: self.local_part.clone(),
            domain: d.clone(),
        })
    }
}

/// A mailbox `local-part@domain`, the domain normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mailbox {
    /// Local part, unquoted (case preserved: only the store may fold it).
    pub local_part: String,
    /// Lower-case domain without trailing dot, or an address literal with brackets.
    pub domain: String,
}

impl Mailbox {
    /// Whether the domain is an address literal (`[...]`).
    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }
}

impl fmt::Display for Mailbox {
    /// `local@domain`, quoting the local part when it is not a dot-atom.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_atom(&self.local_part) {
            write!(f, "{}@{}", self.local_part, self.domain)
        } else {
            f.write_str("\"")?;
            for c in self.local_part.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            write!(f, "\"@{}", self.domain)
        }
    }
}

/// The envelope sender: `<>` (bounces, DSNs) or a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    /// The null sender `<>`: nothing is ever sent back to it.
    Null,
    /// A real sender.
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    /// The address without brackets; the empty string for `<>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// A recipient the session has resolved: where the message goes, plus what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardPath {
    /// Destination mailbox (source route dropped, domain normalised; `<postmaster>` is
    /// mapped to `postmaster@<server hostname>`).
    pub mailbox: Mailbox,
    /// The text between the angle brackets as the client sent it.
    pub raw: String,
}

impl fmt::Display for ForwardPath {
    /// The destination address without brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.mailbox.fmt(f)
    }
}

/// Parses a path at the start of `arg` (leading blanks skipped) and returns it with the
/// rest of the argument (the ESMTP parameters). `Ok((None, rest))` is the null path `<>`.
///
/// Accepts, like Postfix, an address without angle brackets (it ends at the first
/// blank).
pub fn parse_path(arg: &str) -> Result<(Option<Path>, &str), AddressError> {
    let arg = arg.trim_start_matches([' ', '\t']);
    let (raw, rest) = if let Some(inner) = arg.strip_prefix('<') {
        let end = closing_bracket(inner).ok_or(AddressError::Unterminated)?;
        (&inner[..end], &inner[end + 1..])
    } else {
        let end = arg.find([' ', '\t']).unwrap_or(arg.len());
        (&arg[..end], &arg[end..])
    };
    if raw.is_empty() {
        return Ok((None, rest));
    }
    Ok((Some(parse_inner(raw)?), rest))
}

/// Index of the `>` closing a path, skipping quoted strings (which may hold `>`).
fn closing_bracket(s: &str) -> Option<usize> {
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if in_quote && c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_quote = !in_quote;
        } else if c == '>' && !in_quote {
            return Some(i);
        }
    }
    None
}

fn parse_inner(raw: &str) -> Result<Path, AddressError> {
    let mut rest = raw;
    let mut source_route = Vec::new();
    if raw.starts_with('@') {
        let colon = raw.find(':').ok_or(AddressError::BadSourceRoute)?;
        for hop in raw[..colon].split(',') {
            let d = hop
                .trim()
                .strip_prefix('@')
                .ok_or(AddressError::BadSourceRoute)?;
            source_route.push(parse_domain(d).map_err(|_| AddressError::BadSourceRoute)?);
        }
        rest = &raw[colon + 1..];
    }
    let (local_part, quoted, domain_text) = if let Some(q) = rest.strip_prefix('"') {
        let (local, after) = parse_quoted(q)?;
        let domain = match after {
            "" => None,
            s => Some(s.strip_prefix('@').ok_or(AddressError::BadLocalPart)?),
        };
        (local, true, domain)
    } else {
        // The last `@` separates the domain, so `user@remote@local` keeps `user@remote`
        // as its local part, where the relay check can see it.
        match rest.rfind('@') {
            Some(at) => (rest[..at].to_string(), false, Some(&rest[at + 1..])),
            None => (rest.to_string(), false, None),
        }
    };
    if !quoted && !valid_unquoted_local(&local_part) {
        return Err(AddressError::BadLocalPart);
    }
    let domain = domain_text.map(parse_domain).transpose()?;
    Ok(Path {
        source_route,
        local_part,
        quoted,
        domain,
        raw: raw.to_string(),
    })
}

/// Parses the body of a quoted string (after the opening quote); returns the unescaped
/// text and what follows the closing quote.
fn parse_quoted(s: &str) -> Result<(String, &str), AddressError> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, e)) if !e.is_control() => out.push(e),
                _ => return Err(AddressError::BadQuotedString),
            },
            c if c.is_control() => return Err(AddressError::BadQuotedString),
            c => out.push(c),
        }
    }
    Err(AddressError::BadQuotedString)
}

/// RFC 5322 atext, plus UTF-8 (RFC 6531).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// Lenient like Postfix: atext, dots anywhere, and `@` (so that `user@remote@local`
/// parses and is refused by the relay check rather than as a syntax error).
fn valid_unquoted_local(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| is_atext(c) || c == '.' || c == '@')
}

fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|a| !a.is_empty() && a.chars().all(is_atext))
}

/// Normalises a domain: lower case, trailing dot removed; address literals validated and
/// kept with brackets (IPv4 in canonical dotted form, IPv6 as `[IPv6:...]`).
pub fn parse_domain(d: &str) -> Result<String, AddressError> {
    if let Some(lit) = d.strip_prefix('[') {
        let lit = lit.strip_suffix(']').ok_or(AddressError::BadDomain)?;
        if let Some(v6) = lit
            .strip_prefix("IPv6:")
            .or_else(|| lit.strip_prefix("ipv6:"))
            .or_else(|| lit.strip_prefix("IPV6:"))
        {
            let ip: Ipv6Addr = v6.parse().map_err(|_| AddressError::BadDomain)?;
            return Ok(format!("[IPv6:{ip}]"));
        }
        let ip: Ipv4Addr = lit.parse().map_err(|_| AddressError::BadDomain)?;
        return Ok(format!("[{ip}]"));
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    let ok = !d.is_empty()
        && d.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
        });
    if ok {
        Ok(d.to_lowercase())
    } else {
        Err(AddressError::BadDomain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(arg: &str) -> Path {
        parse_path(arg).unwrap().0.unwrap()
    }

    #[test]
    fn plain_address_and_params() {
        let (p, rest) = parse_path("<User@Example.COM.> SIZE=10").unwrap();
        let p = p.unwrap();
        assert_eq!(p.local_part, "User");
        assert_eq!(p.domain.as_deref(), Some("example.com"));
        assert_eq!(p.raw, "User@Example.COM.");
        assert_eq!(rest, " SIZE=10");
        assert_eq!(p.mailbox().unwrap().to_string(), "User@example.com");
    }

    #[test]
    fn null_path() {
        assert_eq!(parse_path("<>").unwrap(), (None, ""));
        assert_eq!(
            parse_path(" <> BODY=8BITMIME").unwrap(),
            (None, " BODY=8BITMIME")
        );
    }

    #[test]
    fn without_brackets() {
        let (p, rest) = parse_path("a@b.example SIZE=1").unwrap();
        assert_eq!(p.unwrap().domain.as_deref(), Some("b.example"));
        assert_eq!(rest, " SIZE=1");
    }

    #[test]
    fn source_route() {
        let p = path("<@local.example,@b.example:user@remote.example>");
        assert_eq!(p.source_route, vec!["local.example", "b.example"]);
        assert_eq!(p.local_part, "user");
        assert_eq!(p.domain.as_deref(), Some("remote.example"));
        assert_eq!(
            parse_path("<@a.example user@b>"),
            Err(AddressError::BadSourceRoute)
        );
        assert_eq!(
            parse_path("<a.example:user@b>"),
            Err(AddressError::BadLocalPart)
        );
    }

    #[test]
    fn quoted_local_part() {
        let p = path("<\"user@remote\"@local.example>");
        assert!(p.quoted);
        assert_eq!(p.local_part, "user@remote");
        assert_eq!(p.domain.as_deref(), Some("local.example"));
        assert_eq!(
            p.mailbox().unwrap().to_string(),
            "\"user@remote\"@local.example"
        );
        let p = path("<\"a\\\"b>c\"@x>");
        assert_eq!(p.local_part, "a\"b>c");
        assert_eq!(p.mailbox().unwrap().to_string(), "\"a\\\"b>c\"@x");
        assert_eq!(parse_path("<\"abc@x>"), Err(AddressError::Unterminated));
        assert_eq!(parse_path("<\"abc>"), Err(AddressError::Unterminated));
        assert_eq!(parse_path("<\"a\"b@x>"), Err(AddressError::BadLocalPart));
    }

    #[test]
    fn tricky_local_parts_parse() {
        assert_eq!(path("<user@remote@local>").local_part, "user@remote");
        assert_eq!(path("<user%remote@local>").local_part, "user%remote");
        let p = path("<remote!user>");
        assert_eq!((p.local_part.as_str(), p.domain), ("remote!user", None));
        assert_eq!(path("<postmaster>").domain, None);
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            path("<u@[192.0.2.1]>").domain.as_deref(),
            Some("[192.0.2.1]")
        );
        assert!(path("<u@[192.0.2.1]>").has_address_literal());
        assert_eq!(
            path("<u@[IPv6:2001:DB8::1]>").domain.as_deref(),
            Some("[IPv6:2001:db8::1]")
        );
        assert_eq!(parse_path("<u@[300.1.1.1]>"), Err(AddressError::BadDomain));
        assert_eq!(parse_path("<u@[1.2.3.4>"), Err(AddressError::BadDomain));
    }

    #[test]
    fn bad_syntax() {
        for (path, error) in [
            ("<a b@c>", AddressError::BadLocalPart),
            ("<a@>", AddressError::BadDomain),
            ("<a@b..c>", AddressError::BadDomain),
            ("<a@b c>", AddressError::BadDomain),
            ("<@b>", AddressError::BadSourceRoute),
            ("<a@b", AddressError::Unterminated),
            ("<\u{1}@b>", AddressError::BadLocalPart),
        ] {
            assert_eq!(parse_path(path), Err(error), "{path:?}");
        }
    }

    #[test]
    fn utf8_addresses() {
        let p = path("<jörg@Bücher.example>");
        assert_eq!(p.local_part, "jörg");
        assert_eq!(p.domain.as_deref(), Some("bücher.example"));
    }
}
