//! Test support: reading a message's text after `354` the way an SMTP server does, for
//! the test servers (`sink.rs`, `chaos.rs`). Included by them with
//! `#[path = "wire.rs"] mod wire;`; it holds no state and starts nothing.
#![allow(dead_code)]

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

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
