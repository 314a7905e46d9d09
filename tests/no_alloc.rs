//! The packet path allocates nothing: after warm-up, sealing and opening
//! batches performs zero heap allocations on the calling thread, for valid
//! packets and for refusals on both sides (inner checksum, no SA, bad
//! header; unknown SPI, truncated, ICV failure, replay).
//!
//! A test binary of its own, because it replaces the global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;

use esptun::crypto::select::{BootOptions, FailurePolicy, Mode, Selector};
use esptun::crypto::{IcvLen, Provider};
use esptun::datapath::inbound::{Encap, Inbound};
use esptun::datapath::outbound::Outbound;
use esptun::datapath::{DropReason, Verdict};
use esptun::packet::PacketBuf;
use esptun::sa::reservation::Fingerprint;
use esptun::sa::table::SaMeta;
use esptun::sa::{InboundSa, InnerAddrs, KeyMaterial, OutboundSa, SaKeys};
use esptun::wire::inner::{InnerPolicy, build};
use esptun::wire::ip::protocol;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Counts allocations made by the current thread, then defers to the
/// system allocator.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees hold; the counter is a const-
// initialized thread-local Cell, whose access never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged; see the impl's comment.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from `System.alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged; `ptr` came from `System.alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn sealing_and_opening_batches_allocates_nothing() {
    let selector = Selector::boot(
        Provider::detect_all(),
        Mode::Auto,
        FailurePolicy::Fallback,
        BootOptions::default(),
    );
    let (a, b) = ([198, 18, 0, 1], [198, 19, 0, 2]);
    let material = KeyMaterial::from_bytes(&[3u8; 36]).expect("material");
    let addrs = |l: [u8; 4], r: [u8; 4]| InnerAddrs::new(l.into(), r.into()).expect("addrs");
    let mut out = Outbound::new(InnerPolicy::default());
    let keys = SaKeys::new(&selector, &material, IcvLen::Icv16).expect("keys");
    let meta = || {
        SaMeta::active(
            "b",
            SocketAddr::from((b, 4500)),
            Fingerprint::new(&material),
        )
    };
    let id = out
        .add_sa(
            OutboundSa::new(0x3000, keys, true, addrs(a, b)).expect("sa"),
            meta(),
        )
        .expect("table");
    // Keys made for this test never outlive it: grant every number.
    out.sa_mut(id).expect("sa").set_ceiling(u64::MAX);
    let mut inb = Inbound::new(InnerPolicy::default());
    let keys = SaKeys::new(&selector, &material, IcvLen::Icv16).expect("keys");
    inb.add_sa(
        InboundSa::new(0x3000, keys, true, addrs(b, a), 4096).expect("sa"),
        meta(),
    )
    .expect("table");

    let good = build::ipv4(a, b, protocol::TCP, &[0u8; 1400]);
    let mut bad_checksum = good.clone();
    bad_checksum[100] ^= 1;
    let no_sa = build::ipv4(a, [198, 19, 9, 9], protocol::UDP, b"x");
    let inputs = [&good[..], &bad_checksum, &no_sa, &[0x45, 0, 0], &good];
    let mut batch: Vec<PacketBuf> = inputs.iter().map(|_| PacketBuf::new(2048)).collect();
    let mut verdicts = Vec::with_capacity(batch.len());
    // Tampered and replayed copies of a sealed packet, opened after it.
    let mut extra: Vec<PacketBuf> = (0..2).map(|_| PacketBuf::new(2048)).collect();

    let mut round = |count: &mut [usize; 2]| {
        for (buf, input) in batch.iter_mut().zip(inputs) {
            assert!(buf.fill(input));
        }
        out.process(&selector, &mut batch, &mut verdicts);
        count[0] += verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Send { .. }))
            .count();
        // Open what was sealed (refusals are opened too: they are garbage
        // to the receiver and must be refused without allocating as well).
        // Opened first: a tampered copy of the second sealed packet (ICV
        // failure, window untouched) and a copy of the first, which then
        // makes the first a replay in the main batch.
        assert!(extra[0].fill(batch[4].data()) && extra[1].fill(batch[0].data()));
        extra[0].data_mut()[30] ^= 1;
        inb.process(&selector, Encap::NATT, &mut extra, &mut verdicts);
        assert_eq!(
            verdicts,
            [Verdict::Drop(DropReason::IcvFailure), Verdict::Deliver]
        );
        inb.process(&selector, Encap::NATT, &mut batch, &mut verdicts);
        assert_eq!(verdicts[0], Verdict::Drop(DropReason::Replay));
        assert_eq!(verdicts[4], Verdict::Deliver);
        count[1] += 2;
    };
    let mut warm = [0usize; 2];
    round(&mut warm);
    let before = allocations();
    let mut counted = [0usize; 2];
    for _ in 0..1000 {
        round(&mut counted);
    }
    let allocated = allocations() - before;
    assert_eq!(
        counted,
        [2000, 2000],
        "two packets per round go through both ways"
    );
    assert_eq!(allocated, 0, "{allocated} allocations on the packet path");
}

/// The offload edge allocates nothing either: splitting a TSO super-packet
/// into segments, and coalescing verified segments back into a train.
#[test]
fn splitting_and_coalescing_allocate_nothing() {
    use esptun::wire::checksum::{pseudo_header_v4, sum};
    use esptun::wire::gso::{Checked, Splitter, TRAIN_BUFFER_LEN, Train, TrainConfig, check};
    use esptun::wire::vnet::VirtioNetHdr;

    // An IPv4/TCP super-packet of 4 x 1000 bytes as the kernel hands it
    // over with TSO: NEEDS_CSUM, the checksum field holding the
    // pseudo-header sum over the whole transport length.
    let (a, b) = ([198, 18, 0, 1], [198, 19, 0, 2]);
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(40 + payload.len() as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = protocol::TCP;
    p[12..16].copy_from_slice(&a);
    p[16..20].copy_from_slice(&b);
    let ip_sum = !sum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&443u16.to_be_bytes());
    p[24..28].copy_from_slice(&1000u32.to_be_bytes());
    p[28..32].copy_from_slice(&77u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10; // ACK
    p[34..36].copy_from_slice(&500u16.to_be_bytes());
    let partial = pseudo_header_v4(a, b, protocol::TCP, (20 + payload.len()) as u16);
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    p.extend_from_slice(&payload);
    let hdr = VirtioNetHdr {
        flags: 1,    // NEEDS_CSUM
        gso_type: 1, // TCPV4
        hdr_len: 40,
        gso_size: 1000,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut segments: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; 2048]).collect();
    let mut lens = [0usize; 4];
    let mut train = vec![0u8; TRAIN_BUFFER_LEN];

    let mut round = || {
        let splitter = Splitter::new(&hdr, &p).expect("a valid super-packet");
        assert_eq!(splitter.count(), 4);
        for (i, out) in segments.iter_mut().enumerate() {
            let v = splitter
                .write_segment(i, out, InnerPolicy::default())
                .expect("segment");
            lens[i] = v.total_len;
        }
        let verified = |i: usize| match check(&segments[i][..lens[i]], InnerPolicy::default()) {
            Ok(Checked::Verified(v)) => v,
            other => panic!("segment {i} not verified: {:?}", other.is_ok()),
        };
        let Ok(mut t) = Train::start(&mut train, verified(0), TrainConfig::default()) else {
            panic!("train refused");
        };
        for i in 1..4 {
            assert!(t.push(verified(i)).is_ok(), "segment {i} refused");
        }
        assert_eq!(t.finish(), 10 + 40 + 4000);
    };
    round();
    let before = allocations();
    for _ in 0..1000 {
        round();
    }
    assert_eq!(allocations() - before, 0, "the offload edge allocated");
}

/// Reassembly in steady state: once its chunk pool and slots are warm,
/// reassembling datagrams (IPv4 and IPv6, in and out of order), dropping
/// duplicates, discarding overlaps and expiring the incomplete allocates
/// nothing.
#[test]
fn reassembly_allocates_nothing_once_warm() {
    use esptun::datapath::Counters;
    use esptun::datapath::reassembly::{Pushed, Reassembler, ReassemblyConfig};
    use esptun::wire::checksum;
    use std::time::{Duration, Instant};

    fn fragments(packet: &[u8], v6: bool, id: u16) -> Vec<Vec<u8>> {
        let header = if v6 { 40 } else { 20 };
        let body = &packet[header..];
        (0..body.len().div_ceil(1400))
            .map(|i| {
                let (s, e) = (i * 1400, ((i + 1) * 1400).min(body.len()));
                let more = e < body.len();
                let mut f = packet[..header].to_vec();
                if v6 {
                    let next = f[6];
                    f[6] = protocol::IPV6_FRAGMENT;
                    f.extend_from_slice(&[next, 0]);
                    f.extend_from_slice(&(s as u16 | u16::from(more)).to_be_bytes());
                    f.extend_from_slice(&u32::from(id).to_be_bytes());
                    f.extend_from_slice(&body[s..e]);
                    let len = (f.len() - 40) as u16;
                    f[4..6].copy_from_slice(&len.to_be_bytes());
                } else {
                    f.extend_from_slice(&body[s..e]);
                    let len = f.len() as u16;
                    f[2..4].copy_from_slice(&len.to_be_bytes());
                    f[4..6].copy_from_slice(&id.to_be_bytes());
                    let field = (s / 8) as u16 | if more { 0x2000 } else { 0 };
                    f[6..8].copy_from_slice(&field.to_be_bytes());
                    f[10..12].copy_from_slice(&[0, 0]);
                    let c = checksum::finish(checksum::sum(&f[..20]));
                    f[10..12].copy_from_slice(&c.to_be_bytes());
                }
                f
            })
            .collect()
    }

    let payload: Vec<u8> = (0..65_000u32).map(|i| i as u8).collect();
    let v4 = build::ipv4([198, 18, 0, 1], [198, 19, 0, 2], protocol::UDP, &payload);
    let a6 = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let b6 = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let v6 = build::ipv6(a6, b6, protocol::UDP, &payload[..9000]);
    let (f4, f6) = (fragments(&v4, false, 1), fragments(&v6, true, 2));
    let mut reversed = f6.clone();
    reversed.reverse();
    let overlap = fragments(&v4, false, 3);
    let incomplete = fragments(&v4, false, 4);
    // The second fragment of `overlap`, starting 8 bytes early.
    let mut shifted = overlap[1].clone();
    shifted[6..8].copy_from_slice(&((1392 / 8) as u16 | 0x2000).to_be_bytes());
    shifted[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::finish(checksum::sum(&shifted[..20]));
    shifted[10..12].copy_from_slice(&c.to_be_bytes());
    let mut r = Reassembler::new(
        ReassemblyConfig::default(),
        65_535,
        std::sync::Arc::new(Counters::default()),
    );
    let mut out = vec![0u8; 65_535];
    let mut now = Instant::now();
    let mut round = |now: Instant| {
        let mut whole = 0;
        for f in f4.iter().chain(&f6).chain(&reversed).chain(&f4[..1]) {
            if let Pushed::Complete(n) = r.push(f, now, &mut out) {
                whole += n;
            }
        }
        assert_eq!(whole, v4.len() + 2 * v6.len());
        // A duplicate, an overlap, and a datagram that never completes.
        assert_eq!(r.push(&overlap[0], now, &mut out), Pushed::Held);
        assert!(matches!(
            r.push(&overlap[0], now, &mut out),
            Pushed::Dropped(_)
        ));
        assert!(matches!(
            r.push(&shifted, now, &mut out),
            Pushed::Dropped(_)
        ));
        for f in &incomplete[..3] {
            assert_eq!(r.push(f, now, &mut out), Pushed::Held);
        }
        r.expire(now + Duration::from_secs(31), &mut |_| {});
        assert_eq!(r.datagrams_in_flight(), 0);
    };
    // The first fragment of f4 again, alone, opens a datagram the expiry
    // ends: every round is alike.
    round(now);
    now += Duration::from_secs(60);
    round(now);
    let before = allocations();
    for _ in 0..50 {
        now += Duration::from_secs(60);
        round(now);
    }
    assert_eq!(allocations() - before, 0, "reassembly allocated");
}

/// Carrying hop-by-hop headers allocates nothing either: the sender keeps
/// each header in its fixed slot, the receiver's slots are filled by copy,
/// and the rebuilt packet is the one sent.
#[test]
fn carrying_hop_by_hop_headers_allocates_nothing() {
    use esptun::wire::hop_by_hop::Slots;
    use std::net::IpAddr;
    let selector = Selector::boot(
        Provider::detect_all(),
        Mode::Auto,
        FailurePolicy::Fallback,
        BootOptions::default(),
    );
    let a: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let b: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let material = KeyMaterial::from_bytes(&[5u8; 36]).expect("material");
    let addrs = |l: [u8; 16], r: [u8; 16]| {
        InnerAddrs::new(IpAddr::from(l), IpAddr::from(r)).expect("addrs")
    };
    let meta = || {
        SaMeta::active(
            "b",
            SocketAddr::from((b, 4500)),
            Fingerprint::new(&material),
        )
    };
    let mut out = Outbound::new(InnerPolicy::default());
    out.hop_by_hop = Some(Slots::new(4));
    let keys = SaKeys::new(&selector, &material, IcvLen::Icv16).expect("keys");
    let id = out
        .add_sa(
            OutboundSa::new(0x3100, keys, true, addrs(a, b)).expect("sa"),
            meta(),
        )
        .expect("table");
    out.sa_mut(id).expect("sa").set_ceiling(u64::MAX);
    let mut inb = Inbound::new(InnerPolicy::default());
    inb.hop_by_hop = Some(Slots::new(4));
    let keys = SaKeys::new(&selector, &material, IcvLen::Icv16).expect("keys");
    inb.add_sa(
        InboundSa::new(0x3100, keys, true, addrs(b, a), 4096).expect("sa"),
        meta(),
    )
    .expect("table");

    // A UDP packet with an 8-byte hop-by-hop header (experimental option
    // 0x1E, RFC 4727) between its IPv6 and UDP headers.
    let plain = build::ipv6(a, b, protocol::UDP, &[7u8; 300]);
    let mut packet = plain[..40].to_vec();
    packet[6] = 0;
    let len = u16::from_be_bytes([packet[4], packet[5]]) + 8;
    packet[4..6].copy_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&[protocol::UDP, 0, 0x1e, 4, 1, 2, 3, 4]);
    packet.extend_from_slice(&plain[40..]);
    let inputs = [&packet[..], &plain[..]];
    let mut batch: Vec<PacketBuf> = inputs.iter().map(|_| PacketBuf::new(2048)).collect();
    let mut verdicts = Vec::with_capacity(batch.len());
    let mut delivered = 0usize;
    let mut round = |delivered: &mut usize| {
        for (buf, input) in batch.iter_mut().zip(inputs) {
            assert!(buf.fill(input));
        }
        out.process(&selector, &mut batch, &mut verdicts);
        assert!(verdicts.iter().all(|v| matches!(v, Verdict::Send { .. })));
        // What the receiving socket would report, for the first packet
        // only: the header as kept (the kernel's copy has the outer next
        // header byte, which the rebuild replaces either way).
        let sent = out.hop_by_hop.as_ref().expect("slots");
        let receiver = inb.hop_by_hop.as_mut().expect("slots");
        receiver.copy_from(0, sent, 0);
        receiver.copy_from(1, sent, 1);
        assert_eq!(receiver.get(0).len(), 8);
        assert!(receiver.get(1).is_empty());
        inb.process(&selector, Encap::NATT, &mut batch, &mut verdicts);
        assert_eq!(verdicts, [Verdict::Deliver, Verdict::Deliver]);
        assert_eq!(batch[0].data(), &packet[..], "rebuilt as sent");
        assert_eq!(batch[1].data(), &plain[..]);
        *delivered += 2;
    };
    round(&mut delivered);
    let before = allocations();
    for _ in 0..1000 {
        round(&mut delivered);
    }
    let allocated = allocations() - before;
    assert_eq!(delivered, 2002);
    assert_eq!(
        allocated, 0,
        "{allocated} allocations carrying hop-by-hop headers"
    );
}
