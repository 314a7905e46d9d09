//! Write side: build one TSO/USO super-packet from decrypted, verified
//! segments of one flow, for a single TUN `write()` (wireguard-go
//! `tcpGRO`/`udpGRO`, and the kernel's `tcp_gro_receive()` /
//! `inet_gro_receive()` rules, kept or made stricter).
//!
//! What may join a train: only a [`Verified`] packet, which only [`check`]
//! makes (its fields are private), from `inner::validate` with verdict
//! `Verified`; a packet let through by a policy exception (IPv4 UDP
//! checksum 0, an unverifiable protocol, UDP-Lite partial coverage) is a
//! [`Checked::Exception`] and goes out alone, where the kernel checks what
//! it can. Then:
//! - same flow: IP version, protocol, addresses, ports;
//! - identical IP headers but for length, identification and checksum (TOS,
//!   DF, TTL; traffic class, flow label, hop limit); no IPv4 options (the
//!   kernel's GRO refuses them too, `inet_gro_receive()`); without DF the
//!   IPv4 identification must count up by one, as segmentation will redo;
//! - TCP: flags exactly ACK or ACK|PSH (no FIN, SYN, RST, URG, ECE, CWR),
//!   PSH only on the segment that closes the train, the sequence number
//!   contiguous, and every other header byte (acknowledgment, data offset,
//!   window, urgent pointer, options) identical, so that splitting the
//!   train again gives back the very segments that went in;
//! - every payload `gso_size` bytes (the first one's), except a shorter
//!   one that closes the train; none empty;
//! - at most 65535 bytes of IP packet and [`TrainConfig::max_segments`].
//!
//! The kernel trusts a `NEEDS_CSUM` packet's payload (`CHECKSUM_PARTIAL`
//! is never verified on local delivery), so the bytes a train copied are
//! checked where they landed: the first packet's headers compared with the
//! source, each payload summed in the train and checked against the
//! segment's own verified checksum. A refused push leaves the train as it
//! was.

use super::{GsoError, Headers, be16, be32, field4, field6, tcp, udp};
use crate::wire::checksum::{combine, is_valid, sum};
use crate::wire::inner::{InnerError, InnerPolicy, InnerVerdict, Validated, validate};
use crate::wire::ip::{IPV4_HEADER_LEN, Ipv4Packet, protocol};
use crate::wire::vnet::{VIRTIO_NET_HDR_LEN, VirtioNetHdr, flags, gso_type};

/// `virtio_net_hdr_to_skb()` refuses a UDP_L4 packet of more than
/// `UDP_MAX_SEGMENTS` segments: 64 on older kernels, 128 on newer ones.
/// TCP has no such bound, but 64 MSS-sized segments already fill 64 KiB.
pub const DEFAULT_MAX_SEGMENTS: usize = 64;

/// Largest IP packet a train builds (IPv4 total length; the same bound
/// for IPv6 keeps one buffer size for both).
const MAX_TRAIN_PACKET: usize = 65535;

/// A buffer of this size holds any train: vnet header and packet.
pub const TRAIN_BUFFER_LEN: usize = VIRTIO_NET_HDR_LEN + MAX_TRAIN_PACKET;

/// A whole IP packet whose transport checksum `inner::validate` computed
/// and found right (verdict `Verified`). The only way to append to a
/// [`Train`]; it borrows the bytes it vouches for, so they cannot change
/// while it lives, and is neither `Clone` nor `Copy`, so a push consumes
/// it (a refusal hands it back in [`Refused`]) and no packet joins twice.
#[derive(Debug)]
pub struct Verified<'a> {
    packet: &'a [u8],
    validated: Validated,
}

impl<'a> Verified<'a> {
    /// What validation learnt of the IP header.
    pub fn validated(&self) -> &Validated {
        &self.validated
    }

    /// The packet, up to its IP length.
    pub fn bytes(&self) -> &'a [u8] {
        self.packet
    }
}

/// The outcome of [`check`]: a packet that may go on, and whether it may
/// join a train.
#[derive(Debug)]
pub enum Checked<'a> {
    /// Checksum verified: may be coalesced.
    Verified(Verified<'a>),
    /// Passed under a policy exception: goes out alone, with an all-zero
    /// vnet header.
    Exception(Validated),
}

impl Checked<'_> {
    pub fn validated(&self) -> &Validated {
        match self {
            Checked::Verified(v) => &v.validated,
            Checked::Exception(v) => v,
        }
    }
}

/// Validates `packet` with `inner::validate` (the inbound pipeline's one
/// validation; call this instead of `validate` where trains are built).
pub fn check(packet: &[u8], policy: InnerPolicy) -> Result<Checked<'_>, InnerError> {
    let validated = validate(packet, policy)?;
    if validated.verdict != InnerVerdict::Verified {
        return Ok(Checked::Exception(validated));
    }
    // `validate` checked total_len against the buffer.
    let packet = packet
        .get(..validated.total_len)
        .ok_or(InnerError::TransportHeader)?;
    Ok(Checked::Verified(Verified { packet, validated }))
}

/// Limits of a train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainConfig {
    /// Most segments in one train (at least 1).
    pub max_segments: usize,
    /// Build UDP trains (`VIRTIO_NET_HDR_GSO_UDP_L4`): only if the TUN
    /// accepted `TUN_F_USO4 | TUN_F_USO6` (Linux 6.2), the sign that its
    /// write path knows the type.
    pub udp: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_segments: DEFAULT_MAX_SEGMENTS,
            udp: false,
        }
    }
}

/// Why a packet does not start or join a train. Not a drop: the packet is
/// written on its own (or starts the next train).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotCoalescible {
    #[error("neither TCP nor UDP")]
    Protocol,
    #[error("UDP trains are off")]
    UdpDisabled,
    #[error("IPv4 options")]
    IpOptions,
    #[error("TCP flags other than ACK and a closing PSH")]
    TcpFlags,
    #[error("no payload")]
    Empty,
    #[error("the train was closed by a PSH or a short segment")]
    Closed,
    #[error("another flow")]
    Flow,
    #[error("IP header differs (TOS, DF, TTL, traffic class, flow label, hop limit, or ID)")]
    IpHeader,
    #[error("TCP header differs (acknowledgment, window, options, ...)")]
    TcpHeader,
    #[error("TCP sequence number not contiguous")]
    Sequence,
    #[error("payload larger than the train's segment size")]
    Size,
    #[error("the train would exceed 65535 bytes")]
    TooLong,
    #[error("the train has its maximum number of segments")]
    TooManySegments,
    #[error("train buffer too small")]
    BufferTooSmall,
    #[error("the bytes copied into the train differ from the verified ones")]
    CopyCorrupted,
    #[error("malformed transport header: {0}")]
    Malformed(GsoError),
}

/// A packet that did not start or join a train, and why; the token comes
/// back so that the packet can start the next train without being
/// validated again.
#[derive(Debug)]
pub struct Refused<'a> {
    pub reason: NotCoalescible,
    pub packet: Verified<'a>,
}

fn parse(packet: &[u8]) -> Result<Headers, NotCoalescible> {
    Headers::parse(packet).map_err(|e| match e {
        GsoError::ProtocolMismatch | GsoError::Unsupported => NotCoalescible::Protocol,
        other => NotCoalescible::Malformed(other),
    })
}

/// Whether `payload`, as it lies in the train, is what a segment with
/// the verified transport header `l4_header` carried: the segment's
/// checksum must still verify over it.
fn payload_intact(h: &Headers, l4_header: &[u8], payload: &[u8]) -> bool {
    let l4_total = l4_header.len() + payload.len();
    is_valid(combine(
        h.pseudo_sum(l4_total),
        combine(sum(l4_header), sum(payload)),
    ))
}

/// A super-packet under construction in a caller's buffer: the vnet
/// header's room first, then the first packet, then appended payloads.
#[derive(Debug)]
pub struct Train<'b> {
    out: &'b mut [u8],
    headers: Headers,
    gso_size: usize,
    segments: usize,
    /// IP packet bytes after the vnet header.
    len: usize,
    next_seq: u32,
    next_id: u16,
    closed: bool,
    max_segments: usize,
}

impl<'b> Train<'b> {
    /// Starts a train in `out` (at least the vnet header and `first`;
    /// [`TRAIN_BUFFER_LEN`] for any train) with a copy of `first`.
    pub fn start<'p>(
        out: &'b mut [u8],
        first: Verified<'p>,
        config: TrainConfig,
    ) -> Result<Self, Refused<'p>> {
        Self::try_start(out, &first, config).map_err(|reason| Refused {
            reason,
            packet: first,
        })
    }

    fn try_start(
        out: &'b mut [u8],
        first: &Verified<'_>,
        config: TrainConfig,
    ) -> Result<Self, NotCoalescible> {
        let p = first.packet;
        let h = parse(p)?;
        if h.proto == protocol::UDP && !config.udp {
            return Err(NotCoalescible::UdpDisabled);
        }
        if !h.v6 && h.ip_len != IPV4_HEADER_LEN {
            return Err(NotCoalescible::IpOptions);
        }
        let (ip, rest) = p.split_at(h.ip_len);
        let (l4, payload) = rest.split_at(h.l4_len);
        let mut closed = false;
        let mut next_seq = 0;
        if h.proto == protocol::TCP {
            let flags = l4[tcp::FLAGS];
            if flags & !tcp::PSH != tcp::ACK {
                return Err(NotCoalescible::TcpFlags);
            }
            closed = flags & tcp::PSH != 0;
            next_seq = be32(&l4[tcp::SEQ]).wrapping_add(payload.len() as u32);
        }
        if payload.is_empty() {
            return Err(NotCoalescible::Empty);
        }
        let dst = out
            .get_mut(VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + p.len())
            .ok_or(NotCoalescible::BufferTooSmall)?;
        dst.copy_from_slice(p);
        let hl = h.len();
        #[cfg(test)]
        {
            let (header, payload) = dst.split_at_mut(hl);
            super::testutil::fault(header, payload);
        }
        if dst[..hl] != p[..hl] || !payload_intact(&h, l4, &dst[hl..]) {
            return Err(NotCoalescible::CopyCorrupted);
        }
        let next_id = if h.v6 {
            0
        } else {
            be16(&ip[field4::ID]).wrapping_add(1)
        };
        Ok(Train {
            out,
            headers: h,
            gso_size: payload.len(),
            segments: 1,
            len: p.len(),
            next_seq,
            next_id,
            closed,
            max_segments: config.max_segments.max(1),
        })
    }

    /// Segments in the train so far.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Whether nothing more can join (PSH or a short segment came, or the
    /// segment limit was reached).
    pub fn is_closed(&self) -> bool {
        self.closed || self.segments >= self.max_segments
    }

    /// Appends `next`'s payload if it continues the train (module doc).
    /// On refusal the train is unchanged.
    pub fn push<'p>(&mut self, next: Verified<'p>) -> Result<(), Refused<'p>> {
        self.try_push(&next).map_err(|reason| Refused {
            reason,
            packet: next,
        })
    }

    fn try_push(&mut self, next: &Verified<'_>) -> Result<(), NotCoalescible> {
        if self.closed {
            return Err(NotCoalescible::Closed);
        }
        if self.segments >= self.max_segments {
            return Err(NotCoalescible::TooManySegments);
        }
        let p = next.packet;
        let h = parse(p)?;
        let mine = self.headers;
        if h.v6 != mine.v6 || h.proto != mine.proto {
            return Err(NotCoalescible::Flow);
        }
        let head = &self.out[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + mine.len()];
        let (ip, rest) = p.split_at(h.ip_len);
        let (first_ip, first_l4) = head.split_at(mine.ip_len);
        let addrs = if h.v6 { field6::ADDRS } else { field4::ADDRS };
        let ports = if h.proto == protocol::TCP {
            tcp::PORTS
        } else {
            udp::PORTS
        };
        if ip[addrs.clone()] != first_ip[addrs] || rest[ports.clone()] != first_l4[ports] {
            return Err(NotCoalescible::Flow);
        }
        if !h.v6 && h.ip_len != IPV4_HEADER_LEN {
            return Err(NotCoalescible::IpOptions);
        }
        let same_ip = if h.v6 {
            // Version, traffic class, flow label; next header, hop limit.
            ip[..4] == first_ip[..4] && ip[6..8] == first_ip[6..8]
        } else {
            // Version, IHL, TOS; flags, fragment offset, TTL, protocol;
            // and without DF an identification counting up.
            let df = ip[field4::FLAGS_FRAG.start] & field4::DF != 0;
            ip[..2] == first_ip[..2]
                && ip[6..10] == first_ip[6..10]
                && (df || be16(&ip[field4::ID]) == self.next_id)
        };
        if !same_ip {
            return Err(NotCoalescible::IpHeader);
        }
        let (l4, payload) = rest.split_at(h.l4_len);
        let mut closes = false;
        if h.proto == protocol::TCP {
            let flags = l4[tcp::FLAGS];
            if flags & !tcp::PSH != tcp::ACK {
                return Err(NotCoalescible::TcpFlags);
            }
            if h.l4_len != mine.l4_len
                || l4[8..tcp::FLAGS] != first_l4[8..tcp::FLAGS]
                || l4[14..16] != first_l4[14..16]
                || l4[18..] != first_l4[18..]
            {
                return Err(NotCoalescible::TcpHeader);
            }
            if be32(&l4[tcp::SEQ]) != self.next_seq {
                return Err(NotCoalescible::Sequence);
            }
            closes = flags & tcp::PSH != 0;
        }
        if payload.is_empty() {
            return Err(NotCoalescible::Empty);
        }
        if payload.len() > self.gso_size {
            return Err(NotCoalescible::Size);
        }
        let end = self.len + payload.len();
        if end > MAX_TRAIN_PACKET {
            return Err(NotCoalescible::TooLong);
        }
        let dst = self
            .out
            .get_mut(VIRTIO_NET_HDR_LEN + self.len..VIRTIO_NET_HDR_LEN + end)
            .ok_or(NotCoalescible::BufferTooSmall)?;
        dst.copy_from_slice(payload);
        #[cfg(test)]
        super::testutil::fault(&mut [], dst);
        if !payload_intact(&h, l4, dst) {
            return Err(NotCoalescible::CopyCorrupted);
        }
        self.len = end;
        self.segments += 1;
        self.next_seq = self.next_seq.wrapping_add(payload.len() as u32);
        self.next_id = self.next_id.wrapping_add(1);
        if payload.len() < self.gso_size {
            closes = true;
        }
        if closes {
            self.closed = true;
        }
        if h.proto == protocol::TCP && l4[tcp::FLAGS] & tcp::PSH != 0 {
            // The super-packet carries the last segment's PSH; splitting
            // puts it back on the last segment only.
            self.out[VIRTIO_NET_HDR_LEN + mine.ip_len + tcp::FLAGS] |= tcp::PSH;
        }
        Ok(())
    }

    /// Writes the vnet header and fixes the super-packet's headers; returns
    /// how many bytes of the buffer to write to the TUN.
    ///
    /// One segment: an all-zero header and the packet as it came (the
    /// kernel verifies its checksum). More: `NEEDS_CSUM` with the GSO type,
    /// `gso_size`, `hdr_len`, `csum_start` and `csum_offset`; IPv4 total
    /// length and header checksum or IPv6 payload length; UDP length; and
    /// in the transport checksum field the pseudo-header sum over the full
    /// transport length, as `CHECKSUM_PARTIAL` expects.
    pub fn finish(self) -> usize {
        let h = self.headers;
        let total = VIRTIO_NET_HDR_LEN + self.len;
        let (vnet, packet) = self.out.split_at_mut(VIRTIO_NET_HDR_LEN);
        if self.segments == 1 {
            vnet.fill(0);
            return total;
        }
        let packet = &mut packet[..self.len];
        let l4_total = self.len - h.ip_len;
        if h.v6 {
            packet[field6::PAYLOAD_LEN].copy_from_slice(&(l4_total as u16).to_be_bytes());
        } else {
            let mut ip = Ipv4Packet::new_unchecked(&mut packet[..h.ip_len]);
            ip.set_total_len(self.len as u16);
            ip.fill_checksum();
        }
        let l4 = &mut packet[h.ip_len..];
        let kind = if h.proto == protocol::TCP {
            if h.v6 {
                gso_type::TCPV6
            } else {
                gso_type::TCPV4
            }
        } else {
            l4[udp::LENGTH].copy_from_slice(&(l4_total as u16).to_be_bytes());
            gso_type::UDP_L4
        };
        let at = h.csum_offset();
        l4[at..at + 2].copy_from_slice(&h.pseudo_sum(l4_total).to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: kind,
            hdr_len: h.len() as u16,
            gso_size: self.gso_size as u16,
            csum_start: h.ip_len as u16,
            csum_offset: at as u16,
        };
        vnet.copy_from_slice(&hdr.to_bytes());
        total
    }
}

#[cfg(test)]
mod tests;
