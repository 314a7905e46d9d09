//! What goes out: IKE messages on their route (port 500, or the NAT-T
//! socket behind the non-ESP marker), NAT keepalives, and the peer's new
//! address for the key manager.

use std::net::SocketAddr;

use super::{ChildUpdate, IkeWorker, NON_ESP_MARKER};
use crate::ike::sa::Route;

impl IkeWorker {
    /// Sends an IKE message on its route: from port 500, or from the
    /// NAT-T socket behind the non-ESP marker (RFC 3948 section 2.2).
    pub(super) fn send(&mut self, i: usize, route: Route, bytes: &[u8]) {
        let to = route.to;
        let result = if route.natt {
            let mut framed = Vec::with_capacity(NON_ESP_MARKER.len() + bytes.len());
            framed.extend_from_slice(&NON_ESP_MARKER);
            framed.extend_from_slice(bytes);
            self.send_natt(to, &framed)
        } else {
            let family_v6 = to.is_ipv6();
            let socket = self
                .ike_sockets
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6() == family_v6));
            match socket {
                Some(socket) => socket.send_to(bytes, to).map(|_| ()),
                None => Err(std::io::Error::other("no IKE socket of this family")),
            }
        };
        if let Err(e) = result {
            // Retransmission (RFC 7296 section 2.1) covers a lost send.
            tracing::debug!(peer = %self.peers[i].cfg.name, to = %to, "IKE: send failed: {e}");
        }
    }

    /// One datagram from the NAT-T socket: the outer UDP socket, or with
    /// raw ESP our IKE-only port 4500 socket.
    fn send_natt(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<()> {
        if !self.sockets.encap.is_udp() {
            let family_v6 = to.is_ipv6();
            let socket = self
                .natt_sockets
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6() == family_v6));
            return match socket {
                Some(socket) => socket.send_to(datagram, to).map(|_| ()),
                None => Err(std::io::Error::other("no port 4500 socket of this family")),
            };
        }
        let socket = if to.is_ipv6() {
            self.sockets.v6.as_ref()
        } else {
            self.sockets.v4.as_ref()
        };
        match socket {
            Some(socket) => match socket.send_batch(&[(datagram, to)]) {
                Ok(r) if r.failed == 0 => Ok(()),
                Ok(r) => Err(r
                    .last_error
                    .unwrap_or_else(|| std::io::Error::other("not sent"))),
                Err(e) => Err(e),
            },
            None => Err(std::io::Error::other("no NAT-T socket of this family")),
        }
    }

    /// RFC 3948 section 4: the one byte 0xFF keeps our NAT's mapping,
    /// sent only "if no other packet to the peer was sent in the interval":
    /// the IKE SA asks every interval, and ESP that went out through one
    /// of its CHILD SAs since the last time (the outbound thread's
    /// published packet counts) did the job already.
    pub(super) fn keepalive(&mut self, i: usize, slot: usize, route: Route) {
        let Some(s) = self.peers[i].slots.get(slot) else {
            return;
        };
        let counts: Vec<(u32, u64)> = {
            let published = self
                .shared
                .out_status
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let name = &self.peers[i].cfg.name;
            published
                .rows
                .iter()
                .filter(|r| {
                    r.peer == *name && s.sa.children().iter().any(|c| c.outbound_spi == r.spi)
                })
                .map(|r| (r.spi, r.packets))
                .collect()
        };
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        let sent = esp_sent(&s.out_packets, &counts);
        s.out_packets = counts;
        if sent {
            p.counters.keepalives_skipped += 1;
            return;
        }
        if let Err(e) = self.send_natt(route.to, &[0xFF]) {
            tracing::debug!(peer = %self.peers[i].cfg.name, to = %route.to, "IKE: NAT keepalive not sent: {e}");
            return;
        }
        let p = &mut self.peers[i];
        p.counters.keepalives += 1;
        if let Some(s) = p.slots.get_mut(slot) {
            s.keepalives += 1;
        }
    }

    /// The peer's NAT mapping changed (RFC 7296 section 2.23): its ESP
    /// goes to, and is expected from, the new address.
    pub(super) fn peer_moved(&mut self, i: usize, slot: usize, to: SocketAddr) {
        let p = &mut self.peers[i];
        p.counters.peer_moved += 1;
        if let Some(s) = p.slots.get_mut(slot) {
            s.to = to;
        }
        tracing::info!(peer = %p.cfg.name, to = %to, "IKE: the peer's address changed (NAT); ESP follows");
        let _ = self.installs.send(ChildUpdate::Endpoint {
            peer: p.cfg.name.clone(),
            endpoint: to,
        });
    }
}

/// Whether ESP went out since the last look: an outbound SA's packet
/// count (SPI, packets) grew over `before`, or a new SA has sent.
pub(super) fn esp_sent(before: &[(u32, u64)], now: &[(u32, u64)]) -> bool {
    now.iter().any(|&(spi, n)| packets_grew(before, spi, n))
}

/// Whether SA `spi`'s packet count `n` grew over its count in the
/// snapshot `before` (SPI, packets); an SA not in it counted none.
pub(super) fn packets_grew(before: &[(u32, u64)], spi: u32, n: u64) -> bool {
    n > before
        .iter()
        .find(|&&(s, _)| s == spi)
        .map_or(0, |&(_, b)| b)
}
