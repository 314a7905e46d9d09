use super::*;

/// Large packets go alone but in their place: the order of the
/// sends is the order of the batch.
#[test]
fn runs_keep_the_batch_order_around_large_packets() {
    for large in [
        vec![],
        vec![0],
        vec![3],
        vec![0, 1, 5],
        vec![7],
        vec![2, 3, 4],
    ] {
        let n = 8;
        let mut order = Vec::new();
        let mut start = 0;
        while let Some((run, alone)) = next_run(start, n, |i| large.contains(&i)) {
            assert!(run.clone().all(|i| !large.contains(&i)), "{large:?}");
            order.extend(run.clone());
            if let Some(i) = alone {
                order.push(i);
            }
            start = alone.map_or(run.end, |i| i + 1);
        }
        assert_eq!(order, (0..n).collect::<Vec<_>>(), "large {large:?}");
    }
}
use crate::wire::gso::testutil::{Spec, payload};
use crate::wire::inner::{InnerPolicy, validate};
use crate::wire::ip::protocol;

/// A TSO super-packet of exactly one batch of segments, then a single
/// packet: the batch must be sealed before the single packet goes in
/// (it once went in at index 64 of 64 and panicked the thread).
#[test]
fn a_batch_filled_by_a_split_is_sealed_before_the_next_packet() {
    const SLOTS: usize = 8;
    let mut batch = Batch::new(SLOTS, 2048);
    let spec = Spec::new(false, protocol::TCP);
    let mut rx = Batch::new(2, 65535);
    let sizes = [SLOTS * 1000, 300];
    for (slot, size) in rx.slots().iter_mut().zip(sizes) {
        assert!(slot.fill(&spec.build(&payload(size, 3), true)));
        slot.meta.vnet = if size > 1000 {
            spec.vnet(1000).to_bytes()
        } else {
            let mut single = spec.vnet(1000);
            single.gso_type = 0;
            single.gso_size = 0;
            single.to_bytes()
        };
    }
    rx.set_len(2);
    let mut sealed = Vec::new();
    let mut refused = Vec::new();
    let mut filled = 0;
    for slot in rx.packets_mut() {
        filled = take_packet(
            true,
            InnerPolicy::default(),
            None,
            slot,
            &mut batch,
            filled,
            &mut |full: &mut Batch| {
                for p in full.packets() {
                    sealed.push(p.data().to_vec());
                }
            },
            &mut |reason| refused.push(reason),
        );
        assert!(filled <= SLOTS);
    }
    assert_eq!(refused, []);
    assert_eq!(sealed.len(), SLOTS, "the split filled one batch");
    assert_eq!(filled, 1, "the single packet starts the next");
    assert_eq!(batch.slots()[0].len(), 40 + 300);
    for p in sealed
        .iter()
        .chain([batch.slots()[0].data().to_vec()].iter())
    {
        assert!(
            validate(p, InnerPolicy::default()).is_ok(),
            "checksums computed"
        );
    }
}

/// Fragments as the kernel writes them to a TUN device with offloads
/// (a virtio-net header with no GSO and no NEEDS_CSUM) become one
/// whole packet in the batch, whose checksum then validates; without
/// a reassembler they are dropped as fragments, as before.
#[test]
fn fragments_become_one_whole_packet_in_the_batch() {
    use crate::datapath::Counters;
    use crate::datapath::reassembly::{Reassembler, ReassemblyConfig};
    use crate::wire::checksum;
    use crate::wire::inner::build;
    use std::sync::Arc;

    let packet = build::ipv4(
        [198, 18, 0, 1],
        [198, 19, 0, 2],
        protocol::UDP,
        &payload(5000, 1),
    );
    let body = &packet[20..];
    let fragments: Vec<Vec<u8>> = (0..body.len().div_ceil(1400))
        .map(|i| {
            let (s, e) = (i * 1400, ((i + 1) * 1400).min(body.len()));
            let mut f = packet[..20].to_vec();
            f.extend_from_slice(&body[s..e]);
            let len = f.len() as u16;
            f[2..4].copy_from_slice(&len.to_be_bytes());
            let more = if e < body.len() { 0x2000 } else { 0 };
            f[6..8].copy_from_slice(&((s / 8) as u16 | more).to_be_bytes());
            f[10..12].copy_from_slice(&[0, 0]);
            let c = checksum::finish(checksum::sum(&f[..20]));
            f[10..12].copy_from_slice(&c.to_be_bytes());
            f
        })
        .collect();
    let counters = Arc::new(Counters::default());
    let mut reassembler = Reassembler::new(ReassemblyConfig::default(), 65_535, counters.clone());
    for with in [true, false] {
        let mut batch = Batch::new(4, 65_535);
        let mut refused = Vec::new();
        let mut filled = 0;
        for f in &fragments {
            let mut slot = PacketBuf::new(2048);
            assert!(slot.fill(f));
            slot.meta.vnet = [0; 10]; // no GSO, no NEEDS_CSUM
            filled = take_packet(
                true,
                InnerPolicy::default(),
                with.then(|| (&mut reassembler, std::time::Instant::now())),
                &mut slot,
                &mut batch,
                filled,
                &mut |_| panic!("nothing to seal"),
                &mut |reason| refused.push(reason),
            );
        }
        if with {
            assert_eq!((filled, refused.as_slice()), (1, &[][..]));
            let whole = batch.slots()[0].data();
            assert_eq!(whole.len(), packet.len());
            assert_eq!(&whole[20..], &packet[20..]);
            assert!(validate(whole, InnerPolicy::default()).is_ok());
        } else {
            assert_eq!(filled, 0);
            assert_eq!(refused, vec![DropReason::Fragment; fragments.len()]);
        }
    }
}

#[test]
fn the_token_bucket_allows_a_burst_then_its_rate() {
    let mut b = TokenBucket::new(3, 10);
    let t0 = Instant::now();
    assert_eq!((0..5).filter(|_| b.take(t0)).count(), 3, "the burst");
    assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
    assert!(b.take(t0 + Duration::from_millis(100)), "one earned");
    assert!(!b.take(t0 + Duration::from_millis(100)));
    // A long quiet time refills to the burst, no more.
    let later = t0 + Duration::from_secs(60);
    assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
    // Time going backwards (a clock read out of order) earns nothing.
    assert!(!b.take(t0));
}

#[test]
fn a_bad_virtio_header_is_a_counted_drop_not_a_packet() {
    let mut batch = Batch::new(4, 2048);
    let mut slot = PacketBuf::new(2048);
    assert!(slot.fill(&[0x45; 60]));
    slot.meta.vnet = [0, 0x42, 0, 0, 0, 0, 0, 0, 0, 0]; // unknown GSO type
    let mut refused = Vec::new();
    let filled = take_packet(
        true,
        InnerPolicy::default(),
        None,
        &mut slot,
        &mut batch,
        0,
        &mut |_| panic!("nothing to seal"),
        &mut |reason| refused.push(reason),
    );
    assert_eq!(
        (filled, refused.as_slice()),
        (0, &[DropReason::Offload][..])
    );
}
