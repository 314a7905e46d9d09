//! Interoperability with the Linux kernel's own ESP: a real Debian kernel in
//! a qemu guest (TCG) is the peer of a real `esptun run` on the host side.
//!
//! `tests/interop/build-guest.sh` fetches the kernel (`apt-get download`,
//! `dpkg-deb -x`) and builds an initramfs (static busybox, iproute2's `ip`
//! with its libraries, the ESP/AES-GCM/RNG/virtio modules, `nettool`), cached
//! in `${ESPTUN_INTEROP_CACHE:-/var/cache/esptun-interop}`. The test creates
//! one network namespace with a TAP device (198.18.50.1/24) that qemu opens
//! from inside it; the guest is 198.18.50.2 behind virtio-net. The guest is
//! driven over its second serial port (a Unix socket here), off the network
//! under test; its first serial port is the console, kept in a file.
//!
//! For each case (raw ESP and NAT-T, AES-128 and AES-256, with and without
//! ESN) the guest gets `ip xfrm` states and policies in transport mode with
//! the keys esptun uses, and both ends exchange ICMP echo, UDP and a TCP
//! stream of zeros in both directions (checked byte by byte). dumpcap
//! captures the TAP, and tshark decrypts both directions with the records of
//! `esptun wireshark-keys`: an independent decoder of the wire format.
//!
//! Then the difference: a packet whose inner UDP checksum is wrong because
//! one 16-byte plaintext block was replaced by its neighbour before an
//! otherwise valid seal. Sent to the kernel over NAT-T it is delivered to
//! the application; sent to esptun it is dropped and counted as
//! `inner_checksum`. A valid packet crafted the same way is delivered by
//! both (the control). Over raw ESP the kernel checks the checksum and drops
//! it, shown for contrast.
//!
//! Needs root; without it prints that it skipped (fails under
//! `ESPTUN_REQUIRE_NETNS=1`). Everything (qemu, namespace, files) is removed
//! also on failure; a failure prints the guest's console, `ip -s xfrm state`
//! and `/proc/net/xfrm_stat`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use esptun::crypto::{IcvLen, KeySize, soft};
use esptun::lab::{self, Netns};
use esptun::sa::KeyMaterial;
use esptun::sa::reservation::ReservationStore;
use esptun::wire::checksum::{combine, finish, pseudo_header_v4, sum};
use esptun::wire::esp;

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);
const SPI_OUT: u32 = 0xa001; // host -> guest
const SPI_IN: u32 = 0xb001; // guest -> host
/// Distinctive UDP payload size, so tshark's finds cannot be a coincidence.
const UDP_SIZE: usize = 1337;
const UDP_COUNT: u32 = 20;
const TCP_BYTES: u64 = 4 << 20;
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Far above any sequence number the traffic used (esptun reserves in
/// blocks of 2^20), so a crafted packet never reuses a nonce.
const CRAFTED_SEQ: u64 = 1 << 22;

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists())
}

fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("ESPTUN_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: needs root (namespaces, TAP, qemu), and ESPTUN_REQUIRE_NETNS=1 is set");
    }
    eprintln!("{test}: skipped: needs root (network namespace, TAP device, qemu guest)");
    false
}

/// Waits for `child` at most `timeout`, then kills it.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<ExitStatus, String> {
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

/// Runs `cmd` within `timeout`, output to files in `dir`.
fn run_bounded(
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

struct GuestImage {
    kernel: PathBuf,
    initrd: PathBuf,
    version: String,
}

/// Runs the (cached) build script.
fn build_guest(dir: &Path) -> GuestImage {
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
struct Guest {
    child: Option<Child>,
    ctl: UnixStream,
    console: PathBuf,
    pending: Vec<u8>,
}

impl Guest {
    fn boot(ns: &Netns, image: &GuestImage, dir: &Path) -> Result<Guest, String> {
        let console = dir.join("console.log");
        let sock = dir.join("ctl.sock");
        let qemu_log = File::create(dir.join("qemu.log")).map_err(|e| e.to_string())?;
        let mut cmd = ns.command("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
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
        .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:45:53:50"])
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().map_err(|e| e.to_string())?)
        .stderr(qemu_log);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
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
        guest.read_until(|b| find(b, b"@@READY\n").map(|i| i + 8), BOOT_TIMEOUT)?;
        eprintln!(
            "guest booted to its control shell in {:.1} s (TCG)",
            started.elapsed().as_secs_f64()
        );
        Ok(guest)
    }

    /// Reads until `done` finds the end of a message; returns the message.
    fn read_until(
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
    fn run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
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

    /// Reads a background command's output file until `key` appears.
    fn wait_output(&mut self, name: &str, key: &str, timeout: Duration) -> Result<String, String> {
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
    fn spawn(&mut self, name: &str, cmd: &str) -> Result<(), String> {
        let (rc, out) = self.run(
            &format!("rm -f /tmp/out/{name}; {cmd} > /tmp/out/{name} 2>&1 &"),
            CMD_TIMEOUT,
        )?;
        if rc != 0 {
            return Err(format!("starting {cmd} in the guest: {rc} {out}"));
        }
        Ok(())
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// What a failure needs: console tail, xfrm state and counters.
    fn diagnostics(&mut self) -> String {
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
            "grep -A1 '^Udp:' /proc/net/snmp",
            "/sbin/ip -s link show eth0",
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One interop case.
#[derive(Debug, Clone, Copy)]
struct Case {
    natt: bool,
    key_bits: u32,
    esn: bool,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{} AES-{} {}",
            if self.natt { "NAT-T" } else { "raw ESP" },
            self.key_bits,
            if self.esn { "ESN" } else { "32-bit seq" }
        )
    }
}

/// The host side: namespace with the TAP, esptun, files.
struct Host {
    ns: Netns,
    dir: PathBuf,
    esptun: Option<Child>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.esptun.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keys of one case: what esptun sends with, and what the guest sends with.
struct Keys {
    out: KeyMaterial,
    out_hex: String,
    inb: KeyMaterial,
    inb_hex: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

impl Host {
    fn case_dir(&self, case: usize) -> PathBuf {
        self.dir.join(format!("case{case}"))
    }

    /// Fresh keys and esptun's configuration for `case`.
    fn configure(&self, index: usize, case: Case) -> (PathBuf, Keys) {
        let dir = self.case_dir(index);
        std::fs::create_dir_all(&dir).expect("case dir");
        let state = dir.join("state");
        let size = if case.key_bits == 128 {
            KeySize::Aes128
        } else {
            KeySize::Aes256
        };
        let mut material = Vec::new();
        for name in ["out.key", "in.key"] {
            let m = esptun::keyfile::generate(size).expect("random key");
            esptun::keyfile::write_new(&dir.join(name), &m).expect("key file");
            let parsed = KeyMaterial::from_bytes(&m).expect("key material");
            material.push((parsed, hex(&m)));
        }
        let (inb, inb_hex) = material.pop().expect("two keys");
        let (out, out_hex) = material.pop().expect("two keys");
        ReservationStore::open(&state)
            .and_then(|s| s.mark_fresh(&out))
            .expect("marking the outbound key fresh");
        let config = dir.join("esptun.toml");
        let text = format!(
            "# esptun interop test: the peer is the Linux kernel in a qemu guest.\n\
             interface = \"esptun0\"\n\
             outer = \"{outer}\"\n\
             state_dir = \"{state}\"\n\
             control_socket = \"{control}\"\n\
             \n\
             [[peer]]\n\
             name = \"kernel\"\n\
             local = \"{HOST}\"\n\
             endpoint = \"{GUEST}\"\n\
             outbound = {{ spi = {SPI_OUT:#x}, key_file = \"{out_key}\", icv = 16, esn = {esn} }}\n\
             inbound = {{ spi = {SPI_IN:#x}, key_file = \"{in_key}\", icv = 16, esn = {esn} }}\n",
            outer = if case.natt { "udp" } else { "esp" },
            state = state.display(),
            control = dir.join("esptun.sock").display(),
            out_key = dir.join("out.key").display(),
            in_key = dir.join("in.key").display(),
            esn = case.esn,
        );
        std::fs::write(&config, text).expect("config");
        (
            config,
            Keys {
                out,
                out_hex,
                inb,
                inb_hex,
            },
        )
    }

    fn start_esptun(&mut self, index: usize, config: &Path) -> Result<(), String> {
        let log = self.case_dir(index).join("esptun.log");
        let file = File::create(&log).map_err(|e| e.to_string())?;
        let child = self
            .ns
            .command(env!("CARGO_BIN_EXE_esptun"))
            .args(["run", "--log-level", "debug", "-c"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("starting esptun: {e}"))?;
        self.esptun = Some(child);
        let sock = self.case_dir(index).join("esptun.sock");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if esptun::daemon::control::query(&sock, "status").is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.esptun.as_mut().map(Child::try_wait) {
                self.esptun = None;
                return Err(format!(
                    "esptun exited with {status}: {}",
                    self.esptun_log(index)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("esptun not ready within {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_esptun(&mut self) -> Result<ExitStatus, String> {
        let mut child = self.esptun.take().ok_or("esptun is not running")?;
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        wait_bounded(&mut child, Duration::from_secs(15))
    }

    fn status(&self, index: usize) -> Result<serde_json::Value, String> {
        let sock = self.case_dir(index).join("esptun.sock");
        let reply = esptun::daemon::control::query(&sock, "status").map_err(|e| e.to_string())?;
        serde_json::from_str(&reply).map_err(|e| e.to_string())
    }

    fn esptun_log(&self, index: usize) -> String {
        let text =
            std::fs::read_to_string(self.case_dir(index).join("esptun.log")).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_string()
    }
}

/// A UDP datagram's payload: its index and a pattern.
fn udp_payload(i: u32, size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size)
        .map(|k| (k as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    p[..4].copy_from_slice(&i.to_be_bytes());
    p
}

/// Host -> guest UDP, echoed back by the guest: (sent, echoed intact).
fn udp_echo(ns: &Netns, count: u32) -> Result<(u32, u32), String> {
    ns.run(move || -> Result<(u32, u32), String> {
        let sock = UdpSocket::bind(SocketAddrV4::new(HOST, 0)).map_err(|e| e.to_string())?;
        sock.connect(SocketAddrV4::new(GUEST, 5002))
            .map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .map_err(|e| e.to_string())?;
        let (mut sent, mut ok) = (0, 0);
        let mut buf = vec![0u8; 2048];
        for i in 0..count {
            let p = udp_payload(i, UDP_SIZE);
            // Up to three tries: the first datagram may wait for ARP.
            'tries: for _ in 0..3 {
                sock.send(&p).map_err(|e| e.to_string())?;
                sent += 1;
                for _ in 0..8 {
                    match sock.recv(&mut buf) {
                        Ok(n) if buf[..n] == p[..] => {
                            ok += 1;
                            break 'tries;
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            }
        }
        Ok((sent, ok))
    })
    .map_err(|e| e.to_string())?
}

/// Receives UDP on the host side until `count` arrived or timeout:
/// (received intact, corrupted).
fn udp_sink(ns: &Netns, port: u16, count: u32, timeout: Duration) -> Receiver<(u32, u32)> {
    let sock = ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(HOST, port)))
        .expect("thread in namespace")
        .expect("binding the host's UDP sink");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        let (mut ok, mut bad) = (0, 0);
        let mut buf = vec![0u8; 65536];
        while ok < count && Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                let i = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                // nettool's datagrams: index then 0x5a.
                if n == UDP_SIZE && buf[4..n].iter().all(|&b| b == 0x5a) && i < count {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
        }
        let _ = tx.send((ok, bad));
    });
    rx
}

type Receiver<T> = std::sync::mpsc::Receiver<T>;

/// Host -> guest: TCP zeros to the guest's sink.
fn tcp_send_zeros(ns: &Netns, bytes: u64) -> Result<Duration, String> {
    ns.run(move || -> Result<Duration, String> {
        let addr = SocketAddr::new(IpAddr::V4(GUEST), 5001);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream
            .set_write_timeout(Some(TRAFFIC_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(TRAFFIC_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
            left -= n as u64;
        }
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
        // The guest closes once it has read everything.
        let mut sink = [0u8; 64];
        let _ = stream.read(&mut sink);
        Ok(started.elapsed())
    })
    .map_err(|e| e.to_string())?
}

/// Guest -> host: a TCP listener counting bytes and non-zero bytes.
fn tcp_sink(ns: &Netns) -> Receiver<Result<(u64, u64), String>> {
    let listener = ns
        .run(|| TcpListener::bind(SocketAddrV4::new(HOST, 5004)))
        .expect("thread in namespace")
        .expect("binding the host's TCP sink");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| -> Result<(u64, u64), String> {
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + TRAFFIC_TIMEOUT;
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(format!("accept: {e}")),
                }
            };
            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(TRAFFIC_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let (mut total, mut nonzero) = (0u64, 0u64);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                nonzero += buf[..n].iter().filter(|&&b| b != 0).count() as u64;
            }
            Ok((total, nonzero))
        })();
        let _ = tx.send(result);
    });
    rx
}

/// An inner UDP segment (header with a correct checksum, then payload).
fn udp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = vec![0u8; len];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    s[8..].copy_from_slice(payload);
    let pseudo = pseudo_header_v4(src.octets(), dst.octets(), 17, len as u16);
    let mut c = finish(combine(pseudo, sum(&s)));
    if c == 0 {
        c = 0xffff;
    }
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// The payload of the crafted datagrams: 64 bytes, every 16-byte block
/// different, so a block replaced by its neighbour changes the data.
fn crafted_payload() -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(0x41))
        .collect()
}

/// An ESP packet (SPI onwards) carrying `segment` (UDP), sealed with
/// `key`: with `corrupt`, plaintext block 2 (bytes 32..48 of the ESP
/// payload) is replaced by block 1 before sealing, as the field hardware
/// did, so the ICV is valid over wrong data. Returns the packet and the UDP
/// payload the receiver's application would get.
fn craft(
    key: &KeyMaterial,
    spi: u32,
    seq: u64,
    esn: bool,
    segment: &[u8],
    corrupt: bool,
) -> (Vec<u8>, Vec<u8>) {
    let pad = esp::pad_len(segment.len());
    let mut plaintext = segment.to_vec();
    plaintext.resize(segment.len() + pad + esp::TRAILER_LEN, 0);
    esp::emit_trailer(&mut plaintext[segment.len()..], 17);
    if corrupt {
        let (head, tail) = plaintext.split_at_mut(32);
        tail[..16].copy_from_slice(&head[16..32]);
    }
    let delivered = plaintext[8..segment.len()].to_vec();
    let mut header = [0u8; esp::HEADER_LEN + esp::IV_LEN];
    esp::emit_header(&mut header, spi, seq);
    let nonce = esp::nonce(*key.salt(), seq.to_be_bytes());
    let (aad, aad_len) = esp::aad(spi, seq, esn);
    let sealer = soft::provider()
        .new_key(key.key(), IcvLen::Icv16)
        .expect("soft provider key");
    let mut tag = [0u8; 16];
    sealer
        .seal_in_place(&nonce, &aad[..aad_len], &mut plaintext, &mut tag)
        .expect("seal");
    let mut packet = header.to_vec();
    packet.extend_from_slice(&plaintext);
    packet.extend_from_slice(&tag);
    (packet, delivered)
}

/// What the guest's kernel did with one crafted packet.
fn guest_udp_counters(guest: &mut Guest) -> Result<(u64, u64), String> {
    let (_, out) = guest.run("grep '^Udp:' /proc/net/snmp", CMD_TIMEOUT)?;
    let mut lines = out.lines();
    let names: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let values: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let get = |k: &str| -> u64 {
        names
            .iter()
            .position(|n| *n == k)
            .and_then(|i| values.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    Ok((get("InDatagrams"), get("InCsumErrors")))
}

/// Sends crafted ESP from the host namespace to the guest (esptun
/// stopped), and reports what the guest's UDP application received.
fn crafted_to_guest(
    host: &Host,
    guest: &mut Guest,
    natt: bool,
    packet: &[u8],
) -> Result<Option<Vec<u8>>, String> {
    guest.spawn("recv", "nettool udp-recv 7000 3000")?;
    guest.wait_output("recv", "listening", CMD_TIMEOUT)?;
    let packet = packet.to_vec();
    host.ns
        .run(move || -> std::io::Result<()> {
            if natt {
                let s = UdpSocket::bind(SocketAddrV4::new(HOST, 4500))?;
                s.send_to(&packet, SocketAddrV4::new(GUEST, 4500))?;
            } else {
                // SAFETY: socket(2) with constant arguments.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ESP) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let to = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(GUEST).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: the buffer and address are valid for the call;
                // fd is ours and closed right after.
                let n = unsafe {
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&raw const to).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                let err = std::io::Error::last_os_error();
                // SAFETY: fd is ours.
                unsafe { libc::close(fd) };
                if n < 0 {
                    return Err(err);
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("sending the crafted packet: {e}"))?;
    let out = guest.wait_output("recv", "received=", Duration::from_secs(10))?;
    if out.contains("received=0") {
        return Ok(None);
    }
    let payload = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("payload="))
        .ok_or_else(|| format!("no payload in {out:?}"))?;
    Ok(Some(unhex(payload)))
}

/// The guest sends crafted ESP-in-UDP (from port 4501, bypassing its own
/// policies) to esptun; reports what the host's UDP application received.
fn crafted_to_esptun(
    host: &Host,
    guest: &mut Guest,
    packet: &[u8],
) -> Result<Option<Vec<u8>>, String> {
    let sock = host
        .ns
        .run(|| UdpSocket::bind(SocketAddrV4::new(HOST, 7000)))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let (rc, out) = guest.run(
        &format!("nettool send-hex {HOST} 4500 4501 {}", hex(packet)),
        CMD_TIMEOUT,
    )?;
    if rc != 0 {
        return Err(format!("guest send-hex: {rc} {out}"));
    }
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    match sock.recv(&mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(_) => Ok(None),
    }
}

/// Counts tshark's decryption of the capture, per SPI.
#[derive(Debug, Default, Clone, Copy)]
struct Decoded {
    esp: u32,
    udp: u32,
    tcp_segments: u32,
    icmp: u32,
    icv_good: u32,
    icv_bad: u32,
}

fn tshark_decode(
    tshark: &Path,
    capture: &Path,
    records: &[String],
    dir: &Path,
) -> Result<(Decoded, Decoded), String> {
    let mut cmd = Command::new(tshark);
    cmd.arg("-n").arg("-r").arg(capture);
    cmd.args(["-o", "esp.enable_encryption_decode:TRUE"]);
    cmd.args(["-o", "esp.enable_authentication_check:TRUE"]);
    for r in records {
        cmd.arg("-o").arg(format!("uat:esp_sa:{r}"));
    }
    cmd.args(["-Y", "esp", "-T", "fields", "-E", "separator=|"]);
    for f in [
        "esp.spi",
        "data.len",
        "tcp.len",
        "icmp.type",
        "esp.icv_good",
        "esp.icv_bad",
    ] {
        cmd.args(["-e", f]);
    }
    let (status, out, err) = run_bounded(cmd, dir, "tshark", Duration::from_secs(120))?;
    if !status.success() {
        return Err(format!("tshark exited with {status}: {err}"));
    }
    let (mut out_d, mut in_d) = (Decoded::default(), Decoded::default());
    for line in out.lines() {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() != 6 {
            continue;
        }
        let spi = u32::from_str_radix(f[0].trim_start_matches("0x"), 16).unwrap_or(0);
        let d = match spi {
            SPI_OUT => &mut out_d,
            SPI_IN => &mut in_d,
            _ => continue,
        };
        d.esp += 1;
        if f[1].split(',').any(|n| n.parse::<usize>() == Ok(UDP_SIZE)) {
            d.udp += 1;
        }
        if f[2]
            .split(',')
            .any(|n| n.parse::<u32>().is_ok_and(|n| n > 0))
        {
            d.tcp_segments += 1;
        }
        if !f[3].is_empty() {
            d.icmp += 1;
        }
        if f[4].split(',').any(|v| v == "1" || v == "True") {
            d.icv_good += 1;
        }
        if f[5].split(',').any(|v| v == "1" || v == "True") {
            d.icv_bad += 1;
        }
    }
    Ok((out_d, in_d))
}

/// dumpcap on the TAP inside the namespace.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, dumpcap: &Path, dir: &Path) -> Result<Capture, String> {
        let file = dir.join("wire.pcapng");
        let log = dir.join("dumpcap.log");
        let child = ns
            .command(dumpcap)
            .args(["-q", "-i", "tap0", "-f", "esp or udp port 4500", "-w"])
            .arg(&file)
            .args(["-a", "duration:600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("starting dumpcap: {e}"))?;
        let capture = Capture {
            child: Some(child),
            file,
        };
        for _ in 0..300 {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Capturing on")
            {
                return Ok(capture);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "dumpcap did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    fn stop(mut self) -> Result<PathBuf, String> {
        let mut child = self.child.take().ok_or("dumpcap is not running")?;
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        wait_bounded(&mut child, Duration::from_secs(15))?;
        Ok(self.file.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The outcome of the corruption experiment, per receiver.
#[derive(Debug, Default)]
struct Outcome {
    control_delivered: bool,
    corrupt_delivered: bool,
    detail: String,
}

/// What one case measured, for the summary.
#[derive(Debug, Default)]
struct Report {
    lines: Vec<String>,
    kernel: Option<Outcome>,
    esptun: Option<Outcome>,
    kernel_raw: Option<Outcome>,
}

/// Fields drop in order: the guest (qemu) first, then the host side
/// (esptun, namespace, files).
struct Suite {
    guest: Guest,
    host: Host,
    tshark: Option<(PathBuf, PathBuf)>,
}

impl Suite {
    fn guest_sh(&mut self, cmd: &str) -> Result<String, String> {
        let (rc, out) = self.guest.run(cmd, CMD_TIMEOUT)?;
        if rc != 0 {
            return Err(format!("guest: `{cmd}` failed ({rc}): {out}"));
        }
        Ok(out)
    }

    /// The guest's SAs and policies for `case`, with the keys esptun uses.
    fn guest_xfrm(&mut self, case: Case, keys: &Keys) -> Result<(), String> {
        self.guest_sh("/sbin/ip xfrm state flush && /sbin/ip xfrm policy flush")?;
        let encap = if case.natt {
            " encap espinudp 4500 4500 0.0.0.0"
        } else {
            ""
        };
        let esn = if case.esn {
            " flag esn replay-window 128"
        } else {
            " replay-window 64"
        };
        let aead = |k: &str| format!("aead 'rfc4106(gcm(aes))' 0x{k} 128");
        // Guest -> host: the guest's outbound (esptun's inbound key).
        self.guest_sh(&format!(
            "/sbin/ip xfrm state add src {GUEST} dst {HOST} proto esp spi {SPI_IN:#x} reqid 1 \
             mode transport{esn} {}{encap}",
            aead(&keys.inb_hex)
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm state add src {HOST} dst {GUEST} proto esp spi {SPI_OUT:#x} reqid 1 \
             mode transport{esn} {}{encap}",
            aead(&keys.out_hex)
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm policy add src {GUEST} dst {HOST} dir out \
             tmpl src {GUEST} dst {HOST} proto esp reqid 1 mode transport"
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm policy add src {HOST} dst {GUEST} dir in \
             tmpl src {HOST} dst {GUEST} proto esp reqid 1 mode transport"
        ))?;
        Ok(())
    }

    fn run_case(&mut self, index: usize, case: Case) -> Result<Report, String> {
        let mut report = Report::default();
        let (config, keys) = self.host.configure(index, case);
        let dir = self.host.case_dir(index);
        self.guest_xfrm(case, &keys)?;
        let stat_before = self.guest_sh("cat /proc/net/xfrm_stat")?;
        self.host.start_esptun(index, &config)?;
        let capture = match &self.tshark {
            Some((_, dumpcap)) => Some(Capture::start(&self.host.ns, dumpcap, &dir)?),
            None => None,
        };

        // ICMP echo, both ways.
        let ping = lab::ping(&self.host.ns, IpAddr::V4(GUEST), 5, Duration::from_secs(20))
            .map_err(|e| e.to_string())?;
        if ping.received != 5 {
            return Err(format!("host -> guest ping: {ping:?}"));
        }
        let out = self.guest_sh(&format!("ping -c 3 -W 3 {HOST}"))?;
        if !out.contains("3 packets received") {
            return Err(format!("guest -> host ping: {out}"));
        }
        report.lines.push(format!(
            "ping host->guest {}/{}, guest->host 3/3",
            ping.received, ping.sent
        ));

        // UDP: host -> guest echoed back; guest -> host.
        self.guest
            .spawn("echo", &format!("nettool udp-echo 5002 {UDP_COUNT} 60000"))?;
        self.guest.wait_output("echo", "listening", CMD_TIMEOUT)?;
        let (sent, echoed) = udp_echo(&self.host.ns, UDP_COUNT)?;
        if echoed != UDP_COUNT {
            return Err(format!(
                "UDP echo: {echoed} of {UDP_COUNT} datagrams came back intact ({sent} sent)"
            ));
        }
        let sink = udp_sink(&self.host.ns, 5003, UDP_COUNT, Duration::from_secs(30));
        self.guest_sh(&format!(
            "nettool udp-send {HOST} 5003 {UDP_COUNT} {UDP_SIZE}"
        ))?;
        let (got, bad) = sink
            .recv_timeout(Duration::from_secs(40))
            .map_err(|e| format!("UDP sink: {e}"))?;
        if got != UDP_COUNT || bad != 0 {
            return Err(format!(
                "guest -> host UDP: {got} of {UDP_COUNT} intact, {bad} wrong"
            ));
        }
        report.lines.push(format!(
            "UDP {UDP_COUNT} x {UDP_SIZE} B host->guest->host echoed intact ({sent} sent), \
             {got}/{UDP_COUNT} guest->host intact"
        ));

        // TCP zeros, both ways, every byte checked.
        self.guest.spawn(
            "sink",
            &format!("nettool tcp-sink 5001 {}", TRAFFIC_TIMEOUT.as_millis()),
        )?;
        self.guest.wait_output("sink", "listening", CMD_TIMEOUT)?;
        let took = tcp_send_zeros(&self.host.ns, TCP_BYTES)?;
        let out = self.guest.wait_output("sink", "bytes=", TRAFFIC_TIMEOUT)?;
        if !out.contains(&format!("bytes={TCP_BYTES} nonzero=0 ")) || !out.contains("eof=1") {
            return Err(format!("host -> guest TCP: guest's sink says {out:?}"));
        }
        let rx = tcp_sink(&self.host.ns);
        let started = Instant::now();
        let (rc, out) = self.guest.run(
            &format!(
                "nettool tcp-zeros {HOST} 5004 {TCP_BYTES} {}",
                TRAFFIC_TIMEOUT.as_millis()
            ),
            TRAFFIC_TIMEOUT + Duration::from_secs(10),
        )?;
        let back = started.elapsed();
        if rc != 0 {
            return Err(format!("guest -> host TCP: {out}"));
        }
        let (total, nonzero) = rx
            .recv_timeout(TRAFFIC_TIMEOUT)
            .map_err(|e| format!("host TCP sink: {e}"))??;
        if total != TCP_BYTES || nonzero != 0 {
            return Err(format!(
                "guest -> host TCP: {total} of {TCP_BYTES} bytes, {nonzero} non-zero"
            ));
        }
        let mbit = |d: Duration| TCP_BYTES as f64 * 8.0 / d.as_secs_f64() / 1e6;
        report.lines.push(format!(
            "TCP {} MiB of zeros host->guest ({:.0} Mbit/s) and guest->host ({:.0} Mbit/s), \
             every byte checked, 0 non-zero",
            TCP_BYTES >> 20,
            mbit(took),
            mbit(back)
        ));

        // esptun's counters: nothing dropped.
        std::thread::sleep(Duration::from_millis(500));
        let s = self.host.status(index)?;
        // Outbound `no_sa` is the TUN's own IPv6 chatter (router
        // solicitations, MLD), which has no peer; anything else is a fault.
        let no_sa = s["outbound"]["drops"]["no_sa"].as_u64().unwrap_or(0);
        for direction in ["outbound", "inbound"] {
            let mut dropped = s[direction]["dropped"].as_u64().unwrap_or(u64::MAX);
            if direction == "outbound" {
                dropped -= no_sa.min(dropped);
            }
            if dropped != 0 {
                return Err(format!("esptun {direction} dropped {dropped}: {s:#}"));
            }
        }
        let (esp_in, esp_out) = (
            s["inbound_sas"][0]["packets"].as_u64().unwrap_or(0),
            s["outbound_sas"][0]["packets"].as_u64().unwrap_or(0),
        );
        report.lines.push(format!(
            "esptun: {esp_out} packets sealed, {esp_in} opened, 0 dropped \
             ({no_sa} outbound no_sa: the TUN's own IPv6 chatter)"
        ));
        // The kernel's counters: no xfrm error during the traffic.
        let stat_after = self.guest_sh("cat /proc/net/xfrm_stat")?;
        if stat_after != stat_before {
            return Err(format!(
                "guest xfrm_stat changed during the traffic:\nbefore:\n{stat_before}\nafter:\n{stat_after}"
            ));
        }
        report
            .lines
            .push("guest /proc/net/xfrm_stat: all counters unchanged (0 errors)".into());

        // The independent decoder.
        if let (Some(capture), Some((tshark, _))) = (capture, self.tshark.clone()) {
            let file = capture.stop()?;
            let records = wireshark_keys(&config)?;
            let (o, i) = tshark_decode(&tshark, &file, &records, &dir)?;
            let want = |d: &Decoded, what: &str| -> Result<(), String> {
                if d.udp < UDP_COUNT || d.tcp_segments == 0 || d.icmp < 3 {
                    return Err(format!(
                        "tshark could not decode {what}: {d:?} (capture {})",
                        file.display()
                    ));
                }
                if !case.esn && (d.icv_bad != 0 || d.icv_good != d.esp) {
                    return Err(format!("tshark's ICV check on {what}: {d:?}"));
                }
                Ok(())
            };
            want(&o, "host->guest (esptun's output)")?;
            want(&i, "guest->host (the kernel's output)")?;
            report.lines.push(format!(
                "tshark decrypted host->guest {} ESP ({} UDP/{UDP_SIZE}, {} TCP, {} ICMP{}), \
                 guest->host {} ESP ({} UDP/{UDP_SIZE}, {} TCP, {} ICMP{})",
                o.esp,
                o.udp,
                o.tcp_segments,
                o.icmp,
                if case.esn {
                    String::new()
                } else {
                    format!(", ICV good {}", o.icv_good)
                },
                i.esp,
                i.udp,
                i.tcp_segments,
                i.icmp,
                if case.esn {
                    String::new()
                } else {
                    format!(", ICV good {}", i.icv_good)
                },
            ));
        }

        // The difference that matters.
        let payload = crafted_payload();
        if case.natt {
            // To esptun: sealed with the guest's outbound key, sent by the guest.
            let seg = udp_segment(GUEST, HOST, 7001, 7000, &payload);
            let before = self.host.status(index)?["inbound"]["drops"]["inner_checksum"]
                .as_u64()
                .unwrap_or(u64::MAX);
            let (good, good_payload) = craft(&keys.inb, SPI_IN, CRAFTED_SEQ, case.esn, &seg, false);
            let (bad, bad_payload) =
                craft(&keys.inb, SPI_IN, CRAFTED_SEQ + 1, case.esn, &seg, true);
            let control = crafted_to_esptun(&self.host, &mut self.guest, &good)?;
            let corrupt = crafted_to_esptun(&self.host, &mut self.guest, &bad)?;
            std::thread::sleep(Duration::from_millis(500));
            let after = self.host.status(index)?["inbound"]["drops"]["inner_checksum"]
                .as_u64()
                .unwrap_or(u64::MAX);
            report.esptun = Some(Outcome {
                control_delivered: control.as_deref() == Some(&good_payload[..]),
                corrupt_delivered: corrupt.is_some(),
                detail: format!(
                    "inner_checksum drops {before} -> {after}{}",
                    if corrupt.as_deref() == Some(&bad_payload[..]) {
                        " (delivered the corrupted payload!)"
                    } else {
                        ""
                    }
                ),
            });
            if after != before + 1 {
                return Err(format!(
                    "esptun's inner_checksum counter went {before} -> {after}, expected +1"
                ));
            }
        }
        let status = self.host.stop_esptun()?;
        if !status.success() {
            return Err(format!("esptun exited with {status}"));
        }
        // To the kernel: sealed with esptun's outbound key, sent from the
        // host namespace with esptun stopped.
        let seg = udp_segment(HOST, GUEST, 7001, 7000, &crafted_payload());
        let (good, good_payload) = craft(&keys.out, SPI_OUT, CRAFTED_SEQ, case.esn, &seg, false);
        let (bad, bad_payload) = craft(&keys.out, SPI_OUT, CRAFTED_SEQ + 1, case.esn, &seg, true);
        let (_, csum_before) = guest_udp_counters(&mut self.guest)?;
        let control = crafted_to_guest(&self.host, &mut self.guest, case.natt, &good)?;
        let corrupt = crafted_to_guest(&self.host, &mut self.guest, case.natt, &bad)?;
        let (_, csum_after) = guest_udp_counters(&mut self.guest)?;
        let outcome = Outcome {
            control_delivered: control.as_deref() == Some(&good_payload[..]),
            corrupt_delivered: corrupt.as_deref() == Some(&bad_payload[..]),
            detail: format!(
                "UDP InCsumErrors {csum_before} -> {csum_after}{}",
                match &corrupt {
                    Some(p) if p[..] != bad_payload[..] => " (delivered other bytes!)",
                    _ => "",
                }
            ),
        };
        if case.natt {
            report.kernel = Some(outcome);
        } else {
            report.kernel_raw = Some(outcome);
        }
        Ok(report)
    }
}

fn wireshark_keys(config: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(["wireshark-keys", "-c"])
        .arg(config)
        .output()
        .map_err(|e| format!("esptun wireshark-keys: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "esptun wireshark-keys: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn tshark_tools() -> Option<(PathBuf, PathBuf)> {
    match (find_tool("tshark"), find_tool("dumpcap")) {
        (Some(t), Some(d)) => Some((t, d)),
        _ => {
            let why = "tshark/dumpcap are not installed: the independent decoder is skipped \
                       (Debian: apt-get install tshark)";
            if std::env::var("ESPTUN_REQUIRE_TSHARK").as_deref() == Ok("1") {
                panic!("{why}, and ESPTUN_REQUIRE_TSHARK=1 is set");
            }
            eprintln!("{why}");
            None
        }
    }
}

#[test]
fn linux_kernel_esp_interop() {
    let test = "linux_kernel_esp_interop";
    if !require_root(test) {
        return;
    }
    let started = Instant::now();
    let prefix = lab::unique_prefix("kern");
    let dir = std::env::temp_dir().join(format!("esptun-{prefix}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = build_guest(&dir);
    let ns = Netns::create(&format!("{prefix}h")).expect("namespace");
    let host = Host {
        ns,
        dir: dir.clone(),
        esptun: None,
    };
    for args in [
        vec!["tuntap", "add", "mode", "tap", "name", "tap0"],
        vec!["addr", "add", "198.18.50.1/24", "dev", "tap0"],
        vec!["link", "set", "tap0", "up"],
    ] {
        host.ns.ip(&args).expect("TAP in the namespace");
    }
    let guest = Guest::boot(&host.ns, &image, &dir).unwrap_or_else(|e| {
        let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        panic!("booting the guest: {e}\n--- console ---\n{console}")
    });
    let mut suite = Suite {
        host,
        guest,
        tshark: tshark_tools(),
    };
    let setup = (|| -> Result<(), String> {
        suite.guest_sh("/sbin/ip link set eth0 up && /sbin/ip addr add 198.18.50.2/24 dev eth0")?;
        suite.guest.spawn("natt", "nettool natt-socket 4500")?;
        suite.guest.wait_output("natt", "ready", CMD_TIMEOUT)?;
        // The plain path first, so a failure later is about ESP.
        let p = lab::ping(
            &suite.host.ns,
            IpAddr::V4(GUEST),
            3,
            Duration::from_secs(30),
        )
        .map_err(|e| e.to_string())?;
        if p.received == 0 {
            return Err(format!("the guest does not answer plain ping: {p:?}"));
        }
        Ok(())
    })();
    if let Err(e) = setup {
        let diag = suite.guest.diagnostics();
        panic!("{test}: guest setup: {e}\n{diag}");
    }

    let cases = [
        Case {
            natt: false,
            key_bits: 128,
            esn: true,
        },
        Case {
            natt: false,
            key_bits: 256,
            esn: false,
        },
        Case {
            natt: true,
            key_bits: 128,
            esn: false,
        },
        Case {
            natt: true,
            key_bits: 256,
            esn: true,
        },
    ];
    let mut summary = String::new();
    let mut outcomes = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let t = Instant::now();
        match suite.run_case(index, *case) {
            Ok(report) => {
                let mut text = format!(
                    "[{}] passed in {:.1} s\n",
                    case.name(),
                    t.elapsed().as_secs_f64()
                );
                for l in &report.lines {
                    let _ = writeln!(text, "    {l}");
                }
                eprint!("{text}");
                summary.push_str(&text);
                outcomes.push((*case, report));
            }
            Err(e) => {
                let log = suite.host.esptun_log(index);
                let diag = suite.guest.diagnostics();
                panic!(
                    "{test}: [{}] {e}\n--- passed so far ---\n{summary}--- esptun log ---\n{log}\n{diag}",
                    case.name()
                );
            }
        }
    }

    // The difference, side by side.
    let mut table = String::from(
        "\ncorrupted block (valid ICV, wrong inner UDP checksum) vs. a valid control packet:\n",
    );
    let mut failures = Vec::new();
    for (case, report) in &outcomes {
        for (who, outcome, corrupt_should_arrive) in [
            ("Linux kernel", &report.kernel, true),
            ("Linux kernel", &report.kernel_raw, false),
            ("esptun", &report.esptun, false),
        ] {
            let Some(o) = outcome else { continue };
            let _ = writeln!(
                table,
                "  {:<26} -> {:<12}: control {}, corrupted {} ({})",
                case.name(),
                who,
                if o.control_delivered {
                    "delivered"
                } else {
                    "NOT delivered"
                },
                if o.corrupt_delivered {
                    "DELIVERED to the application"
                } else {
                    "dropped"
                },
                o.detail
            );
            if !o.control_delivered || o.corrupt_delivered != corrupt_should_arrive {
                failures.push(format!("{} -> {who}: {o:?}", case.name()));
            }
        }
    }
    eprintln!("{table}");
    eprintln!(
        "kernel interop suite: {} cases in {:.1} s (guest: Linux {})",
        cases.len(),
        started.elapsed().as_secs_f64(),
        image.version
    );
    if !failures.is_empty() {
        let diag = suite.guest.diagnostics();
        panic!(
            "{test}: the corruption outcomes differ from the expected ones:\n{}\n{diag}",
            failures.join("\n")
        );
    }
}
