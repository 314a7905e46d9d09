//! Batched receive and send with recvmmsg(2)/sendmmsg(2), which socket2
//! does not wrap, and the IPv4 header a raw IPv4 socket prepends.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};

use super::addr::{EMPTY_ADDR, RawAddr};
use super::{Encap, Family, MAX_BATCH, OuterSocket, SEND_MAX_WAITS, SendReport};
use crate::io::{last_errno, poll_fds};
use crate::packet::PacketBuf;
use crate::wire::ip::{self, IPV4_HEADER_LEN, Ipv4Packet};

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
        }
        Ok(received)
    }

    pub(super) fn send_chunk<'a>(
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
            let mut p = [PollFd::new(self.sock.as_fd(), PollFlags::POLLOUT)];
            // An error here only shortens the wait; the send reports.
            let _ = poll_fds(&mut p, slice);
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
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_strip() {
        let mut header = [0u8; IPV4_HEADER_LEN];
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
