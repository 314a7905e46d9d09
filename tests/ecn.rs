//! End to end: DSCP and ECN cross the tunnel as in kernel transport mode
//! (src/wire/ecn.rs). A UDP sender inside the tunnel sets a TOS byte /
//! traffic class on its socket; the receiver reads the one each datagram
//! arrives with (IP_RECVTOS / IPV6_RECVTCLASS). nftables in the sender's
//! namespace counts the outer ESP packets by DSCP, and then plays a router
//! that marks congestion (CE) on the outer packets that are ECN-capable,
//! as RFC 3168 section 5 allows.
//!
//! Needs root and the `nft` tool (nftables; .ci/run installs it). Without
//! root every test says it skipped, without `nft` likewise; with
//! `ESPTUN_REQUIRE_NETNS=1` / `ESPTUN_REQUIRE_NFT=1` (CI) a skip fails.
//! Each lab has its own namespaces (198.18.70-73.0/24, 2001:db8:70-73::)
//! and is removed on drop, also when an assertion fails.

mod common;

use common::{check, fail, lab};

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use esptun::io::poll_readable;
use esptun::io::socket::OuterSocket;
use esptun::lab::demo::{LabOptions, Side, TunnelLab};
use esptun::packet::PacketBuf;
use esptun::wire::ecn::{DSCP_EF, Ecn, tos};
use esptun::wire::outer::Encap;

const PORT: u16 = 5003;
/// Datagrams per phase; all must arrive (the lab has no loss), but a few
/// are allowed to go missing to the first neighbour resolution.
const COUNT: usize = 20;
const MIN_ARRIVED: usize = COUNT - 3;

fn have_nft(test: &str) -> bool {
    let found = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        common::skip_unless_required(
            test,
            "ESPTUN_REQUIRE_NFT",
            "needs the nft tool (apt-get install nftables)",
        );
    }
    found
}

/// Runs `nft` in `side`'s namespace with `args`, or fails the test.
fn nft(lab: &TunnelLab, side: Side, args: &[&str], stdin: Option<&str>) -> String {
    let ns = match side {
        Side::A => &lab.hosts.a,
        Side::B => &lab.hosts.b,
    };
    let mut cmd = ns.command("nft");
    cmd.args(args);
    let out = match stdin {
        None => cmd.output(),
        Some(text) => {
            let dir = lab.dir.join("ruleset.nft");
            std::fs::write(&dir, text).unwrap_or_else(|e| fail(lab, &format!("ruleset: {e}")));
            cmd.arg("-f").arg(&dir).output()
        }
    }
    .unwrap_or_else(|e| fail(lab, &format!("running nft {args:?}: {e}")));
    check(lab, out.status.success(), || {
        format!(
            "nft {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets a named nftables counter has seen.
fn counter(lab: &TunnelLab, name: &str) -> u64 {
    let out = nft(
        lab,
        Side::A,
        &["-j", "list", "counter", "inet", "esptun_ecn", name],
        None,
    );
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| fail(lab, &format!("nft json: {e}")));
    v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| fail(lab, &format!("no counter {name} in {out}")))
}

/// The outer packets a sends: ESP in UDP to port 4500, or raw ESP.
fn outer_match(lab: &TunnelLab) -> &'static str {
    match lab.options.encap {
        Encap::Udp { .. } => "udp dport 4500",
        Encap::RawEsp => "meta l4proto esp",
    }
}

/// The IP family word nftables uses for the lab's outer header.
fn family(lab: &TunnelLab) -> &'static str {
    if lab.options.ipv6 { "ip6" } else { "ip" }
}

/// Sends `COUNT` datagrams from a to b through the tunnel from a socket
/// set to `tos`; returns the TOS byte each one arrived with.
fn exchange(lab: &TunnelLab, tos: u8) -> Vec<u8> {
    let v6 = lab.options.ipv6;
    let to = SocketAddr::new(lab.b_inner, PORT);
    // A plain UDP socket bound to the port (esptun's own socket type,
    // which reads IP_RECVTOS / IPV6_RECVTCLASS into each buffer's meta).
    let receiver = lab
        .hosts
        .b
        .run(|| OuterSocket::open(Encap::Udp { port: PORT }, v6, None))
        .unwrap_or_else(|e| fail(lab, &format!("entering b: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("receiver: {e}")));
    let from = SocketAddr::new(lab.a_inner, 0);
    let sender = lab
        .hosts
        .a
        .run(|| UdpSocket::bind(from))
        .unwrap_or_else(|e| fail(lab, &format!("entering a: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("sender: {e}")));
    let sock = socket2::SockRef::from(&sender);
    let set = if v6 {
        sock.set_tclass_v6(u32::from(tos))
    } else {
        sock.set_tos_v4(u32::from(tos))
    };
    set.unwrap_or_else(|e| fail(lab, &format!("setting the TOS byte: {e}")));
    for i in 0..COUNT {
        let payload = [i as u8; 200];
        if let Err(e) = sender.send_to(&payload, to) {
            fail(lab, &format!("send {i}: {e}"));
        }
        // Paced, so that no queue anywhere overflows.
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut bufs: Vec<PacketBuf> = (0..16).map(|_| PacketBuf::new(65535)).collect();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while got.len() < COUNT && Instant::now() < deadline {
        let ready = poll_readable(
            &[std::os::fd::AsFd::as_fd(&receiver)],
            Duration::from_millis(200),
        )
        .unwrap_or_else(|e| fail(lab, &format!("poll: {e}")));
        if !ready.is_ready(0) {
            continue;
        }
        let n = receiver
            .recv_batch(&mut bufs)
            .unwrap_or_else(|e| fail(lab, &format!("recv: {e}")));
        // No GRO on this socket: one datagram per buffer.
        got.extend(bufs[..n].iter().map(|b| b.meta.tos));
    }
    check(lab, got.len() >= MIN_ARRIVED, || {
        format!(
            "only {} of {COUNT} datagrams with TOS {tos:#04x} arrived",
            got.len()
        )
    });
    got
}

fn dscp_and_ecn_cross_the_tunnel(test: &str, subnet: u8, ipv6: bool, encap: Encap) {
    if !have_nft(test) {
        return;
    }
    let Some(lab) = lab(
        test,
        LabOptions {
            tag: "ecn".into(),
            subnet,
            ipv6,
            encap,
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
    let (outer, ip) = (outer_match(&lab), family(&lab));
    // Counters of a's outer ESP packets by DSCP (keepalives and other
    // small packets aside: the test's datagrams make 200+ byte packets).
    let ruleset = format!(
        "table inet esptun_ecn {{
            counter outer_ef {{}}
            counter outer_other {{}}
            chain post {{
                type filter hook postrouting priority 0; policy accept;
                {outer} meta length >= 200 {ip} dscp ef counter name outer_ef
                {outer} meta length >= 200 {ip} dscp != ef counter name outer_other
            }}
        }}\n"
    );
    nft(&lab, Side::A, &[], Some(&ruleset));

    let ef_ect0 = tos(DSCP_EF, Ecn::Ect0);
    let ef_not_ect = tos(DSCP_EF, Ecn::NotEct);
    let ef_ce = tos(DSCP_EF, Ecn::Ce);

    // 1. EF + ECT(0) arrives as sent, and the outer packets carry EF.
    let got = exchange(&lab, ef_ect0);
    check(&lab, got.iter().all(|&t| t == ef_ect0), || {
        format!("sent EF + ECT(0) ({ef_ect0:#04x}), received {got:02x?}")
    });
    let (ef, other) = (counter(&lab, "outer_ef"), counter(&lab, "outer_other"));
    check(&lab, ef > 0 && other == 0, || {
        format!("outer packets: {ef} with DSCP EF, {other} with another DSCP")
    });
    // Not-ECT arrives as Not-ECT, with its DSCP.
    let got = exchange(&lab, ef_not_ect);
    check(&lab, got.iter().all(|&t| t == ef_not_ect), || {
        format!("sent EF Not-ECT ({ef_not_ect:#04x}), received {got:02x?}")
    });

    // 2. A router on the outer path marks congestion on what is
    // ECN-capable (RFC 3168 section 5: never on Not-ECT).
    let mark = format!("{outer} {ip} ecn != not-ect {ip} ecn set ce");
    let mut args = vec!["add", "rule", "inet", "esptun_ecn", "post"];
    args.extend(mark.split(' '));
    nft(&lab, Side::A, &args, None);
    let got = exchange(&lab, ef_ect0);
    check(&lab, got.iter().all(|&t| t == ef_ce), || {
        format!("CE set on the outer path: expected EF + CE ({ef_ce:#04x}), received {got:02x?}")
    });
    // A Not-ECT packet leaves Not-ECT, so the router cannot mark it, and
    // it never arrives as CE.
    let got = exchange(&lab, ef_not_ect);
    check(&lab, got.iter().all(|&t| t == ef_not_ect), || {
        format!("Not-ECT with a marking router: expected {ef_not_ect:#04x}, received {got:02x?}")
    });
    let other = counter(&lab, "outer_other");
    check(&lab, other == 0, || {
        format!("{other} outer packets left without the inner DSCP")
    });
}

#[test]
fn dscp_and_ecn_cross_an_ipv4_nat_t_tunnel() {
    dscp_and_ecn_cross_the_tunnel(
        "dscp_and_ecn_cross_an_ipv4_nat_t_tunnel",
        70,
        false,
        Encap::NATT,
    );
}

#[test]
fn dscp_and_ecn_cross_an_ipv6_raw_esp_tunnel() {
    dscp_and_ecn_cross_the_tunnel(
        "dscp_and_ecn_cross_an_ipv6_raw_esp_tunnel",
        71,
        true,
        Encap::RawEsp,
    );
}

#[test]
fn dscp_and_ecn_cross_an_ipv4_raw_esp_tunnel() {
    dscp_and_ecn_cross_the_tunnel(
        "dscp_and_ecn_cross_an_ipv4_raw_esp_tunnel",
        72,
        false,
        Encap::RawEsp,
    );
}

#[test]
fn dscp_and_ecn_cross_an_ipv6_nat_t_tunnel() {
    dscp_and_ecn_cross_the_tunnel(
        "dscp_and_ecn_cross_an_ipv6_nat_t_tunnel",
        73,
        true,
        Encap::NATT,
    );
}
