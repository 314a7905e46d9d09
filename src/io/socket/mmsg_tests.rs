use super::cmsg::CONTROL_LEN;
use super::*;

/// `n` packets of 1,400 bytes to `to`, no TOS of their own.
fn to_one_peer(to: &str, n: usize) -> (Vec<libc::iovec>, Vec<Option<SocketAddr>>) {
    let a: SocketAddr = to.parse().expect("addr");
    let iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 1400,
    };
    (vec![iov; n], vec![Some(a); n])
}

#[test]
fn trains_are_equal_sized_packets_to_one_peer_ended_by_a_short_one() {
    let a: SocketAddr = "198.18.0.2:4500".parse().expect("addr");
    let b: SocketAddr = "198.18.0.3:4500".parse().expect("addr");
    let iov = |len| libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: len,
    };
    // (packet sizes and peers, expected (first, count) messages)
    type Case<'a> = (&'a [(usize, SocketAddr)], &'a [(usize, usize)]);
    let cases: &[Case] = &[
        // Three full, one short: one train.
        (&[(1400, a), (1400, a), (1400, a), (900, a)], &[(0, 4)]),
        // A short one ends the train; the next starts a new one.
        (&[(1400, a), (900, a), (1400, a)], &[(0, 2), (2, 1)]),
        // A longer one cannot join.
        (&[(900, a), (1400, a)], &[(0, 1), (1, 1)]),
        // Another peer starts another train.
        (&[(1400, a), (1400, b), (1400, b)], &[(0, 1), (1, 2)]),
    ];
    for (packets, want) in cases {
        let iovs: Vec<_> = packets.iter().map(|(len, _)| iov(*len)).collect();
        let dsts: Vec<_> = packets.iter().map(|(_, d)| Some(*d)).collect();
        let toses = vec![Some(0xB8); packets.len()];
        let mut trains = [(0, 0); MAX_BATCH];
        let m = group_trains(
            &iovs,
            &dsts,
            &toses,
            &vec![&[][..]; iovs.len()],
            Grouping {
                gso: true,
                hop_by_hop: true,
                lone_heads: false,
            },
            &mut trains,
        );
        assert_eq!(&trains[..m], *want, "{packets:?}");
        let m = group_trains(
            &iovs,
            &dsts,
            &toses,
            &vec![&[][..]; iovs.len()],
            Grouping {
                gso: false,
                hop_by_hop: true,
                lone_heads: false,
            },
            &mut trains,
        );
        assert_eq!(m, packets.len(), "without GSO one message per packet");
    }
    // At most MAX_TRAIN segments and MAX_TRAIN_BYTES bytes per train.
    let iovs = vec![iov(100); 150];
    let dsts = vec![Some(a); 150];
    let toses = vec![None; 150];
    let mut trains = [(0, 0); MAX_BATCH];
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &vec![&[][..]; iovs.len()],
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 64), (64, 64), (128, 22)]);
    let iovs = vec![iov(1500); 60];
    let dsts = vec![Some(a); 60];
    let m = group_trains(
        &iovs,
        &dsts,
        &toses[..60],
        &[&[][..]; 60],
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 43), (43, 17)], "65,487 bytes at most");
}

#[test]
fn lone_heads_put_each_trains_first_packet_alone() {
    let sizes = [1000usize, 1000, 1000, 1000, 500, 1000, 1000];
    let bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let iovs: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        })
        .collect();
    let dst: SocketAddr = "198.18.0.2:4500".parse().expect("addr");
    let dsts = vec![Some(dst); sizes.len()];
    let toses = vec![None; sizes.len()];
    let mut trains = [(0usize, 0usize); MAX_BATCH];
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &vec![&[][..]; iovs.len()],
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 5), (5, 2)]);
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &vec![&[][..]; iovs.len()],
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: true,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 1), (1, 4), (5, 1), (6, 1)]);
    // Without GSO every packet is alone anyway.
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &vec![&[][..]; iovs.len()],
        Grouping {
            gso: false,
            hop_by_hop: true,
            lone_heads: true,
        },
        &mut trains,
    );
    assert_eq!(m, sizes.len());
}

#[test]
fn a_train_carries_one_tos_byte() {
    let (iovs, dsts) = to_one_peer("198.18.0.2:4500", 7);
    // EF + ECT(0) twice, EF + CE (a different byte: ECN differs), two
    // Not-ECT, then the socket's own (None) twice.
    let toses = [
        Some(0xBA),
        Some(0xBA),
        Some(0xBB),
        Some(0),
        Some(0),
        None,
        None,
    ];
    let mut trains = [(0, 0); MAX_BATCH];
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &vec![&[][..]; iovs.len()],
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 2), (2, 1), (3, 2), (5, 2)]);
    for &(first, count) in &trains[..m] {
        let t = toses[first];
        assert!(toses[first..first + count].iter().all(|&x| x == t));
    }
    // Only the TOS differs, by one ECN bit: never one train.
    let m = group_trains(
        &iovs[..2],
        &dsts[..2],
        &[Some(2), Some(3)],
        &[&[], &[]],
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 1), (1, 1)]);
}

#[test]
fn a_train_carries_one_hop_by_hop_header() {
    let (iovs, dsts) = to_one_peer("[2001:db8::2]:4500", 7);
    let toses = vec![None; 7];
    let x: &[u8] = &[0, 0, 0x1e, 4, 1, 2, 3, 4];
    let y: &[u8] = &[0, 0, 0x1e, 4, 1, 2, 3, 5];
    // With, with, without, without, another, with, with.
    let hbhs = [x, x, &[], &[], y, x, x];
    let mut trains = [(0, 0); MAX_BATCH];
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &hbhs,
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 2), (2, 2), (4, 1), (5, 2)]);
    for &(first, count) in &trains[..m] {
        let h = hbhs[first];
        assert!(hbhs[first..first + count].iter().all(|&x| x == h));
    }
    // Without GSO: one message each, as always.
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &hbhs,
        Grouping {
            gso: false,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(m, 7);
}

#[test]
fn control_messages_fit_the_buffer() {
    let mut control = Control::EMPTY;
    // SAFETY: an all-zero msghdr is valid (no pointers in use).
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    control.put(&mut h, Some(1400), Some((Family::V6, 0xBA)), &[]);
    assert!(h.msg_controllen <= CONTROL_LEN);
    let found = read_control(&h);
    assert_eq!(found.tos, Some(0xBA), "IPV6_TCLASS reads back");
    assert!(!found.hop_by_hop);
    // SAFETY: as above.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    control.put(&mut h, None, None, &[]);
    assert!(h.msg_control.is_null() && h.msg_controllen == 0);
    // All three, the largest hop-by-hop header carried among them.
    let mut header = [0u8; hop_by_hop::MAX_LEN];
    header[1] = (hop_by_hop::MAX_LEN / 8 - 1) as u8;
    header[2] = 0x1e;
    header[3] = 60;
    // SAFETY: as above.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    control.put(&mut h, Some(1400), Some((Family::V6, 0xBA)), &header);
    assert!(h.msg_controllen <= CONTROL_LEN);
    let found = read_control(&h);
    assert_eq!(found.tos, Some(0xBA));
    assert!(found.hop_by_hop);
    let mut out = [0u8; hop_by_hop::MAX_LEN];
    assert_eq!(hopopts::read(&h, &mut out), Some(header.len()));
    assert_eq!(out, header);
    // Only the hop-by-hop header.
    // SAFETY: as above.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    control.put(&mut h, None, None, &header[..8]);
    assert!(!h.msg_control.is_null());
    assert_eq!(hopopts::read(&h, &mut out), None, "its length byte says 64");
    header[1] = 0;
    control.put(&mut h, None, None, &header[..8]);
    assert_eq!(hopopts::read(&h, &mut out), Some(8));
}

// `hopopts::read` against the encoder the send path uses.
#[test]
fn a_header_round_trips_through_the_control_message() {
    for header in [
        &[0u8, 0, 1, 4, 0, 0, 0, 0][..],
        &[
            17, 1, 0x1e, 4, 0xde, 0xad, 0xbe, 0xef, 1, 6, 0, 0, 0, 0, 0, 0,
        ][..],
        &{
            let mut h = [0u8; hop_by_hop::MAX_LEN];
            h[1] = 7;
            h[2] = 1;
            h[3] = 60;
            h
        }[..],
    ] {
        let mut control = Control::EMPTY;
        // SAFETY: an all-zero msghdr is valid (no pointers in use).
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        control.put(&mut h, None, None, header);
        assert!(!h.msg_control.is_null());
        // SAFETY: CMSG_SPACE only computes a length.
        let space = unsafe { libc::CMSG_SPACE(header.len() as u32) } as usize;
        assert_eq!(h.msg_controllen, space);
        assert!(h.msg_controllen <= hopopts::SPACE);
        let mut out = [0u8; hop_by_hop::MAX_LEN];
        assert_eq!(hopopts::read(&h, &mut out), Some(header.len()));
        assert_eq!(&out[..header.len()], header);
    }
}

#[test]
fn empty_long_absent_and_inconsistent_headers_are_refused() {
    let mut control = Control::EMPTY;
    // SAFETY: an all-zero msghdr is valid (no pointers in use).
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    control.put(&mut h, None, None, &[]);
    assert!(h.msg_control.is_null() && h.msg_controllen == 0);
    control.put(&mut h, None, None, &[0; hop_by_hop::MAX_LEN + 8]);
    assert!(h.msg_control.is_null(), "left untouched");
    assert_eq!(h.msg_controllen, 0);
    let mut out = [0u8; hop_by_hop::MAX_LEN];
    assert_eq!(hopopts::read(&h, &mut out), None, "no control data");
    // A header whose length byte claims 16 bytes in an 8-byte message.
    control.put(&mut h, None, None, &[0, 1, 1, 4, 0, 0, 0, 0]);
    assert!(!h.msg_control.is_null());
    assert_eq!(hopopts::read(&h, &mut out), None);
    // Another message type is not taken for one.
    control.put(&mut h, None, None, &[0, 0, 1, 4, 0, 0, 0, 0]);
    assert_eq!(hopopts::read(&h, &mut out), Some(8));
    // SAFETY: `h` points at `control`, which `put` just filled.
    unsafe { (*libc::CMSG_FIRSTHDR(&h)).cmsg_type = libc::IPV6_TCLASS };
    assert_eq!(hopopts::read(&h, &mut out), None);
}

#[test]
fn ipv4_header_strip() {
    let mut header = [0u8; IPV4_HEADER_LEN];
    header[0] = 0x45;
    let mut area = [1u8, 2, 3, 4, 5, 6, 7, 8];
    assert_eq!(strip_ipv4_header(&header, &mut area, 28), Some(8));
    assert_eq!(area, [1, 2, 3, 4, 5, 6, 7, 8]);

    // IHL 6: four bytes of options precede the payload in the area.
    header[0] = 0x46;
    assert_eq!(strip_ipv4_header(&header, &mut area, 28), Some(4));
    assert_eq!(&area[..4], &[5, 6, 7, 8]);

    let mut area = [0u8; 8];
    for (first, len) in [(0x45, 19), (0x65, 28), (0x44, 28), (0x4f, 28), (0x45, 29)] {
        header[0] = first;
        assert_eq!(
            strip_ipv4_header(&header, &mut area, len),
            None,
            "{first:#x}/{len}"
        );
    }
}

#[test]
fn once_the_kernel_refused_a_hop_by_hop_train_such_packets_go_alone() {
    let (iovs, dsts) = to_one_peer("[2001:db8::2]:4500", 6);
    let toses = vec![None; 6];
    let x: &[u8] = &[0, 0, 0x1e, 4, 1, 2, 3, 4];
    let hbhs = [x, x, x, &[], &[], &[]];
    let mut trains = [(0, 0); MAX_BATCH];
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &hbhs,
        Grouping {
            gso: true,
            hop_by_hop: true,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 3), (3, 3)], "the kernel takes both");
    // After a refusal: each packet with the header alone, the others
    // still in one train.
    let m = group_trains(
        &iovs,
        &dsts,
        &toses,
        &hbhs,
        Grouping {
            gso: true,
            hop_by_hop: false,
            lone_heads: false,
        },
        &mut trains,
    );
    assert_eq!(&trains[..m], &[(0, 1), (1, 1), (2, 1), (3, 3)]);
}
