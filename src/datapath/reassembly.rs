//! Reassembly of the IP fragments the local kernel writes to the TUN
//! device, so that a datagram larger than the tunnel MTU goes through the
//! normal pipeline whole: its transport checksum validated over the whole
//! datagram, sealed as one ESP packet (the host kernel fragments the outer
//! packet and the peer's kernel reassembles it before esptun sees it).
//!
//! Sans-IO: the caller hands in one packet at a time with the current
//! [`Instant`] and a buffer for the whole datagram, and calls
//! [`Reassembler::expire`] now and then; no threads, no clock reads.
//!
//! Invariants:
//! - Bounded memory. Fragment data lives in fixed-size chunks from a pool
//!   that never holds more than `max_bytes` (allocated on first need,
//!   then reused: no allocation per packet in steady state); per-datagram
//!   bookkeeping lives in at most `max_datagrams` slots, also reused. Caps
//!   in bytes and in datagrams hold in total and per destination; what
//!   does not fit is refused and counted (`memory`), never grown.
//! - RFC 5722 (with RFC 8200 section 4.5): a fragment that overlaps data
//!   already received discards the whole datagram, and every later
//!   fragment of it until its timeout. An exact duplicate (same offset,
//!   same length, same M flag) is dropped alone and counted: Linux does
//!   the same (RFC 5722 erratum 3089, "duplicates are ok"), a
//!   retransmitting or duplicating path produces them, and whatever its
//!   bytes, the whole datagram's transport checksum still decides.
//! - RFC 6946: an atomic fragment (IPv6 fragment header, offset 0, M 0) is
//!   a whole packet; it is passed on without its fragment header and
//!   without reassembly state.
//! - RFC 8200 section 4.5 / RFC 791: the first fragment must hold the
//!   header chain through the whole upper-layer header (IPv4: the whole
//!   transport header); a non-last fragment's payload is a multiple of 8
//!   bytes; the reassembled datagram fits the IP length fields (and the
//!   caller's buffer). Anything else is `malformed` or `too_big`.
//! - Every datagram that does not complete is counted once, by reason
//!   ([`ReassemblyCounters`]); every fragment dropped on the way bumps the
//!   [`DropReason`] of that reason, so the per-packet drop counters still
//!   account for every packet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Counters, DropReason, Flow};
use crate::wire::checksum;
use crate::wire::ecn::ECN_MASK;
use crate::wire::ip::IPV6_HEADER_LEN;

mod fragment;
use fragment::{Fragment, Key, check_first, parse};

/// `[reassembly]`: limits of the outbound reassembly of fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyConfig {
    /// Off: fragments are dropped as `fragment`, as before.
    pub enabled: bool,
    /// Fragment data held at once, in bytes (in [`CHUNK`]-byte chunks).
    pub max_bytes: usize,
    /// Datagrams being reassembled at once.
    pub max_datagrams: usize,
    /// The same two limits for one inner destination address.
    pub max_bytes_per_destination: usize,
    pub max_datagrams_per_destination: usize,
    /// From a datagram's first fragment to its discard (RFC 8200 section
    /// 4.5: 60 s at most; RFC 791 suggests 15 s as a lower bound).
    pub timeout: Duration,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            enabled: true,
            max_bytes: 4 << 20,
            max_datagrams: 256,
            max_bytes_per_destination: 1 << 20,
            max_datagrams_per_destination: 64,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Fragment data is held in chunks of this many bytes: a 9,000-byte
/// datagram takes 5, a 65,535-byte one 32.
pub const CHUNK: usize = 2048;
/// Most chunks one datagram needs (65,535 bytes of fragmentable part).
const MAX_CHUNKS: usize = 65_536 / CHUNK;
/// Bitmap words for 8-byte blocks of a 65,535-byte datagram, plus one
/// for the end boundary at 65,536.
const WORDS: usize = 65_536 / 8 / 64 + 1;
/// The longest IPv6 unfragmentable part (header and extension headers
/// before the fragment header) kept; IPv4 headers are at most 60 bytes.
/// Longer ones are `malformed` (in transport mode the hop-by-hop and
/// routing headers behind which they hide are refused anyway).
const MAX_UNFRAGMENTABLE: usize = 256;
/// Most IPv6 extension headers walked, as in [`crate::wire::inner`].
const MAX_EXTENSION_HEADERS: usize = 8;
const NO_CHUNK: u32 = u32::MAX;

/// Datagrams that did not complete, by reason, and the state in flight;
/// readable from another thread.
#[derive(Debug, Default)]
pub struct ReassemblyCounters {
    /// Fragments that arrived (atomic fragments included).
    pub fragments: AtomicU64,
    /// Datagrams reassembled whole and handed to the pipeline.
    pub reassembled: AtomicU64,
    /// IPv6 atomic fragments (RFC 6946) passed on as whole packets.
    pub atomic: AtomicU64,
    /// Fragments dropped as exact duplicates (the datagram goes on).
    pub duplicates: AtomicU64,
    /// Datagrams discarded: not complete within the timeout.
    pub timeout: AtomicU64,
    /// ... a fragment overlapped another (RFC 5722).
    pub overlap: AtomicU64,
    /// ... longer than the IP length fields (or the buffers) allow.
    pub too_big: AtomicU64,
    /// ... or refused: a cap in bytes or datagrams was reached.
    pub memory: AtomicU64,
    /// ... a malformed fragment: a tiny first fragment, a non-last
    /// fragment not a multiple of 8 bytes, lengths that disagree, or
    /// Not-ECT fragments mixed with ECN-capable ones (RFC 3168 5.3).
    pub malformed: AtomicU64,
    /// Gauges: datagrams being reassembled (discarded ones waiting out
    /// their timeout included), and bytes of chunks they hold.
    pub datagrams_in_flight: AtomicU64,
    pub bytes_in_flight: AtomicU64,
}

impl ReassemblyCounters {
    fn failure(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::ReassemblyTimeout => &self.timeout,
            DropReason::ReassemblyOverlap => &self.overlap,
            DropReason::ReassemblyTooBig => &self.too_big,
            DropReason::ReassemblyMemory => &self.memory,
            _ => &self.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What became of one packet handed to [`Reassembler::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Not a fragment: pass the packet on as it is.
    NotFragment,
    /// Held; the datagram is not complete yet.
    Held,
    /// A whole packet of this length is in the caller's buffer: the
    /// reassembled datagram, or an atomic fragment without its fragment
    /// header.
    Complete(usize),
    /// The fragment was dropped (and counted) for this reason.
    Dropped(DropReason),
}

/// A bitmap of 8-byte blocks.
type Bits = [u64; WORDS];

fn bit(b: &Bits, i: usize) -> bool {
    b[i / 64] >> (i % 64) & 1 == 1
}

fn set_bit(b: &mut Bits, i: usize) {
    b[i / 64] |= 1 << (i % 64);
}

/// The bits `lo..hi` of a word (`lo < hi <= 64`).
fn mask(lo: usize, hi: usize) -> u64 {
    let upto = if hi == 64 { !0 } else { (1u64 << hi) - 1 };
    upto & (!0u64 << lo)
}

/// Calls `f` with each word index and mask covering bits `from..to`.
fn words(from: usize, to: usize, mut f: impl FnMut(usize, u64)) {
    let mut i = from;
    while i < to {
        let w = i / 64;
        let hi = (to - w * 64).min(64);
        f(w, mask(i % 64, hi));
        i = w * 64 + hi;
    }
}

/// How many of the bits `from..to` are set.
fn count_range(b: &Bits, from: usize, to: usize) -> usize {
    let mut n = 0;
    words(from, to, |w, m| n += (b[w] & m).count_ones() as usize);
    n
}

fn set_range(b: &mut Bits, from: usize, to: usize) {
    words(from, to, |w, m| b[w] |= m);
}

/// One datagram being reassembled.
struct Slot {
    key: Key,
    in_use: bool,
    deadline: Instant,
    /// Discarded for this reason: later fragments are dropped for it too
    /// until the timeout frees the slot.
    discarded: Option<DropReason>,
    v6: bool,
    /// From the offset-0 fragment (0: not yet arrived).
    header: [u8; MAX_UNFRAGMENTABLE],
    header_len: usize,
    next_header_at: usize,
    next_header: u8,
    /// The fragmentable part's length, once the last fragment arrived.
    total: Option<usize>,
    /// Bytes received so far (no overlaps: complete when it is `total`).
    received: usize,
    /// Fragments held, to count them as drops if the datagram fails.
    held: u64,
    /// The ECN values seen, one bit each ([`combine_ecn`]).
    ecn_seen: u8,
    /// Indices into the pool, [`NO_CHUNK`] where nothing arrived.
    chunks: [u32; MAX_CHUNKS],
    chunks_held: usize,
    /// 8-byte blocks received, blocks where a fragment started, and
    /// blocks where a non-last fragment ended (exclusive): enough to tell
    /// an exact duplicate from an overlap.
    filled: Box<Bits>,
    starts: Box<Bits>,
    ends: Box<Bits>,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Slot {
            key: Key {
                src: IpAddr::from([0u8; 4]),
                dst: IpAddr::from([0u8; 4]),
                id: 0,
                protocol: 0,
            },
            in_use: false,
            deadline: now,
            discarded: None,
            v6: false,
            header: [0; MAX_UNFRAGMENTABLE],
            header_len: 0,
            next_header_at: 0,
            next_header: 0,
            total: None,
            received: 0,
            held: 0,
            ecn_seen: 0,
            chunks: [NO_CHUNK; MAX_CHUNKS],
            chunks_held: 0,
            filled: Box::new([0; WORDS]),
            starts: Box::new([0; WORDS]),
            ends: Box::new([0; WORDS]),
        }
    }
}

/// Per destination: datagrams and chunk bytes held.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    datagrams: usize,
    bytes: usize,
}

/// The outbound reassembler: see the module documentation.
pub struct Reassembler {
    config: ReassemblyConfig,
    /// The longest whole packet the caller's buffers hold.
    max_packet: usize,
    counters: std::sync::Arc<Counters>,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    index: HashMap<Key, usize>,
    usage: HashMap<IpAddr, Usage>,
    /// Boxed so that growing the pool moves pointers, not data.
    #[allow(clippy::vec_box)]
    pool: Vec<Box<[u8; CHUNK]>>,
    free_chunks: Vec<u32>,
    max_chunks: usize,
    chunks_in_use: usize,
    /// The earliest deadline of a slot in use (a bound: may be earlier).
    next_deadline: Option<Instant>,
}

impl std::fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reassembler({} datagrams, {} bytes)",
            self.index.len(),
            self.chunks_in_use * CHUNK
        )
    }
}

impl Reassembler {
    /// A reassembler writing whole packets of up to `max_packet` bytes,
    /// counting into `counters` (the outbound pipeline's).
    pub fn new(
        config: ReassemblyConfig,
        max_packet: usize,
        counters: std::sync::Arc<Counters>,
    ) -> Self {
        let max_datagrams = config.max_datagrams;
        Reassembler {
            config,
            max_packet,
            counters,
            slots: Vec::new(),
            free_slots: Vec::new(),
            index: HashMap::with_capacity(max_datagrams),
            usage: HashMap::with_capacity(max_datagrams),
            pool: Vec::new(),
            free_chunks: Vec::new(),
            max_chunks: config.max_bytes / CHUNK,
            chunks_in_use: 0,
            next_deadline: None,
        }
    }

    pub fn config(&self) -> &ReassemblyConfig {
        &self.config
    }

    /// Bytes of fragment data held now.
    pub fn bytes_in_flight(&self) -> usize {
        self.chunks_in_use * CHUNK
    }

    /// Datagrams being reassembled now (discarded ones waiting out their
    /// timeout included).
    pub fn datagrams_in_flight(&self) -> usize {
        self.index.len()
    }

    /// Bytes the chunk pool ever allocated: never above `max_bytes`.
    pub fn bytes_allocated(&self) -> usize {
        self.pool.len() * CHUNK
    }

    /// Takes one packet from the TUN device. A fragment is held, or
    /// completes its datagram into `out`, or is dropped and counted; any
    /// other packet is [`Pushed::NotFragment`] and untouched.
    pub fn push(&mut self, packet: &[u8], now: Instant, out: &mut [u8]) -> Pushed {
        let fragment = match parse(packet) {
            Ok(Some(f)) => f,
            Ok(None) => return Pushed::NotFragment,
            Err(reason) => {
                self.count(|c| &c.fragments);
                return self.drop_fragment(reason);
            }
        };
        self.count(|c| &c.fragments);
        if fragment.v6 && fragment.offset == 0 && !fragment.more {
            // RFC 6946: an atomic fragment is a whole packet.
            return match self.atomic(&fragment, out) {
                Ok(len) => {
                    self.count(|c| &c.atomic);
                    Pushed::Complete(len)
                }
                Err(reason) => self.drop_fragment(reason),
            };
        }
        let pushed = self.insert(&fragment, now, out);
        self.publish();
        pushed
    }

    /// Discards the datagrams whose time is up; `expired` hears of each
    /// one that had not been discarded before (for a log line).
    pub fn expire(&mut self, now: Instant, expired: &mut dyn FnMut(Flow)) {
        match self.next_deadline {
            Some(t) if now >= t => {}
            _ => return,
        }
        let mut next = None;
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if !slot.in_use {
                continue;
            }
            if now < slot.deadline {
                next = Some(next.map_or(slot.deadline, |n: Instant| n.min(slot.deadline)));
                continue;
            }
            if slot.discarded.is_none() {
                let flow = Flow {
                    src: slot.key.src,
                    dst: slot.key.dst,
                    protocol: if slot.v6 {
                        slot.next_header
                    } else {
                        slot.key.protocol
                    },
                    ports: None,
                };
                self.fail(i, DropReason::ReassemblyTimeout);
                expired(flow);
            }
            self.release(i);
        }
        self.next_deadline = next;
        self.publish();
    }

    /// An atomic fragment into `out` without its fragment header.
    fn atomic(&self, f: &Fragment<'_>, out: &mut [u8]) -> Result<usize, DropReason> {
        let len = f.header.len() + f.data.len();
        if len > out.len().min(self.max_packet) {
            return Err(DropReason::ReassemblyTooBig);
        }
        check_first(f)?;
        out[..f.header.len()].copy_from_slice(f.header);
        out[f.header.len()..len].copy_from_slice(f.data);
        finish_v6(out, f.header.len(), f.next_header_at, f.next_header, len)?;
        Ok(len)
    }

    fn insert(&mut self, f: &Fragment<'_>, now: Instant, out: &mut [u8]) -> Pushed {
        let (start, end) = (f.offset, f.offset + f.data.len());
        // RFC 8200 4.5 / RFC 791: a non-last fragment is a multiple of 8.
        let malformed = (f.more && (!f.data.len().is_multiple_of(8) || f.data.is_empty()))
            || (f.offset == 0 && check_first(f).is_err());
        // The whole packet must fit the IP length field (IPv4: total
        // length including the header; IPv6: payload length, which counts
        // the unfragmentable extension headers) and the caller's buffer.
        let too_big = match f.v6 {
            false => f.header.len() + end > usize::from(u16::MAX),
            true => f.header.len() - IPV6_HEADER_LEN + end > usize::from(u16::MAX),
        } || f.header.len() + end > self.max_packet.min(out.len());

        let i = match self.index.get(&f.key) {
            Some(&i) => i,
            None => {
                if malformed {
                    self.count_failure(DropReason::ReassemblyMalformed);
                    return self.drop_fragment(DropReason::ReassemblyMalformed);
                }
                if too_big {
                    self.count_failure(DropReason::ReassemblyTooBig);
                    return self.drop_fragment(DropReason::ReassemblyTooBig);
                }
                match self.open(f, now) {
                    Some(i) => i,
                    None => {
                        self.count_failure(DropReason::ReassemblyMemory);
                        return self.drop_fragment(DropReason::ReassemblyMemory);
                    }
                }
            }
        };
        if let Some(reason) = self.slots[i].discarded {
            return self.drop_fragment(reason);
        }
        if malformed {
            return self.discard(i, DropReason::ReassemblyMalformed);
        }
        if too_big {
            return self.discard(i, DropReason::ReassemblyTooBig);
        }
        let slot = &self.slots[i];
        // The last fragment fixes the length; nothing may lie beyond it,
        // and a second last fragment must agree.
        match (slot.total, f.more) {
            (Some(total), _) if end > total => {
                return self.discard(i, DropReason::ReassemblyMalformed);
            }
            (Some(total), false) if end != total => {
                return self.discard(i, DropReason::ReassemblyMalformed);
            }
            (None, false) if highest_block(&slot.filled).is_some_and(|b| b * 8 >= end) => {
                return self.discard(i, DropReason::ReassemblyMalformed);
            }
            _ => {}
        }
        let (first_block, end_block) = (start / 8, end.div_ceil(8));
        let filled = count_range(&slot.filled, first_block, end_block);
        if filled > 0 {
            let whole = filled == end_block - first_block;
            let same_start = bit(&slot.starts, first_block);
            let no_start_inside = count_range(&slot.starts, first_block + 1, end_block) == 0;
            let same_end = match f.more {
                true => slot.total != Some(end) && bit(&slot.ends, end / 8),
                false => slot.total == Some(end),
            };
            if whole && same_start && no_start_inside && same_end {
                self.count(|c| &c.duplicates);
                return self.drop_fragment(DropReason::ReassemblyDuplicate);
            }
            return self.discard(i, DropReason::ReassemblyOverlap);
        }
        if let Err(reason) = self.store(i, start, f.data) {
            return self.discard(i, reason);
        }
        let slot = &mut self.slots[i];
        set_range(&mut slot.filled, first_block, end_block);
        set_bit(&mut slot.starts, first_block);
        if f.more {
            set_bit(&mut slot.ends, end / 8);
        } else {
            slot.total = Some(end);
        }
        if f.offset == 0 {
            slot.header[..f.header.len()].copy_from_slice(f.header);
            slot.header_len = f.header.len();
            slot.next_header_at = f.next_header_at;
            slot.next_header = f.next_header;
        }
        slot.received += f.data.len();
        slot.held += 1;
        slot.ecn_seen |= 1 << f.ecn;
        if slot.header_len == 0 || slot.total != Some(slot.received) {
            return Pushed::Held;
        }
        match self.assemble(i, out) {
            Ok(len) => {
                self.count(|c| &c.reassembled);
                self.release(i);
                Pushed::Complete(len)
            }
            Err(reason) => self.discard(i, reason),
        }
    }

    /// A slot for a new datagram, within every cap; `None` if a cap is
    /// reached.
    fn open(&mut self, f: &Fragment<'_>, now: Instant) -> Option<usize> {
        let usage = self.usage.get(&f.key.dst).copied().unwrap_or_default();
        if self.index.len() >= self.config.max_datagrams
            || usage.datagrams >= self.config.max_datagrams_per_destination
        {
            return None;
        }
        let i = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::new(now));
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[i];
        slot.key = f.key;
        slot.in_use = true;
        slot.deadline = now + self.config.timeout;
        slot.discarded = None;
        slot.v6 = f.v6;
        slot.header_len = 0;
        slot.next_header = f.next_header;
        slot.total = None;
        slot.received = 0;
        slot.held = 0;
        slot.chunks_held = 0;
        slot.chunks.fill(NO_CHUNK);
        slot.filled.fill(0);
        slot.starts.fill(0);
        slot.ends.fill(0);
        self.index.insert(f.key, i);
        self.usage.entry(f.key.dst).or_default().datagrams += 1;
        let deadline = slot.deadline;
        self.next_deadline = Some(self.next_deadline.map_or(deadline, |n| n.min(deadline)));
        Some(i)
    }

    /// Copies fragment data into the slot's chunks, taking chunks from the
    /// pool within the caps.
    fn store(&mut self, i: usize, start: usize, data: &[u8]) -> Result<(), DropReason> {
        if data.is_empty() {
            return Ok(());
        }
        let (first, last) = (start / CHUNK, (start + data.len() - 1) / CHUNK);
        let needed = (first..=last)
            .filter(|&c| self.slots[i].chunks[c] == NO_CHUNK)
            .count();
        let dst = self.slots[i].key.dst;
        let usage = self.usage.get(&dst).copied().unwrap_or_default();
        if self.chunks_in_use + needed > self.max_chunks
            || usage.bytes + needed * CHUNK > self.config.max_bytes_per_destination
        {
            return Err(DropReason::ReassemblyMemory);
        }
        for c in first..=last {
            if self.slots[i].chunks[c] == NO_CHUNK {
                let index = match self.free_chunks.pop() {
                    Some(index) => index,
                    None => {
                        // Within max_chunks, so the pool stays bounded.
                        self.pool.push(Box::new([0; CHUNK]));
                        (self.pool.len() - 1) as u32
                    }
                };
                self.slots[i].chunks[c] = index;
                self.slots[i].chunks_held += 1;
                self.chunks_in_use += 1;
            }
        }
        self.usage.entry(dst).or_default().bytes += needed * CHUNK;
        let mut at = start;
        let mut rest = data;
        while !rest.is_empty() {
            let (c, within) = (at / CHUNK, at % CHUNK);
            let n = rest.len().min(CHUNK - within);
            let index = self.slots[i].chunks[c] as usize;
            self.pool[index][within..within + n].copy_from_slice(&rest[..n]);
            at += n;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// The whole datagram into `out`; its length.
    fn assemble(&self, i: usize, out: &mut [u8]) -> Result<usize, DropReason> {
        let slot = &self.slots[i];
        let total = slot.total.unwrap_or(0);
        let header_len = slot.header_len;
        let len = header_len + total;
        if len > out.len() {
            return Err(DropReason::ReassemblyTooBig);
        }
        out[..header_len].copy_from_slice(&slot.header[..header_len]);
        let ce = combine_ecn(slot.ecn_seen).map_err(|()| DropReason::ReassemblyMalformed)?;
        if ce.is_some() {
            // Before the IPv4 header checksum below covers it.
            out[1] |= if slot.v6 { 0x30 } else { ECN_MASK };
        }
        let mut at = 0;
        while at < total {
            let n = (total - at).min(CHUNK);
            let index = slot.chunks[at / CHUNK] as usize;
            let chunk = self
                .pool
                .get(index)
                .ok_or(DropReason::ReassemblyMalformed)?;
            out[header_len + at..header_len + at + n].copy_from_slice(&chunk[..n]);
            at += n;
        }
        if slot.v6 {
            finish_v6(out, header_len, slot.next_header_at, slot.next_header, len)?;
        } else {
            // The first fragment's header, no longer a fragment (RFC 791:
            // MF and offset 0), with the whole length and a new checksum.
            let total_len = u16::try_from(len).map_err(|_| DropReason::ReassemblyTooBig)?;
            out[2..4].copy_from_slice(&total_len.to_be_bytes());
            out[6] &= 0x40; // keep DF, clear MF and the offset
            out[7] = 0;
            out[10..12].copy_from_slice(&[0, 0]);
            let value = checksum::finish(checksum::sum(&out[..header_len]));
            out[10..12].copy_from_slice(&value.to_be_bytes());
        }
        Ok(len)
    }

    /// Discards datagram `i` for `reason`: its held fragments and this one
    /// are dropped for it, and later ones until the timeout.
    fn discard(&mut self, i: usize, reason: DropReason) -> Pushed {
        self.fail(i, reason);
        self.free_chunks_of(i);
        self.slots[i].discarded = Some(reason);
        self.drop_fragment(reason)
    }

    /// Counts the failure of datagram `i` and drops its held fragments.
    fn fail(&mut self, i: usize, reason: DropReason) {
        self.count_failure(reason);
        let held = std::mem::take(&mut self.slots[i].held);
        self.counters.count_drops(reason, held);
    }

    fn free_chunks_of(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let mut freed = 0;
        for c in slot.chunks.iter_mut() {
            if *c != NO_CHUNK {
                self.free_chunks.push(*c);
                *c = NO_CHUNK;
                freed += 1;
            }
        }
        slot.chunks_held = 0;
        self.chunks_in_use -= freed;
        if let Some(u) = self.usage.get_mut(&slot.key.dst) {
            u.bytes = u.bytes.saturating_sub(freed * CHUNK);
        }
    }

    /// Frees slot `i` (complete, or its time is up).
    fn release(&mut self, i: usize) {
        self.free_chunks_of(i);
        let slot = &mut self.slots[i];
        slot.in_use = false;
        slot.held = 0;
        let key = slot.key;
        self.index.remove(&key);
        if let Some(u) = self.usage.get_mut(&key.dst) {
            u.datagrams = u.datagrams.saturating_sub(1);
            if u.datagrams == 0 {
                self.usage.remove(&key.dst);
            }
        }
        self.free_slots.push(i);
    }

    fn drop_fragment(&self, reason: DropReason) -> Pushed {
        self.counters.count_drop(reason);
        Pushed::Dropped(reason)
    }

    fn count_failure(&self, reason: DropReason) {
        self.counters.reassembly.failure(reason);
    }

    fn count(&self, which: impl Fn(&ReassemblyCounters) -> &AtomicU64) {
        which(&self.counters.reassembly).fetch_add(1, Ordering::Relaxed);
    }

    fn publish(&self) {
        let r = &self.counters.reassembly;
        r.datagrams_in_flight
            .store(self.index.len() as u64, Ordering::Relaxed);
        r.bytes_in_flight
            .store(self.bytes_in_flight() as u64, Ordering::Relaxed);
    }
}

/// The highest block set, if any.
fn highest_block(b: &Bits) -> Option<usize> {
    b.iter()
        .enumerate()
        .rev()
        .find(|(_, w)| **w != 0)
        .map(|(i, w)| i * 64 + 63 - w.leading_zeros() as usize)
}

/// Rewrites the unfragmentable part's next header (the fragment header is
/// gone) and the payload length of a whole IPv6 packet of `len` bytes.
fn finish_v6(
    out: &mut [u8],
    header_len: usize,
    next_header_at: usize,
    next_header: u8,
    len: usize,
) -> Result<(), DropReason> {
    let payload = u16::try_from(len - IPV6_HEADER_LEN).map_err(|_| DropReason::ReassemblyTooBig)?;
    if next_header_at >= header_len {
        return Err(DropReason::ReassemblyMalformed);
    }
    out[next_header_at] = next_header;
    out[4..6].copy_from_slice(&payload.to_be_bytes());
    Ok(())
}

/// The ECN field of a reassembled datagram from the values its fragments
/// carried (RFC 3168 section 5.3, as Linux's `ip_frag_ecn_table`):
/// `Ok(Some(CE))` when any fragment of an ECN-capable datagram was marked,
/// so a congestion mark is not lost; `Ok(None)` to keep the first
/// fragment's field; `Err` when Not-ECT is mixed with ECN-capable values,
/// which no single sender produces and which must not become a mark on a
/// transport that cannot react to it: the datagram is dropped.
fn combine_ecn(seen: u8) -> Result<Option<u8>, ()> {
    const NOT_ECT: u8 = 1 << 0;
    const CE: u8 = 1 << 3;
    if seen & NOT_ECT != 0 && seen != NOT_ECT {
        return Err(());
    }
    Ok((seen & CE != 0).then_some(3))
}

#[cfg(test)]
#[path = "reassembly_tests.rs"]
mod tests;
