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
mod tests {
    use super::super::split::Splitter;
    use super::super::testutil::{Spec, payload, shapes};
    use super::*;

    const POLICY: InnerPolicy = InnerPolicy {
        allow_udp4_zero_checksum: true,
        allow_unverifiable_protocols: true,
        allow_udplite_partial_coverage: true,
    };
    const CONFIG: TrainConfig = TrainConfig {
        max_segments: DEFAULT_MAX_SEGMENTS,
        udp: true,
    };

    fn reason<T>(r: Result<T, Refused<'_>>) -> Result<T, NotCoalescible> {
        r.map_err(|e| e.reason)
    }

    fn verified(p: &[u8]) -> Verified<'_> {
        match check(p, POLICY) {
            Ok(Checked::Verified(v)) => v,
            other => panic!("test packet not verified: {other:?}"),
        }
    }

    /// The packets a sender's stack would emit for `sizes`: contiguous
    /// sequence numbers, counting IDs, PSH on the last.
    fn flow(spec: &Spec, sizes: &[usize]) -> Vec<Vec<u8>> {
        let data = payload(sizes.iter().sum(), 11);
        let mut at = 0;
        let mut s = spec.clone();
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                if i + 1 == sizes.len() && spec.proto == protocol::TCP {
                    s.tcp_flags |= tcp::PSH;
                }
                let p = s.build(&data[at..at + n], false);
                at += n;
                s.seq = s.seq.wrapping_add(n as u32);
                s.id = s.id.wrapping_add(1);
                p
            })
            .collect()
    }

    /// Coalesces all of `packets`; every push must succeed.
    fn coalesce_all(packets: &[Vec<u8>], buf: &mut [u8]) -> usize {
        let mut train = Train::start(buf, verified(&packets[0]), CONFIG).expect("starts");
        for p in &packets[1..] {
            train.push(verified(p)).expect("joins");
        }
        assert_eq!(train.segments(), packets.len());
        train.finish()
    }

    #[test]
    fn contiguous_segments_coalesce_and_split_back_byte_for_byte() {
        for (v6, proto) in shapes() {
            for sizes in [
                &[1000, 1000, 1000, 1000][..],
                &[1000, 1000, 1000, 1][..],
                &[1448, 1448][..],
                &[7, 3][..],
            ] {
                let mut spec = Spec::new(v6, proto);
                spec.ttl = 17;
                spec.tos = 0x28;
                spec.df = !v6 && sizes.len() == 2; // IDs checked without DF
                if proto == protocol::TCP {
                    spec.tcp_options = vec![1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8];
                }
                let packets = flow(&spec, sizes);
                let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
                let n = coalesce_all(&packets, &mut buf);
                let hdr = VirtioNetHdr::parse(&buf).expect("header");
                let gso = sizes[0];
                // The train is what the sender's kernel would have handed
                // over as one TSO/USO packet.
                let mut whole = spec.clone();
                if proto == protocol::TCP {
                    whole.tcp_flags |= tcp::PSH;
                }
                let all = payload(sizes.iter().sum(), 11);
                assert_eq!(hdr, whole.vnet(gso as u16));
                assert_eq!(buf[VIRTIO_NET_HDR_LEN..n], whole.build(&all, true));
                // And splitting it gives back the segments.
                let s = Splitter::new(&hdr, &buf[VIRTIO_NET_HDR_LEN..n]).expect("splits");
                assert_eq!(s.count(), packets.len());
                for (i, original) in packets.iter().enumerate() {
                    let mut out = vec![0u8; 2000];
                    let v = s.write_segment(i, &mut out, POLICY).expect("valid");
                    assert_eq!(&out[..v.total_len], &original[..], "{v6} {proto} {i}");
                }
            }
        }
    }

    #[test]
    fn a_train_of_one_is_the_packet_behind_a_zero_header() {
        for (v6, proto) in shapes() {
            let p = flow(&Spec::new(v6, proto), &[500]).remove(0);
            let mut buf = vec![0xEEu8; 600];
            let train = Train::start(&mut buf, verified(&p), CONFIG).expect("starts");
            assert!(train.is_closed() == (proto == protocol::TCP)); // PSH closes
            let n = train.finish();
            assert_eq!(buf[..VIRTIO_NET_HDR_LEN], [0u8; VIRTIO_NET_HDR_LEN]);
            assert_eq!(buf[VIRTIO_NET_HDR_LEN..n], p[..]);
        }
    }

    /// Starts a train with `first` and pushes `second`; returns the refusal.
    fn refusal(first: &[u8], second: &[u8]) -> Option<NotCoalescible> {
        let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
        let mut train = Train::start(&mut buf, verified(first), CONFIG).expect("starts");
        let before = (train.segments(), train.len);
        let r = reason(train.push(verified(second))).err();
        if r.is_some() {
            assert_eq!(
                (train.segments(), train.len),
                before,
                "refusal left the train"
            );
        }
        r
    }

    #[test]
    fn what_differs_is_not_coalesced() {
        for (v6, proto) in shapes() {
            let base = Spec::new(v6, proto);
            let tcp_only = proto == protocol::TCP;
            let [a, b] = <[Vec<u8>; 2]>::try_from(flow(
                &{
                    let mut s = base.clone();
                    s.tcp_flags = tcp::ACK;
                    s
                },
                &[1000, 1000],
            ))
            .expect("two");
            // flow() set PSH on b; a train of a then b is fine.
            assert_eq!(refusal(&a, &b), None);
            let second = |f: &dyn Fn(&mut Spec)| {
                let mut s = base.clone();
                s.seq = s.seq.wrapping_add(1000);
                s.id = s.id.wrapping_add(1);
                f(&mut s);
                s.build(&payload(1000, 12), false)
            };
            let mut cases: Vec<(Vec<u8>, NotCoalescible)> = vec![
                (second(&|s| s.src_port += 1), NotCoalescible::Flow),
                (second(&|s| s.ttl -= 1), NotCoalescible::IpHeader),
                (second(&|s| s.tos = 4), NotCoalescible::IpHeader),
                (
                    Spec::new(!v6, proto).build(&payload(1000, 1), false),
                    NotCoalescible::Flow,
                ),
                (
                    {
                        let mut s = base.clone();
                        s.seq = s.seq.wrapping_add(1000);
                        s.build(&payload(1001, 12), false)
                    },
                    NotCoalescible::Size,
                ),
            ];
            if tcp_only {
                cases.extend([
                    (second(&|s| s.seq += 1), NotCoalescible::Sequence),
                    (second(&|s| s.seq -= 1000), NotCoalescible::Sequence),
                    (
                        second(&|s| s.tcp_options = vec![1, 1, 1, 1]),
                        NotCoalescible::TcpHeader,
                    ),
                    (
                        second(&|s| s.tcp_flags |= tcp::FIN),
                        NotCoalescible::TcpFlags,
                    ),
                    (
                        second(&|s| s.tcp_flags |= tcp::CWR),
                        NotCoalescible::TcpFlags,
                    ),
                    (
                        second(&|s| s.tcp_flags |= tcp::SYN),
                        NotCoalescible::TcpFlags,
                    ),
                    (
                        second(&|s| s.tcp_flags |= tcp::RST),
                        NotCoalescible::TcpFlags,
                    ),
                    (
                        second(&|s| s.tcp_flags |= tcp::URG),
                        NotCoalescible::TcpFlags,
                    ),
                ]);
            }
            if !v6 {
                cases.push((
                    second(&|s| {
                        s.df = false;
                    }),
                    NotCoalescible::IpHeader,
                ));
            }
            if v6 {
                // The flow label (not covered by any checksum), which
                // wireguard-go does not compare but the kernel's GRO does.
                let mut p = second(&|_| {});
                p[3] ^= 1;
                cases.push((p, NotCoalescible::IpHeader));
            }
            for (p, why) in cases {
                assert_eq!(refusal(&a, &p), Some(why), "{v6} {proto}");
            }
            if !v6 {
                // Without DF the identification must count up by one.
                let mut s = base.clone();
                s.df = false;
                let first = s.build(&payload(1000, 18), false);
                s.seq = s.seq.wrapping_add(1000);
                s.id = s.id.wrapping_add(2);
                let gap = s.build(&payload(1000, 19), false);
                assert_eq!(refusal(&first, &gap), Some(NotCoalescible::IpHeader));
                s.id = s.id.wrapping_sub(1);
                let next = s.build(&payload(1000, 19), false);
                assert_eq!(refusal(&first, &next), None);
            }
        }
    }

    #[test]
    fn psh_or_a_short_segment_closes_the_train() {
        for (v6, proto) in shapes() {
            let spec = Spec::new(v6, proto);
            let hl = if v6 { 40 } else { 20 } + if proto == protocol::TCP { 20 } else { 8 };
            // A short segment in the middle: 1000, 999, then 1000 refused.
            let mut s = spec.clone();
            let mut packets = Vec::new();
            for n in [1000, 999, 1000] {
                packets.push(s.build(&payload(n, 13), false));
                s.seq = s.seq.wrapping_add(n as u32);
                s.id = s.id.wrapping_add(1);
            }
            let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
            let mut train = Train::start(&mut buf, verified(&packets[0]), CONFIG).expect("start");
            train.push(verified(&packets[1])).expect("short one joins");
            assert!(train.is_closed());
            let refused = train.push(verified(&packets[2])).expect_err("closed");
            assert_eq!(refused.reason, NotCoalescible::Closed);
            assert_eq!(train.finish(), VIRTIO_NET_HDR_LEN + hl + 1000 + 999);
            // The refused packet comes back and starts the next train.
            let mut next = vec![0u8; TRAIN_BUFFER_LEN];
            let train = Train::start(&mut next, refused.packet, CONFIG).expect("starts");
            assert_eq!(train.finish(), VIRTIO_NET_HDR_LEN + packets[2].len());
            assert_eq!(
                next[VIRTIO_NET_HDR_LEN..][..packets[2].len()],
                packets[2][..]
            );
            if proto == protocol::TCP {
                // PSH in the middle: it joins and ends the train.
                let mut s = spec.clone();
                let a = s.build(&payload(1000, 14), false);
                s.seq = s.seq.wrapping_add(1000);
                s.id = s.id.wrapping_add(1);
                s.tcp_flags |= tcp::PSH;
                let b = s.build(&payload(1000, 15), false);
                s.seq = s.seq.wrapping_add(1000);
                s.tcp_flags = tcp::ACK;
                let c = s.build(&payload(1000, 16), false);
                let mut train = Train::start(&mut buf, verified(&a), CONFIG).expect("start");
                train.push(verified(&b)).expect("PSH joins as the last");
                assert_eq!(
                    reason(train.push(verified(&c))),
                    Err(NotCoalescible::Closed)
                );
                // A PSH first segment is a train of one.
                let mut train = Train::start(&mut buf, verified(&b), CONFIG).expect("start");
                assert_eq!(
                    reason(train.push(verified(&c))),
                    Err(NotCoalescible::Closed)
                );
            }
        }
    }

    #[test]
    fn limits_are_enforced() {
        for (v6, proto) in shapes() {
            let spec = Spec::new(v6, proto);
            let hl = if v6 { 40 } else { 20 } + if proto == protocol::TCP { 20 } else { 8 };
            // Segments of 1400 up to 65535 bytes: the one that would pass
            // 64 KiB is refused.
            let fits = (MAX_TRAIN_PACKET - hl) / 1400;
            let sizes = vec![1400; fits + 1];
            // PSH only on the last, which is the one refused.
            let packets = flow(&spec, &sizes);
            let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
            let big = TrainConfig {
                max_segments: 1000,
                udp: true,
            };
            let mut train = Train::start(&mut buf, verified(&packets[0]), big).expect("start");
            for p in &packets[1..fits] {
                train.push(verified(p)).expect("fits");
            }
            assert_eq!(
                reason(train.push(verified(&packets[fits]))),
                Err(NotCoalescible::TooLong)
            );
            assert_eq!(train.segments(), fits);
            let n = train.finish();
            assert!(n - VIRTIO_NET_HDR_LEN <= MAX_TRAIN_PACKET);
            // The segment limit.
            let small = TrainConfig {
                max_segments: 3,
                udp: true,
            };
            let mut train = Train::start(&mut buf, verified(&packets[0]), small).expect("start");
            train.push(verified(&packets[1])).expect("2");
            train.push(verified(&packets[2])).expect("3");
            assert!(train.is_closed());
            assert_eq!(
                reason(train.push(verified(&packets[3]))),
                Err(NotCoalescible::TooManySegments)
            );
            // A buffer too short for the next payload.
            let mut short = vec![0u8; VIRTIO_NET_HDR_LEN + hl + 1400 + 100];
            let mut train = Train::start(&mut short, verified(&packets[0]), big).expect("start");
            assert_eq!(
                reason(train.push(verified(&packets[1]))),
                Err(NotCoalescible::BufferTooSmall)
            );
            assert_eq!(
                reason(Train::start(&mut short[..100], verified(&packets[0]), big)).err(),
                Some(NotCoalescible::BufferTooSmall)
            );
        }
    }

    #[test]
    fn what_cannot_start_a_train() {
        let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
        // A policy exception is never Verified.
        let mut zero = Spec::new(false, protocol::UDP).build(b"hello", false);
        zero[26..28].copy_from_slice(&[0, 0]);
        assert!(matches!(
            check(&zero, POLICY),
            Ok(Checked::Exception(v)) if v.verdict == InnerVerdict::Udp4ZeroChecksum
        ));
        let gre = crate::wire::inner::build::ipv4([1, 2, 3, 4], [5, 6, 7, 8], 47, b"x");
        assert!(matches!(check(&gre, POLICY), Ok(Checked::Exception(_))));
        // Corrupted: not even a packet that may go on.
        let mut bad = Spec::new(false, protocol::TCP).build(b"hello", false);
        bad[44] ^= 1;
        assert_eq!(check(&bad, POLICY).err(), Some(InnerError::Checksum));
        let icmp = crate::wire::inner::build::ipv4([1, 2, 3, 4], [5, 6, 7, 8], 1, b"ping");
        assert_eq!(
            reason(Train::start(&mut buf, verified(&icmp), CONFIG)).err(),
            Some(NotCoalescible::Protocol)
        );
        let udp = Spec::new(true, protocol::UDP).build(b"hello", false);
        assert_eq!(
            reason(Train::start(
                &mut buf,
                verified(&udp),
                TrainConfig::default()
            ))
            .err(),
            Some(NotCoalescible::UdpDisabled)
        );
        let mut opts = Spec::new(false, protocol::TCP);
        opts.ip_options = vec![1, 1, 1, 0];
        assert_eq!(
            reason(Train::start(
                &mut buf,
                verified(&opts.build(b"x", false)),
                CONFIG
            ))
            .err(),
            Some(NotCoalescible::IpOptions)
        );
        let mut syn = Spec::new(true, protocol::TCP);
        syn.tcp_flags = tcp::SYN | tcp::ACK;
        assert_eq!(
            reason(Train::start(
                &mut buf,
                verified(&syn.build(b"x", false)),
                CONFIG
            ))
            .err(),
            Some(NotCoalescible::TcpFlags)
        );
        let empty = Spec::new(true, protocol::TCP).build(b"", false);
        assert_eq!(
            reason(Train::start(&mut buf, verified(&empty), CONFIG)).err(),
            Some(NotCoalescible::Empty)
        );
    }

    #[test]
    fn random_packets_never_panic_a_train() {
        let mut x: u64 = 0x0bad_5eed_1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
        let mut joined = 0;
        for _ in 0..2_000 {
            let r = next();
            let (v6, proto) = shapes()[(r % 4) as usize];
            let sizes = [1 + (r >> 8) as usize % 1500; 4];
            let mut packets = flow(&Spec::new(v6, proto), &sizes);
            // Mutate a header byte of some packets and fix nothing: most
            // then fail validation, some pass and must be refused or
            // joined without a panic.
            for p in packets.iter_mut().skip(1) {
                let m = next();
                if m & 3 == 0 {
                    let at = (m >> 8) as usize % 60.min(p.len());
                    p[at] = (m >> 32) as u8;
                }
            }
            let config = TrainConfig {
                max_segments: 1 + (r >> 40) as usize % 4,
                udp: r & 0x100 != 0,
            };
            let Ok(Checked::Verified(first)) = check(&packets[0], POLICY) else {
                continue;
            };
            let Ok(mut train) = Train::start(&mut buf, first, config) else {
                continue;
            };
            for p in &packets[1..] {
                if let Ok(Checked::Verified(v)) = check(p, POLICY)
                    && train.push(v).is_ok()
                {
                    joined += 1;
                }
            }
            let n = train.finish();
            assert!(n <= TRAIN_BUFFER_LEN);
        }
        assert!(joined > 100, "the loop reached push: {joined}");
    }

    #[test]
    fn a_byte_the_copy_changed_is_caught_and_leaves_the_train_intact() {
        use super::super::testutil::{Fault, arm};
        for (v6, proto) in shapes() {
            let packets = flow(&Spec::new(v6, proto), &[800, 800, 800]);
            let hl = if v6 { 40 } else { 20 } + if proto == protocol::TCP { 20 } else { 8 };
            let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
            // The first packet's copy: any header byte, or its payload.
            for fault in [Fault::Header(0), Fault::Header(hl - 1), Fault::Payload(799)] {
                arm(fault);
                assert_eq!(
                    reason(Train::start(&mut buf, verified(&packets[0]), CONFIG)).err(),
                    Some(NotCoalescible::CopyCorrupted),
                    "{fault:?}"
                );
            }
            let mut train = Train::start(&mut buf, verified(&packets[0]), CONFIG).expect("start");
            arm(Fault::Payload(400));
            assert_eq!(
                reason(train.push(verified(&packets[1]))),
                Err(NotCoalescible::CopyCorrupted)
            );
            // The train is as before: the same packet joins on a clean copy.
            train.push(verified(&packets[1])).expect("joins");
            train.push(verified(&packets[2])).expect("joins");
            let n = train.finish();
            let hdr = VirtioNetHdr::parse(&buf).expect("header");
            let s = Splitter::new(&hdr, &buf[VIRTIO_NET_HDR_LEN..n]).expect("splits");
            for (i, original) in packets.iter().enumerate() {
                let mut out = vec![0u8; 1000];
                let v = s.write_segment(i, &mut out, POLICY).expect("valid");
                assert_eq!(&out[..v.total_len], &original[..]);
            }
        }
    }

    #[test]
    fn a_payload_changed_in_the_train_is_caught() {
        for (v6, proto) in shapes() {
            let p = Spec::new(v6, proto).build(&payload(300, 17), false);
            let h = Headers::parse(&p).expect("parses");
            let (l4, data) = p[h.ip_len..].split_at(h.l4_len);
            assert!(payload_intact(&h, l4, data));
            let mut copy = data.to_vec();
            // The observed corruption: one 16-byte block replaced by its
            // neighbour.
            copy.copy_within(0..16, 16);
            assert!(!payload_intact(&h, l4, &copy));
        }
    }
}
