//! The only code that touches inbound sockets: binding the SMTP listener, one SMTP
//! connection with its deadlines and STARTTLS swap (`connection`), the small HTTP server
//! of the admin endpoint (`admin`), and the inbound TLS acceptor (`tls`). No SMTP grammar
//! lives here.

pub mod admin;
pub mod connection;
pub mod tls;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Bind a listening socket with `SO_REUSEADDR`, so a restarted listener (or daemon) can
/// take its port back while old connections linger in TIME_WAIT.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
