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
        self.inb.process(
            &self.selector,
            InEncap::RawEsp,
            &mut batch,
            &mut verdicts,
        );
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
    }
}
