//! TCP/UDP segmentation offload at the TUN edge (`IFF_VNET_HDR` with
//! `TUNSETOFFLOAD` `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 |
//! TUN_F_USO6`), after wireguard-go's `tun/offload_linux.go` and the
//! kernel's `tcp_gso_segment()` / `__udp_gso_segment()` /
//! `tcp_gro_receive()`, but with one rule of esptun's own: no checksum is
//! ever produced from bytes esptun copied.
//!
//! Read side (`split`): the kernel hands over a packet and its
//! [`VirtioNetHdr`]. A non-GSO packet is finished in place
//! ([`complete_single`]); a TSO/USO super-packet is cut by a [`Splitter`]
//! into segments written straight into the caller's buffers. Each
//! segment's checksum is computed from the *source* payload (summed inside
//! the super-packet, not from the copy) plus the segment's own headers and
//! pseudo-header, then the copy is validated with `wire::inner::validate`:
//! a byte our copy changed fails that check instead of being sealed.
//! Every segment comes out with its [`Validated`], so the outbound
//! pipeline has nothing left to validate.
//!
//! Write side (`coalesce`): decrypted packets of one flow are appended to
//! a [`Train`] in a caller buffer that starts with room for the vnet
//! header. Only a [`Verified`] packet can be appended, and only
//! [`check`] makes one: `inner::validate` with verdict `Verified` (a policy
//! exception comes back as [`Checked::Exception`] and is written alone).
//! Each appended payload is checked again where it landed, because the
//! kernel trusts `NEEDS_CSUM` data and would deliver a corrupted copy.
//! A train of one is written with an all-zero header, which makes the
//! kernel verify the checksum itself.
//!
//! Wiring, for the TUN device and the pipelines:
//! - read: `VirtioNetHdr::parse(&buf[..10])`, then for
//!   `gso_type == NONE` [`complete_single`]`(&hdr, &mut buf[10..n], policy)`
//!   (no copy), else [`Splitter::new`]`(&hdr, &buf[10..n])`,
//!   [`Splitter::check_room`] against the free buffers, and
//!   [`Splitter::write_segment`] for `0..count()` into them.
//! - write: per batch, per flow: [`check`] each decrypted packet; start a
//!   [`Train`] in a buffer of at least [`TRAIN_BUFFER_LEN`] bytes with the
//!   first [`Verified`], [`Train::push`] the next ones of the flow in order
//!   until one is refused (the refusal says why; write the train with
//!   [`Train::finish`] and start a new one with the refused packet), and
//!   write single packets behind `[0u8; 10]`. Within a flow nothing may
//!   overtake: a train is written before the packet that ended it (a pure
//!   ACK, a FIN, a policy exception); different flows may interleave.
//!
//! No function here allocates, does I/O or panics on any input.

mod coalesce;
mod split;

pub use coalesce::{
    Checked, DEFAULT_MAX_SEGMENTS, NotCoalescible, Refused, TRAIN_BUFFER_LEN, Train, TrainConfig,
    Verified, check,
};
pub use split::{Splitter, complete_single};

use super::checksum::{pseudo_header_v4, pseudo_header_v6};
use super::inner::{InnerError, Pseudo};
use super::ip::{IPV6_HEADER_LEN, IpError, Ipv4Packet, Ipv6Packet, protocol, version};
use super::vnet::VnetError;

#[cfg(doc)]
use super::{inner::Validated, vnet::VirtioNetHdr};

/// The largest IP packet esptun splits or builds: the IPv4 total length
/// field's limit, and with the IPv6 header the payload length field's.
pub const MAX_PACKET_LEN: usize = IPV6_HEADER_LEN + 65535;

/// Why a packet from the TUN could not be finished or split. Each is a
/// drop reason of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    #[error("virtio-net header: {0}")]
    Vnet(#[from] VnetError),
    #[error("bad IP header: {0}")]
    Ip(#[from] IpError),
    #[error("virtio-net GSO type {0:#04x} is not supported")]
    UnsupportedGsoType(u8),
    #[error("IPv6 extension headers in a GSO packet are not supported")]
    Unsupported,
    #[error("GSO type disagrees with the packet's IP version or protocol")]
    ProtocolMismatch,
    #[error("a GSO packet without NEEDS_CSUM")]
    MissingNeedsCsum,
    #[error("a GSO packet where a single one was expected, or the reverse")]
    WrongKind,
    #[error("csum_start/csum_offset outside the packet or not its transport checksum")]
    CsumRange,
    #[error("hdr_len beyond the packet")]
    HdrLen,
    #[error("gso_size 0 with a GSO type")]
    ZeroGsoSize,
    #[error("transport header truncated or invalid")]
    TransportHeader,
    #[error("SYN, RST or URG in a TCP super-packet")]
    TcpFlags,
    #[error("IP fragment in a GSO packet")]
    Fragment,
    #[error("packet longer than 64 KiB")]
    TooLong,
    #[error("{needed} segments, room for {available}")]
    TooManySegments { needed: usize, available: usize },
    #[error("no segment with that index")]
    NoSuchSegment,
    #[error("output buffer shorter than the segment")]
    BufferTooSmall,
    #[error("segment refused after the copy: {0}")]
    Inner(#[from] InnerError),
}

mod field4 {
    use std::ops::Range;
    pub const TOTAL_LEN: Range<usize> = 2..4;
    pub const ID: Range<usize> = 4..6;
    pub const FLAGS_FRAG: Range<usize> = 6..8;
    pub const CHECKSUM: Range<usize> = 10..12;
    /// Source and destination addresses.
    pub const ADDRS: Range<usize> = 12..20;
    /// IPv4 `DF` in the first byte of `FLAGS_FRAG`.
    pub const DF: u8 = 0x40;
}

mod field6 {
    use std::ops::Range;
    pub const PAYLOAD_LEN: Range<usize> = 4..6;
    pub const ADDRS: Range<usize> = 8..40;
}

mod tcp {
    use std::ops::Range;
    pub const PORTS: Range<usize> = 0..4;
    pub const SEQ: Range<usize> = 4..8;
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const CHECKSUM: usize = 16;
    pub const MIN_LEN: usize = 20;
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const CWR: u8 = 0x80;
}

mod udp {
    use std::ops::Range;
    pub const PORTS: Range<usize> = 0..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const CHECKSUM: usize = 6;
    pub const LEN: usize = 8;
}

/// The headers of a whole TCP or UDP packet whose IP length field matches
/// its buffer exactly, with every offset checked.
#[derive(Debug, Clone, Copy)]
struct Headers {
    v6: bool,
    ip_len: usize,
    proto: u8,
    l4_len: usize,
    pseudo: Pseudo,
}

impl Headers {
    /// Both headers together: where the payload starts.
    fn len(&self) -> usize {
        self.ip_len + self.l4_len
    }

    /// Offset of the transport checksum from the transport header.
    fn csum_offset(&self) -> usize {
        if self.proto == protocol::TCP {
            tcp::CHECKSUM
        } else {
            udp::CHECKSUM
        }
    }

    /// The pseudo-header sum for a transport segment of `l4_total` bytes
    /// (at most 65535: callers bound packets by [`MAX_PACKET_LEN`] and the
    /// IPv4 total length).
    fn pseudo_sum(&self, l4_total: usize) -> u16 {
        match self.pseudo {
            Pseudo::V4(s, d) => pseudo_header_v4(s, d, self.proto, l4_total as u16),
            Pseudo::V6(s, d) => pseudo_header_v6(&s, &d, self.proto, l4_total as u32),
        }
    }

    /// Parses `packet`, which must be exactly one IP packet (its length
    /// field equal to its length), not a fragment, carrying TCP or UDP
    /// right after the fixed IPv6 header or the IPv4 header (options
    /// allowed).
    fn parse(packet: &[u8]) -> Result<Self, GsoError> {
        if packet.len() > MAX_PACKET_LEN {
            return Err(GsoError::TooLong);
        }
        let (v6, ip_len, proto, pseudo) = match version(packet)? {
            4 => {
                let ip = Ipv4Packet::new_checked(packet)?;
                if usize::from(ip.total_len()) != packet.len() {
                    return Err(IpError::TotalLength.into());
                }
                if ip.is_fragment() {
                    return Err(GsoError::Fragment);
                }
                let pseudo = Pseudo::V4(ip.src(), ip.dst());
                (false, ip.header_len(), ip.protocol(), pseudo)
            }
            _ => {
                let ip = Ipv6Packet::new_checked(packet)?;
                if IPV6_HEADER_LEN + usize::from(ip.payload_len()) != packet.len() {
                    return Err(IpError::TotalLength.into());
                }
                let pseudo = Pseudo::V6(ip.src(), ip.dst());
                (true, IPV6_HEADER_LEN, ip.next_header(), pseudo)
            }
        };
        let l4_len = match proto {
            protocol::TCP => {
                let offset = packet
                    .get(ip_len + tcp::DATA_OFFSET)
                    .ok_or(GsoError::TransportHeader)?;
                usize::from(offset >> 4) * 4
            }
            protocol::UDP => udp::LEN,
            protocol::IPV6_HOP_BY_HOP
            | protocol::IPV6_ROUTING
            | protocol::IPV6_FRAGMENT
            | protocol::IPV6_DEST_OPTS
                if v6 =>
            {
                return Err(GsoError::Unsupported);
            }
            _ => return Err(GsoError::ProtocolMismatch),
        };
        // A TCP data offset below 5 words is malformed (RFC 9293 3.1).
        if (proto == protocol::TCP && l4_len < tcp::MIN_LEN) || ip_len + l4_len > packet.len() {
            return Err(GsoError::TransportHeader);
        }
        Ok(Headers {
            v6,
            ip_len,
            proto,
            l4_len,
            pseudo,
        })
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Packet builders for the tests of both halves.
#[cfg(test)]
pub(crate) mod testutil {
    use super::super::checksum::{combine, finish, sum};
    use super::super::vnet::{VirtioNetHdr, flags, gso_type};
    use super::*;

    pub const A4: [u8; 4] = [198, 18, 0, 1];
    pub const B4: [u8; 4] = [198, 19, 0, 2];
    pub const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    pub const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// One packet's header fields.
    #[derive(Debug, Clone)]
    pub struct Spec {
        pub v6: bool,
        pub proto: u8,
        pub ip_options: Vec<u8>,
        pub tcp_options: Vec<u8>,
        pub tcp_flags: u8,
        pub seq: u32,
        pub id: u16,
        pub ttl: u8,
        pub tos: u8,
        pub df: bool,
        pub src_port: u16,
    }

    impl Spec {
        pub fn new(v6: bool, proto: u8) -> Spec {
            Spec {
                v6,
                proto,
                ip_options: Vec::new(),
                tcp_options: Vec::new(),
                tcp_flags: tcp::ACK,
                seq: 0xFFFF_F000, // wraps within a 64 KiB train
                id: 0xFFF0,
                ttl: 64,
                tos: 0,
                df: true,
                src_port: 40000,
            }
        }

        /// The packet carrying `payload`; `partial` leaves only the
        /// pseudo-header sum in the checksum field (`CHECKSUM_PARTIAL`).
        pub fn build(&self, payload: &[u8], partial: bool) -> Vec<u8> {
            let l4_hdr = match self.proto {
                protocol::TCP => 20 + self.tcp_options.len(),
                _ => 8,
            };
            let l4_total = l4_hdr + payload.len();
            let mut l4 = vec![0u8; l4_hdr];
            l4[0..2].copy_from_slice(&self.src_port.to_be_bytes());
            l4[2..4].copy_from_slice(&443u16.to_be_bytes());
            if self.proto == protocol::TCP {
                l4[4..8].copy_from_slice(&self.seq.to_be_bytes());
                l4[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                l4[12] = ((l4_hdr / 4) as u8) << 4;
                l4[13] = self.tcp_flags;
                l4[14..16].copy_from_slice(&502u16.to_be_bytes());
                l4[20..].copy_from_slice(&self.tcp_options);
            } else {
                l4[4..6].copy_from_slice(&(l4_total as u16).to_be_bytes());
            }
            l4.extend_from_slice(payload);
            let mut p = if self.v6 {
                let mut h = vec![0u8; 40];
                h[0] = 0x60 | (self.tos >> 4);
                h[1] = (self.tos << 4) | 0x0a; // a flow label
                h[2..4].copy_from_slice(&[0xbc, 0xde]);
                h[4..6].copy_from_slice(&(l4_total as u16).to_be_bytes());
                h[6] = self.proto;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&A6);
                h[24..40].copy_from_slice(&B6);
                h
            } else {
                let ip_len = 20 + self.ip_options.len();
                let mut h = vec![0u8; ip_len];
                h[0] = 0x40 | (ip_len / 4) as u8;
                h[1] = self.tos;
                h[2..4].copy_from_slice(&((ip_len + l4_total) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&self.id.to_be_bytes());
                h[6] = if self.df { 0x40 } else { 0 };
                h[8] = self.ttl;
                h[9] = self.proto;
                h[12..16].copy_from_slice(&A4);
                h[16..20].copy_from_slice(&B4);
                h[20..].copy_from_slice(&self.ip_options);
                let c = finish(sum(&h));
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h
            };
            let ip_len = p.len();
            let headers = Headers {
                v6: self.v6,
                ip_len,
                proto: self.proto,
                l4_len: l4_hdr,
                pseudo: if self.v6 {
                    Pseudo::V6(A6, B6)
                } else {
                    Pseudo::V4(A4, B4)
                },
            };
            let pseudo = headers.pseudo_sum(l4_total);
            let at = headers.csum_offset();
            let value = if partial {
                pseudo
            } else {
                let v = finish(combine(pseudo, sum(&l4)));
                if self.proto == protocol::UDP && v == 0 {
                    0xFFFF
                } else {
                    v
                }
            };
            l4[at..at + 2].copy_from_slice(&value.to_be_bytes());
            p.extend_from_slice(&l4);
            p
        }

        /// The vnet header the kernel would put in front of `build(..,
        /// true)` for segments of `gso_size`.
        pub fn vnet(&self, gso_size: u16) -> VirtioNetHdr {
            let ip_len = if self.v6 {
                40
            } else {
                20 + self.ip_options.len()
            };
            let (kind, l4, off) = match (self.proto, self.v6) {
                (protocol::TCP, false) => (gso_type::TCPV4, 20 + self.tcp_options.len(), 16),
                (protocol::TCP, true) => (gso_type::TCPV6, 20 + self.tcp_options.len(), 16),
                _ => (gso_type::UDP_L4, 8, 6),
            };
            VirtioNetHdr {
                flags: flags::NEEDS_CSUM,
                gso_type: kind,
                hdr_len: (ip_len + l4) as u16,
                gso_size,
                csum_start: ip_len as u16,
                csum_offset: off,
            }
        }
    }

    /// A byte to flip, once, in the next copy a test watches: the
    /// transport header or the payload as just written to the output.
    #[derive(Debug, Clone, Copy)]
    pub enum Fault {
        Header(usize),
        Payload(usize),
    }

    thread_local! {
        static FAULT: std::cell::Cell<Option<Fault>> = const { std::cell::Cell::new(None) };
    }

    /// Arms a fault for the next copy on this thread.
    pub fn arm(fault: Fault) {
        FAULT.with(|f| f.set(Some(fault)));
    }

    /// Called right after a copy: flips the armed byte, if any, the way a
    /// corrupted copy would.
    pub fn fault(header: &mut [u8], payload: &mut [u8]) {
        let target = match FAULT.with(|f| f.take()) {
            Some(Fault::Header(at)) => header.get_mut(at),
            Some(Fault::Payload(at)) => payload.get_mut(at),
            None => None,
        };
        if let Some(b) = target {
            *b ^= 0x10;
        }
    }

    pub fn payload(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// The four shapes every table test runs over.
    pub fn shapes() -> [(bool, u8); 4] {
        [
            (false, protocol::TCP),
            (true, protocol::TCP),
            (false, protocol::UDP),
            (true, protocol::UDP),
        ]
    }
}
