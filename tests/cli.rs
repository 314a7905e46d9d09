//! The `esptun` binary's contracts: JSON shapes, exit statuses, errors.

mod common;

use std::process::Command;

fn esptun(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(args)
        .output()
        .expect("run esptun")
}

#[test]
fn selftest_json_has_the_documented_fields_and_exit_status() {
    let out = esptun(&["selftest", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let providers = v["providers"].as_array().expect("providers[]");
    assert_eq!(providers.len(), 2);
    for p in providers {
        for field in [
            "name",
            "hardware",
            "available",
            "kat_passed",
            "kat_failed",
            "simd_ok",
        ] {
            assert!(p.get(field).is_some(), "missing {field} in {p}");
        }
        assert!(p["hardware"].is_boolean() && p["available"].is_boolean());
    }
    let soft = &providers[1];
    assert_eq!(soft["name"], "soft");
    assert_eq!(
        soft["hardware"], false,
        "this build must pin RustCrypto to software"
    );
    assert_eq!(soft["kat_failed"], 0);
    assert!(soft["simd_ok"].is_null(), "SIMD checks are not run on soft");
    let hw = &providers[0];
    let expected = if hw["available"] == true {
        "hardware"
    } else {
        "soft"
    };
    assert_eq!(v["selected"], expected);
    if hw["available"] == true {
        assert_eq!(hw["simd_ok"], true);
        assert_eq!(hw["kat_passed"], soft["kat_passed"]);
    }
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn selftest_soft_mode_selects_soft() {
    let out = esptun(&["selftest", "--crypto", "soft"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("selected (soft): soft"), "{text}");
}

#[test]
fn bench_json_prints_one_object_per_cell() {
    let out = esptun(&[
        "bench",
        "--json",
        "--seconds",
        "0.01",
        "--rounds",
        "1",
        "--sizes",
        "64,1400",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let providers = rows
        .iter()
        .filter(|r| r["size"] == 64 && r["op"] == "seal")
        .count();
    assert!(providers >= 1);
    let checksum_rows = rows.iter().filter(|r| r["op"] == "checksum").count();
    assert_eq!(checksum_rows, 2, "one checksum row per size");
    let datapath_rows = rows
        .iter()
        .filter(|r| r["op"] == "outbound" || r["op"] == "inbound")
        .count();
    assert_eq!(
        datapath_rows,
        providers * 2 * 2,
        "providers x directions x sizes"
    );
    assert_eq!(
        rows.len(),
        providers * 2 * 2 * 2 + 2,
        "cipher ops and datapath directions per provider and size, plus checksum"
    );
    for r in &rows {
        assert!(r["mb_per_s"].as_f64().is_some_and(|m| m > 0.0), "{r}");
        let op = r["op"].as_str().unwrap_or("");
        assert!(
            ["seal", "open", "checksum", "outbound", "inbound"].contains(&op),
            "{r}"
        );
    }
}

#[test]
fn bad_arguments_are_usage_errors_with_a_reason() {
    for (args, needle) in [
        (
            vec!["selftest", "--crypto", "fast"],
            "use auto, hardware or soft",
        ),
        (vec!["bench", "--sizes", "0"], "sizes must be 1 to"),
        (vec!["bench", "--key-bits", "192"], "128 or 256"),
        (vec!["bench", "--bits", "192"], "128 or 256"),
        (vec!["bench", "--seconds", "0"], "more than 0"),
    ] {
        let out = esptun(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn bench_runs_with_its_default_sizes() {
    // The defaults include 65536, which the cipher table measures and the
    // datapath table must skip (no IPv4 packet is that long).
    let out = esptun(&["bench", "--seconds", "0.005", "--rounds", "1"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("65536 seal"), "{text}");
    assert!(text.contains("datapath"), "{text}");
}

#[test]
fn genkey_writes_a_private_key_once_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("esptun-cli-genkey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("out.key");
    let path_str = path.to_str().expect("utf-8 path");
    let state = dir.join("state");
    let state_str = state.to_str().expect("utf-8 path");
    let fresh_marks = || {
        std::fs::read_dir(&state)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("fresh-"))
                })
                .count()
            })
            .unwrap_or(0)
    };

    let out = esptun(&[
        "genkey",
        "--bits",
        "128",
        "-o",
        path_str,
        "--state-dir",
        state_str,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).expect("key file");
    assert_eq!(text.trim().len(), 40, "16-byte key + 4-byte salt as hex");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(text.trim()), "the key must not be printed");
    assert!(esptun::keyfile::load(&path).is_ok());
    assert_eq!(fresh_marks(), 1, "the new key is recorded as never used");

    let again = esptun(&["genkey", "-o", path_str, "--state-dir", state_str]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
    assert_eq!(
        std::fs::read_to_string(&path).expect("key file"),
        text,
        "unchanged"
    );
    assert_eq!(fresh_marks(), 1, "no mark for a key that was not written");

    let default = dir.join("default.key");
    let out = esptun(&[
        "genkey",
        "-o",
        default.to_str().expect("utf-8"),
        "--state-dir",
        state_str,
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&default).expect("key").trim().len(),
        72,
        "256-bit by default"
    );
    assert_eq!(
        esptun(&["genkey", "--bits", "192", "-o", "x"])
            .status
            .code(),
        Some(2)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_accepts_a_good_setup_and_names_every_problem_otherwise() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("esptun-cli-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let state = dir.join("state");
    let key = |name: &str| {
        let path = dir.join(name);
        let out = esptun(&[
            "genkey",
            "-o",
            path.to_str().expect("utf-8"),
            "--state-dir",
            state.to_str().expect("utf-8"),
        ]);
        assert_eq!(out.status.code(), Some(0));
        path
    };
    let (out_key, in_key) = (key("a-to-b.key"), key("b-to-a.key"));
    let config = dir.join("esptun.toml");
    std::fs::write(
        &config,
        format!(
            "[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.19.0.2\"\n\
             outbound = {{ spi = 0x1001, key_file = {:?} }}\ninbound = {{ spi = 0x2001, key_file = {:?} }}\n",
            out_key, in_key
        ),
    )
    .expect("config");
    let config_arg = config.to_str().expect("utf-8");
    let out = esptun(&["check-config", "-c", config_arg]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));

    // A key file others can read is refused, with the fix.
    std::fs::set_permissions(&in_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = esptun(&["check-config", "-c", config_arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("b-to-a.key") && err.contains("chmod 600"),
        "{err}"
    );

    // Several mistakes: all reported, by field.
    std::fs::write(&config, "outer = \"tcp\"\ncrypto = \"fast\"\n").expect("config");
    let out = esptun(&["check-config", "-c", config_arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["outer:", "crypto:", "peer:"] {
        assert!(err.contains(field), "{field} missing from {err}");
    }
    let missing = esptun(&[
        "check-config",
        "-c",
        dir.join("nope.toml").to_str().expect("utf-8"),
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read config"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn declare_fresh_marks_only_an_unrecorded_outbound_key_of_a_named_peer() {
    let dir = std::env::temp_dir().join(format!("esptun-cli-fresh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Keys made elsewhere: genkey recorded them in another state directory.
    let elsewhere = dir.join("elsewhere");
    for name in ["out.key", "in.key"] {
        let out = esptun(&[
            "genkey",
            "-o",
            dir.join(name).to_str().expect("utf-8"),
            "--state-dir",
            elsewhere.to_str().expect("utf-8"),
        ]);
        assert_eq!(out.status.code(), Some(0));
    }
    let state = dir.join("state");
    let config = dir.join("esptun.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.18.0.2\"\n\
             outbound = {{ spi = 0x1001, key_file = {:?} }}\ninbound = {{ spi = 0x2001, key_file = {:?} }}\n",
            state,
            dir.join("out.key"),
            dir.join("in.key")
        ),
    )
    .expect("config");
    let config_arg = config.to_str().expect("utf-8");

    let unknown = esptun(&["declare-fresh", "-c", config_arg, "--peer", "zz"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no peer \"zz\""));

    let out = esptun(&["declare-fresh", "-c", config_arg, "--peer", "b"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let marks: Vec<String> = std::fs::read_dir(&state)
        .expect("state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(marks[0].starts_with("fresh-"), "{marks:?}");
    let key_hex = std::fs::read_to_string(dir.join("out.key")).expect("key");
    assert!(
        !marks[0].contains(key_hex.trim()),
        "the mark names a keyed hash, not the key"
    );

    // Once the daemon has a record for it, the key is not fresh any more.
    let material = esptun::keyfile::load(&dir.join("out.key")).expect("key");
    let store = esptun::sa::reservation::ReservationStore::open(&state).expect("store");
    let fp = esptun::sa::reservation::Fingerprint::new(&material);
    store.store(&fp, 1 << 20).expect("record");
    let used = esptun(&["declare-fresh", "-c", config_arg, "--peer", "b"]);
    assert_eq!(used.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&used.stderr).contains("not fresh"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fault_injection_is_not_an_option_of_run_and_its_endpoint_is_hidden() {
    let run = esptun(&["run", "--help"]);
    let text = String::from_utf8_lossy(&run.stdout).to_lowercase();
    assert!(run.status.success() && text.contains("--config"), "{text}");
    // Whole words: "default" is fine.
    let words: Vec<&str> = text.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    for word in ["fault", "corrupt", "inject"] {
        assert!(
            !words.iter().any(|w| w.starts_with(word)),
            "`run --help` mentions {word}: {text}"
        );
    }
    let top = esptun(&["--help"]);
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        text.contains("demo") && !text.contains("demo-endpoint"),
        "{text}"
    );
    let demo = esptun(&["demo", "--help"]);
    let text = String::from_utf8_lossy(&demo.stdout);
    assert!(
        text.contains("--corrupt") && text.contains("--json"),
        "{text}"
    );
}

#[test]
fn run_and_demo_without_root_say_what_to_do() {
    // As root, drop to nobody with setpriv (util-linux) so the check runs
    // in CI too, on a copy of the binary that nobody can reach wherever
    // the checkout lives.
    use std::os::unix::fs::PermissionsExt;
    let root = nix::unistd::geteuid().is_root();
    let dir = std::env::temp_dir().join(format!("esptun-cli-nonroot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let exe = dir.join("esptun");
    std::fs::copy(env!("CARGO_BIN_EXE_esptun"), &exe).expect("copy the binary");
    let unprivileged = |args: &[&str]| {
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).output().expect("run esptun")
    };
    for args in [&["run", "-c", "/nonexistent.toml"][..], &["demo"][..]] {
        let out = unprivileged(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("needs root"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_systemd_unit_verifies_and_waits_for_readiness() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/esptun.service"),
    )
    .expect("deploy/esptun.service");
    for needle in [
        "Type=notify",
        "ExecStartPre=/usr/local/bin/esptun check-config",
        "ExecReload=/usr/local/bin/esptun reload -c /etc/esptun/esptun.toml",
        "RestartPreventExitStatus=3",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "StateDirectory=esptun",
        "User=esptun",
        "Group=esptun",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
        "RuntimeDirectory=esptun",
    ] {
        assert!(unit.contains(needle), "{needle} missing from the unit");
    }
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        common::skip_unless_required(
            "the_systemd_unit_verifies_and_waits_for_readiness",
            "ESPTUN_REQUIRE_SYSTEMD_ANALYZE",
            "verifying the unit: systemd-analyze is not installed",
        );
        return;
    };
    assert!(probe.status.success());
    // The same unit, pointing at this build instead of /usr/local/bin.
    let dir = std::env::temp_dir().join(format!("esptun-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("esptun.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/esptun", env!("CARGO_BIN_EXE_esptun")),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{said}");
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("esptun.service"))
        .collect();
    assert!(complaints.is_empty(), "{said}");
}

/// A temporary directory with two fresh keys and a config writer.
struct ConfigLab {
    dir: std::path::PathBuf,
    state: std::path::PathBuf,
}

impl ConfigLab {
    fn new(tag: &str) -> ConfigLab {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("esptun-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let state = dir.join("state");
        ConfigLab { dir, state }
    }

    fn key(&self, name: &str) -> std::path::PathBuf {
        let path = self.dir.join(name);
        let out = esptun(&[
            "genkey",
            "-o",
            path.to_str().expect("utf-8"),
            "--state-dir",
            self.state.to_str().expect("utf-8"),
        ]);
        assert_eq!(out.status.code(), Some(0));
        path
    }

    /// A peer table; `n` keeps SPIs and addresses apart.
    fn peer(n: u8, out: &std::path::Path, inb: &std::path::Path) -> String {
        format!(
            "[[peer]]\nname = \"p{n}\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.19.0.{n}\"\n\
             outbound = {{ spi = {}, key_file = {out:?} }}\ninbound = {{ spi = {}, key_file = {inb:?} }}\n",
            0x1000 + u32::from(n),
            0x2000 + u32::from(n)
        )
    }

    fn check(&self, text: &str) -> (Option<i32>, String) {
        let config = self.dir.join("esptun.toml");
        std::fs::write(&config, text).expect("config");
        let out = esptun(&["check-config", "-c", config.to_str().expect("utf-8")]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for ConfigLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn check_config_refuses_what_run_refuses() {
    let lab = ConfigLab::new("parity");
    let state = format!("state_dir = {:?}\n", lab.state);
    let (k1, k2, k3, k4) = (lab.key("1"), lab.key("2"), lab.key("3"), lab.key("4"));
    let good = format!(
        "{state}{}{}",
        ConfigLab::peer(2, &k1, &k2),
        ConfigLab::peer(3, &k3, &k4)
    );
    let (code, err) = lab.check(&good);
    assert_eq!(code, Some(0), "{err}");

    // The same key file in two peers.
    let (code, err) = lab.check(&format!(
        "{state}{}{}",
        ConfigLab::peer(2, &k1, &k2),
        ConfigLab::peer(3, &k1, &k4)
    ));
    assert_eq!(code, Some(1));
    assert!(err.contains("peer[1] (p3).outbound.key_file"), "{err}");

    // One peer's inbound key is another's outbound key, as a copy.
    let copy = lab.dir.join("copy-of-1");
    std::fs::copy(&k1, &copy).expect("copy");
    let (code, err) = lab.check(&format!(
        "{state}{}{}",
        ConfigLab::peer(2, &k1, &k2),
        ConfigLab::peer(3, &k3, &copy)
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("use the same key material") && err.contains("copy-of-1"),
        "{err}"
    );

    // A state directory that cannot be created: below a file.
    let (code, err) =
        lab.check(&good.replace(&state, &format!("state_dir = {:?}\n", k1.join("state"))));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("state_dir") && err.contains("cannot be created"),
        "{err}"
    );

    // One others can write.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&lab.state, std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let (code, err) = lab.check(&good);
        std::fs::set_permissions(&lab.state, std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        assert_eq!(code, Some(1));
        assert!(
            err.contains("state_dir") && err.contains("chmod 700"),
            "{err}"
        );
    }

    // An outbound key with neither a sequence record nor a fresh mark (made
    // with another state directory): `run` would refuse to claim it.
    let elsewhere = lab.dir.join("elsewhere");
    let foreign = lab.dir.join("foreign-key");
    let out = esptun(&[
        "genkey",
        "-o",
        foreign.to_str().expect("utf-8"),
        "--state-dir",
        elsewhere.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let (code, err) = lab.check(&format!(
        "{state}{}{}",
        ConfigLab::peer(2, &foreign, &k2),
        ConfigLab::peer(3, &k3, &k4)
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("foreign-key") && err.contains("0x"),
        "the unrecorded key is named: {err}"
    );

    // An IPv6 peer on a TUN MTU below 1280.
    let v6 = ConfigLab::peer(2, &k1, &k2)
        .replace("198.18.0.1", "2001:db8::1")
        .replace("198.19.0.2", "2001:db8::2");
    let (code, err) = lab.check(&format!("{state}outer_mtu = 1300\n{v6}"));
    assert_eq!(code, Some(1));
    assert!(err.contains("outer_mtu") && err.contains("1280"), "{err}");
    let (code, err) = lab.check(&format!("{state}outer_mtu = 1325\n{v6}"));
    assert_eq!(code, Some(0), "{err}");

    // `run` refuses the same, with the same words, before it touches the
    // system (in a namespace of its own all the same).
    if !common::root_or_skipped("check_config_refuses_what_run_refuses (run)", "netns") {
        return;
    }
    let ns = esptun::lab::Netns::create(&format!("e{}cli", std::process::id())).expect("namespace");
    let config = lab.dir.join("esptun.toml");
    std::fs::write(
        &config,
        format!(
            "{state}{}{}",
            ConfigLab::peer(2, &k1, &k2),
            ConfigLab::peer(3, &k3, &copy)
        ),
    )
    .expect("config");
    let out = ns
        .command(env!("CARGO_BIN_EXE_esptun"))
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("use the same key material"), "{err}");
    let links = ns.ip_output(&["link", "show"]).expect("ip link");
    assert!(!links.contains("esptun0"), "{links}");
}

#[test]
fn config_mistakes_get_errors_that_say_what_to_do() {
    let lab = ConfigLab::new("hints");
    let state = format!("state_dir = {:?}\n", lab.state);
    let (k1, k2) = (lab.key("1"), lab.key("2"));
    let peer = ConfigLab::peer(2, &k1, &k2);

    // A top-level key after the peer table.
    let (code, err) = lab.check(&format!("{state}{peer}fwmark = 0x4554\n"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown field `fwmark`") && err.contains("top-level setting"),
        "{err}"
    );
    // The firewall mark in hex, as the documentation writes it.
    let (code, err) = lab.check(&format!("{state}fwmark = 0\n{peer}"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("fwmark: 0x0 cannot be used") && err.contains("0x4553"),
        "{err}"
    );
    // A key file that is a directory.
    let dir_key = lab.dir.join("keys.d");
    std::fs::create_dir(&dir_key).expect("mkdir");
    let (code, err) = lab.check(&format!("{state}{}", ConfigLab::peer(2, &k1, &dir_key)));
    assert_eq!(code, Some(1));
    assert!(err.contains("keys.d is a directory, not a file"), "{err}");

    // check-config needs no privilege, but it reads the key files: a user
    // who cannot is told whom to run it as.
    if !common::root_or_skipped("config_mistakes_get_errors (non-root)", "setpriv") {
        return;
    }
    let config = lab.dir.join("esptun.toml");
    std::fs::write(&config, format!("{state}{peer}")).expect("config");
    let exe = lab.dir.join("esptun");
    std::fs::copy(env!("CARGO_BIN_EXE_esptun"), &exe).expect("copy the binary");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["check-config", "-c"])
        .arg(&config)
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Permission denied") && err.contains("as the daemon's user"),
        "{err}"
    );
}

#[test]
fn status_against_a_daemon_that_does_not_answer_says_it_timed_out() {
    let dir = std::env::temp_dir().join(format!("esptun-cli-busy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("busy.sock");
    // Listening, never accepting: the connection waits in the backlog.
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let out = esptun(&["status", "--socket", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("did not answer within") && err.contains("busy or hung"),
        "{err}"
    );
    assert!(!err.contains("temporarily unavailable"), "{err}");
}

/// `deploy/ike/`: the two esptun configurations README's IKEv2 section
/// tells users to start from pass `check-config` as shipped (with the
/// paths moved into a temporary directory and a PSK file written), and
/// the strongSwan peer's `swanctl.conf` asks for the same algorithms,
/// addresses and identities.
#[test]
fn the_shipped_ike_configurations_check_and_match_the_strongswan_one() {
    use std::os::unix::fs::PermissionsExt;
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ike");
    let dir = std::env::temp_dir().join(format!("esptun-cli-ike-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (file, psk) in [("host-a.toml", "host-b.psk"), ("host-b.toml", "host-a.psk")] {
        let text = std::fs::read_to_string(deploy.join(file)).expect("deploy/ike config");
        let moved = text
            .replace("/etc/esptun/", &format!("{}/", dir.display()))
            .replace("/var/lib/esptun", &dir.join("state").display().to_string());
        let psk_path = dir.join(psk);
        std::fs::write(&psk_path, "c2VjcmV0IHNoYXJlZCBieSBhbmQgYiwgMzIgYnl0ZXMh\n").expect("psk");
        std::fs::set_permissions(&psk_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let config = dir.join(file);
        std::fs::write(&config, moved).expect("config");
        let out = esptun(&["check-config", "-c", config.to_str().expect("utf-8")]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = std::fs::read_to_string(deploy.join("host-a.toml")).expect("host-a.toml");
    let swan = std::fs::read_to_string(deploy.join("swanctl.conf")).expect("swanctl.conf");
    for needle in [
        "local_addrs = 198.19.0.2",
        "remote_addrs = 198.18.0.1",
        "proposals = aes256gcm16-prfsha256-x25519",
        "esp_proposals = aes256gcm16-esn",
        "mode = transport",
        "id = 198.18.0.1",
        "id = 198.19.0.2",
    ] {
        assert!(swan.contains(needle), "swanctl.conf lacks {needle:?}");
    }
    for needle in [
        "local = \"198.18.0.1\"",
        "endpoint = \"198.19.0.2\"",
        "ike_proposals = [\"aes256gcm16-prfsha256-x25519\"]",
        "esp_proposals = [\"aes256gcm16-esn\"]",
    ] {
        assert!(a.contains(needle), "host-a.toml lacks {needle:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
