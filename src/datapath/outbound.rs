//! TUN -> ESP: validate the inner checksum, find the SA, take a sequence
//! number, and seal in place.
//!
//! The ESP header and IV (16 bytes) are written over the tail of the inner
//! IP header, right before the transport payload, so sealing moves no data:
//! the UDP or raw ESP socket adds the outer headers (RFC 3948 section 2.1:
//! ports 4500 by default; RFC 4303 section 3.1.1: transport mode keeps the
//! IP addresses, which the receiver rebuilds from its SA).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Counters, DropReason, SaDrops, Verdict};
use crate::crypto::ProviderId;
use crate::crypto::select::Selector;
use crate::packet::PacketBuf;
use crate::sa::{OutboundSa, SeqError};
use crate::wire::esp;
use crate::wire::inner::{self, InnerPolicy};
use crate::wire::ip::{IPV6_HEADER_LEN, Ipv4Packet, Ipv6Packet};

/// The outbound pipeline and its SAs.
#[derive(Debug, Default)]
pub struct Outbound {
    pub policy: InnerPolicy,
    /// Shared so that a status reader on another thread sees them live.
    pub counters: Arc<Counters>,
    /// Looked up by inner remote address. A linear scan: hosts have few
    /// peers, and it beats hashing below a few dozen.
    sas: Vec<OutboundSa>,
    /// Per SA, beside `sas`: what was dropped after the SA was found.
    sa_drops: Vec<SaDrops>,
}

impl Outbound {
    pub fn new(policy: InnerPolicy) -> Self {
        Outbound {
            policy,
            ..Outbound::default()
        }
    }

    /// Adds an SA; returns the index [`Verdict::Send`] will name.
    pub fn add_sa(&mut self, sa: OutboundSa) -> usize {
        self.sas.push(sa);
        self.sa_drops.push([0; DropReason::ALL.len()]);
        self.sas.len() - 1
    }

    /// Drops, by reason, of packets matched to the SA at `index`.
    pub fn sa_drops(&self, index: usize) -> Option<&SaDrops> {
        self.sa_drops.get(index)
    }

    pub fn sas(&self) -> &[OutboundSa] {
        &self.sas
    }

    pub fn sa_mut(&mut self, index: usize) -> Option<&mut OutboundSa> {
        self.sas.get_mut(index)
    }

    /// Removes and returns the SA at `index` (later indices shift down).
    pub fn remove_sa(&mut self, index: usize) -> Option<OutboundSa> {
        if index >= self.sas.len() {
            return None;
        }
        self.sa_drops.remove(index);
        Some(self.sas.remove(index))
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
        // Once per batch: a provider switch takes effect at batch edges.
        let provider = selector.active();
        for buf in batch {
            let mut matched = None;
            let verdict = match self.seal_one(provider, buf, &mut matched) {
                Ok(sa) => Verdict::Send { sa },
                Err(reason) => {
                    if let Some(counts) = matched.and_then(|i| self.sa_drops.get_mut(i)) {
                        counts[reason.index()] += 1;
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
        buf: &mut PacketBuf,
        matched: &mut Option<usize>,
    ) -> Result<usize, DropReason> {
        // Corruption between the kernel and the cipher is caught here,
        // before a valid ICV would vouch for it.
        let inner = inner::validate(buf.data(), self.policy)?;
        let shape = Shape::of(buf.data());
        let index = self
            .sas
            .iter()
            .position(|sa| sa.inner.remote == shape.dst)
            .ok_or(DropReason::NoSa)?;
        *matched = Some(index);
        let sa = &mut self.sas[index];
        if sa.inner.local != shape.src {
            return Err(DropReason::SourceMismatch);
        }
        let provider = provider.ok_or(DropReason::NoProvider)?;
        if sa.keys.key(provider).is_none() {
            return Err(DropReason::NoProvider);
        }

        let icv = sa.keys.icv().bytes();
        let payload_len = shape.total_len - shape.header_len;
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
        if sa.take_soft_limit_crossing() {
            self.counters
                .soft_limit_crossings
                .fetch_add(1, Ordering::Relaxed);
        }
        sa.stats.packets += 1;
        sa.stats.bytes += shape.total_len as u64;
        self.counters.exception(inner);
        Ok(index)
    }
}

/// What outbound needs from an inner IP header that `inner::validate`
/// already accepted (so the unchecked views cannot panic).
struct Shape {
    header_len: usize,
    total_len: usize,
    protocol: u8,
    src: IpAddr,
    dst: IpAddr,
}

impl Shape {
    fn of(packet: &[u8]) -> Shape {
        if packet[0] >> 4 == 4 {
            let ip = Ipv4Packet::new_unchecked(packet);
            Shape {
                header_len: ip.header_len(),
                total_len: usize::from(ip.total_len()),
                protocol: ip.protocol(),
                src: IpAddr::from(ip.src()),
                dst: IpAddr::from(ip.dst()),
            }
        } else {
            let ip = Ipv6Packet::new_unchecked(packet);
            Shape {
                header_len: IPV6_HEADER_LEN,
                total_len: IPV6_HEADER_LEN + usize::from(ip.payload_len()),
                protocol: ip.next_header(),
                src: IpAddr::from(ip.src()),
                dst: IpAddr::from(ip.dst()),
            }
        }
    }
}
