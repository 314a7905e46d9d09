//! `esptun demo` end to end (root: network namespaces), and the fence
//! around its fault-injecting endpoint.

mod common;

use std::process::Command;
use std::time::Duration;

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_esptun")
}

/// Runs `esptun demo ARGS --json` and returns its summary.
fn demo_json(test: &str, args: &[&str]) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("esptun-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cmd = Command::new(exe());
    cmd.arg("demo").args(args).arg("--json");
    let result = common::run_bounded(cmd, &dir, "demo", Duration::from_secs(300));
    let _ = std::fs::remove_dir_all(&dir);
    let (status, out, err) = result.unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(status.success(), "{test}: {status}\n{out}\n{err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{test}: the summary is not JSON ({e}):\n{out}\n{err}"))
}

#[test]
fn demo_passes_and_counts_no_kernel_chatter_as_a_drop() {
    if !common::require_root("demo_passes", "network namespaces") {
        return;
    }
    let v = demo_json("demo-plain", &["--bytes", "1000000"]);
    assert_eq!(v["passed"], true, "{v:#}");
    assert_eq!(v["tcp"]["intact"], true, "{v:#}");
    assert_eq!(v["tcp"]["bytes_received"], 1_000_000, "{v:#}");
    assert!(v["corruption"].is_null(), "{v:#}");
    assert!(v["ike"].is_null(), "{v:#}");
    assert_eq!(v["tcp"]["streams"], 1, "{v:#}");
    // Datagrams over the tunnel MTU, both ways, byte by byte.
    let large = &v["udp_large"];
    assert!(large["sent"].as_u64().unwrap_or(0) >= 30, "{v:#}");
    assert_eq!(large["received_intact"], large["sent"], "{v:#}");
    assert_eq!(large["corrupted"], 0, "{v:#}");
    for h in v["hosts"].as_array().expect("hosts") {
        for d in ["outbound", "inbound"] {
            assert_eq!(h[d]["dropped"], 0, "a healthy demo drops nothing: {v:#}");
            assert!(h[d]["passed"].as_u64().unwrap_or(0) > 0, "{v:#}");
        }
    }
}

#[test]
fn demo_corrupt_shows_the_field_failure_caught() {
    if !common::require_root("demo_corrupt", "network namespaces") {
        return;
    }
    if !esptun::crypto::hardware::provider().is_available() {
        common::skip_or_fail_without_aesni("demo_corrupt");
        return;
    }
    let v = demo_json("demo-corrupt", &["--corrupt", "--bytes", "1000000"]);
    let c = &v["corruption"];
    assert_eq!(v["passed"], true, "{v:#}");
    assert!(
        c["inner_checksum_drops"].as_u64().unwrap_or(0) > 0,
        "the receiver caught nothing: {v:#}"
    );
    assert_eq!(c["stream_intact"], true, "{v:#}");
    assert_eq!(v["tcp"]["nonzero_bytes"], 0, "{v:#}");
    assert_eq!(c["sender_provider"], "soft", "{v:#}");
    assert!(
        c["hardware_disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("periodic")),
        "{v:#}"
    );
    // The receiver's count is the summary's.
    let b = &v["hosts"][1];
    assert_eq!(b["host"], "b");
    assert_eq!(
        b["inbound"]["drops"]["inner_checksum"], c["inner_checksum_drops"],
        "{v:#}"
    );
}

#[test]
fn demo_corrupt_refuses_a_mode_that_cannot_switch_to_soft() {
    if !common::require_root("demo_corrupt_soft", "the demo checks root first") {
        return;
    }
    let out = Command::new(exe())
        .args(["demo", "--corrupt", "--crypto", "soft"])
        .output()
        .expect("run esptun");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--crypto auto"), "{err}");
}

/// `esptun demo --ike ARGS` checked: every stream intact, a's CHILD SAs
/// rekeyed at least twice and its IKE SA at least once while the streams
/// ran, and no packet on either side met an unknown SPI, failed its ICV,
/// was a replay or failed its inner checksum.
fn demo_ike_checked(test: &str, bytes: u64, args: &[&str]) -> serde_json::Value {
    let started = std::time::Instant::now();
    let bytes_arg = bytes.to_string();
    let mut all = vec!["--ike", "--bytes", &bytes_arg];
    all.extend_from_slice(args);
    let v = demo_json(test, &all);
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(v["passed"], true, "{v:#}");
    let tcp = &v["tcp"];
    let streams = tcp["streams"].as_u64().unwrap_or(0);
    assert!(streams >= 1, "{v:#}");
    // Each stream was --bytes long, all of it received, all of it zeros.
    assert_eq!(tcp["intact"], true, "{v:#}");
    assert_eq!(tcp["bytes_sent"], streams * bytes, "{v:#}");
    assert_eq!(tcp["bytes_received"], streams * bytes, "{v:#}");
    assert_eq!(tcp["nonzero_bytes"], 0, "{v:#}");
    let ike = &v["ike"];
    assert_eq!(ike["passed"], true, "{v:#}");
    assert_eq!(ike["initiator"], "a", "{v:#}");
    assert!(ike["child_rekeys"].as_u64().unwrap_or(0) >= 2, "{v:#}");
    assert!(ike["ike_rekeys"].as_u64().unwrap_or(0) >= 1, "{v:#}");
    // Under the streams, not only in the UDP and ping afterwards.
    assert!(
        ike["during_streams"]["child_rekeys"].as_u64().unwrap_or(0) >= 2,
        "{v:#}"
    );
    assert!(
        ike["during_streams"]["ike_rekeys"].as_u64().unwrap_or(0) >= 1,
        "{v:#}"
    );
    for side in ["a", "b"] {
        for reason in ["unknown_spi", "icv_failure", "replay", "inner_checksum"] {
            assert_eq!(ike["drops"][side][reason], 0, "{side} {reason}: {v:#}");
        }
    }
    // The same seen from the hosts' own counters (the demo's drops are
    // counted from the moment the SAs were up; these from the start).
    for h in v["hosts"].as_array().expect("hosts") {
        for reason in ["unknown_spi", "icv_failure", "replay", "inner_checksum"] {
            assert!(
                h["inbound"]["drops"][reason].is_null(),
                "{} inbound {reason}: {v:#}",
                h["host"]
            );
        }
    }
    assert!(v["corruption"].is_null(), "{v:#}");
    v
}

/// The acceptance run: 256 MiB of zeros, byte-checked, while
/// CHILD SAs rekey every 3 s and the IKE SA every 8 s.
#[test]
fn demo_ike_streams_256_mib_across_child_and_ike_sa_rekeys() {
    if !common::require_root("demo_ike", "network namespaces") {
        return;
    }
    let v = demo_ike_checked("demo-ike", 256 << 20, &[]);
    assert_eq!(v["outer"], "udp", "{v:#}");
}

/// The same over raw ESP (IKE on port 500) and IPv6, shorter streams.
#[test]
fn demo_ike_over_raw_esp_and_ipv6() {
    if !common::require_root("demo_ike_esp6", "network namespaces") {
        return;
    }
    let v = demo_ike_checked("demo-ike-esp6", 16 << 20, &["--outer", "esp", "--ipv6"]);
    assert_eq!(v["outer"], "esp", "{v:#}");
    assert_eq!(v["ipv6"], true, "{v:#}");
}

#[test]
fn demo_ike_refuses_corrupt() {
    if !common::require_root("demo_ike_corrupt", "the demo checks root first") {
        return;
    }
    let out = Command::new(exe())
        .args(["demo", "--ike", "--corrupt"])
        .output()
        .expect("run esptun");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--corrupt and --ike"), "{err}");
}

#[test]
fn the_fault_injecting_endpoint_refuses_outside_a_lab_namespace() {
    let out = Command::new(exe())
        .args([
            "demo-endpoint",
            "-c",
            "/nonexistent.toml",
            "--fault-rate",
            "0.05",
        ])
        .output()
        .expect("run esptun");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("only for the namespaces `esptun demo --corrupt` creates")
            && err.contains("esptun run"),
        "{err}"
    );
    // It said why before touching the configuration.
    assert!(!err.contains("nonexistent"), "{err}");
}

/// Manual keying gone wrong: ESN on one side only. Every packet fails the
/// ICV check at the receiver, which says once what the likely causes are.
#[test]
fn an_sa_with_only_icv_failures_names_the_likely_causes_once() {
    use esptun::lab::demo::{LabOptions, Side, TunnelLab};
    if !common::require_root("icv_only", "network namespaces") {
        return;
    }
    let lab = TunnelLab::create(
        std::path::Path::new(exe()),
        LabOptions {
            tag: "icvonly".into(),
            subnet: 31,
            ..LabOptions::default()
        },
    )
    .expect("lab");
    let (local, remote) = lab.outer(Side::B);
    let text = lab.config_text(Side::B, local, remote);
    let (before, after) = text.split_once("inbound = {").expect("an inbound SA");
    let text = format!("{before}inbound = {{ esn = false,{after}");
    lab.write_config_text(Side::B, &text).expect("config");
    for side in [Side::A, Side::B] {
        lab.start(side, &[])
            .unwrap_or_else(|e| panic!("start {side:?}: {e}"));
    }
    let udp = lab.udp_exchange(20, 200).expect("udp");
    assert_eq!(udp.echoed_ok, 0, "nothing can pass: {udp:?}");
    std::thread::sleep(Duration::from_millis(300));
    for side in [Side::A, Side::B] {
        let _ = lab.stop(side);
    }
    let log = lab.log(Side::B);
    let warnings = log.matches("failed the ICV check").count();
    assert_eq!(warnings, 1, "one warning for the SA:\n{log}");
    assert!(
        log.contains("extended sequence numbers on one side only") && log.contains("keys swapped"),
        "{log}"
    );
}
