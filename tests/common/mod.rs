//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use esptun::crypto::{Provider, ProviderId, hardware, soft};

/// splitmix64: a seeded, reproducible generator for test inputs. The seed
/// is printed so a failure can be replayed with ESPTUN_TEST_SEED.
pub struct TestRng(u64);

impl TestRng {
    pub fn from_env(test: &str) -> Self {
        let seed = std::env::var("ESPTUN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: ESPTUN_TEST_SEED={seed}");
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// For tests that need AES-NI: reports why they skip, or fails when
/// `ESPTUN_REQUIRE_AESNI=1` (set by CI on machines whose CPU has AES-NI, so
/// a broken detection cannot turn the hardware tests into silent skips).
#[track_caller]
pub fn skip_or_fail_without_aesni(test: &str) {
    let why = hardware::provider().availability.err().unwrap_or_default();
    skip_unless_required(
        test,
        "ESPTUN_REQUIRE_AESNI",
        &format!("the hardware provider is unavailable: {why}"),
    );
}

/// The hardware provider, or, on a CPU without AES-NI, the soft algorithm
/// standing in for it in the hardware slot, so selection logic is still
/// exercised (and the substitution is printed).
pub fn hardware_or_stand_in() -> Provider {
    let hw = hardware::provider();
    if hw.is_available() {
        return hw;
    }
    skip_or_fail_without_aesni("hardware slot");
    eprintln!("note: the soft algorithm stands in for the hardware slot");
    Provider {
        id: ProviderId::Hardware,
        ..soft::provider()
    }
}

/// Whether a root-only test may run: without root it reports that `test`
/// skipped and why (`needs`: what root is for), unless
/// `ESPTUN_REQUIRE_NETNS=1` (CI), which makes it a failure.
#[track_caller]
pub fn require_root(test: &str, needs: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip_unless_required(
        test,
        "ESPTUN_REQUIRE_NETNS",
        &format!("needs root ({needs})"),
    );
    false
}

/// Reports that `test` (or a part of it) skipped and why, as
/// `SKIPPED <test>: <why>`, straight to the process's stderr: libtest
/// captures only what goes through the `print!`/`eprint!` macros, so this
/// line shows in `cargo test` output even when the test passes.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// [`skip`], unless the environment variable `required` is `1` (CI sets
/// it where the prerequisite is installed), which makes the skip a failure.
#[track_caller]
pub fn skip_unless_required(test: &str, required: &str, why: &str) {
    if std::env::var(required).as_deref() == Ok("1") {
        panic!("{test}: {why}, and {required}=1 is set");
    }
    skip(test, why);
}

/// Waits for `child` at most `timeout`, then kills it.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + timeout;
    let step = Duration::from_millis(20);
    for _ in 0..=(timeout.as_millis() / step.as_millis()) {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(step),
            Ok(None) => break,
            Err(e) => return Err(format!("waiting: {e}")),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("did not finish within {timeout:?} (killed)"))
}

/// Runs `cmd` to completion within `timeout`, stdout and stderr to files in
/// `dir`; returns (status, stdout, stderr).
pub fn run_bounded(
    mut cmd: Command,
    dir: &Path,
    name: &str,
    timeout: Duration,
) -> Result<(ExitStatus, String, String), String> {
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    let file = |p: &Path| File::create(p).map_err(|e| format!("creating {}: {e}", p.display()));
    cmd.stdin(Stdio::null())
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?);
    let mut child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
    let status = wait_bounded(&mut child, timeout).map_err(|e| format!("{name}: {e}"))?;
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Ok((status, read(&out_path), read(&err_path)))
}

/// For root-only tests (chown to another uid, namespaces): whether to run.
/// Without root it writes `SKIPPED <test>: needs root (<needs>)` to the
/// real stderr (not the captured test output), or panics when
/// `ESPTUN_REQUIRE_NETNS=1`, so a skip is never silent.
pub fn root_or_skipped(test: &str, needs: &str) -> bool {
    use std::io::Write;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("ESPTUN_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: needs root ({needs}), and ESPTUN_REQUIRE_NETNS=1 is set");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs root ({needs})");
    false
}

/// A two-host tunnel lab for `test` running the esptun binary built for
/// the tests; `None` (and said so) without root, a failure instead under
/// `ESPTUN_REQUIRE_NETNS=1`.
pub fn lab(
    test: &str,
    options: esptun::lab::demo::LabOptions,
) -> Option<esptun::lab::demo::TunnelLab> {
    lab_with(
        test,
        "network namespaces, TUN devices",
        Path::new(env!("CARGO_BIN_EXE_esptun")),
        options,
    )
}

/// [`lab`] running `exe`; `needs` says what root is for.
pub fn lab_with(
    test: &str,
    needs: &str,
    exe: &Path,
    options: esptun::lab::demo::LabOptions,
) -> Option<esptun::lab::demo::TunnelLab> {
    if !require_root(test, needs) {
        return None;
    }
    Some(
        esptun::lab::demo::TunnelLab::create(exe, options)
            .unwrap_or_else(|e| panic!("{test}: building the lab: {e}")),
    )
}

/// Panics with both endpoints' logs, so a failure in CI can be diagnosed
/// (the lab removes itself on drop).
pub fn fail(lab: &esptun::lab::demo::TunnelLab, message: &str) -> ! {
    use esptun::lab::demo::Side;
    panic!(
        "{message}\n--- log of a ---\n{}\n--- log of b ---\n{}",
        lab.log_tail(Side::A),
        lab.log_tail(Side::B)
    )
}

/// [`fail`] unless `ok`.
pub fn check(lab: &esptun::lab::demo::TunnelLab, ok: bool, message: impl FnOnce() -> String) {
    if !ok {
        fail(lab, &message());
    }
}

/// An established IKE SA as `status` shows it: (SPIi, SPIr, CHILD SAs as
/// (inbound SPI, outbound SPI)).
pub type Established = (String, String, Vec<(u64, u64)>);

/// The established IKE SA of a side's one peer, once there is one.
pub fn established(s: &serde_json::Value) -> Option<Established> {
    let peer = &s["ike"]["peers"][0];
    let sa = peer["sas"]
        .as_array()?
        .iter()
        .find(|sa| sa["state"] == "established")?;
    let children = sa["children"]
        .as_array()?
        .iter()
        .map(|c| {
            (
                c["inbound_spi"].as_u64().unwrap_or(0),
                c["outbound_spi"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Some((
        sa["spi_i"].as_str()?.to_string(),
        sa["spi_r"].as_str()?.to_string(),
        children,
    ))
}
