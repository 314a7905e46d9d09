//! The two datapath threads: I/O around [`crate::datapath`] batches.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use super::capture::{self, DropCapture};
use super::status::{self, InboundSaStatus, IoCounters, OutboundSaStatus};
use super::{InMeta, InboundPlan, NewOutbound, OutMeta, OutboundPlan, Shared};
use crate::crypto::select::Transition;
use crate::datapath::inbound::{Encap, Inbound};
use crate::datapath::outbound::Outbound;
use crate::datapath::{DropContext, DropReason, Flow, Verdict};
use crate::io::socket::OuterSocket;
use crate::io::tun::Tun;
use crate::packet::PacketBuf;
use crate::sa::reservation::{DEFAULT_BLOCK, ReservationStore};
use crate::sa::{InboundSa, OutboundSa, hard_limit};

/// Packets per batch: enough to amortize a syscall and the provider
/// lookup, small enough that a batch stays in L2.
pub const BATCH: usize = 32;
/// Largest datagram or TUN read accepted; anything larger is truncated by
/// the kernel and dropped as such.
const BUF_CAPACITY: usize = 65535;
/// How long a thread sleeps in poll(2) before it checks for stop, plans,
/// self-tests and publishing.
const POLL: Duration = Duration::from_millis(100);
const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// Pause after a failed read, so a persistent error cannot spin a thread.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Top up a reservation when fewer than this many numbers are left, so
/// the next block is durable long before it is needed.
const TOP_UP_BELOW: u64 = DEFAULT_BLOCK / 2;

/// The outer sockets, one per address family in use.
pub(crate) struct Sockets {
    pub v4: Option<OuterSocket>,
    pub v6: Option<OuterSocket>,
    /// How ESP is carried on them (the same for both).
    pub encap: Encap,
}

/// At most one log line per drop reason per second, saying how many more
/// were dropped since the last line.
struct DropLog {
    direction: &'static str,
    last: [Option<Instant>; DropReason::ALL.len()],
    suppressed: [u64; DropReason::ALL.len()],
}

impl DropLog {
    fn new(direction: &'static str) -> Self {
        DropLog {
            direction,
            last: [None; DropReason::ALL.len()],
            suppressed: [0; DropReason::ALL.len()],
        }
    }

    /// Counts a drop; returns true if it should be logged now (the caller
    /// then gathers the context and calls [`Self::log`]).
    fn due(&mut self, reason: DropReason, now: Instant) -> bool {
        let i = reason.index();
        match self.last[i] {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed[i] += 1;
                false
            }
            _ => {
                self.last[i] = Some(now);
                true
            }
        }
    }

    fn take_suppressed(&mut self, reason: DropReason) -> u64 {
        std::mem::take(&mut self.suppressed[reason.index()])
    }

    fn log(&mut self, reason: DropReason, context: &DropContext) {
        let more = self.take_suppressed(reason);
        let spi = context.spi.map(|s| format!("{s:#010x}"));
        let flow = context.flow.map(|f| f.to_string());
        let spi = spi.as_deref().unwrap_or("-");
        let seq = context
            .seq
            .map_or_else(|| "-".to_string(), |s| s.to_string());
        let flow = flow.as_deref().unwrap_or("-");
        // Routine noise (the kernel's own IPv6 chatter into the TUN,
        // keepalives) at debug; everything else says something is wrong.
        if matches!(reason, DropReason::NoSa | DropReason::Keepalive) {
            tracing::debug!(
                direction = self.direction,
                reason = reason.as_str(),
                spi,
                seq,
                flow,
                suppressed = more,
                "dropped"
            );
        } else {
            tracing::warn!(
                direction = self.direction,
                reason = reason.as_str(),
                spi,
                seq,
                flow,
                suppressed = more,
                "dropped"
            );
        }
    }
}

/// Runs the long-message self-test when due, on the calling (datapath)
/// thread.
fn maybe_selftest(shared: &Shared, next: &mut Instant, thread: &str) {
    let now = Instant::now();
    if now < *next {
        return;
    }
    *next = now + shared.selftest_interval;
    match shared.selector.periodic_check() {
        Ok(Some(stats)) => tracing::debug!(
            thread,
            "periodic long-message self-test passed ({} bytes in {} us)",
            stats.bytes,
            stats.micros
        ),
        Ok(None) => {}
        Err((failure, transition)) => {
            let now_on = match transition {
                Transition::SwitchedTo(p) => format!("traffic moved to the {p} provider"),
                Transition::Halted => {
                    "traffic HALTED by policy (no provider carries traffic)".into()
                }
                Transition::Unchanged => "the active provider is unchanged".into(),
            };
            tracing::error!(
                thread,
                "periodic long-message self-test FAILED: {failure}; {now_on}"
            );
        }
    }
}

fn count(counter: &std::sync::atomic::AtomicU64) {
    IoCounters::add(counter, 1);
}

/// TUN -> ESP -> socket.
pub(crate) struct OutboundWorker {
    shared: Arc<Shared>,
    tun: Arc<Tun>,
    sockets: Arc<Sockets>,
    store: ReservationStore,
    outbound: Outbound,
    meta: Vec<OutMeta>,
    pending: Vec<(NewOutbound, Instant)>,
    plans: Receiver<OutboundPlan>,
    drop_log: DropLog,
    last_error_log: Option<Instant>,
}

impl OutboundWorker {
    pub fn new(
        shared: Arc<Shared>,
        tun: Arc<Tun>,
        sockets: Arc<Sockets>,
        store: ReservationStore,
        sas: Vec<(OutboundSa, OutMeta)>,
        plans: Receiver<OutboundPlan>,
    ) -> Self {
        let mut outbound = Outbound::new(shared.inner);
        outbound.counters = shared.out_counters.clone();
        let mut meta = Vec::new();
        for (sa, m) in sas {
            outbound.add_sa(sa);
            meta.push(m);
        }
        OutboundWorker {
            shared,
            tun,
            sockets,
            store,
            outbound,
            meta,
            pending: Vec::new(),
            plans,
            drop_log: DropLog::new("outbound"),
            last_error_log: None,
        }
    }

    pub fn run(mut self) {
        let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new(BUF_CAPACITY)).collect();
        let mut verdicts = Vec::with_capacity(BATCH);
        let mut next_check = Instant::now() + self.shared.selftest_interval;
        let mut next_publish = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.apply_plans();
            maybe_selftest(&self.shared, &mut next_check, "outbound");
            if Instant::now() >= next_publish {
                self.publish();
                next_publish = Instant::now() + PUBLISH_EVERY;
            }
            match crate::io::poll_readable(&[self.tun.as_fd()], POLL) {
                Ok(ready) if ready.is_ready(0) => {}
                Ok(_) => continue,
                Err(e) => {
                    self.io_error("poll on the TUN device", &e);
                    std::thread::sleep(POLL);
                    continue;
                }
            }
            let n = match self.tun.read_batch(&mut bufs) {
                Ok(n) => n,
                Err(e) => {
                    count(&self.shared.io.tun_read_errors);
                    self.io_error("reading the TUN device", &e);
                    // A persistent error must not spin the thread.
                    std::thread::sleep(ERROR_BACKOFF);
                    continue;
                }
            };
            if n == 0 {
                continue;
            }
            self.outbound
                .process(&self.shared.selector, &mut bufs[..n], &mut verdicts);
            self.send(&bufs[..n], &verdicts);
            self.log_drops(&bufs[..n], &verdicts);
            self.top_up();
        }
        self.publish();
    }

    /// One `sendmmsg` per address family, straight from the batch.
    fn send(&mut self, bufs: &[PacketBuf], verdicts: &[Verdict]) {
        for v6 in [false, true] {
            let meta = &self.meta;
            let packets = || {
                bufs.iter()
                    .zip(verdicts)
                    .filter_map(|(buf, v)| match v {
                        Verdict::Send { sa } => meta.get(*sa).map(|m| (buf.data(), m.endpoint)),
                        _ => None,
                    })
                    .filter(move |(_, to)| to.is_ipv6() == v6)
            };
            let count = packets().count() as u64;
            if count == 0 {
                continue;
            }
            let socket = if v6 {
                &self.sockets.v6
            } else {
                &self.sockets.v4
            };
            let result = match socket {
                Some(socket) => socket.send_iter(packets()),
                None => Err(std::io::Error::other(
                    "no outer socket of this address family",
                )),
            };
            match result {
                Ok(report) => {
                    if report.failed > 0 {
                        IoCounters::add(&self.shared.io.send_errors, report.failed as u64);
                        if let Some(e) = report.last_error {
                            self.io_error("sending ESP packets", &e);
                        }
                    }
                }
                Err(e) => {
                    IoCounters::add(&self.shared.io.send_errors, count);
                    self.io_error("sending ESP packets", &e);
                }
            }
        }
    }

    fn log_drops(&mut self, bufs: &[PacketBuf], verdicts: &[Verdict]) {
        let now = Instant::now();
        for (buf, v) in bufs.iter().zip(verdicts) {
            if let Verdict::Drop(reason) = v
                && self.drop_log.due(*reason, now)
            {
                let flow = Flow::of_packet(buf.data());
                let spi = flow.and_then(|f| {
                    self.outbound
                        .sas()
                        .iter()
                        .find(|sa| sa.inner.remote == f.dst)
                        .map(|sa| sa.spi)
                });
                let context = DropContext {
                    spi,
                    seq: None,
                    flow,
                    ..DropContext::default()
                };
                self.drop_log.log(*reason, &context);
            }
        }
    }

    /// Makes the next block durable well before the current one runs out.
    fn top_up(&mut self) {
        for i in 0..self.outbound.sas().len() {
            let Some(sa) = self.outbound.sa_mut(i) else {
                continue;
            };
            let limit = hard_limit(sa.esn);
            if sa.ceiling() >= limit || sa.ceiling().saturating_sub(sa.last_used()) >= TOP_UP_BELOW
            {
                continue;
            }
            let Some(meta) = self.meta.get(i) else {
                continue;
            };
            if let Err(e) = self.store.reserve_block(&meta.fp, sa, DEFAULT_BLOCK) {
                count(&self.shared.io.reservation_errors);
                let spi = sa.spi;
                let peer = meta.peer.clone();
                if self.error_log_due() {
                    tracing::error!(
                        peer,
                        spi = format_args!("{spi:#x}"),
                        "cannot reserve sequence numbers; the SA stops sending when its reservation runs out: {e}"
                    );
                }
            }
        }
    }

    fn error_log_due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            self.last_error_log = Some(now);
        }
        due
    }

    fn io_error(&mut self, what: &str, e: &std::io::Error) {
        if self.error_log_due() {
            tracing::warn!("outbound: {what}: {e}");
        }
    }

    fn replace_peer(&mut self, new: NewOutbound) {
        for i in (0..self.meta.len()).rev() {
            if self.meta[i].peer == new.meta.peer {
                self.outbound.remove_sa(i);
                self.meta.remove(i);
            }
        }
        tracing::info!(peer = %new.meta.peer, spi = format_args!("{:#x}", new.sa.spi), "outbound SA now in use");
        self.outbound.add_sa(new.sa);
        self.meta.push(new.meta);
    }

    /// Reconciles each listed peer with the SA a reload wants for it.
    /// This thread alone claims reservations once running: it can see
    /// every SA alive (active or pending), so it never lets two of them
    /// draw on one key's nonce space.
    fn apply_plans(&mut self) {
        while let Ok(plan) = self.plans.try_recv() {
            for mut new in plan.desired {
                let peer = new.meta.peer.clone();
                let same = |fp: &crate::sa::reservation::Fingerprint, spi: u32| {
                    *fp == new.meta.fp && spi == new.sa.spi
                };
                let active_same = self
                    .meta
                    .iter()
                    .zip(self.outbound.sas())
                    .any(|(m, sa)| m.peer == peer && same(&m.fp, sa.spi));
                if active_same {
                    // Unchanged, or reverted before a pending switch.
                    self.pending.retain(|(p, _)| p.meta.peer != peer);
                    continue;
                }
                if self
                    .pending
                    .iter()
                    .any(|(p, _)| p.meta.peer == peer && same(&p.meta.fp, p.sa.spi))
                {
                    continue;
                }
                // Any SA that may still send on this key: every active one,
                // and the pending ones of other peers (this peer's pending
                // SA is superseded below, unused).
                let clash = self
                    .meta
                    .iter()
                    .zip(self.outbound.sas())
                    .map(|(m, sa)| (m, sa.spi))
                    .chain(
                        self.pending
                            .iter()
                            .filter(|(p, _)| p.meta.peer != peer)
                            .map(|(p, _)| (&p.meta, p.sa.spi)),
                    )
                    .find(|(m, _)| m.fp == new.meta.fp)
                    .map(|(m, spi)| (m.peer.clone(), spi));
                if let Some((other, spi)) = clash {
                    tracing::error!(
                        peer,
                        "reload: the new outbound SA {:#x} uses the key of the SA {spi:#x} of peer {other}, \
                         which is still in use: two SAs on one key would reuse GCM nonces; give every new SA \
                         a new key (esptun genkey). Unchanged",
                        new.sa.spi
                    );
                    continue;
                }
                if let Err(e) = super::claim(&self.store, &mut new.sa, &new.meta, &new.material) {
                    tracing::error!("reload: {e}; unchanged");
                    continue;
                }
                // A pending SA superseded here is dropped unused; its
                // reservation record stays, so its key can come back safely.
                self.pending.retain(|(p, _)| p.meta.peer != peer);
                if new.switch_when.is_some() {
                    self.pending.push((new, Instant::now()));
                } else {
                    self.replace_peer(new);
                }
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let (new, since) = &self.pending[i];
            let peer_ready = new
                .switch_when
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Relaxed));
            if peer_ready || now.duration_since(*since) >= self.shared.rekey_switch {
                if !peer_ready {
                    tracing::warn!(peer = %new.meta.peer, "no packet on the peer's new SA after {:?}: switching outbound anyway", self.shared.rekey_switch);
                }
                let (new, _) = self.pending.remove(i);
                self.replace_peer(new);
            } else {
                i += 1;
            }
        }
    }

    fn publish(&self) {
        let row = |sa: &OutboundSa, m: &OutMeta, state, drops| OutboundSaStatus {
            peer: m.peer.clone(),
            spi: sa.spi,
            endpoint: m.endpoint.to_string(),
            state,
            packets: sa.stats.packets,
            bytes: sa.stats.bytes,
            seq_used: sa.last_used(),
            seq_reserved: sa.ceiling(),
            soft_limit_reached: sa.past_soft_limit(),
            drops,
        };
        let mut rows: Vec<_> = self
            .outbound
            .sas()
            .iter()
            .zip(&self.meta)
            .enumerate()
            .map(|(i, (sa, m))| {
                let drops = status::sa_drops(self.outbound.sa_drops(i));
                row(sa, m, "active", drops)
            })
            .collect();
        rows.extend(
            self.pending
                .iter()
                .map(|(p, _)| row(&p.sa, &p.meta, "pending", BTreeMap::new())),
        );
        *self
            .shared
            .out_status
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = rows;
    }
}

/// Sockets -> ESP -> TUN.
pub(crate) struct InboundWorker {
    shared: Arc<Shared>,
    tun: Arc<Tun>,
    sockets: Arc<Sockets>,
    inbound: Inbound,
    meta: Vec<InMeta>,
    plans: Receiver<InboundPlan>,
    drop_log: DropLog,
    last_error_log: Option<Instant>,
    capture: Option<DropCapture>,
}

impl InboundWorker {
    pub fn new(
        shared: Arc<Shared>,
        tun: Arc<Tun>,
        sockets: Arc<Sockets>,
        sas: Vec<(InboundSa, InMeta)>,
        plans: Receiver<InboundPlan>,
        capture: Option<DropCapture>,
    ) -> Self {
        let mut inbound = Inbound::new(shared.inner);
        inbound.counters = shared.in_counters.clone();
        let mut meta = Vec::new();
        for (sa, m) in sas {
            inbound.add_sa(sa);
            meta.push(m);
        }
        InboundWorker {
            shared,
            tun,
            sockets,
            inbound,
            meta,
            plans,
            drop_log: DropLog::new("inbound"),
            last_error_log: None,
            capture,
        }
    }

    pub fn run(mut self) {
        let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new(BUF_CAPACITY)).collect();
        let mut from: Vec<Option<SocketAddr>> = vec![None; BATCH];
        let mut verdicts = Vec::with_capacity(BATCH);
        let mut next_check = Instant::now() + self.shared.selftest_interval;
        let mut next_publish = Instant::now();
        let sockets = self.sockets.clone();
        let socks: Vec<&OuterSocket> = [sockets.v4.as_ref(), sockets.v6.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        let fds: Vec<_> = socks.iter().map(|s| s.as_fd()).collect();
        let encap = sockets.encap;
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.apply_plans();
            maybe_selftest(&self.shared, &mut next_check, "inbound");
            if Instant::now() >= next_publish {
                self.publish();
                next_publish = Instant::now() + PUBLISH_EVERY;
            }
            let ready = match crate::io::poll_readable(&fds, POLL) {
                Ok(ready) => ready,
                Err(e) => {
                    self.io_error("poll on the outer sockets", &e);
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            for (i, socket) in socks.iter().enumerate() {
                if !ready.is_ready(i) {
                    continue;
                }
                let n = match socket.recv_batch(&mut bufs, &mut from) {
                    Ok(n) => n,
                    Err(e) => {
                        count(&self.shared.io.recv_errors);
                        self.io_error("receiving ESP packets", &e);
                        std::thread::sleep(ERROR_BACKOFF);
                        continue;
                    }
                };
                if n == 0 {
                    continue;
                }
                self.inbound
                    .process(&self.shared.selector, encap, &mut bufs[..n], &mut verdicts);
                for (buf, v) in bufs[..n].iter().zip(&verdicts) {
                    if *v == Verdict::Deliver
                        && let Err(e) = self.tun.write(buf.data())
                    {
                        count(&self.shared.io.tun_write_errors);
                        self.io_error("writing to the TUN device", &e);
                    }
                }
                self.post_mortem(&bufs[..n], &verdicts);
                self.log_drops(&verdicts);
            }
            self.note_seen();
        }
        self.publish();
    }

    fn log_drops(&mut self, verdicts: &[Verdict]) {
        let now = Instant::now();
        for v in verdicts {
            if let Verdict::Drop(reason) = v
                && *reason != DropReason::InnerChecksum
                && self.drop_log.due(*reason, now)
            {
                let context = self.inbound.last_drop(*reason).unwrap_or_default();
                self.drop_log.log(*reason, &context);
            }
        }
    }

    /// Inner-checksum drops: the buffer holds the decrypted packet. It
    /// goes to the capture file (if configured), and the log line (rate-
    /// limited) says what an investigation needs first.
    fn post_mortem(&mut self, bufs: &[PacketBuf], verdicts: &[Verdict]) {
        let now = Instant::now();
        let last = self.inbound.last_drop(DropReason::InnerChecksum);
        for (i, (buf, v)) in bufs.iter().zip(verdicts).enumerate() {
            if *v != Verdict::Drop(DropReason::InnerChecksum) {
                continue;
            }
            if let Some(capture) = &mut self.capture
                && let Err(e) = capture.record(buf.data())
            {
                count(&self.shared.io.capture_errors);
                self.io_error(
                    "writing the drop capture",
                    &std::io::Error::other(e.to_string()),
                );
            }
            if !self.drop_log.due(DropReason::InnerChecksum, now) {
                continue;
            }
            let context = last.filter(|c| c.packet == i).unwrap_or_default();
            let e = capture::explain(buf.data());
            let more = self.drop_log.take_suppressed(DropReason::InnerChecksum);
            let spi = context
                .spi
                .map_or_else(|| "-".into(), |s| format!("{s:#010x}"));
            let seq = context.seq.map_or_else(|| "-".into(), |s| s.to_string());
            let flow = e.flow.map_or_else(|| "-".into(), |f| f.to_string());
            let (found, computed) = e.checksums.map_or_else(
                || ("-".into(), "-".into()),
                |(f, c)| (format!("{f:#06x}"), format!("{c:#06x}")),
            );
            tracing::warn!(
                direction = "inbound",
                reason = "inner_checksum",
                spi,
                seq,
                flow,
                checksum_found = found,
                checksum_computed = computed,
                suppressed = more,
                "dropped: valid ICV but wrong inner checksum; {}",
                e.hint()
            );
        }
    }

    /// Marks SAs that have authenticated a packet: the outbound thread
    /// waits on this before switching to a reloaded SA.
    fn note_seen(&self) {
        for (sa, m) in self.inbound.sas().iter().zip(&self.meta) {
            if sa.stats.packets > 0 && !m.seen.load(Ordering::Relaxed) {
                m.seen.store(true, Ordering::Relaxed);
            }
        }
    }

    fn io_error(&mut self, what: &str, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_error_log = Some(now);
            tracing::warn!("inbound: {what}: {e}");
        }
    }

    /// Reconciles each listed peer with the inbound SA a reload wants:
    /// a new SA is accepted at once, the peer's others retire later; an SA
    /// asked for again while retiring is simply kept.
    fn apply_plans(&mut self) {
        let now = Instant::now();
        while let Ok(plan) = self.plans.try_recv() {
            for (sa, m) in plan.desired {
                let existing = self
                    .inbound
                    .sas()
                    .iter()
                    .zip(&self.meta)
                    .position(|(s, meta)| s.spi == sa.spi && meta.fp == m.fp);
                let keep = match existing {
                    Some(i) => i,
                    None => {
                        // One SPI, one SA: lookup is by SPI.
                        for i in (0..self.meta.len()).rev() {
                            if self.inbound.sas()[i].spi == sa.spi {
                                tracing::warn!(peer = %self.meta[i].peer, spi = format_args!("{:#x}", sa.spi), "reload changed the key of an inbound SPI in place: replaced at once (use a new SPI to roll keys without loss)");
                                self.inbound.remove_sa(i);
                                self.meta.remove(i);
                            }
                        }
                        tracing::info!(peer = %m.peer, spi = format_args!("{:#x}", sa.spi), "inbound SA accepting");
                        self.inbound.add_sa(sa);
                        self.meta.push(m);
                        self.meta.len() - 1
                    }
                };
                let peer = self.meta[keep].peer.clone();
                for (i, meta) in self.meta.iter_mut().enumerate() {
                    if i == keep {
                        meta.retire_at = None;
                    } else if meta.peer == peer && meta.retire_at.is_none() {
                        meta.retire_at = Some(now + self.shared.rekey_retire);
                    }
                }
            }
        }
        for i in (0..self.meta.len()).rev() {
            if self.meta[i].retire_at.is_some_and(|t| now >= t) {
                let spi = self.inbound.sas()[i].spi;
                tracing::info!(peer = %self.meta[i].peer, spi = format_args!("{spi:#x}"), "retired inbound SA");
                self.inbound.remove_sa(i);
                self.meta.remove(i);
            }
        }
    }

    fn publish(&self) {
        let rows = self
            .inbound
            .sas()
            .iter()
            .zip(&self.meta)
            .enumerate()
            .map(|(i, (sa, m))| InboundSaStatus {
                peer: m.peer.clone(),
                spi: sa.spi,
                state: if m.retire_at.is_some() {
                    "retiring"
                } else {
                    "active"
                },
                packets: sa.stats.packets,
                bytes: sa.stats.bytes,
                replay_window: sa.replay.size(),
                replay_top: sa.replay.top(),
                drops: status::sa_drops(self.inbound.sa_drops(i)),
            })
            .collect();
        *self
            .shared
            .in_status
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = rows;
    }
}
