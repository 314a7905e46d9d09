//! INFORMATIONAL exchanges (RFC 7296 section 1.4): Delete of CHILD SAs and
//! of the IKE SA, liveness checks (section 2.4), and the dispatch of every
//! response that comes after IKE_AUTH.

use std::time::Instant;

use super::super::crypto::Randomness;
use super::super::wire::consts::{exchange as ex, notify, protocol};
use super::super::wire::header::Header;
use super::super::wire::payload::{Delete, Notify, Payload};
use super::*;

impl IkeSa {
    /// Answers an INFORMATIONAL request: Deletes, a liveness check (empty),
    /// or the initiator's AUTHENTICATION_FAILED (section 2.21.2).
    pub(super) fn respond_informational(
        &mut self,
        header: &Header,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let response_header = self.header(ex::INFORMATIONAL, header.message_id, true);
        let malformed = |sa: &mut Self, rng: &mut dyn Randomness| {
            let note = Payload::Notify(Notify::new(notify::INVALID_SYNTAX, Vec::new()));
            let response = sa.seal(&response_header, &[note], rng)?;
            Ok(vec![sa.answer(bytes, response)])
        };
        let opened = match self.open(bytes) {
            Ok(o) => o,
            Err(IkeError::Protected(SkError::Inner(_))) => return malformed(self, rng),
            Err(e) => return Err(e),
        };
        let Ok(found) = Found::new(&opened.inner) else {
            return malformed(self, rng);
        };
        if found.notify(notify::AUTHENTICATION_FAILED).is_some() {
            let response = self.seal(&response_header, &[], rng)?;
            let mut actions = vec![self.answer(bytes, response)];
            actions.extend(self.remove_all_children());
            actions.extend(self.fail(IkeError::PeerRefused(ErrorNotify::AuthenticationFailed)));
            return Ok(actions);
        }
        if found.deletes.iter().any(|d| d.protocol == protocol::IKE) {
            if let Some(Outstanding {
                purpose: Purpose::RekeyIke(r),
                ..
            }) = self.outstanding.as_mut()
                && let Some(theirs) = r.crossed.take()
            {
                // Section 2.8.2: our rekey crossed the peer's and was lost
                // or is still in flight; the peer finished its own and now
                // deletes the old SA, so the SA we made answering it is the
                // survivor. Ours is abandoned with the old SA.
                let response = self.seal(&response_header, &[], rng)?;
                let send = self.answer(bytes, response);
                self.outstanding = None;
                let rekeyed = self.switch_to(*theirs, now, rng)?;
                self.retiring.pop();
                return Ok(vec![send, rekeyed]);
            }
            // Section 1.4.1: answered with an empty INFORMATIONAL, and the
            // IKE SA and every CHILD SA of it are gone.
            let response = self.seal(&response_header, &[], rng)?;
            let mut actions = vec![self.answer(bytes, response)];
            actions.extend(self.remove_all_children());
            self.phase = Phase::Closed;
            self.outstanding = None;
            actions.push(Action::Closed);
            return Ok(actions);
        }
        let mut ours = Vec::new();
        let mut removed = Vec::new();
        for spi in found
            .deletes
            .iter()
            .filter(|d| d.protocol == protocol::ESP)
            .flat_map(|d| d.spis.iter().copied())
        {
            // The Delete names the peer's inbound SPIs, our outbound ones.
            let Some(c) = self.child_by_outbound(spi) else {
                continue;
            };
            let (inbound, deleting) = (c.inbound_spi, c.state == ChildState::Deleting);
            // Section 1.4.1: when both sides delete the same SA at once,
            // the answers do not name it again.
            if !deleting {
                ours.push(inbound);
            }
            self.life.pending_deletes.retain(|&s| s != inbound);
            removed.extend(self.remove_child(inbound));
        }
        let payloads = if ours.is_empty() {
            Vec::new()
        } else {
            vec![Payload::Delete(Delete {
                protocol: protocol::ESP,
                spis: ours,
            })]
        };
        let response = self.seal(&response_header, &payloads, rng)?;
        let mut actions = vec![self.answer(bytes, response)];
        actions.extend(removed);
        Ok(actions)
    }

    /// A response in an established IKE SA: authenticated first, then
    /// handed to what the request was for.
    pub(super) fn on_later_response(
        &mut self,
        header: &Header,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let opened = match self.open(bytes) {
            Ok(o) => Some(o),
            // Authenticated but unusable: the exchange is over, and failed.
            Err(IkeError::Protected(SkError::Inner(_))) => None,
            Err(e) => return Err(e),
        };
        let Some(o) = self.outstanding.take() else {
            return Err(IkeError::Unexpected("no request outstanding"));
        };
        let inner = opened.map(|o| o.inner).unwrap_or_default();
        let found = Found::new(&inner).unwrap_or_default();
        match (o.purpose, header.exchange) {
            (Purpose::RekeyChild(r), ex::CREATE_CHILD_SA) => {
                self.on_rekey_child_response(r, &found, now, rng)
            }
            (Purpose::RekeyIke(r), ex::CREATE_CHILD_SA) => {
                self.on_rekey_ike_response(r, &found, now, rng)
            }
            (Purpose::DeleteChildren(spis), ex::INFORMATIONAL) => Ok(spis
                .into_iter()
                .filter_map(|s| self.remove_child(s))
                .collect()),
            (Purpose::DeleteIke, ex::INFORMATIONAL) => {
                let mut actions = self.remove_all_children();
                self.phase = Phase::Closed;
                actions.push(Action::Closed);
                Ok(actions)
            }
            (Purpose::Liveness, ex::INFORMATIONAL) => Ok(Vec::new()),
            (purpose, _) => {
                self.outstanding = Some(Outstanding { purpose, ..o });
                Err(IkeError::Unexpected("response of another exchange type"))
            }
        }
    }

    /// Sends a Delete for our CHILD SAs (by inbound SPI, which is what the
    /// peer knows them by: section 3.11).
    pub(super) fn send_delete_children(
        &mut self,
        spis: Vec<u32>,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        // The SPIs may name SAs already gone here (a hard lifetime): the
        // peer still has to hear of them.
        if spis.is_empty() {
            return Ok(Vec::new());
        }
        for &s in &spis {
            if let Some(c) = self.child_by_inbound(s) {
                c.state = ChildState::Deleting;
            }
        }
        let header = self.header(ex::INFORMATIONAL, self.next_request_id, false);
        let payloads = [Payload::Delete(Delete {
            protocol: protocol::ESP,
            spis: spis.clone(),
        })];
        let bytes = self.seal(&header, &payloads, rng)?;
        Ok(vec![self.send_request_for(
            bytes,
            now,
            Purpose::DeleteChildren(spis),
        )])
    }

    /// Deletes one of our CHILD SAs (by its inbound SPI): now if the
    /// window is free, else when it frees.
    pub fn delete_child(
        &mut self,
        inbound_spi: u32,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        if !matches!(self.phase, Phase::Established) {
            return Err(IkeError::Unexpected("the IKE SA is not established"));
        }
        let c = self
            .child_by_inbound(inbound_spi)
            .ok_or(IkeError::Unexpected("no such CHILD SA"))?;
        c.state = ChildState::Deleting;
        if self.outstanding.is_some() {
            self.queue_delete(inbound_spi, now);
            return Ok(Vec::new());
        }
        self.send_delete_children(vec![inbound_spi], now, rng)
    }

    /// Whether a request of ours awaits its response (the window is one,
    /// section 2.3): a caller that wants an exchange finished first, such
    /// as the Delete of a refused CHILD SA before [`IkeSa::close`], waits
    /// until this is false.
    pub fn request_outstanding(&self) -> bool {
        self.outstanding.is_some()
    }

    /// Deletes the IKE SA and with it every CHILD SA (section 1.4.1). The
    /// answer (or the retransmissions running out) ends it with
    /// [`Action::Closed`]. An outstanding request is abandoned.
    pub fn close(
        &mut self,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        if !matches!(self.phase, Phase::Established) {
            self.phase = Phase::Closed;
            self.outstanding = None;
            return Ok(vec![Action::Closed]);
        }
        self.outstanding = None;
        let header = self.header(ex::INFORMATIONAL, self.next_request_id, false);
        let payloads = [Payload::Delete(Delete {
            protocol: protocol::IKE,
            spis: Vec::new(),
        })];
        let bytes = self.seal(&header, &payloads, rng)?;
        Ok(vec![self.send_request_for(bytes, now, Purpose::DeleteIke)])
    }

    /// Sends an empty INFORMATIONAL request (section 2.4) if the window is
    /// free.
    pub fn check_liveness(
        &mut self,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        if !matches!(self.phase, Phase::Established) || self.outstanding.is_some() {
            return Err(IkeError::Unexpected("no liveness check possible now"));
        }
        let header = self.header(ex::INFORMATIONAL, self.next_request_id, false);
        let bytes = self.seal(&header, &[], rng)?;
        self.life.last_liveness = Some(now);
        Ok(vec![self.send_request_for(bytes, now, Purpose::Liveness)])
    }

    /// Ends the IKE SA on our side (hard lifetime): the CHILD SAs go, the
    /// peer is told with a Delete we do not wait for.
    pub(super) fn end_ike(
        &mut self,
        now: Instant,
        rng: &mut dyn Randomness,
        why: IkeError,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Ok(send) = self.close(now, rng) {
            actions.extend(send);
        }
        actions.extend(self.remove_all_children());
        actions.extend(self.fail(why));
        actions
    }
}
