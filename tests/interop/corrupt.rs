//! The difference that matters: a packet whose inner UDP or TCP checksum
//! is wrong because one 16-byte plaintext block was replaced by its
//! neighbour before an otherwise valid seal, next to a valid control
//! packet crafted the same way, sent to esptun and to the guest's kernel.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use esptun::sa::KeyMaterial;

use crate::cases::Case;
use crate::counters::{get, guest_counters, host_counters, settle, tcp_verdict, udp_keys};
use crate::guest::Guest;
use crate::host::{Host, Keys, hex, unhex};
use crate::report::{Outcome, Report, Row};
use crate::{CMD_TIMEOUT, CRAFTED_SEQ, SPI_IN, SPI_OUT, Suite};

pub use crate::craft::{
    CLOSED_TCP_PORT, TCP, UDP, checksum_ok, craft, crafted_payload, tcp_segment, udp_segment,
};

/// A control packet and its corrupted twin, checked: the control's inner
/// checksum is right, the twin's is wrong (sequence numbers `seq` and
/// `seq + 1`). Returns (control, corrupted): each the packet and the
/// segment as sealed.
pub type Crafted = (Vec<u8>, Vec<u8>);

pub fn craft_pair(
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

/// Sends one ESP packet (SPI onwards) from the host namespace to the guest
/// (esptun stopped): ESP-in-UDP from port 4500, or raw ESP.
pub fn send_to_guest(host: &Host, case: Case, packet: &[u8]) -> Result<(), String> {
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
pub fn crafted_to_guest(
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
pub fn guest_send_crafted(guest: &mut Guest, to: IpAddr, packet: &[u8]) -> Result<(), String> {
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
pub fn crafted_to_esptun(
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

impl Suite {
    /// The corrupted-block difference for `case`, its rows added to
    /// `report`: to esptun (NAT-T cases, esptun running), then to the
    /// guest's kernel (esptun stopped).
    pub fn corruption(
        &mut self,
        index: usize,
        case: Case,
        keys: &Keys,
        report: &mut Report,
    ) -> Result<(), String> {
        let (host, guest) = (case.host(), case.guest());
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
        Ok(())
    }
}
