//! `esptun demo`: a [`TunnelLab`] with traffic checked byte by byte, a
//! summary a user can read, and with `--corrupt` the field failure replayed
//! live.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crypto::select::Mode;
use crate::lab;
use crate::wire::outer::Encap;

pub use super::tunnel::{Cleanup, DemoError, Endpoint, LabOptions, METRICS_ADDR, Side, TunnelLab};

/// What `esptun demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub encap: Encap,
    pub ipv6: bool,
    pub bytes: u64,
    pub crypto: Mode,
    /// AES key size of the lab's keys: 128 or 256.
    pub key_bits: u32,
    /// Replay the field failure on the sender (a) and show it caught.
    pub corrupt: bool,
    /// The summary as one JSON object on stdout; progress on stderr.
    pub json: bool,
    pub verbose: bool,
    pub exe: PathBuf,
}

/// Share of the faulty sender's seals that are corrupted with `--corrupt`:
/// enough for dozens of hits in a short stream, few enough that TCP keeps
/// moving on retransmissions.
const CORRUPT_RATE: f64 = 0.05;
/// The faulty sender's periodic self-test interval with `--corrupt`.
const CORRUPT_SELFTEST_SECS: u64 = 2;
/// How long, after the stream, the demo waits for that self-test to move
/// the sender to the soft provider.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The large UDP datagrams the demo echoes, each size this many times.
const UDP_LARGE_SIZES: [usize; 3] = [2_000, 9_000, 65_000];
const UDP_LARGE_COUNT: u32 = 10;

/// `esptun demo`: builds the lab, runs the traffic, prints what happened,
/// removes everything (on Ctrl-C too). Exit 0 only if every check passed.
pub fn run(options: &DemoOptions) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "esptun demo needs root: it creates network namespaces, veth and TUN devices \
             (run it with sudo; it removes everything it creates)"
        );
    }
    if options.corrupt {
        if options.crypto != Mode::Auto {
            anyhow::bail!(
                "--corrupt shows the sender moving from the hardware provider to soft, \
                 which only --crypto auto allows (drop --crypto {})",
                options.crypto
            );
        }
        if let Err(why) = &crate::crypto::hardware::provider().availability {
            anyhow::bail!(
                "--corrupt replays a fault of the hardware provider, which is not available \
                 here: {why}"
            );
        }
    }
    let signals = crate::daemon::signals::Signals::block()?;
    let registry: Arc<Mutex<Cleanup>> = Arc::default();
    let worker = {
        let options = options.clone();
        let registry = registry.clone();
        std::thread::Builder::new()
            .name("esptun-demo".into())
            .spawn(move || demo(&options, &registry))?
    };
    loop {
        if worker.is_finished() {
            return match worker.join() {
                Ok(result) => result,
                Err(_) => {
                    anyhow::bail!("the demo thread panicked; everything it created was removed")
                }
            };
        }
        if signals.wait(Duration::from_millis(200)).is_some() {
            eprintln!("\nesptun demo: interrupted; stopping the endpoints and removing the lab");
            registry.lock().unwrap_or_else(|p| p.into_inner()).run();
            return Ok(ExitCode::from(130));
        }
    }
}

/// Prints a line of the human summary: on stdout, or on stderr (as
/// progress) when stdout carries the JSON summary.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// One endpoint's counters, with the kernel's own packets set apart.
///
/// The kernel sends a few packets of its own into any interface it brings
/// up, such as the IPv6 router solicitation (RFC 4861 section 6.3.7) to
/// ff02::2. No peer owns those addresses, so the outbound path drops them
/// as `no_sa`. In the lab every packet of the demo's traffic goes to the
/// peer, so outbound `no_sa` is that chatter, not a tunnel problem: it is
/// shown as "ignored" rather than as a drop.
fn host_summary(side: Side, s: &serde_json::Value) -> serde_json::Value {
    let ignored = count(&s["outbound"]["drops"]["no_sa"]);
    let direction = |d: &str| {
        let mut drops = serde_json::Map::new();
        for (reason, n) in s[d]["drops"].as_object().into_iter().flatten() {
            let n = count(n);
            let n = if d == "outbound" && reason == "no_sa" {
                n - ignored
            } else {
                n
            };
            if n > 0 {
                drops.insert(reason.clone(), n.into());
            }
        }
        let dropped = count(&s[d]["dropped"]);
        serde_json::json!({
            "passed": count(&s[d]["passed"]),
            "dropped": if d == "outbound" { dropped.saturating_sub(ignored) } else { dropped },
            "drops": drops,
        })
    };
    serde_json::json!({
        "host": side.name(),
        "provider": s["provider"],
        "outbound": direction("outbound"),
        "inbound": direction("inbound"),
        "ignored_kernel_packets": ignored,
    })
}

fn host_line(h: &serde_json::Value) -> String {
    let dir = |d: &str| {
        let drops: Vec<String> = h[d]["drops"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        format!(
            "{} passed, {} dropped{}",
            count(&h[d]["passed"]),
            count(&h[d]["dropped"]),
            if drops.is_empty() {
                String::new()
            } else {
                format!(" ({})", drops.join(", "))
            }
        )
    };
    let ignored = count(&h["ignored_kernel_packets"]);
    format!(
        "host {}: provider {}, outbound {}, inbound {}{}",
        h["host"].as_str().unwrap_or("?"),
        h["provider"].as_str().unwrap_or("none"),
        dir("outbound"),
        dir("inbound"),
        if ignored == 0 {
            String::new()
        } else {
            format!(
                "; ignored: {ignored} packet{} the kernel itself sent into the tunnel interface \
                 for no peer (its IPv6 router solicitation and the like, not tunnel traffic)",
                if ignored == 1 { "" } else { "s" }
            )
        }
    )
}

/// Polls the sender until its periodic self-test has moved it to soft.
fn wait_for_soft(lab: &TunnelLab, side: Side) -> Result<serde_json::Value, DemoError> {
    let deadline = Instant::now() + SWITCH_TIMEOUT;
    loop {
        let s = lab.status(side)?;
        if s["provider"] == "soft" || Instant::now() >= deadline {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn demo(options: &DemoOptions, registry: &Arc<Mutex<Cleanup>>) -> anyhow::Result<ExitCode> {
    let out = Out { json: options.json };
    let lab_options = LabOptions {
        tag: "demo".into(),
        subnet: 0,
        encap: options.encap,
        ipv6: options.ipv6,
        crypto: options.crypto,
        key_bits: options.key_bits,
        selftest_interval_secs: if options.corrupt {
            CORRUPT_SELFTEST_SECS
        } else {
            LabOptions::default().selftest_interval_secs
        },
        ..LabOptions::default()
    };
    let lab = TunnelLab::create_with_cleanup(&options.exe, lab_options, registry.clone())?;
    let (a_outer, b_outer) = lab.outer(Side::A);
    out.line(&format!(
        "esptun demo: namespaces {} ({a_outer}) and {} ({b_outer}) joined by veth; outer {}",
        lab.hosts.a.name(),
        lab.hosts.b.name(),
        match options.encap {
            Encap::Udp { port } => format!("ESP in UDP, port {port} (NAT-T)"),
            Encap::RawEsp => "raw ESP (IP protocol 50)".to_string(),
        }
    ));
    // b first: with --corrupt, a's first periodic self-test (2 s after it
    // starts) should find the stream already flowing through the fault.
    lab.start(Side::B, &[])?;
    if options.corrupt {
        lab.start_faulty(Side::A, CORRUPT_RATE, 7)?;
    } else {
        lab.start(Side::A, &[])?;
    }
    let status = lab.status(Side::A)?;
    out.line(&format!(
        "endpoints up; crypto provider in use: {} (mode {}, AES-{}-GCM)",
        status["provider"].as_str().unwrap_or("none"),
        options.crypto,
        options.key_bits
    ));
    if options.corrupt {
        out.line(&format!(
            "field failure replay: host a's hardware provider now corrupts {:.0}% of its seals \
             (one 16-byte plaintext block replaced by its neighbour before sealing, so the ICV \
             is valid over wrong data); its self-test runs every {CORRUPT_SELFTEST_SECS} s",
            CORRUPT_RATE * 100.0
        ));
    }

    let mut ok = true;
    // With --corrupt, streams follow one another until the sender's
    // periodic self-test moves it to soft, so that the whole window in
    // which the fault is live carries traffic: a stream of zeros only
    // shows a corrupted block where it lands on a header or the trailer.
    let (tcp, streams, sender) = if options.corrupt {
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        let mut total: Option<lab::TcpZerosReport> = None;
        let mut streams = 0u32;
        let sender = loop {
            let one = lab.tcp_zeros(options.bytes, Duration::from_secs(300))?;
            streams += 1;
            let clean = one.is_clean();
            total = Some(match total {
                None => one,
                Some(t) => lab::TcpZerosReport {
                    bytes_sent: t.bytes_sent + one.bytes_sent,
                    bytes_received: t.bytes_received + one.bytes_received,
                    nonzero_bytes: t.nonzero_bytes + one.nonzero_bytes,
                    first_nonzero_offset: t.first_nonzero_offset.or(one.first_nonzero_offset),
                    elapsed: t.elapsed + one.elapsed,
                    interrupted: t.interrupted.or(one.interrupted),
                },
            });
            let a = lab.status(Side::A)?;
            if !clean || a["provider"] == "soft" || Instant::now() >= deadline {
                break a;
            }
        };
        // The last stream may have ended just before the switch.
        let sender = if sender["provider"] == "soft" {
            sender
        } else {
            wait_for_soft(&lab, Side::A)?
        };
        let tcp = total.ok_or_else(|| DemoError::Other("no stream ran".into()))?;
        (tcp, streams, Some(sender))
    } else {
        let tcp = lab.tcp_zeros(options.bytes, Duration::from_secs(300))?;
        (tcp, 1, None)
    };
    let tcp_ok = tcp.is_clean() && tcp.nonzero_bytes == 0;
    ok &= tcp_ok;
    out.line(&format!(
        "TCP  {} -> {}: {}{} of {} bytes of zeros in {:.2} s = {:.0} Mbit/s; every byte checked, {} non-zero{}",
        lab.a_inner,
        lab.b_inner,
        if streams > 1 {
            format!("{streams} streams until the switch, ")
        } else {
            String::new()
        },
        tcp.bytes_received,
        tcp.bytes_sent,
        tcp.elapsed.as_secs_f64(),
        tcp.mbit_per_s(),
        tcp.nonzero_bytes,
        tcp.interrupted
            .as_ref()
            .map(|e| format!(" (INTERRUPTED: {e})"))
            .unwrap_or_default()
    ));
    let udp = lab.udp_exchange(100, 1200)?;
    let udp_ok = udp.is_clean(100);
    ok &= udp_ok;
    out.line(&format!(
        "UDP  {} datagrams of 1200 bytes: {} echoed intact, {} corrupted, {} lost",
        udp.sent,
        udp.echoed_ok,
        udp.mismatched,
        udp.lost()
    ));
    // Larger than the tunnel MTU: the sending kernel fragments them before
    // the TUN device, esptun reassembles and seals each as one ESP packet,
    // and the echo carries it back the other way.
    let mut large = lab::UdpReport::default();
    for size in UDP_LARGE_SIZES {
        let r = lab.udp_exchange(UDP_LARGE_COUNT, size)?;
        large.sent += r.sent;
        large.echoed_ok += r.echoed_ok;
        large.mismatched += r.mismatched;
        large.duplicates += r.duplicates;
        large.server_received += r.server_received;
    }
    let large_ok = large.is_clean(UDP_LARGE_COUNT * UDP_LARGE_SIZES.len() as u32);
    ok &= large_ok;
    out.line(&format!(
        "UDP  {} datagrams of {} bytes (over the tunnel MTU, reassembled): \
         {} echoed intact, {} corrupted, {} lost",
        large.sent,
        UDP_LARGE_SIZES.map(|s| s.to_string()).join("/"),
        large.echoed_ok,
        large.mismatched,
        large.lost()
    ));
    let ping = lab.ping(5)?;
    let ping_ok = ping.received == 5;
    ok &= ping_ok;
    out.line(&format!(
        "ping {}: {}/{} replies",
        lab.b_inner, ping.received, ping.sent
    ));

    // Let both threads publish their last SA state.
    std::thread::sleep(Duration::from_millis(400));
    let mut hosts = Vec::new();
    for side in [Side::A, Side::B] {
        let h = host_summary(side, &lab.status(side)?);
        out.line(&host_line(&h));
        hosts.push(h);
    }
    let corruption = match &sender {
        None => serde_json::Value::Null,
        Some(a) => {
            let caught = count(&hosts[1]["inbound"]["drops"]["inner_checksum"]);
            // A block replaced in the ESP trailer changes next_header or
            // the padding instead: also caught, under another reason.
            let other: u64 = hosts[1]["inbound"]["drops"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(r, _)| *r != "inner_checksum")
                .map(|(_, n)| count(n))
                .sum();
            let switched = a["provider"] == "soft";
            let why = a["providers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == "hardware")
                .and_then(|p| p["disabled"].as_str())
                .unwrap_or("")
                .to_string();
            let passed = caught > 0 && switched && tcp_ok;
            ok &= passed;
            out.line(&format!(
                "corruption check: host b dropped {caught} corrupted packet{} as inner_checksum \
                 (valid ICV, wrong data){}; TCP resent them and the stream arrived {}; host a's \
                 periodic self-test {} -> {}",
                if caught == 1 { "" } else { "s" },
                if other > 0 {
                    format!(" and {other} for other reasons (a corrupted ESP trailer)")
                } else {
                    String::new()
                },
                if tcp_ok {
                    "intact, byte for byte"
                } else {
                    "BROKEN"
                },
                if switched {
                    format!("caught the fault ({why})")
                } else {
                    format!("did NOT catch the fault within {SWITCH_TIMEOUT:?}")
                },
                if switched {
                    "traffic moved to the soft provider".to_string()
                } else {
                    format!("provider still {}", a["provider"])
                },
            ));
            if caught == 0 {
                out.line(
                    "corruption check FAILED: no packet with a corrupted inner header reached host b \
                     before the switch (try a larger --bytes)",
                );
            }
            serde_json::json!({
                "passed": passed,
                "rate": CORRUPT_RATE,
                "inner_checksum_drops": caught,
                "other_receiver_drops": other,
                "streams": streams,
                "stream_intact": tcp_ok,
                "sender_provider": a["provider"],
                "sender_switched_to_soft": switched,
                "hardware_disabled_reason": why,
            })
        }
    };
    for side in [Side::A, Side::B] {
        let status = lab.stop(side)?;
        if !status.success() {
            ok = false;
            out.line(&format!("endpoint {} stopped with {status}", side.name()));
        }
    }
    if options.verbose || !ok {
        for side in [Side::A, Side::B] {
            eprintln!(
                "--- log of endpoint {} ---\n{}",
                side.name(),
                lab.log_tail(side)
            );
        }
    }
    drop(lab);
    out.line(&format!(
        "removed the namespaces, interfaces, keys and state; {}",
        if ok { "demo passed" } else { "demo FAILED" }
    ));
    if options.json {
        let summary = serde_json::json!({
            "passed": ok,
            "outer": options.encap.mode(),
            "ipv6": options.ipv6,
            "crypto": options.crypto,
            "key_bits": options.key_bits,
            "tcp": {
                "bytes_sent": tcp.bytes_sent,
                "bytes_received": tcp.bytes_received,
                "nonzero_bytes": tcp.nonzero_bytes,
                "seconds": tcp.elapsed.as_secs_f64(),
                "mbit_per_s": tcp.mbit_per_s(),
                "intact": tcp_ok,
                "interrupted": tcp.interrupted.as_ref().map(ToString::to_string),
            },
            "udp": {
                "sent": udp.sent,
                "echoed_intact": udp.echoed_ok,
                "corrupted": udp.mismatched,
                "lost": udp.lost(),
            },
            "udp_large": {
                "sizes": UDP_LARGE_SIZES,
                "sent": large.sent,
                "received_intact": large.echoed_ok,
                "corrupted": large.mismatched,
                "lost": large.lost(),
            },
            "ping": { "sent": ping.sent, "received": ping.received },
            "hosts": hosts,
            "corruption": corruption,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
