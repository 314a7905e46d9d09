//! Interoperability with the Linux kernel's own ESP: a real Debian kernel in
//! a qemu guest (TCG) is the peer of a real `esptun run` on the host side.
//!
//! `tests/interop/build-guest.sh` fetches the kernel (`apt-get download`,
//! `dpkg-deb -x`) and builds an initramfs (static busybox, iproute2's `ip`
//! with its libraries, the ESP/AES-GCM/RNG/virtio modules, `nettool`), cached
//! in `${ESPTUN_INTEROP_CACHE:-/var/cache/esptun-interop}` (the image also
//! holds strongSwan's charon, for `tests/strongswan.rs`). The test creates
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
//!
//! The code: [`guest`] boots and drives qemu, [`host`] configures and runs
//! esptun, [`cases`] holds the case table and the traffic checks
//! ([`traffic`], [`tshark`], [`counters`]), [`xfrm`] the guest's SAs,
//! [`corrupt`] the corrupted-block difference, [`report`] the summary.

#[path = "../common/mod.rs"]
mod common;

mod cases;
mod corrupt;
mod counters;
mod craft;
mod guest;
mod host;
mod report;
mod traffic;
mod tshark;
mod xfrm;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use esptun::lab::{self, Netns};

use cases::CASES;
use guest::{Guest, build_guest};
use host::Host;
use report::difference_table;
use tshark::tshark_tools;

pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
pub const GUEST: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x50, 0, 0, 0, 0, 1);
pub const GUEST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x50, 0, 0, 0, 0, 2);
pub const SPI_OUT: u32 = 0xa001; // host -> guest
pub const SPI_IN: u32 = 0xb001; // guest -> host
/// Distinctive UDP payload size, so tshark's finds cannot be a coincidence.
pub const UDP_SIZE: usize = 1337;
pub const UDP_COUNT: u32 = 20;
/// Over the 1500-byte MTU: fragmented on the wire, whole inside ESP.
pub const UDP_LARGE_SIZE: usize = 9001;
pub const UDP_LARGE_COUNT: u32 = 5;
pub const TCP_BYTES: u64 = 4 << 20;
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
pub const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(120);
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Far above any sequence number the traffic used (esptun reserves in
/// blocks of 2^20), so a crafted packet never reuses a nonce.
pub const CRAFTED_SEQ: u64 = 1 << 22;

/// Fields drop in order: the guest (qemu) first, then the host side
/// (esptun, namespace, files).
pub struct Suite {
    pub guest: Guest,
    pub host: Host,
    pub tshark: Option<(PathBuf, PathBuf)>,
}

impl Suite {
    pub fn guest_sh(&mut self, cmd: &str) -> Result<String, String> {
        let (rc, out) = self.guest.run(cmd, CMD_TIMEOUT)?;
        if rc != 0 {
            return Err(format!("guest: `{cmd}` failed ({rc}): {out}"));
        }
        Ok(out)
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
        tshark: tshark_tools(test),
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

    let cases = CASES;
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

    let (table, failures) = difference_table(&outcomes);
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
