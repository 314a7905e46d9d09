//! The human-readable forms of what the daemon reports.

use std::fmt::Write;

use esptun::crypto::select::FailurePolicy;
use esptun::daemon::status::{Counts, ReloadOutcome, Status};

/// `esptun status` without `--json`: the typed reply as tables.
pub fn status(v: &Status) -> String {
    let mut out = String::new();
    header(&mut out, v);
    outbound_sas(&mut out, v);
    inbound_sas(&mut out, v);
    ike_sas(&mut out, v);
    for (dir, d) in [("outbound", &v.outbound), ("inbound", &v.inbound)] {
        let _ = writeln!(out, "\n{dir}: {} passed, {} dropped", d.passed, d.dropped);
        for (reason, n) in d.drops.iter().filter(|(_, n)| **n > 0) {
            let _ = writeln!(out, "  {reason:<24} {n}");
        }
        let r = &d.reassembly;
        if r.fragments > 0 || r.datagrams_in_flight > 0 {
            let failed: Vec<String> = r
                .failures()
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "  reassembly: {} fragments, {} datagrams reassembled, {} atomic, {} duplicates; \
                 failed: {}; in flight: {} datagrams, {} bytes",
                r.fragments,
                r.reassembled,
                r.atomic,
                r.duplicates,
                if failed.is_empty() {
                    "none".to_string()
                } else {
                    failed.join(", ")
                },
                r.datagrams_in_flight,
                r.bytes_in_flight,
            );
        }
        if d.too_big_sent + d.too_big_suppressed > 0 {
            let _ = writeln!(
                out,
                "  packet too big answered {}, suppressed {}",
                d.too_big_sent, d.too_big_suppressed
            );
        }
        if d.mss_clamped > 0 {
            let _ = writeln!(out, "  TCP MSS clamped {}", d.mss_clamped);
        }
    }
    let io = counts(&v.io, |n| n > 0);
    if !io.is_empty() {
        let _ = writeln!(out, "\nI/O errors: {io}");
    }
    providers(&mut out, v);
    out
}

/// `esptun reload`: what the daemon did with the file.
pub fn reload(v: &ReloadOutcome) -> String {
    let mut out = String::new();
    if v.applied {
        out.push_str("reload applied: the running SAs follow the configuration\n");
    } else {
        out.push_str(
            "reload REFUSED (in whole or in part); what is refused keeps running as before:\n",
        );
        for why in &v.refused {
            let _ = writeln!(out, "  {why}");
        }
    }
    out
}

/// A span of seconds as `2h 3m 4s` (days above a day; zero units
/// left out, `0s` for none).
pub fn human_duration(secs: u64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3_600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".into()
    } else {
        text.join(" ")
    }
}

/// `0.4s ago` below ten seconds, `2m 5s ago` above.
pub fn ago(ms: u64) -> String {
    if ms < 10_000 {
        format!("{}.{}s ago", ms / 1000, ms % 1000 / 100)
    } else {
        format!("{} ago", human_duration(ms / 1000))
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, to the second.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Days to a proleptic Gregorian date (H. Hinnant's civil_from_days).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// An SA's last packet: `0.4s ago`, `never`, or `-` from a daemon that
/// does not say.
fn last_packet(ms_ago: Option<u64>, packets: u64) -> String {
    match (ms_ago, packets) {
        (Some(ms), _) => ago(ms),
        (None, 0) => "never".into(),
        (None, _) => "-".into(),
    }
}

fn header(out: &mut String, v: &Status) {
    let _ = writeln!(
        out,
        "esptun on {} (pid {}), up {}, outer {}, provider {} (mode {}, on failure {})",
        v.interface,
        v.pid,
        human_duration(v.uptime_secs),
        v.outer,
        v.provider.map_or("NONE: traffic halted", |p| p.as_str()),
        v.crypto_mode,
        match v.on_selftest_failure {
            FailurePolicy::Fallback => "fallback",
            FailurePolicy::Halt => "halt",
        },
    );
    let offloads = v.offloads.in_use();
    let _ = writeln!(
        out,
        "offloads in use: {}",
        if offloads.is_empty() {
            "none".to_string()
        } else {
            offloads.join(", ")
        }
    );
}

/// `name n, name n, ...` of the entries `keep` accepts.
fn counts(c: &Counts, keep: impl Fn(u64) -> bool) -> String {
    c.iter()
        .filter(|(_, n)| keep(**n))
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An SA's drop line, empty when it dropped nothing.
fn sa_drops(drops: &Counts) -> String {
    let list = counts(drops, |_| true);
    if list.is_empty() {
        String::new()
    } else {
        format!("    dropped: {list}\n")
    }
}

fn outbound_sas(out: &mut String, v: &Status) {
    let _ = writeln!(out, "\noutbound SAs:");
    let _ = writeln!(
        out,
        "  {:<12} {:>10} {:<8} {:<24} {:>12} {:>14} {:>14} {:>14}  last packet",
        "peer", "spi", "state", "endpoint", "packets", "bytes", "seq used", "seq reserved"
    );
    for sa in &v.outbound_sas {
        let _ = writeln!(
            out,
            "  {:<12} {:>#10x} {:<8} {:<24} {:>12} {:>14} {:>14} {:>14}  {}",
            sa.peer,
            sa.spi,
            sa.state,
            sa.endpoint,
            sa.packets,
            sa.bytes,
            sa.seq_used,
            sa.seq_reserved,
            last_packet(sa.last_packet_ms_ago, sa.packets),
        );
    }
    for sa in &v.outbound_sas {
        if let Some(path) = sa.path_mtu {
            let inner = sa
                .inner_mtu
                .map_or_else(|| "-".to_string(), |m| m.to_string());
            let _ = writeln!(
                out,
                "    {} {:#x}: path MTU {path}, inner MTU {inner}",
                sa.peer, sa.spi
            );
        }
        out.push_str(&sa_drops(&sa.drops));
    }
}

fn inbound_sas(out: &mut String, v: &Status) {
    let _ = writeln!(out, "\ninbound SAs:");
    let _ = writeln!(
        out,
        "  {:<12} {:>10} {:<8} {:>12} {:>14} {:>8} {:>14}  last packet",
        "peer", "spi", "state", "packets", "bytes", "window", "highest seq"
    );
    for sa in &v.inbound_sas {
        let _ = writeln!(
            out,
            "  {:<12} {:>#10x} {:<8} {:>12} {:>14} {:>8} {:>14}  {}",
            sa.peer,
            sa.spi,
            sa.state,
            sa.packets,
            sa.bytes,
            sa.replay_window,
            sa.replay_top,
            last_packet(sa.last_packet_ms_ago, sa.packets),
        );
        out.push_str(&sa_drops(&sa.drops));
    }
}

/// The IKE SAs and their failure counters, per peer keyed by IKE.
fn ike_sas(out: &mut String, v: &Status) {
    let Some(ike) = &v.ike else {
        return;
    };
    let _ = writeln!(out, "\nIKE SAs:");
    let _ = writeln!(
        out,
        "  {:<12} {:<10} {:<12} {:<16} {:<16} {:>8}  {:<22} CHILD SAs (in/out)",
        "peer", "role", "state", "SPIi", "SPIr", "age", "remote"
    );
    for p in &ike.peers {
        for sa in &p.sas {
            let children: Vec<String> = sa
                .children
                .iter()
                .map(|c| format!("{:#010x}/{:#010x}", c.inbound_spi, c.outbound_spi))
                .collect();
            let _ = writeln!(
                out,
                "  {:<12} {:<10} {:<12} {:<16} {:<16} {:>8}  {:<22} {}",
                p.peer,
                sa.role,
                sa.state,
                sa.spi_i,
                sa.spi_r,
                human_duration(sa.age_secs),
                sa.remote,
                children.join(" "),
            );
            ike_sa_timers(out, sa);
            let n = &sa.nat;
            if n.natt || n.local_behind || n.peer_behind {
                let _ = writeln!(
                    out,
                    "      NAT: we are behind one: {}, the peer: {}; NAT-T {}; keepalives {} \
                     (sent {})",
                    yes_no(n.local_behind),
                    yes_no(n.peer_behind),
                    if n.natt { "in use" } else { "off" },
                    if n.keepalives { "on" } else { "off" },
                    n.keepalives_sent
                );
            }
        }
        if p.sas.is_empty() {
            let _ = writeln!(out, "  {:<12} (none)", p.peer);
        }
        let c = &p.counters;
        let _ = writeln!(
            out,
            "    {}: established {}, CHILD SAs {} (failed {}), auth failures {}, proposal \
             mismatches {}, TS unacceptable {}, timeouts {}, other failures {}, messages \
             dropped {}",
            p.peer,
            c.established,
            c.children_installed,
            c.children_failed,
            c.auth_failures,
            c.proposal_mismatches,
            c.ts_unacceptable,
            c.timeouts,
            c.other_failures,
            c.messages_dropped
        );
        let _ = writeln!(
            out,
            "    {}: rekeys IKE {} (ours failed {}) CHILD {}, CHILD SAs deleted {}, dead peers {}, \
             expired {}, peer restarts {}",
            p.peer,
            c.ike_rekeys,
            c.ike_rekeys_failed,
            c.child_rekeys,
            c.children_deleted,
            c.dead_peers,
            c.expired,
            c.peer_restarts
        );
        if c.peer_moved + c.keepalives + c.keepalives_skipped + c.nat_refused > 0 {
            let _ = writeln!(
                out,
                "    {}: NAT: peer moved {}, keepalives sent {} (skipped while ESP flowed {}), \
                 refused with raw ESP {}",
                p.peer, c.peer_moved, c.keepalives, c.keepalives_skipped, c.nat_refused
            );
        }
        if c.deletes_sent + c.deletes_received > 0 {
            let _ = writeln!(
                out,
                "    {}: IKE SA Deletes sent {}, received {}",
                p.peer, c.deletes_sent, c.deletes_received
            );
        }
        if let Some(e) = &p.last_error {
            let _ = writeln!(out, "    last error: {e}");
        }
    }
    let k = &ike.cookies;
    if k.sent + k.accepted + k.refused + k.expired + k.half_open > 0 || k.demanding {
        let _ = writeln!(
            out,
            "  COOKIEs: sent {}, accepted {}, refused {}; half-open IKE SAs {} (expired {}){}",
            k.sent,
            k.accepted,
            k.refused,
            k.half_open,
            k.expired,
            if k.demanding {
                "; demanding cookies"
            } else {
                ""
            }
        );
    }
    if ike.queue_drops > 0 {
        let _ = writeln!(
            out,
            "  IKE messages dropped on a full queue: {}",
            ike.queue_drops
        );
    }
    if ike.natt_non_ike > 0 {
        let _ = writeln!(
            out,
            "  ESP in UDP on port 4500 dropped (outer = \"esp\"): {}",
            ike.natt_non_ike
        );
    }
}

/// One IKE SA's rekeys and timers, and its CHILD SAs' ages.
fn ike_sa_timers(out: &mut String, sa: &esptun::daemon::ike::IkeSaStatus) {
    let ago = |t: Option<u64>| {
        t.map_or("never".to_string(), |s| {
            format!("{} ago", human_duration(s))
        })
    };
    let within =
        |t: Option<u64>| t.map_or("never".to_string(), |s| format!("in {}", human_duration(s)));
    let _ = writeln!(
        out,
        "    rekeys: IKE {} CHILD {}; established {}, IKE rekey {}; last heard {}, last liveness \
         check {}",
        sa.ike_rekeys,
        sa.child_rekeys,
        ago(sa.established_secs_ago),
        within(sa.ike_rekey_in_secs),
        ago(sa.last_heard_secs_ago),
        ago(sa.last_liveness_check_secs_ago),
    );
    for c in &sa.children {
        let _ = writeln!(
            out,
            "    CHILD SA {:#010x}/{:#010x}: {}, generation {}{}, installed {}, rekey {}",
            c.inbound_spi,
            c.outbound_spi,
            c.state,
            c.generation,
            c.pfs
                .as_deref()
                .map(|g| format!(" (PFS {g})"))
                .unwrap_or_default(),
            ago(Some(c.installed_secs_ago)),
            within(c.rekey_in_secs),
        );
    }
}

fn providers(out: &mut String, v: &Status) {
    let _ = writeln!(out, "\nproviders:");
    for p in &v.providers {
        let state = if let Some(why) = &p.disabled {
            format!("DISABLED: {why}")
        } else if p.available {
            "ok".into()
        } else {
            "unavailable".into()
        };
        let _ = writeln!(
            out,
            "  {:<9} periodic checks {} run, {} failed; {state}",
            p.name.as_str(),
            p.periodic_runs,
            p.periodic_failures,
        );
    }
    let history = &v.selftest_history;
    let _ = writeln!(out, "\nself-test history (last {}):", history.len().min(8));
    for e in history.iter().rev().take(8) {
        let when = match v.now_unix_ms {
            Some(now) => format!(
                "{} ({})",
                rfc3339(e.unix_ms),
                ago(now.saturating_sub(e.unix_ms))
            ),
            None => rfc3339(e.unix_ms),
        };
        let _ = writeln!(
            out,
            "  {} {} {} {}: {}",
            when,
            e.provider.as_str(),
            e.check,
            if e.ok { "ok" } else { "FAILED" },
            e.detail,
        );
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply with every part the text shows: SAs in each state with and
    /// without drops, I/O errors, a disabled and an unavailable provider,
    /// and more history than is printed.
    const REPLY: &str = r#"{"interface":"esptun0","pid":4242,"uptime_secs":77,"outer":"udp/4500","provider":"hardware","crypto_mode":"auto","on_selftest_failure":"fallback",
"providers":[{"name":"hardware","implementation":"ring","hardware":true,"available":true,"unavailable_reason":null,"kat_passed":30,"kat_failed":0,"kat_failures":[],"simd_ok":true,"register_check":{"pinned_cpu":1,"aes_partner_seals":12,"levels":[{"level":"xmm","registers":16,"context_switches":5,"corrupted_registers":[]}]},"long_message_ok":true,"long_message_detail":null,"disabled":"periodic long-message test failed","periodic_runs":9,"periodic_failures":1},
{"name":"soft","implementation":"rustcrypto","hardware":false,"available":true,"unavailable_reason":null,"kat_passed":30,"kat_failed":0,"kat_failures":[],"simd_ok":null,"register_check":null,"long_message_ok":true,"long_message_detail":null,"disabled":null,"periodic_runs":3,"periodic_failures":0},
{"name":"soft","implementation":"x","hardware":false,"available":false,"unavailable_reason":"no","kat_passed":0,"kat_failed":0,"kat_failures":[],"simd_ok":null,"register_check":null,"long_message_ok":null,"long_message_detail":null,"disabled":null,"periodic_runs":0,"periodic_failures":0}],
"selftest_history":[
{"unix_ms":1,"provider":"hardware","check":"kat","ok":true,"detail":"a"},
{"unix_ms":2,"provider":"soft","check":"kat","ok":true,"detail":"b"},
{"unix_ms":3,"provider":"hardware","check":"long","ok":false,"detail":"c"},
{"unix_ms":4,"provider":"hardware","check":"simd","ok":true,"detail":"d"},
{"unix_ms":5,"provider":"hardware","check":"kat","ok":true,"detail":"e"},
{"unix_ms":6,"provider":"hardware","check":"kat","ok":true,"detail":"f"},
{"unix_ms":7,"provider":"hardware","check":"kat","ok":true,"detail":"g"},
{"unix_ms":8,"provider":"hardware","check":"kat","ok":true,"detail":"h"},
{"unix_ms":9,"provider":"soft","check":"kat","ok":false,"detail":"i"},
{"unix_ms":10,"provider":"hardware","check":"kat","ok":true,"detail":"j"}],
"outbound":{"passed":100,"dropped":3,"drops":{"inner_checksum":2,"no_sa":1,"truncated":0},"udp4_zero_checksum":0,"udp4_checksum_filled":0,"unverifiable_protocol":0,"udplite_partial_coverage":0,"soft_limit_crossings":0,"too_big_sent":0,"too_big_suppressed":0,"mss_clamped":0,
"reassembly":{"fragments":47,"reassembled":6,"atomic":1,"duplicates":2,"timeout":1,"overlap":0,"too_big":0,"memory":3,"malformed":0,"datagrams_in_flight":1,"bytes_in_flight":4096}},
"inbound":{"passed":90,"dropped":0,"drops":{"inner_checksum":0},"udp4_zero_checksum":1,"udp4_checksum_filled":0,"unverifiable_protocol":0,"udplite_partial_coverage":0,"soft_limit_crossings":0,"too_big_sent":0,"too_big_suppressed":0,"mss_clamped":0,
"reassembly":{"fragments":0,"reassembled":0,"atomic":0,"duplicates":0,"timeout":0,"overlap":0,"too_big":0,"memory":0,"malformed":0,"datagrams_in_flight":0,"bytes_in_flight":0}},
"io":{"recv_errors":0,"send_errors":4,"tun_read_errors":1},
"outbound_sas":[{"peer":"host-b","spi":40961,"endpoint":"198.19.0.2:4500","state":"active","packets":10,"bytes":1000,"seq_used":10,"seq_reserved":1048576,"soft_limit_reached":false,"drops":{"inner_checksum":2},"path_mtu":1280,"inner_mtu":1238},
{"peer":"host-c","spi":40962,"endpoint":"198.19.0.3:4500","state":"pending","packets":0,"bytes":0,"seq_used":0,"seq_reserved":0,"soft_limit_reached":false,"drops":{}}],
"inbound_sas":[{"peer":"host-b","spi":45057,"state":"retiring","packets":5,"bytes":500,"replay_window":4096,"replay_top":5,"drops":{"replay":3,"icv":1}}],
"offloads":{"tun_checksum":true,"tso":true,"uso":false,"coalesce":true,"udp_gso":true,"udp_gro":false}}"#;

    const EXPECTED: &str = r#"esptun on esptun0 (pid 4242), up 1m 17s, outer udp/4500, provider hardware (mode auto, on failure fallback)
offloads in use: tun_checksum, tso, coalesce, udp_gso

outbound SAs:
  peer                spi state    endpoint                      packets          bytes       seq used   seq reserved  last packet
  host-b           0xa001 active   198.19.0.2:4500                    10           1000             10        1048576  -
  host-c           0xa002 pending  198.19.0.3:4500                     0              0              0              0  never
    host-b 0xa001: path MTU 1280, inner MTU 1238
    dropped: inner_checksum 2

inbound SAs:
  peer                spi state         packets          bytes   window    highest seq  last packet
  host-b           0xb001 retiring            5            500     4096              5  -
    dropped: icv 1, replay 3

outbound: 100 passed, 3 dropped
  inner_checksum           2
  no_sa                    1
  reassembly: 47 fragments, 6 datagrams reassembled, 1 atomic, 2 duplicates; failed: timeout 1, memory 3; in flight: 1 datagrams, 4096 bytes

inbound: 90 passed, 0 dropped

I/O errors: send_errors 4, tun_read_errors 1

providers:
  hardware  periodic checks 9 run, 1 failed; DISABLED: periodic long-message test failed
  soft      periodic checks 3 run, 0 failed; ok
  soft      periodic checks 0 run, 0 failed; unavailable

self-test history (last 8):
  1970-01-01T00:00:00Z hardware kat ok: j
  1970-01-01T00:00:00Z soft kat FAILED: i
  1970-01-01T00:00:00Z hardware kat ok: h
  1970-01-01T00:00:00Z hardware kat ok: g
  1970-01-01T00:00:00Z hardware kat ok: f
  1970-01-01T00:00:00Z hardware kat ok: e
  1970-01-01T00:00:00Z hardware simd ok: d
  1970-01-01T00:00:00Z hardware long FAILED: c
"#;

    #[test]
    fn a_status_reply_reads_back_typed_and_renders_as_before() {
        let v: Status = serde_json::from_str(REPLY).expect("a status");
        // The text `esptun status` printed when it rendered the JSON untyped.
        let expected = EXPECTED;
        assert_eq!(status(&v), expected);
        // And the JSON the CLI would pass through with --json is the same
        // document after a typed round trip.
        let again: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&v).expect("json")).expect("value");
        let original: serde_json::Value = serde_json::from_str(REPLY).expect("value");
        assert_eq!(again, original);
    }

    #[test]
    fn ike_sas_and_their_failures_are_shown() {
        let ike = r#""ike":{"queue_drops":2,"natt_non_ike":6,"peers":[{"peer":"host-b","initiate":true,
"local_id":"198.18.0.1","remote_id":"198.18.0.2","sas":[{"role":"initiator","state":"established",
"spi_i":"0123456789abcdef","spi_r":"fedcba9876543210","age_secs":65,"remote":"198.18.0.2:4500",
"suite":"aes256gcm16-prfsha256-x25519","children":[{"inbound_spi":3405691582,"outbound_spi":305419896,
"state":"installed","installed_secs_ago":7,"rekey_in_secs":50,"generation":3,"pfs":"x25519"}],"ike_rekeys":2,"child_rekeys":3,
"established_secs_ago":20,"ike_rekey_in_secs":100,"last_heard_secs_ago":1,
"nat":{"supported":true,"local_behind":true,"peer_behind":false,"natt":true,"keepalives":true,
"keepalives_sent":4}}],
"counters":{"established":1,"children_installed":1,"children_failed":0,"auth_failures":3,
"proposal_mismatches":0,"ts_unacceptable":0,"timeouts":1,"other_failures":0,"messages_dropped":4,
"ike_rekeys":2,"ike_rekeys_failed":1,"child_rekeys":3,"children_deleted":3,"dead_peers":1,"expired":0,"peer_restarts":1},
"last_error":"authentication failed"}],"cookies":{"sent":5,"accepted":2,"refused":1,
"half_open":3,"expired":0,"demanding":true}},"offloads":"#;
        let reply = REPLY.replacen(r#""offloads":"#, ike, 1);
        let v: Status = serde_json::from_str(&reply).expect("a status");
        let text = status(&v);
        for want in [
            "IKE SAs:",
            "host-b       initiator  established  0123456789abcdef fedcba9876543210",
            "1m 5s",
            "0xcafebabe/0x12345678",
            "auth failures 3",
            "timeouts 1",
            "messages dropped 4",
            "last error: authentication failed",
            "IKE messages dropped on a full queue: 2",
            "ESP in UDP on port 4500 dropped (outer = \"esp\"): 6",
            "rekeys: IKE 2 CHILD 3; established 20s ago, IKE rekey in 1m 40s; last heard 1s ago, \
             last liveness check never",
            "CHILD SA 0xcafebabe/0x12345678: installed, generation 3 (PFS x25519), installed 7s ago, rekey in 50s",
            "rekeys IKE 2 (ours failed 1) CHILD 3, CHILD SAs deleted 3, dead peers 1, expired 0, peer restarts 1",
            "NAT: we are behind one: yes, the peer: no; NAT-T in use; keepalives on (sent 4)",
            "COOKIEs: sent 5, accepted 2, refused 1; half-open IKE SAs 3 (expired 0); demanding",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        // Without IKE peers there is no IKE section (the text above).
        let plain: Status = serde_json::from_str(REPLY).expect("a status");
        assert!(plain.ike.is_none() && !status(&plain).contains("IKE"));
    }

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(7384), "2h 3m 4s");
        assert_eq!(human_duration(90_061), "1d 1h 1m 1s");
        assert_eq!(ago(400), "0.4s ago");
        assert_eq!(ago(12_345), "12s ago");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_newer_daemon_shows_ages_and_relative_times() {
        let reply = REPLY
            .replacen(
                r#""drops":{"inner_checksum":2},"#,
                r#""drops":{"inner_checksum":2},"last_packet_ms_ago":400,"#,
                1,
            )
            .replacen(
                r#""io":"#,
                r#""now_unix_ms":12010,"sas_age_ms":50,"io":"#,
                1,
            );
        let v: Status = serde_json::from_str(&reply).expect("a status");
        assert_eq!(v.now_unix_ms, Some(12_010));
        let text = status(&v);
        assert!(
            text.contains("1048576  0.4s ago\n") && text.contains("0  never\n"),
            "{text}"
        );
        assert!(
            text.contains("  1970-01-01T00:00:00Z (12s ago) hardware kat ok: j\n"),
            "{text}"
        );
        // And the JSON keeps the new fields through a typed round trip.
        let again = serde_json::to_string(&v).expect("json");
        assert!(again.contains(r#""last_packet_ms_ago":400"#), "{again}");
    }

    #[test]
    fn a_refused_reload_lists_its_reasons() {
        let text = reload(&ReloadOutcome {
            applied: false,
            refused: vec!["peer b: the new outbound SA 0xa003 uses the key of the SA".into()],
        });
        assert!(text.starts_with("reload REFUSED"), "{text}");
        assert!(
            text.contains("  peer b: the new outbound SA 0xa003"),
            "{text}"
        );
        assert!(
            reload(&ReloadOutcome {
                applied: true,
                refused: Vec::new()
            })
            .starts_with("reload applied")
        );
    }
}
