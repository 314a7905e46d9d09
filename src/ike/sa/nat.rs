//! NAT traversal for the IKE SA (RFC 7296 section 2.23, RFC 3948).
//!
//! Both IKE_SA_INIT messages carry NAT_DETECTION_SOURCE_IP and
//! NAT_DETECTION_DESTINATION_IP: SHA-1 of the SPIs and of the address and
//! port the sender believes the message leaves from or goes to. The
//! receiver hashes what the IP and UDP headers say instead; a difference
//! means a NAT rewrote them, on our side (the destination hash) or the
//! peer's (the source hash). A peer may fake the source hash on purpose
//! (strongSwan's `encap = yes`) to force UDP encapsulation: that reads as
//! "the peer is behind a NAT", with the same consequences.
//!
//! When a NAT is seen, the initiator moves IKE to port 4500 from IKE_AUTH
//! on, the CHILD SAs encapsulate ESP in UDP (RFC 3948), the peer's address
//! follows authenticated messages (a NAT mapping may change), and the side
//! behind the NAT sends keepalives (RFC 3948 section 4).
//!
//! All of this needs the addresses of each datagram, which only the
//! address-aware entry points here get: [`IkeSa::initiate_from`],
//! [`IkeSa::handle_from`] and [`IkeSa::handle_timer_from`]. They return
//! [`Output`]s, which route every datagram. The older entry points
//! ([`IkeSa::initiate`], [`IkeSa::handle`], ...) carry no NAT detection
//! data and never detect a NAT.
//!
//! For the caller, instead of the older entry points, consistently:
//! - initiate with [`IkeSa::initiate_from`] (our port 500 socket's address
//!   and the peer's `ip:500`); after [`IkeSa::responder`], call
//!   [`IkeSa::set_nat_policy`];
//! - give every received IKE message to [`IkeSa::handle_from`] with the
//!   local address it arrived at (port 500, or the NAT-T port with the
//!   non-ESP marker already removed) and its source;
//! - on [`IkeSa::next_timeout`] call [`IkeSa::handle_timer_from`];
//!   route what [`IkeSa::rekey_child`], [`IkeSa::close`] and the like
//!   return through [`IkeSa::outputs`];
//! - send each [`Output::Send`] to its `route.to`, from the NAT-T socket
//!   with the non-ESP marker when `route.natt`, else from port 500; send
//!   [`Output::SendKeepalive`] as the one byte 0xFF from the NAT-T socket;
//! - install a CHILD SA with `udp_encap: Some(peer)` as UDP-encapsulated
//!   ESP to `peer`, and rebuild / check inner packets with its
//!   [`OriginalAddrs`]; on [`Output::PeerMoved`] send the CHILD SAs'
//!   ESP (and expect it) at the new address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::digest;

use super::super::crypto::Randomness;
use super::super::wire::consts::{exchange, notify};
use super::super::wire::payload::{Notify, Payload, TrafficSelector};
use super::super::wire::{Header, IkeHeader};
use super::{Action, Config, Found, IkeError, IkeSa, Phase, covers};

/// The port of IKE and UDP-encapsulated ESP once a NAT is detected (RFC
/// 7296 section 2.23, RFC 3948 section 2.1).
pub const NATT_PORT: u16 = 4500;
/// The IKE port before that (RFC 7296 section 2).
pub const IKE_PORT: u16 = 500;

/// NAT-T settings beyond [`Config`] and [`super::Policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPolicy {
    /// Our NAT-T port and the peer's (4500 unless a test moves them): a
    /// message that arrived on it came on the NAT-T socket, and its
    /// answer leaves there with the non-ESP marker.
    pub port: u16,
    /// RFC 3948 section 4: behind a NAT, one 0xFF byte this often keeps
    /// the mapping alive. `None`: no keepalives.
    pub keepalive: Option<Duration>,
}

impl Default for NatPolicy {
    fn default() -> Self {
        NatPolicy {
            port: NATT_PORT,
            // RFC 3948 section 4 suggests 20 seconds.
            keepalive: Some(Duration::from_secs(20)),
        }
    }
}

/// What NAT detection found in IKE_SA_INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatStatus {
    /// The peer sent NAT detection notifies at all.
    pub supported: bool,
    /// The destination hash did not match: a NAT rewrote our address.
    pub local_behind: bool,
    /// The source hash did not match: the peer is behind a NAT (or
    /// pretends to be, to force UDP encapsulation).
    pub peer_behind: bool,
}

impl NatStatus {
    /// Either side: IKE moves to port 4500 and ESP goes in UDP.
    pub fn detected(&self) -> bool {
        self.local_behind || self.peer_behind
    }
}

/// Where a datagram goes: to `to`, from our NAT-T socket with the non-ESP
/// marker (RFC 3948 section 2.2) when `natt`, else from our port 500.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub to: SocketAddr,
    pub natt: bool,
}

/// The addresses the peer uses inside transport-mode packets, from the
/// traffic selectors (RFC 7296 section 2.23.1: NAT-OA is IKEv1's; in
/// IKEv2 each selector names exactly one address). The peer's inner
/// TCP/UDP checksums cover these: behind a NAT they are not the outer
/// addresses, and RFC 3948 section 3.1.2 has the receiver fix the
/// checksums up (or validate them) with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalAddrs {
    /// Our address as the peer knows it (its TS for our side).
    pub local: IpAddr,
    /// The peer's own address (its TS for its side).
    pub peer: IpAddr,
}

/// What the address-aware entry points return: every [`Action`], each
/// datagram with its route, and the NAT-T events.
#[derive(Debug)]
pub enum Output {
    /// Send these bytes on this route.
    Send { bytes: Vec<u8>, route: Route },
    /// RFC 3948 section 4: send the single byte 0xFF on this route (always
    /// the NAT-T socket, without a marker).
    SendKeepalive(Route),
    /// An authenticated message came from a new address while a NAT is
    /// detected (RFC 7296 section 2.23): IKE and ESP (the CHILD SAs'
    /// UDP encapsulation) go to this address from now on.
    PeerMoved(SocketAddr),
    /// Any other action; never [`Action::Send`].
    Act(Action),
}

/// The SA's NAT-T state.
#[derive(Debug, Default)]
pub(super) struct Nat {
    pub(super) policy: NatPolicy,
    pub(super) status: NatStatus,
    /// Our address and the peer's as of IKE_SA_INIT (for the hashes).
    pub(super) endpoints: Option<(SocketAddr, SocketAddr)>,
    /// Where requests, retransmissions and keepalives go.
    pub(super) route: Option<Route>,
    /// The addresses of the message being handled.
    pub(super) current: Option<(SocketAddr, SocketAddr)>,
    pub(super) keepalive_at: Option<Instant>,
    pub(super) original: Option<OriginalAddrs>,
}

/// RFC 7296 section 2.23: SHA-1(SPIi | SPIr | IP address | port), the
/// address 4 or 16 bytes, everything in network byte order.
pub fn natd_hash(spi_i: u64, spi_r: u64, addr: SocketAddr) -> [u8; 20] {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(&spi_i.to_be_bytes());
    ctx.update(&spi_r.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(a) => ctx.update(&a.octets()),
        IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&addr.port().to_be_bytes());
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl IkeSa {
    /// Like [`IkeSa::initiate`], from `local` to `remote` (the addresses
    /// of the socket the request leaves by and of the peer), with NAT
    /// detection in IKE_SA_INIT. Start from port 500 to let NAT detection
    /// decide, or from the NAT-T port to use it from the start.
    pub fn initiate_from(
        config: Arc<Config>,
        local: SocketAddr,
        remote: SocketAddr,
        nat: NatPolicy,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<(Self, Vec<Output>), IkeError> {
        let route = Route {
            to: remote,
            natt: local.port() == nat.port,
        };
        let (sa, actions) = IkeSa::initiate_with(config, now, rng, |sa| {
            sa.nat.policy = nat;
            sa.nat.endpoints = Some((local, remote));
            sa.nat.route = Some(route);
        })?;
        let out = sa.outputs_to(actions, Some(route));
        Ok((sa, out))
    }

    /// Sets the NAT-T policy of a responder; call it right after
    /// [`IkeSa::responder`].
    pub fn set_nat_policy(&mut self, nat: NatPolicy) {
        self.nat.policy = nat;
    }

    /// What NAT detection found (all false before IKE_SA_INIT ends, or
    /// without the address-aware entry points).
    pub fn nat(&self) -> NatStatus {
        self.nat.status
    }

    /// Whether IKE runs on the NAT-T port (with the non-ESP marker) and
    /// CHILD SAs encapsulate ESP in UDP.
    pub fn use_natt(&self) -> bool {
        self.nat.status.detected()
    }

    /// Where our requests go, as of the last authenticated message.
    pub fn route(&self) -> Option<Route> {
        self.nat.route
    }

    /// The original addresses of the CHILD SAs (see [`OriginalAddrs`]).
    pub fn original_addrs(&self) -> OriginalAddrs {
        self.nat.original.unwrap_or(OriginalAddrs {
            local: self.config.local_addr,
            peer: self.config.remote_addr,
        })
    }

    /// Like [`IkeSa::handle`], for a message that arrived at our address
    /// `local` from `remote`: NAT detection in IKE_SA_INIT, answers
    /// routed back the way the request came (section 2.11), and the peer's
    /// address updated from authenticated messages when a NAT is detected.
    pub fn handle_from(
        &mut self,
        bytes: &[u8],
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Vec<Output>, IkeError> {
        let header = Header::parse(&IkeHeader::new_checked(bytes)?)?;
        // A retransmitted request is no evidence of where the peer is now:
        // anyone can replay it (section 2.23 moves on new messages only).
        let replay = self
            .last_exchange
            .as_ref()
            .is_some_and(|(request, _)| request.as_slice() == bytes);
        self.nat.current = Some((local, remote));
        let result = self.handle(bytes, now, rng);
        self.nat.current = None;
        let actions = result?;
        let mut out = Vec::new();
        let authenticated = header.exchange != exchange::IKE_SA_INIT && !replay;
        let here = Route {
            to: remote,
            natt: local.port() == self.nat.policy.port,
        };
        if self.nat.route.is_none() {
            // A responder learns the peer's address from IKE_SA_INIT.
            self.nat.route = Some(here);
        }
        if authenticated
            && self.use_natt()
            && self.nat.route.is_some_and(|r| r != here)
            && !matches!(self.phase, Phase::Closed)
        {
            let moved = self.nat.route.is_none_or(|r| r.to != remote);
            self.nat.route = Some(here);
            if moved {
                out.push(Output::PeerMoved(remote));
            }
        }
        // Section 2.11: a response goes where its request came from; our
        // own requests (IKE_AUTH after IKE_SA_INIT) to the peer's route.
        let route = if header.is_response() {
            self.nat.route
        } else {
            Some(here)
        };
        out.extend(self.outputs_to(actions, route));
        Ok(out)
    }

    /// Like [`IkeSa::handle_timer`], plus the NAT keepalive; datagrams
    /// routed to the peer.
    pub fn handle_timer_from(&mut self, now: Instant, rng: &mut dyn Randomness) -> Vec<Output> {
        let keepalive = self.keepalive_due(now);
        let actions = self.handle_timer(now, rng);
        let mut out: Vec<Output> = keepalive.into_iter().map(Output::SendKeepalive).collect();
        out.extend(self.outputs(actions));
        out
    }

    /// Routes actions from any other call ([`IkeSa::rekey_child`],
    /// [`IkeSa::close`], ...) to the peer.
    pub fn outputs(&self, actions: Vec<Action>) -> Vec<Output> {
        self.outputs_to(actions, self.nat.route)
    }

    fn outputs_to(&self, actions: Vec<Action>, route: Option<Route>) -> Vec<Output> {
        let peer = self.nat.route;
        actions
            .into_iter()
            .filter_map(|a| match a {
                // Without an address (the SA never heard one) there is
                // nowhere to send: the old entry points are for that.
                Action::Send(bytes) => route.map(|route| Output::Send { bytes, route }),
                Action::InstallChild(mut c) => {
                    // The CHILD SA follows the IKE SA's latest route.
                    if c.udp_encap.is_some() {
                        c.udp_encap = peer.map(|r| r.to);
                    }
                    Some(Output::Act(Action::InstallChild(c)))
                }
                other => Some(Output::Act(other)),
            })
            .collect()
    }

    /// The keepalive that is due, if any, and the next one scheduled.
    /// Called by every timer entry point, so that a due keepalive never
    /// keeps [`IkeSa::next_timeout`] in the past.
    pub(super) fn keepalive_due(&mut self, now: Instant) -> Option<Route> {
        let at = self.nat.keepalive_at?;
        if now < at {
            return None;
        }
        if matches!(self.phase, Phase::Closed) {
            self.nat.keepalive_at = None;
            return None;
        }
        let interval = self.nat.policy.keepalive?;
        self.nat.keepalive_at = Some(now + interval);
        self.nat.route.map(|r| Route { natt: true, ..r })
    }

    /// The NAT detection notifies of an IKE_SA_INIT message of ours with
    /// these SPIs; none without addresses.
    pub(super) fn natd_payloads(&self, spi_i: u64, spi_r: u64) -> Vec<Payload> {
        let Some((local, remote)) = self.nat.endpoints else {
            return Vec::new();
        };
        vec![
            Payload::Notify(Notify::new(
                notify::NAT_DETECTION_SOURCE_IP,
                natd_hash(spi_i, spi_r, local).to_vec(),
            )),
            Payload::Notify(Notify::new(
                notify::NAT_DETECTION_DESTINATION_IP,
                natd_hash(spi_i, spi_r, remote).to_vec(),
            )),
        ]
    }

    /// Compares the peer's NAT detection notifies in an IKE_SA_INIT
    /// message with the SPIs of its header and the addresses it came
    /// with; starts keepalives if we are behind a NAT, and moves the
    /// initiator to the NAT-T port (section 2.23).
    pub(super) fn detect_nat(&mut self, found: &Found<'_>, spi_i: u64, spi_r: u64, now: Instant) {
        let Some((local, remote)) = self.nat.current else {
            return;
        };
        self.nat.endpoints = Some((local, remote));
        let sources: Vec<&Notify> = found
            .notifies
            .iter()
            .copied()
            .filter(|n| n.ty == notify::NAT_DETECTION_SOURCE_IP)
            .collect();
        let destination = found.notify(notify::NAT_DETECTION_DESTINATION_IP);
        if sources.is_empty() || destination.is_none() {
            // The peer does not do NAT detection: no NAT-T.
            return;
        }
        let src = natd_hash(spi_i, spi_r, remote);
        let dst = natd_hash(spi_i, spi_r, local);
        // Several source notifies are allowed (one per address of a
        // multihomed sender); one match is enough.
        self.nat.status = NatStatus {
            supported: true,
            peer_behind: !sources.iter().any(|n| n.data == src),
            local_behind: destination.is_none_or(|n| n.data != dst),
        };
        if self.nat.status.local_behind {
            self.nat.keepalive_at = self.nat.policy.keepalive.map(|k| now + k);
        }
        if self.nat.status.detected() && self.role == super::Role::Initiator {
            self.nat.route = Some(Route {
                to: SocketAddr::new(remote.ip(), self.nat.policy.port),
                natt: true,
            });
        }
    }

    /// Where a new CHILD SA's ESP goes in UDP, if a NAT was detected.
    pub(super) fn udp_encap(&self) -> Option<SocketAddr> {
        if !self.use_natt() {
            return None;
        }
        self.nat.route.map(|r| r.to)
    }

    /// Checks the peer's selectors for our side (`local`) and its own
    /// (`peer`): each must cover our configured host, or, for a side
    /// behind a NAT, name exactly one address (its original address,
    /// section 2.23.1). Returns the original addresses.
    pub(super) fn child_selectors(
        &self,
        local: &[TrafficSelector],
        peer: &[TrafficSelector],
    ) -> Option<OriginalAddrs> {
        let (ours, theirs) = self.host_selectors();
        let pick = |list: &[TrafficSelector], want: &TrafficSelector, natted: bool| {
            if covers(list, want) {
                return Some(want.start);
            }
            match list {
                [one] if natted && one.start == one.end => Some(one.start),
                _ => None,
            }
        };
        Some(OriginalAddrs {
            local: pick(local, &ours, self.nat.status.local_behind)?,
            peer: pick(peer, &theirs, self.nat.status.peer_behind)?,
        })
    }
}
