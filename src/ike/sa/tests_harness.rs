//! A deterministic two-party harness: two [`IkeSa`]s, an in-memory network
//! that can drop messages, a fake clock, and a key manager stand-in that
//! checks, after every step, that both sides' installed CHILD SAs pair up
//! (same SPIs and keys crossed over) and that no (key, SPI) is ever
//! installed twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tests::pair;
use super::*;
use crate::ike::crypto::tests::{TestRandomness, dh_from_bytes};
use crate::ike::crypto::{DhGroup, DhPrivate, IkeCryptoError};

/// [`TestRandomness`] whose nonces (32-byte draws) can be scripted and
/// whose DH private keys are remembered, so a test can recompute a shared
/// secret on its own.
pub(super) struct Scripted {
    inner: TestRandomness,
    pub(super) nonces: VecDeque<Vec<u8>>,
    pub(super) dh: Vec<(DhGroup, [u8; 32])>,
}

impl Scripted {
    pub(super) fn new(seed: &[u8]) -> Self {
        Scripted {
            inner: TestRandomness::new(seed),
            nonces: VecDeque::new(),
            dh: Vec::new(),
        }
    }

    /// A copy of the last DH private key handed out.
    pub(super) fn last_dh(&self) -> DhPrivate {
        let (g, b) = self.dh.last().expect("a DH key");
        dh_from_bytes(*g, b).expect("dh")
    }
}

impl Randomness for Scripted {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), IkeCryptoError> {
        if dest.len() == NONCE_LEN
            && let Some(n) = self.nonces.pop_front()
        {
            dest.copy_from_slice(&n);
            return Ok(());
        }
        self.inner.fill(dest)
    }

    fn dh_private(&mut self, group: DhGroup) -> Result<DhPrivate, IkeCryptoError> {
        let mut b = [0u8; 32];
        self.inner.fill(&mut b)?;
        self.dh.push((group, b));
        dh_from_bytes(group, &b)
    }
}

/// One side: its IKE SA, its generator, and what its key manager holds.
pub(super) struct Party {
    pub(super) sa: IkeSa,
    pub(super) rng: Scripted,
    /// Installed CHILD SAs by inbound SPI.
    pub(super) installed: HashMap<u32, ChildSa>,
    /// Every (key, SPI) ever installed, both directions.
    seen: HashSet<(Vec<u8>, u32)>,
    pub(super) failed: Vec<IkeError>,
    pub(super) child_failed: Vec<IkeError>,
    pub(super) closed: bool,
    pub(super) restarted: u32,
    pub(super) ike_rekeyed: u32,
    pub(super) installs: u32,
    pub(super) sent: u32,
}

impl Party {
    fn new(sa: IkeSa, rng: Scripted) -> Self {
        Party {
            sa,
            rng,
            installed: HashMap::new(),
            seen: HashSet::new(),
            failed: Vec::new(),
            child_failed: Vec::new(),
            closed: false,
            restarted: 0,
            ike_rekeyed: 0,
            installs: 0,
            sent: 0,
        }
    }

    /// Applies actions without sending anything (a lost message).
    pub(super) fn apply_for_test(&mut self, actions: Vec<Action>) -> Vec<Vec<u8>> {
        self.apply(actions)
    }

    /// What the daemon would do with the actions; returns what to send.
    fn apply(&mut self, actions: Vec<Action>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for a in actions {
            match a {
                Action::Send(b) => {
                    self.sent += 1;
                    out.push(b);
                }
                Action::InstallChild(c) => {
                    for (k, spi) in [
                        (c.inbound.key().expose().to_vec(), c.inbound_spi),
                        (c.outbound.key().expose().to_vec(), c.outbound_spi),
                    ] {
                        assert!(self.seen.insert((k, spi)), "(key, SPI) installed twice");
                    }
                    self.installs += 1;
                    assert!(self.installed.insert(c.inbound_spi, c).is_none());
                }
                Action::DeleteChild {
                    inbound_spi,
                    outbound_spi,
                } => {
                    let c = self
                        .installed
                        .remove(&inbound_spi)
                        .expect("deleted SA was installed");
                    assert_eq!(c.outbound_spi, outbound_spi);
                }
                Action::PeerRestarted => self.restarted += 1,
                Action::IkeRekeyed { .. } => self.ike_rekeyed += 1,
                Action::ChildFailed(e) => self.child_failed.push(e),
                Action::Failed(e) => self.failed.push(e),
                Action::Closed => self.closed = true,
            }
        }
        out
    }
}

pub(super) struct Net {
    pub(super) a: Party,
    pub(super) b: Party,
    pub(super) now: Instant,
    pub(super) start: Instant,
    to_a: VecDeque<Vec<u8>>,
    to_b: VecDeque<Vec<u8>>,
    /// Messages to this side are lost.
    pub(super) drop_to_a: bool,
    pub(super) drop_to_b: bool,
    /// Lose every n-th message either way (a lossy path).
    pub(super) drop_every: Option<u32>,
    delivered: u32,
}

impl Net {
    /// `a` initiates; both get `policy`; the pair is established.
    pub(super) fn up(policy: Policy) -> Self {
        Self::up_with(policy.clone(), policy)
    }

    pub(super) fn up_with(pa: Policy, pb: Policy) -> Self {
        let (ac, bc) = pair();
        Self::up_full(ac, bc, pa, pb)
    }

    pub(super) fn up_configs(ac: Config, bc: Config, policy: Policy) -> Self {
        Self::up_full(ac, bc, policy.clone(), policy)
    }

    fn up_full(ac: Config, bc: Config, pa: Policy, pb: Policy) -> Self {
        let now = Instant::now();
        let mut ra = Scripted::new(b"party a");
        let (mut sa, actions) = IkeSa::initiate(Arc::new(ac), now, &mut ra).expect("initiate");
        sa.set_policy(pa);
        let mut b = IkeSa::responder(Arc::new(bc));
        b.set_policy(pb);
        let mut net = Net {
            a: Party::new(sa, ra),
            b: Party::new(b, Scripted::new(b"party b")),
            now,
            start: now,
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
            drop_to_a: false,
            drop_to_b: false,
            drop_every: None,
            delivered: 0,
        };
        let out = net.a.apply(actions);
        net.to_b.extend(out);
        net.settle();
        assert_eq!(net.a.sa.status(), Status::Established);
        assert_eq!(net.b.sa.status(), Status::Established);
        net
    }

    /// Queues what `actions` (from side a or b) send.
    pub(super) fn push(&mut self, from_a: bool, actions: Vec<Action>) {
        if from_a {
            let out = self.a.apply(actions);
            self.to_b.extend(out);
        } else {
            let out = self.b.apply(actions);
            self.to_a.extend(out);
        }
    }

    /// Delivers until nothing is in flight.
    pub(super) fn settle(&mut self) {
        for _ in 0..200 {
            if self.to_a.is_empty() && self.to_b.is_empty() {
                self.check();
                return;
            }
            let to_b: Vec<_> = self.to_b.drain(..).collect();
            let to_a: Vec<_> = self.to_a.drain(..).collect();
            for m in to_b {
                if self.drop_to_b || self.lose() {
                    continue;
                }
                // A dropped message (Err) changes nothing by contract.
                if let Ok(a) = self.b.sa.handle(&m, self.now, &mut self.b.rng) {
                    self.push(false, a);
                }
            }
            for m in to_a {
                if self.drop_to_a || self.lose() {
                    continue;
                }
                if let Ok(a) = self.a.sa.handle(&m, self.now, &mut self.a.rng) {
                    self.push(true, a);
                }
            }
        }
        panic!("the network did not settle");
    }

    fn lose(&mut self) -> bool {
        self.delivered += 1;
        self.drop_every
            .is_some_and(|n| self.delivered.is_multiple_of(n))
    }

    /// Runs the clock to `until` (from the start), firing timers on both
    /// sides and settling after each; checks after every step.
    pub(super) fn run_for(&mut self, until: Duration) {
        let end = self.start + until;
        for _ in 0..100_000 {
            let next = [self.a.sa.next_timeout(), self.b.sa.next_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next.filter(|&t| t <= end) else {
                self.now = end;
                return;
            };
            self.now = self.now.max(next);
            if self.a.sa.next_timeout().is_some_and(|t| t <= self.now) {
                let a = self.a.sa.handle_timer(self.now, &mut self.a.rng);
                self.push(true, a);
            }
            if self.b.sa.next_timeout().is_some_and(|t| t <= self.now) {
                let b = self.b.sa.handle_timer(self.now, &mut self.b.rng);
                self.push(false, b);
            }
            self.settle();
        }
        panic!("timers did not settle");
    }

    /// Both key managers hold matching pairs, and each side's CHILD SA
    /// list is what its key manager holds. Only meaningful while both are
    /// alive and nothing is being dropped.
    pub(super) fn check(&self) {
        for p in [&self.a, &self.b] {
            let mut listed: Vec<u32> = p.sa.children().iter().map(|c| c.inbound_spi).collect();
            let mut held: Vec<u32> = p.installed.keys().copied().collect();
            listed.sort_unstable();
            held.sort_unstable();
            assert_eq!(listed, held, "the SA's list is what was installed");
        }
        let lossy = self.drop_to_a || self.drop_to_b || self.drop_every.is_some();
        if lossy || self.a.closed || self.b.closed {
            return;
        }
        assert_eq!(
            self.a.installed.len(),
            self.b.installed.len(),
            "pairs on both sides"
        );
        for (spi, c) in &self.a.installed {
            let peer = self
                .b
                .installed
                .get(&c.outbound_spi)
                .expect("the peer holds the other half");
            assert_eq!(peer.outbound_spi, *spi);
            super::tests::assert_matching(c, peer);
        }
    }
}
