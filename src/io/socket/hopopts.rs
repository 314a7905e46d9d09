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

/// CMSG_SPACE(MAX_LEN): a control buffer holding one message of the
/// largest header carried.
// SAFETY: CMSG_SPACE only computes a length.
pub(crate) const SPACE: usize = unsafe { libc::CMSG_SPACE(MAX_LEN as u32) } as usize;

/// A control buffer for one `IPV6_HOPOPTS` message, aligned as a cmsghdr
/// (fixed size: nothing is allocated per packet).
// A one-message encoder: what `read` is tested against (the send path
// writes its message among the others, `mmsg::Control::put`).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct Control(pub [u8; SPACE]);

#[cfg_attr(not(test), allow(dead_code))]
impl Control {
    pub const EMPTY: Control = Control([0; SPACE]);
}

/// Asks the kernel to report each received datagram's hop-by-hop header.
pub(crate) fn enable_receive(sock: &Socket) -> io::Result<()> {
    set_int_option(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPOPTS, 1)
}

/// Attaches `control` to `h` holding one `IPV6_HOPOPTS` message with
/// `header`; false (and `h` untouched) for an empty header or one longer
/// than [`MAX_LEN`].
// A one-message encoder: what `read` is tested against (the send path
// writes its message among the others, `mmsg::Control::put`).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn put(control: &mut Control, h: &mut libc::msghdr, header: &[u8]) -> bool {
    if header.is_empty() || header.len() > MAX_LEN {
        return false;
    }
    h.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a length.
    h.msg_controllen = unsafe { libc::CMSG_SPACE(header.len() as u32) } as _;
    // SAFETY: `h` points at `control`, cmsghdr-aligned and SPACE bytes
    // long, at least CMSG_SPACE(header.len()); so the first header and
    // its header.len() data bytes lie within it (null checked anyway).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        if c.is_null() {
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            return false;
        }
        (*c).cmsg_level = libc::IPPROTO_IPV6;
        (*c).cmsg_type = libc::IPV6_HOPOPTS;
        (*c).cmsg_len = libc::CMSG_LEN(header.len() as u32) as _;
        std::ptr::copy_nonoverlapping(header.as_ptr(), libc::CMSG_DATA(c), header.len());
    }
    true
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
    // (the kernel's, or `put`'s); CMSG_FIRSTHDR and CMSG_NXTHDR stay within
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msghdr() -> libc::msghdr {
        // SAFETY: msghdr is plain data; all-zero is a valid empty one.
        unsafe { std::mem::zeroed() }
    }

    #[test]
    fn a_header_round_trips_through_the_control_message() {
        for header in [
            &[0u8, 0, 1, 4, 0, 0, 0, 0][..],
            &[
                17, 1, 0x1e, 4, 0xde, 0xad, 0xbe, 0xef, 1, 6, 0, 0, 0, 0, 0, 0,
            ][..],
            &{
                let mut h = [0u8; MAX_LEN];
                h[1] = 7;
                h[2] = 1;
                h[3] = 60;
                h
            }[..],
        ] {
            let mut control = Control::EMPTY;
            let mut h = msghdr();
            assert!(put(&mut control, &mut h, header));
            // SAFETY: CMSG_SPACE only computes a length.
            let space = unsafe { libc::CMSG_SPACE(header.len() as u32) } as usize;
            assert_eq!(h.msg_controllen, space);
            assert!(h.msg_controllen <= SPACE);
            let mut out = [0u8; MAX_LEN];
            assert_eq!(read(&h, &mut out), Some(header.len()));
            assert_eq!(&out[..header.len()], header);
        }
    }

    #[test]
    fn empty_long_absent_and_inconsistent_headers_are_refused() {
        let mut control = Control::EMPTY;
        let mut h = msghdr();
        assert!(!put(&mut control, &mut h, &[]));
        assert!(!put(&mut control, &mut h, &[0; MAX_LEN + 8]));
        assert!(h.msg_control.is_null(), "left untouched");
        let mut out = [0u8; MAX_LEN];
        assert_eq!(read(&h, &mut out), None, "no control data");
        // A header whose length byte claims 16 bytes in an 8-byte message.
        assert!(put(&mut control, &mut h, &[0, 1, 1, 4, 0, 0, 0, 0]));
        assert_eq!(read(&h, &mut out), None);
        // Another message type is not taken for one.
        assert!(put(&mut control, &mut h, &[0, 0, 1, 4, 0, 0, 0, 0]));
        // SAFETY: `h` points at `control`, which `put` just filled.
        unsafe { (*libc::CMSG_FIRSTHDR(&h)).cmsg_type = libc::IPV6_TCLASS };
        assert_eq!(read(&h, &mut out), None);
    }
}
