//! Listening sockets: one `SO_REUSEPORT` socket per worker per listener, so
//! the kernel spreads connections across workers without a shared accept lock.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listener `{name}`: cannot listen on {address}: {source}")]
pub struct BindError {
    pub name: String,
    pub address: SocketAddr,
    #[source]
    pub source: io::Error,
}

fn socket(address: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds `count` sockets sharing one address. A port of 0 picks a free port
/// for the first socket and the rest join it. An address already held by
/// another process is an error, not a silent share.
pub fn bind_shared(
    name: &str,
    address: SocketAddr,
    count: usize,
) -> Result<(SocketAddr, Vec<TcpListener>), BindError> {
    bind_listener(name, address, count, true)
}

/// [`bind_shared`]; with `check_free` false, an address already bound by
/// this proxy (a listener moving to another name or protocol) is joined
/// instead of refused.
pub fn bind_listener(
    name: &str,
    address: SocketAddr,
    count: usize,
    check_free: bool,
) -> Result<(SocketAddr, Vec<TcpListener>), BindError> {
    let err = |address, source| BindError {
        name: name.to_string(),
        address,
        source,
    };
    if check_free && address.port() != 0 {
        // A plain bind fails if anyone holds the port, even with SO_REUSEPORT.
        drop(socket(address, false).map_err(|e| err(address, e))?);
    }
    let first = socket(address, true).map_err(|e| err(address, e))?;
    let bound = first.local_addr().map_err(|e| err(address, e))?;
    let mut sockets = vec![first];
    for _ in 1..count.max(1) {
        sockets.push(socket(bound, true).map_err(|e| err(bound, e))?);
    }
    Ok((bound, sockets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_shares_one_port() {
        let (addr, sockets) = bind_shared("t", "127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(sockets.len(), 3);
        for s in &sockets {
            assert_eq!(s.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn taken_port_is_an_error() {
        let (addr, _held) = bind_shared("a", "127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let err = bind_shared("b", addr, 1).unwrap_err();
        assert!(err.to_string().contains("listener `b`"), "{err}");
    }
}
