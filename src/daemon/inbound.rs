//! The inbound thread: outer sockets -> [`Inbound`] -> TUN, post-mortems
//! of inner-checksum drops, and the inbound SA table's commands from the
//! key manager ([`super::sas`]).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use super::capture::{self, DropCapture};
use super::deliver::Deliverer;
use super::sas::{InboundCommands, SaCommand, SaEvent};
use super::shared::{Activity, Shared};
use super::status::{self, InboundSaStatus, IoCounters};
use super::workers::{
    BATCH, BUF_CAPACITY, DropLog, ERROR_BACKOFF, ErrorLog, POLL, PUBLISH_EVERY, RX_BATCH, Sockets,
    count, maybe_selftest,
};
use crate::datapath::inbound::{Encap, Inbound};
use crate::datapath::{DropReason, Verdict};
use crate::io::socket::OuterSocket;
use crate::io::tun::Tun;
use crate::packet::{Batch, PacketBuf};
use crate::sa::table::SaId;
use crate::wire::hop_by_hop;

/// ICV failures, with no packet ever authenticated, after which an SA's
/// keying is called into question in the log (once per SA).
const ICV_ONLY_FAILURES: u64 = 10;

/// How long, at most, the inbound thread outlives `stop` for the IKE
/// thread's Deletes (which wait at most one second for their answers).
const FAREWELL_MAX: Duration = Duration::from_secs(2);

/// Sockets -> ESP -> TUN.
pub(crate) struct InboundWorker {
    shared: Arc<Shared>,
    tun: Arc<Tun>,
    sockets: Arc<Sockets>,
    inbound: Inbound,
    commands: Receiver<InboundCommands>,
    events: Sender<SaEvent>,
    /// SAs already reported as seen to the key manager.
    seen: Vec<SaId>,
    /// SAs already warned about as failing every ICV check.
    icv_warned: Vec<SaId>,
    drop_log: DropLog,
    errors: ErrorLog,
    capture: Option<DropCapture>,
    /// Writes deliveries to TUN, coalescing validated segments.
    deliverer: Deliverer,
    /// When each SA last delivered, for `status`.
    activity: Activity,
    /// Where IKE messages on the NAT-T port go ([`Verdict::Ike`]).
    ike: Option<super::ike::IkeQueue>,
}

impl InboundWorker {
    pub fn new(
        shared: Arc<Shared>,
        tun: Arc<Tun>,
        sockets: Arc<Sockets>,
        inbound: Inbound,
        commands: Receiver<InboundCommands>,
        events: Sender<SaEvent>,
        capture: Option<DropCapture>,
    ) -> Self {
        let deliverer = Deliverer::with(shared.coalesce, tun.offloads().uso);
        InboundWorker {
            deliverer,
            shared,
            tun,
            sockets,
            inbound,
            commands,
            events,
            seen: Vec::new(),
            icv_warned: Vec::new(),
            drop_log: DropLog::new("inbound"),
            errors: ErrorLog::new("inbound"),
            capture,
            activity: Activity::default(),
            ike: None,
        }
    }

    /// Hands IKE messages (non-ESP marker on the NAT-T port) to the IKE
    /// thread; the pipeline must have `ike_handler` set.
    pub fn set_ike_queue(&mut self, queue: super::ike::IkeQueue) {
        self.ike = Some(queue);
    }

    pub fn run(mut self) {
        // Received datagrams (a GRO train fills one buffer), and the ESP
        // packets split out of them, which the pipeline works on.
        let mut rx = Batch::new(RX_BATCH, BUF_CAPACITY);
        let mut batch = Batch::new(BATCH, BUF_CAPACITY);
        let mut verdicts = Vec::with_capacity(BATCH);
        // The hop-by-hop header each received datagram came with, by its
        // index in `rx`. Carrying (`[inner] ipv6_hop_by_hop = "carry"`),
        // each packet takes its datagram's along into the pipeline's
        // slots; dropping, they are only counted.
        let mut rx_hop_by_hop = hop_by_hop::Slots::new(RX_BATCH);
        let carrying = self.inbound.hop_by_hop.is_some();
        let mut next_check = Instant::now() + self.shared.selftest_interval;
        let mut next_publish = Instant::now();
        let sockets = self.sockets.clone();
        let socks: Vec<&OuterSocket> = [sockets.v4.as_ref(), sockets.v6.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        let fds: Vec<_> = socks.iter().map(|s| s.as_fd()).collect();
        let encap = sockets.encap;
        let mut path_mtu_seen = 0;
        let mut stopping_since = None;
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                // With `outer = "udp"` the answers to the IKE thread's
                // Deletes on stop arrive here: keep passing them on until
                // it has finished, and never longer than FAREWELL_MAX.
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if self.ike.is_none()
                    || !self.shared.ike.farewell.load(Ordering::Acquire)
                    || since.elapsed() >= FAREWELL_MAX
                {
                    break;
                }
            }
            self.apply_commands();
            // What the outbound thread learned, for MSS clamping.
            let changes = self.shared.path_mtu_changes.load(Ordering::Acquire);
            if changes != path_mtu_seen {
                path_mtu_seen = changes;
                self.inbound.path_mtu = self
                    .shared
                    .path_mtu
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
            }
            maybe_selftest(&self.shared, &mut next_check, "inbound");
            if Instant::now() >= next_publish {
                self.publish();
                next_publish = Instant::now() + PUBLISH_EVERY;
            }
            let ready = match crate::io::poll_readable(&fds, POLL) {
                Ok(ready) => ready,
                Err(e) => {
                    self.errors.io("poll on the outer sockets", &e);
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            for (i, socket) in socks.iter().enumerate() {
                if !ready.is_ready(i) {
                    continue;
                }
                let n = match socket.recv_batch_carrying(rx.slots(), Some(&mut rx_hop_by_hop)) {
                    Ok(n) => n,
                    Err(e) => {
                        count(&self.shared.io.recv_errors);
                        self.errors.io("receiving ESP packets", &e);
                        std::thread::sleep(ERROR_BACKOFF);
                        continue;
                    }
                };
                rx.set_len(n);
                let rx_hop_by_hop = if carrying {
                    Some(&rx_hop_by_hop)
                } else {
                    let with = (0..n)
                        .filter(|&i| {
                            !rx_hop_by_hop.get(i).is_empty() || rx_hop_by_hop.is_too_long(i)
                        })
                        .count();
                    if with > 0 {
                        IoCounters::add(&self.shared.io.outer_hop_by_hop_not_carried, with as u64);
                    }
                    None
                };
                let mut filled = 0;
                for (index, slot) in rx.packets_mut().iter_mut().enumerate() {
                    let segment = usize::from(slot.meta.segment_size);
                    if segment == 0 || slot.len() <= segment {
                        // One datagram: handed over, not copied.
                        std::mem::swap(slot, &mut batch.slots()[filled]);
                        self.take_hop_by_hop(rx_hop_by_hop, index, filled);
                        filled += 1;
                    } else {
                        // A GRO train: its ESP packets, in order.
                        // One TOS for the whole train: the kernel's GRO
                        // never merges packets whose TOS or traffic class
                        // differ (IPv4 GRO: "all fields must match except length and
                        // checksum"; IPv6 GRO: "flush if Traffic Class fields
                        // are different").
                        // One hop-by-hop header too: GRO merges only
                        // packets whose extension headers are the same
                        // (ipv6_gro_receive compares the bytes between
                        // the IPv6 and transport headers, and flushes on
                        // a difference).
                        let (peer, tos) = (slot.meta.peer, slot.meta.tos);
                        for chunk in slot.data().chunks(segment) {
                            if filled == BATCH {
                                batch.set_len(filled);
                                self.open_and_deliver(encap, &mut batch, &mut verdicts);
                                filled = 0;
                            }
                            let out = &mut batch.slots()[filled];
                            // A chunk is at most `segment` bytes, which
                            // fit: the train came in a buffer this size.
                            out.fill(chunk);
                            out.meta.peer = peer;
                            out.meta.tos = tos;
                            self.take_hop_by_hop(rx_hop_by_hop, index, filled);
                            filled += 1;
                        }
                    }
                    if filled == BATCH {
                        batch.set_len(filled);
                        self.open_and_deliver(encap, &mut batch, &mut verdicts);
                        filled = 0;
                    }
                }
                batch.set_len(filled);
                if filled > 0 {
                    self.open_and_deliver(encap, &mut batch, &mut verdicts);
                }
            }
            self.note_seen();
            self.note_kernel_drops(&socks);
            self.warn_only_icv_failures();
        }
        self.publish();
    }

    /// Carrying hop-by-hop headers: the pipeline's slot `to` gets what the
    /// socket reported for received datagram `index` (a header, none, or
    /// one too long to carry).
    fn take_hop_by_hop(&mut self, received: Option<&hop_by_hop::Slots>, index: usize, to: usize) {
        if let (Some(from), Some(slots)) = (received, self.inbound.hop_by_hop.as_mut()) {
            slots.copy_from(to, from, index);
        }
    }

    /// Opens a batch, writes what is delivered to TUN, and reports drops.
    fn open_and_deliver(&mut self, encap: Encap, batch: &mut Batch, verdicts: &mut Vec<Verdict>) {
        self.inbound
            .process(&self.shared.selector, encap, batch.packets_mut(), verdicts);
        let done =
            self.deliverer
                .deliver(&self.tun, self.inbound.policy, batch.packets(), verdicts);
        if done.gso_refused {
            count(&self.shared.io.tun_gso_refused);
            self.shared
                .offloads
                .coalesce
                .store(false, Ordering::Relaxed);
            tracing::error!(
                "the kernel refused a coalesced (GSO) write to the TUN device: this kernel does \
                 not take them; writing packets one by one from now on"
            );
        }
        if done.errors > 0 {
            IoCounters::add(&self.shared.io.tun_write_errors, done.errors);
            if let Some(e) = done.last_error {
                self.errors.io("writing to the TUN device", &e);
            }
        }
        self.post_mortem(batch.packets(), verdicts);
        self.log_drops(verdicts);
        if let Some(ike) = &self.ike {
            for (buf, v) in batch.packets().iter().zip(verdicts.iter()) {
                if *v == Verdict::Ike {
                    ike.offer(buf.data(), buf.meta.peer);
                }
            }
        }
    }

    /// What the kernel dropped before esptun could see it: datagrams
    /// refused for a full socket receive buffer (SO_RXQ_OVFL).
    fn note_kernel_drops(&self, socks: &[&OuterSocket]) {
        let total = socks.iter().map(|s| s.rx_overflows()).sum();
        self.shared
            .io
            .socket_rx_overflows
            .store(total, Ordering::Relaxed);
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
                self.errors.io(
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

    /// Tells the key manager which SAs have authenticated a packet: it
    /// switches a pending outbound SA once the peer uses our new inbound
    /// SA.
    fn note_seen(&mut self) {
        for entry in self.inbound.sas.iter() {
            if entry.sa.stats.packets > 0 && !self.seen.contains(&entry.id) {
                self.seen.push(entry.id);
                let _ = self.events.send(SaEvent::Seen { id: entry.id });
            }
        }
    }

    /// One line per SA that has failed the ICV check [`ICV_ONLY_FAILURES`]
    /// times without ever authenticating a packet: with manual keying that
    /// is a mismatch of configuration, not an attack or bad luck, and the
    /// counter alone does not say which.
    fn warn_only_icv_failures(&mut self) {
        for entry in self.inbound.sas.iter() {
            let failures = entry.counters[DropReason::IcvFailure.index()];
            if entry.sa.stats.packets == 0
                && failures >= ICV_ONLY_FAILURES
                && !self.icv_warned.contains(&entry.id)
            {
                self.icv_warned.push(entry.id);
                tracing::warn!(
                    peer = %entry.meta.peer,
                    spi = format_args!("{:#x}", entry.sa.spi),
                    esn = entry.sa.esn,
                    "inbound SA has failed the ICV check {failures} times and authenticated no packet \
                     since it started. Likely causes: extended sequence numbers on one side only \
                     (this SA has esn = {}; RFC 4303 section 2.2.1: the high 32 bits enter the ICV, \
                     and `ip xfrm` uses 32-bit numbers unless `flag esn` is set), a wrong key or \
                     salt (the key file holds key and 4-byte salt, RFC 4106 section 8.1), an ICV \
                     length that differs from the peer's, or the two directions' keys swapped",
                    entry.sa.esn
                );
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
                if let SaCommand::Remove { id } = &command {
                    self.seen.retain(|s| s != id);
                }
                let Some((id, new, meta)) = command.apply(&mut self.inbound.sas) else {
                    continue;
                };
                let (peer, spi) = (meta.peer.clone(), new.spi);
                if let Err(e) = self.inbound.sas.insert(id, new, meta) {
                    tracing::error!(peer, "inbound SA {spi:#x} not installed: {e}");
                    let reason = format!("inbound SA {spi:#x} not installed: {e}");
                    events.push(SaEvent::InstallFailed { id, reason });
                } else {
                    events.push(SaEvent::Installed { id });
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
        let sas = &self.inbound.sas;
        activity.retain(|id| sas.get(id).is_some());
        let rows = sas
            .iter()
            .map(|e| InboundSaStatus {
                peer: e.meta.peer.clone(),
                spi: e.sa.spi,
                state: e.meta.state.as_str(),
                packets: e.sa.stats.packets,
                bytes: e.sa.stats.bytes,
                replay_window: e.sa.replay.size(),
                replay_top: e.sa.replay.top(),
                drops: status::sa_drops(Some(&e.counters)),
                last_packet_ms_ago: activity.note(e.id, e.sa.stats.packets, now),
            })
            .collect();
        Shared::publish(&self.shared.in_status, rows, &self.shared.in_counters);
    }
}
