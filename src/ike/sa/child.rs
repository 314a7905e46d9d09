//! The CHILD SAs an IKE SA has handed to the key manager, with their
//! timers, for rekeying (RFC 7296 section 2.8), Delete (section 1.4.1) and
//! status.

use std::time::Instant;

use super::super::crypto::{DhGroup, Encr, Randomness};
use super::{Action, ChildSa, IkeSa};

/// Where a CHILD SA is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Carrying traffic.
    Installed,
    /// A CREATE_CHILD_SA of ours is rekeying it.
    Rekeying,
    /// Its successor is installed; a Delete (ours or the peer's) removes it
    /// (section 2.8: make-before-break).
    Rekeyed,
    /// A Delete of ours for it is outstanding or queued.
    Deleting,
}

/// One CHILD SA, for status and timers. No keys: those went to the key
/// manager with [`Action::InstallChild`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    pub inbound_spi: u32,
    pub outbound_spi: u32,
    pub encr: Encr,
    pub esn: bool,
    /// The PFS group of the exchange that made it (None: IKE_AUTH's, or
    /// a rekey without PFS); its own rekey offers it first.
    pub pfs: Option<DhGroup>,
    pub installed: Instant,
    /// When we start rekeying it (the policy's lifetime minus jitter).
    pub rekey_at: Option<Instant>,
    /// Its hard lifetime: removed then, rekeyed or not.
    pub expire_at: Option<Instant>,
    /// How many rekeys lie behind it (0: created by IKE_AUTH).
    pub generation: u32,
    pub state: ChildState,
}

impl IkeSa {
    /// Our CHILD SAs, oldest first.
    pub fn children(&self) -> &[ChildInfo] {
        &self.children
    }

    pub(super) fn child_by_inbound(&mut self, spi: u32) -> Option<&mut ChildInfo> {
        self.children.iter_mut().find(|c| c.inbound_spi == spi)
    }

    pub(super) fn child_by_outbound(&mut self, spi: u32) -> Option<&mut ChildInfo> {
        self.children.iter_mut().find(|c| c.outbound_spi == spi)
    }

    /// Starts tracking a CHILD SA we are about to install, made with the
    /// PFS group `pfs` (if any).
    pub(super) fn adopt(
        &mut self,
        child: &ChildSa,
        pfs: Option<DhGroup>,
        generation: u32,
        now: Instant,
        rng: &mut dyn Randomness,
    ) {
        if self
            .children
            .iter()
            .any(|c| c.inbound_spi == child.inbound_spi)
        {
            return;
        }
        let (rekey_at, expire_at) = self.child_timers(now, rng);
        self.children.push(ChildInfo {
            inbound_spi: child.inbound_spi,
            outbound_spi: child.outbound_spi,
            encr: child.encr,
            esn: child.esn,
            pfs,
            installed: now,
            rekey_at,
            expire_at,
            generation,
            state: ChildState::Installed,
        });
    }

    /// Stops tracking a CHILD SA and tells the key manager to remove it.
    pub(super) fn remove_child(&mut self, inbound_spi: u32) -> Option<Action> {
        let at = self
            .children
            .iter()
            .position(|c| c.inbound_spi == inbound_spi)?;
        let c = self.children.remove(at);
        Some(Action::DeleteChild {
            inbound_spi: c.inbound_spi,
            outbound_spi: c.outbound_spi,
        })
    }

    /// Every CHILD SA goes with its IKE SA (section 1.4.1).
    pub(super) fn remove_all_children(&mut self) -> Vec<Action> {
        self.children
            .drain(..)
            .map(|c| Action::DeleteChild {
                inbound_spi: c.inbound_spi,
                outbound_spi: c.outbound_spi,
            })
            .collect()
    }
}
