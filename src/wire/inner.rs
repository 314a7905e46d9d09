//! Validation of the inner (transport) checksum of a plain IP packet: the
//! check Linux skips for transport-mode NAT-T ESP (`CHECKSUM_UNNECESSARY`
//! in `esp_input_done2()`), and the reason esptun exists.
//!
//! The same function runs on both sides of the cipher: outbound before
//! sealing (corruption between the kernel and the cipher) and inbound after
//! the IP header was rebuilt from the SA (corruption inside the cipher that
//! a valid ICV cannot reveal). What to do with packets that carry no
//! checksum is [`InnerPolicy`], not scattered `if`s.

use super::checksum::{self, combine, pseudo_header_v4, pseudo_header_v6, sum};
use std::net::IpAddr;

use super::ip::{IPV6_HEADER_LEN, IpError, Ipv4Packet, Ipv6Packet, protocol, version};

/// Which packets without a verifiable checksum may pass (each counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerPolicy {
    /// IPv4 UDP with checksum 0 ("not computed", RFC 768). Allowed by
    /// default because some applications send it; counted.
    pub allow_udp4_zero_checksum: bool,
    /// Protocols esptun cannot verify (neither TCP, UDP, UDP-Lite, ICMP
    /// nor ICMPv6). Refused by default: nothing vouches for their bytes.
    pub allow_unverifiable_protocols: bool,
    /// UDP-Lite whose checksum covers only part of the datagram (RFC 3828):
    /// the rest reaches the application unchecked. Refused by default.
    pub allow_udplite_partial_coverage: bool,
    /// Outbound only: give an IPv4 UDP datagram sent with checksum 0 its
    /// real checksum before sealing, so that any receiver can validate it
    /// (RFC 768 lets a datagram carry a checksum its sender did not
    /// compute). On by default.
    pub fill_udp4_zero_checksum: bool,
}

impl Default for InnerPolicy {
    fn default() -> Self {
        InnerPolicy {
            allow_udp4_zero_checksum: true,
            allow_unverifiable_protocols: false,
            allow_udplite_partial_coverage: false,
            fill_udp4_zero_checksum: true,
        }
    }
}

/// A packet that may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InnerVerdict {
    /// The checksum was computed and matched.
    Verified,
    /// IPv4 UDP with checksum 0, allowed by policy.
    Udp4ZeroChecksum,
    /// A protocol without a checksum esptun knows, allowed by policy.
    Unverifiable,
    /// UDP-Lite with partial coverage, the covered part verified, allowed
    /// by policy.
    UdpLitePartialCoverage,
}

/// Why a packet may not go on. Each is a drop reason of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InnerError {
    #[error("bad IP header: {0}")]
    Ip(#[from] IpError),
    #[error("transport header truncated or inconsistent")]
    TransportHeader,
    #[error("transport checksum mismatch")]
    Checksum,
    #[error("UDP checksum 0, refused by policy (always for IPv6, RFC 8200 section 8.1)")]
    ZeroUdpChecksum,
    #[error("IP fragment: its transport checksum cannot be verified alone")]
    Fragment,
    /// RFC 8200 section 4.3: for every node on the path, so in transport
    /// mode it belongs to the outer header (RFC 4303 section 3.1.1).
    #[error(
        "IPv6 hop-by-hop options header (in transport mode it belongs to the outer header, and is not carried)"
    )]
    HopByHop,
    /// RFC 8200 section 4.4: processed by the nodes it lists, so in
    /// transport mode it belongs to the outer header; the addresses it
    /// lists lead to the inner destination, not along the outer path, so
    /// it is not moved there either.
    #[error(
        "IPv6 routing header (in transport mode it belongs to the outer header, and cannot be carried)"
    )]
    RoutingHeader,
    #[error("more than 8 IPv6 extension headers")]
    ExtensionHeader,
    #[error("protocol {0} has no checksum esptun can verify")]
    Unverifiable(u8),
    #[error("UDP-Lite checksum covers only part of the datagram")]
    PartialCoverage,
}

/// Addresses for the pseudo-header.
#[derive(Debug, Clone, Copy)]
pub enum Pseudo {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

impl Pseudo {
    fn sum(self, proto: u8, len: usize) -> u16 {
        match self {
            Pseudo::V4(s, d) => pseudo_header_v4(s, d, proto, len as u16),
            Pseudo::V6(s, d) => pseudo_header_v6(&s, &d, proto, len as u32),
        }
    }
}

/// Validates the transport checksum of one whole IP packet. The IP header
/// itself must already be trustworthy (outbound: the kernel wrote it;
/// inbound: esptun rebuilt it), but its lengths are still checked.
pub fn validate(packet: &[u8], policy: InnerPolicy) -> Result<Validated, InnerError> {
    match version(packet)? {
        4 => {
            let ip = Ipv4Packet::new_checked(packet)?;
            if ip.is_fragment() {
                return Err(InnerError::Fragment);
            }
            let verdict = validate_segment(
                Pseudo::V4(ip.src(), ip.dst()),
                ip.protocol(),
                ip.payload(),
                policy,
            )?;
            Ok(Validated {
                verdict,
                header_len: ip.header_len(),
                total_len: usize::from(ip.total_len()),
                protocol: ip.protocol(),
                src: IpAddr::from(ip.src()),
                dst: IpAddr::from(ip.dst()),
            })
        }
        _ => {
            let ip = Ipv6Packet::new_checked(packet)?;
            let verdict = validate_segment(
                Pseudo::V6(ip.src(), ip.dst()),
                ip.next_header(),
                ip.payload(),
                policy,
            )?;
            Ok(Validated {
                verdict,
                header_len: IPV6_HEADER_LEN,
                total_len: IPV6_HEADER_LEN + usize::from(ip.payload_len()),
                protocol: ip.next_header(),
                src: IpAddr::from(ip.src()),
                dst: IpAddr::from(ip.dst()),
            })
        }
    }
}

/// Most IPv6 extension headers walked before the upper-layer header: a
/// longer chain is refused, so no input costs more than this.
const MAX_EXTENSION_HEADERS: usize = 8;

/// The upper-layer header of an IPv6 payload whose first header is
/// `proto`, and the bytes from it on (RFC 8200 section 4). Destination
/// options travel inside ESP in transport mode and are walked. Hop-by-hop
/// and routing headers are for the routers on the path, so in transport
/// mode they belong to the outer header (RFC 4303 section 3.1.1): esptun
/// does not carry them, and says so rather than losing them silently. A
/// fragment header is a fragment. Anything else is the upper layer (which
/// the checksum rules then verify or refuse).
fn upper_layer_v6(mut proto: u8, segment: &[u8]) -> Result<(u8, &[u8]), InnerError> {
    let mut rest = segment;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match proto {
            protocol::IPV6_DEST_OPTS => {
                // RFC 8200 section 4.6: next header, length in 8-octet
                // units not counting the first 8.
                let [next, len, ..] = rest else {
                    return Err(InnerError::TransportHeader);
                };
                let n = (usize::from(*len) + 1) * 8;
                if n > rest.len() {
                    return Err(InnerError::TransportHeader);
                }
                proto = *next;
                rest = &rest[n..];
            }
            protocol::IPV6_FRAGMENT => return Err(InnerError::Fragment),
            protocol::IPV6_HOP_BY_HOP => return Err(InnerError::HopByHop),
            protocol::IPV6_ROUTING => return Err(InnerError::RoutingHeader),
            _ => return Ok((proto, rest)),
        }
    }
    Err(InnerError::ExtensionHeader)
}

/// Writes the real UDP checksum into an IPv4 UDP datagram whose checksum
/// field is 0, in place, from the bytes as they are (RFC 768: the one's
/// complement sum over the pseudo-header and the datagram; a result of 0
/// is sent as 0xFFFF). `Err` if the packet is not such a datagram.
pub fn fill_udp4_checksum(packet: &mut [u8]) -> Result<(), InnerError> {
    let ip = Ipv4Packet::new_checked(&*packet)?;
    if ip.protocol() != protocol::UDP || ip.is_fragment() {
        return Err(InnerError::TransportHeader);
    }
    let (header_len, total_len, src, dst) = (
        ip.header_len(),
        usize::from(ip.total_len()),
        ip.src(),
        ip.dst(),
    );
    let segment = packet
        .get_mut(header_len..total_len)
        .filter(|s| s.len() >= 8)
        .ok_or(InnerError::TransportHeader)?;
    if be16(&segment[6..8]) != 0 {
        return Err(InnerError::TransportHeader);
    }
    let len = u16::try_from(segment.len()).map_err(|_| InnerError::TransportHeader)?;
    let pseudo = pseudo_header_v4(src, dst, protocol::UDP, len);
    let value = match checksum::finish(combine(pseudo, sum(segment))) {
        0 => 0xFFFF,
        v => v,
    };
    segment[6..8].copy_from_slice(&value.to_be_bytes());
    Ok(())
}

/// A packet [`validate`] accepted, with what the pipelines need of its IP
/// header, so that it is parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validated {
    pub verdict: InnerVerdict,
    pub header_len: usize,
    /// The IP header's length field: header and payload.
    pub total_len: usize,
    /// The transport protocol (ESP's next header).
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// Validates a transport segment whose IP header the caller built itself
/// (inbound, from the SA): the same rules as [`validate`] (IPv6 extension
/// headers included), without parsing an IP header again. IPv4 fragments
/// cannot reach here: ESP carries whole packets in transport mode.
pub fn validate_segment(
    pseudo: Pseudo,
    proto: u8,
    segment: &[u8],
    policy: InnerPolicy,
) -> Result<InnerVerdict, InnerError> {
    let (proto, segment) = match pseudo {
        Pseudo::V6(..) => upper_layer_v6(proto, segment)?,
        Pseudo::V4(..) => (proto, segment),
    };
    let verified = |total: u16| {
        if checksum::is_valid(total) {
            Ok(InnerVerdict::Verified)
        } else {
            Err(InnerError::Checksum)
        }
    };
    match proto {
        protocol::TCP => {
            if segment.len() < 20 {
                return Err(InnerError::TransportHeader);
            }
            verified(combine(pseudo.sum(proto, segment.len()), sum(segment)))
        }
        protocol::UDP => {
            if segment.len() < 8 || usize::from(be16(&segment[4..6])) != segment.len() {
                return Err(InnerError::TransportHeader);
            }
            if be16(&segment[6..8]) == 0 {
                return match pseudo {
                    Pseudo::V4(..) if policy.allow_udp4_zero_checksum => {
                        Ok(InnerVerdict::Udp4ZeroChecksum)
                    }
                    _ => Err(InnerError::ZeroUdpChecksum),
                };
            }
            verified(combine(pseudo.sum(proto, segment.len()), sum(segment)))
        }
        protocol::UDPLITE => {
            // RFC 3828 section 3.1: coverage 0 means the whole datagram,
            // otherwise at least the 8-byte header and at most its length;
            // the pseudo-header carries the IP payload length; checksum 0
            // is never valid.
            if segment.len() < 8 {
                return Err(InnerError::TransportHeader);
            }
            let coverage = match usize::from(be16(&segment[4..6])) {
                0 => segment.len(),
                c if (8..=segment.len()).contains(&c) => c,
                _ => return Err(InnerError::TransportHeader),
            };
            if be16(&segment[6..8]) == 0 {
                return Err(InnerError::Checksum);
            }
            verified(combine(
                pseudo.sum(proto, segment.len()),
                sum(&segment[..coverage]),
            ))?;
            // Bytes past the coverage reach the application unchecked.
            match coverage < segment.len() {
                false => Ok(InnerVerdict::Verified),
                true if policy.allow_udplite_partial_coverage => {
                    Ok(InnerVerdict::UdpLitePartialCoverage)
                }
                true => Err(InnerError::PartialCoverage),
            }
        }
        protocol::ICMP if matches!(pseudo, Pseudo::V4(..)) => {
            // ICMPv4 has no pseudo-header (RFC 792).
            if segment.len() < 8 {
                return Err(InnerError::TransportHeader);
            }
            verified(sum(segment))
        }
        protocol::ICMPV6 if matches!(pseudo, Pseudo::V6(..)) => {
            if segment.len() < 8 {
                return Err(InnerError::TransportHeader);
            }
            verified(combine(pseudo.sum(proto, segment.len()), sum(segment)))
        }
        _ if policy.allow_unverifiable_protocols => Ok(InnerVerdict::Unverifiable),
        other => Err(InnerError::Unverifiable(other)),
    }
}

/// For a segment whose checksum did not verify: the checksum it carries
/// and the one its bytes call for (TCP, UDP, ICMP, ICMPv6), for
/// post-mortem logs. `None` for other protocols or a short segment.
pub fn checksum_mismatch(pseudo: Pseudo, proto: u8, segment: &[u8]) -> Option<(u16, u16)> {
    let (offset, with_pseudo) = match (proto, pseudo) {
        (protocol::TCP, _) => (16, true),
        (protocol::UDP, _) => (6, true),
        (protocol::ICMP, Pseudo::V4(..)) => (2, false),
        (protocol::ICMPV6, Pseudo::V6(..)) => (2, true),
        _ => return None,
    };
    let found = be16(segment.get(offset..offset + 2)?);
    let mut total = sum(segment);
    if with_pseudo {
        total = combine(pseudo.sum(proto, segment.len()), total);
    }
    // Ones'-complement subtraction of the field gives the sum without it.
    let without = combine(total, !found);
    Some((found, checksum::finish(without)))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Test and benchmark helpers that build valid packets.
pub mod build {
    use super::super::checksum::{combine, finish, pseudo_header_v4, pseudo_header_v6, sum};
    use std::net::IpAddr;

    use super::protocol;
    use crate::wire::ip::emit_header;

    /// An IPv4 packet with a correct header checksum and a transport
    /// segment of `proto` carrying `payload`, with a correct checksum.
    pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let segment = segment(
            proto,
            payload,
            |len| pseudo_header_v4(src, dst, proto, len as u16),
            false,
        );
        with_header(20, src.into(), dst.into(), proto, &segment)
    }

    /// An IPv6 packet, likewise.
    pub fn ipv6(src: [u8; 16], dst: [u8; 16], proto: u8, payload: &[u8]) -> Vec<u8> {
        let segment = segment(
            proto,
            payload,
            |len| pseudo_header_v6(&src, &dst, proto, len as u32),
            true,
        );
        with_header(40, src.into(), dst.into(), proto, &segment)
    }

    fn with_header(
        header_len: usize,
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        segment: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![0u8; header_len];
        // Test data: a segment too long for a header is a bug in the test.
        if emit_header(&mut p, src, dst, proto, segment.len(), 64).is_err() {
            unreachable!(
                "test packet of {} bytes does not fit an IP header",
                segment.len()
            );
        }
        p.extend_from_slice(segment);
        p
    }

    fn segment(proto: u8, payload: &[u8], pseudo: impl Fn(usize) -> u16, v6: bool) -> Vec<u8> {
        let (header_len, csum_at) = match proto {
            protocol::TCP => (20, 16),
            protocol::UDP | protocol::UDPLITE => (8, 6),
            _ => (8, 2), // ICMP / ICMPv6 echo
        };
        let mut s = vec![0u8; header_len + payload.len()];
        s[header_len..].copy_from_slice(payload);
        match proto {
            protocol::TCP => {
                s[0..4].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
                s[12] = 0x50; // data offset 5
                s[13] = 0x18; // PSH ACK
            }
            protocol::UDP => {
                s[0..4].copy_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
                let len = s.len() as u16;
                s[4..6].copy_from_slice(&len.to_be_bytes());
            }
            protocol::UDPLITE => s[0..4].copy_from_slice(&[0x9c, 0x40, 0x00, 0x35]),
            _ => s[0] = if v6 { 128 } else { 8 }, // echo request
        }
        let with_pseudo = proto != protocol::ICMP;
        let total = if with_pseudo {
            combine(pseudo(s.len()), sum(&s))
        } else {
            sum(&s)
        };
        let mut value = finish(total);
        if matches!(proto, protocol::UDP | protocol::UDPLITE) && value == 0 {
            value = 0xFFFF; // RFC 768, RFC 3828 3.1: a computed 0 is sent as all ones
        }
        s[csum_at..csum_at + 2].copy_from_slice(&value.to_be_bytes());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::build::{ipv4, ipv6};
    use super::*;

    #[test]
    fn a_mismatch_names_the_checksum_found_and_the_one_the_bytes_need() {
        let (a4, b4) = ([198, 18, 0, 1], [198, 18, 0, 2]);
        let (a6, b6) = ([0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&[0x20, 1, 0x0d, 0xb8]);
            b[15] = 2;
            b
        });
        let cases: [(u8, usize, bool); 6] = [
            (protocol::TCP, 16, false),
            (protocol::UDP, 6, false),
            (protocol::ICMP, 2, false),
            (protocol::TCP, 16, true),
            (protocol::UDP, 6, true),
            (protocol::ICMPV6, 2, true),
        ];
        for (proto, at, v6) in cases {
            let build = |payload: &[u8]| {
                if v6 {
                    ipv6(a6, b6, proto, payload)[40..].to_vec()
                } else {
                    ipv4(a4, b4, proto, payload)[20..].to_vec()
                }
            };
            let pseudo = if v6 {
                Pseudo::V6(a6, b6)
            } else {
                Pseudo::V4(a4, b4)
            };
            let good = build(&[0x11; 64]);
            let mut corrupt = build(&[0x11; 64]);
            corrupt[40..56].copy_from_slice(&[0x22; 16]); // one block replaced
            let needed = build(&corrupt[corrupt.len() - 64..]);
            let found = u16::from_be_bytes([good[at], good[at + 1]]);
            let computed = u16::from_be_bytes([needed[at], needed[at + 1]]);
            assert_ne!(found, computed);
            assert_eq!(
                checksum_mismatch(pseudo, proto, &corrupt),
                Some((found, computed)),
                "protocol {proto}, v6 {v6}"
            );
        }
        assert_eq!(checksum_mismatch(Pseudo::V4(a4, b4), 99, &[0; 20]), None);
        assert_eq!(
            checksum_mismatch(Pseudo::V4(a4, b4), protocol::TCP, &[0; 10]),
            None
        );
    }

    const A4: [u8; 4] = [198, 18, 0, 1];
    const B4: [u8; 4] = [198, 19, 0, 2];
    const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const PROTOS4: [u8; 4] = [
        protocol::TCP,
        protocol::UDP,
        protocol::UDPLITE,
        protocol::ICMP,
    ];
    const PROTOS6: [u8; 4] = [
        protocol::TCP,
        protocol::UDP,
        protocol::UDPLITE,
        protocol::ICMPV6,
    ];

    fn all_packets(payload: &[u8]) -> Vec<Vec<u8>> {
        PROTOS4
            .iter()
            .map(|&p| ipv4(A4, B4, p, payload))
            .chain(PROTOS6.iter().map(|&p| ipv6(A6, B6, p, payload)))
            .collect()
    }

    #[test]
    fn valid_packets_of_every_protocol_verify() {
        for len in [0, 1, 7, 64, 1400] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            for p in all_packets(&payload) {
                assert_eq!(
                    validate(&p, InnerPolicy::default()).map(|v| v.verdict),
                    Ok(InnerVerdict::Verified)
                );
            }
        }
    }

    #[test]
    fn the_field_corruption_is_caught_in_every_protocol() {
        // One 16-byte block of the transport payload replaced by its
        // neighbour: what AES-NI with corrupted XMM state produced.
        let payload: Vec<u8> = (0..256).map(|i| (i * 13 + 1) as u8).collect();
        for p in all_packets(&payload) {
            let mut corrupted = p.clone();
            let end = corrupted.len();
            corrupted.copy_within(end - 64..end - 48, end - 48);
            assert_eq!(
                validate(&corrupted, InnerPolicy::default()),
                Err(InnerError::Checksum)
            );
        }
    }

    #[test]
    fn any_single_bit_flip_in_the_segment_is_caught() {
        let payload = [0x5Au8; 40];
        for p in all_packets(&payload) {
            let start = if version(&p) == Ok(4) { 20 } else { 40 };
            for byte in start..p.len() {
                let mut bad = p.clone();
                bad[byte] ^= 0x10;
                assert!(
                    validate(&bad, InnerPolicy::default()).is_err(),
                    "byte {byte} of {p:02x?}"
                );
            }
        }
    }

    #[test]
    fn a_zero_udp_checksum_is_filled_in_to_the_real_one() {
        let good = ipv4(A4, B4, protocol::UDP, b"hello, filled");
        let mut zero = good.clone();
        zero[26..28].copy_from_slice(&[0, 0]);
        fill_udp4_checksum(&mut zero).expect("filled");
        assert_eq!(zero, good, "the same checksum the sender would compute");
        assert_eq!(
            validate(&zero, InnerPolicy::default()).map(|v| v.verdict),
            Ok(InnerVerdict::Verified)
        );
        // Only IPv4 UDP with checksum 0 is touched.
        let mut nonzero = good.clone();
        assert!(fill_udp4_checksum(&mut nonzero).is_err());
        assert_eq!(nonzero, good);
        let mut tcp = ipv4(A4, B4, protocol::TCP, b"x");
        assert!(fill_udp4_checksum(&mut tcp).is_err());
        assert!(fill_udp4_checksum(&mut [0x45, 0, 0]).is_err());
    }

    #[test]
    fn zero_udp_checksum_follows_policy_and_rfc_8200() {
        let mut v4 = ipv4(A4, B4, protocol::UDP, b"hello");
        v4[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(
            validate(&v4, InnerPolicy::default()).map(|v| v.verdict),
            Ok(InnerVerdict::Udp4ZeroChecksum)
        );
        let strict = InnerPolicy {
            allow_udp4_zero_checksum: false,
            ..InnerPolicy::default()
        };
        assert_eq!(validate(&v4, strict), Err(InnerError::ZeroUdpChecksum));
        let mut v6 = ipv6(A6, B6, protocol::UDP, b"hello");
        v6[46..48].copy_from_slice(&[0, 0]);
        assert_eq!(
            validate(&v6, InnerPolicy::default()),
            Err(InnerError::ZeroUdpChecksum)
        );
    }

    #[test]
    fn malformed_transport_headers_and_unsupported_shapes_are_typed() {
        let p = InnerPolicy::default();
        let mut udp = ipv4(A4, B4, protocol::UDP, b"hello");
        udp[25] += 1; // UDP length disagrees with the IP payload
        assert_eq!(validate(&udp, p), Err(InnerError::TransportHeader));
        let mut tcp = ipv4(A4, B4, protocol::TCP, b"");
        tcp[3] = 30; // IP total length cuts the TCP header short
        tcp.truncate(30);
        assert_eq!(validate(&tcp, p), Err(InnerError::TransportHeader));
        let mut frag = ipv4(A4, B4, protocol::UDP, b"x");
        frag[6] = 0x20;
        assert_eq!(validate(&frag, p), Err(InnerError::Fragment));
        let mut ext = ipv6(A6, B6, protocol::UDP, b"x");
        ext[6] = protocol::IPV6_HOP_BY_HOP;
        assert_eq!(validate(&ext, p), Err(InnerError::HopByHop));
        ext[6] = protocol::IPV6_ROUTING;
        assert_eq!(validate(&ext, p), Err(InnerError::RoutingHeader));
        // Also on the inbound path, and whatever the policy for unknown
        // protocols: the TCP/UDP behind the extension is never checked.
        let open = InnerPolicy {
            allow_unverifiable_protocols: true,
            ..p
        };
        // Hop-by-hop and routing headers belong to the outer header in
        // transport mode: not carried, each by its own name. A fragment
        // header is a fragment.
        for (next, refused) in [(0, InnerError::HopByHop), (43, InnerError::RoutingHeader)] {
            assert_eq!(
                validate_segment(Pseudo::V6(A6, B6), next, &ext[40..], open),
                Err(refused)
            );
        }
        assert_eq!(
            validate_segment(Pseudo::V6(A6, B6), 44, &ext[40..], open),
            Err(InnerError::Fragment)
        );
        let gre = ipv4(A4, B4, 47, b"whatever");
        assert_eq!(validate(&gre, p), Err(InnerError::Unverifiable(47)));
        assert_eq!(
            validate(&gre, open).map(|v| v.verdict),
            Ok(InnerVerdict::Unverifiable)
        );
        // ICMPv6 inside IPv4 is not ICMP: no checksum rule applies.
        assert_eq!(
            validate(&ipv4(A4, B4, protocol::ICMPV6, b"x"), p),
            Err(InnerError::Unverifiable(protocol::ICMPV6))
        );
        assert_eq!(validate(&[], p), Err(InnerError::Ip(IpError::Truncated)));
    }

    /// `packet` (IPv6) with `count` 8-byte destination options headers
    /// (PadN) between the IPv6 header and the transport header.
    fn with_dest_opts(packet: &[u8], count: usize) -> Vec<u8> {
        let mut p = packet[..40].to_vec();
        let mut next = p[6];
        let mut headers = Vec::new();
        for _ in 0..count {
            headers.splice(0..0, [next, 0, 1, 4, 0, 0, 0, 0]);
            next = protocol::IPV6_DEST_OPTS;
        }
        p[6] = next;
        let len = u16::from_be_bytes([p[4], p[5]]) + (8 * count) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&headers);
        p.extend_from_slice(&packet[40..]);
        p
    }

    #[test]
    fn destination_options_are_walked_to_the_transport_checksum() {
        for proto in [protocol::TCP, protocol::UDP, protocol::ICMPV6] {
            let plain = ipv6(A6, B6, proto, b"behind destination options");
            for count in [1, 2, MAX_EXTENSION_HEADERS - 1] {
                let p = with_dest_opts(&plain, count);
                let v = validate(&p, InnerPolicy::default()).expect("valid");
                assert_eq!(v.verdict, InnerVerdict::Verified);
                assert_eq!(v.protocol, protocol::IPV6_DEST_OPTS, "ESP's next header");
                assert_eq!(v.header_len, 40);
                // The transport bytes behind the options are still checked.
                let mut bad = p.clone();
                let last = bad.len() - 1;
                bad[last] ^= 0x40;
                assert_eq!(
                    validate(&bad, InnerPolicy::default()),
                    Err(InnerError::Checksum),
                    "{proto} behind {count}"
                );
            }
        }
        let plain = ipv6(A6, B6, protocol::UDP, b"x");
        // A chain longer than the bound, and a truncated header.
        let long = with_dest_opts(&plain, MAX_EXTENSION_HEADERS);
        assert_eq!(
            validate(&long, InnerPolicy::default()),
            Err(InnerError::ExtensionHeader)
        );
        let mut truncated = with_dest_opts(&plain, 1);
        truncated[41] = 200; // claims 1608 bytes
        assert_eq!(
            validate(&truncated, InnerPolicy::default()),
            Err(InnerError::TransportHeader)
        );
    }

    #[test]
    fn udplite_partial_coverage_ignores_uncovered_bytes() {
        let mut p = ipv4(A4, B4, protocol::UDPLITE, &[1u8; 32]);
        // Cover only the header (8 bytes) and recompute.
        p[24..26].copy_from_slice(&[0, 8]);
        p[26..28].copy_from_slice(&[0, 0]);
        let pseudo = pseudo_header_v4(A4, B4, protocol::UDPLITE, 40);
        let value = checksum::finish(combine(pseudo, sum(&p[20..28])));
        p[26..28].copy_from_slice(&value.to_be_bytes());
        // Refused by default: the uncovered bytes would go unchecked.
        assert_eq!(
            validate(&p, InnerPolicy::default()),
            Err(InnerError::PartialCoverage)
        );
        let partial = InnerPolicy {
            allow_udplite_partial_coverage: true,
            ..InnerPolicy::default()
        };
        assert_eq!(
            validate(&p, partial).map(|v| v.verdict),
            Ok(InnerVerdict::UdpLitePartialCoverage)
        );
        p[40] ^= 0xFF; // uncovered payload byte
        assert_eq!(
            validate(&p, partial).map(|v| v.verdict),
            Ok(InnerVerdict::UdpLitePartialCoverage)
        );
        p[22] ^= 0xFF; // covered header byte
        assert_eq!(validate(&p, partial), Err(InnerError::Checksum));
        p[22] ^= 0xFF;
        p[24..26].copy_from_slice(&[0, 7]); // coverage below the header
        assert_eq!(
            validate(&p, InnerPolicy::default()),
            Err(InnerError::TransportHeader)
        );
    }
}

#[cfg(test)]
#[path = "inner_oracle_tests.rs"]
mod oracle_tests;
