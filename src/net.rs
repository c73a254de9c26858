//! The only code that touches inbound sockets: binding the SMTP listener, one SMTP
//! connection with its deadlines and STARTTLS swap (`connection`), the small HTTP server
//! of the admin endpoint (`admin`), and the inbound TLS acceptor (`tls`). No SMTP grammar
//! lives here.

pub mod admin;
pub mod connection;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpListener;

/// Bind a listening socket with `SO_REUSEADDR`, so a restarted listener (or daemon) can
/// take its port back while old connections linger in TIME_WAIT. `::` (the default
/// `server_smtp_address`) is one socket for both stacks, IPv4 clients arriving as
/// IPv4-mapped addresses; on a host without IPv6 it falls back to `0.0.0.0`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let both = addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    match bind_one(addr, both) {
        Err(e) if both => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            tracing::warn!(error = %e, "cannot listen on {addr} (no IPv6?); listening on {v4} only");
            bind_one(v4, false)
        }
        other => other,
    }
}

fn bind_one(addr: SocketAddr, dual_stack: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}
