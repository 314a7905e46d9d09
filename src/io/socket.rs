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

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{IoSetupError, last_errno, poll_raw};
use crate::packet::PacketBuf;
use crate::wire::ip::protocol;
use crate::wire::outer::Encap;

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

/// Minimum IPv4 header (RFC 791); what a raw IPv4 socket prepends.
const IPV4_MIN_HEADER: usize = 20;

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

/// A socket address laid out for the kernel, without `unsafe` to write:
/// the kernel tells the two apart by the family field, which both start
/// with.
#[derive(Clone, Copy)]
#[repr(C)]
union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

const EMPTY_ADDR: RawAddr = RawAddr {
    v6: libc::sockaddr_in6 {
        sin6_family: 0,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
        sin6_scope_id: 0,
    },
};

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

impl RawAddr {
    /// `addr` (with `port`) for the kernel, and its length.
    fn new(addr: SocketAddr, port: u16) -> (RawAddr, libc::socklen_t) {
        match addr {
            SocketAddr::V4(a) => (
                RawAddr {
                    v4: libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: port.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(*a.ip()).to_be(),
                        },
                        sin_zero: [0; 8],
                    },
                },
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            SocketAddr::V6(a) => (
                RawAddr {
                    v6: libc::sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: port.to_be(),
                        sin6_flowinfo: a.flowinfo().to_be(),
                        sin6_addr: libc::in6_addr {
                            s6_addr: a.ip().octets(),
                        },
                        sin6_scope_id: a.scope_id(),
                    },
                },
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ),
        }
    }

    /// The address the kernel wrote, if it is one we know.
    fn get(&self, len: libc::socklen_t) -> Option<SocketAddr> {
        let len = len as usize;
        // SAFETY: every bit pattern is a valid sockaddr_in/sockaddr_in6
        // (integers and byte arrays), so reading either member is sound;
        // the family field sits at the same offset in both.
        let family = unsafe { self.v4.sin_family };
        match i32::from(family) {
            libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: as above; the family says this is the member
                // the kernel wrote.
                let a = unsafe { self.v4 };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above.
                let a = unsafe { self.v6 };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    u32::from_be(a.sin6_flowinfo),
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// `MAX_BATCH` zeroed message headers.
fn empty_msgs() -> [libc::mmsghdr; MAX_BATCH] {
    // SAFETY: mmsghdr is plain old data (integers and raw pointers, plus
    // padding fields on some libcs); all-zero is valid: null pointers
    // with zero lengths, no control data, no flags.
    unsafe { std::mem::zeroed() }
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
        Ok(OuterSocket { sock, family, kind })
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

    /// Receives queued datagrams without waiting, one per buffer, into
    /// the first `min(bufs.len(), from.len(), MAX_BATCH)` buffers' read
    /// areas, with one recvmmsg(2); returns how many (0 when the queue is
    /// empty), and `from[i]` is datagram `i`'s source (port 0 for raw
    /// sockets).
    ///
    /// A datagram that cannot be used as received leaves its buffer at
    /// length 0 (counted in the return value, for the caller to count as a
    /// drop): one longer than the buffer (MSG_TRUNC), or, on a raw IPv4
    /// socket, one whose IPv4 header does not check out. On a raw IPv4
    /// socket a datagram fits when its ESP part does and its IPv4 header
    /// has no options (almost always); with options, it must fit within
    /// the buffer plus 20 bytes.
    pub fn recv_batch(
        &self,
        bufs: &mut [PacketBuf],
        from: &mut [Option<SocketAddr>],
    ) -> io::Result<usize> {
        let count = bufs.len().min(from.len()).min(MAX_BATCH);
        if count == 0 {
            return Ok(0);
        }
        // Raw IPv4: the first 20 bytes (the header without options) go to
        // a scratch array, the rest straight into the buffer, so that the
        // usual header needs no copying to strip.
        let strip_v4 = self.family == Family::V4 && self.kind == Encap::RawEsp;
        let mut headers = [[0u8; IPV4_MIN_HEADER]; MAX_BATCH];
        let mut iovs = [[EMPTY_IOVEC; 2]; MAX_BATCH];
        let mut names = [EMPTY_ADDR; MAX_BATCH];
        let mut msgs = empty_msgs();
        for i in 0..count {
            let area = bufs[i].read_area();
            let area_iov = libc::iovec {
                iov_base: area.as_mut_ptr().cast(),
                iov_len: area.len(),
            };
            let n_iov = if strip_v4 {
                iovs[i] = [
                    libc::iovec {
                        iov_base: headers[i].as_mut_ptr().cast(),
                        iov_len: IPV4_MIN_HEADER,
                    },
                    area_iov,
                ];
                2
            } else {
                iovs[i][0] = area_iov;
                1
            };
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut RawAddr).cast();
            h.msg_namelen = size_of::<RawAddr>() as libc::socklen_t;
            h.msg_iov = iovs[i].as_mut_ptr();
            h.msg_iovlen = n_iov;
        }

        let mut soft_errors = 0;
        let received = loop {
            // SAFETY: `msgs[..count]` are initialised headers whose name
            // and iovec pointers point at live, exclusively borrowed
            // memory of the stated lengths (`names`, `iovs`, `headers` on
            // this stack frame, each buffer's read area), which outlives
            // the call; recvmmsg(2) writes only within them and fills in
            // msg_len, msg_namelen and msg_flags. No timeout pointer.
            let rc = unsafe {
                libc::recvmmsg(
                    self.sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    count as libc::c_uint,
                    libc::MSG_DONTWAIT as _,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let (e, code) = last_errno();
            match code {
                libc::EINTR => continue,
                libc::EAGAIN => return Ok(0),
                // A queued ICMP error (reported on an unconnected socket
                // only with IP_RECVERR) is returned once, in place of a
                // datagram; what is queued behind it is still there.
                libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EMSGSIZE
                    if soft_errors < 4 =>
                {
                    soft_errors += 1;
                    continue;
                }
                _ => return Err(e),
            }
        };

        for i in 0..received {
            let m = &msgs[i];
            from[i] = names[i].get(m.msg_hdr.msg_namelen);
            let len = m.msg_len as usize;
            // recvmmsg(2)/recvmsg(2): MSG_TRUNC in msg_flags means the
            // datagram was longer than the buffers and the rest is lost.
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                bufs[i].set_len(0);
            } else if strip_v4 {
                let payload = strip_ipv4_header(&headers[i], bufs[i].read_area(), len);
                bufs[i].set_len(payload.unwrap_or(0));
            } else {
                bufs[i].set_len(len);
            }
        }
        Ok(received)
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
        let mut report = SendReport::default();
        let deadline = Instant::now() + SEND_WAIT_BUDGET;
        let mut waits = 0;
        let mut packets = packets.into_iter().peekable();
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

    fn send_chunk<'a>(
        &self,
        packets: impl Iterator<Item = (&'a [u8], SocketAddr)>,
        report: &mut SendReport,
        deadline: Instant,
        waits: &mut u32,
    ) -> io::Result<()> {
        let mut iovs = [EMPTY_IOVEC; MAX_BATCH];
        let mut names = [EMPTY_ADDR; MAX_BATCH];
        let mut msgs = empty_msgs();
        // Packets to the other family never reach the kernel (the IPv6
        // socket is IPV6_V6ONLY); the rest are packed into `msgs[..m]`.
        let mut m = 0;
        for (packet, dst) in packets {
            if dst.is_ipv4() != (self.family == Family::V4) {
                report.fail(
                    1,
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("destination {dst} is not of the socket's family"),
                    ),
                );
                continue;
            }
            let port = match self.kind {
                Encap::Udp { .. } => dst.port(),
                Encap::RawEsp => 0,
            };
            let (addr, addr_len) = RawAddr::new(dst, port);
            names[m] = addr;
            iovs[m] = libc::iovec {
                // sendmmsg only reads through this pointer.
                iov_base: packet.as_ptr().cast_mut().cast(),
                iov_len: packet.len(),
            };
            let h = &mut msgs[m].msg_hdr;
            h.msg_name = (&mut names[m] as *mut RawAddr).cast();
            h.msg_namelen = addr_len;
            h.msg_iov = &mut iovs[m];
            h.msg_iovlen = 1;
            m += 1;
        }

        let mut next = 0;
        while next < m {
            // SAFETY: `msgs[next..m]` are initialised headers whose name
            // and iovec pointers point at live memory of the stated
            // lengths (`names` and `iovs` on this stack frame, the
            // caller's packet slices), which outlives the call;
            // sendmmsg(2) reads them and writes only each msg_len.
            let rc = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    msgs[next..].as_mut_ptr(),
                    (m - next) as libc::c_uint,
                    libc::MSG_DONTWAIT as _,
                )
            };
            if rc > 0 {
                // sendmmsg(2): an error after the first message ends the
                // call with the count so far; the next call, starting at
                // the failed message, meets it again.
                report.sent += rc as usize;
                next += rc as usize;
                continue;
            }
            let (e, code) = if rc == 0 {
                (io::Error::from(io::ErrorKind::WriteZero), 0)
            } else {
                last_errno()
            };
            match code {
                libc::EINTR => continue,
                libc::EAGAIN | libc::ENOBUFS | 0 => {
                    let now = Instant::now();
                    if *waits >= SEND_MAX_WAITS || now >= deadline {
                        report.fail(m - next, e);
                        return Ok(());
                    }
                    *waits += 1;
                    self.wait_writable(code, deadline - now);
                }
                // The socket itself is unusable: every packet would fail.
                libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::EOPNOTSUPP => return Err(e),
                // Anything else concerns this packet (EHOSTUNREACH,
                // ENETUNREACH, ECONNREFUSED, EMSGSIZE, EPERM from a
                // firewall, EINVAL for a bad address...): skip it.
                _ => {
                    report.fail(1, e);
                    next += 1;
                }
            }
        }
        Ok(())
    }

    /// Waits up to `budget / remaining waits` for the kernel to take more.
    /// EAGAIN: the socket's send buffer is full, and poll(2) says when it
    /// has room. ENOBUFS: a device queue is full, which poll cannot see,
    /// so just pause.
    fn wait_writable(&self, code: i32, left: Duration) {
        let slice = left / SEND_MAX_WAITS;
        if code == libc::EAGAIN {
            let mut p = [libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            }];
            // An error here only shortens the wait; the send reports.
            let _ = poll_raw(&mut p, slice);
        } else {
            std::thread::sleep(slice);
        }
    }
}

/// Strips the IPv4 header a raw IPv4 socket delivers (raw(7)): the first
/// 20 bytes of the `len`-byte datagram are in `header`, the rest at the
/// start of `area`. Moves the payload to the start of `area` if there are
/// header options, and returns its length; None for a malformed header
/// (not version 4, IHL below 5, or longer than the datagram).
fn strip_ipv4_header(header: &[u8; IPV4_MIN_HEADER], area: &mut [u8], len: usize) -> Option<usize> {
    if len < IPV4_MIN_HEADER || header[0] >> 4 != 4 {
        return None;
    }
    // RFC 791: IHL is the header length in 32-bit words, at least 5.
    let ihl = usize::from(header[0] & 0x0f) * 4;
    let in_area = len - IPV4_MIN_HEADER;
    if ihl < IPV4_MIN_HEADER || ihl > len || in_area > area.len() {
        return None;
    }
    let options = ihl - IPV4_MIN_HEADER;
    if options > 0 {
        area.copy_within(options..in_area, 0);
    }
    Some(in_area - options)
}

/// Asks for [`SOCKET_BUFFER`]-byte socket buffers: first with the FORCE
/// options, which may exceed net.core.{r,w}mem_max but need CAP_NET_ADMIN
/// (socket(7)), then the ordinary ones, which the kernel caps at those
/// limits. Best effort: the defaults work, just with less slack.
fn set_buffer_sizes(sock: &Socket) {
    let size = SOCKET_BUFFER as libc::c_int;
    if set_int_option(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if set_int_option(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size).is_err() {
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    }
}

/// setsockopt(2) with an int value, for options socket2 does not wrap.
fn set_int_option(
    sock: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and the length passed is
    // its size; setsockopt(2) only reads it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        let mut from = vec![None; 16];
        let mut got = Vec::new();
        while got.len() < want {
            let r = poll_readable(&[sock.as_fd()], Duration::from_secs(2)).expect("poll");
            assert!(
                r.is_ready(0),
                "only {} of {want} datagrams arrived",
                got.len()
            );
            let n = sock.recv_batch(&mut bufs, &mut from).expect("recv_batch");
            for i in 0..n {
                if keep(bufs[i].data()) {
                    got.push((bufs[i].data().to_vec(), from[i]));
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

    #[test]
    fn ipv4_header_strip() {
        let mut header = [0u8; IPV4_MIN_HEADER];
        header[0] = 0x45;
        let mut area = [1u8, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(strip_ipv4_header(&header, &mut area, 28), Some(8));
        assert_eq!(area, [1, 2, 3, 4, 5, 6, 7, 8]);

        // IHL 6: four bytes of options precede the payload in the area.
        header[0] = 0x46;
        assert_eq!(strip_ipv4_header(&header, &mut area, 28), Some(4));
        assert_eq!(&area[..4], &[5, 6, 7, 8]);

        let mut area = [0u8; 8];
        for (first, len) in [(0x45, 19), (0x65, 28), (0x44, 28), (0x4f, 28), (0x45, 29)] {
            header[0] = first;
            assert_eq!(
                strip_ipv4_header(&header, &mut area, len),
                None,
                "{first:#x}/{len}"
            );
        }
    }
}
