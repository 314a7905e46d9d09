//! IPv4 and IPv6 header views (after smoltcp's `wire::ipv4`/`ipv6`).
//!
//! `new_checked` validates every length the getters use, so after it
//! returns `Ok` no getter panics; `new_unchecked` is for buffers esptun
//! built itself. Setters exist only for what transport-mode ESP rewrites:
//! lengths, protocol/next header, the TOS/traffic class byte (DSCP and
//! ECN, see [`super::ecn`]) and the IPv4 header checksum.

use super::checksum;

/// Why an IP header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    #[error("buffer shorter than the IP header")]
    Truncated,
    #[error("IP version is not 4 or 6")]
    Version,
    #[error("IP header length field is invalid")]
    HeaderLength,
    #[error("IP total/payload length disagrees with the buffer")]
    TotalLength,
    #[error("IPv4 header checksum is wrong")]
    HeaderChecksum,
}

pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;

/// IP protocol numbers esptun handles.
pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ESP: u8 = 50;
    pub const ICMPV6: u8 = 58;
    /// RFC 4303 section 2.6: a dummy packet, to be discarded.
    pub const NO_NEXT_HEADER: u8 = 59;
    pub const UDPLITE: u8 = 136;
    /// IPv6 extension headers (RFC 8200 section 4).
    pub const IPV6_HOP_BY_HOP: u8 = 0;
    pub const IPV6_ROUTING: u8 = 43;
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const IPV6_DEST_OPTS: u8 = 60;
}

/// The IP version of a packet, from its first nibble.
pub fn version(packet: &[u8]) -> Result<u8, IpError> {
    match packet.first().map(|b| b >> 4) {
        None => Err(IpError::Truncated),
        Some(v @ (4 | 6)) => Ok(v),
        Some(_) => Err(IpError::Version),
    }
}

mod field4 {
    use std::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const TOTAL_LEN: Range<usize> = 2..4;
    pub const FLAGS_FRAG: Range<usize> = 6..8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

/// A view of an IPv4 packet.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Validates version, header length and total length (which may be
    /// shorter than the buffer; the rest is ignored). The header checksum
    /// is checked separately ([`Self::verify_checksum`]).
    pub fn new_checked(buffer: T) -> Result<Self, IpError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), IpError> {
        let data = self.buffer.as_ref();
        if data.len() < IPV4_HEADER_LEN {
            return Err(IpError::Truncated);
        }
        if data[field4::VER_IHL] >> 4 != 4 {
            return Err(IpError::Version);
        }
        let header_len = self.header_len();
        if header_len < IPV4_HEADER_LEN || header_len > data.len() {
            return Err(IpError::HeaderLength);
        }
        let total = usize::from(self.total_len());
        if total < header_len || total > data.len() {
            return Err(IpError::TotalLength);
        }
        Ok(())
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field4::VER_IHL] & 0x0F) * 4
    }

    pub fn total_len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field4::TOTAL_LEN])
    }

    /// The TOS byte: DSCP and ECN (RFC 2474, RFC 3168).
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[field4::TOS]
    }

    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field4::PROTOCOL]
    }

    pub fn src(&self) -> [u8; 4] {
        addr4(&self.buffer.as_ref()[field4::SRC])
    }

    pub fn dst(&self) -> [u8; 4] {
        addr4(&self.buffer.as_ref()[field4::DST])
    }

    /// A fragment: more-fragments set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        be16(&self.buffer.as_ref()[field4::FLAGS_FRAG]) & 0x3FFF != 0
    }

    pub fn verify_checksum(&self) -> bool {
        checksum::is_valid(checksum::sum(&self.buffer.as_ref()[..self.header_len()]))
    }

    /// The bytes after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets the TOS byte; the header checksum is then stale
    /// ([`Self::fill_checksum`]).
    pub fn set_tos(&mut self, tos: u8) {
        self.buffer.as_mut()[field4::TOS] = tos;
    }

    pub fn set_total_len(&mut self, len: u16) {
        self.buffer.as_mut()[field4::TOTAL_LEN].copy_from_slice(&len.to_be_bytes());
    }

    pub fn set_protocol(&mut self, protocol: u8) {
        self.buffer.as_mut()[field4::PROTOCOL] = protocol;
    }

    pub fn set_src(&mut self, addr: [u8; 4]) {
        self.buffer.as_mut()[field4::SRC].copy_from_slice(&addr);
    }

    pub fn set_dst(&mut self, addr: [u8; 4]) {
        self.buffer.as_mut()[field4::DST].copy_from_slice(&addr);
    }

    /// Recomputes the header checksum over the current header.
    pub fn fill_checksum(&mut self) {
        let header_len = self.header_len();
        let data = self.buffer.as_mut();
        data[field4::CHECKSUM].copy_from_slice(&[0, 0]);
        let value = checksum::finish(checksum::sum(&data[..header_len]));
        data[field4::CHECKSUM].copy_from_slice(&value.to_be_bytes());
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = self.header_len()..usize::from(self.total_len());
        &mut self.buffer.as_mut()[range]
    }
}

mod field6 {
    use std::ops::Range;
    pub const PAYLOAD_LEN: Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
}

/// A view of an IPv6 packet (fixed header only).
#[derive(Debug, Clone, Copy)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv6Packet { buffer }
    }

    pub fn new_checked(buffer: T) -> Result<Self, IpError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), IpError> {
        let data = self.buffer.as_ref();
        if data.len() < IPV6_HEADER_LEN {
            return Err(IpError::Truncated);
        }
        if data[0] >> 4 != 6 {
            return Err(IpError::Version);
        }
        // Jumbograms (payload length 0, RFC 2675) are not carried.
        let payload = usize::from(self.payload_len());
        if payload == 0 && data.len() > IPV6_HEADER_LEN || IPV6_HEADER_LEN + payload > data.len() {
            return Err(IpError::TotalLength);
        }
        Ok(())
    }

    pub fn payload_len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field6::PAYLOAD_LEN])
    }

    /// The traffic class: DSCP and ECN (RFC 8200 section 7), the 8 bits
    /// after the version nibble.
    pub fn traffic_class(&self) -> u8 {
        let b = self.buffer.as_ref();
        (b[0] << 4) | (b[1] >> 4)
    }

    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field6::NEXT_HEADER]
    }

    pub fn src(&self) -> [u8; 16] {
        addr16(&self.buffer.as_ref()[field6::SRC])
    }

    pub fn dst(&self) -> [u8; 16] {
        addr16(&self.buffer.as_ref()[field6::DST])
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[IPV6_HEADER_LEN..IPV6_HEADER_LEN + usize::from(self.payload_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets the traffic class, keeping the version and the flow label.
    pub fn set_traffic_class(&mut self, class: u8) {
        let b = self.buffer.as_mut();
        b[0] = (b[0] & 0xF0) | (class >> 4);
        b[1] = (class << 4) | (b[1] & 0x0F);
    }

    pub fn set_payload_len(&mut self, len: u16) {
        self.buffer.as_mut()[field6::PAYLOAD_LEN].copy_from_slice(&len.to_be_bytes());
    }

    pub fn set_next_header(&mut self, next_header: u8) {
        self.buffer.as_mut()[field6::NEXT_HEADER] = next_header;
    }

    pub fn set_src(&mut self, addr: [u8; 16]) {
        self.buffer.as_mut()[field6::SRC].copy_from_slice(&addr);
    }

    pub fn set_dst(&mut self, addr: [u8; 16]) {
        self.buffer.as_mut()[field6::DST].copy_from_slice(&addr);
    }
}

/// The TOS byte (IPv4) or traffic class (IPv6) of an IP packet; 0 for
/// anything else (callers have validated the header).
pub fn tos_of(packet: &[u8]) -> u8 {
    match (version(packet), packet.len()) {
        (Ok(4), 2..) => packet[field4::TOS],
        (Ok(6), 2..) => Ipv6Packet::new_unchecked(packet).traffic_class(),
        _ => 0,
    }
}

/// [`emit_header`] with a TOS byte (IPv4) or traffic class (IPv6), and
/// the IPv4 header checksum over it.
pub fn emit_header_with_tos(
    header: &mut [u8],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    protocol: u8,
    payload_len: usize,
    ttl: u8,
    tos: u8,
) -> Result<(), IpError> {
    emit_header(header, src, dst, protocol, payload_len, ttl)?;
    if tos != 0 {
        if src.is_ipv4() {
            let mut ip = Ipv4Packet::new_unchecked(header);
            ip.set_tos(tos);
            ip.fill_checksum();
        } else {
            Ipv6Packet::new_unchecked(header).set_traffic_class(tos);
        }
    }
    Ok(())
}

/// Writes a plain IP header (no options; IPv4 with DF set, ID 0, TOS 0)
/// for `payload_len` bytes of `protocol` into `header`, which must be
/// exactly 20 (IPv4) or 40 (IPv6) bytes to match the addresses.
pub fn emit_header(
    header: &mut [u8],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    protocol: u8,
    payload_len: usize,
    ttl: u8,
) -> Result<(), IpError> {
    use std::net::IpAddr;
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) if header.len() == IPV4_HEADER_LEN => {
            let total =
                u16::try_from(IPV4_HEADER_LEN + payload_len).map_err(|_| IpError::TotalLength)?;
            header.copy_from_slice(&[
                0x45, 0, 0, 0, 0, 0, 0x40, 0, ttl, protocol, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]);
            let mut ip = Ipv4Packet::new_unchecked(header);
            ip.set_total_len(total);
            ip.set_src(src.octets());
            ip.set_dst(dst.octets());
            ip.fill_checksum();
            Ok(())
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) if header.len() == IPV6_HEADER_LEN => {
            let len = u16::try_from(payload_len).map_err(|_| IpError::TotalLength)?;
            header.fill(0);
            header[0] = 0x60;
            header[7] = ttl;
            let mut ip = Ipv6Packet::new_unchecked(header);
            ip.set_payload_len(len);
            ip.set_next_header(protocol);
            ip.set_src(src.octets());
            ip.set_dst(dst.octets());
            Ok(())
        }
        _ => Err(IpError::HeaderLength),
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn addr4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

fn addr16(b: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv4/UDP packet of draft-mcgrew-gcm-test-01 case 2 (inner packet).
    const V4: &str = "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d001000001000000000000037369700963796265726369747902646b0000010001";

    fn v4() -> Vec<u8> {
        crate::hex::decode(V4).expect("hex")
    }

    #[test]
    fn parses_a_real_ipv4_packet() {
        let bytes = v4();
        let p = Ipv4Packet::new_checked(&bytes[..]).expect("valid");
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 62);
        assert_eq!(p.protocol(), protocol::UDP);
        assert_eq!(p.src(), [192, 168, 1, 2]);
        assert_eq!(p.dst(), [192, 168, 1, 1]);
        assert!(!p.is_fragment());
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 42);
    }

    #[test]
    fn every_truncation_and_bad_length_is_refused_without_panicking() {
        let bytes = v4();
        for len in 0..bytes.len() {
            let r = Ipv4Packet::new_checked(&bytes[..len]);
            assert!(r.is_err(), "len {len}");
        }
        let mut bad = v4();
        bad[0] = 0x44; // IHL 16 bytes
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..]).err(),
            Some(IpError::HeaderLength)
        );
        let mut bad = v4();
        bad[0] = 0x4F; // IHL 60 bytes, fine, but total 62 < buffer? header 60 <= 62
        bad[3] = 0x3d; // total 61
        assert!(Ipv4Packet::new_checked(&bad[..]).is_ok());
        bad[3] = 0x20; // total 32 < header 60
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..]).err(),
            Some(IpError::TotalLength)
        );
        let mut bad = v4();
        bad[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..]).err(),
            Some(IpError::Version)
        );
    }

    #[test]
    fn setters_and_fill_checksum_round_trip() {
        let mut bytes = v4();
        let mut p = Ipv4Packet::new_checked(&mut bytes[..]).expect("valid");
        p.set_protocol(protocol::ESP);
        p.set_total_len(60);
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.protocol(), protocol::ESP);
    }

    #[test]
    fn emitted_headers_parse_back() {
        let mut h4 = [0u8; 20];
        let (s4, d4) = (
            "198.18.0.1".parse().expect("ip"),
            "198.19.0.2".parse().expect("ip"),
        );
        emit_header(&mut h4, s4, d4, protocol::TCP, 100, 64).expect("v4");
        let mut p4 = h4.to_vec();
        p4.resize(120, 0);
        let ip = Ipv4Packet::new_checked(&p4[..]).expect("parses");
        assert!(ip.verify_checksum() && !ip.is_fragment());
        assert_eq!(
            (ip.total_len(), ip.protocol(), ip.src(), ip.dst()),
            (120, 6, [198, 18, 0, 1], [198, 19, 0, 2])
        );
        let mut h6 = [0xAAu8; 40];
        let (s6, d6) = (
            "2001:db8::1".parse().expect("ip"),
            "2001:db8::2".parse().expect("ip"),
        );
        emit_header(&mut h6, s6, d6, protocol::UDP, 8, 64).expect("v6");
        let mut p6 = h6.to_vec();
        p6.resize(48, 0);
        let ip = Ipv6Packet::new_checked(&p6[..]).expect("parses");
        assert_eq!(
            (ip.payload_len(), ip.next_header(), ip.src()[15]),
            (8, 17, 1)
        );
        assert_eq!(p6[1..4], [0, 0, 0], "traffic class and flow label cleared");
        assert_eq!(
            emit_header(&mut h4, s4, d6, 6, 0, 64),
            Err(IpError::HeaderLength)
        );
        assert_eq!(
            emit_header(&mut h4, s4, d4, 6, 65536, 64),
            Err(IpError::TotalLength)
        );
    }

    #[test]
    fn tos_and_traffic_class_are_written_with_a_correct_checksum() {
        let (s4, d4) = (
            "198.18.0.1".parse().expect("ip"),
            "198.19.0.2".parse().expect("ip"),
        );
        let mut h4 = [0u8; 20];
        emit_header_with_tos(&mut h4, s4, d4, protocol::UDP, 8, 64, 0xBA).expect("v4");
        let mut p4 = h4.to_vec();
        p4.resize(28, 0);
        let ip = Ipv4Packet::new_checked(&p4[..]).expect("parses");
        assert_eq!((ip.tos(), tos_of(&p4)), (0xBA, 0xBA));
        assert!(ip.verify_checksum(), "checksum covers the TOS byte");
        let mut plain = [0u8; 20];
        emit_header(&mut plain, s4, d4, protocol::UDP, 8, 64).expect("v4");
        assert_ne!(plain[10..12], h4[10..12], "the checksum changed with it");

        let (s6, d6) = (
            "2001:db8::1".parse().expect("ip"),
            "2001:db8::2".parse().expect("ip"),
        );
        let mut h6 = [0u8; 40];
        emit_header_with_tos(&mut h6, s6, d6, protocol::UDP, 0, 64, 0xBB).expect("v6");
        assert_eq!(
            h6[..4],
            [0x6B, 0xB0, 0, 0],
            "version 6, class 0xBB, no flow label"
        );
        let mut ip = Ipv6Packet::new_checked(&mut h6[..]).expect("parses");
        assert_eq!(ip.traffic_class(), 0xBB);
        // The flow label and version survive a change of class.
        let mut with_label = [0x60, 0x0A, 0xBC, 0xDE];
        Ipv6Packet::new_unchecked(&mut with_label[..]).set_traffic_class(0x2E);
        assert_eq!(with_label, [0x62, 0xEA, 0xBC, 0xDE]);
        ip.set_traffic_class(0);
        assert_eq!(tos_of(&h6), 0);
        assert_eq!(tos_of(&[]), 0);
    }

    #[test]
    fn fragments_are_recognised() {
        let mut bytes = v4();
        bytes[6] = 0x20; // more fragments
        assert!(Ipv4Packet::new_unchecked(&bytes[..]).is_fragment());
        bytes[6] = 0x40; // don't fragment only
        assert!(!Ipv4Packet::new_unchecked(&bytes[..]).is_fragment());
        bytes[7] = 0x01; // offset 8
        assert!(Ipv4Packet::new_unchecked(&bytes[..]).is_fragment());
    }

    #[test]
    fn ipv6_lengths_are_checked() {
        let mut bytes = vec![0u8; 48];
        bytes[0] = 0x60;
        bytes[5] = 8;
        bytes[6] = protocol::UDP;
        bytes[8] = 0x20;
        let p = Ipv6Packet::new_checked(&bytes[..]).expect("valid");
        assert_eq!(p.payload().len(), 8);
        assert_eq!(p.next_header(), protocol::UDP);
        assert_eq!(p.src()[0], 0x20);
        for len in 0..48 {
            assert!(Ipv6Packet::new_checked(&bytes[..len]).is_err(), "len {len}");
        }
        bytes[5] = 9;
        assert_eq!(
            Ipv6Packet::new_checked(&bytes[..]).err(),
            Some(IpError::TotalLength)
        );
        assert_eq!(version(&bytes), Ok(6));
        assert_eq!(version(&[]), Err(IpError::Truncated));
        assert_eq!(version(&[0x50]), Err(IpError::Version));
    }
}
