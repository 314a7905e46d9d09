//! Least privilege and failed starts, end to end: a non-root user holding
//! exactly CAP_NET_ADMIN and CAP_NET_RAW (ambient, as the systemd unit
//! grants them) runs the tunnel; one without them is told what is missing
//! and how to grant it; and a start that fails claims no sequence numbers.
//!
//! Needs root (namespaces, setpriv, chown); skips with a note without it,
//! or fails under `ESPTUN_REQUIRE_NETNS=1`. Everything happens in the
//! labs' own network namespaces.

mod common;

use common::fail;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use esptun::lab::demo::{LabOptions, Side, TunnelLab};
use esptun::sa::reservation::{Fingerprint, ReservationStore};
use esptun::wire::outer::Encap;

/// A uid and gid no account uses: the daemon's user in these tests.
const UID: u32 = 64917;

/// setpriv arguments that make a process uid/gid [`UID`] holding exactly
/// the given capabilities as ambient ones (what AmbientCapabilities= does).
fn as_user(caps: &[&str]) -> Vec<String> {
    let mut args = vec![
        "setpriv".to_string(),
        format!("--reuid={UID}"),
        format!("--regid={UID}"),
        "--clear-groups".to_string(),
    ];
    if !caps.is_empty() {
        let list: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
        args.push(format!("--inh-caps={}", list.join(",")));
        args.push(format!("--ambient-caps={}", list.join(",")));
    }
    args
}

fn chown_tree(path: &Path) {
    std::os::unix::fs::lchown(path, Some(UID), Some(UID))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            chown_tree(&entry.expect("entry").path());
        }
    }
}

/// A copy of the binary the test user can reach wherever the checkout
/// lives (a home directory may be closed to others).
struct Exe {
    dir: PathBuf,
    path: PathBuf,
}

impl Exe {
    fn new(tag: &str) -> Exe {
        let dir = std::env::temp_dir().join(format!("esptun-priv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.join("esptun");
        std::fs::copy(env!("CARGO_BIN_EXE_esptun"), &path).expect("copy the binary");
        Exe { dir, path }
    }
}

impl Drop for Exe {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lab(test: &str, exe: &Path, options: LabOptions) -> Option<TunnelLab> {
    common::lab_with(test, "network namespaces, setpriv, chown", exe, options)
}

/// Waits (bounded) for `side` to exit; its exit code and log.
fn wait_exit(lab: &TunnelLab, side: Side) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = lab.try_exit(side) {
            let _ = lab.kill9(side); // reaps the handle; already exited
            return (status.code(), lab.log(side));
        }
        if Instant::now() >= deadline {
            let _ = lab.kill9(side);
            fail(lab, "esptun run kept running where it should have failed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes the daemon's files the test user's, as an operator would
/// (`chown esptun:` of the key files and the state directory), and gives
/// the user a TUN clone device it may open: this machine's /dev/net/tun
/// may be root-only (most distributions ship it 0666), so the wrapper
/// bind-mounts a node owned by the user over it in a private mount
/// namespace of the daemon alone.
fn hand_over(lab: &TunnelLab) -> PathBuf {
    let node = lab.dir.join("tun");
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(10, 200),
    )
    .expect("mknod a TUN clone device");
    chown_tree(&lab.dir);
    node
}

fn wrapper(node: &Path, caps: &[&str]) -> Vec<String> {
    let mut w: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /dev/net/tun && exec \"$@\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    w.push(node.display().to_string());
    w.extend(as_user(caps));
    w
}

#[test]
fn a_user_holding_only_net_admin_and_net_raw_runs_the_tunnel() {
    let exe = Exe::new("run");
    let Some(lab) = lab(
        "a_user_holding_only_net_admin_and_net_raw_runs_the_tunnel",
        &exe.path,
        LabOptions {
            tag: "prv".into(),
            subnet: 50,
            // Raw ESP needs both capabilities.
            encap: Encap::RawEsp,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let node = hand_over(&lab);
    let wrap = wrapper(&node, &["net_admin", "net_raw"]);
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    for side in [Side::A, Side::B] {
        if let Err(e) = lab
            .spawn_under(side, &[], &wrap)
            .and_then(|()| lab.wait_ready(side))
        {
            fail(&lab, &format!("starting {side:?} as uid {UID}: {e}"));
        }
    }
    // The daemon really is the test user: what it created is the user's.
    for ep in [&lab.a, &lab.b] {
        let owner = std::fs::metadata(&ep.control)
            .expect("control socket")
            .uid();
        assert_eq!(owner, UID, "{}", ep.control.display());
        let records = std::fs::read_dir(&ep.state_dir)
            .expect("state dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("seq-"))
            .map(|e| e.metadata().expect("meta").uid())
            .collect::<Vec<_>>();
        assert_eq!(records, vec![UID], "one record, the daemon's own");
    }
    let udp = lab
        .udp_exchange(50, 600)
        .unwrap_or_else(|e| fail(&lab, &format!("udp: {e}")));
    if udp.echoed_ok != udp.sent || udp.mismatched != 0 {
        fail(&lab, &format!("udp through the tunnel: {udp:?}"));
    }
    let ping = lab
        .ping(5)
        .unwrap_or_else(|e| fail(&lab, &format!("ping: {e}")));
    if ping.received == 0 {
        fail(&lab, &format!("ping through the tunnel: {ping:?}"));
    }
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        assert!(status.success(), "{side:?}: {status}");
        // The rules were removed by `ip` children: they had the capability.
        let log = lab.log(side);
        assert!(!log.contains("cleanup:"), "{side:?}: {log}");
    }
    for ns in [&lab.hosts.a, &lab.hosts.b] {
        let rules = ns.ip_output(&["rule", "show"]).expect("ip rule");
        assert!(!rules.contains("not fwmark"), "rules left behind: {rules}");
    }
}

#[test]
fn without_the_capabilities_run_says_which_is_missing_and_how_to_grant_it() {
    let exe = Exe::new("nocap");
    let Some(lab) = lab(
        "without_the_capabilities_run_says_which_is_missing_and_how_to_grant_it",
        &exe.path,
        LabOptions {
            tag: "prn".into(),
            subnet: 51,
            encap: Encap::RawEsp,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let node = hand_over(&lab);
    for (caps, needle) in [
        (&[][..], "needs root or CAP_NET_ADMIN"),
        (&["net_admin"][..], "needs root or CAP_NET_RAW"),
    ] {
        let _ = std::fs::remove_file(&lab.a.log);
        let wrap = wrapper(&node, caps);
        let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
        if let Err(e) = lab.spawn_under(Side::A, &[], &wrap) {
            fail(&lab, &format!("spawn: {e}"));
        }
        let (code, log) = wait_exit(&lab, Side::A);
        assert_eq!(code, Some(1), "{caps:?}: {log}");
        for part in [
            needle,
            "AmbientCapabilities=",
            "--ambient-caps",
            "uid 64917",
        ] {
            assert!(log.contains(part), "{caps:?}: {part} missing from {log}");
        }
        // Nothing was set up.
        let links = lab.hosts.a.ip_output(&["link", "show"]).expect("ip link");
        assert!(!links.contains("esptun0"), "{links}");
    }
    // The device node itself: root-only on this machine, say so.
    let mode = std::fs::metadata("/dev/net/tun").map_or(0o666, |m| m.mode() & 0o777);
    if mode & 0o006 != 0o006 {
        let _ = std::fs::remove_file(&lab.a.log);
        let plain = as_user(&["net_admin", "net_raw"]);
        let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
        if let Err(e) = lab.spawn_under(Side::A, &[], &plain) {
            fail(&lab, &format!("spawn: {e}"));
        }
        let (code, log) = wait_exit(&lab, Side::A);
        assert_eq!(code, Some(1), "{log}");
        assert!(
            log.contains("/dev/net/tun") && log.contains("chmod 666"),
            "{log}"
        );
    } else {
        common::skip("tun device check", "/dev/net/tun is open to everyone here");
    }
}

/// `[inner] ipv6_hop_by_hop = "carry"` needs CAP_NET_RAW in NAT-T mode
/// too (Linux sends IPV6_HOPOPTS only for it): without it the daemon says
/// so and how to do without; with it the tunnel runs.
#[test]
fn carrying_hop_by_hop_headers_needs_net_raw_also_with_nat_t() {
    let exe = Exe::new("hbh");
    let Some(lab) = lab(
        "carrying_hop_by_hop_headers_needs_net_raw_also_with_nat_t",
        &exe.path,
        LabOptions {
            tag: "prh".into(),
            subnet: 53,
            encap: Encap::NATT,
            inner_extra: "ipv6_hop_by_hop = \"carry\"".into(),
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let node = hand_over(&lab);
    let wrap = wrapper(&node, &["net_admin"]);
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    if let Err(e) = lab.spawn_under(Side::A, &[], &wrap) {
        fail(&lab, &format!("spawn: {e}"));
    }
    let (code, log) = wait_exit(&lab, Side::A);
    assert_eq!(code, Some(1), "{log}");
    for part in [
        "needs root or CAP_NET_RAW",
        "ipv6_hop_by_hop = \"drop\"",
        "IPV6_HOPOPTS",
        "AmbientCapabilities=",
        "uid 64917",
    ] {
        assert!(log.contains(part), "{part} missing from {log}");
    }
    let links = lab.hosts.a.ip_output(&["link", "show"]).expect("ip link");
    assert!(!links.contains("esptun0"), "{links}");
    // With CAP_NET_RAW as well, it runs and carries traffic.
    let wrap = wrapper(&node, &["net_admin", "net_raw"]);
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    for side in [Side::A, Side::B] {
        let _ = std::fs::remove_file(&lab.endpoint(side).log);
        if let Err(e) = lab
            .spawn_under(side, &[], &wrap)
            .and_then(|()| lab.wait_ready(side))
        {
            fail(&lab, &format!("starting {side:?} as uid {UID}: {e}"));
        }
    }
    let udp = lab
        .udp_exchange(20, 600)
        .unwrap_or_else(|e| fail(&lab, &format!("udp: {e}")));
    if udp.echoed_ok != udp.sent || udp.mismatched != 0 {
        fail(&lab, &format!("udp through the tunnel: {udp:?}"));
    }
    for side in [Side::A, Side::B] {
        let status = lab
            .stop(side)
            .unwrap_or_else(|e| fail(&lab, &format!("stopping {side:?}: {e}")));
        assert!(status.success(), "{side:?}: {status}");
    }
}

#[test]
fn a_start_that_fails_claims_no_sequence_numbers() {
    let exe = Path::new(env!("CARGO_BIN_EXE_esptun"));
    let Some(lab) = lab(
        "a_start_that_fails_claims_no_sequence_numbers",
        exe,
        LabOptions {
            tag: "prc".into(),
            subnet: 52,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let material = esptun::keyfile::load(&lab.key_file(Side::A)).expect("key");
    let fp = Fingerprint::new(&material);
    let store = ReservationStore::open(&lab.a.state_dir).expect("store");
    let fresh_marks = || {
        std::fs::read_dir(&lab.a.state_dir)
            .expect("state dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("fresh-"))
            .count()
    };
    assert_eq!(
        (store.load(&fp).expect("load"), fresh_marks()),
        (None, 1),
        "a fresh key"
    );
    // The interface name is taken (by a veth: not every kernel has the
    // dummy driver): the start fails after the sockets and keys are
    // ready, when it creates the TUN device.
    lab.hosts
        .a
        .ip(&[
            "link", "add", "esptun0", "type", "veth", "peer", "name", "esptun0p",
        ])
        .expect("a veth named esptun0");
    let failed_start = |what: &str| {
        let _ = std::fs::remove_file(&lab.a.log);
        if let Err(e) = lab.spawn(Side::A, &[]) {
            fail(&lab, &format!("spawn: {e}"));
        }
        let (code, log) = wait_exit(&lab, Side::A);
        assert_eq!(code, Some(1), "{what}: {log}");
        assert!(log.contains("esptun0"), "{what}: {log}");
    };
    failed_start("fresh key");
    assert_eq!(
        (store.load(&fp).expect("load"), fresh_marks()),
        (None, 1),
        "the key is still fresh: nothing claimed, the mark kept"
    );

    // A key with a record: its ceiling stays where it was.
    let ceiling = 5 << 20;
    store.store(&fp, ceiling).expect("record");
    failed_start("recorded key");
    assert_eq!(store.load(&fp).expect("load"), Some(ceiling));

    // The same start with the name free claims: the checks above could
    // have seen a claim.
    lab.hosts
        .a
        .ip(&["link", "del", "esptun0"])
        .expect("remove the veth");
    if let Err(e) = lab.start(Side::A, &[]) {
        fail(&lab, &format!("starting a: {e}"));
    }
    let after = store.load(&fp).expect("load").unwrap_or(0);
    assert!(after > ceiling, "a start claims above {ceiling}: {after}");
    assert_eq!(fresh_marks(), 0, "the claim consumed the mark");
}
