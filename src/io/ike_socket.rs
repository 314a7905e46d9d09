//! The IKE socket on UDP port 500 (RFC 7296 section 2): plain datagrams,
//! one at a time, no marker. (IKE on port 4500 shares the datapath's
//! NAT-T socket, where the non-ESP marker tells it from ESP: RFC 3948
//! section 2.2; with raw ESP, the IKE thread opens this kind of socket on
//! port 4500 too, for IKE behind the marker only.) Like the outer sockets it carries the daemon's SO_MARK,
//! so that policy routing keeps IKE toward a peer out of the TUN routes
//! that classic transport mode installs for that same address.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::IoSetupError;

/// The IKE port (RFC 7296 section 2).
pub const IKE_PORT: u16 = 500;
/// Largest IKE message read: RFC 7296 section 2 requires 1280 bytes, and
/// IKE_AUTH with PSK stays far below 64 KiB.
pub const MAX_MESSAGE: usize = 65535;

/// A non-blocking UDP socket bound to the wildcard address on `port`.
#[derive(Debug)]
pub struct IkeSocket {
    sock: UdpSocket,
}

impl IkeSocket {
    pub fn open(v6: bool, port: u16, fwmark: Option<u32>) -> Result<IkeSocket, IoSetupError> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let setup = |what: &'static str| move |source| IoSetupError::Socket { what, source };
        let sock = Socket::new(
            domain,
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EAFNOSUPPORT) if v6 => IoSetupError::Ipv6Unavailable(e),
            _ => IoSetupError::Socket {
                what: "creating the IKE socket",
                source: e,
            },
        })?;
        if let Some(mark) = fwmark {
            sock.set_mark(mark)
                .map_err(|source| match source.raw_os_error() {
                    Some(libc::EPERM) => IoSetupError::MarkNeedsCapNetAdmin { mark, source },
                    _ => IoSetupError::Socket {
                        what: "setting SO_MARK on the IKE socket",
                        source,
                    },
                })?;
        }
        let addr = if v6 {
            sock.set_only_v6(true)
                .map_err(setup("setting IPV6_V6ONLY on the IKE socket"))?;
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
        } else {
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
        };
        sock.bind(&SockAddr::from(addr))
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EADDRINUSE) => IoSetupError::PortInUse { addr, source },
                Some(libc::EACCES) => IoSetupError::PrivilegedPort { addr, source },
                _ => IoSetupError::Socket {
                    what: "binding the IKE socket",
                    source,
                },
            })?;
        Ok(IkeSocket { sock: sock.into() })
    }

    /// One datagram into `buf`; `WouldBlock` when none is waiting.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.sock.recv_from(buf)
    }

    pub fn send_to(&self, bytes: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.sock.send_to(bytes, to)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

impl AsFd for IkeSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
