//! ESP -> TUN, in the order of Linux `xfrm_input`: classify, SA by SPI,
//! replay check, decrypt and verify the ICV, replay update, trailer,
//! rebuild the IP header from the SA's inner addresses (with the outer
//! packet's DSCP and ECN, [`crate::wire::ecn::transport_mode`]), and then,
//! unlike Linux for transport-mode NAT-T, validate the inner checksum.
//!
//! With `[inner] clamp_mss`, a TCP SYN from the peer has its MSS lowered
//! to what fits the path back to that peer (the segments our side will
//! send), before the inner checksum is validated as usual.

use std::net::IpAddr;
use std::sync::Arc;

use super::outbound::{PathMtus, clamp_limit};
use super::{ByReason, Counters, DropContext, DropReason, Flow, SaDrops, Verdict};
use crate::crypto::ProviderId;
use crate::crypto::select::Selector;
use crate::packet::PacketBuf;
use crate::sa::InboundSa;
use crate::sa::replay::ReplayError;
use crate::sa::table::{SaId, SaMeta, SaTable, TableError};
use crate::wire::esp::{self, EspPacket, UdpPayload};
use crate::wire::icmp::{self, MssClamp};
use crate::wire::inner::{self, InnerPolicy, Pseudo};
use crate::wire::ip::{self, IPV4_HEADER_LEN, IPV6_HEADER_LEN, protocol};
/// How the ESP bytes arrived: only UDP (where the payload may also be a
/// keepalive or IKE) versus raw ESP (outer header already removed) matters
/// here.
pub use crate::wire::outer::Encap;
use crate::wire::{ecn, hop_by_hop};

/// Hop limit of rebuilt headers: the outer packet's is not visible to a
/// UDP socket without extra control messages, and the packet has arrived.
const REBUILT_TTL: u8 = 64;

/// The inbound pipeline and its SAs.
#[derive(Debug, Default)]
pub struct Inbound {
    pub policy: InnerPolicy,
    /// Whether an IKE daemon takes non-ESP-marker packets ([`Verdict::Ike`]).
    pub ike_handler: bool,
    /// Shared so that a status reader on another thread sees them live.
    pub counters: Arc<Counters>,
    /// Looked up by SPI (active and retiring SAs alike); each entry counts
    /// what was dropped after it was found.
    pub sas: SaTable<InboundSa, SaDrops>,
    /// Per reason, the latest [`Self::process`] call's last drop.
    last_drops: ByReason<Option<DropContext>>,
    /// `Some` to carry IPv6 hop-by-hop headers ([`crate::wire::hop_by_hop`]):
    /// the caller puts the header its socket reported for each received
    /// datagram (`IPV6_RECVHOPOPTS`) under the packet's batch index, and
    /// the rebuilt inner packet gets it back between its IPv6 header and
    /// the decrypted payload. `None` (the default), or an empty slot: no
    /// header (the daemon fills them with `[inner] ipv6_hop_by_hop =
    /// "carry"`); one marked too long: dropped as `hop_by_hop`.
    pub hop_by_hop: Option<hop_by_hop::Slots>,
    /// `[inner] clamp_mss`, the tunnel MTU and the path MTU per peer (a
    /// copy of what the outbound side learned), for SYNs from the peer.
    pub clamp_mss: MssClamp,
    pub tunnel_mtu: u16,
    pub path_mtu: PathMtus,
}

impl Inbound {
    pub fn new(policy: InnerPolicy) -> Self {
        Inbound {
            policy,
            ..Inbound::default()
        }
    }

    /// Adds an SA under the next free id (for tools and tests; the daemon
    /// names its SAs itself through [`Self::sas`]).
    pub fn add_sa(&mut self, sa: InboundSa, meta: SaMeta) -> Result<SaId, TableError> {
        self.sas.add(sa, meta)
    }

    pub fn sa_mut(&mut self, id: SaId) -> Option<&mut InboundSa> {
        self.sas.sa_mut(id)
    }

    /// The last packet the latest [`Self::process`] dropped for `reason`,
    /// with what was known of it. For inner-header and inner-checksum
    /// drops its buffer holds the rebuilt, decrypted packet (for
    /// post-mortems); after other drops past decryption it may hold
    /// half-processed bytes.
    pub fn last_drop(&self, reason: DropReason) -> Option<DropContext> {
        self.last_drops[reason.index()]
    }

    /// Opens a batch in place; on [`Verdict::Deliver`] the buffer holds the
    /// rebuilt, validated IP packet.
    pub fn process(
        &mut self,
        selector: &Selector,
        encap: Encap,
        batch: &mut [PacketBuf],
        verdicts: &mut Vec<Verdict>,
    ) {
        verdicts.clear();
        self.last_drops = ByReason::default();
        let provider = selector.active();
        for (packet, buf) in batch.iter_mut().enumerate() {
            let mut context = DropContext {
                packet,
                ..DropContext::default()
            };
            let verdict = match self.open_one(provider, encap, packet, buf, &mut context) {
                Ok(()) => Verdict::Deliver,
                Err(DropReason::Ike) if self.ike_handler => Verdict::Ike,
                Err(reason) => {
                    if let Some(entry) = context.sa.and_then(|id| self.sas.get_mut(id)) {
                        entry.counters[reason.index()] += 1;
                    }
                    self.last_drops[reason.index()] = Some(context);
                    self.counters.count_drop(reason)
                }
            };
            verdicts.push(verdict);
        }
        self.counters.passed_batch(verdicts);
    }

    fn open_one(
        &mut self,
        provider: Option<ProviderId>,
        encap: Encap,
        index: usize,
        buf: &mut PacketBuf,
        context: &mut DropContext,
    ) -> Result<(), DropReason> {
        // In transport mode the outer header is the packet's own (RFC 4301
        // 5.1.2): its DSCP and ECN, as the socket reported them, go into
        // the rebuilt header (RFC 6040 4.2 as it applies here: wire::ecn).
        let tos = ecn::transport_mode(buf.meta.tos);
        let data = buf.data();
        if encap.is_udp() {
            match esp::classify_udp_payload(data) {
                UdpPayload::Keepalive => return Err(DropReason::Keepalive),
                UdpPayload::Ike => return Err(DropReason::Ike),
                UdpPayload::Esp => {}
            }
        }
        let spi = match data {
            [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
            _ => return Err(DropReason::Truncated),
        };
        context.spi = Some(spi);
        let entry = self
            .sas
            .find_mut(|e| e.sa.spi == spi)
            .ok_or(DropReason::UnknownSpi)?;
        context.sa = Some(entry.id);
        let sa = &mut entry.sa;
        let icv = sa.keys.icv().bytes();
        let packet = EspPacket::new_checked(data, icv).map_err(|_| DropReason::Truncated)?;

        // RFC 4303 section 3.4.3: check before decrypting...
        context.seq = Some(u64::from(packet.seq_low()));
        let seq = sa.replay.infer(packet.seq_low()).map_err(replay_reason)?;
        context.seq = Some(seq);
        sa.replay.check(seq).map_err(replay_reason)?;
        let key = provider
            .and_then(|p| sa.keys.key(p))
            .ok_or(DropReason::NoProvider)?;
        let nonce = esp::nonce(sa.keys.salt(), packet.iv());
        let (aad, aad_len) = esp::aad(spi, seq, sa.esn);

        let (storage, start, end) = buf.parts();
        let ciphertext_start = start + esp::HEADER_LEN + esp::IV_LEN;
        let icv_start = end - icv;
        let (body, tag) = storage.split_at_mut(icv_start);
        key.open_in_place(
            &nonce,
            &aad[..aad_len],
            &mut body[ciphertext_start..],
            &tag[..icv],
        )
        .map_err(|_| DropReason::IcvFailure)?;
        // ...and update only after the ICV verified.
        sa.replay.update(seq).map_err(replay_reason)?;

        let (payload_len, next_header) = esp::parse_trailer(&storage[ciphertext_start..icv_start])
            .map_err(|_| DropReason::BadPadding)?;
        if next_header == protocol::NO_NEXT_HEADER {
            return Err(DropReason::DummyPacket);
        }
        let payload_end = ciphertext_start + payload_len;
        let (remote, local) = (sa.inner.remote, sa.inner.local);
        // The outer packet came with a hop-by-hop header too long to
        // carry (or cut short): dropped, never delivered without it.
        if self
            .hop_by_hop
            .as_ref()
            .is_some_and(|s| s.is_too_long(index))
        {
            return Err(DropReason::HopByHop);
        }
        let reported = self.hop_by_hop.as_ref().map_or(&[][..], |s| s.get(index));
        let header_start = if reported.is_empty() {
            rebuild_header(
                storage,
                ciphertext_start,
                payload_len,
                next_header,
                remote,
                local,
                tos,
            )?
        } else {
            // The outer packet's hop-by-hop header goes back where the
            // sender took it from; the transport checksum below does not
            // cover it (RFC 8200 section 8.1). (icmp::clamp_mss finds no
            // TCP header behind it: such SYNs keep their MSS.)
            hop_by_hop::rebuild_v6(
                storage,
                ciphertext_start,
                payload_len,
                next_header,
                remote,
                local,
                REBUILT_TTL,
                tos,
                reported,
            )?
        };
        // The check Linux skips for transport-mode NAT-T: against the
        // addresses this SA stands for, which are the ones just written.
        let pseudo = match (remote, local) {
            (IpAddr::V4(r), IpAddr::V4(l)) => Pseudo::V4(r.octets(), l.octets()),
            (IpAddr::V6(r), IpAddr::V6(l)) => Pseudo::V6(r.octets(), l.octets()),
            _ => return Err(DropReason::InnerHeader),
        };
        if matches!(next_header, protocol::TCP | protocol::IPV6_DEST_OPTS)
            && let Some(limit) = clamp_limit(
                self.clamp_mss,
                &self.path_mtu,
                self.tunnel_mtu,
                entry.meta.endpoint.ip(),
                remote.is_ipv6(),
                icv,
            )
            && icmp::clamp_mss(&mut storage[header_start..payload_end], limit).is_some()
        {
            // Validated below like any packet: an RFC 1624 update gone
            // wrong is an inner_checksum drop, never a delivery.
            self.counters
                .mss_clamped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let segment = &storage[ciphertext_start..payload_end];
        let verdict = match inner::validate_segment(pseudo, next_header, segment, self.policy) {
            Ok(verdict) => verdict,
            Err(e) => {
                // Flows are worked out for dropped packets only.
                context.flow = Some(Flow::of_segment(remote, local, next_header, segment));
                // Kept for post-mortems: the decrypted packet as it would
                // have been delivered.
                buf.set_range(header_start, payload_end);
                return Err(DropReason::from(e));
            }
        };
        buf.set_range(header_start, payload_end);
        sa.stats.packets += 1;
        sa.stats.bytes += buf.len() as u64;
        self.counters.exception(verdict);
        Ok(())
    }
}

fn replay_reason(e: ReplayError) -> DropReason {
    match e {
        ReplayError::Replayed => DropReason::Replay,
        ReplayError::TooOld | ReplayError::Exhausted => DropReason::TooOld,
    }
}

/// Writes an IP header for `payload_len` bytes at `payload_start` into the
/// space before it, with `tos` as its TOS byte or traffic class (the IPv4
/// header checksum covers it); returns where the header starts.
fn rebuild_header(
    storage: &mut [u8],
    payload_start: usize,
    payload_len: usize,
    next_header: u8,
    src: IpAddr,
    dst: IpAddr,
    tos: u8,
) -> Result<usize, DropReason> {
    let header_len = if src.is_ipv4() {
        IPV4_HEADER_LEN
    } else {
        IPV6_HEADER_LEN
    };
    let start = payload_start
        .checked_sub(header_len)
        .ok_or(DropReason::Oversize)?;
    ip::emit_header_with_tos(
        &mut storage[start..payload_start],
        src,
        dst,
        next_header,
        payload_len,
        REBUILT_TTL,
        tos,
    )
    .map_err(|_| DropReason::Oversize)?;
    Ok(start)
}
