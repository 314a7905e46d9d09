//! The independent checks of the first case of each family: tshark
//! decrypts the IKE exchange (keys from `esptun wireshark-keys --ike`) and
//! every captured ESP packet, and esptun drops the corrupted-block packet
//! of `tests/interop/corrupt.rs` on the IKE-made CHILD SA as
//! `inner_checksum`.
//!
//! The ESP records come from the guest kernel's SAs (`ip xfrm state`, the
//! keys charon derived), so that the decoder does not depend on esptun's
//! own export; that `esptun wireshark-keys -c` prints the same records
//! for the `[peer.ike]` peer is [`crate::lifecycle`]'s
//! `strongswan_daemon_wireshark_child_keys`.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use esptun::crypto::IcvLen;
use esptun::sa::KeyMaterial;

use crate::common::{run_bounded, wait_bounded};
use crate::craft::{UDP, craft, crafted_payload, udp_segment};
use crate::lab::Lab;
use crate::workload::Established;
use crate::{UDP_COUNT, UDP_SIZE};

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists())
}

/// dumpcap on the TAP: IKE (500, 4500) and ESP.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    tshark: PathBuf,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Capture {
    /// `None` (after a SKIPPED line, a failure under
    /// `ESPTUN_REQUIRE_TSHARK=1`) without tshark and dumpcap.
    pub fn start(lab: &Lab, test: &str) -> Option<Capture> {
        let (Some(tshark), Some(dumpcap)) = (find_tool("tshark"), find_tool("dumpcap")) else {
            crate::common::skip_unless_required(
                test,
                "ESPTUN_REQUIRE_TSHARK",
                "tshark/dumpcap are not installed: the independent decoder is skipped",
            );
            return None;
        };
        let file = lab.dir.join("wire.pcapng");
        let log = lab.dir.join("dumpcap.log");
        let child = lab
            .ns
            .command(&dumpcap)
            .args([
                "-q",
                "-i",
                "tap0",
                "-f",
                "esp or udp port 500 or udp port 4500",
            ])
            .arg("-w")
            .arg(&file)
            .args(["-a", "duration:900"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("dumpcap log"))
            .spawn()
            .expect("starting dumpcap");
        let capture = Capture {
            child: Some(child),
            file,
            tshark,
        };
        for _ in 0..300 {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Capturing on")
            {
                std::thread::sleep(Duration::from_millis(500));
                return Some(capture);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "dumpcap did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn stop(mut self) -> Result<PathBuf, String> {
        let mut child = self.child.take().ok_or("dumpcap is not running")?;
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // Our own child, not yet reaped.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        wait_bounded(&mut child, Duration::from_secs(15))?;
        Ok(self.file.clone())
    }
}

/// One SA of the guest kernel: (src, dst, SPI, key and salt).
pub type XfrmSa = (IpAddr, IpAddr, u32, Vec<u8>);

/// The guest's `ip xfrm state`, parsed.
pub fn guest_sas(lab: &mut Lab) -> Result<Vec<XfrmSa>, String> {
    let text = lab.sh("/sbin/ip xfrm state")?;
    let mut sas = Vec::new();
    let mut cur: Option<(IpAddr, IpAddr, u32)> = None;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["src", s, "dst", d, ..] => {
                cur = s.parse().ok().zip(d.parse().ok()).map(|(s, d)| (s, d, 0));
            }
            ["proto", "esp", "spi", spi, ..] => {
                if let (Some(c), Ok(v)) = (
                    cur.as_mut(),
                    u32::from_str_radix(spi.trim_start_matches("0x"), 16),
                ) {
                    c.2 = v;
                }
            }
            ["aead", _, key, "128"] => {
                if let Some((s, d, spi)) = cur {
                    let key = unhex(key.trim_start_matches("0x"))
                        .ok_or_else(|| format!("xfrm key {key}"))?;
                    sas.push((s, d, spi, key));
                }
            }
            _ => {}
        }
    }
    Ok(sas)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn run_tshark(
    tshark: &Path,
    file: &Path,
    dir: &Path,
    opts: &[String],
    fields: &[&str],
    filter: &str,
) -> Result<Vec<Vec<String>>, String> {
    let mut cmd = Command::new(tshark);
    cmd.arg("-n").arg("-r").arg(file);
    for o in opts {
        cmd.arg("-o").arg(o);
    }
    cmd.args(["-Y", filter, "-T", "fields", "-E", "separator=|"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let (status, out, err) = run_bounded(cmd, dir, "tshark", Duration::from_secs(180))?;
    if !status.success() {
        return Err(format!("tshark exited with {status}: {err}"));
    }
    Ok(out
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect())
}

/// tshark on the capture of the first case; lines for the report.
pub fn tshark(lab: &mut Lab, capture: Capture, sa: &Established) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let (tshark_bin, dir) = (capture.tshark.clone(), lab.dir.clone());
    // The IKE SA keys, from the running daemon.
    let out = Command::new(env!("CARGO_BIN_EXE_esptun"))
        .args(["wireshark-keys", "--ike", "-c"])
        .arg(lab.config())
        .output()
        .map_err(|e| format!("wireshark-keys --ike: {e}"))?;
    let ike_records: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if !out.status.success() || ike_records.is_empty() {
        return Err(format!(
            "wireshark-keys --ike: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (host, guest) = lab.addrs();
    let (family, ip) = if host.is_ipv6() {
        ("IPv6", "ipv6")
    } else {
        ("IPv4", "ipv4")
    };
    let sas = guest_sas(lab)?;
    let file = capture.stop()?;
    let mut opts: Vec<String> = ike_records
        .iter()
        .map(|r| format!("uat:ikev2_decryption_table:{r}"))
        .collect();
    opts.push("esp.enable_encryption_decode:TRUE".into());
    for (s, d, spi, key) in &sas {
        opts.push(format!(
            "uat:esp_sa:\"{family}\",\"{s}\",\"{d}\",\"0x{spi:08x}\",\"{}\",\"0x{}\",\"NULL\",\"\"",
            esptun::tools::wireshark::encryption_algorithm(IcvLen::Icv16),
            hex(key)
        ));
    }
    // IKE_AUTH both ways, decrypted: the identities inside SK.
    let auth = run_tshark(
        &tshark_bin,
        &file,
        &dir,
        &opts,
        &[
            "isakmp.ispi",
            &format!("isakmp.id.data.{ip}_addr"),
            "isakmp.auth.method",
            &format!("isakmp.ts.start_{ip}"),
        ],
        "isakmp.exchangetype == 35",
    )?;
    let ids: Vec<&str> = auth
        .iter()
        .filter_map(|f| f.get(1).map(String::as_str))
        .collect();
    let spi_i = sa.0.trim_start_matches("0x").to_lowercase();
    if auth.len() < 2
        || !auth.iter().all(|f| f[0].contains(&spi_i))
        || !ids.contains(&host.to_string().as_str())
        || !ids.contains(&guest.to_string().as_str())
    {
        return Err(format!(
            "tshark did not decrypt the IKE_AUTH exchange of {spi_i}: {auth:?} \
             (records {} ike)",
            ike_records.len()
        ));
    }
    lines.push(format!(
        "tshark decrypted IKE_AUTH with `wireshark-keys --ike`: {} messages, IDs {ids:?}, \
         TS {:?}",
        auth.len(),
        auth.iter().filter_map(|f| f.get(3)).collect::<Vec<_>>()
    ));
    // ESP: every packet of the CHILD SA decrypted, both ways.
    let esp = run_tshark(
        &tshark_bin,
        &file,
        &dir,
        &opts,
        &[
            "esp.spi",
            "esp.protocol",
            "data.len",
            "tcp.len",
            if host.is_ipv6() {
                "icmpv6.type"
            } else {
                "icmp.type"
            },
        ],
        "esp",
    )?;
    let (inb, out) = *sa.2.last().ok_or("no CHILD SA")?;
    for (spi, what) in [(out, "host->guest (esptun)"), (inb, "guest->host (kernel)")] {
        let rows: Vec<&Vec<String>> = esp
            .iter()
            .filter(|f| {
                u32::from_str_radix(f[0].trim_start_matches("0x"), 16).ok()
                    == u32::try_from(spi).ok()
            })
            .collect();
        let decrypted = rows
            .iter()
            .filter(|f| f.get(1).is_some_and(|p| !p.is_empty()))
            .count();
        let udp = rows
            .iter()
            .filter(|f| {
                f.get(2)
                    .is_some_and(|n| n.split(',').any(|n| n == UDP_SIZE.to_string()))
            })
            .count();
        let tcp = rows
            .iter()
            .filter(|f| {
                f.get(3)
                    .is_some_and(|n| n.split(',').any(|n| n.parse::<u32>().is_ok_and(|n| n > 0)))
            })
            .count();
        let icmp = rows
            .iter()
            .filter(|f| f.get(4).is_some_and(|t| !t.is_empty()))
            .count();
        if rows.is_empty()
            || decrypted != rows.len()
            || udp < UDP_COUNT as usize
            || tcp == 0
            || icmp < 3
        {
            return Err(format!(
                "tshark on {what} SPI {spi:08x}: {} ESP, {decrypted} decrypted, {udp} UDP/{UDP_SIZE}, \
                 {tcp} TCP with data, {icmp} ICMP (capture {})",
                rows.len(),
                file.display()
            ));
        }
        lines.push(format!(
            "tshark decrypted all {} ESP packets {what} SPI {spi:08x} ({udp} UDP/{UDP_SIZE}, \
             {tcp} TCP with data, {icmp} ICMP), keys from the guest's xfrm state",
            rows.len()
        ));
    }
    Ok(lines)
}

/// Raw ESP from "the guest" (an IPv4 or IPv6 header written here) to
/// esptun, through the namespace's own stack (a raw socket of protocol
/// IPPROTO_RAW takes the header as given, in both families).
fn inject(lab: &Lab, esp_packet: &[u8]) -> Result<(), String> {
    let (host, guest) = lab.addrs();
    let (domain, packet) = match (guest, host) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = u16::try_from(20 + esp_packet.len()).map_err(|e| e.to_string())?;
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 50, 0, 0];
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            let c = esptun::wire::checksum::finish(esptun::wire::checksum::sum(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            (socket2::Domain::IPV4, ip)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let len = u16::try_from(esp_packet.len()).map_err(|e| e.to_string())?;
            // Version 6, no traffic class or flow label; next header ESP.
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&len.to_be_bytes());
            ip.extend_from_slice(&[50, 64]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            (socket2::Domain::IPV6, ip)
        }
        _ => return Err(format!("mixed families {guest} {host}")),
    };
    let mut ip = packet;
    ip.extend_from_slice(esp_packet);
    lab.ns
        .run(move || -> Result<(), String> {
            let s = socket2::Socket::new(
                domain,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
            )
            .map_err(|e| format!("raw socket: {e}"))?;
            s.send_to(&ip, &SocketAddr::new(host, 0).into())
                .map_err(|e| format!("send: {e}"))?;
            Ok(())
        })
        .map_err(|e| e.to_string())?
}

/// The control packet reaches the UDP socket; its corrupted twin is
/// dropped by esptun as `inner_checksum`.
/// `esn`: the CHILD SA's (its sequence numbers' high half is in the AAD,
/// RFC 4106 section 5).
pub fn corrupted_block(lab: &mut Lab, sa: &Established, esn: bool) -> Result<Vec<String>, String> {
    let (host, guest) = lab.addrs();
    let (inb, _) = *sa.2.last().ok_or("no CHILD SA")?;
    let inb = u32::try_from(inb).map_err(|e| e.to_string())?;
    let (_, _, _, key) = guest_sas(lab)?
        .into_iter()
        .find(|s| s.2 == inb && s.0 == guest)
        .ok_or_else(|| format!("no guest SA {inb:08x}"))?;
    let key = KeyMaterial::from_bytes(&key).map_err(|e| e.to_string())?;
    // The datagram of tests/interop/corrupt.rs: guest:7001 -> host:7000.
    let payload = crafted_payload();
    let seg = udp_segment(guest, host, 7001, 7000, &payload);
    let seq = 1u64 << 22;
    let (good, _) = craft(&key, inb, seq, esn, UDP, &seg, false);
    let (bad, _) = craft(&key, inb, seq + 1, esn, UDP, &seg, true);
    let sock = lab
        .ns
        .run(move || UdpSocket::bind(SocketAddr::new(host, 7000)))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let drops = |lab: &Lab| -> Result<u64, String> {
        Ok(lab.status()?["inbound"]["drops"]["inner_checksum"]
            .as_u64()
            .unwrap_or(u64::MAX))
    };
    let before = drops(lab)?;
    inject(lab, &good)?;
    let mut buf = [0u8; 2048];
    let got = sock
        .recv(&mut buf)
        .map_err(|e| format!("the control datagram did not arrive: {e}"))?;
    if buf[..got] != payload[..] {
        return Err("the control datagram arrived changed".into());
    }
    inject(lab, &bad)?;
    if let Ok(n) = sock.recv(&mut buf) {
        return Err(format!("the corrupted datagram was delivered ({n} bytes)"));
    }
    let after = drops(lab)?;
    if after != before + 1 {
        return Err(format!("inner_checksum drops {before} -> {after}, want +1"));
    }
    Ok(vec![format!(
        "corrupted block on the CHILD SA {inb:08x} ({guest} -> {host}, ESN {esn}): control \
         datagram delivered intact, corrupted twin dropped, inner_checksum {before} -> {after}"
    )])
}
