//! Carrying out an IKE SA's actions ([`IkeWorker::act`]): CHILD SAs to
//! the key manager, the peer's restart, rekeys counted, an IKE SA that
//! came up (and its duplicates deleted).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::explain::{explain, role_name, suite_name};
use super::keys::build_child;
use super::slots::{set_up_alongside, survivor};
use super::{ChildUpdate, INSTALL_WAIT, IkeWorker, RETRY_FIRST};
use crate::ike::sa::{Action, ChildSa, ChildState, Output, Policy};

impl IkeWorker {
    /// Carries out an IKE SA's actions, in order. Every `Action` is
    /// handled here: a new kind is one more arm.
    pub(super) fn act(&mut self, i: usize, mut slot: usize, outputs: Vec<Output>, now: Instant) {
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
        let child = child.clone();
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

    /// A CHILD SA for the key manager: both directions, fresh keys.
    fn install(&mut self, i: usize, child: ChildSa, now: Instant) {
        let p = &mut self.peers[i];
        let (inbound_spi, outbound_spi) = (child.inbound_spi, child.outbound_spi);
        let esn = child.esn;
        p.kept.push(child.clone());
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
}
