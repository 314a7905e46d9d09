//! The control thread under load, and `esptun reload`, against a real
//! daemon in a network namespace.
//!
//! Needs root. Without it every test prints that it skipped and why; with
//! `ESPTUN_REQUIRE_NETNS=1` (CI) it fails instead. Every wait is bounded.

mod common;

use common::{check, fail, lab};

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use esptun::lab::demo::{LabOptions, METRICS_ADDR, Side, TunnelLab};

/// Runs the esptun binary with `args` within `limit`: (exit code, stdout,
/// stderr, how long it took).
fn esptun(
    lab: &TunnelLab,
    name: &str,
    args: &[&str],
    limit: Duration,
) -> (Option<i32>, String, String, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_esptun"));
    cmd.args(args);
    let started = Instant::now();
    let (status, out, err) = common::run_bounded(cmd, &lab.dir, name, limit)
        .unwrap_or_else(|e| fail(lab, &format!("esptun {args:?}: {e}")));
    (status.code(), out, err, started.elapsed())
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Opens `n` TCP connections to the metrics port inside a's namespace and
/// sends nothing on them.
fn idle_tcp(lab: &TunnelLab, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = METRICS_ADDR.parse().expect("metrics address");
    lab.hosts
        .a
        .run(move || {
            (0..n)
                .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_else(|e| fail(lab, &format!("entering a's namespace: {e}")))
}

fn idle_unix(path: &Path, n: usize) -> Vec<UnixStream> {
    (0..n)
        .filter_map(|_| UnixStream::connect(path).ok())
        .collect()
}

/// A hundred idle clients on each listener, and more arriving all the
/// time, delay neither `esptun status` nor a scrape beyond a second, and
/// SIGTERM still stops the daemon within two.
#[test]
fn idle_clients_delay_neither_status_nor_metrics_nor_a_stop() {
    let Some(lab) = lab(
        "control_idle_clients",
        LabOptions {
            tag: "ctli".into(),
            subnet: 60,
            metrics: true,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    if let Err(e) = lab.start(Side::A, &[]) {
        fail(&lab, &format!("starting a: {e}"));
    }
    let config = lab.a.config.clone();
    let control = lab.a.control.clone();
    let tcp = idle_tcp(&lab, 100);
    let unix = idle_unix(&control, 100);
    check(&lab, tcp.len() == 100 && unix.len() == 100, || {
        format!("idle clients: {} tcp, {} unix", tcp.len(), unix.len())
    });

    // Ten new idle clients a second on each listener (the reported
    // attack), for as long as the checks run.
    let flooding = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut held = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while flooding.load(Ordering::Relaxed) && Instant::now() < deadline {
                held.push((idle_tcp(&lab, 1), idle_unix(&control, 1)));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for round in 0..5 {
                let (code, out, err, took) = esptun(
                    &lab,
                    &format!("status-{round}"),
                    &["status", "-c", s(&config)],
                    Duration::from_secs(10),
                );
                check(
                    &lab,
                    code == Some(0) && out.contains("outbound SAs:"),
                    || format!("status under idle clients: {code:?}\n{out}\n{err}"),
                );
                check(&lab, took < Duration::from_secs(1), || {
                    format!("status took {took:?} with idle clients")
                });
                let started = Instant::now();
                let metrics = lab.metrics(Side::A);
                let took = started.elapsed();
                check(
                    &lab,
                    metrics
                        .as_ref()
                        .is_ok_and(|m| m.contains("esptun_uptime_seconds")),
                    || format!("scrape under idle clients: {metrics:?}"),
                );
                check(&lab, took < Duration::from_secs(1), || {
                    format!("a scrape took {took:?} with idle clients")
                });
                std::thread::sleep(Duration::from_millis(300));
            }
            // Clients closed for want of a slot are counted.
            let s = lab
                .status(Side::A)
                .unwrap_or_else(|e| fail(&lab, &format!("status: {e}")));
            check(
                &lab,
                s["io"]["connections_refused"].as_u64().unwrap_or(0) > 0,
                || format!("no refused connections counted: {}", s["io"]),
            );
            // SIGTERM with every idle client still connected.
            let started = Instant::now();
            let stopped = lab.stop(Side::A);
            let took = started.elapsed();
            check(&lab, stopped.as_ref().is_ok_and(|s| s.success()), || {
                format!("stop with idle clients: {stopped:?}")
            });
            check(&lab, took < Duration::from_secs(2), || {
                format!("SIGTERM took {took:?} with idle clients")
            });
        }));
        flooding.store(false, Ordering::Relaxed);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    });
    drop((tcp, unix));
}

/// A new key for `from`'s outbound SA, declared fresh in `state` (or not).
fn new_key(lab: &TunnelLab, from: Side, state: &Path, name: &str, fresh: bool) -> PathBuf {
    let path = lab.key_file(from).with_extension(name);
    let material = esptun::keyfile::generate(esptun::crypto::KeySize::Aes256).expect("key");
    if fresh {
        let parsed = esptun::sa::KeyMaterial::from_bytes(&material).expect("material");
        esptun::sa::reservation::ReservationStore::open(state)
            .and_then(|s| s.mark_fresh(&parsed))
            .expect("mark fresh");
    }
    esptun::keyfile::write_new(&path, &material).expect("write key");
    path
}

/// (spi, state) of each SA in one direction of a status.
fn sas(s: &serde_json::Value, direction: &str) -> Vec<(u64, String)> {
    s[direction]
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
}

/// `esptun reload` says what the datapath did: a refused configuration
/// (a new SPI on the running key, a key with no sequence record) exits 1
/// with the reason and changes nothing; a good roll exits 0 and its SAs
/// appear.
#[test]
fn esptun_reload_reports_the_datapaths_answer() {
    let Some(lab) = lab(
        "control_reload",
        LabOptions {
            tag: "ctlr".into(),
            subnet: 61,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    if let Err(e) = lab.start(Side::A, &[]) {
        fail(&lab, &format!("starting a: {e}"));
    }
    let config = lab.a.config.clone();
    let (local, remote) = lab.outer(Side::A);
    let original = lab.config_text(Side::A, local, remote);
    let status = || {
        lab.status(Side::A)
            .unwrap_or_else(|e| fail(&lab, &format!("status: {e}")))
    };
    let reload = |name: &str| {
        esptun(
            &lab,
            name,
            &["reload", "-c", s(&config)],
            Duration::from_secs(20),
        )
    };
    let before = status();
    let running = (sas(&before, "outbound_sas"), sas(&before, "inbound_sas"));
    check(&lab, running.0 == [(0xa001, "active".into())], || {
        format!("unexpected start: {before:#}")
    });

    // A new SPI on the key that is still sending: refused by the key
    // manager.
    lab.write_config_text(Side::A, &original.replace("0xa001", "0xa003"))
        .expect("config");
    let (code, out, err, _) = reload("reload-key-in-use");
    check(
        &lab,
        code == Some(1) && out.contains("uses the key of the SA"),
        || format!("reload onto the running key: {code:?}\n{out}\n{err}"),
    );
    let after = status();
    check(
        &lab,
        (sas(&after, "outbound_sas"), sas(&after, "inbound_sas")) == running,
        || format!("a refused reload changed the SAs: {after:#}"),
    );

    // A roll to an outbound key with no sequence record: the key manager
    // accepts it (pending, since the inbound SA rolls too), the outbound
    // thread refuses it when it claims the reservation. The inbound half
    // is applied; the outbound SA that runs stays.
    let unrecorded = new_key(&lab, Side::A, &lab.a.state_dir, "unrecorded", false);
    let b3 = new_key(&lab, Side::B, &lab.b.state_dir, "key3", true);
    let text = original
        .replace(&lab.key_file(Side::A).display().to_string(), s(&unrecorded))
        .replace(&lab.key_file(Side::B).display().to_string(), s(&b3))
        .replace("0xa001", "0xa004")
        .replace("0xb001", "0xb004");
    lab.write_config_text(Side::A, &text).expect("config");
    let (code, out, err, _) = reload("reload-unrecorded");
    check(
        &lab,
        code == Some(1) && out.contains("0xa004") && out.contains("no sequence-number record"),
        || format!("reload with an unrecorded key: {code:?}\n{out}\n{err}"),
    );
    let after = status();
    check(
        &lab,
        sas(&after, "outbound_sas") == running.0
            && sas(&after, "inbound_sas").contains(&(0xb004, "active".into())),
        || format!("the outbound SA did not stay, or the inbound half is missing: {after:#}"),
    );

    // The same for the outbound SA alone: nothing waits for the peer, but
    // the running SA is removed only once the new one is installed, so a
    // refused claim leaves it sending (it once left the peer with none).
    let unrecorded2 = new_key(&lab, Side::A, &lab.a.state_dir, "unrecorded2", false);
    let text = original
        .replace(
            &lab.key_file(Side::A).display().to_string(),
            s(&unrecorded2),
        )
        .replace(&lab.key_file(Side::B).display().to_string(), s(&b3))
        .replace("0xa001", "0xa005")
        .replace("0xb001", "0xb004");
    lab.write_config_text(Side::A, &text).expect("config");
    let (code, out, err, _) = reload("reload-unrecorded-outbound");
    check(
        &lab,
        code == Some(1) && out.contains("0xa005") && out.contains("no sequence-number record"),
        || format!("outbound-only reload with an unrecorded key: {code:?}\n{out}\n{err}"),
    );
    // The pending SA goes with the refusal; give the manager a tick.
    std::thread::sleep(Duration::from_millis(300));
    let after = status();
    check(&lab, sas(&after, "outbound_sas") == running.0, || {
        format!("the running outbound SA did not stay: {after:#}")
    });

    // A good roll of both directions: applied, and in the status as soon
    // as the command returns (the new outbound SA pending or, with a peer
    // that never sent on the old SAs, already active).
    let a2 = new_key(&lab, Side::A, &lab.a.state_dir, "key2", true);
    let b2 = new_key(&lab, Side::B, &lab.b.state_dir, "key2", true);
    let rolled = original
        .replace(&lab.key_file(Side::A).display().to_string(), s(&a2))
        .replace(&lab.key_file(Side::B).display().to_string(), s(&b2))
        .replace("0xa001", "0xa002")
        .replace("0xb001", "0xb002");
    lab.write_config_text(Side::A, &rolled).expect("config");
    // (the daemon's copy of the file took only the inbound half of the
    // last reload: 0xb004 is what it rolls from now)
    let (code, out, err, _) = reload("reload-good");
    check(
        &lab,
        code == Some(0) && out.contains("reload applied"),
        || format!("a good reload: {code:?}\n{out}\n{err}"),
    );
    let after = status();
    let outbound = sas(&after, "outbound_sas");
    let inbound = sas(&after, "inbound_sas");
    check(
        &lab,
        outbound.iter().any(|(spi, _)| *spi == 0xa002)
            && inbound.contains(&(0xb002, "active".into())),
        || format!("the rolled SAs are not there: {after:#}"),
    );
    // Reloading the same file again changes nothing and says so.
    let (code, out, err, _) = reload("reload-again");
    check(&lab, code == Some(0), || {
        format!("the same file again: {code:?}\n{out}\n{err}")
    });
    let stopped = lab.stop(Side::A);
    check(&lab, stopped.as_ref().is_ok_and(|s| s.success()), || {
        format!("stop: {stopped:?}")
    });
}
