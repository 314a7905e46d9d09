//! The SA lifecycle as a pure function: what the key manager wants (one
//! outbound and one inbound SA per peer), what the table holds, and the
//! time, in; the actions that reconcile them, out. No clock, no I/O, no
//! keys: the caller applies the actions to the datapath's tables, so every
//! rule here runs in unit tests on a fake clock.
//!
//! The rules (make-before-break, as Linux `xfrm` with an IKE daemon does
//! it, RFC 7296 section 1.3.3 and 2.8):
//! - A new inbound SA is accepted at once; the peer's inbound SA it
//!   replaces keeps accepting until `retire_after` has passed, so packets
//!   the peer sealed before it switched still arrive.
//! - A new outbound SA that replaces a running one waits ("pending") until
//!   the datapath confirms it installed it (its sequence reservation is
//!   claimed: a refused claim leaves the running SA sending). While our
//!   inbound SA for the peer is new as well it also waits for the peer to
//!   prove it holds our new key by sending on it (the inbound SA is
//!   "seen"), or for `switch_after`; then it replaces the peer's active
//!   outbound SA. If our inbound SA did not change, it switches as soon as
//!   it is installed.
//! - A roll reverted before its switch keeps the running SA and cancels the
//!   pending one; an inbound SA asked for again while retiring is kept.
//! - One key, one SA: GCM nonces are salt || sequence number, with no SPI
//!   in them, so a key in two SAs, or in both directions, would reuse
//!   nonces. A wanted SA whose key is held by any other SA, wanted or live
//!   (in any state), is refused; the peer's running SAs stay as they are.
//! - An inbound SPI names one SA: a wanted SPI held by another peer is
//!   refused; the same SPI with a new key replaces the old SA at once (a
//!   roll without loss needs a new SPI).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::reservation::Fingerprint;
use super::table::{Direction, SaId, SaState};

/// One SA the key manager wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedSa {
    pub spi: u32,
    pub fp: Fingerprint,
}

/// What the key manager wants for one peer. A direction left `None` gets
/// no SA: those the peer has are removed at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedPeer {
    pub peer: String,
    /// Where the peer's ESP packets go.
    pub endpoint: SocketAddr,
    pub outbound: Option<WantedSa>,
    pub inbound: Option<WantedSa>,
}

impl WantedPeer {
    pub fn sa(&self, direction: Direction) -> Option<&WantedSa> {
        match direction {
            Direction::Outbound => self.outbound.as_ref(),
            Direction::Inbound => self.inbound.as_ref(),
        }
    }
}

/// One SA of the table, as the lifecycle sees it: no keys, no counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaView {
    pub id: SaId,
    pub direction: Direction,
    pub peer: String,
    pub spi: u32,
    pub fp: Fingerprint,
    pub endpoint: SocketAddr,
    pub state: SaState,
    /// Inbound: has authenticated at least one packet.
    pub seen: bool,
    /// The datapath has it in its table (for an outbound SA: its sequence
    /// numbers are reserved). Until then a pending SA cannot switch, so a
    /// refused install leaves the running SA in place.
    pub installed: bool,
}

/// The two delays of a roll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `rekey_switch_secs`: how long a pending outbound SA waits for the
    /// peer to use our new inbound SA.
    pub switch_after: Duration,
    /// `rekey_retire_secs`: how long a replaced inbound SA keeps accepting.
    pub retire_after: Duration,
}

/// Why a wanted SA was not installed. The running SAs are unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the new {direction} SA {spi:#x} uses the key of the SA {holder_spi:#x} ({holder_direction}) \
         of peer {holder_peer}, which is still in use: two SAs on one key would reuse GCM nonces; \
         give every new SA a new key (esptun genkey)"
    )]
    KeyInUse {
        direction: Direction,
        spi: u32,
        holder_peer: String,
        holder_direction: Direction,
        holder_spi: u32,
    },
    #[error(
        "inbound SPI {spi:#x} already belongs to peer {holder_peer}: every inbound SA needs its own SPI"
    )]
    SpiInUse { spi: u32, holder_peer: String },
    #[error(
        "the new outbound SA {spi:#x} uses a key that an earlier outbound SA sent with: its \
         sequence numbers would start again and reuse GCM nonces"
    )]
    KeySpent { spi: u32 },
}

/// Why an SA leaves the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its retirement time passed.
    Retired,
    /// An outbound SA replaced by a switch.
    Replaced,
    /// A pending outbound SA superseded or reverted before its switch.
    Cancelled,
    /// An inbound SPI whose key changed in place.
    KeyChangedInPlace,
    /// The key manager wants no SA in this direction.
    Deleted,
}

/// One step that brings the table closer to what is wanted. Apply them in
/// order: removals of a peer come before its installs, so a key that
/// leaves the table has left it before anything else may claim it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Install the wanted SA of `peer` in `direction`, in `state`.
    Install {
        peer: String,
        direction: Direction,
        spi: u32,
        state: SaState,
    },
    /// A pending outbound SA becomes the one in use; `from`, the SA it
    /// replaces, is removed in the same step. `forced`: the peer was not
    /// seen on our new inbound SA before `switch_after` passed.
    Switch {
        peer: String,
        from: Option<SaId>,
        to: SaId,
        forced: bool,
    },
    /// Keep accepting until `at`, then [`Action::Remove`].
    Retire {
        id: SaId,
        at: Instant,
    },
    /// A retiring inbound SA that is wanted again.
    Reactivate {
        id: SaId,
    },
    Remove {
        id: SaId,
        reason: RemoveReason,
    },
    SetEndpoint {
        id: SaId,
        endpoint: SocketAddr,
    },
    Refuse {
        peer: String,
        refusal: Refusal,
    },
}

/// The actions that take `table` to what `wanted` asks for at `now`. Peers
/// not in `wanted` keep their SAs, but their time-driven steps (switch,
/// retirement) still happen: call this with an empty `wanted` to advance
/// the clock.
pub fn plan(wanted: &[WantedPeer], table: &[SaView], now: Instant, timing: Timing) -> Vec<Action> {
    let mut actions = Vec::new();
    // What the table will hold once this plan's earlier actions are
    // applied: later peers are checked against earlier peers' installs.
    let mut live: Vec<SaView> = table.to_vec();
    for want in wanted {
        let inbound_new = plan_inbound(want, &mut live, wanted, now, timing, &mut actions);
        plan_outbound(want, &mut live, wanted, inbound_new, now, &mut actions);
        for sa in live.iter_mut().filter(|sa| sa.peer == want.peer) {
            if sa.endpoint != want.endpoint {
                sa.endpoint = want.endpoint;
                if sa.id != SaId::PLANNED {
                    actions.push(Action::SetEndpoint {
                        id: sa.id,
                        endpoint: want.endpoint,
                    });
                }
            }
        }
    }
    advance_clock(&live, now, timing, &mut actions);
    actions
}

/// Returns whether the peer's inbound SA is new (installed or brought back
/// by this plan), which makes a new outbound SA wait for it.
fn plan_inbound(
    want: &WantedPeer,
    live: &mut Vec<SaView>,
    wanted: &[WantedPeer],
    now: Instant,
    timing: Timing,
    actions: &mut Vec<Action>,
) -> Option<u32> {
    let mine = |sa: &SaView| sa.peer == want.peer && sa.direction == Direction::Inbound;
    let Some(w) = &want.inbound else {
        remove_all(live, actions, RemoveReason::Deleted, |sa| mine(sa));
        return None;
    };
    let existing = live
        .iter()
        .position(|sa| mine(sa) && sa.spi == w.spi && sa.fp == w.fp);
    let kept = match existing {
        Some(i) => {
            if matches!(live[i].state, SaState::Active) {
                None
            } else {
                actions.push(Action::Reactivate { id: live[i].id });
                live[i].state = SaState::Active;
                Some(w.spi)
            }
        }
        None => {
            if let Some(holder) = live.iter().find(|sa| {
                sa.direction == Direction::Inbound && sa.spi == w.spi && sa.peer != want.peer
            }) {
                refuse(
                    actions,
                    want,
                    Refusal::SpiInUse {
                        spi: w.spi,
                        holder_peer: holder.peer.clone(),
                    },
                );
                return None;
            }
            if let Some(refusal) = key_clash(want, Direction::Inbound, w, live, wanted) {
                refuse(actions, want, refusal);
                return None;
            }
            remove_all(live, actions, RemoveReason::KeyChangedInPlace, |sa| {
                mine(sa) && sa.spi == w.spi
            });
            actions.push(Action::Install {
                peer: want.peer.clone(),
                direction: Direction::Inbound,
                spi: w.spi,
                state: SaState::Active,
            });
            live.push(SaView {
                id: SaId::PLANNED,
                direction: Direction::Inbound,
                peer: want.peer.clone(),
                spi: w.spi,
                fp: w.fp.clone(),
                endpoint: want.endpoint,
                state: SaState::Active,
                seen: false,
                installed: false,
            });
            Some(w.spi)
        }
    };
    // The peer's other inbound SAs retire.
    let at = now + timing.retire_after;
    for sa in live.iter_mut() {
        if mine(sa) && sa.spi != w.spi && sa.state == SaState::Active {
            actions.push(Action::Retire { id: sa.id, at });
            sa.state = SaState::Retiring { at };
        }
    }
    kept
}

fn plan_outbound(
    want: &WantedPeer,
    live: &mut Vec<SaView>,
    wanted: &[WantedPeer],
    inbound_new: Option<u32>,
    now: Instant,
    actions: &mut Vec<Action>,
) {
    let mine = |sa: &SaView| sa.peer == want.peer && sa.direction == Direction::Outbound;
    let Some(w) = &want.outbound else {
        remove_all(live, actions, RemoveReason::Deleted, |sa| mine(sa));
        return;
    };
    let same = |sa: &SaView| mine(sa) && sa.spi == w.spi && sa.fp == w.fp;
    if live
        .iter()
        .any(|sa| same(sa) && sa.state == SaState::Active)
    {
        // Unchanged, or reverted before a pending switch.
        remove_all(live, actions, RemoveReason::Cancelled, |sa| {
            mine(sa) && matches!(sa.state, SaState::Pending { .. })
        });
        return;
    }
    if live
        .iter()
        .any(|sa| same(sa) && matches!(sa.state, SaState::Pending { .. }))
    {
        return;
    }
    if let Some(refusal) = key_clash(want, Direction::Outbound, w, live, wanted) {
        refuse(actions, want, refusal);
        return;
    }
    // A pending SA superseded here goes unused; its reservation record
    // stays, so its key can come back safely.
    remove_all(live, actions, RemoveReason::Cancelled, |sa| {
        mine(sa) && matches!(sa.state, SaState::Pending { .. })
    });
    // Nothing to break if the peer has no SA sending yet (a start).
    // Otherwise the new SA waits, at least until the datapath confirms it
    // is installed (its reservation claimed), and, while our inbound SA
    // for the peer is new too, for the peer to use it.
    let replaces = live
        .iter()
        .any(|sa| mine(sa) && sa.state == SaState::Active);
    let state = if replaces {
        SaState::Pending {
            since: now,
            awaiting: inbound_new,
        }
    } else {
        SaState::Active
    };
    actions.push(Action::Install {
        peer: want.peer.clone(),
        direction: Direction::Outbound,
        spi: w.spi,
        state,
    });
    live.push(SaView {
        id: SaId::PLANNED,
        direction: Direction::Outbound,
        peer: want.peer.clone(),
        spi: w.spi,
        fp: w.fp.clone(),
        endpoint: want.endpoint,
        state,
        seen: false,
        installed: false,
    });
}

/// Another SA, live or wanted, that holds this key. The same SA (same
/// peer, direction and SPI) and the peer's pending outbound SA, which a new
/// outbound SA supersedes unused, do not count.
fn key_clash(
    want: &WantedPeer,
    direction: Direction,
    w: &WantedSa,
    live: &[SaView],
    wanted: &[WantedPeer],
) -> Option<Refusal> {
    let refusal = |peer: &str, holder_direction, holder_spi| Refusal::KeyInUse {
        direction,
        spi: w.spi,
        holder_peer: peer.to_string(),
        holder_direction,
        holder_spi,
    };
    let superseded = |sa: &SaView| {
        direction == Direction::Outbound
            && sa.direction == Direction::Outbound
            && sa.peer == want.peer
            && matches!(sa.state, SaState::Pending { .. })
    };
    if let Some(sa) = live.iter().find(|sa| sa.fp == w.fp && !superseded(sa)) {
        return Some(refusal(&sa.peer, sa.direction, sa.spi));
    }
    for other in wanted {
        for d in [Direction::Outbound, Direction::Inbound] {
            let is_self = other.peer == want.peer && d == direction;
            if let Some(o) = other.sa(d).filter(|o| !is_self && o.fp == w.fp) {
                return Some(refusal(&other.peer, d, o.spi));
            }
        }
    }
    None
}

fn refuse(actions: &mut Vec<Action>, want: &WantedPeer, refusal: Refusal) {
    actions.push(Action::Refuse {
        peer: want.peer.clone(),
        refusal,
    });
}

fn remove_all(
    live: &mut Vec<SaView>,
    actions: &mut Vec<Action>,
    reason: RemoveReason,
    which: impl Fn(&SaView) -> bool,
) {
    live.retain(|sa| {
        if which(sa) {
            if sa.id != SaId::PLANNED {
                actions.push(Action::Remove { id: sa.id, reason });
            }
            false
        } else {
            true
        }
    });
}

/// The time-driven steps: pending outbound SAs switch once the peer is
/// seen on the awaited inbound SA or `switch_after` passed; retiring
/// inbound SAs go once their time has come.
fn advance_clock(live: &[SaView], now: Instant, timing: Timing, actions: &mut Vec<Action>) {
    for sa in live.iter().filter(|sa| sa.id != SaId::PLANNED) {
        match sa.state {
            SaState::Pending { .. } if !sa.installed => {}
            SaState::Pending { since, awaiting } => {
                let seen = awaiting.is_some_and(|spi| {
                    live.iter().any(|i| {
                        i.direction == Direction::Inbound
                            && i.peer == sa.peer
                            && i.spi == spi
                            && i.seen
                    })
                });
                let timed_out = now.saturating_duration_since(since) >= timing.switch_after;
                if awaiting.is_none() || seen || timed_out {
                    let from = live
                        .iter()
                        .find(|o| {
                            o.direction == Direction::Outbound
                                && o.peer == sa.peer
                                && o.state == SaState::Active
                        })
                        .map(|o| o.id);
                    actions.push(Action::Switch {
                        peer: sa.peer.clone(),
                        from,
                        to: sa.id,
                        forced: awaiting.is_some() && !seen,
                    });
                }
            }
            SaState::Retiring { at } if now >= at => actions.push(Action::Remove {
                id: sa.id,
                reason: RemoveReason::Retired,
            }),
            _ => {}
        }
    }
}

/// Applies `action` to the lifecycle's picture of the table, as the
/// datapath applies it to the real one; an install takes its id from
/// `ids` and returns it.
pub fn apply(
    views: &mut Vec<SaView>,
    action: &Action,
    wanted: &[WantedPeer],
    ids: &mut super::table::SaIds,
) -> Option<SaId> {
    match action {
        Action::Install {
            peer,
            direction,
            spi,
            state,
        } => {
            let want = wanted.iter().find(|w| &w.peer == peer)?;
            let fp = want.sa(*direction).filter(|w| w.spi == *spi)?.fp.clone();
            let id = ids.allocate();
            views.push(SaView {
                id,
                direction: *direction,
                peer: peer.clone(),
                spi: *spi,
                fp,
                endpoint: want.endpoint,
                state: *state,
                seen: false,
                installed: false,
            });
            return Some(id);
        }
        Action::Switch { from, to, .. } => {
            views.retain(|v| Some(v.id) != *from);
            if let Some(v) = views.iter_mut().find(|v| v.id == *to) {
                v.state = SaState::Active;
            }
        }
        Action::Retire { id, at } => set_state(views, *id, SaState::Retiring { at: *at }),
        Action::Reactivate { id } => set_state(views, *id, SaState::Active),
        Action::Remove { id, .. } => views.retain(|v| v.id != *id),
        Action::SetEndpoint { id, endpoint } => {
            if let Some(v) = views.iter_mut().find(|v| v.id == *id) {
                v.endpoint = *endpoint;
            }
        }
        Action::Refuse { .. } => {}
    }
    None
}

fn set_state(views: &mut [SaView], id: SaId, state: SaState) {
    if let Some(v) = views.iter_mut().find(|v| v.id == id) {
        v.state = state;
    }
}

#[cfg(test)]
mod tests;
