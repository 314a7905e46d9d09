//! Building the IKE thread before anything on the system changes: its
//! sockets, each peer's configuration, and the worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::super::DaemonError;
use super::super::shared::Shared;
use super::super::workers::Sockets;
use super::{
    ChildUpdate, CookieCounters, IkeConfig, IkeCounters, IkeDatagram, IkeQueue, IkeShared,
    IkeWorker, PeerIke, QUEUE, RETRY_FIRST, Setup, Via, Wired, ike_config, policy,
};
use crate::config::IkePeer;
use crate::ike::cookie::{CookieGate, CookiePolicy};
use crate::ike::crypto::SystemRandomness;
use crate::ike::sa::NATT_PORT;
use crate::io::ike_socket::{IKE_PORT, IkeSocket};
use crate::wire::outer::Encap;

impl Setup {
    /// `None` without peers keyed by IKE.
    pub fn open(config: &crate::config::Config) -> Result<Option<Setup>, DaemonError> {
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
            let ike = ike_config(peer).map_err(|source| DaemonError::Psk {
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
}
