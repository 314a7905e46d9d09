//! The outbound thread: TUN -> [`Outbound`] -> outer socket, and the
//! outbound SA table's commands from the key manager ([`super::sas`]).
//!
//! This thread alone claims and extends sequence reservations once the
//! daemon runs: it applies every removal the manager sent before an
//! install, so a key is claimed only when no SA in its table can still
//! draw on it.
//!
//! Path MTU: every [`PMTU_REFRESH`] it reads the kernel's path MTU to each
//! peer ([`PathMtuProbe`]) into the pipeline, which then refuses packets
//! too big for it; each refusal is answered through the TUN device with
//! ICMP Fragmentation Needed / Packet Too Big ([`crate::wire::icmp`]),
//! at most [`TOO_BIG_BURST`] at once and [`TOO_BIG_PER_SEC`] a second.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use super::sas::{OutboundCommands, SaCommand, SaEvent};
use super::shared::{Activity, Shared};
use super::status::{self, IoCounters, OutboundSaStatus};
use super::workers::{
    BATCH, BUF_CAPACITY, DropLog, ERROR_BACKOFF, ErrorLog, POLL, PUBLISH_EVERY, RX_BATCH, Sockets,
    TOP_UP_BELOW, count, maybe_selftest,
};
use crate::datapath::outbound::Outbound;
use crate::datapath::reassembly::Reassembler;
use crate::datapath::{DropContext, DropReason, Flow, Verdict};
use crate::io::socket::PathMtuProbe;
use crate::io::tun::Tun;
use crate::packet::{Batch, PacketBuf};
use crate::sa::hard_limit;
use crate::sa::reservation::{DEFAULT_BLOCK, ReservationStore};
use crate::sa::table::{SaId, SaState};
use crate::wire::icmp;

mod take;
use take::take_packet;

/// TUN -> ESP -> socket.
pub(crate) struct OutboundWorker {
    shared: Arc<Shared>,
    tun: Arc<Tun>,
    sockets: Arc<Sockets>,
    store: ReservationStore,
    outbound: Outbound,
    commands: Receiver<OutboundCommands>,
    events: Sender<SaEvent>,
    drop_log: DropLog,
    errors: ErrorLog,
    /// SAs whose last reservation top-up failed (a full or read-only
    /// disk): when to try again, and the current back-off.
    top_up_retry: Vec<(SaId, Instant, Duration)>,
    /// When each SA last sent, for `status`.
    activity: Activity,
    /// Fragments from the TUN device into whole datagrams (`None`:
    /// `[reassembly] enabled = false`, fragments are dropped).
    reassembler: Option<Reassembler>,
    /// `outer_mtu`: a sealed packet longer than fits in it (a reassembled
    /// datagram) is sent on its own, never in a UDP GSO train, whose
    /// segments the kernel refuses above the path MTU (EINVAL).
    outer_mtu: u16,
    /// Reads the kernel's path MTU per peer; `None`: nothing is learned.
    probe: Option<PathMtuProbe>,
    /// Paces the ICMP errors written to the TUN device.
    too_big_limit: TokenBucket,
    /// Where an ICMP error is built (the larger of the two limits).
    icmp_buf: Box<[u8; icmp::ICMPV6_ERROR_MAX]>,
}

/// How often the path MTU to each peer is read from the kernel.
pub(crate) const PMTU_REFRESH: Duration = Duration::from_millis(500);
/// ICMP Packet Too Big / Fragmentation Needed written to the TUN device:
/// a burst of this many, then this many a second (RFC 4443 section 2.4
/// (f) asks for a limit; Linux's own default is of the same order). A
/// TCP sender needs one per retransmission, not one per segment.
pub(crate) const TOO_BIG_BURST: u32 = 20;
pub(crate) const TOO_BIG_PER_SEC: u32 = 100;

/// A token bucket: `burst` tokens, refilled at `per_sec` a second.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(burst: u32, per_sec: u32) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_sec: f64::from(per_sec),
            last: None,
        }
    }

    /// Takes a token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let earned = now.saturating_duration_since(last).as_secs_f64() * self.per_sec;
            self.tokens = (self.tokens + earned).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Back-off after a failed top-up: doubles from the first to the last,
/// so a full disk costs a few writes a minute, not one per batch.
const TOP_UP_RETRY_FIRST: Duration = Duration::from_millis(100);
const TOP_UP_RETRY_MAX: Duration = Duration::from_secs(10);

impl OutboundWorker {
    pub fn new(
        shared: Arc<Shared>,
        tun: Arc<Tun>,
        sockets: Arc<Sockets>,
        store: ReservationStore,
        outbound: Outbound,
        commands: Receiver<OutboundCommands>,
        events: Sender<SaEvent>,
    ) -> Self {
        OutboundWorker {
            shared,
            tun,
            sockets,
            store,
            outbound,
            commands,
            events,
            drop_log: DropLog::new("outbound"),
            errors: ErrorLog::new("outbound"),
            top_up_retry: Vec::new(),
            activity: Activity::default(),
            reassembler: None,
            outer_mtu: u16::MAX,
            probe: None,
            too_big_limit: TokenBucket::new(TOO_BIG_BURST, TOO_BIG_PER_SEC),
            icmp_buf: Box::new([0; icmp::ICMPV6_ERROR_MAX]),
        }
    }

    /// Learns the path MTU to each peer with `probe` from now on.
    pub fn set_path_mtu_probe(&mut self, probe: PathMtuProbe) {
        self.probe = Some(probe);
    }

    /// Reads the kernel's path MTU to every SA's endpoint into the
    /// pipeline (a peer the kernel cannot route to keeps no value).
    fn refresh_path_mtu(&mut self) {
        let Some(probe) = &self.probe else {
            return;
        };
        let mut endpoints: Vec<std::net::SocketAddr> =
            self.outbound.sas.iter().map(|e| e.meta.endpoint).collect();
        endpoints.sort_unstable();
        endpoints.dedup_by_key(|e| e.ip());
        let mut changed = false;
        for endpoint in endpoints {
            let mtu = match probe.path_mtu(endpoint) {
                Ok(mtu) => Some(mtu),
                Err(e) => {
                    tracing::debug!(%endpoint, "path MTU unknown: {e}");
                    None
                }
            };
            let before = self.outbound.path_mtu.get(endpoint.ip());
            if before.is_some() && before != mtu {
                tracing::info!(
                    %endpoint,
                    "path MTU changed from {} to {}",
                    before.map_or("unknown".into(), |m| m.to_string()),
                    mtu.map_or("unknown".into(), |m| m.to_string()),
                );
            }
            changed |= before != mtu;
            self.outbound.path_mtu.set(endpoint.ip(), mtu);
        }
        if changed {
            // For the inbound thread's MSS clamping.
            *self
                .shared
                .path_mtu
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = self.outbound.path_mtu.clone();
            self.shared.path_mtu_changes.fetch_add(1, Ordering::Release);
        }
    }

    /// Answers the last batch's packet-too-big drops through the TUN
    /// device, within the rate limit; counts what was sent and what not.
    fn answer_too_big(&mut self, bufs: &[PacketBuf]) {
        if self.outbound.too_big.is_empty() {
            return;
        }
        let now = Instant::now();
        let counters = self.outbound.counters.clone();
        for &(index, mtu) in &self.outbound.too_big {
            let Some(packet) = bufs.get(index).map(PacketBuf::data) else {
                continue;
            };
            let built = match packet.first().map(|b| b >> 4) {
                Some(6) => icmp::packet_too_big_v6(packet, u32::from(mtu), &mut self.icmp_buf[..]),
                _ => icmp::frag_needed_v4(packet, mtu, &mut self.icmp_buf[..]),
            };
            // Never an ICMP error for an ICMP error, and never more than
            // the limit: both are counted as suppressed.
            let len = match built {
                Ok(len) if self.too_big_limit.take(now) => len,
                _ => {
                    counters.too_big_suppressed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            match self.tun.write(&self.icmp_buf[..len]) {
                Ok(()) => {
                    counters.too_big_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    count(&self.shared.io.tun_write_errors);
                    self.errors.io("writing ICMP packet too big to TUN", &e);
                }
            }
        }
    }

    /// Reassembles fragments with `reassembler`; `outer_mtu` as
    /// configured.
    pub fn with_reassembler(mut self, reassembler: Option<Reassembler>, outer_mtu: u16) -> Self {
        self.reassembler = reassembler;
        self.outer_mtu = outer_mtu;
        self
    }

    /// Discards the datagrams whose reassembly timed out (counted by the
    /// reassembler), with a rate-limited log line.
    fn expire_fragments(&mut self) {
        let Some(reassembler) = self.reassembler.as_mut() else {
            return;
        };
        let log = &mut self.drop_log;
        let now = Instant::now();
        reassembler.expire(now, &mut |flow| {
            let reason = DropReason::ReassemblyTimeout;
            if log.due(reason, now) {
                let context = DropContext {
                    flow: Some(flow),
                    ..DropContext::default()
                };
                log.log(reason, &context);
            }
        });
    }

    pub fn run(mut self) {
        // What the TUN device hands over (with offloads a TSO/USO
        // super-packet of up to 64 KiB fills one buffer), and the packets
        // the pipeline seals: finished in place and handed over, or split.
        let mut rx = Batch::new(RX_BATCH, BUF_CAPACITY);
        let mut batch = Batch::new(BATCH, BUF_CAPACITY);
        let mut verdicts = Vec::with_capacity(BATCH);
        let mut next_check = Instant::now() + self.shared.selftest_interval;
        let mut next_publish = Instant::now();
        let mut next_pmtu = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.apply_commands();
            if Instant::now() >= next_pmtu {
                self.refresh_path_mtu();
                for socket in [&self.sockets.v4, &self.sockets.v6].into_iter().flatten() {
                    socket.request_df_probe();
                }
                next_pmtu = Instant::now() + PMTU_REFRESH;
            }
            maybe_selftest(&self.shared, &mut next_check, "outbound");
            self.expire_fragments();
            if Instant::now() >= next_publish {
                self.publish();
                next_publish = Instant::now() + PUBLISH_EVERY;
            }
            match crate::io::poll_readable(&[self.tun.as_fd()], POLL) {
                Ok(ready) if ready.is_ready(0) => {}
                Ok(_) => continue,
                Err(e) => {
                    self.errors.io("poll on the TUN device", &e);
                    std::thread::sleep(POLL);
                    continue;
                }
            }
            let n = match self.tun.read_batch(rx.slots()) {
                Ok(n) => n,
                Err(e) => {
                    count(&self.shared.io.tun_read_errors);
                    self.errors.io("reading the TUN device", &e);
                    // A persistent error must not spin the thread.
                    std::thread::sleep(ERROR_BACKOFF);
                    continue;
                }
            };
            rx.set_len(n);
            let mut filled = 0;
            for slot in rx.packets_mut() {
                // Invariant: filled <= BATCH; take() seals a full batch
                // before it adds to it.
                filled = self.take(slot, &mut batch, filled, &mut verdicts);
            }
            batch.set_len(filled);
            if filled > 0 {
                self.seal_and_send(&mut batch, &mut verdicts);
            }
        }
        self.publish();
    }

    /// Moves one packet read from the TUN device into `batch` at `filled`
    /// (sealing the batch whenever it is full); returns the new fill.
    fn take(
        &mut self,
        slot: &mut PacketBuf,
        batch: &mut Batch,
        filled: usize,
        verdicts: &mut Vec<Verdict>,
    ) -> usize {
        let vnet = self.tun.has_vnet_hdr();
        let policy = self.outbound.policy;
        let mut dropped: Option<DropReason> = None;
        let mut reassembler = self.reassembler.take();
        let filled = take_packet(
            vnet,
            policy,
            reassembler.as_mut().map(|r| (r, Instant::now())),
            slot,
            batch,
            filled,
            &mut |full: &mut Batch| self.seal_and_send(full, verdicts),
            &mut |reason| dropped = Some(reason),
        );
        self.reassembler = reassembler;
        if let Some(reason) = dropped {
            self.offload_drop(slot.data(), reason);
        }
        filled
    }

    /// A packet dropped before the pipeline: counted and logged like the
    /// pipeline's own drops. The reassembler counts its own drops (a
    /// failed datagram drops the fragments it held too), so those are
    /// only logged here.
    fn offload_drop(&mut self, packet: &[u8], reason: DropReason) {
        if !reason.is_reassembly() {
            self.outbound.counters.count_drop(reason);
        }
        if self.drop_log.due(reason, Instant::now()) {
            let context = DropContext {
                flow: Flow::of_packet(packet),
                ..DropContext::default()
            };
            self.drop_log.log(reason, &context);
        }
    }

    fn seal_and_send(&mut self, batch: &mut Batch, verdicts: &mut Vec<Verdict>) {
        self.outbound
            .process(&self.shared.selector, batch.packets_mut(), verdicts);
        self.send(batch.packets(), verdicts);
        self.answer_too_big(batch.packets());
        self.log_drops(batch.packets(), verdicts);
        self.top_up();
    }

    /// One `sendmmsg` per address family, straight from the batch, each
    /// packet with its inner packet's DSCP and ECN (wire::ecn); over UDP a
    /// packet longer than the outer MTU (a reassembled datagram, which the
    /// kernel fragments) in a call of its own, in its place, so that it
    /// never becomes the segment size of a UDP GSO train.
    ///
    /// With `[inner] ipv6_hop_by_hop = "carry"` each packet goes with the
    /// hop-by-hop header the pipeline kept under its batch index (empty:
    /// none), which the socket puts on the outer packet (IPV6_HOPOPTS).
    fn send(&mut self, bufs: &[PacketBuf], verdicts: &[Verdict]) {
        // Taken out for the sends (which borrow the worker mutably) and
        // put back: no copy, no allocation.
        let taken = self.outbound.hop_by_hop.take();
        let slots = &taken;
        for v6 in [false, true] {
            // The ESP packet plus the outer IP and UDP headers. Raw ESP has
            // no GSO trains, so nothing needs to go alone there.
            let limit = if self.sockets.encap.is_udp() {
                usize::from(self.outer_mtu).saturating_sub(if v6 { 48 } else { 28 })
            } else {
                usize::MAX
            };
            let ours = |i: usize| -> Option<(&[u8], std::net::SocketAddr, u8, &[u8])> {
                let (buf, v) = (bufs.get(i)?, verdicts.get(i)?);
                match v {
                    Verdict::Send { .. } => {
                        buf.meta.peer.filter(|to| to.is_ipv6() == v6).map(|to| {
                            let hop_by_hop = slots.as_ref().map_or(&[][..], |s| s.get(i));
                            (buf.data(), to, buf.meta.tos, hop_by_hop)
                        })
                    }
                    _ => None,
                }
            };
            // In sequence-number order: the packets up to a large one in
            // one call, then the large one alone, and so on. Sending the
            // large ones after the rest reordered the stream by up to a
            // batch, beyond a 32-packet replay window (strongSwan's default).
            let is_large = |i: usize| ours(i).is_some_and(|(data, ..)| data.len() > limit);
            let mut start = 0;
            while let Some((run, large)) = next_run(start, bufs.len(), is_large) {
                self.send_family(v6, run.clone().filter_map(ours));
                if let Some(i) = large {
                    self.send_family(v6, ours(i).into_iter());
                }
                start = large.map_or(run.end, |i| i + 1);
            }
        }
        self.outbound.hop_by_hop = taken;
    }

    /// One `sendmmsg` of `packets` on the socket of one address family.
    fn send_family<'a>(
        &mut self,
        v6: bool,
        packets: impl Iterator<Item = (&'a [u8], std::net::SocketAddr, u8, &'a [u8])> + Clone,
    ) {
        let count = packets.clone().count() as u64;
        if count == 0 {
            return;
        }
        let socket = if v6 {
            &self.sockets.v6
        } else {
            &self.sockets.v4
        };
        let result = match socket {
            Some(socket) => socket.send_iter_marked(packets),
            None => Err(std::io::Error::other(
                "no outer socket of this address family",
            )),
        };
        if let Some(socket) = socket
            && !socket.offloads().gso
            && self.shared.offloads.udp_gso.swap(false, Ordering::Relaxed)
        {
            tracing::error!(
                "the kernel refused a UDP GSO train on the outer socket: sending packets \
                 one by one from now on"
            );
        }
        match result {
            Ok(report) => {
                if report.failed > 0 {
                    IoCounters::add(&self.shared.io.send_errors, report.failed as u64);
                    if let Some(e) = report.last_error {
                        self.errors.io("sending ESP packets", &e);
                    }
                }
            }
            Err(e) => {
                IoCounters::add(&self.shared.io.send_errors, count);
                self.errors.io("sending ESP packets", &e);
            }
        }
    }

    fn log_drops(&mut self, bufs: &[PacketBuf], verdicts: &[Verdict]) {
        let now = Instant::now();
        for (buf, v) in bufs.iter().zip(verdicts) {
            if let Verdict::Drop(reason) = v
                && self.drop_log.due(*reason, now)
            {
                // Flows are worked out for logged drops only.
                let flow = Flow::of_packet(buf.data());
                let spi = flow.and_then(|f| {
                    self.outbound
                        .sas
                        .iter()
                        .find(|e| e.meta.state == SaState::Active && e.sa.inner.remote == f.dst)
                        .map(|e| e.sa.spi)
                });
                let context = DropContext {
                    spi,
                    flow,
                    ..DropContext::default()
                };
                self.drop_log.log(*reason, &context);
            }
        }
    }

    /// Makes the next block durable well before the current one runs out;
    /// after a failure, tries that SA again only after a back-off.
    fn top_up(&mut self) {
        let now = Instant::now();
        for entry in self.outbound.sas.iter_mut() {
            let sa = &mut entry.sa;
            let limit = hard_limit(sa.esn);
            if sa.ceiling() >= limit || sa.ceiling().saturating_sub(sa.last_used()) >= TOP_UP_BELOW
            {
                continue;
            }
            let retry = self
                .top_up_retry
                .iter()
                .position(|(id, _, _)| *id == entry.id);
            if let Some(i) = retry
                && now < self.top_up_retry[i].1
            {
                continue;
            }
            match self.store.reserve_block(&entry.meta.fp, sa, DEFAULT_BLOCK) {
                Ok(_) => {
                    if let Some(i) = retry {
                        self.top_up_retry.swap_remove(i);
                        tracing::info!(
                            peer = %entry.meta.peer,
                            spi = format_args!("{:#x}", sa.spi),
                            "sequence numbers reserved again"
                        );
                    }
                }
                Err(e) => {
                    count(&self.shared.io.reservation_errors);
                    let backoff = match retry {
                        Some(i) => (self.top_up_retry[i].2 * 2).min(TOP_UP_RETRY_MAX),
                        None => TOP_UP_RETRY_FIRST,
                    };
                    match retry {
                        Some(i) => self.top_up_retry[i] = (entry.id, now + backoff, backoff),
                        None => self.top_up_retry.push((entry.id, now + backoff, backoff)),
                    }
                    if self.errors.due() {
                        tracing::error!(
                            peer = %entry.meta.peer,
                            spi = format_args!("{:#x}", sa.spi),
                            "cannot reserve sequence numbers (next try in {backoff:?}); the SA stops \
                             sending when its reservation runs out: {e}"
                        );
                    }
                }
            }
        }
    }

    /// Applies the key manager's commands, in order. A change is
    /// published before the key manager hears of it, so that once
    /// `esptun reload` reports, `status` shows what it reported.
    fn apply_commands(&mut self) {
        let mut any = false;
        let mut events = Vec::new();
        while let Ok(commands) = self.commands.try_recv() {
            any = true;
            for command in commands {
                let activated = match &command {
                    SaCommand::SetState {
                        id,
                        state: SaState::Active,
                    } => Some(*id),
                    _ => None,
                };
                let Some((id, mut new, meta)) = command.apply(&mut self.outbound.sas) else {
                    if let Some(entry) = activated.and_then(|id| self.outbound.sas.get(id)) {
                        tracing::info!(
                            peer = %entry.meta.peer,
                            spi = format_args!("{:#x}", entry.sa.spi),
                            "outbound SA now in use"
                        );
                    }
                    continue;
                };
                if !new.claimed
                    && let Err(e) = super::sas::claim(&self.store, &meta.peer, &mut new)
                {
                    tracing::error!("reload: {e}; unchanged");
                    let reason = e.to_string();
                    events.push(SaEvent::InstallFailed { id, reason });
                    continue;
                }
                let (peer, spi, state) = (meta.peer.clone(), new.sa.spi, meta.state);
                if let Err(e) = self.outbound.sas.insert(id, new.sa, meta) {
                    // The manager never asks for this; the table refuses
                    // it all the same.
                    tracing::error!(peer, "outbound SA {spi:#x} not installed: {e}");
                    let reason = format!("outbound SA {spi:#x} not installed: {e}");
                    events.push(SaEvent::InstallFailed { id, reason });
                    continue;
                }
                events.push(SaEvent::Installed { id });
                if state == SaState::Active {
                    tracing::info!(
                        peer,
                        spi = format_args!("{spi:#x}"),
                        "outbound SA now in use"
                    );
                }
            }
        }
        if any {
            self.publish();
        }
        for event in events {
            let _ = self.events.send(event);
        }
    }

    /// Publishes the rows with this direction's totals (see
    /// [`Shared::publish`]): both are read here, between two batches.
    fn publish(&mut self) {
        let now = Instant::now();
        let activity = &mut self.activity;
        let sas = &self.outbound.sas;
        activity.retain(|id| sas.get(id).is_some());
        let rows = sas
            .iter()
            .map(|e| OutboundSaStatus {
                peer: e.meta.peer.clone(),
                spi: e.sa.spi,
                endpoint: e.meta.endpoint.to_string(),
                state: e.meta.state.as_str(),
                packets: e.sa.stats.packets,
                bytes: e.sa.stats.bytes,
                seq_used: e.sa.last_used(),
                seq_reserved: e.sa.ceiling(),
                soft_limit_reached: e.sa.past_soft_limit(),
                drops: status::sa_drops(Some(&e.counters)),
                last_packet_ms_ago: activity.note(e.id, e.sa.stats.packets, now),
                path_mtu: self.outbound.path_mtu.get(e.meta.endpoint.ip()),
                inner_mtu: self
                    .outbound
                    .path_mtu
                    .get(e.meta.endpoint.ip())
                    .and_then(|path| {
                        icmp::usable_inner_mtu(
                            path,
                            self.outbound.path_mtu.encap,
                            e.meta.endpoint.is_ipv6(),
                            e.sa.keys.icv().bytes(),
                        )
                    }),
            })
            .collect();
        Shared::publish(&self.shared.out_status, rows, &self.shared.out_counters);
    }
}

/// From `start` of `n` packets: the packets before the next large one,
/// and that large one; `None` when nothing is left. Sent in this order,
/// run by run, the packets leave in the order of their sequence numbers.
fn next_run(
    start: usize,
    n: usize,
    is_large: impl Fn(usize) -> bool,
) -> Option<(std::ops::Range<usize>, Option<usize>)> {
    if start >= n {
        return None;
    }
    let large = (start..n).find(|&i| is_large(i));
    Some((start..large.unwrap_or(n), large))
}

#[cfg(test)]
#[path = "outbound_tests.rs"]
mod tests;
