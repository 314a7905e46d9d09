//! Two esptun daemons keyed only by IKE (`[peer.ike]`), in network
//! namespaces (root): the IKE SA comes up with matching SPIs on both
//! sides, the CHILD SA it installs carries ping, byte-checked TCP both
//! ways and UDP; a wrong PSK fails cleanly, said in the log and counted,
//! with nothing installed. Both outer modes: NAT-T (IKE on 4500 behind
//! the non-ESP marker) and raw ESP (IKE on 500). NAT traversal: through a
//! real NAT (nftables masquerade in a router namespace), with a faked NAT
//! (`force_encap`), and a responder demanding a COOKIE.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Established, check, established, fail};
use esptun::lab::demo::{LabOptions, Side, TunnelLab};
use esptun::lab::tunnel::LabIke;
use esptun::wire::outer::Encap;

const MIB: u64 = 1 << 20;

fn ike_lab(
    test: &str,
    tag: &str,
    subnet: u8,
    encap: Encap,
    ipv6: bool,
    wrong_psk: bool,
) -> Option<TunnelLab> {
    ike_lab_with(test, tag, subnet, encap, ipv6, wrong_psk, "")
}

/// [`ike_lab`] with extra `[peer.ike]` lines (lifetimes, liveness).
fn ike_lab_with(
    test: &str,
    tag: &str,
    subnet: u8,
    encap: Encap,
    ipv6: bool,
    wrong_psk: bool,
    ike_extra: &str,
) -> Option<TunnelLab> {
    common::lab(
        test,
        LabOptions {
            tag: tag.into(),
            subnet,
            encap,
            ipv6,
            ike: Some(LabIke {
                initiator: Side::A,
                wrong_psk,
            }),
            metrics: true,
            ike_extra: ike_extra.into(),
            ..LabOptions::default()
        },
    )
}

fn status(lab: &TunnelLab, side: Side) -> serde_json::Value {
    lab.status(side)
        .unwrap_or_else(|e| fail(lab, &format!("status of {side:?}: {e}")))
}

/// Waits (bounded) until both sides show an established IKE SA with a
/// CHILD SA, and their SAs are in the datapath.
fn wait_established(lab: &TunnelLab) -> [Established; 2] {
    let deadline = Instant::now() + Duration::from_secs(30);
    // Established, and its CHILD SA in both directions of the datapath
    // (the threads install it a moment after the IKE thread reports it).
    let ready = |side: Side| {
        let s = status(lab, side);
        established(&s).filter(|e| {
            let (inb, out) = datapath_spis(&s);
            e.2.last()
                .is_some_and(|c| inb.contains(&c.0) && out.contains(&c.1))
        })
    };
    loop {
        if let (Some(a), Some(b)) = (ready(Side::A), ready(Side::B)) {
            return [a, b];
        }
        if Instant::now() >= deadline {
            fail(
                lab,
                &format!(
                    "no IKE SA within 30 s:\na: {:#}\nb: {:#}",
                    status(lab, Side::A)["ike"],
                    status(lab, Side::B)["ike"]
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spis(s: &serde_json::Value, dir: &str) -> Vec<u64> {
    s[format!("{dir}_sas")]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["spi"].as_u64()).collect())
        .unwrap_or_default()
}

fn keyed_by_ike_carries_traffic(test: &str, tag: &str, subnet: u8, encap: Encap, ipv6: bool) {
    let Some(lab) = ike_lab(test, tag, subnet, encap, ipv6, false) else {
        return;
    };
    // The responder first, so the initiator's first IKE_SA_INIT finds it.
    for side in [Side::B, Side::A] {
        lab.start(side, &[])
            .unwrap_or_else(|e| fail(&lab, &format!("starting {side:?}: {e}")));
    }
    let [a, b] = wait_established(&lab);
    check(&lab, a.0 == b.0 && a.1 == b.1, || {
        format!("the IKE SPIs differ: a {a:?}, b {b:?}")
    });
    check(
        &lab,
        a.0 != "0000000000000000" && a.1 != "0000000000000000",
        || format!("an IKE SPI is zero: {a:?}"),
    );
    // Each side's inbound CHILD SA is the other's outbound one.
    let (a_child, b_child) = (a.2[0], b.2[0]);
    check(
        &lab,
        a_child.0 == b_child.1 && a_child.1 == b_child.0,
        || format!("CHILD SAs do not pair up: a {a_child:?}, b {b_child:?}"),
    );
    // The key manager has them in the datapath (within its tick).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (sa, sb) = (status(&lab, Side::A), status(&lab, Side::B));
        if spis(&sa, "outbound").contains(&a_child.1)
            && spis(&sa, "inbound").contains(&a_child.0)
            && spis(&sb, "outbound").contains(&b_child.1)
            && spis(&sb, "inbound").contains(&b_child.0)
        {
            // No durable reservation: the whole sequence space at once.
            let out = &sa["outbound_sas"][0];
            check(
                &lab,
                out["seq_reserved"].as_u64() >= Some(u64::from(u32::MAX)),
                || format!("an IKE CHILD SA should need no reservation: {out:#}"),
            );
            break;
        }
        if Instant::now() >= deadline {
            fail(
                &lab,
                &format!("CHILD SAs not in the datapath:\n{sa:#}\n{sb:#}"),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let ping = lab
        .ping(10)
        .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
    check(&lab, ping.received >= 9, || format!("ping: {ping:?}"));
    let r = lab
        .tcp_zeros(8 * MIB, Duration::from_secs(120))
        .unwrap_or_else(|e| fail(&lab, &format!("tcp a->b: {e}")));
    check(&lab, r.is_clean() && r.bytes_received == 8 * MIB, || {
        format!("tcp a->b: {r:?}")
    });
    let back = esptun::lab::tcp_zeros(
        &lab.hosts.a,
        &lab.hosts.b,
        SocketAddr::new(lab.a_inner, 5003),
        4 * MIB,
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| fail(&lab, &format!("tcp b->a: {e}")));
    check(
        &lab,
        back.is_clean() && back.bytes_received == 4 * MIB,
        || format!("tcp b->a: {back:?}"),
    );
    let udp = lab
        .udp_exchange(200, 1200)
        .unwrap_or_else(|e| fail(&lab, &format!("udp: {e}")));
    check(&lab, udp.mismatched == 0 && udp.echoed_ok >= 190, || {
        format!("udp: {udp:?}")
    });

    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        let c = &s["ike"]["peers"][0]["counters"];
        check(
            &lab,
            c["established"] == 1 && c["auth_failures"] == 0,
            || format!("{side:?} IKE counters: {c:#}"),
        );
        check(&lab, s["inbound"]["drops"]["inner_checksum"] == 0, || {
            format!("{side:?}: inner checksum drops: {s:#}")
        });
    }
    if encap == Encap::RawEsp {
        raw_mode_listens_for_ike_on_4500(&lab);
    }
    // The text status shows the IKE SA.
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(["status", "--socket"])
        .arg(&lab.a.control)
        .output()
        .unwrap_or_else(|e| fail(&lab, &format!("esptun status: {e}")));
    let text = String::from_utf8_lossy(&text.stdout);
    check(
        &lab,
        text.contains("IKE SAs:") && text.contains(&a.0),
        || format!("esptun status text lacks the IKE SA:\n{text}"),
    );
    // Metrics carry the IKE SA and its counters.
    let metrics = lab
        .metrics(Side::B)
        .unwrap_or_else(|e| fail(&lab, &format!("metrics: {e}")));
    for want in [
        "esptun_ike_sas{peer=\"a\",state=\"established\"} 1",
        "esptun_ike_events_total{peer=\"a\",event=\"child_installed\"} 1",
        "esptun_ike_events_total{peer=\"a\",event=\"auth_failed\"} 0",
    ] {
        check(&lab, metrics.contains(want), || {
            format!("metrics lack {want}:\n{metrics}")
        });
    }
    // The Wireshark IKEv2 decryption table, from the running daemon.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(["wireshark-keys", "--ike", "-c"])
        .arg(&lab.a.config)
        .output()
        .unwrap_or_else(|e| fail(&lab, &format!("wireshark-keys --ike: {e}")));
    let keys = String::from_utf8_lossy(&out.stdout).into_owned();
    check(&lab, out.status.success(), || {
        format!(
            "wireshark-keys --ike: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let record = keys
        .lines()
        .find(|l| !l.starts_with('#'))
        .unwrap_or_else(|| fail(&lab, &format!("no IKE key record: {keys}")));
    let fields: Vec<&str> = record.split(',').collect();
    check(
        &lab,
        fields.len() == 8
            && fields[0] == a.0
            && fields[1] == a.1
            && fields[2].len() == 72
            && fields[4] == "\"AES-GCM-256 with 16 octet ICV [RFC5282]\""
            && fields[7] == "\"NONE [RFC4306]\"",
        || format!("not an ikev2_decryption_table record: {record}"),
    );
    child_sa_esp_records(&lab, a_child);
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        check(&lab, status.success(), || {
            format!("{side:?} exit: {status}")
        });
    }
}

/// `esptun wireshark-keys -c` of a side: its `esp_sa` records (the
/// command must succeed and warn about the keys on stderr).
fn esp_sa_records(lab: &TunnelLab, side: Side) -> Vec<String> {
    let config = match side {
        Side::A => &lab.a.config,
        Side::B => &lab.b.config,
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(["wireshark-keys", "-c"])
        .arg(config)
        .output()
        .unwrap_or_else(|e| fail(lab, &format!("wireshark-keys of {side:?}: {e}")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    check(
        lab,
        out.status.success() && stderr.contains("SECRET KEYS"),
        || format!("wireshark-keys of {side:?}: {} {stderr}", out.status),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The IKE-made CHILD SA `a_child` (a's inbound SPI, a's outbound SPI),
/// as `esptun wireshark-keys -c` of each side prints it: one `esp_sa`
/// record per direction, from the running daemons, with the outer
/// addresses, and the same records on both sides (a's outbound SA is b's
/// inbound SA: same SPI, key and addresses).
fn child_sa_esp_records(lab: &TunnelLab, a_child: (u64, u64)) {
    let (a_outer, b_outer) = lab.outer(Side::A);
    let family = if a_outer.is_ipv4() { "IPv4" } else { "IPv6" };
    let a = esp_sa_records(lab, Side::A);
    let b = esp_sa_records(lab, Side::B);
    for (spi, src, dst) in [(a_child.1, a_outer, b_outer), (a_child.0, b_outer, a_outer)] {
        let head = format!("\"{family}\",\"{src}\",\"{dst}\",\"0x{spi:08x}\",");
        let find = |records: &[String]| -> Vec<String> {
            records
                .iter()
                .filter(|r| r.contains(&format!("\"0x{spi:08x}\"")))
                .cloned()
                .collect()
        };
        let (in_a, in_b) = (find(&a), find(&b));
        check(
            lab,
            in_a.len() == 1
                && in_a == in_b
                && in_a[0].starts_with(&head)
                && in_a[0].contains("\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x")
                && in_a[0].ends_with(",\"NULL\",\"\""),
            || {
                format!(
                    "SPI {spi:#010x}: want one record {head}... on both sides, alike; a has \
                     {} record(s), b {} (keys not shown)",
                    in_a.len(),
                    in_b.len()
                )
            },
        );
    }
    check(lab, a.len() == 2 && b.len() == 2, || {
        format!(
            "one CHILD SA, two records per side: a {}, b {}",
            a.len(),
            b.len()
        )
    });
}

/// With raw ESP, b also listens on UDP 4500 for IKE only, as a peer that
/// supports NAT-T may move IKE there without a NAT (strongSwan does, RFC
/// 4555 section 3.2): from a's address, a keepalive is ignored, ESP in UDP
/// is dropped and counted, and an IKE message behind the non-ESP marker
/// reaches the IKE SAs (one for no IKE SA of b's: dropped as such).
fn raw_mode_listens_for_ike_on_4500(lab: &TunnelLab) {
    let (a_outer, b_outer) = lab.outer(Side::A);
    let before = status(lab, Side::B);
    let dropped = counter(&before, "messages_dropped");
    check(lab, before["ike"]["natt_non_ike"] == 0, || {
        format!(
            "b: non-IKE on 4500 before any was sent: {:#}",
            before["ike"]
        )
    });
    // An IKE_AUTH request header (RFC 7296 section 3.1) of unknown SPIs.
    let mut ike = vec![0u8; 4];
    ike.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
    ike.extend_from_slice(&0x99aa_bbcc_ddee_ff00u64.to_be_bytes());
    ike.extend_from_slice(&[0, 0x20, 35, 0x08, 0, 0, 0, 1, 0, 0, 0, 28]);
    let esp_in_udp = [0u8, 0, 0, 1, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
    lab.hosts
        .a
        .run(move || -> std::io::Result<()> {
            let sock = std::net::UdpSocket::bind(SocketAddr::new(a_outer, 0))?;
            let to = SocketAddr::new(b_outer, 4500);
            for d in [&[0xffu8][..], &esp_in_udp[..], &ike[..]] {
                sock.send_to(d, to)?;
            }
            Ok(())
        })
        .unwrap_or_else(|e| fail(lab, &format!("sending to b:4500: {e}")))
        .unwrap_or_else(|e| fail(lab, &format!("sending to b:4500: {e}")));
    let after = wait_for(
        lab,
        Side::B,
        Duration::from_secs(5),
        "IKE on 4500 dispatched and ESP in UDP counted",
        |s| counter(s, "messages_dropped") > dropped && s["ike"]["natt_non_ike"] == 1,
    );
    check(
        lab,
        counter(&after, "messages_dropped") == dropped + 1,
        || format!("b: the keepalive or ESP reached IKE: {:#}", after["ike"]),
    );
}

#[test]
fn ike_over_nat_t_keys_the_tunnel() {
    keyed_by_ike_carries_traffic("ike_nat_t", "iken", 71, Encap::NATT, false);
}

#[test]
fn ike_on_port_500_keys_a_raw_esp_tunnel() {
    keyed_by_ike_carries_traffic("ike_raw_esp", "iker", 72, Encap::RawEsp, false);
}

#[test]
fn ike_over_ipv6_keys_a_nat_t_tunnel() {
    keyed_by_ike_carries_traffic("ike_ipv6", "ike6", 75, Encap::NATT, true);
}

/// A wrong PSK: both sides fail IKE_AUTH, say why in the log (without
/// the key), count it, and install nothing; the tunnel carries nothing.
#[test]
fn a_wrong_psk_fails_cleanly_and_installs_nothing() {
    let Some(lab) = ike_lab("ike_wrong_psk", "ikew", 73, Encap::NATT, false, true) else {
        return;
    };
    for side in [Side::B, Side::A] {
        lab.start(side, &[])
            .unwrap_or_else(|e| fail(&lab, &format!("starting {side:?}: {e}")));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let counted = |side| {
        status(&lab, side)["ike"]["peers"][0]["counters"]["auth_failures"]
            .as_u64()
            .unwrap_or(0)
    };
    while counted(Side::A) == 0 || counted(Side::B) == 0 {
        if Instant::now() >= deadline {
            fail(
                &lab,
                &format!(
                    "no authentication failure counted:\na: {:#}\nb: {:#}",
                    status(&lab, Side::A)["ike"],
                    status(&lab, Side::B)["ike"]
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        check(
            &lab,
            spis(&s, "outbound").is_empty() && spis(&s, "inbound").is_empty(),
            || format!("{side:?} installed SAs after a failed IKE_AUTH: {s:#}"),
        );
        check(&lab, established(&s).is_none(), || {
            format!("{side:?} shows an established IKE SA: {:#}", s["ike"])
        });
        let log = lab.log(side);
        check(
            &lab,
            log.contains("authentication failed") || log.contains("refused our authentication"),
            || format!("{side:?}: the log does not say why"),
        );
        // No secret in the log: neither PSK appears.
        for psk_side in [Side::A, Side::B] {
            let psk = std::fs::read_to_string(lab.psk_file(psk_side)).unwrap_or_default();
            check(
                &lab,
                !psk.trim().is_empty() && !log.contains(psk.trim()),
                || format!("{side:?}'s log contains a PSK"),
            );
        }
    }
    let ping = lab
        .ping(2)
        .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
    check(&lab, ping.received == 0, || {
        format!("traffic crossed without keys: {ping:?}")
    });
}

/// `esptun check-config` reads the PSK file of a `[peer.ike]`: one others
/// can read is refused with the fix, a private one passes. No root needed.
#[test]
fn check_config_refuses_a_psk_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("esptun-ike-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let psk = dir.join("b.psk");
    std::fs::write(&psk, "0123456789abcdef0123456789abcdef\n").expect("psk");
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.join("a.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n\n[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\n\
             endpoint = \"198.18.0.2\"\n\n[peer.ike]\npsk_file = \"{}\"\ninitiate = true\n\
             remote_id = \"b.example\"\n",
            dir.join("state").display(),
            psk.display()
        ),
    )
    .expect("config");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
            .args(["check-config", "-c"])
            .arg(&config)
            .output()
            .expect("esptun check-config")
    };
    let out = run();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = out.status.code() == Some(1)
        && text.contains("PSK file")
        && text.contains("0644")
        && text.contains("chmod 600")
        && !text.contains("0123456789abcdef");
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let ok = run();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(refused, "an open PSK file: {text}");
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("1 peer(s)"),
        "a private PSK file: {}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// `esptun wireshark-keys -c` with no daemon running: the manual SAs'
/// records are printed anyway, and stderr names the IKE peer whose CHILD
/// SA keys could not be fetched and the control socket it tried; with only
/// IKE peers nothing can be printed, which fails.
#[test]
fn wireshark_keys_without_a_daemon_prints_the_manual_sas_and_names_the_ike_peers() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("esptun-ike-wskeys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let private = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    };
    let psk = private("b.psk", "0123456789abcdef0123456789abcdef\n");
    let key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fcafebabe\n";
    let (out_key, in_key) = (private("m.out", key), private("m.in", key));
    let control = dir.join("none.sock");
    let head = format!(
        "state_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
        dir.join("state").display(),
        control.display()
    );
    let ike_peer = format!(
        "\n[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.18.0.2\"\n\n\
         [peer.ike]\npsk_file = \"{}\"\ninitiate = true\nremote_id = \"b.example\"\n",
        psk.display()
    );
    let manual_peer = format!(
        "\n[[peer]]\nname = \"m\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.18.0.3\"\n\
         outbound = {{ spi = 0xa001, key_file = \"{}\" }}\n\
         inbound = {{ spi = 0xb001, key_file = \"{}\" }}\n",
        out_key.display(),
        in_key.display()
    );
    let run = |name: &str, text: &str| {
        let config = dir.join(name);
        std::fs::write(&config, text).expect("config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
            .args(["wireshark-keys", "-c"])
            .arg(&config)
            .output()
            .expect("esptun wireshark-keys");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let both = run("both.toml", &format!("{head}{manual_peer}{ike_peer}"));
    let ike_only = run("ike.toml", &format!("{head}{ike_peer}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (status, stdout, stderr) = &both;
    let spis: Vec<&str> = stdout.lines().filter_map(|l| l.split(',').nth(3)).collect();
    assert!(
        status.success()
            && spis == ["\"0x0000a001\"", "\"0x0000b001\""]
            && stderr.contains("SECRET KEYS")
            && stderr.contains("IKE peer(s) b could not be fetched")
            && stderr.contains(&control.display().to_string()),
        "manual and IKE peers, no daemon: {status} {spis:?}\n{stderr}"
    );
    let (status, stdout, stderr) = &ike_only;
    assert!(
        !status.success()
            && stdout.is_empty()
            && stderr.contains("IKE peer(s) b could not be fetched")
            && stderr.contains(&control.display().to_string()),
        "only an IKE peer, no daemon: {status} {stdout:?}\n{stderr}"
    );
}

/// The initiator restarts: it negotiates a new IKE SA, which replaces the
/// old one on the responder (one established IKE SA each, matching SPIs),
/// and traffic flows on the new CHILD SA.
#[test]
fn a_restarted_initiator_replaces_the_ike_sa() {
    let Some(lab) = ike_lab("ike_restart", "iker2", 76, Encap::NATT, false, false) else {
        return;
    };
    for side in [Side::B, Side::A] {
        lab.start(side, &[])
            .unwrap_or_else(|e| fail(&lab, &format!("starting {side:?}: {e}")));
    }
    let [old, _] = wait_established(&lab);
    let status_a = lab
        .stop(Side::A)
        .unwrap_or_else(|e| fail(&lab, &format!("stopping a: {e}")));
    check(&lab, status_a.success(), || format!("a exit: {status_a}"));
    lab.start(Side::A, &[])
        .unwrap_or_else(|e| fail(&lab, &format!("restarting a: {e}")));
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        let (sa, sb) = (status(&lab, Side::A), status(&lab, Side::B));
        if let (Some(a), Some(b)) = (established(&sa), established(&sb))
            && a.0 == b.0
            && a.0 != old.0
        {
            break sb;
        }
        if Instant::now() >= deadline {
            fail(
                &lab,
                &format!("no new IKE SA:\na: {:#}\nb: {:#}", sa["ike"], sb["ike"]),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let established_on_b = b["ike"]["peers"][0]["sas"].as_array().map_or(0, |sas| {
        sas.iter().filter(|s| s["state"] == "established").count()
    });
    check(&lab, established_on_b == 1, || {
        format!("b should keep only the new IKE SA: {:#}", b["ike"])
    });
    check(
        &lab,
        b["ike"]["peers"][0]["counters"]["established"] == 2,
        || format!("b's counters: {:#}", b["ike"]),
    );
    let ping = lab
        .ping(10)
        .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
    check(&lab, ping.received >= 9, || {
        format!("ping after the restart: {ping:?}")
    });
}

/// A side's one IKE peer's counter.
fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["ike"]["peers"][0]["counters"][name].as_u64().unwrap_or(0)
}

/// The inbound and outbound SPIs in a side's datapath.
fn datapath_spis(s: &serde_json::Value) -> (Vec<u64>, Vec<u64>) {
    (spis(s, "inbound"), spis(s, "outbound"))
}

fn start_both(lab: &TunnelLab) {
    // The responder first, so the initiator's first IKE_SA_INIT finds it.
    for side in [Side::B, Side::A] {
        lab.start(side, &[])
            .unwrap_or_else(|e| fail(lab, &format!("starting {side:?}: {e}")));
    }
}

/// Short lifetimes under load: while byte-checked TCP streams of 16 MiB
/// run both ways, CHILD SAs are rekeyed several times (each side starting
/// some: equal lifetimes with random jitter) and the IKE SA at least once;
/// make-before-break loses and corrupts nothing, and no packet meets a
/// missing or wrong SA.
#[test]
fn child_and_ike_sa_rekeys_under_load_lose_nothing() {
    let Some(lab) = ike_lab_with(
        "ike_rekey_load",
        "ikerk",
        77,
        Encap::NATT,
        false,
        false,
        // PFS: every CHILD SA rekey with a fresh X25519 exchange.
        "child_rekey_secs = 2\nike_rekey_secs = 7\nliveness_secs = 5\n\
         esp_proposals = [\"aes256gcm16-x25519-esn\"]\n",
    ) else {
        return;
    };
    start_both(&lab);
    wait_established(&lab);
    // Streams both ways, each 16 MiB and byte-checked, again and again
    // until enough rekeys have happened (bounded).
    let deadline = Instant::now() + Duration::from_secs(150);
    let enough = |lab: &TunnelLab| {
        let (a, b) = (status(lab, Side::A), status(lab, Side::B));
        counter(&a, "child_rekeys_started") >= 2
            && counter(&b, "child_rekeys_started") >= 2
            && counter(&a, "child_rekeys") >= 6
            && counter(&a, "ike_rekeys") >= 1
            && counter(&b, "ike_rekeys") >= 1
    };
    let no_sa_before = [Side::A, Side::B].map(|side| {
        status(&lab, side)["outbound"]["drops"]["no_sa"]
            .as_u64()
            .unwrap_or(0)
    });
    let mut rounds = 0;
    while rounds < 2 || !enough(&lab) {
        rounds += 1;
        if Instant::now() >= deadline || rounds > 20 {
            fail(
                &lab,
                &format!(
                    "not enough rekeys after {rounds} rounds:\na: {:#}\nb: {:#}",
                    status(&lab, Side::A)["ike"],
                    status(&lab, Side::B)["ike"]
                ),
            );
        }
        let (there, back) = std::thread::scope(|scope| {
            let there = scope.spawn(|| lab.tcp_zeros(16 * MIB, Duration::from_secs(120)));
            let back = scope.spawn(|| {
                esptun::lab::tcp_zeros(
                    &lab.hosts.a,
                    &lab.hosts.b,
                    SocketAddr::new(lab.a_inner, 5003),
                    16 * MIB,
                    Duration::from_secs(120),
                )
            });
            (there.join(), back.join())
        });
        let there = there
            .unwrap_or_else(|_| fail(&lab, "the a->b stream panicked"))
            .unwrap_or_else(|e| fail(&lab, &format!("tcp a->b: {e}")));
        let back = back
            .unwrap_or_else(|_| fail(&lab, "the b->a stream panicked"))
            .unwrap_or_else(|e| fail(&lab, &format!("tcp b->a: {e}")));
        check(
            &lab,
            there.is_clean() && there.bytes_received == 16 * MIB,
            || format!("round {rounds}: tcp a->b: {there:?}"),
        );
        check(
            &lab,
            back.is_clean() && back.bytes_received == 16 * MIB,
            || format!("round {rounds}: tcp b->a: {back:?}"),
        );
    }
    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        // Rekeys are in the status of the IKE SA too, and the CHILD SAs
        // are later generations.
        let sa = &s["ike"]["peers"][0]["sas"][0];
        check(
            &lab,
            sa["child_rekeys"].as_u64() >= Some(1)
                && sa["children"][0]["generation"].as_u64() >= Some(1),
            || format!("{side:?}: the IKE SA's status lacks its rekeys: {sa:#}"),
        );
        // Made by a rekey with a fresh key exchange (PFS).
        check(&lab, sa["children"][0]["pfs"] == "x25519", || {
            format!("{side:?}: the rekeyed CHILD SA has no PFS: {sa:#}")
        });
        check(&lab, counter(&s, "children_deleted") >= 5, || {
            format!("{side:?}: CHILD SAs deleted: {:#}", s["ike"])
        });
        // No packet met a missing, unknown or wrong SA, or was corrupted.
        for (dir, reason) in [
            ("inbound", "unknown_spi"),
            ("inbound", "icv_failure"),
            ("inbound", "replay"),
            ("inbound", "inner_checksum"),
        ] {
            check(
                &lab,
                s[dir]["drops"][reason].as_u64().unwrap_or(0) == 0,
                || format!("{side:?}: {dir} {reason} drops: {:#}", s[dir]["drops"]),
            );
        }
        // Outbound "no SA" counts what the tunnel has no SA for at all
        // (the interface's own IPv6 router solicitations): a few, never
        // the thousands a stream without an outbound SA would lose.
        let no_sa = s["outbound"]["drops"]["no_sa"].as_u64().unwrap_or(0);
        let before = no_sa_before[usize::from(side == Side::B)];
        check(&lab, no_sa.saturating_sub(before) <= 3, || {
            format!("{side:?}: outbound no_sa drops during the streams: {before} -> {no_sa}")
        });
        // Old SAs do not pile up: one active pair, and inbound SAs
        // replaced by a rekey only for the few seconds after their Delete
        // (with a rekey every 2 s: a handful, not one per rekey since the
        // start as `rekey_retire_secs` alone would keep).
        let (inb, out) = datapath_spis(&s);
        check(
            &lab,
            !inb.is_empty() && inb.len() <= 6 && out.len() <= 2,
            || format!("{side:?}: SAs in the datapath: in {inb:x?}, out {out:x?}"),
        );
    }
    rekeyed_child_sas_in_wireshark_keys(&lab);
    let metrics = lab
        .metrics(Side::A)
        .unwrap_or_else(|e| fail(&lab, &format!("metrics: {e}")));
    check(
        &lab,
        metrics.contains("esptun_ike_events_total{peer=\"b\",event=\"child_rekey\"}")
            && !metrics.contains("esptun_ike_events_total{peer=\"b\",event=\"ike_rekey\"} 0"),
        || format!("metrics lack the rekeys:\n{metrics}"),
    );
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(["status", "--socket"])
        .arg(&lab.a.control)
        .output()
        .unwrap_or_else(|e| fail(&lab, &format!("esptun status: {e}")));
    let text = String::from_utf8_lossy(&text.stdout);
    check(
        &lab,
        text.contains("rekeys: IKE ") && text.contains("CHILD SA 0x"),
        || format!("esptun status text lacks the rekeys:\n{text}"),
    );
}

/// After CHILD SA rekeys, `esptun wireshark-keys -c` of each side prints
/// exactly the CHILD SAs its IKE SAs hold (rekeyed ones included until
/// their Delete), one record per direction: the daemon republishes them
/// as they come and go. With a rekey every 2 s the status and the records
/// are compared until two status reads around the records agree
/// (bounded).
fn rekeyed_child_sas_in_wireshark_keys(lab: &TunnelLab) {
    let children = |side: Side| -> std::collections::BTreeSet<u64> {
        let s = status(lab, side);
        s["ike"]["peers"][0]["sas"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|sa| sa["children"].as_array().into_iter().flatten())
            .flat_map(|c| [c["inbound_spi"].as_u64(), c["outbound_spi"].as_u64()])
            .flatten()
            .collect()
    };
    for side in [Side::A, Side::B] {
        let mut last = String::new();
        let agreed = (0..20).any(|_| {
            let before = children(side);
            let records = esp_sa_records(lab, side);
            let after = children(side);
            let spis: std::collections::BTreeSet<u64> = records
                .iter()
                .filter_map(|r| r.split(',').nth(3))
                .filter_map(|f| {
                    u64::from_str_radix(f.trim_matches('"').trim_start_matches("0x"), 16).ok()
                })
                .collect();
            last = format!(
                "status {before:x?} / {after:x?}, {} record(s) with SPIs {spis:x?}",
                records.len()
            );
            if before != after {
                std::thread::sleep(Duration::from_millis(50));
                return false;
            }
            !before.is_empty() && spis == before && records.len() == before.len()
        });
        check(lab, agreed, || {
            format!("{side:?}: wireshark-keys does not follow the CHILD SAs: {last}")
        });
    }
}

/// Waits (bounded) until `done` holds for a side's status.
fn wait_for(
    lab: &TunnelLab,
    side: Side,
    within: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = status(lab, side);
        if done(&s) {
            return s;
        }
        if Instant::now() >= deadline {
            fail(
                lab,
                &format!("{side:?}: {what} not within {within:?}: {:#}", s["ike"]),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Dead peer detection: with the link cut, both sides' liveness checks go
/// unanswered, the IKE SA and its CHILD SAs go (nothing in the datapath);
/// with the link back, the initiator connects again and traffic flows.
#[test]
fn a_dead_peer_is_noticed_and_the_initiator_reconnects() {
    let Some(lab) = ike_lab_with(
        "ike_dead_peer",
        "iked",
        78,
        Encap::NATT,
        false,
        false,
        "liveness_secs = 2\n",
    ) else {
        return;
    };
    start_both(&lab);
    let [before, _] = wait_established(&lab);
    let ping = lab
        .ping(3)
        .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
    check(&lab, ping.received >= 2, || format!("ping: {ping:?}"));
    // ESP from the peer is proof of life: a stream for longer than the
    // liveness interval, with no IKE message in between (the lifetimes are
    // hours), needs no liveness check.
    let busy = Instant::now();
    let mut streams = 0;
    while busy.elapsed() < Duration::from_secs(6) && streams < 50 {
        streams += 1;
        let r = lab
            .tcp_zeros(4 * MIB, Duration::from_secs(60))
            .unwrap_or_else(|e| fail(&lab, &format!("tcp a->b: {e}")));
        check(&lab, r.is_clean(), || format!("tcp a->b: {r:?}"));
    }
    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        let sa = &s["ike"]["peers"][0]["sas"][0];
        check(
            &lab,
            sa["last_liveness_check_secs_ago"].is_null()
                && sa["last_heard_secs_ago"].as_u64() <= Some(1),
            || format!("{side:?}: a liveness check despite ESP from the peer: {sa:#}"),
        );
    }
    let veth = lab.hosts.veth_a.clone();
    let link = |state: &str| {
        lab.hosts
            .a
            .ip(&["link", "set", &veth, state])
            .unwrap_or_else(|e| fail(&lab, &format!("link {state}: {e}")))
    };
    link("down");
    // Liveness after 2 s, then retransmissions for about 15 s.
    let cut = Instant::now();
    let gone = |s: &serde_json::Value| {
        counter(s, "dead_peers") >= 1
            && established(s).is_none()
            && datapath_spis(s).0.is_empty()
            && datapath_spis(s).1.is_empty()
    };
    let within = Duration::from_secs(40);
    wait_for(&lab, Side::B, within, "dead peer noticed", gone);
    wait_for(&lab, Side::A, within, "dead peer noticed", gone);
    let noticed = cut.elapsed();
    check(&lab, noticed >= Duration::from_secs(2), || {
        format!("noticed too early: {noticed:?}")
    });
    link("up");
    let s = wait_for(&lab, Side::A, Duration::from_secs(90), "reconnected", |s| {
        established(s).is_some_and(|e| e.0 != before.0 && !e.2.is_empty())
    });
    let new = established(&s).unwrap_or_else(|| fail(&lab, "no IKE SA"));
    let mut ok = false;
    for _ in 0..20 {
        let ping = lab
            .ping(3)
            .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
        if ping.received >= 2 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    check(&lab, ok, || {
        format!("no traffic after reconnecting: {new:?}")
    });
}

/// A restarted peer (kill -9, then started again) sends INITIAL_CONTACT:
/// the survivor drops the old IKE SA and every SA of it at once, keeps only
/// the new ones, and traffic resumes.
#[test]
fn initial_contact_from_a_killed_and_restarted_peer_clears_stale_sas() {
    let Some(lab) = ike_lab(
        "ike_initial_contact",
        "ikeic",
        79,
        Encap::NATT,
        false,
        false,
    ) else {
        return;
    };
    start_both(&lab);
    let [_, old_b] = wait_established(&lab);
    let old_child = old_b.2[0];
    lab.kill9(Side::A)
        .unwrap_or_else(|e| fail(&lab, &format!("kill -9 a: {e}")));
    lab.start(Side::A, &[])
        .unwrap_or_else(|e| fail(&lab, &format!("restarting a: {e}")));
    let s = wait_for(
        &lab,
        Side::B,
        Duration::from_secs(30),
        "the new IKE SA alone",
        |s| {
            let sas = s["ike"]["peers"][0]["sas"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let (inb, out) = datapath_spis(s);
            counter(s, "peer_restarts") >= 1
                && sas.len() == 1
                && established(s).is_some_and(|e| e.0 != old_b.0 && !e.2.is_empty())
                && !inb.contains(&old_child.0)
                && !out.contains(&old_child.1)
                && !inb.is_empty()
                && !out.is_empty()
        },
    );
    let new = established(&s).unwrap_or_else(|| fail(&lab, "no IKE SA"));
    let (inb, out) = datapath_spis(&s);
    check(
        &lab,
        inb == vec![new.2[0].0] && out == vec![new.2[0].1],
        || {
            format!(
                "b's datapath should hold only the new CHILD SA {new:?}: in {inb:x?}, out {out:x?}"
            )
        },
    );
    let ping = lab
        .ping(10)
        .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
    check(&lab, ping.received >= 9, || {
        format!("ping after the restart: {ping:?}")
    });
}

/// Brings the lab's IKE SA up with (b) responder first and checks ping
/// and echoed UDP through it.
fn carries_ping_and_udp(lab: &TunnelLab) {
    let ping = lab
        .ping(10)
        .unwrap_or_else(|e| fail(lab, &format!("ping: {e}")));
    check(lab, ping.received >= 9, || format!("ping: {ping:?}"));
    let udp = lab
        .udp_exchange(200, 1200)
        .unwrap_or_else(|e| fail(lab, &format!("udp: {e}")));
    check(lab, udp.mismatched == 0 && udp.echoed_ok >= 190, || {
        format!("udp: {udp:?}")
    });
}

/// `force_encap` (strongSwan's `encap = yes`): without any NAT, the
/// faked NAT detection hash moves IKE from port 500 to 4500 after
/// IKE_SA_INIT (RFC 7296 section 2.23) and the CHILD SA's ESP into UDP;
/// the tunnel carries traffic, the inner checksums validate, and status
/// shows the (faked) NAT and the keepalives of the side "behind" it.
#[test]
fn a_peer_faking_nat_moves_ike_and_esp_to_4500() {
    let Some(lab) = ike_lab_with(
        "ike_force_encap",
        "ikef",
        81,
        Encap::NATT,
        false,
        false,
        "force_encap = true\n",
    ) else {
        return;
    };
    start_both(&lab);
    let [a, _] = wait_established(&lab);
    carries_ping_and_udp(&lab);
    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        let sa = s["ike"]["peers"][0]["sas"]
            .as_array()
            .and_then(|sas| sas.iter().find(|sa| sa["spi_i"] == a.0.as_str()))
            .cloned()
            .unwrap_or_else(|| fail(&lab, &format!("{side:?}: no IKE SA {}: {s:#}", a.0)));
        let nat = &sa["nat"];
        check(
            &lab,
            nat["supported"] == true
                && nat["natt"] == true
                && nat["local_behind"] == true
                && nat["keepalives"] == true,
            || format!("{side:?}: NAT-T not in use: {sa:#}"),
        );
        check(
            &lab,
            sa["remote"].as_str().is_some_and(|r| r.ends_with(":4500")),
            || format!("{side:?}: IKE did not move to port 4500: {sa:#}"),
        );
        check(&lab, s["inbound"]["drops"]["inner_checksum"] == 0, || {
            format!("{side:?}: inner checksum drops: {s:#}")
        });
    }
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        check(&lab, status.success(), || {
            format!("{side:?} exit: {status}")
        });
    }
}

/// RFC 7296 section 2.6: with a cookie threshold of 0 the responder
/// answers every new IKE_SA_INIT with a COOKIE and keeps nothing; the
/// initiator returns it and the IKE SA comes up. Status and metrics
/// count the cookie sent and accepted.
#[test]
fn a_responder_under_load_demands_a_cookie_and_the_initiator_returns_it() {
    let Some(lab) = ike_lab_with(
        "ike_cookie",
        "ikec",
        82,
        Encap::NATT,
        false,
        false,
        "cookie_threshold = 0\n",
    ) else {
        return;
    };
    start_both(&lab);
    wait_established(&lab);
    carries_ping_and_udp(&lab);
    let s = status(&lab, Side::B);
    let c = &s["ike"]["cookies"];
    check(
        &lab,
        c["sent"].as_u64() >= Some(1)
            && c["accepted"].as_u64() >= Some(1)
            && c["half_open"] == 0
            && c["demanding"] == true,
        || format!("b's cookie counters: {c:#}"),
    );
    let metrics = lab
        .metrics(Side::B)
        .unwrap_or_else(|e| fail(&lab, &format!("metrics: {e}")));
    for want in [
        "esptun_ike_cookies_total{event=\"sent\"} ",
        "esptun_ike_cookies_total{event=\"accepted\"} ",
        "esptun_ike_half_open_sas 0",
    ] {
        check(&lab, metrics.contains(want), || {
            format!("metrics lack {want}:\n{metrics}")
        });
    }
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        check(&lab, status.success(), || {
            format!("{side:?} exit: {status}")
        });
    }
}

/// The named IKE SA of a side's one peer as status shows it.
fn ike_sa(lab: &TunnelLab, side: Side) -> serde_json::Value {
    let s = status(lab, side);
    s["ike"]["peers"][0]["sas"]
        .as_array()
        .and_then(|sas| sas.iter().find(|sa| sa["state"] == "established"))
        .cloned()
        .unwrap_or_else(|| fail(lab, &format!("{side:?}: no established IKE SA: {s:#}")))
}

/// A real NAT (RFC 7296 section 2.23, RFC 3948): a — router masquerading
/// a's packets — b, a initiating. NAT detection finds a behind the NAT,
/// the CHILD SA is UDP-encapsulated, and ping, byte-checked TCP both ways
/// and UDP pass with no inner checksum drop (the inner packets are
/// rebuilt with the original, traffic selector, addresses). Then the NAT
/// forgets a's mapping and makes a new one on another port: b's IKE SA
/// sees a's next authenticated message from there (a liveness check,
/// every 2 s here), reports the move, and b's ESP follows it.
#[test]
fn behind_a_nat_ike_moves_esp_into_udp_and_follows_a_new_mapping() {
    behind_a_nat("ike_nat", "ikenat", 83, false);
}

/// The same with b not knowing the NAT's address: its peer `a` has
/// `any_source = true` and a's own (unNATed) address as `endpoint`; a's
/// IKE_SA_INIT from the NAT's address is matched to it, and IKE_AUTH
/// checks who it is.
#[test]
fn a_peer_behind_an_unknown_nat_is_found_by_any_source() {
    behind_a_nat("ike_nat_any", "ikenay", 85, true);
}

/// Through the NAT the two ends' `esp_sa` records of the CHILD SA name
/// different outer addresses, each what its own wire shows: b's name the
/// NAT's address (198.18.SUBNET.254, also with `any_source`, whose
/// configured endpoint is a's own address), a's its own address. SPI and
/// key (and so decryption) are the same on both ends.
fn nat_child_sa_esp_records(lab: &TunnelLab, subnet: u8) {
    let nat = format!("\"198.18.{subnet}.254\"");
    let a_own = format!("\"198.18.{subnet}.1\"");
    let a = esp_sa_records(lab, Side::A);
    let b = esp_sa_records(lab, Side::B);
    // Eight fields, padded, so that a short line fails the check, not
    // the indexing.
    let fields = |r: &String| -> Vec<String> {
        let mut f: Vec<String> = r.split(',').map(str::to_string).collect();
        f.resize(8.max(f.len()), String::new());
        f
    };
    let shown =
        |rs: &[String]| -> Vec<String> { rs.iter().map(|r| fields(r)[..4].join(",")).collect() };
    let ok = a.len() == 2
        && b.len() == 2
        && b.iter().all(|r| {
            let f = fields(r);
            (f[1] == nat || f[2] == nat) && f[1] != a_own && f[2] != a_own
        })
        && a.iter().all(|r| {
            let f = fields(r);
            (f[1] == a_own || f[2] == a_own) && f[1] != nat && f[2] != nat
        })
        && a.iter().all(|r| {
            // b's record of the same SA: a's own address replaced by the
            // NAT's, all else equal.
            let want = r.replace(&a_own, &nat);
            b.contains(&want)
        });
    check(lab, ok, || {
        format!(
            "CHILD SA records through the NAT (keys not shown): a {:?}, b {:?}",
            shown(&a),
            shown(&b)
        )
    });
}

fn behind_a_nat(test: &str, tag: &str, subnet: u8, any_source: bool) {
    let Some(lab) = common::lab(
        test,
        LabOptions {
            tag: tag.into(),
            subnet,
            encap: Encap::NATT,
            overlay: true,
            router_mtu: Some(1500),
            nat: true,
            ike: Some(LabIke {
                initiator: Side::A,
                wrong_psk: false,
            }),
            metrics: true,
            ike_extra: "liveness_secs = 2\nkeepalive_secs = 2\n".into(),
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    if any_source {
        let path = &lab.b.config;
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| fail(&lab, &format!("reading b's config: {e}")));
        let nat = format!("endpoint = \"198.18.{subnet}.254\"");
        check(&lab, text.contains(&nat), || format!("b's config: {text}"));
        let text = text
            .replace(&nat, &format!("endpoint = \"198.18.{subnet}.1\""))
            .replace("[peer.ike]\n", "[peer.ike]\nany_source = true\n");
        lab.write_config_text(Side::B, &text)
            .unwrap_or_else(|e| fail(&lab, &format!("writing b's config: {e}")));
    }
    start_both(&lab);
    wait_established(&lab);
    let (a, b) = (ike_sa(&lab, Side::A), ike_sa(&lab, Side::B));
    check(
        &lab,
        a["nat"]["local_behind"] == true
            && a["nat"]["peer_behind"] == false
            && a["nat"]["natt"] == true
            && a["nat"]["keepalives"] == true,
        || format!("a should see itself behind the NAT: {a:#}"),
    );
    let router = format!("198.18.{subnet}.254:");
    check(
        &lab,
        b["nat"]["peer_behind"] == true
            && b["nat"]["local_behind"] == false
            && b["nat"]["keepalives"] == false
            && b["remote"].as_str().is_some_and(|r| r.starts_with(&router)),
        || format!("b should see a behind the NAT at {router}: {b:#}"),
    );
    nat_child_sa_esp_records(&lab, subnet);
    carries_ping_and_udp(&lab);
    let r = lab
        .tcp_zeros(2 * MIB, Duration::from_secs(60))
        .unwrap_or_else(|e| fail(&lab, &format!("tcp a->b: {e}")));
    check(&lab, r.is_clean() && r.bytes_received == 2 * MIB, || {
        format!("tcp a->b: {r:?}")
    });
    let back = esptun::lab::tcp_zeros(
        &lab.hosts.a,
        &lab.hosts.b,
        SocketAddr::new(lab.a_inner, 5003),
        2 * MIB,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| fail(&lab, &format!("tcp b->a: {e}")));
    check(
        &lab,
        back.is_clean() && back.bytes_received == 2 * MIB,
        || format!("tcp b->a: {back:?}"),
    );

    // A new mapping: UDP conntrack entries live 1 s, and new ones take
    // ports 20000-20099.
    let router_ns = lab
        .hosts
        .router
        .as_ref()
        .unwrap_or_else(|| fail(&lab, "no router"));
    router_ns
        .run(|| -> std::io::Result<()> {
            std::fs::write("/proc/sys/net/netfilter/nf_conntrack_udp_timeout", "1")?;
            std::fs::write(
                "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream",
                "1",
            )
        })
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| fail(&lab, "setting the router's conntrack timeouts"));
    lab.router_nft(&format!(
        "flush chain ip esptun_nat post\n\
         add rule ip esptun_nat post ip saddr 198.18.{subnet}.0/25 \
         ip daddr 198.18.{subnet}.128/25 meta l4proto udp masquerade to :20000-20099\n\
         add rule ip esptun_nat post ip saddr 198.18.{subnet}.0/25 \
         ip daddr 198.18.{subnet}.128/25 masquerade\n"
    ))
    .unwrap_or_else(|e| fail(&lab, &format!("changing the NAT: {e}")));
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let b = ike_sa(&lab, Side::B);
        let moved = counter(&status(&lab, Side::B), "peer_moved") >= 1
            && b["remote"]
                .as_str()
                .and_then(|r| r.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
                .is_some_and(|p| (20000..20100).contains(&p));
        if moved && lab.ping(3).is_ok_and(|p| p.received >= 2) {
            break;
        }
        if Instant::now() >= deadline {
            fail(
                &lab,
                &format!(
                    "traffic did not resume on the new mapping within 40 s:\na: {:#}\nb: {:#}",
                    status(&lab, Side::A)["ike"],
                    status(&lab, Side::B)["ike"]
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    carries_ping_and_udp(&lab);
    // a, behind the NAT, sends a keepalive every `keepalive_secs` (2 s
    // here) when it sent no ESP in the interval (RFC 3948 section 4); b
    // sends none.
    if !any_source {
        // A stream a -> b for several intervals: the keepalives due in it
        // are skipped.
        let skipped = counter(&status(&lab, Side::A), "keepalives_skipped");
        let busy = Instant::now();
        while busy.elapsed() < Duration::from_secs(7) {
            let r = lab
                .tcp_zeros(4 * MIB, Duration::from_secs(60))
                .unwrap_or_else(|e| fail(&lab, &format!("tcp a->b: {e}")));
            check(&lab, r.is_clean(), || format!("tcp a->b: {r:?}"));
        }
        let s = status(&lab, Side::A);
        check(&lab, counter(&s, "keepalives_skipped") > skipped, || {
            format!("no keepalive skipped while ESP flowed: {:#}", s["ike"])
        });
        // Idle: they go out.
        let sent = counter(&s, "keepalives");
        wait_for(
            &lab,
            Side::A,
            Duration::from_secs(10),
            "a NAT keepalive from a",
            |s| counter(s, "keepalives") > sent,
        );
        check(
            &lab,
            counter(&status(&lab, Side::B), "keepalives") == 0,
            || "b, not behind a NAT, sent keepalives".to_string(),
        );
    }
    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        check(&lab, s["inbound"]["drops"]["inner_checksum"] == 0, || {
            format!("{side:?}: inner checksum drops: {s:#}")
        });
    }
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        check(&lab, status.success(), || {
            format!("{side:?} exit: {status}")
        });
    }
}

/// Raw ESP cannot cross a NAT and a raw-ESP daemon has no NAT-T socket:
/// when NAT detection finds one, the IKE SA is dropped with a log line
/// that names the fix (`outer = "udp"`), counted, and nothing installed
/// (in IKE_SA_INIT, before any CHILD SA exists).
#[test]
fn a_nat_with_raw_esp_is_refused_clearly() {
    let Some(lab) = common::lab(
        "ike_nat_raw",
        LabOptions {
            tag: "ikenr".into(),
            subnet: 84,
            encap: Encap::RawEsp,
            overlay: true,
            router_mtu: Some(1500),
            nat: true,
            ike: Some(LabIke {
                initiator: Side::A,
                wrong_psk: false,
            }),
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    start_both(&lab);
    wait_for(
        &lab,
        Side::B,
        Duration::from_secs(20),
        "the NAT refused with raw ESP",
        |s| counter(s, "nat_refused") >= 1,
    );
    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        check(
            &lab,
            spis(&s, "inbound").is_empty() && spis(&s, "outbound").is_empty(),
            || format!("{side:?}: SAs installed despite the NAT: {s:#}"),
        );
    }
    // The responder, b, finds the NAT in IKE_SA_INIT and answers nothing
    // (a retries, timing out); a, behind the NAT, would say the same.
    let log = std::fs::read_to_string(&lab.b.log).unwrap_or_default();
    check(
        &lab,
        log.contains("NAT traversal needs outer = \"udp\""),
        || format!("b's log does not say why:\n{log}"),
    );
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        check(&lab, status.success(), || {
            format!("{side:?} exit: {status}")
        });
    }
}

/// A daemon that stops (SIGTERM) deletes its IKE SA (RFC 7296 section
/// 1.4.1): the peer drops the IKE SA and its CHILD SA at once, long
/// before its own dead peer detection could (liveness every 10 minutes),
/// and counts the Delete. The stop stays prompt.
fn stop_deletes_the_ike_sa(test: &str, tag: &str, subnet: u8, encap: Encap) {
    let Some(lab) = ike_lab_with(
        test,
        tag,
        subnet,
        encap,
        false,
        false,
        "liveness_secs = 600\n",
    ) else {
        return;
    };
    start_both(&lab);
    let [_, on_b] = wait_established(&lab);
    let child = on_b.2[0];
    // The datapath threads install the CHILD SA a moment after the IKE
    // thread reports it (the outbound SA once the inbound one is in).
    wait_for(
        &lab,
        Side::B,
        Duration::from_secs(5),
        "the CHILD SA in b's datapath",
        |s| {
            let (inb, out) = datapath_spis(s);
            inb.contains(&child.0) && out.contains(&child.1)
        },
    );
    let asked = Instant::now();
    let exit = lab
        .stop(Side::A)
        .unwrap_or_else(|e| fail(&lab, &format!("stopping a: {e}")));
    let took = asked.elapsed();
    check(&lab, exit.success(), || format!("a exit: {exit}"));
    check(&lab, took < Duration::from_secs(5), || {
        format!("a took {took:?} to stop")
    });
    // Without the Delete, b would hold everything for 10 minutes.
    let s = wait_for(
        &lab,
        Side::B,
        Duration::from_secs(3),
        "the IKE SA and CHILD SA deleted",
        |s| {
            let (inb, out) = datapath_spis(s);
            s["ike"]["peers"][0]["sas"]
                .as_array()
                .is_some_and(|sas| sas.is_empty())
                && !inb.contains(&child.0)
                && !out.contains(&child.1)
        },
    );
    check(&lab, counter(&s, "deletes_received") == 1, || {
        format!("b should have counted a's Delete: {:#}", s["ike"])
    });
    check(&lab, counter(&s, "dead_peers") == 0, || {
        format!("no dead peer detection: {:#}", s["ike"])
    });
    check(
        &lab,
        lab.log(Side::A).contains("deleting the IKE SA"),
        || format!("a's log: {}", lab.log_tail(Side::A)),
    );
    // b's answer reached a before it exited (over NAT-T through a's
    // inbound thread, which waits for the IKE thread to finish).
    check(&lab, lab.log(Side::A).contains("IKE SA closed"), || {
        format!(
            "a should have seen b's answer to its Delete: {}",
            lab.log_tail(Side::A)
        )
    });
}

#[test]
fn a_stopping_daemon_deletes_its_ike_sa_over_nat_t() {
    stop_deletes_the_ike_sa("ike_stop_natt", "ikestp", 96, Encap::NATT);
}

#[test]
fn a_stopping_daemon_deletes_its_ike_sa_on_port_500() {
    stop_deletes_the_ike_sa("ike_stop_raw", "ikestr", 97, Encap::RawEsp);
}

/// Both sides initiate at once (`initiate = true` on both, started
/// together): two IKE SAs come up, and both sides delete the same
/// redundant one, so each ends with one IKE SA (the same) holding one
/// CHILD SA, which alone is in the datapath and carries traffic.
#[test]
fn both_sides_initiating_at_once_end_with_one_ike_sa() {
    let Some(lab) = ike_lab("ike_both_init", "ikebth", 98, Encap::NATT, false, false) else {
        return;
    };
    let path = lab.endpoint(Side::B).config.clone();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| fail(&lab, &format!("reading {}: {e}", path.display())));
    check(&lab, text.contains("initiate = false"), || {
        format!("b's configuration: {text}")
    });
    lab.write_config_text(
        Side::B,
        &text.replace("initiate = false", "initiate = true"),
    )
    .unwrap_or_else(|e| fail(&lab, &format!("writing b's configuration: {e}")));
    for side in [Side::A, Side::B] {
        lab.spawn(side, &[])
            .unwrap_or_else(|e| fail(&lab, &format!("starting {side:?}: {e}")));
    }
    for side in [Side::A, Side::B] {
        lab.wait_ready(side)
            .unwrap_or_else(|e| fail(&lab, &format!("{side:?} not ready: {e}")));
    }
    let one = |s: &serde_json::Value| {
        let sas = s["ike"]["peers"][0]["sas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // The datapath holds exactly the CHILD SA of the IKE SA (the
        // redundant one's outbound SA may carry traffic for a moment
        // until its successor takes over).
        let (inb, out) = datapath_spis(s);
        sas.len() == 1
            && established(s)
                .is_some_and(|e| e.2.len() == 1 && inb == vec![e.2[0].0] && out == vec![e.2[0].1])
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let (a, b) = loop {
        let (a, b) = (status(&lab, Side::A), status(&lab, Side::B));
        if one(&a) && one(&b) {
            break (a, b);
        }
        if Instant::now() >= deadline {
            fail(
                &lab,
                &format!("not one IKE SA each:\na: {:#}\nb: {:#}", a, b),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (ea, eb) = (
        established(&a).unwrap_or_else(|| fail(&lab, "a")),
        established(&b).unwrap_or_else(|| fail(&lab, "b")),
    );
    check(&lab, ea.0 == eb.0 && ea.1 == eb.1, || {
        format!("different IKE SAs: {ea:?} {eb:?}")
    });
    check(
        &lab,
        ea.2[0].0 == eb.2[0].1 && ea.2[0].1 == eb.2[0].0,
        || format!("the CHILD SAs do not pair: {ea:?} {eb:?}"),
    );
    let (inb, out) = datapath_spis(&a);
    check(
        &lab,
        inb == vec![ea.2[0].0] && out == vec![ea.2[0].1],
        || format!("a's datapath: in {inb:x?}, out {out:x?}, IKE {ea:x?}"),
    );
    let ping = lab
        .ping(10)
        .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
    check(&lab, ping.received >= 9, || format!("ping: {ping:?}"));
    // At most the two IKE SAs of the race on each side: a third would
    // mean the sides deleted different ones and one initiated again.
    let established_total = counter(&a, "established") + counter(&b, "established");
    check(&lab, established_total <= 4, || {
        format!(
            "IKE SAs established: {established_total}:\na: {:#}\nb: {:#}",
            a["ike"], b["ike"]
        )
    });
}
