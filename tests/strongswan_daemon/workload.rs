//! What every working case carries: ICMP echo both ways, UDP datagrams
//! both ways checked byte by byte, a TCP stream of zeros both ways
//! checked byte by byte; then esptun's drop counters and the guest's
//! `/proc/net/xfrm_stat` must not have moved.

use std::time::{Duration, Instant};

use esptun::lab;

use crate::lab::Lab;
use crate::traffic::{tcp_send_zeros, tcp_sink, udp_echo, udp_sink};
use crate::{CMD_TIMEOUT, TCP_BYTES, TRAFFIC_TIMEOUT, UDP_COUNT, UDP_SIZE};

pub use crate::common::{Established, established};

/// Waits (bounded) until esptun shows an established IKE SA with a CHILD
/// SA in its datapath and charon an INSTALLED CHILD SA with the same
/// SPIs; returns esptun's view and charon's `--list-sas`.
pub fn wait_established(lab: &mut Lab, timeout: Duration) -> Result<(Established, String), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = lab.status()?;
        if let Some(e) = established(&s).filter(|e| !e.2.is_empty())
            && s["outbound_sas"].as_array().is_some_and(|a| !a.is_empty())
        {
            let sas = lab.sh("/usr/sbin/swanctl --list-sas --ike esptun")?;
            let (inb, out) = *e.2.last().expect("not empty");
            // charon's inbound SPI is our outbound one and the reverse.
            let ours = format!("in  {out:08x}");
            let theirs = format!("out {inb:08x}");
            if sas.contains("INSTALLED")
                && sas.contains("TRANSPORT")
                && sas.contains(&ours)
                && sas.contains(&theirs)
            {
                return Ok((e, sas));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "esptun's CHILD SA {inb:08x}/{out:08x} is not charon's:\n{sas}"
                ));
            }
        } else if Instant::now() >= deadline {
            return Err(format!("no established IKE SA in time: {:#}", s["ike"]));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The sum of esptun's drops, outbound `no_sa` aside (the TUN's own IPv6
/// chatter, which has no peer).
pub fn drops(s: &serde_json::Value) -> (u64, u64) {
    let no_sa = s["outbound"]["drops"]["no_sa"].as_u64().unwrap_or(0);
    let out = s["outbound"]["dropped"].as_u64().unwrap_or(u64::MAX);
    let inb = s["inbound"]["dropped"].as_u64().unwrap_or(u64::MAX);
    (out.saturating_sub(no_sa), inb)
}

/// The traffic of one case; lines for the report.
pub fn run(lab: &mut Lab) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let (host, guest) = lab.addrs();
    let stat_before = lab.sh("cat /proc/net/xfrm_stat")?;
    let drops_before = drops(&lab.status()?);

    let t = Instant::now();
    let ping = lab::ping(&lab.ns, guest, 5, Duration::from_secs(20)).map_err(|e| e.to_string())?;
    if ping.received != 5 {
        return Err(format!("host -> guest ping: {ping:?}"));
    }
    let ping_cmd = if host.is_ipv6() { "ping6" } else { "ping" };
    let out = lab.sh(&format!("{ping_cmd} -c 3 -W 3 {host}"))?;
    if !out.contains("3 packets received") {
        return Err(format!("guest -> host ping: {out}"));
    }
    stage(lab, &stat_before, "ping")?;
    lines.push(format!(
        "ping host->guest {}/{}, guest->host 3/3 ({:.1} s)",
        ping.received,
        ping.sent,
        t.elapsed().as_secs_f64()
    ));

    lab.guest()
        .spawn("echo", &format!("nettool udp-echo 5002 {UDP_COUNT} 60000"))?;
    lab.guest().wait_output("echo", "listening", CMD_TIMEOUT)?;
    let (sent, echoed) = udp_echo(&lab.ns, (host, guest), 5002, UDP_COUNT, UDP_SIZE)?;
    if echoed != UDP_COUNT {
        return Err(format!(
            "UDP echo: {echoed} of {UDP_COUNT} datagrams came back intact ({sent} sent)"
        ));
    }
    let sink = udp_sink(
        &lab.ns,
        host,
        5003,
        (UDP_COUNT, UDP_SIZE),
        Duration::from_secs(30),
    );
    lab.sh(&format!(
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
    lines.push(format!(
        "UDP {UDP_COUNT} x {UDP_SIZE} B host->guest echoed back byte-exact ({sent} sent), \
         {got}/{UDP_COUNT} guest->host byte-exact"
    ));

    stage(lab, &stat_before, "UDP")?;
    let (there, back) = tcp_both_ways(lab)?;
    let mbit = |d: Duration| TCP_BYTES as f64 * 8.0 / d.as_secs_f64() / 1e6;
    lines.push(format!(
        "TCP {} MiB of zeros host->guest in {:.1} s ({:.0} Mbit/s), guest->host in {:.1} s \
         ({:.0} Mbit/s), every byte checked",
        TCP_BYTES >> 20,
        there.as_secs_f64(),
        mbit(there),
        back.as_secs_f64(),
        mbit(back)
    ));

    std::thread::sleep(Duration::from_millis(500));
    let s = lab.status()?;
    let drops_after = drops(&s);
    if drops_after != drops_before {
        return Err(format!(
            "esptun dropped packets (outbound, inbound) {drops_before:?} -> {drops_after:?}: \
             out {:#} in {:#}",
            s["outbound"]["drops"], s["inbound"]["drops"]
        ));
    }
    let stat_after = lab.sh("cat /proc/net/xfrm_stat")?;
    if stat_after != stat_before {
        return Err(format!(
            "guest xfrm_stat changed:\nbefore:\n{stat_before}\nafter:\n{stat_after}"
        ));
    }
    lines.push(format!(
        "esptun drops unchanged {drops_after:?} (outbound no_sa aside); guest \
         /proc/net/xfrm_stat unchanged"
    ));
    Ok(lines)
}

/// The guest's xfrm_stat must still be `before` after `what`.
fn stage(lab: &mut Lab, before: &str, what: &str) -> Result<(), String> {
    let now = lab.sh("cat /proc/net/xfrm_stat")?;
    if now != before {
        let moved: Vec<String> = before
            .lines()
            .zip(now.lines())
            .filter(|(b, n)| b != n)
            .map(|(b, n)| {
                format!(
                    "{} -> {}",
                    b.split_whitespace().collect::<Vec<_>>().join(" "),
                    n.split_whitespace().last().unwrap_or("")
                )
            })
            .collect();
        return Err(format!(
            "guest xfrm_stat moved during {what}: {}",
            moved.join(", ")
        ));
    }
    Ok(())
}

/// TCP zeros host -> guest, then guest -> host, every byte checked.
pub fn tcp_both_ways(lab: &mut Lab) -> Result<(Duration, Duration), String> {
    let (host, guest) = lab.addrs();
    let stat = lab.sh("cat /proc/net/xfrm_stat")?;
    lab.guest().spawn(
        "sink",
        &format!("nettool tcp-sink 5001 {}", TRAFFIC_TIMEOUT.as_millis()),
    )?;
    lab.guest().wait_output("sink", "listening", CMD_TIMEOUT)?;
    let there = tcp_send_zeros(&lab.ns, guest, TCP_BYTES)?;
    let out = lab.guest().wait_output("sink", "bytes=", TRAFFIC_TIMEOUT)?;
    if !out.contains(&format!("bytes={TCP_BYTES} nonzero=0 ")) || !out.contains("eof=1") {
        return Err(format!("host -> guest TCP: guest's sink says {out:?}"));
    }
    stage(lab, &stat, "TCP host->guest")?;
    let rx = tcp_sink(&lab.ns, host);
    let started = Instant::now();
    let (rc, out) = lab.guest().run(
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
    stage(lab, &stat, "TCP guest->host")?;
    Ok((there, back))
}
