//! Control messages (cmsg(3)) of the batched sends and receives: the
//! fixed-size buffer each message carries, what a send attaches
//! (UDP_SEGMENT, IP_TOS / IPV6_TCLASS, IPV6_HOPOPTS) and what a receive
//! reports (UDP_GRO, SO_RXQ_OVFL, the TOS byte, a hop-by-hop header).

use std::mem::size_of;

use super::super::Family;
use super::super::hopopts;
use crate::wire::hop_by_hop;

/// Bytes of control data a message may need: on send a UDP_SEGMENT (u16)
/// and an IP_TOS or IPV6_TCLASS (int); on receive UDP_GRO (int),
/// SO_RXQ_OVFL (u32) and IP_TOS (u8) or IPV6_TCLASS (int). Each takes
/// CMSG_SPACE(4) = 24 bytes on 64-bit; one more fits, so an unexpected
/// message does not truncate (MSG_CTRUNC) the ones read. Both ways, an
/// IPV6_HOPOPTS message of up to `hop_by_hop::MAX_LEN` bytes besides
/// (`hopopts::SPACE`).
pub(super) const CONTROL_LEN: usize = 4 * 24 + hopopts::SPACE;
// SAFETY: CMSG_SPACE only computes a length.
const _: () = assert!(
    unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as usize * 4 + hopopts::SPACE
        <= CONTROL_LEN
);

/// A message's control buffer (fixed size, on the stack: nothing is
/// allocated per packet), aligned as a cmsghdr.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(super) struct Control(pub(super) [u8; CONTROL_LEN]);

impl Control {
    pub(super) const EMPTY: Control = Control([0; CONTROL_LEN]);

    /// Attaches this buffer to `h` with a UDP_SEGMENT message for a train
    /// of `segment_size`, and an IP_TOS (IPv4) or IPV6_TCLASS (IPv6)
    /// message with the TOS byte for the datagram, or for each segment of
    /// the train (ip(7), ipv6(7): an int; raw sockets honour them too),
    /// and an IPV6_HOPOPTS message with `hop_by_hop` unless it is empty
    /// (RFC 3542 section 6.3; the kernel puts it on each segment). None of
    /// them: no control data.
    pub(super) fn put(
        &mut self,
        h: &mut libc::msghdr,
        segment_size: Option<u16>,
        tos: Option<(Family, u8)>,
        hop_by_hop: &[u8],
    ) {
        // `send_chunk` never passes a longer one, but this safe function
        // does not rely on it: the bound keeps the writes below within
        // CONTROL_LEN. Refused rather than cut.
        let hop_by_hop = if hop_by_hop.len() <= hop_by_hop::MAX_LEN {
            hop_by_hop
        } else {
            &[]
        };
        if segment_size.is_none() && tos.is_none() && hop_by_hop.is_empty() {
            return;
        }
        h.msg_control = self.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a length.
        let space = |len: usize| unsafe { libc::CMSG_SPACE(len as u32) } as usize;
        let total = segment_size.map_or(0, |_| space(size_of::<u16>()))
            + tos.map_or(0, |_| space(size_of::<libc::c_int>()))
            + if hop_by_hop.is_empty() {
                0
            } else {
                space(hop_by_hop.len())
            };
        // Within CONTROL_LEN (48 + hopopts::SPACE of 96 + hopopts::SPACE
        // bytes, the assertion above).
        h.msg_controllen = total as _;
        // SAFETY: `h` points at this buffer, which is cmsghdr-aligned and
        // at least `total` bytes long (two CMSG_SPACE(4) and one of a
        // header of at most hop_by_hop::MAX_LEN bytes), so each
        // header CMSG_FIRSTHDR/CMSG_NXTHDR returns and its data lie within
        // it; both are non-null because `total` leaves room for each
        // message written (checked, not assumed).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            if let Some(size) = segment_size
                && !c.is_null()
            {
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
                c = libc::CMSG_NXTHDR(h, c);
            }
            if let Some((family, tos)) = tos
                && !c.is_null()
            {
                (*c).cmsg_level = match family {
                    Family::V4 => libc::IPPROTO_IP,
                    Family::V6 => libc::IPPROTO_IPV6,
                };
                (*c).cmsg_type = match family {
                    Family::V4 => libc::IP_TOS,
                    Family::V6 => libc::IPV6_TCLASS,
                };
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
                let value = libc::c_int::from(tos);
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), value);
                c = libc::CMSG_NXTHDR(h, c);
            }
            if !hop_by_hop.is_empty() && !c.is_null() {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_HOPOPTS;
                (*c).cmsg_len = libc::CMSG_LEN(hop_by_hop.len() as u32) as _;
                std::ptr::copy_nonoverlapping(
                    hop_by_hop.as_ptr(),
                    libc::CMSG_DATA(c),
                    hop_by_hop.len(),
                );
            }
        }
    }
}

/// What the control messages of a received datagram said.
#[derive(Debug, Default)]
pub(super) struct Received {
    /// UDP_GRO: the datagram is a train of segments of this size.
    pub(super) gro_segment: Option<u16>,
    /// SO_RXQ_OVFL: the socket's drop count so far.
    pub(super) rx_overflows: Option<u32>,
    /// IP_TOS (IP_RECVTOS) or IPV6_TCLASS (IPV6_RECVTCLASS): the TOS
    /// byte or traffic class the datagram arrived with.
    pub(super) tos: Option<u8>,
    /// IPV6_HOPOPTS (IPV6_RECVHOPOPTS): the datagram came with a
    /// hop-by-hop header (read by `hopopts::read`).
    pub(super) hop_by_hop: bool,
}

pub(super) fn read_control(h: &libc::msghdr) -> Received {
    let mut found = Received::default();
    if h.msg_control.is_null() || h.msg_controllen < size_of::<libc::cmsghdr>() {
        return found;
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of the control
    // buffer `h` points at with well-formed cmsghdrs; CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay within that length and return null at its end,
    // and each data read is checked against the message's own length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let len = (*c).cmsg_len as usize;
            let data_len = len.saturating_sub(libc::CMSG_LEN(0) as usize);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_UDP, libc::UDP_GRO) if data_len >= size_of::<libc::c_int>() => {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    found.gro_segment = u16::try_from(v).ok().filter(|&v| v > 0);
                }
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) if data_len >= size_of::<u32>() => {
                    found.rx_overflows =
                        Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
                }
                // ip(7): IP_TOS comes as one byte.
                (libc::IPPROTO_IP, libc::IP_TOS) if data_len >= 1 => {
                    found.tos = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c)));
                }
                // ipv6(7): IPV6_TCLASS comes as an int.
                (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) if data_len >= size_of::<libc::c_int>() => {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    found.tos = u8::try_from(v).ok();
                }
                (libc::IPPROTO_IPV6, libc::IPV6_HOPOPTS) => found.hop_by_hop = true,
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    found
}
