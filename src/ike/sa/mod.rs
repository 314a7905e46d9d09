//! The IKE SA state machine: IKE_SA_INIT and IKE_AUTH with a pre-shared
//! key (RFC 7296 sections 1.2, 1.3, 2.15), host-to-host transport mode
//! (section 1.3.1, USE_TRANSPORT_MODE) and the one CHILD SA that IKE_AUTH
//! creates.
//!
//! Sans-IO, like quinn-proto and boringtun: [`IkeSa::handle`] takes one
//! received datagram and the time, [`IkeSa::handle_timeout`] the time, and
//! both return [`Action`]s (bytes to send, a CHILD SA to install, failure);
//! [`IkeSa::next_timeout`] says when to call again. Randomness (SPIs,
//! nonces, DH keys, IVs) comes through [`Randomness`].
//!
//! Exchanges follow section 2.1 with a window of one: we have at most one
//! request outstanding, retransmitted with exponential back-off until its
//! response arrives; as responder we keep our last response and send it
//! again, unchanged, when the same request arrives again (section 2.1:
//! retransmissions must not be processed twice). A message that is
//! malformed, fails its ICV, or does not fit the state is dropped with an
//! `Err` and changes nothing (section 2.21: no answer to what we cannot
//! authenticate).
//!
//! Once established, the later exchanges run on the same message-ID
//! machinery: CREATE_CHILD_SA rekeys CHILD SAs and the IKE SA itself
//! (`rekey`, `ike_rekey`), INFORMATIONAL carries Delete, liveness checks
//! and INITIAL_CONTACT (`info`), and [`Policy`] sets the lifetimes and the
//! dead-peer detection interval those timers run on (`timers`).
//!
//! For the caller (the daemon): set a [`Policy`] after creating the SA;
//! call [`IkeSa::handle_timer`] whenever [`IkeSa::next_timeout`] comes;
//! apply actions in order (an `InstallChild` that replaces an SA comes
//! before the `DeleteChild` of its predecessor: make-before-break); route
//! messages by both the current SPIs and those an [`Action::IkeRekeyed`]
//! names as `old` until the SA closes; after `Failed` (a dead peer, an
//! expired or refused SA) reconnect with a new IKE SA, after `Closed` only
//! if still wanted. [`IkeSa::rekey_child`], [`IkeSa::rekey_ike`],
//! [`IkeSa::delete_child`], [`IkeSa::close`] and
//! [`IkeSa::check_liveness`] start the same exchanges by hand, and the
//! read-only queries ([`IkeSa::children`], [`IkeSa::rekeys`],
//! [`IkeSa::established_at`], [`IkeSa::last_heard`], ...) feed status.
//! Through NATs, use the address-aware entry points instead (`nat`).

mod child;
mod found;
mod ike_rekey;
mod info;
mod initiator;
mod nat;
mod rekey;
mod responder;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_child_refused;
#[cfg(test)]
mod tests_harness;
#[cfg(test)]
mod tests_long;
#[cfg(test)]
mod tests_nat;
#[cfg(test)]
mod tests_rekey;
#[cfg(test)]
mod tests_rekey_suite;
mod timers;

pub use child::{ChildInfo, ChildState};
pub use nat::{IKE_PORT, NATT_PORT, NatPolicy, NatStatus, OriginalAddrs, Output, Route, natd_hash};
#[cfg(test)]
pub(crate) use tests::pair as test_pair;
pub use timers::Policy;

use found::Found;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::crypto::{Encr, IkeCryptoError, IkeKeys, Randomness};
use super::proposal::{EspAlgorithms, IkeAlgorithms, IkeSuite};
use super::sk::{self, SkError, SkKey};
use super::wire::consts::{flags, notify};
use super::wire::header::Header;
use super::wire::payload::{Identification, Notify, Payload, TrafficSelector};
use super::wire::{IkeHeader, WireError};
use crate::sa::KeyMaterial;

/// Our nonces: 32 bytes, at least half the key size of every PRF we
/// offer (section 2.10).
pub const NONCE_LEN: usize = 32;

/// One side's configuration of an IKE SA with one peer.
#[derive(Clone)]
pub struct Config {
    pub local_id: Identification,
    /// The identity the peer must present; `None` accepts any, leaving
    /// authentication to the key alone.
    pub remote_id: Option<Identification>,
    pub psk: Zeroizing<Vec<u8>>,
    pub ike: IkeAlgorithms,
    pub esp: EspAlgorithms,
    /// The host addresses: transport mode protects traffic between these
    /// two only, and they are the traffic selectors.
    pub local_addr: IpAddr,
    pub remote_addr: IpAddr,
    pub retransmit: Retransmit,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("local_id", &self.local_id)
            .field("remote_id", &self.remote_id)
            .field("psk", &"redacted")
            .field("ike", &self.ike)
            .field("esp", &self.esp)
            .field("local_addr", &self.local_addr)
            .field("remote_addr", &self.remote_addr)
            .field("retransmit", &self.retransmit)
            .finish()
    }
}

/// Section 2.1 leaves the schedule to us; it must back off. The n-th
/// retransmission waits `initial * 2^(n-1)`, at most `max_interval`; after
/// `transmissions` sends without an answer the SA fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmit {
    pub initial: Duration,
    pub max_interval: Duration,
    pub transmissions: u32,
}

impl Default for Retransmit {
    fn default() -> Self {
        Retransmit {
            initial: Duration::from_secs(2),
            max_interval: Duration::from_secs(32),
            transmissions: 6,
        }
    }
}

impl Retransmit {
    /// The wait after the `sent`-th transmission (1-based).
    fn interval(&self, sent: u32) -> Duration {
        let factor = 1u32.checked_shl(sent.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .map_or(self.max_interval, |d| d.min(self.max_interval))
    }
}

/// The error notifications this state machine sends or understands
/// (section 3.10.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorNotify {
    NoProposalChosen,
    InvalidKePayload,
    AuthenticationFailed,
    TsUnacceptable,
    InvalidSyntax,
    Other(u16),
}

impl ErrorNotify {
    pub fn from_type(ty: u16) -> Self {
        match ty {
            notify::NO_PROPOSAL_CHOSEN => ErrorNotify::NoProposalChosen,
            notify::INVALID_KE_PAYLOAD => ErrorNotify::InvalidKePayload,
            notify::AUTHENTICATION_FAILED => ErrorNotify::AuthenticationFailed,
            notify::TS_UNACCEPTABLE => ErrorNotify::TsUnacceptable,
            notify::INVALID_SYNTAX => ErrorNotify::InvalidSyntax,
            other => ErrorNotify::Other(other),
        }
    }

    pub fn ty(self) -> u16 {
        match self {
            ErrorNotify::NoProposalChosen => notify::NO_PROPOSAL_CHOSEN,
            ErrorNotify::InvalidKePayload => notify::INVALID_KE_PAYLOAD,
            ErrorNotify::AuthenticationFailed => notify::AUTHENTICATION_FAILED,
            ErrorNotify::TsUnacceptable => notify::TS_UNACCEPTABLE,
            ErrorNotify::InvalidSyntax => notify::INVALID_SYNTAX,
            ErrorNotify::Other(ty) => ty,
        }
    }
}

impl std::fmt::Display for ErrorNotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorNotify::NoProposalChosen => f.write_str("NO_PROPOSAL_CHOSEN"),
            ErrorNotify::InvalidKePayload => f.write_str("INVALID_KE_PAYLOAD"),
            ErrorNotify::AuthenticationFailed => f.write_str("AUTHENTICATION_FAILED"),
            ErrorNotify::TsUnacceptable => f.write_str("TS_UNACCEPTABLE"),
            ErrorNotify::InvalidSyntax => f.write_str("INVALID_SYNTAX"),
            ErrorNotify::Other(ty) => write!(f, "error notify {ty}"),
        }
    }
}

/// Why a message was dropped, or why an SA or CHILD SA failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IkeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Protected(#[from] SkError),
    #[error(transparent)]
    Crypto(#[from] IkeCryptoError),
    /// We refused the peer, and told it so.
    #[error("refused the peer: {0}")]
    WeRefused(ErrorNotify),
    /// The peer refused us.
    #[error("the peer refused: {0}")]
    PeerRefused(ErrorNotify),
    /// A message that does not fit the state (unsolicited, wrong SPI or
    /// message ID, an exchange we do not implement yet): dropped.
    #[error("unexpected IKE message: {0}")]
    Unexpected(&'static str),
    #[error("IKE message lacks its {0} payload")]
    Missing(&'static str),
    /// The peer's answer is not one we can use (a proposal we did not
    /// offer, a group we did not ask for, tunnel mode).
    #[error("unacceptable answer from the peer: {0}")]
    BadAnswer(&'static str),
    #[error("no answer after every retransmission")]
    Timeout,
    /// An established IKE SA's request went unanswered after every
    /// retransmission (section 2.4): the peer is dead, reconnect.
    #[error("the peer stopped answering (dead peer)")]
    DeadPeer,
    /// The IKE SA reached its hard lifetime without being rekeyed.
    #[error("the IKE SA expired")]
    Expired,
    #[error("configuration lacks {0}")]
    Config(&'static str),
}

/// A CHILD SA ready for the key manager: both directions, from our point
/// of view. KeyMaterial's `Debug` does not print keys; its `Clone` keeps
/// the copy zeroizing.
#[derive(Debug, Clone)]
pub struct ChildSa {
    pub inbound_spi: u32,
    pub outbound_spi: u32,
    pub inbound: KeyMaterial,
    pub outbound: KeyMaterial,
    pub encr: Encr,
    pub esn: bool,
    pub transport_mode: bool,
    pub local_ts: Vec<TrafficSelector>,
    pub remote_ts: Vec<TrafficSelector>,
    /// `Some(peer)`: a NAT was detected, so ESP goes in UDP (RFC 3948)
    /// to this address and port, from our NAT-T port, and arrives the
    /// same way. `None`: plain ESP (and always with the entry points that
    /// carry no addresses).
    pub udp_encap: Option<SocketAddr>,
    /// The inner packets' addresses, from the traffic selectors: through
    /// a NAT they differ from the outer ones (RFC 7296 section 2.23.1).
    pub original: OriginalAddrs,
}

/// What the caller must do.
#[derive(Debug)]
pub enum Action {
    /// Send these bytes to the peer (prefixed by the non-ESP marker on
    /// port 4500, RFC 3948 section 2.2).
    Send(Vec<u8>),
    /// Install these SAs (through `sa::keymgr::KeyManager`).
    InstallChild(ChildSa),
    /// The IKE SA is up but its CHILD SA could not be created (section
    /// 1.2: the IKE SA stays). When we refused a CHILD SA the responder
    /// of IKE_AUTH had already created (narrowed selectors, RFC 7296
    /// section 2.9), a Delete of it (our inbound SPI) precedes this;
    /// an IKE SA left without CHILD SAs is the caller's to keep or
    /// [`IkeSa::close`].
    ChildFailed(IkeError),
    /// The IKE SA is dead: drop it after sending what precedes.
    Failed(IkeError),
    /// Remove the CHILD SA with these SPIs in both directions: deleted by
    /// either side, replaced by its rekeyed successor (make-before-break:
    /// the successor's InstallChild came first), past its hard lifetime,
    /// or its IKE SA ended (RFC 7296 sections 1.4.1, 2.8).
    DeleteChild { inbound_spi: u32, outbound_spi: u32 },
    /// The peer sent INITIAL_CONTACT (section 2.4): it restarted, so
    /// every SA with this peer that this IKE SA did not create is stale
    /// and must go. Comes before the InstallChild of the same exchange.
    PeerRestarted,
    /// The IKE SA was rekeyed (section 2.18): its messages now carry the
    /// `new` SPIs. The `old` ones stay routed here until the old IKE SA's
    /// Delete exchange ends. The CHILD SAs stay as they are.
    IkeRekeyed { old: (u64, u64), new: (u64, u64) },
    /// The IKE SA ended in order (a Delete either way); DeleteChild
    /// actions for its CHILD SAs came before.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Connecting,
    Established,
    Closed,
}

enum Phase {
    /// Responder, before IKE_SA_INIT.
    Idle,
    /// Initiator, IKE_SA_INIT sent with this DH key.
    InitSent(initiator::InitSent),
    /// Initiator, IKE_AUTH sent offering this inbound ESP SPI.
    AuthSent {
        esp_spi: u32,
    },
    /// Responder, IKE_SA_INIT answered.
    InitAnswered,
    Established,
    Closed,
}

/// A request of ours awaiting its response.
struct Outstanding {
    message_id: u32,
    bytes: Vec<u8>,
    sent: u32,
    deadline: Instant,
    /// What the response is for, for the exchanges after IKE_AUTH.
    purpose: Purpose,
}

/// The exchanges of an established IKE SA we start.
enum Purpose {
    /// IKE_SA_INIT or IKE_AUTH: `Phase` says which.
    Setup,
    RekeyChild(rekey::RekeyChild),
    RekeyIke(ike_rekey::RekeyIke),
    /// A Delete of these CHILD SAs (by our inbound SPI).
    DeleteChildren(Vec<u32>),
    /// A Delete of the IKE SA: the SA ends with the answer.
    DeleteIke,
    /// An empty INFORMATIONAL request (section 2.4).
    Liveness,
}

/// The IKE SA's keys, by direction from our point of view.
struct Keys {
    ike: IkeKeys,
    sk_out: SkKey,
    sk_in: SkKey,
}

pub struct IkeSa {
    config: Arc<Config>,
    role: Role,
    phase: Phase,
    spi_i: u64,
    spi_r: u64,
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// The IKE_SA_INIT messages as sent, which AUTH signs (section 2.15).
    init_request: Vec<u8>,
    init_response: Vec<u8>,
    suite: Option<IkeSuite>,
    keys: Option<Keys>,
    /// Our next request's message ID (section 2.2).
    next_request_id: u32,
    outstanding: Option<Outstanding>,
    /// The message ID the peer's next request must carry.
    next_peer_request_id: u32,
    /// The peer's last request and our response to it (section 2.1).
    last_exchange: Option<(Vec<u8>, Vec<u8>)>,
    /// Lifetimes, liveness interval, PFS: see [`Policy`].
    policy: Policy,
    /// Timers and counters of this IKE SA after it is established.
    life: timers::Life,
    /// Our CHILD SAs, as handed to the key manager.
    children: Vec<ChildInfo>,
    /// IKE SAs this one replaced (or that lost a crossed rekey), kept
    /// until their Delete exchanges end (sections 2.8.2, 2.18).
    retiring: Vec<ike_rekey::Generation>,
    /// NAT detection and traversal (section 2.23).
    nat: nat::Nat,
}

impl std::fmt::Debug for IkeSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IkeSa({:?}, {:016x}/{:016x}, {:?})",
            self.role,
            self.spi_i,
            self.spi_r,
            self.status()
        )
    }
}

impl IkeSa {
    fn new(config: Arc<Config>, role: Role, phase: Phase) -> Self {
        IkeSa {
            config,
            role,
            phase,
            spi_i: 0,
            spi_r: 0,
            ni: Vec::new(),
            nr: Vec::new(),
            init_request: Vec::new(),
            init_response: Vec::new(),
            suite: None,
            keys: None,
            next_request_id: 0,
            outstanding: None,
            next_peer_request_id: 0,
            last_exchange: None,
            policy: Policy::default(),
            life: timers::Life::default(),
            children: Vec::new(),
            retiring: Vec::new(),
            nat: nat::Nat::default(),
        }
    }

    /// A responder waiting for an IKE_SA_INIT request. The caller creates
    /// one per request with a responder SPI of zero it has not seen yet.
    pub fn responder(config: Arc<Config>) -> Self {
        IkeSa::new(config, Role::Responder, Phase::Idle)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn spis(&self) -> (u64, u64) {
        (self.spi_i, self.spi_r)
    }

    pub fn suite(&self) -> Option<IkeSuite> {
        self.suite
    }

    /// The IKE SA's keys once IKE_SA_INIT is done, for a debugger's
    /// decryption table (`esptun wireshark-keys`).
    pub fn keys(&self) -> Option<&IkeKeys> {
        self.keys.as_ref().map(|k| &k.ike)
    }

    pub fn status(&self) -> Status {
        match self.phase {
            Phase::Established => Status::Established,
            Phase::Closed => Status::Closed,
            _ => Status::Connecting,
        }
    }

    /// Retransmits the outstanding request when its time has come, or
    /// gives up after the configured number of transmissions; likewise for
    /// the Delete of an IKE SA retired by a rekey. Only these timers: the
    /// ones that start new exchanges need randomness, so with a [`Policy`]
    /// that sets lifetimes or liveness checks, or after
    /// [`IkeSa::delete_child`], call [`IkeSa::handle_timer`] instead.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        // Only the address-aware entry points send keepalives; here a due
        // one is merely rescheduled.
        let _ = self.keepalive_due(now);
        let mut actions = self.retiring_timeout(now);
        actions.extend(self.retransmit(now));
        actions
    }

    fn retransmit(&mut self, now: Instant) -> Vec<Action> {
        let Some(o) = self.outstanding.as_mut() else {
            return Vec::new();
        };
        if now < o.deadline {
            return Vec::new();
        }
        if o.sent >= self.config.retransmit.transmissions {
            let deleting = matches!(o.purpose, Purpose::DeleteIke);
            self.outstanding = None;
            if deleting {
                // Our Delete of the IKE SA went unanswered: it ends all
                // the same (section 1.4.1).
                let mut actions = self.remove_all_children();
                self.phase = Phase::Closed;
                actions.push(Action::Closed);
                return actions;
            }
            if matches!(self.phase, Phase::Established) {
                // Section 2.4: an established SA whose request is never
                // answered is dead, and so are its CHILD SAs.
                let mut actions = self.remove_all_children();
                actions.extend(self.fail(IkeError::DeadPeer));
                return actions;
            }
            return self.fail(IkeError::Timeout);
        }
        o.sent += 1;
        o.deadline = now + self.config.retransmit.interval(o.sent);
        vec![Action::Send(o.bytes.clone())]
    }

    /// Handles one received IKE message (without the non-ESP marker).
    /// `Err` means it was dropped and nothing changed. No NAT detection
    /// data: [`IkeSa::handle_from`] adds the addresses NAT-T needs.
    pub fn handle(
        &mut self,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let header = Header::parse(&IkeHeader::new_checked(bytes)?)?;
        if matches!(self.phase, Phase::Closed) && header.is_response() {
            return Err(IkeError::Unexpected("the IKE SA is closed"));
        }
        let idle = matches!(self.phase, Phase::Idle);
        let spis = (header.spi_i, header.spi_r);
        if let Some(at) = self.retiring.iter().position(|g| g.spis() == spis) {
            return self.handle_retiring(at, &header, bytes, rng);
        }
        // Section 3.1: the I flag tells the original initiator's messages.
        if header.is_initiator() != (self.role == Role::Responder) {
            return Err(IkeError::Unexpected("wrong Initiator flag"));
        }
        if !idle && header.spi_i != self.spi_i {
            return Err(IkeError::Unexpected("unknown initiator SPI"));
        }
        let was_established = matches!(self.phase, Phase::Established);
        let mut actions = if header.is_response() {
            self.handle_response(&header, bytes, now, rng)?
        } else {
            self.handle_request(&header, bytes, now, rng)?
        };
        self.after_exchange(was_established, &mut actions, now, rng);
        Ok(actions)
    }

    fn handle_request(
        &mut self,
        header: &Header,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        // Section 2.1: a retransmitted request gets the same response
        // again, byte for byte, and is not processed twice.
        if let Some((request, response)) = &self.last_exchange
            && header.message_id.wrapping_add(1) == self.next_peer_request_id
        {
            if request.as_slice() == bytes {
                return Ok(vec![Action::Send(response.clone())]);
            }
            return Err(IkeError::Unexpected(
                "a different request reuses a message ID",
            ));
        }
        if header.message_id != self.next_peer_request_id {
            return Err(IkeError::Unexpected("request outside the window"));
        }
        if !matches!(self.phase, Phase::Idle) && header.spi_r != self.spi_r {
            return Err(IkeError::Unexpected("unknown responder SPI"));
        }
        use super::wire::consts::exchange as ex;
        match (&self.phase, header.exchange) {
            (Phase::Idle, ex::IKE_SA_INIT) => self.respond_init(header, bytes, now, rng),
            (Phase::InitAnswered, ex::IKE_AUTH) => self.respond_auth(header, bytes, rng),
            (Phase::Established, ex::CREATE_CHILD_SA) => {
                self.respond_create_child(header, bytes, now, rng)
            }
            (Phase::Established, ex::INFORMATIONAL) => {
                self.respond_informational(header, bytes, now, rng)
            }
            _ => Err(IkeError::Unexpected("request not handled in this state")),
        }
    }

    fn handle_response(
        &mut self,
        header: &Header,
        bytes: &[u8],
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Action>, IkeError> {
        let Some(o) = &self.outstanding else {
            return Err(IkeError::Unexpected("no request outstanding"));
        };
        if o.message_id != header.message_id {
            return Err(IkeError::Unexpected("response to no request of ours"));
        }
        use super::wire::consts::exchange as ex;
        match (&self.phase, header.exchange) {
            (Phase::InitSent(_), ex::IKE_SA_INIT) => self.on_init_response(header, bytes, now, rng),
            (Phase::AuthSent { .. }, ex::IKE_AUTH) => {
                if header.spi_r != self.spi_r {
                    return Err(IkeError::Unexpected("unknown responder SPI"));
                }
                self.on_auth_response(bytes, now, rng)
            }
            (Phase::Established, ex::CREATE_CHILD_SA | ex::INFORMATIONAL) => {
                if header.spi_r != self.spi_r {
                    return Err(IkeError::Unexpected("unknown responder SPI"));
                }
                self.on_later_response(header, bytes, now, rng)
            }
            _ => Err(IkeError::Unexpected("response not expected in this state")),
        }
    }

    /// Marks the SA dead.
    fn fail(&mut self, e: IkeError) -> Vec<Action> {
        self.phase = Phase::Closed;
        self.outstanding = None;
        vec![Action::Failed(e)]
    }

    /// Sends a request, to be retransmitted until answered.
    fn send_request(&mut self, bytes: Vec<u8>, now: Instant) -> Action {
        self.send_request_for(bytes, now, Purpose::Setup)
    }

    fn send_request_for(&mut self, bytes: Vec<u8>, now: Instant, purpose: Purpose) -> Action {
        self.outstanding = Some(Outstanding {
            message_id: self.next_request_id,
            bytes: bytes.clone(),
            sent: 1,
            deadline: now + self.config.retransmit.interval(1),
            purpose,
        });
        self.next_request_id = self.next_request_id.wrapping_add(1);
        Action::Send(bytes)
    }

    /// Remembers a response to the peer's request, for retransmissions.
    fn answer(&mut self, request: &[u8], response: Vec<u8>) -> Action {
        self.next_peer_request_id = self.next_peer_request_id.wrapping_add(1);
        self.last_exchange = Some((request.to_vec(), response.clone()));
        Action::Send(response)
    }

    /// A header for a message of ours in this SA.
    fn header(&self, exchange: u8, message_id: u32, response: bool) -> Header {
        let mut f = if self.role == Role::Initiator {
            flags::INITIATOR
        } else {
            0
        };
        if response {
            f |= flags::RESPONSE;
        }
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            exchange,
            flags: f,
            message_id,
        }
    }

    /// Seals `payloads` into a protected message.
    fn seal(
        &self,
        header: &Header,
        payloads: &[Payload],
        rng: &mut dyn Randomness,
    ) -> Result<Vec<u8>, IkeError> {
        let keys = self
            .keys
            .as_ref()
            .ok_or(IkeError::Unexpected("no keys yet"))?;
        let mut iv = [0u8; sk::IV_LEN];
        rng.fill(&mut iv)?;
        Ok(sk::seal(header, payloads, &keys.sk_out, iv)?)
    }

    fn open(&self, bytes: &[u8]) -> Result<sk::Opened, IkeError> {
        let keys = self
            .keys
            .as_ref()
            .ok_or(IkeError::Unexpected("no keys yet"))?;
        Ok(sk::open(bytes, &keys.sk_in)?)
    }

    /// Our host-to-host selectors: (ours, the peer's).
    fn host_selectors(&self) -> (TrafficSelector, TrafficSelector) {
        (
            TrafficSelector::host(self.config.local_addr),
            TrafficSelector::host(self.config.remote_addr),
        )
    }

    fn id_acceptable(&self, id: &Identification) -> bool {
        self.config
            .remote_id
            .as_ref()
            .is_none_or(|want| want.id_type == id.id_type && want.data == id.data)
    }
}

fn random_spi64(rng: &mut dyn Randomness) -> Result<u64, IkeError> {
    // Section 2.6: SPIs are random and never zero.
    for _ in 0..8 {
        let mut b = [0u8; 8];
        rng.fill(&mut b)?;
        let spi = u64::from_be_bytes(b);
        if spi != 0 {
            return Ok(spi);
        }
    }
    Err(IkeCryptoError::Random.into())
}

fn random_esp_spi(rng: &mut dyn Randomness) -> Result<u32, IkeError> {
    // RFC 4303 section 2.1: 0 to 255 are reserved.
    for _ in 0..8 {
        let mut b = [0u8; 4];
        rng.fill(&mut b)?;
        let spi = u32::from_be_bytes(b);
        if spi > 255 {
            return Ok(spi);
        }
    }
    Err(IkeCryptoError::Random.into())
}

fn random_nonce(rng: &mut dyn Randomness) -> Result<Vec<u8>, IkeError> {
    let mut n = vec![0u8; NONCE_LEN];
    rng.fill(&mut n)?;
    Ok(n)
}

/// Section 2.10: a nonce is at least half the PRF's key size (and at least
/// 16 bytes, which the wire format checks).
fn nonce_fits(nonce: &[u8], suite: IkeSuite) -> bool {
    nonce.len() * 2 >= suite.prf.output_len()
}

/// Whether some selector in `list` covers `want`.
fn covers(list: &[TrafficSelector], want: &TrafficSelector) -> bool {
    list.iter().any(|t| t.contains(want))
}
