//! Rekeying the IKE SA with CREATE_CHILD_SA (RFC 7296 sections 1.3.2,
//! 2.18, 2.8.2).
//!
//! The new IKE SA gets new SPIs, new nonces, a new DH exchange and
//! SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) under the old SA's
//! PRF; its message IDs start at 0 again and the rekey's initiator is its
//! "original initiator" (I flag). The CHILD SAs move over unchanged. The
//! old SA stays only for its Delete, which the rekey's initiator sends,
//! so this object answers on both SPI pairs for a while
//! ([`Action::IkeRekeyed`] tells the caller).
//!
//! Crossed rekeys (section 2.8.2): when both sides rekey at once, each
//! answers the other's request as usual and keeps the SA it made as
//! responder aside; when its own response arrives, of the two new SAs the
//! one whose exchange holds the lowest of the four nonces is redundant and
//! is deleted by its creator (that exchange's initiator), who also leaves
//! the old SA to the other side to delete.

use std::time::Instant;

use super::super::crypto::{DhGroup, DhPrivate, IkeKeys, Randomness};
use super::super::proposal::IkeSuite;
use super::super::sk::SkKey;
use super::super::wire::consts::{exchange as ex, notify, protocol};
use super::super::wire::header::Header;
use super::super::wire::payload::{Delete, KeyExchange, Payload};
use super::*;

/// One IKE SA's keyed state: what changes when the IKE SA is rekeyed.
pub(super) struct Generation {
    role: Role,
    spi_i: u64,
    spi_r: u64,
    ni: Vec<u8>,
    nr: Vec<u8>,
    suite: Option<IkeSuite>,
    keys: Option<Keys>,
    next_request_id: u32,
    outstanding: Option<Outstanding>,
    next_peer_request_id: u32,
    last_exchange: Option<(Vec<u8>, Vec<u8>)>,
    /// A retiring SA is forgotten at this time even if its Delete never
    /// came or was never answered.
    until: Instant,
}

impl Generation {
    pub(super) fn spis(&self) -> (u64, u64) {
        (self.spi_i, self.spi_r)
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        let o = self.outstanding.as_ref().map(|o| o.deadline);
        Some(o.map_or(self.until, |d| d.min(self.until)))
    }
}

/// Old IKE SAs waiting for their Delete exchange. They only answer a
/// Delete or a retransmission, so a new rekey need not wait for them; the
/// bound keeps a peer that never deletes from piling them up.
const MAX_RETIRING: usize = 4;

/// Our IKE SA rekey in flight.
pub(super) struct RekeyIke {
    new_spi: u64,
    ni: Vec<u8>,
    dh: DhPrivate,
    /// Requests this rekey already sent again after INVALID_KE_PAYLOAD.
    ke_retries: u8,
    /// The SA we made answering the peer's rekey that crossed ours.
    pub(super) crossed: Option<Box<NewIke>>,
}

/// An IKE SA a rekey exchange made, before it becomes current.
pub(super) struct NewIke {
    role: Role,
    spis: (u64, u64),
    ni: Vec<u8>,
    nr: Vec<u8>,
    suite: IkeSuite,
    ike: IkeKeys,
}

impl NewIke {
    /// Section 2.8.2: the exchange's lowest nonce decides.
    fn lowest(&self) -> &[u8] {
        self.ni.as_slice().min(self.nr.as_slice())
    }
}

impl IkeSa {
    fn swap_generation(&mut self, g: &mut Generation) {
        std::mem::swap(&mut self.role, &mut g.role);
        std::mem::swap(&mut self.spi_i, &mut g.spi_i);
        std::mem::swap(&mut self.spi_r, &mut g.spi_r);
        std::mem::swap(&mut self.ni, &mut g.ni);
        std::mem::swap(&mut self.nr, &mut g.nr);
        std::mem::swap(&mut self.suite, &mut g.suite);
        std::mem::swap(&mut self.keys, &mut g.keys);
        std::mem::swap(&mut self.next_request_id, &mut g.next_request_id);
        std::mem::swap(&mut self.outstanding, &mut g.outstanding);
        std::mem::swap(&mut self.next_peer_request_id, &mut g.next_peer_request_id);
        std::mem::swap(&mut self.last_exchange, &mut g.last_exchange);
    }

    /// The keyed state of a new IKE SA, message IDs at 0.
    fn generation(&self, new: NewIke, now: Instant) -> Result<Generation, IkeError> {
        let (sk_out, sk_in) = match new.role {
            Role::Initiator => (&new.ike.sk_ei, &new.ike.sk_er),
            Role::Responder => (&new.ike.sk_er, &new.ike.sk_ei),
        };
        let keys = Keys {
            sk_out: SkKey::new(new.suite.encr, sk_out)?,
            sk_in: SkKey::new(new.suite.encr, sk_in)?,
            ike: new.ike,
        };
        let r = self.config.retransmit;
        Ok(Generation {
            role: new.role,
            spi_i: new.spis.0,
            spi_r: new.spis.1,
            ni: new.ni,
            nr: new.nr,
            suite: Some(new.suite),
            keys: Some(keys),
            next_request_id: 0,
            outstanding: None,
            next_peer_request_id: 0,
            last_exchange: None,
            until: now + r.max_interval * r.transmissions.max(1) * 2,
        })
    }

    /// Makes `new` the current IKE SA; the old one retires (last in
    /// `retiring`).
    pub(super) fn switch_to(
        &mut self,
        new: NewIke,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Action, IkeError> {
        let mut g = self.generation(new, now)?;
        let old = self.spis();
        self.swap_generation(&mut g);
        self.retiring.push(g);
        self.life.ike_rekeys += 1;
        self.life.ike_rekey_failure = None;
        self.start_ike_life(now, rng);
        Ok(Action::IkeRekeyed {
            old,
            new: self.spis(),
        })
    }

    /// Keeps a redundant new SA only for its Delete; tells the caller to
    /// route its SPIs here meanwhile.
    fn retire(&mut self, new: NewIke, now: Instant) -> Result<Action, IkeError> {
        let g = self.generation(new, now)?;
        let old = g.spis();
        self.retiring.push(g);
        Ok(Action::IkeRekeyed {
            old,
            new: self.spis(),
        })
    }

    /// Sends a Delete of the retiring IKE SA at `at` on that SA.
    fn delete_retiring(
        &mut self,
        at: usize,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Option<Action> {
        let mut g = self.retiring.remove(at);
        self.swap_generation(&mut g);
        let header = self.header(ex::INFORMATIONAL, self.next_request_id, false);
        let delete = [Payload::Delete(Delete {
            protocol: protocol::IKE,
            spis: Vec::new(),
        })];
        let sent = self
            .seal(&header, &delete, rng)
            .map(|b| self.send_request_for(b, now, Purpose::DeleteIke));
        self.swap_generation(&mut g);
        self.retiring.insert(at, g);
        sent.ok()
    }

    /// Starts rekeying the IKE SA (the timers do this on their own at the
    /// policy's lifetime).
    pub fn rekey_ike(
        &mut self,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let suite = self.suite.ok_or(IkeError::Unexpected("no keys yet"))?;
        self.rekey_ike_with(suite.dh, 0, now, rng)
    }

    /// [`IkeSa::rekey_ike`] with a KE payload of `group`, after
    /// `ke_retries` INVALID_KE_PAYLOAD answers.
    fn rekey_ike_with(
        &mut self,
        group: DhGroup,
        ke_retries: u8,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let busy = self.outstanding.is_some()
            || self.retiring.len() >= MAX_RETIRING
            || self
                .children
                .iter()
                .any(|c| c.state == ChildState::Rekeying);
        if !matches!(self.phase, Phase::Established) || busy {
            return Err(IkeError::Unexpected("no IKE SA rekey possible now"));
        }
        let suite = self.suite.ok_or(IkeError::Unexpected("no keys yet"))?;
        // The KE payload's group is among those the SA payload offers.
        if !self.config.ike.dh.contains(&group) {
            return Err(IkeError::Config("the DH group among the IKE groups"));
        }
        let new_spi = random_spi64(rng)?;
        let ni = random_nonce(rng)?;
        let dh = rng.dh_private(group)?;
        // Sections 1.3.2, 2.8: the SA's own ENCR and PRF first, with the
        // group of this KE payload (the SA's own unless the peer asked
        // for another).
        let current = IkeSuite { dh: group, ..suite };
        let payloads = [
            Payload::Sa(self.config.ike.offer_rekey_keeping(new_spi, current)),
            Payload::Nonce(ni.clone()),
            Payload::Ke(KeyExchange {
                group: dh.group().id(),
                data: dh.public().to_vec(),
            }),
        ];
        let header = self.header(ex::CREATE_CHILD_SA, self.next_request_id, false);
        let bytes = self.seal(&header, &payloads, rng)?;
        let purpose = Purpose::RekeyIke(RekeyIke {
            new_spi,
            ni,
            dh,
            ke_retries,
            crossed: None,
        });
        Ok(vec![self.send_request_for(bytes, now, purpose)])
    }

    pub(super) fn respond_rekey_ike(
        &mut self,
        rh: &Header,
        bytes: &[u8],
        found: &Found<'_>,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let refuse = |sa: &mut Self, rng: &mut dyn Randomness, ty: u16, data: Vec<u8>| {
            sa.refuse_create(bytes, rh, ty, data, rng)
        };
        let (Some(sa), Some(ke), Some(ni)) = (found.sa, found.ke, found.nonce) else {
            return refuse(self, rng, notify::INVALID_SYNTAX, Vec::new());
        };
        // Section 2.25: not while a CHILD SA is being made, rekeyed or
        // closed, nor while an old IKE SA is still being deleted. A rekey
        // of ours crossing this one is section 2.8.2: answered as usual.
        let crossed = match self.outstanding.as_ref().map(|o| &o.purpose) {
            None | Some(Purpose::Liveness) => false,
            Some(Purpose::RekeyIke(_)) => true,
            Some(_) => return refuse(self, rng, notify::TEMPORARY_FAILURE, Vec::new()),
        };
        let child_busy = self
            .children
            .iter()
            .any(|c| c.state == ChildState::Rekeying);
        if self.retiring.len() >= MAX_RETIRING || child_busy {
            return refuse(self, rng, notify::TEMPORARY_FAILURE, Vec::new());
        }
        let Some((num, peer_spi, suite)) = self.config.ike.choose_rekey(sa, ke.group) else {
            return refuse(self, rng, notify::NO_PROPOSAL_CHOSEN, Vec::new());
        };
        if suite.dh.id() != ke.group {
            let group = suite.dh.id().to_be_bytes().to_vec();
            return refuse(self, rng, notify::INVALID_KE_PAYLOAD, group);
        }
        if !nonce_fits(ni, suite) {
            return refuse(self, rng, notify::INVALID_SYNTAX, Vec::new());
        }
        let (old_prf, old_sk_d) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (s.prf, k.ike.sk_d.clone()),
            _ => return Err(IkeError::Unexpected("no keys yet")),
        };
        let dh = rng.dh_private(suite.dh)?;
        let public = dh.public().to_vec();
        let Ok(shared) = dh.agree(&ke.data) else {
            return refuse(self, rng, notify::INVALID_SYNTAX, Vec::new());
        };
        let spi_r = random_spi64(rng)?;
        let nr = random_nonce(rng)?;
        let ike = IkeKeys::derive_rekey(
            old_prf, &old_sk_d, suite.prf, suite.encr, &shared, ni, &nr, peer_spi, spi_r,
        )?;
        let payloads = [
            Payload::Sa(vec![suite.answer_rekey(num, spi_r)]),
            Payload::Nonce(nr.clone()),
            Payload::Ke(KeyExchange {
                group: suite.dh.id(),
                data: public,
            }),
        ];
        let response = self.seal(rh, &payloads, rng)?;
        let send = self.answer(bytes, response);
        let new = NewIke {
            role: Role::Responder,
            spis: (peer_spi, spi_r),
            ni: ni.to_vec(),
            nr,
            suite,
            ike,
        };
        if crossed
            && let Some(Outstanding {
                purpose: Purpose::RekeyIke(ours),
                ..
            }) = self.outstanding.as_mut()
        {
            // Decided when our own response arrives.
            ours.crossed = Some(Box::new(new));
            return Ok(vec![send]);
        }
        let rekeyed = self.switch_to(new, now, rng)?;
        Ok(vec![send, rekeyed])
    }

    pub(super) fn on_rekey_ike_response(
        &mut self,
        mut r: RekeyIke,
        found: &Found<'_>,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let crossed = r.crossed.take();
        // Section 1.3: the responder names the group it wants; if it is
        // another one we offered, a new request (message ID, SPI, nonce,
        // KE) tries again with it at once, while the old SA carries on.
        // Not past MAX_KE_RETRIES: then, as for a group we did not offer,
        // the rekey fails. A crossed rekey of the peer's that went through
        // makes ours moot (below).
        let (sent, retries) = (r.dh.group(), r.ke_retries);
        let wanted = super::rekey::ke_retry_group(found, Some(sent), &self.config.ike.dh, retries);
        if let Some(g) = wanted.filter(|_| crossed.is_none()) {
            return match self.rekey_ike_with(g, retries + 1, now, rng) {
                Ok(sent) => Ok(sent),
                Err(e) => Ok(self.ike_rekey_failed(e, now, rng)),
            };
        }
        let ours = match (self.accept_rekey_ike(r, found), crossed) {
            (Ok(ours), crossed) => (ours, crossed),
            // Ours failed but the peer's went through: it is the new SA,
            // and the peer deletes the old one.
            (Err(_), Some(theirs)) => return Ok(vec![self.switch_to(*theirs, now, rng)?]),
            (Err(e), None) => return Ok(self.ike_rekey_failed(e, now, rng)),
        };
        let mut actions = Vec::new();
        match ours {
            (ours, Some(theirs)) if ours.lowest() < theirs.lowest() => {
                // Section 2.8.2: ours is redundant, and ours to delete;
                // the peer deletes the old SA.
                actions.push(self.switch_to(*theirs, now, rng)?);
                actions.push(self.retire(ours, now)?);
                let at = self.retiring.len() - 1;
                actions.extend(self.delete_retiring(at, now, rng));
            }
            (ours, theirs) => {
                // Section 2.18: the rekey's initiator deletes the old IKE
                // SA; a redundant SA of the peer's is the peer's to delete.
                actions.push(self.switch_to(ours, now, rng)?);
                let at = self.retiring.len() - 1;
                actions.extend(self.delete_retiring(at, now, rng));
                if let Some(theirs) = theirs {
                    actions.push(self.retire(*theirs, now)?);
                }
            }
        }
        Ok(actions)
    }

    /// Our IKE SA rekey was refused or unusable (`e`, kept for
    /// [`IkeSa::ike_rekey_failure`]): the old SA carries on, and a
    /// policy's rekey tries again a little later (or the SA reaches its
    /// hard lifetime).
    fn ike_rekey_failed(
        &mut self,
        e: IkeError,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Vec<Action> {
        self.life.ike_rekey_failure = Some(e);
        if self.life.rekey_at.is_some() {
            self.life.rekey_at = Some(now + super::rekey::retry_delay(rng));
        }
        Vec::new()
    }

    fn accept_rekey_ike(&self, r: RekeyIke, found: &Found<'_>) -> Result<NewIke, IkeError> {
        if let Some(e) = found.error() {
            return Err(IkeError::PeerRefused(e));
        }
        let (Some(sa), Some(ke), Some(nr)) = (found.sa, found.ke, found.nonce) else {
            return Err(IkeError::Missing("SA, KE or Nonce"));
        };
        let (spi_r, suite) = self
            .config
            .ike
            .accept_rekey(sa)
            .ok_or(IkeError::BadAnswer("IKE proposal"))?;
        if suite.dh != r.dh.group() || ke.group != suite.dh.id() {
            return Err(IkeError::BadAnswer("DH group"));
        }
        if !nonce_fits(nr, suite) {
            return Err(IkeError::BadAnswer("nonce shorter than half the PRF key"));
        }
        let (old_prf, old_sk_d) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (s.prf, &k.ike.sk_d),
            _ => return Err(IkeError::Unexpected("no keys yet")),
        };
        let shared = r.dh.agree(&ke.data)?;
        let ike = IkeKeys::derive_rekey(
            old_prf, old_sk_d, suite.prf, suite.encr, &shared, &r.ni, nr, r.new_spi, spi_r,
        )?;
        Ok(NewIke {
            role: Role::Initiator,
            spis: (r.new_spi, spi_r),
            ni: r.ni,
            nr: nr.to_vec(),
            suite,
            ike,
        })
    }

    /// A message for the IKE SA being retired: its Delete (either way),
    /// a retransmission, or the answer to a request of ours that crossed
    /// the rekey.
    pub(super) fn handle_retiring(
        &mut self,
        at: usize,
        header: &Header,
        bytes: &[u8],
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let mut g = self.retiring.remove(at);
        self.swap_generation(&mut g);
        let result = self.retiring_exchange(header, bytes, rng);
        self.swap_generation(&mut g);
        match result {
            Ok((actions, true)) => Ok(actions),
            Ok((actions, false)) => {
                self.retiring.insert(at, g);
                Ok(actions)
            }
            Err(e) => {
                self.retiring.insert(at, g);
                Err(e)
            }
        }
    }

    /// Runs with the retiring generation swapped in; `true` when it is
    /// finished.
    fn retiring_exchange(
        &mut self,
        header: &Header,
        bytes: &[u8],
        rng: &mut dyn Randomness,
    ) -> Result<(Vec<Action>, bool), IkeError> {
        if header.is_initiator() != (self.role == Role::Responder) {
            return Err(IkeError::Unexpected("wrong Initiator flag"));
        }
        if header.is_response() {
            if self.outstanding.as_ref().map(|o| o.message_id) != Some(header.message_id) {
                return Err(IkeError::Unexpected("response to no request of ours"));
            }
            match self.open(bytes) {
                Ok(_) | Err(IkeError::Protected(SkError::Inner(_))) => {}
                Err(e) => return Err(e),
            }
            let done = self
                .outstanding
                .take()
                .is_some_and(|o| matches!(o.purpose, Purpose::DeleteIke));
            return Ok((Vec::new(), done));
        }
        if let Some((request, response)) = &self.last_exchange
            && header.message_id.wrapping_add(1) == self.next_peer_request_id
        {
            if request.as_slice() == bytes {
                return Ok((vec![Action::Send(response.clone())], false));
            }
            return Err(IkeError::Unexpected(
                "a different request reuses a message ID",
            ));
        }
        if header.message_id != self.next_peer_request_id {
            return Err(IkeError::Unexpected("request outside the window"));
        }
        let opened = self.open(bytes)?;
        let found = Found::new(&opened.inner)?;
        let rh = self.header(header.exchange, header.message_id, true);
        let (payloads, done) = if header.exchange == ex::INFORMATIONAL {
            let done = found.deletes.iter().any(|d| d.protocol == protocol::IKE);
            (Vec::new(), done)
        } else {
            // The CHILD SAs live in the new IKE SA now.
            let note = Notify::new(notify::TEMPORARY_FAILURE, Vec::new());
            (vec![Payload::Notify(note)], false)
        };
        let response = self.seal(&rh, &payloads, rng)?;
        Ok((vec![self.answer(bytes, response)], done))
    }

    /// Retransmits the retiring SAs' Deletes, and forgets each when its
    /// time is up or its Delete went unanswered.
    pub(super) fn retiring_timeout(&mut self, now: Instant) -> Vec<Action> {
        let retransmit = self.config.retransmit;
        let mut actions = Vec::new();
        self.retiring.retain_mut(|g| {
            if now >= g.until {
                return false;
            }
            if let Some(o) = g.outstanding.as_mut()
                && now >= o.deadline
            {
                if o.sent >= retransmit.transmissions {
                    return false;
                }
                o.sent += 1;
                o.deadline = now + retransmit.interval(o.sent);
                actions.push(Action::Send(o.bytes.clone()));
            }
            true
        });
        actions
    }

    /// The SPIs of IKE SAs being retired after a rekey.
    pub fn retiring_spis(&self) -> Vec<(u64, u64)> {
        self.retiring.iter().map(Generation::spis).collect()
    }
}
