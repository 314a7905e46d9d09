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
//! Crossed rekeys (section 2.8.2): the RFC keeps both new SAs until all
//! four nonces are known and then deletes the one with the lowest. We
//! decide earlier, with the two initiator nonces both sides already
//! hold when the requests cross: the request whose Ni is lower is
//! answered TEMPORARY_FAILURE (section 2.25 permits refusing a rekey that
//! collides), so only one new SA is ever made and no third SPI pair is
//! needed. Either way exactly one new SA survives, chosen by nonces.

use std::time::Instant;

use super::super::crypto::{DhPrivate, IkeKeys, Randomness};
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

/// Our IKE SA rekey in flight.
pub(super) struct RekeyIke {
    new_spi: u64,
    ni: Vec<u8>,
    dh: DhPrivate,
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

    /// Makes `new` the current IKE SA and keeps the old one retiring.
    #[allow(clippy::too_many_arguments)]
    fn switch_to(
        &mut self,
        role: Role,
        spis: (u64, u64),
        nonces: (Vec<u8>, Vec<u8>),
        suite: IkeSuite,
        ike: IkeKeys,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Action, IkeError> {
        let (sk_out, sk_in) = match role {
            Role::Initiator => (&ike.sk_ei, &ike.sk_er),
            Role::Responder => (&ike.sk_er, &ike.sk_ei),
        };
        let keys = Keys {
            sk_out: SkKey::new(suite.encr, sk_out)?,
            sk_in: SkKey::new(suite.encr, sk_in)?,
            ike,
        };
        let r = self.config.retransmit;
        let mut g = Generation {
            role,
            spi_i: spis.0,
            spi_r: spis.1,
            ni: nonces.0,
            nr: nonces.1,
            suite: Some(suite),
            keys: Some(keys),
            next_request_id: 0,
            outstanding: None,
            next_peer_request_id: 0,
            last_exchange: None,
            until: now + r.max_interval * r.transmissions.max(1) * 2,
        };
        let old = self.spis();
        self.swap_generation(&mut g);
        self.retiring = Some(Box::new(g));
        self.life.ike_rekeys += 1;
        self.start_ike_life(now, rng);
        Ok(Action::IkeRekeyed {
            old,
            new: self.spis(),
        })
    }

    /// Starts rekeying the IKE SA (the timers do this on their own at the
    /// policy's lifetime).
    pub fn rekey_ike(
        &mut self,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let busy = self.outstanding.is_some()
            || self.retiring.is_some()
            || self
                .children
                .iter()
                .any(|c| c.state == ChildState::Rekeying);
        if !matches!(self.phase, Phase::Established) || busy {
            return Err(IkeError::Unexpected("no IKE SA rekey possible now"));
        }
        let suite = self.suite.ok_or(IkeError::Unexpected("no keys yet"))?;
        let new_spi = random_spi64(rng)?;
        let ni = random_nonce(rng)?;
        let dh = rng.dh_private(suite.dh)?;
        let payloads = [
            Payload::Sa(vec![self.config.ike.offer_rekey(new_spi)]),
            Payload::Nonce(ni.clone()),
            Payload::Ke(KeyExchange {
                group: dh.group().id(),
                data: dh.public().to_vec(),
            }),
        ];
        let header = self.header(ex::CREATE_CHILD_SA, self.next_request_id, false);
        let bytes = self.seal(&header, &payloads, rng)?;
        let purpose = Purpose::RekeyIke(RekeyIke { new_spi, ni, dh });
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
        // closed, nor twice at once.
        let crossed = match self.outstanding.as_ref().map(|o| &o.purpose) {
            None => false,
            Some(Purpose::RekeyIke(ours)) => {
                // Crossed IKE rekeys: the request with the lower Ni loses
                // (see the module comment).
                if ni < ours.ni.as_slice() {
                    return refuse(self, rng, notify::TEMPORARY_FAILURE, Vec::new());
                }
                true
            }
            Some(Purpose::Liveness) => false,
            Some(_) => return refuse(self, rng, notify::TEMPORARY_FAILURE, Vec::new()),
        };
        let child_busy = self
            .children
            .iter()
            .any(|c| c.state == ChildState::Rekeying && !crossed);
        if self.retiring.is_some() || child_busy {
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
        // Our own crossed request (if any) moves to the retiring SA with
        // the switch; the peer refuses it there.
        let rekeyed = self.switch_to(
            Role::Responder,
            (peer_spi, spi_r),
            (ni.to_vec(), nr),
            suite,
            ike,
            now,
            rng,
        )?;
        Ok(vec![send, rekeyed])
    }

    pub(super) fn on_rekey_ike_response(
        &mut self,
        r: RekeyIke,
        found: &Found<'_>,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let accepted = self.accept_rekey_ike(r, found);
        let (spis, nonces, suite, ike) = match accepted {
            Ok(x) => x,
            Err(_) => {
                // Refused or unusable: the old SA carries on, and we try
                // again a little later (or it reaches its hard lifetime).
                if self.life.rekey_at.is_some() {
                    self.life.rekey_at = Some(now + super::rekey::RETRY);
                }
                return Ok(Vec::new());
            }
        };
        let rekeyed = self.switch_to(Role::Initiator, spis, nonces, suite, ike, now, rng)?;
        let mut actions = vec![rekeyed];
        // Section 2.18: the rekey's initiator deletes the old IKE SA.
        if let Some(mut old) = self.retiring.take() {
            self.swap_generation(&mut old);
            let header = self.header(ex::INFORMATIONAL, self.next_request_id, false);
            let delete = [Payload::Delete(Delete {
                protocol: protocol::IKE,
                spis: Vec::new(),
            })];
            let sent = self
                .seal(&header, &delete, rng)
                .map(|b| self.send_request_for(b, now, Purpose::DeleteIke));
            self.swap_generation(&mut old);
            self.retiring = Some(old);
            actions.extend(sent.ok());
        }
        Ok(actions)
    }

    #[allow(clippy::type_complexity)]
    fn accept_rekey_ike(
        &self,
        r: RekeyIke,
        found: &Found<'_>,
    ) -> Result<((u64, u64), (Vec<u8>, Vec<u8>), IkeSuite, IkeKeys), IkeError> {
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
        Ok(((r.new_spi, spi_r), (r.ni, nr.to_vec()), suite, ike))
    }

    /// A message for the IKE SA being retired: its Delete (either way),
    /// a retransmission, or the answer to a request of ours that crossed
    /// the rekey.
    pub(super) fn handle_retiring(
        &mut self,
        header: &Header,
        bytes: &[u8],
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let Some(mut old) = self.retiring.take() else {
            return Err(IkeError::Unexpected("no retiring IKE SA"));
        };
        self.swap_generation(&mut old);
        let result = self.retiring_exchange(header, bytes, rng);
        self.swap_generation(&mut old);
        match result {
            Ok((actions, done)) => {
                if !done {
                    self.retiring = Some(old);
                }
                Ok(actions)
            }
            Err(e) => {
                self.retiring = Some(old);
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

    /// Retransmits the retiring SA's Delete, and forgets the SA when its
    /// time is up.
    pub(super) fn retiring_timeout(&mut self, now: Instant) -> Vec<Action> {
        let Some(mut old) = self.retiring.take() else {
            return Vec::new();
        };
        if now >= old.until {
            return Vec::new();
        }
        let mut actions = Vec::new();
        let retransmit = self.config.retransmit;
        if let Some(o) = old.outstanding.as_mut()
            && now >= o.deadline
        {
            if o.sent >= retransmit.transmissions {
                // Unanswered: the old SA is gone for us too.
                return Vec::new();
            }
            o.sent += 1;
            o.deadline = now + retransmit.interval(o.sent);
            actions.push(Action::Send(o.bytes.clone()));
        }
        self.retiring = Some(old);
        actions
    }

    /// The SPIs of the IKE SA being retired after a rekey, if any.
    pub fn retiring_spis(&self) -> Option<(u64, u64)> {
        self.retiring.as_ref().map(|g| g.spis())
    }
}
