//! `esptun run`: the TUN device and outer sockets around the datapath.
//!
//! Plain threads: one outbound loop (TUN -> ESP -> socket), one inbound
//! loop (sockets -> ESP -> TUN), one control-socket thread, with peers
//! keyed by IKE an IKE thread ([`ike`]), and the main thread waiting for
//! signals. The datapath threads own their SAs; the
//! main thread hands them changes at reload over channels, and they
//! publish SA state for `status` a few times a second. Both datapath
//! threads run the long-message self-test at the configured interval
//! themselves, so the check sees the SIMD state of the threads that carry
//! traffic.

pub mod caps;
pub mod capture;
pub mod control;
mod deliver;
pub mod ike;
mod inbound;
pub mod metrics;
pub mod netcfg;
pub mod notify;
mod outbound;
mod sas;
mod setup;
mod shared;
pub mod signals;
pub mod status;
mod workers;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::config::{Config, ConfigError, HopByHopMode, Valid, ValidPeer};
use crate::crypto::Provider;
use crate::crypto::select::{BootOptions, Selector};
use crate::datapath::Counters;
use crate::datapath::inbound::Inbound;
use crate::datapath::outbound::Outbound;
use crate::datapath::reassembly::Reassembler;
use crate::io::IoSetupError;
use crate::io::tun::{Tun, TunOffloads};
use crate::keyfile::KeyFileError;
use crate::sa::SaError;
use crate::sa::keymgr::KeyManager;
use crate::sa::lifecycle::{Refusal, Timing};
use crate::sa::reservation::{ReservationError, ReservationStore};
use crate::wire::hop_by_hop;
use caps::Capability;
use control::{ControlError, ControlSocket};
use netcfg::{NetConfig, NetError};
use sas::SaManager;
use setup::{HOW_TO_GRANT, TUN_DEVICE, outer_sockets, require, require_tun_device};
use shared::Shared;
use signals::{Signal, Signals};
use status::ReloadOutcome;
use status::{IoCounters, Status};

/// Why the daemon cannot start (or reload).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "esptun run needs root or {} (for {}), which this process (uid {uid}) does not have: \
         {HOW_TO_GRANT}", cap.name(), cap.purpose()
    )]
    MissingCapability { cap: Capability, uid: u32 },
    #[error(
        "esptun run holds {} but not as an ambient capability (uid {uid}): the `ip` (iproute2) \
         it runs to configure the interface would not inherit it; {HOW_TO_GRANT}", cap.name()
    )]
    CapabilityNotAmbient { cap: Capability, uid: u32 },
    #[error(
        "esptun run needs root or CAP_NET_ADMIN, and this process's capabilities cannot be \
         read (uid {uid}): {source}"
    )]
    Capabilities { uid: u32, source: std::io::Error },
    #[error(
        "{TUN_DEVICE} (mode {mode:04o}, owner uid {owner}) cannot be opened for reading and \
         writing by this process (uid {uid}): a non-root daemon needs that. Most distributions \
         ship it mode 0666 (creating an interface still needs CAP_NET_ADMIN): `chmod 666 \
         {TUN_DEVICE}`, or a udev rule KERNEL==\"tun\", MODE=\"0666\""
    )]
    TunDevice { uid: u32, mode: u32, owner: u32 },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "no AES-GCM provider passed its self-tests for crypto = {0}: refusing to carry traffic \
         (run `esptun selftest` for the details)"
    )]
    NoProvider(crate::crypto::select::Mode),
    #[error("peer {peer}: {source}")]
    Key { peer: String, source: KeyFileError },
    #[error("peer {peer}, {direction} SA {spi:#x}: {source}")]
    Sa {
        peer: String,
        direction: &'static str,
        spi: u32,
        source: SaError,
    },
    #[error("peer {peer}, outbound SA {spi:#x} (key file {key_file}): {source}")]
    Reservation {
        peer: String,
        spi: u32,
        key_file: PathBuf,
        source: ReservationError,
    },
    #[error(transparent)]
    State(ReservationError),
    #[error(
        "{first} and {second} use the same key material: GCM nonces are salt || sequence \
         number, so two SAs (or both directions) sharing a key would reuse nonces; give every \
         SA its own key with `esptun genkey`"
    )]
    SharedKey { first: String, second: String },
    #[error(transparent)]
    Io(#[from] IoSetupError),
    #[error("configuring interface {interface}: {source}")]
    Net { interface: String, source: NetError },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("the {0} thread stopped unexpectedly")]
    ThreadDied(&'static str),
    #[error("peer {peer}: {refusal}")]
    Refused { peer: String, refusal: Refusal },
    #[error("peer {peer}: {source}")]
    Psk {
        peer: String,
        source: crate::config::ike::PskError,
    },
}

/// How long start-up waits for the datapath threads' first publication
/// (they apply their first commands at once; this only bounds a stall).
const FIRST_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Start-up knobs that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// (rate, seed): wraps the hardware provider so that, once the boot
    /// self-tests have passed, it corrupts a 16-byte plaintext block before
    /// sealing at this rate. For the lab only (`esptun demo --corrupt`
    /// and the end-to-end tests, through the hidden `demo-endpoint`
    /// subcommand); `esptun run` never sets it.
    pub inject_faults: Option<(f64, u64)>,
}

/// A running daemon.
pub struct Daemon {
    config_path: PathBuf,
    config: Valid,
    shared: Arc<Shared>,
    /// Decides which SA does what; the datapath threads apply.
    sas: SaManager,
    threads: Vec<(&'static str, JoinHandle<()>)>,
    net: Option<NetConfig>,
    /// `reload` requests from the control thread, each with where to send
    /// the outcome: the reload runs here, on the thread that owns the key
    /// manager.
    reloads: mpsc::Receiver<mpsc::Sender<ReloadOutcome>>,
    /// CHILD SAs the IKE thread negotiated, for the key manager.
    ike_installs: Option<mpsc::Receiver<ike::ChildUpdate>>,
    /// Held for the life of the process: one daemon per state directory.
    _state_lock: std::fs::File,
}

impl Daemon {
    /// Boots the providers, loads and claims SAs, opens the sockets,
    /// brings the interface up and starts the threads. Nothing is left
    /// behind on error.
    pub fn start(config_path: &Path, options: &RunOptions) -> Result<Daemon, DaemonError> {
        // Capabilities, not the user id: a dedicated user holding exactly
        // these may run the tunnel (deploy/esptun.service).
        require(&[Capability::NetAdmin])?;
        require_tun_device()?;
        // Every check that needs no system change, the ones check-config
        // makes, before anything is touched.
        let config = Config::load_checked(config_path)?;
        if !config.outer.encap.is_udp() {
            require(&[Capability::NetRaw])?;
        }
        // Linux sends an IPV6_HOPOPTS control message only for CAP_NET_RAW
        // (ip6_datagram_send_ctl: "if (!ns_capable(net->user_ns,
        // CAP_NET_RAW)) goto exit_f" with EPERM), on UDP sockets too.
        if config.ipv6_hop_by_hop == HopByHopMode::Carry {
            require(&[Capability::NetRawForHopByHop])?;
        }
        let providers = Provider::detect_all();
        // The field failure: hardware that passes its boot tests and then
        // corrupts blocks while running. The injector starts clean and is
        // switched on once the boot self-tests have passed.
        let mut injector = None;
        let providers = providers.map(|p| match options.inject_faults {
            Some((_, seed)) if p.id == crate::crypto::ProviderId::Hardware && p.is_available() => {
                let (p, handle) = crate::crypto::fault::wrap(p, 0.0, seed);
                injector = Some(handle);
                p
            }
            _ => p,
        });
        let selector = Selector::boot(
            providers,
            config.crypto.mode,
            config.crypto.on_selftest_failure,
            BootOptions::default(),
        );
        if let (Some(handle), Some((rate, _))) = (&injector, options.inject_faults) {
            tracing::warn!(
                "fault injection: the hardware provider now corrupts plaintext blocks at rate {rate}"
            );
            handle.set_rate(rate);
        }
        let Some(active) = selector.active() else {
            return Err(DaemonError::NoProvider(config.crypto.mode));
        };
        for r in selector.reports() {
            if let Some(why) = &r.disabled {
                tracing::error!(provider = %r.name, "disabled at boot: {why}");
            }
        }
        tracing::info!(provider = %active, mode = %config.crypto.mode, "boot self-tests passed");

        // Sockets and the control socket first: a port in use or a second
        // instance is found before any sequence numbers are reserved.
        let sockets = outer_sockets(&config)?;
        let ike = ike::Setup::open(&config)?;
        let control = ControlSocket::bind(&config.operations.control_socket)?;
        let metrics = config
            .operations
            .metrics_listen
            .map(metrics::MetricsServer::bind)
            .transpose()?;
        if let Some(addr) = config.operations.metrics_listen
            && !addr.ip().is_loopback()
        {
            tracing::warn!(
                %addr,
                "metrics_listen is not a loopback address: the metrics endpoint has no \
                 authentication, so anyone who can reach {addr} reads the daemon's counters; \
                 firewall it to your monitoring hosts"
            );
        }
        let drop_capture = config
            .operations
            .drop_capture
            .as_ref()
            .map(capture::DropCapture::open)
            .transpose()?;
        let store =
            ReservationStore::open(&config.operations.state_dir).map_err(DaemonError::State)?;
        let state_lock = store.lock().map_err(DaemonError::State)?;
        let mut peers = Vec::with_capacity(config.peers.len());
        for peer in &config.peers {
            peers.push(sas::build_peer(&selector, &config, peer)?);
        }
        sas::check_keys_distinct(&peers)?;
        let tun = Tun::create_with(
            &config.interface.name,
            TunOffloads {
                csum: config.offloads.tun_checksum,
                tso: config.offloads.tso,
                uso: config.offloads.uso,
            },
        )?;
        let net = NetConfig::apply(&config, tun.name()).map_err(|source| DaemonError::Net {
            interface: config.interface.name.clone(),
            source,
        })?;
        // Sequence numbers are reserved once the interface and sockets are
        // up: a start that fails before this point burns none. No thread
        // runs yet, so nothing else can draw on these keys.
        for p in &mut peers {
            if let Some(new) = &mut p.outbound {
                sas::claim(&store, &p.peer, new)?;
            }
        }

        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            selector,
            started: Instant::now(),
            selftest_interval: config.crypto.selftest_interval,
            out_counters: Arc::new(Counters::default()),
            in_counters: Arc::new(Counters::default()),
            io: IoCounters::default(),
            out_status: Mutex::new(shared::Published::default()),
            in_status: Mutex::new(shared::Published::default()),
            interface: tun.name().to_string(),
            outer: config.outer.encap,
            inner: config.inner,
            // Coalesced TCP trains need the TSO the device granted.
            coalesce: config.offloads.coalesce && tun.offloads().tso,
            offloads: status::OffloadState::default(),
            path_mtu: Mutex::new(crate::datapath::outbound::PathMtus::new(config.outer.encap)),
            path_mtu_changes: std::sync::atomic::AtomicU64::new(0),
            ike: Arc::new(ike::IkeShared::default()),
        });

        {
            let granted = tun.offloads();
            let o = &shared.offloads;
            let set = |b: &std::sync::atomic::AtomicBool, v: bool| b.store(v, Ordering::Relaxed);
            set(&o.tun_checksum, granted.csum);
            set(&o.tso, granted.tso);
            set(&o.uso, granted.uso);
            set(&o.coalesce, shared.coalesce);
            let socks = || {
                [sockets.v4.as_ref(), sockets.v6.as_ref()]
                    .into_iter()
                    .flatten()
            };
            set(&o.udp_gso, socks().any(|s| s.offloads().gso));
            set(&o.udp_gro, socks().any(|s| s.offloads().gro));
            tracing::info!(offloads = ?shared.offloads.snapshot().in_use(), "kernel offloads in use");
        }
        let (out_tx, out_rx) = mpsc::channel();
        let (in_tx, in_rx) = mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel();
        let timing = Timing {
            switch_after: config.rekey.switch,
            retire_after: config.rekey.retire,
        };
        let mut manager = SaManager::new(timing, out_tx, in_tx, events_rx);
        // The first commands wait in the channels: each thread applies them
        // before it reads its first packet.
        if let Some((peer, refusal)) = manager.install(peers, Instant::now()).into_iter().next() {
            return Err(DaemonError::Refused { peer, refusal });
        }
        let tun = Arc::new(tun);
        let sockets = Arc::new(sockets);
        let (reload_tx, reloads) = mpsc::channel();
        let mut daemon = Daemon {
            config_path: config_path.to_path_buf(),
            config,
            shared: shared.clone(),
            sas: manager,
            threads: Vec::new(),
            net: Some(net),
            reloads,
            ike_installs: None,
            _state_lock: state_lock,
        };
        let mut pipeline = Outbound::new(shared.inner);
        pipeline.counters = shared.out_counters.clone();
        pipeline.path_mtu = crate::datapath::outbound::PathMtus::new(daemon.config.outer.encap);
        pipeline.clamp_mss = daemon.config.clamp_mss;
        pipeline.tunnel_mtu = daemon.config.interface.mtu;
        let carry = daemon.config.ipv6_hop_by_hop == HopByHopMode::Carry;
        // One slot per packet of a batch, allocated once.
        pipeline.hop_by_hop = carry.then(|| hop_by_hop::Slots::new(workers::BATCH));
        let reassembler = daemon.config.reassembly.enabled.then(|| {
            Reassembler::new(
                daemon.config.reassembly,
                workers::BUF_CAPACITY,
                shared.out_counters.clone(),
            )
        });
        let mut outbound = outbound::OutboundWorker::new(
            shared.clone(),
            tun.clone(),
            sockets.clone(),
            store,
            pipeline,
            out_rx,
            events_tx.clone(),
        )
        .with_reassembler(reassembler, daemon.config.outer.outer_mtu);
        let mut pipeline = Inbound::new(shared.inner);
        pipeline.counters = shared.in_counters.clone();
        pipeline.path_mtu = crate::datapath::outbound::PathMtus::new(daemon.config.outer.encap);
        pipeline.clamp_mss = daemon.config.clamp_mss;
        pipeline.tunnel_mtu = daemon.config.interface.mtu;
        pipeline.hop_by_hop = carry.then(|| hop_by_hop::Slots::new(workers::BATCH));
        let ike = ike.map(|setup| setup.wire(&shared, &sockets, &mut pipeline));
        let mut inbound = inbound::InboundWorker::new(
            shared.clone(),
            tun,
            sockets.clone(),
            pipeline,
            in_rx,
            events_tx,
            drop_capture,
        );
        outbound.set_path_mtu_probe(crate::io::socket::PathMtuProbe::open(Some(
            daemon.config.outer.fwmark,
        )));
        let ike = ike.map(|wired| {
            if let Some(queue) = wired.queue {
                inbound.set_ike_queue(queue);
                // Before either thread can see `stop`: see `farewell`.
                daemon.shared.ike.farewell.store(true, Ordering::Release);
            }
            daemon.ike_installs = Some(wired.installs);
            wired.worker
        });
        daemon.spawn("outbound", move || outbound.run())?;
        daemon.spawn("inbound", move || inbound.run())?;
        if let Some(worker) = ike {
            daemon.spawn("ike", move || worker.run())?;
        }
        // `status` and the ready line only once both threads have applied
        // their first commands and published them: a caller that sees the
        // daemon ready sees its SAs.
        daemon.shared.wait_first_publish(FIRST_PUBLISH_TIMEOUT);
        let backend = ControlBackend {
            shared,
            reloads: reload_tx,
        };
        let mut server = control::Server::new(control, metrics);
        daemon.spawn("control", move || {
            server.run(&backend.shared.stop, &backend);
        })?;
        tracing::info!(
            interface = %daemon.shared.interface,
            mtu = daemon.config.interface.mtu,
            outer = %daemon.shared.outer,
            peers = daemon.config.peers.len(),
            ike_peers = daemon.config.ike_peers.len(),
            control = %daemon.config.operations.control_socket.display(),
            "esptun ready"
        );
        Ok(daemon)
    }

    fn spawn(
        &mut self,
        name: &'static str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), DaemonError> {
        let handle = std::thread::Builder::new()
            .name(format!("esptun-{name}"))
            .spawn(f)
            .map_err(DaemonError::Thread)?;
        self.threads.push((name, handle));
        Ok(())
    }

    /// The status as `esptun status` would show it.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Waits for signals: SIGHUP reloads, SIGTERM/SIGINT stop. Returns
    /// after a clean stop, or with an error if a datapath thread died.
    pub fn run_until_stopped(mut self, signals: &Signals) -> Result<(), DaemonError> {
        loop {
            // Also the key manager's clock: pending switches and
            // retirements happen at most this late.
            match signals.wait(Duration::from_millis(100)) {
                Some(Signal::Stop) => {
                    tracing::info!("stopping");
                    if let Err(e) = notify::notify("STOPPING=1") {
                        tracing::warn!("telling the service manager we stop: {e}");
                    }
                    return self.stop();
                }
                Some(Signal::Reload) => {
                    self.reload();
                }
                None => {}
            }
            // `esptun reload`: the same reload, its outcome sent back.
            while let Ok(reply) = self.reloads.try_recv() {
                let outcome = self.reload();
                let _ = reply.send(outcome);
            }
            self.install_ike_children();
            self.sas.expire(Instant::now());
            if let Some((name, _)) = self.threads.iter().find(|(_, h)| h.is_finished()) {
                let name = *name;
                self.stop()?;
                return Err(DaemonError::ThreadDied(name));
            }
        }
    }

    /// Applies what the IKE thread decided to the key manager, in the
    /// order it was sent (a rekeyed CHILD SA's install before its
    /// predecessor's delete: make-before-break).
    fn install_ike_children(&mut self) {
        let Some(rx) = &self.ike_installs else {
            return;
        };
        let updates: Vec<_> = rx.try_iter().collect();
        let now = Instant::now();
        for update in updates {
            match update {
                ike::ChildUpdate::Install(sas) => {
                    for (peer, refusal) in self.sas.install(vec![*sas], now) {
                        tracing::error!(peer = %peer, "IKE CHILD SA not installed: {refusal}");
                    }
                }
                ike::ChildUpdate::Delete {
                    peer,
                    inbound_spi,
                    outbound_spi,
                } => {
                    self.sas.delete(
                        &peer,
                        crate::sa::table::Direction::Inbound,
                        inbound_spi,
                        now,
                    );
                    self.sas.delete(
                        &peer,
                        crate::sa::table::Direction::Outbound,
                        outbound_spi,
                        now,
                    );
                }
                ike::ChildUpdate::Flush { peer, endpoint } => {
                    // A direction left `None` has its SAs removed at once.
                    let none = crate::sa::keymgr::PeerSas {
                        peer,
                        endpoint,
                        outbound: None,
                        inbound: None,
                    };
                    self.sas.install(vec![none], now);
                }
                ike::ChildUpdate::Endpoint { peer, endpoint } => {
                    self.sas.update_endpoint(&peer, endpoint, now);
                }
            }
        }
    }

    /// Stops the threads, then removes the rules and the interface.
    pub fn stop(mut self) -> Result<(), DaemonError> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut died = None;
        for (name, handle) in self.threads.drain(..) {
            if handle.join().is_err() {
                died = Some(name);
            }
        }
        drop(self.net.take());
        tracing::info!("stopped; interface and rules removed");
        match died {
            Some(name) => Err(DaemonError::ThreadDied(name)),
            None => Ok(()),
        }
    }

    /// Re-reads the configuration and hands the threads the SAs each peer
    /// should use; they add new SAs before old ones go (make-before-break).
    ///
    /// - A new inbound SA is accepted at once; the one it replaces keeps
    ///   accepting for `rekey_retire_secs`.
    /// - A new outbound SA waits until our new inbound SA for the peer
    ///   (the other half of the same roll) authenticates a packet, proof
    ///   that the peer has reloaded, or `rekey_switch_secs`; if our
    ///   inbound SA for the peer did not change, it replaces the old one
    ///   at once.
    ///
    /// So rolling both directions is one config edit and one SIGHUP per
    /// host, loss-free if the two reloads are less than
    /// `rekey_switch_secs` apart. A file the daemon cannot use changes
    /// nothing.
    ///
    /// The outcome says what was not applied and why; `applied` only if
    /// nothing was refused, in whole or in part. The stored configuration
    /// takes exactly the SAs the key manager now holds, so the next
    /// reload compares against what runs.
    pub fn reload(&mut self) -> ReloadOutcome {
        let mut refused = Vec::new();
        let result = self.try_reload(&mut refused);
        if let Err(e) = result {
            tracing::error!("reload failed, SAs unchanged: {e}");
            refused.insert(0, format!("{e}; nothing was changed"));
        }
        let outcome = ReloadOutcome {
            applied: refused.is_empty(),
            refused,
        };
        if outcome.applied {
            tracing::info!("reload applied");
        } else {
            tracing::error!("reload not (fully) applied: {}", outcome.refused.join("; "));
        }
        outcome
    }

    /// [`Self::reload`]'s work: `Err` when nothing could be applied;
    /// what was refused in part goes to `refused`.
    fn try_reload(&mut self, refused: &mut Vec<String>) -> Result<(), DaemonError> {
        let new = Config::load(&self.config_path)?;
        let fixed = |c: &Valid| {
            (
                c.interface.clone(),
                c.outer.encap,
                c.outer.fwmark,
                c.operations.state_dir.clone(),
                c.operations.control_socket.clone(),
                c.rekey,
                c.inner,
                c.reassembly,
            )
        };
        if fixed(&new) != fixed(&self.config) {
            let text = "changes to interface, mtu, outer_mtu, outer, port, state_dir, fwmark, \
                        control_socket, rekey_*, [inner] and [reassembly] settings need a restart: not applied \
                        (SA changes are)";
            tracing::warn!("reload: {text}");
            refused.push(text.to_string());
        }
        if new.ike_peers != self.config.ike_peers {
            let text = "changes to peers keyed by IKE ([peer.ike]) need a restart: not applied";
            tracing::warn!("reload: {text}");
            refused.push(text.to_string());
        }
        let addressing = |p: &ValidPeer| {
            (
                p.name.clone(),
                p.local,
                p.endpoint,
                p.inner_local,
                p.inner_remote,
            )
        };
        let mut peers = Vec::new();
        for peer in &new.peers {
            let Some(old) = self.config.peers.iter().find(|o| o.name == peer.name) else {
                tracing::warn!(peer = %peer.name, "reload: a new peer needs a restart; ignored");
                refused.push(format!(
                    "peer {}: a new peer needs a restart; not applied",
                    peer.name
                ));
                continue;
            };
            if addressing(old) != addressing(peer) {
                tracing::warn!(peer = %peer.name, "reload: changed addresses need a restart; this peer's SAs are unchanged");
                refused.push(format!(
                    "peer {}: changed addresses need a restart; this peer's SAs are unchanged",
                    peer.name
                ));
                continue;
            }
            for (was, now, direction) in [
                (&old.outbound, &peer.outbound, "outbound"),
                (&old.inbound, &peer.inbound, "inbound"),
            ] {
                if was.spi == now.spi
                    && was.key_file == now.key_file
                    && (was.icv != now.icv
                        || was.esn != now.esn
                        || was.replay_window != now.replay_window)
                {
                    tracing::warn!(peer = %peer.name, direction, "reload: icv, esn and replay_window apply to a new SA only (new SPI and key); unchanged");
                    refused.push(format!(
                        "peer {}, {direction} SA {:#x}: icv, esn and replay_window apply to a \
                         new SA only (new SPI and key); unchanged",
                        peer.name, now.spi
                    ));
                }
            }
            peers.push(sas::build_peer(&self.shared.selector, &self.config, peer)?);
        }
        for old in &self.config.peers {
            if !new.peers.iter().any(|p| p.name == old.name) {
                tracing::warn!(peer = %old.name, "reload: removing a peer needs a restart; it keeps running");
                refused.push(format!(
                    "peer {}: removing a peer needs a restart; it keeps running",
                    old.name
                ));
            }
        }
        sas::check_keys_distinct(&peers)?;
        // What each peer asks for, to see afterwards what the key manager
        // holds: (peer, outbound (spi, key), inbound (spi, key)).
        let wanted: Vec<_> = peers
            .iter()
            .map(|p| {
                (
                    p.peer.clone(),
                    p.outbound.as_ref().map(|o| (o.sa.spi, o.fingerprint())),
                    p.inbound.as_ref().map(|i| (i.sa.spi, i.fp.clone())),
                )
            })
            .collect();
        self.sas.begin();
        // Refusals are logged by the key manager; the rest is applied.
        for (peer, refusal) in self.sas.install(peers, Instant::now()) {
            refused.push(format!("peer {peer}: {refusal}; unchanged"));
        }
        // An outbound SA whose reservation cannot be claimed is refused by
        // its thread, after the fact: wait for the threads' word.
        refused.extend(self.sas.settle(control::RELOAD_SETTLE));
        for p in &mut self.config.peers {
            let Some(n) = new
                .peers
                .iter()
                .find(|n| n.name == p.name && addressing(n) == addressing(p))
            else {
                continue;
            };
            let Some((_, out, inb)) = wanted.iter().find(|(name, _, _)| *name == p.name) else {
                continue;
            };
            // A direction's settings are taken only when its SA is what
            // the key manager now holds (active, or pending a switch) and
            // is a new one (icv, esn and replay_window never change in
            // place).
            let held = |direction, want: &Option<(u32, crate::sa::reservation::Fingerprint)>| {
                want.as_ref()
                    .is_some_and(|(spi, fp)| self.sas.holds(&p.name, direction, *spi, fp))
            };
            let changed = |was: &crate::config::ValidSa, now: &crate::config::ValidSa| {
                was.spi != now.spi || was.key_file != now.key_file
            };
            if changed(&p.outbound, &n.outbound) && held(crate::sa::table::Direction::Outbound, out)
            {
                p.outbound = n.outbound.clone();
            }
            if changed(&p.inbound, &n.inbound) && held(crate::sa::table::Direction::Inbound, inb) {
                p.inbound = n.inbound.clone();
            }
        }
        Ok(())
    }
}

/// What the control thread answers with: the shared status, and reloads
/// handed to the main thread.
struct ControlBackend {
    shared: Arc<Shared>,
    reloads: mpsc::Sender<mpsc::Sender<ReloadOutcome>>,
}

impl control::Backend for ControlBackend {
    fn status_json(&self) -> String {
        self.shared.status_json()
    }

    fn metrics(&self) -> String {
        metrics::render(&self.shared.status())
    }

    fn reload(&self) -> mpsc::Receiver<ReloadOutcome> {
        let (tx, rx) = mpsc::channel();
        // A failed send (the main thread is gone: stopping) drops `tx`,
        // which the control thread reports.
        let _ = self.reloads.send(tx);
        rx
    }

    fn refused(&self) {
        status::IoCounters::add(&self.shared.io.connections_refused, 1);
    }

    fn ike_keys(&self) -> Zeroizing<String> {
        let records = self.shared.ike.key_records();
        let header = format!(
            "# ikev2_decryption_table: {} IKE SA(s)\n",
            records.lines().count()
        );
        secret_text(&header, &records)
    }

    fn esp_keys(&self) -> Zeroizing<String> {
        let records = self.shared.ike.esp_key_records();
        let header = format!(
            "# esp_sa: {} CHILD SA record(s)\n",
            records.lines().filter(|l| !l.starts_with('#')).count()
        );
        secret_text(&header, &records)
    }
}

/// `header` and `records` (without its trailing newline) in a buffer sized
/// once: no reallocation leaves a copy of a key behind.
fn secret_text(header: &str, records: &str) -> Zeroizing<String> {
    let body = records.trim_end();
    let mut out = Zeroizing::new(String::with_capacity(header.len() + body.len()));
    out.push_str(header);
    out.push_str(body);
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for (_, handle) in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}
