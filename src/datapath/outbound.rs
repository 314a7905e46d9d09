//! TUN -> ESP: validate the inner checksum, find the SA, take a sequence
//! number, and seal in place.
//!
//! The ESP header and IV (16 bytes) are written over the tail of the inner
//! IP header, right before the transport payload, so sealing moves no data:
//! the UDP or raw ESP socket adds the outer headers (RFC 3948 section 2.1:
//! ports 4500 by default; RFC 4303 section 3.1.1: transport mode keeps the
//! IP addresses, which the receiver rebuilds from its SA).
//!
//! Path MTU (RFC 1191, RFC 8201): the daemon tells the pipeline the path
//! MTU it learned per peer ([`PathMtus`]). A packet whose ESP packet would
//! not fit, and which may not be fragmented, is dropped as
//! [`DropReason::PacketTooBig`] before it takes a sequence number; its
//! batch index and the inner MTU to advertise go to
//! [`Outbound::too_big`], for the caller to answer through the TUN device.
//! The packets checked are the segments a TSO/USO super-packet was split
//! into (the split happens before this pipeline), never the super-packet.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Counters, DropReason, SaDrops, Verdict};
use crate::crypto::ProviderId;
use crate::crypto::select::Selector;
use crate::packet::PacketBuf;
use crate::sa::table::{SaId, SaMeta, SaState, SaTable, TableError};
use crate::sa::{OutboundSa, SeqError};
use crate::wire::icmp::{self, IPV4_MIN_MTU, IPV6_MIN_MTU, MssClamp};
use crate::wire::inner::{self, InnerPolicy, InnerVerdict};
use crate::wire::ip::{self, protocol};
use crate::wire::outer::Encap;
use crate::wire::{esp, hop_by_hop};

/// The path MTU learned for each peer endpoint (outer address), and the
/// encapsulation the arithmetic needs. Few peers: a short list, with its
/// minimum kept so that a packet below it needs no lookup at all.
#[derive(Debug, Clone)]
pub struct PathMtus {
    pub encap: Encap,
    entries: Vec<(IpAddr, u16)>,
    min: u16,
}

impl Default for PathMtus {
    fn default() -> Self {
        PathMtus::new(Encap::NATT)
    }
}

impl PathMtus {
    pub fn new(encap: Encap) -> Self {
        PathMtus {
            encap,
            entries: Vec::new(),
            min: u16::MAX,
        }
    }

    /// Records (or with `None` forgets) the path MTU to `endpoint`.
    pub fn set(&mut self, endpoint: IpAddr, mtu: Option<u16>) {
        self.entries.retain(|(ip, _)| *ip != endpoint);
        if let Some(mtu) = mtu {
            self.entries.push((endpoint, mtu));
        }
        self.min = self.entries.iter().map(|e| e.1).min().unwrap_or(u16::MAX);
    }

    pub fn get(&self, endpoint: IpAddr) -> Option<u16> {
        self.entries
            .iter()
            .find(|(ip, _)| *ip == endpoint)
            .map(|e| e.1)
    }

    /// The path MTU to `endpoint` if an outer packet of `outer_len` bytes
    /// might exceed it.
    fn limit(&self, endpoint: IpAddr, outer_len: usize) -> Option<u16> {
        if outer_len <= usize::from(self.min) {
            return None;
        }
        self.get(endpoint)
            .filter(|mtu| outer_len > usize::from(*mtu))
    }
}

/// The MSS a SYN to or from the peer at `endpoint` may carry at most
/// under `clamp`: a fixed number, or (auto) what fits the learned path MTU
/// after ESP, or the tunnel MTU while none is learned. IPv6 packets up to
/// 1280 bytes always pass ([`too_big_verdict`]), so IPv6 never clamps
/// below what 1280 allows.
pub fn clamp_limit(
    clamp: MssClamp,
    path_mtu: &PathMtus,
    tunnel_mtu: u16,
    endpoint: IpAddr,
    v6: bool,
    icv: usize,
) -> Option<u16> {
    match clamp {
        MssClamp::Off => None,
        MssClamp::Fixed(mss) => Some(mss),
        MssClamp::Auto => {
            let mtu = match path_mtu.get(endpoint) {
                Some(path) => icmp::usable_inner_mtu(path, path_mtu.encap, v6, icv)
                    .unwrap_or(0)
                    .min(tunnel_mtu),
                None => tunnel_mtu,
            };
            let mtu = if v6 { mtu.max(IPV6_MIN_MTU) } else { mtu };
            Some(icmp::mss_for_mtu(mtu, v6))
        }
    }
}

/// What to do with an inner packet too big for the path: `Ok` to send it
/// anyway (the host fragments the outer packet), `Err(mtu)` to drop it and
/// advertise `mtu`.
///
/// IPv4: only DF packets are refused; the next-hop MTU advertised is the
/// usable inner MTU (at least 68, RFC 791). IPv6 (RFC 8200 section 5):
/// no MTU below 1280 is ever advertised. When the usable inner MTU is
/// below 1280, the tunnel is a link that cannot carry 1280-byte packets,
/// which must fragment and reassemble below IPv6: packets of up to 1280
/// bytes are sent, and the host fragments their outer packet (the peer's
/// kernel reassembles it); larger ones get a Packet Too Big of 1280.
pub fn too_big_verdict(
    packet: &[u8],
    total_len: usize,
    path_mtu: u16,
    encap: Encap,
    icv: usize,
) -> Result<(), u16> {
    let v6 = packet.first().is_some_and(|b| b >> 4 == 6);
    let usable = icmp::usable_inner_mtu(path_mtu, encap, v6, icv).unwrap_or(0);
    if v6 {
        if total_len <= usize::from(IPV6_MIN_MTU) {
            return Ok(());
        }
        return Err(usable.max(IPV6_MIN_MTU));
    }
    // RFC 791: the DF flag is bit 1 of byte 6.
    let df = packet.get(6).is_some_and(|b| b & 0x40 != 0);
    if df {
        Err(usable.max(IPV4_MIN_MTU))
    } else {
        Ok(())
    }
}

/// The outbound pipeline and its SAs.
#[derive(Debug, Default)]
pub struct Outbound {
    pub policy: InnerPolicy,
    /// Shared so that a status reader on another thread sees them live.
    pub counters: Arc<Counters>,
    /// Looked up by inner remote address among the active SAs; each
    /// entry counts what was dropped after it was found.
    pub sas: SaTable<OutboundSa, SaDrops>,
    /// The learned path MTU per peer endpoint.
    pub path_mtu: PathMtus,
    /// `[inner] clamp_mss`, and the tunnel (TUN) MTU that `auto` falls
    /// back to while no path MTU is learned.
    pub clamp_mss: MssClamp,
    pub tunnel_mtu: u16,
    /// The last batch's [`DropReason::PacketTooBig`] drops: (index in the
    /// batch, inner MTU to advertise). Its capacity is reused.
    pub too_big: Vec<(usize, u16)>,
    /// `Some` to carry IPv6 hop-by-hop headers on the outer packet
    /// ([`crate::wire::hop_by_hop`]): ESP is sealed behind the header, and
    /// the header's bytes are kept here under the packet's batch index for
    /// the socket to send (`IPV6_HOPOPTS`); a batch longer than the slots
    /// drops the rest of its hop-by-hop packets. `None` (the default):
    /// such packets are dropped as `hop_by_hop`. The daemon sets it with
    /// `[inner] ipv6_hop_by_hop = "carry"`.
    pub hop_by_hop: Option<hop_by_hop::Slots>,
}

impl Outbound {
    pub fn new(policy: InnerPolicy) -> Self {
        Outbound {
            policy,
            ..Outbound::default()
        }
    }

    /// Adds an SA under the next free id (for tools and tests; the daemon
    /// names its SAs itself through [`Self::sas`]).
    pub fn add_sa(&mut self, sa: OutboundSa, meta: SaMeta) -> Result<SaId, TableError> {
        self.sas.add(sa, meta)
    }

    pub fn sa_mut(&mut self, id: SaId) -> Option<&mut OutboundSa> {
        self.sas.sa_mut(id)
    }

    /// Seals a batch in place; `verdicts` gets one entry per packet (its
    /// capacity is reused, so a steady state allocates nothing).
    pub fn process(
        &mut self,
        selector: &Selector,
        batch: &mut [PacketBuf],
        verdicts: &mut Vec<Verdict>,
    ) {
        verdicts.clear();
        self.too_big.clear();
        if let Some(slots) = &mut self.hop_by_hop {
            slots.clear_all();
        }
        // Once per batch: a provider switch takes effect at batch edges.
        let provider = selector.active();
        for (index, buf) in batch.iter_mut().enumerate() {
            let mut matched = None;
            let mut too_big = None;
            let verdict = match self.seal_one(provider, index, buf, &mut matched, &mut too_big) {
                Ok(sa) => Verdict::Send { sa },
                Err(reason) => {
                    if let Some(mtu) = too_big {
                        self.too_big.push((index, mtu));
                    }
                    if let Some(entry) = matched.and_then(|id| self.sas.get_mut(id)) {
                        entry.counters[reason.index()] += 1;
                    }
                    self.counters.count_drop(reason)
                }
            };
            verdicts.push(verdict);
        }
        self.counters.passed_batch(verdicts);
    }

    fn seal_one(
        &mut self,
        provider: Option<ProviderId>,
        index: usize,
        buf: &mut PacketBuf,
        matched: &mut Option<SaId>,
        too_big: &mut Option<u16>,
    ) -> Result<SaId, DropReason> {
        // A hop-by-hop header to carry stays in front of ESP, and its
        // bytes are kept before sealing writes the ESP header over them.
        let carried = match self.hop_by_hop {
            Some(_) => hop_by_hop::first_header(buf.data())?,
            None => None,
        };
        // Corruption between the kernel and the cipher is caught here,
        // before a valid ICV would vouch for it.
        let mut shape = if let Some(h) = carried {
            hop_by_hop::validate_behind(buf.data(), h, self.policy)?
        } else if self.policy.fill_udp4_zero_checksum {
            // A zero UDP checksum is filled in below, so it passes here.
            let policy = InnerPolicy {
                allow_udp4_zero_checksum: true,
                ..self.policy
            };
            inner::validate(buf.data(), policy)?
        } else {
            inner::validate(buf.data(), self.policy)?
        };
        if shape.verdict == InnerVerdict::Udp4ZeroChecksum && self.policy.fill_udp4_zero_checksum {
            // From the bytes as handed over, before any copy or cipher:
            // the receiver's check then covers our cipher for it too.
            inner::fill_udp4_checksum(buf.data_mut())?;
            shape.verdict = InnerVerdict::Verified;
            self.counters
                .udp4_checksum_filled
                .fetch_add(1, Ordering::Relaxed);
        }
        let entry = self
            .sas
            .find_mut(|e| e.meta.state == SaState::Active && e.sa.inner.remote == shape.dst)
            .ok_or(DropReason::NoSa)?;
        *matched = Some(entry.id);
        let (id, endpoint) = (entry.id, entry.meta.endpoint);
        let sa = &mut entry.sa;
        if sa.inner.local != shape.src {
            return Err(DropReason::SourceMismatch);
        }
        let provider = provider.ok_or(DropReason::NoProvider)?;
        if sa.keys.key(provider).is_none() {
            return Err(DropReason::NoProvider);
        }

        // DSCP and ECN go out on the outer header as the inner packet has
        // them: in transport mode there is one header (RFC 4301 5.1.2),
        // and a Not-ECT packet must stay Not-ECT so that no router can
        // mark it CE (RFC 6040 4.2; see wire::ecn). Read before sealing
        // overwrites the header.
        let tos = ip::tos_of(buf.data());
        let icv = sa.keys.icv().bytes();
        let payload_len = shape.total_len - shape.header_len;
        let encap = self.path_mtu.encap;
        let v6 = shape.src.is_ipv6();
        // The outer packet carries the hop-by-hop header too.
        let hbh_len = carried.map_or(0, |h| h.len);
        let outer_len = icmp::outer_len(payload_len, encap, v6, icv) + hbh_len;
        // Before a sequence number is taken: a refused packet costs none.
        // A datagram the sender fragmented goes whole, its outer packet
        // fragmented by the host (PacketMeta::reassembled).
        if !buf.meta.reassembled
            && let Some(path) = self.path_mtu.limit(endpoint.ip(), outer_len)
            && let Err(mtu) = too_big_verdict(buf.data(), shape.total_len, path, encap, icv)
        {
            *too_big = Some(mtu);
            return Err(DropReason::PacketTooBig);
        }
        // (icmp::clamp_mss finds no TCP header behind a hop-by-hop one:
        // such SYNs keep their MSS.)
        if carried.is_none() && matches!(shape.protocol, protocol::TCP | protocol::IPV6_DEST_OPTS) {
            let limit = clamp_limit(
                self.clamp_mss,
                &self.path_mtu,
                self.tunnel_mtu,
                endpoint.ip(),
                v6,
                icv,
            );
            if let Some(limit) = limit
                && icmp::clamp_mss(buf.data_mut(), limit).is_some()
            {
                // RFC 1624 updated the checksum; checked again as usual,
                // so a wrong update is a drop, never a sent packet.
                inner::validate(buf.data(), self.policy)?;
                self.counters.mss_clamped.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Kept only for a packet that is sealed; a verdict other than
        // Send leaves its slot unused.
        if let Some(h) = carried {
            let kept = self.hop_by_hop.as_mut().is_some_and(|slots| {
                buf.data()
                    .get(ip::IPV6_HEADER_LEN..ip::IPV6_HEADER_LEN + h.len)
                    .is_some_and(|bytes| slots.set(index, bytes))
            });
            if !kept {
                return Err(DropReason::HopByHop);
            }
        }
        let pad = esp::pad_len(payload_len);
        let (storage, start, _) = buf.parts();
        let payload_start = start + shape.header_len;
        let payload_end = payload_start + payload_len;
        let plaintext_end = payload_end + pad + esp::TRAILER_LEN;
        let sealed_end = plaintext_end + icv;
        let esp_start = payload_start - esp::HEADER_LEN - esp::IV_LEN;
        if sealed_end > storage.len() {
            return Err(DropReason::Oversize);
        }

        // Consumed even if sealing then fails: a number is never reused.
        let seq = sa.next_seq().map_err(|e| match e {
            SeqError::Exhausted => DropReason::SequenceExhausted,
            SeqError::ReservationNeeded => DropReason::SequenceReservation,
        })?;
        let header: &mut [u8; esp::HEADER_LEN + esp::IV_LEN] = (&mut storage
            [esp_start..payload_start])
            .try_into()
            .map_err(|_| DropReason::Oversize)?;
        esp::emit_header(header, sa.spi, seq);
        esp::emit_trailer(&mut storage[payload_end..plaintext_end], shape.protocol);
        let nonce = esp::nonce(sa.keys.salt(), seq.to_be_bytes());
        let (aad, aad_len) = esp::aad(sa.spi, seq, sa.esn);
        let (body, tail) = storage.split_at_mut(plaintext_end);
        let key = sa.keys.key(provider).ok_or(DropReason::NoProvider)?;
        key.seal_in_place(
            &nonce,
            &aad[..aad_len],
            &mut body[payload_start..],
            &mut tail[..icv],
        )
        .map_err(|_| DropReason::SealFailed)?;

        buf.set_range(esp_start, sealed_end);
        buf.meta.peer = Some(endpoint);
        buf.meta.tos = tos;
        if sa.take_soft_limit_crossing() {
            self.counters
                .soft_limit_crossings
                .fetch_add(1, Ordering::Relaxed);
        }
        sa.stats.packets += 1;
        sa.stats.bytes += shape.total_len as u64;
        self.counters.exception(shape.verdict);
        Ok(id)
    }
}
