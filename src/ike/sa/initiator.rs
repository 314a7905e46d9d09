//! The initiator's side of IKE_SA_INIT and IKE_AUTH (RFC 7296 sections
//! 1.2, 1.3, 2.6, 2.15).

use std::sync::Arc;
use std::time::Instant;

use super::super::crypto::{
    DhPrivate, IkeKeys, Randomness, SignedOctets, child_keys, psk_auth, verify_psk_auth,
};
use super::super::sk::SkKey;
use super::super::wire::consts::{auth, exchange as ex, notify};
use super::super::wire::payload::{Auth, KeyExchange, Notify, Payload};
use super::super::wire::{Message, header::Header};
use super::*;

/// What the initiator holds between IKE_SA_INIT request and response.
pub(super) struct InitSent {
    dh: DhPrivate,
    /// The cookie the responder asked for (section 2.6), sent first.
    cookie: Option<Vec<u8>>,
    /// Restarts after INVALID_KE_PAYLOAD or COOKIE; bounded so that a
    /// forged stream of either cannot keep us busy forever.
    restarts: u8,
}

/// INVALID_KE_PAYLOAD once per group, and a COOKIE, at most.
const MAX_RESTARTS: u8 = 4;

impl IkeSa {
    /// Starts an IKE SA as initiator: returns it and the IKE_SA_INIT
    /// request to send. No NAT detection data: [`IkeSa::initiate_from`]
    /// adds it.
    pub fn initiate(
        config: Arc<Config>,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<(Self, Vec<Action>), IkeError> {
        IkeSa::initiate_with(config, now, rng, |_| {})
    }

    /// [`IkeSa::initiate`], with `setup` run on the SA before its first
    /// request is built.
    pub(super) fn initiate_with(
        config: Arc<Config>,
        now: Instant,
        rng: &mut dyn Randomness,
        setup: impl FnOnce(&mut IkeSa),
    ) -> Result<(Self, Vec<Action>), IkeError> {
        let group = *config
            .ike
            .dh
            .first()
            .ok_or(IkeError::Config("a DH group"))?;
        if config.ike.encr.is_empty() || config.ike.prf.is_empty() {
            return Err(IkeError::Config("IKE algorithms"));
        }
        if config.esp.encr.is_empty() || config.esp.esn.is_empty() {
            return Err(IkeError::Config("ESP algorithms"));
        }
        let dh = rng.dh_private(group)?;
        let mut sa = IkeSa::new(
            config,
            Role::Initiator,
            Phase::InitSent(InitSent {
                dh,
                cookie: None,
                restarts: 0,
            }),
        );
        sa.spi_i = random_spi64(rng)?;
        sa.ni = random_nonce(rng)?;
        setup(&mut sa);
        let request = sa.init_request()?;
        let send = sa.send_request(request, now);
        Ok((sa, vec![send]))
    }

    /// Builds (and remembers, for AUTH) the IKE_SA_INIT request.
    fn init_request(&mut self) -> Result<Vec<u8>, IkeError> {
        let Phase::InitSent(s) = &self.phase else {
            return Err(IkeError::Unexpected("not in IKE_SA_INIT"));
        };
        let mut payloads = Vec::with_capacity(4);
        // Section 2.6: the COOKIE notification comes first.
        if let Some(c) = &s.cookie {
            payloads.push(Payload::Notify(Notify::new(notify::COOKIE, c.clone())));
        }
        payloads.push(Payload::Sa(vec![self.config.ike.offer()]));
        payloads.push(Payload::Ke(KeyExchange {
            group: s.dh.group().id(),
            data: s.dh.public().to_vec(),
        }));
        payloads.push(Payload::Nonce(self.ni.clone()));
        // Section 2.23: the responder SPI is still zero in these hashes.
        payloads.extend(self.natd_payloads(self.spi_i, 0));
        // Section 2.2: IKE_SA_INIT is always message ID 0, also when
        // restarted.
        let header = self.header(ex::IKE_SA_INIT, 0, false);
        let bytes = Message { header, payloads }.emit()?;
        self.init_request = bytes.clone();
        Ok(bytes)
    }

    /// Sends IKE_SA_INIT again after the responder asked for a cookie or
    /// another group: message ID 0 again, a fresh retransmission schedule.
    fn restart_init(&mut self, now: Instant) -> Result<Vec<Action>, IkeError> {
        self.next_request_id = 0;
        let request = self.init_request()?;
        Ok(vec![self.send_request(request, now)])
    }

    pub(super) fn on_init_response(
        &mut self,
        header: &Header,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let msg = Message::parse(bytes)?;
        let found = Found::new(&msg.payloads)?;
        let Phase::InitSent(state) = &mut self.phase else {
            return Err(IkeError::Unexpected("not in IKE_SA_INIT"));
        };
        if let Some(c) = found.notify(notify::COOKIE) {
            if state.restarts >= MAX_RESTARTS || c.data.is_empty() || c.data.len() > 64 {
                return Ok(self.fail(IkeError::BadAnswer("COOKIE")));
            }
            state.restarts += 1;
            state.cookie = Some(c.data.clone());
            return self.restart_init(now);
        }
        if let Some(n) = found.notify(notify::INVALID_KE_PAYLOAD) {
            // Section 1.3: retry with the group the responder names, if we
            // offered it and are not already using it.
            let wanted = <[u8; 2]>::try_from(n.data.as_slice())
                .ok()
                .map(u16::from_be_bytes)
                .and_then(super::super::crypto::DhGroup::from_id)
                .filter(|g| self.config.ike.dh.contains(g) && *g != state.dh.group());
            let Some(group) = wanted.filter(|_| state.restarts < MAX_RESTARTS) else {
                return Ok(self.fail(IkeError::PeerRefused(ErrorNotify::InvalidKePayload)));
            };
            state.restarts += 1;
            state.dh = rng.dh_private(group)?;
            return self.restart_init(now);
        }
        if let Some(e) = found.error() {
            return Ok(self.fail(IkeError::PeerRefused(e)));
        }
        let (Some(sa), Some(ke), Some(nr)) = (found.sa, found.ke, found.nonce) else {
            return Err(IkeError::Missing("SA, KE or Nonce"));
        };
        if header.spi_r == 0 {
            return Err(IkeError::Unexpected("responder SPI 0"));
        }
        let Some(suite) = self.config.ike.accept(sa) else {
            return Ok(self.fail(IkeError::BadAnswer("IKE proposal")));
        };
        if !nonce_fits(nr, suite) {
            return Ok(self.fail(IkeError::BadAnswer("nonce shorter than half the PRF key")));
        }
        if suite.dh != state.dh.group() || ke.group != state.dh.group().id() {
            return Ok(self.fail(IkeError::BadAnswer("DH group")));
        }
        self.detect_nat(&found, self.spi_i, header.spi_r, now);
        // The DH key is used once: take it out of the state.
        let Phase::InitSent(state) = std::mem::replace(&mut self.phase, Phase::Closed) else {
            return Err(IkeError::Unexpected("not in IKE_SA_INIT"));
        };
        // From here on the exchange is committed: any failure ends the SA
        // rather than leaving it waiting for a response that came.
        self.outstanding = None;
        let keyed = state
            .dh
            .agree(&ke.data)
            .map_err(IkeError::from)
            .and_then(|shared| {
                self.spi_r = header.spi_r;
                self.nr = nr.to_vec();
                self.init_response = bytes.to_vec();
                self.suite = Some(suite);
                let ike = IkeKeys::derive(
                    suite.prf, suite.encr, &shared, &self.ni, &self.nr, self.spi_i, self.spi_r,
                )?;
                self.keys = Some(Keys {
                    sk_out: SkKey::new(suite.encr, &ike.sk_ei)?,
                    sk_in: SkKey::new(suite.encr, &ike.sk_er)?,
                    ike,
                });
                self.send_auth(now, rng)
            });
        Ok(keyed.unwrap_or_else(|e| self.fail(e)))
    }

    /// The IKE_AUTH request: IDi, AUTH, USE_TRANSPORT_MODE, the ESP SA and
    /// host-to-host selectors (section 1.2).
    fn send_auth(
        &mut self,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let (keys, suite) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (k, s),
            _ => return Err(IkeError::Unexpected("no keys yet")),
        };
        let id = self.config.local_id.clone();
        let auth = psk_auth(
            suite.prf,
            &self.config.psk,
            &SignedOctets {
                message: &self.init_request,
                peer_nonce: &self.nr,
                sk_p: &keys.ike.sk_pi,
                id_body: &id.body(),
            },
        );
        let esp_spi = random_esp_spi(rng)?;
        let (ours, theirs) = self.host_selectors();
        let mut payloads = vec![
            Payload::IdI(id),
            Payload::Auth(Auth {
                method: auth::SHARED_KEY_MIC,
                data: auth.to_vec(),
            }),
            Payload::Notify(Notify::new(notify::USE_TRANSPORT_MODE, Vec::new())),
            Payload::Sa(vec![self.config.esp.offer(esp_spi)]),
            Payload::TsI(vec![ours]),
            Payload::TsR(vec![theirs]),
        ];
        // Section 2.4: tells the responder to drop what it still holds
        // from our previous life.
        if self.policy.initial_contact {
            payloads.push(Payload::Notify(Notify::new(
                notify::INITIAL_CONTACT,
                Vec::new(),
            )));
        }
        let header = self.header(ex::IKE_AUTH, self.next_request_id, false);
        let bytes = self.seal(&header, &payloads, rng)?;
        self.phase = Phase::AuthSent { esp_spi };
        Ok(vec![self.send_request(bytes, now)])
    }

    pub(super) fn on_auth_response(
        &mut self,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let opened = match self.open(bytes) {
            Ok(o) => o,
            // Authenticated but unusable: the exchange is over, and failed.
            Err(e @ IkeError::Protected(SkError::Inner(_))) => return Ok(self.fail(e)),
            Err(e) => return Err(e),
        };
        let Phase::AuthSent { esp_spi } = self.phase else {
            return Err(IkeError::Unexpected("not in IKE_AUTH"));
        };
        // Authenticated: whatever it says, this request is answered, and
        // an answer we cannot use ends the SA.
        self.outstanding = None;
        let found = match Found::new(&opened.inner) {
            Ok(f) => f,
            Err(e) => return Ok(self.fail(e)),
        };
        let error = found.error();
        if error == Some(ErrorNotify::AuthenticationFailed) {
            return Ok(self.fail(IkeError::PeerRefused(ErrorNotify::AuthenticationFailed)));
        }
        let (Some(idr), Some(peer_auth)) = (found.idr, found.auth) else {
            // Section 1.2: an IKE_AUTH response without AUTH failed the
            // IKE SA; the error says why.
            return Ok(self.fail(match error {
                Some(e) => IkeError::PeerRefused(e),
                None => IkeError::Missing("IDr or AUTH"),
            }));
        };
        let (keys, suite) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (k, s),
            _ => return Err(IkeError::Unexpected("no keys yet")),
        };
        let verified = peer_auth.method == auth::SHARED_KEY_MIC
            && self.id_acceptable(idr)
            && verify_psk_auth(
                suite.prf,
                &self.config.psk,
                &SignedOctets {
                    message: &self.init_response,
                    peer_nonce: &self.ni,
                    sk_p: &keys.ike.sk_pr,
                    id_body: &idr.body(),
                },
                &peer_auth.data,
            );
        if !verified {
            // Section 2.21.2: tell the responder in an INFORMATIONAL
            // request, then give up on the SA without waiting.
            let header = self.header(ex::INFORMATIONAL, self.next_request_id, false);
            let note = Payload::Notify(Notify::new(notify::AUTHENTICATION_FAILED, Vec::new()));
            let mut actions = Vec::new();
            if let Ok(b) = self.seal(&header, &[note], rng) {
                actions.push(Action::Send(b));
            }
            actions.extend(self.fail(IkeError::WeRefused(ErrorNotify::AuthenticationFailed)));
            return Ok(actions);
        }
        self.phase = Phase::Established;
        let mut actions = Vec::new();
        if found.notify(notify::INITIAL_CONTACT).is_some() {
            actions.push(Action::PeerRestarted);
        }
        if let Some(e) = error {
            // The responder refused the CHILD SA and so created none:
            // nothing of it to delete.
            actions.push(Action::ChildFailed(IkeError::PeerRefused(e)));
            return Ok(actions);
        }
        match self.accept_child(&found, esp_spi) {
            Ok(child) => actions.push(Action::InstallChild(child)),
            Err(e) => {
                if found.sa.is_some() {
                    // An SA payload means the responder created the CHILD
                    // SA (and installed it) before we saw it: narrowed
                    // selectors, a proposal or mode we cannot use. Section
                    // 2.9: an initiator that does not accept the narrowed
                    // selectors deletes the CHILD SA (section 1.4.1), by
                    // the SPI we receive on (section 3.11), which the
                    // responder knows as its outbound one. The IKE SA
                    // stays (section 1.2); whether it is worth keeping
                    // without a CHILD SA is the caller's decision.
                    if let Ok(send) = self.send_delete_children(vec![esp_spi], now, rng) {
                        actions.extend(send);
                    }
                }
                actions.push(Action::ChildFailed(e));
            }
        }
        Ok(actions)
    }

    /// Checks the responder's CHILD SA answer and keys it (section 2.17:
    /// the first KEYMAT key is ours outbound).
    fn accept_child(&self, found: &Found<'_>, esp_spi: u32) -> Result<ChildSa, IkeError> {
        if found.notify(notify::USE_TRANSPORT_MODE).is_none() {
            // Section 1.3.1: without the notification the SA would be in
            // tunnel mode, which we do not speak.
            return Err(IkeError::BadAnswer("tunnel mode"));
        }
        let sa = found.sa.ok_or(IkeError::Missing("SA"))?;
        let (peer_spi, esp) = self
            .config
            .esp
            .accept(sa)
            .ok_or(IkeError::BadAnswer("ESP proposal"))?;
        let (tsi, tsr) = (found.tsi.unwrap_or(&[]), found.tsr.unwrap_or(&[]));
        let (ours, theirs) = self.host_selectors();
        let original = self
            .child_selectors(tsi, tsr)
            .ok_or(IkeError::BadAnswer("traffic selectors"))?;
        let (keys, suite) = match (&self.keys, self.suite) {
            (Some(k), Some(s)) => (k, s),
            _ => return Err(IkeError::Unexpected("no keys yet")),
        };
        let km = child_keys(
            suite.prf,
            &keys.ike.sk_d,
            None,
            &self.ni,
            &self.nr,
            esp.encr,
        )?;
        Ok(ChildSa {
            inbound_spi: esp_spi,
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
