//! The ESP pipelines end to end, in memory: outbound on one host, inbound
//! on the other, every protocol, both IP versions, all ICV sizes, ESN, and
//! every way a packet can be refused; interop with scapy's independent
//! ESP implementation; random mutations and garbage.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use common::TestRng;
use esptun::crypto::select::{BootOptions, FailurePolicy, Mode, Selector};
use esptun::crypto::{IcvLen, Provider};
use esptun::datapath::inbound::{Encap, Inbound};
use esptun::datapath::outbound::Outbound;
use esptun::datapath::{Counters, DropReason, Verdict};
use esptun::packet::PacketBuf;
use esptun::sa::replay::ReplayWindow;
use esptun::sa::reservation::Fingerprint;
use esptun::sa::table::{SaId, SaMeta};
use esptun::sa::{InboundSa, InnerAddrs, KeyMaterial, OutboundSa, SaKeys};
use esptun::wire::esp;
use esptun::wire::inner::InnerPolicy;
use esptun::wire::inner::build::{ipv4, ipv6};
use esptun::wire::ip::protocol;
use esptun::wire::outer::{self, NATT_PORT, Outer, OuterError, UdpPorts};

const A4: [u8; 4] = [198, 18, 0, 1];
const B4: [u8; 4] = [198, 19, 0, 2];
const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SPI: u32 = 0x0000_1001;

fn selector() -> Selector {
    Selector::boot(
        Provider::detect_all(),
        Mode::Auto,
        FailurePolicy::Fallback,
        BootOptions::default(),
    )
}

struct Link {
    selector: Selector,
    out: Outbound,
    inb: Inbound,
    /// Host A's outbound SA and host B's inbound SA.
    out_sa: SaId,
    in_sa: SaId,
}

/// Where host A sends host B's packets.
const ENDPOINT: ([u8; 4], u16) = ([198, 19, 0, 2], 4500);

fn endpoint() -> SocketAddr {
    SocketAddr::from(ENDPOINT)
}

/// Metadata of an SA in use on the key `material`.
fn meta(material: &KeyMaterial) -> SaMeta {
    SaMeta::active("b", endpoint(), Fingerprint::new(material))
}

/// What a sealed packet's verdict is: sent by the first (and only) SA of
/// the pipeline, which `add_sa` names 1. Where it goes is in the packet's
/// metadata ([`Link::seal`] checks it).
fn sent() -> Verdict {
    Verdict::Send { sa: SaId(1) }
}

struct LinkSpec {
    v6: bool,
    key_len: usize,
    icv: IcvLen,
    esn: bool,
    window: u32,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            v6: false,
            key_len: 16,
            icv: IcvLen::Icv16,
            esn: false,
            window: 64,
        }
    }
}

/// Host A's outbound SA and host B's matching inbound SA.
fn link_with(selector: Selector, spec: LinkSpec) -> Link {
    let material = KeyMaterial::from_bytes(&(1..=spec.key_len as u8 + 4).collect::<Vec<_>>())
        .expect("material");
    let (a, b): (IpAddr, IpAddr) = if spec.v6 {
        (A6.into(), B6.into())
    } else {
        (A4.into(), B4.into())
    };
    let mut out = Outbound::new(InnerPolicy::default());
    let keys = SaKeys::new(&selector, &material, spec.icv).expect("keys");
    let out_sa = out
        .add_sa(
            OutboundSa::new(SPI, keys, spec.esn, InnerAddrs::new(a, b).expect("addrs"))
                .expect("sa"),
            meta(&material),
        )
        .expect("table");
    // Keys made for this test never outlive it: grant every number.
    out.sa_mut(out_sa).expect("sa").set_ceiling(u64::MAX);
    let mut inb = Inbound::new(InnerPolicy::default());
    let keys = SaKeys::new(&selector, &material, spec.icv).expect("keys");
    let in_sa = inb
        .add_sa(
            InboundSa::new(
                SPI,
                keys,
                spec.esn,
                InnerAddrs::new(b, a).expect("addrs"),
                spec.window,
            )
            .expect("sa"),
            meta(&material),
        )
        .expect("table");
    Link {
        selector,
        out,
        inb,
        out_sa,
        in_sa,
    }
}

fn link(spec: LinkSpec) -> Link {
    link_with(selector(), spec)
}

fn packet(v6: bool, proto: u8, payload: &[u8]) -> Vec<u8> {
    if v6 {
        ipv6(A6, B6, proto, payload)
    } else {
        ipv4(A4, B4, proto, payload)
    }
}

fn buf(bytes: &[u8]) -> PacketBuf {
    let mut b = PacketBuf::new(65535);
    assert!(b.fill(bytes));
    b
}

impl Link {
    fn seal(&mut self, plain: &[u8]) -> (Verdict, Vec<u8>) {
        let mut batch = [buf(plain)];
        let mut verdicts = Vec::new();
        self.out.process(&self.selector, &mut batch, &mut verdicts);
        if let Verdict::Send { sa } = verdicts[0] {
            assert_eq!(sa, self.out_sa);
            assert_eq!(
                batch[0].meta.peer,
                Some(endpoint()),
                "goes to the SA's endpoint"
            );
        }
        (verdicts[0], batch[0].data().to_vec())
    }

    fn open(&mut self, encap: Encap, wire: &[u8]) -> (Verdict, Vec<u8>) {
        let mut batch = [buf(wire)];
        let mut verdicts = Vec::new();
        self.inb
            .process(&self.selector, encap, &mut batch, &mut verdicts);
        (verdicts[0], batch[0].data().to_vec())
    }
}

/// The delivered packet carries the sent transport segment, protocol and
/// addresses (the IP header itself is rebuilt: TTL, ID, TOS are new).
fn assert_same_inner(sent: &[u8], got: &[u8]) {
    let h = if sent[0] >> 4 == 4 { 20 } else { 40 };
    assert_eq!(got.len(), sent.len());
    assert_eq!(got[h..], sent[h..], "transport segment");
    if h == 20 {
        assert_eq!(got[9], sent[9], "protocol");
        assert_eq!(got[12..20], sent[12..20], "addresses");
    } else {
        assert_eq!(got[6], sent[6], "next header");
        assert_eq!(got[8..40], sent[8..40], "addresses");
    }
}

#[test]
fn round_trip_every_protocol_version_icv_key_size_and_esn() {
    for v6 in [false, true] {
        for (key_len, icv, esn) in [
            (16, IcvLen::Icv16, false),
            (32, IcvLen::Icv16, true),
            (16, IcvLen::Icv12, true),
            (32, IcvLen::Icv8, false),
        ] {
            let mut l = link(LinkSpec {
                v6,
                key_len,
                icv,
                esn,
                ..LinkSpec::default()
            });
            let icmp = if v6 { protocol::ICMPV6 } else { protocol::ICMP };
            for proto in [protocol::TCP, protocol::UDP, protocol::UDPLITE, icmp] {
                for len in [0usize, 1, 2, 3, 100, 1400, 9000] {
                    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                    let plain = packet(v6, proto, &payload);
                    let (v, wire) = l.seal(&plain);
                    assert_eq!(v, sent());
                    assert_eq!(wire[..4], SPI.to_be_bytes());
                    assert_eq!(
                        (wire.len() - 16 - icv.bytes()) % 4,
                        0,
                        "RFC 4303 2.4 alignment"
                    );
                    let encap = if len % 2 == 0 {
                        Encap::NATT
                    } else {
                        Encap::RawEsp
                    };
                    let (v, got) = l.open(encap, &wire);
                    assert_eq!(
                        v,
                        Verdict::Deliver,
                        "v6 {v6} proto {proto} len {len} icv {icv:?}"
                    );
                    assert_same_inner(&plain, &got);
                }
            }
            assert_eq!(
                l.out.counters.total_drops() + l.inb.counters.total_drops(),
                0
            );
        }
    }
}

#[test]
fn a_flipped_ciphertext_bit_fails_the_icv_and_leaves_the_window_alone() {
    let mut l = link(LinkSpec::default());
    let (_, mut wire) = l.seal(&packet(false, protocol::UDP, b"hello"));
    let good = wire.clone();
    wire[20] ^= 0x01;
    assert_eq!(
        l.open(Encap::RawEsp, &wire).0,
        Verdict::Drop(DropReason::IcvFailure)
    );
    // The forgery did not consume the sequence number.
    assert_eq!(l.open(Encap::RawEsp, &good).0, Verdict::Deliver);
    assert_eq!(l.inb.counters.drops(DropReason::IcvFailure), 1);
    let per_sa = &l
        .inb
        .sas
        .get(l.in_sa)
        .expect("the SA's drop counts")
        .counters;
    assert_eq!(
        per_sa[DropReason::IcvFailure.index()],
        1,
        "counted on its SA"
    );
    assert_eq!(per_sa.iter().sum::<u64>(), 1);
    assert_eq!(l.inb.sas.get(l.in_sa).expect("sa").sa.stats.packets, 1);
}

#[test]
fn replays_and_packets_older_than_the_window_are_refused() {
    let mut l = link(LinkSpec {
        window: 32,
        ..LinkSpec::default()
    });
    let plain = packet(false, protocol::UDP, b"x");
    let sealed: Vec<Vec<u8>> = (0..40).map(|_| l.seal(&plain).1).collect();
    // Out of order inside the window, then the duplicate, then too old.
    for i in [1usize, 0, 39, 20, 10] {
        assert_eq!(
            l.open(Encap::RawEsp, &sealed[i]).0,
            Verdict::Deliver,
            "packet {i}"
        );
    }
    assert_eq!(
        l.open(Encap::RawEsp, &sealed[20]).0,
        Verdict::Drop(DropReason::Replay)
    );
    assert_eq!(
        l.open(Encap::RawEsp, &sealed[5]).0,
        Verdict::Drop(DropReason::TooOld)
    );
}

#[test]
fn esn_traffic_crosses_the_2_32_boundary() {
    let mut l = link(LinkSpec {
        esn: true,
        ..LinkSpec::default()
    });
    // An SA that has been running for 2^32 packets on both sides.
    let start = (1u64 << 32) - 3;
    l.out.sa_mut(l.out_sa).expect("sa").resume_after(start - 1);
    l.inb
        .sa_mut(l.in_sa)
        .expect("sa")
        .replay
        .update(start - 1)
        .expect("window");
    let plain = packet(false, protocol::TCP, &[0u8; 64]);
    for i in 0..8 {
        let (v, wire) = l.seal(&plain);
        assert_eq!(v, sent());
        let (v, got) = l.open(Encap::NATT, &wire);
        assert_eq!(v, Verdict::Deliver, "packet {i} across 2^32");
        assert_same_inner(&plain, &got);
    }
    assert_eq!(
        l.inb.sas.get(l.in_sa).expect("sa").sa.replay.top(),
        (1u64 << 32) + 4
    );
    // Without ESN the same sender would have had to stop at 2^32 - 1.
    let mut short = link(LinkSpec::default());
    let id = short.out_sa;
    short
        .out
        .sa_mut(id)
        .expect("sa")
        .resume_after(u64::from(u32::MAX) - 1);
    assert_eq!(short.seal(&plain).0, sent());
    assert_eq!(
        short.seal(&plain).0,
        Verdict::Drop(DropReason::SequenceExhausted)
    );
}

fn snapshot(c: &Counters) -> Vec<u64> {
    DropReason::ALL.iter().map(|&r| c.drops(r)).collect()
}

/// Exactly `reason`'s counter moved, by exactly one.
fn assert_one_drop(before: &[u64], c: &Counters, reason: DropReason) {
    for (&r, &was) in DropReason::ALL.iter().zip(before) {
        let moved = c.drops(r) - was;
        assert_eq!(
            moved,
            u64::from(r == reason),
            "{r:?} moved by {moved} for a {reason:?} drop"
        );
    }
}

#[test]
fn outbound_refusals_are_typed_and_counted_once() {
    let mut l = link(LinkSpec::default());
    let good = packet(false, protocol::UDP, b"ok");
    let mut bad_sum = good.clone();
    let last = bad_sum.len() - 1;
    bad_sum[last] ^= 1;
    let wrong_src = ipv4([198, 18, 9, 9], B4, protocol::UDP, b"x");
    let no_sa = ipv4(A4, [198, 19, 9, 9], protocol::UDP, b"x");
    let gre = ipv4(A4, B4, 47, b"x");
    let mut frag = good.clone();
    frag[6] = 0x20;
    let cases = [
        (bad_sum, DropReason::InnerChecksum),
        (wrong_src, DropReason::SourceMismatch),
        (no_sa, DropReason::NoSa),
        (gre, DropReason::UnverifiableProtocol),
        (frag, DropReason::Fragment),
        (vec![0x45, 0, 0], DropReason::InnerHeader),
        (vec![], DropReason::InnerHeader),
    ];
    let mut batch: Vec<PacketBuf> = cases.iter().map(|(p, _)| buf(p)).collect();
    batch.push(buf(&good));
    let mut verdicts = Vec::new();
    l.out.process(&l.selector, &mut batch, &mut verdicts);
    assert_eq!(verdicts.len(), cases.len() + 1);
    for ((_, reason), v) in cases.iter().zip(&verdicts) {
        assert_eq!(*v, Verdict::Drop(*reason));
    }
    assert_eq!(verdicts[cases.len()], sent());
    assert_eq!(l.out.counters.total_drops(), cases.len() as u64);
    assert_eq!(l.out.counters.drops(DropReason::InnerHeader), 2);
    // One by one: each refusal moves its own counter by one and no other.
    for (bytes, reason) in &cases {
        let before = snapshot(&l.out.counters);
        assert_eq!(l.seal(bytes).0, Verdict::Drop(*reason));
        assert_one_drop(&before, &l.out.counters, *reason);
    }

    l.out.sa_mut(l.out_sa).expect("sa").set_ceiling(1);
    assert_eq!(
        l.seal(&good).0,
        Verdict::Drop(DropReason::SequenceReservation)
    );
}

#[test]
fn inbound_refusals_are_typed_and_counted_once() {
    let mut l = link(LinkSpec::default());
    let (_, wire) = l.seal(&packet(false, protocol::UDP, b"ok"));
    let mut unknown = wire.clone();
    unknown[3] ^= 0x40;
    let cases: Vec<(Encap, Vec<u8>, DropReason)> = vec![
        (Encap::NATT, vec![0xFF], DropReason::Keepalive),
        (Encap::NATT, vec![0, 0, 0, 0, 1, 2, 3], DropReason::Ike),
        (
            Encap::RawEsp,
            vec![0, 0, 0, 0, 1, 2, 3, 4],
            DropReason::UnknownSpi,
        ),
        (Encap::RawEsp, vec![0xFF], DropReason::Truncated),
        (Encap::RawEsp, unknown, DropReason::UnknownSpi),
        (Encap::RawEsp, wire[..30].to_vec(), DropReason::Truncated),
    ];
    for (encap, bytes, reason) in &cases {
        let before = snapshot(&l.inb.counters);
        assert_eq!(
            l.open(*encap, bytes).0,
            Verdict::Drop(*reason),
            "{reason:?}"
        );
        assert_one_drop(&before, &l.inb.counters, *reason);
    }
    assert_eq!(l.inb.counters.total_drops(), cases.len() as u64);
    assert_eq!(l.open(Encap::NATT, &wire).0, Verdict::Deliver);
}

#[test]
fn a_provider_switch_mid_stream_needs_no_rekey() {
    let mut l = link(LinkSpec::default());
    let plain = packet(false, protocol::TCP, &[0u8; 1000]);
    use esptun::crypto::ProviderId;
    if l.selector.active() != Some(ProviderId::Hardware) {
        common::skip_or_fail_without_aesni("a_provider_switch_mid_stream_needs_no_rekey");
        return;
    }
    let (_, before) = l.seal(&plain);
    l.selector
        .fail(ProviderId::Hardware, "test: pretend it failed".into());
    assert_eq!(l.selector.active(), Some(ProviderId::Soft));
    let (v, after) = l.seal(&plain);
    assert_eq!(v, sent());
    // Sealed by hardware, opened by soft: the SA needed no new keys.
    for wire in [before, after] {
        assert_eq!(l.open(Encap::NATT, &wire).0, Verdict::Deliver);
    }
}

/// One `[name]` section of a key = value vector file.
fn sections(file: &str) -> Vec<HashMap<String, String>> {
    let path = format!("{}/vectors/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out: Vec<HashMap<String, String>> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push(HashMap::from([("name".to_string(), name.to_string())]));
        } else if let (Some(section), Some((k, v))) = (out.last_mut(), line.split_once('=')) {
            section.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

/// A vector case's `key` and `salt` as RFC 4106 key material.
fn material(case: &HashMap<String, String>) -> KeyMaterial {
    let mut bytes = hex(&case["key"]);
    bytes.extend(hex(&case["salt"]));
    KeyMaterial::from_bytes(&bytes).expect("material")
}

fn hex(s: &str) -> Vec<u8> {
    esptun::hex::decode(s).expect("hex")
}

#[test]
fn interop_with_scapy_both_directions_byte_for_byte() {
    let cases = sections("esp_transport_scapy.txt");
    assert!(cases.len() >= 4, "{} cases", cases.len());
    let selector = selector();
    for case in &cases {
        let name = &case["name"];
        let material = material(case);
        let spi = u32::from_str_radix(&case["spi"], 16).expect("spi");
        let seq: u64 = case["seq"].parse().expect("seq");
        let inner = hex(&case["inner_packet"]);
        let wire = hex(&case["wire_packet"]);
        let v6 = wire[0] >> 4 == 6;
        let outer_len = if v6 {
            40
        } else {
            usize::from(wire[0] & 0x0F) * 4
        };
        let esp_start = outer_len + if case["encap"] == "udp" { 8 } else { 0 };
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (
                <[u8; 16]>::try_from(&wire[8..24]).expect("16").into(),
                <[u8; 16]>::try_from(&wire[24..40]).expect("16").into(),
            )
        } else {
            (
                <[u8; 4]>::try_from(&wire[12..16]).expect("4").into(),
                <[u8; 4]>::try_from(&wire[16..20]).expect("4").into(),
            )
        };

        // scapy -> esptun: deliver, and the segment is scapy's plaintext.
        let keys = SaKeys::new(&selector, &material, IcvLen::Icv16).expect("keys");
        let mut inb = Inbound::new(InnerPolicy::default());
        inb.add_sa(
            InboundSa::new(
                spi,
                keys,
                false,
                InnerAddrs::new(dst, src).expect("addrs"),
                64,
            )
            .expect("sa"),
            meta(&material),
        )
        .expect("table");
        let mut batch = [buf(&wire[esp_start..])];
        let mut verdicts = Vec::new();
        let encap = if case["encap"] == "udp" {
            Encap::NATT
        } else {
            Encap::RawEsp
        };
        inb.process(&selector, encap, &mut batch, &mut verdicts);
        assert_eq!(verdicts[0], Verdict::Deliver, "{name}");
        assert_same_inner(&inner, batch[0].data());

        // esptun -> scapy: the same inner packet at the same sequence
        // number seals to exactly scapy's ESP bytes.
        let keys = SaKeys::new(&selector, &material, IcvLen::Icv16).expect("keys");
        let mut out = Outbound::new(InnerPolicy::default());
        let id = out
            .add_sa(
                OutboundSa::new(spi, keys, false, InnerAddrs::new(src, dst).expect("addrs"))
                    .expect("sa"),
                meta(&material),
            )
            .expect("table");
        // Keys made for this test never outlive it: grant every number.
        out.sa_mut(id).expect("sa").set_ceiling(u64::MAX);
        out.sa_mut(id).expect("sa").resume_after(seq - 1);
        let mut batch = [buf(&inner)];
        out.process(&selector, &mut batch, &mut verdicts);
        assert_eq!(verdicts[0], sent(), "{name}");
        assert_eq!(
            batch[0].data(),
            &wire[esp_start..],
            "{name}: esptun's ESP differs from scapy's"
        );

        // The whole wire packet: esptun's outer framing carries the same
        // addresses, encapsulation and payload as scapy's.
        let udp = (case["encap"] == "udp").then_some(UdpPorts {
            src: NATT_PORT,
            dst: NATT_PORT,
        });
        let frame = Outer { src, dst, udp };
        assert!(batch[0].prepend(frame.header_len()));
        outer::emit(batch[0].data_mut(), &frame).expect("frame");
        let ours = outer::parse(batch[0].data()).expect("our framing parses");
        assert_eq!(ours.outer, frame, "{name}");
        assert_eq!(
            &batch[0].data()[ours.payload.clone()],
            &wire[esp_start..],
            "{name}"
        );
        match outer::parse(&wire) {
            Ok(theirs) => {
                assert_eq!(theirs.outer, frame, "{name}");
                assert_eq!(batch[0].data().len(), wire.len(), "{name}");
            }
            // scapy writes UDP checksum 0 over IPv6 too, which RFC 8200
            // forbids; esptun computes it.
            Err(OuterError::ZeroUdpChecksumV6) => assert!(v6 && case["encap"] == "udp", "{name}"),
            Err(e) => panic!("{name}: scapy's packet does not parse: {e}"),
        }
    }
}

#[test]
fn random_mutations_never_panic_and_never_deliver_other_bytes() {
    let mut rng = TestRng::from_env("random_mutations_never_panic_and_never_deliver_other_bytes");
    let mut l = link(LinkSpec {
        window: 4096,
        ..LinkSpec::default()
    });
    let plain = packet(false, protocol::TCP, &[0u8; 200]);
    let mut delivered = 0;
    for round in 0..3000 {
        let (_, mut wire) = l.seal(&plain);
        let original = wire.clone();
        match rng.below(4) {
            0 => {
                let at = rng.below(wire.len());
                wire[at] ^= 1 << rng.below(8);
            }
            1 => wire.truncate(rng.below(wire.len())),
            2 => {
                let n = rng.below(32) + 1;
                let extra = rng.bytes(n);
                wire.extend(extra);
            }
            _ => {
                let at = rng.below(wire.len());
                let n = rng.below(wire.len() - at) + 1;
                let junk = rng.bytes(n);
                wire[at..at + n].copy_from_slice(&junk);
            }
        }
        let encap = if round % 2 == 0 {
            Encap::NATT
        } else {
            Encap::RawEsp
        };
        let (v, got) = l.open(encap, &wire);
        if v == Verdict::Deliver {
            // Only an unchanged packet may get through.
            assert_eq!(
                wire, original,
                "round {round}: a mutated packet was delivered"
            );
            assert_same_inner(&plain, &got);
        } else {
            // The forgery left no trace: the real packet still arrives.
            let (v, got) = l.open(encap, &original);
            assert_eq!(
                v,
                Verdict::Deliver,
                "round {round}: the forgery moved the window"
            );
            assert_same_inner(&plain, &got);
        }
        delivered += 1;
    }
    let drops = l.inb.counters.total_drops();
    assert_eq!(delivered, 3000, "every original arrived");
    assert_eq!(
        l.inb
            .counters
            .passed
            .load(std::sync::atomic::Ordering::Relaxed),
        3000
    );
    assert!(drops > 2900, "nearly every mutation is refused ({drops})");
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = TestRng::from_env("random_garbage_never_panics");
    let mut l = link(LinkSpec::default());
    for round in 0..20_000usize {
        let len = rng.below(120);
        let mut bytes = rng.bytes(len);
        if round % 3 == 0 && len >= 4 {
            bytes[..4].copy_from_slice(&SPI.to_be_bytes());
        }
        let encap = if round % 2 == 0 {
            Encap::NATT
        } else {
            Encap::RawEsp
        };
        assert!(matches!(l.open(encap, &bytes).0, Verdict::Drop(_)));
        if len > 0 {
            bytes[0] = if round % 2 == 0 { 0x45 } else { 0x60 };
        }
        assert!(matches!(l.seal(&bytes).0, Verdict::Drop(_)));
    }
    assert_eq!(l.inb.counters.total_drops(), 20_000);
    assert_eq!(l.out.counters.total_drops(), 20_000);
}

/// Seals `plaintext` (payload, padding and trailer, as given) with the
/// link's outbound key at `seq`, bypassing the outbound pipeline.
fn seal_raw(l: &Link, seq: u64, plaintext: &[u8]) -> Vec<u8> {
    let sa = &l.out.sas.get(l.out_sa).expect("sa").sa;
    let key = sa
        .keys
        .key(l.selector.active().expect("provider"))
        .expect("key");
    let mut packet = vec![0u8; 16 + plaintext.len() + 16];
    let header: &mut [u8; 16] = (&mut packet[..16]).try_into().expect("16");
    esp::emit_header(header, SPI, seq);
    packet[16..16 + plaintext.len()].copy_from_slice(plaintext);
    let (aad, n) = esp::aad(SPI, seq, false);
    let nonce = esp::nonce(sa.keys.salt(), seq.to_be_bytes());
    let (body, tag) = packet.split_at_mut(16 + plaintext.len());
    key.seal_in_place(&nonce, &aad[..n], &mut body[16..], tag)
        .expect("seal");
    packet
}

#[test]
fn authentic_packets_with_bad_padding_or_no_next_header_are_not_delivered() {
    let mut l = link(LinkSpec::default());
    let inner = packet(false, protocol::UDP, b"ab");
    let payload = &inner[20..]; // 10 bytes: pad 0
    let mut plain = payload.to_vec();
    plain.extend_from_slice(&[0, protocol::UDP]);
    assert_eq!(
        l.open(Encap::RawEsp, &seal_raw(&l, 1, &plain)).0,
        Verdict::Deliver
    );

    // RFC 4303 2.6: next header 59 is a dummy packet, consumed.
    let mut dummy = payload.to_vec();
    dummy.extend_from_slice(&[0, protocol::NO_NEXT_HEADER]);
    assert_eq!(
        l.open(Encap::RawEsp, &seal_raw(&l, 2, &dummy)).0,
        Verdict::Drop(DropReason::DummyPacket)
    );

    // Valid ICV over padding that is not 1, 2, ...: refused after decryption.
    let mut bad = payload.to_vec();
    bad.extend_from_slice(&[1, 3, 2, protocol::UDP]);
    assert_eq!(
        l.open(Encap::RawEsp, &seal_raw(&l, 3, &bad)).0,
        Verdict::Drop(DropReason::BadPadding)
    );
    // A pad length longer than the plaintext.
    assert_eq!(
        l.open(Encap::RawEsp, &seal_raw(&l, 4, &[200, 17])).0,
        Verdict::Drop(DropReason::BadPadding)
    );
    assert_eq!(l.inb.counters.total_drops(), 3);
}

#[test]
fn ike_goes_to_the_handler_only_when_there_is_one() {
    let mut l = link(LinkSpec::default());
    let ike = [0u8, 0, 0, 0, 0x21, 0x20, 0x22, 0x08];
    assert_eq!(l.open(Encap::NATT, &ike).0, Verdict::Drop(DropReason::Ike));
    l.inb.ike_handler = true;
    let (v, bytes) = l.open(Encap::NATT, &ike);
    assert_eq!(v, Verdict::Ike);
    assert_eq!(bytes, ike, "handed over unchanged, marker included");
    // Over raw ESP there is no marker: SPI 0 is simply unknown.
    assert_eq!(
        l.open(Encap::RawEsp, &ike).0,
        Verdict::Drop(DropReason::UnknownSpi)
    );
}

#[test]
fn the_soft_limit_is_reported_once() {
    let mut l = link(LinkSpec::default());
    let plain = packet(false, protocol::UDP, b"x");
    l.out.sa_mut(l.out_sa).expect("sa").set_soft_limit(3);
    for seq in 1..=5u64 {
        assert_eq!(l.seal(&plain).0, sent());
        let expected = u64::from(seq >= 3);
        assert_eq!(
            l.out
                .counters
                .soft_limit_crossings
                .load(std::sync::atomic::Ordering::Relaxed),
            expected,
            "seq {seq}"
        );
    }
}

#[test]
fn published_esp_packets_open_through_our_framing_including_esn() {
    // draft-mcgrew-gcm-test-01: the only published ESN cases. Opened with
    // esptun's own header view, AAD (SPI || seq-high || seq-low for ESN),
    // nonce and trailer parsing; the payload is the draft's inner packet.
    let cases = sections("esp_packets_mcgrew.txt");
    assert!(
        cases.iter().filter(|c| hex(&c["seq"]).len() == 8).count() >= 3,
        "ESN cases present"
    );
    let selector = selector();
    for case in &cases {
        let name = &case["name"];
        let material = material(case);
        let keys = SaKeys::new(&selector, &material, IcvLen::Icv16).expect("keys");
        let seq_bytes = hex(&case["seq"]);
        let esn = seq_bytes.len() == 8;
        let seq = seq_bytes
            .iter()
            .fold(0u64, |acc, &b| acc << 8 | u64::from(b));
        let mut packet = hex(&case["esp_packet"]);
        let view = esp::EspPacket::new_checked(&packet[..], 16).expect("long enough");
        assert_eq!(
            view.spi(),
            u32::from_str_radix(&case["spi"], 16).expect("spi"),
            "{name}"
        );
        assert_eq!(view.seq_low(), seq as u32, "{name}");
        let nonce = esp::nonce(keys.salt(), view.iv());
        let (aad, n) = esp::aad(view.spi(), seq, esn);
        let key = keys.key(selector.active().expect("provider")).expect("key");
        let mut view = esp::EspPacket::new_unchecked(&mut packet[..], 16);
        let (ciphertext, icv) = view.ciphertext_and_icv_mut();
        key.open_in_place(&nonce, &aad[..n], ciphertext, icv)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (payload_len, next_header) = esp::parse_trailer(ciphertext).expect("trailer");
        // The draft uses next header 1 in every case (see the file's notes).
        assert_eq!(next_header, protocol::ICMP, "{name}");
        // A receiver that saw the previous packet infers the full sequence
        // number from the 32 bits on the wire.
        let mut window = ReplayWindow::new(64, esn).expect("window");
        if seq > 1 {
            window.update(seq - 1).expect("previous");
        }
        assert_eq!(window.infer(seq as u32), Ok(seq), "{name}");
        assert_eq!(
            ciphertext[..payload_len],
            hex(&case["plain_packet"])[..],
            "{name}"
        );
    }
}

/// `packet` (IPv6) with one destination options header (PadN) before its
/// transport header.
fn with_dest_opts(packet: &[u8]) -> Vec<u8> {
    let mut p = packet[..40].to_vec();
    let next = p[6];
    p[6] = protocol::IPV6_DEST_OPTS;
    let len = u16::from_be_bytes([p[4], p[5]]) + 8;
    p[4..6].copy_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    p.extend_from_slice(&packet[40..]);
    p
}

/// Destination options travel inside ESP in transport mode, and the
/// transport checksum behind them is still checked on both sides. Hop-by-hop
/// and routing headers belong to the outer header: refused, by name.
#[test]
fn ipv6_destination_options_cross_and_router_headers_are_refused() {
    let mut l = link(LinkSpec {
        v6: true,
        ..LinkSpec::default()
    });
    for proto in [protocol::TCP, protocol::UDP, protocol::ICMPV6] {
        let plain = with_dest_opts(&packet(true, proto, &[0x5a; 300]));
        let (v, wire) = l.seal(&plain);
        assert_eq!(v, sent(), "{proto}");
        let (v, got) = l.open(Encap::NATT, &wire);
        assert_eq!(v, Verdict::Deliver, "{proto}");
        assert_same_inner(&plain, &got);
    }
    for (next, reason) in [
        (protocol::IPV6_HOP_BY_HOP, DropReason::HopByHop),
        (protocol::IPV6_ROUTING, DropReason::RoutingHeader),
    ] {
        let mut p = with_dest_opts(&packet(true, protocol::UDP, b"x"));
        p[6] = next;
        let (v, _) = l.seal(&p);
        assert_eq!(v, Verdict::Drop(reason), "{next}");
    }
}

/// DSCP and ECN cross the pipelines as in kernel transport mode: the
/// sealed packet's metadata carries the inner TOS byte / traffic class for
/// the socket to send, and the delivered packet's rebuilt header carries
/// the one the socket received (with a correct IPv4 header checksum).
#[test]
fn dscp_and_ecn_cross_the_pipelines() {
    use esptun::wire::ecn::{self, DSCP_EF, Ecn};
    use esptun::wire::ip::{Ipv4Packet, Ipv6Packet, tos_of};
    for v6 in [false, true] {
        let mut l = link(LinkSpec {
            v6,
            ..LinkSpec::default()
        });
        for ecn in Ecn::ALL {
            for dscp in [0, 10, DSCP_EF] {
                let tos = ecn::tos(dscp, ecn);
                let mut plain = packet(v6, protocol::UDP, b"dscp and ecn");
                if v6 {
                    Ipv6Packet::new_unchecked(&mut plain[..]).set_traffic_class(tos);
                } else {
                    let mut ip = Ipv4Packet::new_unchecked(&mut plain[..]);
                    ip.set_tos(tos);
                    ip.fill_checksum();
                }
                let mut batch = [buf(&plain)];
                let mut verdicts = Vec::new();
                l.out.process(&l.selector, &mut batch, &mut verdicts);
                assert_eq!(verdicts[0], sent());
                assert_eq!(batch[0].meta.tos, tos, "v6 {v6}: sent with the inner TOS");
                let wire = batch[0].data().to_vec();

                // As the socket reports it (a CE set on the path included);
                // 0 when it reports nothing.
                for (outer, want) in [(tos, tos), (ecn::tos(dscp, Ecn::Ce), tos | 3), (0, 0)] {
                    let mut batch = [buf(&wire)];
                    batch[0].meta.tos = outer;
                    l.inb
                        .process(&l.selector, Encap::NATT, &mut batch, &mut verdicts);
                    assert_eq!(verdicts[0], Verdict::Deliver);
                    let got = batch[0].data();
                    assert_eq!(tos_of(got), want, "v6 {v6} {ecn:?} dscp {dscp}");
                    if !v6 {
                        let ip = Ipv4Packet::new_checked(got).expect("ipv4");
                        assert!(ip.verify_checksum(), "header checksum covers the TOS");
                    }
                    assert_same_inner(&plain, got);
                    // Replay protection would refuse the same packet again.
                    l.inb.sa_mut(l.in_sa).expect("sa").replay =
                        ReplayWindow::new(64, false).expect("window");
                }
            }
        }
    }
}

/// `[inner] ipv6_hop_by_hop = "carry"`, the pipeline half: ESP is sealed
/// behind the hop-by-hop header, whose bytes are kept for the socket
/// (`IPV6_HOPOPTS`) under the packet's batch index; the receiver's
/// pipeline opens the ESP packet as any other, and putting the header the
/// socket reported back in front of it gives the packet that was sent.
#[test]
fn ipv6_hop_by_hop_headers_are_sealed_behind_and_kept_for_the_socket() {
    use esptun::wire::hop_by_hop::{self, Slots};
    let mut l = link(LinkSpec {
        v6: true,
        ..LinkSpec::default()
    });
    // PadN and an experimental option (RFC 4727): 16 bytes.
    let options = [0x1e, 4, 0xde, 0xad, 0xbe, 0xef, 1, 6, 0, 0, 0, 0, 0, 0];
    let with_hbh = |plain: &[u8]| {
        let mut p = plain[..40].to_vec();
        p.extend_from_slice(&[plain[6], 1]);
        p.extend_from_slice(&options);
        p.extend_from_slice(&plain[40..]);
        p[6] = protocol::IPV6_HOP_BY_HOP;
        let len = u16::from_be_bytes([p[4], p[5]]) + 16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p
    };
    let plain = packet(true, protocol::UDP, &[0x5a; 300]);
    let sent = with_hbh(&plain);
    // Not carried by default.
    assert_eq!(l.seal(&sent).0, Verdict::Drop(DropReason::HopByHop));

    l.out.hop_by_hop = Some(Slots::new(1));
    let (v, wire) = l.seal(&sent);
    assert!(matches!(v, Verdict::Send { .. }), "{v:?}");
    let kept = l.out.hop_by_hop.as_ref().expect("slots").get(0).to_vec();
    assert_eq!(kept, sent[40..56], "the header as sent, for IPV6_HOPOPTS");
    // The ESP packet is the plain packet's: the header is not inside.
    let (plain_v, plain_wire) = link(LinkSpec {
        v6: true,
        ..LinkSpec::default()
    })
    .seal(&plain);
    assert!(matches!(plain_v, Verdict::Send { .. }));
    assert_eq!(wire.len(), plain_wire.len());
    let (v, got) = l.open(Encap::NATT, &wire);
    assert_eq!(v, Verdict::Deliver);
    assert_same_inner(&plain, &got);
    // What the receiver's socket reports (next header: the outer packet's
    // protocol, UDP for NAT-T), put back in front of the payload.
    let mut reported = kept.clone();
    reported[0] = protocol::UDP;
    let mut storage = vec![0u8; 128 + got.len()];
    storage[128..128 + got.len() - 40].copy_from_slice(&got[40..]);
    let start = hop_by_hop::rebuild_v6(
        &mut storage,
        128,
        got.len() - 40,
        got[6],
        IpAddr::from(A6),
        IpAddr::from(B6),
        sent[7],
        0,
        &reported,
    )
    .expect("room");
    assert_eq!(&storage[start..128 + got.len() - 40], &sent[..]);

    // A second packet in the same batch has no slot: dropped by name,
    // never sent without its header.
    let mut batch = [buf(&sent), buf(&sent)];
    let mut verdicts = Vec::new();
    l.out.process(&l.selector, &mut batch, &mut verdicts);
    assert!(matches!(verdicts[0], Verdict::Send { .. }));
    assert_eq!(verdicts[1], Verdict::Drop(DropReason::HopByHop));
    // The receiving pipeline does the same from what its socket reported.
    let mut slots = Slots::new(1);
    assert!(slots.set(0, &reported));
    l.inb.hop_by_hop = Some(slots);
    let (v, wire) = l.seal(&sent);
    assert!(matches!(v, Verdict::Send { .. }), "{v:?}");
    let (v, got) = l.open(Encap::NATT, &wire);
    assert_eq!(v, Verdict::Deliver);
    assert_eq!(got[..7], sent[..7], "version, class, length, next header");
    assert_eq!(got[8..], sent[8..], "addresses, hop-by-hop header, segment");
    // A corrupted payload behind the header is still caught.
    let (_, mut bad) = l.seal(&sent);
    let at = bad.len() - 40;
    bad[at] ^= 1;
    assert_eq!(
        l.open(Encap::NATT, &bad).0,
        Verdict::Drop(DropReason::IcvFailure)
    );
    l.inb.hop_by_hop = None;

    // Behind a carried header, a routing header is still refused by name.
    let mut routed = sent.clone();
    routed[40] = protocol::IPV6_ROUTING;
    assert_eq!(l.seal(&routed).0, Verdict::Drop(DropReason::RoutingHeader));
}
