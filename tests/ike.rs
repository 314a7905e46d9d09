//! Two esptun daemons keyed only by IKE (`[peer.ike]`), in network
//! namespaces (root): the IKE SA comes up with matching SPIs on both
//! sides, the CHILD SA it installs carries ping, byte-checked TCP both
//! ways and UDP; a wrong PSK fails cleanly, said in the log and counted,
//! with nothing installed. Both outer modes: NAT-T (IKE on 4500 behind
//! the non-ESP marker) and raw ESP (IKE on 500).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{check, fail};
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
            ..LabOptions::default()
        },
    )
}

fn status(lab: &TunnelLab, side: Side) -> serde_json::Value {
    lab.status(side)
        .unwrap_or_else(|e| fail(lab, &format!("status of {side:?}: {e}")))
}

/// An established IKE SA as `status` shows it: (SPIi, SPIr, CHILD SAs as
/// (inbound SPI, outbound SPI)).
type Established = (String, String, Vec<(u64, u64)>);

/// The established IKE SA of a side's one peer, once there is one.
fn established(s: &serde_json::Value) -> Option<Established> {
    let peer = &s["ike"]["peers"][0];
    let sa = peer["sas"]
        .as_array()?
        .iter()
        .find(|sa| sa["state"] == "established")?;
    let children = sa["children"]
        .as_array()?
        .iter()
        .map(|c| {
            (
                c["inbound_spi"].as_u64().unwrap_or(0),
                c["outbound_spi"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Some((
        sa["spi_i"].as_str()?.to_string(),
        sa["spi_r"].as_str()?.to_string(),
        children,
    ))
}

/// Waits (bounded) until both sides show an established IKE SA with a
/// CHILD SA, and their SAs are in the datapath.
fn wait_established(lab: &TunnelLab) -> [Established; 2] {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = established(&status(lab, Side::A));
        let b = established(&status(lab, Side::B));
        if let (Some(a), Some(b)) = (a, b)
            && !a.2.is_empty()
            && !b.2.is_empty()
        {
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
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        check(&lab, status.success(), || {
            format!("{side:?} exit: {status}")
        });
    }
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
