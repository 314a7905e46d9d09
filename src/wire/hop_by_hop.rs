//! Carrying an inner IPv6 hop-by-hop options header on the outer packet:
//! the wire half of `[inner] ipv6_hop_by_hop = "carry"` (by default such
//! packets are dropped as `hop_by_hop`).
//!
//! In transport mode ESP goes after the hop-by-hop, routing and fragment
//! headers (RFC 4303 section 3.1.1): they are the outer header's. So the
//! sender seals from what follows the hop-by-hop header on, and hands the
//! header's bytes to the socket (`IPV6_HOPOPTS`, RFC 3542 section 6.3);
//! the receiver gets them from its socket (`IPV6_RECVHOPOPTS`) and puts
//! them back between the rebuilt IPv6 header and the decrypted payload.
//! The transport checksum does not cover them (RFC 8200 section 8.1: the
//! pseudo-header's length is the upper-layer length), so it is verified
//! exactly as without them.

use std::net::IpAddr;

use super::inner::{self, InnerError, InnerPolicy, Pseudo, Validated};
use super::ip::{self, IPV6_HEADER_LEN, Ipv6Packet, protocol};

/// The largest hop-by-hop header carried: 64 bytes holds a router alert
/// (RFC 2711) or a few small options with room to spare, and bounds the
/// per-packet side buffer. Larger ones are dropped as `hop_by_hop`.
pub const MAX_LEN: usize = 64;

/// A slot length no header has: "came with one too long to carry".
const TOO_LONG: u8 = u8::MAX;

/// An inner packet's hop-by-hop header, where it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopByHop {
    /// Its length in bytes (a multiple of 8, at most [`MAX_LEN`]).
    pub len: usize,
    /// The header after it: ESP's next header once it is left out.
    pub next: u8,
}

/// The hop-by-hop header of `packet` if it is IPv6 and has one (RFC 8200
/// section 4.1: it can only come first). `Err(HopByHop)` if it is longer
/// than [`MAX_LEN`], `Err(TransportHeader)` if it is cut short.
pub fn first_header(packet: &[u8]) -> Result<Option<HopByHop>, InnerError> {
    if ip::version(packet)? != 6 {
        return Ok(None);
    }
    let ip = Ipv6Packet::new_checked(packet)?;
    if ip.next_header() != protocol::IPV6_HOP_BY_HOP {
        return Ok(None);
    }
    // RFC 8200 section 4.3: next header, then the length in 8-octet units
    // not counting the first 8.
    let [next, units, ..] = *ip.payload() else {
        return Err(InnerError::TransportHeader);
    };
    let len = (usize::from(units) + 1) * 8;
    if len > MAX_LEN {
        return Err(InnerError::HopByHop);
    }
    if len > ip.payload().len() {
        return Err(InnerError::TransportHeader);
    }
    Ok(Some(HopByHop { len, next }))
}

/// Validates an IPv6 packet with a hop-by-hop header as it will be sealed:
/// the transport checksum behind the header (destination options walked
/// as usual; a second hop-by-hop header or a routing header is refused).
/// `hbh` is the packet's header as [`first_header`] found it (taken, not
/// parsed again). The result's `header_len` covers the IPv6 and hop-by-hop
/// headers, which stay outside ESP, so the ESP header goes right behind
/// them, and its `protocol` is the header after the hop-by-hop header:
/// ESP's next header.
pub fn validate_behind(
    packet: &[u8],
    hbh: HopByHop,
    policy: InnerPolicy,
) -> Result<Validated, InnerError> {
    let ip = Ipv6Packet::new_checked(packet)?;
    let (src, dst) = (ip.src(), ip.dst());
    let total_len = IPV6_HEADER_LEN + usize::from(ip.payload_len());
    let segment = ip
        .payload()
        .get(hbh.len..)
        .ok_or(InnerError::TransportHeader)?;
    let verdict = inner::validate_segment(Pseudo::V6(src, dst), hbh.next, segment, policy)?;
    Ok(Validated {
        verdict,
        header_len: IPV6_HEADER_LEN + hbh.len,
        total_len,
        protocol: hbh.next,
        src: IpAddr::from(src),
        dst: IpAddr::from(dst),
    })
}

/// Inbound: writes `hop_by_hop` (as the socket reported the outer packet's,
/// its next-header byte replaced by `next_header`, ESP's) into the space
/// right before `payload_start`, and an IPv6 header before that whose next
/// header is hop-by-hop and whose payload length counts it; returns where
/// the IPv6 header starts. `Err(HopByHop)` for a header that is not a
/// well-formed one of at most [`MAX_LEN`] bytes, `Err(Ip(_))` for no room.
#[allow(clippy::too_many_arguments)]
pub fn rebuild_v6(
    storage: &mut [u8],
    payload_start: usize,
    payload_len: usize,
    next_header: u8,
    src: IpAddr,
    dst: IpAddr,
    hop_limit: u8,
    tos: u8,
    hop_by_hop: &[u8],
) -> Result<usize, InnerError> {
    let well_formed = match hop_by_hop {
        [_, units, ..] => (usize::from(*units) + 1) * 8 == hop_by_hop.len(),
        _ => false,
    };
    if !well_formed || hop_by_hop.len() > MAX_LEN || !src.is_ipv6() {
        return Err(InnerError::HopByHop);
    }
    let hbh_start = payload_start
        .checked_sub(hop_by_hop.len())
        .ok_or(InnerError::Ip(ip::IpError::Truncated))?;
    let start = hbh_start
        .checked_sub(IPV6_HEADER_LEN)
        .ok_or(InnerError::Ip(ip::IpError::Truncated))?;
    let header = storage
        .get_mut(start..payload_start)
        .ok_or(InnerError::Ip(ip::IpError::Truncated))?;
    let (ipv6, hbh) = header.split_at_mut(IPV6_HEADER_LEN);
    ip::emit_header_with_tos(
        ipv6,
        src,
        dst,
        protocol::IPV6_HOP_BY_HOP,
        hop_by_hop.len() + payload_len,
        hop_limit,
        tos,
    )?;
    hbh.copy_from_slice(hop_by_hop);
    hbh[0] = next_header;
    Ok(start)
}

/// One hop-by-hop header per packet of a batch, allocated once: the
/// sender copies a packet's header here before sealing overwrites it (the
/// ESP header goes where its last bytes were) and hands it to the socket
/// from here; the receiver keeps the one its socket reported here.
#[derive(Debug, Clone)]
pub struct Slots {
    bytes: Box<[[u8; MAX_LEN]]>,
    lens: Box<[u8]>,
}

impl Slots {
    /// Room for `count` packets, none holding a header.
    pub fn new(count: usize) -> Self {
        Slots {
            bytes: vec![[0u8; MAX_LEN]; count].into_boxed_slice(),
            lens: vec![0u8; count].into_boxed_slice(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Keeps `header` for packet `index`; false (and nothing kept) if the
    /// index is out of range or the header longer than [`MAX_LEN`].
    pub fn set(&mut self, index: usize, header: &[u8]) -> bool {
        match (self.bytes.get_mut(index), self.lens.get_mut(index)) {
            (Some(slot), Some(len)) if header.len() <= MAX_LEN => {
                slot[..header.len()].copy_from_slice(header);
                *len = header.len() as u8;
                true
            }
            _ => false,
        }
    }

    /// Packet `index`'s header; empty if none (or too long, see
    /// [`Self::set_too_long`]).
    pub fn get(&self, index: usize) -> &[u8] {
        match (self.bytes.get(index), self.lens.get(index)) {
            (Some(slot), Some(&len)) if usize::from(len) <= MAX_LEN => &slot[..usize::from(len)],
            _ => &[],
        }
    }

    /// Marks packet `index` as having come with a header this side does
    /// not carry (longer than [`MAX_LEN`], or cut short by the socket's
    /// control buffer): the receiver drops it as `hop_by_hop` rather than
    /// deliver it without the header.
    pub fn set_too_long(&mut self, index: usize) {
        if let Some(len) = self.lens.get_mut(index) {
            *len = TOO_LONG;
        }
    }

    pub fn is_too_long(&self, index: usize) -> bool {
        self.lens.get(index) == Some(&TOO_LONG)
    }

    /// Makes slot `to` what `from`'s slot `index` is (a header, none, or
    /// too long): a packet keeps its header when it moves in the batch.
    pub fn copy_from(&mut self, to: usize, from: &Slots, index: usize) {
        if from.is_too_long(index) {
            self.set_too_long(to);
        } else if !self.set(to, from.get(index)) {
            self.clear(to);
        }
    }

    pub fn clear(&mut self, index: usize) {
        if let Some(len) = self.lens.get_mut(index) {
            *len = 0;
        }
    }

    pub fn clear_all(&mut self) {
        self.lens.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::inner::{InnerVerdict, build, validate};

    const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    /// PadN plus an experimental option (RFC 4727), 16 bytes.
    const OPTIONS: [u8; 14] = [0x1e, 4, 0xde, 0xad, 0xbe, 0xef, 1, 6, 0, 0, 0, 0, 0, 0];

    /// `plain` (IPv6, no extension headers) with a hop-by-hop header of
    /// `options` (whose length plus 2 is a multiple of 8) in front of its
    /// transport header.
    fn with_hop_by_hop(plain: &[u8], options: &[u8]) -> Vec<u8> {
        let mut p = plain[..40].to_vec();
        let next = p[6];
        p[6] = protocol::IPV6_HOP_BY_HOP;
        let hbh_len = options.len() + 2;
        assert_eq!(hbh_len % 8, 0);
        let len = u16::from_be_bytes([p[4], p[5]]) + hbh_len as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p.push(next);
        p.push((hbh_len / 8 - 1) as u8);
        p.extend_from_slice(options);
        p.extend_from_slice(&plain[40..]);
        p
    }

    #[test]
    fn the_seal_starts_behind_the_hop_by_hop_header() {
        for proto in [protocol::TCP, protocol::UDP, protocol::ICMPV6] {
            let plain = build::ipv6(A6, B6, proto, b"behind hop-by-hop options");
            let p = with_hop_by_hop(&plain, &OPTIONS);
            // Dropped by name unless carried.
            assert_eq!(
                validate(&p, InnerPolicy::default()),
                Err(InnerError::HopByHop)
            );
            let hbh = first_header(&p).expect("valid").expect("has one");
            let v = validate_behind(&p, hbh, InnerPolicy::default()).expect("valid");
            assert_eq!(
                hbh,
                HopByHop {
                    len: 16,
                    next: proto
                }
            );
            assert_eq!(v.verdict, InnerVerdict::Verified);
            assert_eq!(v.header_len, 56, "ESP goes behind IPv6 + hop-by-hop");
            assert_eq!(v.protocol, proto, "ESP's next header");
            assert_eq!(v.total_len, p.len());
            // What is sealed is exactly the plain packet's payload.
            assert_eq!(&p[v.header_len..v.total_len], &plain[40..]);
            // The transport checksum behind it is still checked.
            let mut bad = p.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert_eq!(
                validate_behind(&bad, hbh, InnerPolicy::default()).map(|v| v.verdict),
                Err(InnerError::Checksum)
            );
        }
    }

    #[test]
    fn long_truncated_or_absent_hop_by_hop_headers_are_typed() {
        let plain = build::ipv6(A6, B6, protocol::UDP, b"x");
        assert_eq!(first_header(&plain), Ok(None));
        let v4 = build::ipv4([198, 18, 0, 1], [198, 18, 0, 2], protocol::UDP, b"x");
        assert_eq!(first_header(&v4), Ok(None));
        // 64 bytes is carried, 72 is not.
        let most = with_hop_by_hop(
            &plain,
            &[1, 60].iter().copied().chain([0; 60]).collect::<Vec<_>>(),
        );
        assert_eq!(
            first_header(&most),
            Ok(Some(HopByHop {
                len: 64,
                next: protocol::UDP
            }))
        );
        let hbh = first_header(&most).expect("valid").expect("has one");
        assert!(validate_behind(&most, hbh, InnerPolicy::default()).is_ok());
        let long = with_hop_by_hop(
            &plain,
            &[1, 68].iter().copied().chain([0; 68]).collect::<Vec<_>>(),
        );
        assert_eq!(first_header(&long), Err(InnerError::HopByHop));
        let mut cut = with_hop_by_hop(&plain, &OPTIONS);
        cut[41] = 5; // claims 48 bytes, the packet has 25 behind IPv6
        assert_eq!(first_header(&cut), Err(InnerError::TransportHeader));
        // A routing header behind it is still refused by name.
        let mut routed = with_hop_by_hop(&plain, &OPTIONS);
        routed[40] = protocol::IPV6_ROUTING;
        let hbh = first_header(&routed).expect("valid").expect("has one");
        assert_eq!(
            validate_behind(&routed, hbh, InnerPolicy::default()).map(|v| v.verdict),
            Err(InnerError::RoutingHeader)
        );
        // A header that is not there (more bytes than follow IPv6).
        assert_eq!(
            validate_behind(&plain, hbh, InnerPolicy::default()).map(|v| v.verdict),
            Err(InnerError::TransportHeader)
        );
    }

    #[test]
    fn the_receiver_rebuilds_the_packet_the_sender_sealed() {
        for proto in [protocol::TCP, protocol::UDP, protocol::ICMPV6] {
            let plain = build::ipv6(A6, B6, proto, b"round trip");
            let sent = with_hop_by_hop(&plain, &OPTIONS);
            let hbh = first_header(&sent).expect("valid").expect("has one");
            let v = validate_behind(&sent, hbh, InnerPolicy::default()).expect("valid");
            // What the receiver has: the decrypted payload at some offset,
            // and the header as IPV6_RECVHOPOPTS reports it (the outer
            // packet's next header there, ESP's 50, not the inner one).
            let payload = &sent[v.header_len..v.total_len];
            let mut reported = sent[40..40 + hbh.len].to_vec();
            reported[0] = 50;
            let mut storage = vec![0xAAu8; 200 + payload.len()];
            let at = 120;
            storage[at..at + payload.len()].copy_from_slice(payload);
            let start = rebuild_v6(
                &mut storage,
                at,
                payload.len(),
                v.protocol,
                v.src,
                v.dst,
                64,
                0,
                &reported,
            )
            .expect("room");
            let rebuilt = &storage[start..at + payload.len()];
            assert_eq!(rebuilt, &sent[..], "{proto}");
        }
    }

    #[test]
    fn rebuilding_refuses_bad_headers_and_missing_room() {
        let (a, b) = (IpAddr::from(A6), IpAddr::from(B6));
        let mut storage = [0u8; 128];
        let hbh = [0u8, 0, 1, 4, 0, 0, 0, 0];
        let r = |s: &mut [u8], at, h: &[u8]| rebuild_v6(s, at, 8, 17, a, b, 64, 0, h);
        assert_eq!(r(&mut storage, 100, &hbh), Ok(52));
        assert_eq!(
            r(&mut storage, 40, &hbh),
            Err(InnerError::Ip(ip::IpError::Truncated))
        );
        // Length byte disagreeing with the bytes, too short, too long.
        assert_eq!(
            r(&mut storage, 100, &[0, 1, 1, 4, 0, 0, 0, 0]),
            Err(InnerError::HopByHop)
        );
        assert_eq!(r(&mut storage, 100, &[0]), Err(InnerError::HopByHop));
        let mut long = [0u8; 72];
        long[1] = 8;
        assert_eq!(r(&mut storage, 110, &long), Err(InnerError::HopByHop));
        let v4 = IpAddr::from([198, 18, 0, 1]);
        assert_eq!(
            rebuild_v6(&mut storage, 100, 8, 17, v4, v4, 64, 0, &hbh),
            Err(InnerError::HopByHop)
        );
    }

    #[test]
    fn slots_keep_one_bounded_header_per_packet() {
        let mut s = Slots::new(4);
        assert_eq!(s.capacity(), 4);
        assert!(s.get(0).is_empty());
        assert!(s.set(1, &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(s.get(1), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(s.get(2).is_empty());
        assert!(!s.set(4, &[0; 8]), "out of range");
        assert!(!s.set(0, &[0; MAX_LEN + 8]), "too long");
        assert!(s.get(0).is_empty());
        assert!(s.set(3, &[9; MAX_LEN]));
        s.clear(1);
        assert!(s.get(1).is_empty());
        assert_eq!(s.get(3).len(), MAX_LEN);
        s.clear_all();
        assert!(s.get(3).is_empty());
        assert!(s.get(99).is_empty());
        // Too long: no header, but marked, and copied as such.
        s.set_too_long(2);
        assert!(s.get(2).is_empty() && s.is_too_long(2));
        let mut t = Slots::new(2);
        t.copy_from(0, &s, 2);
        assert!(t.is_too_long(0));
        assert!(s.set(1, &[7; 8]));
        t.copy_from(0, &s, 1);
        assert!(!t.is_too_long(0));
        assert_eq!(t.get(0), &[7; 8]);
        t.copy_from(0, &s, 0);
        assert!(t.get(0).is_empty() && !t.is_too_long(0));
        assert!(s.set(2, &[1; 8]), "a set header replaces the mark");
        assert!(!s.is_too_long(2));
    }
}
