//! Test support: the SMTP line handling shared by the test servers (`sink.rs`,
//! `chaos.rs`: reading a command, an address, the text after `354`) and by async test
//! clients (reading a reply). The servers reach it as `crate::wire`, so a test that
//! includes either includes this too, with `#[path = "support/wire.rs"] mod wire;`. It
//! holds no state and starts nothing.
#![allow(dead_code)]

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Reads lines up to the lone `.` and returns the data with dot-stuffing undone (without
/// the terminating `.CRLF`); `None` when the client closed the connection first.
pub async fn read_data<R: AsyncBufRead + Unpin>(io: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" {
            return Ok(Some(data));
        }
        let content = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(content);
    }
}

/// Reads one command line (at most 4096 octets) without its line end; `None` when the
/// client closed the connection.
pub async fn read_command<R: AsyncBufRead + Unpin>(io: &mut R) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    if (&mut *io).take(4096).read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&line).trim_end().to_string()))
}

/// The address in a `MAIL FROM:`/`RCPT TO:` argument, without angle brackets or
/// parameters.
pub fn angle(arg: &str) -> String {
    let a = arg.trim();
    let a = a.split_whitespace().next().unwrap_or("");
    a.trim_start_matches('<').trim_end_matches('>').to_string()
}

/// Reads one (possibly multi-line) SMTP reply as a client, waiting at most `patience`
/// for each line (a test failure otherwise). Its lines without line ends, and whether
/// the connection is still open (false when it closed or broke before the last line).
pub async fn read_reply_lines<R: AsyncBufRead + Unpin>(
    io: &mut R, patience: std::time::Duration,
) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(patience, io.read_line(&mut line))
            .await
            .expect("reply in time")
            .unwrap_or(0);
        if n == 0 {
            return (lines, false);
        }
        let l = line.trim_end().to_string();
        let more = l.as_bytes().get(3) == Some(&b'-');
        lines.push(l);
        if !more {
            return (lines, true);
        }
    }
}

/// The reply to `RSET` (which forgets the envelope, `mail` and `rcpts`) or `NOOP`, given
/// the command line in upper case; `None` for any other command.
pub fn reset_or_noop(
    upper: &str, mail: &mut Option<String>, rcpts: &mut Vec<String>,
) -> Option<&'static str> {
    match upper {
        "RSET" => {
            *mail = None;
            rcpts.clear();
            Some("250 2.0.0 Ok")
        }
        "NOOP" => Some("250 2.0.0 Ok"),
        _ => None,
    }
}
