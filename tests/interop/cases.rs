//! The cases and what each checks: ICMP, UDP and TCP both ways, esptun's
//! and the guest kernel's counters, tshark's decryption; then the
//! corrupted-block difference ([`crate::corrupt`]).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use esptun::lab;

use crate::report::Report;
use crate::traffic::{tcp_send_zeros, tcp_sink, udp_echo, udp_sink};
use crate::tshark::{Capture, Decoded, fragments_by_source, tshark_decode, wireshark_keys};
use crate::{CMD_TIMEOUT, GUEST, GUEST6, HOST, HOST6, Suite, TCP_BYTES, TRAFFIC_TIMEOUT};
use crate::{UDP_COUNT, UDP_LARGE_COUNT, UDP_LARGE_SIZE, UDP_SIZE};

/// One interop case.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub v6: bool,
    pub natt: bool,
    pub key_bits: u32,
    pub esn: bool,
}

impl Case {
    pub const fn new(v6: bool, natt: bool, key_bits: u32, esn: bool) -> Case {
        Case {
            v6,
            natt,
            key_bits,
            esn,
        }
    }

    /// The host side's address (the TAP) in this case's family.
    pub fn host(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(HOST6)
        } else {
            IpAddr::V4(HOST)
        }
    }

    /// The guest's address in this case's family.
    pub fn guest(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(GUEST6)
        } else {
            IpAddr::V4(GUEST)
        }
    }

    pub fn name(&self) -> String {
        format!(
            "{} {} AES-{} {}",
            if self.v6 { "IPv6" } else { "IPv4" },
            if self.natt { "NAT-T" } else { "raw ESP" },
            self.key_bits,
            if self.esn { "ESN" } else { "32-bit seq" }
        )
    }
}

/// IPv4: raw ESP and NAT-T, AES-128 and AES-256, with and without ESN;
/// IPv6: raw ESP AES-256 ESN and NAT-T AES-128.
pub const CASES: [Case; 6] = [
    Case::new(false, false, 128, true),
    Case::new(false, false, 256, false),
    Case::new(false, true, 128, false),
    Case::new(false, true, 256, true),
    Case::new(true, false, 256, true),
    Case::new(true, true, 128, false),
];

impl Suite {
    pub fn run_case(&mut self, index: usize, case: Case) -> Result<Report, String> {
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
        let (sent, echoed) = udp_echo(&self.host.ns, (host, guest), 5002, UDP_COUNT, UDP_SIZE)?;
        if echoed != UDP_COUNT {
            return Err(format!(
                "UDP echo: {echoed} of {UDP_COUNT} datagrams came back intact ({sent} sent)"
            ));
        }
        let sink = udp_sink(
            &self.host.ns,
            host,
            5003,
            (UDP_COUNT, UDP_SIZE),
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

        // UDP larger than the MTU, both ways: the sending kernels fragment
        // (the guest's after ESP, as transport mode does; esptun's TUN
        // before it, which esptun reassembles and seals whole), and each
        // side must take the other's outer fragments back into one ESP
        // packet carrying the whole datagram.
        self.guest.spawn(
            "echo-large",
            &format!("nettool udp-echo 5006 {UDP_LARGE_COUNT} 60000"),
        )?;
        self.guest
            .wait_output("echo-large", "listening", CMD_TIMEOUT)?;
        let (sent, echoed) = udp_echo(
            &self.host.ns,
            (host, guest),
            5006,
            UDP_LARGE_COUNT,
            UDP_LARGE_SIZE,
        )?;
        if echoed != UDP_LARGE_COUNT {
            return Err(format!(
                "large UDP echo: {echoed} of {UDP_LARGE_COUNT} datagrams of {UDP_LARGE_SIZE} B \
                 came back intact ({sent} sent)"
            ));
        }
        let sink = udp_sink(
            &self.host.ns,
            host,
            5007,
            (UDP_LARGE_COUNT, UDP_LARGE_SIZE),
            Duration::from_secs(30),
        );
        self.guest_sh(&format!(
            "nettool udp-send {host} 5007 {UDP_LARGE_COUNT} {UDP_LARGE_SIZE}"
        ))?;
        let (got, bad) = sink
            .recv_timeout(Duration::from_secs(40))
            .map_err(|e| format!("large UDP sink: {e}"))?;
        if got != UDP_LARGE_COUNT || bad != 0 {
            return Err(format!(
                "guest -> host large UDP: {got} of {UDP_LARGE_COUNT} intact, {bad} wrong"
            ));
        }
        report.lines.push(format!(
            "UDP {UDP_LARGE_COUNT} x {UDP_LARGE_SIZE} B (over the MTU) host->guest->host echoed \
             intact ({sent} sent), {got}/{UDP_LARGE_COUNT} guest->host intact"
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
                if d.udp < UDP_COUNT
                    || d.udp_large < UDP_LARGE_COUNT
                    || d.tcp_segments == 0
                    || d.icmp < 3
                {
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
            // What each side put on the wire for the large datagrams: one
            // ESP packet per datagram (tshark decrypted it whole, above),
            // carried in outer IP fragments.
            let (from_host, from_guest) = fragments_by_source(&tshark, &file, &dir, (host, guest))?;
            if from_host == 0 || from_guest == 0 {
                return Err(format!(
                    "expected outer IP fragments both ways for the large datagrams: \
                     {from_host} from esptun's host, {from_guest} from the guest"
                ));
            }
            report.lines.push(format!(
                "large datagrams on the wire: one ESP packet each (tshark decrypted \
                 {} + {} whole {UDP_LARGE_SIZE} B datagrams), in outer IP fragments: \
                 {from_host} from the host, {from_guest} from the guest kernel",
                o.udp_large, i.udp_large
            ));
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

        self.corruption(index, case, &keys, &mut report)?;
        Ok(report)
    }
}
