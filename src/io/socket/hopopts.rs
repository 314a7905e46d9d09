//! The `IPV6_HOPOPTS` control message (RFC 3542 section 6.3, ipv6(7)):
//! the socket half of carrying an inner hop-by-hop header on the outer
//! packet (see `wire::hop_by_hop`). The send path writes its message
//! among the others (`mmsg::Control::put`); the receive path reads it
//! with [`read`]. On send, one message per datagram puts the header on the
//! outer packet (Linux: `ip6_datagram_send_ctl` requires CAP_NET_RAW for
//! it); on receive, with `IPV6_RECVHOPOPTS` set, the kernel reports the
//! outer packet's header the same way. The data is the whole extension
//! header, its next-header byte included (the kernel rewrites it on send).

use std::io;
use std::mem::size_of;

use socket2::Socket;

use super::options::set_int_option;
use crate::wire::hop_by_hop::MAX_LEN;

/// CMSG_SPACE(MAX_LEN): the control data one message of the largest
/// header carried takes.
// SAFETY: CMSG_SPACE only computes a length.
pub(crate) const SPACE: usize = unsafe { libc::CMSG_SPACE(MAX_LEN as u32) } as usize;

/// Asks the kernel to report each received datagram's hop-by-hop header.
pub(crate) fn enable_receive(sock: &Socket) -> io::Result<()> {
    set_int_option(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPOPTS, 1)
}

/// The hop-by-hop header among the control messages of a received
/// datagram, copied into `out`; its length, or None if there is none, or
/// it is longer than [`MAX_LEN`] or inconsistent (its own length byte
/// disagreeing with the message's).
pub(crate) fn read(h: &libc::msghdr, out: &mut [u8; MAX_LEN]) -> Option<usize> {
    if h.msg_control.is_null() || h.msg_controllen < size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: `h` describes `msg_controllen` bytes of well-formed cmsghdrs
    // (the kernel's, or `mmsg::Control::put`'s); CMSG_FIRSTHDR and CMSG_NXTHDR stay within
    // that length and return null at its end, and each read is checked
    // against the message's own length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if ((*c).cmsg_level, (*c).cmsg_type) == (libc::IPPROTO_IPV6, libc::IPV6_HOPOPTS) {
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                if !(2..=MAX_LEN).contains(&len) {
                    return None;
                }
                std::ptr::copy_nonoverlapping(libc::CMSG_DATA(c), out.as_mut_ptr(), len);
                // RFC 8200 section 4.3: the length in 8-octet units beyond
                // the first 8.
                return ((usize::from(out[1]) + 1) * 8 == len).then_some(len);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}
