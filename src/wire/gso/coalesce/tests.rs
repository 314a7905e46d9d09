use super::super::split::Splitter;
use super::super::testutil::{Spec, payload, shapes};
use super::*;

const POLICY: InnerPolicy = InnerPolicy {
    allow_udp4_zero_checksum: true,
    allow_unverifiable_protocols: true,
    allow_udplite_partial_coverage: true,
    fill_udp4_zero_checksum: false,
};
const CONFIG: TrainConfig = TrainConfig {
    max_segments: DEFAULT_MAX_SEGMENTS,
    udp: true,
};

fn reason<T>(r: Result<T, Refused<'_>>) -> Result<T, NotCoalescible> {
    r.map_err(|e| e.reason)
}

fn verified(p: &[u8]) -> Verified<'_> {
    match check(p, POLICY) {
        Ok(Checked::Verified(v)) => v,
        other => panic!("test packet not verified: {other:?}"),
    }
}

/// The packets a sender's stack would emit for `sizes`: contiguous
/// sequence numbers, counting IDs, PSH on the last.
fn flow(spec: &Spec, sizes: &[usize]) -> Vec<Vec<u8>> {
    let data = payload(sizes.iter().sum(), 11);
    let mut at = 0;
    let mut s = spec.clone();
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            if i + 1 == sizes.len() && spec.proto == protocol::TCP {
                s.tcp_flags |= tcp::PSH;
            }
            let p = s.build(&data[at..at + n], false);
            at += n;
            s.seq = s.seq.wrapping_add(n as u32);
            s.id = s.id.wrapping_add(1);
            p
        })
        .collect()
}

/// Coalesces all of `packets`; every push must succeed.
fn coalesce_all(packets: &[Vec<u8>], buf: &mut [u8]) -> usize {
    let mut train = Train::start(buf, verified(&packets[0]), CONFIG).expect("starts");
    for p in &packets[1..] {
        train.push(verified(p)).expect("joins");
    }
    assert_eq!(train.segments(), packets.len());
    train.finish()
}

#[test]
fn contiguous_segments_coalesce_and_split_back_byte_for_byte() {
    for (v6, proto) in shapes() {
        for sizes in [
            &[1000, 1000, 1000, 1000][..],
            &[1000, 1000, 1000, 1][..],
            &[1448, 1448][..],
            &[7, 3][..],
        ] {
            let mut spec = Spec::new(v6, proto);
            spec.ttl = 17;
            spec.tos = 0x28;
            spec.df = !v6 && sizes.len() == 2; // IDs checked without DF
            if proto == protocol::TCP {
                spec.tcp_options = vec![1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8];
            }
            let packets = flow(&spec, sizes);
            let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
            let n = coalesce_all(&packets, &mut buf);
            let hdr = VirtioNetHdr::parse(&buf).expect("header");
            let gso = sizes[0];
            // The train is what the sender's kernel would have handed
            // over as one TSO/USO packet.
            let mut whole = spec.clone();
            if proto == protocol::TCP {
                whole.tcp_flags |= tcp::PSH;
            }
            let all = payload(sizes.iter().sum(), 11);
            assert_eq!(hdr, whole.vnet(gso as u16));
            assert_eq!(buf[VIRTIO_NET_HDR_LEN..n], whole.build(&all, true));
            // And splitting it gives back the segments.
            let s = Splitter::new(&hdr, &buf[VIRTIO_NET_HDR_LEN..n]).expect("splits");
            assert_eq!(s.count(), packets.len());
            for (i, original) in packets.iter().enumerate() {
                let mut out = vec![0u8; 2000];
                let v = s.write_segment(i, &mut out, POLICY).expect("valid");
                assert_eq!(&out[..v.total_len], &original[..], "{v6} {proto} {i}");
            }
        }
    }
}

#[test]
fn a_train_of_one_is_the_packet_behind_a_zero_header() {
    for (v6, proto) in shapes() {
        let p = flow(&Spec::new(v6, proto), &[500]).remove(0);
        let mut buf = vec![0xEEu8; 600];
        let train = Train::start(&mut buf, verified(&p), CONFIG).expect("starts");
        assert!(train.is_closed() == (proto == protocol::TCP)); // PSH closes
        let n = train.finish();
        assert_eq!(buf[..VIRTIO_NET_HDR_LEN], [0u8; VIRTIO_NET_HDR_LEN]);
        assert_eq!(buf[VIRTIO_NET_HDR_LEN..n], p[..]);
    }
}

/// Starts a train with `first` and pushes `second`; returns the refusal.
fn refusal(first: &[u8], second: &[u8]) -> Option<NotCoalescible> {
    let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
    let mut train = Train::start(&mut buf, verified(first), CONFIG).expect("starts");
    let before = (train.segments(), train.len);
    let r = reason(train.push(verified(second))).err();
    if r.is_some() {
        assert_eq!(
            (train.segments(), train.len),
            before,
            "refusal left the train"
        );
    }
    r
}

#[test]
fn what_differs_is_not_coalesced() {
    for (v6, proto) in shapes() {
        let base = Spec::new(v6, proto);
        let tcp_only = proto == protocol::TCP;
        let [a, b] = <[Vec<u8>; 2]>::try_from(flow(
            &{
                let mut s = base.clone();
                s.tcp_flags = tcp::ACK;
                s
            },
            &[1000, 1000],
        ))
        .expect("two");
        // flow() set PSH on b; a train of a then b is fine.
        assert_eq!(refusal(&a, &b), None);
        let second = |f: &dyn Fn(&mut Spec)| {
            let mut s = base.clone();
            s.seq = s.seq.wrapping_add(1000);
            s.id = s.id.wrapping_add(1);
            f(&mut s);
            s.build(&payload(1000, 12), false)
        };
        let mut cases: Vec<(Vec<u8>, NotCoalescible)> = vec![
            (second(&|s| s.src_port += 1), NotCoalescible::Flow),
            (second(&|s| s.ttl -= 1), NotCoalescible::IpHeader),
            (second(&|s| s.tos = 4), NotCoalescible::IpHeader),
            (
                Spec::new(!v6, proto).build(&payload(1000, 1), false),
                NotCoalescible::Flow,
            ),
            (
                {
                    let mut s = base.clone();
                    s.seq = s.seq.wrapping_add(1000);
                    s.build(&payload(1001, 12), false)
                },
                NotCoalescible::Size,
            ),
        ];
        if tcp_only {
            cases.extend([
                (second(&|s| s.seq += 1), NotCoalescible::Sequence),
                (second(&|s| s.seq -= 1000), NotCoalescible::Sequence),
                (
                    second(&|s| s.tcp_options = vec![1, 1, 1, 1]),
                    NotCoalescible::TcpHeader,
                ),
                (
                    second(&|s| s.tcp_flags |= tcp::FIN),
                    NotCoalescible::TcpFlags,
                ),
                (
                    second(&|s| s.tcp_flags |= tcp::CWR),
                    NotCoalescible::TcpFlags,
                ),
                (
                    second(&|s| s.tcp_flags |= tcp::SYN),
                    NotCoalescible::TcpFlags,
                ),
                (
                    second(&|s| s.tcp_flags |= tcp::RST),
                    NotCoalescible::TcpFlags,
                ),
                (
                    second(&|s| s.tcp_flags |= tcp::URG),
                    NotCoalescible::TcpFlags,
                ),
            ]);
        }
        if !v6 {
            cases.push((
                second(&|s| {
                    s.df = false;
                }),
                NotCoalescible::IpHeader,
            ));
        }
        if v6 {
            // The flow label (not covered by any checksum), which
            // wireguard-go does not compare but the kernel's GRO does.
            let mut p = second(&|_| {});
            p[3] ^= 1;
            cases.push((p, NotCoalescible::IpHeader));
        }
        for (p, why) in cases {
            assert_eq!(refusal(&a, &p), Some(why), "{v6} {proto}");
        }
        if !v6 {
            // Without DF the identification must count up by one.
            let mut s = base.clone();
            s.df = false;
            let first = s.build(&payload(1000, 18), false);
            s.seq = s.seq.wrapping_add(1000);
            s.id = s.id.wrapping_add(2);
            let gap = s.build(&payload(1000, 19), false);
            assert_eq!(refusal(&first, &gap), Some(NotCoalescible::IpHeader));
            s.id = s.id.wrapping_sub(1);
            let next = s.build(&payload(1000, 19), false);
            assert_eq!(refusal(&first, &next), None);
        }
    }
}

#[test]
fn psh_or_a_short_segment_closes_the_train() {
    for (v6, proto) in shapes() {
        let spec = Spec::new(v6, proto);
        let hl = if v6 { 40 } else { 20 } + if proto == protocol::TCP { 20 } else { 8 };
        // A short segment in the middle: 1000, 999, then 1000 refused.
        let mut s = spec.clone();
        let mut packets = Vec::new();
        for n in [1000, 999, 1000] {
            packets.push(s.build(&payload(n, 13), false));
            s.seq = s.seq.wrapping_add(n as u32);
            s.id = s.id.wrapping_add(1);
        }
        let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
        let mut train = Train::start(&mut buf, verified(&packets[0]), CONFIG).expect("start");
        train.push(verified(&packets[1])).expect("short one joins");
        assert!(train.is_closed());
        let refused = train.push(verified(&packets[2])).expect_err("closed");
        assert_eq!(refused.reason, NotCoalescible::Closed);
        assert_eq!(train.finish(), VIRTIO_NET_HDR_LEN + hl + 1000 + 999);
        // The refused packet comes back and starts the next train.
        let mut next = vec![0u8; TRAIN_BUFFER_LEN];
        let train = Train::start(&mut next, refused.packet, CONFIG).expect("starts");
        assert_eq!(train.finish(), VIRTIO_NET_HDR_LEN + packets[2].len());
        assert_eq!(
            next[VIRTIO_NET_HDR_LEN..][..packets[2].len()],
            packets[2][..]
        );
        if proto == protocol::TCP {
            // PSH in the middle: it joins and ends the train.
            let mut s = spec.clone();
            let a = s.build(&payload(1000, 14), false);
            s.seq = s.seq.wrapping_add(1000);
            s.id = s.id.wrapping_add(1);
            s.tcp_flags |= tcp::PSH;
            let b = s.build(&payload(1000, 15), false);
            s.seq = s.seq.wrapping_add(1000);
            s.tcp_flags = tcp::ACK;
            let c = s.build(&payload(1000, 16), false);
            let mut train = Train::start(&mut buf, verified(&a), CONFIG).expect("start");
            train.push(verified(&b)).expect("PSH joins as the last");
            assert_eq!(
                reason(train.push(verified(&c))),
                Err(NotCoalescible::Closed)
            );
            // A PSH first segment is a train of one.
            let mut train = Train::start(&mut buf, verified(&b), CONFIG).expect("start");
            assert_eq!(
                reason(train.push(verified(&c))),
                Err(NotCoalescible::Closed)
            );
        }
    }
}

#[test]
fn limits_are_enforced() {
    for (v6, proto) in shapes() {
        let spec = Spec::new(v6, proto);
        let hl = if v6 { 40 } else { 20 } + if proto == protocol::TCP { 20 } else { 8 };
        // Segments of 1400 up to 65535 bytes: the one that would pass
        // 64 KiB is refused.
        let fits = (MAX_TRAIN_PACKET - hl) / 1400;
        let sizes = vec![1400; fits + 1];
        // PSH only on the last, which is the one refused.
        let packets = flow(&spec, &sizes);
        let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
        let big = TrainConfig {
            max_segments: 1000,
            udp: true,
        };
        let mut train = Train::start(&mut buf, verified(&packets[0]), big).expect("start");
        for p in &packets[1..fits] {
            train.push(verified(p)).expect("fits");
        }
        assert_eq!(
            reason(train.push(verified(&packets[fits]))),
            Err(NotCoalescible::TooLong)
        );
        assert_eq!(train.segments(), fits);
        let n = train.finish();
        assert!(n - VIRTIO_NET_HDR_LEN <= MAX_TRAIN_PACKET);
        // The segment limit.
        let small = TrainConfig {
            max_segments: 3,
            udp: true,
        };
        let mut train = Train::start(&mut buf, verified(&packets[0]), small).expect("start");
        train.push(verified(&packets[1])).expect("2");
        train.push(verified(&packets[2])).expect("3");
        assert!(train.is_closed());
        assert_eq!(
            reason(train.push(verified(&packets[3]))),
            Err(NotCoalescible::TooManySegments)
        );
        // A buffer too short for the next payload.
        let mut short = vec![0u8; VIRTIO_NET_HDR_LEN + hl + 1400 + 100];
        let mut train = Train::start(&mut short, verified(&packets[0]), big).expect("start");
        assert_eq!(
            reason(train.push(verified(&packets[1]))),
            Err(NotCoalescible::BufferTooSmall)
        );
        assert_eq!(
            reason(Train::start(&mut short[..100], verified(&packets[0]), big)).err(),
            Some(NotCoalescible::BufferTooSmall)
        );
    }
}

#[test]
fn what_cannot_start_a_train() {
    let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
    // A policy exception is never Verified.
    let mut zero = Spec::new(false, protocol::UDP).build(b"hello", false);
    zero[26..28].copy_from_slice(&[0, 0]);
    assert!(matches!(
        check(&zero, POLICY),
        Ok(Checked::Exception(v)) if v.verdict == InnerVerdict::Udp4ZeroChecksum
    ));
    let gre = crate::wire::inner::build::ipv4([1, 2, 3, 4], [5, 6, 7, 8], 47, b"x");
    assert!(matches!(check(&gre, POLICY), Ok(Checked::Exception(_))));
    // Corrupted: not even a packet that may go on.
    let mut bad = Spec::new(false, protocol::TCP).build(b"hello", false);
    bad[44] ^= 1;
    assert_eq!(check(&bad, POLICY).err(), Some(InnerError::Checksum));
    let icmp = crate::wire::inner::build::ipv4([1, 2, 3, 4], [5, 6, 7, 8], 1, b"ping");
    assert_eq!(
        reason(Train::start(&mut buf, verified(&icmp), CONFIG)).err(),
        Some(NotCoalescible::Protocol)
    );
    let udp = Spec::new(true, protocol::UDP).build(b"hello", false);
    assert_eq!(
        reason(Train::start(
            &mut buf,
            verified(&udp),
            TrainConfig::default()
        ))
        .err(),
        Some(NotCoalescible::UdpDisabled)
    );
    let mut opts = Spec::new(false, protocol::TCP);
    opts.ip_options = vec![1, 1, 1, 0];
    assert_eq!(
        reason(Train::start(
            &mut buf,
            verified(&opts.build(b"x", false)),
            CONFIG
        ))
        .err(),
        Some(NotCoalescible::IpOptions)
    );
    let mut syn = Spec::new(true, protocol::TCP);
    syn.tcp_flags = tcp::SYN | tcp::ACK;
    assert_eq!(
        reason(Train::start(
            &mut buf,
            verified(&syn.build(b"x", false)),
            CONFIG
        ))
        .err(),
        Some(NotCoalescible::TcpFlags)
    );
    let empty = Spec::new(true, protocol::TCP).build(b"", false);
    assert_eq!(
        reason(Train::start(&mut buf, verified(&empty), CONFIG)).err(),
        Some(NotCoalescible::Empty)
    );
}

#[test]
fn random_packets_never_panic_a_train() {
    let mut x: u64 = 0x0bad_5eed_1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
    let mut joined = 0;
    for _ in 0..2_000 {
        let r = next();
        let (v6, proto) = shapes()[(r % 4) as usize];
        let sizes = [1 + (r >> 8) as usize % 1500; 4];
        let mut packets = flow(&Spec::new(v6, proto), &sizes);
        // Mutate a header byte of some packets and fix nothing: most
        // then fail validation, some pass and must be refused or
        // joined without a panic.
        for p in packets.iter_mut().skip(1) {
            let m = next();
            if m & 3 == 0 {
                let at = (m >> 8) as usize % 60.min(p.len());
                p[at] = (m >> 32) as u8;
            }
        }
        let config = TrainConfig {
            max_segments: 1 + (r >> 40) as usize % 4,
            udp: r & 0x100 != 0,
        };
        let Ok(Checked::Verified(first)) = check(&packets[0], POLICY) else {
            continue;
        };
        let Ok(mut train) = Train::start(&mut buf, first, config) else {
            continue;
        };
        for p in &packets[1..] {
            if let Ok(Checked::Verified(v)) = check(p, POLICY)
                && train.push(v).is_ok()
            {
                joined += 1;
            }
        }
        let n = train.finish();
        assert!(n <= TRAIN_BUFFER_LEN);
    }
    assert!(joined > 100, "the loop reached push: {joined}");
}

#[test]
fn a_byte_the_copy_changed_is_caught_and_leaves_the_train_intact() {
    use super::super::testutil::{Fault, arm};
    for (v6, proto) in shapes() {
        let packets = flow(&Spec::new(v6, proto), &[800, 800, 800]);
        let hl = if v6 { 40 } else { 20 } + if proto == protocol::TCP { 20 } else { 8 };
        let mut buf = vec![0u8; TRAIN_BUFFER_LEN];
        // The first packet's copy: any header byte, or its payload.
        for fault in [Fault::Header(0), Fault::Header(hl - 1), Fault::Payload(799)] {
            arm(fault);
            assert_eq!(
                reason(Train::start(&mut buf, verified(&packets[0]), CONFIG)).err(),
                Some(NotCoalescible::CopyCorrupted),
                "{fault:?}"
            );
        }
        let mut train = Train::start(&mut buf, verified(&packets[0]), CONFIG).expect("start");
        arm(Fault::Payload(400));
        assert_eq!(
            reason(train.push(verified(&packets[1]))),
            Err(NotCoalescible::CopyCorrupted)
        );
        // The train is as before: the same packet joins on a clean copy.
        train.push(verified(&packets[1])).expect("joins");
        train.push(verified(&packets[2])).expect("joins");
        let n = train.finish();
        let hdr = VirtioNetHdr::parse(&buf).expect("header");
        let s = Splitter::new(&hdr, &buf[VIRTIO_NET_HDR_LEN..n]).expect("splits");
        for (i, original) in packets.iter().enumerate() {
            let mut out = vec![0u8; 1000];
            let v = s.write_segment(i, &mut out, POLICY).expect("valid");
            assert_eq!(&out[..v.total_len], &original[..]);
        }
    }
}

#[test]
fn a_payload_changed_in_the_train_is_caught() {
    for (v6, proto) in shapes() {
        let p = Spec::new(v6, proto).build(&payload(300, 17), false);
        let h = Headers::parse(&p).expect("parses");
        let (l4, data) = p[h.ip_len..].split_at(h.l4_len);
        assert!(payload_intact(&h, l4, data));
        let mut copy = data.to_vec();
        // The observed corruption: one 16-byte block replaced by its
        // neighbour.
        copy.copy_within(0..16, 16);
        assert!(!payload_intact(&h, l4, &copy));
    }
}
