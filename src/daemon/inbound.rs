//! The inbound thread: outer sockets -> [`Inbound`] -> TUN, post-mortems
//! of inner-checksum drops, and the inbound SA table's commands from the
//! key manager ([`super::sas`]).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::capture::{self, DropCapture};
use super::sas::{InboundCommands, SaCommand, SaEvent};
use super::shared::Shared;
use super::status::{self, InboundSaStatus};
use super::workers::{
    BATCH, BUF_CAPACITY, DropLog, ERROR_BACKOFF, ErrorLog, POLL, PUBLISH_EVERY, Sockets, count,
    maybe_selftest,
};
use crate::datapath::inbound::Inbound;
use crate::datapath::{DropReason, Verdict};
use crate::io::socket::OuterSocket;
use crate::io::tun::Tun;
use crate::packet::{Batch, PacketBuf};
use crate::sa::table::SaId;

/// ICV failures, with no packet ever authenticated, after which an SA's
/// keying is called into question in the log (once per SA).
const ICV_ONLY_FAILURES: u64 = 10;

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
        InboundWorker {
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
        }
    }

    pub fn run(mut self) {
        let mut batch = Batch::new(BATCH, BUF_CAPACITY);
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
            self.apply_commands();
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
                let n = match socket.recv_batch(batch.slots()) {
                    Ok(n) => n,
                    Err(e) => {
                        count(&self.shared.io.recv_errors);
                        self.errors.io("receiving ESP packets", &e);
                        std::thread::sleep(ERROR_BACKOFF);
                        continue;
                    }
                };
                batch.set_len(n);
                if n == 0 {
                    continue;
                }
                self.inbound.process(
                    &self.shared.selector,
                    encap,
                    batch.packets_mut(),
                    &mut verdicts,
                );
                for (buf, v) in batch.packets().iter().zip(&verdicts) {
                    if *v == Verdict::Deliver
                        && let Err(e) = self.tun.write(buf.data())
                    {
                        count(&self.shared.io.tun_write_errors);
                        self.errors.io("writing to the TUN device", &e);
                    }
                }
                self.post_mortem(batch.packets(), &verdicts);
                self.log_drops(&verdicts);
            }
            self.note_seen();
            self.warn_only_icv_failures();
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

    /// Applies the key manager's commands, in order.
    fn apply_commands(&mut self) {
        while let Ok(commands) = self.commands.try_recv() {
            for command in commands {
                match command {
                    SaCommand::Install { id, new, meta } => {
                        let (peer, spi) = (meta.peer.clone(), new.spi);
                        if let Err(e) = self.inbound.sas.insert(id, new, meta) {
                            tracing::error!(peer, "inbound SA {spi:#x} not installed: {e}");
                            let _ = self.events.send(SaEvent::InstallFailed { id });
                        }
                    }
                    SaCommand::SetState { id, state } => {
                        if let Some(entry) = self.inbound.sas.get_mut(id) {
                            entry.meta.state = state;
                        }
                    }
                    SaCommand::SetEndpoint { id, endpoint } => {
                        if let Some(entry) = self.inbound.sas.get_mut(id) {
                            entry.meta.endpoint = endpoint;
                        }
                    }
                    SaCommand::Remove { id } => {
                        self.inbound.sas.remove(id);
                        self.seen.retain(|s| *s != id);
                    }
                }
            }
        }
    }

    fn publish(&self) {
        let rows = self
            .inbound
            .sas
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
            })
            .collect();
        *self
            .shared
            .in_status
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = rows;
    }
}
