//! The two pipelines, over batches of packet buffers, with no I/O: the
//! caller reads a batch, calls [`outbound::Outbound::process`] or
//! [`inbound::Inbound::process`], and acts on one [`Verdict`] per packet.
//!
//! Invariants:
//! - Every packet gets exactly one verdict; every drop increments exactly
//!   one counter, named by its [`DropReason`].
//! - Nothing on the packet path allocates, panics or blocks; every length
//!   is checked before it is used. (The caller's `verdicts` vector grows
//!   once to the batch size and is reused.)
//! - No packet is delivered without a passed ICV and a passed inner
//!   checksum, or an explicit counted policy exception
//!   ([`crate::wire::inner::InnerPolicy`]).

pub mod inbound;
pub mod outbound;
pub mod reassembly;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sa::table::SaId;
use crate::wire::inner::{InnerError, InnerVerdict};
use crate::wire::ip::{IPV6_HEADER_LEN, Ipv4Packet, Ipv6Packet, protocol};

/// Why a packet was not sent or delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    // Both directions: the inner packet.
    /// Not a well-formed IPv4/IPv6 packet, or a bad transport header.
    InnerHeader,
    /// The transport checksum did not match (the field failure).
    InnerChecksum,
    /// UDP checksum 0 where policy or RFC 8200 forbids it.
    ZeroUdpChecksum,
    /// An IP fragment, whose checksum cannot be verified alone.
    Fragment,
    /// A chain of more than 8 IPv6 extension headers. (Destination
    /// options are carried inside ESP.)
    ExtensionHeader,
    /// An IPv6 hop-by-hop options header, which in transport mode belongs
    /// to the outer header (RFC 4303 section 3.1.1) and is not carried.
    HopByHop,
    /// An IPv6 routing header, which in transport mode belongs to the
    /// outer header, and lists addresses on the way to the inner
    /// destination, not the outer path's (Linux's `IPV6_RTHDR` takes only
    /// types 2 and 4 anyway).
    RoutingHeader,
    /// A protocol without a checksum esptun can verify.
    UnverifiableProtocol,
    /// UDP-Lite whose checksum does not cover the whole datagram.
    PartialCoverage,
    /// No provider may carry traffic (halted by policy, or none passed).
    NoProvider,
    /// The packet does not fit the buffer or the IP length field.
    Oversize,
    /// A packet from the TUN device whose virtio-net header or
    /// segmentation layout cannot be used (TSO/USO, NEEDS_CSUM).
    Offload,
    // Outbound.
    /// No outbound SA for the destination.
    NoSa,
    /// The source address is not the SA's inner local address, so the
    /// receiver would rebuild a different pseudo-header.
    SourceMismatch,
    /// The SA's sequence space is used up: rekey.
    SequenceExhausted,
    /// The durable sequence reservation is used up.
    SequenceReservation,
    /// The provider refused to seal (should not happen).
    SealFailed,
    /// Its ESP packet would not fit the path MTU learned for the peer, and
    /// it may not be fragmented (IPv4 with DF set, or IPv6 larger than
    /// 1280 bytes): answered with ICMP Fragmentation Needed / Packet Too
    /// Big through the TUN device (RFC 1191, RFC 8201).
    PacketTooBig,
    // Inbound.
    /// Too short for the ESP header, or for the SA's ICV.
    Truncated,
    /// A NAT keepalive (RFC 3948 section 2.3), consumed.
    Keepalive,
    /// IKE traffic (non-ESP marker) with no IKE handler.
    Ike,
    /// No inbound SA with this SPI.
    UnknownSpi,
    /// Already received (RFC 4303 section 3.4.3).
    Replay,
    /// Older than the replay window, or outside the 64-bit space.
    TooOld,
    /// The ICV did not verify.
    IcvFailure,
    /// Padding or pad length did not check out after decryption.
    BadPadding,
    /// Next header 59: a dummy packet (RFC 4303 section 2.6), consumed.
    DummyPacket,
    // Outbound reassembly of fragments from the TUN device
    // ([`reassembly`]); each counts fragments, the datagrams are counted
    // in [`reassembly::ReassemblyCounters`].
    /// Its datagram did not complete within the timeout.
    ReassemblyTimeout,
    /// It or another fragment of its datagram overlapped (RFC 5722).
    ReassemblyOverlap,
    /// An exact duplicate of a fragment held (the datagram goes on).
    ReassemblyDuplicate,
    /// Its datagram would exceed the IP length fields or the buffers.
    ReassemblyTooBig,
    /// A reassembly cap (bytes or datagrams, total or per destination).
    ReassemblyMemory,
    /// A tiny first fragment, a non-last fragment not a multiple of 8
    /// bytes, or fragment lengths that disagree.
    ReassemblyMalformed,
}

impl DropReason {
    pub const ALL: [DropReason; 33] = [
        DropReason::InnerHeader,
        DropReason::InnerChecksum,
        DropReason::ZeroUdpChecksum,
        DropReason::Fragment,
        DropReason::ExtensionHeader,
        DropReason::HopByHop,
        DropReason::RoutingHeader,
        DropReason::UnverifiableProtocol,
        DropReason::PartialCoverage,
        DropReason::NoProvider,
        DropReason::Oversize,
        DropReason::Offload,
        DropReason::NoSa,
        DropReason::SourceMismatch,
        DropReason::SequenceExhausted,
        DropReason::SequenceReservation,
        DropReason::SealFailed,
        DropReason::PacketTooBig,
        DropReason::Truncated,
        DropReason::Keepalive,
        DropReason::Ike,
        DropReason::UnknownSpi,
        DropReason::Replay,
        DropReason::TooOld,
        DropReason::IcvFailure,
        DropReason::BadPadding,
        DropReason::DummyPacket,
        DropReason::ReassemblyTimeout,
        DropReason::ReassemblyOverlap,
        DropReason::ReassemblyDuplicate,
        DropReason::ReassemblyTooBig,
        DropReason::ReassemblyMemory,
        DropReason::ReassemblyMalformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::InnerHeader => "inner_header",
            DropReason::InnerChecksum => "inner_checksum",
            DropReason::ZeroUdpChecksum => "zero_udp_checksum",
            DropReason::Fragment => "fragment",
            DropReason::ExtensionHeader => "extension_header",
            DropReason::HopByHop => "hop_by_hop",
            DropReason::RoutingHeader => "routing_header",
            DropReason::UnverifiableProtocol => "unverifiable_protocol",
            DropReason::PartialCoverage => "partial_coverage",
            DropReason::NoProvider => "no_provider",
            DropReason::Oversize => "oversize",
            DropReason::Offload => "offload",
            DropReason::NoSa => "no_sa",
            DropReason::SourceMismatch => "source_mismatch",
            DropReason::SequenceExhausted => "sequence_exhausted",
            DropReason::SequenceReservation => "sequence_reservation",
            DropReason::SealFailed => "seal_failed",
            DropReason::PacketTooBig => "packet_too_big",
            DropReason::Truncated => "truncated",
            DropReason::Keepalive => "keepalive",
            DropReason::Ike => "ike",
            DropReason::UnknownSpi => "unknown_spi",
            DropReason::Replay => "replay",
            DropReason::TooOld => "too_old",
            DropReason::IcvFailure => "icv_failure",
            DropReason::BadPadding => "bad_padding",
            DropReason::DummyPacket => "dummy_packet",
            DropReason::ReassemblyTimeout => "reassembly_timeout",
            DropReason::ReassemblyOverlap => "reassembly_overlap",
            DropReason::ReassemblyDuplicate => "reassembly_duplicate",
            DropReason::ReassemblyTooBig => "reassembly_too_big",
            DropReason::ReassemblyMemory => "reassembly_memory",
            DropReason::ReassemblyMalformed => "reassembly_malformed",
        }
    }

    /// What an operator can do about drops of this reason, for the
    /// (rate-limited) drop log; `None` where the reason says it all.
    pub fn hint(self) -> Option<&'static str> {
        match self {
            DropReason::HopByHop => Some(
                "in transport mode an IPv6 hop-by-hop options header belongs to the outer \
                 header (RFC 4303 section 3.1.1); esptun does not carry it: send without \
                 IPV6_HOPOPTS, or use tunnel mode",
            ),
            DropReason::RoutingHeader => Some(
                "in transport mode an IPv6 routing header belongs to the outer header, and its \
                 addresses are not the outer path's: esptun does not carry it, send without it",
            ),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// A drop of the outbound reassembly, which counts it where it happens
    /// ([`reassembly::Reassembler`]).
    pub fn is_reassembly(self) -> bool {
        matches!(
            self,
            DropReason::ReassemblyTimeout
                | DropReason::ReassemblyOverlap
                | DropReason::ReassemblyDuplicate
                | DropReason::ReassemblyTooBig
                | DropReason::ReassemblyMemory
                | DropReason::ReassemblyMalformed
        )
    }
}

impl From<InnerError> for DropReason {
    fn from(e: InnerError) -> Self {
        match e {
            InnerError::Ip(_) | InnerError::TransportHeader => DropReason::InnerHeader,
            InnerError::Checksum => DropReason::InnerChecksum,
            InnerError::ZeroUdpChecksum => DropReason::ZeroUdpChecksum,
            InnerError::Fragment => DropReason::Fragment,
            InnerError::ExtensionHeader => DropReason::ExtensionHeader,
            InnerError::HopByHop => DropReason::HopByHop,
            InnerError::RoutingHeader => DropReason::RoutingHeader,
            InnerError::Unverifiable(_) => DropReason::UnverifiableProtocol,
            InnerError::PartialCoverage => DropReason::PartialCoverage,
        }
    }
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Outbound: send the buffer's bytes (the ESP packet), sealed by the
    /// SA `sa`, to the destination in the buffer's `meta.peer`: that SA's
    /// endpoint (for raw ESP the port is unused). The verdict stays small:
    /// with the 32-byte address in it, the 64-byte outbound benchmark lost
    /// a tenth of its speed.
    Send {
        sa: SaId,
    },
    /// Inbound: write the buffer's bytes (the rebuilt IP packet) to TUN.
    Deliver,
    /// Inbound, UDP encapsulation: IKE traffic (non-ESP marker, RFC 3948
    /// section 2.2) for the IKE handler; only when one is configured
    /// ([`inbound::Inbound::ike_handler`]), otherwise a `Drop(Ike)`.
    Ike,
    Drop(DropReason),
}

/// The inner flow of a packet, for drop logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Source and destination port, for TCP, UDP and UDP-Lite.
    pub ports: Option<(u16, u16)>,
}

impl Flow {
    /// The flow of an IP packet, if its header can be read at all.
    pub fn of_packet(packet: &[u8]) -> Option<Flow> {
        match packet.first()? >> 4 {
            4 => {
                let ip = Ipv4Packet::new_checked(packet).ok()?;
                let segment = packet.get(ip.header_len()..)?;
                Some(Self::of_segment(
                    IpAddr::from(ip.src()),
                    IpAddr::from(ip.dst()),
                    ip.protocol(),
                    segment,
                ))
            }
            6 => {
                let ip = Ipv6Packet::new_checked(packet).ok()?;
                let segment = packet.get(IPV6_HEADER_LEN..)?;
                Some(Self::of_segment(
                    IpAddr::from(ip.src()),
                    IpAddr::from(ip.dst()),
                    ip.next_header(),
                    segment,
                ))
            }
            _ => None,
        }
    }

    /// The flow of a transport segment between two addresses.
    pub fn of_segment(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> Flow {
        let ports = match (protocol, segment) {
            (protocol::TCP | protocol::UDP | protocol::UDPLITE, [a, b, c, d, ..]) => {
                Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])))
            }
            _ => None,
        };
        Flow {
            src,
            dst,
            protocol,
            ports,
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.protocol {
            protocol::TCP => "tcp".to_string(),
            protocol::UDP => "udp".to_string(),
            protocol::UDPLITE => "udplite".to_string(),
            protocol::ICMP => "icmp".to_string(),
            protocol::ICMPV6 => "icmpv6".to_string(),
            other => format!("proto {other}"),
        };
        match self.ports {
            Some((sp, dp)) => write!(
                f,
                "{name} {} -> {}",
                std::net::SocketAddr::new(self.src, sp),
                std::net::SocketAddr::new(self.dst, dp)
            ),
            None => write!(f, "{name} {} -> {}", self.src, self.dst),
        }
    }
}

/// What was known about a dropped packet when it was dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropContext {
    pub spi: Option<u32>,
    pub seq: Option<u64>,
    pub flow: Option<Flow>,
    /// The SA the packet was matched to, if it got that far.
    pub sa: Option<SaId>,
    /// The packet's index in its batch.
    pub packet: usize,
}

/// One SA's drops, by [`DropReason::index`].
pub type SaDrops = ByReason<u64>;

/// One `T` per [`DropReason`], indexed by [`DropReason::index`]. A newtype
/// because the standard library implements `Default` for arrays of at most
/// 32 elements, and there are more reasons than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByReason<T>(pub [T; DropReason::ALL.len()]);

impl<T: Copy + Default> Default for ByReason<T> {
    fn default() -> Self {
        ByReason([T::default(); DropReason::ALL.len()])
    }
}

/// Reads and writes as the array it wraps.
impl<T> std::ops::Deref for ByReason<T> {
    type Target = [T; DropReason::ALL.len()];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T> std::ops::DerefMut for ByReason<T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Per-direction counters, readable from another thread.
#[derive(Debug)]
pub struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Packets passed under a policy exception, by kind.
    pub udp4_zero_checksum: AtomicU64,
    /// Outbound IPv4 UDP datagrams sent with checksum 0 whose real
    /// checksum esptun filled in before sealing.
    pub udp4_checksum_filled: AtomicU64,
    pub unverifiable_protocol: AtomicU64,
    pub udplite_partial_coverage: AtomicU64,
    /// Packets not dropped: sent, delivered, or handed to IKE.
    pub passed: AtomicU64,
    /// Outbound SAs whose sequence number reached their soft limit: time
    /// to roll keys (counted once per SA).
    pub soft_limit_crossings: AtomicU64,
    /// Outbound: fragments reassembled, and datagrams that were not.
    pub reassembly: reassembly::ReassemblyCounters,
    /// ICMP Fragmentation Needed / Packet Too Big written to the TUN
    /// device for [`DropReason::PacketTooBig`] drops, and those the rate
    /// limit (or the rule never to answer an ICMP error) held back.
    pub too_big_sent: AtomicU64,
    pub too_big_suppressed: AtomicU64,
    /// TCP SYNs whose MSS option was lowered (`[inner] clamp_mss`).
    pub mss_clamped: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            udp4_zero_checksum: AtomicU64::new(0),
            udp4_checksum_filled: AtomicU64::new(0),
            unverifiable_protocol: AtomicU64::new(0),
            udplite_partial_coverage: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            soft_limit_crossings: AtomicU64::new(0),
            reassembly: reassembly::ReassemblyCounters::default(),
            too_big_sent: AtomicU64::new(0),
            too_big_suppressed: AtomicU64::new(0),
            mss_clamped: AtomicU64::new(0),
        }
    }
}

impl Counters {
    pub fn count_drop(&self, reason: DropReason) -> Verdict {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
        Verdict::Drop(reason)
    }

    /// Counts `n` packets dropped for `reason` at once (the fragments a
    /// failed reassembly held).
    pub fn count_drops(&self, reason: DropReason, n: u64) {
        self.drops[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    pub fn total_drops(&self) -> u64 {
        DropReason::ALL.iter().map(|&r| self.drops(r)).sum()
    }

    /// Counts policy exceptions; plain passes are counted per batch
    /// ([`Self::passed_batch`]) to keep an atomic add off every packet.
    fn exception(&self, inner: InnerVerdict) {
        match inner {
            InnerVerdict::Verified => {}
            InnerVerdict::Udp4ZeroChecksum => {
                self.udp4_zero_checksum.fetch_add(1, Ordering::Relaxed);
            }
            InnerVerdict::Unverifiable => {
                self.unverifiable_protocol.fetch_add(1, Ordering::Relaxed);
            }
            InnerVerdict::UdpLitePartialCoverage => {
                self.udplite_partial_coverage
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn passed_batch(&self, verdicts: &[Verdict]) {
        let passed = verdicts
            .iter()
            .filter(|v| !matches!(v, Verdict::Drop(_)))
            .count();
        self.passed.fetch_add(passed as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_distinct_name_and_counter() {
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?} out of order in ALL");
        }
        let c = Counters::default();
        for r in DropReason::ALL {
            assert_eq!(c.count_drop(r), Verdict::Drop(r));
            assert_eq!(c.drops(r), 1);
        }
        assert_eq!(c.total_drops(), DropReason::ALL.len() as u64);
    }
}
