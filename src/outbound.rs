//! Outbound delivery: where a recipient's mail goes, and the SMTP client that hands it
//! over. In the order a delivery uses them:
//!
//! - `route`: the next hop (`server_smtp_routes`, then `server_smtp_relay_host`, then
//!   DNS MX with A/AAAA fallback; a null MX is refused).
//! - `dialogue`: one message to one next hop, trying its hosts in order, with one result
//!   per recipient.
//! - `cache`: idle connections kept for the next message, as Postfix's connection cache.
//! - `connection`: connect, greeting, EHLO, opportunistic STARTTLS, replies, QUIT.
//! - `envelope`, `wire`, `seven_bit`: the pure pieces (MAIL/RCPT parameters, reply
//!   parsing and dot-stuffing, 8-bit text made 7-bit for hops without 8BITMIME).
//!
//! This is the only folder that does outbound network I/O. It decides nothing about
//! retries or notifications: it reports per-recipient `RcptStatus` values and leaves
//! their meaning to the pure policy in `queue` and to the sender actor.

pub mod cache;
pub mod connection;
pub mod dialogue;
pub mod envelope;
pub mod route;
pub mod seven_bit;
pub mod wire;

pub use cache::{
    CacheLimits, ConnectionCache, CONNECTION_CACHE_PER_HOP, CONNECTION_CACHE_TIME_LIMIT,
    CONNECTION_REUSE_COUNT_LIMIT, CONNECTION_REUSE_TIME_LIMIT,
};
pub use connection::{DeliveryOptions, Hop};
pub use dialogue::{deliver, deliver_with, DeliveryReport, GoAhead, RcptResult};
pub use envelope::{Envelope, EnvelopeRcpt};
pub use route::{recipient_domain, NextHop, RouteError, Router, RouterConfig};

/// Delivers one message to all its recipients: groups them by next hop (recipients of
/// one domain, or of domains sharing a route, travel in one SMTP transaction), resolves
/// each hop and delivers each group, the groups concurrently, over the router's cached
/// connections where there are any. Returns one result per recipient, in the order of
/// `rcpts`.
///
/// A recipient whose hop cannot be resolved gets the routing failure (null MX and
/// NXDOMAIN permanent, other DNS trouble temporary); `remote_mta` is then `None`.
pub async fn deliver_message(
    router: &Router, helo: &str, sender: &str, rcpts: &[String], body: &[u8],
) -> Vec<RcptResult> {
    let envelope = Envelope::plain(sender, rcpts);
    deliver_message_with(router, helo, &envelope, body, &GoAhead::new()).await
}

/// [`deliver_message`] with the envelope's parameters (passed on where the next hop
/// offers their extensions), sending the text only while `go_ahead` is given (the
/// sender withdraws it when it loses the message's lease).
pub async fn deliver_message_with(
    router: &Router, helo: &str, envelope: &Envelope, body: &[u8], go_ahead: &GoAhead,
) -> Vec<RcptResult> {
    // Group in first-seen order so results and logs follow the envelope.
    let mut groups: Vec<(NextHop, Vec<usize>)> = Vec::new();
    for (i, rcpt) in envelope.rcpts.iter().enumerate() {
        let hop = router.next_hop(&recipient_domain(&rcpt.address));
        match groups.iter_mut().find(|(h, _)| *h == hop) {
            Some((_, members)) => members.push(i),
            None => groups.push((hop, vec![i])),
        }
    }

    let work = groups.into_iter().map(|(hop, members)| async move {
        let group = envelope.subset(&members);
        let results = match router.resolve(&hop).await {
            Ok(hops) => {
                deliver_with(
                    &hops,
                    helo,
                    &group,
                    body,
                    router.delivery_options(),
                    Some(router.connection_cache()),
                    go_ahead,
                )
                .await
                .results
            }
            Err(e) => {
                tracing::info!(next_hop = %hop, error = %e, "next hop not resolved");
                let cause = e.cause();
                group
                    .rcpts
                    .iter()
                    .map(|r| RcptResult::failed(&r.address, cause.clone(), None))
                    .collect()
            }
        };
        members.into_iter().zip(results).collect::<Vec<_>>()
    });

    let mut indexed: Vec<(usize, RcptResult)> = futures::future::join_all(work)
        .await
        .into_iter()
        .flatten()
        .collect();
    indexed.sort_by_key(|(i, _)| *i);
    indexed.into_iter().map(|(_, r)| r).collect()
}
