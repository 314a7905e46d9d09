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
//! NAT-T port; the source), sends each [`Output`](crate::ike::sa::Output)
//! on its route, sends the
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
//!
//! The code, by job:
//! - this file: the shared types, the tunables, the thread's loop;
//! - `setup`: sockets, the peers' configurations and the worker, built
//!   before anything on the system changes;
//! - `receive`: datagrams and IKE messages in, timers, initiations, ESP
//!   seen from the peer;
//! - `act`: an IKE SA's actions carried out (CHILD SAs to the key manager);
//! - `send`: IKE messages and NAT keepalives out, the peer's new address;
//! - `close`: IKE SAs deleted, failed, reaped;
//! - `slots`: which IKE SA stands for a peer, back-off and policy;
//! - `publish`: status rows and Wireshark keys for the other threads;
//! - `explain`, `keys`, `status`: failure texts, CHILD SAs and key
//!   records, the status types.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::shared::Shared;
use super::workers::Sockets;
use crate::config::IkePeer;
use crate::config::ike::load_psk;
use crate::ike::cookie::CookieGate;
use crate::ike::crypto::SystemRandomness;
use crate::ike::sa::{
    ChildSa, ChildState, Config as IkeConfig, IkeError, IkeSa, Policy, Retransmit,
};
use crate::io::ike_socket::{IkeSocket, MAX_MESSAGE};
use crate::sa::keymgr::PeerSas;

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
    /// Set before the IKE thread starts when its messages come through the
    /// inbound thread (`outer = "udp"`), cleared when it has finished
    /// (its Deletes on stop answered, or [`STOP_WAIT`] over): the inbound
    /// thread keeps passing it the answers until then.
    pub farewell: AtomicBool,
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

mod act;
mod close;
mod explain;
mod keys;
mod publish;
mod receive;
mod send;
mod setup;
mod slots;
mod status;
#[cfg(test)]
mod tests;

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

    /// Whether it has a usable CHILD SA (one not being deleted): one
    /// that carries traffic.
    fn carries(&self) -> bool {
        self.sa
            .children()
            .iter()
            .any(|c| c.state != ChildState::Deleting)
    }

    /// Whether messages with initiator SPI `spi_i` belong to this IKE SA:
    /// its own, or after a rekey the old SPIs, which stay routed to it
    /// until their Delete exchange ends (RFC 7296 section 2.18).
    fn owns(&self, spi_i: u64) -> bool {
        self.sa.spis().0 == spi_i || self.sa.retiring_spis().iter().any(|r| r.0 == spi_i)
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

/// How long a message that goes with a new CHILD SA waits for the inbound
/// thread to hold it: the main thread's tick (100 ms) and the inbound
/// thread's publication (200 ms) with room to spare, well inside a peer's
/// first retransmission (strongSwan: 4 s).
const INSTALL_WAIT: Duration = Duration::from_millis(1500);

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
        pfs: s.pfs.clone(),
        ..Policy::default()
    }
}

impl IkeWorker {
    pub fn run(mut self) {
        /// Clears `farewell` however the thread ends, a panic included,
        /// so that the inbound thread never waits for a thread that is
        /// gone.
        struct Done(Arc<IkeShared>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.farewell.store(false, Ordering::Release);
            }
        }
        let _done = Done(self.shared.ike.clone());
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
}
