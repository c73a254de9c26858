//! The DATA decoder: message text in, unstuffed message (or a refusal) out.
//!
//! Only `<CR><LF>.<CR><LF>` ends DATA. A bare CR or LF anywhere taints the message: the
//! decoder keeps looking for the real end, so the bytes after a fake end such as
//! `\n.\n` are never read as commands, and the whole message is refused (REFERENCE,
//! "SMTP smuggling"). A byte-level state machine, so its verdict cannot depend on how
//! the input was split; see [`DataDecoder`] for the other refusals.

/// A bare line end, for the `550 5.5.2 Error: bare <..> received` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareNewline {
    /// An LF not preceded by CR.
    Lf,
    /// A CR not followed by LF.
    Cr,
}

/// How DATA ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataOutcome {
    /// A clean message: dots unstuffed, every line CRLF-terminated.
    Message(Vec<u8>),
    /// The first bare line end seen; the message is refused.
    Bare(BareNewline),
    /// A NUL byte somewhere in the text (and no bare line end); the message is refused.
    Nul,
    /// More than the size limit; the message is refused.
    TooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF, or at the start of DATA).
    LineStart,
    /// A dot at the start of a line.
    Dot,
    /// `.` CR at the start of a line: one LF away from the end.
    DotCr,
    /// Inside a line.
    Text,
    /// A CR inside a line, waiting to see whether LF follows.
    Cr,
}

/// Decodes one message's DATA section.
///
/// The first CRLF before the ending dot may be the one that ended the `DATA` command
/// itself. Lines starting with a dot lose that dot (RFC 5321 §4.5.2). Line length is
/// not limited (Postfix accepts long lines too); the message size is, and an over-size
/// message is read to its end and then refused. A NUL byte anywhere also taints the
/// message (it is refused at the final dot, REFERENCE "Facing the internet": no NUL
/// ever leaves erlmail, and many next hops mishandle one). When several faults meet,
/// the verdict is the first of: bare line end, NUL, size; a bare line end is the
/// smuggling signal and must be reported as such whatever else the message holds.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    state: State,
    body: Vec<u8>,
    /// Octets at the start of `body` that are not the client's (the Received: header
    /// the session puts on top); they do not count against the size limit.
    prefix: usize,
    max_size: u64,
    too_big: bool,
    bare: Option<BareNewline>,
    /// A NUL byte was seen; the text is no longer kept.
    nul: bool,
    done: bool,
}

impl DataDecoder {
    /// The least room made for the text (most messages are smaller).
    pub const MIN_RESERVE: u64 = 16 * 1024;
    /// The most room made for the text at the start, whatever the client announced (a
    /// client's word costs no more memory than this; beyond it a buffer grows in place).
    pub const MAX_RESERVE: u64 = 1024 * 1024;

    /// A decoder that refuses messages over `max_size` octets (after unstuffing);
    /// `0` means no limit.
    pub fn new(max_size: u64) -> Self {
        Self::with_prefix(max_size, Vec::new(), 0)
    }

    /// A decoder whose message starts with `prefix` (not counted against `max_size`),
    /// with room for about `expected` octets of text (the client's `SIZE=`, say) so that
    /// a large message is not copied again each time its buffer fills; the room is
    /// capped at [`Self::MAX_RESERVE`] and at `max_size`.
    pub fn with_prefix(max_size: u64, mut prefix: Vec<u8>, expected: u64) -> Self {
        let mut room = expected.clamp(Self::MIN_RESERVE, Self::MAX_RESERVE);
        if max_size > 0 {
            room = room.min(max_size.saturating_add(1));
        }
        prefix.reserve(usize::try_from(room).unwrap_or(0));
        DataDecoder {
            state: State::LineStart,
            prefix: prefix.len(),
            body: prefix,
            max_size,
            too_big: false,
            bare: None,
            nul: false,
            done: false,
        }
    }

    /// Whether the end of DATA has been seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Feeds input; returns how many bytes belonged to DATA (up to and including the
    /// final `.CRLF`) and whether DATA ended. Bytes after the end are left to the caller.
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() && !self.done {
            if self.state == State::Text {
                // Fast path: copy the run up to the next CR, LF or NUL in one go.
                let run = memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
                self.emit(&input[i..i + run]);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            self.step(b);
        }
        (i, self.done)
    }

    /// How many octets at the start of the message are the prefix.
    pub fn prefix_len(&self) -> usize {
        self.prefix
    }

    /// The result, once [`feed`](Self::feed) has reported the end: a message starts
    /// with the prefix.
    pub fn finish(self) -> DataOutcome {
        if let Some(bare) = self.bare {
            DataOutcome::Bare(bare)
        } else if self.nul {
            DataOutcome::Nul
        } else if self.too_big {
            DataOutcome::TooBig
        } else {
            DataOutcome::Message(self.body)
        }
    }

    fn step(&mut self, b: u8) {
        match self.state {
            State::LineStart => match b {
                b'.' => self.state = State::Dot,
                _ => self.text_byte(b),
            },
            // The stuffed dot is dropped; the byte after it starts the line's text.
            State::Dot => match b {
                b'\r' => self.state = State::DotCr,
                _ => self.text_byte(b),
            },
            State::DotCr => match b {
                b'\n' => self.done = true,
                _ => {
                    self.taint(BareNewline::Cr);
                    self.emit(b"\r");
                    self.text_byte(b);
                }
            },
            State::Text => self.text_byte(b),
            State::Cr => match b {
                b'\n' => {
                    self.emit(b"\r\n");
                    self.state = State::LineStart;
                }
                _ => {
                    self.taint(BareNewline::Cr);
                    self.emit(b"\r");
                    self.text_byte(b);
                }
            },
        }
    }

    /// A byte inside a line. A bare LF does not start a new line: only CRLF does, so
    /// `\n.\n` can never look like the end.
    fn text_byte(&mut self, b: u8) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                self.taint(BareNewline::Lf);
                self.state = State::Text;
            }
            0 => {
                // The message will be refused; stop keeping its text.
                self.nul = true;
                self.body = Vec::new();
                self.state = State::Text;
            }
            _ => {
                self.emit(&[b]);
                self.state = State::Text;
            }
        }
    }

    fn taint(&mut self, bare: BareNewline) {
        if self.bare.is_none() {
            self.bare = Some(bare);
        }
        // The message will be refused; stop keeping its text.
        self.body = Vec::new();
    }

    fn emit(&mut self, bytes: &[u8]) {
        if self.bare.is_some() || self.nul || self.too_big {
            return;
        }
        self.body.extend_from_slice(bytes);
        let text = self.body.len().saturating_sub(self.prefix) as u64;
        if self.max_size > 0 && text > self.max_size {
            self.too_big = true;
            self.body = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_comes_first_and_does_not_count_against_the_limit() {
        let mut d = DataDecoder::with_prefix(5, b"Received: x\r\n".to_vec(), 0);
        assert_eq!(d.prefix_len(), 13);
        assert_eq!(d.feed(b"abc\r\n.\r\n"), (8, true));
        assert_eq!(
            d.finish(),
            DataOutcome::Message(b"Received: x\r\nabc\r\n".to_vec())
        );
        let mut d = DataDecoder::with_prefix(5, b"Received: x\r\n".to_vec(), 0);
        d.feed(b"abcdef\r\n.\r\n");
        assert_eq!(
            d.finish(),
            DataOutcome::TooBig,
            "six octets of text are too many"
        );
    }

    #[test]
    fn room_is_made_for_the_announced_size_within_bounds() {
        let room = |max, expected| {
            DataDecoder::with_prefix(max, Vec::new(), expected)
                .body
                .capacity() as u64
        };
        assert!(room(0, 0) >= DataDecoder::MIN_RESERVE);
        assert!(room(0, 300_000) >= 300_000, "SIZE=300000");
        let capped = room(0, u64::MAX);
        assert!((DataDecoder::MAX_RESERVE..2 * DataDecoder::MAX_RESERVE).contains(&capped));
        assert!(
            room(1000, 300_000) < 4096,
            "never more than the limit allows"
        );
    }

    fn decode(input: &[u8]) -> (usize, Option<DataOutcome>) {
        let mut d = DataDecoder::new(1000);
        let (n, done) = d.feed(input);
        (n, done.then(|| d.finish()))
    }

    fn msg(s: &[u8]) -> Option<DataOutcome> {
        Some(DataOutcome::Message(s.to_vec()))
    }

    #[test]
    fn plain_message_and_rest() {
        assert_eq!(
            decode(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"),
            (21, msg(b"Subject: x\r\n\r\nhi\r\n"))
        );
    }

    #[test]
    fn empty_message() {
        assert_eq!(decode(b".\r\n"), (3, msg(b"")));
    }

    #[test]
    fn dot_unstuffing() {
        assert_eq!(
            decode(b"..\r\n..x\r\n.y\r\n.\r\n"),
            (16, msg(b".\r\n.x\r\ny\r\n"))
        );
    }

    #[test]
    fn incomplete() {
        assert_eq!(decode(b"abc\r\n.\r"), (7, None));
        assert_eq!(decode(b"abc\r\n"), (5, None));
    }

    #[test]
    fn bare_lf_and_cr() {
        assert_eq!(
            decode(b"a\nb\r\n.\r\n").1,
            Some(DataOutcome::Bare(BareNewline::Lf))
        );
        assert_eq!(
            decode(b"a\rb\r\n.\r\n").1,
            Some(DataOutcome::Bare(BareNewline::Cr))
        );
        assert_eq!(
            decode(b".\rX\r\n.\r\n").1,
            Some(DataOutcome::Bare(BareNewline::Cr))
        );
        assert_eq!(
            decode(b"a\r\r\n.\r\n").1,
            Some(DataOutcome::Bare(BareNewline::Cr))
        );
    }

    #[test]
    fn smuggling_sequences_do_not_end_data() {
        for fake in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r\n.\r",
            b"\r.\r\n",
        ] {
            let mut input = b"x".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(b"MAIL FROM:<a@b>\r\n");
            let (n, out) = decode(&input);
            assert_eq!((n, out), (input.len(), None), "{fake:?}");
        }
        // NUL before the dot: not an end, and not bare either; the message goes on (and
        // will be refused for its NUL at the real end).
        let (n, out) = decode(b"x\r\n\0.\r\nQUIT\r\n");
        assert_eq!((n, out), (13, None));
    }

    #[test]
    fn size_limit() {
        let mut d = DataDecoder::new(10);
        assert_eq!(d.feed(b"0123456789\r\n.\r\n"), (15, true));
        assert_eq!(d.finish(), DataOutcome::TooBig);
        let mut d = DataDecoder::new(10);
        assert_eq!(d.feed(b"01234567\r\n.\r\n"), (13, true));
        assert_eq!(d.finish(), DataOutcome::Message(b"01234567\r\n".to_vec()));
    }

    #[test]
    fn bare_wins_over_size() {
        let mut d = DataDecoder::new(3);
        d.feed(b"abcdef\nx\r\n.\r\n");
        assert_eq!(d.finish(), DataOutcome::Bare(BareNewline::Lf));
    }

    #[test]
    fn nul_anywhere_refuses_the_message() {
        for input in [
            &b"a\0b\r\n.\r\n"[..],
            b"\0\r\n.\r\n",
            b".\0\r\n.\r\n",
            b"x\r\n\0.\r\nmore\r\n.\r\n",
            b"long line then \0\r\n.\r\n",
        ] {
            assert_eq!(
                decode(input),
                (input.len(), Some(DataOutcome::Nul)),
                "{input:?}"
            );
        }
        // Byte by byte, the same verdict (the fast path and the slow path agree).
        let mut d = DataDecoder::new(1000);
        for b in b"ab\0cd\r\n.\r\n" {
            d.feed(&[*b]);
        }
        assert_eq!(d.finish(), DataOutcome::Nul);
    }

    #[test]
    fn precedence_is_bare_then_nul_then_size() {
        let mut d = DataDecoder::new(3);
        d.feed(b"\0abcdef\nx\r\n.\r\n");
        assert_eq!(d.finish(), DataOutcome::Bare(BareNewline::Lf));
        let mut d = DataDecoder::new(3);
        d.feed(b"abcdef\0\r\n.\r\n");
        assert_eq!(d.finish(), DataOutcome::Nul);
    }
}
