//! One IP fragment as the local kernel wrote it to the TUN device:
//! parsed (IPv4, or IPv6 with its fragment header behind the
//! unfragmentable part) and, for a first fragment, checked to hold the
//! whole header chain.

use std::net::IpAddr;

use super::{MAX_EXTENSION_HEADERS, MAX_UNFRAGMENTABLE};
use crate::datapath::DropReason;
use crate::wire::checksum;
use crate::wire::ecn::ECN_MASK;
use crate::wire::ip::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, protocol};

/// Identifies a datagram (RFC 791: source, destination, protocol and
/// identification; RFC 8200: source, destination and identification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) id: u32,
    /// IPv4 only; 0 for IPv6.
    pub(super) protocol: u8,
}

/// One fragment, parsed.
pub(super) struct Fragment<'a> {
    pub(super) key: Key,
    pub(super) v6: bool,
    /// IPv4 header, or IPv6 unfragmentable part.
    pub(super) header: &'a [u8],
    /// IPv6: where in `header` the next-header byte naming the fragment
    /// header is.
    pub(super) next_header_at: usize,
    /// IPv6: the fragment header's next header (IPv4: the protocol).
    pub(super) next_header: u8,
    pub(super) offset: usize,
    pub(super) more: bool,
    pub(super) data: &'a [u8],
    /// The ECN field of this fragment's header (RFC 3168 section 5).
    pub(super) ecn: u8,
}

/// The first fragment holds the whole header chain through the
/// upper-layer header (RFC 8200 section 4.5), and for IPv4 the whole
/// transport header (RFC 791, RFC 1858's tiny fragments).
pub(super) fn check_first(f: &Fragment<'_>) -> Result<(), DropReason> {
    let tiny = DropReason::ReassemblyMalformed;
    let mut proto = f.next_header;
    let mut rest = f.data;
    if f.v6 {
        let mut walked = 0;
        loop {
            match proto {
                protocol::IPV6_HOP_BY_HOP | protocol::IPV6_ROUTING | protocol::IPV6_DEST_OPTS => {
                    let [next, len, ..] = rest else {
                        return Err(tiny);
                    };
                    let n = (usize::from(*len) + 1) * 8;
                    if n > rest.len() {
                        return Err(tiny);
                    }
                    proto = *next;
                    rest = &rest[n..];
                }
                // A second fragment header: nothing sends that.
                protocol::IPV6_FRAGMENT => return Err(tiny),
                _ => break,
            }
            walked += 1;
            if walked > MAX_EXTENSION_HEADERS {
                return Err(tiny);
            }
        }
    }
    let needed = match proto {
        protocol::TCP => match rest.get(12) {
            Some(off) => usize::from(off >> 4).max(5) * 4,
            None => 20,
        },
        protocol::UDP | protocol::UDPLITE | protocol::ICMP | protocol::ICMPV6 => 8,
        _ => 0,
    };
    if rest.len() < needed {
        return Err(tiny);
    }
    Ok(())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The fragment in `packet`, `None` if it is no fragment, `Err` if it
/// claims to be one but cannot be read.
pub(super) fn parse(packet: &[u8]) -> Result<Option<Fragment<'_>>, DropReason> {
    let malformed = DropReason::ReassemblyMalformed;
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            if packet.len() < IPV4_HEADER_LEN {
                return Ok(None);
            }
            let flags = be16(&packet[6..8]);
            if flags & 0x3FFF == 0 {
                return Ok(None);
            }
            let header_len = usize::from(packet[0] & 0x0F) * 4;
            let total = usize::from(be16(&packet[2..4]));
            if header_len < IPV4_HEADER_LEN || total < header_len || total > packet.len() {
                return Err(malformed);
            }
            if !checksum::is_valid(checksum::sum(&packet[..header_len])) {
                return Err(malformed);
            }
            let src: [u8; 4] = packet[12..16].try_into().map_err(|_| malformed)?;
            let dst: [u8; 4] = packet[16..20].try_into().map_err(|_| malformed)?;
            Ok(Some(Fragment {
                key: Key {
                    src: IpAddr::from(src),
                    dst: IpAddr::from(dst),
                    id: u32::from(be16(&packet[4..6])),
                    protocol: packet[9],
                },
                v6: false,
                header: &packet[..header_len],
                next_header_at: 9,
                next_header: packet[9],
                offset: usize::from(flags & 0x1FFF) * 8,
                more: flags & 0x2000 != 0,
                data: &packet[header_len..total],
                ecn: packet[1] & ECN_MASK,
            }))
        }
        Some(6) => {
            if packet.len() < IPV6_HEADER_LEN {
                return Ok(None);
            }
            let end = IPV6_HEADER_LEN + usize::from(be16(&packet[4..6]));
            if end > packet.len() {
                return Ok(None); // the pipeline refuses it by name
            }
            let packet = &packet[..end];
            // The unfragmentable part: hop-by-hop, routing and destination
            // options headers before the fragment header (RFC 8200 4.5).
            let (mut proto, mut at, mut next_header_at) = (packet[6], IPV6_HEADER_LEN, 6);
            for _ in 0..=MAX_EXTENSION_HEADERS {
                match proto {
                    protocol::IPV6_FRAGMENT => {
                        let Some(h) = packet.get(at..at + 8) else {
                            return Err(malformed);
                        };
                        if at > MAX_UNFRAGMENTABLE {
                            return Err(malformed);
                        }
                        let field = be16(&h[2..4]);
                        let src: [u8; 16] = packet[8..24].try_into().map_err(|_| malformed)?;
                        let dst: [u8; 16] = packet[24..40].try_into().map_err(|_| malformed)?;
                        return Ok(Some(Fragment {
                            key: Key {
                                src: IpAddr::from(src),
                                dst: IpAddr::from(dst),
                                id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                                protocol: 0,
                            },
                            v6: true,
                            header: &packet[..at],
                            next_header_at,
                            next_header: h[0],
                            offset: usize::from(field & 0xFFF8),
                            more: field & 1 != 0,
                            data: &packet[at + 8..],
                            ecn: (packet[1] >> 4) & ECN_MASK,
                        }));
                    }
                    protocol::IPV6_HOP_BY_HOP
                    | protocol::IPV6_ROUTING
                    | protocol::IPV6_DEST_OPTS => {
                        let (Some(&next), Some(&len)) = (packet.get(at), packet.get(at + 1)) else {
                            return Ok(None);
                        };
                        next_header_at = at;
                        proto = next;
                        at += (usize::from(len) + 1) * 8;
                    }
                    _ => return Ok(None),
                }
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}
