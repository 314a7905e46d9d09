//! Lifetimes, liveness checks and the one timer the caller sees.
//!
//! RFC 7296 section 2.8 leaves lifetimes to local policy and lets either
//! side rekey; both sides configured alike would rekey at the same moment
//! and collide (section 2.8.1), so each rekey time is the lifetime minus a
//! random margin drawn from the injected randomness. Section 2.4: a peer
//! we have not heard from for a while is asked with an empty
//! INFORMATIONAL request; when the retransmissions go unanswered, the IKE
//! SA and its CHILD SAs are dead.

use std::time::{Duration, Instant};

use super::super::crypto::{DhGroup, Randomness};
use super::{Action, ChildState, IkeError, IkeSa, Phase};

/// What the configuration decides beyond the algorithms. The default
/// has no lifetimes and no liveness checks, which keeps
/// [`IkeSa::handle_timeout`] sufficient; set one and drive the SA with
/// [`IkeSa::handle_timer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Rekey CHILD SAs this long after they were made (minus jitter).
    pub child_rekey: Option<Duration>,
    /// Remove CHILD SAs this long after they were made, rekeyed or not.
    pub child_hard: Option<Duration>,
    pub ike_rekey: Option<Duration>,
    /// The IKE SA fails with [`IkeError::Expired`] at this age.
    pub ike_hard: Option<Duration>,
    /// The rekey margin is drawn from 0 to this percentage of the
    /// lifetime.
    pub jitter_percent: u32,
    /// Check liveness after this long without an authenticated message
    /// from the peer (section 2.4).
    pub liveness: Option<Duration>,
    /// PFS for CHILD SA rekeys: offer these groups with a KE payload (the
    /// first), and as responder require one of them. Empty: no PFS.
    pub pfs: Vec<DhGroup>,
    /// Send INITIAL_CONTACT in our IKE_AUTH request (section 2.4): true
    /// for the first IKE SA with a peer after we started.
    pub initial_contact: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            child_rekey: None,
            child_hard: None,
            ike_rekey: None,
            ike_hard: None,
            jitter_percent: 10,
            liveness: None,
            pfs: Vec::new(),
            initial_contact: true,
        }
    }
}

/// The IKE SA's own timers and counters.
#[derive(Debug, Default)]
pub(super) struct Life {
    pub(super) established: Option<Instant>,
    pub(super) rekey_at: Option<Instant>,
    pub(super) expire_at: Option<Instant>,
    /// The last authenticated message from the peer.
    pub(super) last_heard: Option<Instant>,
    /// The last liveness check we sent.
    pub(super) last_liveness: Option<Instant>,
    pub(super) ike_rekeys: u32,
    pub(super) child_rekeys: u32,
    /// Why our last IKE SA rekey failed, until one succeeds.
    pub(super) ike_rekey_failure: Option<IkeError>,
    /// Deletes of our CHILD SAs (inbound SPIs) waiting for the window,
    /// and since when.
    pub(super) pending_deletes: Vec<u32>,
    pub(super) pending_since: Option<Instant>,
}

impl IkeSa {
    /// Sets lifetimes, liveness checks, PFS and INITIAL_CONTACT; call it
    /// right after [`IkeSa::initiate`] or [`IkeSa::responder`].
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// When the IKE SA (this generation, after a rekey) was established.
    pub fn established_at(&self) -> Option<Instant> {
        self.life.established
    }

    /// How many times the IKE SA and its CHILD SAs have been rekeyed.
    pub fn rekeys(&self) -> (u32, u32) {
        (self.life.ike_rekeys, self.life.child_rekeys)
    }

    pub fn last_heard(&self) -> Option<Instant> {
        self.life.last_heard
    }

    /// Authenticated traffic from the peer arrived outside IKE (ESP on
    /// one of this SA's CHILD SAs): proof of life enough to put off the
    /// next liveness check (section 2.4 asks for one only when nothing
    /// protected has come for a while).
    pub fn peer_seen(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Established) {
            self.life.last_heard = self.life.last_heard.max(Some(now));
        }
    }

    pub fn last_liveness_check(&self) -> Option<Instant> {
        self.life.last_liveness
    }

    pub fn ike_rekey_at(&self) -> Option<Instant> {
        self.life.rekey_at
    }

    /// Why our last IKE SA rekey failed (refused, an unusable answer, an
    /// INVALID_KE_PAYLOAD for a group we did not offer or once too
    /// often), until a rekey succeeds. A CHILD SA rekey's failure comes
    /// as [`Action::ChildFailed`]; an IKE SA rekey's has no action, since
    /// the old SA carries on and the policy tries again.
    pub fn ike_rekey_failure(&self) -> Option<IkeError> {
        self.life.ike_rekey_failure
    }

    /// `lifetime` minus a random margin of up to `jitter_percent`.
    fn jittered(&self, lifetime: Duration, rng: &mut dyn Randomness) -> Duration {
        let mut b = [0u8; 4];
        if rng.fill(&mut b).is_err() {
            return lifetime;
        }
        let max = lifetime * self.policy.jitter_percent.min(100) / 100;
        let frac = f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX);
        lifetime.saturating_sub(max.mul_f64(frac))
    }

    pub(super) fn child_timers(
        &self,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> (Option<Instant>, Option<Instant>) {
        let rekey = self.policy.child_rekey.map(|l| now + self.jittered(l, rng));
        (rekey, self.policy.child_hard.map(|h| now + h))
    }

    /// A new IKE SA generation starts its clocks.
    pub(super) fn start_ike_life(&mut self, now: Instant, rng: &mut dyn Randomness) {
        self.life.established = Some(now);
        self.life.rekey_at = self.policy.ike_rekey.map(|l| now + self.jittered(l, rng));
        self.life.expire_at = self.policy.ike_hard.map(|h| now + h);
        self.life.last_heard = Some(now);
    }

    /// Bookkeeping after a message was handled: timers start when the SA
    /// is established, CHILD SAs from IKE_AUTH are tracked, and any
    /// authenticated message counts as a sign of life.
    pub(super) fn after_exchange(
        &mut self,
        was_established: bool,
        actions: &mut [Action],
        now: Instant,
        rng: &mut dyn Randomness,
    ) {
        if !matches!(self.phase, Phase::Established) {
            return;
        }
        if !was_established {
            self.start_ike_life(now, rng);
        }
        self.life.last_heard = Some(now);
        for a in actions.iter() {
            if let Action::InstallChild(c) = a {
                self.nat.original = Some(c.original);
                self.adopt(c, None, 0, now, rng);
            }
        }
    }

    /// When [`IkeSa::handle_timer`] (or, without a [`Policy`], also
    /// [`IkeSa::handle_timeout`]) must next be called. Work that waits for
    /// the window of one (section 2.3) is not reported while a request is
    /// outstanding: the response frees it, and the caller asks again.
    pub fn next_timeout(&self) -> Option<Instant> {
        let mut t: Vec<Option<Instant>> = vec![
            self.outstanding.as_ref().map(|o| o.deadline),
            self.retiring.iter().filter_map(|g| g.deadline()).min(),
            self.nat.keepalive_at,
        ];
        if matches!(self.phase, Phase::Established) {
            t.push(self.life.expire_at);
            t.extend(self.children.iter().map(|c| c.expire_at));
            if self.outstanding.is_none() {
                t.push(self.life.pending_since);
                t.push(self.life.rekey_at);
                t.extend(
                    self.children
                        .iter()
                        .filter(|c| c.state == ChildState::Installed)
                        .map(|c| c.rekey_at),
                );
                t.push(self.liveness_due());
            }
        }
        t.into_iter().flatten().min()
    }

    fn liveness_due(&self) -> Option<Instant> {
        let interval = self.policy.liveness?;
        Some(self.life.last_heard? + interval)
    }

    /// Runs every timer that is due: retransmission, hard lifetimes, then
    /// at most one new request (the window is one): a queued Delete, an
    /// IKE SA rekey, a CHILD SA rekey, a liveness check.
    pub fn handle_timer(&mut self, now: Instant, rng: &mut dyn Randomness) -> Vec<Action> {
        let mut actions = self.handle_timeout(now);
        if !matches!(self.phase, Phase::Established) {
            return actions;
        }
        if self.life.expire_at.is_some_and(|t| t <= now) {
            actions.extend(self.end_ike(now, rng, IkeError::Expired));
            return actions;
        }
        let expired: Vec<u32> = self
            .children
            .iter()
            .filter(|c| c.expire_at.is_some_and(|t| t <= now))
            .map(|c| c.inbound_spi)
            .collect();
        for spi in expired {
            // Section 1.4.1: the SA is gone for us at once; the peer
            // hears of it in a Delete when the window allows.
            actions.extend(self.remove_child(spi));
            self.queue_delete(spi, now);
        }
        if self.outstanding.is_some() {
            return actions;
        }
        let started = if !self.life.pending_deletes.is_empty() {
            let spis = std::mem::take(&mut self.life.pending_deletes);
            self.life.pending_since = None;
            self.send_delete_children(spis, now, rng)
        } else if self.life.rekey_at.is_some_and(|t| t <= now) {
            self.rekey_ike(now, rng)
        } else if let Some(spi) = self
            .children
            .iter()
            .find(|c| c.state == ChildState::Installed && c.rekey_at.is_some_and(|t| t <= now))
            .map(|c| c.inbound_spi)
        {
            self.rekey_child(spi, now, rng)
        } else if self.liveness_due().is_some_and(|t| t <= now) {
            self.check_liveness(now, rng)
        } else {
            Ok(Vec::new())
        };
        match started {
            Ok(a) => actions.extend(a),
            Err(_) => self.postpone_due(now),
        }
        actions
    }

    /// Randomness or sealing failed and nothing was sent: every timer that
    /// is due moves a little later rather than firing again at once.
    fn postpone_due(&mut self, now: Instant) {
        let later = Some(now + super::rekey::RETRY);
        let due = |t: &Option<Instant>| t.is_some_and(|t| t <= now);
        if due(&self.life.rekey_at) {
            self.life.rekey_at = later;
        }
        for c in &mut self.children {
            if due(&c.rekey_at) {
                c.rekey_at = later;
            }
        }
        if self.liveness_due().is_some_and(|t| t <= now) {
            self.life.last_heard = Some(now);
        }
        if self.life.pending_since.is_some() {
            self.life.pending_since = later;
        }
    }

    pub(super) fn queue_delete(&mut self, inbound_spi: u32, now: Instant) {
        self.life.pending_deletes.push(inbound_spi);
        self.life.pending_since.get_or_insert(now);
    }
}
