//! What must fail, and fail cleanly on both sides: esptun initiates with
//! a configuration charon cannot accept (or with charon's answer it
//! cannot accept); esptun counts the reason and logs it, charon logs it,
//! neither datapath holds a CHILD SA.

use std::time::{Duration, Instant};

use crate::lab::{Lab, Side, Swan, random_psk};

struct Refusal {
    name: &'static str,
    swan: Swan,
    side: Side,
    /// esptun's counter of the reason (`status` → ike.peers[0].counters).
    counter: &'static str,
    /// Whether the IKE SA itself comes up (only the CHILD SA fails).
    ike_up: bool,
    /// Some line of esptun's log contains one of these.
    esptun_says: &'static [&'static str],
    /// Some line of charon's log (this case) contains one of these.
    charon_says: &'static [&'static str],
    /// charon made the CHILD SA before esptun refused it: esptun deletes
    /// it (and the IKE SA) and tries again, so charon may hold one for a
    /// moment whenever we look (the Delete is asserted by
    /// `strongswan_daemon_narrowed_child_deleted`).
    charon_keeps_child: bool,
}

const IKE: &str = "aes128gcm16-prfsha256-x25519";
const ESP: &str = "aes128gcm16-esn";

fn refusals() -> Vec<Refusal> {
    let psk = random_psk();
    let swan = Swan::new(IKE, ESP, &psk);
    let side = Side::new(true, IKE, ESP, &psk);
    vec![
        Refusal {
            name: "wrong PSK",
            swan: swan.clone(),
            side: Side {
                psk: random_psk(),
                ..side.clone()
            },
            counter: "auth_failures",
            ike_up: false,
            esptun_says: &["refused our authentication (AUTHENTICATION_FAILED)"],
            charon_says: &["MAC mismatched"],
            charon_keeps_child: false,
        },
        Refusal {
            name: "esptun's identity is not the one charon expects",
            swan: swan.clone(),
            side: Side {
                local_id: Some("esptun.example"),
                ..side.clone()
            },
            counter: "auth_failures",
            ike_up: false,
            esptun_says: &["refused our authentication (AUTHENTICATION_FAILED)"],
            charon_says: &["no matching peer config found"],
            charon_keeps_child: false,
        },
        Refusal {
            name: "charon's identity is not the one esptun expects",
            swan: swan.clone(),
            side: Side {
                remote_id: Some("charon.example"),
                ..side.clone()
            },
            counter: "auth_failures",
            ike_up: false,
            esptun_says: &["authentication failed: the peer's AUTH does not verify"],
            charon_says: &["AUTH_FAILED"],
            charon_keeps_child: false,
        },
        Refusal {
            name: "IKE proposal charon refuses (AES-256, PRF SHA-512, ECP-256 only)",
            swan: swan.clone(),
            side: Side {
                ike: "aes256gcm16-prfsha512-ecp256",
                ..side.clone()
            },
            counter: "proposal_mismatches",
            ike_up: false,
            esptun_says: &["NO_PROPOSAL_CHOSEN, the peer refused ours"],
            charon_says: &["N(NO_PROP)"],
            charon_keeps_child: false,
        },
        Refusal {
            name: "ESP proposal charon refuses (AES-256 only): IKE SA up, no CHILD SA",
            swan: swan.clone(),
            side: Side {
                esp: "aes256gcm16-esn",
                ..side.clone()
            },
            counter: "proposal_mismatches",
            ike_up: true,
            esptun_says: &["CHILD SA failed: the peer refused: NO_PROPOSAL_CHOSEN"],
            charon_says: &["N(NO_PROP)"],
            charon_keeps_child: false,
        },
        Refusal {
            name: "traffic selectors charon refuses (other addresses)",
            swan: Swan {
                ts: Some(("198.18.53.2/32", "198.18.53.1/32")),
                ..swan.clone()
            },
            side: side.clone(),
            counter: "ts_unacceptable",
            ike_up: true,
            esptun_says: &["TS_UNACCEPTABLE"],
            charon_says: &["N(TS_UNACCEPT)"],
            charon_keeps_child: false,
        },
        Refusal {
            name: "traffic selectors charon narrows (UDP only, protocol 17: the guest has no /etc/protocols): esptun refuses the CHILD SA",
            swan: Swan {
                ts: Some(("198.18.52.2/32[17]", "198.18.52.1/32[17]")),
                ..swan
            },
            side,
            counter: "ts_unacceptable",
            ike_up: true,
            esptun_says: &["unacceptable answer from the peer: traffic selectors"],
            charon_says: &["=> match: 198.18.52.2/32[17]"],
            charon_keeps_child: true,
        },
    ]
}

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["ike"]["peers"][0]["counters"][name]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Runs every refusal; returns a line each. Fails the test at the first
/// one that does not fail as it should.
pub fn run(lab: &mut Lab) -> Vec<String> {
    let mut lines = Vec::new();
    for r in refusals() {
        let t = Instant::now();
        match refusal(lab, &r) {
            Ok(line) => {
                let line = format!(
                    "[{}] as expected in {:.1} s: {line}",
                    r.name,
                    t.elapsed().as_secs_f64()
                );
                eprintln!("{line}");
                lines.push(line);
            }
            Err(e) => lab.fail(&format!("[{}] {e}", r.name)),
        }
    }
    lab.stop_esptun();
    lines
}

fn refusal(lab: &mut Lab, r: &Refusal) -> Result<String, String> {
    lab.load_swan(&r.swan)?;
    lab.start_esptun(&r.side)?;
    let deadline = Instant::now() + crate::IKE_TIMEOUT;
    let s = loop {
        let s = lab.status()?;
        if counter(&s, r.counter) >= 1 && counter(&s, r.counter) != u64::MAX {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "esptun did not count {} in time: {:#}",
                r.counter, s["ike"]
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    // What follows the refusal (a Delete, an INFORMATIONAL) has its time.
    std::thread::sleep(Duration::from_secs(3));
    let s2 = lab.status()?;
    let c = &s2["ike"]["peers"][0]["counters"];
    if counter(&s2, "children_installed") != 0
        || s2["outbound_sas"].as_array().is_some_and(|a| !a.is_empty())
    {
        return Err(format!(
            "esptun installed a CHILD SA: {c:#} {:#}",
            s2["outbound_sas"]
        ));
    }
    let established = counter(&s, "established");
    if (established >= 1) != r.ike_up {
        return Err(format!(
            "esptun's IKE SA {} come up: {c:#}",
            if r.ike_up { "did not" } else { "did" }
        ));
    }
    let log = lab.esptun_log();
    let said = log
        .lines()
        .find(|l| l.contains("IKE") && r.esptun_says.iter().any(|w| l.contains(w)));
    let Some(said) = said.map(str::to_string) else {
        return Err(format!(
            "esptun's log lacks {:?} (counters {c:#})",
            r.esptun_says
        ));
    };
    let charon = lab.charon_case_log();
    let Some(charon_said) = charon
        .lines()
        .find(|l| r.charon_says.iter().any(|w| l.contains(w)))
        .map(str::to_string)
    else {
        return Err(format!("charon's log lacks {:?}", r.charon_says));
    };
    let sas = lab.sh("/usr/sbin/swanctl --list-sas")?;
    let xfrm = lab.sh("/sbin/ip xfrm state")?;
    let kept = sas.contains("INSTALLED") || !xfrm.trim().is_empty();
    if kept && !r.charon_keeps_child {
        return Err(format!(
            "charon keeps a CHILD SA:\n{sas}\nthe guest kernel:\n{xfrm}"
        ));
    }
    let counters: Vec<String> = c
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        })
        .unwrap_or_default();
    Ok(format!(
        "esptun counters {{{}}}; esptun: {}; charon: {}",
        counters.join(", "),
        said.trim(),
        charon_said.trim()
    ))
}
