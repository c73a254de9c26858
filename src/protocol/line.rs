//! The command line reader: finds where each command line ends in buffered input.
//!
//! A line ends at the first LF. Only CRLF is a correct ending: a line ended by a bare LF,
//! or holding a CR that is not followed by LF, is reported as such (REFERENCE: bare line
//! ends are refused, so that the server and a downstream parser never disagree about
//! where a command ends). Over-long lines are swallowed up to their LF without buffering
//! them. Every verdict depends only on the bytes of the line, never on how they were
//! split into reads. No I/O here: the caller owns the buffer.

use std::ops::Range;

/// What the reader found at the front of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A correct CRLF-terminated line; the range is its content, without CRLF.
    Line(Range<usize>),
    /// The line (with its terminator) was longer than the limit; it has been discarded.
    TooLong,
    /// The line ended with a bare LF.
    BareLf,
    /// The line contained a CR not followed by LF.
    BareCr,
}

/// Splits buffered input into command lines; remembers only whether it is discarding an
/// over-long line.
#[derive(Debug, Clone)]
pub struct LineReader {
    max: usize,
    discarding: bool,
}

impl LineReader {
    /// A reader that refuses lines longer than `max` octets including the terminator.
    pub fn new(max: usize) -> Self {
        LineReader {
            max: max.max(3),
            discarding: false,
        }
    }

    /// Looks at `input` and returns how many bytes it consumed and, when a line is
    /// complete, what it was. `(n, None)` means "need more input" (n bytes of an
    /// over-long line may have been discarded). Ranges are relative to `input`.
    pub fn next(&mut self, input: &[u8]) -> (usize, Option<LineEvent>) {
        let lf = memchr::memchr(b'\n', input);
        if self.discarding {
            return match lf {
                Some(i) => {
                    self.discarding = false;
                    (i + 1, Some(LineEvent::TooLong))
                }
                None => (input.len(), None),
            };
        }
        match lf {
            Some(i) => {
                let crlf = i > 0 && input[i - 1] == b'\r';
                let content = if crlf { &input[..i - 1] } else { &input[..i] };
                let event = if i + 1 > self.max {
                    LineEvent::TooLong
                } else if !crlf {
                    LineEvent::BareLf
                } else if memchr::memchr(b'\r', content).is_some() {
                    LineEvent::BareCr
                } else {
                    LineEvent::Line(0..content.len())
                };
                (i + 1, Some(event))
            }
            // With `max` bytes and no LF yet, the whole line is at least max+1 long: it
            // is too long whatever comes next, so stop buffering it.
            None if input.len() >= self.max => {
                self.discarding = true;
                (input.len(), None)
            }
            None => (0, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_lines() {
        let mut r = LineReader::new(512);
        assert_eq!(r.next(b"NOOP\r\nQUIT"), (6, Some(LineEvent::Line(0..4))));
        assert_eq!(r.next(b"QUIT"), (0, None));
        assert_eq!(r.next(b"QUIT\r"), (0, None));
        assert_eq!(r.next(b"\r\n"), (2, Some(LineEvent::Line(0..0))));
    }

    #[test]
    fn bare_line_ends() {
        let mut r = LineReader::new(512);
        assert_eq!(r.next(b"NOOP\nX"), (5, Some(LineEvent::BareLf)));
        assert_eq!(r.next(b"NO\rOP\r\n"), (7, Some(LineEvent::BareCr)));
        assert_eq!(r.next(b"\n"), (1, Some(LineEvent::BareLf)));
        assert_eq!(r.next(b"A\r\rB\n"), (5, Some(LineEvent::BareLf)));
    }

    #[test]
    fn limit_counts_the_terminator() {
        let mut r = LineReader::new(8);
        assert_eq!(r.next(b"123456\r\n"), (8, Some(LineEvent::Line(0..6))));
        assert_eq!(r.next(b"1234567\r\n"), (9, Some(LineEvent::TooLong)));
        assert_eq!(r.next(b"1234567\n"), (8, Some(LineEvent::BareLf)));
    }

    #[test]
    fn long_line_is_discarded_in_pieces() {
        let mut r = LineReader::new(8);
        assert_eq!(r.next(b"1234567"), (0, None));
        assert_eq!(r.next(b"12345678"), (8, None));
        assert_eq!(r.next(b"abc\r"), (4, None));
        assert_eq!(r.next(b"\nNOOP\r\n"), (1, Some(LineEvent::TooLong)));
        assert_eq!(r.next(b"NOOP\r\n"), (6, Some(LineEvent::Line(0..4))));
    }
}
