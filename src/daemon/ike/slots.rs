//! Which IKE SA stands for a peer (two set up at once, or a later one
//! replacing an earlier), and a peer's back-off and policy for new ones.

use std::time::{Duration, Instant};

use super::{PeerIke, RETRY_MAX, SETUP_RACE, Slot};
use crate::ike::sa::Policy;

impl PeerIke {
    /// Plans the next initiation after the current back-off, doubles it
    /// (up to [`RETRY_MAX`]), and returns the wait.
    pub(super) fn back_off(&mut self, now: Instant) -> Duration {
        let wait = self.backoff;
        self.next_initiate = Some(now + wait);
        self.backoff = (wait * 2).min(RETRY_MAX);
        wait
    }

    /// The policy of a new IKE SA: INITIAL_CONTACT only until the first
    /// one with the peer is established (RFC 7296 section 2.4: it says
    /// "I have no other SAs with you", true only after a start).
    pub(super) fn slot_policy(&self) -> Policy {
        Policy {
            initial_contact: !self.contacted,
            ..self.policy.clone()
        }
    }
}

/// Whether another live IKE SA came up after the one in `slot` was
/// created: both were set up at the same time (both sides initiated), so
/// an INITIAL_CONTACT on `slot` is no restart of the peer.
pub(super) fn set_up_alongside(slots: &[Slot], slot: usize) -> bool {
    let Some(created) = slots.get(slot).map(|s| s.created) else {
        return false;
    };
    slots
        .iter()
        .enumerate()
        .any(|(k, o)| k != slot && o.live() && o.up_at.is_some_and(|t| created <= t))
}

/// Which IKE SA stands for the peer once the one in `slot` is
/// established: `slot`, unless it and a live one were set up at the same
/// time (both sides initiating: `slot` was created before the other came
/// up, give or take [`SETUP_RACE`]) and that one wins the tie. RFC 7296 has no rule for this;
/// like its rule for crossed CHILD SA rekeys (section 2.8.1: the SA with
/// the lowest nonce is redundant), the one whose lower SPI is the lowest
/// is redundant, which both sides know of both. An IKE SA set up after
/// another was up replaces it (the peer reconnected).
pub(super) fn survivor(slots: &[Slot], slot: usize) -> usize {
    let Some(new) = slots.get(slot) else {
        return slot;
    };
    // An IKE SA whose CHILD SA was refused never replaces one that
    // carries traffic: it is deleted itself (`close_if_childless`).
    if !new.carries()
        && let Some(k) =
            (0..slots.len()).find(|&k| k != slot && slots[k].live() && slots[k].carries())
    {
        return k;
    }
    let rank = |s: &Slot| {
        let (i, r) = s.sa.spis();
        (i.min(r), i.max(r))
    };
    slots
        .iter()
        .enumerate()
        .filter(|&(k, o)| {
            k != slot
                && o.live()
                && o.up_at.is_some_and(|t| new.created <= t + SETUP_RACE)
                && rank(o) > rank(new)
        })
        .max_by_key(|(_, o)| rank(o))
        .map_or(slot, |(k, _)| k)
}
