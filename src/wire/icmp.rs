//! Path MTU on the inner side: how large an inner packet may be so that
//! its ESP packet fits a path MTU, the ICMP errors that tell an inner
//! sender so (RFC 1191 "Fragmentation Needed", RFC 4443 "Packet Too Big"),
//! and TCP MSS clamping.
//!
//! The builders write into a caller's buffer and return the length; the
//! error carries as much of the invoking packet as fits in 576 (IPv4,
//! RFC 1812 section 4.3.2.3) or 1280 bytes (IPv6, RFC 4443 section 3.2),
//! with its checksum. They refuse to answer an ICMP error (RFC 1122
//! section 3.2.2, RFC 4443 section 2.4 (e.1)). Nothing here panics on any
//! input: every length is checked first.

use std::net::IpAddr;

use super::checksum::{self, combine, pseudo_header_v6, sum};
use super::esp;
use super::ip::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, Ipv4Packet, Ipv6Packet, protocol, version};
use super::outer::{Encap, UDP_HEADER_LEN};

/// RFC 8200 section 5: every IPv6 link carries 1280-byte packets.
pub const IPV6_MIN_MTU: u16 = 1280;
/// RFC 791: every IPv4 module forwards 68-byte datagrams.
pub const IPV4_MIN_MTU: u16 = 68;
/// RFC 1812 section 4.3.2.3: an ICMPv4 error holds as much of the
/// original as fits in this many bytes.
pub const ICMPV4_ERROR_MAX: usize = 576;
/// RFC 4443 section 2.4 (c): an ICMPv6 error must not exceed the minimum
/// IPv6 MTU.
pub const ICMPV6_ERROR_MAX: usize = IPV6_MIN_MTU as usize;
const ICMP_HEADER_LEN: usize = 8;

/// The largest inner IP packet (with a plain 20- or 40-byte header) whose
/// ESP packet, with `encap`'s headers and an ICV of `icv` bytes, fits a
/// path MTU of `path_mtu`; `None` when not even an empty payload fits.
///
/// Transport mode: the outer IP header takes the inner one's place, ESP
/// adds SPI, sequence number and IV, the payload is padded so that payload
/// and 2-byte trailer end on 4 bytes (RFC 4303 section 2.4, what
/// [`esp::pad_len`] does), then the ICV; NAT-T adds 8 bytes of UDP
/// (RFC 3948). So with `room = path_mtu - ip - udp - 16 - icv`, a payload
/// `L` fits when `round_up_4(L + 2) <= room`, that is
/// `L <= round_down_4(room) - 2`.
pub fn usable_inner_mtu(path_mtu: u16, encap: Encap, ipv6: bool, icv: usize) -> Option<u16> {
    let ip = if ipv6 {
        IPV6_HEADER_LEN
    } else {
        IPV4_HEADER_LEN
    };
    let udp = if encap.is_udp() { UDP_HEADER_LEN } else { 0 };
    let room = usize::from(path_mtu).checked_sub(ip + udp + esp::HEADER_LEN + esp::IV_LEN + icv)?;
    let payload = (room & !3).checked_sub(esp::TRAILER_LEN)?;
    u16::try_from(ip + payload).ok()
}

/// The outer packet's size for an inner payload (the bytes after the
/// inner IP header) of `payload_len`: exactly what the sealing code sends.
pub fn outer_len(payload_len: usize, encap: Encap, ipv6: bool, icv: usize) -> usize {
    let ip = if ipv6 {
        IPV6_HEADER_LEN
    } else {
        IPV4_HEADER_LEN
    };
    let udp = if encap.is_udp() { UDP_HEADER_LEN } else { 0 };
    ip + udp
        + esp::HEADER_LEN
        + esp::IV_LEN
        + payload_len
        + esp::pad_len(payload_len)
        + esp::TRAILER_LEN
        + icv
}

/// Why no ICMP error was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IcmpError {
    #[error("the invoking packet is not a readable IP packet")]
    Malformed,
    #[error("the invoking packet is itself an ICMP error (never answered)")]
    AnswersAnError,
    #[error("the invoking packet's source cannot be answered (unspecified, multicast)")]
    Source,
    #[error("the output buffer is too small")]
    Buffer,
}

/// Whether an IPv4 ICMP type is an error message (RFC 792, RFC 1122
/// section 3.2.2): destination unreachable, source quench, redirect,
/// time exceeded, parameter problem.
fn is_icmpv4_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// The upper-layer protocol of an IPv6 packet and where it starts,
/// through at most 8 destination-options or hop-by-hop or routing
/// headers (RFC 8200 section 4); `None` past that or when truncated.
fn upper_layer_v6(packet: &[u8]) -> Option<(u8, usize)> {
    let mut proto = *packet.get(6)?;
    let mut at = IPV6_HEADER_LEN;
    for _ in 0..8 {
        match proto {
            protocol::IPV6_HOP_BY_HOP | protocol::IPV6_ROUTING | protocol::IPV6_DEST_OPTS => {
                let next = *packet.get(at)?;
                let len = (usize::from(*packet.get(at + 1)?) + 1) * 8;
                proto = next;
                at += len;
            }
            _ => return Some((proto, at)),
        }
    }
    None
}

/// Whether `packet` is an ICMP or ICMPv6 error message, which no ICMP
/// error may answer (a malformed packet counts as one: when in doubt,
/// stay silent).
pub fn is_icmp_error(packet: &[u8]) -> bool {
    match version(packet) {
        Ok(4) => match Ipv4Packet::new_checked(packet) {
            Ok(ip) if ip.protocol() == protocol::ICMP => {
                // A non-first fragment has no ICMP header: not answered.
                ip.is_fragment() || ip.payload().first().is_none_or(|t| is_icmpv4_error(*t))
            }
            Ok(_) => false,
            Err(_) => true,
        },
        Ok(_) => match upper_layer_v6(packet) {
            // RFC 4443 section 2.1: types 0-127 are errors.
            Some((protocol::ICMPV6, at)) => packet.get(at).is_none_or(|t| *t < 128),
            Some((protocol::IPV6_FRAGMENT, _)) => true,
            Some(_) => false,
            None => true,
        },
        Err(_) => true,
    }
}

/// Builds, into `out`, the IPv4 ICMP "Fragmentation Needed and DF set"
/// (type 3 code 4) with next-hop MTU `mtu` (RFC 1191 section 4) that
/// answers `invoking`; returns its length. Its source is the invoking
/// packet's destination (the host the tunnel could not reach with it
/// whole, on the TUN device's side of the route), its destination the
/// invoking packet's source. TTL 64, DF clear, ID 0.
pub fn frag_needed_v4(invoking: &[u8], mtu: u16, out: &mut [u8]) -> Result<usize, IcmpError> {
    let ip = Ipv4Packet::new_checked(invoking).map_err(|_| IcmpError::Malformed)?;
    if is_icmp_error(invoking) {
        return Err(IcmpError::AnswersAnError);
    }
    let (src, dst) = (ip.src(), ip.dst());
    let to = std::net::Ipv4Addr::from(src);
    if to.is_unspecified() || to.is_multicast() || to.is_broadcast() {
        return Err(IcmpError::Source);
    }
    let original = &invoking[..usize::from(ip.total_len())];
    let quoted = original
        .len()
        .min(ICMPV4_ERROR_MAX - IPV4_HEADER_LEN - ICMP_HEADER_LEN);
    let total = IPV4_HEADER_LEN + ICMP_HEADER_LEN + quoted;
    let out = out.get_mut(..total).ok_or(IcmpError::Buffer)?;
    super::ip::emit_header(
        &mut out[..IPV4_HEADER_LEN],
        IpAddr::from(dst),
        IpAddr::from(src),
        protocol::ICMP,
        ICMP_HEADER_LEN + quoted,
        64,
    )
    .map_err(|_| IcmpError::Buffer)?;
    // An ICMP error is sent without DF (RFC 1191 leaves it; smaller than
    // any MTU anyway), so clear what emit_header sets.
    out[6] = 0;
    Ipv4Packet::new_unchecked(&mut out[..IPV4_HEADER_LEN]).fill_checksum();
    let icmp = &mut out[IPV4_HEADER_LEN..];
    icmp[..ICMP_HEADER_LEN].copy_from_slice(&[3, 4, 0, 0, 0, 0, 0, 0]);
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HEADER_LEN..].copy_from_slice(&original[..quoted]);
    let value = checksum::finish(sum(icmp));
    icmp[2..4].copy_from_slice(&value.to_be_bytes());
    Ok(total)
}

/// Builds, into `out`, the ICMPv6 Packet Too Big (type 2 code 0) with
/// MTU `mtu` (RFC 4443 section 3.2) that answers `invoking`; returns its
/// length. Addresses as in [`frag_needed_v4`]; hop limit 64.
pub fn packet_too_big_v6(invoking: &[u8], mtu: u32, out: &mut [u8]) -> Result<usize, IcmpError> {
    let ip = Ipv6Packet::new_checked(invoking).map_err(|_| IcmpError::Malformed)?;
    if is_icmp_error(invoking) {
        return Err(IcmpError::AnswersAnError);
    }
    let (src, dst) = (ip.src(), ip.dst());
    let to = std::net::Ipv6Addr::from(src);
    if to.is_unspecified() || to.is_multicast() {
        return Err(IcmpError::Source);
    }
    let original = &invoking[..IPV6_HEADER_LEN + usize::from(ip.payload_len())];
    let quoted = original
        .len()
        .min(ICMPV6_ERROR_MAX - IPV6_HEADER_LEN - ICMP_HEADER_LEN);
    let total = IPV6_HEADER_LEN + ICMP_HEADER_LEN + quoted;
    let out = out.get_mut(..total).ok_or(IcmpError::Buffer)?;
    let len = ICMP_HEADER_LEN + quoted;
    super::ip::emit_header(
        &mut out[..IPV6_HEADER_LEN],
        IpAddr::from(dst),
        IpAddr::from(src),
        protocol::ICMPV6,
        len,
        64,
    )
    .map_err(|_| IcmpError::Buffer)?;
    let icmp = &mut out[IPV6_HEADER_LEN..];
    icmp[..4].copy_from_slice(&[2, 0, 0, 0]);
    icmp[4..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HEADER_LEN..].copy_from_slice(&original[..quoted]);
    // RFC 4443 section 2.3: the checksum covers the pseudo-header.
    let pseudo = pseudo_header_v6(&dst, &src, protocol::ICMPV6, len as u32);
    let value = checksum::finish(combine(pseudo, sum(icmp)));
    icmp[2..4].copy_from_slice(&value.to_be_bytes());
    Ok(total)
}

/// `[inner] clamp_mss`: whether and how TCP SYNs get their MSS option
/// lowered on the way through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MssClamp {
    /// SYNs pass unchanged; senders learn from Packet Too Big alone.
    #[default]
    Off,
    /// The MSS that fits the learned path MTU to the peer, or the tunnel
    /// MTU while none is learned.
    Auto,
    /// At most this many bytes.
    Fixed(u16),
}

/// The MSS that fits an inner MTU: the MTU less the plain IP and TCP
/// headers (RFC 879, RFC 8200 section 8.3).
pub fn mss_for_mtu(mtu: u16, ipv6: bool) -> u16 {
    let headers = if ipv6 { 40 + 20 } else { 20 + 20 };
    mtu.saturating_sub(headers)
}

/// Lowers the MSS option of a TCP SYN in `packet` (a whole IP packet) to
/// at most `max`, updating the TCP checksum incrementally (RFC 1624
/// equation 3: the caller validates the packet afterwards as usual, so a
/// wrong incremental update is caught, not sent). Returns the old MSS if
/// it was lowered; `None` for anything else (not TCP, not a SYN, no MSS
/// option, already small enough, malformed), which is left untouched.
pub fn clamp_mss(packet: &mut [u8], max: u16) -> Option<u16> {
    let (start, end) = match version(packet).ok()? {
        4 => {
            let ip = Ipv4Packet::new_checked(&*packet).ok()?;
            if ip.protocol() != protocol::TCP || ip.is_fragment() {
                return None;
            }
            (ip.header_len(), usize::from(ip.total_len()))
        }
        _ => {
            let ip = Ipv6Packet::new_checked(&*packet).ok()?;
            match upper_layer_v6(packet)? {
                (protocol::TCP, at) => (at, IPV6_HEADER_LEN + usize::from(ip.payload_len())),
                _ => return None,
            }
        }
    };
    let tcp = packet.get_mut(start..end)?;
    // RFC 9293 section 3.1: data offset in 32-bit words, SYN is 0x02.
    let data_offset = usize::from(*tcp.get(12)? >> 4) * 4;
    if data_offset < 20 || data_offset > tcp.len() || tcp[13] & 0x02 == 0 {
        return None;
    }
    let mut at = 20;
    while at < data_offset {
        match tcp[at] {
            0 => return None, // end of option list
            1 => at += 1,     // no-operation
            kind => {
                let len = usize::from(*tcp.get(at + 1)?);
                if len < 2 || at + len > data_offset {
                    return None;
                }
                // Kind 2, length 4: maximum segment size. The option
                // starts at an even offset in practice; an odd one is
                // left alone rather than summed across word boundaries.
                if kind == 2 && len == 4 && at % 2 == 0 {
                    let old = u16::from_be_bytes([tcp[at + 2], tcp[at + 3]]);
                    if old <= max {
                        return None;
                    }
                    let stored = u16::from_be_bytes([tcp[16], tcp[17]]);
                    let updated = checksum::update(stored, old, max);
                    tcp[at + 2..at + 4].copy_from_slice(&max.to_be_bytes());
                    tcp[16..18].copy_from_slice(&updated.to_be_bytes());
                    return Some(old);
                }
                at += len;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::inner::{InnerPolicy, validate};

    const A4: [u8; 4] = [198, 18, 0, 1];
    const B4: [u8; 4] = [198, 19, 0, 2];
    const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// An IP packet around `segment`, whose checksum field at `csum_at`
    /// is filled in (ICMPv4 has no pseudo-header).
    fn packet(v6: bool, proto: u8, mut segment: Vec<u8>, csum_at: usize) -> Vec<u8> {
        segment[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
        let pseudo = match (v6, proto) {
            (false, protocol::ICMP) => 0,
            (false, _) => checksum::pseudo_header_v4(A4, B4, proto, segment.len() as u16),
            (true, _) => pseudo_header_v6(&A6, &B6, proto, segment.len() as u32),
        };
        let value = checksum::finish(combine(pseudo, sum(&segment)));
        segment[csum_at..csum_at + 2].copy_from_slice(&value.to_be_bytes());
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (A6.into(), B6.into())
        } else {
            (A4.into(), B4.into())
        };
        let mut p = vec![0u8; if v6 { 40 } else { 20 }];
        super::super::ip::emit_header(&mut p, src, dst, proto, segment.len(), 64).expect("fits");
        p.extend_from_slice(&segment);
        p
    }

    fn icmp(v6: bool, segment: &[u8]) -> Vec<u8> {
        let proto = if v6 { protocol::ICMPV6 } else { protocol::ICMP };
        packet(v6, proto, segment.to_vec(), 2)
    }

    /// A UDP datagram of `len` payload bytes with a valid checksum.
    fn udp(v6: bool, len: usize) -> Vec<u8> {
        let mut seg = vec![0u8; 8 + len];
        seg[0..2].copy_from_slice(&5000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&5001u16.to_be_bytes());
        seg[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        for (i, b) in seg[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        packet(v6, protocol::UDP, seg, 6)
    }

    #[test]
    fn usable_mtu_is_exact_for_every_encap_icv_and_version() {
        for encap in [Encap::NATT, Encap::RawEsp] {
            for v6 in [false, true] {
                for icv in [8, 12, 16] {
                    for path in [576u16, 1000, 1280, 1281, 1282, 1283, 1400, 1500, 9000] {
                        let ip = if v6 { 40 } else { 20 };
                        let Some(mtu) = usable_inner_mtu(path, encap, v6, icv) else {
                            panic!("{path} leaves room");
                        };
                        let fits = outer_len(usize::from(mtu) - ip, encap, v6, icv);
                        assert!(
                            fits <= usize::from(path),
                            "{encap} v6={v6} icv={icv} {path}"
                        );
                        let over = outer_len(usize::from(mtu) + 1 - ip, encap, v6, icv);
                        assert!(over > usize::from(path), "{encap} v6={v6} icv={icv} {path}");
                        // Never more than the worst case of Encap::overhead.
                        assert!(usize::from(mtu) + encap.overhead() >= usize::from(path));
                    }
                }
            }
        }
        // Worked example: NAT-T over IPv4 on a 1280 path, 16-byte ICV:
        // room 1280-20-8-16-16 = 1220, payload 1218, inner MTU 1238.
        assert_eq!(usable_inner_mtu(1280, Encap::NATT, false, 16), Some(1238));
        assert_eq!(outer_len(1218, Encap::NATT, false, 16), 1280);
        assert_eq!(usable_inner_mtu(1280, Encap::RawEsp, true, 16), Some(1246));
        assert_eq!(usable_inner_mtu(1280, Encap::NATT, true, 16), Some(1238));
        assert_eq!(usable_inner_mtu(40, Encap::NATT, false, 16), None);
        assert_eq!(usable_inner_mtu(64, Encap::NATT, false, 16), Some(22));
    }

    #[test]
    fn frag_needed_parses_back_with_checksums_and_a_576_byte_cap() {
        for len in [0, 100, 2000] {
            let invoking = udp(false, len);
            let mut out = [0u8; 1500];
            let n = frag_needed_v4(&invoking, 1238, &mut out).expect("built");
            assert_eq!(n, (28 + invoking.len()).min(576));
            let reply = &out[..n];
            let ip = Ipv4Packet::new_checked(reply).expect("ip");
            assert!(ip.verify_checksum());
            assert_eq!(
                (ip.src(), ip.dst(), ip.protocol()),
                (B4, A4, protocol::ICMP)
            );
            let icmp = ip.payload();
            assert_eq!(&icmp[..2], &[3, 4]);
            assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1238);
            assert!(checksum::is_valid(sum(icmp)));
            assert_eq!(&icmp[8..], &invoking[..icmp.len() - 8]);
            // The daemon's own inner check accepts what it will write.
            assert!(validate(reply, InnerPolicy::default()).is_ok());
            // And an error is never answered.
            assert_eq!(
                frag_needed_v4(reply, 1000, &mut [0u8; 600]),
                Err(IcmpError::AnswersAnError)
            );
        }
        assert_eq!(
            frag_needed_v4(&udp(false, 100), 1238, &mut [0u8; 50]),
            Err(IcmpError::Buffer)
        );
        assert_eq!(
            frag_needed_v4(&[0x45, 0], 1238, &mut [0u8; 600]),
            Err(IcmpError::Malformed)
        );
    }

    #[test]
    fn packet_too_big_parses_back_with_checksums_and_a_1280_byte_cap() {
        for len in [0, 500, 3000] {
            let invoking = udp(true, len);
            let mut out = [0u8; 1500];
            let n = packet_too_big_v6(&invoking, 1280, &mut out).expect("built");
            assert_eq!(n, (48 + invoking.len()).min(1280));
            let reply = &out[..n];
            let ip = Ipv6Packet::new_checked(reply).expect("ip");
            assert_eq!(
                (ip.src(), ip.dst(), ip.next_header()),
                (B6, A6, protocol::ICMPV6)
            );
            let icmp = ip.payload();
            assert_eq!(&icmp[..2], &[2, 0]);
            assert_eq!(
                u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
                1280
            );
            assert_eq!(&icmp[8..], &invoking[..icmp.len() - 8]);
            assert!(validate(reply, InnerPolicy::default()).is_ok(), "checksum");
            assert_eq!(
                packet_too_big_v6(reply, 1280, &mut [0u8; 1500]),
                Err(IcmpError::AnswersAnError)
            );
        }
        // An echo request is answered; a multicast source is not.
        let echo = icmp(true, &[128, 0, 0, 0, 0, 1, 0, 1]);
        assert!(!is_icmp_error(&echo));
        let mut from_multicast = udp(true, 10);
        from_multicast[8] = 0xff;
        assert_eq!(
            packet_too_big_v6(&from_multicast, 1280, &mut [0u8; 1500]),
            Err(IcmpError::Source)
        );
    }

    #[test]
    fn icmp_errors_are_recognised_in_both_versions() {
        let unreachable = icmp(false, &[3, 1, 0, 0, 0, 0, 0, 0]);
        let echo = icmp(false, &[8, 0, 0, 0, 0, 1, 0, 1]);
        assert!(is_icmp_error(&unreachable));
        assert!(!is_icmp_error(&echo));
        assert!(!is_icmp_error(&udp(false, 1)));
        let v6_error = icmp(true, &[1, 4, 0, 0, 0, 0, 0, 0]);
        assert!(is_icmp_error(&v6_error));
        // Behind a destination-options header.
        let opts = [protocol::ICMPV6, 0, 1, 4, 0, 0, 0, 0];
        let mut behind = icmp(true, &[1, 4, 0, 0, 0, 0, 0, 0]);
        behind[6] = protocol::IPV6_DEST_OPTS;
        behind.splice(40..40, opts);
        behind[5] += 8;
        assert!(is_icmp_error(&behind));
        assert!(is_icmp_error(&[]), "unreadable: never answered");
    }

    /// A TCP SYN with the given options and a valid checksum.
    fn syn(v6: bool, options: &[u8]) -> Vec<u8> {
        let mut seg = vec![0u8; 20];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&5001u16.to_be_bytes());
        seg[12] = (((20 + options.len()) / 4) << 4) as u8;
        seg[13] = 0x02;
        seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
        seg.extend_from_slice(options);
        packet(v6, protocol::TCP, seg, 16)
    }

    #[test]
    fn mss_is_clamped_with_a_valid_incremental_checksum() {
        // MSS 1460, SACK permitted, timestamps, NOP, window scale: Linux's.
        let options = [
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        for v6 in [false, true] {
            let mut p = syn(v6, &options);
            let start = if v6 { 40 } else { 20 };
            assert_eq!(clamp_mss(&mut p, 1198), Some(1460));
            assert_eq!(&p[start + 22..start + 24], &1198u16.to_be_bytes());
            assert!(validate(&p, InnerPolicy::default()).is_ok(), "v6={v6}");
            // Already small enough, or not a SYN: untouched.
            let before = p.clone();
            assert_eq!(clamp_mss(&mut p, 1400), None);
            assert_eq!(p, before);
            let mut ack = syn(v6, &options);
            ack[start + 13] = 0x10;
            assert_eq!(clamp_mss(&mut ack, 500), None);
        }
        // Truncated and looping option lists are refused, not followed.
        let mut bad = syn(false, &[2, 0, 0, 0]);
        assert_eq!(clamp_mss(&mut bad, 500), None);
        let mut bad = syn(false, &[8, 9, 0, 0]);
        assert_eq!(clamp_mss(&mut bad, 500), None);
        for len in 0..60 {
            let mut p = syn(false, &options);
            p.truncate(len);
            let _ = clamp_mss(&mut p, 500);
        }
    }

    /// RFC 1624 section 3: equation 3 (`checksum::update`) never turns a
    /// checksum that must be 0x0000 into 0xFFFF (-0) or the reverse. The
    /// sweep over the window field reaches segments whose clamped checksum
    /// is 0x0000; every incremental result must equal a full recomputation.
    #[test]
    fn rfc1624_corner_case_matches_a_full_recomputation() {
        let options = [2, 4, 0x05, 0xb4];
        let mut seen_corner = false;
        for pad in 0..=0xFFFFu16 {
            let mut p = syn(false, &options);
            // Vary the window field and fix the checksum.
            p[34..36].copy_from_slice(&pad.to_be_bytes());
            p[36..38].copy_from_slice(&[0, 0]);
            let pseudo = checksum::pseudo_header_v4(A4, B4, protocol::TCP, 24);
            let value = checksum::finish(combine(pseudo, sum(&p[20..])));
            p[36..38].copy_from_slice(&value.to_be_bytes());
            assert_eq!(clamp_mss(&mut p, 1000), Some(1460));
            let incremental = u16::from_be_bytes([p[36], p[37]]);
            p[36..38].copy_from_slice(&[0, 0]);
            let full = checksum::finish(combine(pseudo, sum(&p[20..])));
            assert_eq!(incremental, full, "window {pad:#x}");
            if full == 0 {
                seen_corner = true;
            }
        }
        assert!(seen_corner, "the sweep reached the RFC 1624 corner");
        // The RFC's own example: HC 0xDD2F, field 0x5555 -> 0x3285; the
        // right answer is 0x0000 (equation 2 would give 0xFFFF), and back.
        assert_eq!(checksum::update(0xDD2F, 0x5555, 0x3285), 0x0000);
        assert_eq!(checksum::update(0x0000, 0x3285, 0x5555), 0xDD2F);
    }
}
