//! `esptun run`: the TUN device and outer sockets around the datapath.
//!
//! Plain threads: one outbound loop (TUN -> ESP -> socket), one inbound
//! loop (sockets -> ESP -> TUN), one control-socket thread, and the main
//! thread waiting for signals. The datapath threads own their SAs; the
//! main thread hands them changes at reload over channels, and they
//! publish SA state for `status` a few times a second. Both datapath
//! threads run the long-message self-test at the configured interval
//! themselves, so the check sees the SIMD state of the threads that carry
//! traffic.

pub mod capture;
pub mod control;
pub mod metrics;
pub mod netcfg;
pub mod notify;
pub mod signals;
pub mod status;
mod workers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError, Valid, ValidPeer};
use crate::crypto::Provider;
use crate::crypto::select::{BootOptions, Selector};
use crate::datapath::Counters;
use crate::io::IoSetupError;
use crate::io::socket::OuterSocket;
use crate::io::tun::Tun;
use crate::keyfile::{self, KeyFileError};
use crate::sa::reservation::{self, Claim, Fingerprint, ReservationError, ReservationStore};
use crate::sa::{InboundSa, InnerAddrs, KeyMaterial, OutboundSa, SaError, SaKeys};
use crate::wire::inner::InnerPolicy;
use crate::wire::outer::Encap;
use control::{ControlError, ControlSocket};
use netcfg::{NetConfig, NetError};
use signals::{Signal, Signals};
use status::{InboundSaStatus, IoCounters, OutboundSaStatus, Status};

/// Why the daemon cannot start (or reload).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "esptun run needs root (CAP_NET_ADMIN for the TUN device, routes and rules; CAP_NET_RAW \
         for raw ESP): run it as root, or from the systemd unit"
    )]
    NotRoot,
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
}

/// What the outbound thread keeps beside each SA.
#[derive(Debug, Clone)]
pub(crate) struct OutMeta {
    pub peer: String,
    pub endpoint: SocketAddr,
    /// Names the key's nonce space (and its reservation record).
    pub fp: Fingerprint,
    pub key_file: PathBuf,
}

/// What the inbound thread keeps beside each SA.
#[derive(Debug, Clone)]
pub(crate) struct InMeta {
    pub peer: String,
    pub fp: Fingerprint,
    /// Set once the SA has authenticated a packet: the peer is using it.
    pub seen: Arc<AtomicBool>,
    /// For an SA replaced by a reload: when it stops accepting.
    pub retire_at: Option<Instant>,
}

/// The outbound SA a reload wants for a peer. Not yet claimed: only the
/// outbound thread, which owns the SAs using them, claims or extends
/// sequence reservations once the daemon runs, so no two SAs can ever
/// draw on one key's nonce space.
pub(crate) struct NewOutbound {
    pub sa: OutboundSa,
    pub meta: OutMeta,
    pub material: KeyMaterial,
    /// Replaces the peer's current SA once this is set (or after
    /// `rekey_switch_secs`); `None`: at once.
    pub switch_when: Option<Arc<AtomicBool>>,
}

/// The outbound SA each listed peer should use; the thread reconciles.
pub(crate) struct OutboundPlan {
    pub desired: Vec<NewOutbound>,
}

/// The inbound SA each listed peer should use; the thread reconciles
/// (others of the peer retire).
pub(crate) struct InboundPlan {
    pub desired: Vec<(InboundSa, InMeta)>,
}

/// State shared by all threads.
pub(crate) struct Shared {
    pub stop: AtomicBool,
    pub selector: Selector,
    pub started: Instant,
    pub selftest_interval: Duration,
    /// `rekey_switch_secs`: how long a replaced outbound SA keeps sending
    /// while waiting for the first packet on the peer's new SA (proof that
    /// the peer has reloaded and holds our new key as its inbound key).
    pub rekey_switch: Duration,
    /// `rekey_retire_secs`: how long a replaced inbound SA keeps accepting,
    /// so packets the peer sealed before it switched still arrive.
    pub rekey_retire: Duration,
    pub out_counters: Arc<Counters>,
    pub in_counters: Arc<Counters>,
    pub io: IoCounters,
    pub out_status: Mutex<Vec<OutboundSaStatus>>,
    pub in_status: Mutex<Vec<InboundSaStatus>>,
    pub interface: String,
    pub outer: Encap,
    /// `[inner]`: the checksum policy both pipelines apply.
    pub inner: InnerPolicy,
}

impl Shared {
    fn status(&self) -> Status {
        fn lock<T: Clone>(m: &Mutex<Vec<T>>) -> Vec<T> {
            m.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
        Status {
            interface: self.interface.clone(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            outer: self.outer,
            provider: self.selector.active(),
            crypto_mode: self.selector.mode(),
            on_selftest_failure: self.selector.policy(),
            providers: self.selector.reports().iter().map(Into::into).collect(),
            selftest_history: self.selector.history().iter().map(Into::into).collect(),
            outbound: status::DirectionStatus::of(&self.out_counters),
            inbound: status::DirectionStatus::of(&self.in_counters),
            io: self.io.snapshot(),
            outbound_sas: lock(&self.out_status),
            inbound_sas: lock(&self.in_status),
        }
    }

    fn status_json(&self) -> String {
        serde_json::to_string(&self.status())
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
    }
}

/// Start-up knobs that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// (rate, seed): wraps the hardware provider so that, once the boot
    /// self-tests have passed, it corrupts a 16-byte plaintext block before
    /// sealing at this rate (feature `fault-injection`; tests only).
    #[cfg(feature = "fault-injection")]
    pub inject_faults: Option<(f64, u64)>,
}

/// A running daemon.
pub struct Daemon {
    config_path: PathBuf,
    config: Valid,
    shared: Arc<Shared>,
    out_tx: mpsc::Sender<OutboundPlan>,
    in_tx: mpsc::Sender<InboundPlan>,
    /// The inbound SA last asked for, by peer: (peer, key, SPI).
    inbound_wanted: Vec<(String, Fingerprint, u32)>,
    threads: Vec<(&'static str, JoinHandle<()>)>,
    net: Option<NetConfig>,
    /// Held for the life of the process: one daemon per state directory.
    _state_lock: std::fs::File,
}

/// One peer's SAs as built from the configuration (outbound not claimed).
struct PeerSas {
    outbound: (OutboundSa, OutMeta, KeyMaterial),
    inbound: (InboundSa, InMeta),
}

fn load_material(peer: &ValidPeer, path: &Path) -> Result<KeyMaterial, DaemonError> {
    keyfile::load(path).map_err(|source| DaemonError::Key {
        peer: peer.name.clone(),
        source,
    })
}

fn endpoint(peer: &ValidPeer, config: &Valid) -> SocketAddr {
    // Raw ESP has no ports; the socket ignores this one.
    let port = config.outer.encap.port().unwrap_or(0);
    SocketAddr::new(peer.endpoint, port)
}

/// Builds a peer's SAs, each from one read of its key file. `running`
/// gives the outer settings (fixed for the life of the process).
fn build_peer(
    selector: &Selector,
    running: &Valid,
    peer: &ValidPeer,
) -> Result<PeerSas, DaemonError> {
    let sa_err = |direction, spi| {
        move |source| DaemonError::Sa {
            peer: peer.name.clone(),
            direction,
            spi,
            source,
        }
    };
    let inner = InnerAddrs::new(peer.inner_local, peer.inner_remote)
        .map_err(sa_err("outbound", peer.outbound.spi))?;

    let cfg = &peer.inbound;
    let material = load_material(peer, &cfg.key_file)?;
    let keys = SaKeys::new(selector, &material, cfg.icv).map_err(sa_err("inbound", cfg.spi))?;
    let sa = InboundSa::new(cfg.spi, keys, cfg.esn, inner, cfg.replay_window)
        .map_err(sa_err("inbound", cfg.spi))?;
    let inbound = (
        sa,
        InMeta {
            peer: peer.name.clone(),
            fp: Fingerprint::new(&material),
            seen: Arc::new(AtomicBool::new(false)),
            retire_at: None,
        },
    );

    let cfg = &peer.outbound;
    let material = load_material(peer, &cfg.key_file)?;
    let keys = SaKeys::new(selector, &material, cfg.icv).map_err(sa_err("outbound", cfg.spi))?;
    let sa = OutboundSa::new(cfg.spi, keys, cfg.esn, inner).map_err(sa_err("outbound", cfg.spi))?;
    let meta = OutMeta {
        peer: peer.name.clone(),
        endpoint: endpoint(peer, running),
        fp: Fingerprint::new(&material),
        key_file: cfg.key_file.clone(),
    };
    Ok(PeerSas {
        outbound: (sa, meta, material),
        inbound,
    })
}

/// Refuses one key material in two places: two SAs over one key share a
/// nonce space (the SPI is not in the nonce), and so do the two directions.
fn check_keys_distinct(peers: &[PeerSas]) -> Result<(), DaemonError> {
    let mut seen: Vec<(&Fingerprint, String)> = Vec::new();
    for p in peers {
        let (out, inb) = (&p.outbound, &p.inbound);
        for (fp, what) in [
            (
                &out.1.fp,
                format!("peer {} outbound SA {:#x}", out.1.peer, out.0.spi),
            ),
            (
                &inb.1.fp,
                format!("peer {} inbound SA {:#x}", inb.1.peer, inb.0.spi),
            ),
        ] {
            if let Some((_, first)) = seen.iter().find(|(f, _)| *f == fp) {
                return Err(DaemonError::SharedKey {
                    first: first.clone(),
                    second: what,
                });
            }
            seen.push((fp, what));
        }
    }
    Ok(())
}

/// Claims an outbound SA's first reservation (see
/// [`ReservationStore::claim`]), logging how it starts.
pub(crate) fn claim(
    store: &ReservationStore,
    sa: &mut OutboundSa,
    meta: &OutMeta,
    material: &KeyMaterial,
) -> Result<(), DaemonError> {
    let claim = store
        .claim(&meta.fp, material, sa, reservation::DEFAULT_BLOCK)
        .map_err(|source| DaemonError::Reservation {
            peer: meta.peer.clone(),
            spi: sa.spi,
            key_file: meta.key_file.clone(),
            source,
        })?;
    let spi = format_args!("{:#x}", sa.spi);
    match claim {
        Claim::Fresh => tracing::info!(
            peer = %meta.peer,
            spi,
            "outbound key is fresh: starting at sequence number 1"
        ),
        Claim::Resumed { after } => tracing::info!(
            peer = %meta.peer,
            spi,
            "resuming above the recorded reservation {after}"
        ),
    }
    Ok(())
}

fn outer_sockets(config: &Valid) -> Result<workers::Sockets, DaemonError> {
    let encap = config.outer.encap;
    let needs = |v6: bool| config.peers.iter().any(|p| p.endpoint.is_ipv6() == v6);
    let open = |v6: bool| -> Result<Option<OuterSocket>, DaemonError> {
        if needs(v6) {
            Ok(Some(OuterSocket::open(
                encap,
                v6,
                Some(config.outer.fwmark),
            )?))
        } else {
            Ok(None)
        }
    };
    Ok(workers::Sockets {
        v4: open(false)?,
        v6: open(true)?,
        encap,
    })
}

impl Daemon {
    /// Boots the providers, loads and claims SAs, opens the sockets,
    /// brings the interface up and starts the threads. Nothing is left
    /// behind on error.
    pub fn start(config_path: &Path, options: &RunOptions) -> Result<Daemon, DaemonError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(DaemonError::NotRoot);
        }
        let config = Config::load(config_path)?;
        let providers = Provider::detect_all();
        // The field failure: hardware that passes its boot tests and then
        // corrupts blocks while running. The injector starts clean and is
        // switched on once the boot self-tests have passed.
        #[cfg(feature = "fault-injection")]
        let mut injector = None;
        #[cfg(feature = "fault-injection")]
        let providers = providers.map(|p| match options.inject_faults {
            Some((_, seed)) if p.id == crate::crypto::ProviderId::Hardware && p.is_available() => {
                let (p, handle) = crate::crypto::fault::wrap(p, 0.0, seed);
                injector = Some(handle);
                p
            }
            _ => p,
        });
        #[cfg(not(feature = "fault-injection"))]
        let _ = options;
        let selector = Selector::boot(
            providers,
            config.crypto.mode,
            config.crypto.on_selftest_failure,
            BootOptions::default(),
        );
        #[cfg(feature = "fault-injection")]
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
        let control = ControlSocket::bind(&config.operations.control_socket)?;
        let metrics = config
            .operations
            .metrics_listen
            .map(metrics::MetricsServer::bind)
            .transpose()?;
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
            peers.push(build_peer(&selector, &config, peer)?);
        }
        check_keys_distinct(&peers)?;
        for p in &mut peers {
            let (sa, meta, material) = &mut p.outbound;
            claim(&store, sa, meta, material)?;
        }
        let tun = Tun::create(&config.interface.name)?;
        let net = NetConfig::apply(&config, tun.name()).map_err(|source| DaemonError::Net {
            interface: config.interface.name.clone(),
            source,
        })?;

        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            selector,
            started: Instant::now(),
            selftest_interval: config.crypto.selftest_interval,
            rekey_switch: config.rekey.switch,
            rekey_retire: config.rekey.retire,
            out_counters: Arc::new(Counters::default()),
            in_counters: Arc::new(Counters::default()),
            io: IoCounters::default(),
            out_status: Mutex::new(Vec::new()),
            in_status: Mutex::new(Vec::new()),
            interface: tun.name().to_string(),
            outer: config.outer.encap,
            inner: config.inner,
        });

        let inbound_wanted = peers
            .iter()
            .map(|p| {
                (
                    p.inbound.1.peer.clone(),
                    p.inbound.1.fp.clone(),
                    p.inbound.0.spi,
                )
            })
            .collect();
        let (out_sas, in_sas): (Vec<_>, Vec<_>) = peers
            .into_iter()
            .map(|p| ((p.outbound.0, p.outbound.1), p.inbound))
            .unzip();
        let tun = Arc::new(tun);
        let sockets = Arc::new(sockets);
        let (out_tx, out_rx) = mpsc::channel();
        let (in_tx, in_rx) = mpsc::channel();
        let mut daemon = Daemon {
            config_path: config_path.to_path_buf(),
            config,
            shared: shared.clone(),
            out_tx,
            in_tx,
            inbound_wanted,
            threads: Vec::new(),
            net: Some(net),
            _state_lock: state_lock,
        };
        let outbound = workers::OutboundWorker::new(
            shared.clone(),
            tun.clone(),
            sockets.clone(),
            store,
            out_sas,
            out_rx,
        );
        let inbound =
            workers::InboundWorker::new(shared.clone(), tun, sockets, in_sas, in_rx, drop_capture);
        daemon.spawn("outbound", move || outbound.run())?;
        daemon.spawn("inbound", move || inbound.run())?;
        let control_shared = shared;
        daemon.spawn("control", move || {
            while !control_shared.stop.load(Ordering::Relaxed) {
                control.serve_pending(&|| control_shared.status_json());
                if let Some(m) = &metrics {
                    m.serve_pending(&|| control_shared.status());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })?;
        tracing::info!(
            interface = %daemon.shared.interface,
            mtu = daemon.config.interface.mtu,
            outer = %daemon.shared.outer,
            peers = daemon.config.peers.len(),
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
            match signals.wait(Duration::from_millis(500)) {
                Some(Signal::Stop) => {
                    tracing::info!("stopping");
                    if let Err(e) = notify::notify("STOPPING=1") {
                        tracing::warn!("telling the service manager we stop: {e}");
                    }
                    return self.stop();
                }
                Some(Signal::Reload) => match self.reload() {
                    Ok(()) => {}
                    Err(e) => tracing::error!("reload failed, SAs unchanged: {e}"),
                },
                None => {}
            }
            if let Some((name, _)) = self.threads.iter().find(|(_, h)| h.is_finished()) {
                let name = *name;
                self.stop()?;
                return Err(DaemonError::ThreadDied(name));
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
    pub fn reload(&mut self) -> Result<(), DaemonError> {
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
            )
        };
        if fixed(&new) != fixed(&self.config) {
            tracing::warn!(
                "reload: changes to interface, mtu, outer_mtu, outer, port, state_dir, fwmark, \
                 control_socket, rekey_* and [inner] settings need a restart; applying SA changes only"
            );
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
                continue;
            };
            if addressing(old) != addressing(peer) {
                tracing::warn!(peer = %peer.name, "reload: changed addresses need a restart; this peer's SAs are unchanged");
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
                }
            }
            peers.push(build_peer(&self.shared.selector, &self.config, peer)?);
        }
        for old in &self.config.peers {
            if !new.peers.iter().any(|p| p.name == old.name) {
                tracing::warn!(peer = %old.name, "reload: removing a peer needs a restart; it keeps running");
            }
        }
        check_keys_distinct(&peers)?;

        let mut out_plan = OutboundPlan {
            desired: Vec::new(),
        };
        let mut in_plan = InboundPlan {
            desired: Vec::new(),
        };
        for p in peers {
            let (in_sa, in_meta) = p.inbound;
            let (out_sa, out_meta, material) = p.outbound;
            let wanted = (in_meta.peer.clone(), in_meta.fp.clone(), in_sa.spi);
            let inbound_changed = !self.inbound_wanted.contains(&wanted);
            let switch_when = inbound_changed.then(|| in_meta.seen.clone());
            self.inbound_wanted.retain(|w| w.0 != wanted.0);
            self.inbound_wanted.push(wanted);
            in_plan.desired.push((in_sa, in_meta));
            out_plan.desired.push(NewOutbound {
                sa: out_sa,
                meta: out_meta,
                material,
                switch_when,
            });
        }
        self.in_tx
            .send(in_plan)
            .map_err(|_| DaemonError::ThreadDied("inbound"))?;
        self.out_tx
            .send(out_plan)
            .map_err(|_| DaemonError::ThreadDied("outbound"))?;
        for p in &mut self.config.peers {
            if let Some(n) = new
                .peers
                .iter()
                .find(|n| n.name == p.name && addressing(n) == addressing(p))
            {
                p.outbound = n.outbound.clone();
                p.inbound = n.inbound.clone();
            }
        }
        tracing::info!("reload handed to the datapath threads");
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for (_, handle) in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}
