//! `esptun demo`: a [`TunnelLab`] with traffic checked byte by byte, a
//! summary a user can read, with `--corrupt` the field failure replayed
//! live, and with `--ike` the tunnel keyed by IKEv2 and rekeyed every few
//! seconds under the stream.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crypto::select::Mode;
use crate::lab;
use crate::wire::outer::Encap;

pub use super::tunnel::{
    Cleanup, DemoError, Endpoint, LabIke, LabOptions, METRICS_ADDR, Side, TunnelLab,
};

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
    /// Key both endpoints by IKEv2 (a initiates) with short lifetimes, and
    /// stream until CHILD SAs and the IKE SA have been rekeyed.
    pub ike: bool,
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

/// With `--ike`: the CHILD SA and IKE SA lifetimes (the configuration's
/// minimum is 2 s). Short, so that a stream of a few seconds runs across
/// several CHILD SA rekeys and at least one IKE SA rekey.
const IKE_CHILD_REKEY_SECS: u64 = 3;
const IKE_SA_REKEY_SECS: u64 = 8;
/// How long the endpoints may take to set up the IKE SA and its CHILD SA
/// (a debug build on a loaded machine included).
const IKE_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// With `--ike`, streams follow one another until a has seen this many
/// rekeys during them, or until the deadline (then the demo fails).
const IKE_WANT_CHILD_REKEYS: u64 = 2;
const IKE_WANT_IKE_REKEYS: u64 = 1;
const IKE_REKEY_DEADLINE: Duration = Duration::from_secs(90);
/// Inbound drops that a rekey done right never causes: a packet under an
/// SA the receiver no longer (or not yet) has, under the wrong key, twice,
/// or corrupted.
const IKE_CLEAN_DROPS: [&str; 4] = ["unknown_spi", "icv_failure", "replay", "inner_checksum"];

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
    if options.corrupt && options.ike {
        anyhow::bail!(
            "--corrupt and --ike are two separate demos: run `esptun demo --corrupt` and \
             `esptun demo --ike` one after the other"
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

/// Two streams' reports as one: bytes and time summed, the first
/// non-zero offset and interruption kept.
fn add_reports(t: lab::TcpZerosReport, one: lab::TcpZerosReport) -> lab::TcpZerosReport {
    lab::TcpZerosReport {
        bytes_sent: t.bytes_sent + one.bytes_sent,
        bytes_received: t.bytes_received + one.bytes_received,
        nonzero_bytes: t.nonzero_bytes + one.nonzero_bytes,
        first_nonzero_offset: t.first_nonzero_offset.or(one.first_nonzero_offset),
        elapsed: t.elapsed + one.elapsed,
        interrupted: t.interrupted.or(one.interrupted),
    }
}

/// A side's one IKE peer's counter (`esptun status --json`).
fn ike_counter(s: &serde_json::Value, name: &str) -> u64 {
    count(&s["ike"]["peers"][0]["counters"][name])
}

/// The established IKE SA of a side's one peer, if any (the newest while
/// a rekey briefly holds two).
fn established_ike_sa(s: &serde_json::Value) -> Option<&serde_json::Value> {
    s["ike"]["peers"][0]["sas"]
        .as_array()?
        .iter()
        .filter(|sa| sa["state"] == "established")
        .min_by_key(|sa| count(&sa["age_secs"]))
}

/// The newest CHILD SA of an IKE SA: (inbound SPI, outbound SPI).
fn newest_child(sa: &serde_json::Value) -> Option<(u64, u64)> {
    sa["children"]
        .as_array()?
        .iter()
        .max_by_key(|c| count(&c["generation"]))
        .map(|c| (count(&c["inbound_spi"]), count(&c["outbound_spi"])))
}

/// The SPIs of a side's datapath SAs in one direction.
fn datapath_spis(s: &serde_json::Value, direction: &str) -> Vec<u64> {
    s[format!("{direction}_sas")]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["spi"].as_u64()).collect())
        .unwrap_or_default()
}

/// A side's CHILD SA is up: an established IKE SA with a CHILD SA whose
/// inbound and outbound SAs are in the datapath (the key manager installs
/// them within its tick).
fn child_sa_up(s: &serde_json::Value) -> bool {
    let Some((inbound, outbound)) = established_ike_sa(s).and_then(newest_child) else {
        return false;
    };
    datapath_spis(s, "inbound").contains(&inbound)
        && datapath_spis(s, "outbound").contains(&outbound)
}

/// Waits (bounded) until both sides have the IKE SA and a CHILD SA in
/// their datapaths; traffic before that would only meet no SA.
fn wait_ike_up(lab: &TunnelLab) -> Result<[serde_json::Value; 2], DemoError> {
    let deadline = Instant::now() + IKE_UP_TIMEOUT;
    loop {
        let (a, b) = (lab.status(Side::A)?, lab.status(Side::B)?);
        if child_sa_up(&a) && child_sa_up(&b) {
            return Ok([a, b]);
        }
        if Instant::now() >= deadline {
            let state = |s: &serde_json::Value| {
                let peer = &s["ike"]["peers"][0];
                format!(
                    "IKE SAs {}, last error {}",
                    peer["sas"],
                    peer["last_error"].as_str().unwrap_or("none")
                )
            };
            return Err(DemoError::Other(format!(
                "IKE did not set up an IKE SA and a CHILD SA on both endpoints within \
                 {IKE_UP_TIMEOUT:?}\na: {}\nb: {}\n--- log of endpoint a ---\n{}\n\
                 --- log of endpoint b ---\n{}",
                state(&a),
                state(&b),
                lab.log_tail(Side::A),
                lab.log_tail(Side::B)
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A side's inbound drops of [`IKE_CLEAN_DROPS`] since `before`.
fn clean_drops_moved(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    let mut moved = serde_json::Map::new();
    for reason in IKE_CLEAN_DROPS {
        let n = count(&after["inbound"]["drops"][reason])
            .saturating_sub(count(&before["inbound"]["drops"][reason]));
        moved.insert(reason.to_string(), n.into());
    }
    moved.into()
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
        ike: options.ike.then_some(LabIke {
            initiator: Side::A,
            wrong_psk: false,
        }),
        // The ESP suite follows --bits as the manual keys do.
        ike_extra: if options.ike {
            format!(
                "child_rekey_secs = {IKE_CHILD_REKEY_SECS}\nike_rekey_secs = {IKE_SA_REKEY_SECS}\n\
                 esp_proposals = [\"aes{}gcm16-esn\"]\n",
                options.key_bits
            )
        } else {
            String::new()
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

    // With --ike, the baseline of each side (its drops) once both have
    // their SAs: what moves after it happened during the run.
    let ike_up = if options.ike {
        let up = wait_ike_up(&lab)?;
        let sa = established_ike_sa(&up[0]).cloned().unwrap_or_default();
        let (inbound, outbound) = newest_child(&sa).unwrap_or_default();
        out.line(&format!(
            "IKE  keyed by IKEv2 with a generated PSK: a initiated, b responded; IKE SA \
             {}/{} ({}), CHILD SA {inbound:#010x}/{outbound:#010x} (in/out on a); CHILD SAs \
             rekey every {IKE_CHILD_REKEY_SECS} s, the IKE SA every {IKE_SA_REKEY_SECS} s",
            sa["spi_i"].as_str().unwrap_or("?"),
            sa["spi_r"].as_str().unwrap_or("?"),
            sa["suite"].as_str().unwrap_or("?"),
        ));
        Some(up)
    } else {
        None
    };

    let mut ok = true;
    // With --ike: a's CHILD SA and IKE SA rekeys while the streams ran.
    let mut ike_during = (0u64, 0u64);
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
                Some(t) => add_reports(t, one),
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
    } else if ike_up.is_some() {
        // With --ike, streams follow one another until a has seen enough
        // rekeys while they ran, each byte of each stream checked.
        let rekeys =
            |s: &serde_json::Value| (ike_counter(s, "child_rekeys"), ike_counter(s, "ike_rekeys"));
        let (child0, ike0) = rekeys(&lab.status(Side::A)?);
        let deadline = Instant::now() + IKE_REKEY_DEADLINE;
        let mut total: Option<lab::TcpZerosReport> = None;
        let mut streams = 0u32;
        loop {
            let one = lab.tcp_zeros(options.bytes, Duration::from_secs(300))?;
            streams += 1;
            let clean = one.is_clean() && one.nonzero_bytes == 0;
            total = Some(match total {
                None => one,
                Some(t) => add_reports(t, one),
            });
            let (child, ike) = rekeys(&lab.status(Side::A)?);
            ike_during = (child.saturating_sub(child0), ike.saturating_sub(ike0));
            let enough =
                ike_during.0 >= IKE_WANT_CHILD_REKEYS && ike_during.1 >= IKE_WANT_IKE_REKEYS;
            if !clean || enough || Instant::now() >= deadline {
                break;
            }
        }
        let tcp = total.ok_or_else(|| DemoError::Other("no stream ran".into()))?;
        (tcp, streams, None)
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
            format!(
                "{streams} streams until {}, ",
                if options.ike {
                    "enough rekeys"
                } else {
                    "the switch"
                }
            )
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
    let mut last = Vec::new();
    for side in [Side::A, Side::B] {
        let s = lab.status(side)?;
        let h = host_summary(side, &s);
        out.line(&host_line(&h));
        hosts.push(h);
        last.push(s);
    }
    let ike = match &ike_up {
        None => serde_json::Value::Null,
        Some(up) => {
            let (a, b) = (&last[0], &last[1]);
            let drops = [clean_drops_moved(&up[0], a), clean_drops_moved(&up[1], b)];
            let moved: Vec<String> = [Side::A, Side::B]
                .iter()
                .zip(&drops)
                .flat_map(|(side, d)| {
                    d.as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(_, n)| count(n) > 0)
                        .map(move |(r, n)| format!("{} {r} {n}", side.name()))
                })
                .collect();
            let rekeyed =
                ike_during.0 >= IKE_WANT_CHILD_REKEYS && ike_during.1 >= IKE_WANT_IKE_REKEYS;
            let passed = rekeyed && moved.is_empty() && tcp_ok;
            ok &= passed;
            let sa = established_ike_sa(a).cloned().unwrap_or_default();
            let (child_in, child_out) = newest_child(&sa).unwrap_or_default();
            let (child_rekeys, ike_rekeys) =
                (ike_counter(a, "child_rekeys"), ike_counter(a, "ike_rekeys"));
            out.line(&format!(
                "IKE  a initiated, IKE SA suite {}: {child_rekeys} CHILD SA rekeys and {ike_rekeys} IKE SA \
                 rekey{} on a ({} and {} on b), {} and {} while the streams ran{}; {}",
                sa["suite"].as_str().unwrap_or("?"),
                if ike_rekeys == 1 { "" } else { "s" },
                ike_counter(b, "child_rekeys"),
                ike_counter(b, "ike_rekeys"),
                ike_during.0,
                ike_during.1,
                if rekeyed {
                    String::new()
                } else {
                    format!(
                        " (FAILED: wanted at least {IKE_WANT_CHILD_REKEYS} and \
                         {IKE_WANT_IKE_REKEYS} within {IKE_REKEY_DEADLINE:?})"
                    )
                },
                if moved.is_empty() {
                    "no packet met an unknown SPI, failed its ICV, was a replay or failed its \
                     inner checksum on either side"
                        .to_string()
                } else {
                    format!("DROPS during the run: {}", moved.join(", "))
                }
            ));
            serde_json::json!({
                "passed": passed,
                "initiator": "a",
                "suite": sa["suite"],
                "child_rekey_secs": IKE_CHILD_REKEY_SECS,
                "ike_rekey_secs": IKE_SA_REKEY_SECS,
                "child_rekeys": child_rekeys,
                "ike_rekeys": ike_rekeys,
                "during_streams": { "child_rekeys": ike_during.0, "ike_rekeys": ike_during.1 },
                "b": {
                    "child_rekeys": ike_counter(b, "child_rekeys"),
                    "ike_rekeys": ike_counter(b, "ike_rekeys"),
                },
                "drops": { "a": drops[0], "b": drops[1] },
                "final": {
                    "ike_spi_i": sa["spi_i"],
                    "ike_spi_r": sa["spi_r"],
                    "a_inbound_spi": child_in,
                    "a_outbound_spi": child_out,
                },
            })
        }
    };
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
                "streams": streams,
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
            "ike": ike,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
