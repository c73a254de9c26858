//! SPF, DKIM and DMARC checks of mail for local users (`mail-auth`), as OpenDKIM and
//! OpenDMARC do beside Postfix, but in-process: SPF for the HELO and MAIL FROM
//! identities (RFC 7208), every DKIM signature (RFC 6376), and DMARC with alignment
//! (RFC 7489 and its successor's DNS tree walk), all over the configured resolver
//! (`dns_nameservers`). The results go in one `Authentication-Results:` header (RFC 8601)
//! under the authserv-id `server_smtp_name`; any such header already in the message that
//! claims that id is a forgery and is removed first. The DMARC verdict decides what
//! happens to a failing message when `server_smtp_dmarc_policy` is `enforce`:
//! `p=reject` is refused (`550 5.7.1`), `p=quarantine` goes to the Junk mailbox. DNS
//! trouble is `temperror` in the header and never a refusal.
//!
//! Mail from authenticated or relay clients, and from this host itself (127.0.0.1, ::1:
//! see [`internal_host`]), is not checked (the caller decides that); nothing here
//! touches the store or a socket other than the resolver's.

use std::net::IpAddr;
use std::sync::Arc;

use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};

use crate::config::{Config, DmarcPolicy, PerConfig};

/// What becomes of a checked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Stored as usual.
    Deliver,
    /// Stored in the recipients' Junk mailbox (DMARC `p=quarantine`).
    Junk,
    /// Refused at the final dot with this reply text (`5.7.1 ...`; code 550).
    Reject(String),
}

/// The outcome of the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The message with forged `Authentication-Results:` fields removed and ours on top.
    pub message: Vec<u8>,
    /// What to do with it.
    pub disposition: Disposition,
    /// The SPF (MAIL FROM), DKIM (best signature) and DMARC results, as the header
    /// words (`pass`, `fail`, `temperror`...), for metrics and logs.
    pub spf: &'static str,
    /// See `spf`.
    pub dkim: &'static str,
    /// See `spf`.
    pub dmarc: &'static str,
    /// The `From:` domain DMARC judged (empty when none).
    pub from_domain: String,
}

/// The checker for one configuration: its resolver and settings.
pub struct Checker {
    authenticator: MessageAuthenticator,
    authserv_id: String,
    policy: DmarcPolicy,
}

/// The checker of the configuration last asked for, kept while that configuration is.
static CACHE: PerConfig<Arc<Checker>> = PerConfig::new();

impl Checker {
    /// The checker for `config` (built once per configuration `Arc`: one resolver, not
    /// one per message). An error when the resolver cannot be set up.
    pub fn for_config(config: &Arc<Config>) -> Result<Arc<Checker>, String> {
        CACHE.get_or_try_build(config, || {
            let resolver = crate::outbound::route::resolver_for(&config.dns_nameservers)
                .map_err(|e| format!("DNS resolver: {e}"))?;
            Ok(Arc::new(Checker {
                authenticator: MessageAuthenticator(resolver),
                authserv_id: config.server_smtp_name.clone(),
                policy: config.server_smtp_dmarc_policy,
            }))
        })
    }

    /// Checks `message` (as it will be stored: our `Received:` on top) sent by `ip`
    /// after `HELO helo` from `mail_from` (empty for `<>`).
    pub async fn check(&self, message: &[u8], ip: IpAddr, helo: &str, mail_from: &str) -> Checked {
        let message = strip_our_results(message, &self.authserv_id);
        let host = self.authserv_id.as_str();
        // RFC 7208 §2.4: a null reverse-path is checked as postmaster@<HELO>.
        let sender = if mail_from.is_empty() {
            format!("postmaster@{helo}")
        } else {
            mail_from.to_string()
        };
        let mail_from_domain = sender.rsplit_once('@').map_or(helo, |(_, d)| d);
        let parsed = AuthenticatedMessage::parse(&message);
        let (spf_helo, spf_mail, dkim) = tokio::join!(
            self.authenticator
                .verify_spf(SpfParameters::verify_ehlo(ip, helo, host)),
            self.authenticator
                .verify_spf(SpfParameters::verify_mail_from(ip, helo, host, &sender)),
            async {
                match &parsed {
                    Some(m) => self.authenticator.verify_dkim(m).await,
                    None => Vec::new(),
                }
            }
        );
        let header_from = parsed
            .as_ref()
            .and_then(|m| m.from.first().cloned())
            .unwrap_or_default();
        let dmarc = match &parsed {
            Some(m) => Some(
                self.authenticator
                    .verify_dmarc(DmarcParameters::new(m, &dkim, mail_from_domain, &spf_mail))
                    .await,
            ),
            None => None,
        };

        let mut results = AuthenticationResults::new(host).with_dkim_results(&dkim, &header_from);
        results = results
            .with_spf_ehlo_result(&spf_helo, ip, helo)
            .with_spf_mailfrom_result(&spf_mail, ip, mail_from, helo);
        if let Some(d) = &dmarc {
            results = results.with_dmarc_result(d);
        }
        let mut header = results.to_header();
        if dkim.is_empty() {
            // RFC 8601 §2.7.1: say that no signature was there.
            header = header.replacen(";\r\n\tspf=", ";\r\n\tdkim=none;\r\n\tspf=", 1);
        }

        let dmarc_word = dmarc.as_ref().map_or("none", |d| dmarc_word(&d.result()));
        let from_domain = dmarc
            .as_ref()
            .map(|d| d.domain().to_string())
            .unwrap_or_default();
        let disposition = match &dmarc {
            Some(d) => decide(&d.result(), d.policy(), self.policy, &from_domain),
            None => Disposition::Deliver,
        };
        let mut out = Vec::with_capacity(header.len() + message.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&message);
        Checked {
            message: out,
            disposition,
            spf: spf_word(spf_mail.result()),
            dkim: best_dkim_word(dkim.iter().map(|d| d.result())),
            dmarc: dmarc_word,
            from_domain,
        }
    }
}

/// Whether mail from `ip` is this host's own (127.0.0.1 or ::1, OpenDKIM's
/// `InternalHosts` and OpenDMARC's `IgnoreHosts` defaults): it is not checked. Other
/// loopback addresses are checked like any client.
pub fn internal_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == std::net::Ipv6Addr::LOCALHOST
                || v6.to_ipv4_mapped() == Some(std::net::Ipv4Addr::LOCALHOST)
        }
    }
}

/// What a DMARC `result` under the domain's `published` policy leads to with erlmail's
/// `policy`: only a real failure (not `temperror`, `permerror` or no record) is acted
/// on, and only when enforcing.
pub fn decide(
    result: &DmarcResult, published: Policy, policy: DmarcPolicy, domain: &str,
) -> Disposition {
    if policy != DmarcPolicy::Enforce || !matches!(result, DmarcResult::Fail(_)) {
        return Disposition::Deliver;
    }
    match published {
        Policy::Reject => Disposition::Reject(format!(
            "5.7.1 Message rejected per DMARC policy for {domain}"
        )),
        Policy::Quarantine => Disposition::Junk,
        Policy::None | Policy::Unspecified => Disposition::Deliver,
    }
}

/// `message` without the `Authentication-Results:` fields of its header whose
/// authserv-id is `authserv_id` (compared without case): only this host may write
/// those (RFC 8601 §5). Other fields and the body are kept byte for byte.
pub fn strip_our_results(message: &[u8], authserv_id: &str) -> Vec<u8> {
    let header_end = crate::outbound::seven_bit::header_section(message).len();
    let mut out = Vec::with_capacity(message.len());
    let mut pos = 0;
    let mut dropping = false;
    while pos < header_end {
        let end = message[pos..header_end]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(header_end, |i| pos + i + 1);
        let line = &message[pos..end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            dropping = claims(line, authserv_id);
        }
        if !dropping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out.extend_from_slice(&message[header_end..]);
    out
}

/// Whether a header field's first line is an `Authentication-Results:` for `id`.
fn claims(line: &[u8], id: &str) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    if !line[..colon]
        .trim_ascii()
        .eq_ignore_ascii_case(b"Authentication-Results")
    {
        return false;
    }
    let value = String::from_utf8_lossy(&line[colon + 1..]);
    let value = skip_comments(value.trim_start());
    let found = value
        .split(|c: char| c == ';' || c.is_whitespace())
        .next()
        .unwrap_or("");
    found
        .trim_end_matches('.')
        .eq_ignore_ascii_case(id.trim_end_matches('.'))
}

/// `s` after any leading `(comments)` and spaces (RFC 5322 CFWS).
fn skip_comments(mut s: &str) -> &str {
    while let Some(rest) = s.strip_prefix('(') {
        let mut depth = 1;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        s = rest[end.min(rest.len())..].trim_start();
    }
    s
}

fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

/// The best of several signatures' results (a pass anywhere is a pass).
fn best_dkim_word<'a>(results: impl Iterator<Item = &'a DkimResult>) -> &'static str {
    let rank = |w: &str| match w {
        "pass" => 0,
        "temperror" => 1,
        "fail" => 2,
        "permerror" => 3,
        "neutral" => 4,
        _ => 5,
    };
    results
        .map(dkim_word)
        .min_by_key(|w| rank(w))
        .unwrap_or("none")
}

fn dmarc_word(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_results_claiming_our_id_are_removed() {
        let msg = b"Received: from x by mx.test\r\n\
            Authentication-Results: MX.test.; spf=pass\r\n\
            \tsmtp.mailfrom=a@b\r\n\
            Authentication-Results: (forged) mx.test; dkim=pass\r\n\
            Authentication-Results: other.example; dkim=pass\r\n\
            Authentication-Results: mx.tester; dkim=pass\r\n\
            Subject: hi\r\n\r\n\
            Authentication-Results: mx.test; in the body stays\r\n";
        let out = String::from_utf8(strip_our_results(msg, "mx.test")).unwrap();
        assert_eq!(
            out,
            "Received: from x by mx.test\r\n\
             Authentication-Results: other.example; dkim=pass\r\n\
             Authentication-Results: mx.tester; dkim=pass\r\n\
             Subject: hi\r\n\r\n\
             Authentication-Results: mx.test; in the body stays\r\n"
        );
        let plain = b"Subject: x\r\n\r\nbody\r\n";
        assert_eq!(strip_our_results(plain, "mx.test"), plain);
    }

    #[test]
    fn only_a_real_failure_under_enforce_acts() {
        let fail = DmarcResult::Fail(mail_auth::Error::NotAligned);
        let temp = DmarcResult::TempError(mail_auth::Error::Io("timeout".into()));
        let enforce = DmarcPolicy::Enforce;
        assert_eq!(
            decide(&fail, Policy::Reject, enforce, "bad.test"),
            Disposition::Reject("5.7.1 Message rejected per DMARC policy for bad.test".into())
        );
        assert_eq!(
            decide(&fail, Policy::Quarantine, enforce, "d"),
            Disposition::Junk
        );
        assert_eq!(
            decide(&fail, Policy::None, enforce, "d"),
            Disposition::Deliver
        );
        assert_eq!(
            decide(&temp, Policy::Reject, enforce, "d"),
            Disposition::Deliver
        );
        assert_eq!(
            decide(&DmarcResult::Pass, Policy::Reject, enforce, "d"),
            Disposition::Deliver
        );
        assert_eq!(
            decide(&fail, Policy::Reject, DmarcPolicy::Report, "d"),
            Disposition::Deliver
        );
    }

    #[test]
    fn only_this_hosts_own_address_is_internal() {
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(internal_host(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.2", "192.0.2.1", "2001:db8::1"] {
            assert!(!internal_host(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_pass_anywhere_is_the_best_dkim_result() {
        let fail = DkimResult::Fail(mail_auth::Error::ParseError);
        assert_eq!(
            best_dkim_word([fail.clone(), DkimResult::Pass].iter()),
            "pass"
        );
        assert_eq!(best_dkim_word([fail].iter()), "fail");
        assert_eq!(best_dkim_word(std::iter::empty()), "none");
    }
}
