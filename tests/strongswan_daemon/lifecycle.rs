//! The SA life cycle: rekeys (by charon, and simultaneous), dead peer
//! detection with the guest's link cut, NAT-T with charon's `encap = yes`,
//! restarts (charon killed mid-stream and back with INITIAL_CONTACT;
//! esptun restarted), the CHILD SA keys `esptun wireshark-keys -c` gets
//! from the daemon, checked against the guest kernel's, and the Delete of
//! a CHILD SA esptun refuses after charon made it (narrowed selectors).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::lab::{HOST, Lab, Side, Swan, random_psk};
use crate::traffic::tcp_sink;
use crate::workload::{self, Established};
use crate::{IKE_TIMEOUT, TRAFFIC_TIMEOUT, establish};

pub const IKE: &str = "aes256gcm16-prfsha256-x25519";
pub const ESP: &str = "aes256gcm16-esn";
/// With a DH group: PFS in every CHILD SA rekey (the same spelling on
/// both sides).
const ESP_PFS_X25519: &str = "aes256gcm16-x25519-esn";
const ESP_PFS_ECP256: &str = "aes128gcm16-ecp256-esn";

/// Whether charon's log shows a CHILD SA rekey request with a KE payload
/// (`parsed` when esptun sent it, `generating` when charon did).
fn pfs_rekey_in(log: &str, verb: &str) -> bool {
    log.lines().any(|l| {
        l.contains(&format!("{verb} CREATE_CHILD_SA request"))
            && l.contains("N(REKEY_SA)")
            && l.contains(" KE ")
    })
}

/// The DH group esptun's status gives its current CHILD SA.
fn child_pfs(s: &serde_json::Value) -> String {
    s["ike"]["peers"][0]["sas"]
        .as_array()
        .and_then(|a| a.iter().find(|sa| sa["state"] == "established"))
        .and_then(|sa| sa["children"][0]["pfs"].as_str())
        .unwrap_or("none")
        .to_string()
}

/// Boots, configures and establishes; `None` when the test skips.
pub fn up(test: &str, swan: &Swan, side: &Side) -> Option<(Lab, Established)> {
    let mut lab = Lab::boot(test)?;
    match establish(&mut lab, swan, side) {
        Ok((sa, _)) => Some((lab, sa)),
        Err(e) => lab.fail(&format!("establishing: {e}")),
    }
}

pub fn traffic(lab: &mut Lab, what: &str) {
    match workload::run(lab) {
        Ok(lines) => eprintln!("{}: {what}:\n    {}", lab.test, lines.join("\n    ")),
        Err(e) => lab.fail(&format!("{what}: {e}")),
    }
}

/// The traffic again and again until `secs` passed: the rekeys happen
/// during it.
fn traffic_for(lab: &mut Lab, secs: u64) -> usize {
    let t = Instant::now();
    let mut rounds = 0;
    while t.elapsed() < Duration::from_secs(secs) {
        rounds += 1;
        if let Err(e) = workload::tcp_both_ways(lab) {
            lab.fail(&format!("TCP round {rounds} during the rekeys: {e}"));
        }
    }
    rounds
}

/// The CHILD SAs charon lists, as their `in` SPIs.
pub fn charon_children(lab: &mut Lab) -> Vec<String> {
    let sas = lab.sh("/usr/sbin/swanctl --list-sas").unwrap_or_else(|e| e);
    sas.lines()
        .filter_map(|l| l.trim().strip_prefix("in  "))
        .map(|l| l.split(',').next().unwrap_or("").to_string())
        .collect()
}

pub fn ike_sas_on_charon(lab: &mut Lab) -> usize {
    lab.sh("/usr/sbin/swanctl --list-sas")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ESTABLISHED"))
        .count()
}

/// Runs in CI (the daemon answers charon's rekeys since 5884945).
/// Short lifetimes: charon rekeys the CHILD SA every 20 s and the IKE SA
/// every 45 s during a stream of TCP rounds; then new SPIs on both sides,
/// the traffic intact, no drops.
#[test]
fn strongswan_daemon_rekey_by_charon() {
    let test = "strongswan_daemon_rekey_by_charon";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan {
            rekey: (45, 20),
            ..Swan::new(IKE, ESP_PFS_X25519, &psk)
        };
        let side = Side::new(true, IKE, ESP_PFS_X25519, &psk);
        let Some((mut lab, first)) = up(test, &swan, &side) else {
            return;
        };
        let rounds = traffic_for(&mut lab, 70);
        let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
        let now = workload::established(&s);
        let children = charon_children(&mut lab);
        if now
            .as_ref()
            .is_none_or(|n| n.0 == first.0 || n.2 == first.2)
        {
            lab.fail(&format!(
                "after 70 s of rekeys esptun's SA is {now:?}, first {first:?}; charon's CHILD SAs {children:?}"
            ));
        }
        // charon's rekeys carried a fresh X25519 exchange, which esptun
        // followed: its current CHILD SA says so.
        let log = lab.charon_case_log();
        let pfs = child_pfs(&s);
        if !pfs_rekey_in(&log, "generating") || pfs != "x25519" {
            lab.fail(&format!(
                "charon's CHILD SA rekeys should carry a KE (esp_proposals {ESP_PFS_X25519}) and \
                 esptun's CHILD SA show PFS x25519, not {pfs}"
            ));
        }
        traffic(&mut lab, "after the rekeys");
        eprintln!(
            "{test}: {rounds} TCP rounds across the rekeys (PFS {pfs}); first {first:?}, now {now:?}"
        );
    });
}

/// Both sides rekey the CHILD SA at 60 s (charon without jitter):
/// simultaneous rekeys (RFC 7296 section 2.8.1) during the stream.
#[test]
fn strongswan_daemon_rekey_simultaneous() {
    let test = "strongswan_daemon_rekey_simultaneous";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan {
            rekey: (0, 60),
            ..Swan::new(IKE, ESP_PFS_ECP256, &psk)
        };
        let side = Side {
            rekey_secs: Some((600, 60)),
            ..Side::new(true, IKE, ESP_PFS_ECP256, &psk)
        };
        let Some((mut lab, first)) = up(test, &swan, &side) else {
            return;
        };
        let rounds = traffic_for(&mut lab, 80);
        let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
        let now = workload::established(&s);
        if now
            .as_ref()
            .is_none_or(|n| n.2.len() != 1 || n.2 == first.2)
        {
            lab.fail(&format!(
                "after a simultaneous rekey esptun's SA is {now:?} (first {first:?}); want one new CHILD SA"
            ));
        }
        let children = charon_children(&mut lab);
        if children.len() != 1 {
            lab.fail(&format!("charon keeps CHILD SAs {children:?}, want one"));
        }
        traffic(&mut lab, "after the simultaneous rekey");
        // Who rekeyed: charon's word for each CREATE_CHILD_SA and collision.
        let log = lab.charon_case_log();
        let rekeys: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("CREATE_CHILD_SA") || l.contains("collision"))
            .collect();
        eprintln!(
            "{test}: {rounds} TCP rounds; first {first:?}, now {now:?}; charon:\n    {}",
            rekeys.join("\n    ")
        );
        // Both sides must have started a rekey: esptun's request parsed by
        // charon next to charon's own (else this was charon's rekey alone).
        if !rekeys
            .iter()
            .any(|l| l.contains("parsed CREATE_CHILD_SA request"))
        {
            lab.fail("esptun never started a CHILD SA rekey (child_rekey_secs = 60): no collision");
        }
        // Both rekeys with a fresh ECP-256 exchange (esptun's PFS from its
        // esp_proposals), and the survivor says so.
        let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
        if !pfs_rekey_in(&log, "parsed") || child_pfs(&s) != "ecp256" {
            lab.fail(&format!(
                "esptun's CHILD SA rekey should carry a KE (esp_proposals {ESP_PFS_ECP256}) and its \
                 CHILD SA show PFS ecp256, not {}",
                child_pfs(&s)
            ));
        }
    });
}

/// Packets the inbound SA `spi` has taken, from esptun's status.
fn inbound_packets(s: &serde_json::Value, spi: u64) -> u64 {
    s["inbound_sas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["spi"].as_u64() == Some(spi)))
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

/// How much the guest sends while charon is killed and restarted.
const RESTART_STREAM: u64 = 64 << 20;

/// charon dies mid-stream and comes back, initiating with INITIAL_CONTACT:
/// esptun drops its stale SAs, keeps only the new ones and uses the new
/// outbound SA at once, and the guest's TCP stream, stalled in between,
/// completes byte-exact on the new CHILD SA.
#[test]
fn strongswan_daemon_charon_restarted() {
    let test = "strongswan_daemon_charon_restarted";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan::new(IKE, ESP, &psk);
        let side = Side::new(false, IKE, ESP, &psk);
        let Some((mut lab, first)) = up(test, &swan, &side) else {
            return;
        };
        traffic(&mut lab, "before charon's restart");
        let old_in = first.2.last().map_or(0, |c| c.0);
        let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
        let base = inbound_packets(&s, old_in);
        // Guest -> host TCP, running when charon dies.
        let rx = tcp_sink(&lab.ns, IpAddr::V4(HOST));
        if let Err(e) = lab.guest().spawn(
            "stream",
            &format!(
                "nettool tcp-zeros {HOST} 5004 {RESTART_STREAM} {}",
                TRAFFIC_TIMEOUT.as_millis()
            ),
        ) {
            lab.fail(&format!("starting the stream: {e}"));
        }
        // Bounded: the stream has moved about 3 MB over the old SA.
        let deadline = Instant::now() + Duration::from_secs(30);
        let before = loop {
            let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
            let n = inbound_packets(&s, old_in).saturating_sub(base);
            if n >= 2_000 || Instant::now() >= deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // charon's xfrm states go with it (as after a reboot); its policies
        // stay, so the guest sends nothing in plaintext meanwhile.
        let r = (|| -> Result<(), String> {
            lab.sh("kill -9 $(pidof charon); sleep 1; /sbin/ip xfrm state flush")?;
            lab.spawn_charon()?;
            lab.sh("/usr/sbin/swanctl --load-all")?;
            lab.charon_initiates()
        })();
        if let Err(e) = r {
            lab.fail(&format!("restarting charon: {e}"));
        }
        let restarted = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
        let sas = s["ike"]["peers"][0]["sas"].as_array().map_or(0, Vec::len);
        let now = workload::established(&s);
        if sas != 1 || now.as_ref().is_none_or(|n| n.0 == first.0) {
            lab.fail(&format!(
                "after charon's INITIAL_CONTACT esptun keeps {sas} IKE SA(s): {:#}",
                s["ike"]
            ));
        }
        // The new CHILD SA's outbound half must be in use at once: charon
        // dropped the old SAs, so esptun must not wait for the peer to use
        // the new inbound SA first.
        let (new_in, out_spi) = now
            .as_ref()
            .and_then(|n| n.2.last().copied())
            .unwrap_or((0, 0));
        let outs: Vec<(u64, String)> = s["outbound_sas"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|o| {
                        (
                            o["spi"].as_u64().unwrap_or(0),
                            o["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if outs.len() != 1 || outs[0] != (out_spi, "active".to_string()) {
            lab.fail(&format!(
                "after charon's INITIAL_CONTACT esptun's outbound SAs are {outs:?}: the new one \
                 ({out_spi}) should be active and the stale one gone"
            ));
        }
        let got = rx
            .recv_timeout(TRAFFIC_TIMEOUT)
            .map_err(|e| format!("host TCP sink: {e}"))
            .and_then(|r| r);
        let resumed = restarted.elapsed();
        let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
        let on_new = inbound_packets(&s, new_in);
        match got {
            Ok((total, 0)) if total == RESTART_STREAM => {}
            other => lab.fail(&format!(
                "the guest's {RESTART_STREAM}-byte stream across charon's restart: {other:?} \
                 (total, non-zero bytes)"
            )),
        }
        // Mid-stream for real: part of it came on the new CHILD SA.
        if on_new < 1_000 {
            lab.fail(&format!(
                "only {on_new} packets of the stream came on the new CHILD SA ({before} on the \
                 old one before the restart): the restart was not mid-stream"
            ));
        }
        eprintln!(
            "{test}: {RESTART_STREAM} bytes guest -> host intact across charon's restart: {before} \
             packets on the old CHILD SA before it, {on_new} on the new one; done {:.1} s after the \
             new SA; esptun keeps 1 IKE SA {:?}",
            resumed.as_secs_f64(),
            now.map(|n| (n.0, n.2))
        );
        traffic(&mut lab, "after charon's restart");
    });
}

/// Dead-peer detection: the guest's link goes down; esptun finds the
/// peer dead (liveness 5 s) and clears its SAs; with the link back it sets
/// up new ones (charon: dpd_delay 5 s, dpd_action clear).
#[test]
fn strongswan_daemon_dpd() {
    let test = "strongswan_daemon_dpd";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan {
            dpd_delay: 5,
            ..Swan::new(IKE, ESP, &psk)
        };
        let side = Side {
            liveness_secs: Some(5),
            ..Side::new(true, IKE, ESP, &psk)
        };
        let Some((mut lab, first)) = up(test, &swan, &side) else {
            return;
        };
        if let Err(e) = lab.sh("/sbin/ip link set eth0 down") {
            lab.fail(&e);
        }
        // esptun's side: a timeout counted and the old IKE SA gone (bounded;
        // charon's own retransmissions take about 165 s, not waited for).
        let deadline = Instant::now() + Duration::from_secs(120);
        let (timeouts, still) = loop {
            let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
            let timeouts = s["ike"]["peers"][0]["counters"]["timeouts"]
                .as_u64()
                .unwrap_or(0);
            let still = workload::established(&s).is_some_and(|n| n.0 == first.0);
            if (timeouts >= 1 && !still) || Instant::now() >= deadline {
                break (timeouts, still);
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        let ike = ike_sas_on_charon(&mut lab);
        if let Err(e) = lab.sh("/sbin/ip link set eth0 up") {
            lab.fail(&e);
        }
        if timeouts == 0 || still {
            lab.fail(&format!(
                "120 s without the link: esptun timeouts {timeouts}, old SA still there {still} \
                 (charon IKE SAs {ike})"
            ));
        }
        eprintln!("{test}: esptun found charon dead ({timeouts} timeouts); charon IKE SAs {ike}");
        match workload::wait_established(&mut lab, IKE_TIMEOUT * 2) {
            Ok(_) => traffic(&mut lab, "after the link came back"),
            Err(e) => lab.fail(&format!("after the link came back: {e}")),
        }
    });
}

/// NAT-T: esptun `outer = "udp"`, charon `encap = yes`: IKE moves to
/// port 4500 and ESP goes in UDP (RFC 3948).
#[test]
fn strongswan_daemon_natt() {
    let test = "strongswan_daemon_natt";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan {
            encap: true,
            ..Swan::new(IKE, ESP, &psk)
        };
        let side = Side {
            natt: true,
            ..Side::new(true, IKE, ESP, &psk)
        };
        let Some((mut lab, _)) = up(test, &swan, &side) else {
            return;
        };
        let xfrm = lab.sh("/sbin/ip xfrm state").unwrap_or_else(|e| e);
        if !xfrm.contains("encap type espinudp sport 4500 dport 4500") {
            lab.fail(&format!("charon's SAs are not ESP-in-UDP on 4500:\n{xfrm}"));
        }
        traffic(&mut lab, "ESP in UDP 4500");
    });
}

/// `esptun wireshark-keys -c` prints `esp_sa` records for a `[peer.ike]`
/// peer's CHILD SA, asked from the running daemon: one per direction,
/// each exactly the record the guest kernel's SA of that SPI makes
/// (`ip xfrm state`: the addresses and the key charon derived), so a
/// capture decrypts with esptun's export alone.
#[test]
fn strongswan_daemon_wireshark_child_keys() {
    let test = "strongswan_daemon_wireshark_child_keys";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan::new(IKE, ESP, &psk);
        let side = Side::new(true, IKE, ESP, &psk);
        let Some((mut lab, sa)) = up(test, &swan, &side) else {
            return;
        };
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_esptun"))
            .args(["wireshark-keys", "-c"])
            .arg(lab.config())
            .output()
            .unwrap_or_else(|e| lab.fail(&format!("wireshark-keys: {e}")));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let text = zeroize::Zeroizing::new(String::from_utf8_lossy(&out.stdout).into_owned());
        let records: Vec<&str> = text.lines().collect();
        // Failures show the records without their keys (field 6).
        let shown = || {
            records
                .iter()
                .map(|r| {
                    r.split(',')
                        .enumerate()
                        .map(|(i, f)| if i == 5 { "\"<key>\"" } else { f })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        if !out.status.success() || !stderr.contains("SECRET KEYS") || records.len() != 2 {
            lab.fail(&format!(
                "`esptun wireshark-keys` ({}) should print the one CHILD SA's two records:\n{}\n{stderr}",
                out.status,
                shown()
            ));
        }
        let guest = crate::checks::guest_sas(&mut lab).unwrap_or_else(|e| lab.fail(&e));
        let (inb, outb) = sa.2[0];
        for spi in [inb, outb] {
            let Some((src, dst, _, key)) = guest.iter().find(|g| u64::from(g.2) == spi) else {
                lab.fail(&format!("the guest has no SA of SPI {spi:08x}"));
            };
            let want = zeroize::Zeroizing::new(format!(
                "\"{}\",\"{src}\",\"{dst}\",\"0x{spi:08x}\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x{}\",\"NULL\",\"\"",
                if src.is_ipv4() { "IPv4" } else { "IPv6" },
                crate::checks::hex(key)
            ));
            if !records.contains(&want.as_str()) {
                lab.fail(&format!(
                    "no record equals the guest kernel's SA {src} -> {dst} SPI {spi:08x} (addresses \
                     or key differ):\n{}",
                    shown()
                ));
            }
        }
        eprintln!("{test}: both CHILD SA records equal the guest kernel's SAs");
    });
}

/// charon narrows the traffic selectors to UDP; esptun refuses the CHILD
/// SA (it wants host to host) and deletes it on charon's side (RFC 7296
/// sections 2.9, 1.4.1: an INFORMATIONAL Delete naming esptun's inbound
/// SPI, charon's outbound one), or charon would keep a CHILD SA, in the
/// guest kernel too, that esptun never uses. Then esptun deletes the IKE
/// SA, which carries nothing, and tries again with a doubling back-off,
/// not every 2 s: the establishment before each refusal does not reset it.
#[test]
fn strongswan_daemon_narrowed_child_deleted() {
    let test = "strongswan_daemon_narrowed_child_deleted";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan {
            ts: Some(("198.18.52.2/32[17]", "198.18.52.1/32[17]")),
            ..Swan::new(IKE, ESP, &psk)
        };
        let side = Side::new(true, IKE, ESP, &psk);
        let Some(mut lab) = Lab::boot(test) else {
            return;
        };
        if let Err(e) = lab.load_swan(&swan).and_then(|()| lab.start_esptun(&side)) {
            lab.fail(&e);
        }
        let deadline = Instant::now() + IKE_TIMEOUT;
        loop {
            let s = lab.status().unwrap_or_else(|e| lab.fail(&e));
            if s["ike"]["peers"][0]["counters"]["children_failed"].as_u64() >= Some(1) {
                break;
            }
            if Instant::now() >= deadline {
                lab.fail("esptun did not refuse the narrowed CHILD SA in time");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let refused = Instant::now();
        // esptun says why.
        let log = lab.esptun_log();
        if !log.lines().any(|l| {
            l.contains("IKE") && l.contains("CHILD SA failed") && l.contains("traffic selectors")
        }) {
            lab.fail("esptun's log does not name the reason (traffic selectors)");
        }
        // charon got the Delete of the CHILD SA it made, by the SPI it sends
        // with (esptun's inbound SPI): "established with SPIs <in>_i <out>_o".
        std::thread::sleep(Duration::from_secs(3));
        let charon = lab.charon_case_log();
        let first_out = charon
            .lines()
            .find_map(|l| {
                let spis = l.split("established with SPIs ").nth(1)?;
                spis.split_whitespace()
                    .find_map(|w| w.strip_suffix("_o"))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| lab.fail("charon's log shows no CHILD SA it established"));
        let deleted = format!("received DELETE for ESP CHILD_SA with SPI {first_out}");
        let Some(child_at) = charon.lines().position(|l| l.contains(&deleted)) else {
            lab.fail(&format!(
                "charon's log lacks {deleted:?}: esptun did not delete the CHILD SA"
            ));
        };
        // Then the IKE SA, which carries nothing now (its Delete after the
        // CHILD SA's was answered: the window is one).
        if !charon
            .lines()
            .skip(child_at)
            .any(|l| l.contains("received DELETE for IKE_SA"))
        {
            lab.fail("charon's log shows no Delete of the IKE SA after the CHILD SA's");
        }
        // Neither that CHILD SA nor any later one stays: at some moment
        // between esptun's attempts charon holds none, nor does the kernel
        // (bounded; each attempt's CHILD SA lives a moment only).
        let mut clean = false;
        let mut seen = (String::new(), String::new());
        for _ in 0..10 {
            let sas = lab.sh("/usr/sbin/swanctl --list-sas").unwrap_or_else(|e| e);
            let xfrm = lab.sh("/sbin/ip xfrm state").unwrap_or_else(|e| e);
            if xfrm.contains(&format!("0x{first_out}")) {
                lab.fail(&format!(
                    "the guest kernel keeps the refused CHILD SA:\n{xfrm}"
                ));
            }
            if !sas.contains("INSTALLED") && xfrm.trim().is_empty() {
                clean = true;
                break;
            }
            seen = (sas, xfrm);
            std::thread::sleep(Duration::from_millis(700));
        }
        if !clean {
            lab.fail(&format!(
                "esptun refused the narrowed CHILD SA but charon keeps one:\n{}\n{}",
                seen.0, seen.1
            ));
        }
        // It tries again, but backing off (2, 4, 8 s ...): at most 3 more
        // attempts within 20 s of the refusal, where a 2 s loop makes 8.
        let window = Duration::from_secs(20);
        std::thread::sleep(window.saturating_sub(refused.elapsed()));
        let attempts = lab
            .esptun_log()
            .lines()
            .filter(|l| l.contains("IKE: initiating"))
            .count();
        if !(2..=4).contains(&attempts) {
            lab.fail(&format!(
                "esptun initiated {attempts} times within {window:?} of the refusal \
                 (want 2 to 4: the IKE SA deleted and tried again with back-off)"
            ));
        }
        eprintln!(
            "{test}: charon got the Delete of CHILD SA {first_out}; {attempts} IKE SAs in {window:?}"
        );
    });
}
