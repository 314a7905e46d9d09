//! Path MTU handling of the outbound pipeline, in memory: packets too big
//! for the learned path MTU are refused (typed, counted, no sequence number
//! spent) or sent for the host to fragment, by the rules of RFC 1191 and
//! RFC 8200 section 5; MSS clamping keeps the checksum valid end to end.

mod common;

use std::net::{IpAddr, SocketAddr};

use esptun::crypto::select::{BootOptions, FailurePolicy, Mode, Selector};
use esptun::crypto::{IcvLen, Provider};
use esptun::datapath::inbound::{Encap as InEncap, Inbound};
use esptun::datapath::outbound::{Outbound, PathMtus};
use esptun::datapath::{DropReason, Verdict};
use esptun::packet::PacketBuf;
use esptun::sa::reservation::Fingerprint;
use esptun::sa::table::SaMeta;
use esptun::sa::{InboundSa, InnerAddrs, KeyMaterial, OutboundSa, SaKeys};
use esptun::wire::checksum::{self, combine, pseudo_header_v4, pseudo_header_v6, sum};
use esptun::wire::icmp::{self, MssClamp};
use esptun::wire::inner::InnerPolicy;
use esptun::wire::inner::build::{ipv4, ipv6};
use esptun::wire::ip::{Ipv4Packet, protocol};
use esptun::wire::outer::Encap;

const A4: [u8; 4] = [198, 18, 0, 1];
const B4: [u8; 4] = [198, 19, 0, 2];
const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SPI: u32 = 0x2001;

fn endpoint() -> SocketAddr {
    SocketAddr::from(([198, 19, 0, 2], 4500))
}

struct Link {
    selector: Selector,
    out: Outbound,
    inb: Inbound,
}

fn link(v6: bool, icv: IcvLen, encap: Encap) -> Link {
    let selector = Selector::boot(
        Provider::detect_all(),
        Mode::Auto,
        FailurePolicy::Fallback,
        BootOptions::default(),
    );
    let material = KeyMaterial::from_bytes(&(1..=20u8).collect::<Vec<_>>()).expect("material");
    let (a, b): (IpAddr, IpAddr) = if v6 {
        (A6.into(), B6.into())
    } else {
        (A4.into(), B4.into())
    };
    let meta = || SaMeta::active("b", endpoint(), Fingerprint::new(&material));
    let mut out = Outbound::new(InnerPolicy::default());
    out.path_mtu = PathMtus::new(encap);
    let keys = SaKeys::new(&selector, &material, icv).expect("keys");
    let id = out
        .add_sa(
            OutboundSa::new(SPI, keys, false, InnerAddrs::new(a, b).expect("addrs")).expect("sa"),
            meta(),
        )
        .expect("table");
    out.sa_mut(id).expect("sa").set_ceiling(u64::MAX);
    let mut inb = Inbound::new(InnerPolicy::default());
    let keys = SaKeys::new(&selector, &material, icv).expect("keys");
    inb.add_sa(
        InboundSa::new(SPI, keys, false, InnerAddrs::new(b, a).expect("addrs"), 64).expect("sa"),
        meta(),
    )
    .expect("table");
    Link { selector, out, inb }
}

fn buf(bytes: &[u8]) -> PacketBuf {
    let mut b = PacketBuf::new(65535);
    assert!(b.fill(bytes));
    b
}

impl Link {
    /// Seals one packet: the verdict, the ESP bytes, and the advertised
    /// MTU if it was refused as too big.
    fn seal(&mut self, plain: &[u8]) -> (Verdict, Vec<u8>, Option<u16>) {
        let mut batch = [buf(plain)];
        let mut verdicts = Vec::new();
        self.out.process(&self.selector, &mut batch, &mut verdicts);
        let mtu = self.out.too_big.first().map(|(i, mtu)| {
            assert_eq!(*i, 0);
            *mtu
        });
        (verdicts[0], batch[0].data().to_vec(), mtu)
    }

    fn open(&mut self, wire: &[u8]) -> (Verdict, Vec<u8>) {
        let mut batch = [buf(wire)];
        let mut verdicts = Vec::new();
        self.inb
            .process(&self.selector, InEncap::RawEsp, &mut batch, &mut verdicts);
        (verdicts[0], batch[0].data().to_vec())
    }

    fn seq(&self) -> u64 {
        self.out.sas.iter().next().expect("sa").sa.last_used()
    }
}

/// A UDP datagram of `total` bytes in all.
fn udp(v6: bool, total: usize, df: bool) -> Vec<u8> {
    let mut p = if v6 {
        ipv6(A6, B6, protocol::UDP, &vec![7u8; total - 48])
    } else {
        ipv4(A4, B4, protocol::UDP, &vec![7u8; total - 28])
    };
    if !v6 && !df {
        p[6] &= !0x40;
        Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
    }
    assert_eq!(p.len(), total);
    p
}

/// The outer header bytes the socket adds in front of the ESP bytes.
fn outer_headers(v6: bool, encap: Encap) -> usize {
    (if v6 { 40 } else { 20 }) + if encap.is_udp() { 8 } else { 0 }
}

#[test]
fn packets_too_big_for_the_path_are_refused_or_fragmented_by_the_rules() {
    for encap in [Encap::NATT, Encap::RawEsp] {
        for icv in [IcvLen::Icv8, IcvLen::Icv12, IcvLen::Icv16] {
            for v6 in [false, true] {
                let mut l = link(v6, icv, encap);
                // Nothing learned: anything goes, as before.
                let (v, _, mtu) = l.seal(&udp(v6, 1400, true));
                assert!(matches!(v, Verdict::Send { .. }) && mtu.is_none());
                l.out.path_mtu.set(endpoint().ip(), Some(1280));
                let usable = icmp::usable_inner_mtu(1280, encap, v6, icv.bytes()).expect("room");
                // The largest packet that fits is sent and fills the path.
                let (v, esp, _) = l.seal(&udp(v6, usize::from(usable), true));
                assert!(matches!(v, Verdict::Send { .. }), "{encap} {icv:?} v6={v6}");
                assert!(esp.len() + outer_headers(v6, encap) <= 1280);
                assert!(esp.len() + outer_headers(v6, encap) + 4 > 1280);
                // One byte more does not fit.
                let seq = l.seq();
                let too_big = udp(v6, usize::from(usable) + 1, true);
                let (v, _, mtu) = l.seal(&too_big);
                if v6 {
                    // Below 1280: the tunnel fragments (RFC 8200 section 5).
                    assert!(matches!(v, Verdict::Send { .. }), "{encap} {icv:?}");
                    let (v, _, mtu) = l.seal(&udp(v6, 1281, true));
                    assert_eq!(v, Verdict::Drop(DropReason::PacketTooBig));
                    assert_eq!(mtu, Some(1280), "never below 1280");
                } else {
                    assert_eq!(v, Verdict::Drop(DropReason::PacketTooBig));
                    assert_eq!(mtu, Some(usable));
                    assert_eq!(l.seq(), seq, "no sequence number spent");
                    // Without DF the host fragments it.
                    let (v, esp, mtu) = l.seal(&udp(v6, 1400, false));
                    assert!(matches!(v, Verdict::Send { .. }) && mtu.is_none());
                    assert!(esp.len() + outer_headers(v6, encap) > 1280);
                }
                assert!(l.out.counters.drops(DropReason::PacketTooBig) >= 1);
                // A bigger path lifts the limit.
                l.out.path_mtu.set(endpoint().ip(), Some(1500));
                let (v, _, _) = l.seal(&udp(v6, 1400, true));
                assert!(matches!(v, Verdict::Send { .. }));
            }
        }
    }
}

/// A datagram the local kernel fragmented and esptun reassembled goes
/// whole whatever the path MTU, IPv6 included: its sender already chose to
/// fragment, and a Packet Too Big would only make it cut smaller fragments
/// of a datagram that is reassembled to the same size again.
#[test]
fn a_reassembled_datagram_is_sealed_whole_over_a_smaller_path() {
    for v6 in [false, true] {
        let mut l = link(v6, IcvLen::Icv16, Encap::NATT);
        l.out.path_mtu.set(endpoint().ip(), Some(1280));
        let datagram = udp(v6, 9000, true);
        let (v, _, mtu) = l.seal(&datagram);
        assert_eq!(v, Verdict::Drop(DropReason::PacketTooBig), "v6={v6}");
        assert!(mtu.is_some());
        let mut batch = [buf(&datagram)];
        batch[0].meta.reassembled = true;
        let mut verdicts = Vec::new();
        l.out.process(&l.selector, &mut batch, &mut verdicts);
        assert!(
            matches!(verdicts[0], Verdict::Send { .. }),
            "v6={v6}: {verdicts:?}"
        );
        assert!(l.out.too_big.is_empty());
        let (v, opened) = l.open(batch[0].data());
        assert_eq!(v, Verdict::Deliver, "v6={v6}");
        assert_eq!(opened.len(), datagram.len());
        assert_eq!(
            opened[opened.len() - 8000..],
            datagram[datagram.len() - 8000..]
        );
    }
}

/// A TCP SYN with an MSS option of 1460 and a valid checksum.
fn syn(v6: bool) -> Vec<u8> {
    let mut p = if v6 {
        ipv6(A6, B6, protocol::TCP, &[2, 4, 0x05, 0xb4])
    } else {
        ipv4(A4, B4, protocol::TCP, &[2, 4, 0x05, 0xb4])
    };
    let start = if v6 { 40 } else { 20 };
    p[start + 12] = 0x60; // data offset 6: the option is a header option
    p[start + 13] = 0x02; // SYN
    p[start + 16..start + 18].copy_from_slice(&[0, 0]);
    let len = p.len() - start;
    let pseudo = if v6 {
        pseudo_header_v6(&A6, &B6, protocol::TCP, len as u32)
    } else {
        pseudo_header_v4(A4, B4, protocol::TCP, len as u16)
    };
    let value = checksum::finish(combine(pseudo, sum(&p[start..])));
    p[start + 16..start + 18].copy_from_slice(&value.to_be_bytes());
    p
}

#[test]
fn syns_are_clamped_to_the_path_and_arrive_with_valid_checksums() {
    for v6 in [false, true] {
        let start = if v6 { 40 } else { 20 };
        let mss = |p: &[u8]| u16::from_be_bytes([p[start + 22], p[start + 23]]);
        let mut l = link(v6, IcvLen::Icv16, Encap::NATT);
        // Off (the default): untouched.
        let (v, esp, _) = l.seal(&syn(v6));
        assert!(matches!(v, Verdict::Send { .. }));
        let (v, got) = l.open(&esp);
        assert_eq!(v, Verdict::Deliver);
        assert_eq!(mss(&got), 1460);
        // Auto with a 1280 path: NAT-T, ICV 16 -> inner MTU 1238; IPv6
        // never goes below 1280 (packets up to 1280 are carried).
        l.out.clamp_mss = MssClamp::Auto;
        l.out.tunnel_mtu = 1400;
        l.out.path_mtu.set(endpoint().ip(), Some(1280));
        let (v, esp, _) = l.seal(&syn(v6));
        assert!(matches!(v, Verdict::Send { .. }));
        let (v, got) = l.open(&esp);
        assert_eq!(v, Verdict::Deliver, "the clamped checksum verifies");
        assert_eq!(mss(&got), if v6 { 1280 - 60 } else { 1238 - 40 });
        // A number.
        l.out.clamp_mss = MssClamp::Fixed(1000);
        let (_, esp, _) = l.seal(&syn(v6));
        let (v, got) = l.open(&esp);
        assert_eq!((v, mss(&got)), (Verdict::Deliver, 1000));
        assert_eq!(
            l.out
                .counters
                .mss_clamped
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // The receiving side clamps SYNs from its peer too (for the
        // segments it will send back), before its usual inner check.
        l.inb.clamp_mss = MssClamp::Fixed(900);
        let (_, esp, _) = l.seal(&syn(v6));
        let (v, got) = l.open(&esp);
        assert_eq!((v, mss(&got)), (Verdict::Deliver, 900));
        assert_eq!(
            l.inb
                .counters
                .mss_clamped
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        l.inb.clamp_mss = MssClamp::Auto;
        l.inb.tunnel_mtu = 1400;
        l.inb.path_mtu = l.out.path_mtu.clone();
        l.out.clamp_mss = MssClamp::Off;
        let (_, esp, _) = l.seal(&syn(v6));
        let (v, got) = l.open(&esp);
        let auto = if v6 { 1280 - 60 } else { 1238 - 40 };
        assert_eq!((v, mss(&got)), (Verdict::Deliver, auto), "auto, inbound");
    }
}

// ---------------------------------------------------------------------
// End to end, as root: a — router — b, the router's link to b at MTU 1280.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use esptun::lab::demo::{LabOptions, Side, TunnelLab};

const MIB: u64 = 1 << 20;
/// Long enough that the path MTU is learned while it runs (the daemon
/// looks twice a second), so that its segments meet esptun's answers.
const STREAM: u64 = 48 * MIB;

fn routed_lab(
    test: &str,
    tag: &str,
    subnet: u8,
    (ipv6, encap): (bool, Encap),
    clamp: &str,
) -> Option<TunnelLab> {
    common::lab(
        test,
        LabOptions {
            tag: tag.into(),
            subnet,
            ipv6,
            encap,
            router_mtu: Some(1280),
            inner_extra: format!("clamp_mss = \"{clamp}\""),
            ..LabOptions::default()
        },
    )
}

fn start_both(lab: &TunnelLab) {
    for side in [Side::A, Side::B] {
        if let Err(e) = lab.start(side, &[]) {
            common::fail(lab, &format!("starting {}: {e}", side.name()));
        }
    }
}

/// `side`'s status once `ready` holds for it (the daemon publishes its
/// counters every 200 ms), or the last one after 5 s.
fn status_when(
    lab: &TunnelLab,
    side: Side,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = lab
            .status(side)
            .unwrap_or_else(|e| common::fail(lab, &format!("status: {e}")));
        if ready(&status) || Instant::now() >= deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn counter(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_u64()
        .unwrap_or_default()
}

/// A byte-checked TCP stream through the 1280 path, then a DF datagram too
/// big for it, which must be answered with the right MTU, then large UDP
/// datagrams both ways, byte by byte.
fn through_a_1280_router(
    test: &str,
    tag: &str,
    subnet: u8,
    (ipv6, encap): (bool, Encap),
    clamp: &str,
) {
    let Some(lab) = routed_lab(test, tag, subnet, (ipv6, encap), clamp) else {
        return;
    };
    start_both(&lab);
    let tcp = lab
        .tcp_zeros(STREAM, Duration::from_secs(300))
        .unwrap_or_else(|e| common::fail(&lab, &format!("tcp: {e}")));
    common::check(
        &lab,
        tcp.interrupted.is_none()
            && tcp.bytes_received == STREAM
            && tcp.bytes_sent == STREAM
            && tcp.nonzero_bytes == 0,
        || format!("the stream did not get through whole: {tcp:?}"),
    );
    let status = status_when(&lab, Side::A, |s| {
        clamp != "off" || counter(s, &["outbound", "too_big_sent"]) > 0
    });
    let drops = counter(&status, &["outbound", "drops", "packet_too_big"]);
    let sent = counter(&status, &["outbound", "too_big_sent"]);
    if clamp == "off" {
        // The stream's first full-size segments met the small path; the
        // sender learned from esptun's answers.
        common::check(&lab, drops > 0 && sent > 0, || {
            format!("no packet too big counted: drops {drops}, sent {sent}: {status}")
        });
    } else {
        // b, whose own link is the 1280 one, clamped its SYN-ACK: a's
        // sender never needed a Packet Too Big.
        let b = status_when(&lab, Side::B, |s| {
            counter(s, &["outbound", "mss_clamped"]) > 0
        });
        common::check(&lab, counter(&b, &["outbound", "mss_clamped"]) > 0, || {
            format!("b clamped no SYN: {b}")
        });
    }

    // A DF datagram too big for the path: the sender's socket learns the
    // inner MTU esptun advertises (IPv6: never below 1280).
    let usable = icmp::usable_inner_mtu(1280, encap, ipv6, 16).expect("room");
    let want = if ipv6 { usable.max(1280) } else { usable };
    // The path as a learned it: from the stream (clamping off), or from
    // the datagram below (clamped streams never met the small link).
    let shows_path = |lab: &TunnelLab| {
        let status = status_when(lab, Side::A, |s| {
            s["outbound_sas"][0]["path_mtu"].as_u64() == Some(1280)
        });
        let sa = &status["outbound_sas"][0];
        common::check(
            lab,
            sa["path_mtu"].as_u64() == Some(1280)
                && sa["inner_mtu"].as_u64() == Some(usable.into()),
            || format!("a shows no learned 1280 path MTU: {sa}"),
        );
        counter(&status, &["outbound", "too_big_sent"])
    };
    let sent = if clamp == "off" {
        shows_path(&lab)
    } else {
        sent
    };
    let to = SocketAddr::new(lab.b_inner, 5003);
    let answer = lab
        .hosts
        .a
        .run(move || df_datagram_answer(to, 1400, Duration::from_secs(10)))
        .unwrap_or_else(|e| common::fail(&lab, &format!("{e}")));
    // RFC 1191: type 3 code 4; RFC 4443: type 2 code 0.
    let expected = if ipv6 {
        (2, 0, u32::from(want))
    } else {
        (3, 4, u32::from(want))
    };
    common::check(&lab, answer == Some(expected), || {
        format!("the DF sender got {answer:?}, not {expected:?}")
    });
    if clamp != "off" {
        shows_path(&lab);
    }
    let after = status_when(&lab, Side::A, |s| {
        counter(s, &["outbound", "too_big_sent"]) > sent
    });
    common::check(
        &lab,
        counter(&after, &["outbound", "too_big_sent"]) > sent,
        || format!("the datagram was not answered: {after}"),
    );

    // UDP datagrams larger than the tunnel MTU, both ways through the 1280
    // link: fragmented by the sending kernel, reassembled by esptun, sealed
    // whole and fragmented again as outer packets on the small path.
    for size in [2_000, 9_000, 65_000] {
        let udp = lab
            .udp_exchange(5, size)
            .unwrap_or_else(|e| common::fail(&lab, &format!("udp {size}: {e}")));
        common::check(&lab, udp.is_clean(5), || {
            format!("{size}-byte datagrams through the 1280 path: {udp:?}")
        });
    }
}

/// Sends DF datagrams of `payload` bytes to `to` from a socket set to
/// `IP_PMTUDISC_PROBE` (DF, whatever MTU the kernel learned, so each one
/// reaches esptun) with `IP_RECVERR`, until an ICMP error arrives on its
/// error queue, or `timeout`: that error's (type, code, MTU).
fn df_datagram_answer(to: SocketAddr, payload: usize, timeout: Duration) -> Option<(u8, u8, u32)> {
    let any: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().ok()?
    } else {
        "0.0.0.0:0".parse().ok()?
    };
    let sock = std::net::UdpSocket::bind(any).ok()?;
    let (level, options) = if to.is_ipv6() {
        (
            libc::IPPROTO_IPV6,
            [
                (libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_PROBE),
                (libc::IPV6_RECVERR, 1),
            ],
        )
    } else {
        (
            libc::IPPROTO_IP,
            [
                (libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE),
                (libc::IP_RECVERR, 1),
            ],
        )
    };
    for (name, value) in options {
        // SAFETY: a live int and its size; setsockopt(2) only reads it.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt {name}");
    }
    sock.connect(to).ok()?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // With IP_RECVERR a queued error fails the next send once: fine.
        let _ = sock.send(&vec![0x5a; payload]);
        std::thread::sleep(Duration::from_millis(200));
        if let Some(found) = read_icmp_error(&sock) {
            return Some(found);
        }
    }
    None
}

/// Drains the error queue (MSG_ERRQUEUE): the first ICMP Fragmentation
/// Needed / Packet Too Big's (type, code, ee_info), ee_info being the MTU
/// (ip(7), ipv6(7)).
fn read_icmp_error(sock: &std::net::UdpSocket) -> Option<(u8, u8, u32)> {
    let mut found = None;
    for _ in 0..16 {
        let mut data = [0u8; 2048];
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain old data; all-zero is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: the iovec and control buffer are live locals of the
        // stated lengths; recvmsg(2) writes within them.
        let rc = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            break;
        }
        // SAFETY: walking the control messages recvmsg(2) just wrote,
        // with the libc macros, within msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR.
            let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
            let ours = (level == libc::IPPROTO_IP && kind == libc::IP_RECVERR)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_RECVERR);
            if ours && found.is_none() {
                // SAFETY: for these types the data is a sock_extended_err
                // (ip(7)); read unaligned from the kernel's bytes.
                let ee: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                // Only "too big": a datagram that got through whole (the
                // host fragmented it before esptun knew the path) comes
                // back from b as port unreachable, which is skipped.
                let too_big = (ee.ee_origin == libc::SO_EE_ORIGIN_ICMP
                    && (ee.ee_type, ee.ee_code) == (3, 4))
                    || (ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6
                        && (ee.ee_type, ee.ee_code) == (2, 0));
                if too_big {
                    found = Some((ee.ee_type, ee.ee_code, ee.ee_info));
                }
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
    found
}

#[test]
fn tcp_through_a_1280_router_learns_from_packet_too_big_ipv4() {
    through_a_1280_router(
        "tcp_through_a_1280_router_learns_from_packet_too_big_ipv4",
        "pmtu4",
        70,
        (false, Encap::NATT),
        "off",
    );
}

#[test]
fn tcp_through_a_1280_router_learns_from_packet_too_big_ipv6() {
    through_a_1280_router(
        "tcp_through_a_1280_router_learns_from_packet_too_big_ipv6",
        "pmtu6",
        71,
        (true, Encap::NATT),
        "off",
    );
}

#[test]
fn tcp_through_a_1280_router_with_mss_clamping() {
    through_a_1280_router(
        "tcp_through_a_1280_router_with_mss_clamping",
        "pmtuc",
        72,
        (false, Encap::NATT),
        "auto",
    );
}

#[test]
fn raw_esp_through_a_1280_router_learns_from_packet_too_big_ipv4() {
    through_a_1280_router(
        "raw_esp_through_a_1280_router_learns_from_packet_too_big_ipv4",
        "pmtue4",
        73,
        (false, Encap::RawEsp),
        "off",
    );
}

#[test]
fn raw_esp_through_a_1280_router_learns_from_packet_too_big_ipv6() {
    through_a_1280_router(
        "raw_esp_through_a_1280_router_learns_from_packet_too_big_ipv6",
        "pmtue6",
        74,
        (true, Encap::RawEsp),
        "off",
    );
}
