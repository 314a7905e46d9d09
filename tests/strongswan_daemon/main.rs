//! Issue 14: the daemon (`esptun run`, keyed by `[peer.ike]`) against
//! strongSwan 5.9.8's charon in the qemu guest of the kernel-interop suite
//! (kernel-netlink: charon's CHILD SAs are the guest kernel's xfrm SAs).
//!
//! `tests/strongswan.rs` drives esptun's sans-IO `IkeSa` by hand; here the
//! daemon's own IKE thread negotiates, installs and uses the CHILD SA. One
//! guest boot serves a whole test function (TCG is slow): each case loads
//! a new swanctl.conf (`swanctl --load-all --clear`, after terminating
//! charon's SAs) and starts a new `esptun run`.
//!
//! Working cases (the matrix covers each value at least once): who
//! initiates (esptun, or charon by `swanctl --initiate`), AES-128 and
//! AES-256 GCM-16 (IKE and ESP), Curve25519 and ECP-256, ESN on and off,
//! raw ESP, ESP proposals with and without a DH group (PFS for rekeys;
//! IKE_AUTH's CHILD SA has no key exchange either way), IPv4 and IPv6
//! (both ends' addresses, so IKE, ESP, the default identities and the
//! traffic; each side initiates once over IPv6). Each
//! carries ping both ways, 20 UDP datagrams both ways byte-exact, 16 MiB
//! of TCP zeros both ways checked byte by byte, and esptun's drop
//! counters and the guest's `/proc/net/xfrm_stat` must not move. The
//! first case (IPv4) also goes to tshark (IKE decrypted with `esptun
//! wireshark-keys --ike`, ESP with the guest kernel's keys), and takes the
//! corrupted-block packet of `tests/interop/corrupt.rs` on its CHILD SA:
//! esptun drops it as `inner_checksum`. The first IPv6 case does both
//! too, over IPv6.
//!
//! Refusals: wrong PSK, mismatched identity, a proposal charon refuses,
//! traffic selectors charon refuses or narrows: each fails on both sides,
//! with the reason in esptun's log and counters and in charon's log. A
//! CHILD SA charon narrowed esptun also deletes on charon's side, then its
//! IKE SA, and tries again with back-off
//! ([`lifecycle`]'s `strongswan_daemon_narrowed_child_deleted`).
//!
//! esptun restarted: its new IKE_AUTH carries INITIAL_CONTACT and charon
//! replaces the old IKE and CHILD SAs (`strongswan_daemon_esptun_restarted`).
//!
//! The SA life cycle (rekeys, DPD, NAT-T, charon killed mid-stream and
//! back with INITIAL_CONTACT) and the CHILD SA keys `esptun
//! wireshark-keys -c` gets from the daemon, checked against the guest
//! kernel's, are in [`lifecycle`], each its own test function.
//!
//! Addresses: 198.18.52.1 and 2001:db8:52::1 (the TAP in the namespace)
//! and 198.18.52.2 and 2001:db8:52::2 (the guest), the IPv6 ones `nodad`;
//! a plain ping of each family before charon starts. qemu runs the guest
//! under KVM where `/dev/kvm` can boot it, else TCG (see
//! `tests/interop/guest.rs`). Needs root and qemu; without either prints
//! a SKIPPED line (a failure under `ESPTUN_REQUIRE_NETNS=1`). A failure
//! prints charon's log, `swanctl --list-sas`, `ip xfrm state`, the
//! guest's console and counters, and esptun's status and log, after a
//! short summary. A failure during which the guest's NIC stopped
//! transmitting (an emulation fault seen under TCG) runs the test function
//! again on a fresh guest, at most three times in all
//! ([`retry_after_guest_stall`]).
//! `ESPTUN_SWAN_KEEP=1` keeps the files (captures, logs).

#[path = "../common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../interop/craft.rs"]
mod craft;
#[allow(dead_code)]
#[path = "../interop/guest.rs"]
mod guest;
#[allow(dead_code)]
#[path = "../interop/traffic.rs"]
mod traffic;

mod checks;
mod lab;
mod lifecycle;
mod refusals;
mod workload;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lab::{Lab, Side, Swan, random_psk};

// The names tests/interop/{guest,traffic}.rs take from the crate root.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
pub const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(180);
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// IKE_SA_INIT + IKE_AUTH under TCG, retransmissions included.
pub const IKE_TIMEOUT: Duration = Duration::from_secs(90);
pub const UDP_SIZE: usize = 1337;
pub const UDP_COUNT: u32 = 20;
pub const TCP_BYTES: u64 = 16 << 20;

/// One guest at a time: two TCG guests at once would only slow both.
pub static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Runs a test function's body, and again on a fresh guest (at most
/// [`STALL_ATTEMPTS`] in all) when it failed because the guest's NIC had
/// stopped transmitting ([`lab::GuestNicStalled`], an emulation fault seen
/// under TCG on a loaded machine, at CHILD SA rekeys). Any other failure,
/// and a stall in the last attempt, fail the test.
/// Holds [`ONE_GUEST`] throughout.
pub fn retry_after_guest_stall(test: &str, body: impl Fn()) {
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 1..=STALL_ATTEMPTS {
        let Err(failure) = catch_unwind(AssertUnwindSafe(&body)) else {
            return;
        };
        match failure.downcast::<lab::GuestNicStalled>() {
            Ok(stall) if attempt < STALL_ATTEMPTS => eprintln!(
                "{test}: RETRYING on a fresh guest (attempt {} of {STALL_ATTEMPTS}): the \
                 guest's NIC stopped transmitting ({} accelerator); the failure it caused:\n{}",
                attempt + 1,
                guest::accelerator(),
                stall.0.lines().take(3).collect::<Vec<_>>().join("\n")
            ),
            Ok(stall) => panic!(
                "{test}: the guest's NIC stalled in all {STALL_ATTEMPTS} attempts\n{}",
                stall.0
            ),
            Err(other) => resume_unwind(other),
        }
    }
}

/// Attempts of a test function whose guest's NIC stalls.
const STALL_ATTEMPTS: u32 = 3;

pub fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// A working case of the matrix.
struct Case {
    name: &'static str,
    esptun_initiates: bool,
    ike: &'static str,
    esp: &'static str,
    /// charon's spelling of the same.
    swan_ike: &'static str,
    swan_esp: &'static str,
    /// tshark and the corrupted block (the first case of each family).
    checks: bool,
    /// Both ends' addresses (IKE, ESP, identities, traffic) over IPv6.
    v6: bool,
}

const CASES: [Case; 5] = [
    Case {
        name: "esptun initiates, AES-256-GCM-16 x25519, ESN, PFS x25519 configured",
        esptun_initiates: true,
        ike: "aes256gcm16-prfsha256-x25519",
        esp: "aes256gcm16-x25519-esn",
        swan_ike: "aes256gcm16-prfsha256-x25519",
        swan_esp: "aes256gcm16-x25519-esn",
        checks: true,
        v6: false,
    },
    Case {
        name: "charon initiates, AES-128-GCM-16 ECP-256, no ESN, PFS ecp256 configured",
        esptun_initiates: false,
        ike: "aes128gcm16-prfsha256-ecp256",
        esp: "aes128gcm16-ecp256-noesn",
        swan_ike: "aes128gcm16-prfsha256-ecp256",
        swan_esp: "aes128gcm16-ecp256-noesn",
        checks: false,
        v6: false,
    },
    Case {
        name: "charon initiates, AES-256 ESP ESN over AES-128 IKE x25519 prfsha384",
        esptun_initiates: false,
        ike: "aes128gcm16-prfsha384-x25519",
        esp: "aes256gcm16-esn",
        swan_ike: "aes128gcm16-prfsha384-x25519",
        swan_esp: "aes256gcm16-esn",
        checks: false,
        v6: false,
    },
    Case {
        name: "esptun initiates over IPv6, AES-128-GCM-16 x25519, no ESN, raw ESP",
        esptun_initiates: true,
        ike: "aes128gcm16-prfsha256-x25519",
        esp: "aes128gcm16-noesn",
        swan_ike: "aes128gcm16-prfsha256-x25519",
        swan_esp: "aes128gcm16-noesn",
        checks: true,
        v6: true,
    },
    Case {
        name: "charon initiates over IPv6, AES-256-GCM-16 ECP-256, ESN",
        esptun_initiates: false,
        ike: "aes256gcm16-prfsha256-ecp256",
        esp: "aes256gcm16-esn",
        swan_ike: "aes256gcm16-prfsha256-ecp256",
        swan_esp: "aes256gcm16-esn",
        checks: false,
        v6: true,
    },
];

/// Brings up one case's SAs: charon configured, esptun started, and the
/// initiator told; returns esptun's IKE SA and charon's `--list-sas`.
pub fn establish(
    lab: &mut Lab,
    swan: &Swan,
    side: &Side,
) -> Result<(workload::Established, String), String> {
    lab.load_swan(swan)?;
    lab.start_esptun(side)?;
    if !side.initiate {
        lab.charon_initiates()?;
    }
    workload::wait_established(lab, IKE_TIMEOUT)
}

#[test]
fn strongswan_daemon_matrix() {
    let test = "strongswan_daemon_matrix";
    crate::retry_after_guest_stall(test, || {
        let started = Instant::now();
        let Some(mut lab) = Lab::boot(test) else {
            return;
        };
        let mut summary = Vec::new();
        for case in &CASES {
            let t = Instant::now();
            let psk = random_psk();
            let swan = Swan {
                v6: case.v6,
                ..Swan::new(case.swan_ike, case.swan_esp, &psk)
            };
            let side = Side {
                v6: case.v6,
                ..Side::new(case.esptun_initiates, case.ike, case.esp, &psk)
            };
            let capture = if case.checks {
                checks::Capture::start(&lab, test)
            } else {
                None
            };
            let (sa, sas) = match establish(&mut lab, &swan, &side) {
                Ok(x) => x,
                Err(e) => lab.fail(&format!("[{}] establishing: {e}", case.name)),
            };
            let up = t.elapsed();
            // The case's family end to end: charon's IKE SA runs between
            // (and identifies) the case's addresses (port 500, or 4500 where
            // charon initiates and floats), and its traffic selectors
            // are theirs.
            let (host, guest) = lab.addrs();
            let ends = [
                format!("local  '{guest}' @ {guest}["),
                format!("remote '{host}' @ {host}["),
                format!("local  {guest}/"),
                format!("remote {host}/"),
            ];
            if let Some(missing) = ends.iter().find(|e| !sas.contains(e.as_str())) {
                lab.fail(&format!(
                    "[{}] charon's SAs lack {missing:?}:\n{sas}",
                    case.name
                ));
            }
            let mut lines = vec![format!(
                "IKE SA {}/{} with CHILD SA(s) {:x?} after {:.1} s, {host} <-> {guest}; charon: {}",
                sa.0,
                sa.1,
                sa.2,
                up.as_secs_f64(),
                sas.lines()
                    .filter(|l| l.contains("ESTABLISHED") || l.contains("INSTALLED"))
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" | ")
            )];
            match workload::run(&mut lab) {
                Ok(l) => lines.extend(l),
                Err(e) => lab.fail(&format!("[{}] traffic: {e}", case.name)),
            }
            if let Some(capture) = capture {
                match checks::tshark(&mut lab, capture, &sa) {
                    Ok(l) => lines.extend(l),
                    Err(e) => lab.fail(&format!("[{}] tshark: {e}", case.name)),
                }
            }
            if case.checks {
                match checks::corrupted_block(&mut lab, &sa, !case.esp.ends_with("-noesn")) {
                    Ok(l) => lines.extend(l),
                    Err(e) => lab.fail(&format!("[{}] corrupted block: {e}", case.name)),
                }
            }
            let text = format!(
                "[{}] passed in {:.1} s\n    {}",
                case.name,
                t.elapsed().as_secs_f64(),
                lines.join("\n    ")
            );
            eprintln!("{text}");
            summary.push(text);
        }
        lab.stop_esptun();
        eprintln!(
            "{test}: {} cases in {:.1} s:\n{}",
            CASES.len(),
            started.elapsed().as_secs_f64(),
            summary.join("\n")
        );
    });
}

#[test]
fn strongswan_daemon_refusals() {
    let test = "strongswan_daemon_refusals";
    crate::retry_after_guest_stall(test, || {
        let started = Instant::now();
        let Some(mut lab) = Lab::boot(test) else {
            return;
        };
        let lines = refusals::run(&mut lab);
        eprintln!(
            "{test}: {} refusals in {:.1} s:\n    {}",
            lines.len(),
            started.elapsed().as_secs_f64(),
            lines.join("\n    ")
        );
    });
}

/// esptun restarts and initiates with INITIAL_CONTACT: charon replaces
/// its old IKE and CHILD SAs (RFC 7296 section 2.4).
#[test]
fn strongswan_daemon_esptun_restarted() {
    let test = "strongswan_daemon_esptun_restarted";
    crate::retry_after_guest_stall(test, || {
        let psk = random_psk();
        let swan = Swan::new(lifecycle::IKE, lifecycle::ESP, &psk);
        let side = Side::new(true, lifecycle::IKE, lifecycle::ESP, &psk);
        let Some((mut lab, first)) = lifecycle::up(test, &swan, &side) else {
            return;
        };
        lifecycle::traffic(&mut lab, "before esptun's restart");
        if let Err(e) = lab.restart_esptun(&side) {
            lab.fail(&format!("restarting esptun: {e}"));
        }
        let now = match workload::wait_established(&mut lab, IKE_TIMEOUT) {
            Ok((n, _)) => n,
            Err(e) => lab.fail(&format!("after esptun's restart: {e}")),
        };
        std::thread::sleep(Duration::from_secs(2));
        let ike = lifecycle::ike_sas_on_charon(&mut lab);
        let children = lifecycle::charon_children(&mut lab);
        let log = lab.charon_case_log();
        let contact = log
            .lines()
            .filter(|l| l.contains("parsed IKE_AUTH request") && l.contains("N(INIT_CONTACT)"))
            .count();
        if ike != 1 || children.len() != 1 || now.0 == first.0 || contact < 2 {
            lab.fail(&format!(
                "after esptun's INITIAL_CONTACT ({contact} IKE_AUTH requests with it) charon keeps \
                 {ike} IKE SA(s), CHILD SAs {children:?}"
            ));
        }
        eprintln!(
            "{test}: esptun restarted: its new IKE SA {} (the old {}) carried INITIAL_CONTACT; \
             charon keeps {ike} IKE SA and CHILD SAs {children:?}",
            now.0, first.0
        );
        lifecycle::traffic(&mut lab, "after esptun's restart");
        // The check `retry_after_guest_stall` relies on: a guest that just
        // carried the traffic transmits; one whose eth0 is down does not.
        if let Some(how) = lab.guest().nic_stalled() {
            panic!("{test}: a working guest's NIC reported as stalled: {how}");
        }
        if let Err(e) = lab.guest().run("/sbin/ip link set eth0 down", CMD_TIMEOUT) {
            panic!("{test}: ip link set eth0 down in the guest: {e}");
        }
        match lab.guest().nic_stalled() {
            Some(how) => eprintln!("{test}: with eth0 down the stall check says: {how}"),
            None => panic!("{test}: the stall check missed a guest whose eth0 is down"),
        }
    });
}
