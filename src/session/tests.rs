//! Session tests: whole dialogues on byte strings with exact replies, the open-relay
//! cases, limits, smuggling, and property tests for split invariance and fuzzing.

use std::net::IpAddr;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;

use super::driver::{run, run_split, Transcript};
use super::*;

const HOST: &str = "mx.local.example";
const EHLO_REPLY: &str = "250-mx.local.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 DSN\r\n";
const GREETING: &str = "220 mx.local.example ESMTP erlmail\r\n";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, 5, 14, 7, 9).unwrap()
}

fn policy() -> SessionPolicy {
    SessionPolicy::with_defaults(HOST)
}

fn peer() -> PeerInfo {
    PeerInfo {
        ip: "192.0.2.10".parse().unwrap(),
        port: 40000,
    }
}

/// The fake store: `local.example` and the host name are local; bob, alice and
/// postmaster exist there.
fn lookup(path: &ForwardPath) -> RecipientInfo {
    let m = &path.mailbox;
    let local_domain = m.domain == "local.example" || m.domain == HOST;
    // Users are found case-insensitively, as the store finds them.
    let user_exists = local_domain
        && ["bob", "alice", "postmaster"].contains(&m.local_part.to_lowercase().as_str());
    RecipientInfo {
        local_domain,
        user_exists,
        temporary_failure: false,
    }
}

fn store_ok(_: &Transaction) -> StoreOutcome {
    StoreOutcome::Stored {
        queue_id: Some("Q1".into()),
    }
}

/// Runs `input` one line per read: a client in lockstep. (These dialogues used to be one
/// read; most start with EHLO, and EHLO with commands behind it is now a pipelining
/// violation. Pipelined groups are tested on their own below and in the split-invariance
/// properties, which hold only for a client that waits where RFC 2920 says it must.)
fn dialogue_with(policy: SessionPolicy, input: &str) -> Transcript {
    dialogue_lines(policy, input)
}

/// Runs `input` in lockstep with the default (unauthorised) policy.
fn dialogue(input: &str) -> Transcript {
    dialogue_with(policy(), input)
}

/// Runs `rounds`, each one read, as a client that waits for the replies between them.
fn dialogue_rounds(policy: SessionPolicy, rounds: &[&str]) -> Transcript {
    let mut s = Session::new(policy, peer());
    run(
        &mut s,
        rounds.iter().map(|r| r.as_bytes()),
        now(),
        lookup,
        store_ok,
    )
}

/// Runs `input` one line per read.
fn dialogue_lines(policy: SessionPolicy, input: &str) -> Transcript {
    let mut s = Session::new(policy, peer());
    run(
        &mut s,
        input.split_inclusive('\n').map(str::as_bytes),
        now(),
        lookup,
        store_ok,
    )
}

fn authorised() -> SessionPolicy {
    SessionPolicy {
        relay_authorised: true,
        ..policy()
    }
}

/// The replies after greeting and EHLO.
fn after_ehlo(t: &Transcript) -> String {
    let text = t.text();
    let prefix = format!("{GREETING}{EHLO_REPLY}");
    assert!(text.starts_with(&prefix), "{text}");
    text[prefix.len()..].to_string()
}

const TX: &str = "EHLO client.example\r\nMAIL FROM:<sender@remote.example>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nSubject: hi\r\n\r\nHello\r\n..dot\r\n.\r\nQUIT\r\n";

#[test]
fn greeting_is_exact() {
    let mut s = Session::new(policy(), peer());
    assert_eq!(
        s.greeting(),
        vec![Action::Send(GREETING.as_bytes().to_vec())]
    );
}

#[test]
fn whole_transaction_line_by_line() {
    let t = dialogue_lines(policy(), TX);
    assert_eq!(
        after_ehlo(&t),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
    );
    assert!(t.closed);
    assert_eq!(t.stored.len(), 1);
    let tx = &t.stored[0];
    assert_eq!(
        tx.reverse_path,
        ReversePath::Mailbox(Mailbox {
            local_part: "sender".into(),
            domain: "remote.example".into()
        })
    );
    assert_eq!(tx.recipients.len(), 1);
    assert_eq!(tx.recipients[0].path.to_string(), "bob@local.example");
    assert!(tx.recipients[0].local);
    assert_eq!(tx.helo, "client.example");
    assert_eq!(tx.client_ip, "192.0.2.10".parse::<IpAddr>().unwrap());
    assert_eq!(tx.subject.as_deref(), Some("hi"));
    assert_eq!(
        String::from_utf8(tx.data.clone()).unwrap(),
        "Received: from client.example ([192.0.2.10])\r\n\tby mx.local.example with ESMTP\r\n\tfor <bob@local.example>; Tue, 5 Mar 2024 14:07:09 +0000\r\nSubject: hi\r\n\r\nHello\r\n.dot\r\n"
    );
    assert_eq!(
        (tx.ret.clone(), tx.envid.clone(), tx.body_8bit, tx.smtputf8),
        (None, None, false, false)
    );
}

/// TX as an RFC 2920 client sends it: EHLO alone, then MAIL, RCPT and DATA as one group,
/// then the message and QUIT.
const TX_ROUNDS: [&str; 3] = [
    "EHLO client.example\r\n",
    "MAIL FROM:<sender@remote.example>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n",
    "Subject: hi\r\n\r\nHello\r\n..dot\r\n.\r\nQUIT\r\n",
];

#[test]
fn pipelined_transaction_gives_all_replies_in_order() {
    assert_eq!(TX_ROUNDS.concat(), TX);
    let grouped = dialogue_rounds(policy(), &TX_ROUNDS);
    let lines = dialogue_lines(policy(), TX);
    assert_eq!(grouped, lines);
    // One read in, one write out: the session merges the replies of a batch.
    let mut s = Session::new(policy(), peer());
    s.greeting();
    s.receive(b"EHLO c\r\n", now());
    let actions = s.receive(
        b"MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nRCPT TO:<alice@local.example>\r\nNOOP\r\n",
        now(),
    );
    let [Action::Send(first), Action::LookupRecipient(bob)] = actions.as_slice() else {
        panic!("{actions:?}")
    };
    assert_eq!(first, b"250 2.1.0 Ok\r\n");
    assert_eq!(bob.to_string(), "bob@local.example");
    assert!(
        s.receive(b"QUIT\r\n", now()).is_empty(),
        "waiting: only buffers"
    );
    let actions = s.recipient_info(lookup(bob), now());
    let [Action::Send(ok), Action::LookupRecipient(alice)] = actions.as_slice() else {
        panic!("{actions:?}")
    };
    assert_eq!(ok, b"250 2.1.5 Ok\r\n");
    let actions = s.recipient_info(lookup(alice), now());
    assert_eq!(
        actions,
        vec![
            Action::Send(b"250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n".to_vec()),
            Action::Close
        ]
    );
    assert!(s.is_closed());
    assert!(s.receive(b"NOOP\r\n", now()).is_empty());
}

#[test]
fn helo_gives_plain_reply_and_smtp_received() {
    let t = dialogue("HELO client\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nRCPT TO:<alice@local.example>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(
        t.text(),
        format!("{GREETING}250 mx.local.example\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n")
    );
    let tx = &t.stored[0];
    assert_eq!(tx.reverse_path, ReversePath::Null);
    assert_eq!(
        String::from_utf8(tx.data.clone()).unwrap(),
        "Received: from client ([192.0.2.10])\r\n\tby mx.local.example with SMTP; Tue, 5 Mar 2024 14:07:09 +0000\r\nx\r\n"
    );
    assert_eq!(tx.subject, None);
}

#[test]
fn simple_commands() {
    let t = dialogue("NOOP\r\nRSET\r\nVRFY bob\r\nEXPN staff\r\nHELP\r\nFOO\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n\
             252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n\
             502 5.5.1 Error: command not implemented\r\n\
             214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n\
             500 5.5.2 Error: command not recognized\r\n221 2.0.0 Bye\r\n"
        )
    );
    assert!(t.closed);
}

#[test]
fn bad_sequences() {
    let t = dialogue("MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nEHLO c\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nMAIL FROM:<>\r\nDATA\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@local.example>\r\nDATA\r\n");
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}503 5.5.1 Error: send HELO/EHLO first\r\n\
             503 5.5.1 Error: need MAIL command\r\n\
             503 5.5.1 Error: need MAIL command\r\n\
             {EHLO_REPLY}\
             503 5.5.1 Error: need MAIL command\r\n\
             503 5.5.1 Error: need MAIL command\r\n\
             250 2.1.0 Ok\r\n\
             503 5.5.1 Error: need RCPT command\r\n\
             503 5.5.1 Error: nested MAIL command\r\n\
             550 5.1.1 <nobody@local.example>: Recipient address rejected: User unknown\r\n\
             554 5.5.1 Error: no valid recipients\r\n"
        )
    );
}

#[test]
fn rset_and_ehlo_reset_the_transaction_but_keep_helo() {
    let t = dialogue("EHLO c\r\nMAIL FROM:<>\r\nRSET\r\nRCPT TO:<bob@local.example>\r\nMAIL FROM:<>\r\nEHLO c\r\nMAIL FROM:<>\r\n");
    let expected = format!("250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n250 2.1.0 Ok\r\n{EHLO_REPLY}250 2.1.0 Ok\r\n");
    assert_eq!(after_ehlo(&t), expected);
}

#[test]
fn syntax_errors_and_unknown_parameters() {
    let t = dialogue("EHLO\r\nEHLO c\r\nMAIL FROM:<a b@c>\r\nMAIL FROM <a@b>\r\nMAIL FROM:<> FOO=1\r\nMAIL FROM:<> SIZE=big\r\nMAIL FROM:<user>\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example> BAR\r\nRCPT TO:<bob@local.example> NOTIFY=NEVER,DELAY\r\nRCPT TO:<>\r\nRCPT TO:<user>\r\nDATA now\r\n");
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}501 5.5.4 Syntax: EHLO hostname\r\n{EHLO_REPLY}\
             501 5.1.7 Bad sender address syntax\r\n\
             501 5.5.4 Syntax: MAIL FROM:<address>\r\n\
             555 5.5.4 Unsupported option: FOO\r\n\
             501 5.5.4 Bad message size syntax\r\n\
             501 5.1.7 Bad sender address syntax\r\n\
             250 2.1.0 Ok\r\n\
             555 5.5.4 Unsupported option: BAR\r\n\
             501 5.5.4 Bad NOTIFY parameter syntax\r\n\
             501 5.1.3 Bad recipient address syntax\r\n\
             501 5.1.3 Bad recipient address syntax\r\n\
             501 5.5.4 Syntax: DATA\r\n"
        )
    );
}

#[test]
fn address_without_brackets_is_accepted() {
    let t = dialogue("EHLO c\r\nMAIL FROM:a@remote.example\r\nRCPT TO: bob@local.example\r\n");
    assert_eq!(after_ehlo(&t), "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
}

#[test]
fn null_sender_is_accepted() {
    let t = dialogue("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n.\r\n");
    assert_eq!(
        after_ehlo(&t),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n"
    );
    assert_eq!(t.stored[0].reverse_path, ReversePath::Null);
}

#[test]
fn esmtp_parameters_reach_the_transaction() {
    let t = dialogue("EHLO c\r\nMAIL FROM:<a@remote.example> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=abc+2B\r\nRCPT TO:<bob@local.example> NOTIFY=success,failure ORCPT=rfc822;bob@local.example\r\nRCPT TO:<alice@local.example> NOTIFY=NEVER\r\nDATA\r\nx\r\n.\r\n");
    let tx = &t.stored[0];
    assert_eq!(tx.ret.as_deref(), Some("HDRS"));
    assert_eq!(tx.envid.as_deref(), Some("abc+2B"));
    assert!(tx.body_8bit && tx.smtputf8);
    assert_eq!(tx.recipients[0].notify.as_deref(), Some("SUCCESS,FAILURE"));
    assert_eq!(
        tx.recipients[0].orcpt.as_deref(),
        Some("rfc822;bob@local.example")
    );
    assert_eq!(tx.recipients[1].notify.as_deref(), Some("NEVER"));
    assert_eq!(tx.recipients[1].orcpt, None);
    // Two recipients: no `for <...>` in the trace header; SMTPUTF8 mail is received
    // `with UTF8SMTP` (RFC 6531 §3.7.3).
    assert!(tx
        .data
        .starts_with(b"Received: from c ([192.0.2.10])\r\n\tby mx.local.example with UTF8SMTP; "));
}

#[test]
fn unicode_addresses_need_smtputf8() {
    let t = dialogue(
        "EHLO c\r\nMAIL FROM:<jos\u{e9}@remote.example>\r\nMAIL FROM:<a@remote.example>\r\n\
         RCPT TO:<b\u{f8}b@local.example>\r\nRSET\r\n\
         MAIL FROM:<jos\u{e9}@remote.example> SMTPUTF8\r\nRCPT TO:<bob@local.example>\r\n",
    );
    assert_eq!(
        after_ehlo(&t),
        "553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n\
         250 2.1.0 Ok\r\n\
         553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n\
         250 2.0.0 Ok\r\n\
         250 2.1.0 Ok\r\n\
         250 2.1.5 Ok\r\n"
    );
}

#[test]
fn duplicate_recipients_are_kept_once() {
    let t = dialogue("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nRCPT TO:<bob@LOCAL.example.>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(after_ehlo(&t), "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n");
    assert_eq!(t.stored[0].recipients.len(), 1);
}

#[test]
fn a_local_user_named_in_two_cases_gets_one_copy_a_remote_one_two() {
    let t = dialogue_with(
        authorised(),
        "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Alice@local.example>\r\nRCPT TO:<alice@Local.Example>\r\n\
         RCPT TO:<Carol@far.example>\r\nRCPT TO:<carol@FAR.example>\r\nRCPT TO:<Carol@far.EXAMPLE>\r\n\
         DATA\r\nx\r\n.\r\n",
    );
    let rcpts: Vec<(String, bool)> = t.stored[0]
        .recipients
        .iter()
        .map(|r| (r.path.mailbox.to_string(), r.local))
        .collect();
    assert_eq!(
        rcpts,
        vec![
            ("Alice@local.example".to_string(), true),
            ("Carol@far.example".to_string(), false),
            ("carol@far.example".to_string(), false),
        ],
        "one copy per mailbox: a local user's name in any case, a remote local part as written"
    );
}

// ---- open relay, unauthorised client ----

/// One RCPT from an unauthorised client; returns the reply and the lookups made.
fn rcpt_unauthorised(addr: &str) -> (String, Vec<ForwardPath>) {
    let t = dialogue(&format!(
        "EHLO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:{addr}\r\n"
    ));
    let replies = after_ehlo(&t);
    (replies["250 2.1.0 Ok\r\n".len()..].to_string(), t.lookups)
}

fn assert_denied_without_lookup(addr: &str) {
    let inner = &addr[1..addr.len() - 1];
    let (reply, lookups) = rcpt_unauthorised(addr);
    assert_eq!(
        reply,
        format!("554 5.7.1 <{inner}>: Relay access denied\r\n")
    );
    assert!(lookups.is_empty(), "{addr}: {lookups:?}");
}

#[test]
fn relay_percent_hack_denied() {
    assert_denied_without_lookup("<user%remote.example@local.example>");
}

#[test]
fn relay_bang_path_denied() {
    assert_denied_without_lookup("<remote.example!user>");
}

#[test]
fn relay_bang_path_at_local_denied() {
    assert_denied_without_lookup("<remote.example!bob@local.example>");
}

#[test]
fn relay_source_route_denied() {
    assert_denied_without_lookup("<@local.example:user@remote.example>");
    assert_denied_without_lookup("<@local.example,@mx.local.example:bob@local.example>");
}

#[test]
fn relay_quoted_at_denied() {
    assert_denied_without_lookup("<\"user@remote.example\"@local.example>");
}

#[test]
fn relay_double_at_denied() {
    assert_denied_without_lookup("<user@remote.example@local.example>");
}

#[test]
fn relay_ip_literal_denied() {
    assert_denied_without_lookup("<user@[192.0.2.1]>");
    assert_denied_without_lookup("<user@[IPv6:2001:db8::1]>");
}

#[test]
fn relay_remote_domain_denied_after_lookup() {
    let (reply, lookups) = rcpt_unauthorised("<user@remote.example>");
    assert_eq!(
        reply,
        "554 5.7.1 <user@remote.example>: Relay access denied\r\n"
    );
    assert_eq!(lookups.len(), 1);
}

#[test]
fn relay_trailing_dot_and_case_variants_are_normalised() {
    // A remote domain in disguise is still remote...
    let (reply, lookups) = rcpt_unauthorised("<user@Remote.EXAMPLE.>");
    assert_eq!(
        reply,
        "554 5.7.1 <user@Remote.EXAMPLE.>: Relay access denied\r\n"
    );
    assert_eq!(lookups[0].mailbox.domain, "remote.example");
    // ...and a local one in disguise is local, so it is judged by the store, not relayed.
    let (reply, lookups) = rcpt_unauthorised("<bob@LOCAL.Example.>");
    assert_eq!(reply, "250 2.1.5 Ok\r\n");
    assert_eq!(lookups[0].mailbox.domain, "local.example");
    let (reply, _) = rcpt_unauthorised("<nobody@Local.Example.>");
    assert_eq!(
        reply,
        "550 5.1.1 <nobody@Local.Example.>: Recipient address rejected: User unknown\r\n"
    );
}

#[test]
fn unauthorised_client_still_delivers_locally() {
    let t = dialogue("EHLO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<user%remote.example@local.example>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nhello\r\n.\r\n");
    assert_eq!(t.stored.len(), 1);
    assert_eq!(t.stored[0].recipients.len(), 1);
    assert_eq!(t.stored[0].recipients[0].path.mailbox.local_part, "bob");
    assert!(t.stored[0].recipients[0].local);
}

#[test]
fn postmaster_without_domain_maps_to_hostname() {
    let (reply, lookups) = rcpt_unauthorised("<Postmaster>");
    assert_eq!(reply, "250 2.1.5 Ok\r\n");
    assert_eq!(
        lookups[0].mailbox.to_string(),
        "postmaster@mx.local.example"
    );
    assert_eq!(lookups[0].raw, "Postmaster");
}

// ---- authorised client ----

#[test]
fn authorised_client_relays_and_is_still_checked_locally() {
    let t = dialogue_with(authorised(), "EHLO c\r\nMAIL FROM:<a@local.example>\r\nRCPT TO:<x@remote.example>\r\nRCPT TO:<nobody@local.example>\r\nRCPT TO:<@relay.example:y@remote.example>\r\nRCPT TO:<z@[192.0.2.1]>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(
        after_ehlo(&t),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <nobody@local.example>: Recipient address rejected: User unknown\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n"
    );
    let r: Vec<(String, bool)> = t.stored[0]
        .recipients
        .iter()
        .map(|r| (r.path.to_string(), r.local))
        .collect();
    assert_eq!(
        r,
        vec![
            ("x@remote.example".to_string(), false),
            ("y@remote.example".to_string(), false),
            ("z@[192.0.2.1]".to_string(), false),
            ("bob@local.example".to_string(), true),
        ]
    );
}

#[test]
fn relayed_mail_keeps_no_subject_and_a_local_copy_does() {
    let relayed = dialogue_with(authorised(), "EHLO c\r\nMAIL FROM:<a@local.example>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\nSubject: far\r\n\r\nx\r\n.\r\n");
    assert_eq!(
        relayed.stored[0].subject, None,
        "nobody lists a relayed message"
    );
    let both = dialogue_with(authorised(), "EHLO c\r\nMAIL FROM:<a@local.example>\r\nRCPT TO:<x@remote.example>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nSubject: near\r\n\r\nx\r\n.\r\n");
    assert_eq!(both.stored[0].subject.as_deref(), Some("near"));
}

// ---- store answers ----

#[test]
fn store_failures_are_reported_and_the_session_goes_on() {
    for (outcome, reply) in [
        (
            StoreOutcome::Failed,
            "451 4.3.0 Error: queue file write error\r\n",
        ),
        (
            StoreOutcome::DiskFull,
            "452 4.3.1 Insufficient system storage\r\n",
        ),
        (
            StoreOutcome::Stored { queue_id: None },
            "250 2.0.0 Ok: queued\r\n",
        ),
    ] {
        let mut s = Session::new(policy(), peer());
        let t = run(
            &mut s,
            [
                &b"EHLO c\r\n"[..],
                b"MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n",
                b"x\r\n.\r\nMAIL FROM:<>\r\n",
            ],
            now(),
            lookup,
            |_| outcome.clone(),
        );
        assert_eq!(
            after_ehlo(&t),
            format!("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n{reply}250 2.1.0 Ok\r\n")
        );
    }
}

#[test]
fn a_failed_lookup_is_a_temporary_451_and_the_session_goes_on() {
    let mut s = Session::new(policy(), peer());
    s.greeting();
    s.receive(b"EHLO c.test\r\n", now());
    s.receive(
        b"MAIL FROM:<a@c.test>\r\nRCPT TO:<bob@local.example>\r\n",
        now(),
    );
    let out = s.recipient_info(
        RecipientInfo {
            local_domain: false,
            user_exists: false,
            temporary_failure: true,
        },
        now(),
    );
    assert_eq!(
        out,
        vec![Action::Send(
            b"451 4.3.0 <bob@local.example>: Temporary lookup failure\r\n".to_vec()
        )]
    );
    assert!(!s.is_waiting());
    let out = s.receive(b"NOOP\r\n", now());
    assert_eq!(out, vec![Action::Send(b"250 2.0.0 Ok\r\n".to_vec())]);
}

#[test]
fn answers_when_nothing_is_pending_are_ignored() {
    let mut s = Session::new(policy(), peer());
    assert!(s.stored(StoreOutcome::Failed, now()).is_empty());
    assert!(s
        .recipient_info(
            RecipientInfo {
                local_domain: true,
                user_exists: true,
                temporary_failure: false,
            },
            now()
        )
        .is_empty());
    assert!(!s.is_waiting());
}

// ---- limits ----

#[test]
fn command_too_long() {
    let policy = SessionPolicy {
        max_line_length: 512,
        ..policy()
    };
    let long = format!("NOOP {}\r\n", "x".repeat(505));
    assert_eq!(long.len(), 512);
    let t = dialogue_with(policy.clone(), &long);
    assert_eq!(t.text(), format!("{GREETING}250 2.0.0 Ok\r\n"));
    let longer = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(5000));
    let expected = format!("{GREETING}500 5.5.2 Error: command too long\r\n250 2.0.0 Ok\r\n");
    assert_eq!(dialogue_with(policy.clone(), &longer).text(), expected);
    let mut s = Session::new(policy, peer());
    let t = run(&mut s, longer.as_bytes().chunks(7), now(), lookup, store_ok);
    assert_eq!(t.text(), expected);
}

#[test]
fn message_size_at_mail_and_after_the_dot() {
    let policy = SessionPolicy {
        max_message_size: 20,
        ..policy()
    };
    let t = dialogue_with(policy, "EHLO c\r\nMAIL FROM:<> SIZE=21\r\nMAIL FROM:<> SIZE=20\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n0123456789\r\n0123456789\r\n.\r\nMAIL FROM:<>\r\n");
    let text = t.text();
    let replies = &text[text.find("250 DSN\r\n").unwrap() + 9..];
    assert!(text.contains("250-SIZE 20\r\n"));
    assert_eq!(
        replies,
        "552 5.3.4 Message size exceeds fixed limit\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n552 5.3.4 Message size exceeds fixed limit\r\n250 2.1.0 Ok\r\n"
    );
    assert!(t.stored.is_empty());
}

#[test]
fn long_text_lines_in_data_are_accepted_whole() {
    let line = "y".repeat(5000);
    let t = dialogue(&format!(
        "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n{line}\r\n.\r\n"
    ));
    assert_eq!(t.stored.len(), 1);
    assert!(t.stored[0].data.ends_with(format!("{line}\r\n").as_bytes()));
}

#[test]
fn too_many_recipients() {
    let policy = SessionPolicy {
        max_recipients: 2,
        ..policy()
    };
    let t = dialogue_with(policy, "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nRCPT TO:<alice@local.example>\r\nRCPT TO:<postmaster@local.example>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(
        after_ehlo(&t),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n"
    );
    assert_eq!(t.stored[0].recipients.len(), 2);
}

#[test]
fn hop_count() {
    let policy = SessionPolicy {
        max_hops: 2,
        ..policy()
    };
    let body = |n: usize| "Received: x\r\n".repeat(n) + "\r\nbody\r\n.\r\n";
    let head = "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n";
    let t = dialogue_with(policy.clone(), &format!("{head}{}", body(3)));
    assert!(
        t.text()
            .ends_with("354 End data with <CR><LF>.<CR><LF>\r\n554 5.4.0 Error: too many hops\r\n"),
        "{}",
        t.text()
    );
    assert!(t.stored.is_empty());
    let t = dialogue_with(policy, &format!("{head}{}", body(2)));
    assert_eq!(t.stored.len(), 1);
}

#[test]
fn hard_error_limit_closes() {
    let policy = SessionPolicy {
        hard_error_limit: 3,
        ..policy()
    };
    let t = dialogue_with(policy, "FOO\r\nNOOP\r\nBAR\r\nBAZ\r\nNOOP\r\n");
    assert_eq!(
        t.text(),
        format!("{GREETING}500 5.5.2 Error: command not recognized\r\n250 2.0.0 Ok\r\n500 5.5.2 Error: command not recognized\r\n500 5.5.2 Error: command not recognized\r\n421 4.7.0 mx.local.example Error: too many errors\r\n")
    );
    assert!(t.closed);
}

#[test]
fn timeout_and_shutdown_close() {
    let mut s = Session::new(policy(), peer());
    assert_eq!(
        s.timeout(),
        vec![
            Action::Send(b"421 4.4.2 mx.local.example Error: timeout exceeded\r\n".to_vec()),
            Action::Close
        ]
    );
    assert!(s.is_closed());
    assert!(s.shutdown().is_empty());
    let mut s = Session::new(policy(), peer());
    assert_eq!(
        s.shutdown(),
        vec![
            Action::Send(b"421 4.3.2 mx.local.example Service shutting down\r\n".to_vec()),
            Action::Close
        ]
    );
}

#[test]
fn bare_line_ends_in_commands() {
    let t = dialogue("NOOP\nNOOP\r\nNO\rOP\r\nNOOP\r\n");
    assert_eq!(
        t.text(),
        format!("{GREETING}550 5.5.2 Error: bare <LF> received\r\n250 2.0.0 Ok\r\n550 5.5.2 Error: bare <CR> received\r\n250 2.0.0 Ok\r\n")
    );
}

// ---- smuggling ----

const SMUGGLING: [&str; 7] = [
    "\n.\n",
    "\r.\r",
    "\r\n.\n",
    "\n.\r\n",
    "\r\n.\r",
    "\r.\r\n",
    "\r\n\0.\r\n",
];

/// A message with `seq` in it and a second transaction behind, sent as an RFC 2920
/// client sends (EHLO, then the MAIL/RCPT/DATA group, then the text after the 354).
fn smuggling_rounds(seq: &str) -> Vec<String> {
    vec![
        "EHLO c\r\n".to_string(),
        "MAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n".to_string(),
        format!("Subject: one\r\n\r\nfirst{seq}MAIL FROM:<evil@remote.example>\r\nRCPT TO:<alice@local.example>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\nQUIT\r\n"),
    ]
}

fn rounds_of(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn each_smuggling_sequence_yields_at_most_one_message() {
    for seq in SMUGGLING {
        let t = dialogue_rounds(policy(), &rounds_of(&smuggling_rounds(seq)));
        assert!(t.stored.len() <= 1, "{seq:?}: {:?}", t.stored);
        let replies = after_ehlo(&t);
        assert_eq!(
            t.lookups.len(),
            1,
            "{seq:?}: the smuggled RCPT must never be read"
        );
        assert!(t.stored.is_empty(), "{seq:?}");
        let refusal = if seq.contains('\0') {
            // No bare line end: one message that merely contains the text, refused at
            // its real end for the NUL byte.
            "550 5.6.0 Error: message contains NUL character".to_string()
        } else {
            let bare = if seq.starts_with("\r\n.\n") || seq.starts_with('\n') {
                "LF"
            } else {
                "CR"
            };
            format!("550 5.5.2 Error: bare <{bare}> received")
        };
        assert_eq!(
            replies,
            format!("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n{refusal}\r\n221 2.0.0 Bye\r\n"),
            "{seq:?}"
        );
    }
}

#[test]
fn smuggling_verdict_does_not_depend_on_splitting() {
    for seq in SMUGGLING {
        let rounds = smuggling_rounds(seq);
        let whole = dialogue_rounds(policy(), &rounds_of(&rounds));
        let bytewise = transcript(policy(), &rounds, &(0..4000).collect::<Vec<_>>());
        assert_eq!(whole, bytewise, "{seq:?}");
    }
}

#[test]
fn smuggling_text_sent_before_the_354_is_never_a_message() {
    // The same attack without waiting for the 354: refused at DATA, nothing read as text.
    for seq in SMUGGLING {
        let rounds = smuggling_rounds(seq);
        let t = dialogue_rounds(policy(), &["EHLO c\r\n", &rounds[1..].concat()]);
        assert_eq!(
            after_ehlo(&t),
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.5.0 Error: SMTP protocol synchronization\r\n",
            "{seq:?}"
        );
        assert!(
            t.closed && t.stored.is_empty() && t.lookups.len() == 1,
            "{seq:?}"
        );
    }
}

// ---- pipelining discipline ----

const SYNC: &str = "554 5.5.0 Error: SMTP protocol synchronization\r\n";

#[test]
fn helo_client_pipelining_mail_and_rcpt_is_refused() {
    let t = dialogue_rounds(
        policy(),
        &[
            "HELO c\r\n",
            "MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\n",
        ],
    );
    // The 554 replaces MAIL's reply: MAIL is not run, RCPT never read.
    assert_eq!(
        t.text(),
        format!("{GREETING}250 mx.local.example\r\n{SYNC}")
    );
    assert!(t.closed);
    assert!(t.lookups.is_empty());
}

#[test]
fn helo_client_pipelining_the_whole_transaction_stores_nothing() {
    let t = dialogue_rounds(
        policy(),
        &[
            "HELO c\r\n",
            "MAIL FROM:<>\r\n",
            "RCPT TO:<bob@local.example>\r\nDATA\r\nx\r\n.\r\n",
        ],
    );
    assert_eq!(
        t.text(),
        format!("{GREETING}250 mx.local.example\r\n250 2.1.0 Ok\r\n{SYNC}")
    );
    assert!(t.closed && t.stored.is_empty() && t.lookups.is_empty());
}

#[test]
fn client_without_helo_must_not_pipeline() {
    // Commands before any greeting command.
    let t = dialogue("MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\n");
    assert_eq!(
        dialogue_rounds(policy(), &["NOOP\r\nNOOP\r\n"]).text(),
        format!("{GREETING}{SYNC}")
    );
    assert!(
        !t.text().contains("554 5.5.0"),
        "lockstep is fine: {}",
        t.text()
    );
    // HELO or EHLO with commands behind: PIPELINING has not been offered yet.
    for hello in ["HELO c", "EHLO c"] {
        let t = dialogue_rounds(policy(), &[&format!("{hello}\r\nMAIL FROM:<>\r\n")]);
        assert_eq!(t.text(), format!("{GREETING}{SYNC}"), "{hello}");
        assert!(t.closed);
    }
    // An unrecognised line counts as a command: garbage is not pipelined either.
    let t = dialogue_rounds(policy(), &["GET / HTTP/1.1\r\nHost: x\r\n"]);
    assert_eq!(t.text(), format!("{GREETING}{SYNC}"));
}

#[test]
fn ehlo_client_pipelining_mail_rcpt_data_is_fine() {
    let rounds = [
        "EHLO c\r\n",
        "MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nRCPT TO:<nobody@local.example>\r\nRCPT TO:<alice@local.example>\r\nNOOP\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n",
        "Subject: s\r\n\r\nx\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<alice@local.example>\r\nDATA\r\n",
        "y\r\n.\r\nQUIT\r\n",
    ];
    let t = dialogue_rounds(policy(), &rounds);
    assert_eq!(
        after_ehlo(&t),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <nobody@local.example>: Recipient address rejected: User unknown\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(t.stored.len(), 2);
    assert_eq!(t, dialogue_lines(policy(), &rounds.concat()));
}

#[test]
fn text_in_the_same_read_as_data_is_refused_and_nothing_stored() {
    // DATA alone after a lockstep MAIL and RCPT, the text right behind it.
    let t = dialogue_rounds(
        policy(),
        &[
            "EHLO c\r\n",
            "MAIL FROM:<>\r\n",
            "RCPT TO:<bob@local.example>\r\n",
            "DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n",
        ],
    );
    assert_eq!(
        after_ehlo(&t),
        format!("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n{SYNC}")
    );
    assert!(t.closed && t.stored.is_empty());
    // Even one byte behind DATA, and even when DATA would have failed anyway.
    let t = dialogue_rounds(
        policy(),
        &[
            "EHLO c\r\n",
            "MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nS",
        ],
    );
    assert!(t.text().ends_with(&format!("250 2.1.5 Ok\r\n{SYNC}")));
    let t = dialogue_rounds(policy(), &["EHLO c\r\n", "DATA\r\nx\r\n"]);
    assert_eq!(after_ehlo(&t), SYNC);
}

#[test]
fn ehlo_and_helo_end_a_group_even_after_ehlo() {
    for hello in ["EHLO c", "HELO c"] {
        let t = dialogue_rounds(
            policy(),
            &[
                "EHLO c\r\n",
                &format!("NOOP\r\n{hello}\r\nMAIL FROM:<>\r\n"),
            ],
        );
        assert_eq!(after_ehlo(&t), format!("250 2.0.0 Ok\r\n{SYNC}"), "{hello}");
    }
}

#[test]
fn helo_client_in_lockstep_still_works() {
    let input = "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\nx\r\n.\r\nMAIL FROM:<>\r\nQUIT\r\n";
    let t = dialogue_lines(policy(), input);
    assert_eq!(
        t.text(),
        format!("{GREETING}250 mx.local.example\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n")
    );
    assert_eq!(t.stored.len(), 1);
    // The message text may come in one read, with the next command behind the dot.
    let t = dialogue_rounds(
        policy(),
        &[
            "HELO c\r\n",
            "MAIL FROM:<>\r\n",
            "RCPT TO:<bob@local.example>\r\n",
            "DATA\r\n",
            "x\r\ny\r\n.\r\nQUIT\r\n",
        ],
    );
    assert!(t
        .text()
        .ends_with("250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"));
    assert_eq!(t.stored.len(), 1);
}

#[test]
fn a_reply_still_pending_does_not_hide_pipelining() {
    // RCPT waits for its lookup; the HELO client's DATA behind it is judged when it is
    // reached, with the text still behind it.
    let mut s = Session::new(policy(), peer());
    s.greeting();
    s.receive(b"HELO c\r\n", now());
    s.receive(b"MAIL FROM:<>\r\n", now());
    let a = s.receive(b"RCPT TO:<bob@local.example>\r\n", now());
    let [Action::LookupRecipient(bob)] = a.as_slice() else {
        panic!("{a:?}")
    };
    assert!(s.receive(b"DATA\r\nx\r\n.\r\n", now()).is_empty());
    let a = s.recipient_info(lookup(bob), now());
    assert_eq!(
        a,
        vec![
            Action::Send(format!("250 2.1.5 Ok\r\n{SYNC}").into_bytes()),
            Action::Close
        ]
    );
}

// ---- NUL ----

#[test]
fn a_message_with_a_nul_byte_is_refused_at_the_dot() {
    let t = dialogue_rounds(
        policy(),
        &[
            "EHLO c\r\n",
            "MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n",
            "Subject: x\r\n\r\na\0b\r\n.\r\nNOOP\r\n",
        ],
    );
    assert_eq!(
        after_ehlo(&t),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n550 5.6.0 Error: message contains NUL character\r\n250 2.0.0 Ok\r\n"
    );
    assert!(t.stored.is_empty());
    // A bare line end wins over the NUL (the smuggling verdict is the one to report).
    let t = dialogue_rounds(
        policy(),
        &[
            "EHLO c\r\n",
            "MAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n",
            "\0\nx\r\n.\r\n",
        ],
    );
    assert!(t
        .text()
        .ends_with("550 5.5.2 Error: bare <LF> received\r\n"));
    assert!(t.stored.is_empty());
}

// ---- properties ----

/// Dialogues covering every command, DATA with dot-stuffing, the smuggling sequences,
/// limits and relay refusals, each as the reads of a client that keeps to RFC 2920:
/// one command per read until EHLO has been answered, then groups ending with DATA (or
/// EHLO/HELO), the message text only after the 354. (They were single strings; the
/// pipelining rules make a dialogue's outcome depend on where a client waits, so the
/// waits are now part of the dialogue and only the splits inside a read are free.)
fn dialogues() -> Vec<Vec<String>> {
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut v = vec![
        owned(&TX_ROUNDS),
        owned(&[
            "HELO c\r\n",
            "MAIL FROM:<>\r\n",
            "RCPT TO:<bob@local.example>\r\n",
            "RCPT TO:<x@remote.example>\r\n",
            "DATA\r\n",
            "..\r\n...x\r\n.y\r\n\r\n.\r\n",
            "RSET\r\n",
            "VRFY x\r\n",
            "EXPN y\r\n",
            "HELP\r\n",
            "NOOP\r\n",
            "QUIT\r\n",
        ]),
        owned(&[
            "EHLO c\r\n",
            "MAIL FROM:<a@b> SIZE=99999999\r\nMAIL FROM:<a@b> BODY=8BITMIME RET=FULL ENVID=x\r\nRCPT TO:<user%r@local.example>\r\nRCPT TO:<@a:b@c>\r\nRCPT TO:<bob@local.example> NOTIFY=DELAY ORCPT=rfc822;x\r\nDATA\r\n",
            "Received: a\r\n\r\nb\r\n.\r\nDATA\r\n",
        ]),
        vec![
            "EHLO c\r\n".to_string(),
            format!("NOOP {}\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n", "z".repeat(3000)),
            format!("{}\r\n.\r\nQUIT\r\n", "w".repeat(3000)),
        ],
        owned(&[
            "FOO\r\n",
            "BAR\n",
            "BAZ\rQ\r\n",
            "\r\n",
            "EHLO x\r\n",
            "MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n",
            ".\r\n",
        ]),
    ];
    v.extend(SMUGGLING.iter().map(|s| smuggling_rounds(s)));
    v
}

fn small_policy(authorised: bool) -> SessionPolicy {
    SessionPolicy {
        max_message_size: 2000,
        max_recipients: 3,
        hard_error_limit: 8,
        max_line_length: 512,
        relay_authorised: authorised,
        ..policy()
    }
}

/// Runs `rounds` (one read each, or more where `splits` cuts inside them: offsets into
/// their concatenation).
fn transcript(policy: SessionPolicy, rounds: &[String], splits: &[usize]) -> Transcript {
    let input = rounds.concat();
    let mut cuts = splits.to_vec();
    let mut at = 0;
    for r in rounds {
        at += r.len();
        cuts.push(at);
    }
    let mut s = Session::new(policy, peer());
    run_split(&mut s, input.as_bytes(), &cuts, now(), lookup, store_ok)
}

/// Runs arbitrary `input` cut at `splits`.
fn transcript_bytes(policy: SessionPolicy, input: &[u8], splits: &[usize]) -> Transcript {
    let mut s = Session::new(policy, peer());
    run_split(&mut s, input, splits, now(), lookup, store_ok)
}

#[test]
fn split_invariance_one_byte_at_a_time() {
    for d in dialogues() {
        for auth in [false, true] {
            let whole = transcript(small_policy(auth), &d, &[]);
            let all: Vec<usize> = (1..d.concat().len()).collect();
            assert!(
                !whole.text().contains("554 5.5.0"),
                "{d:?}: {}",
                whole.text()
            );
            assert_eq!(whole, transcript(small_policy(auth), &d, &all), "{d:?}");
        }
    }
}

/// Checks the reply stream is well-formed: every line `ddd` + space or hyphen + text.
fn well_formed(output: &[u8]) -> bool {
    output.split_inclusive(|b| *b == b'\n').all(|line| {
        line.len() >= 6
            && line.ends_with(b"\r\n")
            && line[..3].iter().all(u8::is_ascii_digit)
            && (line[3] == b' ' || line[3] == b'-')
    })
}

/// `t` is `lockstep` (the same input fed one byte at a time, so never pipelined), or
/// `lockstep` cut short by the pipelining refusal: the only way splitting may change a
/// session is to stop it early with the 554, having done nothing that `lockstep` did not.
fn same_or_cut_short(t: &Transcript, lockstep: &Transcript) -> bool {
    if t == lockstep {
        return true;
    }
    let Some(before) = t.output.strip_suffix(SYNC.as_bytes()) else {
        return false;
    };
    t.closed
        && lockstep.output.starts_with(before)
        && lockstep.stored.starts_with(&t.stored)
        && lockstep.lookups.starts_with(&t.lookups)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn split_invariance(
        which in 0..12usize,
        auth in any::<bool>(),
        splits in proptest::collection::vec(0..4000usize, 0..40),
    ) {
        let all = dialogues();
        let d = &all[which % all.len()];
        let whole = transcript(small_policy(auth), d, &[]);
        let split = transcript(small_policy(auth), d, &splits);
        prop_assert!(well_formed(&whole.output));
        prop_assert_eq!(whole, split);
    }

    /// Arbitrary bytes, biased toward SMTP tokens, split arbitrarily: no panic, the
    /// driver's protocol checks hold, replies are well-formed, and the split changes
    /// nothing except, for pipelined input, where the 554 cuts the session short.
    #[test]
    fn fuzz_session(
        pieces in proptest::collection::vec(
            prop_oneof![
                Just(b"EHLO x\r\n".to_vec()),
                Just(b"MAIL FROM:<>\r\n".to_vec()),
                Just(b"RCPT TO:<bob@local.example>\r\n".to_vec()),
                Just(b"RCPT TO:<a%b@local.example>\r\n".to_vec()),
                Just(b"DATA\r\n".to_vec()),
                Just(b"\r\n.\r\n".to_vec()),
                Just(b".".to_vec()),
                Just(b"\r".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\0".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..64),
            ],
            0..30,
        ),
        splits in proptest::collection::vec(0..2000usize, 0..20),
        auth in any::<bool>(),
    ) {
        let input: Vec<u8> = pieces.concat();
        let all: Vec<usize> = (1..input.len()).collect();
        let lockstep = transcript_bytes(small_policy(auth), &input, &all);
        let whole = transcript_bytes(small_policy(auth), &input, &[]);
        let split = transcript_bytes(small_policy(auth), &input, &splits);
        prop_assert!(well_formed(&whole.output));
        prop_assert!(well_formed(&split.output));
        prop_assert!(!lockstep.text().contains("554 5.5.0"), "{}", lockstep.text());
        prop_assert!(same_or_cut_short(&whole, &lockstep), "{}\n{}", whole.text(), lockstep.text());
        prop_assert!(same_or_cut_short(&split, &lockstep), "{}\n{}", split.text(), lockstep.text());
    }
}

// ---- STARTTLS and AUTH ----

fn tls_policy() -> SessionPolicy {
    SessionPolicy {
        tls_available: true,
        ..policy()
    }
}

/// bob@local.example's password is `s3cret`.
fn check(user: &str, pw: &Secret) -> bool {
    user == "bob@local.example" && pw.expose() == "s3cret"
}

/// Runs `chunks` with STARTTLS available and the `check` credentials.
fn tls_dialogue(policy: SessionPolicy, chunks: &[&str]) -> (Session, Transcript) {
    let mut s = Session::new(policy, peer());
    let t = super::driver::run_full(
        &mut s,
        chunks.iter().map(|c| c.as_bytes()),
        now(),
        lookup,
        store_ok,
        check,
    );
    (s, t)
}

fn b64(s: &str) -> String {
    crate::protocol::auth::base64_encode(s.as_bytes())
}

const EHLO_TLS_OFFER: &str = "250-mx.local.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 STARTTLS\r\n";
const EHLO_AFTER_TLS: &str = "250-mx.local.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 AUTH PLAIN LOGIN\r\n";

#[test]
fn starttls_offered_only_with_a_certificate_and_only_before_tls() {
    assert_eq!(
        dialogue("EHLO c\r\n").text(),
        format!("{GREETING}{EHLO_REPLY}")
    );
    assert_eq!(
        dialogue("STARTTLS\r\n").text(),
        format!("{GREETING}502 5.5.1 Error: command not implemented\r\n")
    );
    let (s, t) = tls_dialogue(
        tls_policy(),
        &["EHLO c\r\n", "STARTTLS\r\n", "EHLO c\r\n", "STARTTLS\r\n"],
    );
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}{EHLO_TLS_OFFER}220 2.0.0 Ready to start TLS\r\n{EHLO_AFTER_TLS}554 5.5.1 Error: TLS already active\r\n"
        )
    );
    assert_eq!(t.tls_upgrades, 1);
    assert!(s.is_tls());
}

#[test]
fn implicit_tls_session_offers_auth_not_starttls() {
    let mut s = Session::new_tls(tls_policy(), peer());
    let t = run(&mut s, [&b"EHLO c\r\n"[..]], now(), lookup, store_ok);
    assert_eq!(t.text(), format!("{GREETING}{EHLO_AFTER_TLS}"));
}

#[test]
fn input_pipelined_after_starttls_is_discarded() {
    // CVE-2011-0411: commands sent in plain text after STARTTLS must never run inside
    // the TLS session.
    let (s, t) = tls_dialogue(
        tls_policy(),
        &[
            "EHLO c\r\n",
            "STARTTLS\r\nRSET\r\nMAIL FROM:<x@y.example>\r\n",
            "MAIL FROM:<x@y.example>\r\n",
            "EHLO c\r\n",
        ],
    );
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}{EHLO_TLS_OFFER}220 2.0.0 Ready to start TLS\r\n503 5.5.1 Error: send HELO/EHLO first\r\n{EHLO_AFTER_TLS}"
        )
    );
    assert_eq!(t.tls_at, vec![GREETING.len() + EHLO_TLS_OFFER.len() + 30]);
    assert_eq!(s.error_count(), 1);
}

#[test]
fn bytes_fed_while_the_upgrade_is_pending_are_dropped() {
    let mut s = Session::new(tls_policy(), peer());
    s.greeting();
    let a = s.receive(b"STARTTLS\r\n", now());
    assert_eq!(
        a,
        vec![
            Action::Send(b"220 2.0.0 Ready to start TLS\r\n".to_vec()),
            Action::StartTls
        ]
    );
    assert!(s.is_waiting());
    assert_eq!(
        s.receive(b"EHLO evil\r\nMAIL FROM:<a@b.example>\r\n", now()),
        vec![]
    );
    assert_eq!(s.tls_started(), vec![]);
    assert_eq!(
        s.receive(b"MAIL FROM:<a@b.example>\r\n", now()),
        vec![Action::Send(
            b"503 5.5.1 Error: send HELO/EHLO first\r\n".to_vec()
        )]
    );
    // A second tls_started is ignored.
    assert_eq!(s.tls_started(), vec![]);
}

#[test]
fn auth_before_tls_is_refused() {
    let t = dialogue_with(
        tls_policy(),
        &format!(
            "EHLO c\r\nAUTH PLAIN {}\r\n",
            b64("\0bob@local.example\0s3cret")
        ),
    );
    assert_eq!(
        t.text(),
        format!("{GREETING}{EHLO_TLS_OFFER}530 5.7.0 Must issue a STARTTLS command first\r\n")
    );
}

const RELAY: &str = "MAIL FROM:<bob@local.example>\r\nRCPT TO:<someone@remote.example>\r\n";

#[test]
fn auth_plain_then_relay() {
    let auth = format!("AUTH PLAIN {}\r\n", b64("\0bob@local.example\0s3cret"));
    let (s, t) = tls_dialogue(tls_policy(), &["STARTTLS\r\n", "EHLO c\r\n", &auth, RELAY]);
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}220 2.0.0 Ready to start TLS\r\n{EHLO_AFTER_TLS}235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        )
    );
    assert_eq!(t.auth_users, vec!["bob@local.example".to_string()]);
    assert_eq!(s.user(), Some("bob@local.example"));
    assert!(s.may_relay());
    // Nothing the session prints for debugging holds the password.
    assert!(!format!("{s:?}").contains("s3cret"));
}

#[test]
fn auth_plain_without_initial_response() {
    let (_, t) = tls_dialogue(
        tls_policy(),
        &[
            "STARTTLS\r\n",
            "EHLO c\r\n",
            "AUTH PLAIN\r\n",
            &format!("{}\r\n", b64("\0bob@local.example\0s3cret")),
        ],
    );
    assert!(
        t.text().ends_with(&format!(
            "{EHLO_AFTER_TLS}334 \r\n235 2.7.0 Authentication successful\r\n"
        )),
        "{}",
        t.text()
    );
}

#[test]
fn auth_login_then_relay() {
    let input = format!(
        "AUTH LOGIN\r\n{}\r\n{}\r\n{RELAY}",
        b64("bob@local.example"),
        b64("s3cret")
    );
    let (_, t) = tls_dialogue(tls_policy(), &["STARTTLS\r\n", "EHLO c\r\n", &input]);
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}220 2.0.0 Ready to start TLS\r\n{EHLO_AFTER_TLS}334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        )
    );
    // LOGIN with the user name as initial response.
    let input = format!(
        "AUTH LOGIN {}\r\n{}\r\n",
        b64("bob@local.example"),
        b64("s3cret")
    );
    let (s, t) = tls_dialogue(tls_policy(), &["STARTTLS\r\n", "EHLO c\r\n", &input]);
    assert!(t
        .text()
        .ends_with("334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n"));
    assert_eq!(s.user(), Some("bob@local.example"));
}

#[test]
fn wrong_password_gets_535_and_no_relay() {
    let auth = format!("AUTH PLAIN {}\r\n", b64("\0bob@local.example\0wrong"));
    let (s, t) = tls_dialogue(tls_policy(), &["STARTTLS\r\n", "EHLO c\r\n", &auth, RELAY]);
    assert!(
        t.text().ends_with(&format!(
            "{EHLO_AFTER_TLS}535 5.7.8 Error: authentication failed\r\n250 2.1.0 Ok\r\n554 5.7.1 <someone@remote.example>: Relay access denied\r\n"
        )),
        "{}",
        t.text()
    );
    assert_eq!(s.user(), None);
    assert_eq!(s.error_count(), 2);
}

#[test]
fn failed_auth_counts_toward_the_error_limit() {
    let policy = SessionPolicy {
        hard_error_limit: 3,
        ..tls_policy()
    };
    let bad = format!("AUTH PLAIN {}\r\n", b64("\0bob@local.example\0guess"));
    let input = format!("{bad}{bad}{bad}{bad}");
    let (_, t) = tls_dialogue(policy, &["STARTTLS\r\n", "EHLO c\r\n", &input]);
    assert!(t.closed);
    assert_eq!(t.auth_users.len(), 3);
    assert!(t.text().ends_with(
        "535 5.7.8 Error: authentication failed\r\n421 4.7.0 mx.local.example Error: too many errors\r\n"
    ));
}

#[test]
fn auth_errors() {
    let (_, t) = tls_dialogue(
        tls_policy(),
        &[
            "STARTTLS\r\n",
            "AUTH PLAIN =\r\n",
            "EHLO c\r\n",
            "AUTH CRAM-MD5\r\nAUTH PLAIN !!\r\nAUTH LOGIN\r\n*\r\nMAIL FROM:<>\r\nAUTH PLAIN\r\n",
        ],
    );
    assert_eq!(
        t.text(),
        format!(
            "{GREETING}220 2.0.0 Ready to start TLS\r\n503 5.5.1 Error: send HELO/EHLO first\r\n{EHLO_AFTER_TLS}504 5.5.4 Unrecognized authentication type\r\n501 5.5.2 Cannot decode response\r\n334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication aborted\r\n250 2.1.0 Ok\r\n503 5.5.1 Error: MAIL transaction in progress\r\n"
        )
    );
    assert!(t.auth_users.is_empty());
    let good = format!("AUTH PLAIN {}\r\n", b64("\0bob@local.example\0s3cret"));
    let (_, t) = tls_dialogue(tls_policy(), &["STARTTLS\r\n", "EHLO c\r\n", &good, &good]);
    assert!(t.text().ends_with(
        "235 2.7.0 Authentication successful\r\n503 5.5.1 Error: already authenticated\r\n"
    ));
}

#[test]
fn auth_relay_off_keeps_authenticated_users_local() {
    let policy = SessionPolicy {
        auth_relay: false,
        ..tls_policy()
    };
    let auth = format!("AUTH PLAIN {}\r\n", b64("\0bob@local.example\0s3cret"));
    let (s, t) = tls_dialogue(policy, &["STARTTLS\r\n", "EHLO c\r\n", &auth, RELAY]);
    assert!(t
        .text()
        .ends_with("235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n554 5.7.1 <someone@remote.example>: Relay access denied\r\n"));
    assert!(!s.may_relay());
}

#[test]
fn open_relay_tricks_refused_over_tls_without_auth() {
    for rcpt in [
        "user%remote.example@local.example",
        "remote.example!user@local.example",
        "@local.example:user@remote.example",
        "\"user@remote.example\"@local.example",
        "user@[127.0.0.2]",
        "user@remote.example",
    ] {
        let input = format!("MAIL FROM:<>\r\nRCPT TO:<{rcpt}>\r\n");
        let (_, t) = tls_dialogue(tls_policy(), &["STARTTLS\r\n", "EHLO c\r\n", &input]);
        assert!(
            t.text().ends_with(&format!(
                "250 2.1.0 Ok\r\n554 5.7.1 <{rcpt}>: Relay access denied\r\n"
            )),
            "{rcpt}: {}",
            t.text()
        );
    }
}
