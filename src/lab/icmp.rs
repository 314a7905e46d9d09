//! ICMP and ICMPv6 echo ("ping") from inside a namespace over a raw socket.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::{LabError, Netns, remaining, socket_error, wait_readable};

/// Outcome of [`ping`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingReport {
    /// Echo requests the kernel accepted for sending.
    pub sent: u32,
    /// Distinct echo replies from the target matching our identifier, a
    /// sequence number we sent and the payload.
    pub received: u32,
    /// The last error from sending, if any (e.g. no route).
    pub last_send_error: Option<String>,
}

/// RFC 1071 Internet checksum, from the datapath's own implementation.
fn internet_checksum(data: &[u8]) -> u16 {
    crate::wire::checksum::finish(crate::wire::checksum::sum(data))
}

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const PING_PAYLOAD: &[u8; 24] = b"esptun lab echo payload!";

fn ping_identifier() -> u16 {
    // Raw ICMP sockets see every echo reply in the namespace; a per-call
    // identifier keeps concurrent pings from counting each other's replies.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (std::process::id() as u16) ^ (n as u16).rotate_left(8)
}

fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut msg = vec![
        if v6 {
            ICMP6_ECHO_REQUEST
        } else {
            ICMP_ECHO_REQUEST
        },
        0,
        0,
        0,
    ];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(PING_PAYLOAD);
    if !v6 {
        // ICMPv6 raw sockets have the kernel fill in the checksum (it
        // covers a pseudo-header we do not see); ICMPv4 ones do not.
        let sum = internet_checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    msg
}

/// A raw ICMP or ICMPv6 socket aimed at one address, non-blocking.
///
/// socket2 creates it; it is then used through std's `UdpSocket`, whose
/// `send_to`/`recv_from` are plain sendto(2)/recvfrom(2) and so work on
/// any datagram-like socket, raw ones included.
struct RawIcmp {
    sock: UdpSocket,
    to: IpAddr,
}

impl RawIcmp {
    fn open(to: IpAddr) -> io::Result<RawIcmp> {
        let (domain, protocol) = match to {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let sock = Socket::new(domain, Type::RAW.cloexec(), Some(protocol))?;
        // Every receive waits with poll first, then must not block.
        sock.set_nonblocking(true)?;
        Ok(RawIcmp {
            sock: sock.into(),
            to,
        })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // Port 0: an IPv6 raw socket reads the port as a protocol number
        // and refuses any other non-zero value than its own (raw(7)).
        self.sock.send_to(msg, SocketAddr::new(self.to, 0))?;
        Ok(())
    }

    /// Receives one packet without blocking; returns the ICMP message if it
    /// came from the target.
    fn recv_from_target<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<&'b [u8]>> {
        let (n, from) = self.sock.recv_from(buf)?;
        match self.to {
            IpAddr::V4(target) => {
                // IPv4 raw sockets deliver the IP header too; the source is
                // in it.
                let packet = &buf[..n];
                let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
                if n < 20 || ihl < 20 || n < ihl || packet[0] >> 4 != 4 {
                    return Ok(None);
                }
                let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                Ok((src == target).then(|| &packet[ihl..]))
            }
            IpAddr::V6(target) => Ok((from.ip() == IpAddr::V6(target)).then(|| &buf[..n])),
        }
    }
}

/// Sends `count` ICMP echo requests from namespace `from` to `to`, one at a
/// time, and counts matching replies. Gives up at `timeout`.
pub fn ping(
    from: &Netns,
    to: IpAddr,
    count: u32,
    timeout: Duration,
) -> Result<PingReport, LabError> {
    let count = u16::try_from(count)
        .map_err(|_| LabError::Invalid(format!("ping count {count}: at most 65535")))?;
    let deadline = Instant::now() + timeout;
    from.run(|| ping_inner(to, count, timeout, deadline))?
        .map_err(socket_error(format!(
            "ping {to} from namespace {}",
            from.name()
        )))
}

fn ping_inner(
    to: IpAddr,
    count: u16,
    timeout: Duration,
    deadline: Instant,
) -> io::Result<PingReport> {
    let v6 = to.is_ipv6();
    let (reply_type, id) = (
        if v6 {
            ICMP6_ECHO_REPLY
        } else {
            ICMP_ECHO_REPLY
        },
        ping_identifier(),
    );
    let sock = RawIcmp::open(to).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            io::Error::new(
                e.kind(),
                format!("raw ICMP socket needs CAP_NET_RAW (run as root): {e}"),
            )
        } else {
            e
        }
    })?;
    let per_echo = (timeout / u32::from(count.max(1)))
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut report = PingReport {
        sent: 0,
        received: 0,
        last_send_error: None,
    };
    let mut seen = vec![false; usize::from(count)];
    let mut buf = [0u8; 1500];
    for seq in 0..count {
        if remaining(deadline).is_zero() {
            break;
        }
        match sock.send(&echo_request(v6, id, seq)) {
            Ok(()) => report.sent += 1,
            Err(e) => {
                report.last_send_error = Some(e.to_string());
                continue;
            }
        }
        let wait_until = deadline.min(Instant::now() + per_echo);
        // A raw socket also sees unrelated ICMP (neighbour discovery,
        // other pings); bound how many strays one wait may consume.
        for _ in 0..256 {
            if !wait_readable(sock.sock.as_fd(), remaining(wait_until))? {
                break;
            }
            let msg = match sock.recv_from_target(&mut buf) {
                Ok(Some(msg)) => msg,
                Ok(None) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            if msg.len() != 8 + PING_PAYLOAD.len()
                || msg[0] != reply_type
                || msg[1] != 0
                || msg[4..6] != id.to_be_bytes()
                || &msg[8..] != PING_PAYLOAD
                || (!v6 && internet_checksum(msg) != 0)
            {
                continue;
            }
            let got = u16::from_be_bytes([msg[6], msg[7]]);
            if got > seq || seen[usize::from(got)] {
                continue;
            }
            seen[usize::from(got)] = true;
            report.received += 1;
            if got == seq {
                break;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{TwoHosts, have_root};

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: these bytes sum to 0xddf2.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let req = echo_request(false, 0x1234, 7);
        assert_eq!(
            internet_checksum(&req),
            0,
            "a checksummed message sums to zero"
        );
        // Odd length pads with a zero byte.
        assert_eq!(internet_checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn ping_across_veth_v4_and_v6() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("ping", 240).expect("lab");
        for to in [IpAddr::V4(lab.b_v4), IpAddr::V6(lab.b_v6)] {
            let r = ping(&lab.a, to, 3, T).expect("ping");
            assert_eq!((r.sent, r.received), (3, 3), "{to}: {r:?}");
        }
        let r = ping(&lab.b, IpAddr::V6(lab.a_v6), 2, T).expect("ping back");
        assert_eq!((r.sent, r.received), (2, 2), "{r:?}");
        // Nobody answers here: replies must not be invented.
        let r = ping(
            &lab.a,
            IpAddr::V4(Ipv4Addr::new(198, 18, 240, 99)),
            1,
            Duration::from_millis(500),
        )
        .expect("ping nobody");
        assert_eq!(r.received, 0, "{r:?}");
    }
}
