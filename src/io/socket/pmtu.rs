//! Learning the path MTU to each peer from the kernel.
//!
//! The outer sockets are set to `IP_PMTUDISC_WANT` / `IPV6_PMTUDISC_WANT`
//! ([`super::OuterSocket::open`]): a packet that fits the path MTU the
//! kernel knows leaves with DF (IPv4; IPv6 routers never fragment), so a
//! router on a smaller link answers with ICMP Fragmentation Needed /
//! Packet Too Big, and the kernel's ICMP handlers for the outer socket
//! (UDP or raw protocol 50) record the new MTU as a route exception for
//! that destination. A packet larger than the known path MTU, such as a
//! sealed reassembled datagram, is still fragmented by the host.
//!
//! To read that MTU back, [`PathMtuProbe`] connects a UDP socket (one per
//! family, with the outer sockets' fwmark, so that it finds the same
//! route) to the peer and asks `IP_MTU` / `IPV6_MTU`: connect(2) does a
//! fresh route lookup, which carries the exception. It sends nothing.
//!
//! Why not `IP_RECVERR` and the error queue on the outer sockets: with it,
//! every ICMP error also sets the socket's pending error (`sk_err`, see
//! `__udp4_lib_err` and `raw_err` in Linux), which the next sendmmsg(2)
//! or recvmmsg(2) returns in place of its work: one lost packet per ICMP
//! message, EMSGSIZE and ECONNREFUSED on the send path, and a queue that
//! must be drained or it grows. Without it nothing is queued on the outer
//! sockets (there is no error queue to drain), the datapath's calls never
//! see ICMP errors, and the kernel still learns the path MTU. The probe's
//! cost is one connect and one getsockopt per peer per refresh, off the
//! packet path.
//!
//! Two Linux details this rests on:
//! - Raw ESP over IPv6 is the exception: `rawv6_err` updates the path MTU
//!   of an unconnected raw IPv6 socket only when IPV6_RECVERR is on. That
//!   socket has it, and its receive path drains the error queue whenever
//!   the pending error surfaces or the queue is otherwise empty (so one
//!   packet per ICMP message may fail to send; the packet that caused it
//!   was lost anyway).
//! - A UDP GSO train never carries DF (the kernel decides on the length of
//!   the whole train), and routers fragment IPv4 trains silently. Each
//!   refresh therefore asks the outer sockets to send the first packet of
//!   every train alone ([`super::OuterSocket::request_df_probe`]), with DF.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, SockAddr, Socket, Type};

use super::options::get_int_option;

/// A UDP socket per address family for reading the kernel's path MTU.
#[derive(Debug)]
pub struct PathMtuProbe {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl PathMtuProbe {
    /// Opens the probe sockets (best effort per family: a host without
    /// IPv6 has no IPv6 probe, and its peers no learned MTU).
    pub fn open(fwmark: Option<u32>) -> PathMtuProbe {
        let open = |domain: Domain| -> Option<Socket> {
            let sock = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), None).ok()?;
            if let Some(mark) = fwmark {
                // Without the mark the lookup could find another route;
                // no answer is better than a wrong one.
                sock.set_mark(mark).ok()?;
            }
            // It never reads: keep what it might be sent from piling up.
            let _ = sock.set_recv_buffer_size(0);
            Some(sock)
        };
        PathMtuProbe {
            v4: open(Domain::IPV4),
            v6: open(Domain::IPV6),
        }
    }

    /// The kernel's path MTU to `peer` (its route's MTU, or the learned
    /// exception). The port only matters to policy routing by port.
    pub fn path_mtu(&self, peer: SocketAddr) -> io::Result<u16> {
        let (sock, level, name) = match peer.ip() {
            IpAddr::V4(_) => (&self.v4, libc::IPPROTO_IP, libc::IP_MTU),
            IpAddr::V6(_) => (&self.v6, libc::IPPROTO_IPV6, libc::IPV6_MTU),
        };
        let sock = sock
            .as_ref()
            .ok_or_else(|| io::Error::other("no probe socket of this address family"))?;
        let peer = match peer.port() {
            0 => SocketAddr::new(peer.ip(), crate::wire::outer::NATT_PORT),
            _ => peer,
        };
        sock.connect(&SockAddr::from(peer))?;
        let mtu = get_int_option(sock, level, name)?;
        // Loopback's 65536 does not fit a u16; no packet is larger anyway.
        u16::try_from(mtu.min(65535))
            .ok()
            .filter(|m| *m >= 68)
            .ok_or_else(|| io::Error::other(format!("the kernel reported a path MTU of {mtu}")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testns::{NetNs, have_root};
    use super::*;

    #[test]
    fn loopback_reports_its_device_mtu() {
        if !have_root() {
            return;
        }
        NetNs::new().run(|| {
            let probe = PathMtuProbe::open(None);
            let v4 = probe
                .path_mtu("127.0.0.1:4500".parse().expect("addr"))
                .expect("v4");
            let v6 = probe
                .path_mtu("[::1]:0".parse().expect("addr"))
                .expect("v6");
            assert_eq!((v4, v6), (65535, 65535));
            assert!(
                probe
                    .path_mtu("198.18.0.9:4500".parse().expect("addr"))
                    .is_err()
            );
        });
    }
}
