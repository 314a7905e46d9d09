//! Unit tests of the outer sockets (root-only ones skip without it).

use super::super::poll_readable;
use super::super::testns::{NetNs, have_root};
use super::*;
use crate::packet::PacketBuf;
use std::io::Read;

fn loopback(v6: bool) -> std::net::IpAddr {
    if v6 {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    }
}

/// Receives until `want` datagrams matching `keep` have arrived (or
/// panics after 2 s of silence), as (bytes, source) pairs.
fn receive(
    sock: &OuterSocket,
    capacity: usize,
    want: usize,
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<(Vec<u8>, Option<SocketAddr>)> {
    let mut bufs: Vec<PacketBuf> = (0..16).map(|_| PacketBuf::new(capacity)).collect();
    let mut got = Vec::new();
    while got.len() < want {
        let r = poll_readable(&[sock.as_fd()], Duration::from_secs(2)).expect("poll");
        assert!(
            r.is_ready(0),
            "only {} of {want} datagrams arrived",
            got.len()
        );
        let n = sock.recv_batch(&mut bufs).expect("recv_batch");
        for buf in &bufs[..n] {
            if keep(buf.data()) {
                got.push((buf.data().to_vec(), buf.meta.peer));
            }
        }
    }
    got
}

/// Ten packets of different sizes, each starting with a marker and
/// its index.
fn packets(marker: u8) -> Vec<Vec<u8>> {
    (0..10u8)
        .map(|i| {
            let mut p = vec![i; 40 + usize::from(i) * 131];
            p[0] = marker;
            p
        })
        .collect()
}

fn udp_pair(v6: bool) {
    let (a, b) = (
        OuterSocket::open(Encap::Udp { port: 4500 }, v6, None).expect("open a"),
        OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("open b"),
    );
    assert_eq!(a.family(), if v6 { Family::V6 } else { Family::V4 });
    let wildcard = a.local_addr().expect("local_addr");
    assert!(wildcard.ip().is_unspecified() && wildcard.port() == 4500);
    let dst = SocketAddr::new(loopback(v6), 4501);
    let pkts = packets(0xE5);
    let batch: Vec<(&[u8], SocketAddr)> = pkts.iter().map(|p| (p.as_slice(), dst)).collect();
    let report = a.send_batch(&batch).expect("send_batch");
    assert_eq!((report.sent, report.failed), (10, 0), "{report:?}");

    let got = receive(&b, 2048, 10, |_| true);
    let src = SocketAddr::new(loopback(v6), 4500);
    for (i, (data, from)) in got.iter().enumerate() {
        assert_eq!(data, &pkts[i], "packet {i}");
        assert_eq!(*from, Some(src), "packet {i}");
    }
}

/// Trains of equal-size packets sent with GSO arrive as the same
/// datagrams at a plain socket, and as trains with their segment size
/// at a GRO socket (whose split gives the same datagrams).
fn gso_trains(v6: bool) {
    let mut a = OuterSocket::open(Encap::Udp { port: 4500 }, v6, None).expect("open a");
    let on = a.enable_offloads(SocketOffloads {
        gso: true,
        gro: false,
    });
    assert!(on.gso, "GSO refused on this kernel");
    let plain = OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("open b");
    let mut gro = OuterSocket::open(Encap::Udp { port: 4502 }, v6, None).expect("open c");
    assert!(
        gro.enable_offloads(SocketOffloads {
            gso: false,
            gro: true
        })
        .gro
    );
    // 5 x 1400 and a short 700, then 3 x 1400 and 2 x 900: two trains
    // and two more.
    let sizes = [
        1400, 1400, 1400, 1400, 1400, 700, 1400, 1400, 1400, 900, 900,
    ];
    let pkts: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| vec![i as u8 + 1; n])
        .collect();
    for port in [4501, 4502] {
        let dst = SocketAddr::new(loopback(v6), port);
        let batch: Vec<(&[u8], SocketAddr)> = pkts.iter().map(|p| (p.as_slice(), dst)).collect();
        let report = a.send_batch(&batch).expect("send_batch");
        assert_eq!((report.sent, report.failed), (sizes.len(), 0), "{report:?}");
    }
    let got = receive(&plain, 2048, sizes.len(), |_| true);
    for (i, (data, _)) in got.iter().enumerate() {
        assert_eq!(data, &pkts[i], "plain receiver, packet {i}");
    }
    // The GRO socket may merge what arrived together: split by size.
    let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(65535)).collect();
    let mut split = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while split.len() < sizes.len() && Instant::now() < deadline {
        let _ = poll_readable(&[gro.as_fd()], Duration::from_millis(200));
        let n = gro.recv_batch(&mut bufs).expect("recv");
        for b in &bufs[..n] {
            let seg = usize::from(b.meta.segment_size);
            if seg == 0 {
                split.push(b.data().to_vec());
            } else {
                split.extend(b.data().chunks(seg).map(<[u8]>::to_vec));
            }
        }
    }
    assert_eq!(split, pkts, "GRO receiver, split by segment size");
    assert_eq!(a.gso_refused(), 0);
}

/// Receives `want` datagrams (a GRO train split by its segment size),
/// as (bytes, TOS byte) pairs.
fn receive_tos(sock: &OuterSocket, want: usize) -> Vec<(Vec<u8>, u8)> {
    let mut bufs: Vec<PacketBuf> = (0..16).map(|_| PacketBuf::new(65535)).collect();
    let mut got = Vec::new();
    while got.len() < want {
        let r = poll_readable(&[sock.as_fd()], Duration::from_secs(2)).expect("poll");
        assert!(r.is_ready(0), "only {} of {want} arrived", got.len());
        let n = sock.recv_batch(&mut bufs).expect("recv_batch");
        for b in &bufs[..n] {
            let seg = usize::from(b.meta.segment_size);
            if seg == 0 {
                got.push((b.data().to_vec(), b.meta.tos));
            } else {
                got.extend(b.data().chunks(seg).map(|c| (c.to_vec(), b.meta.tos)));
            }
        }
    }
    got
}

/// Each packet leaves with its own TOS byte / traffic class (IP_TOS,
/// IPV6_TCLASS control messages, also on raw ESP sockets and within GSO
/// trains) and the receiver reports it (IP_RECVTOS, IPV6_RECVTCLASS),
/// also for each segment of a GRO train.
fn tos_round_trip(kind: Encap, v6: bool, offloads: SocketOffloads) {
    let (mut a, mut b) = match kind {
        Encap::Udp { .. } => (
            OuterSocket::open(Encap::Udp { port: 4500 }, v6, None).expect("a"),
            OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("b"),
        ),
        Encap::RawEsp => (
            OuterSocket::open(kind, v6, None).expect("a"),
            OuterSocket::open(kind, v6, None).expect("b"),
        ),
    };
    let on = a.enable_offloads(SocketOffloads {
        gso: offloads.gso,
        gro: false,
    });
    assert_eq!(on.gso, offloads.gso && kind != Encap::RawEsp);
    let on = b.enable_offloads(SocketOffloads {
        gso: false,
        gro: offloads.gro,
    });
    assert_eq!(on.gro, offloads.gro && kind != Encap::RawEsp);
    // EF + ECT(0) x3, EF + CE x3 (same size: GSO must split them by
    // TOS), Not-ECT, ECT(1) with DSCP AF11, DSCP CS1 Not-ECT.
    let toses = [0xBA, 0xBA, 0xBA, 0xBB, 0xBB, 0xBB, 0x00, 0x29, 0x20];
    let pkts: Vec<Vec<u8>> = (0..toses.len())
        .map(|i| vec![0xE0 + i as u8; 1200])
        .collect();
    let dst = SocketAddr::new(loopback(v6), 4501);
    let batch: Vec<(&[u8], SocketAddr, u8)> = pkts
        .iter()
        .zip(toses)
        .map(|(p, t)| (p.as_slice(), dst, t))
        .collect();
    let report = a.send_iter_with_tos(batch).expect("send");
    assert_eq!((report.sent, report.failed), (toses.len(), 0), "{report:?}");
    let got = receive_tos(&b, toses.len());
    let want: Vec<(Vec<u8>, u8)> = pkts.into_iter().zip(toses).collect();
    assert_eq!(got, want, "{kind:?} v6={v6} {offloads:?}");
    // Without a TOS the socket's own, 0.
    let report = a.send_batch(&[(b"plain", dst)]).expect("send");
    assert_eq!(report.sent, 1);
    assert_eq!(receive_tos(&b, 1), [(b"plain".to_vec(), 0)]);
}

#[test]
fn tos_and_traffic_class_cross_every_outer_socket() {
    if !have_root() {
        return;
    }
    NetNs::new().run(|| {
        for v6 in [false, true] {
            let udp = Encap::Udp { port: 4500 };
            for (gso, gro) in [(false, false), (true, false), (true, true)] {
                tos_round_trip(udp, v6, SocketOffloads { gso, gro });
            }
            tos_round_trip(Encap::RawEsp, v6, SocketOffloads::default());
        }
    });
}

#[test]
fn gso_trains_on_loopback_v4_and_v6() {
    if have_root() {
        NetNs::new().run(|| {
            gso_trains(false);
            gso_trains(true);
        });
    }
}

#[test]
fn udp_pair_on_loopback_v4() {
    if have_root() {
        NetNs::new().run(|| udp_pair(false));
    }
}

#[test]
fn udp_pair_on_loopback_v6() {
    if have_root() {
        NetNs::new().run(|| udp_pair(true));
    }
}

fn raw_pair(v6: bool) {
    let a = OuterSocket::open(Encap::RawEsp, v6, None).expect("open a");
    let b = OuterSocket::open(Encap::RawEsp, v6, None).expect("open b");
    assert_eq!(a.kind(), Encap::RawEsp);
    // The port is ignored (an IPv6 raw socket would refuse 4500).
    let dst = SocketAddr::new(loopback(v6), 4500);
    let pkts = packets(0xE5);
    let batch: Vec<(&[u8], SocketAddr)> = pkts.iter().map(|p| (p.as_slice(), dst)).collect();
    let report = a.send_batch(&batch).expect("send_batch");
    assert_eq!((report.sent, report.failed), (10, 0), "{report:?}");

    // Both sockets get a copy of every ESP packet; check b's, and
    // that the IPv4 header is gone (the marker comes first).
    let got = receive(&b, 2048, 10, |_| true);
    let src = SocketAddr::new(loopback(v6), 0);
    for (i, (data, from)) in got.iter().enumerate() {
        assert_eq!(data, &pkts[i], "packet {i}");
        assert_eq!(*from, Some(src), "packet {i}");
    }
    let also = receive(&a, 2048, 10, |_| true);
    assert_eq!(also.len(), 10, "the sender's own copies");
}

#[test]
fn raw_esp_pair_on_loopback_v4_strips_the_header() {
    if have_root() {
        NetNs::new().run(|| raw_pair(false));
    }
}

#[test]
fn raw_esp_pair_on_loopback_v6() {
    if have_root() {
        NetNs::new().run(|| raw_pair(true));
    }
}

fn oversize(kind: Encap, v6: bool) {
    let a = OuterSocket::open(kind, v6, None).expect("open a");
    let b = match kind {
        Encap::Udp { .. } => {
            OuterSocket::open(Encap::Udp { port: 4501 }, v6, None).expect("open b")
        }
        Encap::RawEsp => OuterSocket::open(kind, v6, None).expect("open b"),
    };
    let dst = SocketAddr::new(loopback(v6), 4501);
    let big = vec![0xB1u8; 500];
    let small = vec![0x5Au8; 50];
    let report = a
        .send_batch(&[(&big, dst), (&small, dst)])
        .expect("send_batch");
    assert_eq!(report.sent, 2, "{report:?}");
    let got = receive(&b, 100, 2, |_| true);
    assert_eq!(got[0].0.len(), 0, "oversize datagram is an empty buffer");
    assert_eq!(got[1].0, small);
}

#[test]
fn oversize_datagrams_are_empty_not_a_panic() {
    if !have_root() {
        return;
    }
    let ns = NetNs::new();
    ns.run(|| {
        oversize(Encap::Udp { port: 4500 }, false);
        oversize(Encap::Udp { port: 4502 }, true);
        oversize(Encap::RawEsp, false);
        oversize(Encap::RawEsp, true);
    });
}

#[test]
fn port_in_use_says_what_to_do() {
    if !have_root() {
        return;
    }
    NetNs::new().run(|| {
        let _v4 = OuterSocket::open(Encap::Udp { port: 4500 }, false, None).expect("v4");
        // IPV6_V6ONLY: the IPv6 socket shares the port number.
        let _v6 = OuterSocket::open(Encap::Udp { port: 4500 }, true, None).expect("v6");
        let e =
            OuterSocket::open(Encap::Udp { port: 4500 }, false, None).expect_err("second v4 bind");
        assert!(matches!(e, IoSetupError::PortInUse { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("UDP port 4500 on 0.0.0.0 is already in use")
                && msg.contains("strongSwan")
                && msg.contains("`port`"),
            "{msg}"
        );
        let e =
            OuterSocket::open(Encap::Udp { port: 4500 }, true, None).expect_err("second v6 bind");
        assert!(e.to_string().contains("on :: is already in use"), "{e}");
    });
}

#[test]
fn one_bad_destination_does_not_stop_the_batch() {
    if !have_root() {
        return;
    }
    NetNs::new().run(|| {
        let a = OuterSocket::open(Encap::Udp { port: 4500 }, false, None).expect("a");
        let b = OuterSocket::open(Encap::Udp { port: 4501 }, false, None).expect("b");
        let good: SocketAddr = "127.0.0.1:4501".parse().expect("addr");
        // No route to anything but loopback in the namespace.
        let unroutable: SocketAddr = "198.18.0.1:4500".parse().expect("addr");
        let wrong_family: SocketAddr = "[2001:db8::1]:4500".parse().expect("addr");
        let batch: [(&[u8], SocketAddr); 4] = [
            (b"one", good),
            (b"lost", unroutable),
            (b"mixed", wrong_family),
            (b"two", good),
        ];
        let report = a.send_batch(&batch).expect("send_batch");
        assert_eq!((report.sent, report.failed), (2, 2), "{report:?}");
        // The family mismatch is refused while packing, before the
        // kernel sees the rest, so the kernel's ENETUNREACH comes last.
        let code = report.last_error.as_ref().and_then(io::Error::raw_os_error);
        assert_eq!(code, Some(libc::ENETUNREACH), "{report:?}");

        let got = receive(&b, 2048, 2, |_| true);
        assert_eq!(got[0].0, b"one");
        assert_eq!(got[1].0, b"two");
    });
}

#[test]
fn udp_over_ipv4_is_sent_with_checksum_zero() {
    if !have_root() {
        return;
    }
    NetNs::new().run(|| {
        // A raw UDP socket sees a copy of every UDP datagram,
        // IPv4 header included (raw(7)).
        let spy = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).expect("spy");
        spy.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let a = OuterSocket::open(Encap::Udp { port: 4500 }, false, None).expect("a");
        let dst: SocketAddr = "127.0.0.1:4501".parse().expect("addr");
        let report = a.send_batch(&[(b"esp", dst)]).expect("send");
        assert_eq!(report.sent, 1);
        let mut bytes = [0u8; 128];
        let n = (&spy).read(&mut bytes).expect("spy recv");
        assert!(n >= 28, "{n} bytes");
        let udp = &bytes[20..];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 4500);
        assert_eq!(&udp[6..8], &[0, 0], "UDP checksum");
    });
}

#[test]
fn fwmark_is_set() {
    if !have_root() {
        return;
    }
    NetNs::new().run(|| {
        let s = OuterSocket::open(Encap::RawEsp, false, Some(0x4500)).expect("open");
        assert_eq!(s.sock.mark().expect("SO_MARK"), 0x4500);
        assert_eq!(
            s.local_addr().expect("addr").port(),
            50,
            "raw: port is the protocol"
        );
    });
}
