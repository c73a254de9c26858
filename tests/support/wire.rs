//! Test support: reading a message's text after `354` the way an SMTP server does, for
//! the test servers (`sink.rs`, `chaos.rs`). Included by them with
//! `#[path = "wire.rs"] mod wire;`; it holds no state and starts nothing.
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
