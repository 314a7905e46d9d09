use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::wire::inner::build::{ipv4, ipv6};
use crate::wire::inner::{InnerPolicy, InnerVerdict, validate};
use crate::wire::ip::protocol;

const A4: [u8; 4] = [198, 18, 0, 1];
const B4: [u8; 4] = [198, 19, 0, 2];
const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const OUT: usize = 65_535;

pub(super) fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// IPv4 fragments of `packet` (no options) covering the payload ranges
/// given (byte offsets into the IP payload; starts multiples of 8).
pub(super) fn frag4(packet: &[u8], id: u16, ranges: &[(usize, usize)]) -> Vec<Vec<u8>> {
    let packet = &ided(packet, id);
    let hl = usize::from(packet[0] & 0x0F) * 4;
    let body = &packet[hl..];
    ranges
        .iter()
        .map(|&(s, e)| {
            let mut f = packet[..hl].to_vec();
            f.extend_from_slice(&body[s..e]);
            let total = (hl + e - s) as u16;
            f[2..4].copy_from_slice(&total.to_be_bytes());
            f[4..6].copy_from_slice(&id.to_be_bytes());
            let mut field = (s / 8) as u16 | (u16::from(packet[6]) << 8 & 0x4000);
            if e < body.len() {
                field |= 0x2000;
            }
            f[6..8].copy_from_slice(&field.to_be_bytes());
            f[10..12].copy_from_slice(&[0, 0]);
            let c = checksum::finish(checksum::sum(&f[..hl]));
            f[10..12].copy_from_slice(&c.to_be_bytes());
            f
        })
        .collect()
}

/// `packet` (IPv4) with identification `id`: what the reassembly of its
/// fragments gives back.
pub(super) fn ided(packet: &[u8], id: u16) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let hl = usize::from(p[0] & 0x0F) * 4;
    p[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::finish(checksum::sum(&p[..hl]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// Panics unless `got` is `want`, without printing 65 KB of bytes.
#[track_caller]
pub(super) fn same(got: &[Vec<u8>], want: &[Vec<u8>]) {
    let lens = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .find_map(|(g, w)| g.iter().zip(w).position(|(a, b)| a != b));
        panic!(
            "got {} packets {:?}, want {} {:?}; first difference at byte {first:?}: {:?} vs {:?}",
            got.len(),
            lens(got),
            want.len(),
            lens(want),
            got.first().map(|g| &g[..g.len().min(64)]),
            want.first().map(|w| &w[..w.len().min(64)]),
        );
    }
}

/// IPv6 fragments of `packet`, whose first `unfrag` bytes are the
/// unfragmentable part (`next_at`: where its last next-header byte is),
/// covering the ranges of the fragmentable part given.
pub(super) fn frag6(
    packet: &[u8],
    unfrag: usize,
    next_at: usize,
    id: u32,
    ranges: &[(usize, usize)],
) -> Vec<Vec<u8>> {
    let body = &packet[unfrag..];
    ranges
        .iter()
        .map(|&(s, e)| {
            let mut f = packet[..unfrag].to_vec();
            let next = f[next_at];
            f[next_at] = protocol::IPV6_FRAGMENT;
            let mut field = s as u16 & 0xFFF8;
            if e < body.len() {
                field |= 1;
            }
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&field.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&body[s..e]);
            let plen = (f.len() - 40) as u16;
            f[4..6].copy_from_slice(&plen.to_be_bytes());
            f
        })
        .collect()
}

/// Ranges of `size`-byte pieces (a multiple of 8) over `len` bytes.
pub(super) fn pieces(len: usize, size: usize) -> Vec<(usize, usize)> {
    (0..len.div_ceil(size))
        .map(|i| (i * size, ((i + 1) * size).min(len)))
        .collect()
}

pub(super) struct Rig {
    pub r: Reassembler,
    pub counters: Arc<Counters>,
    pub now: Instant,
    pub out: Vec<u8>,
}

impl Rig {
    pub fn new(config: ReassemblyConfig) -> Self {
        let counters = Arc::new(Counters::default());
        Rig {
            r: Reassembler::new(config, OUT, counters.clone()),
            counters,
            now: Instant::now(),
            out: vec![0; OUT],
        }
    }

    pub fn push(&mut self, packet: &[u8]) -> Pushed {
        self.r.push(packet, self.now, &mut self.out)
    }

    /// Pushes all; the whole packets that came out.
    pub fn push_all(&mut self, fragments: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut whole = Vec::new();
        for f in fragments {
            match self.push(f) {
                Pushed::Complete(n) => whole.push(self.out[..n].to_vec()),
                // Passed on as it is.
                Pushed::NotFragment => whole.push(f.clone()),
                _ => {}
            }
        }
        whole
    }

    fn get(&self, which: impl Fn(&ReassemblyCounters) -> &AtomicU64) -> u64 {
        which(&self.counters.reassembly).load(Ordering::Relaxed)
    }
}

fn udp4(len: usize) -> Vec<u8> {
    ipv4(A4, B4, protocol::UDP, &payload(len, 1))
}

fn udp6(len: usize) -> Vec<u8> {
    ipv6(A6, B6, protocol::UDP, &payload(len, 2))
}

/// `packet` (IPv6, no extension headers) with one 8-byte destination
/// options header (PadN) before its transport header.
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

fn verified(p: &[u8]) -> bool {
    validate(p, InnerPolicy::default()).map(|v| v.verdict) == Ok(InnerVerdict::Verified)
}

#[test]
fn in_order_and_out_of_order_fragments_give_the_datagram_back_v4_and_v6() {
    for v6 in [false, true] {
        let packet = if v6 { udp6(9000) } else { udp4(9000) };
        let hl = if v6 { 40 } else { 20 };
        let frags = |ranges: &[(usize, usize)]| {
            if v6 {
                frag6(&packet, 40, 6, 7, ranges)
            } else {
                frag4(&packet, 7, ranges)
            }
        };
        let ranges = pieces(packet.len() - hl, 1400);
        let mut orders = vec![ranges.clone()];
        orders.push(ranges.iter().rev().copied().collect());
        let mut shuffled = ranges.clone();
        shuffled.swap(0, 3);
        shuffled.swap(1, 5);
        orders.push(shuffled);
        for order in orders {
            let mut rig = Rig::new(ReassemblyConfig::default());
            let fs = frags(&order);
            let whole = rig.push_all(&fs);
            let want = if v6 { packet.clone() } else { ided(&packet, 7) };
            same(&whole, &[want]);
            assert!(verified(&whole[0]));
            assert_eq!(rig.get(|c| &c.reassembled), 1);
            assert_eq!(rig.get(|c| &c.fragments), fs.len() as u64);
            assert_eq!(rig.r.bytes_in_flight(), 0);
            assert_eq!(rig.r.datagrams_in_flight(), 0);
            assert_eq!(rig.counters.total_drops(), 0);
        }
    }
}

/// RFC 3168 section 5.3: a CE mark on any fragment of an ECN-capable
/// datagram survives reassembly; Not-ECT mixed with ECN-capable
/// fragments drops the datagram; otherwise the first fragment's field.
#[test]
fn ecn_of_the_fragments_combines_as_rfc_3168_says() {
    // (ECN of each fragment, the reassembled datagram's ECN or None: dropped)
    let cases: [(&[u8], Option<u8>); 5] = [
        (&[2, 2, 2, 2, 2, 2, 2], Some(2)),
        (&[2, 3, 2, 2, 2, 2, 2], Some(3)),
        (&[1, 1, 1, 1, 1, 1, 3], Some(3)),
        (&[0, 0, 0, 0, 0, 0, 0], Some(0)),
        (&[0, 2, 0, 0, 0, 0, 0], None),
    ];
    for v6 in [false, true] {
        let packet = if v6 { udp6(9000) } else { udp4(9000) };
        let hl = if v6 { 40 } else { 20 };
        for (marks, want) in cases {
            let ranges = pieces(packet.len() - hl, 1400);
            assert_eq!(ranges.len(), marks.len());
            let mut frags = if v6 {
                frag6(&packet, 40, 6, 9, &ranges)
            } else {
                frag4(&packet, 9, &ranges)
            };
            for (f, &ecn) in frags.iter_mut().zip(marks) {
                if v6 {
                    f[1] = (f[1] & !0x30) | (ecn << 4);
                } else {
                    f[1] = (f[1] & !3) | ecn;
                    f[10..12].copy_from_slice(&[0, 0]);
                    let sum = checksum::finish(checksum::sum(&f[..20]));
                    f[10..12].copy_from_slice(&sum.to_be_bytes());
                }
            }
            let mut rig = Rig::new(ReassemblyConfig::default());
            let whole = rig.push_all(&frags);
            match want {
                Some(ecn) => {
                    assert_eq!(whole.len(), 1, "v6 {v6} marks {marks:?}");
                    let got = if v6 {
                        (whole[0][1] >> 4) & 3
                    } else {
                        whole[0][1] & 3
                    };
                    assert_eq!(got, ecn, "v6 {v6} marks {marks:?}");
                    assert!(verified(&whole[0]), "v6 {v6} marks {marks:?}");
                }
                None => {
                    assert!(whole.is_empty(), "v6 {v6} marks {marks:?}");
                    assert_eq!(rig.get(|c| &c.malformed), 1);
                }
            }
        }
    }
}

#[test]
fn non_fragments_pass_untouched() {
    let mut rig = Rig::new(ReassemblyConfig::default());
    for p in [udp4(100), udp6(100), vec![], vec![0x45; 10], vec![0x60; 39]] {
        assert_eq!(rig.push(&p), Pushed::NotFragment);
    }
    assert_eq!(rig.get(|c| &c.fragments), 0);
}

#[test]
fn ipv6_destination_options_after_the_fragment_header_are_carried() {
    let packet = with_dest_opts(&udp6(3000));
    assert!(verified(&packet));
    let fs = frag6(&packet, 40, 6, 9, &pieces(packet.len() - 40, 1232));
    // The first fragment starts with the destination options.
    assert_eq!(fs[0][40], protocol::IPV6_DEST_OPTS);
    let mut rig = Rig::new(ReassemblyConfig::default());
    let whole = rig.push_all(&fs);
    same(&whole, &[packet]);
}

#[test]
fn ipv6_unfragmentable_extension_headers_stay_in_front() {
    // A destination options header before the fragment header is part of
    // the unfragmentable part; the reassembled packet keeps it in place.
    let packet = with_dest_opts(&udp6(2000));
    let fs = frag6(&packet, 48, 40, 10, &pieces(packet.len() - 48, 800));
    assert_eq!(fs[0][6], protocol::IPV6_DEST_OPTS);
    assert_eq!(fs[0][40], protocol::IPV6_FRAGMENT);
    let mut rig = Rig::new(ReassemblyConfig::default());
    same(&rig.push_all(&fs), &[packet]);
}

#[test]
fn an_exact_duplicate_is_dropped_alone_and_the_datagram_completes() {
    let packet = udp4(4000);
    let fs = frag4(&packet, 1, &pieces(packet.len() - 20, 1000));
    let mut rig = Rig::new(ReassemblyConfig::default());
    assert_eq!(rig.push(&fs[0]), Pushed::Held);
    assert_eq!(
        rig.push(&fs[0]),
        Pushed::Dropped(DropReason::ReassemblyDuplicate)
    );
    // The last one twice too.
    let last = fs.len() - 1;
    assert_eq!(rig.push(&fs[last]), Pushed::Held);
    assert_eq!(
        rig.push(&fs[last]),
        Pushed::Dropped(DropReason::ReassemblyDuplicate)
    );
    let whole = rig.push_all(&fs[1..last]);
    same(&whole, &[ided(&packet, 1)]);
    assert_eq!(rig.get(|c| &c.duplicates), 2);
    assert_eq!(rig.counters.drops(DropReason::ReassemblyDuplicate), 2);
    assert_eq!(rig.get(|c| &c.overlap), 0);
}

#[test]
fn any_overlap_discards_the_whole_datagram_and_later_fragments_until_timeout() {
    let packet = udp4(4000);
    let body = packet.len() - 20;
    let mut rig = Rig::new(ReassemblyConfig::default());
    let fs = frag4(&packet, 2, &[(0, 1000), (1000, 2000), (2000, body)]);
    assert_eq!(rig.push(&fs[0]), Pushed::Held);
    assert_eq!(rig.push(&fs[1]), Pushed::Held);
    // Overlaps the end of the second by 8 bytes.
    let overlapping = frag4(&packet, 2, &[(1992, 2400)]);
    assert_eq!(
        rig.push(&overlapping[0]),
        Pushed::Dropped(DropReason::ReassemblyOverlap)
    );
    assert_eq!(rig.r.bytes_in_flight(), 0, "its data is freed at once");
    // The rest would complete it; it may not.
    assert_eq!(
        rig.push(&fs[2]),
        Pushed::Dropped(DropReason::ReassemblyOverlap)
    );
    assert_eq!(rig.get(|c| &c.overlap), 1, "one datagram");
    assert_eq!(rig.get(|c| &c.reassembled), 0);
    // Two held, the overlapping one, and the later one: four packets.
    assert_eq!(rig.counters.drops(DropReason::ReassemblyOverlap), 4);
    // After the timeout the key is free again.
    rig.now += Duration::from_secs(31);
    let mut expired = 0;
    rig.r.expire(rig.now, &mut |_| expired += 1);
    assert_eq!(expired, 0, "already counted as overlap");
    assert_eq!(rig.get(|c| &c.timeout), 0);
    same(&rig.push_all(&fs), &[ided(&packet, 2)]);
}

#[test]
fn overlaps_of_every_shape_are_overlaps_not_duplicates() {
    let packet = udp4(100);
    type Range = (usize, usize);
    let mut cases: Vec<(Vec<Range>, Range)> = vec![
        // Same start, longer; same start, shorter.
        (vec![(0, 16)], (0, 24)),
        (vec![(0, 24)], (0, 16)),
        // Covered by two that were received.
        (vec![(0, 8), (8, 16)], (0, 16)),
        // Inside another.
        (vec![(0, 32)], (8, 16)),
        // A last fragment over data.
        (vec![(48, 64)], (40, 108)),
    ];
    cases.push((vec![(0, 16), (16, 32)], (8, 24)));
    for (held, new) in cases {
        let mut rig = Rig::new(ReassemblyConfig::default());
        for f in frag4(&packet, 3, &held) {
            assert_eq!(rig.push(&f), Pushed::Held, "{held:?}");
        }
        let f = frag4(&packet, 3, &[new]);
        assert_eq!(
            rig.push(&f[0]),
            Pushed::Dropped(DropReason::ReassemblyOverlap),
            "{held:?} then {new:?}"
        );
    }
}

#[test]
fn a_datagram_not_completed_in_time_is_discarded_and_counted() {
    let config = ReassemblyConfig {
        timeout: Duration::from_secs(5),
        ..ReassemblyConfig::default()
    };
    let mut rig = Rig::new(config);
    let packet = udp6(3000);
    let fs = frag6(&packet, 40, 6, 5, &pieces(packet.len() - 40, 1000));
    rig.push_all(&fs[..2]);
    assert_eq!(rig.r.datagrams_in_flight(), 1);
    assert!(rig.r.bytes_in_flight() > 0);
    let mut flows = Vec::new();
    rig.r
        .expire(rig.now + Duration::from_millis(4999), &mut |f| {
            flows.push(f)
        });
    assert!(flows.is_empty());
    rig.now += Duration::from_secs(5);
    rig.r.expire(rig.now, &mut |f| flows.push(f));
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].dst, IpAddr::from(B6));
    assert_eq!(rig.get(|c| &c.timeout), 1);
    assert_eq!(rig.counters.drops(DropReason::ReassemblyTimeout), 2);
    assert_eq!(rig.r.datagrams_in_flight(), 0);
    assert_eq!(rig.r.bytes_in_flight(), 0);
    // The late rest starts over and never completes alone.
    assert_eq!(rig.push_all(&fs[2..]), Vec::<Vec<u8>>::new());
}

#[test]
fn caps_in_bytes_and_datagrams_hold_in_total_and_per_destination() {
    // Total datagrams.
    let config = ReassemblyConfig {
        max_datagrams: 3,
        ..ReassemblyConfig::default()
    };
    let mut rig = Rig::new(config);
    let packet = udp4(3000);
    for id in 0..3 {
        assert_eq!(rig.push(&frag4(&packet, id, &[(0, 1000)])[0]), Pushed::Held);
    }
    assert_eq!(
        rig.push(&frag4(&packet, 3, &[(0, 1000)])[0]),
        Pushed::Dropped(DropReason::ReassemblyMemory)
    );
    assert_eq!(rig.get(|c| &c.memory), 1);
    // The ones in flight still complete.
    let rest = frag4(&packet, 0, &pieces(3008, 1000)[1..]);
    same(&rig.push_all(&rest), &[ided(&packet, 0)]);

    // Datagrams per destination: another destination still gets a slot.
    let config = ReassemblyConfig {
        max_datagrams_per_destination: 2,
        ..ReassemblyConfig::default()
    };
    let mut rig = Rig::new(config);
    for id in 0..2 {
        assert_eq!(rig.push(&frag4(&packet, id, &[(0, 1000)])[0]), Pushed::Held);
    }
    assert_eq!(
        rig.push(&frag4(&packet, 2, &[(0, 1000)])[0]),
        Pushed::Dropped(DropReason::ReassemblyMemory)
    );
    let other = ipv4(A4, [198, 19, 0, 3], protocol::UDP, &payload(3000, 1));
    assert_eq!(rig.push(&frag4(&other, 2, &[(0, 1000)])[0]), Pushed::Held);

    // Bytes: 4 chunks in total; a datagram that needs more is discarded.
    let config = ReassemblyConfig {
        max_bytes: 4 * CHUNK,
        max_bytes_per_destination: 4 * CHUNK,
        ..ReassemblyConfig::default()
    };
    let mut rig = Rig::new(config);
    let big = udp4(20_000);
    let fs = frag4(&big, 9, &pieces(big.len() - 20, 1400));
    let mut dropped = 0;
    for f in &fs {
        if rig.push(f) == Pushed::Dropped(DropReason::ReassemblyMemory) {
            dropped += 1;
        }
        assert!(rig.r.bytes_in_flight() <= 4 * CHUNK);
        assert!(rig.r.bytes_allocated() <= 4 * CHUNK);
    }
    assert_eq!(rig.get(|c| &c.memory), 1, "one datagram");
    assert_eq!(rig.get(|c| &c.reassembled), 0);
    assert!(dropped > 1, "its later fragments too");
    assert_eq!(rig.r.bytes_in_flight(), 0);
    // A datagram that fits still goes through.
    let small = udp4(6000);
    same(
        &rig.push_all(&frag4(&small, 10, &pieces(small.len() - 20, 1400))),
        &[ided(&small, 10)],
    );

    // Bytes per destination.
    let config = ReassemblyConfig {
        max_bytes_per_destination: 2 * CHUNK,
        ..ReassemblyConfig::default()
    };
    let mut rig = Rig::new(config);
    let fs = frag4(&big, 11, &pieces(big.len() - 20, 1400));
    assert!(
        fs.iter()
            .any(|f| rig.push(f) == Pushed::Dropped(DropReason::ReassemblyMemory))
    );
    let other = ipv4(A4, [198, 19, 0, 3], protocol::UDP, &payload(3000, 1));
    same(
        &rig.push_all(&frag4(&other, 11, &pieces(3008, 1400))),
        &[ided(&other, 11)],
    );
}

#[test]
fn an_ipv6_atomic_fragment_is_a_whole_packet_without_state() {
    for packet in [udp6(500), with_dest_opts(&udp6(500))] {
        let atomic = frag6(&packet, 40, 6, 77, &[(0, packet.len() - 40)]);
        assert_eq!(atomic[0][43] & 1, 0, "M = 0");
        let mut rig = Rig::new(ReassemblyConfig::default());
        same(&rig.push_all(&atomic), std::slice::from_ref(&packet));
        assert_eq!(rig.r.datagrams_in_flight(), 0);
        assert_eq!(rig.get(|c| &c.atomic), 1);
        // Again: no state, so no duplicate either.
        same(&rig.push_all(&atomic), &[packet]);
    }
}

#[test]
fn a_tiny_first_fragment_is_malformed() {
    // IPv4 TCP: the first fragment must hold the whole 20-byte header.
    let tcp = ipv4(A4, B4, protocol::TCP, &payload(100, 3));
    let mut rig = Rig::new(ReassemblyConfig::default());
    let fs = frag4(&tcp, 4, &[(0, 16), (16, 120)]);
    assert_eq!(
        rig.push(&fs[0]),
        Pushed::Dropped(DropReason::ReassemblyMalformed)
    );
    // IPv6: the destination options and the UDP header must be in it.
    let packet = with_dest_opts(&udp6(100));
    let fs = frag6(&packet, 40, 6, 4, &[(0, 8), (8, packet.len() - 40)]);
    assert_eq!(
        rig.push(&fs[0]),
        Pushed::Dropped(DropReason::ReassemblyMalformed)
    );
    let fs = frag6(&packet, 40, 6, 5, &[(0, 16), (16, packet.len() - 40)]);
    assert_eq!(rig.push(&fs[0]), Pushed::Held, "options and UDP header");
    assert_eq!(rig.get(|c| &c.malformed), 2);
    // A first fragment arriving last is checked too: the datagram goes.
    let fs = frag6(&packet, 40, 6, 6, &[(0, 8), (8, packet.len() - 40)]);
    assert_eq!(rig.push(&fs[1]), Pushed::Held);
    assert_eq!(
        rig.push(&fs[0]),
        Pushed::Dropped(DropReason::ReassemblyMalformed)
    );
    assert_eq!(rig.counters.drops(DropReason::ReassemblyMalformed), 4);
}

#[test]
fn a_non_last_fragment_not_a_multiple_of_eight_is_malformed() {
    let packet = udp4(1000);
    let mut fs = frag4(&packet, 5, &[(0, 500), (500, 1008)]);
    // Cut the first one to 499 bytes of payload.
    fs[0].pop();
    fs[0][2..4].copy_from_slice(&519u16.to_be_bytes());
    fs[0][10..12].copy_from_slice(&[0, 0]);
    let c = checksum::finish(checksum::sum(&fs[0][..20]));
    fs[0][10..12].copy_from_slice(&c.to_be_bytes());
    let mut rig = Rig::new(ReassemblyConfig::default());
    assert_eq!(
        rig.push(&fs[0]),
        Pushed::Dropped(DropReason::ReassemblyMalformed)
    );
    // A bad IPv4 header checksum, and a second last fragment that
    // disagrees on the length.
    let mut bad = frag4(&packet, 6, &[(0, 504)]).remove(0);
    bad[10] ^= 1;
    assert_eq!(
        rig.push(&bad),
        Pushed::Dropped(DropReason::ReassemblyMalformed)
    );
    let fs = frag4(&packet, 7, &[(504, 1008)]);
    assert_eq!(rig.push(&fs[0]), Pushed::Held);
    let shorter = frag4(&packet[..packet.len() - 8], 7, &[(504, 1000)]);
    assert_eq!(
        rig.push(&shorter[0]),
        Pushed::Dropped(DropReason::ReassemblyMalformed)
    );
}

#[test]
fn oversize_datagrams_are_too_big() {
    let packet = udp4(2000);
    let mut rig = Rig::new(ReassemblyConfig::default());
    // IPv4: offset 65,528 plus 16 bytes ends past 65,535.
    let mut f = frag4(&packet, 8, &[(0, 16)]).remove(0);
    let field = (65_528u16 / 8) | 0x2000;
    f[6..8].copy_from_slice(&field.to_be_bytes());
    f[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::finish(checksum::sum(&f[..20]));
    f[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(rig.push(&f), Pushed::Dropped(DropReason::ReassemblyTooBig));
    // IPv6: a payload of 65,535 plus 8 is too big.
    let v6 = udp6(2000);
    let mut f = frag6(&v6, 40, 6, 8, &[(0, 16)]).remove(0);
    f[42..44].copy_from_slice(&(65_528u16 | 1).to_be_bytes());
    assert_eq!(rig.push(&f), Pushed::Dropped(DropReason::ReassemblyTooBig));
    assert_eq!(rig.get(|c| &c.too_big), 2);
    // A buffer smaller than the datagram: too big as well.
    let counters = Arc::new(Counters::default());
    let mut small = Reassembler::new(ReassemblyConfig::default(), 3000, counters.clone());
    let mut out = vec![0; 3000];
    let big = udp4(4000);
    let fs = frag4(&big, 9, &pieces(4008, 1400));
    let pushed: Vec<_> = fs
        .iter()
        .map(|f| small.push(f, Instant::now(), &mut out))
        .collect();
    assert!(pushed.contains(&Pushed::Dropped(DropReason::ReassemblyTooBig)));
    assert_eq!(small.bytes_in_flight(), 0);
}

#[test]
fn the_largest_datagrams_reassemble() {
    // IPv4: 65,535 bytes in all; IPv6: a payload of 65,535 does not fit a
    // 65,535-byte buffer (too big), 65,495 does.
    let v4 = udp4(65_535 - 28);
    let mut rig = Rig::new(ReassemblyConfig::default());
    same(
        &rig.push_all(&frag4(&v4, 1, &pieces(v4.len() - 20, 1480))),
        &[ided(&v4, 1)],
    );
    let v6 = udp6(65_535 - 48);
    same(
        &rig.push_all(&frag6(&v6, 40, 6, 1, &pieces(v6.len() - 40, 1232))),
        &[v6],
    );
}

#[test]
fn disjoint_datagrams_interleave() {
    let (a, b) = (udp4(5000), ipv4(A4, B4, protocol::TCP, &payload(5000, 9)));
    let (c, d) = (udp6(5000), with_dest_opts(&udp6(4000)));
    let fa = frag4(&a, 1, &pieces(a.len() - 20, 1400));
    let fb = frag4(&b, 1, &pieces(b.len() - 20, 1400)); // other protocol
    let fc = frag6(&c, 40, 6, 1, &pieces(c.len() - 40, 1400));
    let fd = frag6(&d, 40, 6, 2, &pieces(d.len() - 40, 1400));
    let mut all = Vec::new();
    for i in 0..4 {
        for f in [&fa, &fb, &fc, &fd] {
            if let Some(x) = f.get(i) {
                all.push(x.clone());
            }
        }
    }
    let mut rig = Rig::new(ReassemblyConfig::default());
    let mut whole = rig.push_all(&all);
    whole.sort();
    let mut want = vec![ided(&a, 1), ided(&b, 1), c, d];
    want.sort();
    same(&whole, &want);
}

#[test]
fn bit_ranges_match_bit_by_bit() {
    let mut b: Bits = [0; WORDS];
    for (from, to) in [
        (0, 1),
        (3, 64),
        (60, 70),
        (64, 128),
        (100, 8192),
        (8191, 8193),
    ] {
        set_range(&mut b, from, to);
        assert!((from..to).all(|i| bit(&b, i)), "{from}..{to}");
    }
    for (from, to) in [(0, 0), (0, 8193), (2, 3), (1, 65), (70, 99), (200, 8000)] {
        let slow = (from..to).filter(|&i| bit(&b, i)).count();
        assert_eq!(count_range(&b, from, to), slow, "{from}..{to}");
    }
    assert_eq!(highest_block(&b), Some(8192));
}

#[path = "reassembly_proptests.rs"]
mod properties;
