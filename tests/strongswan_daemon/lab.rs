//! The lab: one guest with charon, the namespace it is attached to, and
//! `esptun run` keyed by `[peer.ike]` on the host side; the swanctl and
//! esptun configurations of a case; the failure report.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use esptun::lab::{self, Netns};

use crate::guest::{Guest, build_guest};
use crate::{CMD_TIMEOUT, READY_TIMEOUT};

pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 52, 1);
pub const GUEST: Ipv4Addr = Ipv4Addr::new(198, 18, 52, 2);
/// The same ends over IPv6 (`nodad`: usable at once).
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x52, 0, 0, 0, 0, 1);
pub const GUEST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x52, 0, 0, 0, 0, 2);

/// (host, guest): the IPv4 or the IPv6 addresses of the two ends.
pub fn addrs(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        (IpAddr::V6(HOST6), IpAddr::V6(GUEST6))
    } else {
        (IpAddr::V4(HOST), IpAddr::V4(GUEST))
    }
}

/// charon's side of a case: one connection `esptun` with one CHILD SA
/// `host` in transport mode.
#[derive(Debug, Clone)]
pub struct Swan {
    pub ike: &'static str,
    pub esp: &'static str,
    pub psk: String,
    /// The identity charon expects of esptun (default: its address).
    pub remote_id: Option<&'static str>,
    /// charon's local/remote traffic selectors (default: the addresses).
    pub ts: Option<(&'static str, &'static str)>,
    /// (IKE, CHILD) rekey_time in seconds; 0 disables. The CHILD SA's
    /// without jitter (`rand_time = 0s`), for simultaneous rekeys.
    pub rekey: (u32, u32),
    pub dpd_delay: u32,
    pub encap: bool,
    /// Addresses (and so default identities) over IPv6.
    pub v6: bool,
}

impl Swan {
    pub fn new(ike: &'static str, esp: &'static str, psk: &str) -> Swan {
        Swan {
            ike,
            esp,
            psk: psk.to_string(),
            remote_id: None,
            ts: None,
            rekey: (0, 0),
            dpd_delay: 0,
            encap: false,
            v6: false,
        }
    }

    /// The lines of swanctl.conf. `start_action = none`: charon
    /// initiates only when told (`swanctl --initiate`). charon's default
    /// replay window (32) stays: esptun must send in sequence order (a
    /// packet over 32 places late is, with ESN, an integrity failure for
    /// the kernel, XfrmInStateProtoError, which the cases check is 0).
    pub fn conf(&self) -> Vec<String> {
        let ts = match self.ts {
            Some((l, r)) => format!("        local_ts = {l}\n        remote_ts = {r}\n"),
            None => String::new(),
        };
        let (host, guest) = addrs(self.v6);
        let text = format!(
            "connections {{
  esptun {{
    version = 2
    local_addrs = {guest}
    remote_addrs = {host}
    proposals = {ike}
    rekey_time = {ike_rekey}s
    dpd_delay = {dpd}s
    encap = {encap}
    local {{
      auth = psk
      id = {guest}
    }}
    remote {{
      auth = psk
      id = {remote_id}
    }}
    children {{
      host {{
        mode = transport
        esp_proposals = {esp}
{ts}        start_action = none
        rekey_time = {child_rekey}s
        rand_time = 0s
        dpd_action = clear
      }}
    }}
  }}
}}
secrets {{
  ike-esptun {{
    id-host = {remote_id}
    secret = {psk}
  }}
}}",
            ike = self.ike,
            esp = self.esp,
            ike_rekey = self.rekey.0,
            child_rekey = self.rekey.1,
            dpd = self.dpd_delay,
            encap = if self.encap { "yes" } else { "no" },
            remote_id = match self.remote_id {
                Some(id) => id.to_string(),
                None => host.to_string(),
            },
            psk = self.psk,
        );
        text.lines().map(str::to_string).collect()
    }
}

/// esptun's side of a case: its `[peer.ike]`.
#[derive(Debug, Clone)]
pub struct Side {
    pub initiate: bool,
    pub ike: &'static str,
    pub esp: &'static str,
    pub psk: String,
    pub local_id: Option<&'static str>,
    pub remote_id: Option<&'static str>,
    /// `outer = "udp"` (NAT-T) instead of raw ESP.
    pub natt: bool,
    pub rekey_secs: Option<(u64, u64)>,
    pub liveness_secs: Option<u64>,
    /// `local` and `endpoint` (and so the default identities) over IPv6.
    pub v6: bool,
}

impl Side {
    pub fn new(initiate: bool, ike: &'static str, esp: &'static str, psk: &str) -> Side {
        Side {
            initiate,
            ike,
            esp,
            psk: psk.to_string(),
            local_id: None,
            remote_id: None,
            natt: false,
            rekey_secs: None,
            liveness_secs: None,
            v6: false,
        }
    }
}

/// A random PSK as text (hex: never swanctl's `0x`/`0s` prefixes).
pub fn random_psk() -> String {
    use esptun::ike::crypto::Randomness as _;
    let mut b = [0u8; 24];
    esptun::ike::crypto::SystemRandomness::new()
        .fill(&mut b)
        .expect("randomness");
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Fields drop in order: esptun, the guest (qemu), then the files.
pub struct Lab {
    pub esptun: Option<Child>,
    pub guest: Option<Guest>,
    pub ns: Netns,
    pub dir: PathBuf,
    /// The current case's directory (esptun's config, log, socket).
    pub case: PathBuf,
    pub cases: usize,
    pub test: String,
    /// The current case runs over IPv6 (set by [`Lab::load_swan`] and
    /// [`Lab::restart_esptun`]): the workload's addresses.
    pub v6: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_esptun();
        drop(self.guest.take());
        if std::env::var_os("ESPTUN_SWAN_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Lab {
    /// Boots the guest and starts charon; `None` when the test skips.
    pub fn boot(test: &str) -> Option<Lab> {
        if !crate::common::require_root(test, "network namespace, TAP device, qemu guest") {
            return None;
        }
        if !crate::in_path("qemu-system-x86_64") {
            crate::common::skip_unless_required(
                test,
                "ESPTUN_REQUIRE_NETNS",
                "qemu-system-x86_64 missing",
            );
            return None;
        }
        let prefix = lab::unique_prefix("swd");
        let dir = std::env::temp_dir().join(format!("esptun-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let image = build_guest(&dir);
        let ns = Netns::create(&format!("{prefix}h")).expect("namespace");
        for args in [
            vec!["tuntap", "add", "mode", "tap", "name", "tap0"],
            vec!["addr", "add", "198.18.52.1/24", "dev", "tap0"],
            vec!["addr", "add", "2001:db8:52::1/64", "dev", "tap0", "nodad"],
            vec!["link", "set", "tap0", "up"],
        ] {
            ns.ip(&args).expect("TAP in the namespace");
        }
        let t = Instant::now();
        let guest = Guest::boot(&ns, &image, &dir).unwrap_or_else(|e| {
            let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            panic!("{test}: booting the guest: {e}\n--- console ---\n{console}")
        });
        eprintln!(
            "{test}: guest Linux {} booted in {:.1} s",
            image.version,
            t.elapsed().as_secs_f64()
        );
        let mut lab = Lab {
            esptun: None,
            guest: Some(guest),
            case: dir.clone(),
            ns,
            dir,
            cases: 0,
            test: test.to_string(),
            v6: false,
        };
        if let Err(e) = lab.start_charon() {
            lab.fail(&format!("starting charon in the guest: {e}"));
        }
        Some(lab)
    }

    /// (host, guest) addresses of the current case.
    pub fn addrs(&self) -> (IpAddr, IpAddr) {
        addrs(self.v6)
    }

    pub fn guest(&mut self) -> &mut Guest {
        self.guest
            .as_mut()
            .expect("the guest runs until the lab drops")
    }

    pub fn sh(&mut self, cmd: &str) -> Result<String, String> {
        let (rc, out) = self.guest().run(cmd, CMD_TIMEOUT)?;
        if rc != 0 {
            return Err(format!("guest: `{cmd}` failed ({rc}): {out}"));
        }
        Ok(out)
    }

    fn start_charon(&mut self) -> Result<(), String> {
        self.sh(
            "/sbin/ip link set eth0 up && /sbin/ip addr add 198.18.52.2/24 dev eth0 && \
             /sbin/ip -6 addr add 2001:db8:52::2/64 dev eth0 nodad",
        )?;
        // The plain path of both families first, so a failure later is
        // about IKE.
        for guest in [IpAddr::V4(GUEST), IpAddr::V6(GUEST6)] {
            let p = lab::ping(&self.ns, guest, 3, Duration::from_secs(30))
                .map_err(|e| e.to_string())?;
            if p.received == 0 {
                return Err(format!(
                    "the guest does not answer plain ping {guest}: {p:?}"
                ));
            }
        }
        self.spawn_charon()
    }

    /// (Re)starts charon, without configuration.
    pub fn spawn_charon(&mut self) -> Result<(), String> {
        self.guest().spawn("charon", "/usr/lib/ipsec/charon")?;
        let started = Instant::now();
        loop {
            let (rc, out) = self.guest().run("/usr/sbin/swanctl --stats", CMD_TIMEOUT)?;
            if rc == 0 {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!("charon's vici socket not up: {out}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Replaces swanctl.conf and loads it (connections not in it go), and
    /// closes every SA charon has.
    pub fn load_swan(&mut self, swan: &Swan) -> Result<(), String> {
        self.cases += 1;
        self.v6 = swan.v6;
        let _ = self.guest().run(
            "/usr/sbin/swanctl --terminate --ike esptun --force",
            CMD_TIMEOUT,
        );
        self.sh("rm -f /etc/swanctl/swanctl.conf")?;
        for chunk in swan.conf().chunks(8) {
            let args: Vec<String> = chunk.iter().map(|l| format!("'{l}'")).collect();
            self.sh(&format!(
                "printf '%s\\n' {} >> /etc/swanctl/swanctl.conf",
                args.join(" ")
            ))?;
        }
        let out = self.sh("/usr/sbin/swanctl --load-all --clear")?;
        if !out.contains("loaded connection 'esptun'") || !out.contains("loaded ike secret") {
            return Err(format!("swanctl --load-all: {out}"));
        }
        // A marker: this case's part of charon's log starts here.
        self.sh(&format!(
            "echo '=== case {} ===' >> /tmp/charon.log",
            self.cases
        ))?;
        Ok(())
    }

    /// Writes this case's esptun configuration and starts `esptun run`
    /// (after [`Lab::load_swan`], which numbers the case).
    pub fn start_esptun(&mut self, side: &Side) -> Result<(), String> {
        self.stop_esptun();
        self.case = self.dir.join(format!("case{}", self.cases));
        std::fs::create_dir_all(&self.case).map_err(|e| e.to_string())?;
        self.restart_esptun(side)
    }

    /// Starts `esptun run` in the current case's directory (a restart
    /// keeps its log: appended).
    pub fn restart_esptun(&mut self, side: &Side) -> Result<(), String> {
        self.stop_esptun();
        self.v6 = side.v6;
        let (host, guest) = self.addrs();
        let psk = self.case.join("peer.psk");
        let _ = std::fs::remove_file(&psk);
        write_private(&psk, side.psk.as_bytes())?;
        let state = self.case.join("state");
        let sock = self.case.join("esptun.sock");
        let mut ike = format!(
            "psk_file = \"{}\"\ninitiate = {}\nike_proposals = [\"{}\"]\nesp_proposals = [\"{}\"]\n",
            psk.display(),
            side.initiate,
            side.ike,
            side.esp
        );
        if let Some(id) = side.local_id {
            let _ = writeln!(ike, "local_id = \"{id}\"");
        }
        if let Some(id) = side.remote_id {
            let _ = writeln!(ike, "remote_id = \"{id}\"");
        }
        if let Some((i, c)) = side.rekey_secs {
            let _ = writeln!(ike, "ike_rekey_secs = {i}\nchild_rekey_secs = {c}");
        }
        if let Some(l) = side.liveness_secs {
            let _ = writeln!(ike, "liveness_secs = {l}");
        }
        let text = format!(
            "# esptun keyed by IKEv2 against charon in the guest.\n\
             interface = \"esptun0\"\n\
             outer = \"{outer}\"\n\
             state_dir = \"{state}\"\n\
             control_socket = \"{control}\"\n\
             \n\
             [[peer]]\n\
             name = \"charon\"\n\
             local = \"{host}\"\n\
             endpoint = \"{guest}\"\n\
             \n\
             [peer.ike]\n{ike}",
            outer = if side.natt { "udp" } else { "esp" },
            state = state.display(),
            control = sock.display(),
        );
        std::fs::write(self.config(), text).map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.case.join("esptun.log"))
            .map_err(|e| e.to_string())?;
        let child = self
            .ns
            .command(env!("CARGO_BIN_EXE_esptun"))
            .args(["run", "--log-level", "debug", "-c"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting esptun: {e}"))?;
        self.esptun = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while esptun::daemon::control::query(&sock, "status").is_err() {
            if let Some(Ok(Some(status))) = self.esptun.as_mut().map(Child::try_wait) {
                self.esptun = None;
                return Err(format!("esptun exited with {status}"));
            }
            if Instant::now() >= deadline {
                return Err("esptun's control socket not up".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// charon initiates the CHILD SA `host` (and the IKE SA with it) and
    /// reports it complete.
    pub fn charon_initiates(&mut self) -> Result<(), String> {
        self.guest().spawn(
            "initiate",
            "/usr/sbin/swanctl --initiate --child host --timeout 80",
        )?;
        self.guest().wait_output(
            "initiate",
            "initiate completed successfully",
            crate::IKE_TIMEOUT,
        )?;
        Ok(())
    }

    pub fn config(&self) -> PathBuf {
        self.case.join("esptun.toml")
    }

    /// SIGTERM, then (bounded) SIGKILL.
    pub fn stop_esptun(&mut self) {
        if let Some(mut child) = self.esptun.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // Our own child, not yet reaped; a failure means it is gone.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if crate::common::wait_bounded(&mut child, Duration::from_secs(10)).is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    pub fn status(&self) -> Result<serde_json::Value, String> {
        let sock = self.case.join("esptun.sock");
        let reply = esptun::daemon::control::query(&sock, "status").map_err(|e| e.to_string())?;
        serde_json::from_str(&reply).map_err(|e| e.to_string())
    }

    pub fn esptun_log(&self) -> String {
        std::fs::read_to_string(self.case.join("esptun.log")).unwrap_or_default()
    }

    /// charon's log since this case's marker.
    pub fn charon_case_log(&mut self) -> String {
        let marker = format!("=== case {} ===", self.cases);
        let cmd = format!("sed -n '/^{marker}$/,$p' /tmp/charon.log | tail -c 30000; echo");
        match self.guest().run(&cmd, Duration::from_secs(30)) {
            Ok((_, out)) => out,
            Err(e) => format!("(cannot read /tmp/charon.log: {e})"),
        }
    }

    /// Everything a failure needs: charon's log, its SAs, the kernel's,
    /// the guest console (in the diagnostics), esptun's log and status.
    /// A short summary comes first: a CI log keeps the head of a long
    /// failure and its last lines, and drops the middle.
    pub fn report(&mut self) -> String {
        let mut s = self.summary();
        let charon = self.charon_case_log();
        let _ = writeln!(s, "--- charon's log (this case) ---\n{charon}");
        for cmd in ["/usr/sbin/swanctl --list-sas", "/sbin/ip xfrm state"] {
            let out = match self.guest().run(cmd, Duration::from_secs(20)) {
                Ok((_, out)) => out,
                Err(e) => format!("(failed: {e})"),
            };
            let _ = writeln!(s, "--- guest: {cmd} ---\n{out}");
        }
        let diag = self.guest().diagnostics();
        s.push_str(&diag);
        // The host's end of the guest's link: whether the guest's frames
        // still arrive.
        let tap = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns.name(),
                "ip",
                "-s",
                "link",
                "show",
                "tap0",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(failed: {e})"));
        let _ = writeln!(s, "--- host: ip -s link show tap0 ---\n{tap}");
        let status = match self.status() {
            Ok(v) => format!("{v:#}"),
            Err(e) => format!("(no status: {e})"),
        };
        let log = self.esptun_log();
        let tail: Vec<&str> = log.lines().rev().take(200).collect();
        let _ = writeln!(s, "--- esptun status ---\n{status}");
        let _ = writeln!(s, "--- esptun's log (last 200 lines) ---");
        for l in tail.iter().rev() {
            let _ = writeln!(s, "{l}");
        }
        s
    }

    /// At most about 70 lines: esptun's last INFO-and-above lines, both
    /// ends of the guest's link (whether frames still move, a stalled
    /// virtio-net queue), the guest's ESP SAs and charon's last lines.
    fn summary(&mut self) -> String {
        let mut s = String::from("--- summary (the full report follows) ---\n");
        let log = self.esptun_log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
            .collect();
        let _ = writeln!(s, "esptun's log, INFO and above (last 25 lines):");
        for l in &lines[lines.len().saturating_sub(25)..] {
            let _ = writeln!(s, "  {l}");
        }
        let tap = self
            .ns
            .command("ip")
            .args(["-s", "link", "show", "tap0"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(failed: {e})"));
        let _ = writeln!(s, "host tap0 (its RX is what the guest sent):\n{tap}");
        for (what, cmd) in [
            ("guest eth0", "/sbin/ip -s link show eth0"),
            (
                "guest kernel: watchdog and virtio lines",
                "busybox dmesg | grep -iE 'watchdog|timed out|virtio|oom|soft lockup' | tail -n 4",
            ),
            ("guest TCP counters", "grep -E '^Tcp:' /proc/net/snmp"),
            (
                "guest ESP SAs",
                "/sbin/ip xfrm state | grep -E '^src|proto esp'",
            ),
            ("charon's last lines", "tail -n 20 /tmp/charon.log"),
        ] {
            let out = match self.guest().run(cmd, Duration::from_secs(10)) {
                Ok((_, out)) => out,
                Err(e) => format!("(failed: {e})\n"),
            };
            let _ = write!(s, "{what}:\n{out}");
        }
        s.push_str("--- end of summary ---\n");
        s
    }

    /// Fails the test with the report; raises [`GuestNicStalled`] instead
    /// when the guest's NIC stopped transmitting (see
    /// [`Guest::nic_stalled`]), which [`crate::retry_after_guest_stall`]
    /// runs again on a fresh guest (at most three attempts in all).
    pub fn fail(&mut self, what: &str) -> ! {
        let stalled = self.guest().nic_stalled();
        let report = self.report();
        let verdict = match &stalled {
            Some(how) => format!("the guest's NIC stalled: {how}"),
            None => "the guest's NIC transmits".to_string(),
        };
        let msg = format!("{}: {what}\n{verdict}\n{report}", self.test);
        if stalled.is_some() {
            eprintln!("{msg}");
            std::panic::panic_any(GuestNicStalled(msg));
        }
        panic!("{msg}")
    }
}

/// A failure during which the guest's NIC had stopped transmitting: the
/// emulated machine's fault, not esptun's or charon's.
pub struct GuestNicStalled(pub String);

/// A file only its owner reads (the PSK rules of `[peer.ike]`).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes).map_err(|e| e.to_string())
}
