//! TUN -> ESP: validate the inner checksum, find the SA, take a sequence
//! number, and seal in place.
//!
//! The ESP header and IV (16 bytes) are written over the tail of the inner
//! IP header, right before the transport payload, so sealing moves no data:
//! the UDP or raw ESP socket adds the outer headers (RFC 3948 section 2.1:
//! ports 4500 by default; RFC 4303 section 3.1.1: transport mode keeps the
//! IP addresses, which the receiver rebuilds from its SA).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Counters, DropReason, SaDrops, Verdict};
use crate::crypto::ProviderId;
use crate::crypto::select::Selector;
use crate::packet::PacketBuf;
use crate::sa::table::{SaId, SaMeta, SaState, SaTable, TableError};
use crate::sa::{OutboundSa, SeqError};
use crate::wire::esp;
use crate::wire::inner::{self, InnerPolicy, InnerVerdict};
use crate::wire::ip;

/// The outbound pipeline and its SAs.
#[derive(Debug, Default)]
pub struct Outbound {
    pub policy: InnerPolicy,
    /// Shared so that a status reader on another thread sees them live.
    pub counters: Arc<Counters>,
    /// Looked up by inner remote address among the active SAs; each
    /// entry counts what was dropped after it was found.
    pub sas: SaTable<OutboundSa, SaDrops>,
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
        // Once per batch: a provider switch takes effect at batch edges.
        let provider = selector.active();
        for buf in batch {
            let mut matched = None;
            let verdict = match self.seal_one(provider, buf, &mut matched) {
                Ok(sa) => Verdict::Send { sa },
                Err(reason) => {
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
        buf: &mut PacketBuf,
        matched: &mut Option<SaId>,
    ) -> Result<SaId, DropReason> {
        // Corruption between the kernel and the cipher is caught here,
        // before a valid ICV would vouch for it.
        let mut shape = if self.policy.fill_udp4_zero_checksum {
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
