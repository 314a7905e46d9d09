//! The outer headers of an ESP packet on the wire: IPv4 or IPv6 with
//! protocol 50 (raw ESP), or with a UDP header on port 4500 (NAT-T,
//! RFC 3948), and the reverse.
//!
//! Sockets add these headers themselves for most sends; this module is for
//! the paths that see whole packets: raw IPv4 sockets (which deliver the IP
//! header), captures, and tests against other implementations.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::str::FromStr;

use super::checksum::{self, combine, pseudo_header_v6, sum};
use super::esp;
use super::ip::{
    self, IPV4_HEADER_LEN, IPV6_HEADER_LEN, IpError, Ipv4Packet, Ipv6Packet, protocol, version,
};

/// RFC 3948 section 2.1: the IKE/NAT-T port.
pub const NATT_PORT: u16 = 4500;
pub const UDP_HEADER_LEN: usize = 8;
/// Hop limit of packets esptun frames itself.
const TTL: u8 = 64;

/// How ESP is carried between the hosts: the one setting that the
/// configuration (`outer`, `port`), the outer sockets, the inbound pipeline
/// and `esptun status` share.
///
/// Its text form is `udp/PORT` or `esp` (what `esptun status` shows);
/// [`FromStr`] also takes a bare `udp` for the NAT-T port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encap {
    /// ESP in UDP (RFC 3948) on this local port (4500 by convention). The
    /// payload may also be a NAT-keepalive or an IKE message.
    Udp { port: u16 },
    /// ESP directly over IP, protocol 50: no ports, no keepalives.
    RawEsp,
}

impl Encap {
    /// UDP on the NAT-T port.
    pub const NATT: Encap = Encap::Udp { port: NATT_PORT };

    /// The configuration's word for it: `udp` or `esp`.
    pub const fn mode(self) -> &'static str {
        match self {
            Encap::Udp { .. } => "udp",
            Encap::RawEsp => "esp",
        }
    }

    pub const fn is_udp(self) -> bool {
        matches!(self, Encap::Udp { .. })
    }

    /// The local UDP port, `None` for raw ESP.
    pub const fn port(self) -> Option<u16> {
        match self {
            Encap::Udp { port } => Some(port),
            Encap::RawEsp => None,
        }
    }

    /// Bytes transport-mode ESP adds to an inner packet at most: the ESP
    /// header and IV (RFC 4106 section 3.1), padding, trailer and the
    /// largest ICV ([`esp::MAX_TAIL`]), and the UDP header of RFC 3948
    /// only when there is one. The IP header is reused (transport mode),
    /// so it adds nothing.
    pub const fn overhead(self) -> usize {
        let esp = esp::HEADER_LEN + esp::IV_LEN + esp::MAX_TAIL;
        match self {
            Encap::Udp { .. } => esp + UDP_HEADER_LEN,
            Encap::RawEsp => esp,
        }
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encap::Udp { port } => write!(f, "udp/{port}"),
            Encap::RawEsp => f.write_str("esp"),
        }
    }
}

impl FromStr for Encap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            None if s == "esp" => Ok(Encap::RawEsp),
            None if s == "udp" => Ok(Encap::NATT),
            Some(("udp", port)) => match port.parse::<u16>() {
                Ok(port) if port != 0 => Ok(Encap::Udp { port }),
                _ => Err(format!("{port:?} is not a UDP port: use 1 to 65535")),
            },
            _ => Err(format!(
                "{s:?} is not an outer mode: use \"udp\" (NAT-T, port 4500) or \"esp\" (IP protocol 50)"
            )),
        }
    }
}

impl serde::Serialize for Encap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Encap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The UDP ports of one packet's RFC 3948 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPorts {
    pub src: u16,
    pub dst: u16,
}

/// The outer addresses and encapsulation of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The UDP header's ports; `None` for raw ESP (protocol 50).
    pub udp: Option<UdpPorts>,
}

impl Outer {
    /// How this packet is carried, as seen from its sender.
    pub fn encap(&self) -> Encap {
        match self.udp {
            Some(ports) => Encap::Udp { port: ports.src },
            None => Encap::RawEsp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OuterError {
    #[error("outer IP header: {0}")]
    Ip(#[from] IpError),
    #[error("outer addresses are not the same IP version")]
    MixedFamilies,
    #[error("outer protocol {0} is neither ESP (50) nor UDP (17)")]
    Protocol(u8),
    #[error("outer UDP header truncated or its length is wrong")]
    UdpHeader,
    #[error("outer UDP checksum is wrong")]
    UdpChecksum,
    #[error("outer UDP checksum is zero over IPv6 (RFC 8200 section 8.1)")]
    ZeroUdpChecksumV6,
    #[error("packet too large for its outer header")]
    TooLong,
    #[error("outer IPv4 fragment: reassembly is not done here")]
    Fragment,
}

impl Outer {
    /// Bytes of header [`emit`] writes in front of the ESP packet.
    pub fn header_len(&self) -> usize {
        let ip = if self.src.is_ipv4() {
            IPV4_HEADER_LEN
        } else {
            IPV6_HEADER_LEN
        };
        match self.udp {
            None => ip,
            Some(_) => ip + UDP_HEADER_LEN,
        }
    }
}

/// Writes the outer headers into the first [`Outer::header_len`] bytes of
/// `packet`; the rest of `packet` is the ESP packet. The UDP checksum is
/// zero over IPv4 (RFC 3948 section 2.1: the ESP ICV protects the data) and
/// computed over IPv6, where zero is not allowed (RFC 8200 section 8.1).
pub fn emit(packet: &mut [u8], outer: &Outer) -> Result<(), OuterError> {
    let header_len = outer.header_len();
    if outer.src.is_ipv4() != outer.dst.is_ipv4() {
        return Err(OuterError::MixedFamilies);
    }
    if packet.len() < header_len {
        return Err(OuterError::TooLong);
    }
    let (ip_len, proto) = match outer.udp {
        None => (header_len, protocol::ESP),
        Some(_) => (header_len - UDP_HEADER_LEN, protocol::UDP),
    };
    if let Some(UdpPorts {
        src: src_port,
        dst: dst_port,
    }) = outer.udp
    {
        let udp_len = u16::try_from(packet.len() - ip_len).map_err(|_| OuterError::TooLong)?;
        let udp = &mut packet[ip_len..ip_len + UDP_HEADER_LEN];
        udp[0..2].copy_from_slice(&src_port.to_be_bytes());
        udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
        udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
        udp[6..8].copy_from_slice(&[0, 0]);
    }
    let payload_len = packet.len() - ip_len;
    ip::emit_header(
        &mut packet[..ip_len],
        outer.src,
        outer.dst,
        proto,
        payload_len,
        TTL,
    )
    .map_err(|_| OuterError::TooLong)?;
    if let (IpAddr::V6(src), IpAddr::V6(dst), protocol::UDP) = (outer.src, outer.dst, proto) {
        let segment = &packet[IPV6_HEADER_LEN..];
        let pseudo = pseudo_header_v6(
            &src.octets(),
            &dst.octets(),
            protocol::UDP,
            segment.len() as u32,
        );
        // RFC 768: a computed zero is sent as all ones.
        let value = match checksum::finish(combine(pseudo, sum(segment))) {
            0 => 0xFFFF,
            v => v,
        };
        packet[IPV6_HEADER_LEN + 6..IPV6_HEADER_LEN + 8].copy_from_slice(&value.to_be_bytes());
    }
    Ok(())
}

/// A received outer packet: who sent it, how, and where the ESP packet (or,
/// for UDP, the UDP payload: ESP, keepalive or IKE) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub outer: Outer,
    pub payload: Range<usize>,
}

/// Parses a whole outer packet.
pub fn parse(packet: &[u8]) -> Result<Parsed, OuterError> {
    let (src, dst, proto, start, end) = match version(packet)? {
        4 => {
            let ip = Ipv4Packet::new_checked(packet)?;
            if !ip.verify_checksum() {
                return Err(IpError::HeaderChecksum.into());
            }
            if ip.is_fragment() {
                return Err(OuterError::Fragment);
            }
            (
                IpAddr::from(ip.src()),
                IpAddr::from(ip.dst()),
                ip.protocol(),
                ip.header_len(),
                usize::from(ip.total_len()),
            )
        }
        _ => {
            let ip = Ipv6Packet::new_checked(packet)?;
            (
                IpAddr::from(ip.src()),
                IpAddr::from(ip.dst()),
                ip.next_header(),
                IPV6_HEADER_LEN,
                IPV6_HEADER_LEN + usize::from(ip.payload_len()),
            )
        }
    };
    match proto {
        protocol::ESP => Ok(Parsed {
            outer: Outer {
                src,
                dst,
                udp: None,
            },
            payload: start..end,
        }),
        protocol::UDP => {
            let udp = packet.get(start..end).ok_or(OuterError::UdpHeader)?;
            if udp.len() < UDP_HEADER_LEN || usize::from(be16(&udp[4..6])) != udp.len() {
                return Err(OuterError::UdpHeader);
            }
            let stored = be16(&udp[6..8]);
            match (src, dst) {
                (IpAddr::V6(..), _) if stored == 0 => return Err(OuterError::ZeroUdpChecksumV6),
                (IpAddr::V4(..), _) if stored == 0 => {}
                _ => {
                    let pseudo = match (src, dst) {
                        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(
                            s.octets(),
                            d.octets(),
                            protocol::UDP,
                            udp.len() as u16,
                        ),
                        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_header_v6(
                            &s.octets(),
                            &d.octets(),
                            protocol::UDP,
                            udp.len() as u32,
                        ),
                        _ => return Err(OuterError::MixedFamilies),
                    };
                    if !checksum::is_valid(combine(pseudo, sum(udp))) {
                        return Err(OuterError::UdpChecksum);
                    }
                }
            }
            Ok(Parsed {
                outer: Outer {
                    src,
                    dst,
                    udp: Some(UdpPorts {
                        src: be16(&udp[0..2]),
                        dst: be16(&udp[2..4]),
                    }),
                },
                payload: start + UDP_HEADER_LEN..end,
            })
        }
        other => Err(OuterError::Protocol(other)),
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(outer: &Outer, esp: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; outer.header_len()];
        p.extend_from_slice(esp);
        emit(&mut p, outer).expect("emit");
        p
    }

    #[test]
    fn emit_and_parse_round_trip_in_every_shape() {
        let esp: Vec<u8> = (0..77u8).collect();
        let v4 = (
            "198.18.0.1".parse().expect("ip"),
            "198.19.0.2".parse().expect("ip"),
        );
        let v6 = (
            "2001:db8::1".parse().expect("ip"),
            "2001:db8::2".parse().expect("ip"),
        );
        for (src, dst) in [v4, v6] {
            for udp in [
                None,
                Some(UdpPorts {
                    src: NATT_PORT,
                    dst: 40500,
                }),
            ] {
                let outer = Outer { src, dst, udp };
                let p = frame(&outer, &esp);
                let parsed = parse(&p).expect("parses");
                assert_eq!(parsed.outer, outer);
                assert_eq!(&p[parsed.payload], &esp[..]);
            }
        }
    }

    #[test]
    fn natt_udp_checksum_is_zero_over_ipv4_and_valid_over_ipv6() {
        let esp = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let udp = Some(UdpPorts {
            src: NATT_PORT,
            dst: NATT_PORT,
        });
        let v4 = frame(
            &Outer {
                src: "198.18.0.1".parse().expect("ip"),
                dst: "198.19.0.2".parse().expect("ip"),
                udp,
            },
            &esp,
        );
        assert_eq!(v4[26..28], [0, 0]);
        assert_eq!(v4[9], protocol::UDP);
        let v6 = frame(
            &Outer {
                src: "2001:db8::1".parse().expect("ip"),
                dst: "2001:db8::2".parse().expect("ip"),
                udp,
            },
            &esp,
        );
        assert_ne!(v6[46..48], [0, 0]);
        let mut bad = v6.clone();
        bad[50] ^= 1;
        assert_eq!(parse(&bad).err(), Some(OuterError::UdpChecksum));
        let mut zero = v6;
        zero[46..48].copy_from_slice(&[0, 0]);
        assert_eq!(parse(&zero).err(), Some(OuterError::ZeroUdpChecksumV6));
    }

    #[test]
    fn malformed_outer_packets_are_typed() {
        let outer = Outer {
            src: "198.18.0.1".parse().expect("ip"),
            dst: "198.19.0.2".parse().expect("ip"),
            udp: None,
        };
        let p = frame(&outer, &[9; 40]);
        for len in 0..20 {
            assert!(parse(&p[..len]).is_err(), "len {len}");
        }
        let mut bad = p.clone();
        bad[9] = 6;
        assert!(matches!(
            parse(&bad),
            Err(OuterError::Ip(IpError::HeaderChecksum))
        ));
        Ipv4Packet::new_unchecked(&mut bad[..]).fill_checksum();
        assert_eq!(parse(&bad).err(), Some(OuterError::Protocol(6)));
        let mut frag = p;
        frag[6] = 0x20;
        Ipv4Packet::new_unchecked(&mut frag[..]).fill_checksum();
        assert_eq!(parse(&frag).err(), Some(OuterError::Fragment));
        let mixed = Outer {
            dst: "2001:db8::2".parse().expect("ip"),
            ..outer
        };
        assert_eq!(
            emit(&mut [0u8; 60], &mixed).err(),
            Some(OuterError::MixedFamilies)
        );
    }

    #[test]
    fn encap_text_round_trips_and_overhead_counts_udp_only_when_present() {
        for (text, encap) in [
            ("udp/4500", Encap::NATT),
            ("udp/40500", Encap::Udp { port: 40500 }),
            ("esp", Encap::RawEsp),
        ] {
            assert_eq!(text.parse::<Encap>(), Ok(encap));
            assert_eq!(encap.to_string(), text);
            let json = serde_json::to_string(&encap).expect("json");
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(serde_json::from_str::<Encap>(&json).expect("back"), encap);
        }
        assert_eq!("udp".parse::<Encap>(), Ok(Encap::NATT));
        for bad in ["tcp", "udp/0", "udp/x", "esp/50", ""] {
            assert!(bad.parse::<Encap>().is_err(), "{bad:?}");
        }
        // 8 (SPI, seq) + 8 (IV) + 3 (pad) + 2 (trailer) + 16 (ICV), and the
        // UDP header for NAT-T.
        assert_eq!(Encap::RawEsp.overhead(), 37);
        assert_eq!(Encap::NATT.overhead(), 45);
        let outer = Outer {
            src: "198.18.0.1".parse().expect("ip"),
            dst: "198.19.0.2".parse().expect("ip"),
            udp: None,
        };
        assert_eq!(outer.encap(), Encap::RawEsp);
        let natt = Outer {
            udp: Some(UdpPorts {
                src: 4501,
                dst: NATT_PORT,
            }),
            ..outer
        };
        assert_eq!(natt.encap(), Encap::Udp { port: 4501 });
    }
}
