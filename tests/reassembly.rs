//! End to end: UDP datagrams larger than the tunnel MTU, which the kernel
//! hands to the TUN device as IP fragments, through a real two-namespace
//! tunnel (see tests/e2e.rs for the lab): reassembled by the sender,
//! sealed whole, fragmented and reassembled by the kernels on the outer
//! path, delivered whole. Plus fragments crafted with a raw socket, each
//! kind of which must move its own counter, and the memory cap.
//!
//! Needs root (skips, said so, without it; fails under
//! ESPTUN_REQUIRE_NETNS=1). Each lab has its own namespaces and addresses
//! and removes itself, also when an assertion fails.

mod common;

use common::{check, fail, lab};

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use esptun::lab::demo::{LabOptions, Side, TunnelLab};
use esptun::wire::checksum;
use esptun::wire::inner::build;
use esptun::wire::ip::protocol;
use esptun::wire::outer::Encap;

const SIZES: [usize; 3] = [2_000, 9_000, 65_000];

fn status(lab: &TunnelLab, side: Side) -> serde_json::Value {
    lab.status(side)
        .unwrap_or_else(|e| fail(lab, &format!("status of {side:?}: {e}")))
}

fn reassembly(s: &serde_json::Value, key: &str) -> u64 {
    s["outbound"]["reassembly"][key]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Polls `side`'s status (bounded, 10 s) until `done` holds; the last one.
fn wait_for(
    lab: &TunnelLab,
    side: Side,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(lab, side);
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `side` with `[reassembly]` settings appended to its config.
fn start_with_reassembly(lab: &TunnelLab, side: Side, settings: &str) {
    let (local, remote) = lab.outer(side);
    let text = format!(
        "{}\n[reassembly]\n{settings}\n",
        lab.config_text(side, local, remote)
    );
    if let Err(e) = lab.write_config_text(side, &text) {
        fail(lab, &format!("config of {side:?}: {e}"));
    }
    if let Err(e) = lab.start(side, &[]) {
        fail(lab, &format!("starting {side:?}: {e}"));
    }
}

fn large_datagrams_echo_byte_exact(ipv6: bool, raw_esp: bool) {
    let name = match (ipv6, raw_esp) {
        (false, false) => "frag_echo_v4",
        (true, false) => "frag_echo_v6",
        (false, true) => "frag_echo_v4_esp",
        (true, true) => "frag_echo_v6_esp",
    };
    let Some(lab) = lab(
        name,
        LabOptions {
            tag: name.replace("frag_echo_", "fe").replace('_', ""),
            subnet: 70 + u8::from(ipv6) + 5 * u8::from(raw_esp),
            ipv6,
            encap: if raw_esp { Encap::RawEsp } else { Encap::NATT },
            overlay: raw_esp,
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
    let gso_before =
        [Side::A, Side::B].map(|side| status(&lab, side)["offloads"]["udp_gso"].clone());
    const COUNT: u32 = 4;
    for size in SIZES {
        let report = lab
            .udp_exchange(COUNT, size)
            .unwrap_or_else(|e| fail(&lab, &format!("udp {size}: {e}")));
        check(&lab, report.is_clean(COUNT), || {
            format!("{size}-byte datagrams not echoed byte-exact: {report:?}")
        });
    }
    // Every datagram went out as fragments of the TUN device both ways
    // (the client's from a, the echoes from b) and came back whole.
    let total = u64::from(COUNT) * SIZES.len() as u64;
    for (side, gso) in [Side::A, Side::B].into_iter().zip(gso_before) {
        let s = wait_for(&lab, side, |s| reassembly(s, "reassembled") >= total);
        check(&lab, reassembly(&s, "reassembled") >= total, || {
            format!("{side:?} reassembled fewer than {total}: {s:#}")
        });
        for failure in ["timeout", "overlap", "too_big", "memory", "malformed"] {
            check(&lab, reassembly(&s, failure) == 0, || {
                format!("{side:?}: reassembly {failure}: {s:#}")
            });
        }
        for direction in ["outbound", "inbound"] {
            // The kernel's own IPv6 chatter into the TUN is no_sa.
            let dropped = s[direction]["dropped"].as_u64().unwrap_or(u64::MAX);
            let chatter = s[direction]["drops"]["no_sa"].as_u64().unwrap_or(0);
            check(&lab, dropped == chatter, || {
                format!("{side:?} {direction} dropped packets: {s:#}")
            });
        }
        // A large packet in a GSO train would have turned it off.
        check(&lab, s["offloads"]["udp_gso"] == gso, || {
            format!("{side:?}: UDP GSO was {gso} before: {s:#}")
        });
    }
    eprintln!("{name}: {SIZES:?}-byte datagrams echoed byte-exact, {total} reassembled each way");
}

#[test]
fn udp_datagrams_of_2000_9000_and_65000_bytes_echo_byte_exact_ipv4() {
    large_datagrams_echo_byte_exact(false, false);
}

#[test]
fn udp_datagrams_of_2000_9000_and_65000_bytes_echo_byte_exact_ipv6() {
    large_datagrams_echo_byte_exact(true, false);
}

/// Raw ESP (IP protocol 50) and overlay addresses: the outer packet is
/// fragmented and reassembled by the kernels all the same.
#[test]
fn large_datagrams_over_raw_esp_ipv4_overlay() {
    large_datagrams_echo_byte_exact(false, true);
}

#[test]
fn large_datagrams_over_raw_esp_ipv6_overlay() {
    large_datagrams_echo_byte_exact(true, true);
}

/// The sender's cipher corrupts one 16-byte block of every seal (valid
/// ICV): a large datagram, sealed whole, fails whole at the receiver and
/// nothing of it reaches the application.
#[test]
fn a_corrupted_block_anywhere_in_a_large_datagram_fails_the_whole_datagram() {
    if !esptun::crypto::hardware::provider().is_available() {
        common::skip_or_fail_without_aesni("frag_corrupt");
        return;
    }
    let Some(lab) = lab(
        "frag_corrupt",
        LabOptions {
            tag: "fragbad".into(),
            subnet: 72,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    if let Err(e) = lab.start(Side::B, &[]) {
        fail(&lab, &format!("starting b: {e}"));
    }
    if let Err(e) = lab.start_faulty(Side::A, 1.0, 11) {
        fail(&lab, &format!("starting a: {e}"));
    }
    const COUNT: u32 = 3;
    for size in [9_000, 65_000] {
        let report = lab
            .udp_exchange(COUNT, size)
            .unwrap_or_else(|e| fail(&lab, &format!("udp {size}: {e}")));
        check(
            &lab,
            report.server_received == 0 && report.echoed_ok == 0 && report.mismatched == 0,
            || format!("part of a corrupted {size}-byte datagram was delivered: {report:?}"),
        );
    }
    let a = wait_for(&lab, Side::A, |s| {
        reassembly(s, "reassembled") >= u64::from(COUNT) * 2
    });
    check(
        &lab,
        reassembly(&a, "reassembled") >= u64::from(COUNT) * 2,
        || format!("the sender did not reassemble them: {a:#}"),
    );
    let b = wait_for(&lab, Side::B, |s| {
        s["inbound"]["drops"]["inner_checksum"]
            .as_u64()
            .unwrap_or(0)
            >= u64::from(COUNT) * 2
    });
    let caught = b["inbound"]["drops"]["inner_checksum"]
        .as_u64()
        .unwrap_or(0);
    check(&lab, caught >= u64::from(COUNT) * 2, || {
        format!("the receiver did not drop every corrupted datagram whole: {b:#}")
    });
    check(&lab, b["inbound"]["drops"]["icv_failure"] == 0, || {
        format!("the corrupted block was sealed correctly, the ICV must pass: {b:#}")
    });
    eprintln!("frag_corrupt: {caught} whole datagrams dropped as inner_checksum, none delivered");
}

/// IPv4 fragments of `packet` covering the payload ranges given.
fn frag4(packet: &[u8], id: u16, ranges: &[(usize, usize)]) -> Vec<Vec<u8>> {
    let body = &packet[20..];
    ranges
        .iter()
        .map(|&(s, e)| {
            let mut f = packet[..20].to_vec();
            f.extend_from_slice(&body[s..e]);
            f[2..4].copy_from_slice(&((20 + e - s) as u16).to_be_bytes());
            f[4..6].copy_from_slice(&id.to_be_bytes());
            let mut field = (s / 8) as u16;
            if e < body.len() {
                field |= 0x2000;
            }
            f[6..8].copy_from_slice(&field.to_be_bytes());
            f[10..12].copy_from_slice(&[0, 0]);
            let c = checksum::finish(checksum::sum(&f[..20]));
            f[10..12].copy_from_slice(&c.to_be_bytes());
            f
        })
        .collect()
}

/// IPv6 fragments of `packet` (no extension headers) covering the ranges
/// of its payload given.
fn frag6(packet: &[u8], id: u32, ranges: &[(usize, usize)]) -> Vec<Vec<u8>> {
    let body = &packet[40..];
    ranges
        .iter()
        .map(|&(s, e)| {
            let mut f = packet[..40].to_vec();
            let next = f[6];
            f[6] = protocol::IPV6_FRAGMENT;
            let field = s as u16 | u16::from(e < body.len());
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&field.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&body[s..e]);
            let len = (f.len() - 40) as u16;
            f[4..6].copy_from_slice(&len.to_be_bytes());
            f
        })
        .collect()
}

/// Sends each packet (a whole IP header included) from `side`'s
/// namespace through a raw socket: routed into the TUN device like any
/// packet to the peer.
fn send_raw(lab: &TunnelLab, side: Side, to: IpAddr, packets: &[Vec<u8>]) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let ns = match side {
        Side::A => &lab.hosts.a,
        Side::B => &lab.hosts.b,
    };
    let sent = ns.run(|| -> std::io::Result<()> {
        // IPPROTO_RAW: the header is ours (raw(7): IP_HDRINCL implied;
        // for IPv6 likewise).
        let domain = if to.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
        let dst = SockAddr::from(SocketAddr::new(to, 0));
        for p in packets {
            socket.send_to(p, &dst)?;
        }
        Ok(())
    });
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => fail(lab, &format!("raw send: {e}")),
        Err(e) => fail(lab, &format!("raw send in the namespace: {e}")),
    }
}

/// Overlapping, duplicate, out-of-order, tiny and never-completed
/// fragments, crafted with a raw socket in a's namespace toward b through
/// the tunnel, each move their own counter; then a flood of first
/// fragments only stays under the memory cap.
#[test]
fn crafted_fragments_move_their_own_counters_and_memory_stays_capped() {
    let Some(lab) = lab(
        "frag_crafted",
        LabOptions {
            tag: "fragraw".into(),
            subnet: 73,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    const CAP: u64 = 32 * 1024;
    const DATAGRAMS: u64 = 64;
    start_with_reassembly(
        &lab,
        Side::A,
        &format!("timeout_secs = 2\nmax_bytes = {CAP}\nmax_datagrams = {DATAGRAMS}"),
    );
    if let Err(e) = lab.start(Side::B, &[]) {
        fail(&lab, &format!("starting b: {e}"));
    }
    let (IpAddr::V4(a), IpAddr::V4(b)) = (lab.a_inner, lab.b_inner) else {
        fail(&lab, "an IPv4 lab");
    };
    let datagram = |size: usize| {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        build::ipv4(a.octets(), b.octets(), protocol::UDP, &payload)
    };
    let packet = datagram(3000);
    let body = packet.len() - 20;
    let whole = [(0, 1000), (1000, 2000), (2000, body)];

    // Overlap: the second starts 8 bytes inside the first.
    send_raw(
        &lab,
        Side::A,
        lab.b_inner,
        &frag4(&packet, 101, &[(0, 1000), (992, 2000), (2000, body)]),
    );
    // Duplicate: the first twice; the datagram still completes.
    let mut dup = frag4(&packet, 102, &whole);
    dup.insert(1, dup[0].clone());
    send_raw(&lab, Side::A, lab.b_inner, &dup);
    // Out of order: completes.
    let mut reversed = frag4(&packet, 103, &whole);
    reversed.reverse();
    send_raw(&lab, Side::A, lab.b_inner, &reversed);
    // Tiny first fragment: 8 bytes of a 20-byte TCP header (RFC 1858).
    let tcp = build::ipv4(a.octets(), b.octets(), protocol::TCP, &[7; 100]);
    send_raw(&lab, Side::A, lab.b_inner, &frag4(&tcp, 104, &[(0, 8)]));
    // Never completed: the first two only.
    send_raw(
        &lab,
        Side::A,
        lab.b_inner,
        &frag4(&packet, 105, &whole[..2]),
    );

    let s = wait_for(&lab, Side::A, |s| {
        reassembly(s, "overlap") >= 1
            && reassembly(s, "duplicates") >= 1
            && reassembly(s, "reassembled") >= 2
            && reassembly(s, "malformed") >= 1
            && reassembly(s, "timeout") >= 1
    });
    for (key, want) in [
        ("overlap", 1),
        ("duplicates", 1),
        ("reassembled", 2),
        ("malformed", 1),
        ("timeout", 1),
        ("too_big", 0),
        ("memory", 0),
    ] {
        check(&lab, reassembly(&s, key) == want, || {
            format!("reassembly {key}: want {want}: {s:#}")
        });
    }
    let drops = |s: &serde_json::Value, reason: &str| {
        s["outbound"]["drops"][reason].as_u64().unwrap_or(u64::MAX)
    };
    // Packets: three for the overlap (the one held, the overlapping one,
    // and the third, dropped until the timeout), one duplicate, one tiny,
    // two timed out.
    for (reason, want) in [
        ("reassembly_overlap", 3),
        ("reassembly_duplicate", 1),
        ("reassembly_malformed", 1),
        ("reassembly_timeout", 2),
    ] {
        check(&lab, drops(&s, reason) == want, || {
            format!("{reason}: want {want}: {s:#}")
        });
    }

    // Only first fragments, each of a new datagram: the cap in bytes (16
    // chunks of 2 KiB) fills, the rest are refused, nothing grows.
    let flood: Vec<Vec<u8>> = (0..200u16)
        .flat_map(|i| frag4(&packet, 1000 + i, &[(0, 1400)]))
        .collect();
    let mut most_bytes = 0;
    let mut most_datagrams = 0;
    for chunk in flood.chunks(20) {
        send_raw(&lab, Side::A, lab.b_inner, chunk);
        let s = status(&lab, Side::A);
        most_bytes = most_bytes.max(reassembly(&s, "bytes_in_flight"));
        most_datagrams = most_datagrams.max(reassembly(&s, "datagrams_in_flight"));
    }
    let s = wait_for(&lab, Side::A, |s| reassembly(s, "fragments") >= 13 + 200);
    most_bytes = most_bytes.max(reassembly(&s, "bytes_in_flight"));
    most_datagrams = most_datagrams.max(reassembly(&s, "datagrams_in_flight"));
    check(&lab, most_bytes > 0 && most_bytes <= CAP, || {
        format!("bytes in flight {most_bytes} not within (0, {CAP}]: {s:#}")
    });
    // 16 held, the rest of the slots taken by datagrams discarded for
    // memory until their timeout.
    check(&lab, (16..=DATAGRAMS).contains(&most_datagrams), || {
        format!("datagrams in flight {most_datagrams} not within [16, {DATAGRAMS}]: {s:#}")
    });
    check(&lab, reassembly(&s, "memory") >= 100, || {
        format!("the cap refused too little: {s:#}")
    });
    // All of it times out and is freed.
    let s = wait_for(&lab, Side::A, |s| {
        reassembly(s, "datagrams_in_flight") == 0 && reassembly(s, "bytes_in_flight") == 0
    });
    check(
        &lab,
        reassembly(&s, "datagrams_in_flight") == 0 && reassembly(&s, "bytes_in_flight") == 0,
        || format!("not freed after the timeout: {s:#}"),
    );
    eprintln!(
        "frag_crafted: at most {most_bytes} bytes and {most_datagrams} datagrams in flight \
         under a {CAP}-byte cap; {} refused",
        reassembly(&s, "memory")
    );
}

/// The same kinds over IPv6 (fragment headers from a raw IPv6 socket),
/// an atomic fragment included (RFC 6946: passed on whole, no state).
#[test]
fn crafted_ipv6_fragments_move_their_own_counters() {
    let Some(lab) = lab(
        "frag_crafted_v6",
        LabOptions {
            tag: "fragraw6".into(),
            subnet: 74,
            ipv6: true,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    start_with_reassembly(&lab, Side::A, "timeout_secs = 2");
    if let Err(e) = lab.start(Side::B, &[]) {
        fail(&lab, &format!("starting b: {e}"));
    }
    let (IpAddr::V6(a), IpAddr::V6(b)) = (lab.a_inner, lab.b_inner) else {
        fail(&lab, "an IPv6 lab");
    };
    let payload: Vec<u8> = (0..3000).map(|i| (i * 7) as u8).collect();
    let packet = build::ipv6(a.octets(), b.octets(), protocol::UDP, &payload);
    let body = packet.len() - 40;
    let whole = [(0, 1000), (1000, 2000), (2000, body)];
    let to = lab.b_inner;
    send_raw(
        &lab,
        Side::A,
        to,
        &frag6(&packet, 201, &[(0, 1000), (992, 2000), (2000, body)]),
    );
    let mut dup = frag6(&packet, 202, &whole);
    dup.insert(1, dup[0].clone());
    send_raw(&lab, Side::A, to, &dup);
    let mut reversed = frag6(&packet, 203, &whole);
    reversed.reverse();
    send_raw(&lab, Side::A, to, &reversed);
    send_raw(&lab, Side::A, to, &frag6(&packet, 204, &whole[..2]));
    let small = build::ipv6(a.octets(), b.octets(), protocol::UDP, &[5; 100]);
    send_raw(&lab, Side::A, to, &frag6(&small, 205, &[(0, 108)]));

    let s = wait_for(&lab, Side::A, |s| {
        reassembly(s, "reassembled") >= 2 && reassembly(s, "timeout") >= 1
    });
    for (key, want) in [
        ("overlap", 1),
        ("duplicates", 1),
        ("reassembled", 2),
        ("atomic", 1),
        ("timeout", 1),
        ("malformed", 0),
        ("too_big", 0),
        ("memory", 0),
    ] {
        check(&lab, reassembly(&s, key) == want, || {
            format!("reassembly {key}: want {want}: {s:#}")
        });
    }
}
