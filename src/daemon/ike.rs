//! The IKE thread: the IKE SAs of the peers keyed by IKE
//! ([`crate::config::IkePeer`]), driven by the sans-IO [`IkeSa`].
//!
//! One thread owns every `IkeSa`. It reads IKE messages from its own UDP
//! 500 socket(s) and, for NAT-T, from the inbound datapath, which hands
//! over what it classified as IKE on port 4500 (non-ESP marker, RFC 3948
//! section 2.2) through a bounded channel: the datapath never blocks on
//! IKE, a full channel drops the message and counts it
//! (`ike.queue_drops`), and IKE's own retransmissions (RFC 7296 section
//! 2.1) recover. It sends on port 500 without a marker and on the NAT-T
//! socket with one, drives the retransmission timers from
//! [`IkeSa::next_timeout`], initiates where configured (again after a
//! failure, with back-off), and turns each CHILD SA into a [`PeerSas`]
//! for the key manager.
//!
//! Why a thread of its own rather than the main loop, which owns the key
//! manager: the main loop sleeps in a signal wait and runs reloads that
//! wait seconds for the datapath, and IKE must answer a peer's
//! retransmission promptly whatever a reload does. The key manager stays
//! the main thread's alone: new CHILD SAs reach it over a channel, and it
//! installs them on its next tick (at most 100 ms later).
//!
//! Time is read here, at the edge (`Instant::now()`), and randomness comes
//! from the OS ([`SystemRandomness`], ring's `SystemRandom`).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::shared::Shared;
use super::workers::Sockets;
use crate::config::IkePeer;
use crate::config::ike::{identity_text, load_psk};
use crate::crypto::IcvLen;
use crate::ike::crypto::{Encr, SystemRandomness};
use crate::ike::sa::{Action, ChildSa, Config as IkeConfig, ErrorNotify, IkeError, IkeSa, Role};
use crate::ike::wire::consts::exchange;
use crate::ike::wire::{Header, IkeHeader};
use crate::io::ike_socket::{IKE_PORT, IkeSocket, MAX_MESSAGE};
use crate::sa::keymgr::{NewInbound, NewOutbound, PeerSas};
use crate::sa::replay::DEFAULT_WINDOW;
use crate::sa::reservation::Fingerprint;
use crate::sa::{InboundSa, InnerAddrs, OutboundSa, SaKeys, hard_limit};
use crate::wire::outer::Encap;

/// IKE messages queued from the inbound datapath; beyond this they are
/// dropped (and counted), never waited for.
pub(crate) const QUEUE: usize = 64;
/// The non-ESP marker before an IKE message on port 4500.
const NON_ESP_MARKER: [u8; 4] = [0; 4];
/// The thread's longest sleep: the stop flag and the datapath's queue are
/// looked at least this often.
const TICK: Duration = Duration::from_millis(20);
/// Back-off before initiating again after a failure: doubles from the
/// first to the last, so a wrong PSK costs a few exchanges a minute.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(120);
/// IKE SAs per peer at once (one established, others being set up): a
/// flood of IKE_SA_INIT requests cannot grow the table.
const SAS_PER_PEER: usize = 4;
/// How long an IKE SA the peer started keeps us from initiating our own.
const PEER_STARTED: Duration = Duration::from_secs(30);
/// One log line per peer at most this often (the rest are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// An IKE message from the inbound datapath (marker removed).
pub(crate) struct IkeDatagram {
    pub bytes: Vec<u8>,
    pub from: SocketAddr,
}

/// The inbound thread's end: hands IKE messages over without blocking.
pub(crate) struct IkeQueue {
    pub tx: SyncSender<IkeDatagram>,
    pub shared: Arc<IkeShared>,
}

impl IkeQueue {
    /// Queues the UDP payload `data` (marker included) from `from`.
    pub fn offer(&self, data: &[u8], from: Option<SocketAddr>) {
        let (Some(from), Some(bytes)) = (from, data.get(NON_ESP_MARKER.len()..)) else {
            return;
        };
        let datagram = IkeDatagram {
            bytes: bytes.to_vec(),
            from,
        };
        match self.tx.try_send(datagram) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.queue_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the IKE thread shares: its status for `esptun status`, the IKE
/// SA keys for `esptun wireshark-keys`, and the queue's drop count.
#[derive(Default)]
pub(crate) struct IkeShared {
    pub queue_drops: AtomicU64,
    pub status: Mutex<Vec<IkePeerStatus>>,
    /// One `ikev2_decryption_table` record per established IKE SA.
    pub keys: Mutex<Vec<Zeroizing<String>>>,
}

impl IkeShared {
    pub fn snapshot(&self) -> IkeStatus {
        IkeStatus {
            queue_drops: self.queue_drops.load(Ordering::Relaxed),
            peers: self
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// The IKE SA keys as Wireshark's IKEv2 decryption table, one record
    /// a line.
    pub fn key_records(&self) -> Zeroizing<String> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Zeroizing::new(String::with_capacity(
            keys.iter().map(|k| k.len() + 1).sum(),
        ));
        for k in keys.iter() {
            out.push_str(k);
            out.push('\n');
        }
        out
    }
}

/// `esptun status`: IKE.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeStatus {
    /// IKE messages on port 4500 dropped because the IKE thread's queue
    /// was full.
    pub queue_drops: u64,
    pub peers: Vec<IkePeerStatus>,
}

/// One peer keyed by IKE.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkePeerStatus {
    pub peer: String,
    pub initiate: bool,
    pub local_id: String,
    pub remote_id: String,
    pub sas: Vec<IkeSaStatus>,
    pub counters: IkeCounters,
    /// The last failure, as logged.
    pub last_error: Option<String>,
}

/// One IKE SA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeSaStatus {
    /// `initiator` or `responder`.
    pub role: String,
    /// `connecting`, `established` or `closed`.
    pub state: String,
    /// The IKE SPIs, 16 hex digits each.
    pub spi_i: String,
    pub spi_r: String,
    pub age_secs: u64,
    /// Where its messages go: `ADDR:500` or `ADDR:4500` (marker).
    pub remote: String,
    /// The negotiated suite, e.g. `aes256gcm16-prfsha256-x25519`.
    pub suite: Option<String>,
    /// The CHILD SAs it installed: (inbound SPI, outbound SPI).
    pub children: Vec<ChildStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub inbound_spi: u32,
    pub outbound_spi: u32,
}

/// Per peer, since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeCounters {
    pub established: u64,
    pub children_installed: u64,
    pub children_failed: u64,
    /// AUTHENTICATION_FAILED, either way: wrong PSK or an identity that
    /// is not the one configured (RFC 7296 section 2.21.2 gives both the
    /// same answer).
    pub auth_failures: u64,
    /// NO_PROPOSAL_CHOSEN, either way.
    pub proposal_mismatches: u64,
    /// TS_UNACCEPTABLE, either way.
    pub ts_unacceptable: u64,
    /// No answer after every retransmission.
    pub timeouts: u64,
    pub other_failures: u64,
    /// Messages dropped unprocessed (malformed, failed ICV, unexpected).
    pub messages_dropped: u64,
}

/// How a message arrived, and so how an answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Port 500, no marker.
    Ike,
    /// The NAT-T socket, with the non-ESP marker.
    NatT,
}

/// One IKE SA and what the daemon knows around it.
struct Slot {
    sa: IkeSa,
    via: Via,
    to: SocketAddr,
    created: Instant,
    established: bool,
    children: Vec<ChildStatus>,
}

/// One peer's IKE state.
struct PeerIke {
    cfg: IkePeer,
    ike: Arc<IkeConfig>,
    /// Where an initiator sends: the NAT-T port when the outer mode is
    /// UDP (RFC 7296 section 2.23 allows starting there), else port 500.
    initiate_via: (Via, SocketAddr),
    slots: Vec<Slot>,
    /// When to initiate next (initiators only) and the current back-off.
    next_initiate: Option<Instant>,
    backoff: Duration,
    counters: IkeCounters,
    last_error: Option<String>,
    /// Rate limit of failure logs: when last logged, and how many since.
    last_log: Option<Instant>,
    suppressed: u64,
}

pub(crate) struct IkeWorker {
    shared: Arc<Shared>,
    ike: Arc<IkeShared>,
    sockets: Arc<Sockets>,
    ike_sockets: Vec<IkeSocket>,
    queue: Receiver<IkeDatagram>,
    installs: Sender<PeerSas>,
    peers: Vec<PeerIke>,
    rng: SystemRandomness,
    /// Messages from addresses that are no peer's, and when last logged.
    unknown: u64,
    unknown_logged: Option<Instant>,
}

/// Opens the port 500 sockets the IKE peers need (one per family).
pub(crate) fn open_sockets(
    peers: &[IkePeer],
    fwmark: u32,
) -> Result<Vec<IkeSocket>, crate::io::IoSetupError> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if peers.iter().any(|p| p.endpoint.is_ipv6() == v6) {
            out.push(IkeSocket::open(v6, IKE_PORT, Some(fwmark))?);
        }
    }
    Ok(out)
}

/// A peer's `ike::sa::Config`, with its PSK read now.
pub(crate) fn ike_config(peer: &IkePeer) -> Result<IkeConfig, crate::config::ike::PskError> {
    Ok(IkeConfig {
        local_id: peer.ike.local_id.clone(),
        remote_id: Some(peer.ike.remote_id.clone()),
        psk: load_psk(&peer.ike.psk_file)?,
        ike: peer.ike.ike.clone(),
        esp: peer.ike.esp.clone(),
        local_addr: peer.inner_local,
        remote_addr: peer.inner_remote,
        retransmit: Default::default(),
    })
}

impl IkeWorker {
    /// `configs` are the peers' IKE configurations, in the order of
    /// `peers`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        ike: Arc<IkeShared>,
        sockets: Arc<Sockets>,
        ike_sockets: Vec<IkeSocket>,
        queue: Receiver<IkeDatagram>,
        installs: Sender<PeerSas>,
        peers: Vec<(IkePeer, IkeConfig)>,
    ) -> Self {
        let now = Instant::now();
        let peers = peers
            .into_iter()
            .map(|(cfg, ike)| {
                let initiate_via = match sockets.encap {
                    Encap::Udp { port } => (Via::NatT, SocketAddr::new(cfg.endpoint, port)),
                    Encap::RawEsp => (Via::Ike, SocketAddr::new(cfg.endpoint, IKE_PORT)),
                };
                PeerIke {
                    next_initiate: cfg.ike.initiate.then_some(now),
                    cfg,
                    ike: Arc::new(ike),
                    initiate_via,
                    slots: Vec::new(),
                    backoff: RETRY_FIRST,
                    counters: IkeCounters::default(),
                    last_error: None,
                    last_log: None,
                    suppressed: 0,
                }
            })
            .collect();
        IkeWorker {
            shared,
            ike,
            sockets,
            ike_sockets,
            queue,
            installs,
            peers,
            rng: SystemRandomness::new(),
            unknown: 0,
            unknown_logged: None,
        }
    }

    pub fn run(mut self) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut publish_due = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.initiate_due(now);
            self.timeouts(now);
            if now >= publish_due {
                self.publish(now);
                publish_due = now + Duration::from_millis(200);
            }
            let wait = self
                .next_deadline()
                .map_or(TICK, |d| d.saturating_duration_since(now).min(TICK));
            let fds: Vec<_> = self.ike_sockets.iter().map(|s| s.as_fd()).collect();
            let ready = match crate::io::poll_readable(&fds, wait) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("IKE: poll failed: {e}");
                    std::thread::sleep(TICK);
                    continue;
                }
            };
            drop(fds);
            for i in 0..self.ike_sockets.len() {
                if !ready.is_ready(i) {
                    continue;
                }
                // Bounded: a flood cannot keep the thread from its timers.
                for _ in 0..64 {
                    match self.ike_sockets[i].recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let bytes = buf[..n].to_vec();
                            self.on_message(&bytes, from, Via::Ike);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!("IKE: receive failed: {e}");
                            break;
                        }
                    }
                }
            }
            for _ in 0..QUEUE {
                let Ok(d) = self.queue.try_recv() else { break };
                self.on_message(&d.bytes, d.from, Via::NatT);
            }
        }
        self.publish(Instant::now());
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .iter()
            .flat_map(|p| {
                p.slots
                    .iter()
                    .filter_map(|s| s.sa.next_timeout())
                    .chain(p.next_initiate)
            })
            .min()
    }

    /// Initiates for peers that are due and have no IKE SA on its way: none
    /// established, none of ours connecting, and none the peer started
    /// lately (a responder slot that never completes does not block us
    /// for long).
    fn initiate_due(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            let p = &mut self.peers[i];
            let busy = p.slots.iter().any(|s| {
                s.established
                    || s.sa.role() == Role::Initiator
                    || now.saturating_duration_since(s.created) < PEER_STARTED
            });
            if p.next_initiate.is_none_or(|t| now < t) || busy {
                continue;
            }
            p.next_initiate = None;
            match IkeSa::initiate(p.ike.clone(), now, &mut self.rng) {
                Ok((sa, actions)) => {
                    let (via, to) = p.initiate_via;
                    tracing::info!(peer = %p.cfg.name, to = %to, "IKE: initiating");
                    p.slots.push(Slot {
                        sa,
                        via,
                        to,
                        created: now,
                        established: false,
                        children: Vec::new(),
                    });
                    let slot = p.slots.len() - 1;
                    self.act(i, slot, actions, now);
                }
                Err(e) => self.failed(i, e, now),
            }
            self.reap(i, now);
        }
    }

    fn timeouts(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            for s in 0..self.peers[i].slots.len() {
                if self.peers[i].slots[s]
                    .sa
                    .next_timeout()
                    .is_some_and(|t| t <= now)
                {
                    let actions = self.peers[i].slots[s].sa.handle_timeout(now);
                    self.act(i, s, actions, now);
                }
            }
            self.reap(i, now);
        }
    }

    /// One received IKE message.
    fn on_message(&mut self, bytes: &[u8], from: SocketAddr, via: Via) {
        let now = Instant::now();
        let Some(i) = self.peers.iter().position(|p| p.cfg.endpoint == from.ip()) else {
            self.unknown += 1;
            if self
                .unknown_logged
                .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
            {
                self.unknown_logged = Some(now);
                tracing::warn!(
                    from = %from,
                    total = self.unknown,
                    "IKE: message from an address that is no IKE peer's endpoint: dropped"
                );
            }
            return;
        };
        let header = match IkeHeader::new_checked(bytes).and_then(|h| Header::parse(&h)) {
            Ok(h) => h,
            Err(e) => {
                self.peers[i].counters.messages_dropped += 1;
                tracing::debug!(peer = %self.peers[i].cfg.name, "IKE: malformed message dropped: {e}");
                return;
            }
        };
        let p = &mut self.peers[i];
        let slot = match p.slots.iter().position(|s| s.sa.spis().0 == header.spi_i) {
            Some(s) => s,
            None if !header.is_response()
                && header.exchange == exchange::IKE_SA_INIT
                && header.spi_r == 0 =>
            {
                if p.slots.len() >= SAS_PER_PEER {
                    // The oldest one not established makes room.
                    match p.slots.iter().position(|s| !s.established) {
                        Some(old) => {
                            p.slots.remove(old);
                        }
                        None => {
                            p.counters.messages_dropped += 1;
                            return;
                        }
                    }
                }
                p.slots.push(Slot {
                    sa: IkeSa::responder(p.ike.clone()),
                    via,
                    to: from,
                    created: now,
                    established: false,
                    children: Vec::new(),
                });
                p.slots.len() - 1
            }
            None => {
                p.counters.messages_dropped += 1;
                tracing::debug!(peer = %p.cfg.name, "IKE: message for no IKE SA of ours dropped");
                return;
            }
        };
        let s = &mut p.slots[slot];
        match s.sa.handle(bytes, now, &mut self.rng) {
            Ok(actions) => {
                // Answers go back the way the peer's message came.
                s.via = via;
                s.to = from;
                self.act(i, slot, actions, now);
            }
            Err(e) => {
                p.counters.messages_dropped += 1;
                tracing::debug!(peer = %p.cfg.name, "IKE: message dropped: {e}");
                // A responder that never got a valid request holds nothing.
                if s.sa.role() == Role::Responder && s.sa.spis().1 == 0 {
                    p.slots.remove(slot);
                }
            }
        }
        self.reap(i, now);
    }

    /// Carries out an IKE SA's actions. Every `Action` is handled here:
    /// a new kind is one more arm.
    fn act(&mut self, i: usize, slot: usize, actions: Vec<Action>, now: Instant) {
        for action in actions {
            match action {
                Action::Send(bytes) => self.send(i, slot, &bytes),
                Action::InstallChild(child) => self.install(i, slot, child, now),
                Action::ChildFailed(e) => {
                    self.peers[i].counters.children_failed += 1;
                    self.count_failure(i, &e);
                    let text = format!("the IKE SA is up but its CHILD SA failed: {e}");
                    self.log_failure(i, &text, now);
                }
                Action::Failed(e) => self.failed(i, e, now),
            }
        }
        self.note_established(i, slot);
    }

    fn send(&mut self, i: usize, slot: usize, bytes: &[u8]) {
        let Some(s) = self.peers[i].slots.get(slot) else {
            return;
        };
        let (via, to) = (s.via, s.to);
        let result = match via {
            Via::Ike => {
                let family_v6 = to.is_ipv6();
                let socket = self
                    .ike_sockets
                    .iter()
                    .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6() == family_v6));
                match socket {
                    Some(socket) => socket.send_to(bytes, to).map(|_| ()),
                    None => Err(std::io::Error::other("no IKE socket of this family")),
                }
            }
            Via::NatT => {
                let socket = if to.is_ipv6() {
                    self.sockets.v6.as_ref()
                } else {
                    self.sockets.v4.as_ref()
                };
                let mut framed = Vec::with_capacity(NON_ESP_MARKER.len() + bytes.len());
                framed.extend_from_slice(&NON_ESP_MARKER);
                framed.extend_from_slice(bytes);
                match socket {
                    Some(socket) => match socket.send_batch(&[(&framed, to)]) {
                        Ok(r) if r.failed == 0 => Ok(()),
                        Ok(r) => Err(r
                            .last_error
                            .unwrap_or_else(|| std::io::Error::other("not sent"))),
                        Err(e) => Err(e),
                    },
                    None => Err(std::io::Error::other("no NAT-T socket of this family")),
                }
            }
        };
        if let Err(e) = result {
            // Retransmission (RFC 7296 section 2.1) covers a lost send.
            tracing::debug!(peer = %self.peers[i].cfg.name, to = %to, "IKE: send failed: {e}");
        }
    }

    /// A CHILD SA for the key manager: both directions, fresh keys.
    fn install(&mut self, i: usize, slot: usize, child: ChildSa, now: Instant) {
        let p = &mut self.peers[i];
        let spis = ChildStatus {
            inbound_spi: child.inbound_spi,
            outbound_spi: child.outbound_spi,
        };
        let esn = child.esn;
        match build_child(&self.shared, &p.cfg, child) {
            Ok(sas) => {
                p.counters.children_installed += 1;
                tracing::info!(
                    peer = %p.cfg.name,
                    inbound_spi = format_args!("{:#010x}", spis.inbound_spi),
                    outbound_spi = format_args!("{:#010x}", spis.outbound_spi),
                    esn,
                    "IKE: CHILD SA negotiated; installing"
                );
                if let Some(s) = p.slots.get_mut(slot) {
                    s.children.push(spis);
                }
                // A failed send means the main thread is gone: stopping.
                let _ = self.installs.send(sas);
            }
            Err(e) => {
                p.counters.children_failed += 1;
                let text = format!("the CHILD SA could not be built: {e}");
                self.log_failure(i, &text, now);
            }
        }
    }

    fn note_established(&mut self, i: usize, slot: usize) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        if s.established || s.sa.status() != crate::ike::sa::Status::Established {
            return;
        }
        s.established = true;
        p.counters.established += 1;
        p.backoff = RETRY_FIRST;
        let (spi_i, spi_r) = s.sa.spis();
        tracing::info!(
            peer = %p.cfg.name,
            role = role_name(s.sa.role()),
            spi_i = format_args!("{spi_i:016x}"),
            spi_r = format_args!("{spi_r:016x}"),
            suite = s.sa.suite().map(suite_name).unwrap_or_default(),
            "IKE SA established"
        );
        // The newest established IKE SA stands for the peer; older ones
        // are dropped (their CHILD SAs are replaced by the new install).
        // TODO(ike): send an INFORMATIONAL Delete once src/ike has it.
        let keep = s.sa.spis();
        p.slots.retain(|o| !o.established || o.sa.spis() == keep);
        self.publish_keys();
    }

    /// The IKE SA failed: count, log, and for an initiator plan the next
    /// attempt.
    fn failed(&mut self, i: usize, e: IkeError, now: Instant) {
        self.count_failure(i, &e);
        let p = &self.peers[i];
        let text = explain(p, &e);
        self.log_failure(i, &text, now);
        let p = &mut self.peers[i];
        // A stray SA failing next to an established one changes nothing.
        let established = p
            .slots
            .iter()
            .any(|s| s.established && s.sa.status() == crate::ike::sa::Status::Established);
        if p.cfg.ike.initiate && !established {
            p.next_initiate = Some(now + p.backoff);
            tracing::info!(peer = %p.cfg.name, "IKE: initiating again in {:?}", p.backoff);
            p.backoff = (p.backoff * 2).min(RETRY_MAX);
        }
    }

    fn count_failure(&mut self, i: usize, e: &IkeError) {
        count(&mut self.peers[i].counters, e);
    }

    /// Logs a failure, at most once per [`LOG_EVERY`] per peer.
    fn log_failure(&mut self, i: usize, text: &str, now: Instant) {
        let p = &mut self.peers[i];
        p.last_error = Some(text.to_string());
        if p.last_log
            .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
        {
            p.suppressed += 1;
            return;
        }
        let more = std::mem::take(&mut p.suppressed);
        p.last_log = Some(now);
        tracing::warn!(peer = %p.cfg.name, suppressed = more, "IKE: {text}");
    }

    /// Removes closed IKE SAs; makes an initiator with none try again.
    fn reap(&mut self, i: usize, now: Instant) {
        let p = &mut self.peers[i];
        let before = p.slots.len();
        p.slots
            .retain(|s| s.sa.status() != crate::ike::sa::Status::Closed);
        if p.slots.len() != before {
            self.publish_keys();
        }
        let p = &mut self.peers[i];
        let up = p
            .slots
            .iter()
            .any(|s| s.established || s.sa.role() == Role::Initiator);
        if p.cfg.ike.initiate && !up && p.next_initiate.is_none() {
            p.next_initiate = Some(now + p.backoff);
        }
    }

    fn publish(&self, now: Instant) {
        let rows = self
            .peers
            .iter()
            .map(|p| IkePeerStatus {
                peer: p.cfg.name.clone(),
                initiate: p.cfg.ike.initiate,
                local_id: identity_text(&p.cfg.ike.local_id),
                remote_id: identity_text(&p.cfg.ike.remote_id),
                sas: p
                    .slots
                    .iter()
                    .map(|s| {
                        let (spi_i, spi_r) = s.sa.spis();
                        IkeSaStatus {
                            role: role_name(s.sa.role()).into(),
                            state: match s.sa.status() {
                                crate::ike::sa::Status::Connecting => "connecting",
                                crate::ike::sa::Status::Established => "established",
                                crate::ike::sa::Status::Closed => "closed",
                            }
                            .into(),
                            spi_i: format!("{spi_i:016x}"),
                            spi_r: format!("{spi_r:016x}"),
                            age_secs: now.saturating_duration_since(s.created).as_secs(),
                            remote: s.to.to_string(),
                            suite: s.sa.suite().map(suite_name),
                            children: s.children.clone(),
                        }
                    })
                    .collect(),
                counters: p.counters.clone(),
                last_error: p.last_error.clone(),
            })
            .collect();
        *self.ike.status.lock().unwrap_or_else(|p| p.into_inner()) = rows;
    }

    /// The established IKE SAs' keys, for `esptun wireshark-keys`.
    fn publish_keys(&self) {
        let records = self
            .peers
            .iter()
            .flat_map(|p| p.slots.iter())
            .filter(|s| s.established)
            .filter_map(|s| wireshark_record(&s.sa))
            .collect();
        *self.ike.keys.lock().unwrap_or_else(|p| p.into_inner()) = records;
    }
}

/// Counts a failure by its kind.
fn count(c: &mut IkeCounters, e: &IkeError) {
    match e {
        IkeError::WeRefused(n) | IkeError::PeerRefused(n) => match n {
            ErrorNotify::AuthenticationFailed => c.auth_failures += 1,
            ErrorNotify::NoProposalChosen => c.proposal_mismatches += 1,
            ErrorNotify::TsUnacceptable => c.ts_unacceptable += 1,
            _ => c.other_failures += 1,
        },
        IkeError::Timeout => c.timeouts += 1,
        _ => c.other_failures += 1,
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Initiator => "initiator",
        Role::Responder => "responder",
    }
}

fn encr_name(e: Encr) -> &'static str {
    match e {
        Encr::AesGcm16_128 => "aes128gcm16",
        Encr::AesGcm16_256 => "aes256gcm16",
    }
}

fn suite_name(s: crate::ike::proposal::IkeSuite) -> String {
    use crate::ike::crypto::{DhGroup, Prf};
    let prf = match s.prf {
        Prf::HmacSha256 => "prfsha256",
        Prf::HmacSha384 => "prfsha384",
        Prf::HmacSha512 => "prfsha512",
    };
    let dh = match s.dh {
        DhGroup::Curve25519 => "x25519",
        DhGroup::Ecp256 => "ecp256",
    };
    format!("{}-{prf}-{dh}", encr_name(s.encr))
}

/// What a failure means for the operator; never a secret.
fn explain(p: &PeerIke, e: &IkeError) -> String {
    let ids = format!(
        "our local_id {}, expected remote_id {}",
        identity_text(&p.cfg.ike.local_id),
        identity_text(&p.cfg.ike.remote_id)
    );
    match e {
        IkeError::WeRefused(ErrorNotify::AuthenticationFailed) => format!(
            "authentication failed: the peer's AUTH does not verify with our PSK, or its \
             identity is not the remote_id we expect ({ids}); check that both hosts use the \
             same psk_file contents and matching identities"
        ),
        IkeError::PeerRefused(ErrorNotify::AuthenticationFailed) => format!(
            "the peer refused our authentication (AUTHENTICATION_FAILED): the PSKs differ, or \
             the peer expects another identity than ours ({ids})"
        ),
        IkeError::WeRefused(ErrorNotify::NoProposalChosen)
        | IkeError::PeerRefused(ErrorNotify::NoProposalChosen) => {
            let (ike, esp) = (&p.ike.ike, &p.ike.esp);
            format!(
                "no proposal in common (NO_PROPOSAL_CHOSEN, {}): we allow IKE encryption {:?}, \
                 PRF {:?}, DH {:?} and ESP {:?} (ESN {:?}); make ike_proposals and \
                 esp_proposals overlap on both hosts",
                if matches!(e, IkeError::WeRefused(_)) {
                    "we refused the peer's"
                } else {
                    "the peer refused ours"
                },
                ike.encr,
                ike.prf,
                ike.dh,
                esp.encr,
                esp.esn
            )
        }
        IkeError::Timeout => format!(
            "no answer from the peer at {} after every retransmission: is esptun running \
             there with [peer.ike] for us, and are UDP 500/4500 open between the hosts?",
            p.initiate_via.1
        ),
        other => format!("the IKE SA failed: {other}"),
    }
}

/// A [`PeerSas`] from a CHILD SA. The outbound SA gets its whole sequence
/// space at once, with no durable reservation: a CHILD SA's keys are new
/// (KEYMAT from fresh nonces and, here, a fresh IKE SA: RFC 7296 section
/// 2.17) and die with the process, so no (key, nonce) pair of it can be
/// used again after a restart (RFC 4106 section 2: the nonce must never
/// repeat under one key). Manual keys keep their reservations.
pub(crate) fn build_child(
    shared: &Shared,
    peer: &IkePeer,
    child: ChildSa,
) -> Result<PeerSas, crate::sa::SaError> {
    let inner = InnerAddrs::new(peer.inner_local, peer.inner_remote)?;
    // ESP AES-GCM as negotiated: the 16-byte ICV (ENCR_AES_GCM_16, RFC
    // 4106 section 8).
    let icv = IcvLen::Icv16;
    let keys = SaKeys::new(&shared.selector, &child.inbound, icv)?;
    let sa = InboundSa::new(child.inbound_spi, keys, child.esn, inner, DEFAULT_WINDOW)?;
    let inbound = NewInbound {
        sa,
        fp: Fingerprint::new(&child.inbound),
    };
    let keys = SaKeys::new(&shared.selector, &child.outbound, icv)?;
    let mut sa = OutboundSa::new(child.outbound_spi, keys, child.esn, inner)?;
    sa.set_ceiling(hard_limit(child.esn));
    let material = child.outbound;
    // The configured endpoint, as for manual keys (raw ESP has no port).
    let endpoint = SocketAddr::new(peer.endpoint, shared.outer.port().unwrap_or(0));
    Ok(PeerSas {
        peer: peer.name.clone(),
        endpoint,
        outbound: Some(NewOutbound {
            sa,
            material,
            key_file: None,
            // Nothing to claim: see above. The outbound thread claims and
            // tops up reservations only for SAs not marked claimed, and its
            // top-up skips an SA whose ceiling is the hard limit.
            claimed: true,
        }),
        inbound: Some(inbound),
    })
}

/// One line of Wireshark's IKEv2 decryption table (the
/// `ikev2_decryption_table` UAT of epan/dissectors/packet-isakmp.c, in
/// the form strongSwan's save-keys plugin writes): SPIi and SPIr as 16
/// hex digits, SK_ei and SK_er in hex, the encryption algorithm's name in
/// quotes, SK_ai and SK_ar in hex, the integrity algorithm's name in
/// quotes. For AES-GCM SK_e* is key || salt (RFC 5282 section 7.1) and
/// there are no integrity keys (section 8): SK_a* are empty and the
/// integrity algorithm is "NONE [RFC4306]".
fn wireshark_record(sa: &IkeSa) -> Option<Zeroizing<String>> {
    let keys = sa.keys()?;
    let (spi_i, spi_r) = sa.spis();
    let encr = match keys.encr {
        Encr::AesGcm16_128 => "AES-GCM-128 with 16 octet ICV [RFC5282]",
        Encr::AesGcm16_256 => "AES-GCM-256 with 16 octet ICV [RFC5282]",
    };
    let ei = Zeroizing::new(crate::hex::encode(&keys.sk_ei));
    let er = Zeroizing::new(crate::hex::encode(&keys.sk_er));
    // Built in place, never through a temporary that would keep a copy
    // of the keys.
    let mut line = Zeroizing::new(String::with_capacity(160 + ei.len() + er.len()));
    line.push_str(&format!("{spi_i:016x},{spi_r:016x},"));
    line.push_str(&ei);
    line.push(',');
    line.push_str(&er);
    line.push_str(&format!(",\"{encr}\",,,\"NONE [RFC4306]\""));
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ike::wire::consts::id;
    use crate::ike::wire::payload::Identification;

    fn config(local: [u8; 4], remote: [u8; 4], psk: &[u8]) -> Arc<IkeConfig> {
        Arc::new(IkeConfig {
            local_id: Identification::new(id::IPV4_ADDR, local.to_vec()),
            remote_id: Some(Identification::new(id::IPV4_ADDR, remote.to_vec())),
            psk: Zeroizing::new(psk.to_vec()),
            ike: Default::default(),
            esp: Default::default(),
            local_addr: local.into(),
            remote_addr: remote.into(),
            retransmit: Default::default(),
        })
    }

    const PSK: &[u8] = b"a shared key, long enough";

    /// Runs IKE_SA_INIT and IKE_AUTH in memory; both SAs afterwards, with
    /// the failures each side reported.
    fn run(a_cfg: Arc<IkeConfig>, b_cfg: Arc<IkeConfig>) -> [(IkeSa, Vec<IkeError>); 2] {
        let mut rng = SystemRandomness::new();
        let now = Instant::now();
        let (mut a, mut to_b) = IkeSa::initiate(a_cfg, now, &mut rng).expect("initiate");
        let mut b = IkeSa::responder(b_cfg);
        let (mut a_failed, mut b_failed) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            let mut to_a = Vec::new();
            for action in to_b.drain(..) {
                if let Action::Send(bytes) = action {
                    to_a.extend(b.handle(&bytes, now, &mut rng).unwrap_or_default());
                }
            }
            for action in to_a {
                match action {
                    Action::Send(bytes) => {
                        to_b.extend(a.handle(&bytes, now, &mut rng).unwrap_or_default())
                    }
                    Action::Failed(e) => b_failed.push(e),
                    _ => {}
                }
            }
            for action in &to_b {
                if let Action::Failed(e) = action {
                    a_failed.push(*e);
                }
            }
        }
        [(a, a_failed), (b, b_failed)]
    }

    fn exchange(psk_b: &[u8]) -> (IkeSa, IkeSa) {
        let a_cfg = config([198, 18, 0, 1], [198, 18, 0, 2], PSK);
        let b_cfg = config([198, 18, 0, 2], [198, 18, 0, 1], psk_b);
        let [(a, _), (b, _)] = run(a_cfg, b_cfg);
        (a, b)
    }

    /// A peer as the IKE thread holds it, for [`explain`].
    fn peer(cfg: &Arc<IkeConfig>) -> PeerIke {
        let remote_id = cfg.remote_id.clone().expect("a remote id");
        PeerIke {
            cfg: IkePeer {
                name: "b".into(),
                local: cfg.local_addr,
                endpoint: cfg.remote_addr,
                inner_local: cfg.local_addr,
                inner_remote: cfg.remote_addr,
                ike: crate::config::IkeSettings {
                    psk_file: "/etc/esptun/b.psk".into(),
                    local_id: cfg.local_id.clone(),
                    remote_id,
                    initiate: true,
                    ike: cfg.ike.clone(),
                    esp: cfg.esp.clone(),
                    ike_rekey: Duration::from_secs(14400),
                    child_rekey: Duration::from_secs(3600),
                    liveness: Duration::from_secs(30),
                },
            },
            ike: cfg.clone(),
            initiate_via: (Via::NatT, SocketAddr::new(cfg.remote_addr, 4500)),
            slots: Vec::new(),
            next_initiate: None,
            backoff: RETRY_FIRST,
            counters: IkeCounters::default(),
            last_error: None,
            last_log: None,
            suppressed: 0,
        }
    }

    #[test]
    fn an_identity_mismatch_and_disjoint_proposals_are_explained_without_secrets() {
        // b expects a at another identity: both sides fail authentication.
        let a_cfg = config([198, 18, 0, 1], [198, 18, 0, 2], PSK);
        let b_cfg = config([198, 18, 0, 2], [198, 18, 0, 9], PSK);
        let [(_, a_failed), (_, b_failed)] = run(a_cfg.clone(), b_cfg.clone());
        assert_eq!(
            a_failed,
            [IkeError::PeerRefused(ErrorNotify::AuthenticationFailed)]
        );
        assert_eq!(
            b_failed,
            [IkeError::WeRefused(ErrorNotify::AuthenticationFailed)]
        );
        let b_text = explain(&peer(&b_cfg), &b_failed[0]);
        assert!(
            b_text.contains("expected remote_id 198.18.0.9") && b_text.contains("psk_file"),
            "{b_text}"
        );
        let a_text = explain(&peer(&a_cfg), &a_failed[0]);
        assert!(a_text.contains("our local_id 198.18.0.1"), "{a_text}");
        for t in [&a_text, &b_text] {
            assert!(!t.contains("shared key"), "a secret in {t}");
        }

        // No IKE encryption in common: NO_PROPOSAL_CHOSEN on both sides.
        let mut only_128 = (*a_cfg).clone();
        only_128.ike.encr = vec![Encr::AesGcm16_128];
        let mut only_256 = (*config([198, 18, 0, 2], [198, 18, 0, 1], PSK)).clone();
        only_256.ike.encr = vec![Encr::AesGcm16_256];
        let (a_cfg, b_cfg) = (Arc::new(only_128), Arc::new(only_256));
        let [(_, a_failed), (_, b_failed)] = run(a_cfg.clone(), b_cfg.clone());
        assert_eq!(
            a_failed,
            [IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
        );
        assert_eq!(
            b_failed,
            [IkeError::WeRefused(ErrorNotify::NoProposalChosen)]
        );
        let mut counters = IkeCounters::default();
        count(&mut counters, &b_failed[0]);
        assert_eq!(counters.proposal_mismatches, 1);
        let text = explain(&peer(&b_cfg), &b_failed[0]);
        assert!(
            text.contains("no proposal in common") && text.contains("AesGcm16_256"),
            "{text}"
        );
    }

    #[test]
    fn both_ends_print_the_same_wireshark_record() {
        let (a, b) = exchange(PSK);
        let ra = wireshark_record(&a).expect("a has keys");
        let rb = wireshark_record(&b).expect("b has keys");
        assert_eq!(ra.as_str(), rb.as_str());
        let fields: Vec<&str> = ra.split(',').collect();
        let (spi_i, spi_r) = a.spis();
        assert_eq!(fields.len(), 8, "{}", ra.as_str());
        assert_eq!(fields[0], format!("{spi_i:016x}"));
        assert_eq!(fields[1], format!("{spi_r:016x}"));
        // AES-256 key and 4-byte salt, in hex; the two directions differ.
        assert_eq!((fields[2].len(), fields[3].len()), (72, 72));
        assert_ne!(fields[2], fields[3]);
        assert_eq!(fields[4], "\"AES-GCM-256 with 16 octet ICV [RFC5282]\"");
        assert_eq!((fields[5], fields[6]), ("", ""));
        assert_eq!(fields[7], "\"NONE [RFC4306]\"");
    }

    #[test]
    fn a_wrong_psk_fails_both_sides_as_authentication_failures() {
        let (a, b) = exchange(b"another key, also long enough");
        assert_eq!(a.status(), crate::ike::sa::Status::Closed);
        assert_eq!(b.status(), crate::ike::sa::Status::Closed);
        let mut counters = IkeCounters::default();
        for e in [
            IkeError::WeRefused(ErrorNotify::AuthenticationFailed),
            IkeError::PeerRefused(ErrorNotify::AuthenticationFailed),
            IkeError::PeerRefused(ErrorNotify::NoProposalChosen),
            IkeError::Timeout,
        ] {
            count(&mut counters, &e);
        }
        assert_eq!(counters.auth_failures, 2);
        assert_eq!(counters.proposal_mismatches, 1);
        assert_eq!(counters.timeouts, 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let shared = Arc::new(IkeShared::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let queue = IkeQueue {
            tx,
            shared: shared.clone(),
        };
        let from = Some(SocketAddr::from(([198, 18, 0, 2], 4500)));
        queue.offer(&[0, 0, 0, 0, 1, 2, 3], from);
        queue.offer(&[0, 0, 0, 0, 4, 5, 6], from);
        assert_eq!(shared.queue_drops.load(Ordering::Relaxed), 1);
        let first = rx.try_recv().expect("the first is queued");
        assert_eq!(first.bytes, [1, 2, 3], "the marker is removed");
        // Nothing to hand over without a source or a whole marker.
        queue.offer(&[0, 0, 0, 0, 7], None);
        queue.offer(&[0, 0], from);
        assert!(rx.try_recv().is_err());
        assert_eq!(shared.queue_drops.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn suites_read_as_configured() {
        use crate::ike::crypto::{DhGroup, Prf};
        let s = crate::ike::proposal::IkeSuite {
            encr: Encr::AesGcm16_256,
            prf: Prf::HmacSha256,
            dh: DhGroup::Curve25519,
        };
        assert_eq!(suite_name(s), crate::config::ike::DEFAULT_IKE_PROPOSAL);
    }
}
