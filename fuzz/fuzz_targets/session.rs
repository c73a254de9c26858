//! Fuzzes the SMTP parser and session machine through their one entry point
//! (`Session::receive` and the answers), with the input cut into reads of a size taken
//! from the first byte. The driver panics when the session breaks its protocol with the
//! actor; the target also checks that the outcome does not depend on the split (up to a
//! STARTTLS, after which the plain-text rest of a read is discarded by design, so only
//! the output before the upgrade must agree).
//!
//! Run with `cargo fuzz run session` (nightly) from `fuzz/`.

#![no_main]

use chrono::{TimeZone, Utc};
use erlmail::session::driver::{run_full, Transcript};
use erlmail::session::{
    ForwardPath, PeerInfo, RecipientInfo, Session, SessionPolicy, StoreOutcome, Transaction,
};
use libfuzzer_sys::fuzz_target;

fn lookup(path: &ForwardPath) -> RecipientInfo {
    let local_domain = path.mailbox.domain == "local.example";
    RecipientInfo {
        local_domain,
        user_exists: local_domain && path.mailbox.local_part == "bob",
        temporary_failure: false,
    }
}

fn store(tx: &Transaction) -> StoreOutcome {
    // Vary the answer so failure replies are exercised too.
    match tx.data.len() % 3 {
        0 => StoreOutcome::Failed,
        1 => StoreOutcome::DiskFull,
        _ => StoreOutcome::Stored {
            queue_id: Some("Q".into()),
        },
    }
}

fn session(authorised: bool, tls_available: bool) -> Session {
    let policy = SessionPolicy {
        max_message_size: 4096,
        max_recipients: 4,
        hard_error_limit: 50,
        max_line_length: 512,
        relay_authorised: authorised,
        tls_available,
        ..SessionPolicy::with_defaults("mx.local.example")
    };
    let peer = PeerInfo {
        ip: "192.0.2.1".parse().expect("literal"),
        port: 25,
    };
    Session::new(policy, peer)
}

fn drive<'a>(
    authorised: bool,
    tls: bool,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Transcript {
    let now = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    let auth = |user: &str, pw: &erlmail::session::Secret| user == "bob" && pw.expose() == "pw";
    run_full(&mut session(authorised, tls), chunks, now, lookup, store, auth)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let authorised = control & 1 == 1;
    let tls = control & 2 == 2;
    let step = usize::from(control >> 2) + 1;
    let whole = drive(authorised, tls, [input]);
    let split = drive(authorised, tls, input.chunks(step));
    match (whole.tls_at.first(), split.tls_at.first()) {
        (None, None) => assert_eq!(whole, split),
        (Some(&a), Some(&b)) => {
            assert_eq!(a, b);
            assert_eq!(whole.output[..a], split.output[..b]);
        }
        _ => panic!("STARTTLS taken in one split only"),
    }
});
