//! The receiving TCP/UDP stacks' counters (`/proc/net/snmp`, `snmp6`) on
//! both sides, and esptun's `inner_checksum` drops next to them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::CMD_TIMEOUT;
use crate::guest::Guest;
use crate::host::Host;

/// `/proc/net/snmp` ("Tcp:InSegs") and `/proc/net/snmp6` ("Udp6InDatagrams")
/// as one map.
pub fn parse_snmp(text: &str) -> HashMap<String, u64> {
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

pub type Counters = HashMap<String, u64>;

pub fn get(c: &Counters, key: &str) -> u64 {
    c.get(key).copied().unwrap_or(u64::MAX)
}

/// The guest kernel's UDP/TCP counters (IPv4 and IPv6).
pub fn guest_counters(guest: &mut Guest) -> Result<Counters, String> {
    let (_, out) = guest.run("cat /proc/net/snmp /proc/net/snmp6", CMD_TIMEOUT)?;
    Ok(parse_snmp(&out))
}

/// The host namespace kernel's counters, and esptun's inner_checksum drops
/// when it runs.
pub fn host_counters(host: &Host, index: usize) -> Result<Counters, String> {
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
pub fn settle(
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
pub fn tcp_verdict(before: &Counters, after: &Counters) -> (bool, String) {
    let d = |k: &str| get(after, k).wrapping_sub(get(before, k));
    let (segs, csum, rsts) = (d("Tcp:InSegs"), d("Tcp:InCsumErrors"), d("Tcp:OutRsts"));
    (
        segs >= 1 && csum == 0 && rsts >= 1,
        format!("InSegs +{segs}, InCsumErrors +{csum}, OutRsts +{rsts}"),
    )
}

pub fn udp_keys(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("Udp6InDatagrams", "Udp6InCsumErrors")
    } else {
        ("Udp:InDatagrams", "Udp:InCsumErrors")
    }
}
