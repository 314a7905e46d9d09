//! The SA life cycle: rekeys (by charon, and simultaneous), dead peer
//! detection with the guest's link cut, NAT-T with charon's `encap = yes`,
//! restarts, and the Delete of a CHILD SA esptun refuses after charon
//! made it (narrowed selectors). Cases that wait for work not yet in the
//! daemon (charon restarted: INITIAL_CONTACT must retire esptun's old
//! outbound SA at once; CHILD SA keys for Wireshark) are each their own
//! test function, run only with `ESPTUN_SWAN_PENDING=1`; without it each
//! prints `SKIPPED <name>: waits for <feature>`.

use std::time::{Duration, Instant};

use crate::lab::{Lab, Side, Swan, random_psk};
use crate::workload::{self, Established};
use crate::{IKE_TIMEOUT, ONE_GUEST, establish};

pub const IKE: &str = "aes256gcm16-prfsha256-x25519";
pub const ESP: &str = "aes256gcm16-esn";

/// Whether to run; prints the SKIPPED line when not.
fn enabled(name: &str, feature: &str) -> bool {
    if std::env::var("ESPTUN_SWAN_PENDING").as_deref() == Ok("1") {
        return true;
    }
    crate::common::skip(
        name,
        &format!("waits for {feature} (set ESPTUN_SWAN_PENDING=1 to run it)"),
    );
    false
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
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let psk = random_psk();
    let swan = Swan {
        rekey: (45, 20),
        ..Swan::new(IKE, ESP, &psk)
    };
    let side = Side::new(true, IKE, ESP, &psk);
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
    traffic(&mut lab, "after the rekeys");
    eprintln!("{test}: {rounds} TCP rounds across the rekeys; first {first:?}, now {now:?}");
}

/// Both sides rekey the CHILD SA at 60 s (charon without jitter):
/// simultaneous rekeys (RFC 7296 section 2.8.1) during the stream.
#[test]
fn strongswan_daemon_rekey_simultaneous() {
    let test = "strongswan_daemon_rekey_simultaneous";
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let psk = random_psk();
    let swan = Swan {
        rekey: (0, 60),
        ..Swan::new(IKE, ESP, &psk)
    };
    let side = Side {
        rekey_secs: Some((600, 60)),
        ..Side::new(true, IKE, ESP, &psk)
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
}

/// charon dies and comes back, initiating with INITIAL_CONTACT: esptun
/// drops its stale SAs and keeps only the new ones.
#[test]
fn strongswan_daemon_charon_restarted() {
    let test = "strongswan_daemon_charon_restarted";
    if !enabled(test, "INITIAL_CONTACT handling in the daemon") {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let psk = random_psk();
    let swan = Swan::new(IKE, ESP, &psk);
    let side = Side::new(false, IKE, ESP, &psk);
    let Some((mut lab, first)) = up(test, &swan, &side) else {
        return;
    };
    traffic(&mut lab, "before charon's restart");
    let r = (|| -> Result<(), String> {
        lab.sh("kill -9 $(pidof charon); sleep 1; /sbin/ip xfrm state flush; /sbin/ip xfrm policy flush")?;
        lab.spawn_charon()?;
        lab.sh("/usr/sbin/swanctl --load-all")?;
        lab.guest().spawn(
            "initiate",
            "/usr/sbin/swanctl --initiate --child host --timeout 80",
        )?;
        lab.guest()
            .wait_output("initiate", "initiate completed successfully", IKE_TIMEOUT)?;
        Ok(())
    })();
    if let Err(e) = r {
        lab.fail(&format!("restarting charon: {e}"));
    }
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
    // the new inbound SA first (it would wait forever for a ping).
    let out_spi = now.as_ref().and_then(|n| n.2.last()).map_or(0, |c| c.1);
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
    if !outs
        .iter()
        .any(|(spi, st)| *spi == out_spi && st == "active")
    {
        lab.fail(&format!(
            "after charon's INITIAL_CONTACT esptun's outbound SAs are {outs:?}: the new one \
             ({out_spi}) should be active and the stale one gone"
        ));
    }
    traffic(&mut lab, "after charon's restart");
}

/// Dead-peer detection: the guest's link goes down; esptun finds the
/// peer dead (liveness 5 s) and clears its SAs; with the link back it sets
/// up new ones (charon: dpd_delay 5 s, dpd_action clear).
#[test]
fn strongswan_daemon_dpd() {
    let test = "strongswan_daemon_dpd";
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
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
}

/// NAT-T: esptun `outer = "udp"`, charon `encap = yes`: IKE moves to
/// port 4500 and ESP goes in UDP (RFC 3948).
#[test]
fn strongswan_daemon_natt() {
    let test = "strongswan_daemon_natt";
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
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
}

/// `esptun wireshark-keys -c` prints `esp_sa` records for a `[peer.ike]`
/// peer's CHILD SA (today it prints none: it reads static key files).
#[test]
fn strongswan_daemon_wireshark_child_keys() {
    let test = "strongswan_daemon_wireshark_child_keys";
    if !enabled(
        test,
        "CHILD SA records in `esptun wireshark-keys` for [peer.ike] peers",
    ) {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
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
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (inb, outb) = sa.2[0];
    for spi in [inb, outb] {
        if !text.contains(&format!("0x{spi:08x}")) {
            lab.fail(&format!(
                "`esptun wireshark-keys` has no record for the CHILD SA's SPI {spi:08x} \
                 ({}): {text:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
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
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
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
}
