//! A tiny synchronous driver for [`Session`]: feeds input in given pieces, answers
//! lookups, stores and AUTH checks with caller-supplied functions, completes STARTTLS at
//! once (no real handshake), and records the transcript.
//!
//! For tests, proptests and the cargo-fuzz target (which all need the same loop the
//! `smtpd_fsm` actor runs, minus the socket). It checks the protocol between session and
//! actor as it goes and panics when the session breaks it: that is what a fuzzer or a
//! property test should see.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};

use super::{Action, ForwardPath, RecipientInfo, Secret, Session, StoreOutcome, Transaction};

/// Everything a session said and did during a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transcript {
    /// All reply bytes, concatenated in order (greeting first).
    pub output: Vec<u8>,
    /// Every recipient the session asked about, in order.
    pub lookups: Vec<ForwardPath>,
    /// Every transaction handed to the store, in order (stored or not).
    pub stored: Vec<Transaction>,
    /// Whether the session emitted `Close`.
    pub closed: bool,
    /// Every user name an AUTH check was asked about, in order.
    pub auth_users: Vec<String>,
    /// How many times the session asked for a TLS upgrade.
    pub tls_upgrades: usize,
    /// Where in `output` each TLS upgrade happened (bytes written before it).
    pub tls_at: Vec<usize>,
}

impl Transcript {
    /// The output as text (lossy), for assertions and failure messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

/// Runs `session` over `chunks` (each one `receive` call) after writing the greeting.
/// Every AUTH attempt fails.
pub fn run<'a>(
    session: &mut Session, chunks: impl IntoIterator<Item = &'a [u8]>, now: DateTime<Utc>,
    lookup: impl FnMut(&ForwardPath) -> RecipientInfo,
    store: impl FnMut(&Transaction) -> StoreOutcome,
) -> Transcript {
    run_full(session, chunks, now, lookup, store, |_, _| false)
}

/// [`run`] with AUTH checks answered by `auth(user, password)`.
pub fn run_full<'a>(
    session: &mut Session, chunks: impl IntoIterator<Item = &'a [u8]>, now: DateTime<Utc>,
    mut lookup: impl FnMut(&ForwardPath) -> RecipientInfo,
    mut store: impl FnMut(&Transaction) -> StoreOutcome,
    mut auth: impl FnMut(&str, &Secret) -> bool,
) -> Transcript {
    let mut t = Transcript::default();
    let greeting = session.greeting();
    let mut h = Handlers {
        lookup: &mut lookup,
        store: &mut store,
        auth: &mut auth,
    };
    apply(session, greeting, now, &mut t, &mut h);
    for chunk in chunks {
        let was_closed = session.is_closed();
        let actions = session.receive(chunk, now);
        assert!(
            !was_closed || actions.is_empty(),
            "a closed session produced {actions:?}"
        );
        apply(session, actions, now, &mut t, &mut h);
    }
    t
}

/// The caller's answers to the session's requests.
struct Handlers<'h> {
    lookup: &'h mut dyn FnMut(&ForwardPath) -> RecipientInfo,
    store: &'h mut dyn FnMut(&Transaction) -> StoreOutcome,
    auth: &'h mut dyn FnMut(&str, &Secret) -> bool,
}

/// Splits `input` at the given offsets (sorted, clamped, duplicates kept as empty
/// reads) and runs it. Offsets outside `0..=input.len()` are clamped.
pub fn run_split(
    session: &mut Session, input: &[u8], splits: &[usize], now: DateTime<Utc>,
    lookup: impl FnMut(&ForwardPath) -> RecipientInfo,
    store: impl FnMut(&Transaction) -> StoreOutcome,
) -> Transcript {
    let mut cuts: Vec<usize> = splits.iter().map(|s| (*s).min(input.len())).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        chunks.push(&input[start..cut]);
        start = cut;
    }
    chunks.push(&input[start..]);
    run(session, chunks, now, lookup, store)
}

fn apply(
    session: &mut Session, actions: Vec<Action>, now: DateTime<Utc>, t: &mut Transcript,
    h: &mut Handlers<'_>,
) {
    let mut queue: VecDeque<Action> = actions.into();
    while let Some(action) = queue.pop_front() {
        let is_request = matches!(
            action,
            Action::LookupRecipient(_)
                | Action::Store(_)
                | Action::StartTls
                | Action::Authenticate { .. }
        );
        assert!(
            !is_request || queue.is_empty(),
            "a request must end its batch: {action:?} then {queue:?}"
        );
        assert!(!t.closed, "action after Close: {action:?}");
        match action {
            Action::Send(bytes) => {
                assert!(
                    bytes.ends_with(b"\r\n"),
                    "reply not CRLF-terminated: {bytes:?}"
                );
                assert!(!bytes.is_empty(), "empty Send");
                t.output.extend_from_slice(&bytes);
            }
            Action::LookupRecipient(path) => {
                assert!(session.is_waiting(), "lookup requested but not waiting");
                let info = (h.lookup)(&path);
                t.lookups.push(path);
                queue.extend(session.recipient_info(info, now));
            }
            Action::Store(tx) => {
                assert!(session.is_waiting(), "store requested but not waiting");
                assert!(!tx.recipients.is_empty(), "transaction without recipients");
                let outcome = (h.store)(&tx);
                t.stored.push(tx);
                queue.extend(session.stored(outcome, now));
            }
            Action::Close => {
                assert!(session.is_closed(), "Close emitted but session not closed");
                t.closed = true;
            }
            Action::StartTls => {
                assert!(session.is_waiting(), "StartTls requested but not waiting");
                assert!(!session.is_tls(), "StartTls on an encrypted session");
                t.tls_upgrades += 1;
                t.tls_at.push(t.output.len());
                queue.extend(session.tls_started());
                assert!(session.is_tls(), "tls_started did not take");
            }
            Action::Authenticate { user, password } => {
                assert!(
                    session.is_waiting(),
                    "Authenticate requested but not waiting"
                );
                assert!(session.is_tls(), "AUTH check asked without TLS");
                let ok = (h.auth)(&user, &password);
                t.auth_users.push(user);
                queue.extend(session.authenticated(ok, now));
            }
        }
    }
}
