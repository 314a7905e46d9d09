//! The daemon's key manager: SAs built from the configuration, the
//! lifecycle's decisions ([`crate::sa::lifecycle`]) turned into commands
//! for the two datapath threads, which own the SA tables.
//!
//! The manager keeps the lifecycle's picture of both tables (no keys) and
//! is the only one that decides. The threads apply commands in order, each
//! batch at a batch edge; the outbound thread alone claims and extends
//! sequence reservations, after it has applied every removal sent before,
//! so no two SAs can ever draw on one key's nonce space.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use super::DaemonError;
use crate::config::{Valid, ValidPeer};
use crate::crypto::select::Selector;
use crate::keyfile;
use crate::sa::keymgr::{KeyManager, NewInbound, NewOutbound, PeerSas};
use crate::sa::lifecycle::{
    self, Action, Refusal, RemoveReason, SaView, Timing, WantedPeer, WantedSa,
};
use crate::sa::reservation::{self, Claim, Fingerprint, ReservationStore};
use crate::sa::table::{Direction, SaId, SaIds, SaMeta, SaState, SaTable};
use crate::sa::{InboundSa, InnerAddrs, KeyMaterial, OutboundSa, SaKeys};

/// A change to one thread's SA table.
pub(crate) enum SaCommand<New> {
    Install { id: SaId, new: New, meta: SaMeta },
    SetState { id: SaId, state: SaState },
    SetEndpoint { id: SaId, endpoint: SocketAddr },
    Remove { id: SaId },
}

impl<New> SaCommand<New> {
    /// Applies a change to an SA in `table`. An install is handed back for
    /// the thread to do: the outbound thread claims a reservation first.
    pub fn apply<S, C>(self, table: &mut SaTable<S, C>) -> Option<(SaId, New, SaMeta)> {
        match self {
            SaCommand::Install { id, new, meta } => return Some((id, new, meta)),
            SaCommand::SetState { id, state } => {
                if let Some(entry) = table.get_mut(id) {
                    entry.meta.state = state;
                }
            }
            SaCommand::SetEndpoint { id, endpoint } => {
                if let Some(entry) = table.get_mut(id) {
                    entry.meta.endpoint = endpoint;
                }
            }
            SaCommand::Remove { id } => {
                table.remove(id);
            }
        }
        None
    }
}

/// What a datapath thread tells the manager.
#[derive(Debug)]
pub(crate) enum SaEvent {
    /// The SA could not be installed (its reservation could not be
    /// claimed); it is not in the table. `reason` is for the operator.
    InstallFailed { id: SaId, reason: String },
    /// The SA is in the thread's table.
    Installed { id: SaId },
    /// The inbound SA authenticated its first packet: the peer uses it.
    Seen { id: SaId },
}

pub(crate) type OutboundCommands = Vec<SaCommand<NewOutbound>>;
pub(crate) type InboundCommands = Vec<SaCommand<InboundSa>>;

/// Drives [`lifecycle::plan`] and hands its actions to the threads.
pub(crate) struct SaManager {
    timing: Timing,
    views: Vec<SaView>,
    ids: SaIds,
    out_tx: Sender<OutboundCommands>,
    in_tx: Sender<InboundCommands>,
    events: Receiver<SaEvent>,
    /// Outbound switches made on the timeout: (peer, our new inbound SA,
    /// when to warn if the peer still has not used it).
    unconfirmed: Vec<(String, SaId, Instant)>,
    /// Installs sent since [`SaManager::begin`] that no thread has
    /// confirmed yet: (id, what to call it in a report).
    awaiting: Vec<(SaId, String)>,
    /// Installs sent since [`SaManager::begin`] that a thread refused.
    failed: Vec<String>,
    /// Keys of outbound SAs that have sent (were made active), newest
    /// last: such a key never comes back in a new SA, whose sequence
    /// numbers would start again (RFC 4106 section 2: a nonce must never
    /// repeat under one key). Manual keys have their durable
    /// reservations as well; IKE CHILD SAs rely on this alone.
    spent: Vec<Fingerprint>,
    /// How long a first outbound SA waits for the inbound thread to hold
    /// the inbound SA installed with it ([`INBOUND_FIRST`]).
    inbound_first: Duration,
}

/// At most this long the activation of a peer's first outbound SA waits
/// until the inbound thread confirms the inbound SA that came with it.
/// The two threads apply their commands independently: an outbound SA
/// active first lets our first packet (a TCP SYN) out, and the peer's
/// answer could arrive before our inbound SA is there (`unknown_spi`).
/// A rekeyed outbound SA needs no wait: it stays pending until the peer
/// is seen on the new inbound SA.
const INBOUND_FIRST: Duration = Duration::from_millis(500);

/// Spent outbound keys remembered: far more than the SAs one run
/// rotates through before a key could plausibly be offered again.
const SPENT_KEYS: usize = 4096;

impl SaManager {
    pub fn new(
        timing: Timing,
        out_tx: Sender<OutboundCommands>,
        in_tx: Sender<InboundCommands>,
        events: Receiver<SaEvent>,
    ) -> Self {
        SaManager {
            timing,
            views: Vec::new(),
            ids: SaIds::default(),
            out_tx,
            in_tx,
            events,
            unconfirmed: Vec::new(),
            awaiting: Vec::new(),
            failed: Vec::new(),
            spent: Vec::new(),
            inbound_first: INBOUND_FIRST,
        }
    }

    /// Waits, at most `timeout`, until the inbound thread has installed
    /// (or refused) each of `ids`, handling every event meanwhile.
    fn wait_installed(&mut self, ids: &[SaId], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = ids
                .iter()
                .any(|id| self.views.iter().any(|v| v.id == *id && !v.installed));
            if !pending {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.events.recv_timeout(left) {
                Ok(event) => self.handle(event),
                Err(_) => return,
            }
        }
    }

    fn take_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.handle(event);
        }
    }

    fn handle(&mut self, event: SaEvent) {
        match event {
            SaEvent::InstallFailed { id, reason } => {
                self.views.retain(|v| v.id != id);
                if let Some(i) = self.awaiting.iter().position(|(a, _)| *a == id) {
                    let (_, what) = self.awaiting.swap_remove(i);
                    self.failed.push(format!("{what}: {reason}"));
                }
            }
            SaEvent::Installed { id } => {
                self.awaiting.retain(|(a, _)| *a != id);
                if let Some(v) = self.views.iter_mut().find(|v| v.id == id) {
                    v.installed = true;
                }
            }
            SaEvent::Seen { id } => {
                if let Some(v) = self.views.iter_mut().find(|v| v.id == id) {
                    v.seen = true;
                }
            }
        }
    }

    /// Starts a change whose installs [`Self::settle`] will wait for.
    pub fn begin(&mut self) {
        self.take_events();
        self.awaiting.clear();
        self.failed.clear();
    }

    /// Waits (at most `timeout`) until the threads have applied every
    /// install sent since [`Self::begin`]; what they refused, and what
    /// they did not confirm in time.
    pub fn settle(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        self.take_events();
        while !self.awaiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => self.handle(event),
                Err(_) => break,
            }
        }
        let mut report = std::mem::take(&mut self.failed);
        for (_, what) in self.awaiting.drain(..) {
            report.push(format!(
                "{what}: the datapath did not confirm the install within {timeout:?}"
            ));
        }
        report
    }

    /// Whether the table holds (or is about to hold, pending) this SA.
    pub fn holds(&self, peer: &str, direction: Direction, spi: u32, fp: &Fingerprint) -> bool {
        self.views
            .iter()
            .any(|v| v.peer == peer && v.direction == direction && v.spi == spi && v.fp == *fp)
    }

    fn run(
        &mut self,
        wanted: &[WantedPeer],
        peers: Vec<PeerSas>,
        now: Instant,
    ) -> Vec<(String, Refusal)> {
        self.take_events();
        let actions = lifecycle::plan(wanted, &self.views, now, self.timing);
        let refused = self.dispatch(&actions, wanted, peers, now);
        self.check_unconfirmed(now);
        refused
    }

    /// A switch on the timeout is the normal end of a symmetric roll (each
    /// side waits for the other); it is a problem only if the peer then
    /// still does not use our new inbound SA, because then it has not
    /// reloaded and cannot open what we now send.
    fn check_unconfirmed(&mut self, now: Instant) {
        let views = &self.views;
        self.unconfirmed.retain(|(peer, inbound, warn_at)| {
            let Some(view) = views.iter().find(|v| v.id == *inbound) else {
                return false;
            };
            if view.seen {
                tracing::info!(peer = %peer, "the peer uses the new keys");
                return false;
            }
            if now < *warn_at {
                return true;
            }
            tracing::warn!(
                peer = %peer,
                spi = format_args!("{:#x}", view.spi),
                "the peer has sent nothing on our new inbound SA since we switched to the new \
                 outbound SA: it may not have reloaded, and cannot open what we send; reload it \
                 with the matching configuration"
            );
            false
        });
    }

    /// Applies `actions`: to the views here, and as commands to the
    /// threads (the inbound batch first, so a new inbound SA accepts
    /// before anything switches).
    fn dispatch(
        &mut self,
        actions: &[Action],
        wanted: &[WantedPeer],
        mut peers: Vec<PeerSas>,
        now: Instant,
    ) -> Vec<(String, Refusal)> {
        let mut out: OutboundCommands = Vec::new();
        let mut inb: InboundCommands = Vec::new();
        let mut refused = Vec::new();
        for action in actions {
            let direction = |id: SaId| self.views.iter().find(|v| v.id == id).map(|v| v.direction);
            match action {
                Action::Install {
                    peer,
                    direction,
                    state,
                    ..
                } => {
                    let Some(id) = lifecycle::apply(&mut self.views, action, wanted, &mut self.ids)
                    else {
                        continue;
                    };
                    let Some(view) = self.views.iter().find(|v| v.id == id) else {
                        continue;
                    };
                    let meta = SaMeta {
                        peer: peer.clone(),
                        endpoint: view.endpoint,
                        fp: view.fp.clone(),
                        state: *state,
                    };
                    let Some(p) = peers.iter_mut().find(|p| &p.peer == peer) else {
                        continue;
                    };
                    let what = format!("peer {peer}, {direction} SA {:#x}", view.spi);
                    if *direction == Direction::Outbound && *state == SaState::Active {
                        spend(&mut self.spent, &view.fp);
                    }
                    match direction {
                        Direction::Outbound => {
                            if let Some(new) = p.outbound.take() {
                                self.awaiting.push((id, what));
                                out.push(SaCommand::Install { id, new, meta });
                            }
                        }
                        Direction::Inbound => {
                            if let Some(new) = p.inbound.take() {
                                let spi = format_args!("{:#x}", new.sa.spi);
                                tracing::info!(peer = %peer, spi, "inbound SA accepting");
                                self.awaiting.push((id, what));
                                inb.push(SaCommand::Install {
                                    id,
                                    new: new.sa,
                                    meta,
                                });
                            }
                        }
                    }
                    continue;
                }
                Action::Switch {
                    peer,
                    from,
                    to,
                    forced,
                } => {
                    if *forced {
                        tracing::info!(
                            peer = %peer,
                            "no packet on our new inbound SA after {:?} (normal when both hosts \
                             rolled): switching outbound",
                            self.timing.switch_after
                        );
                        let awaited = self.views.iter().find(|v| v.id == *to).and_then(|v| match v
                            .state
                        {
                            SaState::Pending { awaiting, .. } => awaiting,
                            _ => None,
                        });
                        let inbound = self.views.iter().find(|v| {
                            v.direction == Direction::Inbound
                                && &v.peer == peer
                                && Some(v.spi) == awaited
                        });
                        if let Some(inbound) = inbound {
                            self.unconfirmed.push((
                                peer.clone(),
                                inbound.id,
                                now + self.timing.switch_after,
                            ));
                        }
                    }
                    if let Some(from) = from {
                        out.push(SaCommand::Remove { id: *from });
                    }
                    if let Some(v) = self.views.iter().find(|v| v.id == *to) {
                        spend(&mut self.spent, &v.fp);
                    }
                    out.push(SaCommand::SetState {
                        id: *to,
                        state: SaState::Active,
                    });
                }
                Action::Retire { id, at } => inb.push(SaCommand::SetState {
                    id: *id,
                    state: SaState::Retiring { at: *at },
                }),
                Action::Reactivate { id } => inb.push(SaCommand::SetState {
                    id: *id,
                    state: SaState::Active,
                }),
                Action::Remove { id, reason } => {
                    let Some(view) = self.views.iter().find(|v| v.id == *id) else {
                        continue;
                    };
                    let spi = format_args!("{:#x}", view.spi);
                    match reason {
                        RemoveReason::Retired => {
                            tracing::info!(peer = %view.peer, spi, "retired inbound SA")
                        }
                        RemoveReason::KeyChangedInPlace => tracing::warn!(
                            peer = %view.peer,
                            spi,
                            "reload changed the key of an inbound SPI in place: replaced at once \
                             (use a new SPI to roll keys without loss)"
                        ),
                        RemoveReason::Cancelled => {
                            tracing::info!(peer = %view.peer, spi, "pending outbound SA cancelled")
                        }
                        RemoveReason::Replaced | RemoveReason::Deleted => {
                            tracing::info!(peer = %view.peer, spi, direction = %view.direction, "SA removed")
                        }
                    }
                    match direction(*id) {
                        Some(Direction::Outbound) => out.push(SaCommand::Remove { id: *id }),
                        Some(Direction::Inbound) => inb.push(SaCommand::Remove { id: *id }),
                        None => {}
                    }
                }
                Action::SetEndpoint { id, endpoint } => match direction(*id) {
                    Some(Direction::Outbound) => out.push(SaCommand::SetEndpoint {
                        id: *id,
                        endpoint: *endpoint,
                    }),
                    Some(Direction::Inbound) => inb.push(SaCommand::SetEndpoint {
                        id: *id,
                        endpoint: *endpoint,
                    }),
                    None => {}
                },
                Action::Refuse { peer, refusal } => {
                    tracing::error!(peer = %peer, "{refusal}. Unchanged");
                    refused.push((peer.clone(), refusal.clone()));
                }
            }
            lifecycle::apply(&mut self.views, action, wanted, &mut self.ids);
        }
        // A send fails only if the thread is gone, which the main loop
        // notices and reports.
        let new_inbound: Vec<SaId> = inb
            .iter()
            .filter_map(|c| match c {
                SaCommand::Install { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let activates = out
            .iter()
            .any(|c| matches!(c, SaCommand::Install { meta, .. } if meta.state == SaState::Active));
        if !inb.is_empty() {
            let _ = self.in_tx.send(inb);
        }
        if activates && !new_inbound.is_empty() {
            self.wait_installed(&new_inbound, self.inbound_first);
        }
        if !out.is_empty() {
            let _ = self.out_tx.send(out);
        }
        refused
    }
}

impl KeyManager for SaManager {
    fn install(&mut self, mut peers: Vec<PeerSas>, now: Instant) -> Vec<(String, Refusal)> {
        // A key without a durable reservation (an IKE CHILD SA's; manual
        // keys come from a file and have one) that sent before may only
        // stay in the SA that sent with it (the install changes nothing
        // there).
        let mut spent = Vec::new();
        peers.retain(|p| {
            let Some(o) = &p.outbound else {
                return true;
            };
            let fp = o.fingerprint();
            let same = |v: &SaView| {
                v.peer == p.peer
                    && v.direction == Direction::Outbound
                    && v.spi == o.sa.spi
                    && v.fp == fp
            };
            if o.key_file.is_none() && self.spent.contains(&fp) && !self.views.iter().any(same) {
                tracing::error!(peer = %p.peer, spi = format_args!("{:#x}", o.sa.spi), "refused: the outbound key sent before");
                spent.push((p.peer.clone(), Refusal::KeySpent { spi: o.sa.spi }));
                return false;
            }
            true
        });
        let wanted: Vec<WantedPeer> = peers
            .iter()
            .map(|p| WantedPeer {
                peer: p.peer.clone(),
                endpoint: p.endpoint,
                outbound: p.outbound.as_ref().map(|o| WantedSa {
                    spi: o.sa.spi,
                    fp: o.fingerprint(),
                }),
                inbound: p.inbound.as_ref().map(|i| WantedSa {
                    spi: i.sa.spi,
                    fp: i.fp.clone(),
                }),
            })
            .collect();
        spent.extend(self.run(&wanted, peers, now));
        spent
    }

    fn delete(&mut self, peer: &str, direction: Direction, spi: u32, now: Instant) {
        let mut actions = Vec::new();
        let mut hurry = None;
        for v in self
            .views
            .iter()
            .filter(|v| v.peer == peer && v.direction == direction && v.spi == spi)
        {
            match (direction, v.state) {
                // Replaced by a rekey and retiring already: it keeps
                // accepting what the peer sealed before it switched, for a
                // short while (strongSwan's `delete_rekeyed_delay` does
                // the same), then goes.
                (Direction::Inbound, SaState::Retiring { at }) => {
                    let soon = now + DELETED_GRACE;
                    if at > soon {
                        actions.push(Action::Retire { id: v.id, at: soon });
                    }
                }
                // Its successor is pending: the Delete proves the peer
                // negotiated the new SA (the rekey exchange is over), so the
                // successor takes over soon rather than leaving the peer
                // without an outbound SA. Not at once: the peer's IKE
                // thread may send its Delete before its own datapath has
                // installed the new inbound SA, and packets sealed with it
                // would then meet an unknown SPI there. The old SA stays
                // valid at the peer for its grace (DELETED_GRACE).
                (Direction::Outbound, SaState::Active)
                    if self.views.iter().any(|o| pending_successor(o, v)) =>
                {
                    hurry = Some(v.peer.clone());
                }
                _ => actions.push(Action::Remove {
                    id: v.id,
                    reason: RemoveReason::Deleted,
                }),
            }
        }
        if let Some(peer) = hurry {
            for o in self.views.iter_mut() {
                if o.peer == peer
                    && o.direction == Direction::Outbound
                    && let SaState::Pending { since, awaiting } = o.state
                {
                    // It switches when the peer is seen on our new inbound
                    // SA, or HURRY_AFTER_DELETE from now at the latest.
                    let hurried = (now + HURRY_AFTER_DELETE)
                        .checked_sub(self.timing.switch_after)
                        .unwrap_or(since);
                    o.state = SaState::Pending {
                        since: since.min(hurried),
                        awaiting,
                    };
                }
            }
        }
        self.dispatch(&actions, &[], Vec::new(), now);
        self.expire(now);
    }

    fn update_endpoint(&mut self, peer: &str, endpoint: SocketAddr, now: Instant) {
        let actions: Vec<_> = self
            .views
            .iter()
            .filter(|v| v.peer == peer && v.endpoint != endpoint)
            .map(|v| Action::SetEndpoint { id: v.id, endpoint })
            .collect();
        self.dispatch(&actions, &[], Vec::new(), now);
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        self.run(&[], Vec::new(), now);
    }
}

/// How long after the peer's Delete of the SA it replaces a pending
/// outbound SA switches at the latest if the peer has not been seen on our
/// new inbound SA: far longer than the peer needs to install its new
/// inbound SA after sending its Delete, far shorter than [`DELETED_GRACE`].
const HURRY_AFTER_DELETE: Duration = Duration::from_secs(1);

/// How long an inbound SA that a rekey replaced still accepts after the
/// peer deleted it: packets it sealed just before its Delete may still be
/// queued on either host.
const DELETED_GRACE: Duration = Duration::from_secs(5);

fn spend(spent: &mut Vec<Fingerprint>, fp: &Fingerprint) {
    if !spent.contains(fp) {
        if spent.len() >= SPENT_KEYS {
            spent.remove(0);
        }
        spent.push(fp.clone());
    }
}

/// `o` is the pending outbound SA of `active`'s peer, which replaces it.
fn pending_successor(o: &SaView, active: &SaView) -> bool {
    o.peer == active.peer
        && o.direction == Direction::Outbound
        && o.id != active.id
        && matches!(o.state, SaState::Pending { .. })
}

fn load_material(peer: &ValidPeer, path: &Path) -> Result<KeyMaterial, DaemonError> {
    keyfile::load(path).map_err(|source| DaemonError::Key {
        peer: peer.name.clone(),
        source,
    })
}

/// The peer's outer address (raw ESP has no ports; the socket ignores
/// this one).
pub(crate) fn endpoint(peer: &ValidPeer, config: &Valid) -> SocketAddr {
    let port = config.outer.encap.port().unwrap_or(0);
    SocketAddr::new(peer.endpoint, port)
}

/// Builds a peer's SAs, each from one read of its key file. `running`
/// gives the outer settings (fixed for the life of the process).
pub(crate) fn build_peer(
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
    let inbound = NewInbound {
        sa,
        fp: Fingerprint::new(&material),
    };

    let cfg = &peer.outbound;
    let material = load_material(peer, &cfg.key_file)?;
    let keys = SaKeys::new(selector, &material, cfg.icv).map_err(sa_err("outbound", cfg.spi))?;
    let sa = OutboundSa::new(cfg.spi, keys, cfg.esn, inner).map_err(sa_err("outbound", cfg.spi))?;
    Ok(PeerSas {
        peer: peer.name.clone(),
        endpoint: endpoint(peer, running),
        outbound: Some(NewOutbound {
            sa,
            material,
            key_file: Some(cfg.key_file.clone()),
            claimed: false,
        }),
        inbound: Some(inbound),
    })
}

/// Refuses one key material in two places of one configuration: two SAs
/// over one key share a nonce space (the SPI is not in the nonce), and so
/// do the two directions.
pub(crate) fn check_keys_distinct(peers: &[PeerSas]) -> Result<(), DaemonError> {
    let mut seen: Vec<(Fingerprint, String)> = Vec::new();
    for p in peers {
        let out = p.outbound.as_ref().map(|o| {
            (
                o.fingerprint(),
                format!("peer {} outbound SA {:#x}", p.peer, o.sa.spi),
            )
        });
        let inb = p.inbound.as_ref().map(|i| {
            (
                i.fp.clone(),
                format!("peer {} inbound SA {:#x}", p.peer, i.sa.spi),
            )
        });
        for (fp, what) in out.into_iter().chain(inb) {
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
    peer: &str,
    new: &mut NewOutbound,
) -> Result<(), DaemonError> {
    let fp = new.fingerprint();
    let spi = new.sa.spi;
    let claim = store
        .claim(&fp, &new.material, &mut new.sa, reservation::DEFAULT_BLOCK)
        .map_err(|source| DaemonError::Reservation {
            peer: peer.to_string(),
            spi,
            key_file: new.key_file.clone().unwrap_or_default(),
            source,
        })?;
    new.claimed = true;
    let spi = format_args!("{spi:#x}");
    match claim {
        Claim::Fresh => tracing::info!(
            peer,
            spi,
            "outbound key is fresh: starting at sequence number 1"
        ),
        Claim::Resumed { after } => {
            tracing::info!(peer, spi, "resuming above the recorded reservation {after}")
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "sas_tests.rs"]
mod tests;
