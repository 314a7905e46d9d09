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
mod tests {
    use super::super::poll_readable;
    use super::super::testns::{NetNs, have_root};
    use super::*;
    use crate::packet::PacketBuf;
    use std::io::Read;

    fn loopback(v6: bool) -> std::net::IpAddr {
        if v6 {
            Ipv6Addr::LOCALHOST.into()
        } else {
            Ipv4Addr::LOCALHOST.into()
        }
    }

    /// Receives until `want` datagrams matching `keep` have arrived (or
    /// panics after 2 s of silence), as (bytes, source) pairs.
    fn receive(
        sock: &OuterSocket,
        capacity: usize,
        want: usize,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Vec<(Vec<u8>, Option<SocketAddr>)> {
        let mut bufs: Vec<PacketBuf> = (0..16).map(|_| PacketBuf::new(capacity)).collect();
        let mut got = Vec::new();
        while got.len() < want {
            let r = poll_readable(&[sock.as_fd()], Duration::from_secs(2)).expect("poll");
            assert!(
                r.is_ready(0),
                "only {} of {want} datagrams arrived",
                got.len()
            );
            let n = sock.recv_batch(&mut bufs).expect("recv_batch");
            for buf in &bufs[..n] {
                if keep(buf.data()) {
                    got.push((buf.data().to_vec(), buf.meta.peer));
                }
            }
        }
        got
    }

    /// Ten packets of different sizes, each starting with a marker and
    /// its index.
    fn packets(marker: u8) -> Vec<Vec<u8>> {
        (0..10u8)
            .map(|i| {
                let mut p = vec![i; 40 + usize::from(i) * 131];
                p[0] = marker;
                p
            })
            .collect()
    }

    fn udp_pair(v6: bool) {
        let (a, b) = (
            OuterSocket::open(Encap::Udp { port: 4500 }, v6, None).expect("open a"),
            OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("open b"),
        );
        assert_eq!(a.family(), if v6 { Family::V6 } else { Family::V4 });
        let wildcard = a.local_addr().expect("local_addr");
        assert!(wildcard.ip().is_unspecified() && wildcard.port() == 4500);
        let dst = SocketAddr::new(loopback(v6), 4501);
        let pkts = packets(0xE5);
        let batch: Vec<(&[u8], SocketAddr)> = pkts.iter().map(|p| (p.as_slice(), dst)).collect();
        let report = a.send_batch(&batch).expect("send_batch");
        assert_eq!((report.sent, report.failed), (10, 0), "{report:?}");

        let got = receive(&b, 2048, 10, |_| true);
        let src = SocketAddr::new(loopback(v6), 4500);
        for (i, (data, from)) in got.iter().enumerate() {
            assert_eq!(data, &pkts[i], "packet {i}");
            assert_eq!(*from, Some(src), "packet {i}");
        }
    }

    /// Trains of equal-size packets sent with GSO arrive as the same
    /// datagrams at a plain socket, and as trains with their segment size
    /// at a GRO socket (whose split gives the same datagrams).
    fn gso_trains(v6: bool) {
        let mut a = OuterSocket::open(Encap::Udp { port: 4500 }, v6, None).expect("open a");
        let on = a.enable_offloads(SocketOffloads {
            gso: true,
            gro: false,
        });
        assert!(on.gso, "GSO refused on this kernel");
        let plain = OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("open b");
        let mut gro = OuterSocket::open(Encap::Udp { port: 4502 }, v6, None).expect("open c");
        assert!(
            gro.enable_offloads(SocketOffloads {
                gso: false,
                gro: true
            })
            .gro
        );
        // 5 x 1400 and a short 700, then 3 x 1400 and 2 x 900: two trains
        // and two more.
        let sizes = [
            1400, 1400, 1400, 1400, 1400, 700, 1400, 1400, 1400, 900, 900,
        ];
        let pkts: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8 + 1; n])
            .collect();
        for port in [4501, 4502] {
            let dst = SocketAddr::new(loopback(v6), port);
            let batch: Vec<(&[u8], SocketAddr)> =
                pkts.iter().map(|p| (p.as_slice(), dst)).collect();
            let report = a.send_batch(&batch).expect("send_batch");
            assert_eq!((report.sent, report.failed), (sizes.len(), 0), "{report:?}");
        }
        let got = receive(&plain, 2048, sizes.len(), |_| true);
        for (i, (data, _)) in got.iter().enumerate() {
            assert_eq!(data, &pkts[i], "plain receiver, packet {i}");
        }
        // The GRO socket may merge what arrived together: split by size.
        let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(65535)).collect();
        let mut split = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while split.len() < sizes.len() && Instant::now() < deadline {
            let _ = poll_readable(&[gro.as_fd()], Duration::from_millis(200));
            let n = gro.recv_batch(&mut bufs).expect("recv");
            for b in &bufs[..n] {
                let seg = usize::from(b.meta.segment_size);
                if seg == 0 {
                    split.push(b.data().to_vec());
                } else {
                    split.extend(b.data().chunks(seg).map(<[u8]>::to_vec));
                }
            }
        }
        assert_eq!(split, pkts, "GRO receiver, split by segment size");
        assert_eq!(a.gso_refused(), 0);
    }

    /// Receives `want` datagrams (a GRO train split by its segment size),
    /// as (bytes, TOS byte) pairs.
    fn receive_tos(sock: &OuterSocket, want: usize) -> Vec<(Vec<u8>, u8)> {
        let mut bufs: Vec<PacketBuf> = (0..16).map(|_| PacketBuf::new(65535)).collect();
        let mut got = Vec::new();
        while got.len() < want {
            let r = poll_readable(&[sock.as_fd()], Duration::from_secs(2)).expect("poll");
            assert!(r.is_ready(0), "only {} of {want} arrived", got.len());
            let n = sock.recv_batch(&mut bufs).expect("recv_batch");
            for b in &bufs[..n] {
                let seg = usize::from(b.meta.segment_size);
                if seg == 0 {
                    got.push((b.data().to_vec(), b.meta.tos));
                } else {
                    got.extend(b.data().chunks(seg).map(|c| (c.to_vec(), b.meta.tos)));
                }
            }
        }
        got
    }

    /// Each packet leaves with its own TOS byte / traffic class (IP_TOS,
    /// IPV6_TCLASS control messages, also on raw ESP sockets and within GSO
    /// trains) and the receiver reports it (IP_RECVTOS, IPV6_RECVTCLASS),
    /// also for each segment of a GRO train.
    fn tos_round_trip(kind: Encap, v6: bool, offloads: SocketOffloads) {
        let (mut a, mut b) = match kind {
            Encap::Udp { .. } => (
                OuterSocket::open(Encap::Udp { port: 4500 }, v6, None).expect("a"),
                OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("b"),
            ),
            Encap::RawEsp => (
                OuterSocket::open(kind, v6, None).expect("a"),
                OuterSocket::open(kind, v6, None).expect("b"),
            ),
        };
        let on = a.enable_offloads(SocketOffloads {
            gso: offloads.gso,
            gro: false,
        });
        assert_eq!(on.gso, offloads.gso && kind != Encap::RawEsp);
        let on = b.enable_offloads(SocketOffloads {
            gso: false,
            gro: offloads.gro,
        });
        assert_eq!(on.gro, offloads.gro && kind != Encap::RawEsp);
        // EF + ECT(0) x3, EF + CE x3 (same size: GSO must split them by
        // TOS), Not-ECT, ECT(1) with DSCP AF11, DSCP CS1 Not-ECT.
        let toses = [0xBA, 0xBA, 0xBA, 0xBB, 0xBB, 0xBB, 0x00, 0x29, 0x20];
        let pkts: Vec<Vec<u8>> = (0..toses.len())
            .map(|i| vec![0xE0 + i as u8; 1200])
            .collect();
        let dst = SocketAddr::new(loopback(v6), 4501);
        let batch: Vec<(&[u8], SocketAddr, u8)> = pkts
            .iter()
            .zip(toses)
            .map(|(p, t)| (p.as_slice(), dst, t))
            .collect();
        let report = a.send_iter_with_tos(batch).expect("send");
        assert_eq!((report.sent, report.failed), (toses.len(), 0), "{report:?}");
        let got = receive_tos(&b, toses.len());
        let want: Vec<(Vec<u8>, u8)> = pkts.into_iter().zip(toses).collect();
        assert_eq!(got, want, "{kind:?} v6={v6} {offloads:?}");
        // Without a TOS the socket's own, 0.
        let report = a.send_batch(&[(b"plain", dst)]).expect("send");
        assert_eq!(report.sent, 1);
        assert_eq!(receive_tos(&b, 1), [(b"plain".to_vec(), 0)]);
    }

    #[test]
    fn tos_and_traffic_class_cross_every_outer_socket() {
        if !have_root() {
            return;
        }
        NetNs::new().run(|| {
            for v6 in [false, true] {
                let udp = Encap::Udp { port: 4500 };
                for (gso, gro) in [(false, false), (true, false), (true, true)] {
                    tos_round_trip(udp, v6, SocketOffloads { gso, gro });
                }
                tos_round_trip(Encap::RawEsp, v6, SocketOffloads::default());
            }
        });
    }

    #[test]
    fn gso_trains_on_loopback_v4_and_v6() {
        if have_root() {
            NetNs::new().run(|| {
                gso_trains(false);
                gso_trains(true);
            });
        }
    }

    #[test]
    fn udp_pair_on_loopback_v4() {
        if have_root() {
            NetNs::new().run(|| udp_pair(false));
        }
    }

    #[test]
    fn udp_pair_on_loopback_v6() {
        if have_root() {
            NetNs::new().run(|| udp_pair(true));
        }
    }

    fn raw_pair(v6: bool) {
        let a = OuterSocket::open(Encap::RawEsp, v6, None).expect("open a");
        let b = OuterSocket::open(Encap::RawEsp, v6, None).expect("open b");
        assert_eq!(a.kind(), Encap::RawEsp);
        // The port is ignored (an IPv6 raw socket would refuse 4500).
        let dst = SocketAddr::new(loopback(v6), 4500);
        let pkts = packets(0xE5);
        let batch: Vec<(&[u8], SocketAddr)> = pkts.iter().map(|p| (p.as_slice(), dst)).collect();
        let report = a.send_batch(&batch).expect("send_batch");
        assert_eq!((report.sent, report.failed), (10, 0), "{report:?}");

        // Both sockets get a copy of every ESP packet; check b's, and
        // that the IPv4 header is gone (the marker comes first).
        let got = receive(&b, 2048, 10, |_| true);
        let src = SocketAddr::new(loopback(v6), 0);
        for (i, (data, from)) in got.iter().enumerate() {
            assert_eq!(data, &pkts[i], "packet {i}");
            assert_eq!(*from, Some(src), "packet {i}");
        }
        let also = receive(&a, 2048, 10, |_| true);
        assert_eq!(also.len(), 10, "the sender's own copies");
    }

    #[test]
    fn raw_esp_pair_on_loopback_v4_strips_the_header() {
        if have_root() {
            NetNs::new().run(|| raw_pair(false));
        }
    }

    #[test]
    fn raw_esp_pair_on_loopback_v6() {
        if have_root() {
            NetNs::new().run(|| raw_pair(true));
        }
    }

    fn oversize(kind: Encap, v6: bool) {
        let a = OuterSocket::open(kind, v6, None).expect("open a");
        let b = match kind {
            Encap::Udp { .. } => {
                OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("open b")
            }
            Encap::RawEsp => OuterSocket::open(kind, v6, None).expect("open b"),
        };
        let dst = SocketAddr::new(loopback(v6), 4501);
        let big = vec![0xB1u8; 500];
        let small = vec![0x5Au8; 50];
        let report = a
            .send_batch(&[(&big, dst), (&small, dst)])
            .expect("send_batch");
        assert_eq!(report.sent, 2, "{report:?}");
        let got = receive(&b, 100, 2, |_| true);
        assert_eq!(got[0].0.len(), 0, "oversize datagram is an empty buffer");
        assert_eq!(got[1].0, small);
    }

    #[test]
    fn oversize_datagrams_are_empty_not_a_panic() {
        if !have_root() {
            return;
        }
        let ns = NetNs::new();
        ns.run(|| {
            oversize(Encap::Udp { port: 4500 }, false);
            oversize(Encap::Udp { port: 4502 }, true);
            oversize(Encap::RawEsp, false);
            oversize(Encap::RawEsp, true);
        });
    }

    #[test]
    fn port_in_use_says_what_to_do() {
        if !have_root() {
            return;
        }
        NetNs::new().run(|| {
            let _v4 = OuterSocket::open(Encap::Udp { port: 4500 }, false, None).expect("v4");
            // IPV6_V6ONLY: the IPv6 socket shares the port number.
            let _v6 = OuterSocket::open(Encap::Udp { port: 4500 }, true, None).expect("v6");
            let e = OuterSocket::open(Encap::Udp { port: 4500 }, false, None)
                .expect_err("second v4 bind");
            assert!(matches!(e, IoSetupError::PortInUse { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(
                msg.contains("UDP port 4500 on 0.0.0.0 is already in use")
                    && msg.contains("strongSwan")
                    && msg.contains("`port`"),
                "{msg}"
            );
            let e = OuterSocket::open(Encap::Udp { port: 4500 }, true, None)
                .expect_err("second v6 bind");
            assert!(e.to_string().contains("on :: is already in use"), "{e}");
        });
    }

    #[test]
    fn one_bad_destination_does_not_stop_the_batch() {
        if !have_root() {
            return;
        }
        NetNs::new().run(|| {
            let a = OuterSocket::open(Encap::Udp { port: 4500 }, false, None).expect("a");
            let b = OuterSocket::open(Encap::Udp { port: 4501 }, false, None).expect("b");
            let good: SocketAddr = "127.0.0.1:4501".parse().expect("addr");
            // No route to anything but loopback in the namespace.
            let unroutable: SocketAddr = "198.18.0.1:4500".parse().expect("addr");
            let wrong_family: SocketAddr = "[2001:db8::1]:4500".parse().expect("addr");
            let batch: [(&[u8], SocketAddr); 4] = [
                (b"one", good),
                (b"lost", unroutable),
                (b"mixed", wrong_family),
                (b"two", good),
            ];
            let report = a.send_batch(&batch).expect("send_batch");
            assert_eq!((report.sent, report.failed), (2, 2), "{report:?}");
            // The family mismatch is refused while packing, before the
            // kernel sees the rest, so the kernel's ENETUNREACH comes last.
            let code = report.last_error.as_ref().and_then(io::Error::raw_os_error);
            assert_eq!(code, Some(libc::ENETUNREACH), "{report:?}");

            let got = receive(&b, 2048, 2, |_| true);
            assert_eq!(got[0].0, b"one");
            assert_eq!(got[1].0, b"two");
        });
    }

    #[test]
    fn udp_over_ipv4_is_sent_with_checksum_zero() {
        if !have_root() {
            return;
        }
        NetNs::new().run(|| {
            // A raw UDP socket sees a copy of every UDP datagram,
            // IPv4 header included (raw(7)).
            let spy = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).expect("spy");
            spy.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let a = OuterSocket::open(Encap::Udp { port: 4500 }, false, None).expect("a");
            let dst: SocketAddr = "127.0.0.1:4501".parse().expect("addr");
            let report = a.send_batch(&[(b"esp", dst)]).expect("send");
            assert_eq!(report.sent, 1);
            let mut bytes = [0u8; 128];
            let n = (&spy).read(&mut bytes).expect("spy recv");
            assert!(n >= 28, "{n} bytes");
            let udp = &bytes[20..];
            assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 4500);
            assert_eq!(&udp[6..8], &[0, 0], "UDP checksum");
        });
    }

    #[test]
    fn fwmark_is_set() {
        if !have_root() {
            return;
        }
        NetNs::new().run(|| {
            let s = OuterSocket::open(Encap::RawEsp, false, Some(0x4500)).expect("open");
            assert_eq!(s.sock.mark().expect("SO_MARK"), 0x4500);
            assert_eq!(
                s.local_addr().expect("addr").port(),
                50,
                "raw: port is the protocol"
            );
        });
    }
}
