//! Contract checks of local delivery: accepted mail read back byte for byte from the
//! mailbox and the queue, named mailboxes and flags, Junk copies, and all-or-nothing
//! batches.

use super::*;
use crate::store::*;

/// accept_batch: local and remote recipients of one message, byte-exact read-back from
/// the mailbox and the queue, results in input order, the null sender.
pub async fn accept_and_read_back(store: &dyn MessageStore) {
    let h = user_of_new_domain(store, "mail.test", "u1@mail.test").await;
    store.add_user("u2@mail.test", &h).await.expect("add u2");

    assert!(store
        .accept_batch(vec![])
        .await
        .expect("empty batch")
        .is_empty());

    // Every byte value, bare LF and CR, a lone dot line: stored exactly as given.
    let mut body = b"Subject: all bytes\r\n\r\n.\r\n..x\nbare\rcr\r\n".to_vec();
    body.extend(0u8..=255);
    let at = t0() + chrono::Duration::milliseconds(123);
    let mut m = incoming(
        "s@remote.test",
        &["u1@mail.test", "U2@MAIL.TEST"],
        vec![
            OutgoingRcpt {
                address: "r1@far.test".into(),
                orcpt: Some("rfc822;r1@far.test".into()),
                notify: Some("SUCCESS,FAILURE".into()),
            },
            rcpt("R2@far.test"),
        ],
        at,
        &body,
    );
    m.ret = Some("HDRS".into());
    m.envid = Some("ENV-1".into());
    m.smtputf8 = true;
    m.client_ip = "::1".into();
    m.helo = "helo.test".into();
    m.subject = Some("all bytes".into());
    let local_only = incoming(
        "s2@remote.test",
        &["u1@mail.test"],
        vec![],
        secs(1),
        b"second\r\n",
    );
    let acc = store
        .accept_batch(vec![m, local_only])
        .await
        .expect("accept");
    assert_eq!(acc.len(), 2);
    assert_eq!(acc[0].message_ids.len(), 2);
    let qid = acc[0].queue_id.clone().expect("remote recipients queue");
    assert_eq!(qid.len(), 16, "{qid}");
    assert!(
        qid.chars()
            .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c)),
        "{qid}"
    );
    assert_eq!(acc[1].queue_id, None);
    assert_eq!(acc[1].message_ids.len(), 1);

    let inbox = mailbox(store, "U1@mail.test", "inbox").await;
    assert_eq!(
        inbox,
        vec![
            MessageSummary {
                id: acc[0].message_ids[0],
                mailbox: "INBOX".into(),
                sender: "s@remote.test".into(),
                subject: Some("all bytes".into()),
                size: body.len() as u64,
                internal_date: at,
                flags: Vec::new(),
            },
            MessageSummary {
                id: acc[1].message_ids[0],
                mailbox: "INBOX".into(),
                sender: "s2@remote.test".into(),
                subject: Some("contract".into()),
                size: 8,
                internal_date: secs(1),
                flags: Vec::new(),
            },
        ]
    );
    let got = store
        .get_message("u2@mail.test", acc[0].message_ids[1])
        .await
        .expect("get")
        .expect("u2's copy");
    assert_eq!(got.body, body);
    assert_eq!(got.recipients, vec!["u2@mail.test".to_string()]);
    assert_eq!(got.summary.mailbox, "INBOX");
    assert_eq!(
        store
            .get_message("u2@mail.test", acc[0].message_ids[0])
            .await
            .expect("get"),
        None,
        "u1's copy is not u2's"
    );
    assert!(mailbox(store, "u1@mail.test", "Archive").await.is_empty());
    assert!(mailbox(store, "ghost@mail.test", "INBOX").await.is_empty());

    let q = store
        .get_queued(&qid)
        .await
        .expect("get_queued")
        .expect("queued");
    assert_eq!(
        q,
        QueuedMessage {
            id: qid.clone(),
            sender: "s@remote.test".into(),
            ret: Some("HDRS".into()),
            envid: Some("ENV-1".into()),
            smtputf8: true,
            client_ip: "::1".into(),
            helo: "helo.test".into(),
            received_at: at,
            tries: 0,
            last_try_at: None,
            last_error: None,
            next_retry_at: at,
            lock_owner: None,
            lock_expires_at: None,
            held: false,
            size: body.len() as u64,
            rcpts: vec![
                OutgoingRcpt {
                    address: "r1@far.test".into(),
                    orcpt: Some("rfc822;r1@far.test".into()),
                    notify: Some("SUCCESS,FAILURE".into()),
                },
                rcpt("R2@far.test"),
            ],
            body: body.clone(),
        }
    );

    // A DSN is queued from the null sender.
    let dsn = store
        .accept_batch(vec![incoming(
            "",
            &[],
            vec![rcpt("s@remote.test")],
            secs(2),
            b"dsn",
        )])
        .await
        .expect("queue dsn");
    assert!(dsn[0].message_ids.is_empty());
    let dsn_id = dsn[0].queue_id.clone().expect("dsn queued");
    assert_ne!(dsn_id, qid);
    let d = store.get_queued(&dsn_id).await.expect("get").expect("dsn");
    assert_eq!(d.sender, "");
    assert_eq!(d.body, b"dsn".to_vec());
    store.delete_all_queued().await.expect("clean up");
}

/// A batch with one bad message stores none of its messages.
pub async fn batch_atomicity(store: &dyn MessageStore) {
    user_of_new_domain(store, "atomic.test", "a@atomic.test").await;
    store.delete_all_queued().await.expect("clear queue");
    let good = incoming(
        "s@x.test",
        &["a@atomic.test"],
        vec![rcpt("r@far.test")],
        t0(),
        b"good",
    );
    let bad = incoming("s@x.test", &["nobody@atomic.test"], vec![], t0(), b"bad");
    let r = store.accept_batch(vec![good.clone(), bad]).await;
    assert!(is_invalid(r), "unknown local recipient fails the batch");
    assert!(
        mailbox(store, "a@atomic.test", "INBOX").await.is_empty(),
        "the good message of a failed batch is not stored"
    );
    assert!(
        store.list_queue().await.expect("list").is_empty(),
        "nor queued"
    );
    let acc = store.accept_batch(vec![good]).await.expect("good alone");
    assert_eq!(acc[0].message_ids.len(), 1);
    assert_eq!(store.list_queue().await.expect("list").len(), 1);
    store.delete_all_queued().await.expect("clean up");
}

/// A message accepted into a named mailbox with IMAP flags (an imported ErlMail message)
/// is listed there, and read back, with its flags in order; flags in the INBOX survive the
/// group commit beside plain mail; `inbox` is the INBOX; a flag with a space is refused.
pub async fn named_mailboxes_and_flags(store: &dyn MessageStore) {
    user_of_new_domain(store, "folders.test", "f@folders.test").await;
    let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut sent = incoming(
        "f@folders.test",
        &["f@folders.test"],
        vec![],
        t0(),
        b"Subject: sent\r\n\r\nx\r\n",
    );
    sent.mailbox = Some("Sent".to_string());
    sent.flags = flags(&["\\Seen", "\\Answered", "$Work"]);
    let ids = store
        .accept_batch(vec![sent])
        .await
        .expect("accept into Sent");
    let listed = mailbox(store, "f@folders.test", "Sent").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].mailbox, "Sent");
    assert_eq!(listed[0].id, ids[0].message_ids[0]);
    assert_eq!(listed[0].flags, flags(&["\\Seen", "\\Answered", "$Work"]));
    let got = store
        .get_message("f@folders.test", listed[0].id)
        .await
        .expect("get")
        .expect("the message");
    assert_eq!(got.summary, listed[0]);

    // Through the group commit, flags in the INBOX (spelled `inbox`) beside plain mail.
    let mut flagged = incoming(
        "a@origin.test",
        &["f@folders.test"],
        vec![],
        t0(),
        b"Subject: flagged\r\n\r\ny\r\n",
    );
    flagged.mailbox = Some("inbox".to_string());
    flagged.flags = flags(&["\\Flagged"]);
    let plain = incoming(
        "b@origin.test",
        &["f@folders.test"],
        vec![],
        t0(),
        b"Subject: plain\r\n\r\nz\r\n",
    );
    accept_leased(store, &[flagged, plain], None)
        .await
        .expect("group commit");
    let inbox = mailbox(store, "f@folders.test", "INBOX").await;
    let got: Vec<(&str, &str, Vec<String>)> = inbox
        .iter()
        .map(|m| (m.mailbox.as_str(), m.sender.as_str(), m.flags.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("INBOX", "a@origin.test", flags(&["\\Flagged"])),
            ("INBOX", "b@origin.test", Vec::new()),
        ]
    );
    assert_eq!(
        mailbox(store, "f@folders.test", "Sent").await.len(),
        1,
        "INBOX mail stays out of Sent"
    );

    let mut bad = incoming("c@origin.test", &["f@folders.test"], vec![], t0(), b"x");
    bad.flags = flags(&["two words"]);
    assert!(is_invalid(store.accept_batch(vec![bad]).await));
}

/// A message for the `Junk` mailbox (DMARC quarantine) puts its local copies in each recipient's
/// `Junk` mailbox, created on first use, in a group commit beside INBOX mail.
pub async fn junk_copies(store: &dyn MessageStore) {
    user_of_new_domain(store, "junk.test", "j@junk.test").await;
    let mut spam = incoming(
        "s@forged.test",
        &["j@junk.test"],
        vec![],
        t0(),
        b"Subject: spam\r\n\r\nx\r\n",
    );
    spam.mailbox = Some(JUNK.to_string());
    let ham = incoming(
        "s@good.test",
        &["j@junk.test"],
        vec![],
        t0(),
        b"Subject: ham\r\n\r\ny\r\n",
    );
    let out = store
        .commit_batch(WriteBatch {
            messages: vec![spam, ham],
            lease: None,
            records: Vec::new(),
            atomic: false,
        })
        .await;
    let accepted = out.accepted.expect("the batch committed");
    assert!(accepted.iter().all(|a| a.is_ok()), "{accepted:?}");
    let junk = mailbox(store, "j@junk.test", "Junk").await;
    assert_eq!(junk.len(), 1);
    assert_eq!(junk[0].sender, "s@forged.test");
    assert_eq!(junk[0].mailbox, "Junk");
    let inbox = mailbox(store, "j@junk.test", "INBOX").await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].sender, "s@good.test");
}
