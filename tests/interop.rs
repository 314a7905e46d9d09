//! Interoperability with the Linux kernel's own ESP: a real Debian kernel in
//! a qemu guest (TCG) is the peer of a real `esptun run` on the host side.
//!
//! `tests/interop/build-guest.sh` fetches the kernel (`apt-get download`,
//! `dpkg-deb -x`) and builds an initramfs (static busybox, iproute2's `ip`
//! with its libraries, the ESP/AES-GCM/RNG/virtio modules, `nettool`), cached
//! in `${ESPTUN_INTEROP_CACHE:-/var/cache/esptun-interop}`. The test creates
//! one network namespace with a TAP device (198.18.50.1/24 and
//! 2001:db8:50::1/64, `nodad`) that qemu opens from inside it; the guest is
//! 198.18.50.2 and 2001:db8:50::2 (`nodad`) behind virtio-net. The guest is
//! driven over its second serial port (a Unix socket here), off the network
//! under test; its first serial port is the console, kept in a file.
//!
//! For each case (IPv4: raw ESP and NAT-T, AES-128 and AES-256, with and
//! without ESN; IPv6: raw ESP AES-256 ESN and NAT-T AES-128) the guest gets
//! `ip xfrm` states and policies in transport mode with the keys esptun
//! uses, and both ends exchange ICMP (ICMPv6) echo, UDP and a TCP stream of
//! zeros in both directions (checked byte by byte). dumpcap captures the
//! TAP, and tshark decrypts both directions with the records of `esptun
//! wireshark-keys`: an independent decoder of the wire format. ESP-in-UDP
//! over IPv6 (Linux 5.8 and later) needs its own AF_INET6 socket with
//! `UDP_ENCAP_ESPINUDP` in the guest (`nettool natt-socket 4500 6`, IPv6-only
//! next to the IPv4 one) and `encap espinudp 4500 4500 ::`. The IPv6 cases
//! add bypass policies for neighbour solicitations and advertisements
//! (ICMPv6 135/136): the unicast ones match the host-to-guest selectors, and
//! the host's kernel sends its own in the clear on the TAP.
//!
//! Then the difference: a packet whose inner UDP or TCP checksum is wrong
//! because one 16-byte plaintext block was replaced by its neighbour before
//! an otherwise valid seal, next to a valid control packet crafted the same
//! way. UDP is measured at the receiving application: sent to the kernel
//! over NAT-T the corrupted datagram is delivered; sent to esptun it is
//! dropped and counted as `inner_checksum`. TCP is measured at the receiving
//! TCP stack, the same way on both sides: a segment (ACK|PSH, 64 bytes) to a
//! closed port, and the receiving kernel's `Tcp:` counters (`InSegs`,
//! `InCsumErrors`, `OutRsts`): an accepted segment is answered with a
//! reset, a rejected one is counted in `InCsumErrors`. The guest's kernel
//! over NAT-T accepts the corrupted segment (no checksum error, a reset);
//! behind esptun the host namespace's kernel never sees it (`InSegs` +0) and
//! esptun counts `inner_checksum`. (Data on an established connection is
//! not used: it would need a handshake crafted around a stopped esptun, and
//! the counters show the checksum decision itself.) Over raw ESP the kernel checks both checksums
//! and drops the corrupted packet, shown for contrast.
//!
//! Needs root; without it prints that it skipped (fails under
//! `ESPTUN_REQUIRE_NETNS=1`). Everything (qemu, namespace, files) is removed
//! also on failure; a failure prints the guest's console, `ip -s xfrm state`
//! and `/proc/net/xfrm_stat`.

mod common;

use common::{run_bounded, wait_bounded};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use esptun::crypto::{IcvLen, KeySize, soft};
use esptun::lab::{self, Netns};
use esptun::sa::KeyMaterial;
use esptun::sa::reservation::ReservationStore;
use esptun::wire::checksum::{combine, finish, is_valid, pseudo_header_v4, pseudo_header_v6, sum};
use esptun::wire::esp;

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x50, 0, 0, 0, 0, 1);
const GUEST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x50, 0, 0, 0, 0, 2);
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
            "grep -E '^(Udp|Tcp):' /proc/net/snmp",
            "grep -E '^(Udp6|Icmp6In)' /proc/net/snmp6",
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
    v6: bool,
    natt: bool,
    key_bits: u32,
    esn: bool,
}

impl Case {
    /// The host side's address (the TAP) in this case's family.
    fn host(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(HOST6)
        } else {
            IpAddr::V4(HOST)
        }
    }

    /// The guest's address in this case's family.
    fn guest(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(GUEST6)
        } else {
            IpAddr::V4(GUEST)
        }
    }

    fn name(&self) -> String {
        format!(
            "{} {} AES-{} {}",
            if self.v6 { "IPv6" } else { "IPv4" },
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
             local = \"{local}\"\n\
             endpoint = \"{endpoint}\"\n\
             outbound = {{ spi = {SPI_OUT:#x}, key_file = \"{out_key}\", icv = 16, esn = {esn} }}\n\
             inbound = {{ spi = {SPI_IN:#x}, key_file = \"{in_key}\", icv = 16, esn = {esn} }}\n",
            outer = if case.natt { "udp" } else { "esp" },
            local = case.host(),
            endpoint = case.guest(),
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
fn udp_echo(ns: &Netns, host: IpAddr, guest: IpAddr, count: u32) -> Result<(u32, u32), String> {
    ns.run(move || -> Result<(u32, u32), String> {
        let sock = UdpSocket::bind(SocketAddr::new(host, 0)).map_err(|e| e.to_string())?;
        sock.connect(SocketAddr::new(guest, 5002))
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
fn udp_sink(
    ns: &Netns,
    host: IpAddr,
    port: u16,
    count: u32,
    timeout: Duration,
) -> Receiver<(u32, u32)> {
    let sock = ns
        .run(move || UdpSocket::bind(SocketAddr::new(host, port)))
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
fn tcp_send_zeros(ns: &Netns, guest: IpAddr, bytes: u64) -> Result<Duration, String> {
    ns.run(move || -> Result<Duration, String> {
        let addr = SocketAddr::new(guest, 5001);
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
fn tcp_sink(ns: &Netns, host: IpAddr) -> Receiver<Result<(u64, u64), String>> {
    let listener = ns
        .run(move || TcpListener::bind(SocketAddr::new(host, 5004)))
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

const UDP: u8 = 17;
const TCP: u8 = 6;
/// The closed port the crafted TCP segments go to: any valid segment there
/// is answered with a reset (RFC 9293 3.10.7.1), so the receiving stack's
/// `OutRsts` tells that it accepted the segment.
const CLOSED_TCP_PORT: u16 = 7002;

/// The pseudo-header sum of a transport segment of `len` bytes.
fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u16 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo_header_v4(s.octets(), d.octets(), protocol, len as u16)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo_header_v6(&s.octets(), &d.octets(), protocol, len as u32)
        }
        _ => panic!("mixed address families {src} {dst}"),
    }
}

/// Whether `segment`'s checksum (UDP or TCP) is right.
fn checksum_ok(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> bool {
    is_valid(combine(
        pseudo_header(src, dst, protocol, segment.len()),
        sum(segment),
    ))
}

/// Fills in the checksum field at `at` of `segment`.
fn set_checksum(src: IpAddr, dst: IpAddr, protocol: u8, segment: &mut [u8], at: usize) {
    segment[at..at + 2].fill(0);
    let pseudo = pseudo_header(src, dst, protocol, segment.len());
    let mut c = finish(combine(pseudo, sum(segment)));
    if c == 0 && protocol == UDP {
        c = 0xffff;
    }
    segment[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// An inner UDP segment (header with a correct checksum, then payload).
fn udp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = vec![0u8; len];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    s[8..].copy_from_slice(payload);
    set_checksum(src, dst, UDP, &mut s, 6);
    s
}

/// An inner TCP segment: 20-byte header (ACK|PSH, no options) with a
/// correct checksum, then payload. Sent to a closed port, a receiver whose
/// TCP accepts it answers with a reset.
fn tcp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; 20 + payload.len()];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&0x4553_5054u32.to_be_bytes()); // seq "ESPT"
    s[8..12].copy_from_slice(&0x0000_0001u32.to_be_bytes()); // ack
    s[12] = 5 << 4; // data offset: 5 words
    s[13] = 0x18; // ACK | PSH
    s[14..16].copy_from_slice(&1024u16.to_be_bytes()); // window
    s[20..].copy_from_slice(payload);
    set_checksum(src, dst, TCP, &mut s, 16);
    s
}

/// The payload of the crafted datagrams: 64 bytes, every 16-byte block
/// different, so a block replaced by its neighbour changes the data.
fn crafted_payload() -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(0x41))
        .collect()
}

/// An ESP packet (SPI onwards) carrying `segment` (next header
/// `protocol`), sealed with `key`: with `corrupt`, plaintext block 2 (bytes
/// 32..48 of the ESP payload) is replaced by block 1 before sealing, as the
/// field hardware did, so the ICV is valid over wrong data. Returns the
/// packet and the segment as sealed (what a receiver decrypts).
fn craft(
    key: &KeyMaterial,
    spi: u32,
    seq: u64,
    esn: bool,
    protocol: u8,
    segment: &[u8],
    corrupt: bool,
) -> (Vec<u8>, Vec<u8>) {
    let pad = esp::pad_len(segment.len());
    let mut plaintext = segment.to_vec();
    plaintext.resize(segment.len() + pad + esp::TRAILER_LEN, 0);
    esp::emit_trailer(&mut plaintext[segment.len()..], protocol);
    if corrupt {
        let (head, tail) = plaintext.split_at_mut(32);
        tail[..16].copy_from_slice(&head[16..32]);
    }
    let sealed = plaintext[..segment.len()].to_vec();
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
    (packet, sealed)
}

/// A control packet and its corrupted twin, checked: the control's inner
/// checksum is right, the twin's is wrong (sequence numbers `seq` and
/// `seq + 1`). Returns (control, corrupted): each the packet and the
/// segment as sealed.
type Crafted = (Vec<u8>, Vec<u8>);

fn craft_pair(
    key: &KeyMaterial,
    spi: u32,
    seq: u64,
    esn: bool,
    protocol: u8,
    (src, dst): (IpAddr, IpAddr),
    segment: &[u8],
) -> (Crafted, Crafted) {
    let good = craft(key, spi, seq, esn, protocol, segment, false);
    let bad = craft(key, spi, seq + 1, esn, protocol, segment, true);
    assert!(checksum_ok(src, dst, protocol, &good.1), "control checksum");
    assert!(
        !checksum_ok(src, dst, protocol, &bad.1),
        "the replaced block must break the inner checksum"
    );
    (good, bad)
}

/// `/proc/net/snmp` ("Tcp:InSegs") and `/proc/net/snmp6` ("Udp6InDatagrams")
/// as one map.
fn parse_snmp(text: &str) -> HashMap<String, u64> {
    let mut map = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let words: Vec<&str> = lines[i].split_whitespace().collect();
        match words.as_slice() {
            [proto, names @ ..] if proto.ends_with(':') && i + 1 < lines.len() => {
                let values: Vec<&str> = lines[i + 1].split_whitespace().skip(1).collect();
                for (n, v) in names.iter().zip(values) {
                    if let Ok(v) = v.parse() {
                        map.insert(format!("{proto}{n}"), v);
                    }
                }
                i += 2;
            }
            [name, value] => {
                if let Ok(v) = value.parse() {
                    map.insert((*name).to_string(), v);
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    map
}

type Counters = HashMap<String, u64>;

fn get(c: &Counters, key: &str) -> u64 {
    c.get(key).copied().unwrap_or(u64::MAX)
}

/// The guest kernel's UDP/TCP counters (IPv4 and IPv6).
fn guest_counters(guest: &mut Guest) -> Result<Counters, String> {
    let (_, out) = guest.run("cat /proc/net/snmp /proc/net/snmp6", CMD_TIMEOUT)?;
    Ok(parse_snmp(&out))
}

/// The host namespace kernel's counters, and esptun's inner_checksum drops
/// when it runs.
fn host_counters(host: &Host, index: usize) -> Result<Counters, String> {
    let out = host
        .ns
        .command("cat")
        .args(["/proc/net/snmp", "/proc/net/snmp6"])
        .output()
        .map_err(|e| format!("reading the namespace's snmp counters: {e}"))?;
    let mut c = parse_snmp(&String::from_utf8_lossy(&out.stdout));
    if host.esptun.is_some() {
        let drops = host.status(index)?["inbound"]["drops"]["inner_checksum"]
            .as_u64()
            .unwrap_or(u64::MAX);
        c.insert("esptun:inner_checksum".into(), drops);
    }
    Ok(c)
}

/// Reads counters until one of `watch` moved from `before` or `timeout`
/// passed, then once more after a short settle (a reset is sent after the
/// segment was counted).
fn settle(
    mut read: impl FnMut() -> Result<Counters, String>,
    before: &Counters,
    watch: &[&str],
    timeout: Duration,
) -> Result<Counters, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = read()?;
        if watch.iter().any(|k| get(&now, k) != get(before, k)) || Instant::now() >= deadline {
            std::thread::sleep(Duration::from_millis(300));
            return read();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a receiving TCP stack did with one crafted segment to a closed
/// port: (accepted, description). Accepted: counted in InSegs, not in
/// InCsumErrors, and answered with a reset.
fn tcp_verdict(before: &Counters, after: &Counters) -> (bool, String) {
    let d = |k: &str| get(after, k).wrapping_sub(get(before, k));
    let (segs, csum, rsts) = (d("Tcp:InSegs"), d("Tcp:InCsumErrors"), d("Tcp:OutRsts"));
    (
        segs >= 1 && csum == 0 && rsts >= 1,
        format!("InSegs +{segs}, InCsumErrors +{csum}, OutRsts +{rsts}"),
    )
}

fn udp_keys(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("Udp6InDatagrams", "Udp6InCsumErrors")
    } else {
        ("Udp:InDatagrams", "Udp:InCsumErrors")
    }
}

/// Sends one ESP packet (SPI onwards) from the host namespace to the guest
/// (esptun stopped): ESP-in-UDP from port 4500, or raw ESP.
fn send_to_guest(host: &Host, case: Case, packet: &[u8]) -> Result<(), String> {
    let packet = packet.to_vec();
    let (from, to) = (case.host(), case.guest());
    host.ns
        .run(move || -> std::io::Result<()> {
            if case.natt {
                let s = UdpSocket::bind(SocketAddr::new(from, 4500))?;
                s.send_to(&packet, SocketAddr::new(to, 4500))?;
                return Ok(());
            }
            let family = if to.is_ipv6() {
                libc::AF_INET6
            } else {
                libc::AF_INET
            };
            // SAFETY: socket(2) with constant arguments.
            let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_ESP) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let len = match to {
                IpAddr::V4(a) => {
                    let sin = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: 0,
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(a).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    // SAFETY: sockaddr_storage is larger than sockaddr_in.
                    unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
                    std::mem::size_of::<libc::sockaddr_in>()
                }
                IpAddr::V6(a) => {
                    let sin6 = libc::sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: 0,
                        sin6_flowinfo: 0,
                        sin6_addr: libc::in6_addr {
                            s6_addr: a.octets(),
                        },
                        sin6_scope_id: 0,
                    };
                    // SAFETY: sockaddr_storage is larger than sockaddr_in6.
                    unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
                    std::mem::size_of::<libc::sockaddr_in6>()
                }
            };
            // SAFETY: the buffer and address are valid for the call; fd is
            // ours and closed right after.
            let n = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const ss).cast(),
                    len as libc::socklen_t,
                )
            };
            let err = std::io::Error::last_os_error();
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            if n < 0 {
                return Err(err);
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("sending the crafted packet: {e}"))
}

/// Sends crafted ESP from the host namespace to the guest (esptun
/// stopped), and reports what the guest's UDP application received.
fn crafted_to_guest(
    host: &Host,
    guest: &mut Guest,
    case: Case,
    packet: &[u8],
) -> Result<Option<Vec<u8>>, String> {
    guest.spawn("recv", "nettool udp-recv 7000 3000")?;
    guest.wait_output("recv", "listening", CMD_TIMEOUT)?;
    send_to_guest(host, case, packet)?;
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

/// The guest sends one crafted ESP-in-UDP packet from port 4501 (bypassing
/// its own policies) to esptun.
fn guest_send_crafted(guest: &mut Guest, to: IpAddr, packet: &[u8]) -> Result<(), String> {
    let (rc, out) = guest.run(
        &format!("nettool send-hex {to} 4500 4501 {}", hex(packet)),
        CMD_TIMEOUT,
    )?;
    if rc != 0 {
        return Err(format!("guest send-hex: {rc} {out}"));
    }
    Ok(())
}

/// The guest sends crafted ESP-in-UDP to esptun; reports what the host's
/// UDP application received.
fn crafted_to_esptun(
    host: &Host,
    guest: &mut Guest,
    case: Case,
    packet: &[u8],
) -> Result<Option<Vec<u8>>, String> {
    let to = case.host();
    let sock = host
        .ns
        .run(move || UdpSocket::bind(SocketAddr::new(to, 7000)))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    guest_send_crafted(guest, to, packet)?;
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
        "icmpv6.type",
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
        if f.len() != 7 {
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
        if !f[3].is_empty() || !f[4].is_empty() {
            d.icmp += 1;
        }
        if f[5].split(',').any(|v| v == "1" || v == "True") {
            d.icv_good += 1;
        }
        if f[6].split(',').any(|v| v == "1" || v == "True") {
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

/// One row of the difference table.
#[derive(Debug)]
struct Row {
    who: &'static str,
    /// "UDP" (measured at the application) or "TCP" (measured at the
    /// receiving TCP stack).
    proto: &'static str,
    /// Whether the corrupted packet is expected to get through.
    corrupt_expected: bool,
    outcome: Outcome,
}

/// What one case measured, for the summary.
#[derive(Debug, Default)]
struct Report {
    lines: Vec<String>,
    rows: Vec<Row>,
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
        let (host, guest) = (case.host(), case.guest());
        let encap = match (case.natt, case.v6) {
            (false, _) => "",
            (true, false) => " encap espinudp 4500 4500 0.0.0.0",
            (true, true) => " encap espinudp 4500 4500 ::",
        };
        let esn = if case.esn {
            " flag esn replay-window 128"
        } else {
            " replay-window 64"
        };
        let aead = |k: &str| format!("aead 'rfc4106(gcm(aes))' 0x{k} 128");
        // Guest -> host: the guest's outbound (esptun's inbound key).
        self.guest_sh(&format!(
            "/sbin/ip xfrm state add src {guest} dst {host} proto esp spi {SPI_IN:#x} reqid 1 \
             mode transport{esn} {}{encap}",
            aead(&keys.inb_hex)
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm state add src {host} dst {guest} proto esp spi {SPI_OUT:#x} reqid 1 \
             mode transport{esn} {}{encap}",
            aead(&keys.out_hex)
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm policy add src {guest} dst {host} dir out priority 10 \
             tmpl src {guest} dst {host} proto esp reqid 1 mode transport"
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm policy add src {host} dst {guest} dir in priority 10 \
             tmpl src {host} dst {guest} proto esp reqid 1 mode transport"
        ))?;
        if case.v6 {
            // Neighbour solicitations and advertisements (ICMPv6, protocol
            // 58: the guest has no /etc/protocols) stay in the clear
            // (the unicast ones match the selectors above): the host's
            // kernel sends its own on the TAP, outside esptun, and IKE
            // daemons install the same bypass.
            for ty in [135, 136] {
                for dir in ["out", "in"] {
                    self.guest_sh(&format!(
                        "/sbin/ip xfrm policy add src ::/0 dst ::/0 proto 58 type {ty} \
                         dir {dir} priority 1"
                    ))?;
                }
            }
        }
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
        let (host, guest) = (case.host(), case.guest());
        let ping = lab::ping(&self.host.ns, guest, 5, Duration::from_secs(20))
            .map_err(|e| e.to_string())?;
        if ping.received != 5 {
            return Err(format!("host -> guest ping: {ping:?}"));
        }
        let ping_cmd = if case.v6 { "ping6" } else { "ping" };
        let out = self.guest_sh(&format!("{ping_cmd} -c 3 -W 3 {host}"))?;
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
        let (sent, echoed) = udp_echo(&self.host.ns, host, guest, UDP_COUNT)?;
        if echoed != UDP_COUNT {
            return Err(format!(
                "UDP echo: {echoed} of {UDP_COUNT} datagrams came back intact ({sent} sent)"
            ));
        }
        let sink = udp_sink(
            &self.host.ns,
            host,
            5003,
            UDP_COUNT,
            Duration::from_secs(30),
        );
        self.guest_sh(&format!(
            "nettool udp-send {host} 5003 {UDP_COUNT} {UDP_SIZE}"
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
        let took = tcp_send_zeros(&self.host.ns, guest, TCP_BYTES)?;
        let out = self.guest.wait_output("sink", "bytes=", TRAFFIC_TIMEOUT)?;
        if !out.contains(&format!("bytes={TCP_BYTES} nonzero=0 ")) || !out.contains("eof=1") {
            return Err(format!("host -> guest TCP: guest's sink says {out:?}"));
        }
        let rx = tcp_sink(&self.host.ns, host);
        let started = Instant::now();
        let (rc, out) = self.guest.run(
            &format!(
                "nettool tcp-zeros {host} 5004 {TCP_BYTES} {}",
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

        // The difference that matters, for UDP (measured at the receiving
        // application) and TCP (measured at the receiving TCP stack: a
        // segment to a closed port is counted in InSegs, and answered with
        // a reset if its checksum is accepted, or counted in InCsumErrors).
        let payload = crafted_payload();
        let tcp_watch = ["Tcp:InSegs", "Tcp:InCsumErrors", "esptun:inner_checksum"];
        let settle_time = Duration::from_secs(3);
        if case.natt {
            // To esptun: sealed with the guest's outbound key, sent by the guest.
            let seg = udp_segment(guest, host, 7001, 7000, &payload);
            let ((good, good_seg), (bad, bad_seg)) = craft_pair(
                &keys.inb,
                SPI_IN,
                CRAFTED_SEQ,
                case.esn,
                UDP,
                (guest, host),
                &seg,
            );
            let before = host_counters(&self.host, index)?;
            let control = crafted_to_esptun(&self.host, &mut self.guest, case, &good)?;
            let corrupt = crafted_to_esptun(&self.host, &mut self.guest, case, &bad)?;
            std::thread::sleep(Duration::from_millis(500));
            let after = host_counters(&self.host, index)?;
            let key = "esptun:inner_checksum";
            let (b, a) = (get(&before, key), get(&after, key));
            report.rows.push(Row {
                who: "esptun",
                proto: "UDP",
                corrupt_expected: false,
                outcome: Outcome {
                    control_delivered: control.as_deref() == Some(&good_seg[8..]),
                    corrupt_delivered: corrupt.is_some(),
                    detail: format!(
                        "inner_checksum drops {b} -> {a}{}",
                        if corrupt.as_deref() == Some(&bad_seg[8..]) {
                            " (delivered the corrupted payload!)"
                        } else {
                            ""
                        }
                    ),
                },
            });
            if a != b.wrapping_add(1) {
                return Err(format!(
                    "esptun's inner_checksum counter went {b} -> {a} for UDP, expected +1"
                ));
            }

            // TCP, to a closed port in the host namespace: esptun decides
            // whether the namespace's kernel sees the segment at all.
            let seg = tcp_segment(guest, host, 7001, CLOSED_TCP_PORT, &payload);
            let ((good, _), (bad, _)) = craft_pair(
                &keys.inb,
                SPI_IN,
                CRAFTED_SEQ + 2,
                case.esn,
                TCP,
                (guest, host),
                &seg,
            );
            let before = host_counters(&self.host, index)?;
            guest_send_crafted(&mut self.guest, host, &good)?;
            let mid = settle(
                || host_counters(&self.host, index),
                &before,
                &tcp_watch,
                settle_time,
            )?;
            guest_send_crafted(&mut self.guest, host, &bad)?;
            let after = settle(
                || host_counters(&self.host, index),
                &mid,
                &tcp_watch,
                settle_time,
            )?;
            let (control_ok, control_detail) = tcp_verdict(&before, &mid);
            let (corrupt_ok, corrupt_detail) = tcp_verdict(&mid, &after);
            let (b, a) = (get(&mid, key), get(&after, key));
            report.rows.push(Row {
                who: "esptun",
                proto: "TCP",
                corrupt_expected: false,
                outcome: Outcome {
                    control_delivered: control_ok,
                    corrupt_delivered: corrupt_ok,
                    detail: format!(
                        "inner_checksum drops {b} -> {a}; host TCP: control {control_detail}, \
                         corrupted {corrupt_detail}"
                    ),
                },
            });
            if a != b.wrapping_add(1) {
                return Err(format!(
                    "esptun's inner_checksum counter went {b} -> {a} for TCP, expected +1"
                ));
            }
        }
        let status = self.host.stop_esptun()?;
        if !status.success() {
            return Err(format!("esptun exited with {status}"));
        }
        // To the kernel: sealed with esptun's outbound key, sent from the
        // host namespace with esptun stopped.
        let seg = udp_segment(host, guest, 7001, 7000, &payload);
        let ((good, good_seg), (bad, bad_seg)) = craft_pair(
            &keys.out,
            SPI_OUT,
            CRAFTED_SEQ,
            case.esn,
            UDP,
            (host, guest),
            &seg,
        );
        let (_, csum_key) = udp_keys(case.v6);
        let before = guest_counters(&mut self.guest)?;
        let control = crafted_to_guest(&self.host, &mut self.guest, case, &good)?;
        let corrupt = crafted_to_guest(&self.host, &mut self.guest, case, &bad)?;
        let after = guest_counters(&mut self.guest)?;
        report.rows.push(Row {
            who: "Linux kernel",
            proto: "UDP",
            corrupt_expected: case.natt,
            outcome: Outcome {
                control_delivered: control.as_deref() == Some(&good_seg[8..]),
                corrupt_delivered: corrupt.as_deref() == Some(&bad_seg[8..]),
                detail: format!(
                    "{csum_key} {} -> {}{}",
                    get(&before, csum_key),
                    get(&after, csum_key),
                    match &corrupt {
                        Some(p) if p[..] != bad_seg[8..] => " (delivered other bytes!)",
                        _ => "",
                    }
                ),
            },
        });
        // TCP, to a closed port of the guest.
        let seg = tcp_segment(host, guest, 7001, CLOSED_TCP_PORT, &payload);
        let ((good, _), (bad, _)) = craft_pair(
            &keys.out,
            SPI_OUT,
            CRAFTED_SEQ + 2,
            case.esn,
            TCP,
            (host, guest),
            &seg,
        );
        let before = guest_counters(&mut self.guest)?;
        send_to_guest(&self.host, case, &good)?;
        let mid = settle(
            || guest_counters(&mut self.guest),
            &before,
            &tcp_watch,
            settle_time,
        )?;
        send_to_guest(&self.host, case, &bad)?;
        let after = settle(
            || guest_counters(&mut self.guest),
            &mid,
            &tcp_watch,
            settle_time,
        )?;
        let (control_ok, control_detail) = tcp_verdict(&before, &mid);
        let (corrupt_ok, corrupt_detail) = tcp_verdict(&mid, &after);
        report.rows.push(Row {
            who: "Linux kernel",
            proto: "TCP",
            corrupt_expected: case.natt,
            outcome: Outcome {
                control_delivered: control_ok,
                corrupt_delivered: corrupt_ok,
                detail: format!("guest TCP: control {control_detail}, corrupted {corrupt_detail}"),
            },
        });
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
    if !common::require_root(test, "network namespace, TAP device, qemu guest") {
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
        vec!["addr", "add", "2001:db8:50::1/64", "dev", "tap0", "nodad"],
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
        suite.guest_sh(
            "/sbin/ip link set eth0 up && /sbin/ip addr add 198.18.50.2/24 dev eth0 && \
             /sbin/ip -6 addr add 2001:db8:50::2/64 dev eth0 nodad",
        )?;
        suite.guest.spawn("natt", "nettool natt-socket 4500")?;
        suite.guest.wait_output("natt", "ready", CMD_TIMEOUT)?;
        // ESP-in-UDP over IPv6: an AF_INET6 socket with UDP_ENCAP (5.8+).
        suite.guest.spawn("natt6", "nettool natt-socket 4500 6")?;
        suite.guest.wait_output("natt6", "ready", CMD_TIMEOUT)?;
        // The plain path first, so a failure later is about ESP.
        for to in [IpAddr::V4(GUEST), IpAddr::V6(GUEST6)] {
            let p = lab::ping(&suite.host.ns, to, 3, Duration::from_secs(30))
                .map_err(|e| e.to_string())?;
            if p.received == 0 {
                return Err(format!("the guest does not answer plain ping {to}: {p:?}"));
            }
        }
        Ok(())
    })();
    if let Err(e) = setup {
        let diag = suite.guest.diagnostics();
        panic!("{test}: guest setup: {e}\n{diag}");
    }

    let case = |v6, natt, key_bits, esn| Case {
        v6,
        natt,
        key_bits,
        esn,
    };
    let cases = [
        case(false, false, 128, true),
        case(false, false, 256, false),
        case(false, true, 128, false),
        case(false, true, 256, true),
        case(true, false, 256, true),
        case(true, true, 128, false),
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
        "\ncorrupted block (valid ICV, wrong inner checksum) vs. a valid control packet\n\
         (UDP: what the application received; TCP: what the receiving TCP stack did with a\n\
         segment to a closed port, from its counters; an accepted one is answered with a reset):\n",
    );
    let mut failures = Vec::new();
    for (case, report) in &outcomes {
        for row in &report.rows {
            let o = &row.outcome;
            let (ok, not, through) = if row.proto == "TCP" {
                (
                    "accepted",
                    "NOT accepted",
                    "ACCEPTED by TCP (no checksum error)",
                )
            } else {
                ("delivered", "NOT delivered", "DELIVERED to the application")
            };
            let _ = writeln!(
                table,
                "  {:<31} {} -> {:<12}: control {}, corrupted {} ({})",
                case.name(),
                row.proto,
                row.who,
                if o.control_delivered { ok } else { not },
                if o.corrupt_delivered {
                    through
                } else {
                    "dropped"
                },
                o.detail
            );
            if !o.control_delivered || o.corrupt_delivered != row.corrupt_expected {
                failures.push(format!(
                    "{} {} -> {}: {o:?}",
                    case.name(),
                    row.proto,
                    row.who
                ));
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
