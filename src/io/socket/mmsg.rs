//! Batched receive and send with recvmmsg(2)/sendmmsg(2), which socket2
//! does not wrap, and the IPv4 header a raw IPv4 socket prepends.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};

use super::addr::{EMPTY_ADDR, RawAddr};
use super::hopopts;
use super::{Encap, Family, MAX_BATCH, OuterSocket, SEND_MAX_WAITS, SendReport};
use crate::io::{last_errno, poll_fds};
use crate::packet::PacketBuf;
use crate::wire::hop_by_hop::{self, Slots};
use crate::wire::ip::{self, IPV4_HEADER_LEN, Ipv4Packet};

mod cmsg;
use cmsg::{Control, read_control};

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// `MAX_BATCH` zeroed message headers.
fn empty_msgs() -> [libc::mmsghdr; MAX_BATCH] {
    // SAFETY: mmsghdr is plain old data (integers and raw pointers, plus
    // padding fields on some libcs); all-zero is valid: null pointers
    // with zero lengths, no control data, no flags.
    unsafe { std::mem::zeroed() }
}

impl OuterSocket {
    /// Receives queued datagrams without waiting, one per buffer, into
    /// the first `min(bufs.len(), MAX_BATCH)` buffers' read areas, with
    /// one recvmmsg(2); returns how many (0 when the queue is empty). Each
    /// buffer's `meta.peer` is its datagram's source (port 0 for raw
    /// sockets).
    ///
    /// A datagram that cannot be used as received leaves its buffer at
    /// length 0 (counted in the return value, for the caller to count as a
    /// drop): one longer than the buffer (MSG_TRUNC), or, on a raw IPv4
    /// socket, one whose IPv4 header does not check out. On a raw IPv4
    /// socket a datagram fits when its ESP part does and its IPv4 header
    /// has no options (almost always); with options, it must fit within
    /// the buffer plus 20 bytes.
    pub fn recv_batch(&self, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        self.recv_batch_carrying(bufs, None)
    }

    /// [`Self::recv_batch`], and with `hop_by_hop` (on a socket with
    /// `IPV6_RECVHOPOPTS`, [`Self::enable_hop_by_hop_receive`]) each
    /// datagram's hop-by-hop header as the kernel reported it, in the slot
    /// of its buffer's index: empty for none, marked too long for one of
    /// more than [`hop_by_hop::MAX_LEN`] bytes or cut short (MSG_CTRUNC),
    /// which the inbound pipeline drops as `hop_by_hop`. A GRO train has
    /// one header for all its segments: the kernel merges only packets
    /// whose extension headers are the same (`ipv6_gro_receive`: "flush if
    /// ... the extension headers differ", it compares the bytes from the
    /// IPv6 header to the transport header).
    pub fn recv_batch_carrying(
        &self,
        bufs: &mut [PacketBuf],
        mut hop_by_hop: Option<&mut Slots>,
    ) -> io::Result<usize> {
        let count = bufs.len().min(MAX_BATCH);
        if count == 0 {
            return Ok(0);
        }
        // Raw IPv4: the first 20 bytes (the header without options) go to
        // a scratch array, the rest straight into the buffer, so that the
        // usual header needs no copying to strip.
        let strip_v4 = self.family == Family::V4 && self.kind == Encap::RawEsp;
        let mut headers = [[0u8; IPV4_HEADER_LEN]; MAX_BATCH];
        let mut iovs = [[EMPTY_IOVEC; 2]; MAX_BATCH];
        let mut names = [EMPTY_ADDR; MAX_BATCH];
        let mut controls = [Control::EMPTY; MAX_BATCH];
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
                        iov_len: IPV4_HEADER_LEN,
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
            h.msg_control = controls[i].0.as_mut_ptr().cast();
            h.msg_controllen = size_of::<Control>() as _;
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
                libc::EAGAIN => {
                    // Nothing to read: a POLLERR wake-up, if anything.
                    self.drain_error_queue();
                    return Ok(0);
                }
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
                    self.drain_error_queue();
                    continue;
                }
                _ => return Err(e),
            }
        };

        for i in 0..received {
            let m = &msgs[i];
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
            bufs[i].meta.peer = names[i].get(m.msg_hdr.msg_namelen);
            let found = read_control(&m.msg_hdr);
            if self.gro {
                bufs[i].meta.segment_size = found.gro_segment.unwrap_or(0);
            }
            // IP_RECVTOS / IPV6_RECVTCLASS, for the rebuilt header's DSCP
            // and ECN; a raw IPv4 socket also has the header itself. A GRO
            // train has one: the kernel merges only packets whose TOS or
            // traffic class are equal (IPv4 GRO:
            // "all fields must match except length and checksum"; IPv6 GRO:
            // "flush if Traffic Class fields are different").
            bufs[i].meta.tos = match found.tos {
                Some(tos) => tos,
                None if strip_v4 => headers[i][1],
                None => 0,
            };
            if let Some(n) = found.rx_overflows {
                self.rx_overflows.fetch_max(u64::from(n), Ordering::Relaxed);
            }
            if let Some(slots) = hop_by_hop.as_deref_mut() {
                // The control buffer has room for the largest header
                // carried besides the other messages; a truncated one may
                // have lost it, so it counts as one too long.
                let truncated = m.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0;
                let mut header = [0u8; hop_by_hop::MAX_LEN];
                if found.hop_by_hop || truncated {
                    match hopopts::read(&m.msg_hdr, &mut header) {
                        Some(n) if !truncated => {
                            slots.set(i, &header[..n]);
                        }
                        _ => slots.set_too_long(i),
                    }
                } else {
                    slots.clear(i);
                }
            }
        }
        Ok(received)
    }

    pub(super) fn send_chunk<'a>(
        &self,
        packets: impl Iterator<Item = (&'a [u8], SocketAddr, Option<u8>, &'a [u8])>,
        report: &mut SendReport,
        deadline: Instant,
        waits: &mut u32,
    ) -> io::Result<()> {
        // One iovec and one address per packet; a message covers one
        // packet, or with GSO a train of consecutive ones.
        let mut iovs = [EMPTY_IOVEC; MAX_BATCH];
        let mut dsts = [None::<SocketAddr>; MAX_BATCH];
        let mut toses = [None::<u8>; MAX_BATCH];
        let mut hbhs = [&[][..]; MAX_BATCH];
        let mut n = 0;
        // Packets to the other family never reach the kernel (the IPv6
        // socket is IPV6_V6ONLY).
        for (packet, dst, tos, hop_by_hop) in packets {
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
            // IPV6_HOPOPTS is IPv6's (ipv6(7)); an IPv4 outer packet has
            // no place for the header, and sending without it would
            // deliver the packet changed.
            if !hop_by_hop.is_empty()
                && (self.family == Family::V4 || hop_by_hop.len() > hop_by_hop::MAX_LEN)
            {
                report.fail(
                    1,
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a hop-by-hop header goes only on an IPv6 outer packet",
                    ),
                );
                continue;
            }
            iovs[n] = libc::iovec {
                // sendmmsg only reads through this pointer.
                iov_base: packet.as_ptr().cast_mut().cast(),
                iov_len: packet.len(),
            };
            dsts[n] = Some(dst);
            toses[n] = tos;
            hbhs[n] = hop_by_hop;
            n += 1;
        }

        let mut first = 0;
        // Set when a train exceeded the path MTU: the rest of this chunk
        // goes plain, GSO stays on for the next.
        let mut plain = false;
        // Asked for by the path MTU refresh: single packets with DF.
        let lone_heads = self.df_probe.swap(false, Ordering::Relaxed);
        while first < n {
            let gso = self.gso.load(Ordering::Relaxed) && !plain;
            let mut names = [EMPTY_ADDR; MAX_BATCH];
            let mut controls = [Control::EMPTY; MAX_BATCH];
            let mut trains = [(0usize, 0usize); MAX_BATCH];
            let mut msgs = empty_msgs();
            let m = group_trains(
                &iovs[first..n],
                &dsts[first..n],
                &toses[first..n],
                &hbhs[first..n],
                Grouping {
                    gso,
                    hop_by_hop: self.gso_hop_by_hop.load(Ordering::Relaxed),
                    lone_heads,
                },
                &mut trains,
            );
            for (k, &(start, count)) in trains[..m].iter().enumerate() {
                let Some(dst) = dsts[first + start] else {
                    continue;
                };
                let port = match self.kind {
                    Encap::Udp { .. } => dst.port(),
                    Encap::RawEsp => 0,
                };
                let (addr, addr_len) = RawAddr::new(dst, port);
                names[k] = addr;
                let h = &mut msgs[k].msg_hdr;
                h.msg_name = (&mut names[k] as *mut RawAddr).cast();
                h.msg_namelen = addr_len;
                h.msg_iov = &mut iovs[first + start];
                h.msg_iovlen = count as _;
                let segment_size = (count > 1).then(|| iovs[first + start].iov_len as u16);
                let tos = toses[first + start];
                controls[k].put(
                    h,
                    segment_size,
                    tos.map(|t| (self.family, t)),
                    hbhs[first + start],
                );
            }

            let mut next = 0;
            let mut gso_refused = false;
            while next < m {
                // SAFETY: `msgs[next..m]` are initialised headers whose
                // name, iovec and control pointers point at live memory of
                // the stated lengths (`names`, `iovs`, `controls` on this
                // stack frame, the caller's packet slices), which outlives
                // the call; sendmmsg(2) reads them and writes only each
                // msg_len.
                let rc = unsafe {
                    libc::sendmmsg(
                        self.sock.as_raw_fd(),
                        msgs[next..].as_mut_ptr(),
                        (m - next) as libc::c_uint,
                        libc::MSG_DONTWAIT as _,
                    )
                };
                if rc > 0 {
                    // sendmmsg(2): an error after the first message ends
                    // the call with the count so far; the next call,
                    // starting at the failed message, meets it again.
                    let done = rc as usize;
                    report.sent += trains[next..next + done].iter().map(|t| t.1).sum::<usize>();
                    next += done;
                    continue;
                }
                let (e, code) = if rc == 0 {
                    (io::Error::from(io::ErrorKind::WriteZero), 0)
                } else {
                    last_errno()
                };
                let train = trains[next].1;
                match code {
                    libc::EINTR => continue,
                    libc::EAGAIN | libc::ENOBUFS | 0 => {
                        let now = Instant::now();
                        if *waits >= SEND_MAX_WAITS || now >= deadline {
                            let left = trains[next..m].iter().map(|t| t.1).sum();
                            report.fail(left, e);
                            return Ok(());
                        }
                        *waits += 1;
                        self.wait_writable(code, deadline - now);
                    }
                    // A train whose segments exceed the path MTU the
                    // kernel learned (udp_send_skb: a GSO segment is never
                    // fragmented; EMSGSIZE, EINVAL before Linux 6.x when
                    // the segment does not fit): sent again one by one,
                    // which the host may fragment (IP_PMTUDISC_WANT). And
                    // a train with a hop-by-hop header: GSO with an
                    // extension header is this kernel's to refuse (it
                    // accepts it on Linux 6.x; remembered, so that such
                    // packets go one per message from now on). Neither is
                    // a refusal of GSO itself: the rest of the chunk goes
                    // plain, GSO stays on.
                    libc::EMSGSIZE | libc::EIO | libc::EINVAL
                        if train > 1
                            && (code == libc::EMSGSIZE
                                || !hbhs[first + trains[next].0].is_empty()) =>
                    {
                        if code != libc::EMSGSIZE {
                            self.gso_hop_by_hop.store(false, Ordering::Relaxed);
                        }
                        plain = true;
                        gso_refused = true;
                        break;
                    }
                    // A device or kernel that cannot segment (udp(7):
                    // EIO without checksum offload, EINVAL on some point
                    // releases): GSO off for good, the rest resent plain.
                    libc::EIO | libc::EINVAL if train > 1 => {
                        self.gso.store(false, Ordering::Relaxed);
                        self.gso_refused.fetch_add(1, Ordering::Relaxed);
                        gso_refused = true;
                        break;
                    }
                    // The socket itself is unusable: every packet would fail.
                    libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::EOPNOTSUPP => {
                        return Err(e);
                    }
                    // Anything else concerns this message (EHOSTUNREACH,
                    // ENETUNREACH, ECONNREFUSED, EMSGSIZE, EPERM from a
                    // firewall, EINVAL for a bad address...): skip it.
                    _ => {
                        report.fail(train, e);
                        next += 1;
                    }
                }
            }
            first += trains[..next].iter().map(|t| t.1).sum::<usize>();
            if !gso_refused {
                // Every message was sent or failed.
                first = n;
            }
        }
        Ok(())
    }

    /// Empties the error queue of a socket with IPV6_RECVERR (raw ESP
    /// over IPv6, see [`super::pmtu`]): its entries are charged to the
    /// receive buffer and keep poll(2) reporting POLLERR, so they must not
    /// stay. Dequeuing the last one also clears the socket's pending error.
    /// Their content is not needed: the kernel has already updated the
    /// path MTU. At most 64 per call.
    pub(super) fn drain_error_queue(&self) {
        if !self.recverr {
            return;
        }
        for _ in 0..64 {
            let mut data = [0u8; 64];
            let mut control = [0u64; 16];
            let mut iov = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            };
            // SAFETY: msghdr is plain old data; all-zero is an empty one.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of::<[u64; 16]>() as _;
            // SAFETY: the iovec and control buffer are live locals of the
            // stated lengths; recvmsg(2) writes only within them (and
            // truncates what does not fit, which is fine here).
            let rc = unsafe {
                libc::recvmsg(
                    self.sock.as_raw_fd(),
                    &mut msg,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                // EAGAIN: empty. Anything else: nothing more to do here.
                return;
            }
            self.icmp_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits up to `budget / remaining waits` for the kernel to take more.
    /// EAGAIN: the socket's send buffer is full, and poll(2) says when it
    /// has room. ENOBUFS: a device queue is full, which poll cannot see,
    /// so just pause.
    fn wait_writable(&self, code: i32, left: Duration) {
        let slice = left / SEND_MAX_WAITS;
        if code == libc::EAGAIN {
            let mut p = [PollFd::new(self.sock.as_fd(), PollFlags::POLLOUT)];
            // An error here only shortens the wait; the send reports.
            let _ = poll_fds(&mut p, slice);
        } else {
            std::thread::sleep(slice);
        }
    }
}

/// Most segments in one UDP GSO train (UDP_MAX_SEGMENTS in the kernel).
const MAX_TRAIN: usize = 64;
/// Most bytes in one train: a UDP datagram's payload limit, less room
/// for an IPv6 header.
const MAX_TRAIN_BYTES: usize = 65_535 - 40 - 8;

/// What [`group_trains`] may do.
#[derive(Debug, Clone, Copy)]
struct Grouping {
    /// UDP GSO is on: packets may share a message.
    gso: bool,
    /// The kernel takes trains of packets with a hop-by-hop header.
    hop_by_hop: bool,
    /// The first packet of each train goes alone.
    lone_heads: bool,
}

/// Groups consecutive packets into messages, as (first, count) in
/// `trains`; returns how many. Without `gso` every packet is its own
/// message. With it, packets to the same destination with the same TOS
/// byte (`toses`: a train's one IP_TOS/IPV6_TCLASS message sets every
/// segment's), the same hop-by-hop header or none (`hbhs`: likewise one
/// IPV6_HOPOPTS message for the train) and of the same size share a train, which a shorter packet
/// ends (it is the train's last segment, as udp(7) allows); limits:
/// [`MAX_TRAIN`], [`MAX_TRAIN_BYTES`]. Without `hop_by_hop` (the
/// kernel refused such a train once) a packet with a hop-by-hop header is
/// its own message.
///
/// With `lone_heads`, the first packet of each train goes alone: the
/// kernel sets DF only on a datagram that fits the path MTU it knows, and
/// never on a GSO train (`__ip_make_skb` looks at the whole train), so
/// without the occasional single packet no router ever reports a smaller
/// path MTU for IPv4 ([`super::pmtu`]).
fn group_trains(
    iovs: &[libc::iovec],
    dsts: &[Option<SocketAddr>],
    toses: &[Option<u8>],
    hbhs: &[&[u8]],
    grouping: Grouping,
    trains: &mut [(usize, usize)],
) -> usize {
    let Grouping {
        gso,
        hop_by_hop,
        lone_heads,
    } = grouping;
    let mut m = 0;
    let mut i = 0;
    let mut lone = lone_heads;
    while i < iovs.len() && m < trains.len() {
        if lone && gso {
            trains[m] = (i, 1);
            m += 1;
            i += 1;
            lone = false;
            continue;
        }
        lone = lone_heads;
        let size = iovs[i].iov_len;
        let mut count = 1;
        let mut bytes = size;
        // A packet with a hop-by-hop header starts a train only where
        // the kernel takes one (`hop_by_hop`).
        let train = gso && (hop_by_hop || hbhs.get(i).is_none_or(|h| h.is_empty()));
        while train
            && i + count < iovs.len()
            && count < MAX_TRAIN
            && dsts[i + count] == dsts[i]
            && toses.get(i + count) == toses.get(i)
            && hbhs.get(i + count) == hbhs.get(i)
            && iovs[i + count].iov_len <= size
            && iovs[i + count].iov_len > 0
            && bytes + iovs[i + count].iov_len <= MAX_TRAIN_BYTES
        {
            bytes += iovs[i + count].iov_len;
            count += 1;
            if iovs[i + count - 1].iov_len < size {
                break;
            }
        }
        trains[m] = (i, count);
        m += 1;
        i += count;
    }
    m
}

/// Strips the IPv4 header a raw IPv4 socket delivers (raw(7)): the first
/// 20 bytes of the `len`-byte datagram are in `header`, the rest at the
/// start of `area`. Moves the payload to the start of `area` if there are
/// header options, and returns its length; None for a malformed header
/// (not version 4, IHL below 5, or longer than the datagram).
///
/// The header is split across two buffers, so [`Ipv4Packet::new_checked`]
/// (which wants the whole header in one) cannot vet it; the fixed fields
/// read here all lie within the 20 bytes `header` always has.
fn strip_ipv4_header(header: &[u8; IPV4_HEADER_LEN], area: &mut [u8], len: usize) -> Option<usize> {
    if len < IPV4_HEADER_LEN || ip::version(header) != Ok(4) {
        return None;
    }
    // RFC 791: IHL is the header length in 32-bit words, at least 5.
    let ihl = Ipv4Packet::new_unchecked(&header[..]).header_len();
    let in_area = len - IPV4_HEADER_LEN;
    if ihl < IPV4_HEADER_LEN || ihl > len || in_area > area.len() {
        return None;
    }
    let options = ihl - IPV4_HEADER_LEN;
    if options > 0 {
        area.copy_within(options..in_area, 0);
    }
    Some(in_area - options)
}

#[cfg(test)]
#[path = "mmsg_tests.rs"]
mod tests;
