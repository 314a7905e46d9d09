//! What `esptun status` shows: a snapshot assembled from the datapath
//! threads' live counters and their periodically published SA state.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::crypto::ProviderId;
use crate::crypto::select::{FailurePolicy, Mode, ProviderReport, SelfTestEvent};
use crate::crypto::simd_state::{LevelReport, RegisterCheckReport};
use crate::datapath::reassembly::ReassemblyCounters;
use crate::datapath::{Counters, DropReason};
use crate::wire::outer::Encap;

/// Counts by name (a drop reason, an I/O failure kind). The daemon's names
/// are static; a client reading them back owns them.
pub type Counts = BTreeMap<Cow<'static, str>, u64>;

/// The states an SA is published in.
pub const SA_STATES: [&str; 3] = ["active", "pending", "retiring"];

/// One of [`SA_STATES`]. A named type rather than `&'static str` in the
/// fields: serde borrows a field spelled `&str` from the input, which a
/// `'static` one cannot be; this one is read back by `sa_state`.
pub type SaState = &'static str;

/// Reads an SA state back as one of [`SA_STATES`].
fn sa_state<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SaState, D::Error> {
    let text = Cow::<str>::deserialize(d)?;
    SA_STATES
        .into_iter()
        .find(|s| *s == text)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown SA state {text:?}")))
}

/// One outbound SA as its thread last published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundSaStatus {
    pub peer: String,
    pub spi: u32,
    pub endpoint: String,
    /// `active`, or `pending` while a reload waits for the peer (see
    /// `esptun reload`).
    #[serde(deserialize_with = "sa_state")]
    pub state: SaState,
    pub packets: u64,
    pub bytes: u64,
    /// The last sequence number used, and the durably reserved ceiling.
    pub seq_used: u64,
    pub seq_reserved: u64,
    pub soft_limit_reached: bool,
    /// Drops of packets matched to this SA, by reason (non-zero only).
    pub drops: Counts,
    /// Milliseconds since the SA last sent a packet, as of the request
    /// (to within one publication, 200 ms); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_packet_ms_ago: Option<u64>,
    /// The path MTU to the endpoint as the kernel knows it (the route's
    /// MTU, or what an ICMP Fragmentation Needed / Packet Too Big taught
    /// it); absent: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u16>,
    /// The largest inner packet that fits `path_mtu` after ESP with this
    /// SA's ICV: what a Packet Too Big advertises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_mtu: Option<u16>,
}

/// One inbound SA as its thread last published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundSaStatus {
    pub peer: String,
    pub spi: u32,
    /// `active`, or `retiring` after a reload replaced it.
    #[serde(deserialize_with = "sa_state")]
    pub state: SaState,
    pub packets: u64,
    pub bytes: u64,
    pub replay_window: u32,
    /// Highest authenticated sequence number seen.
    pub replay_top: u64,
    /// Drops of packets carrying this SA's SPI, by reason (non-zero only).
    pub drops: Counts,
    /// Milliseconds since the SA last delivered a packet, as of the
    /// request (to within one publication, 200 ms); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_packet_ms_ago: Option<u64>,
}

/// The non-zero entries of one SA's drop counts, by reason name.
pub fn sa_drops(counts: Option<&crate::datapath::SaDrops>) -> Counts {
    DropReason::ALL
        .iter()
        .filter_map(|r| {
            let n = counts.map_or(0, |c| c[r.index()]);
            (n > 0).then(|| (Cow::Borrowed(r.as_str()), n))
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
    /// Datagrams the kernel dropped at a full outer socket receive buffer
    /// (SO_RXQ_OVFL), before esptun could see them.
    pub socket_rx_overflows: AtomicU64,
    /// Control or metrics connections closed at once because the listener
    /// already had its maximum of clients.
    pub connections_refused: AtomicU64,
    /// Coalesced (GSO) writes the TUN device refused, which turned
    /// coalescing off (0 or 1).
    pub tun_gso_refused: AtomicU64,
    /// `[inner] ipv6_hop_by_hop = "drop"`: ESP datagrams that arrived
    /// with a hop-by-hop header on the outer packet, which the kernel
    /// processed and esptun does not pass on (IPV6_RECVHOPOPTS).
    pub outer_hop_by_hop_not_carried: AtomicU64,
}

impl IoCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> Counts {
        [
            ("tun_read_errors", &self.tun_read_errors),
            ("tun_write_errors", &self.tun_write_errors),
            ("send_errors", &self.send_errors),
            ("recv_errors", &self.recv_errors),
            ("reservation_errors", &self.reservation_errors),
            ("capture_errors", &self.capture_errors),
            ("socket_rx_overflows", &self.socket_rx_overflows),
            ("connections_refused", &self.connections_refused),
            ("tun_gso_refused", &self.tun_gso_refused),
            (
                "outer_hop_by_hop_not_carried",
                &self.outer_hop_by_hop_not_carried,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (Cow::Borrowed(k), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// Which kernel offloads carry traffic now: what the configuration allows,
/// the kernel granted, and nothing has refused since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadsStatus {
    /// TUN checksum offload: NEEDS_CSUM packets, checksums computed here.
    pub tun_checksum: bool,
    /// TCP super-packets from TUN, split here.
    pub tso: bool,
    /// UDP super-packets from TUN, split here.
    pub uso: bool,
    /// Validated segments written to TUN as one packet.
    pub coalesce: bool,
    /// UDP GSO trains on the outer socket(s).
    pub udp_gso: bool,
    /// UDP GRO trains on the outer socket(s).
    pub udp_gro: bool,
}

impl OffloadsStatus {
    /// Names of the offloads in use, for the text output.
    pub fn in_use(&self) -> Vec<&'static str> {
        [
            ("tun_checksum", self.tun_checksum),
            ("tso", self.tso),
            ("uso", self.uso),
            ("coalesce", self.coalesce),
            ("udp_gso", self.udp_gso),
            ("udp_gro", self.udp_gro),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }
}

/// [`OffloadsStatus`] as the threads keep it up to date.
#[derive(Debug, Default)]
pub struct OffloadState {
    pub tun_checksum: AtomicBool,
    pub tso: AtomicBool,
    pub uso: AtomicBool,
    pub coalesce: AtomicBool,
    pub udp_gso: AtomicBool,
    pub udp_gro: AtomicBool,
}

impl OffloadState {
    pub fn snapshot(&self) -> OffloadsStatus {
        let get = |b: &AtomicBool| b.load(Ordering::Relaxed);
        OffloadsStatus {
            tun_checksum: get(&self.tun_checksum),
            tso: get(&self.tso),
            uso: get(&self.uso),
            coalesce: get(&self.coalesce),
            udp_gso: get(&self.udp_gso),
            udp_gro: get(&self.udp_gro),
        }
    }
}

/// One direction's pipeline counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStatus {
    pub passed: u64,
    pub dropped: u64,
    /// Every reason, zeros included, so scripts need no special cases.
    pub drops: Counts,
    pub udp4_zero_checksum: u64,
    /// Outbound IPv4 UDP datagrams given their real checksum before
    /// sealing (absent from older daemons).
    #[serde(default)]
    pub udp4_checksum_filled: u64,
    pub unverifiable_protocol: u64,
    pub udplite_partial_coverage: u64,
    pub soft_limit_crossings: u64,
    /// ICMP Fragmentation Needed / Packet Too Big written to the TUN
    /// device, and those held back by the rate limit or because the
    /// packet was itself an ICMP error (absent from older daemons).
    #[serde(default)]
    pub too_big_sent: u64,
    #[serde(default)]
    pub too_big_suppressed: u64,
    /// TCP SYNs whose MSS was clamped.
    #[serde(default)]
    pub mss_clamped: u64,
    /// Outbound reassembly of fragments (all zero inbound; absent from
    /// older daemons).
    #[serde(default)]
    pub reassembly: ReassemblyStatus,
}

/// [`ReassemblyCounters`] as `status` shows them: datagrams by outcome,
/// fragments by kind, and what is held now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReassemblyStatus {
    /// Fragments taken from the TUN device.
    pub fragments: u64,
    /// Datagrams reassembled and handed to the pipeline.
    pub reassembled: u64,
    /// IPv6 atomic fragments passed on whole (RFC 6946).
    pub atomic: u64,
    /// Fragments dropped as exact duplicates.
    pub duplicates: u64,
    /// Datagrams discarded, by reason.
    pub timeout: u64,
    pub overlap: u64,
    pub too_big: u64,
    pub memory: u64,
    pub malformed: u64,
    /// Held now: datagrams, and bytes of fragment data.
    pub datagrams_in_flight: u64,
    pub bytes_in_flight: u64,
}

impl ReassemblyStatus {
    pub fn of(c: &ReassemblyCounters) -> Self {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReassemblyStatus {
            fragments: get(&c.fragments),
            reassembled: get(&c.reassembled),
            atomic: get(&c.atomic),
            duplicates: get(&c.duplicates),
            timeout: get(&c.timeout),
            overlap: get(&c.overlap),
            too_big: get(&c.too_big),
            memory: get(&c.memory),
            malformed: get(&c.malformed),
            datagrams_in_flight: get(&c.datagrams_in_flight),
            bytes_in_flight: get(&c.bytes_in_flight),
        }
    }

    /// The datagrams that did not complete, by reason.
    pub fn failures(&self) -> [(&'static str, u64); 5] {
        [
            ("timeout", self.timeout),
            ("overlap", self.overlap),
            ("too_big", self.too_big),
            ("memory", self.memory),
            ("malformed", self.malformed),
        ]
    }
}

impl DirectionStatus {
    pub fn of(c: &Counters) -> Self {
        DirectionStatus {
            passed: c.passed.load(Ordering::Relaxed),
            dropped: c.total_drops(),
            drops: DropReason::ALL
                .iter()
                .map(|&r| (Cow::Borrowed(r.as_str()), c.drops(r)))
                .collect(),
            udp4_zero_checksum: c.udp4_zero_checksum.load(Ordering::Relaxed),
            udp4_checksum_filled: c.udp4_checksum_filled.load(Ordering::Relaxed),
            unverifiable_protocol: c.unverifiable_protocol.load(Ordering::Relaxed),
            udplite_partial_coverage: c.udplite_partial_coverage.load(Ordering::Relaxed),
            soft_limit_crossings: c.soft_limit_crossings.load(Ordering::Relaxed),
            reassembly: ReassemblyStatus::of(&c.reassembly),
            too_big_sent: c.too_big_sent.load(Ordering::Relaxed),
            too_big_suppressed: c.too_big_suppressed.load(Ordering::Relaxed),
            mss_clamped: c.mss_clamped.load(Ordering::Relaxed),
        }
    }
}

/// The whole answer to a status request: what the daemon serialises and
/// `esptun status` reads back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// `udp/PORT` or `esp`.
    pub outer: Encap,
    /// The provider carrying traffic now (`null`: halted).
    pub provider: Option<ProviderId>,
    pub crypto_mode: Mode,
    pub on_selftest_failure: FailurePolicy,
    pub providers: Vec<ProviderStatus>,
    pub selftest_history: Vec<SelfTestStatus>,
    pub outbound: DirectionStatus,
    pub inbound: DirectionStatus,
    pub io: Counts,
    pub outbound_sas: Vec<OutboundSaStatus>,
    pub inbound_sas: Vec<InboundSaStatus>,
    /// The kernel offloads in use (absent from older daemons).
    #[serde(default)]
    pub offloads: OffloadsStatus,
    /// The daemon's wall clock when it answered, in milliseconds since the
    /// Unix epoch: the reference for `selftest_history[].unix_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now_unix_ms: Option<u64>,
    /// How old the SA rows are, in milliseconds. `outbound`/`inbound` are
    /// taken in the same publication as the rows, so the per-SA counts
    /// and the totals always describe the same moment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_age_ms: Option<u64>,
    /// The IKE SAs of the peers keyed by IKE (absent without any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ike: Option<super::ike::IkeStatus>,
}

/// The answer to a `reload` request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// True when everything the new file asks for is in effect (or on its
    /// way: a pending outbound SA waits for the peer as in any roll).
    pub applied: bool,
    /// What was not applied, and why (configuration errors, the key
    /// manager's refusals, SAs the datapath could not install, settings
    /// that need a restart). Empty when `applied`.
    pub refused: Vec<String>,
}

/// A provider's [`ProviderReport`] as `status` carries it: the same fields
/// in the same order (so the JSON is the report's), with owned text so a
/// client can read it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStatus {
    pub name: ProviderId,
    pub implementation: String,
    pub hardware: bool,
    pub available: bool,
    pub unavailable_reason: Option<String>,
    pub kat_passed: u32,
    pub kat_failed: u32,
    pub kat_failures: Vec<String>,
    pub simd_ok: Option<bool>,
    pub register_check: Option<RegisterCheckStatus>,
    pub long_message_ok: Option<bool>,
    pub long_message_detail: Option<String>,
    pub disabled: Option<String>,
    pub periodic_runs: u64,
    pub periodic_failures: u64,
}

impl From<&ProviderReport> for ProviderStatus {
    fn from(r: &ProviderReport) -> Self {
        ProviderStatus {
            name: r.name,
            implementation: r.implementation.to_string(),
            hardware: r.hardware,
            available: r.available,
            unavailable_reason: r.unavailable_reason.clone(),
            kat_passed: r.kat_passed,
            kat_failed: r.kat_failed,
            kat_failures: r.kat_failures.clone(),
            simd_ok: r.simd_ok,
            register_check: r.register_check.as_ref().map(RegisterCheckStatus::from),
            long_message_ok: r.long_message_ok,
            long_message_detail: r.long_message_detail.clone(),
            disabled: r.disabled.clone(),
            periodic_runs: r.periodic_runs,
            periodic_failures: r.periodic_failures,
        }
    }
}

/// [`RegisterCheckReport`] with owned text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCheckStatus {
    pub pinned_cpu: Option<usize>,
    pub aes_partner_seals: u64,
    pub levels: Vec<LevelStatus>,
}

impl From<&RegisterCheckReport> for RegisterCheckStatus {
    fn from(r: &RegisterCheckReport) -> Self {
        RegisterCheckStatus {
            pinned_cpu: r.pinned_cpu,
            aes_partner_seals: r.aes_partner_seals,
            levels: r.levels.iter().map(LevelStatus::from).collect(),
        }
    }
}

/// [`LevelReport`] with owned text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelStatus {
    pub level: String,
    pub registers: usize,
    pub context_switches: u64,
    pub corrupted_registers: Vec<usize>,
}

impl From<&LevelReport> for LevelStatus {
    fn from(l: &LevelReport) -> Self {
        LevelStatus {
            level: l.level.to_string(),
            registers: l.registers,
            context_switches: l.context_switches,
            corrupted_registers: l.corrupted_registers.clone(),
        }
    }
}

/// A [`SelfTestEvent`] with owned text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestStatus {
    pub unix_ms: u64,
    pub provider: ProviderId,
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

impl From<&SelfTestEvent> for SelfTestStatus {
    fn from(e: &SelfTestEvent) -> Self {
        SelfTestStatus {
            unix_ms: e.unix_ms,
            provider: e.provider,
            check: e.check.to_string(),
            ok: e.ok,
            detail: e.detail.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::select::{BootOptions, Selector};

    #[test]
    fn provider_and_history_views_serialise_exactly_as_the_crypto_reports() {
        let selector = Selector::boot(
            crate::crypto::Provider::detect_all(),
            Mode::Auto,
            FailurePolicy::Fallback,
            BootOptions::default(),
        );
        for report in selector.reports() {
            let view = ProviderStatus::from(&report);
            let json = serde_json::to_string(&view).expect("json");
            assert_eq!(json, serde_json::to_string(&report).expect("json"));
            assert_eq!(
                serde_json::from_str::<ProviderStatus>(&json).expect("back"),
                view
            );
        }
        let mut history = selector.history();
        history.push(SelfTestEvent {
            unix_ms: 7,
            provider: ProviderId::Soft,
            check: "long-message",
            ok: false,
            detail: "block 3 differs".into(),
        });
        for event in &history {
            let view = SelfTestStatus::from(event);
            let json = serde_json::to_string(&view).expect("json");
            assert_eq!(json, serde_json::to_string(event).expect("json"));
            assert_eq!(
                serde_json::from_str::<SelfTestStatus>(&json).expect("back"),
                view
            );
        }
    }

    #[test]
    fn a_status_reads_back_as_it_was_sent() {
        let counters = Counters::default();
        counters.count_drop(DropReason::InnerChecksum);
        let row = OutboundSaStatus {
            peer: "b".into(),
            spi: 0xa001,
            endpoint: "198.19.0.2:4500".into(),
            state: "pending",
            packets: 1,
            bytes: 2,
            seq_used: 3,
            seq_reserved: 4,
            soft_limit_reached: true,
            drops: sa_drops(Some(&crate::datapath::ByReason([1; DropReason::ALL.len()]))),
            last_packet_ms_ago: Some(400),
            path_mtu: Some(1280),
            inner_mtu: Some(1238),
        };
        let status = Status {
            offloads: OffloadsStatus {
                tso: true,
                ..OffloadsStatus::default()
            },
            interface: "esptun0".into(),
            pid: 9,
            uptime_secs: 1,
            outer: Encap::RawEsp,
            provider: None,
            crypto_mode: Mode::Hardware,
            on_selftest_failure: FailurePolicy::Halt,
            providers: Vec::new(),
            selftest_history: Vec::new(),
            outbound: DirectionStatus::of(&counters),
            inbound: DirectionStatus::of(&Counters::default()),
            io: IoCounters::default().snapshot(),
            outbound_sas: vec![row],
            inbound_sas: vec![InboundSaStatus {
                peer: "b".into(),
                spi: 0xb001,
                state: "retiring",
                packets: 5,
                bytes: 6,
                replay_window: 64,
                replay_top: 5,
                drops: Counts::new(),
                last_packet_ms_ago: None,
            }],
            now_unix_ms: Some(1_700_000_000_000),
            sas_age_ms: Some(120),
            ike: None,
        };
        let json = serde_json::to_string(&status).expect("json");
        assert!(json.contains(r#""outer":"esp""#), "{json}");
        // New fields are named with their unit; "never" is their absence.
        assert!(json.contains(r#""last_packet_ms_ago":400"#), "{json}");
        assert_eq!(json.matches("last_packet_ms_ago").count(), 1, "{json}");
        assert!(json.contains(r#""now_unix_ms":1700000000000"#), "{json}");
        assert!(
            json.contains(r#""path_mtu":1280,"inner_mtu":1238"#),
            "{json}"
        );
        let back: Status = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, status);
        let bad = json.replace(r#""state":"pending""#, r#""state":"sleeping""#);
        let err = serde_json::from_str::<Status>(&bad).expect_err("unknown state");
        assert!(err.to_string().contains("sleeping"), "{err}");
    }
}
