//! What `esptun status` shows: a snapshot assembled from the datapath
//! threads' live counters and their periodically published SA state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::crypto::select::{ProviderReport, SelfTestEvent};
use crate::datapath::{Counters, DropReason};

/// One outbound SA as its thread last published it.
#[derive(Debug, Clone, Serialize)]
pub struct OutboundSaStatus {
    pub peer: String,
    pub spi: u32,
    pub endpoint: String,
    /// `active`, or `pending` while a reload waits for the peer (see
    /// [`super::Reload`]).
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    /// The last sequence number used, and the durably reserved ceiling.
    pub seq_used: u64,
    pub seq_reserved: u64,
    pub soft_limit_reached: bool,
    /// Drops of packets matched to this SA, by reason (non-zero only).
    pub drops: BTreeMap<&'static str, u64>,
}

/// One inbound SA as its thread last published it.
#[derive(Debug, Clone, Serialize)]
pub struct InboundSaStatus {
    pub peer: String,
    pub spi: u32,
    /// `active`, or `retiring` after a reload replaced it.
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub replay_window: u32,
    /// Highest authenticated sequence number seen.
    pub replay_top: u64,
    /// Drops of packets carrying this SA's SPI, by reason (non-zero only).
    pub drops: BTreeMap<&'static str, u64>,
}

/// The non-zero entries of one SA's drop counts, by reason name.
pub fn sa_drops(counts: Option<&crate::datapath::SaDrops>) -> BTreeMap<&'static str, u64> {
    DropReason::ALL
        .iter()
        .filter_map(|r| {
            let n = counts.map_or(0, |c| c[r.index()]);
            (n > 0).then(|| (r.as_str(), n))
        })
        .collect()
}

/// Failures at the I/O edge, outside the datapath's drop reasons.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub tun_read_errors: AtomicU64,
    pub tun_write_errors: AtomicU64,
    pub send_errors: AtomicU64,
    pub recv_errors: AtomicU64,
    pub reservation_errors: AtomicU64,
    pub capture_errors: AtomicU64,
}

impl IoCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        [
            ("tun_read_errors", &self.tun_read_errors),
            ("tun_write_errors", &self.tun_write_errors),
            ("send_errors", &self.send_errors),
            ("recv_errors", &self.recv_errors),
            ("reservation_errors", &self.reservation_errors),
            ("capture_errors", &self.capture_errors),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// One direction's pipeline counters.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionStatus {
    pub passed: u64,
    pub dropped: u64,
    /// Every reason, zeros included, so scripts need no special cases.
    pub drops: BTreeMap<&'static str, u64>,
    pub udp4_zero_checksum: u64,
    pub unverifiable_protocol: u64,
    pub udplite_partial_coverage: u64,
    pub soft_limit_crossings: u64,
}

impl DirectionStatus {
    pub fn of(c: &Counters) -> Self {
        DirectionStatus {
            passed: c.passed.load(Ordering::Relaxed),
            dropped: c.total_drops(),
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r.as_str(), c.drops(r)))
                .collect(),
            udp4_zero_checksum: c.udp4_zero_checksum.load(Ordering::Relaxed),
            unverifiable_protocol: c.unverifiable_protocol.load(Ordering::Relaxed),
            udplite_partial_coverage: c.udplite_partial_coverage.load(Ordering::Relaxed),
            soft_limit_crossings: c.soft_limit_crossings.load(Ordering::Relaxed),
        }
    }
}

/// The whole answer to a status request.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub interface: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// `udp/PORT` or `esp`.
    pub outer: crate::wire::outer::Encap,
    /// The provider carrying traffic now (`null`: halted).
    pub provider: Option<crate::crypto::ProviderId>,
    pub crypto_mode: crate::crypto::select::Mode,
    pub on_selftest_failure: crate::crypto::select::FailurePolicy,
    pub providers: Vec<ProviderReport>,
    pub selftest_history: Vec<SelfTestEvent>,
    pub outbound: DirectionStatus,
    pub inbound: DirectionStatus,
    pub io: BTreeMap<&'static str, u64>,
    pub outbound_sas: Vec<OutboundSaStatus>,
    pub inbound_sas: Vec<InboundSaStatus>,
}

/// The human-readable form of a status reply (the JSON, so that the
/// client needs no more than what the daemon sent).
pub fn render(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let _ = writeln!(
        out,
        "esptun on {} (pid {}), up {} s, outer {}, provider {} (mode {}, on failure {})",
        s(&v["interface"]),
        s(&v["pid"]),
        s(&v["uptime_secs"]),
        s(&v["outer"]),
        match &v["provider"] {
            serde_json::Value::Null => "NONE: traffic halted".to_string(),
            p => s(p),
        },
        s(&v["crypto_mode"]),
        s(&v["on_selftest_failure"]),
    );
    let _ = writeln!(out, "\noutbound SAs:");
    let _ = writeln!(
        out,
        "  {:<12} {:>10} {:<8} {:<24} {:>12} {:>14} {:>14} {:>14}",
        "peer", "spi", "state", "endpoint", "packets", "bytes", "seq used", "seq reserved"
    );
    for sa in v["outbound_sas"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<12} {:>#10x} {:<8} {:<24} {:>12} {:>14} {:>14} {:>14}",
            s(&sa["peer"]),
            sa["spi"].as_u64().unwrap_or(0),
            s(&sa["state"]),
            s(&sa["endpoint"]),
            s(&sa["packets"]),
            s(&sa["bytes"]),
            s(&sa["seq_used"]),
            s(&sa["seq_reserved"]),
        );
    }
    let sa_drops = |sa: &serde_json::Value| {
        let list: Vec<String> = sa["drops"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| format!("{k} {}", s(n)))
            .collect();
        if list.is_empty() {
            String::new()
        } else {
            format!("    dropped: {}\n", list.join(", "))
        }
    };
    for sa in v["outbound_sas"].as_array().into_iter().flatten() {
        out.push_str(&sa_drops(sa));
    }
    let _ = writeln!(out, "\ninbound SAs:");
    let _ = writeln!(
        out,
        "  {:<12} {:>10} {:<8} {:>12} {:>14} {:>8} {:>14}",
        "peer", "spi", "state", "packets", "bytes", "window", "highest seq"
    );
    for sa in v["inbound_sas"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<12} {:>#10x} {:<8} {:>12} {:>14} {:>8} {:>14}",
            s(&sa["peer"]),
            sa["spi"].as_u64().unwrap_or(0),
            s(&sa["state"]),
            s(&sa["packets"]),
            s(&sa["bytes"]),
            s(&sa["replay_window"]),
            s(&sa["replay_top"]),
        );
        out.push_str(&sa_drops(sa));
    }
    for dir in ["outbound", "inbound"] {
        let d = &v[dir];
        let _ = writeln!(
            out,
            "\n{dir}: {} passed, {} dropped",
            s(&d["passed"]),
            s(&d["dropped"])
        );
        for (reason, n) in d["drops"].as_object().into_iter().flatten() {
            if n.as_u64().unwrap_or(0) > 0 {
                let _ = writeln!(out, "  {reason:<24} {}", s(n));
            }
        }
    }
    let io: Vec<String> = v["io"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{k} {}", s(n)))
        .collect();
    if !io.is_empty() {
        let _ = writeln!(out, "\nI/O errors: {}", io.join(", "));
    }
    let _ = writeln!(out, "\nproviders:");
    for p in v["providers"].as_array().into_iter().flatten() {
        let state = if let Some(why) = p["disabled"].as_str() {
            format!("DISABLED: {why}")
        } else if p["available"] == true {
            "ok".into()
        } else {
            "unavailable".into()
        };
        let _ = writeln!(
            out,
            "  {:<9} periodic checks {} run, {} failed; {state}",
            s(&p["name"]),
            s(&p["periodic_runs"]),
            s(&p["periodic_failures"]),
        );
    }
    let history = v["selftest_history"].as_array().map_or(&[][..], |h| &h[..]);
    let _ = writeln!(out, "\nself-test history (last {}):", history.len().min(8));
    for e in history.iter().rev().take(8) {
        let _ = writeln!(
            out,
            "  {} {} {} {}: {}",
            s(&e["unix_ms"]),
            s(&e["provider"]),
            s(&e["check"]),
            if e["ok"] == true { "ok" } else { "FAILED" },
            s(&e["detail"]),
        );
    }
    out
}
