//! End to end: inner IPv6 packets with a hop-by-hop options header or a
//! routing header. In transport mode both belong to the outer header (RFC
//! 4303 section 3.1.1), and esptun does not carry them: it drops them by
//! name, `hop_by_hop` and `routing_header`, and delivers nothing of them.
//! The application inside the tunnel sets its hop-by-hop options the way
//! applications do (the `IPV6_HOPOPTS` socket option, which needs
//! CAP_NET_RAW); the routing header comes from a raw socket that writes
//! the whole packet.
//!
//! Needs root. Without it every test says it skipped; with
//! `ESPTUN_REQUIRE_NETNS=1` (CI) a skip fails. Each lab has its own
//! namespaces (2001:db8:90-91::) and is removed on drop, also when an
//! assertion fails.

mod common;

use common::{check, fail, lab};

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use esptun::lab::demo::{LabOptions, Side, TunnelLab};
use esptun::wire::inner::build;
use esptun::wire::ip::protocol;
use esptun::wire::outer::Encap;

const PORT: u16 = 5090;
/// Datagrams per phase. The lab has no loss, but a few may go missing to
/// the first neighbour resolution.
const COUNT: usize = 10;
const MIN_ARRIVED: usize = COUNT - 3;

/// A hop-by-hop options header of 8 bytes (RFC 8200 section 4.3) with one
/// option of the experimental type 0x1E (RFC 4727; its top bits 00 tell a
/// node that does not know it to skip it). The kernel fills in the next
/// header byte.
const HOPOPTS: [u8; 8] = [0, 0, 0x1e, 4, 0xde, 0xad, 0xbe, 0xef];

fn drops(lab: &TunnelLab, side: Side, direction: &str, reason: &str) -> u64 {
    let s = lab
        .status(side)
        .unwrap_or_else(|e| fail(lab, &format!("status of {side:?}: {e}")));
    // A reason never counted may be left out of the status.
    s[direction]["drops"][reason].as_u64().unwrap_or(0)
}

fn octets(lab: &TunnelLab, ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => fail(lab, "the lab's inner addresses are not IPv6"),
    }
}

/// Sends `COUNT` datagrams from a's inner address through the tunnel, with
/// `HOPOPTS` set on the socket if `hop_by_hop`; returns how many b's
/// receiver got.
fn exchange(lab: &TunnelLab, hop_by_hop: bool) -> usize {
    let to = SocketAddr::new(lab.b_inner, PORT);
    let receiver = lab
        .hosts
        .b
        .run(|| UdpSocket::bind(to))
        .unwrap_or_else(|e| fail(lab, &format!("entering b: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("receiver: {e}")));
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap_or_else(|e| fail(lab, &format!("receive timeout: {e}")));
    let from = SocketAddr::new(lab.a_inner, 0);
    let sender = lab
        .hosts
        .a
        .run(|| UdpSocket::bind(from))
        .unwrap_or_else(|e| fail(lab, &format!("entering a: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("sender: {e}")));
    if hop_by_hop {
        // SAFETY: the fd is the live socket `sender` owns; the option value
        // is a valid buffer of the given length.
        let rc = unsafe {
            libc::setsockopt(
                sender.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_HOPOPTS,
                HOPOPTS.as_ptr().cast(),
                HOPOPTS.len() as libc::socklen_t,
            )
        };
        check(lab, rc == 0, || {
            format!(
                "IPV6_HOPOPTS on the sender: {}",
                std::io::Error::last_os_error()
            )
        });
    }
    for i in 0..COUNT {
        if let Err(e) = sender.send_to(&[i as u8; 100], to) {
            fail(lab, &format!("send {i}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    receive(lab, &receiver)
}

/// Datagrams `receiver` gets until none came for a while (bounded).
fn receive(lab: &TunnelLab, receiver: &UdpSocket) -> usize {
    let mut got = 0;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(2);
    while got < COUNT && Instant::now() < deadline {
        match receiver.recv_from(&mut buf) {
            Ok(_) => got += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => fail(lab, &format!("recv: {e}")),
        }
    }
    got
}

/// Sends `COUNT` UDP datagrams from a to b whose IPv6 header is followed
/// by a routing header (type 0, no segments left), written whole through
/// a raw socket in a; returns how many b's receiver got.
fn exchange_routing_header(lab: &TunnelLab) -> usize {
    let to = SocketAddr::new(lab.b_inner, PORT);
    let receiver = lab
        .hosts
        .b
        .run(|| UdpSocket::bind(to))
        .unwrap_or_else(|e| fail(lab, &format!("entering b: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("receiver: {e}")));
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap_or_else(|e| fail(lab, &format!("receive timeout: {e}")));
    let raw = lab
        .hosts
        .a
        .run(|| {
            // SAFETY: plain socket(2) call; the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                // SAFETY: fd is a new descriptor nothing else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        })
        .unwrap_or_else(|e| fail(lab, &format!("entering a: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("raw socket: {e}")));
    let (src, dst) = (octets(lab, lab.a_inner), octets(lab, lab.b_inner));
    let plain = build::ipv6(src, dst, protocol::UDP, &[0x42; 100]);
    // The UDP header's destination port, then the routing header between
    // the IPv6 header and UDP (the UDP checksum does not cover it).
    let mut udp = plain[40..].to_vec();
    udp[2..4].copy_from_slice(&PORT.to_be_bytes());
    let fixed = fix_udp(src, dst, udp);
    let mut packet = plain[..40].to_vec();
    packet[6] = protocol::IPV6_ROUTING;
    let len = (fixed.len() + 8) as u16;
    packet[4..6].copy_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&[protocol::UDP, 0, 0, 0, 0, 0, 0, 0]);
    packet.extend_from_slice(&fixed);
    let sock = socket2::SockRef::from(&raw);
    let dest = socket2::SockAddr::from(SocketAddr::new(lab.b_inner, 0));
    for i in 0..COUNT {
        if let Err(e) = sock.send_to(&packet, &dest) {
            fail(lab, &format!("raw send {i}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    receive(lab, &receiver)
}

/// `udp` (a UDP header and payload) with its checksum recomputed for the
/// pseudo-header of `src` and `dst` (RFC 8200 section 8.1).
fn fix_udp(src: [u8; 16], dst: [u8; 16], mut udp: Vec<u8>) -> Vec<u8> {
    use esptun::wire::checksum::{combine, finish, pseudo_header_v6, sum};
    udp[6..8].copy_from_slice(&[0, 0]);
    let pseudo = pseudo_header_v6(&src, &dst, protocol::UDP, udp.len() as u32);
    let value = match finish(combine(pseudo, sum(&udp))) {
        0 => 0xFFFF,
        v => v,
    };
    udp[6..8].copy_from_slice(&value.to_be_bytes());
    udp
}

fn router_headers_are_dropped_by_name(test: &str, subnet: u8, encap: Encap) {
    let Some(lab) = lab(
        test,
        LabOptions {
            tag: "hbh".into(),
            subnet,
            ipv6: true,
            encap,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    for side in [Side::A, Side::B] {
        if let Err(e) = lab.start(side, &[]) {
            fail(&lab, &format!("starting {side:?}: {e}"));
        }
    }
    // The path works: plain datagrams arrive.
    let plain = exchange(&lab, false);
    check(&lab, plain >= MIN_ARRIVED, || {
        format!("only {plain} of {COUNT} plain datagrams arrived")
    });

    // With hop-by-hop options: dropped by a as `hop_by_hop`, none
    // delivered. (The kernel's own MLD reports carry a hop-by-hop header
    // too, so the count may grow by more.)
    let before = drops(&lab, Side::A, "outbound", "hop_by_hop");
    let got = exchange(&lab, true);
    check(&lab, got == 0, || {
        format!("{got} datagrams with hop-by-hop options were delivered")
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = drops(&lab, Side::A, "outbound", "hop_by_hop");
    check(&lab, after >= before + COUNT as u64, || {
        format!("hop_by_hop drops went from {before} to {after}, expected {COUNT} more")
    });

    // With a routing header: dropped as `routing_header`.
    let before = drops(&lab, Side::A, "outbound", "routing_header");
    let got = exchange_routing_header(&lab);
    check(&lab, got == 0, || {
        format!("{got} datagrams with a routing header were delivered")
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = drops(&lab, Side::A, "outbound", "routing_header");
    check(&lab, after == before + COUNT as u64, || {
        format!("routing_header drops went from {before} to {after}, expected {COUNT} more")
    });
    // The tunnel still carries plain traffic afterwards.
    let plain = exchange(&lab, false);
    check(&lab, plain >= MIN_ARRIVED, || {
        format!("afterwards only {plain} of {COUNT} plain datagrams arrived")
    });
}

#[test]
fn router_headers_are_dropped_by_name_nat_t() {
    router_headers_are_dropped_by_name("router_headers_are_dropped_by_name_nat_t", 90, Encap::NATT);
}

#[test]
fn router_headers_are_dropped_by_name_raw_esp() {
    router_headers_are_dropped_by_name(
        "router_headers_are_dropped_by_name_raw_esp",
        91,
        Encap::RawEsp,
    );
}
