//! The IKE thread: the IKE SAs of the peers keyed by IKE
//! ([`crate::config::IkePeer`]), driven by the sans-IO [`IkeSa`].
//!
//! One thread owns every `IkeSa`. It reads IKE messages from its own UDP
//! 500 socket(s); with raw ESP also from its own UDP 4500 socket(s), for
//! IKE only (behind the non-ESP marker; keepalives ignored, ESP in UDP
//! dropped and counted as `ike.natt_non_ike`), because a peer supporting
//! NAT-T may move IKE there without a NAT (strongSwan does whenever it
//! could use MOBIKE, RFC 4555 section 3.2) while ESP stays raw; and with
//! `outer = "udp"` from the inbound datapath, which hands
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
//! Each IKE SA runs on the peer's [`Policy`]: `child_rekey_secs`,
//! `ike_rekey_secs` (hard lifetimes a fifth later), `liveness_secs`, and
//! INITIAL_CONTACT on our first IKE SA with the peer since we started.
//! What it decides reaches the main thread as [`ChildUpdate`]s, in order
//! on one channel: a rekeyed CHILD SA's install comes before the delete of
//! its predecessor, so the key manager can make before it breaks
//! ([`crate::sa::keymgr::KeyManager::delete`]). ESP from the peer counts
//! as a sign of life ([`IkeSa::peer_seen`]): the inbound SAs' packet
//! counts, which the inbound thread publishes anyway, are compared at each
//! status publication, so the datapath does nothing extra.
//!
//! Why a thread of its own rather than the main loop, which owns the key
//! manager: the main loop sleeps in a signal wait and runs reloads that
//! wait seconds for the datapath, and IKE must answer a peer's
//! retransmission promptly whatever a reload does. The key manager stays
//! the main thread's alone: new CHILD SAs reach it over a channel, and it
//! installs them on its next tick (at most 100 ms later).
//!
//! One IKE SA stands for a peer: another that comes up (both sides
//! initiated, or the peer connected again) is deleted with an
//! INFORMATIONAL Delete (RFC 7296 section 1.4.1), both sides choosing the
//! same one (`survivor`), and only the survivor's CHILD SA reaches the key
//! manager. When the daemon stops, each established IKE SA is deleted the
//! same way, the answers awaited for at most `STOP_WAIT`.
//!
//! NAT traversal (RFC 7296 section 2.23, RFC 3948) is the sans-IO IKE SA's
//! ([`crate::ike::sa`]'s `nat` module): this thread gives it the addresses
//! of each message (our peer's configured `local`, at port 500 or the
//! NAT-T port; the source), sends each [`Output`] on its route, sends the
//! keepalives it asks for unless ESP went to the peer since the last one
//! (RFC 3948 section 4; the outbound SAs' published packet counts tell),
//! and turns `PeerMoved` into a
//! [`ChildUpdate::Endpoint`]. A CHILD SA with `udp_encap` goes to the key
//! manager with that endpoint and its inner addresses from the traffic
//! selectors. The datapath carries one outer mode: with raw ESP the port
//! 4500 sockets carry IKE only, so an IKE SA that detects a NAT is
//! dropped, logged ("NAT traversal needs outer = \"udp\"") and counted. `force_encap`
//! reports an unspecified address of ours in IKE_SA_INIT, so the NAT
//! detection hash matches nothing and both sides use NAT-T.
//!
//! New IKE_SA_INIT requests pass one [`CookieGate`] (RFC 7296 section
//! 2.6) before a responder is made: above the threshold it answers with a
//! COOKIE and keeps nothing; half-open responders it gives up are dropped.
//!
//! Time is read here, at the edge (`Instant::now()`), and randomness comes
//! from the OS ([`SystemRandomness`], ring's `SystemRandom`).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::shared::Shared;
use super::workers::Sockets;
use crate::config::IkePeer;
use crate::config::ike::{identity_text, load_psk};
use crate::ike::cookie::{CookieGate, CookiePolicy, Verdict};
use crate::ike::crypto::SystemRandomness;
use crate::ike::sa::{
    Action, ChildSa, ChildState, Config as IkeConfig, IkeError, IkeSa, NATT_PORT, NatPolicy,
    Output, Policy, Retransmit, Role, Route,
};
use crate::ike::wire::consts::exchange;
use crate::ike::wire::{Header, IkeHeader};
use crate::io::ike_socket::{IKE_PORT, IkeSocket, MAX_MESSAGE};
use crate::sa::keymgr::PeerSas;
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
/// On stop, how long the IKE thread waits for the answers to its Deletes
/// (RFC 7296 section 1.4.1) before it exits regardless: the peer acts on
/// the request, the answer only spares a retransmission, and a stop must
/// stay prompt.
const STOP_WAIT: Duration = Duration::from_secs(1);
/// Two IKE SAs with a peer count as set up at once (both sides initiated)
/// when the newer was created at most this long after the older came up:
/// the responder creates its slot only when the IKE_SA_INIT arrives, which
/// after a lost first request is a retransmission (RFC 7296 section 2.1:
/// seconds) later than the initiator did, and both sides must agree.
const SETUP_RACE: Duration = Duration::from_secs(10);

/// A change the IKE thread asks of the key manager (the main thread's),
/// applied in the order sent.
pub(crate) enum ChildUpdate {
    /// A new CHILD SA, or a rekeyed one replacing the peer's running SAs
    /// (make-before-break).
    Install(Box<PeerSas>),
    /// Remove the CHILD SA with these SPIs (an IKE Delete, a hard
    /// lifetime, its IKE SA's end).
    Delete {
        peer: String,
        inbound_spi: u32,
        outbound_spi: u32,
    },
    /// The peer restarted (INITIAL_CONTACT, RFC 7296 section 2.4): every
    /// SA it had with us is stale and goes at once.
    Flush { peer: String, endpoint: SocketAddr },
    /// The peer's NAT mapping changed: its SAs' ESP goes to this address
    /// ([`crate::sa::keymgr::KeyManager::update_endpoint`]).
    Endpoint { peer: String, endpoint: SocketAddr },
}

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
/// and CHILD SA keys for `esptun wireshark-keys`, and the queue's drop
/// count.
#[derive(Default)]
pub(crate) struct IkeShared {
    pub queue_drops: AtomicU64,
    /// With raw ESP: datagrams on our IKE-only UDP 4500 sockets that were
    /// neither IKE (non-ESP marker) nor a keepalive, i.e. ESP in UDP,
    /// which raw mode has no SA for: dropped.
    pub natt_non_ike: AtomicU64,
    pub status: Mutex<Vec<IkePeerStatus>>,
    pub cookies: Mutex<CookieCounters>,
    /// One `ikev2_decryption_table` record per established IKE SA.
    pub keys: Mutex<Vec<Zeroizing<String>>>,
    /// Per peer (by name, every IKE peer): one Wireshark `esp_sa` record
    /// per direction of each CHILD SA its IKE SAs hold.
    pub esp_keys: Mutex<Vec<(String, Vec<Zeroizing<String>>)>>,
}

impl IkeShared {
    pub fn snapshot(&self) -> IkeStatus {
        IkeStatus {
            queue_drops: self.queue_drops.load(Ordering::Relaxed),
            natt_non_ike: self.natt_non_ike.load(Ordering::Relaxed),
            cookies: self
                .cookies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
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

    /// The CHILD SA keys as Wireshark's ESP SA table: for each IKE peer a
    /// comment line `# peer NAME: N record(s)`, then its records, one a
    /// line.
    pub fn esp_key_records(&self) -> Zeroizing<String> {
        let peers = self.esp_keys.lock().unwrap_or_else(|p| p.into_inner());
        let size = peers
            .iter()
            .map(|(name, r)| 32 + name.len() + r.iter().map(|k| k.len() + 1).sum::<usize>())
            .sum();
        // Sized once, so that no reallocation leaves a copy of a key behind.
        let mut out = Zeroizing::new(String::with_capacity(size));
        for (name, records) in peers.iter() {
            out.push_str(&format!("# peer {name}: {} record(s)\n", records.len()));
            for r in records {
                out.push_str(r);
                out.push('\n');
            }
        }
        out
    }
}

mod explain;
mod keys;
mod status;
#[cfg(test)]
mod tests;

use explain::{count, explain, role_name, suite_name};
use keys::{build_child, peer_esp_sa_records, wireshark_record};

pub use status::{
    ChildStatus, CookieCounters, IkeCounters, IkePeerStatus, IkeSaStatus, IkeStatus, NatSaStatus,
};

/// How a message arrived, and so how an answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Port 500, no marker.
    Ike,
    /// The NAT-T socket (with raw ESP, our IKE-only port 4500 socket),
    /// with the non-ESP marker.
    NatT,
}

/// One IKE SA and what the daemon knows around it.
struct Slot {
    sa: IkeSa,
    /// Where the peer was last heard (status only: the IKE SA routes).
    to: SocketAddr,
    keepalives: u64,
    created: Instant,
    established: bool,
    /// When it was first established (`note_established`): tells two IKE
    /// SAs set up at once from a later one replacing an earlier.
    up_at: Option<Instant>,
    /// Our Delete of it is out (RFC 7296 section 1.4.1): it stays until
    /// the answer, or the retransmissions running out, closes it.
    closing: bool,
    /// Its outbound CHILD SAs' packet counts at the last NAT keepalive
    /// decision (SPI, packets): a count that grew is ESP sent since.
    out_packets: Vec<(u32, u64)>,
    /// Rekeys (IKE, CHILD) already added to the peer's counters.
    rekeys_counted: (u32, u32),
    /// The IKE SA rekey failure already counted and logged.
    rekey_failure: Option<IkeError>,
    /// Left without a CHILD SA: deleted once its outstanding request (the
    /// Delete of the refused CHILD SA) is answered ([`IkeWorker::close_idle`]).
    close_when_idle: bool,
}

impl Slot {
    fn new(sa: IkeSa, to: SocketAddr, now: Instant) -> Slot {
        Slot {
            sa,
            to,
            keepalives: 0,
            created: now,
            established: false,
            up_at: None,
            closing: false,
            out_packets: Vec::new(),
            rekeys_counted: (0, 0),
            rekey_failure: None,
            close_when_idle: false,
        }
    }

    /// Established and not being deleted: one that stands for the peer.
    fn live(&self) -> bool {
        self.established && !self.closing && self.sa.status() == crate::ike::sa::Status::Established
    }
}

/// One peer's IKE state.
struct PeerIke {
    cfg: IkePeer,
    ike: Arc<IkeConfig>,
    /// Lifetimes and liveness for each new IKE SA.
    policy: Policy,
    /// An IKE SA with the peer was established since we started: later
    /// ones send no INITIAL_CONTACT.
    contacted: bool,
    /// The CHILD SA last handed to the key manager (inbound, outbound
    /// SPI): the one it wants for the peer.
    current: Option<(u32, u32)>,
    /// The keys of the peer's live CHILD SAs, for [`IkeWorker::reinstate`].
    kept: Vec<ChildSa>,
    /// Where an initiator sends: the NAT-T port when the outer mode is
    /// UDP (RFC 7296 section 2.23 allows starting there), else port 500
    /// (also with `force_encap`, so that NAT detection moves it).
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
    /// With raw ESP: our UDP 4500 sockets, for IKE only (a peer that
    /// supports NAT-T may move IKE there without a NAT, RFC 7296 section
    /// 2.23, as strongSwan does whenever it could use MOBIKE, RFC 4555
    /// section 3.2; ESP stays raw then). Empty with `outer = "udp"`, whose
    /// NAT-T socket is the datapath's.
    natt_sockets: Vec<IkeSocket>,
    /// When a non-IKE datagram on `natt_sockets` was last logged.
    natt_non_ike_logged: Option<Instant>,
    queue: Receiver<IkeDatagram>,
    installs: Sender<ChildUpdate>,
    peers: Vec<PeerIke>,
    /// Inbound CHILD SAs' packet counts at the last look (SPI, packets):
    /// a count that grew is ESP from the peer.
    inbound_packets: Vec<(u32, u64)>,
    rng: SystemRandomness,
    /// RFC 7296 section 2.6: cookies and the half-open table, for every
    /// responder.
    gate: Option<CookieGate>,
    cookies: CookieCounters,
    /// Our NAT-T port (the outer UDP port, or 4500 with raw ESP, where
    /// `natt_sockets` listen).
    natt_port: u16,
    /// Messages from addresses that are no peer's, and when last logged.
    unknown: u64,
    unknown_logged: Option<Instant>,
    /// The daemon stops (`delete_all`): nothing waits for
    /// the inbound thread any more.
    stopping: bool,
}

/// The IKE side of `Daemon::start`, made before anything on the system
/// changes: the port 500 sockets (with `outer = "udp"` the NAT-T socket is
/// the datapath's; with raw ESP, IKE-only port 4500 sockets too) and each
/// peer's configuration with its PSK, read once.
pub(crate) struct Setup {
    sockets: Vec<IkeSocket>,
    natt_sockets: Vec<IkeSocket>,
    peers: Vec<(IkePeer, IkeConfig)>,
}

/// The IKE thread, ready to start, and what the other threads take.
pub(crate) struct Wired {
    /// For the inbound thread (NAT-T only).
    pub queue: Option<IkeQueue>,
    pub worker: IkeWorker,
    /// For the main thread, which owns the key manager.
    pub installs: Receiver<ChildUpdate>,
}

impl Setup {
    /// `None` without peers keyed by IKE.
    pub fn open(config: &crate::config::Config) -> Result<Option<Setup>, super::DaemonError> {
        if config.ike_peers.is_empty() {
            return Ok(None);
        }
        let sockets = open_sockets(&config.ike_peers, IKE_PORT, config.outer.fwmark)?;
        // Port 4500 is above 1024: binding it needs no capability.
        let natt_sockets = if config.outer.encap.is_udp() {
            Vec::new()
        } else {
            open_sockets(&config.ike_peers, NATT_PORT, config.outer.fwmark)?
        };
        let mut peers = Vec::with_capacity(config.ike_peers.len());
        for peer in &config.ike_peers {
            let ike = ike_config(peer).map_err(|source| super::DaemonError::Psk {
                peer: peer.name.clone(),
                source,
            })?;
            peers.push((peer.clone(), ike));
        }
        Ok(Some(Setup {
            sockets,
            natt_sockets,
            peers,
        }))
    }

    /// Has the inbound pipeline hand over IKE on the NAT-T port, and
    /// builds the IKE thread's worker.
    pub fn wire(
        self,
        shared: &Arc<Shared>,
        sockets: &Arc<Sockets>,
        pipeline: &mut crate::datapath::inbound::Inbound,
    ) -> Wired {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        pipeline.ike_handler = sockets.encap.is_udp();
        let queue = pipeline.ike_handler.then(|| IkeQueue {
            tx,
            shared: shared.ike.clone(),
        });
        let (installs_tx, installs) = std::sync::mpsc::channel();
        let mut worker = IkeWorker::new(
            shared.clone(),
            shared.ike.clone(),
            sockets.clone(),
            self.sockets,
            rx,
            installs_tx,
            self.peers,
        );
        worker.natt_sockets = self.natt_sockets;
        Wired {
            queue,
            worker,
            installs,
        }
    }
}

/// Opens the IKE sockets on `port` the IKE peers need (one per family).
/// How long a message that goes with a new CHILD SA waits for the inbound
/// thread to hold it: the main thread's tick (100 ms) and the inbound
/// thread's publication (200 ms) with room to spare, well inside a peer's
/// first retransmission (strongSwan: 4 s).
const INSTALL_WAIT: Duration = Duration::from_millis(1500);

fn open_sockets(
    peers: &[IkePeer],
    port: u16,
    fwmark: u32,
) -> Result<Vec<IkeSocket>, crate::io::IoSetupError> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if peers.iter().any(|p| p.endpoint.is_ipv6() == v6) {
            out.push(IkeSocket::open(v6, port, Some(fwmark))?);
        }
    }
    Ok(out)
}

/// What a datagram on a port 4500 socket is (RFC 3948 section 2).
#[derive(Debug, PartialEq, Eq)]
enum NattDatagram<'a> {
    /// IKE, the non-ESP marker removed.
    Ike(&'a [u8]),
    /// A NAT-keepalive.
    Keepalive,
    /// ESP in UDP (or junk).
    Other,
}

fn classify_natt(data: &[u8]) -> NattDatagram<'_> {
    match data {
        [0xff] => NattDatagram::Keepalive,
        _ => match data.strip_prefix(&NON_ESP_MARKER[..]) {
            Some(ike) => NattDatagram::Ike(ike),
            None => NattDatagram::Other,
        },
    }
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
        retransmit: retransmit(peer.ike.liveness),
    })
}

/// The retransmission schedule follows `liveness_secs`: a liveness check
/// that goes unanswered through every retransmission declares the peer
/// dead (RFC 7296 section 2.4), so a short interval also means giving up
/// sooner. The default 30 s keeps section 2.1's usual 2 s doubling to 32 s
/// (about a minute and a half); 2 s gives up after about 15 s.
pub(crate) fn retransmit(liveness: Duration) -> Retransmit {
    let base = Retransmit::default();
    Retransmit {
        initial: (liveness / 4).clamp(Duration::from_millis(250), base.initial),
        max_interval: (liveness * 2).clamp(Duration::from_secs(1), base.max_interval),
        transmissions: base.transmissions,
    }
}

/// The [`Policy`] of a peer's IKE SAs. The hard lifetimes come a fifth
/// after the rekey times, which leave up to 10% jitter (section 2.8.1's
/// collisions): time for a rekey to finish, even retransmitted.
pub(crate) fn policy(peer: &IkePeer) -> Policy {
    let s = &peer.ike;
    Policy {
        child_rekey: Some(s.child_rekey),
        child_hard: Some(s.child_rekey + s.child_rekey / 5),
        ike_rekey: Some(s.ike_rekey),
        ike_hard: Some(s.ike_rekey + s.ike_rekey / 5),
        liveness: Some(s.liveness),
        ..Policy::default()
    }
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
        installs: Sender<ChildUpdate>,
        peers: Vec<(IkePeer, IkeConfig)>,
    ) -> Self {
        let now = Instant::now();
        let peers = peers
            .into_iter()
            .map(|(cfg, ike)| {
                let initiate_via = match sockets.encap {
                    Encap::Udp { port } if !cfg.ike.force_encap => {
                        (Via::NatT, SocketAddr::new(cfg.endpoint, port))
                    }
                    _ => (Via::Ike, SocketAddr::new(cfg.endpoint, IKE_PORT)),
                };
                PeerIke {
                    next_initiate: cfg.ike.initiate.then_some(now),
                    policy: policy(&cfg),
                    contacted: false,
                    current: None,
                    kept: Vec::new(),
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
            .collect::<Vec<PeerIke>>();
        let policy = CookiePolicy {
            threshold: peers
                .iter()
                .filter_map(|p| p.cfg.ike.cookie_threshold)
                .min()
                .unwrap_or(CookiePolicy::default().threshold),
            ..CookiePolicy::default()
        };
        let mut rng = SystemRandomness::new();
        let gate = match CookieGate::new(policy, now, &mut rng) {
            Ok(g) => Some(g),
            Err(e) => {
                // Without randomness no responder could work either.
                tracing::error!("IKE: no COOKIE secret ({e}): responders unprotected");
                None
            }
        };
        let natt_port = sockets.encap.port().unwrap_or(NATT_PORT);
        IkeWorker {
            shared,
            ike,
            sockets,
            ike_sockets,
            natt_sockets: Vec::new(),
            natt_non_ike_logged: None,
            queue,
            installs,
            peers,
            inbound_packets: Vec::new(),
            rng,
            gate,
            cookies: CookieCounters::default(),
            natt_port,
            unknown: 0,
            unknown_logged: None,
            stopping: false,
        }
    }

    pub fn run(mut self) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut publish_due = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.initiate_due(Instant::now());
            self.step(&mut buf, &mut publish_due, None);
        }
        self.delete_all(&mut buf);
        self.publish(Instant::now());
    }

    /// One turn of the thread: timers, the status, then what arrived
    /// within [`TICK`] (or until `until`).
    fn step(&mut self, buf: &mut [u8], publish_due: &mut Instant, until: Option<Instant>) {
        let now = Instant::now();
        self.timeouts(now);
        if now >= *publish_due {
            self.note_esp(now);
            self.publish(now);
            *publish_due = now + Duration::from_millis(200);
        }
        let wait = self
            .next_deadline()
            .into_iter()
            .chain(until)
            .min()
            .map_or(TICK, |d| d.saturating_duration_since(now).min(TICK));
        let fds: Vec<_> = self
            .ike_sockets
            .iter()
            .chain(&self.natt_sockets)
            .map(|s| s.as_fd())
            .collect();
        let ready = match crate::io::poll_readable(&fds, wait) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("IKE: poll failed: {e}");
                std::thread::sleep(wait);
                return;
            }
        };
        drop(fds);
        let plain = self.ike_sockets.len();
        for i in 0..plain + self.natt_sockets.len() {
            if !ready.is_ready(i) {
                continue;
            }
            // Bounded: a flood cannot keep the thread from its timers.
            for _ in 0..64 {
                let socket = match i.checked_sub(plain) {
                    None => &self.ike_sockets[i],
                    Some(n) => &self.natt_sockets[n],
                };
                match socket.recv_from(buf) {
                    Ok((n, from)) if i < plain => {
                        let bytes = buf[..n].to_vec();
                        self.on_message(&bytes, from, Via::Ike);
                    }
                    Ok((n, from)) => {
                        let bytes = buf[..n].to_vec();
                        self.on_natt_datagram(&bytes, from);
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

    /// The daemon stops: each established IKE SA is deleted (RFC 7296
    /// section 1.4.1: its CHILD SAs go with it), so the peer clears its
    /// SAs now instead of after its dead peer detection, and stops
    /// sending ESP into a tunnel that is gone. Answers are taken for at
    /// most [`STOP_WAIT`]; nothing new is started meanwhile. With
    /// `outer = "udp"` the answers come through the inbound thread, which
    /// is stopping too: then the wait simply runs out.
    fn delete_all(&mut self, buf: &mut [u8]) {
        self.stopping = true;
        let now = Instant::now();
        for i in 0..self.peers.len() {
            for slot in 0..self.peers[i].slots.len() {
                if self.peers[i].slots[slot].live() {
                    self.close_slot(i, slot, now);
                }
            }
            self.reap(i, now);
        }
        let deadline = now + STOP_WAIT;
        let mut publish_due = now;
        while Instant::now() < deadline
            && self.peers.iter().any(|p| p.slots.iter().any(|s| s.closing))
        {
            self.step(buf, &mut publish_due, Some(deadline));
        }
    }

    /// Sends the Delete of the IKE SA in `slot` (RFC 7296 section 1.4.1).
    /// The slot stays, marked closing, until the answer or the end of its
    /// retransmissions closes it; its CHILD SAs go then.
    fn close_slot(&mut self, i: usize, slot: usize, now: Instant) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        s.closing = true;
        let (spi_i, spi_r) = s.sa.spis();
        match s.sa.close(now, &mut self.rng) {
            Ok(actions) => {
                let out = s.sa.outputs(actions);
                p.counters.deletes_sent += 1;
                tracing::info!(
                    peer = %p.cfg.name,
                    spi_i = format_args!("{spi_i:016x}"),
                    spi_r = format_args!("{spi_r:016x}"),
                    "IKE: deleting the IKE SA"
                );
                self.act(i, slot, out, now);
            }
            Err(e) => {
                // Sealing failed (not expected with working crypto): the
                // SA stays as it was; its lifetimes or liveness end it.
                s.closing = false;
                tracing::warn!(peer = %p.cfg.name, "IKE: the Delete could not be sent: {e}");
            }
        }
    }

    /// One datagram on a raw-mode IKE-only port 4500 socket (RFC 3948
    /// section 2): IKE behind the non-ESP marker goes to the IKE SAs, a
    /// NAT-keepalive (one 0xFF byte, section 2.3) is ignored, and anything
    /// else is ESP in UDP, which raw ESP cannot have SAs for: dropped,
    /// counted, logged now and then.
    fn on_natt_datagram(&mut self, data: &[u8], from: SocketAddr) {
        match classify_natt(data) {
            NattDatagram::Ike(bytes) => self.on_message(bytes, from, Via::NatT),
            NattDatagram::Keepalive => {}
            NattDatagram::Other => {
                let total = self.ike.natt_non_ike.fetch_add(1, Ordering::Relaxed) + 1;
                let now = Instant::now();
                if self
                    .natt_non_ike_logged
                    .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
                {
                    self.natt_non_ike_logged = Some(now);
                    tracing::warn!(
                        from = %from,
                        total,
                        "IKE: ESP in UDP on port 4500 but outer = \"esp\" (raw ESP): dropped"
                    );
                }
            }
        }
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
            .chain(self.gate.as_ref().and_then(|g| g.next_timeout()))
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
            let (via, to) = p.initiate_via;
            let local = self.local(i, via, true);
            let nat = self.nat_policy(i);
            let p = &mut self.peers[i];
            match IkeSa::initiate_from(p.ike.clone(), local, to, nat, now, &mut self.rng) {
                Ok((mut sa, out)) => {
                    sa.set_policy(p.slot_policy());
                    tracing::info!(peer = %p.cfg.name, to = %to, "IKE: initiating");
                    p.slots.push(Slot::new(sa, to, now));
                    let slot = p.slots.len() - 1;
                    self.act(i, slot, out, now);
                }
                Err(e) => self.failed(i, e, now),
            }
            self.reap(i, now);
        }
    }

    fn timeouts(&mut self, now: Instant) {
        self.expire_half_open(now);
        for i in 0..self.peers.len() {
            for s in 0..self.peers[i].slots.len() {
                if self.peers[i].slots[s]
                    .sa
                    .next_timeout()
                    .is_some_and(|t| t <= now)
                {
                    let rekeying = |sa: &IkeSa| {
                        sa.children()
                            .iter()
                            .filter(|c| c.state == ChildState::Rekeying)
                            .count()
                    };
                    let before = rekeying(&self.peers[i].slots[s].sa);
                    let actions = self.peers[i].slots[s]
                        .sa
                        .handle_timer_from(now, &mut self.rng);
                    if rekeying(&self.peers[i].slots[s].sa) > before {
                        self.peers[i].counters.child_rekeys_started += 1;
                    }
                    self.act(i, s, actions, now);
                }
            }
            self.reap(i, now);
        }
    }

    /// One received IKE message.
    fn on_message(&mut self, bytes: &[u8], from: SocketAddr, via: Via) {
        let now = Instant::now();
        let header = IkeHeader::new_checked(bytes).and_then(|h| Header::parse(&h));
        let Some(i) = self.peer_of(header.as_ref().ok(), from) else {
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
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                self.peers[i].counters.messages_dropped += 1;
                tracing::debug!(peer = %self.peers[i].cfg.name, "IKE: malformed message dropped: {e}");
                return;
            }
        };
        let local = self.local(i, via, header.exchange == exchange::IKE_SA_INIT);
        // After an IKE SA rekey the old SPIs stay routed to the same SA
        // until its Delete exchange ends (RFC 7296 section 2.18).
        let slot = match self.peers[i].slots.iter().position(|s| {
            s.sa.spis().0 == header.spi_i
                || s.sa.retiring_spis().iter().any(|r| r.0 == header.spi_i)
        }) {
            Some(s) => s,
            None if !header.is_response()
                && header.exchange == exchange::IKE_SA_INIT
                && header.spi_r == 0 =>
            {
                if !self.admit(i, bytes, from, via, now) {
                    return;
                }
                let nat = self.nat_policy(i);
                let p = &mut self.peers[i];
                if p.slots.len() >= SAS_PER_PEER {
                    // The oldest one not established makes room.
                    match p.slots.iter().position(|s| !s.established) {
                        Some(old) => {
                            let gone = p.slots.remove(old);
                            if let Some(g) = self.gate.as_mut() {
                                g.completed(gone.sa.spis().0);
                            }
                        }
                        None => {
                            p.counters.messages_dropped += 1;
                            if let Some(g) = self.gate.as_mut() {
                                g.completed(header.spi_i);
                            }
                            return;
                        }
                    }
                }
                let mut sa = IkeSa::responder(p.ike.clone());
                sa.set_policy(p.slot_policy());
                sa.set_nat_policy(nat);
                p.slots.push(Slot::new(sa, from, now));
                p.slots.len() - 1
            }
            None => {
                let p = &mut self.peers[i];
                p.counters.messages_dropped += 1;
                tracing::debug!(peer = %p.cfg.name, "IKE: message for no IKE SA of ours dropped");
                return;
            }
        };
        let p = &mut self.peers[i];
        let raw = !self.sockets.encap.is_udp();
        let s = &mut p.slots[slot];
        match s.sa.handle_from(bytes, local, from, now, &mut self.rng) {
            Ok(_) if raw && s.sa.use_natt() => {
                // The datapath carries one outer mode: raw ESP has no
                // NAT-T socket, and ESP cannot cross a NAT unencapsulated
                // (RFC 3948 section 1). Refused before anything is sent.
                let nat = s.sa.nat();
                let spi_i = s.sa.spis().0;
                p.slots.remove(slot);
                p.counters.nat_refused += 1;
                if let Some(g) = self.gate.as_mut() {
                    g.completed(spi_i);
                }
                let text = format!(
                    "NAT detected (we are behind one: {}, the peer: {}) but outer = \"esp\": \
                     NAT traversal needs outer = \"udp\"; IKE SA dropped",
                    nat.local_behind, nat.peer_behind
                );
                self.log_failure(i, &text, now);
                let p = &mut self.peers[i];
                if p.cfg.ike.initiate {
                    p.next_initiate = Some(now + p.backoff);
                    p.backoff = (p.backoff * 2).min(RETRY_MAX);
                }
            }
            Ok(out) => {
                if let Some(r) = s.sa.route() {
                    s.to = r.to;
                }
                // The peer deleted the IKE SA (RFC 7296 section 1.4.1):
                // its request closed it.
                if !header.is_response()
                    && header.exchange == exchange::INFORMATIONAL
                    && out.iter().any(|o| matches!(o, Output::Act(Action::Closed)))
                {
                    p.counters.deletes_received += 1;
                    tracing::info!(peer = %p.cfg.name, "IKE: the peer deleted the IKE SA");
                }
                self.act(i, slot, out, now);
            }
            Err(e) => {
                p.counters.messages_dropped += 1;
                tracing::debug!(peer = %p.cfg.name, "IKE: message dropped: {e}");
                // A responder that never got a valid request holds nothing.
                if s.sa.role() == Role::Responder && s.sa.spis().1 == 0 {
                    let spi_i = s.sa.spis().0;
                    p.slots.remove(slot);
                    if let Some(g) = self.gate.as_mut() {
                        g.completed(spi_i);
                    }
                }
            }
        }
        self.reap(i, now);
    }

    /// The peer a message is for: the one whose IKE SA has its SPI (a NAT
    /// may have changed the address it comes from: RFC 7296 section 2.23
    /// lets the IKE SA, which authenticates it, decide), else the one at
    /// its source address, else, for a new IKE_SA_INIT, the first peer
    /// with `any_source` (behind a NAT of unknown address; IKE_AUTH
    /// checks its identity and PSK).
    fn peer_of(&self, header: Option<&Header>, from: SocketAddr) -> Option<usize> {
        let by_spi = header.filter(|h| h.spi_i != 0).and_then(|h| {
            self.peers.iter().position(|p| {
                p.slots.iter().any(|s| {
                    s.sa.spis().0 == h.spi_i || s.sa.retiring_spis().iter().any(|r| r.0 == h.spi_i)
                })
            })
        });
        by_spi
            .or_else(|| self.peers.iter().position(|p| p.cfg.endpoint == from.ip()))
            .or_else(|| {
                let h = header?;
                let init = !h.is_response() && h.exchange == exchange::IKE_SA_INIT && h.spi_r == 0;
                if !init {
                    return None;
                }
                self.peers.iter().position(|p| p.cfg.ike.any_source)
            })
    }

    /// Our address for a message of peer `i` on `via`: the peer's
    /// configured `local`, at port 500 or the NAT-T port. With
    /// `force_encap`, IKE_SA_INIT is told an unspecified address of the
    /// same port instead, so that our NAT detection source hash matches
    /// nothing and both sides see a NAT (strongSwan's `encap = yes`).
    fn local(&self, i: usize, via: Via, init: bool) -> SocketAddr {
        let p = &self.peers[i];
        let port = match via {
            Via::Ike => IKE_PORT,
            Via::NatT => self.natt_port,
        };
        let ip = if init && p.cfg.ike.force_encap {
            match p.cfg.local {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            }
        } else {
            p.cfg.local
        };
        SocketAddr::new(ip, port)
    }

    /// NAT-T for peer `i`'s IKE SAs: our port, and its keepalive
    /// interval (`keepalive_secs`).
    fn nat_policy(&self, i: usize) -> NatPolicy {
        NatPolicy {
            port: self.natt_port,
            keepalive: Some(self.peers[i].cfg.ike.keepalive),
        }
    }

    /// The COOKIE gate's verdict on an IKE_SA_INIT request of peer `i`
    /// that matches no IKE SA: whether to create a responder.
    fn admit(&mut self, i: usize, bytes: &[u8], from: SocketAddr, via: Via, now: Instant) -> bool {
        let Some(gate) = self.gate.as_mut() else {
            return true;
        };
        let demanding = gate.demanding();
        let verdict = gate.check(bytes, from, now, &mut self.rng);
        self.cookies.half_open = gate.half_open() as u64;
        self.cookies.demanding = gate.demanding();
        match verdict {
            Verdict::Accept => {
                if demanding {
                    self.cookies.accepted += 1;
                }
                true
            }
            Verdict::Challenge(answer) => {
                self.cookies.sent += 1;
                tracing::debug!(peer = %self.peers[i].cfg.name, from = %from, "IKE: COOKIE demanded");
                let route = Route {
                    to: from,
                    natt: via == Via::NatT,
                };
                self.send(i, route, &answer);
                false
            }
            Verdict::Drop(why) => {
                self.cookies.refused += 1;
                self.peers[i].counters.messages_dropped += 1;
                tracing::debug!(peer = %self.peers[i].cfg.name, from = %from, "IKE: IKE_SA_INIT refused: {why}");
                false
            }
        }
    }

    /// Gives up the responders the COOKIE gate found half-open too long.
    fn expire_half_open(&mut self, now: Instant) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        if gate.next_timeout().is_none_or(|t| now < t) {
            return;
        }
        let gone = gate.expire(now, &mut self.rng);
        self.cookies.half_open = gate.half_open() as u64;
        self.cookies.demanding = gate.demanding();
        self.cookies.expired += gone.len() as u64;
        for p in &mut self.peers {
            p.slots.retain(|s| {
                s.established || s.sa.role() != Role::Responder || !gone.contains(&s.sa.spis().0)
            });
        }
    }

    /// Carries out an IKE SA's actions, in order. Every `Action` is
    /// handled here: a new kind is one more arm.
    fn act(&mut self, i: usize, mut slot: usize, outputs: Vec<Output>, now: Instant) {
        // A message that goes with a new CHILD SA (our CREATE_CHILD_SA
        // response, or the Delete that follows our rekey) leaves only once
        // the inbound thread holds the new inbound SA: the peer may seal
        // with it the moment it reads the message (the kernel does), and
        // the SA travels through the main thread and the inbound thread's
        // commands first.
        // An IKE SA that just came up as the redundant one of two set up
        // at once (see `survivor`) is deleted right after: its CHILD SA
        // would only displace the survivor's in the key manager.
        // Not when it comes with the peer's INITIAL_CONTACT after a
        // restart: then the others are stale and go (`peer_restarted`).
        let restarted = outputs
            .iter()
            .any(|o| matches!(o, Output::Act(Action::PeerRestarted)))
            && !set_up_alongside(&self.peers[i].slots, slot);
        let redundant = !restarted
            && self.peers[i].slots.get(slot).is_some_and(|s| {
                !s.established && s.sa.status() == crate::ike::sa::Status::Established
            })
            && survivor(&self.peers[i].slots, slot) != slot;
        let outputs: Vec<Output> = if redundant {
            outputs
                .into_iter()
                .filter(|o| !matches!(o, Output::Act(Action::InstallChild(_))))
                .collect()
        } else {
            outputs
        };
        let installs: Vec<u32> = outputs
            .iter()
            .filter_map(|o| match o {
                Output::Act(Action::InstallChild(c)) => Some(c.inbound_spi),
                _ => None,
            })
            .collect();
        // CHILD SAs come and go, or the peer's address moves: the
        // published `esp_sa` records change.
        let esp_changed = outputs.iter().any(|o| {
            matches!(
                o,
                Output::PeerMoved(_)
                    | Output::Act(Action::InstallChild(_) | Action::DeleteChild { .. })
            )
        });
        let mut held = Vec::new();
        // The IKE SA (by SPIs: slots may move below) whose CHILD SA failed.
        let mut child_failed = None;
        for output in outputs {
            let action = match output {
                Output::Send { bytes, route } if !installs.is_empty() => {
                    held.push((bytes, route));
                    continue;
                }
                Output::Send { bytes, route } => {
                    self.send(i, route, &bytes);
                    continue;
                }
                Output::SendKeepalive(route) => {
                    self.keepalive(i, slot, route);
                    continue;
                }
                Output::PeerMoved(to) => {
                    self.peer_moved(i, slot, to);
                    continue;
                }
                Output::Act(action) => action,
            };
            match action {
                Action::Send(bytes) => {
                    // `outputs` routes every send; this arm is unreachable
                    // in practice.
                    if let Some(route) = self.peers[i].slots.get(slot).and_then(|s| s.sa.route()) {
                        self.send(i, route, &bytes);
                    }
                }
                Action::InstallChild(child) => self.install(i, child, now),
                Action::ChildFailed(e) => {
                    self.peers[i].counters.children_failed += 1;
                    self.count_failure(i, &e);
                    let text = format!("the IKE SA is up but its CHILD SA failed: {e}");
                    self.log_failure(i, &text, now);
                    child_failed = self.peers[i].slots.get(slot).map(|s| s.sa.spis());
                }
                // The CHILD SAs' DeleteChild actions came before. One we
                // were deleting anyway is no failure.
                Action::Failed(e) if self.peers[i].slots.get(slot).is_some_and(|s| s.closing) => {
                    tracing::debug!(peer = %self.peers[i].cfg.name, "IKE: the IKE SA being deleted ended: {e}");
                }
                Action::Failed(e) => self.failed(i, e, now),
                Action::DeleteChild {
                    inbound_spi,
                    outbound_spi,
                } => {
                    let p = &mut self.peers[i];
                    p.counters.children_deleted += 1;
                    tracing::info!(
                        peer = %p.cfg.name,
                        inbound_spi = format_args!("{inbound_spi:#010x}"),
                        outbound_spi = format_args!("{outbound_spi:#010x}"),
                        "IKE: CHILD SA deleted"
                    );
                    let _ = self.installs.send(ChildUpdate::Delete {
                        peer: p.cfg.name.clone(),
                        inbound_spi,
                        outbound_spi,
                    });
                    p.kept.retain(|c| c.inbound_spi != inbound_spi);
                    if p.current == Some((inbound_spi, outbound_spi)) {
                        p.current = None;
                        self.reinstate(i, slot, now);
                    }
                }
                Action::PeerRestarted => slot = self.peer_restarted(i, slot),
                Action::IkeRekeyed { old, new } => {
                    let p = &self.peers[i];
                    tracing::info!(
                        peer = %p.cfg.name,
                        old = format_args!("{:016x}/{:016x}", old.0, old.1),
                        new = format_args!("{:016x}/{:016x}", new.0, new.1),
                        "IKE SA rekeyed"
                    );
                    // Messages for `old` find this slot through
                    // `retiring_spis` (see `on_message`).
                    self.publish_keys();
                }
                Action::Closed => {
                    let p = &self.peers[i];
                    tracing::info!(peer = %p.cfg.name, "IKE SA closed");
                }
            }
        }
        if !held.is_empty() {
            if !self.stopping && !self.wait_inbound(&installs, INSTALL_WAIT) {
                // Sent anyway: the peer retransmits otherwise, and a few
                // packets dropped as unknown_spi cost less than that.
                tracing::warn!(
                    peer = %self.peers[i].cfg.name,
                    "IKE: the new inbound SA was not installed within {INSTALL_WAIT:?}; \
                     answering anyway"
                );
            }
            for (bytes, route) in held {
                self.send(i, route, &bytes);
            }
        }
        self.note_established(i, slot, now);
        self.count_rekeys(i, slot, now);
        if esp_changed {
            self.publish_keys();
        }
        if let Some(spis) = child_failed
            && let Some(at) = self.peers[i].slots.iter().position(|s| s.sa.spis() == spis)
        {
            self.close_if_childless(i, at, now);
        }
        self.close_idle(i, now);
    }

    /// After a CHILD SA failed: an IKE SA that holds no usable CHILD SA
    /// (IKE_AUTH's was refused, by either side; not a failed rekey, whose
    /// old CHILD SA lives on) carries nothing between two hosts, so it is
    /// deleted, and an initiator tries again after the back-off. The
    /// peer will likely answer the same again (it narrows the selectors,
    /// it wants another proposal), so the back-off keeps doubling: the
    /// establishment before the failure did not reset it (only an
    /// installed CHILD SA does, in [`IkeWorker::install`]).
    ///
    /// Not deleted at once: when we refused a CHILD SA the peer had
    /// created, the IKE SA has just sent its Delete (RFC 7296 section
    /// 2.9), and with a window of one (section 2.3) a Delete of the IKE
    /// SA now would abandon it: the peer, still waiting for that message
    /// ID, could ignore the next one. Deleting the IKE SA alone would
    /// also remove the CHILD SA (section 1.4.1), but the library has
    /// already spent the message ID; so: the CHILD SA's Delete, its
    /// answer, then the IKE SA's Delete ([`IkeWorker::close_idle`]). A
    /// peer that never answers ends the IKE SA as dead (section 2.4).
    fn close_if_childless(&mut self, i: usize, slot: usize, now: Instant) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        let usable =
            s.sa.children()
                .iter()
                .any(|c| c.state != ChildState::Deleting);
        if usable || s.sa.status() != crate::ike::sa::Status::Established {
            return;
        }
        s.close_when_idle = true;
        if p.cfg.ike.initiate {
            let wait = p.back_off(now);
            tracing::info!(
                peer = %p.cfg.name,
                "IKE: the IKE SA has no CHILD SA: deleting it; initiating again in {wait:?}"
            );
        } else {
            tracing::info!(peer = %p.cfg.name, "IKE: the IKE SA has no CHILD SA: deleting it");
        }
    }

    /// Deletes the IKE SAs of peer `i` marked by
    /// [`IkeWorker::close_if_childless`] whose window is free.
    fn close_idle(&mut self, i: usize, now: Instant) {
        for slot in 0..self.peers[i].slots.len() {
            let Some(s) = self.peers[i].slots.get_mut(slot) else {
                break;
            };
            if !s.close_when_idle || s.sa.request_outstanding() {
                continue;
            }
            s.close_when_idle = false;
            self.close_slot(i, slot, now);
        }
    }

    /// Waits, at most `timeout`, until the inbound thread publishes an SA
    /// for each of `spis`; whether it did.
    fn wait_inbound(&self, spis: &[u32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let all = {
                let published = self
                    .shared
                    .in_status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                spis.iter()
                    .all(|spi| published.rows.iter().any(|r| r.spi == *spi))
            };
            if all {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// INITIAL_CONTACT from the peer (RFC 7296 section 2.4): it restarted,
    /// so every SA we hold with it that the IKE SA in `slot` did not make
    /// is stale. That IKE SA's own CHILD SA is installed after this (the
    /// action comes first), so flushing the peer's SAs from the key
    /// manager loses nothing. Returns the slot's new index.
    fn peer_restarted(&mut self, i: usize, slot: usize) -> usize {
        let p = &mut self.peers[i];
        if slot >= p.slots.len() {
            return slot;
        }
        // Both sides initiated at once: the peer had no IKE SA with us
        // when it sent INITIAL_CONTACT, but the one we set up with it
        // meanwhile is no stale one. Not a restart: `note_established`
        // keeps one of the two.
        if set_up_alongside(&p.slots, slot) {
            tracing::info!(
                peer = %p.cfg.name,
                "IKE: INITIAL_CONTACT on an IKE SA set up at the same time as ours: not a restart"
            );
            return slot;
        }
        p.counters.peer_restarts += 1;
        let stale = p
            .slots
            .iter()
            .enumerate()
            .filter(|&(k, s)| k != slot && s.sa.status() != crate::ike::sa::Status::Connecting)
            .count();
        tracing::info!(
            peer = %p.cfg.name,
            stale_ike_sas = stale,
            "IKE: the peer restarted (INITIAL_CONTACT): its old SAs are removed"
        );
        let endpoint = SocketAddr::new(p.cfg.endpoint, self.shared.outer.port().unwrap_or(0));
        let _ = self.installs.send(ChildUpdate::Flush {
            peer: p.cfg.name.clone(),
            endpoint,
        });
        // The key manager holds none of the peer's SAs now.
        p.current = None;
        // IKE SAs still being set up are no stale ones: with the peer's
        // restart they go to its new instance (ours initiating may have
        // crossed its own).
        let keep: Vec<bool> = p
            .slots
            .iter()
            .enumerate()
            .map(|(k, s)| k == slot || s.sa.status() == crate::ike::sa::Status::Connecting)
            .collect();
        let new_index = keep[..slot].iter().filter(|&&k| k).count();
        let mut at = 0;
        p.slots.retain(|_| {
            at += 1;
            keep[at - 1]
        });
        self.publish_keys();
        new_index
    }

    /// The CHILD SA the key manager wanted for the peer was deleted while
    /// the IKE SA still holds another: after crossed rekeys (RFC 7296
    /// section 2.8.1) the survivor may have been installed before the
    /// redundant one that replaced it in the key manager. The survivor is
    /// handed over again: its inbound SA, still retiring, comes back;
    /// its outbound SA, if the redundant one's superseded it before it
    /// ever sent, is installed again (one that sent cannot come back: the
    /// key manager refuses a spent key).
    fn reinstate(&mut self, i: usize, slot: usize, now: Instant) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get(slot) else {
            return;
        };
        let Some(live) =
            s.sa.children()
                .iter()
                .rev()
                .find(|c| matches!(c.state, ChildState::Installed | ChildState::Rekeying))
        else {
            return;
        };
        let Some(child) = p.kept.iter().find(|c| c.inbound_spi == live.inbound_spi) else {
            return;
        };
        let child = copy_child(child);
        tracing::info!(
            peer = %p.cfg.name,
            inbound_spi = format_args!("{:#010x}", child.inbound_spi),
            "IKE: the surviving CHILD SA of crossed rekeys is handed over again"
        );
        p.kept.retain(|c| c.inbound_spi != child.inbound_spi);
        self.install(i, child, now);
    }

    /// Adds the slot's new rekeys to the peer's counters, and a failed
    /// IKE SA rekey of ours (the library has no action for it: the old
    /// IKE SA carries on, and its lifetime tries again).
    fn count_rekeys(&mut self, i: usize, slot: usize, now: Instant) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        let failure = s.sa.ike_rekey_failure();
        if failure != s.rekey_failure {
            s.rekey_failure = failure;
            if let Some(e) = failure {
                p.counters.ike_rekeys_failed += 1;
                let text = format!(
                    "the IKE SA rekey failed ({}); the IKE SA carries on and tries again",
                    explain(p, &e)
                );
                self.log_failure(i, &text, now);
            }
        }
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        let (ike, child) = s.sa.rekeys();
        let (ike0, child0) = s.rekeys_counted;
        p.counters.ike_rekeys += u64::from(ike.saturating_sub(ike0));
        p.counters.child_rekeys += u64::from(child.saturating_sub(child0));
        s.rekeys_counted = (ike, child);
    }

    /// ESP from the peer, seen as grown packet counts of the inbound SAs
    /// the inbound thread publishes, puts off the liveness checks of the
    /// IKE SA that made them ([`IkeSa::peer_seen`]).
    fn note_esp(&mut self, now: Instant) {
        let rows: Vec<(String, u32, u64)> = {
            let published = self
                .shared
                .in_status
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            published
                .rows
                .iter()
                .map(|r| (r.peer.clone(), r.spi, r.packets))
                .collect()
        };
        let mut next = Vec::with_capacity(rows.len());
        for (peer, spi, packets) in rows {
            let before = self
                .inbound_packets
                .iter()
                .find(|(s, _)| *s == spi)
                .map_or(0, |(_, n)| *n);
            next.push((spi, packets));
            if packets <= before {
                continue;
            }
            let Some(p) = self.peers.iter_mut().find(|p| p.cfg.name == peer) else {
                continue;
            };
            for s in &mut p.slots {
                if s.sa.children().iter().any(|c| c.inbound_spi == spi) {
                    s.sa.peer_seen(now);
                }
            }
        }
        self.inbound_packets = next;
    }

    /// Sends an IKE message on its route: from port 500, or from the
    /// NAT-T socket behind the non-ESP marker (RFC 3948 section 2.2).
    fn send(&mut self, i: usize, route: Route, bytes: &[u8]) {
        let to = route.to;
        let result = if route.natt {
            let mut framed = Vec::with_capacity(NON_ESP_MARKER.len() + bytes.len());
            framed.extend_from_slice(&NON_ESP_MARKER);
            framed.extend_from_slice(bytes);
            self.send_natt(to, &framed)
        } else {
            let family_v6 = to.is_ipv6();
            let socket = self
                .ike_sockets
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6() == family_v6));
            match socket {
                Some(socket) => socket.send_to(bytes, to).map(|_| ()),
                None => Err(std::io::Error::other("no IKE socket of this family")),
            }
        };
        if let Err(e) = result {
            // Retransmission (RFC 7296 section 2.1) covers a lost send.
            tracing::debug!(peer = %self.peers[i].cfg.name, to = %to, "IKE: send failed: {e}");
        }
    }

    /// One datagram from the NAT-T socket: the outer UDP socket, or with
    /// raw ESP our IKE-only port 4500 socket.
    fn send_natt(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<()> {
        if !self.sockets.encap.is_udp() {
            let family_v6 = to.is_ipv6();
            let socket = self
                .natt_sockets
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6() == family_v6));
            return match socket {
                Some(socket) => socket.send_to(datagram, to).map(|_| ()),
                None => Err(std::io::Error::other("no port 4500 socket of this family")),
            };
        }
        let socket = if to.is_ipv6() {
            self.sockets.v6.as_ref()
        } else {
            self.sockets.v4.as_ref()
        };
        match socket {
            Some(socket) if self.sockets.encap.is_udp() => {
                match socket.send_batch(&[(datagram, to)]) {
                    Ok(r) if r.failed == 0 => Ok(()),
                    Ok(r) => Err(r
                        .last_error
                        .unwrap_or_else(|| std::io::Error::other("not sent"))),
                    Err(e) => Err(e),
                }
            }
            _ => Err(std::io::Error::other("no NAT-T socket of this family")),
        }
    }

    /// RFC 3948 section 4: the one byte 0xFF keeps our NAT's mapping,
    /// sent only "if no other packet to the peer was sent in the interval":
    /// the IKE SA asks every interval, and ESP that went out through one
    /// of its CHILD SAs since the last time (the outbound thread's
    /// published packet counts) did the job already.
    fn keepalive(&mut self, i: usize, slot: usize, route: Route) {
        let Some(s) = self.peers[i].slots.get(slot) else {
            return;
        };
        let counts: Vec<(u32, u64)> = {
            let published = self
                .shared
                .out_status
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let name = &self.peers[i].cfg.name;
            published
                .rows
                .iter()
                .filter(|r| {
                    r.peer == *name && s.sa.children().iter().any(|c| c.outbound_spi == r.spi)
                })
                .map(|r| (r.spi, r.packets))
                .collect()
        };
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        let sent = esp_sent(&s.out_packets, &counts);
        s.out_packets = counts;
        if sent {
            p.counters.keepalives_skipped += 1;
            return;
        }
        if let Err(e) = self.send_natt(route.to, &[0xFF]) {
            tracing::debug!(peer = %self.peers[i].cfg.name, to = %route.to, "IKE: NAT keepalive not sent: {e}");
            return;
        }
        let p = &mut self.peers[i];
        p.counters.keepalives += 1;
        if let Some(s) = p.slots.get_mut(slot) {
            s.keepalives += 1;
        }
    }

    /// The peer's NAT mapping changed (RFC 7296 section 2.23): its ESP
    /// goes to, and is expected from, the new address.
    fn peer_moved(&mut self, i: usize, slot: usize, to: SocketAddr) {
        let p = &mut self.peers[i];
        p.counters.peer_moved += 1;
        if let Some(s) = p.slots.get_mut(slot) {
            s.to = to;
        }
        tracing::info!(peer = %p.cfg.name, to = %to, "IKE: the peer's address changed (NAT); ESP follows");
        let _ = self.installs.send(ChildUpdate::Endpoint {
            peer: p.cfg.name.clone(),
            endpoint: to,
        });
    }

    /// A CHILD SA for the key manager: both directions, fresh keys.
    fn install(&mut self, i: usize, child: ChildSa, now: Instant) {
        let p = &mut self.peers[i];
        let (inbound_spi, outbound_spi) = (child.inbound_spi, child.outbound_spi);
        let esn = child.esn;
        p.kept.push(copy_child(&child));
        p.current = Some((inbound_spi, outbound_spi));
        // An `any_source` peer is where its IKE SA last heard it.
        let learned = p
            .cfg
            .ike
            .any_source
            .then(|| {
                p.slots
                    .iter()
                    .find(|s| s.sa.children().iter().any(|c| c.inbound_spi == inbound_spi))
                    .and_then(|s| s.sa.route())
                    .map(|r| r.to.ip())
            })
            .flatten();
        match build_child(&self.shared, &p.cfg, child, learned) {
            Ok(sas) => {
                p.counters.children_installed += 1;
                // Success is a CHILD SA, not an IKE SA alone: see
                // `close_if_childless`.
                p.backoff = RETRY_FIRST;
                tracing::info!(
                    peer = %p.cfg.name,
                    inbound_spi = format_args!("{inbound_spi:#010x}"),
                    outbound_spi = format_args!("{outbound_spi:#010x}"),
                    esn,
                    "IKE: CHILD SA negotiated; installing"
                );
                // A failed send means the main thread is gone: stopping.
                let _ = self.installs.send(ChildUpdate::Install(Box::new(sas)));
            }
            Err(e) => {
                p.counters.children_failed += 1;
                let text = format!("the CHILD SA could not be built: {e}");
                self.log_failure(i, &text, now);
            }
        }
    }

    fn note_established(&mut self, i: usize, slot: usize, now: Instant) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        if s.established || s.sa.status() != crate::ike::sa::Status::Established {
            return;
        }
        s.established = true;
        s.up_at = Some(now);
        p.counters.established += 1;
        if let Some(g) = self.gate.as_mut() {
            g.completed(s.sa.spis().0);
            self.cookies.half_open = g.half_open() as u64;
            self.cookies.demanding = g.demanding();
        }
        p.contacted = true;
        let (spi_i, spi_r) = s.sa.spis();
        tracing::info!(
            peer = %p.cfg.name,
            role = role_name(s.sa.role()),
            spi_i = format_args!("{spi_i:016x}"),
            spi_r = format_args!("{spi_r:016x}"),
            suite = s.sa.suite().map(suite_name).unwrap_or_default(),
            "IKE SA established"
        );
        // Our IKE SAs still connecting (both sides initiated) must not
        // send INITIAL_CONTACT any more: "no other SAs with you" is no
        // longer true, and the peer would drop the one now up as stale.
        for o in &mut p.slots {
            if o.sa.status() == crate::ike::sa::Status::Connecting && o.sa.policy().initial_contact
            {
                let policy = Policy {
                    initial_contact: false,
                    ..o.sa.policy().clone()
                };
                o.sa.set_policy(policy);
            }
        }
        // One IKE SA stands for the peer: the others are deleted (RFC
        // 7296 section 1.4.1), not dropped silently, so the peer frees
        // them too; each stays until its Delete is answered, so that the
        // answer finds it. Their CHILD SAs' deletes then name only their
        // own SPIs, never the survivor's (see `Action::DeleteChild`).
        let keep = survivor(&p.slots, slot);
        let others: Vec<usize> = (0..p.slots.len())
            .filter(|&k| k != keep && p.slots[k].live())
            .collect();
        for k in others {
            tracing::info!(peer = %self.peers[i].cfg.name, "IKE: a duplicate IKE SA with the peer is deleted");
            self.close_slot(i, k, now);
        }
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
        let established = p.slots.iter().any(Slot::live);
        if p.cfg.ike.initiate && !established {
            let wait = p.back_off(now);
            tracing::info!(peer = %p.cfg.name, "IKE: initiating again in {wait:?}");
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
        let gate = &mut self.gate;
        p.slots.retain(|s| {
            let closed = s.sa.status() == crate::ike::sa::Status::Closed;
            if closed && let Some(g) = gate.as_mut() {
                g.completed(s.sa.spis().0);
            }
            !closed
        });
        if p.slots.len() != before {
            self.publish_keys();
        }
        let p = &mut self.peers[i];
        let slots = &p.slots;
        p.kept.retain(|c| {
            slots.iter().any(|s| {
                s.sa.children()
                    .iter()
                    .any(|l| l.inbound_spi == c.inbound_spi)
            })
        });
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
                                crate::ike::sa::Status::Established if s.closing => "deleting",
                                crate::ike::sa::Status::Established => "established",
                                crate::ike::sa::Status::Closed => "closed",
                            }
                            .into(),
                            spi_i: format!("{spi_i:016x}"),
                            spi_r: format!("{spi_r:016x}"),
                            age_secs: now.saturating_duration_since(s.created).as_secs(),
                            remote: s.to.to_string(),
                            suite: s.sa.suite().map(suite_name),
                            children: s
                                .sa
                                .children()
                                .iter()
                                .map(|c| ChildStatus {
                                    inbound_spi: c.inbound_spi,
                                    outbound_spi: c.outbound_spi,
                                    state: child_state_name(c.state).into(),
                                    installed_secs_ago: secs_since(now, c.installed),
                                    rekey_in_secs: c.rekey_at.map(|t| secs_until(now, t)),
                                    generation: c.generation,
                                })
                                .collect(),
                            ike_rekeys: s.sa.rekeys().0,
                            child_rekeys: s.sa.rekeys().1,
                            established_secs_ago: s.sa.established_at().map(|t| secs_since(now, t)),
                            ike_rekey_in_secs: s.sa.ike_rekey_at().map(|t| secs_until(now, t)),
                            last_heard_secs_ago: s.sa.last_heard().map(|t| secs_since(now, t)),
                            last_liveness_check_secs_ago: s
                                .sa
                                .last_liveness_check()
                                .map(|t| secs_since(now, t)),
                            nat: {
                                let n = s.sa.nat();
                                NatSaStatus {
                                    supported: n.supported,
                                    local_behind: n.local_behind,
                                    peer_behind: n.peer_behind,
                                    natt: s.sa.use_natt(),
                                    keepalives: n.local_behind,
                                    keepalives_sent: s.keepalives,
                                }
                            },
                        }
                    })
                    .collect(),
                counters: p.counters.clone(),
                last_error: p.last_error.clone(),
            })
            .collect();
        *self.ike.status.lock().unwrap_or_else(|p| p.into_inner()) = rows;
        *self.ike.cookies.lock().unwrap_or_else(|p| p.into_inner()) = self.cookies.clone();
    }

    /// The established IKE SAs' keys and the CHILD SAs' keys, for
    /// `esptun wireshark-keys`.
    fn publish_keys(&self) {
        let records = self
            .peers
            .iter()
            .flat_map(|p| p.slots.iter())
            .filter(|s| s.established)
            .filter_map(|s| wireshark_record(&s.sa))
            .collect();
        *self.ike.keys.lock().unwrap_or_else(|p| p.into_inner()) = records;
        let esp = self
            .peers
            .iter()
            .map(|p| (p.cfg.name.clone(), peer_esp_sa_records(p)))
            .collect();
        *self.ike.esp_keys.lock().unwrap_or_else(|p| p.into_inner()) = esp;
    }
}

impl PeerIke {
    /// Plans the next initiation after the current back-off, doubles it
    /// (up to [`RETRY_MAX`]), and returns the wait.
    fn back_off(&mut self, now: Instant) -> Duration {
        let wait = self.backoff;
        self.next_initiate = Some(now + wait);
        self.backoff = (wait * 2).min(RETRY_MAX);
        wait
    }

    /// The policy of a new IKE SA: INITIAL_CONTACT only until the first
    /// one with the peer is established (RFC 7296 section 2.4: it says
    /// "I have no other SAs with you", true only after a start).
    fn slot_policy(&self) -> Policy {
        Policy {
            initial_contact: !self.contacted,
            ..self.policy.clone()
        }
    }
}

fn secs_since(now: Instant, t: Instant) -> u64 {
    now.saturating_duration_since(t).as_secs()
}

fn secs_until(now: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(now).as_secs()
}

fn child_state_name(state: ChildState) -> &'static str {
    match state {
        ChildState::Installed => "installed",
        ChildState::Rekeying => "rekeying",
        ChildState::Rekeyed => "rekeyed",
        ChildState::Deleting => "deleting",
    }
}

/// Which IKE SA stands for the peer once the one in `slot` is
/// established: `slot`, unless it and a live one were set up at the same
/// time (both sides initiating: `slot` was created before the other came
/// up, give or take [`SETUP_RACE`]) and that one wins the tie. RFC 7296 has no rule for this;
/// like its rule for crossed CHILD SA rekeys (section 2.8.1: the SA with
/// the lowest nonce is redundant), the one whose lower SPI is the lowest
/// is redundant, which both sides know of both. An IKE SA set up after
/// another was up replaces it (the peer reconnected).
/// Whether another live IKE SA came up after the one in `slot` was
/// created: both were set up at the same time (both sides initiated), so
/// an INITIAL_CONTACT on `slot` is no restart of the peer.
fn set_up_alongside(slots: &[Slot], slot: usize) -> bool {
    let Some(created) = slots.get(slot).map(|s| s.created) else {
        return false;
    };
    slots
        .iter()
        .enumerate()
        .any(|(k, o)| k != slot && o.live() && o.up_at.is_some_and(|t| created <= t))
}

fn survivor(slots: &[Slot], slot: usize) -> usize {
    let Some(new) = slots.get(slot) else {
        return slot;
    };
    // An IKE SA whose CHILD SA was refused never replaces one that
    // carries traffic: it is deleted itself (`close_if_childless`).
    let carries = |s: &Slot| {
        s.sa.children()
            .iter()
            .any(|c| c.state != ChildState::Deleting)
    };
    if !carries(new)
        && let Some(k) =
            (0..slots.len()).find(|&k| k != slot && slots[k].live() && carries(&slots[k]))
    {
        return k;
    }
    let rank = |s: &Slot| {
        let (i, r) = s.sa.spis();
        (i.min(r), i.max(r))
    };
    slots
        .iter()
        .enumerate()
        .filter(|&(k, o)| {
            k != slot
                && o.live()
                && o.up_at.is_some_and(|t| new.created <= t + SETUP_RACE)
                && rank(o) > rank(new)
        })
        .max_by_key(|(_, o)| rank(o))
        .map_or(slot, |(k, _)| k)
}

/// Whether ESP went out since the last look: an outbound SA's packet
/// count (SPI, packets) grew over `before`, or a new SA has sent.
fn esp_sent(before: &[(u32, u64)], now: &[(u32, u64)]) -> bool {
    now.iter().any(|&(spi, n)| {
        n > before
            .iter()
            .find(|&&(s, _)| s == spi)
            .map_or(0, |&(_, b)| b)
    })
}

/// A copy of a CHILD SA's keys and parameters (the original goes to the
/// key manager).
fn copy_child(c: &ChildSa) -> ChildSa {
    ChildSa {
        inbound_spi: c.inbound_spi,
        outbound_spi: c.outbound_spi,
        inbound: c.inbound.clone(),
        outbound: c.outbound.clone(),
        encr: c.encr,
        esn: c.esn,
        transport_mode: c.transport_mode,
        local_ts: c.local_ts.clone(),
        remote_ts: c.remote_ts.clone(),
        udp_encap: c.udp_encap,
        original: c.original,
    }
}
