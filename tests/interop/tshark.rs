//! The independent decoder: dumpcap captures the TAP, tshark decrypts it
//! with the records of `esptun wireshark-keys`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use esptun::lab::Netns;

use crate::common::{run_bounded, wait_bounded};
use crate::{SPI_IN, SPI_OUT, UDP_LARGE_SIZE, UDP_SIZE};

pub fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists())
}

/// Counts tshark's decryption of the capture, per SPI.
#[derive(Debug, Default, Clone, Copy)]
pub struct Decoded {
    pub esp: u32,
    pub udp: u32,
    /// Whole datagrams over the MTU, one ESP packet each.
    pub udp_large: u32,
    pub tcp_segments: u32,
    pub icmp: u32,
    pub icv_good: u32,
    pub icv_bad: u32,
}

pub fn tshark_decode(
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
        if f[1]
            .split(',')
            .any(|n| n.parse::<usize>() == Ok(UDP_LARGE_SIZE))
        {
            d.udp_large += 1;
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
/// The IP fragments in a capture, by source address: (first, others).
pub fn fragments_by_source(
    tshark: &Path,
    capture: &Path,
    dir: &Path,
    sources: (std::net::IpAddr, std::net::IpAddr),
) -> Result<(u32, u32), String> {
    let mut cmd = Command::new(tshark);
    cmd.arg("-n").arg("-r").arg(capture);
    cmd.args([
        "-Y",
        "ip.flags.mf == 1 || ip.frag_offset > 0 || ipv6.fraghdr.ident",
        "-T",
        "fields",
        "-e",
        "ip.src",
        "-e",
        "ipv6.src",
    ]);
    let (status, out, err) = run_bounded(cmd, dir, "tshark", Duration::from_secs(120))?;
    if !status.success() {
        return Err(format!("tshark exited with {status}: {err}"));
    }
    let (mut a, mut b) = (0, 0);
    for line in out.lines() {
        let src = line
            .split('\t')
            .find_map(|f| f.parse::<std::net::IpAddr>().ok());
        if src == Some(sources.0) {
            a += 1;
        } else if src == Some(sources.1) {
            b += 1;
        }
    }
    Ok((a, b))
}

pub struct Capture {
    pub child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    pub fn start(ns: &Netns, dumpcap: &Path, dir: &Path) -> Result<Capture, String> {
        let file = dir.join("wire.pcapng");
        let log = dir.join("dumpcap.log");
        let child = ns
            .command(dumpcap)
            // ESP, NAT-T, and the outer fragments after the first, which
            // carry no UDP header.
            .args([
                "-q",
                "-i",
                "tap0",
                "-f",
                "esp or udp port 4500 or (ip[6:2] & 0x1fff != 0) or (ip6 and ip6[6] == 44)",
                "-w",
            ])
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
                // The message comes as the interface is opened; on a busy
                // machine the first packets after it can still miss the
                // capture. A short settle costs nothing.
                std::thread::sleep(Duration::from_millis(500));
                return Ok(capture);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "dumpcap did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    pub fn stop(mut self) -> Result<PathBuf, String> {
        let mut child = self.child.take().ok_or("dumpcap is not running")?;
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // Our own child, not yet reaped; a failure means it is gone.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
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

pub fn wireshark_keys(config: &Path) -> Result<Vec<String>, String> {
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

/// tshark and dumpcap, or `None` after reporting that `test` skips the
/// independent decoder (a failure under `ESPTUN_REQUIRE_TSHARK=1`).
pub fn tshark_tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    match (find_tool("tshark"), find_tool("dumpcap")) {
        (Some(t), Some(d)) => Some((t, d)),
        _ => {
            let why = "tshark/dumpcap are not installed: the independent decoder is skipped \
                       (Debian: apt-get install tshark)";
            crate::common::skip_unless_required(test, "ESPTUN_REQUIRE_TSHARK", why);
            None
        }
    }
}
