//! Read side: finish or split what the kernel handed over with its
//! virtio-net header.
//!
//! The segments follow the kernel's own software GSO
//! (`net/ipv4/tcp_offload.c` `tcp_gso_segment()`, `net/ipv4/udp_offload.c`
//! `__udp_gso_segment()`, `net/ipv4/af_inet.c` `inet_gso_segment()`): the
//! full IP and transport headers (IPv4 options included) in front of every
//! `gso_size` bytes of payload, the last segment possibly shorter; IPv4
//! total length, identification (+1 per segment) and header checksum, or
//! the IPv6 payload length, per segment; TCP sequence number advanced by
//! the payload before it, FIN and PSH only on the last segment, CWR only
//! on the first; UDP length per segment and a computed UDP checksum of 0
//! sent as `0xFFFF` (RFC 768). Every checksum is derived from the source
//! bytes (the super-packet), never from the copy: the payload is summed
//! where the kernel put it and the header sums are the source's with the
//! rewritten words replaced (RFC 1624), so validating the copy afterwards
//! catches a byte the copy changed.

use super::{GsoError, Headers, MAX_PACKET_LEN, be16, be32, field4, field6, tcp, udp};
use crate::wire::checksum::{combine, finish, sum};
use crate::wire::inner::{InnerPolicy, Validated, validate};
use crate::wire::ip::{IPV6_HEADER_LEN, Ipv4Packet, Ipv6Packet, protocol, version};
use crate::wire::vnet::{GsoType, VirtioNetHdr};

/// Finishes a packet the kernel sent without segmentation (`gso_type`
/// NONE), in place, and validates it.
///
/// With `NEEDS_CSUM` the field at `csum_start + csum_offset` holds the
/// pseudo-header sum (`CHECKSUM_PARTIAL`); the checksum over everything
/// from `csum_start` is stored there (RFC 1071; a UDP result of 0 as
/// `0xFFFF`, RFC 768). Either way the packet must then pass
/// `inner::validate` under `policy`, so a wrong pseudo-header sum from the
/// kernel is refused rather than sealed. `DATA_VALID` is ignored.
pub fn complete_single(
    hdr: &VirtioNetHdr,
    packet: &mut [u8],
    policy: InnerPolicy,
) -> Result<Validated, GsoError> {
    if hdr.gso()? != GsoType::None {
        return Err(GsoError::WrongKind);
    }
    if hdr.needs_csum() {
        let start = usize::from(hdr.csum_start);
        let offset = usize::from(hdr.csum_offset);
        let at = start + offset;
        let (ip_len, end) = ip_lengths(packet)?;
        // The field must be a whole word of the summed range, in the
        // transport part of the packet.
        if start < ip_len || offset % 2 != 0 || at + 2 > end {
            return Err(GsoError::CsumRange);
        }
        let mut value = finish(sum(&packet[start..end]));
        if value == 0 && offset == udp::CHECKSUM && start == ip_len && is_udp(packet) {
            value = 0xFFFF;
        }
        packet[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }
    Ok(validate(packet, policy)?)
}

/// The IP header length of `packet`, its lengths checked.
/// The IP header length and IP length of `packet`, checked against it.
fn ip_lengths(packet: &[u8]) -> Result<(usize, usize), GsoError> {
    Ok(match version(packet)? {
        4 => {
            let ip = Ipv4Packet::new_checked(packet)?;
            (ip.header_len(), usize::from(ip.total_len()))
        }
        _ => {
            let ip = Ipv6Packet::new_checked(packet)?;
            (
                IPV6_HEADER_LEN,
                IPV6_HEADER_LEN + usize::from(ip.payload_len()),
            )
        }
    })
}

fn is_udp(packet: &[u8]) -> bool {
    let at = if packet.first().map(|b| b >> 4) == Some(4) {
        9
    } else {
        6
    };
    packet.get(at) == Some(&protocol::UDP)
}

/// `sum` with one 16-bit word of the summed data replaced (RFC 1624
/// section 3, before complementing): `sum - old + new`.
fn replace(sum: u16, old: u16, new: u16) -> u16 {
    combine(combine(sum, !old), new)
}

/// A TSO/USO super-packet, checked, ready to be cut into segments.
///
/// Stateless: [`Self::write_segment`] may be called for the segments in
/// any order, each into its own buffer.
#[derive(Debug, Clone, Copy)]
pub struct Splitter<'a> {
    packet: &'a [u8],
    headers: Headers,
    gso_size: usize,
    count: usize,
}

impl<'a> Splitter<'a> {
    /// Checks `hdr` against `packet` (the bytes after the vnet header):
    /// a TCPV4/TCPV6/UDP_L4 type matching the packet's version and
    /// protocol, `NEEDS_CSUM`, a non-zero `gso_size`, `csum_start` and
    /// `csum_offset` naming the transport checksum, `hdr_len` within the
    /// packet, IP lengths equal to the packet's, no fragment, no IPv6
    /// extension header, no SYN/RST/URG. The header length is taken from
    /// the packet, not from `hdr_len` (wireguard-go `handleVirtioRead`:
    /// the kernel may report the whole first packet there).
    pub fn new(hdr: &VirtioNetHdr, packet: &'a [u8]) -> Result<Self, GsoError> {
        let kind = hdr.gso()?;
        let want_tcp = match kind {
            GsoType::None => return Err(GsoError::WrongKind),
            GsoType::Udp => return Err(GsoError::UnsupportedGsoType(hdr.gso_type)),
            GsoType::TcpV4 | GsoType::TcpV6 => true,
            GsoType::UdpL4 => false,
        };
        if !hdr.needs_csum() {
            return Err(GsoError::MissingNeedsCsum);
        }
        if hdr.gso_size == 0 {
            return Err(GsoError::ZeroGsoSize);
        }
        if packet.len() > MAX_PACKET_LEN {
            return Err(GsoError::TooLong);
        }
        if usize::from(hdr.hdr_len) > packet.len() {
            return Err(GsoError::HdrLen);
        }
        let headers = Headers::parse(packet)?;
        let matches = match kind {
            GsoType::TcpV4 => !headers.v6,
            GsoType::TcpV6 => headers.v6,
            _ => true,
        } && want_tcp == (headers.proto == protocol::TCP);
        if !matches {
            return Err(GsoError::ProtocolMismatch);
        }
        if usize::from(hdr.csum_start) != headers.ip_len
            || usize::from(hdr.csum_offset) != headers.csum_offset()
        {
            return Err(GsoError::CsumRange);
        }
        if want_tcp && packet[headers.ip_len + tcp::FLAGS] & (tcp::SYN | tcp::RST | tcp::URG) != 0 {
            return Err(GsoError::TcpFlags);
        }
        let gso_size = usize::from(hdr.gso_size);
        let count = (packet.len() - headers.len()).div_ceil(gso_size).max(1);
        Ok(Splitter {
            packet,
            headers,
            gso_size,
            count,
        })
    }

    /// How many segments the packet makes (at least one).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Refuses before any work if the caller has fewer than
    /// [`Self::count`] buffers.
    pub fn check_room(&self, available: usize) -> Result<(), GsoError> {
        if available < self.count {
            return Err(GsoError::TooManySegments {
                needed: self.count,
                available,
            });
        }
        Ok(())
    }

    /// The length of the longest segment (the first), for comparing with
    /// the MTU and the buffers.
    pub fn max_segment_len(&self) -> usize {
        self.headers.len() + self.gso_size.min(self.packet.len() - self.headers.len())
    }

    /// Writes segment `i` into the front of `out` and validates it there
    /// with `inner::validate` under `policy`; its length is the returned
    /// [`Validated::total_len`].
    pub fn write_segment(
        &self,
        i: usize,
        out: &mut [u8],
        policy: InnerPolicy,
    ) -> Result<Validated, GsoError> {
        let len = self.emit(i, out)?;
        Ok(validate(&out[..len], policy)?)
    }

    /// Writes segment `i` without validating it; returns its length.
    fn emit(&self, i: usize, out: &mut [u8]) -> Result<usize, GsoError> {
        if i >= self.count {
            return Err(GsoError::NoSuchSegment);
        }
        let h = self.headers;
        let hl = h.len();
        // i < count: the segment starts inside the payload, or at its end
        // for the one segment of an empty payload.
        let start = hl + i * self.gso_size;
        let end = (start + self.gso_size).min(self.packet.len());
        let payload = &self.packet[start..end];
        let seg_len = hl + payload.len();
        let out = out.get_mut(..seg_len).ok_or(GsoError::BufferTooSmall)?;
        let l4_total = h.l4_len + payload.len();
        let last = i + 1 == self.count;

        // Sum the payload where the kernel put it, before and apart from
        // the copy: the checksum vouches for the source.
        let payload_sum = sum(payload);
        let (src_ip, src_l4) = self.packet[..hl].split_at(h.ip_len);
        let (head, body) = out.split_at_mut(hl);
        head.copy_from_slice(&self.packet[..hl]);
        let (ip, l4) = head.split_at_mut(h.ip_len);

        if h.v6 {
            ip[field6::PAYLOAD_LEN].copy_from_slice(&(l4_total as u16).to_be_bytes());
        } else {
            let (old_len, old_id) = (be16(&src_ip[field4::TOTAL_LEN]), be16(&src_ip[field4::ID]));
            let old_check = be16(&src_ip[field4::CHECKSUM]);
            let id = old_id.wrapping_add(i as u16);
            let header_sum = replace(
                replace(replace(sum(src_ip), old_check, 0), old_len, seg_len as u16),
                old_id,
                id,
            );
            ip[field4::TOTAL_LEN].copy_from_slice(&(seg_len as u16).to_be_bytes());
            ip[field4::ID].copy_from_slice(&id.to_be_bytes());
            ip[field4::CHECKSUM].copy_from_slice(&finish(header_sum).to_be_bytes());
        }

        let at = h.csum_offset();
        let mut l4_sum = replace(sum(src_l4), be16(&src_l4[at..at + 2]), 0);
        if h.proto == protocol::TCP {
            let old_seq = be32(&src_l4[tcp::SEQ]);
            // i * gso_size < 65536: no truncation.
            let seq = old_seq.wrapping_add((i * self.gso_size) as u32);
            let mut flags = src_l4[tcp::FLAGS];
            if !last {
                flags &= !(tcp::FIN | tcp::PSH);
            }
            if i > 0 {
                flags &= !tcp::CWR;
            }
            l4_sum = replace(l4_sum, (old_seq >> 16) as u16, (seq >> 16) as u16);
            l4_sum = replace(l4_sum, old_seq as u16, seq as u16);
            let word = |f: u8| u16::from_be_bytes([src_l4[tcp::DATA_OFFSET], f]);
            l4_sum = replace(l4_sum, word(src_l4[tcp::FLAGS]), word(flags));
            l4[tcp::SEQ].copy_from_slice(&seq.to_be_bytes());
            l4[tcp::FLAGS] = flags;
        } else {
            l4_sum = replace(l4_sum, be16(&src_l4[udp::LENGTH]), l4_total as u16);
            l4[udp::LENGTH].copy_from_slice(&(l4_total as u16).to_be_bytes());
        }

        body.copy_from_slice(payload);
        #[cfg(test)]
        super::testutil::fault(l4, body);
        let mut value = finish(combine(
            h.pseudo_sum(l4_total),
            combine(l4_sum, payload_sum),
        ));
        if h.proto == protocol::UDP && value == 0 {
            value = 0xFFFF; // RFC 768; `__udp_gso_segment()`'s CSUM_MANGLED_0
        }
        l4[at..at + 2].copy_from_slice(&value.to_be_bytes());
        Ok(seg_len)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{Spec, payload, shapes};
    use super::*;
    use crate::wire::inner::{InnerError, InnerVerdict};
    use crate::wire::vnet::{flags, gso_type};

    const POLICY: InnerPolicy = InnerPolicy {
        allow_udp4_zero_checksum: true,
        allow_unverifiable_protocols: false,
        allow_udplite_partial_coverage: false,
        fill_udp4_zero_checksum: false,
    };

    /// Splits and checks every segment against the kernel's rules;
    /// returns the segments.
    fn split_all(spec: &Spec, data: &[u8], gso_size: u16) -> Vec<Vec<u8>> {
        let packet = spec.build(data, true);
        let hdr = spec.vnet(gso_size);
        let splitter = Splitter::new(&hdr, &packet).expect("valid super-packet");
        let gso = usize::from(gso_size);
        let expected = data.len().div_ceil(gso).max(1);
        assert_eq!(splitter.count(), expected);
        assert!(splitter.check_room(expected).is_ok());
        assert_eq!(
            splitter.check_room(expected - 1),
            Err(GsoError::TooManySegments {
                needed: expected,
                available: expected - 1
            })
        );
        let mut segments = Vec::new();
        for (i, chunk) in data
            .chunks(gso)
            .chain(data.is_empty().then_some(&[][..]))
            .enumerate()
        {
            let mut out = vec![0xA5u8; 70_000];
            let v = splitter
                .write_segment(i, &mut out, POLICY)
                .expect("segment validates");
            assert_eq!(v.verdict, InnerVerdict::Verified);
            out.truncate(v.total_len);
            // The segment is the source packet built with this chunk and
            // the per-segment fields.
            let mut seg_spec = spec.clone();
            seg_spec.seq = spec.seq.wrapping_add((i * gso) as u32);
            seg_spec.id = spec.id.wrapping_add(i as u16);
            if i + 1 < expected {
                seg_spec.tcp_flags &= !(tcp::FIN | tcp::PSH);
            }
            if i > 0 {
                seg_spec.tcp_flags &= !tcp::CWR;
            }
            assert_eq!(out, seg_spec.build(chunk, false), "segment {i} of {spec:?}");
            segments.push(out);
        }
        assert_eq!(
            splitter.write_segment(expected, &mut [0u8; 2000], POLICY),
            Err(GsoError::NoSuchSegment)
        );
        segments
    }

    #[test]
    fn splits_every_shape_like_the_kernel() {
        let data = payload(10_000, 1);
        for (v6, proto) in shapes() {
            for (len, gso) in [
                (4000, 1000),
                (4001, 1000),
                (999, 1000),
                (1000, 1000),
                (1, 1),
            ] {
                let spec = Spec::new(v6, proto);
                let segs = split_all(&spec, &data[..len], gso);
                assert_eq!(segs.len(), len.div_ceil(usize::from(gso)));
            }
            let mut spec = Spec::new(v6, proto);
            spec.ttl = 3;
            spec.tos = 0xb8;
            split_all(&spec, &data[..3333], 1200);
            // An empty payload is one segment of headers only.
            assert_eq!(split_all(&spec, &[], 1200).len(), 1);
        }
    }

    #[test]
    fn wireguard_go_read_cases_give_the_same_lengths() {
        // wireguard-go `tun/offload_linux_test.go` `Test_handleVirtioRead`:
        // 200 payload bytes, gso_size 100, ACK|PSH for TCP.
        let cases: [(bool, u8, u8, u16, u16, u16, usize); 4] = [
            (false, protocol::TCP, gso_type::TCPV4, 40, 20, 16, 140),
            (true, protocol::TCP, gso_type::TCPV6, 60, 40, 16, 160),
            (false, protocol::UDP, gso_type::UDP_L4, 28, 20, 6, 128),
            (true, protocol::UDP, gso_type::UDP_L4, 48, 40, 6, 148),
        ];
        for (v6, proto, kind, hdr_len, csum_start, csum_offset, want) in cases {
            let mut spec = Spec::new(v6, proto);
            spec.tcp_flags = tcp::ACK | tcp::PSH;
            let packet = spec.build(&payload(200, 20), true);
            let hdr = VirtioNetHdr {
                flags: flags::NEEDS_CSUM,
                gso_type: kind,
                hdr_len,
                gso_size: 100,
                csum_start,
                csum_offset,
            };
            assert_eq!(hdr, spec.vnet(100));
            let s = Splitter::new(&hdr, &packet).expect("valid");
            let lens: Vec<usize> = (0..s.count())
                .map(|i| {
                    s.write_segment(i, &mut [0u8; 200], POLICY)
                        .expect("valid")
                        .total_len
                })
                .collect();
            assert_eq!(lens, [want, want]);
        }
    }

    #[test]
    fn ipv4_and_tcp_options_are_copied_into_every_segment() {
        let data = payload(5000, 2);
        for (v6, proto) in shapes() {
            let mut spec = Spec::new(v6, proto);
            if !v6 {
                spec.ip_options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert, NOPs, EOL
            }
            if proto == protocol::TCP {
                // NOP NOP timestamps.
                spec.tcp_options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
            }
            let segs = split_all(&spec, &data, 1400);
            assert_eq!(segs.len(), 4);
        }
    }

    #[test]
    fn psh_and_fin_only_on_the_last_segment_cwr_only_on_the_first() {
        let data = payload(3500, 3);
        for v6 in [false, true] {
            let mut spec = Spec::new(v6, protocol::TCP);
            spec.tcp_flags = tcp::ACK | tcp::PSH | tcp::FIN | tcp::CWR;
            let segs = split_all(&spec, &data, 1000);
            let ip_len = if v6 { 40 } else { 20 };
            let flags: Vec<u8> = segs.iter().map(|s| s[ip_len + tcp::FLAGS]).collect();
            assert_eq!(
                flags,
                [
                    tcp::ACK | tcp::CWR,
                    tcp::ACK,
                    tcp::ACK,
                    tcp::ACK | tcp::PSH | tcp::FIN
                ]
            );
            let seqs: Vec<u32> = segs
                .iter()
                .map(|s| be32(&s[ip_len + 4..ip_len + 8]))
                .collect();
            let s0 = spec.seq;
            assert_eq!(
                seqs,
                [
                    s0,
                    s0.wrapping_add(1000),
                    s0.wrapping_add(2000),
                    s0.wrapping_add(3000)
                ]
            );
        }
    }

    #[test]
    fn ipv4_ids_count_up_and_wrap() {
        let spec = Spec::new(false, protocol::UDP);
        let segs = split_all(&spec, &payload(200, 4), 10);
        let ids: Vec<u16> = segs.iter().map(|s| be16(&s[4..6])).collect();
        assert_eq!(ids[0], 0xFFF0);
        assert_eq!(ids[15], 0xFFFF);
        assert_eq!(ids[16], 0);
        assert_eq!(ids[19], 3);
    }

    #[test]
    fn the_largest_super_packets_split() {
        for (v6, proto) in shapes() {
            let spec = Spec::new(v6, proto);
            let headers = if v6 { 40 } else { 20 } + if proto == protocol::TCP { 20 } else { 8 };
            // IPv4: total length 65535; IPv6: payload length 65535.
            let len = if v6 { 65535 + 40 } else { 65535 } - headers;
            let data = payload(len, 5);
            let segs = split_all(&spec, &data, 1448);
            assert_eq!(segs.len(), len.div_ceil(1448));
        }
    }

    #[test]
    fn the_checksum_comes_from_the_source_not_the_copy() {
        let data = payload(3000, 6);
        for (v6, proto) in shapes() {
            let spec = Spec::new(v6, proto);
            let packet = spec.build(&data, true);
            let splitter = Splitter::new(&spec.vnet(1000), &packet).expect("valid");
            let mut good = vec![0u8; 2000];
            let len = splitter.emit(1, &mut good).expect("emits");
            assert!(validate(&good[..len], POLICY).is_ok());
            let ip_len = if v6 { 40 } else { 20 };
            // A byte the copy got wrong, anywhere in the transport header
            // or payload, or in an address, fails validation afterwards:
            // the checksum was not computed over the copy.
            let addr = if v6 { 8 } else { 12 };
            for at in (ip_len..len).step_by(7).chain([addr, len - 1]) {
                if at == ip_len + if proto == protocol::TCP { 16 } else { 6 } {
                    continue;
                }
                let mut bad = good.clone();
                bad[at] ^= 0x20;
                assert!(
                    validate(&bad[..len], POLICY).is_err(),
                    "byte {at} of {v6} {proto}"
                );
            }
        }
    }

    #[test]
    fn a_byte_the_copy_changed_fails_validation_of_the_segment() {
        // wireguard-go sums the copy it just wrote (`gsoSplit`), which
        // would seal a corrupted copy with a matching checksum. Here the
        // sum comes from the source, so a flipped byte in the copy of the
        // payload or of the transport header is refused.
        use super::super::testutil::{Fault, arm};
        let data = payload(3000, 6);
        for (v6, proto) in shapes() {
            let spec = Spec::new(v6, proto);
            let packet = spec.build(&data, true);
            let splitter = Splitter::new(&spec.vnet(1000), &packet).expect("valid");
            let (l4, csum) = if proto == protocol::TCP {
                (20, 16)
            } else {
                (8, 6)
            };
            let faults = (0..l4)
                .filter(|&at| at != csum && at != csum + 1)
                .map(Fault::Header)
                .chain([0, 1, 500, 998, 999].map(Fault::Payload));
            for fault in faults {
                for i in [0, 2] {
                    arm(fault);
                    let mut out = vec![0u8; 2000];
                    // A changed UDP length is refused as a bad header.
                    let r = splitter.write_segment(i, &mut out, POLICY).err();
                    assert!(
                        matches!(
                            r,
                            Some(GsoError::Inner(
                                InnerError::Checksum | InnerError::TransportHeader
                            ))
                        ),
                        "{fault:?} in segment {i} of {v6} {proto}: {r:?}"
                    );
                }
            }
            // Unarmed, the same segments are fine.
            assert!(splitter.write_segment(2, &mut [0u8; 2000], POLICY).is_ok());
        }
    }

    #[test]
    fn single_packets_are_finished_in_place_or_validated() {
        let data = payload(777, 7);
        for (v6, proto) in shapes() {
            let spec = Spec::new(v6, proto);
            let full = spec.build(&data, false);
            // Complete checksum, no flags: validated as is.
            let mut p = full.clone();
            let v = complete_single(&VirtioNetHdr::default(), &mut p, POLICY).expect("valid");
            assert_eq!((v.verdict, p == full), (InnerVerdict::Verified, true));
            // DATA_VALID changes nothing: a corrupted byte is still refused.
            let last = p.len() - 1;
            p[last] ^= 1;
            let trusting = VirtioNetHdr {
                flags: flags::DATA_VALID,
                ..VirtioNetHdr::default()
            };
            assert_eq!(
                complete_single(&trusting, &mut p, POLICY),
                Err(GsoError::Inner(InnerError::Checksum))
            );
            // CHECKSUM_PARTIAL: finished in place to the same bytes.
            let mut p = spec.build(&data, true);
            let mut hdr = spec.vnet(0);
            hdr.gso_type = gso_type::NONE;
            complete_single(&hdr, &mut p, POLICY).expect("finished");
            assert_eq!(p, full);
            // A wrong pseudo-header sum from the kernel is caught.
            let mut p = spec.build(&data, true);
            let at = usize::from(hdr.csum_start + hdr.csum_offset);
            p[at] ^= 0x40;
            assert_eq!(
                complete_single(&hdr, &mut p, POLICY),
                Err(GsoError::Inner(InnerError::Checksum))
            );
            for (start, offset) in [(0, 16), (hdr.csum_start, 7), (hdr.csum_start, 2000)] {
                let bad = VirtioNetHdr {
                    csum_start: start,
                    csum_offset: offset,
                    ..hdr
                };
                assert_eq!(
                    complete_single(&bad, &mut p, POLICY),
                    Err(GsoError::CsumRange)
                );
            }
            assert_eq!(
                complete_single(&spec.vnet(100), &mut p, POLICY),
                Err(GsoError::WrongKind)
            );
        }
    }

    #[test]
    fn a_udp_checksum_that_computes_to_zero_is_sent_as_all_ones() {
        // Find a payload whose UDP checksum is 0xFFFF (computed 0) by
        // adjusting its last two bytes.
        let spec = Spec::new(false, protocol::UDP);
        let mut data = payload(64, 8);
        let full = spec.build(&data, false);
        let current = be16(&full[26..28]);
        // The checksum C is !S: adding C to the sum makes it 0xFFFF.
        let last = be16(&data[62..64]);
        let target = combine(last, current);
        data[62..64].copy_from_slice(&target.to_be_bytes());
        let full = spec.build(&data, false);
        assert_eq!(be16(&full[26..28]), 0xFFFF, "test setup");
        let mut p = spec.build(&data, true);
        let mut hdr = spec.vnet(0);
        hdr.gso_type = gso_type::NONE;
        complete_single(&hdr, &mut p, POLICY).expect("finished");
        assert_eq!(p, full);
        let segs = split_all(&spec, &data, 1000);
        assert_eq!(be16(&segs[0][26..28]), 0xFFFF);
    }

    #[test]
    fn malformed_super_packets_are_typed_errors() {
        let data = payload(3000, 9);
        let spec = Spec::new(false, protocol::TCP);
        let p = spec.build(&data, true);
        let good = spec.vnet(1000);
        let cases: Vec<(VirtioNetHdr, GsoError)> = vec![
            (
                VirtioNetHdr { flags: 0, ..good },
                GsoError::MissingNeedsCsum,
            ),
            (
                VirtioNetHdr {
                    gso_size: 0,
                    ..good
                },
                GsoError::ZeroGsoSize,
            ),
            (
                VirtioNetHdr {
                    hdr_len: 3041,
                    ..good
                },
                GsoError::HdrLen,
            ),
            (
                VirtioNetHdr {
                    csum_start: 24,
                    ..good
                },
                GsoError::CsumRange,
            ),
            (
                VirtioNetHdr {
                    csum_offset: 6,
                    ..good
                },
                GsoError::CsumRange,
            ),
            (
                VirtioNetHdr {
                    gso_type: gso_type::TCPV6,
                    ..good
                },
                GsoError::ProtocolMismatch,
            ),
            (
                VirtioNetHdr {
                    gso_type: gso_type::UDP_L4,
                    ..good
                },
                GsoError::ProtocolMismatch,
            ),
            (
                VirtioNetHdr {
                    gso_type: gso_type::UDP,
                    ..good
                },
                GsoError::UnsupportedGsoType(gso_type::UDP),
            ),
            (
                VirtioNetHdr {
                    gso_type: 9,
                    ..good
                },
                GsoError::Vnet(crate::wire::vnet::VnetError::GsoType(9)),
            ),
            (
                VirtioNetHdr {
                    gso_type: gso_type::NONE,
                    ..good
                },
                GsoError::WrongKind,
            ),
        ];
        for (hdr, err) in cases {
            assert_eq!(Splitter::new(&hdr, &p).err(), Some(err), "{hdr:?}");
        }
        assert!(Splitter::new(&good, &p).is_ok());
        // The packet's own faults.
        let mut short = p.clone();
        short.pop();
        assert_eq!(
            Splitter::new(&good, &short).err(),
            Some(GsoError::Ip(crate::wire::ip::IpError::TotalLength))
        );
        let mut frag = p.clone();
        frag[6] = 0x20;
        assert_eq!(Splitter::new(&good, &frag).err(), Some(GsoError::Fragment));
        for bad_flag in [tcp::SYN, tcp::RST, tcp::URG] {
            let mut s = spec.clone();
            s.tcp_flags |= bad_flag;
            let q = s.build(&data, true);
            assert_eq!(Splitter::new(&good, &q).err(), Some(GsoError::TcpFlags));
        }
        let mut doff = p.clone();
        doff[32] = 0x40; // data offset 4 words
        assert_eq!(
            Splitter::new(&good, &doff).err(),
            Some(GsoError::TransportHeader)
        );
        let mut v6 = Spec::new(true, protocol::TCP).build(&data, true);
        v6[6] = protocol::IPV6_HOP_BY_HOP;
        let hdr6 = Spec::new(true, protocol::TCP).vnet(1000);
        assert_eq!(Splitter::new(&hdr6, &v6).err(), Some(GsoError::Unsupported));
        let icmp = Spec::new(false, protocol::ICMP);
        let mut q = spec.build(&data, true);
        q[9] = icmp.proto;
        assert_eq!(
            Splitter::new(&good, &q).err(),
            Some(GsoError::ProtocolMismatch)
        );
        let huge = vec![0x45u8; MAX_PACKET_LEN + 1];
        assert_eq!(Splitter::new(&good, &huge).err(), Some(GsoError::TooLong));
        // Output buffers too small for a segment.
        let s = Splitter::new(&good, &p).expect("valid");
        assert_eq!(s.max_segment_len(), 1040);
        assert_eq!(
            s.write_segment(0, &mut [0u8; 1039], POLICY),
            Err(GsoError::BufferTooSmall)
        );
        assert_eq!(
            s.write_segment(2, &mut [0u8; 1040], POLICY)
                .map(|v| v.total_len),
            Ok(1040)
        );
    }

    #[test]
    fn random_headers_and_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let data = payload(3000, 10);
        let mut out = vec![0u8; 4096];
        let mut accepted = 0;
        for round in 0..20_000 {
            let r = next();
            let (v6, proto) = shapes()[(r % 4) as usize];
            let spec = Spec::new(v6, proto);
            let len = (r >> 8) as usize % 3000;
            let mut p = spec.build(&data[..len], true);
            let mut hdr = spec.vnet(((r >> 24) % 1500) as u16);
            // Mutate a few header fields and bytes at random.
            let m = next();
            if m & 1 != 0 {
                hdr = VirtioNetHdr::parse(&next().to_le_bytes()[..]).unwrap_or(hdr);
                hdr.hdr_len %= 2000;
            }
            for k in 0..(m >> 1) % 4 {
                let at = (next() as usize) % p.len();
                p[at] = (next() >> (k * 8)) as u8;
            }
            if round % 3 == 0 {
                p.truncate((next() as usize) % (p.len() + 1));
            }
            if let Ok(s) = Splitter::new(&hdr, &p) {
                accepted += 1;
                for i in 0..s.count().min(4) {
                    let _ = s.write_segment(i, &mut out, POLICY);
                }
            }
            let _ = complete_single(&hdr, &mut p, POLICY);
            hdr.gso_type = gso_type::NONE;
            let _ = complete_single(&hdr, &mut p, POLICY);
        }
        assert!(
            accepted > 1000,
            "the loop reached the segment code: {accepted}"
        );
    }
}
