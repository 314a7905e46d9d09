//! What comes in: datagrams on the IKE sockets and the datapath's queue,
//! IKE messages routed to their peer and IKE SA (new responders past the
//! COOKIE gate), timers, initiations due, and ESP seen from the peer.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::send::packets_grew;
use super::{IkeWorker, LOG_EVERY, NON_ESP_MARKER, PEER_STARTED, SAS_PER_PEER, Slot, Via};
use crate::ike::cookie::Verdict;
use crate::ike::sa::{Action, ChildState, IkeSa, NatPolicy, Output, Role, Route};
use crate::ike::wire::consts::exchange;
use crate::ike::wire::{Header, IkeHeader};
use crate::io::ike_socket::IKE_PORT;

/// What a datagram on a port 4500 socket is (RFC 3948 section 2).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NattDatagram<'a> {
    /// IKE, the non-ESP marker removed.
    Ike(&'a [u8]),
    /// A NAT-keepalive.
    Keepalive,
    /// ESP in UDP (or junk).
    Other,
}

pub(super) fn classify_natt(data: &[u8]) -> NattDatagram<'_> {
    match data {
        [0xff] => NattDatagram::Keepalive,
        _ => match data.strip_prefix(&NON_ESP_MARKER[..]) {
            Some(ike) => NattDatagram::Ike(ike),
            None => NattDatagram::Other,
        },
    }
}

impl IkeWorker {
    /// One datagram on a raw-mode IKE-only port 4500 socket (RFC 3948
    /// section 2): IKE behind the non-ESP marker goes to the IKE SAs, a
    /// NAT-keepalive (one 0xFF byte, section 2.3) is ignored, and anything
    /// else is ESP in UDP, which raw ESP cannot have SAs for: dropped,
    /// counted, logged now and then.
    pub(super) fn on_natt_datagram(&mut self, data: &[u8], from: SocketAddr) {
        match classify_natt(data) {
            NattDatagram::Ike(bytes) => self.on_message(bytes, from, Via::NatT),
            NattDatagram::Keepalive => {}
            NattDatagram::Other => {
                let total = self.ike.natt_non_ike.fetch_add(1, Ordering::Relaxed) + 1;
                let now = Instant::now();
                if self
                    .natt_non_ike_logged
                    .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
                {
                    self.natt_non_ike_logged = Some(now);
                    tracing::warn!(
                        from = %from,
                        total,
                        "IKE: ESP in UDP on port 4500 but outer = \"esp\" (raw ESP): dropped"
                    );
                }
            }
        }
    }

    /// Initiates for peers that are due and have no IKE SA on its way: none
    /// established, none of ours connecting, and none the peer started
    /// lately (a responder slot that never completes does not block us
    /// for long).
    pub(super) fn initiate_due(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            let p = &mut self.peers[i];
            let busy = p.slots.iter().any(|s| {
                s.established
                    || s.sa.role() == Role::Initiator
                    || now.saturating_duration_since(s.created) < PEER_STARTED
            });
            if p.next_initiate.is_none_or(|t| now < t) || busy {
                continue;
            }
            p.next_initiate = None;
            let (via, to) = p.initiate_via;
            let local = self.local(i, via, true);
            let nat = self.nat_policy(i);
            let p = &mut self.peers[i];
            match IkeSa::initiate_from(p.ike.clone(), local, to, nat, now, &mut self.rng) {
                Ok((mut sa, out)) => {
                    sa.set_policy(p.slot_policy());
                    tracing::info!(peer = %p.cfg.name, to = %to, "IKE: initiating");
                    p.slots.push(Slot::new(sa, to, now));
                    let slot = p.slots.len() - 1;
                    self.act(i, slot, out, now);
                }
                Err(e) => self.failed(i, e, now),
            }
            self.reap(i, now);
        }
    }

    pub(super) fn timeouts(&mut self, now: Instant) {
        self.expire_half_open(now);
        for i in 0..self.peers.len() {
            for s in 0..self.peers[i].slots.len() {
                if self.peers[i].slots[s]
                    .sa
                    .next_timeout()
                    .is_some_and(|t| t <= now)
                {
                    let rekeying = |sa: &IkeSa| {
                        sa.children()
                            .iter()
                            .filter(|c| c.state == ChildState::Rekeying)
                            .count()
                    };
                    let before = rekeying(&self.peers[i].slots[s].sa);
                    let actions = self.peers[i].slots[s]
                        .sa
                        .handle_timer_from(now, &mut self.rng);
                    if rekeying(&self.peers[i].slots[s].sa) > before {
                        self.peers[i].counters.child_rekeys_started += 1;
                    }
                    self.act(i, s, actions, now);
                }
            }
            self.reap(i, now);
        }
    }

    /// One received IKE message.
    pub(super) fn on_message(&mut self, bytes: &[u8], from: SocketAddr, via: Via) {
        let now = Instant::now();
        let header = IkeHeader::new_checked(bytes).and_then(|h| Header::parse(&h));
        let Some(i) = self.peer_of(header.as_ref().ok(), from) else {
            self.unknown += 1;
            if self
                .unknown_logged
                .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
            {
                self.unknown_logged = Some(now);
                tracing::warn!(
                    from = %from,
                    total = self.unknown,
                    "IKE: message from an address that is no IKE peer's endpoint: dropped"
                );
            }
            return;
        };
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                self.peers[i].counters.messages_dropped += 1;
                tracing::debug!(peer = %self.peers[i].cfg.name, "IKE: malformed message dropped: {e}");
                return;
            }
        };
        let local = self.local(i, via, header.exchange == exchange::IKE_SA_INIT);
        // After an IKE SA rekey the old SPIs stay routed to the same SA
        // until its Delete exchange ends (RFC 7296 section 2.18).
        let slot = match self.peers[i]
            .slots
            .iter()
            .position(|s| s.owns(header.spi_i))
        {
            Some(s) => s,
            None if !header.is_response()
                && header.exchange == exchange::IKE_SA_INIT
                && header.spi_r == 0 =>
            {
                if !self.admit(i, bytes, from, via, now) {
                    return;
                }
                let nat = self.nat_policy(i);
                let p = &mut self.peers[i];
                if p.slots.len() >= SAS_PER_PEER {
                    // The oldest one not established makes room.
                    match p.slots.iter().position(|s| !s.established) {
                        Some(old) => {
                            let gone = p.slots.remove(old);
                            if let Some(g) = self.gate.as_mut() {
                                g.completed(gone.sa.spis().0);
                            }
                        }
                        None => {
                            p.counters.messages_dropped += 1;
                            if let Some(g) = self.gate.as_mut() {
                                g.completed(header.spi_i);
                            }
                            return;
                        }
                    }
                }
                let mut sa = IkeSa::responder(p.ike.clone());
                sa.set_policy(p.slot_policy());
                sa.set_nat_policy(nat);
                p.slots.push(Slot::new(sa, from, now));
                p.slots.len() - 1
            }
            None => {
                let p = &mut self.peers[i];
                p.counters.messages_dropped += 1;
                tracing::debug!(peer = %p.cfg.name, "IKE: message for no IKE SA of ours dropped");
                return;
            }
        };
        let p = &mut self.peers[i];
        let raw = !self.sockets.encap.is_udp();
        let s = &mut p.slots[slot];
        match s.sa.handle_from(bytes, local, from, now, &mut self.rng) {
            Ok(_) if raw && s.sa.use_natt() => {
                // The datapath carries one outer mode: raw ESP has no
                // NAT-T socket, and ESP cannot cross a NAT unencapsulated
                // (RFC 3948 section 1). Refused before anything is sent.
                let nat = s.sa.nat();
                let spi_i = s.sa.spis().0;
                p.slots.remove(slot);
                p.counters.nat_refused += 1;
                if let Some(g) = self.gate.as_mut() {
                    g.completed(spi_i);
                }
                let text = format!(
                    "NAT detected (we are behind one: {}, the peer: {}) but outer = \"esp\": \
                     NAT traversal needs outer = \"udp\"; IKE SA dropped",
                    nat.local_behind, nat.peer_behind
                );
                self.log_failure(i, &text, now);
                let p = &mut self.peers[i];
                if p.cfg.ike.initiate {
                    p.back_off(now);
                }
            }
            Ok(out) => {
                if let Some(r) = s.sa.route() {
                    s.to = r.to;
                }
                // The peer deleted the IKE SA (RFC 7296 section 1.4.1):
                // its request closed it.
                if !header.is_response()
                    && header.exchange == exchange::INFORMATIONAL
                    && out.iter().any(|o| matches!(o, Output::Act(Action::Closed)))
                {
                    p.counters.deletes_received += 1;
                    tracing::info!(peer = %p.cfg.name, "IKE: the peer deleted the IKE SA");
                }
                self.act(i, slot, out, now);
            }
            Err(e) => {
                p.counters.messages_dropped += 1;
                tracing::debug!(peer = %p.cfg.name, "IKE: message dropped: {e}");
                // A responder that never got a valid request holds nothing.
                if s.sa.role() == Role::Responder && s.sa.spis().1 == 0 {
                    let spi_i = s.sa.spis().0;
                    p.slots.remove(slot);
                    if let Some(g) = self.gate.as_mut() {
                        g.completed(spi_i);
                    }
                }
            }
        }
        self.reap(i, now);
    }

    /// The peer a message is for: the one whose IKE SA has its SPI (a NAT
    /// may have changed the address it comes from: RFC 7296 section 2.23
    /// lets the IKE SA, which authenticates it, decide), else the one at
    /// its source address, else, for a new IKE_SA_INIT, the first peer
    /// with `any_source` (behind a NAT of unknown address; IKE_AUTH
    /// checks its identity and PSK).
    fn peer_of(&self, header: Option<&Header>, from: SocketAddr) -> Option<usize> {
        let by_spi = header.filter(|h| h.spi_i != 0).and_then(|h| {
            self.peers
                .iter()
                .position(|p| p.slots.iter().any(|s| s.owns(h.spi_i)))
        });
        by_spi
            .or_else(|| self.peers.iter().position(|p| p.cfg.endpoint == from.ip()))
            .or_else(|| {
                let h = header?;
                let init = !h.is_response() && h.exchange == exchange::IKE_SA_INIT && h.spi_r == 0;
                if !init {
                    return None;
                }
                self.peers.iter().position(|p| p.cfg.ike.any_source)
            })
    }

    /// Our address for a message of peer `i` on `via`: the peer's
    /// configured `local`, at port 500 or the NAT-T port. With
    /// `force_encap`, IKE_SA_INIT is told an unspecified address of the
    /// same port instead, so that our NAT detection source hash matches
    /// nothing and both sides see a NAT (strongSwan's `encap = yes`).
    fn local(&self, i: usize, via: Via, init: bool) -> SocketAddr {
        let p = &self.peers[i];
        let port = match via {
            Via::Ike => IKE_PORT,
            Via::NatT => self.natt_port,
        };
        let ip = if init && p.cfg.ike.force_encap {
            match p.cfg.local {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            }
        } else {
            p.cfg.local
        };
        SocketAddr::new(ip, port)
    }

    /// NAT-T for peer `i`'s IKE SAs: our port, and its keepalive
    /// interval (`keepalive_secs`).
    fn nat_policy(&self, i: usize) -> NatPolicy {
        NatPolicy {
            port: self.natt_port,
            keepalive: Some(self.peers[i].cfg.ike.keepalive),
        }
    }

    /// The COOKIE gate's verdict on an IKE_SA_INIT request of peer `i`
    /// that matches no IKE SA: whether to create a responder.
    fn admit(&mut self, i: usize, bytes: &[u8], from: SocketAddr, via: Via, now: Instant) -> bool {
        let Some(gate) = self.gate.as_mut() else {
            return true;
        };
        let demanding = gate.demanding();
        let verdict = gate.check(bytes, from, now, &mut self.rng);
        match verdict {
            Verdict::Accept => {
                if demanding {
                    self.cookies.accepted += 1;
                }
                true
            }
            Verdict::Challenge(answer) => {
                self.cookies.sent += 1;
                tracing::debug!(peer = %self.peers[i].cfg.name, from = %from, "IKE: COOKIE demanded");
                let route = Route {
                    to: from,
                    natt: via == Via::NatT,
                };
                self.send(i, route, &answer);
                false
            }
            Verdict::Drop(why) => {
                self.cookies.refused += 1;
                self.peers[i].counters.messages_dropped += 1;
                tracing::debug!(peer = %self.peers[i].cfg.name, from = %from, "IKE: IKE_SA_INIT refused: {why}");
                false
            }
        }
    }

    /// Gives up the responders the COOKIE gate found half-open too long.
    fn expire_half_open(&mut self, now: Instant) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        if gate.next_timeout().is_none_or(|t| now < t) {
            return;
        }
        let gone = gate.expire(now, &mut self.rng);
        self.cookies.expired += gone.len() as u64;
        for p in &mut self.peers {
            p.slots.retain(|s| {
                s.established || s.sa.role() != Role::Responder || !gone.contains(&s.sa.spis().0)
            });
        }
    }

    /// ESP from the peer, seen as grown packet counts of the inbound SAs
    /// the inbound thread publishes, puts off the liveness checks of the
    /// IKE SA that made them ([`IkeSa::peer_seen`]).
    pub(super) fn note_esp(&mut self, now: Instant) {
        let rows: Vec<(String, u32, u64)> = {
            let published = self
                .shared
                .in_status
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            published
                .rows
                .iter()
                .map(|r| (r.peer.clone(), r.spi, r.packets))
                .collect()
        };
        let mut next = Vec::with_capacity(rows.len());
        for (peer, spi, packets) in rows {
            let grew = packets_grew(&self.inbound_packets, spi, packets);
            next.push((spi, packets));
            if !grew {
                continue;
            }
            let Some(p) = self.peers.iter_mut().find(|p| p.cfg.name == peer) else {
                continue;
            };
            for s in &mut p.slots {
                if s.sa.children().iter().any(|c| c.inbound_spi == spi) {
                    s.sa.peer_seen(now);
                }
            }
        }
        self.inbound_packets = next;
    }
}
