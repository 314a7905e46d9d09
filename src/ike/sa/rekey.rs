//! Rekeying a CHILD SA with CREATE_CHILD_SA (RFC 7296 sections 1.3.3,
//! 2.8, 2.8.1, 2.17, 2.25).
//!
//! Make-before-break: the new CHILD SA is installed first, then the old
//! one is deleted with an INFORMATIONAL Delete by the rekey's initiator.
//! KEYMAT is prf+(SK_d, [g^ir (new) |] Ni | Nr) with the nonces of *this*
//! exchange, and its first key runs from this exchange's initiator to its
//! responder (section 2.17) — which is the original responder when it is
//! the one rekeying.
//!
//! The request offers the old SA's own algorithms first (ENCR with key
//! size, ESN, its PFS group), then the configured ones, so that a peer
//! allowing only the current suite still finds it. An INVALID_KE_PAYLOAD
//! answer (section 1.3) naming another group we offered gets a new
//! request with that group, at most [`MAX_KE_RETRIES`] times per rekey;
//! any other ends the rekey with the old SA still in use. Both rules hold
//! for the IKE SA rekey too (`ike_rekey`).

use std::time::{Duration, Instant};

use super::super::crypto::{DhGroup, DhPrivate, Randomness, child_keys};
use super::super::proposal::{EspAlgorithms, EspSuite};
use super::super::wire::consts::{exchange as ex, notify, protocol};
use super::super::wire::header::Header;
use super::super::wire::payload::{KeyExchange, Notify, Payload};
use super::*;

/// Our CHILD SA rekey in flight.
pub(super) struct RekeyChild {
    /// The CHILD SA being replaced (our inbound SPI).
    pub(super) old: u32,
    /// Our inbound SPI for its successor.
    new: u32,
    ni: Vec<u8>,
    dh: Option<DhPrivate>,
    /// The PFS groups the request offered (none without a KE payload).
    offered: Vec<DhGroup>,
    /// Requests this rekey already sent again after INVALID_KE_PAYLOAD.
    ke_retries: u8,
    /// The lowest nonce of the peer's rekey of the same CHILD SA, which
    /// crossed ours (section 2.8.1).
    crossed: Option<Vec<u8>>,
}

/// How often one rekey (CHILD or IKE SA) sends its request again with
/// the group an INVALID_KE_PAYLOAD asks for. With two groups one retry is
/// all an honest peer needs; the bound keeps forged or confused answers
/// from making a loop.
pub(super) const MAX_KE_RETRIES: u8 = 2;

/// Section 1.3: the group an INVALID_KE_PAYLOAD answer asks for, if the
/// rekey may try again with it: one the request `offered`, not the one
/// whose KE payload it `sent`, and fewer than [`MAX_KE_RETRIES`] retries
/// behind it (`retries`). Otherwise the rekey fails.
pub(super) fn ke_retry_group(
    found: &Found<'_>,
    sent: Option<DhGroup>,
    offered: &[DhGroup],
    retries: u8,
) -> Option<DhGroup> {
    let n = found.notify(notify::INVALID_KE_PAYLOAD)?;
    let wanted = <[u8; 2]>::try_from(n.data.as_slice())
        .ok()
        .map(u16::from_be_bytes)
        .and_then(DhGroup::from_id)?;
    let fresh = sent.is_some_and(|s| s != wanted);
    (fresh && offered.contains(&wanted) && retries < MAX_KE_RETRIES).then_some(wanted)
}

/// What answering the peer's CHILD SA rekey makes.
struct Answered {
    payloads: Vec<Payload>,
    child: ChildSa,
    /// Its PFS group, if any.
    pfs: Option<DhGroup>,
    generation: u32,
    /// Our inbound SPI of the SA it replaces.
    ours_old: u32,
    /// The exchange's lowest nonce (section 2.8.1).
    lowest: Vec<u8>,
}

/// After TEMPORARY_FAILURE or a refused rekey, try again this much later
/// plus a random part up to as much again (section 2.25: "retry after a
/// short delay"; random so that two sides, or a side and a periodic loss,
/// do not stay in step).
pub(super) const RETRY: Duration = Duration::from_secs(3);

/// [`RETRY`] with its random part from `rng`.
pub(super) fn retry_delay(rng: &mut dyn Randomness) -> Duration {
    let mut b = [0u8];
    let extra = if rng.fill(&mut b).is_ok() { b[0] } else { 0 };
    RETRY + RETRY * u32::from(extra) / 255
}

impl IkeSa {
    /// Starts rekeying our CHILD SA with this inbound SPI (the timers do
    /// this on their own at the policy's lifetime).
    pub fn rekey_child(
        &mut self,
        inbound_spi: u32,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        // Section 2.8: the SA's own PFS group first, if it had one and we
        // still allow it (and what kept it going will likely again).
        let own = self
            .children
            .iter()
            .find(|c| c.inbound_spi == inbound_spi)
            .and_then(|c| c.pfs)
            .filter(|g| self.policy.pfs.contains(g));
        let group = own.or_else(|| self.policy.pfs.first().copied());
        self.rekey_child_with(inbound_spi, group, 0, now, rng)
    }

    /// [`IkeSa::rekey_child`] with this PFS group (or none), after
    /// `ke_retries` INVALID_KE_PAYLOAD answers.
    fn rekey_child_with(
        &mut self,
        inbound_spi: u32,
        group: Option<DhGroup>,
        ke_retries: u8,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        if !matches!(self.phase, Phase::Established) || self.outstanding.is_some() {
            return Err(IkeError::Unexpected("no rekey possible now"));
        }
        let Some(current) = self
            .children
            .iter()
            .find(|c| c.inbound_spi == inbound_spi && c.state == ChildState::Installed)
            .map(|c| EspSuite {
                encr: c.encr,
                esn: c.esn,
            })
        else {
            return Err(IkeError::Unexpected("no such CHILD SA to rekey"));
        };
        // The KE payload's group is among those the SA payload offers.
        if group.is_some_and(|g| !self.policy.pfs.contains(&g)) {
            return Err(IkeError::Config("the PFS group among the PFS groups"));
        }
        let new = random_esp_spi(rng)?;
        let ni = random_nonce(rng)?;
        let dh = match group {
            Some(g) => Some(rng.dh_private(g)?),
            None => None,
        };
        let (ours, theirs) = self.host_selectors();
        // Section 1.3.3: REKEY_SA names the SA being rekeyed by the SPI
        // we expect in its inbound packets.
        let mut rekey = Notify::new(notify::REKEY_SA, Vec::new());
        rekey.protocol = protocol::ESP;
        rekey.spi = inbound_spi.to_be_bytes().to_vec();
        let mut payloads = vec![
            Payload::Notify(rekey),
            // Section 1.3.1: every rekey of a transport-mode SA repeats it.
            Payload::Notify(Notify::new(notify::USE_TRANSPORT_MODE, Vec::new())),
            // Sections 1.3.3, 2.8: the SA's own algorithms first.
            Payload::Sa(
                self.config
                    .esp
                    .offer_rekey(new, current, group, &self.policy.pfs),
            ),
            Payload::Nonce(ni.clone()),
        ];
        if let Some(d) = &dh {
            payloads.push(Payload::Ke(KeyExchange {
                group: d.group().id(),
                data: d.public().to_vec(),
            }));
        }
        payloads.push(Payload::TsI(vec![ours]));
        payloads.push(Payload::TsR(vec![theirs]));
        let header = self.header(ex::CREATE_CHILD_SA, self.next_request_id, false);
        let bytes = self.seal(&header, &payloads, rng)?;
        if let Some(c) = self.child_by_inbound(inbound_spi) {
            c.state = ChildState::Rekeying;
        }
        let offered = if dh.is_some() {
            self.policy.pfs.clone()
        } else {
            Vec::new()
        };
        let purpose = Purpose::RekeyChild(RekeyChild {
            old: inbound_spi,
            new,
            ni,
            dh,
            offered,
            ke_retries,
            crossed: None,
        });
        Ok(vec![self.send_request_for(bytes, now, purpose)])
    }

    /// Answers a CREATE_CHILD_SA request: a CHILD SA rekey here, an IKE SA
    /// rekey in `ike_rekey`; a new CHILD SA beside the first is refused
    /// (host-to-host transport mode needs one pair).
    pub(super) fn respond_create_child(
        &mut self,
        header: &Header,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let rh = self.header(ex::CREATE_CHILD_SA, header.message_id, true);
        let opened = match self.open(bytes) {
            Ok(o) => o,
            Err(IkeError::Protected(SkError::Inner(_))) => {
                return self.refuse_create(bytes, &rh, notify::INVALID_SYNTAX, Vec::new(), rng);
            }
            Err(e) => return Err(e),
        };
        let Ok(found) = Found::new(&opened.inner) else {
            return self.refuse_create(bytes, &rh, notify::INVALID_SYNTAX, Vec::new(), rng);
        };
        if found
            .sa
            .is_some_and(|s| s.iter().any(|p| p.protocol == protocol::IKE))
        {
            return self.respond_rekey_ike(&rh, bytes, &found, now, rng);
        }
        let Some(rekey) = found.notify(notify::REKEY_SA) else {
            return self.refuse_create(bytes, &rh, notify::NO_ADDITIONAL_SAS, Vec::new(), rng);
        };
        match self.answer_rekey_child(rekey, &found, now, rng) {
            Ok(a) => {
                let response = self.seal(&rh, &a.payloads, rng)?;
                // Answered: from here on the state changes.
                self.mark_rekeyed_by_peer(a.ours_old, a.lowest);
                self.adopt(&a.child, a.pfs, a.generation, now, rng);
                self.life.child_rekeys += 1;
                Ok(vec![
                    self.answer(bytes, response),
                    Action::InstallChild(a.child),
                ])
            }
            Err((ty, data)) => self.refuse_create(bytes, &rh, ty, data, rng),
        }
    }

    /// Answers CREATE_CHILD_SA with one error notification.
    pub(super) fn refuse_create(
        &mut self,
        request: &[u8],
        header: &Header,
        ty: u16,
        data: Vec<u8>,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let response = self.seal(header, &[Payload::Notify(Notify::new(ty, data))], rng)?;
        Ok(vec![self.answer(request, response)])
    }

    /// The responder's side of a CHILD SA rekey: the response payloads,
    /// the new CHILD SA and what goes with it, or the error to answer
    /// with. Section 1.3: a KE payload of another group than the chosen
    /// proposal's is answered with INVALID_KE_PAYLOAD naming ours.
    fn answer_rekey_child(
        &mut self,
        rekey: &Notify,
        found: &Found<'_>,
        _now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Answered, (u16, Vec<u8>)> {
        let temporary = (notify::TEMPORARY_FAILURE, Vec::new());
        let Ok(peer_old) = <[u8; 4]>::try_from(rekey.spi.as_slice()).map(u32::from_be_bytes) else {
            return Err((notify::INVALID_SYNTAX, Vec::new()));
        };
        // Section 2.25: an SA we do not have, or are deleting, or one of
        // ours while we rekey the IKE SA, is not rekeyed.
        let Some(c) = self.child_by_outbound(peer_old) else {
            return Err((notify::CHILD_SA_NOT_FOUND, Vec::new()));
        };
        let (state, ours_old, generation) = (c.state, c.inbound_spi, c.generation + 1);
        if matches!(state, ChildState::Deleting | ChildState::Rekeyed)
            || matches!(
                self.outstanding.as_ref().map(|o| &o.purpose),
                Some(Purpose::RekeyIke(_))
            )
        {
            return Err(temporary);
        }
        if found.notify(notify::USE_TRANSPORT_MODE).is_none() {
            return Err((notify::NO_PROPOSAL_CHOSEN, Vec::new()));
        }
        let sa = found.sa.ok_or((notify::NO_PROPOSAL_CHOSEN, Vec::new()))?;
        let ni = found.nonce.ok_or((notify::INVALID_SYNTAX, Vec::new()))?;
        let (keys, suite) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (k, s),
            _ => return Err(temporary),
        };
        if !nonce_fits(ni, suite) {
            return Err((notify::INVALID_SYNTAX, Vec::new()));
        }
        // Without a PFS policy of our own we still follow an initiator
        // that wants PFS, with any group we allow for IKE.
        let (groups, required) = match self.policy.pfs.as_slice() {
            [] => (self.config.ike.dh.as_slice(), false),
            pfs => (pfs, true),
        };
        let (num, peer_spi, esp, group) = self
            .config
            .esp
            .choose_pfs(sa, groups, required, found.ke.map(|k| k.group))
            .map_err(|want| match want {
                Some(g) => (notify::INVALID_KE_PAYLOAD, g.id().to_be_bytes().to_vec()),
                None => (notify::NO_PROPOSAL_CHOSEN, Vec::new()),
            })?;
        let (ours, theirs) = self.host_selectors();
        let (tsi, tsr) = (found.tsi.unwrap_or(&[]), found.tsr.unwrap_or(&[]));
        let original = self
            .child_selectors(tsr, tsi)
            .ok_or((notify::TS_UNACCEPTABLE, Vec::new()))?;
        let spi = random_esp_spi(rng).map_err(|_| temporary.clone())?;
        let nr = random_nonce(rng).map_err(|_| temporary.clone())?;
        let (shared, ke) = match (group, found.ke) {
            (Some(g), Some(ke)) => {
                let dh = rng.dh_private(g).map_err(|_| temporary.clone())?;
                let public = dh.public().to_vec();
                let shared = dh
                    .agree(&ke.data)
                    .map_err(|_| (notify::INVALID_SYNTAX, Vec::new()))?;
                (
                    Some(shared),
                    Some(KeyExchange {
                        group: g.id(),
                        data: public,
                    }),
                )
            }
            _ => (None, None),
        };
        let km = child_keys(
            suite.prf,
            &keys.ike.sk_d,
            shared.as_ref(),
            ni,
            &nr,
            esp.encr,
        )
        .map_err(|_| temporary.clone())?;
        let lowest = ni.min(nr.as_slice()).to_vec();
        let child = ChildSa {
            inbound_spi: spi,
            outbound_spi: peer_spi,
            inbound: km.initiator_to_responder,
            outbound: km.responder_to_initiator,
            encr: esp.encr,
            esn: esp.esn,
            transport_mode: true,
            local_ts: vec![ours],
            remote_ts: vec![theirs],
            udp_encap: self.udp_encap(),
            original,
        };
        let mut payloads = vec![
            Payload::Notify(Notify::new(notify::USE_TRANSPORT_MODE, Vec::new())),
            Payload::Sa(vec![EspAlgorithms::answer_pfs(num, spi, esp, group)]),
            Payload::Nonce(nr),
        ];
        payloads.extend(ke.map(Payload::Ke));
        // As in IKE_AUTH: the selectors name the original addresses.
        payloads.push(Payload::TsI(vec![TrafficSelector::host(original.peer)]));
        payloads.push(Payload::TsR(vec![TrafficSelector::host(original.local)]));
        Ok(Answered {
            payloads,
            child,
            pfs: group,
            generation,
            ours_old,
            lowest,
        })
    }

    /// The peer rekeyed our CHILD SA `ours_old`: it is replaced, unless a
    /// rekey of ours of the same SA crossed this one (section 2.8.1), which
    /// then remembers this exchange's lowest nonce for when it completes.
    fn mark_rekeyed_by_peer(&mut self, ours_old: u32, lowest: Vec<u8>) {
        if let Some(Outstanding {
            purpose: Purpose::RekeyChild(r),
            ..
        }) = self.outstanding.as_mut()
            && r.old == ours_old
        {
            r.crossed = Some(lowest);
        } else if let Some(c) = self.child_by_inbound(ours_old) {
            c.state = ChildState::Rekeyed;
        }
    }

    /// The answer to our CHILD SA rekey.
    pub(super) fn on_rekey_child_response(
        &mut self,
        mut r: RekeyChild,
        found: &Found<'_>,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let dh = r.dh.take();
        let dh_group = dh.as_ref().map(DhPrivate::group);
        let generation = self
            .children
            .iter()
            .find(|c| c.inbound_spi == r.old)
            .map_or(1, |c| c.generation + 1);
        match self.accept_rekey_child(&r, dh, found) {
            Ok(child) => {
                self.adopt(&child, dh_group, generation, now, rng);
                self.life.child_rekeys += 1;
                let mut actions = vec![Action::InstallChild(child)];
                // Section 2.8.1: of two crossed rekeys, the SA made with
                // the lowest of the four nonces is redundant, and its
                // maker (the exchange's initiator) deletes it; the other
                // side deletes the old SA.
                let ours_lowest = r.ni.as_slice().min(found.nonce.unwrap_or(&[]));
                let redundant = r.crossed.as_deref().is_some_and(|t| ours_lowest < t);
                if let Some(c) = self.child_by_inbound(r.old) {
                    c.state = ChildState::Rekeyed;
                }
                let doomed = if redundant { r.new } else { r.old };
                // The new SA is installed whatever happens next: a Delete
                // that cannot be sent now goes when the timers run.
                match self.send_delete_children(vec![doomed], now, rng) {
                    Ok(sent) => actions.extend(sent),
                    Err(_) => self.queue_delete(doomed, now),
                }
                Ok(actions)
            }
            Err(e) => {
                let temporary =
                    e == IkeError::PeerRefused(ErrorNotify::Other(notify::TEMPORARY_FAILURE));
                let not_found =
                    e == IkeError::PeerRefused(ErrorNotify::Other(notify::CHILD_SA_NOT_FOUND));
                if not_found {
                    // The peer has no such SA any more: neither do we.
                    return Ok(self.remove_child(r.old).into_iter().collect());
                }
                let crossed = r.crossed.is_some();
                // Section 1.3: the responder names the PFS group it wants;
                // if it is another one we offered, a new request (message
                // ID, SPI, nonce, KE) tries again with it at once, while
                // the old SA carries on. Not past MAX_KE_RETRIES: then, as
                // for a group we did not offer, the rekey fails.
                let wanted = ke_retry_group(found, dh_group, &r.offered, r.ke_retries);
                if let Some(g) = wanted.filter(|_| !crossed)
                    && let Some(c) = self.child_by_inbound(r.old)
                    && c.state == ChildState::Rekeying
                {
                    c.state = ChildState::Installed;
                    match self.rekey_child_with(r.old, Some(g), r.ke_retries + 1, now, rng) {
                        Ok(sent) => return Ok(sent),
                        // Nothing went out: the rekey fails like any other.
                        Err(_) => {
                            if let Some(c) = self.child_by_inbound(r.old) {
                                c.state = ChildState::Rekeying;
                            }
                        }
                    }
                }
                if let Some(c) = self.child_by_inbound(r.old) {
                    if crossed {
                        // The peer's rekey of it went through: it is
                        // replaced, and the peer deletes it.
                        c.state = ChildState::Rekeyed;
                    } else if c.state == ChildState::Rekeying {
                        c.state = ChildState::Installed;
                        // Only a policy's rekey retries on its own.
                        if c.rekey_at.is_some() {
                            c.rekey_at = Some(now + retry_delay(rng));
                        }
                    }
                }
                if temporary || crossed {
                    return Ok(Vec::new());
                }
                Ok(vec![Action::ChildFailed(e)])
            }
        }
    }

    fn accept_rekey_child(
        &self,
        r: &RekeyChild,
        dh: Option<DhPrivate>,
        found: &Found<'_>,
    ) -> Result<ChildSa, IkeError> {
        if let Some(e) = found.error() {
            return Err(IkeError::PeerRefused(e));
        }
        if found.notify(notify::USE_TRANSPORT_MODE).is_none() {
            return Err(IkeError::BadAnswer("tunnel mode"));
        }
        let sa = found.sa.ok_or(IkeError::Missing("SA"))?;
        let nr = found.nonce.ok_or(IkeError::Missing("Nonce"))?;
        let group: Option<DhGroup> = dh.as_ref().map(DhPrivate::group);
        let (peer_spi, esp) = self
            .config
            .esp
            .accept_pfs(sa, group)
            .ok_or(IkeError::BadAnswer("ESP proposal"))?;
        let (keys, suite) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (k, s),
            _ => return Err(IkeError::Unexpected("no keys yet")),
        };
        if !nonce_fits(nr, suite) {
            return Err(IkeError::BadAnswer("nonce shorter than half the PRF key"));
        }
        let (ours, theirs) = self.host_selectors();
        let (tsi, tsr) = (found.tsi.unwrap_or(&[]), found.tsr.unwrap_or(&[]));
        let original = self
            .child_selectors(tsi, tsr)
            .ok_or(IkeError::BadAnswer("traffic selectors"))?;
        let shared = match (dh, found.ke) {
            (Some(dh), Some(ke)) if ke.group == dh.group().id() => Some(dh.agree(&ke.data)?),
            (None, None) => None,
            _ => return Err(IkeError::BadAnswer("KE payload")),
        };
        let km = child_keys(
            suite.prf,
            &keys.ike.sk_d,
            shared.as_ref(),
            &r.ni,
            nr,
            esp.encr,
        )?;
        Ok(ChildSa {
            inbound_spi: r.new,
            outbound_spi: peer_spi,
            inbound: km.responder_to_initiator,
            outbound: km.initiator_to_responder,
            encr: esp.encr,
            esn: esp.esn,
            transport_mode: true,
            local_ts: vec![ours],
            remote_ts: vec![theirs],
            udp_encap: self.udp_encap(),
            original,
        })
    }
}
