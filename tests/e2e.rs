//! End to end: two network namespaces joined by veth, a real `esptun run`
//! in each (real TUN devices, real sockets), traffic through the tunnel.
//!
//! Needs root. Without it every test prints that it skipped and why; with
//! `ESPTUN_REQUIRE_NETNS=1` (CI) it fails instead. Each test builds its own
//! lab (unique namespace names, its own 198.18.X.0/24) and removes it, also
//! when an assertion fails. Throughput is printed, never asserted.

mod common;

use common::{check, fail, lab};

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use esptun::lab::demo::{LabOptions, Side, TunnelLab};
use esptun::wire::outer::Encap;

const MIB: u64 = 1 << 20;

fn status(lab: &TunnelLab, side: Side) -> serde_json::Value {
    lab.status(side)
        .unwrap_or_else(|e| fail(lab, &format!("status of {side:?}: {e}")))
}

fn drops(s: &serde_json::Value, direction: &str, reason: &str) -> u64 {
    s[direction]["drops"][reason].as_u64().unwrap_or(u64::MAX)
}

/// Waits (bounded) until both threads have published state for the
/// traffic just sent.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn start_both(lab: &TunnelLab) {
    for side in [Side::A, Side::B] {
        if let Err(e) = lab.start(side, &[]) {
            fail(lab, &format!("starting {side:?}: {e}"));
        }
    }
}

/// TCP zeros, UDP and ping through the tunnel, with the invariants every
/// configuration must keep; returns the TCP throughput for the log.
fn traffic(lab: &TunnelLab, tcp_bytes: u64) {
    traffic_allowing(lab, tcp_bytes, &[]);
}

/// [`traffic`], tolerating drops of the `expected` reasons (caused on
/// purpose by the test).
fn traffic_allowing(lab: &TunnelLab, tcp_bytes: u64, expected: &[&str]) {
    let tcp = lab
        .tcp_zeros(tcp_bytes, Duration::from_secs(600))
        .unwrap_or_else(|e| fail(lab, &format!("tcp: {e}")));
    check(
        lab,
        tcp.is_clean() && tcp.bytes_received == tcp_bytes,
        || format!("TCP stream not clean: {tcp:?}"),
    );
    eprintln!(
        "{:?}: TCP {} MiB of zeros, all checked: {:.0} Mbit/s",
        lab.options,
        tcp_bytes / MIB,
        tcp.mbit_per_s()
    );
    let udp = lab
        .udp_exchange(50, 1000)
        .unwrap_or_else(|e| fail(lab, &format!("udp: {e}")));
    check(lab, udp.is_clean(50), || format!("UDP not clean: {udp:?}"));
    let ping = lab
        .ping(3)
        .unwrap_or_else(|e| fail(lab, &format!("ping: {e}")));
    check(lab, ping.received == 3, || format!("ping: {ping:?}"));

    settle();
    for side in [Side::A, Side::B] {
        let s = status(lab, side);
        for direction in ["outbound", "inbound"] {
            for reason in [
                "inner_checksum",
                "icv_failure",
                "replay",
                "too_old",
                "unknown_spi",
            ] {
                if expected.contains(&reason) {
                    continue;
                }
                check(lab, drops(&s, direction, reason) == 0, || {
                    format!("{side:?} {direction} dropped {reason}: {s:#}")
                });
            }
        }
        let out = &s["outbound_sas"][0];
        let used = out["seq_used"].as_u64().unwrap_or(0);
        check(
            lab,
            used > 0 && out["seq_reserved"].as_u64().unwrap_or(0) >= used,
            || format!("{side:?}: sequence numbers used beyond the reservation: {s:#}"),
        );
        check(
            lab,
            s["inbound_sas"][0]["packets"].as_u64().unwrap_or(0) > 0,
            || format!("{side:?} received nothing: {s:#}"),
        );
        check(lab, s["provider"].is_string(), || {
            format!("{side:?}: no provider: {s:#}")
        });
    }
}

/// Stops both endpoints and checks that they left nothing behind.
fn stop_and_check_cleanup(lab: &TunnelLab) {
    for side in [Side::A, Side::B] {
        match lab.stop(side) {
            Ok(status) => check(lab, status.success(), || {
                format!("{side:?} exited with {status}")
            }),
            Err(e) => fail(lab, &format!("stopping {side:?}: {e}")),
        }
        let ns = match side {
            Side::A => &lab.hosts.a,
            Side::B => &lab.hosts.b,
        };
        let links = ns.ip_output(&["link", "show"]).unwrap_or_default();
        check(lab, !links.contains("esptun0"), || {
            format!("{side:?}: TUN left behind: {links}")
        });
        for family in ["-4", "-6"] {
            let rules = ns.ip_output(&[family, "rule", "show"]).unwrap_or_default();
            check(lab, !rules.contains("fwmark"), || {
                format!("{side:?}: policy rule left behind: {rules}")
            });
        }
        check(lab, !lab.endpoint(side).control.exists(), || {
            format!("{side:?}: control socket left behind")
        });
    }
}

/// A check some configuration cases add to the common [`traffic`] ones.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Extra {
    /// `a` runs as systemd would run it: READY=1 only once it can carry
    /// traffic (interface up, status answering), STOPPING=1 on the way out.
    SystemdNotify,
    /// What an operator types: `esptun status -c FILE`, text and JSON.
    StatusCommand,
    /// The provider `a` reports in its status.
    Provider(&'static str),
    /// Which offloads both ends report in use: all the kernel offers
    /// (TSO, coalescing, and UDP GSO/GRO with NAT-T), or none.
    Offloads(bool),
}

/// One configuration of the tunnel: its lab, how much TCP goes through it,
/// and what it checks beyond the invariants of [`traffic`].
struct ConfigCase {
    /// The name in the lab's messages and skips.
    name: &'static str,
    tag: &'static str,
    subnet: u8,
    encap: Encap,
    ipv6: bool,
    overlay: bool,
    key_bits: u32,
    icv: u8,
    crypto: esptun::crypto::select::Mode,
    tcp_mib: u64,
    offloads_off: bool,
    extras: &'static [Extra],
}

/// The defaults of [`LabOptions`]: NAT-T, IPv4, classic transport mode,
/// AES-256, ICV 16, provider chosen automatically.
const BASE: ConfigCase = ConfigCase {
    name: "",
    tag: "",
    subnet: 0,
    encap: Encap::NATT,
    ipv6: false,
    overlay: false,
    key_bits: 256,
    icv: 16,
    crypto: esptun::crypto::select::Mode::Auto,
    tcp_mib: 32,
    offloads_off: false,
    extras: &[],
};

const CONFIGURATIONS: &[ConfigCase] = &[
    ConfigCase {
        name: "ipv4_nat_t_classic",
        tag: "v4udp",
        subnet: 10,
        tcp_mib: 256,
        extras: &[
            Extra::SystemdNotify,
            Extra::StatusCommand,
            Extra::Offloads(true),
        ],
        ..BASE
    },
    ConfigCase {
        name: "ipv4_nat_t_offloads_off",
        tag: "v4off",
        subnet: 14,
        offloads_off: true,
        extras: &[Extra::Offloads(false)],
        ..BASE
    },
    ConfigCase {
        name: "ipv6_raw_esp_overlay",
        tag: "v6esp",
        subnet: 11,
        encap: Encap::RawEsp,
        ipv6: true,
        overlay: true,
        key_bits: 128,
        icv: 8,
        ..BASE
    },
    ConfigCase {
        name: "ipv4_raw_esp_overlay",
        tag: "v4esp",
        subnet: 12,
        encap: Encap::RawEsp,
        overlay: true,
        icv: 12,
        ..BASE
    },
    ConfigCase {
        name: "ipv6_nat_t_classic_soft",
        tag: "v6udp",
        subnet: 13,
        ipv6: true,
        crypto: esptun::crypto::select::Mode::Soft,
        tcp_mib: 16,
        extras: &[Extra::Provider("soft")],
        ..BASE
    },
];

#[test]
fn ipv4_nat_t_classic_256_mib_of_zeros_udp_and_ping() {
    run_configuration("ipv4_nat_t_classic");
}

#[test]
fn ipv4_nat_t_with_every_offload_off() {
    run_configuration("ipv4_nat_t_offloads_off");
}

/// Four TCP streams at once (TSO super-packets and GRO trains of several
/// flows interleaved, batches that fill up mid super-packet), each checked
/// byte by byte, with nothing dropped by esptun.
#[test]
fn four_parallel_streams_with_offloads_arrive_intact() {
    let Some(lab) = lab(
        "four_streams",
        LabOptions {
            tag: "par4".into(),
            subnet: 15,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    start_both(&lab);
    let reports: Vec<_> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..4u16)
            .map(|i| {
                let lab = &lab;
                s.spawn(move || lab.tcp_zeros_on(5100 + i, 32 * MIB, Duration::from_secs(300)))
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().unwrap_or_else(|_| fail(&lab, "a stream panicked")))
            .collect()
    });
    for (i, r) in reports.iter().enumerate() {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| fail(&lab, &format!("stream {i}: {e}")));
        check(&lab, r.is_clean() && r.bytes_received == 32 * MIB, || {
            format!("stream {i} not clean: {r:?}")
        });
    }
    settle();
    for side in [Side::A, Side::B] {
        let s = status(&lab, side);
        for direction in ["outbound", "inbound"] {
            // The kernel's own IPv6 chatter into the TUN is no_sa.
            let dropped = s[direction]["dropped"].as_u64().unwrap_or(u64::MAX);
            let chatter = s[direction]["drops"]["no_sa"].as_u64().unwrap_or(0);
            check(&lab, dropped == chatter, || {
                format!("{side:?} {direction} dropped packets: {s:#}")
            });
        }
        check(&lab, s["offloads"]["tso"] == true, || {
            format!("{side:?}: TSO not in use: {s:#}")
        });
    }
    stop_and_check_cleanup(&lab);
}

#[test]
fn ipv6_raw_esp_overlay_aes128_icv8() {
    run_configuration("ipv6_raw_esp_overlay");
}

#[test]
fn ipv4_raw_esp_overlay_icv12() {
    run_configuration("ipv4_raw_esp_overlay");
}

#[test]
fn ipv6_nat_t_classic_soft_provider() {
    run_configuration("ipv6_nat_t_classic_soft");
}

/// Both endpoints up, [`traffic`] with every invariant, the case's extra
/// checks, then a clean stop.
fn run_configuration(name: &str) {
    let case = CONFIGURATIONS
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no configuration case {name:?}"));
    let Some(lab) = lab(
        case.name,
        LabOptions {
            tag: case.tag.into(),
            subnet: case.subnet,
            encap: case.encap,
            ipv6: case.ipv6,
            overlay: case.overlay,
            key_bits: case.key_bits,
            icv: case.icv,
            crypto: case.crypto,
            offloads_off: case.offloads_off,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let manager = if case.extras.contains(&Extra::SystemdNotify) {
        Some(start_a_notifying(&lab))
    } else {
        if let Err(e) = lab.start(Side::A, &[]) {
            fail(&lab, &format!("starting A: {e}"));
        }
        None
    };
    if let Err(e) = lab.start(Side::B, &[]) {
        fail(&lab, &format!("starting B: {e}"));
    }
    traffic(&lab, case.tcp_mib * MIB);
    for extra in case.extras {
        match extra {
            Extra::SystemdNotify => {}
            Extra::StatusCommand => check_status_command(&lab),
            Extra::Provider(want) => {
                let s = status(&lab, Side::A);
                check(&lab, s["provider"] == *want, || {
                    format!("crypto = {want} not honoured: {s:#}")
                });
            }
            Extra::Offloads(on) => {
                for side in [Side::A, Side::B] {
                    let s = status(&lab, side);
                    let o = &s["offloads"];
                    let all = ["tun_checksum", "tso", "coalesce", "udp_gso", "udp_gro"];
                    check(&lab, all.iter().all(|k| o[*k] == *on), || {
                        format!("{side:?}: offloads should all be {on}: {o:#}")
                    });
                }
            }
        }
    }
    stop_and_check_cleanup(&lab);
    if let Some(manager) = manager {
        let mut buf = [0u8; 256];
        let n = manager
            .recv(&mut buf)
            .unwrap_or_else(|e| fail(&lab, &format!("no STOPPING=1 from a: {e}")));
        check(&lab, &buf[..n] == b"STOPPING=1", || {
            format!("got {:?}", String::from_utf8_lossy(&buf[..n]))
        });
    }
}

/// Starts `a` as systemd would (`NOTIFY_SOCKET`) and checks that READY=1
/// comes only once it can carry traffic; returns the manager's socket.
fn start_a_notifying(lab: &TunnelLab) -> UnixDatagram {
    let manager_path = lab.dir.join("notify.sock");
    let manager = UnixDatagram::bind(&manager_path).expect("notify socket");
    manager
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let notify_env = manager_path.display().to_string();
    if let Err(e) = lab.spawn(Side::A, &[("NOTIFY_SOCKET", &notify_env)]) {
        fail(lab, &format!("starting a: {e}"));
    }
    let mut buf = [0u8; 256];
    let n = manager
        .recv(&mut buf)
        .unwrap_or_else(|e| fail(lab, &format!("no READY=1 from a: {e}")));
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    check(lab, ready.lines().any(|l| l == "READY=1"), || {
        format!("got {ready:?}")
    });
    // By then the interface is up and status answers at once.
    check(lab, lab.status(Side::A).is_ok(), || {
        "READY=1 before status answers".into()
    });
    let links = lab
        .hosts
        .a
        .ip_output(&["link", "show", "esptun0"])
        .unwrap_or_default();
    check(lab, links.contains("UP"), || {
        format!("READY=1 before the interface is up: {links}")
    });
    manager
}

/// What an operator types: `esptun status -c FILE`, text and JSON.
fn check_status_command(lab: &TunnelLab) {
    let status_cmd = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"));
        cmd.args(["status", "-c"]).arg(&lab.a.config);
        if json {
            cmd.arg("--json");
        }
        cmd.output().expect("esptun status")
    };
    let text = status_cmd(false);
    let shown = String::from_utf8_lossy(&text.stdout);
    check(lab, text.status.success(), || {
        format!("status failed: {}", String::from_utf8_lossy(&text.stderr))
    });
    for needle in [
        "outbound SAs",
        "0xa001",
        "inbound SAs",
        "0xb001",
        "self-test history",
        "provider",
    ] {
        check(lab, shown.contains(needle), || {
            format!("{needle:?} not in:\n{shown}")
        });
    }
    let json = status_cmd(true);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| fail(lab, &format!("status --json is not JSON: {e}")));
    check(
        lab,
        v["outbound"]["passed"].as_u64().unwrap_or(0) > 0,
        || format!("{v:#}"),
    );
}

/// The field failure, replayed: the sender's hardware provider passes its
/// boot tests, then corrupts a 16-byte block (a copy of its neighbour)
/// before sealing. The receiver must drop those packets as inner-checksum
/// failures, so the stream still arrives complete and all zero; the
/// sender's periodic self-test must catch the provider and move traffic to
/// soft.
#[test]
fn field_failure_replay_corrupt_blocks_never_reach_the_application() {
    if !esptun::crypto::hardware::provider().is_available() {
        common::skip_or_fail_without_aesni("field_failure_replay");
        return;
    }
    let Some(lab) = lab(
        "field_failure_replay",
        LabOptions {
            tag: "fault".into(),
            subnet: 14,
            selftest_interval_secs: 3,
            metrics: true,
            drop_capture: true,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    // b first, so that a's first periodic check (3 s after a starts) finds
    // the stream already flowing through the faulty provider.
    if let Err(e) = lab.start(Side::B, &[]) {
        fail(&lab, &format!("starting b: {e}"));
    }
    if let Err(e) = lab.start_faulty(Side::A, 0.05, 7) {
        fail(&lab, &format!("starting a: {e}"));
    }
    let tcp = lab
        .tcp_zeros(64 * MIB, Duration::from_secs(600))
        .unwrap_or_else(|e| fail(&lab, &format!("tcp: {e}")));
    check(&lab, tcp.is_clean() && tcp.nonzero_bytes == 0, || {
        format!("a corrupted byte reached the application, or the stream broke: {tcp:?}")
    });

    // The sender's periodic check (every 3 s) catches it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let a = loop {
        let a = status(&lab, Side::A);
        if a["provider"] == "soft" || Instant::now() >= deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    check(&lab, a["provider"] == "soft", || {
        format!("the periodic self-test did not move traffic to soft: {a:#}")
    });
    let hw = &a["providers"][0];
    check(
        &lab,
        hw["disabled"].is_string() && hw["periodic_failures"].as_u64().unwrap_or(0) > 0,
        || format!("hardware not disabled by a failed periodic check: {a:#}"),
    );
    let failed_check = a["selftest_history"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["check"] == "long-message" && e["ok"] == false);
    check(&lab, failed_check, || {
        format!("no failed long-message check in the history: {a:#}")
    });

    settle();
    let b = status(&lab, Side::B);
    let caught = drops(&b, "inbound", "inner_checksum");
    check(&lab, caught > 0, || {
        format!("the receiver caught nothing: {b:#}")
    });
    check(&lab, drops(&b, "inbound", "icv_failure") == 0, || {
        format!("corrupted plaintext sealed correctly must pass the ICV: {b:#}")
    });
    eprintln!(
        "field failure replay: {caught} packets dropped as inner_checksum at the receiver, \
         0 corrupted bytes delivered, sender moved to soft"
    );

    // The same facts in the metrics an operator would scrape.
    let metric = |text: &str, series: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let b_metrics = lab
        .metrics(Side::B)
        .unwrap_or_else(|e| fail(&lab, &format!("scrape b: {e}")));
    check(
        &lab,
        metric(
            &b_metrics,
            "esptun_drops_total{direction=\"inbound\",reason=\"inner_checksum\"}",
        ) == Some(caught),
        || format!("b's metrics disagree with its status ({caught}):\n{b_metrics}"),
    );
    let a_metrics = lab
        .metrics(Side::A)
        .unwrap_or_else(|e| fail(&lab, &format!("scrape a: {e}")));
    check(
        &lab,
        metric(&a_metrics, "esptun_provider_active{provider=\"soft\"}") == Some(1)
            && metric(
                &a_metrics,
                "esptun_selftest_failures_total{provider=\"hardware\"}",
            )
            .is_some_and(|n| n > 0),
        || format!("a's metrics do not show the switch:\n{a_metrics}"),
    );

    // The evidence: every dropped packet in b's capture, decrypted, each
    // with a wrong checksum; and the log line that explains one.
    let pcap = std::fs::read(lab.drop_capture_path(Side::B))
        .unwrap_or_else(|e| fail(&lab, &format!("no drop capture: {e}")));
    let mut records = 0u64;
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len =
            u32::from_le_bytes([pcap[at + 8], pcap[at + 9], pcap[at + 10], pcap[at + 11]]) as usize;
        let packet = &pcap[at + 16..(at + 16 + len).min(pcap.len())];
        let e = esptun::daemon::capture::explain(packet);
        check(
            &lab,
            e.checksums
                .is_some_and(|(found, computed)| found != computed),
            || format!("captured packet {records} does not show a checksum mismatch: {e:?}"),
        );
        records += 1;
        at += 16 + len;
    }
    check(&lab, records == caught, || {
        format!("{records} packets captured, {caught} dropped")
    });
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(lab.drop_capture_path(Side::B))
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    check(&lab, mode == 0o600, || format!("capture mode {mode:o}"));
    let log = lab.log(Side::B);
    check(
        &lab,
        log.contains("checksum_found")
            && log.contains("checksum_computed")
            && log.contains("repeat"),
        || format!("no post-mortem log line:\n{log}"),
    );

    // Traffic continues on soft, clean.
    let before = drops(&status(&lab, Side::B), "inbound", "inner_checksum");
    let tcp = lab
        .tcp_zeros(8 * MIB, Duration::from_secs(300))
        .unwrap_or_else(|e| fail(&lab, &format!("tcp after the switch: {e}")));
    check(&lab, tcp.is_clean(), || {
        format!("after the switch: {tcp:?}")
    });
    settle();
    let after = drops(&status(&lab, Side::B), "inbound", "inner_checksum");
    check(&lab, after == before, || {
        format!("corruption continued after the switch to soft: {before} -> {after}")
    });
    stop_and_check_cleanup(&lab);
}

/// `kill -9` of the sender mid-stream: after the restart every sequence
/// number is above anything used before (the durable reservation), the
/// receiver sees no replay, and the TCP stream resumes and completes.
#[test]
fn kill_9_mid_stream_never_reuses_a_sequence_number() {
    let Some(lab) = lab(
        "kill_9_restart",
        LabOptions {
            tag: "kill9".into(),
            subnet: 15,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    start_both(&lab);
    let (reserved_before, top_before, tcp) = std::thread::scope(|s| {
        let stream = s.spawn(|| lab.tcp_zeros(128 * MIB, Duration::from_secs(600)));
        // Bounded wait for the stream to be well under way.
        let deadline = Instant::now() + Duration::from_secs(60);
        while status(&lab, Side::B)["inbound_sas"][0]["packets"]
            .as_u64()
            .unwrap_or(0)
            < 2000
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let reserved = status(&lab, Side::A)["outbound_sas"][0]["seq_reserved"]
            .as_u64()
            .unwrap_or(0);
        if let Err(e) = lab.kill9(Side::A) {
            fail(&lab, &format!("kill -9: {e}"));
        }
        let top = status(&lab, Side::B)["inbound_sas"][0]["replay_top"]
            .as_u64()
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(300));
        if let Err(e) = lab.start(Side::A, &[]) {
            fail(&lab, &format!("restart after kill -9: {e}"));
        }
        let tcp = stream
            .join()
            .unwrap_or_else(|_| fail(&lab, "tcp thread panicked"));
        (reserved, top, tcp)
    });
    let tcp = tcp.unwrap_or_else(|e| fail(&lab, &format!("tcp: {e}")));
    check(&lab, tcp.is_clean(), || {
        format!("the stream did not survive the restart: {tcp:?}")
    });
    check(&lab, reserved_before > 0 && top_before > 0, || {
        format!("nothing was sent before the kill: reserved {reserved_before}, top {top_before}")
    });
    settle();
    let a = status(&lab, Side::A);
    let out = &a["outbound_sas"][0];
    let (used, packets) = (
        out["seq_used"].as_u64().unwrap_or(0),
        out["packets"].as_u64().unwrap_or(0),
    );
    // Every number after the restart was taken in order from here.
    let first_after_restart = used + 1 - packets;
    check(
        &lab,
        packets > 0 && first_after_restart > reserved_before,
        || {
            format!(
                "restarted sender began at {first_after_restart}, not above the durable reservation \
             {reserved_before} in force before kill -9: {a:#}"
            )
        },
    );
    let b = status(&lab, Side::B);
    for reason in ["replay", "too_old", "icv_failure"] {
        check(&lab, drops(&b, "inbound", reason) == 0, || {
            format!("receiver saw {reason} after the restart: {b:#}")
        });
    }
    check(
        &lab,
        b["inbound_sas"][0]["replay_top"].as_u64().unwrap_or(0) > reserved_before,
        || format!("receiver's window did not move above {reserved_before}: {b:#}"),
    );
    eprintln!(
        "kill -9: reservation before {reserved_before}, receiver top before {top_before}, \
         first sequence number after restart {first_after_restart}"
    );
    stop_and_check_cleanup(&lab);
}

/// Runs `esptun run` for side A with `config` and expects it to fail fast.
fn run_expecting_failure(lab: &TunnelLab, config: &str) -> (Option<i32>, String) {
    if let Err(e) = lab.write_config_text(Side::A, config) {
        fail(lab, &format!("writing config: {e}"));
    }
    let _ = std::fs::remove_file(&lab.a.log);
    if let Err(e) = lab.spawn(Side::A, &[]) {
        fail(lab, &format!("spawn: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = lab.try_exit(Side::A) {
            let _ = lab.kill9(Side::A); // reaps the handle; already exited
            return (status.code(), lab.log(Side::A));
        }
        if Instant::now() >= deadline {
            let _ = lab.kill9(Side::A);
            fail(
                lab,
                &format!("esptun run kept running with a bad setup:\n{config}"),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn operator_mistakes_are_clear_errors_and_unknown_traffic_is_counted() {
    use std::os::unix::fs::PermissionsExt;
    let Some(lab) = lab(
        "operator_mistakes",
        LabOptions {
            tag: "bad".into(),
            subnet: 16,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let (a_outer, b_outer) = lab.outer(Side::A);
    let good = lab.config_text(Side::A, a_outer, b_outer);
    let key = lab.key_file(Side::A);
    let key_str = key.display().to_string();

    let expect = |config: &str, needles: &[&str]| {
        let (code, log) = run_expecting_failure(&lab, config);
        check(&lab, code == Some(1), || {
            format!("exit {code:?} for:\n{config}\n{log}")
        });
        for needle in needles {
            check(&lab, log.contains(needle), || {
                format!("{needle:?} not in:\n{log}")
            });
        }
        check(&lab, !log.contains("panicked"), || format!("panic:\n{log}"));
    };

    expect(&format!("outer = \"tcp\"\n{good}"), &["outer", "\"udp\""]);
    expect(
        &good.replace(&key_str, "/nonexistent/a.key"),
        &["cannot read key file", "/nonexistent/a.key"],
    );

    let short = lab.dir.join("short.key");
    std::fs::write(&short, "00112233445566778899aabbccddeeff\n").expect("write");
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    expect(
        &good.replace(&key_str, &short.display().to_string()),
        &["16 bytes", "esptun genkey"],
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    expect(&good, &["group or others", "chmod 600"]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // The same key material for both directions, under another file name:
    // both hosts would seal with one key and salt.
    let copy = lab.dir.join("copy-of-b-to-a.key");
    std::fs::copy(lab.key_file(Side::B), &copy).expect("copy");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    expect(
        &good.replace(&key_str, &copy.display().to_string()),
        &["same key material", "reuse nonces"],
    );

    // A key this state directory has no record of, not declared fresh.
    let elsewhere = lab.dir.join("state-elsewhere");
    let state = lab.a.state_dir.display().to_string();
    expect(
        &good.replace(&state, &elsewhere.display().to_string()),
        &["no sequence-number record", "declare-fresh", "reuse"],
    );

    // UDP port 4500 already taken in a's namespace.
    let squatter = lab
        .hosts
        .a
        .run(|| UdpSocket::bind("0.0.0.0:4500"))
        .expect("namespace")
        .expect("bind 4500");
    expect(&good, &["already in use", "4500"]);
    drop(squatter);

    // Back to a good setup: both up, then junk at b's port 4500.
    if let Err(e) = lab.write_config_text(Side::A, &good) {
        fail(&lab, &format!("config: {e}"));
    }
    start_both(&lab);
    let target = SocketAddr::new(b_outer, 4500);
    let sent = lab
        .hosts
        .a
        .run(move || -> std::io::Result<u64> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            let mut rng = common::TestRng::from_env("junk");
            for i in 0..200u32 {
                // SPI 0x7777xxxx: nobody's; sequence numbers and bodies random.
                let mut packet = rng.bytes(60 + (i as usize % 200));
                packet[..4].copy_from_slice(&(0x7777_0000 | i).to_be_bytes());
                socket.send_to(&packet, target)?;
            }
            Ok(200)
        })
        .expect("namespace")
        .expect("send junk");
    settle();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut b = status(&lab, Side::B);
    while drops(&b, "inbound", "unknown_spi") < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        b = status(&lab, Side::B);
    }
    check(&lab, drops(&b, "inbound", "unknown_spi") == sent, || {
        format!("{sent} packets with unknown SPIs, counted: {b:#}")
    });
    check(&lab, lab.try_exit(Side::B).is_none(), || {
        "b died on junk".into()
    });
    traffic_allowing(&lab, 4 * MIB, &["unknown_spi"]);
    let log = lab.log(Side::B);
    check(
        &lab,
        log.contains("unknown_spi") && log.contains("suppressed"),
        || format!("no rate-limited drop log line:\n{log}"),
    );
    let lines = log
        .lines()
        .filter(|l| l.contains("reason=\"unknown_spi\""))
        .count();
    check(&lab, lines < 20, || {
        format!("{lines} log lines for 200 drops: not rate-limited")
    });
    stop_and_check_cleanup(&lab);
}

/// A second key for `from`'s outbound SA (the key file with extension
/// `key2`), made as genkey makes it: recorded fresh in the sender's
/// `state` directory.
fn new_key(lab: &TunnelLab, from: Side, state: &Path) -> PathBuf {
    let path = lab.key_file(from).with_extension("key2");
    let material = esptun::keyfile::generate(esptun::crypto::KeySize::Aes256).expect("key");
    let parsed = esptun::sa::KeyMaterial::from_bytes(&material).expect("material");
    esptun::sa::reservation::ReservationStore::open(state)
        .and_then(|s| s.mark_fresh(&parsed))
        .expect("mark fresh");
    esptun::keyfile::write_new(&path, &material).expect("write key");
    path
}

/// Rolling both directions to new keys and SPIs with one config edit and
/// one SIGHUP per host, while UDP flows: nothing is lost, the new SAs carry
/// the traffic, and the old inbound SAs retire.
#[test]
fn sighup_rolls_keys_make_before_break() {
    let Some(lab) = lab(
        "sighup_roll",
        LabOptions {
            tag: "roll".into(),
            subnet: 17,
            rekey_switch_secs: 2,
            rekey_retire_secs: 5,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    start_both(&lab);
    // New keys, made as genkey makes them (recorded fresh by the sender).
    for (from, state) in [(Side::A, &lab.a.state_dir), (Side::B, &lab.b.state_dir)] {
        new_key(&lab, from, state);
    }
    let rolled = |side: Side| {
        let (local, remote) = lab.outer(side);
        let mut text = lab.config_text(side, local, remote);
        for from in [Side::A, Side::B] {
            let key = lab.key_file(from);
            text = text.replace(
                &key.display().to_string(),
                &key.with_extension("key2").display().to_string(),
            );
        }
        text.replace("0xa001", "0xa002").replace("0xb001", "0xb002")
    };
    let report = std::thread::scope(|s| {
        let flow = s.spawn(|| {
            // About 8 s of paced UDP in rounds, across both reloads.
            let mut total = (0u32, 0u32);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(8) {
                match lab.udp_exchange(50, 500) {
                    Ok(r) => {
                        total.0 += r.sent;
                        total.1 += r.echoed_ok;
                    }
                    Err(e) => return Err(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(total)
        });
        std::thread::sleep(Duration::from_millis(1500));
        for side in [Side::A, Side::B] {
            if let Err(e) = lab.write_config_text(side, &rolled(side)) {
                fail(&lab, &format!("config: {e}"));
            }
        }
        for side in [Side::A, Side::B] {
            if let Err(e) = lab.reload(side) {
                fail(&lab, &format!("SIGHUP: {e}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        flow.join()
            .unwrap_or_else(|_| fail(&lab, "udp thread panicked"))
    });
    let (sent, echoed) = report.unwrap_or_else(|e| fail(&lab, &format!("udp: {e}")));
    check(&lab, sent > 0 && echoed == sent, || {
        format!("lost {} of {sent} datagrams during the roll", sent - echoed)
    });
    // Retirement is 5 s after each reload; the flow ran 8 s from 1.5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = status(&lab, Side::A);
        let b = status(&lab, Side::B);
        let spis = |s: &serde_json::Value, key: &str| -> Vec<u64> {
            s[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["spi"].as_u64())
                .collect()
        };
        let done = spis(&a, "outbound_sas") == [0xa002]
            && spis(&b, "outbound_sas") == [0xb002]
            && spis(&a, "inbound_sas") == [0xb002]
            && spis(&b, "inbound_sas") == [0xa002];
        if done {
            check(
                &lab,
                b["inbound_sas"][0]["packets"].as_u64().unwrap_or(0) > 0,
                || format!("the new SA carried nothing: {b:#}"),
            );
            break;
        }
        if Instant::now() >= deadline {
            fail(
                &lab,
                &format!("the roll did not complete:\na: {a:#}\nb: {b:#}"),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("SIGHUP roll: {sent} datagrams, none lost; new SAs 0xa002/0xb002 in use");
    traffic(&lab, 4 * MIB);
    // In a symmetric roll each side waits for the other: the first to
    // reload switches on the timeout, then sees the peer on its new
    // inbound SA, which is what lets the peer switch. Nothing to warn
    // about, on either side.
    let logs = [lab.log(Side::A), lab.log(Side::B)];
    for log in &logs {
        let warned: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") && (l.contains("switch") || l.contains("reloaded")))
            .collect();
        check(&lab, warned.is_empty(), || {
            format!("a normal roll logged warnings: {warned:#?}")
        });
    }
    check(
        &lab,
        logs.iter()
            .any(|l| l.contains("the peer uses the new keys")),
        || {
            format!(
                "the timed switch was never confirmed:\n{}\n{}",
                logs[0], logs[1]
            )
        },
    );
    stop_and_check_cleanup(&lab);
}

/// Reloads that would let two SAs draw on one key's nonce space change
/// nothing: a roll reverted before its switch keeps the running SA (and
/// cancels the pending one), and a new SPI on the running key is refused.
#[test]
fn reloads_never_let_two_sas_share_a_key() {
    let Some(lab) = lab(
        "reload_key_sharing",
        LabOptions {
            tag: "share".into(),
            subnet: 18,
            rekey_switch_secs: 30,
            rekey_retire_secs: 60,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    start_both(&lab);
    let (local, remote) = lab.outer(Side::A);
    let original = lab.config_text(Side::A, local, remote);
    let state = &lab.a.state_dir;
    let a2 = new_key(&lab, Side::A, state);
    let b2 = new_key(&lab, Side::B, &lab.b.state_dir);
    let rolled = original
        .replace(
            &lab.key_file(Side::A).display().to_string(),
            &a2.display().to_string(),
        )
        .replace(
            &lab.key_file(Side::B).display().to_string(),
            &b2.display().to_string(),
        )
        .replace("0xa001", "0xa002")
        .replace("0xb001", "0xb002");
    let outbound = |s: &serde_json::Value| -> Vec<(u64, String)> {
        s["outbound_sas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                (
                    x["spi"].as_u64().unwrap_or(0),
                    x["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let wait_for = |what: &str, want: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(&lab, Side::A);
            if want(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                fail(&lab, &format!("{what}: {s:#}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // Roll only a: its new outbound SA waits for b, which never reloads.
    lab.write_config_text(Side::A, &rolled).expect("config");
    lab.reload(Side::A).expect("SIGHUP");
    wait_for("a pending switch to 0xa002", &|s| {
        outbound(s) == [(0xa001, "active".into()), (0xa002, "pending".into())]
    });
    // Reverted before the switch: the running SA stays, the pending goes.
    lab.write_config_text(Side::A, &original).expect("config");
    lab.reload(Side::A).expect("SIGHUP");
    wait_for("the revert to keep 0xa001 alone", &|s| {
        outbound(s) == [(0xa001, "active".into())]
    });

    // A new SPI on the key that is still sending: refused, unchanged.
    lab.write_config_text(Side::A, &original.replace("0xa001", "0xa003"))
        .expect("config");
    lab.reload(Side::A).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.log(Side::A).contains("uses the key of the SA") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    check(
        &lab,
        lab.log(Side::A).contains("uses the key of the SA"),
        || "a second SA on the running key was not refused".into(),
    );
    let s = status(&lab, Side::A);
    check(&lab, outbound(&s) == [(0xa001, "active".into())], || {
        format!("changed: {s:#}")
    });

    // Traffic still flows on the original SAs, with no replay at b.
    lab.write_config_text(Side::A, &original).expect("config");
    traffic(&lab, 4 * MIB);
    stop_and_check_cleanup(&lab);
}

/// `esptun demo` interrupted mid-stream (Ctrl-C) stops its endpoints and
/// removes its namespaces and files, and says so.
#[test]
fn demo_interrupted_removes_everything() {
    if !common::require_root("demo_interrupted", "network namespaces") {
        return;
    }
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(["demo", "--bytes", "68719476736"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the demo");
    let prefix = format!("e{:05}", demo.id() % 100_000);
    let namespaces = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix) && n.contains("demo"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // Wait until the lab exists and traffic is flowing (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen = namespaces();
        if seen.len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let pid = libc::pid_t::try_from(demo.id()).expect("pid");
    // Our own child, not yet reaped.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT to the demo");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = demo.kill();
            panic!("the demo did not stop within 30 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = demo.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(seen.len(), 2, "the demo never built its lab: {stderr}");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(namespaces().is_empty(), "left behind: {:?}", namespaces());
    let dir = std::env::temp_dir().join(format!("esptun-{}", seen[0]));
    assert!(!dir.exists(), "{} left behind", dir.display());
}
