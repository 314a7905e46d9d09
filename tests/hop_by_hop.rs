//! End to end: inner IPv6 packets with a hop-by-hop options header or a
//! routing header. In transport mode both belong to the outer header (RFC
//! 4303 section 3.1.1), and esptun does not carry them: it drops them by
//! name, `hop_by_hop` and `routing_header`, and delivers nothing of them.
//! The application inside the tunnel sets its hop-by-hop options the way
//! applications do (the `IPV6_HOPOPTS` socket option, which needs
//! CAP_NET_RAW); the routing header comes from a raw socket that writes
//! the whole packet. A third test asks the kernel what carrying them would
//! rest on: `IPV6_HOPOPTS` on send and `IPV6_RECVHOPOPTS` on receive, on
//! UDP and raw ESP sockets. With `[inner] ipv6_hop_by_hop = "carry"` the
//! header travels on the outer packet instead: the receiving application
//! sees the sender's options and payload byte for byte, and a TCP stream
//! beside them is unaffected; a receiver that drops counts the header it
//! does not pass on.
//!
//! Needs root. Without it every test says it skipped; with
//! `ESPTUN_REQUIRE_NETNS=1` (CI) a skip fails. Each lab has its own
//! namespaces (2001:db8:90-91::) and is removed on drop, also when an
//! assertion fails.

mod common;

use common::{check, fail, lab};

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
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

/// What the socket half of carrying hop-by-hop options rests on, asked of
/// the kernel: an `IPV6_HOPOPTS` control message on sendmsg puts the header
/// on the packet, and a socket with `IPV6_RECVHOPOPTS` gets it back as a
/// control message, on a UDP socket (NAT-T) and on a raw `IPPROTO_ESP`
/// socket (raw ESP) alike. Over loopback in a namespace of its own.
#[test]
fn the_kernel_carries_hop_by_hop_options_on_udp_and_raw_esp_sockets() {
    let test = "the_kernel_carries_hop_by_hop_options_on_udp_and_raw_esp_sockets";
    if !common::require_root(test, "a network namespace, CAP_NET_RAW") {
        return;
    }
    let name = format!("{}hbh", esptun::lab::unique_prefix("k"));
    let ns = esptun::lab::Netns::create(&name).unwrap_or_else(|e| panic!("{test}: {e}"));
    let results = ns
        .run(|| {
            [
                (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
                (libc::SOCK_RAW, libc::IPPROTO_ESP),
            ]
            .map(|(kind, proto)| probe(kind, proto))
        })
        .unwrap_or_else(|e| panic!("{test}: entering the namespace: {e}"));
    for (result, what) in results.into_iter().zip(["UDP", "raw ESP"]) {
        let (header, payload) = result.unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
        assert_eq!(payload, b"esp-ish payload", "{what}");
        // The kernel reports the header as it went out: its next header
        // is the packet's protocol, the options as sent.
        let proto = if what == "UDP" { 17 } else { 50 };
        assert_eq!(header.first(), Some(&proto), "{what}: {header:02x?}");
        assert_eq!(header.get(1..), Some(&HOPOPTS[1..]), "{what}");
    }
}

/// Sends one datagram over ::1 between two sockets of `kind`/`proto`, with
/// `HOPOPTS` in an `IPV6_HOPOPTS` control message; returns the header the
/// receiver's `IPV6_RECVHOPOPTS` message reported and the payload.
fn probe(kind: libc::c_int, proto: libc::c_int) -> Result<(Vec<u8>, Vec<u8>), String> {
    use std::mem::{size_of, zeroed};
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    let open = || {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET6, kind, proto) };
        if fd < 0 {
            return Err(os("socket"));
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let (rx, tx) = (open()?, open()?);
    let one: libc::c_int = 1;
    // SAFETY: the value is a live c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVHOPOPTS,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(os("IPV6_RECVHOPOPTS"));
    }
    // Bounded: a datagram that never comes fails the test in 2 s.
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: the value is a live timeval of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(os("SO_RCVTIMEO"));
    }
    // SAFETY: sockaddr_in6 is plain data; all-zero is a valid one.
    let mut addr: libc::sockaddr_in6 = unsafe { zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_addr.s6_addr[15] = 1; // ::1
    if kind == libc::SOCK_DGRAM {
        addr.sin6_port = 5091u16.to_be();
        // SAFETY: addr is a live sockaddr_in6 of the length passed.
        let rc = unsafe {
            libc::bind(
                rx.as_raw_fd(),
                (&addr as *const libc::sockaddr_in6).cast(),
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os("bind"));
        }
    }
    let payload = b"esp-ish payload";
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    #[repr(C, align(8))]
    struct Control([u8; 128]);
    let mut control = Control([0; 128]);
    // SAFETY: msghdr is plain data; all-zero is a valid empty one.
    let mut h: libc::msghdr = unsafe { zeroed() };
    h.msg_name = (&mut addr as *mut libc::sockaddr_in6).cast();
    h.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a length.
    h.msg_controllen = unsafe { libc::CMSG_SPACE(HOPOPTS.len() as u32) } as _;
    // SAFETY: the control buffer is aligned and 128 bytes, more than
    // CMSG_SPACE(8); the first header and its 8 data bytes lie within it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = libc::IPPROTO_IPV6;
        (*c).cmsg_type = libc::IPV6_HOPOPTS;
        (*c).cmsg_len = libc::CMSG_LEN(HOPOPTS.len() as u32) as _;
        std::ptr::copy_nonoverlapping(HOPOPTS.as_ptr(), libc::CMSG_DATA(c), HOPOPTS.len());
    }
    // SAFETY: h points at live buffers of the lengths it states.
    if unsafe { libc::sendmsg(tx.as_raw_fd(), &h, 0) } < 0 {
        return Err(os("sendmsg with IPV6_HOPOPTS"));
    }
    let mut buf = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control([0; 128]);
    // SAFETY: as above.
    let mut h: libc::msghdr = unsafe { zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = control.0.as_mut_ptr().cast();
    h.msg_controllen = 128;
    // SAFETY: h points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut h, 0) };
    if n < 0 {
        return Err(os("recvmsg"));
    }
    let mut header = None;
    // SAFETY: the kernel filled msg_controllen bytes with cmsghdrs;
    // CMSG_FIRSTHDR/NXTHDR stay within them, each read within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&h);
        while !c.is_null() {
            if ((*c).cmsg_level, (*c).cmsg_type) == (libc::IPPROTO_IPV6, libc::IPV6_HOPOPTS) {
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                header = Some(std::slice::from_raw_parts(libc::CMSG_DATA(c), len).to_vec());
            }
            c = libc::CMSG_NXTHDR(&h, c);
        }
    }
    let header = header.ok_or("no IPV6_HOPOPTS message received")?;
    // A raw IPv6 socket delivers no IPv6 header (raw(7)): the payload.
    Ok((header, buf[..n as usize].to_vec()))
}

/// A 16-byte hop-by-hop header carried end to end: the experimental
/// options 0x1E and 0x3E (RFC 4727; top bits 00: skipped by a node that
/// does not know them) with 4 and 2 data bytes, then PadN (RFC 8200
/// section 4.2) with 2 zeros (Linux refuses more than 7 bytes of padding
/// in a row, `ip6_parse_tlv`). The kernel fills in the next header byte.
const CARRIED: [u8; 16] = [
    0, 1, 0x1e, 4, 0xde, 0xad, 0xbe, 0xef, 0x3e, 2, 0xca, 0xfe, 1, 2, 0, 0,
];

/// Receives one datagram on `fd` (IPV6_RECVHOPOPTS set, a receive timeout
/// set): its payload and the hop-by-hop header reported with it, if any;
/// None on timeout.
fn recv_with_hop_by_hop(fd: libc::c_int) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    use std::mem::zeroed;
    let mut buf = [0u8; 2048];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    #[repr(C, align(8))]
    struct Control([u8; 256]);
    let mut control = Control([0; 256]);
    // SAFETY: msghdr is plain data; all-zero is a valid empty one.
    let mut h: libc::msghdr = unsafe { zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = control.0.as_mut_ptr().cast();
    h.msg_controllen = 256;
    // SAFETY: h points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(fd, &mut h, 0) };
    if n < 0 {
        return None;
    }
    let mut header = None;
    // SAFETY: the kernel filled msg_controllen bytes with cmsghdrs;
    // CMSG_FIRSTHDR/NXTHDR stay within them, each read within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&h);
        while !c.is_null() {
            if ((*c).cmsg_level, (*c).cmsg_type) == (libc::IPPROTO_IPV6, libc::IPV6_HOPOPTS) {
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                header = Some(std::slice::from_raw_parts(libc::CMSG_DATA(c), len).to_vec());
            }
            c = libc::CMSG_NXTHDR(&h, c);
        }
    }
    Some((buf[..n as usize].to_vec(), header))
}

fn set_int(lab: &TunnelLab, fd: libc::c_int, level: libc::c_int, name: libc::c_int, what: &str) {
    let one: libc::c_int = 1;
    // SAFETY: the value is a live c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(lab, rc == 0, || {
        format!("{what}: {}", std::io::Error::last_os_error())
    });
}

/// A byte-checked TCP stream from a to b through the tunnel: b reads
/// `total` bytes of a known pattern and compares every one.
fn tcp_stream_checked(lab: &TunnelLab, port: u16, total: usize) {
    let pattern = |i: usize| (i.wrapping_mul(31) ^ (i >> 8)) as u8;
    let at = SocketAddr::new(lab.b_inner, port);
    let listener = lab
        .hosts
        .b
        .run(|| TcpListener::bind(at))
        .unwrap_or_else(|e| fail(lab, &format!("entering b: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("listener: {e}")));
    let reader = std::thread::spawn(move || -> Result<usize, String> {
        listener.set_nonblocking(false).map_err(|e| e.to_string())?;
        let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut got = 0usize;
        let mut buf = [0u8; 65536];
        while got < total {
            let n = conn
                .read(&mut buf)
                .map_err(|e| format!("read at {got}: {e}"))?;
            if n == 0 {
                break;
            }
            for (k, &b) in buf[..n].iter().enumerate() {
                if b != pattern(got + k) {
                    return Err(format!(
                        "byte {} is {b:#x}, sent {:#x}",
                        got + k,
                        pattern(got + k)
                    ));
                }
            }
            got += n;
        }
        Ok(got)
    });
    let mut conn = lab
        .hosts
        .a
        .run(|| TcpStream::connect_timeout(&at, Duration::from_secs(5)))
        .unwrap_or_else(|e| fail(lab, &format!("entering a: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("connect: {e}")));
    conn.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| fail(lab, &format!("write timeout: {e}")));
    let data: Vec<u8> = (0..total).map(pattern).collect();
    if let Err(e) = conn.write_all(&data) {
        fail(lab, &format!("write: {e}"));
    }
    drop(conn);
    match reader.join() {
        Ok(Ok(got)) => check(lab, got == total, || {
            format!("the TCP stream ended after {got} of {total} bytes")
        }),
        Ok(Err(e)) => fail(lab, &format!("TCP stream: {e}")),
        Err(_) => fail(lab, "the TCP reader panicked"),
    }
}

fn hop_by_hop_is_carried(test: &str, subnet: u8, encap: Encap) {
    let Some(lab) = lab(
        test,
        LabOptions {
            tag: "hbc".into(),
            subnet,
            ipv6: true,
            encap,
            inner_extra: "ipv6_hop_by_hop = \"carry\"".into(),
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
    // The path works: plain datagrams arrive (and neighbours are known).
    let plain = exchange(&lab, false);
    check(&lab, plain >= MIN_ARRIVED, || {
        format!("only {plain} of {COUNT} plain datagrams arrived")
    });
    let counted = |lab: &TunnelLab| {
        [
            drops(lab, Side::A, "outbound", "hop_by_hop"),
            drops(lab, Side::B, "inbound", "hop_by_hop"),
            drops(lab, Side::B, "inbound", "inner_checksum"),
            drops(lab, Side::B, "inbound", "icv_failure"),
        ]
    };
    let before = counted(&lab);

    let to = SocketAddr::new(lab.b_inner, PORT);
    let receiver = lab
        .hosts
        .b
        .run(|| UdpSocket::bind(to))
        .unwrap_or_else(|e| fail(&lab, &format!("entering b: {e}")))
        .unwrap_or_else(|e| fail(&lab, &format!("receiver: {e}")));
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap_or_else(|e| fail(&lab, &format!("receive timeout: {e}")));
    set_int(
        &lab,
        receiver.as_raw_fd(),
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVHOPOPTS,
        "IPV6_RECVHOPOPTS on the receiver",
    );
    let sender = lab
        .hosts
        .a
        .run(|| UdpSocket::bind(SocketAddr::new(lab.a_inner, 0)))
        .unwrap_or_else(|e| fail(&lab, &format!("entering a: {e}")))
        .unwrap_or_else(|e| fail(&lab, &format!("sender: {e}")));
    // SAFETY: the fd is the live socket `sender` owns; the option value
    // is a valid buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            sender.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_HOPOPTS,
            CARRIED.as_ptr().cast(),
            CARRIED.len() as libc::socklen_t,
        )
    };
    check(&lab, rc == 0, || {
        format!(
            "IPV6_HOPOPTS on the sender: {}",
            std::io::Error::last_os_error()
        )
    });
    // Distinct payloads of several sizes (odd ones too, for the checksum).
    let payload = |i: usize| -> Vec<u8> {
        (0..(100 + i * 37))
            .map(|k| (k as u8) ^ (i as u8).wrapping_mul(13))
            .collect()
    };
    let sent: Vec<Vec<u8>> = (0..COUNT).map(payload).collect();
    for (i, p) in sent.iter().enumerate() {
        if let Err(e) = sender.send_to(p, to) {
            fail(&lab, &format!("send {i}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while got < COUNT && Instant::now() < deadline {
        let Some((data, header)) = recv_with_hop_by_hop(receiver.as_raw_fd()) else {
            continue;
        };
        check(&lab, sent.contains(&data), || {
            format!(
                "a datagram of {} bytes arrived that was not sent",
                data.len()
            )
        });
        let header = header
            .unwrap_or_else(|| fail(&lab, "a datagram arrived without its hop-by-hop header"));
        // As sent, with UDP as the next header.
        check(&lab, header.first() == Some(&17), || {
            format!("{header:02x?}")
        });
        check(&lab, header.get(1..) == Some(&CARRIED[1..]), || {
            format!("hop-by-hop header {header:02x?}, sent {CARRIED:02x?}")
        });
        got += 1;
    }
    check(&lab, got >= MIN_ARRIVED, || {
        format!(
            "only {got} of {COUNT} datagrams with hop-by-hop options arrived; a: {}; b: {}",
            lab.status(Side::A)
                .map(|s| s["outbound"].to_string())
                .unwrap_or_default(),
            lab.status(Side::B)
                .map(|s| s["inbound"].to_string())
                .unwrap_or_default()
        )
    });

    // A burst of equal-sized ones, which the sender may send as UDP GSO
    // trains (one header for the train) and the receiver's kernel may
    // merge by GRO: each still arrives whole, with its header.
    const BURST: usize = 40;
    let burst: Vec<Vec<u8>> = (0..BURST)
        .map(|i| (0..1000).map(|k| (k as u8).wrapping_add(i as u8)).collect())
        .collect();
    for (i, p) in burst.iter().enumerate() {
        if let Err(e) = sender.send_to(p, to) {
            fail(&lab, &format!("burst send {i}: {e}"));
        }
    }
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while got < BURST && Instant::now() < deadline {
        let Some((data, header)) = recv_with_hop_by_hop(receiver.as_raw_fd()) else {
            continue;
        };
        check(&lab, burst.contains(&data), || {
            format!(
                "a burst datagram of {} bytes arrived that was not sent",
                data.len()
            )
        });
        check(
            &lab,
            header.as_deref().and_then(|h| h.get(1..)) == Some(&CARRIED[1..]),
            || format!("burst datagram with hop-by-hop header {header:02x?}"),
        );
        got += 1;
    }
    check(&lab, got >= BURST - 5, || {
        format!("only {got} of {BURST} burst datagrams arrived")
    });
    // A train with a header never switches GSO off for everything.
    let status = lab
        .status(Side::A)
        .unwrap_or_else(|e| fail(&lab, &format!("status of a: {e}")));
    check(
        &lab,
        encap != Encap::NATT || status["offloads"]["udp_gso"] == serde_json::json!(true),
        || format!("UDP GSO was switched off: {}", status["offloads"]),
    );

    // A TCP stream beside them, byte-checked.
    tcp_stream_checked(&lab, PORT + 1, 2 << 20);

    std::thread::sleep(Duration::from_millis(300));
    let after = counted(&lab);
    check(&lab, after == before, || {
        format!(
            "drops (a hop_by_hop, b hop_by_hop, b inner_checksum, b icv_failure) went from \
             {before:?} to {after:?}"
        )
    });
}

#[test]
fn hop_by_hop_is_carried_nat_t() {
    hop_by_hop_is_carried("hop_by_hop_is_carried_nat_t", 92, Encap::NATT);
}

#[test]
fn hop_by_hop_is_carried_raw_esp() {
    hop_by_hop_is_carried("hop_by_hop_is_carried_raw_esp", 93, Encap::RawEsp);
}

/// A peer that carries, a receiver that drops: the receiver's kernel
/// processes the outer packet's hop-by-hop header, esptun does not pass
/// it on (the datagram is delivered without it) and counts it as
/// `io.outer_hop_by_hop_not_carried`.
#[test]
fn an_outer_hop_by_hop_header_is_counted_in_drop_mode() {
    let Some(lab) = lab(
        "an_outer_hop_by_hop_header_is_counted_in_drop_mode",
        LabOptions {
            tag: "hbo".into(),
            subnet: 94,
            ipv6: true,
            encap: Encap::NATT,
            inner_extra: "ipv6_hop_by_hop = \"carry\"".into(),
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let b_config = std::fs::read_to_string(&lab.b.config)
        .unwrap_or_else(|e| fail(&lab, &format!("b's config: {e}")));
    let dropping = b_config.replace("ipv6_hop_by_hop = \"carry\"", "ipv6_hop_by_hop = \"drop\"");
    check(&lab, dropping != b_config, || {
        "no carry line in b's config".into()
    });
    if let Err(e) = lab.write_config_text(Side::B, &dropping) {
        fail(&lab, &format!("b's config: {e}"));
    }
    for side in [Side::A, Side::B] {
        if let Err(e) = lab.start(side, &[]) {
            fail(&lab, &format!("starting {side:?}: {e}"));
        }
    }
    let plain = exchange(&lab, false);
    check(&lab, plain >= MIN_ARRIVED, || {
        format!("only {plain} of {COUNT} plain datagrams arrived")
    });
    let counted = |lab: &TunnelLab| {
        let s = lab
            .status(Side::B)
            .unwrap_or_else(|e| fail(lab, &format!("status of b: {e}")));
        s["io"]["outer_hop_by_hop_not_carried"]
            .as_u64()
            .unwrap_or_else(|| fail(lab, &format!("no counter in {}", s["io"])))
    };
    let before = counted(&lab);
    check(&lab, before == 0, || {
        format!("{before} before any was sent")
    });

    let to = SocketAddr::new(lab.b_inner, PORT);
    let receiver = lab
        .hosts
        .b
        .run(|| UdpSocket::bind(to))
        .unwrap_or_else(|e| fail(&lab, &format!("entering b: {e}")))
        .unwrap_or_else(|e| fail(&lab, &format!("receiver: {e}")));
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap_or_else(|e| fail(&lab, &format!("receive timeout: {e}")));
    set_int(
        &lab,
        receiver.as_raw_fd(),
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVHOPOPTS,
        "IPV6_RECVHOPOPTS on the receiver",
    );
    let sender = lab
        .hosts
        .a
        .run(|| UdpSocket::bind(SocketAddr::new(lab.a_inner, 0)))
        .unwrap_or_else(|e| fail(&lab, &format!("entering a: {e}")))
        .unwrap_or_else(|e| fail(&lab, &format!("sender: {e}")));
    // SAFETY: the fd is the live socket `sender` owns; the option value
    // is a valid buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            sender.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_HOPOPTS,
            CARRIED.as_ptr().cast(),
            CARRIED.len() as libc::socklen_t,
        )
    };
    check(&lab, rc == 0, || {
        format!(
            "IPV6_HOPOPTS on the sender: {}",
            std::io::Error::last_os_error()
        )
    });
    for i in 0..COUNT {
        if let Err(e) = sender.send_to(&[i as u8; 200], to) {
            fail(&lab, &format!("send {i}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while got < COUNT && Instant::now() < deadline {
        let Some((data, header)) = recv_with_hop_by_hop(receiver.as_raw_fd()) else {
            continue;
        };
        check(&lab, data.len() == 200, || format!("{} bytes", data.len()));
        check(&lab, header.is_none(), || {
            format!("delivered with a hop-by-hop header in drop mode: {header:02x?}")
        });
        got += 1;
    }
    check(&lab, got >= MIN_ARRIVED, || {
        format!("only {got} of {COUNT} datagrams arrived")
    });
    std::thread::sleep(Duration::from_millis(300));
    let after = counted(&lab);
    check(&lab, after >= before + got as u64, || {
        format!("outer_hop_by_hop_not_carried went from {before} to {after}, {got} arrived")
    });
}
