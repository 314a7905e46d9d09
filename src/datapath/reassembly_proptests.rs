//! Reassembler property tests: random cuts and orders, checked against etherparse.

use super::*;
use proptest::prelude::*;

/// Cuts `len` bytes into fragments at random multiples of 8.
fn cuts(len: usize, seeds: &[u16]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = seeds
        .iter()
        .map(|s| (usize::from(*s) % len.max(1)) / 8 * 8)
        .filter(|&p| p > 0 && p < len)
        .collect();
    points.sort();
    points.dedup();
    let mut ranges = Vec::new();
    let mut start = 0;
    for p in points.into_iter().chain([len]) {
        ranges.push((start, p));
        start = p;
    }
    ranges
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
}

fn oracle(fragments: &[Vec<u8>]) -> Option<(u8, Vec<u8>)> {
    use etherparse::SlicedPacket;
    use etherparse::defrag::IpDefragPool;
    let mut pool = IpDefragPool::<(), ()>::new();
    for f in fragments {
        let sliced = SlicedPacket::from_ip(f).ok()?;
        if let Ok(Some(done)) = pool.process_sliced_packet(&sliced, (), ()) {
            return Some((done.ip_number.0, done.payload));
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any fragmentation of a random datagram, in any order, gives the
    /// datagram back, whole and valid, and etherparse's reassembly of
    /// the same fragments agrees byte for byte.
    #[test]
    fn any_fragmentation_in_any_order_gives_the_original(
        len in 9usize..12_000,
        v6 in any::<bool>(),
        opts in any::<bool>(),
        seeds in proptest::collection::vec(any::<u16>(), 0..24),
        order in any::<u64>(),
        seed in any::<u8>(),
    ) {
        let data = payload(len, seed);
        let (packet, unfrag) = if v6 {
            let p = ipv6(A6, B6, protocol::UDP, &data);
            (if opts { with_dest_opts(&p) } else { p }, 40)
        } else {
            (ipv4(A4, B4, protocol::UDP, &data), 20)
        };
        let body = packet.len() - unfrag;
        // The first fragment holds the transport header (and options).
        let ranges: Vec<_> = cuts(body, &seeds)
            .into_iter()
            .filter(|&(s, _)| s == 0 || s >= 16)
            .collect();
        let ranges: Vec<_> = ranges.iter().enumerate().map(|(i, &(s, _))| {
            (s, ranges.get(i + 1).map_or(body, |n| n.0))
        }).collect();
        let mut fs = if v6 {
            frag6(&packet, unfrag, 6, 1, &ranges)
        } else {
            frag4(&packet, 1, &ranges)
        };
        shuffle(&mut fs, order);
        let mut rig = Rig::new(ReassemblyConfig::default());
        let whole = rig.push_all(&fs);
        let packet = if v6 { packet } else { ided(&packet, 1) };
        prop_assert!(whole == vec![packet.clone()], "lengths {:?}", whole.iter().map(Vec::len).collect::<Vec<_>>());
        prop_assert!(verified(&whole[0]));
        prop_assert_eq!(rig.counters.total_drops(), 0);
        prop_assert_eq!(rig.r.bytes_in_flight(), 0);
        // etherparse walks extension headers behind a fragment header
        // in every fragment, so it cannot reassemble fragments that
        // carry destination options; it still reads the whole packet.
        if fs.len() > 1 && !(v6 && opts) {
            let (next, bytes) = oracle(&fs).expect("etherparse reassembles them");
            prop_assert_eq!(next, protocol::UDP);
            prop_assert_eq!(&bytes[..], &packet[unfrag..]);
        }
        // And etherparse reads what came out, options and all.
        let parsed = etherparse::SlicedPacket::from_ip(&whole[0]);
        prop_assert!(parsed.is_ok());
        if let Ok(p) = parsed {
            prop_assert!(matches!(p.transport, Some(etherparse::TransportSlice::Udp(_))));
        }
    }

    /// Garbage never panics, never holds more than the caps, and every
    /// fragment that went in is accounted for.
    #[test]
    fn garbage_never_panics_nor_exceeds_the_caps(
        packets in proptest::collection::vec(
            (any::<bool>(), any::<u16>(), any::<bool>(), any::<u8>(),
             proptest::collection::vec(any::<u8>(), 0..3000)),
            1..48),
        steps in proptest::collection::vec(0u64..20_000, 48),
    ) {
        let config = ReassemblyConfig {
            max_bytes: 8 * CHUNK,
            max_bytes_per_destination: 6 * CHUNK,
            max_datagrams: 4,
            max_datagrams_per_destination: 3,
            timeout: Duration::from_secs(10),
            ..ReassemblyConfig::default()
        };
        let mut rig = Rig::new(config);
        for (i, (v6, offset, more, id, mut body)) in packets.into_iter().enumerate() {
            // Valid-looking fragment headers over random bodies, and
            // sometimes a random byte in the header itself.
            let mut f = if v6 {
                let p = ipv6(A6, B6, protocol::UDP, &[]);
                let mut f = frag6(&p, 40, 6, u32::from(id % 3), &[(0, 8)]).remove(0);
                f.truncate(48);
                let field = (offset & 0xFFF8) | u16::from(more);
                f[42..44].copy_from_slice(&field.to_be_bytes());
                f
            } else {
                let p = ipv4(A4, B4, protocol::UDP, &[]);
                let mut f = frag4(&p, u16::from(id % 3), &[(0, 8)]).remove(0);
                f.truncate(20);
                let field = (offset & 0x1FFF) | if more { 0x2000 } else { 0 };
                f[6..8].copy_from_slice(&field.to_be_bytes());
                f
            };
            let hl = f.len();
            f.append(&mut body);
            if v6 {
                let plen = (f.len() - 40).min(65_535) as u16;
                f[4..6].copy_from_slice(&plen.to_be_bytes());
            } else {
                let total = f.len().min(65_535) as u16;
                f[2..4].copy_from_slice(&total.to_be_bytes());
                f[10..12].copy_from_slice(&[0, 0]);
                let c = checksum::finish(checksum::sum(&f[..20]));
                f[10..12].copy_from_slice(&c.to_be_bytes());
            }
            if id % 7 == 0 && hl > 1 {
                let at = usize::from(id) % hl;
                f[at] = f[at].wrapping_add(id);
            }
            rig.now += Duration::from_millis(steps[i % steps.len()]);
            rig.r.expire(rig.now, &mut |_| {});
            let _ = rig.push(&f);
            prop_assert!(rig.r.bytes_in_flight() <= 8 * CHUNK);
            prop_assert!(rig.r.bytes_allocated() <= 8 * CHUNK);
            prop_assert!(rig.r.datagrams_in_flight() <= 4);
        }
        rig.now += Duration::from_secs(11);
        rig.r.expire(rig.now, &mut |_| {});
        prop_assert_eq!(rig.r.datagrams_in_flight(), 0);
        prop_assert_eq!(rig.r.bytes_in_flight(), 0);
    }
}
