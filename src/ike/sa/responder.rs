//! The responder's side of IKE_SA_INIT and IKE_AUTH (RFC 7296 sections
//! 1.2, 1.3, 2.15, 2.21).

use super::super::crypto::{
    IkeKeys, Randomness, SignedOctets, child_keys, psk_auth, verify_psk_auth,
};
use super::super::proposal::EspAlgorithms;
use super::super::sk::SkKey;
use super::super::wire::consts::{auth, exchange as ex, notify};
use super::super::wire::payload::{Auth, KeyExchange, Notify, Payload};
use super::super::wire::{Message, header::Header};
use super::*;

impl IkeSa {
    /// An unprotected error answer to IKE_SA_INIT. Section 2.6 and 1.3:
    /// such answers keep no state and carry a responder SPI of zero.
    fn init_error(&self, header: &Header, ty: u16, data: Vec<u8>) -> Result<Vec<u8>, IkeError> {
        let h = Header {
            spi_i: header.spi_i,
            spi_r: 0,
            exchange: ex::IKE_SA_INIT,
            flags: flags::RESPONSE,
            message_id: 0,
        };
        Ok(Message {
            header: h,
            payloads: vec![Payload::Notify(Notify::new(ty, data))],
        }
        .emit()?)
    }

    pub(super) fn respond_init(
        &mut self,
        header: &Header,
        bytes: &[u8],
        now: std::time::Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        if header.spi_r != 0 {
            return Err(IkeError::Unexpected(
                "IKE_SA_INIT request with a responder SPI",
            ));
        }
        let msg = match Message::parse(bytes) {
            Ok(m) => m,
            // Section 2.5: answered, statelessly, with the payload's type.
            Err(WireError::UnsupportedCritical(t)) => {
                let reply =
                    self.init_error(header, notify::UNSUPPORTED_CRITICAL_PAYLOAD, vec![t])?;
                return Ok(vec![Action::Send(reply)]);
            }
            Err(e) => return Err(e.into()),
        };
        let found = Found::new(&msg.payloads)?;
        let (Some(sa), Some(ke), Some(ni)) = (found.sa, found.ke, found.nonce) else {
            return Err(IkeError::Missing("SA, KE or Nonce"));
        };
        let Some((num, suite)) = self.config.ike.choose(sa, ke.group) else {
            let reply = self.init_error(header, notify::NO_PROPOSAL_CHOSEN, Vec::new())?;
            let mut actions = vec![Action::Send(reply)];
            actions.extend(self.fail(IkeError::WeRefused(ErrorNotify::NoProposalChosen)));
            return Ok(actions);
        };
        if !nonce_fits(ni, suite) {
            return Err(WireError::Invalid("nonce shorter than half the PRF key").into());
        }
        if suite.dh.id() != ke.group {
            // Section 1.3: name the group we want and keep no state; the
            // initiator retries with a new KE and message ID 0.
            let group = suite.dh.id().to_be_bytes().to_vec();
            let reply = self.init_error(header, notify::INVALID_KE_PAYLOAD, group)?;
            return Ok(vec![Action::Send(reply)]);
        }
        let dh = rng.dh_private(suite.dh)?;
        let public = dh.public().to_vec();
        // An invalid public value is dropped like a malformed message: no
        // answer can be authenticated yet.
        let shared = dh.agree(&ke.data)?;
        let spi_r = random_spi64(rng)?;
        let nr = random_nonce(rng)?;
        let ike = IkeKeys::derive(suite.prf, suite.encr, &shared, ni, &nr, header.spi_i, spi_r)?;
        let keys = Keys {
            sk_out: SkKey::new(suite.encr, &ike.sk_er)?,
            sk_in: SkKey::new(suite.encr, &ike.sk_ei)?,
            ike,
        };
        self.spi_i = header.spi_i;
        self.spi_r = spi_r;
        self.ni = ni.to_vec();
        self.nr = nr.clone();
        self.suite = Some(suite);
        self.keys = Some(keys);
        self.init_request = bytes.to_vec();
        // Section 2.23: the request's hashes use a responder SPI of zero;
        // ours answer only an initiator that sent some.
        self.detect_nat(&found, header.spi_i, 0, now);
        let mut payloads = vec![
            Payload::Sa(vec![suite.answer(num)]),
            Payload::Ke(KeyExchange {
                group: suite.dh.id(),
                data: public,
            }),
            Payload::Nonce(nr),
        ];
        if self.nat.status.supported {
            payloads.extend(self.natd_payloads(self.spi_i, self.spi_r));
        }
        let response = Message {
            header: self.header(ex::IKE_SA_INIT, 0, true),
            payloads,
        }
        .emit()?;
        self.init_response = response.clone();
        self.phase = Phase::InitAnswered;
        Ok(vec![self.answer(bytes, response)])
    }

    pub(super) fn respond_auth(
        &mut self,
        header: &Header,
        bytes: &[u8],
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let response_header = self.header(ex::IKE_AUTH, header.message_id, true);
        let opened = match self.open(bytes) {
            Ok(o) => o,
            // Section 2.5: an unknown critical payload fails the message,
            // and the answer names its type.
            Err(IkeError::Protected(SkError::Inner(WireError::UnsupportedCritical(t)))) => {
                let why = ErrorNotify::Other(notify::UNSUPPORTED_CRITICAL_PAYLOAD);
                return self.refuse_auth(bytes, &response_header, why, vec![t], rng);
            }
            Err(IkeError::Protected(SkError::Inner(_))) => {
                let why = ErrorNotify::InvalidSyntax;
                return self.refuse_auth(bytes, &response_header, why, Vec::new(), rng);
            }
            Err(e) => return Err(e),
        };
        // Authenticated but malformed (a payload twice): INVALID_SYNTAX
        // (section 2.21.2), like a missing IDi or AUTH.
        let Ok(found) = Found::new(&opened.inner) else {
            let why = ErrorNotify::InvalidSyntax;
            return self.refuse_auth(bytes, &response_header, why, Vec::new(), rng);
        };
        let (Some(idi), Some(peer_auth)) = (found.idi, found.auth) else {
            let why = ErrorNotify::InvalidSyntax;
            return self.refuse_auth(bytes, &response_header, why, Vec::new(), rng);
        };
        let (keys, suite) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (k, s),
            _ => return Err(IkeError::Unexpected("no keys yet")),
        };
        // An IDr in the request names the identity the initiator wants
        // (section 2.5); we have one, so it does not change our answer.
        let verified = peer_auth.method == auth::SHARED_KEY_MIC
            && self.id_acceptable(idi)
            && verify_psk_auth(
                suite.prf,
                &self.config.psk,
                &SignedOctets {
                    message: &self.init_request,
                    peer_nonce: &self.nr,
                    sk_p: &keys.ike.sk_pi,
                    id_body: &idi.body(),
                },
                &peer_auth.data,
            );
        if !verified {
            return self.refuse_auth(
                bytes,
                &response_header,
                ErrorNotify::AuthenticationFailed,
                Vec::new(),
                rng,
            );
        }
        let id = self.config.local_id.clone();
        let our_auth = psk_auth(
            suite.prf,
            &self.config.psk,
            &SignedOctets {
                message: &self.init_response,
                peer_nonce: &self.ni,
                sk_p: &keys.ike.sk_pr,
                id_body: &id.body(),
            },
        );
        let mut payloads = vec![
            Payload::IdR(id),
            Payload::Auth(Auth {
                method: auth::SHARED_KEY_MIC,
                data: our_auth.to_vec(),
            }),
        ];
        // Section 1.2: a CHILD SA that cannot be made leaves the IKE SA up.
        let child = self.choose_child(&found, rng);
        match &child {
            Ok((child, num)) => {
                // The selectors as the initiator sent them: through a NAT
                // they name its original addresses (section 2.23.1).
                let ours = TrafficSelector::host(child.original.local);
                let theirs = TrafficSelector::host(child.original.peer);
                payloads.push(Payload::Notify(Notify::new(
                    notify::USE_TRANSPORT_MODE,
                    Vec::new(),
                )));
                let esp = super::super::proposal::EspSuite {
                    encr: child.encr,
                    esn: child.esn,
                };
                payloads.push(Payload::Sa(vec![EspAlgorithms::answer(
                    *num,
                    child.inbound_spi,
                    esp,
                )]));
                payloads.push(Payload::TsI(vec![theirs]));
                payloads.push(Payload::TsR(vec![ours]));
            }
            Err(e) => payloads.push(Payload::Notify(Notify::new(e.ty(), Vec::new()))),
        }
        let response = self.seal(&response_header, &payloads, rng)?;
        self.phase = Phase::Established;
        let send = self.answer(bytes, response);
        let mut actions = vec![send];
        // Section 2.4: the peer restarted; what we hold from its previous
        // life goes before the new CHILD SA comes.
        if found.notify(notify::INITIAL_CONTACT).is_some() {
            actions.push(Action::PeerRestarted);
        }
        actions.push(match child {
            Ok((child, _)) => Action::InstallChild(child),
            Err(e) => Action::ChildFailed(IkeError::WeRefused(e)),
        });
        Ok(actions)
    }

    /// Answers IKE_AUTH with an error and closes the SA; the answer is
    /// kept for retransmitted requests like any other.
    fn refuse_auth(
        &mut self,
        request: &[u8],
        header: &Header,
        why: ErrorNotify,
        data: Vec<u8>,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let note = Payload::Notify(Notify::new(why.ty(), data));
        let response = self.seal(header, &[note], rng)?;
        let send = self.answer(request, response);
        let mut actions = vec![send];
        actions.extend(self.fail(IkeError::WeRefused(why)));
        Ok(actions)
    }

    /// The CHILD SA of IKE_AUTH: transport mode, an ESP proposal of ours,
    /// selectors covering the two hosts. Keyed by section 2.17: the first
    /// KEYMAT key is the initiator's outbound, so our inbound.
    fn choose_child(
        &self,
        found: &Found<'_>,
        rng: &mut dyn Randomness,
    ) -> Result<(ChildSa, u8), ErrorNotify> {
        // Without USE_TRANSPORT_MODE the initiator asks for tunnel mode
        // (section 1.3.1), which we do not offer: no acceptable proposal.
        if found.notify(notify::USE_TRANSPORT_MODE).is_none() {
            return Err(ErrorNotify::NoProposalChosen);
        }
        let sa = found.sa.ok_or(ErrorNotify::NoProposalChosen)?;
        let (num, peer_spi, esp) = self
            .config
            .esp
            .choose(sa)
            .ok_or(ErrorNotify::NoProposalChosen)?;
        let (ours, theirs) = self.host_selectors();
        let (tsi, tsr) = (found.tsi.unwrap_or(&[]), found.tsr.unwrap_or(&[]));
        let original = self
            .child_selectors(tsr, tsi)
            .ok_or(ErrorNotify::TsUnacceptable)?;
        let (keys, suite) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (k, s),
            _ => return Err(ErrorNotify::Other(notify::TEMPORARY_FAILURE)),
        };
        let spi = random_esp_spi(rng).map_err(|_| ErrorNotify::Other(notify::TEMPORARY_FAILURE))?;
        let km = child_keys(
            suite.prf,
            &keys.ike.sk_d,
            None,
            &self.ni,
            &self.nr,
            esp.encr,
        )
        .map_err(|_| ErrorNotify::Other(notify::TEMPORARY_FAILURE))?;
        Ok((
            ChildSa {
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
            },
            num,
        ))
    }
}
