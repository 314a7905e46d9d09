//! Hardening against other local accounts and against mistakes, through
//! the built binary: the state directory (whose records keep GCM nonces
//! unique), key files, and the control socket path.
//!
//! Every test here is a hardening test; the ones that need root (to make
//! files owned by another uid, or namespaces for a real start) print
//! `SKIPPED <test>: <why>` without it, and fail under
//! `ESPTUN_REQUIRE_NETNS=1`. Every command runs with a time limit.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// No command here should take long; a FIFO that blocks must fail the test.
const LIMIT: Duration = Duration::from_secs(5);

/// A directory of its own under the temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("esptun-hardening-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        chmod(&dir, 0o755);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs esptun with `args` within [`LIMIT`]: (exit code, stdout, stderr).
fn esptun(dir: &Path, name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_esptun"));
    cmd.args(args);
    let started = Instant::now();
    let (status, out, err) = common::run_bounded(cmd, dir, name, LIMIT)
        .unwrap_or_else(|e| panic!("esptun {args:?}: {e}"));
    assert!(started.elapsed() < LIMIT, "esptun {args:?} took too long");
    (status.code(), out, err)
}

fn genkey(dir: &Path, key: &Path, state: &Path) -> (Option<i32>, String, String) {
    esptun(
        dir,
        "genkey",
        &["genkey", "-o", s(key), "--state-dir", s(state)],
    )
}

fn write_config(dir: &Path, state: &Path, out_key: &Path, in_key: &Path) -> PathBuf {
    let config = dir.join("esptun.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\n\
             endpoint = \"198.18.0.2\"\n\
             outbound = {{ spi = 0x1001, key_file = {out_key:?} }}\n\
             inbound = {{ spi = 0x2001, key_file = {in_key:?} }}\n"
        ),
    )
    .expect("config");
    config
}

#[test]
fn hardening_a_state_dir_others_can_write_is_refused_with_the_fix() {
    let dir = Scratch::new("lax");
    let state = dir.0.join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let key = dir.0.join("k.key");
    for (mode, fix) in [(0o777, "chmod 700"), (0o1777, "mkdir -m 700")] {
        chmod(&state, mode);
        let (code, _, err) = genkey(&dir.0, &key, &state);
        assert_eq!(code, Some(1), "{mode:o}: {err}");
        assert!(
            err.contains(fix) && err.contains(s(&state)),
            "{mode:o}: {err}"
        );
        assert!(!key.exists(), "no key without a trustworthy record of it");
    }

    // The directory is fine, a directory above it is not: whoever can
    // write there can swap the state directory for one of their own.
    let open = dir.0.join("open");
    let below = open.join("state");
    std::fs::create_dir_all(&below).expect("mkdir");
    chmod(&below, 0o700);
    chmod(&open, 0o777);
    let (code, _, err) = genkey(&dir.0, &key, &below);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(s(&open)) && err.contains("chmod go-w"),
        "{err}"
    );

    // What the tests and the demo make is accepted: a 0700 directory
    // (created by esptun when missing) under a 0755 one under sticky /tmp.
    let fresh = dir.0.join("new-state");
    let (code, _, err) = genkey(&dir.0, &key, &fresh);
    assert_eq!(code, Some(0), "{err}");
    let mode = std::fs::metadata(&fresh)
        .expect("created")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "created 0700");
}

#[test]
fn hardening_a_state_dir_of_another_account_is_refused_root_only() {
    let test = "hardening_a_state_dir_of_another_account_is_refused_root_only";
    if !common::root_or_skipped(test, "chown to another uid") {
        return;
    }
    let dir = Scratch::new("foreign");
    let state = dir.0.join("state");
    std::fs::create_dir(&state).expect("mkdir");
    chmod(&state, 0o700);
    std::os::unix::fs::chown(&state, Some(4242), Some(4242)).expect("chown");
    let key = dir.0.join("k.key");
    let (code, _, err) = genkey(&dir.0, &key, &state);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("uid 4242") && err.contains("chown"), "{err}");
    assert!(!key.exists());

    // A key file another account owns is refused too (root's own is fine).
    std::os::unix::fs::chown(&state, Some(0), Some(0)).expect("chown");
    let (out_key, in_key) = (dir.0.join("out.key"), dir.0.join("in.key"));
    for k in [&out_key, &in_key] {
        assert_eq!(genkey(&dir.0, k, &state).0, Some(0));
    }
    let config = write_config(&dir.0, &state, &out_key, &in_key);
    assert_eq!(
        esptun(&dir.0, "check", &["check-config", "-c", s(&config)]).0,
        Some(0)
    );
    std::os::unix::fs::chown(&in_key, Some(4242), None).expect("chown");
    let (code, _, err) = esptun(&dir.0, "check", &["check-config", "-c", s(&config)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("in.key") && err.contains("uid 4242"), "{err}");
}

#[test]
fn hardening_links_at_record_names_are_refused_and_their_targets_untouched() {
    let dir = Scratch::new("links");
    let elsewhere = dir.0.join("elsewhere");
    let (out_key, in_key) = (dir.0.join("out.key"), dir.0.join("in.key"));
    for k in [&out_key, &in_key] {
        let (code, _, err) = genkey(&dir.0, k, &elsewhere);
        assert_eq!(code, Some(0), "{err}");
    }
    let state = dir.0.join("state");
    let store = esptun::sa::reservation::ReservationStore::open(&state).expect("store");
    let material = esptun::keyfile::load(&out_key).expect("key");
    let fp = esptun::sa::reservation::Fingerprint::new(&material);
    let victim = dir.0.join("victim");
    let original = b"root:x:0:0:not a record\n";
    std::fs::write(&victim, original).expect("victim");

    // A link at the record: a forged "ceiling 0" must not be believed.
    let record = state.join(format!("seq-{}", fp.as_str()));
    std::os::unix::fs::symlink(&victim, &record).expect("link");
    let config = write_config(&dir.0, &state, &out_key, &in_key);
    let (code, _, err) = esptun(
        &dir.0,
        "fresh",
        &["declare-fresh", "-c", s(&config), "--peer", "b"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("symbolic link") && err.contains(s(&record)),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), original);
    std::fs::remove_file(&record).expect("unlink");

    // A link at the temporary record's name: writing through it would
    // overwrite any file the daemon (root) can write.
    let tmp = state.join(format!("seq-{}.tmp", fp.as_str()));
    std::os::unix::fs::symlink(&victim, &tmp).expect("link");
    let err = store
        .store(&fp, 1 << 20)
        .expect_err("link at temp")
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).expect("victim"), original);
    assert!(
        tmp.symlink_metadata()
            .expect("link")
            .file_type()
            .is_symlink()
    );
}

#[test]
fn hardening_a_fifo_or_directory_as_key_file_is_refused_at_once() {
    let dir = Scratch::new("fifo");
    let state = dir.0.join("state");
    let out_key = dir.0.join("out.key");
    assert_eq!(genkey(&dir.0, &out_key, &state).0, Some(0));
    let fifo = dir.0.join("in.key");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let config = write_config(&dir.0, &state, &out_key, &fifo);
    // Bounded by LIMIT: a blocking open fails the test instead of hanging.
    let (code, _, err) = esptun(&dir.0, "check", &["check-config", "-c", s(&config)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("FIFO") && err.contains(s(&fifo)), "{err}");

    std::fs::remove_file(&fifo).expect("unlink");
    std::fs::create_dir(&fifo).expect("mkdir");
    chmod(&fifo, 0o755);
    let (code, _, err) = esptun(&dir.0, "check", &["check-config", "-c", s(&config)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is a directory"), "{err}");
    assert!(
        !err.contains("chmod 600"),
        "not a permissions problem: {err}"
    );
}

#[test]
fn hardening_a_regular_file_at_the_control_socket_path_survives_a_start() {
    let test = "hardening_a_regular_file_at_the_control_socket_path_survives_a_start";
    if !common::root_or_skipped(test, "network namespaces, TUN devices") {
        return;
    }
    use esptun::lab::demo::{LabOptions, Side, TunnelLab};
    let exe = Path::new(env!("CARGO_BIN_EXE_esptun"));
    let lab = TunnelLab::create(
        exe,
        LabOptions {
            tag: "hard".into(),
            subnet: 40,
            ..LabOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{test}: building the lab: {e}"));
    // The typo: control_socket names the configuration file itself.
    let config = lab.a.config.clone();
    let (a, b) = lab.outer(Side::A);
    let text = lab
        .config_text(Side::A, a, b)
        .replace(s(&lab.a.control), s(&config));
    lab.write_config_text(Side::A, &text).expect("config");
    let err = lab.start(Side::A, &[]).expect_err("must not start");
    let err = err.to_string();
    assert!(
        err.contains("not a socket") && err.contains(s(&config)),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).expect("the config survives"),
        text
    );
}
