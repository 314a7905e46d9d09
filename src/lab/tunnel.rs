//! A two-host tunnel on one machine, [`TunnelLab`]: the harness of
//! `esptun demo` ([`super::demo`]) and of the end-to-end tests.
//!
//! Two network namespaces joined by veth ([`crate::lab::TwoHosts`]), fresh
//! keys, and a real `esptun run` process in each namespace, driven through
//! their control sockets. Everything lives in one temporary directory and
//! the two namespaces, and is removed on drop, or by the demo's signal
//! handling on Ctrl-C.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal as NixSignal, kill};
use nix::unistd::Pid;

use crate::crypto::select::Mode;
use crate::daemon::control;
use crate::lab::{self, LabError, Netns, TwoHosts};
use crate::wire::outer::Encap;

mod files;

/// How long an endpoint may take from spawn to answering `status` (boot
/// self-tests included, in a debug build on a loaded machine).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Where lab endpoints serve metrics, each on its own namespace's loopback.
pub const METRICS_ADDR: &str = "127.0.0.1:9150";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Lab(#[from] LabError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("endpoint {side} did not come up: {why}\n--- its log ---\n{log}")]
    NotReady {
        side: &'static str,
        why: String,
        log: String,
    },
    #[error("{0}")]
    Other(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// Which of the two endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// The shape of the tunnel.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// A few letters for namespace names.
    pub tag: String,
    /// Third octet of 198.18.X.0/24 (and 2001:db8:X::/64).
    pub subnet: u8,
    /// NAT-T (UDP, port 4500 in the lab) or raw ESP.
    pub encap: Encap,
    /// IPv6 inside and outside.
    pub ipv6: bool,
    /// Inner addresses of their own (198.19.X.1/2) rather than the outer
    /// ones (classic transport mode).
    pub overlay: bool,
    pub crypto: Mode,
    pub key_bits: u32,
    pub icv: u8,
    pub selftest_interval_secs: u64,
    pub rekey_switch_secs: u64,
    pub rekey_retire_secs: u64,
    /// Serve metrics on 127.0.0.1:9150 inside each namespace.
    pub metrics: bool,
    /// Capture inner-checksum drops to `<dir>/<side>-drops.pcap`.
    pub drop_capture: bool,
    /// Turn every `[offloads]` switch off (the default leaves them auto).
    pub offloads_off: bool,
    /// A router between the hosts whose link to b has this MTU
    /// ([`TwoHosts::create_routed`]); `None` (the default): a and b share
    /// one veth pair.
    pub router_mtu: Option<u16>,
    /// Extra lines for the `[inner]` table, e.g. `clamp_mss = "off"`.
    pub inner_extra: String,
    /// Key the tunnel by IKE (`[peer.ike]`) instead of by hand.
    pub ike: Option<LabIke>,
    /// Extra lines for `[peer.ike]`, e.g. `child_rekey_secs = 3`.
    pub ike_extra: String,
    /// With `router_mtu` (IPv4): the router masquerades a's packets to b
    /// behind its own address (nftables SNAT, table `ip esptun_nat`), so
    /// a is behind a NAT; b's peer endpoint is the router's address.
    pub nat: bool,
}

/// IKE in the lab: which side initiates, and whether the two PSKs differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabIke {
    pub initiator: Side,
    /// Give b a PSK other than a's: IKE_AUTH must fail.
    pub wrong_psk: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            tag: "lab".into(),
            subnet: 0,
            encap: Encap::NATT,
            ipv6: false,
            overlay: false,
            crypto: Mode::Auto,
            key_bits: 256,
            icv: 16,
            selftest_interval_secs: 60,
            rekey_switch_secs: 30,
            rekey_retire_secs: 120,
            metrics: false,
            drop_capture: false,
            offloads_off: false,
            router_mtu: None,
            inner_extra: String::new(),
            ike: None,
            ike_extra: String::new(),
            nat: false,
        }
    }
}

/// One `esptun run` in one namespace.
#[derive(Debug)]
pub struct Endpoint {
    pub config: PathBuf,
    pub control: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// Behind a lock so that a test can kill or restart an endpoint while
    /// traffic runs through the lab on another thread.
    child: Mutex<Option<Child>>,
}

/// Processes and namespaces to clean up from a signal handler thread.
#[derive(Debug, Default)]
pub struct Cleanup {
    pids: Vec<u32>,
    namespaces: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Cleanup {
    /// Stops the endpoints and removes the namespaces and files (for when
    /// the owner cannot run its destructors: Ctrl-C).
    pub fn run(&mut self) {
        for pid in self.pids.drain(..) {
            terminate(pid);
        }
        for ns in self.namespaces.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        for dir in self.dirs.drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // A pid we spawned and have not reaped; at worst kill(2) fails with
    // ESRCH, and there is nothing to do about that here.
    let _ = kill(Pid::from_raw(pid), NixSignal::SIGTERM);
}

/// Two hosts, each running esptun, with a tunnel between them.
pub struct TunnelLab {
    pub hosts: TwoHosts,
    pub dir: PathBuf,
    pub a: Endpoint,
    pub b: Endpoint,
    /// Tunnel (inner) addresses: what traffic through the tunnel uses.
    pub a_inner: IpAddr,
    pub b_inner: IpAddr,
    pub options: LabOptions,
    exe: PathBuf,
    cleanup: Arc<Mutex<Cleanup>>,
}

impl TunnelLab {
    /// Builds the namespaces, keys and configurations; starts nothing.
    pub fn create(exe: &Path, options: LabOptions) -> Result<TunnelLab, DemoError> {
        Self::create_with_cleanup(exe, options, Arc::default())
    }

    /// [`Self::create`], recording what it makes in `cleanup` (which a
    /// signal-handling thread may hold) as soon as it exists.
    pub fn create_with_cleanup(
        exe: &Path,
        options: LabOptions,
        cleanup: Arc<Mutex<Cleanup>>,
    ) -> Result<TunnelLab, DemoError> {
        let hosts = match options.router_mtu {
            None => TwoHosts::create(&options.tag, options.subnet)?,
            Some(mtu) => TwoHosts::create_routed(&options.tag, options.subnet, mtu)?,
        };
        if options.nat {
            nat_router(&hosts, options.subnet)?;
        }
        let dir = std::env::temp_dir().join(format!("esptun-{}", hosts.a.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        {
            let mut c = cleanup.lock().unwrap_or_else(|p| p.into_inner());
            c.namespaces
                .extend([hosts.a.name().to_string(), hosts.b.name().to_string()]);
            c.namespaces
                .extend(hosts.router.iter().map(|r| r.name().to_string()));
            c.dirs.push(dir.clone());
        }
        let (a_outer, b_outer): (IpAddr, IpAddr) = if options.ipv6 {
            (hosts.a_v6.into(), hosts.b_v6.into())
        } else {
            (hosts.a_v4.into(), hosts.b_v4.into())
        };
        let (a_inner, b_inner): (IpAddr, IpAddr) = match (options.overlay, options.ipv6) {
            (false, _) => (a_outer, b_outer),
            (true, false) => (
                Ipv4Addr::new(198, 19, options.subnet, 1).into(),
                Ipv4Addr::new(198, 19, options.subnet, 2).into(),
            ),
            (true, true) => (
                Ipv6Addr::new(0x2001, 0xdb8, 0xffff, u16::from(options.subnet), 0, 0, 0, 1).into(),
                Ipv6Addr::new(0x2001, 0xdb8, 0xffff, u16::from(options.subnet), 0, 0, 0, 2).into(),
            ),
        };
        let endpoint = |side: &str| Endpoint {
            config: dir.join(format!("{side}.toml")),
            control: dir.join(format!("{side}.sock")),
            state_dir: dir.join(format!("state-{side}")),
            log: dir.join(format!("{side}.log")),
            child: Mutex::new(None),
        };
        let lab = TunnelLab {
            a: endpoint("a"),
            b: endpoint("b"),
            hosts,
            dir,
            a_inner,
            b_inner,
            options,
            exe: exe.to_path_buf(),
            cleanup,
        };
        lab.write_keys()?;
        lab.write_psks()?;
        lab.write_config(Side::A, a_outer, b_outer)?;
        // Behind the NAT, a reaches b from the router's address.
        let a_seen = if lab.options.nat {
            Ipv4Addr::new(198, 18, lab.options.subnet, 254).into()
        } else {
            a_outer
        };
        lab.write_config(Side::B, b_outer, a_seen)?;
        Ok(lab)
    }

    /// Runs an nftables script in the router's namespace (with `nat`:
    /// to change the NAT's mapping).
    pub fn router_nft(&self, script: &str) -> Result<(), DemoError> {
        let router = self
            .hosts
            .router
            .as_ref()
            .ok_or_else(|| DemoError::Lab(LabError::Invalid("no router in this lab".into())))?;
        nft(router, script).map_err(DemoError::Lab)
    }

    pub fn endpoint(&self, side: Side) -> &Endpoint {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn child(&self, side: Side) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.endpoint(side)
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches a side's Prometheus metrics (with `metrics`).
    pub fn metrics(&self, side: Side) -> Result<String, DemoError> {
        let ns = match side {
            Side::A => &self.hosts.a,
            Side::B => &self.hosts.b,
        };
        let reply = ns
            .run(|| -> std::io::Result<String> {
                use std::io::Write;
                let mut s = std::net::TcpStream::connect(METRICS_ADDR)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: esptun\r\n\r\n")?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                Ok(reply)
            })?
            .map_err(io_err("scraping metrics"))?;
        match reply.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(DemoError::Other(format!("metrics reply: {reply}"))),
        }
    }

    /// The outer addresses of a side and its peer.
    pub fn outer(&self, side: Side) -> (IpAddr, IpAddr) {
        let (a, b): (IpAddr, IpAddr) = if self.options.ipv6 {
            (self.hosts.a_v6.into(), self.hosts.b_v6.into())
        } else {
            (self.hosts.a_v4.into(), self.hosts.b_v4.into())
        };
        match side {
            Side::A => (a, b),
            Side::B => (b, a),
        }
    }

    /// Starts `esptun run` for `side` in its namespace (with extra
    /// environment) and waits until it answers `status`.
    pub fn start(&self, side: Side, env: &[(&str, &str)]) -> Result<(), DemoError> {
        self.spawn(side, env)?;
        self.wait_ready(side)
    }

    /// Starts `side` as the lab's faulty endpoint (`esptun demo-endpoint`):
    /// once its boot self-tests have passed, its hardware provider corrupts
    /// one 16-byte plaintext block of a share `rate` of its seals, as the
    /// field failure did ([`crate::crypto::fault`]). Waits until it answers
    /// `status`.
    pub fn start_faulty(&self, side: Side, rate: f64, seed: u64) -> Result<(), DemoError> {
        self.spawn_with(side, &[], &[], Some((rate, seed)))?;
        self.wait_ready(side)
    }

    /// A reaped child's pid may be reused: Ctrl-C cleanup must not signal it.
    fn forget_pid(&self, pid: u32) {
        self.cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pids
            .retain(|p| *p != pid);
    }

    /// Starts `esptun run` for `side` without waiting.
    pub fn spawn(&self, side: Side, env: &[(&str, &str)]) -> Result<(), DemoError> {
        self.spawn_with(side, env, &[], None)
    }

    /// [`Self::spawn`] under a wrapper command, e.g. `setpriv` to run the
    /// daemon as another user with only some capabilities: the wrapper's
    /// program and arguments come before the esptun binary.
    pub fn spawn_under(
        &self,
        side: Side,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Result<(), DemoError> {
        self.spawn_with(side, env, wrapper, None)
    }

    /// Starts the endpoint, under `wrapper` if any; with `fault`, as the
    /// lab-only `demo-endpoint` whose hardware provider corrupts blocks.
    fn spawn_with(
        &self,
        side: Side,
        env: &[(&str, &str)],
        wrapper: &[&str],
        fault: Option<(f64, u64)>,
    ) -> Result<(), DemoError> {
        let ns = match side {
            Side::A => &self.hosts.a,
            Side::B => &self.hosts.b,
        };
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = ns.command(program);
                cmd.args(args).arg(&self.exe);
                cmd
            }
            None => ns.command(&self.exe),
        };
        let ep = self.endpoint(side);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&ep.log)
            .map_err(io_err(format!("opening {}", ep.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicating the log file"))?;
        match fault {
            None => cmd.arg("run"),
            Some((rate, seed)) => cmd.args([
                "demo-endpoint",
                "--fault-rate",
                &rate.to_string(),
                "--fault-seed",
                &seed.to_string(),
            ]),
        };
        cmd.args(["--log-level", "debug", "-c"])
            .arg(&ep.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", self.exe.display())))?;
        self.cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pids
            .push(child.id());
        *self.child(side) = Some(child);
        Ok(())
    }

    /// Waits until `side` answers `status`, or its process exits.
    pub fn wait_ready(&self, side: Side) -> Result<(), DemoError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if control::query(&self.endpoint(side).control, "status").is_ok() {
                return Ok(());
            }
            if let Some(status) = self.try_exit(side) {
                return Err(DemoError::NotReady {
                    side: side.name(),
                    why: format!("esptun run exited with {status}"),
                    log: self.log_tail(side),
                });
            }
            if Instant::now() >= deadline {
                return Err(DemoError::NotReady {
                    side: side.name(),
                    why: format!("no answer on its control socket within {READY_TIMEOUT:?}"),
                    log: self.log_tail(side),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&self, side: Side) -> Option<ExitStatus> {
        self.child(side).as_mut()?.try_wait().ok().flatten()
    }

    /// SIGTERM, then waits (SIGKILL after a timeout); the exit status.
    pub fn stop(&self, side: Side) -> Result<ExitStatus, DemoError> {
        let Some(mut child) = self.child(side).take() else {
            return Err(DemoError::Other(format!(
                "endpoint {} is not running",
                side.name()
            )));
        };
        self.forget_pid(child.id());
        terminate(child.id());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(io_err("waiting for esptun"))? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait().map_err(io_err("waiting for esptun"))?;
                return Err(DemoError::Other(format!(
                    "endpoint {} did not stop within {STOP_TIMEOUT:?} of SIGTERM (killed: {status})",
                    side.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: no cleanup, no final writes.
    pub fn kill9(&self, side: Side) -> Result<ExitStatus, DemoError> {
        let Some(mut child) = self.child(side).take() else {
            return Err(DemoError::Other(format!(
                "endpoint {} is not running",
                side.name()
            )));
        };
        self.forget_pid(child.id());
        child.kill().map_err(io_err("kill -9"))?;
        child.wait().map_err(io_err("waiting for esptun"))
    }

    /// Sends SIGHUP: reload SAs from the (rewritten) configuration.
    pub fn reload(&self, side: Side) -> Result<(), DemoError> {
        let pid =
            self.child(side).as_ref().map(Child::id).ok_or_else(|| {
                DemoError::Other(format!("endpoint {} is not running", side.name()))
            })?;
        let pid = libc::pid_t::try_from(pid).map_err(|e| DemoError::Other(e.to_string()))?;
        // A child we spawned and have not reaped.
        kill(Pid::from_raw(pid), NixSignal::SIGHUP).map_err(|errno| DemoError::Io {
            what: "sending SIGHUP".into(),
            source: errno.into(),
        })
    }

    /// The daemon's status JSON.
    pub fn status(&self, side: Side) -> Result<serde_json::Value, DemoError> {
        let reply = control::query(&self.endpoint(side).control, "status")
            .map_err(|e| DemoError::Other(e.to_string()))?;
        serde_json::from_str(&reply)
            .map_err(|e| DemoError::Other(format!("status is not JSON: {e}")))
    }

    /// The last 8 KiB of a side's log.
    pub fn log_tail(&self, side: Side) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.endpoint(side).log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// The whole log of a side.
    pub fn log(&self, side: Side) -> String {
        std::fs::read_to_string(&self.endpoint(side).log).unwrap_or_default()
    }

    /// TCP zeros from a to b through the tunnel.
    pub fn tcp_zeros(
        &self,
        bytes: u64,
        timeout: Duration,
    ) -> Result<lab::TcpZerosReport, DemoError> {
        Ok(lab::tcp_zeros(
            &self.hosts.b,
            &self.hosts.a,
            SocketAddr::new(self.b_inner, 5001),
            bytes,
            timeout,
        )?)
    }

    /// [`Self::tcp_zeros`] to another port of b, so that several streams
    /// can run at once.
    pub fn tcp_zeros_on(
        &self,
        port: u16,
        bytes: u64,
        timeout: Duration,
    ) -> Result<lab::TcpZerosReport, DemoError> {
        Ok(lab::tcp_zeros(
            &self.hosts.b,
            &self.hosts.a,
            SocketAddr::new(self.b_inner, port),
            bytes,
            timeout,
        )?)
    }

    pub fn udp_exchange(&self, count: u32, size: usize) -> Result<lab::UdpReport, DemoError> {
        Ok(lab::udp_exchange(
            &self.hosts.b,
            &self.hosts.a,
            SocketAddr::new(self.b_inner, 5002),
            count,
            size,
            Duration::from_secs(30),
        )?)
    }

    pub fn ping(&self, count: u32) -> Result<lab::PingReport, DemoError> {
        Ok(lab::ping(
            &self.hosts.a,
            self.b_inner,
            count,
            Duration::from_secs(20),
        )?)
    }
}

impl Drop for TunnelLab {
    fn drop(&mut self) {
        for side in [Side::A, Side::B] {
            if self.child(side).is_some() {
                let _ = self.stop(side);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces go with `hosts`.
    }
}

/// Masquerades what the router forwards from a's subnet to b's (IPv4).
fn nat_router(hosts: &TwoHosts, subnet: u8) -> Result<(), LabError> {
    let router = hosts
        .router
        .as_ref()
        .ok_or_else(|| LabError::Invalid("a NAT needs the routed lab (router_mtu)".into()))?;
    nft(
        router,
        &format!(
            "table ip esptun_nat {{\n\
             chain post {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr 198.18.{subnet}.0/25 ip daddr 198.18.{subnet}.128/25 masquerade\n\
             }}\n\
             }}\n"
        ),
    )
}

/// `nft -f -` in `ns`.
fn nft(ns: &Netns, script: &str) -> Result<(), LabError> {
    use std::io::Write;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Invalid(format!("running nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| LabError::Invalid(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::Invalid(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(LabError::Invalid(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
