//! The outer sockets: ESP in UDP (NAT-T, RFC 3948) or bare ESP (IP
//! protocol 50, RFC 4303), one socket per address family, batched with
//! recvmmsg(2)/sendmmsg(2).
//!
//! socket2 creates and configures the sockets; the batch calls are direct
//! libc, since socket2 has no recvmmsg/sendmmsg.
//!
//! Raw socket behaviour this module hides or relies on (raw(7), ipv6(7)):
//! - An IPv4 raw socket delivers the IPv4 header in front of the payload;
//!   [`OuterSocket::recv_batch`] strips it. An IPv6 raw socket delivers
//!   the payload only.
//! - Without IP_HDRINCL (off for every protocol but IPPROTO_RAW) the
//!   kernel builds the outer IP header on send; we send the ESP bytes.
//! - An IPv6 raw socket reads the destination's port field as a protocol
//!   number and refuses any non-zero value other than its own (EINVAL), so
//!   raw sends always use port 0.
//! - Every raw socket of protocol 50 gets a copy of every ESP packet the
//!   host receives, including the kernel's own IPsec traffic and, on
//!   loopback, the packets the socket sent itself. SPI lookup sorts that
//!   out above this layer.
//!
//! Layout: [`OuterSocket`] is opened and configured here; `mmsg` holds
//! the batched receive and send (the only system calls written by hand,
//! with `addr`'s kernel-format socket addresses), `options` the socket
//! options socket2 does not wrap.

#[allow(unsafe_code)]
mod addr;
#[allow(unsafe_code)]
mod hopopts;
#[allow(unsafe_code)]
mod mmsg;
#[allow(unsafe_code)]
mod options;
mod pmtu;

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::IoSetupError;
use crate::wire::ip::protocol;
use crate::wire::outer::Encap;
use options::{set_buffer_sizes, set_int_option};
pub use pmtu::PathMtuProbe;

/// The most datagrams one recvmmsg/sendmmsg call handles; the per-call
/// scratch (headers, addresses, iovecs) lives on the stack, sized by this.
/// Larger batches are sent in chunks, and received over several calls.
pub const MAX_BATCH: usize = 64;

/// Socket buffer size asked for (best effort): a few milliseconds of
/// line rate, so that a scheduling hiccup does not drop a burst.
const SOCKET_BUFFER: usize = 4 << 20;

/// How long [`OuterSocket::send_batch`] waits, in total, for the kernel
/// to take more packets when it is full, and in how many waits.
const SEND_WAIT_BUDGET: Duration = Duration::from_millis(10);
const SEND_MAX_WAITS: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// One outer socket, non-blocking and close-on-exec.
#[derive(Debug)]
pub struct OuterSocket {
    sock: Socket,
    family: Family,
    kind: Encap,
    /// UDP GSO: equal-size packets to one peer leave as one UDP_SEGMENT
    /// train. Cleared for good when the kernel refuses a train.
    gso: AtomicBool,
    /// UDP GRO: the kernel may hand over a train of equal-size datagrams
    /// as one buffer, with its segment size in a control message.
    gro: bool,
    /// The kernel's count of datagrams dropped for a full receive buffer
    /// (SO_RXQ_OVFL), as last reported.
    rx_overflows: AtomicU64,
    /// Trains the kernel refused, after which GSO was turned off.
    gso_refused: AtomicU64,
    /// Whether packets with a hop-by-hop header may go in GSO trains:
    /// Linux 6.x takes them, older kernels refuse the train (EINVAL or
    /// EIO). Cleared for good at the first refusal; such packets then go
    /// one per message, and GSO stays on for the rest.
    gso_hop_by_hop: AtomicBool,
    /// IPV6_RECVERR is on (raw ESP over IPv6): the error queue is drained
    /// by the receive path ([`Self::recv_batch`]).
    recverr: bool,
    /// ICMP errors taken off the error queue.
    icmp_errors: AtomicU64,
    /// The next send sends each train's first packet alone, with DF
    /// ([`Self::request_df_probe`]).
    df_probe: AtomicBool,
}

/// Offloads an outer socket can be asked for (UDP only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketOffloads {
    pub gso: bool,
    pub gro: bool,
}

/// The outcome of [`OuterSocket::send_batch`]: `sent + failed` is the
/// number of packets given. `failed` counts packets the kernel refused
/// (no route, unreachable, wrong address family, ...) and packets still
/// unsent when the kernel stayed full for the whole wait budget;
/// `last_error` is the last such error.
#[derive(Debug, Default)]
pub struct SendReport {
    pub sent: usize,
    pub failed: usize,
    pub last_error: Option<io::Error>,
}

impl SendReport {
    fn fail(&mut self, n: usize, e: io::Error) {
        self.failed += n;
        self.last_error = Some(e);
    }
}

impl OuterSocket {
    /// Opens the outer socket for one family: for UDP bound to the
    /// wildcard address on `port`, for raw ESP unbound (it receives all
    /// protocol-50 packets). `fwmark` sets SO_MARK on everything sent, so
    /// that policy routing can keep the daemon's own outer packets out of
    /// its TUN routes.
    pub fn open(kind: Encap, v6: bool, fwmark: Option<u32>) -> Result<OuterSocket, IoSetupError> {
        let (domain, family) = if v6 {
            (Domain::IPV6, Family::V6)
        } else {
            (Domain::IPV4, Family::V4)
        };
        let (ty, proto) = match kind {
            Encap::Udp { .. } => (Type::DGRAM, Protocol::UDP),
            Encap::RawEsp => (Type::RAW, Protocol::from(i32::from(protocol::ESP))),
        };
        // Non-blocking and close-on-exec atomically, at creation.
        let sock =
            Socket::new(domain, ty.nonblocking().cloexec(), Some(proto)).map_err(|e| {
                match (e.raw_os_error(), kind) {
                    (Some(libc::EPERM | libc::EACCES), Encap::RawEsp) => {
                        IoSetupError::RawNeedsCapNetRaw(e)
                    }
                    (Some(libc::EAFNOSUPPORT), _) if v6 => IoSetupError::Ipv6Unavailable(e),
                    _ => IoSetupError::Socket {
                        what: "creating the outer socket",
                        source: e,
                    },
                }
            })?;
        let setup = |what: &'static str| move |source| IoSetupError::Socket { what, source };

        // Never share the port with a socket that is still around (e.g.
        // a second daemon): off is the default, made explicit.
        sock.set_reuse_address(false)
            .map_err(setup("clearing SO_REUSEADDR"))?;
        if let Some(mark) = fwmark {
            sock.set_mark(mark)
                .map_err(|source| match source.raw_os_error() {
                    Some(libc::EPERM) => IoSetupError::MarkNeedsCapNetAdmin { mark, source },
                    _ => IoSetupError::Socket {
                        what: "setting SO_MARK",
                        source,
                    },
                })?;
        }
        set_buffer_sizes(&sock);
        // Path MTU discovery (see `pmtu`): DF on what fits the known path
        // MTU, so routers report a smaller one, and host fragmentation of
        // what does not. WANT is Linux's default unless
        // net.ipv4.ip_no_pmtu_disc says otherwise: made explicit, for
        // raw and UDP sockets alike.
        let (level, name, want) = if v6 {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_WANT,
            )
        } else {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_WANT,
            )
        };
        set_int_option(&sock, level, name, want).map_err(setup("setting IP_MTU_DISCOVER"))?;
        // Linux's rawv6_err() updates the path MTU for an unconnected raw
        // IPv6 socket only with IPV6_RECVERR (raw IPv4 and UDP do it
        // regardless), so raw ESP over IPv6 needs it, and then drains its
        // error queue (`mmsg::drain_error_queue`).
        let recverr = v6 && kind == Encap::RawEsp;
        if recverr {
            set_int_option(&sock, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)
                .map_err(setup("setting IPV6_RECVERR"))?;
        }

        if let Encap::Udp { port } = kind {
            if v6 {
                // Only IPv6: the IPv4 socket binds the same port next to it
                // (ipv6(7), IPV6_V6ONLY), and peers' addresses stay in their
                // own family instead of turning into v4-mapped ones.
                sock.set_only_v6(true)
                    .map_err(setup("setting IPV6_V6ONLY"))?;
            } else {
                // RFC 3948 section 2.1: the UDP checksum of ESP-in-UDP
                // over IPv4 SHOULD be sent as zero; the ESP ICV protects
                // the payload. Linux's own ESP-in-UDP (net/ipv4/esp4.c)
                // does the same, and it spares NATs a checksum update.
                // (IPv6 keeps the checksum: RFC 8200 section 8.1.)
                set_int_option(&sock, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1)
                    .map_err(setup("setting SO_NO_CHECK"))?;
            }
            let addr = if v6 {
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
            } else {
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
            };
            sock.bind(&SockAddr::from(addr))
                .map_err(|source| match source.raw_os_error() {
                    Some(libc::EADDRINUSE) => IoSetupError::PortInUse { addr, source },
                    Some(libc::EACCES) => IoSetupError::PrivilegedPort { addr, source },
                    _ => IoSetupError::Socket {
                        what: "binding the outer UDP socket",
                        source,
                    },
                })?;
        }
        // The TOS byte / traffic class of each datagram (DSCP and ECN),
        // for the header rebuilt on receipt (wire::ecn).
        let (level, name, what) = if v6 {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVTCLASS,
                "setting IPV6_RECVTCLASS",
            )
        } else {
            (libc::IPPROTO_IP, libc::IP_RECVTOS, "setting IP_RECVTOS")
        };
        set_int_option(&sock, level, name, 1).map_err(setup(what))?;
        // Best effort: without it the kernel's receive-buffer drops are
        // just not seen.
        let _ = set_int_option(&sock, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1);
        Ok(OuterSocket {
            sock,
            family,
            kind,
            gso: AtomicBool::new(false),
            gro: false,
            rx_overflows: AtomicU64::new(0),
            gso_refused: AtomicU64::new(0),
            gso_hop_by_hop: AtomicBool::new(true),
            recverr,
            icmp_errors: AtomicU64::new(0),
            df_probe: AtomicBool::new(false),
        })
    }

    /// Turns on what of `want` the kernel supports (UDP sockets only) and
    /// returns what is on. GSO needs the UDP checksum: the kernel refuses
    /// UDP_SEGMENT on a SO_NO_CHECK socket, so an IPv4 socket then sends
    /// computed checksums. RFC 3948 section 2.1 says the checksum SHOULD
    /// be zero and receivers MUST NOT depend on it, so a computed one
    /// interoperates.
    pub fn enable_offloads(&mut self, want: SocketOffloads) -> SocketOffloads {
        if !matches!(self.kind, Encap::Udp { .. }) {
            return SocketOffloads::default();
        }
        let mut on = SocketOffloads::default();
        if want.gso {
            let checksum_on = self.family == Family::V6
                || set_int_option(&self.sock, libc::SOL_SOCKET, libc::SO_NO_CHECK, 0).is_ok();
            on.gso = checksum_on;
            self.gso.store(on.gso, Ordering::Relaxed);
        }
        if want.gro {
            on.gro = set_int_option(&self.sock, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
            self.gro = on.gro;
        }
        on
    }

    /// The offloads in use now (GSO goes off if the kernel refuses it).
    pub fn offloads(&self) -> SocketOffloads {
        SocketOffloads {
            gso: self.gso.load(Ordering::Relaxed),
            gro: self.gro,
        }
    }

    /// Datagrams the kernel dropped because the receive buffer was full,
    /// since the socket opened (SO_RXQ_OVFL; as of the last receive).
    pub fn rx_overflows(&self) -> u64 {
        self.rx_overflows.load(Ordering::Relaxed)
    }

    /// Trains the kernel refused, which turned GSO off (0 or 1).
    pub fn gso_refused(&self) -> u64 {
        self.gso_refused.load(Ordering::Relaxed)
    }

    /// ICMP errors drained from the error queue (raw ESP over IPv6).
    pub fn icmp_errors(&self) -> u64 {
        self.icmp_errors.load(Ordering::Relaxed)
    }

    /// Has the next send put the first packet of each GSO train in a
    /// datagram of its own, which carries DF when it fits the known path
    /// MTU, so that a router on a smaller path reports it (a train never
    /// carries DF). The path MTU refresh asks for this now and then.
    pub fn request_df_probe(&self) {
        if self.gso.load(Ordering::Relaxed) {
            self.df_probe.store(true, Ordering::Relaxed);
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn kind(&self) -> Encap {
        self.kind
    }

    /// The bound address. A raw socket reports the wildcard address with
    /// the protocol number (50) as its "port".
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()?.as_socket().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "outer socket has no IP address")
        })
    }

    /// Sends each `(packet, destination)` as one datagram, with
    /// sendmmsg(2), in order. For raw sockets the destination's port is
    /// ignored (sent as 0, see the module notes).
    ///
    /// One packet's failure (no route, unreachable, wrong family, too big)
    /// skips that packet only. When the kernel is full (EAGAIN, ENOBUFS)
    /// it waits for room, at most 4 times within about
    /// 10 ms in all, then gives up on the rest. Both are counted in the
    /// report, not returned as errors. `Err` is only for errors that would
    /// fail every packet (a bad socket).
    pub fn send_batch(&self, packets: &[(&[u8], SocketAddr)]) -> io::Result<SendReport> {
        self.send_iter(packets.iter().copied())
    }

    /// [`Self::send_batch`] over any sequence of packets, so a caller can
    /// send straight from its batch without building a list first.
    pub fn send_iter<'a>(
        &self,
        packets: impl IntoIterator<Item = (&'a [u8], SocketAddr)>,
    ) -> io::Result<SendReport> {
        self.send_marked(packets.into_iter().map(|(p, to)| (p, to, None, &[][..])))
    }

    /// [`Self::send_iter`] with each packet's TOS byte (IPv4) or traffic
    /// class (IPv6), DSCP and ECN, sent in an IP_TOS or IPV6_TCLASS control
    /// message (`None`: the socket's own, 0). Packets with different TOS
    /// bytes never share a GSO train.
    pub fn send_iter_with_tos<'a>(
        &self,
        packets: impl IntoIterator<Item = (&'a [u8], SocketAddr, u8)>,
    ) -> io::Result<SendReport> {
        self.send_marked(
            packets
                .into_iter()
                .map(|(p, to, tos)| (p, to, Some(tos), &[][..])),
        )
    }

    /// [`Self::send_iter_with_tos`] with each packet's hop-by-hop header
    /// (empty: none), sent in an IPV6_HOPOPTS control message (RFC 3542
    /// section 6.3) so that the outer packet carries it in front of ESP
    /// (RFC 4303 section 3.1.1). Linux lets only CAP_NET_RAW set it
    /// (`ip6_datagram_send_ctl`: EPERM otherwise). Packets with different
    /// headers, or one with and one without, never share a GSO train; a
    /// header on an IPv4 socket fails that packet.
    pub fn send_iter_marked<'a>(
        &self,
        packets: impl IntoIterator<Item = (&'a [u8], SocketAddr, u8, &'a [u8])>,
    ) -> io::Result<SendReport> {
        self.send_marked(
            packets
                .into_iter()
                .map(|(p, to, tos, hbh)| (p, to, Some(tos), hbh)),
        )
    }

    /// Asks the kernel to report each received datagram's hop-by-hop
    /// header (IPV6_RECVHOPOPTS), for [`Self::recv_batch_carrying`]; IPv6
    /// sockets only.
    pub fn enable_hop_by_hop_receive(&self) -> io::Result<()> {
        if self.family != Family::V6 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "IPV6_RECVHOPOPTS on an IPv4 socket",
            ));
        }
        hopopts::enable_receive(&self.sock)
    }

    fn send_marked<'a>(
        &self,
        packets: impl Iterator<Item = (&'a [u8], SocketAddr, Option<u8>, &'a [u8])>,
    ) -> io::Result<SendReport> {
        let mut report = SendReport::default();
        let deadline = Instant::now() + SEND_WAIT_BUDGET;
        let mut waits = 0;
        let mut packets = packets.peekable();
        while packets.peek().is_some() {
            self.send_chunk(
                packets.by_ref().take(MAX_BATCH),
                &mut report,
                deadline,
                &mut waits,
            )?;
        }
        Ok(report)
    }
}

impl AsRawFd for OuterSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for OuterSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests;
