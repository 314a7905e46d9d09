//! The qemu guest: its image (built or found in the cache by
//! `build-guest.sh`), its boot, and the shell on its second serial port.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use esptun::lab::Netns;

use crate::common::run_bounded;
use crate::{BOOT_TIMEOUT, BUILD_TIMEOUT, CMD_TIMEOUT};

pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub version: String,
}

/// Runs the (cached) build script.
pub fn build_guest(dir: &Path) -> GuestImage {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/build-guest.sh");
    let started = Instant::now();
    let (status, out, err) = run_bounded(Command::new(&script), dir, "build", BUILD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        status.success(),
        "{} failed ({status}):\n{err}",
        script.display()
    );
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("build-guest.sh printed no {k}=: {out}\n{err}"))
            .to_string()
    };
    let image = GuestImage {
        kernel: field("kernel").into(),
        initrd: field("initrd").into(),
        version: field("kernel_version"),
    };
    eprintln!(
        "guest image: Linux {} ({:.1} s to build or find in the cache)",
        image.version,
        started.elapsed().as_secs_f64()
    );
    image
}

/// The qemu guest: console in a file, commands over the second serial port.
pub struct Guest {
    pub child: Option<Child>,
    pub ctl: UnixStream,
    pub console: PathBuf,
    pub pending: Vec<u8>,
}

impl Guest {
    /// Boots with KVM where `/dev/kvm` can run the guest, else TCG: a KVM
    /// boot that does not reach the shell within [`KVM_BOOT_TIMEOUT`] is
    /// given up, remembered ([`kvm_unusable`]) and done again under TCG.
    pub fn boot(ns: &Netns, image: &GuestImage, dir: &Path) -> Result<Guest, String> {
        if accelerator() == "KVM" {
            match Guest::boot_with(ns, image, dir, "KVM", KVM_BOOT_TIMEOUT) {
                Ok(g) => return Ok(g),
                Err(e) => {
                    let marker = remember_kvm_unusable(&e);
                    eprintln!(
                        "KVM did not boot the guest ({e}); booting under TCG (remembered in {})",
                        marker.display()
                    );
                }
            }
        }
        Guest::boot_with(ns, image, dir, "TCG", BOOT_TIMEOUT)
    }

    fn boot_with(
        ns: &Netns,
        image: &GuestImage,
        dir: &Path,
        accel: &str,
        timeout: Duration,
    ) -> Result<Guest, String> {
        let console = dir.join("console.log");
        let sock = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&sock);
        let qemu_log = File::create(dir.join("qemu.log")).map_err(|e| e.to_string())?;
        let mut cmd = ns.command("qemu-system-x86_64");
        cmd.args(["-machine", "q35"]);
        // One accelerator, so that a KVM that initialises but cannot run
        // the guest is told apart from a slow boot.
        cmd.args(["-accel", if accel == "KVM" { "kvm" } else { "tcg" }]);
        cmd.args([
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "512",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
        ])
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=ctl,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["-serial", "chardev:ctl"])
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        // Without the event index (VIRTIO_RING_F_EVENT_IDX) the guest
        // notifies qemu of every packet unless qemu has notifications
        // turned off while it works through the ring: one lost
        // notification then stalls nothing for longer than the next
        // packet. Under TCG the guest's transmit queue has stopped for
        // good a few times, at CHILD SA rekeys, in a way that a notification
        // lost under the event index would explain (see `nic_stalled`).
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:45:53:50,event_idx=off",
        ])
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().map_err(|e| e.to_string())?)
        .stderr(qemu_log);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
        let deadline = Instant::now() + timeout;
        let ctl = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!(
                            "qemu exited with {status}: {}",
                            std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
                        ));
                    }
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("qemu's control socket never appeared: {e}"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut guest = Guest {
            child: Some(child),
            ctl,
            console,
            pending: Vec::new(),
        };
        let started = Instant::now();
        guest.read_until(|b| find(b, b"@@READY\n").map(|i| i + 8), timeout)?;
        eprintln!(
            "guest booted to its control shell in {:.1} s ({accel})",
            started.elapsed().as_secs_f64()
        );
        Ok(guest)
    }

    /// Reads until `done` finds the end of a message; returns the message.
    pub fn read_until(
        &mut self,
        done: impl Fn(&[u8]) -> Option<usize>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = done(&self.pending) {
                let rest = self.pending.split_off(end);
                return Ok(std::mem::replace(&mut self.pending, rest));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no answer from the guest within {timeout:?}; got so far: {:?}",
                    String::from_utf8_lossy(&self.pending)
                ));
            }
            self.ctl
                .set_read_timeout(Some(left.min(Duration::from_millis(500))))
                .map_err(|e| e.to_string())?;
            match self.ctl.read(&mut buf) {
                Ok(0) => return Err("the guest's control channel closed (qemu exited?)".into()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(format!("reading the control channel: {e}")),
            }
        }
    }

    /// Runs one shell command line in the guest: (exit status, output).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
        assert!(!cmd.contains('\n'), "one line per command: {cmd:?}");
        self.ctl
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| format!("writing to the guest: {e}"))?;
        let msg = self.read_until(
            |b| {
                let start = if b.starts_with(b"@@RC ") {
                    0
                } else {
                    find(b, b"\n@@RC ")? + 1
                };
                let nl = b[start..].iter().position(|&c| c == b'\n')?;
                Some(start + nl + 1)
            },
            timeout,
        )?;
        let text = String::from_utf8_lossy(&msg).into_owned();
        let (output, rc_line) = match text.rfind("@@RC ") {
            Some(i) => (&text[..i], &text[i + 5..]),
            None => return Err(format!("malformed answer {text:?}")),
        };
        let rc = rc_line
            .trim()
            .parse()
            .map_err(|_| format!("bad status in {text:?}"))?;
        Ok((rc, output.to_string()))
    }

    /// Whether the guest's NIC stopped transmitting, and how it shows: the
    /// kernel's transmit watchdog fired (a queue stopped for 5 s), or
    /// frames the guest must send (ARP requests for 198.18.52.3, a
    /// neighbour nobody answers, outside every IPsec policy) leave its
    /// transmit counter where it was. Under TCG, on a loaded machine, the
    /// virtio-net transmit queue has stalled for good a few times in long
    /// streams: nothing left the guest, its TCP counted no
    /// retransmissions, charon's IKE messages never reached the host.
    /// `None` also when the guest does not answer (that is no NIC stall).
    pub fn nic_stalled(&mut self) -> Option<String> {
        const COUNTERS: &str = "cat /sys/class/net/eth0/statistics/tx_packets \
             /sys/class/net/eth0/queues/tx-0/tx_timeout 2>/dev/null";
        let read = |g: &mut Guest| -> Option<(u64, u64)> {
            let (_, out) = g.run(COUNTERS, Duration::from_secs(10)).ok()?;
            let mut n = out.split_whitespace().map(|w| w.parse::<u64>().ok());
            let tx = n.next()??;
            Some((tx, n.next().flatten().unwrap_or(0)))
        };
        let (tx_before, _) = read(self)?;
        // busybox ping: three ARP requests in 3 s, then it gives up.
        let _ = self.run(
            "busybox ping -c 3 -W 1 198.18.52.3 >/dev/null 2>&1; true",
            Duration::from_secs(15),
        );
        let (tx_after, timeouts) = read(self)?;
        if timeouts > 0 {
            Some(format!(
                "its transmit watchdog fired {timeouts} time(s) (NETDEV WATCHDOG: eth0 stopped \
                 for 5 s); tx_packets {tx_before} -> {tx_after}"
            ))
        } else if tx_after == tx_before {
            Some(format!(
                "3 ARP requests left tx_packets at {tx_after}: nothing leaves eth0"
            ))
        } else {
            None
        }
    }

    /// Reads a background command's output file until `key` appears.
    pub fn wait_output(
        &mut self,
        name: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, out) = self.run(&format!("cat /tmp/out/{name} 2>/dev/null"), CMD_TIMEOUT)?;
            if out.contains(key) {
                return Ok(out);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "guest's {name} did not print {key:?} within {timeout:?}: {out:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts `cmd` in the background, output to /tmp/out/NAME.
    pub fn spawn(&mut self, name: &str, cmd: &str) -> Result<(), String> {
        let (rc, out) = self.run(
            &format!("rm -f /tmp/out/{name}; {cmd} > /tmp/out/{name} 2>&1 &"),
            CMD_TIMEOUT,
        )?;
        if rc != 0 {
            return Err(format!("starting {cmd} in the guest: {rc} {out}"));
        }
        Ok(())
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// What a failure needs: console tail, xfrm state and counters.
    pub fn diagnostics(&mut self) -> String {
        let mut s = String::new();
        let console = self.console();
        let tail: Vec<&str> = console.lines().rev().take(60).collect();
        let _ = writeln!(s, "--- guest console (last 60 lines) ---");
        for l in tail.iter().rev() {
            let _ = writeln!(s, "{l}");
        }
        for cmd in [
            "cat /proc/net/xfrm_stat",
            "/sbin/ip -s xfrm state",
            "/sbin/ip xfrm policy",
            "grep -E '^(Udp|Tcp):' /proc/net/snmp",
            "grep -E '^(Udp6|Icmp6In)' /proc/net/snmp6",
            "/sbin/ip -s link show eth0",
            // A stalled virtio-net transmit queue (seen once under TCG:
            // nothing left the guest, RetransSegs stayed 0) shows here as
            // a NETDEV WATCHDOG line.
            "busybox dmesg | tail -n 15",
            "tail -n 5 /tmp/out/*",
        ] {
            let _ = writeln!(s, "--- guest: {cmd} ---");
            match self.run(cmd, Duration::from_secs(10)) {
                Ok((_, out)) => s.push_str(&out),
                Err(e) => {
                    let _ = writeln!(s, "(failed: {e})");
                }
            }
        }
        s
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `ip netns exec` execs qemu: the pid is qemu's own.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How long a KVM boot may take before KVM is taken for unusable here
/// (under KVM the guest reaches its shell in a second or two).
const KVM_BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// "KVM" when `/dev/kvm` opens read-write and KVM has not failed to boot
/// the guest on this machine before ([`kvm_unusable`]), else "TCG".
/// `ESPTUN_GUEST_KVM=0` forces TCG, `=1` tries KVM despite a remembered
/// failure. Some machines' /dev/kvm opens but cannot run the guest
/// (nested virtualisation without its support): qemu starts and the guest
/// never prints a byte; [`Guest::boot`] then falls back to TCG.
pub fn accelerator() -> &'static str {
    let forced = std::env::var("ESPTUN_GUEST_KVM").ok();
    if forced.as_deref() == Some("0") {
        return "TCG";
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm && (forced.as_deref() == Some("1") || !kvm_unusable()) {
        "KVM"
    } else {
        "TCG"
    }
}

/// Where a failed KVM boot is remembered: beside the guest image cache
/// (`ESPTUN_INTEROP_CACHE`, default /var/cache/esptun-interop), so that
/// later test binaries and runs go straight to TCG. Delete it to try KVM
/// again.
fn kvm_marker() -> PathBuf {
    std::env::var_os("ESPTUN_INTEROP_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/esptun-interop"), PathBuf::from)
        .join("kvm-unusable")
}

fn kvm_unusable() -> bool {
    kvm_marker().exists()
}

fn remember_kvm_unusable(why: &str) -> PathBuf {
    let marker = kvm_marker();
    if let Some(parent) = marker.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(
        &marker,
        format!("KVM did not boot the interop guest within {KVM_BOOT_TIMEOUT:?}: {why}\n"),
    );
    marker
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
