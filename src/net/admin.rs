//! The admin endpoint's HTTP server: GET requests on `admin_listen`, answered by a
//! handler the daemon supplies (`/metrics`, `/tree`, `/queue`).
//!
//! Deliberately tiny: HTTP/1.1 GET and HEAD only, one request per connection, no
//! keep-alive, bounded request size and time. It is meant for Prometheus scrapes and
//! operators on loopback, not for the open internet. It knows nothing of what it serves.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// 200 with a body of `content_type`.
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status: 200,
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text error.
    pub fn error(status: u16, text: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{text}\n").into_bytes(),
        }
    }
}

/// What answers a request: the path (with its query string) in, a response out.
pub type Handler =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Parse the request line of a GET/HEAD request: `(method, target)`.
pub fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    (version.starts_with("HTTP/1.") && target.starts_with('/')).then_some((method, target))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Bind `addr`; the server runs until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr, handler: Handler,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut buf = Vec::with_capacity(1024);
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let (resp, head_only) = match parse_request_line(&head) {
                        Some(("GET", target)) => (handler(target.to_string()).await, false),
                        Some(("HEAD", target)) => (handler(target.to_string()).await, true),
                        Some(_) => (Response::error(405, "only GET and HEAD"), false),
                        None => (Response::error(400, "bad request"), false),
                    };
                    let mut out = format!(
                        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        resp.status,
                        reason(resp.status),
                        resp.content_type,
                        resp.body.len()
                    )
                    .into_bytes();
                    if !head_only {
                        out.extend_from_slice(&resp.body);
                    }
                    let _ = stream.write_all(&out).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
        }
    });
    Ok((local, task))
}

/// Fetch `path` from an admin endpoint (used by `erlmail status`): the body of a 200.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP header"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            head.lines().next().unwrap_or("").to_string(),
        ));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_request_line;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(parse_request_line("GET metrics HTTP/1.1\r\n"), None);
        assert_eq!(parse_request_line("GET /x SMTP/1.0\r\n"), None);
        assert_eq!(parse_request_line(""), None);
    }
}
