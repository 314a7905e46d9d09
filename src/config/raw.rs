//! The configuration file as written: serde structures mirroring the TOML,
//! with its defaults. Nothing here is checked beyond types; that is
//! `validate.rs`'s job.

use std::path::PathBuf;

use serde::Deserialize;

use crate::wire::inner::InnerPolicy;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// TUN interface name.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// MTU of the path between the hosts, from which the TUN MTU is derived.
    #[serde(default = "default_outer_mtu")]
    pub outer_mtu: u16,
    /// TUN MTU; default `outer_mtu` minus the worst-case ESP overhead of
    /// the outer mode ([`crate::wire::outer::Encap::overhead`]).
    pub mtu: Option<u16>,
    /// `udp` (NAT-T, RFC 3948) or `esp` (IP protocol 50).
    #[serde(default = "default_outer")]
    pub outer: String,
    /// Local UDP port for `outer = "udp"`.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Where sequence-number reservations are kept.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `auto`, `hardware` or `soft`.
    #[serde(default = "default_crypto")]
    pub crypto: String,
    /// Seconds between long-message self-tests on the datapath threads.
    #[serde(default = "default_selftest_interval")]
    pub selftest_interval_secs: u64,
    /// `fallback` (move to soft) or `halt`.
    #[serde(default = "default_on_failure")]
    pub on_selftest_failure: String,
    /// Firewall mark of the daemon's own outer packets, and the number of
    /// the routing table that holds its routes into the TUN device: marked
    /// packets skip that table, so classic transport mode cannot loop.
    #[serde(default = "default_fwmark")]
    pub fwmark: u32,
    /// After a reload, a replaced outbound SA keeps sending for at most
    /// this long (less once the peer is seen using its new SA), so that
    /// both hosts can be reloaded before either sends on a new SPI.
    #[serde(default = "default_rekey_switch")]
    pub rekey_switch_secs: u64,
    /// After a reload, a replaced inbound SA keeps accepting this long.
    #[serde(default = "default_rekey_retire")]
    pub rekey_retire_secs: u64,
    /// Serve Prometheus metrics over HTTP on this local address (e.g.
    /// "127.0.0.1:9150"); off when absent.
    pub metrics_listen: Option<String>,
    /// Keep decrypted packets dropped for a wrong inner checksum, for
    /// post-mortems; off when absent.
    pub drop_capture: Option<DropCaptureConfig>,
    /// The Unix control socket `esptun status` talks to; default
    /// `/run/esptun/<interface>.sock`.
    pub control_socket: Option<PathBuf>,
    /// `[inner]`: which packets without a verifiable inner checksum may
    /// pass; the defaults of [`InnerPolicy`] when absent.
    #[serde(default)]
    pub inner: RawInner,
    /// `[offloads]`: each `"auto"` (use it when the kernel offers it, the
    /// default) or `"off"`.
    #[serde(default)]
    pub offloads: RawOffloads,
    /// `[reassembly]`: the outbound reassembly of fragments; the defaults
    /// of [`crate::datapath::reassembly::ReassemblyConfig`] when absent.
    #[serde(default)]
    pub reassembly: RawReassembly,
    #[serde(default, rename = "peer")]
    pub peers: Vec<RawPeer>,
}

/// `[drop_capture]`: a size-capped, rotated pcap of inner-checksum drops.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropCaptureConfig {
    /// The pcap file (mode 0600); rotated to `PATH.1`, `PATH.2`, ...
    pub path: PathBuf,
    /// Size at which the file is rotated.
    #[serde(default = "default_capture_bytes")]
    pub max_bytes: u64,
    /// Files kept, the current one included.
    #[serde(default = "default_capture_files")]
    pub max_files: u32,
}

/// `[inner]`: the fields of [`InnerPolicy`], each optional; an absent one
/// keeps the policy's default.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInner {
    pub allow_udp4_zero_checksum: Option<bool>,
    pub allow_unverifiable_protocols: Option<bool>,
    pub allow_udplite_partial_coverage: Option<bool>,
    pub fill_udp4_zero_checksum: Option<bool>,
    /// `"off"`, `"auto"` or a number: see [`crate::wire::icmp::MssClamp`].
    pub clamp_mss: Option<RawClamp>,
    /// `"drop"` or `"carry"`: see [`super::HopByHopMode`].
    pub ipv6_hop_by_hop: Option<RawHopByHop>,
}

/// `[inner] ipv6_hop_by_hop` as written (an unknown word is
/// [`RawHopByHop::Unknown`], which validation reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawHopByHop {
    Drop,
    Carry,
    Unknown,
}

impl<'de> Deserialize<'de> for RawHopByHop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match String::deserialize(d)?.as_str() {
            "drop" => RawHopByHop::Drop,
            "carry" => RawHopByHop::Carry,
            _ => RawHopByHop::Unknown,
        })
    }
}

/// `[inner] clamp_mss` as written: a word or a number (kept `Copy`, like
/// the rest of `[inner]`; an unknown word is [`RawClamp::Unknown`], which
/// validation reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawClamp {
    Off,
    Auto,
    Number(i64),
    Unknown,
}

impl<'de> Deserialize<'de> for RawClamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Word(String),
            Number(i64),
        }
        Ok(match Either::deserialize(d)? {
            Either::Word(w) if w == "off" => RawClamp::Off,
            Either::Word(w) if w == "auto" => RawClamp::Auto,
            Either::Word(_) => RawClamp::Unknown,
            Either::Number(n) => RawClamp::Number(n),
        })
    }
}

impl RawInner {
    /// The policy with this table's settings over the defaults.
    pub fn policy(&self) -> InnerPolicy {
        let d = InnerPolicy::default();
        InnerPolicy {
            allow_udp4_zero_checksum: self
                .allow_udp4_zero_checksum
                .unwrap_or(d.allow_udp4_zero_checksum),
            allow_unverifiable_protocols: self
                .allow_unverifiable_protocols
                .unwrap_or(d.allow_unverifiable_protocols),
            allow_udplite_partial_coverage: self
                .allow_udplite_partial_coverage
                .unwrap_or(d.allow_udplite_partial_coverage),
            fill_udp4_zero_checksum: self
                .fill_udp4_zero_checksum
                .unwrap_or(d.fill_udp4_zero_checksum),
        }
    }
}

/// `[reassembly]`, as written: each key optional.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReassembly {
    pub enabled: Option<bool>,
    pub max_bytes: Option<u64>,
    pub max_datagrams: Option<u64>,
    pub max_bytes_per_destination: Option<u64>,
    pub max_datagrams_per_destination: Option<u64>,
    pub timeout_secs: Option<u64>,
}

/// `[offloads]`, as written: `"auto"` or `"off"` each.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOffloads {
    /// TUN checksum offload (NEEDS_CSUM packets); TSO, USO and coalescing
    /// need it.
    pub tun_checksum: Option<String>,
    /// TCP super-packets from the TUN device (TSO).
    pub tso: Option<String>,
    /// UDP super-packets from the TUN device (USO).
    pub uso: Option<String>,
    /// Validated segments of one flow written to TUN as one packet.
    pub coalesce: Option<String>,
    /// UDP GSO trains on the NAT-T socket.
    pub udp_gso: Option<String>,
    /// UDP GRO trains on the NAT-T socket.
    pub udp_gro: Option<String>,
}

/// `[[peer]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: String,
    /// This host's outer address toward the peer.
    pub local: String,
    /// The peer's outer address.
    pub endpoint: String,
    /// Inner addresses; default the outer ones (classic transport mode).
    pub inner_local: Option<String>,
    pub inner_remote: Option<String>,
    /// Manual keying: both of `outbound` and `inbound`, or neither and
    /// `[peer.ike]`.
    pub outbound: Option<RawSa>,
    pub inbound: Option<RawSa>,
    /// `[peer.ike]`: keyed by IKEv2 instead ([`super::ike`]).
    pub ike: Option<super::ike::RawIke>,
}

/// A peer's `outbound` or `inbound` SA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSa {
    pub spi: u32,
    pub key_file: PathBuf,
    #[serde(default = "default_icv")]
    pub icv: u8,
    #[serde(default = "default_true")]
    pub esn: bool,
    /// Inbound only.
    pub replay_window: Option<u32>,
}

/// The keys of [`RawConfig`], which belong above the first table header.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "interface",
    "outer_mtu",
    "mtu",
    "outer",
    "port",
    "state_dir",
    "crypto",
    "selftest_interval_secs",
    "on_selftest_failure",
    "fwmark",
    "rekey_switch_secs",
    "rekey_retire_secs",
    "metrics_listen",
    "drop_capture",
    "control_socket",
    "inner",
    "offloads",
    "reassembly",
    "peer",
];

/// "ES": any value works that no other policy-routing user on the host takes.
pub const DEFAULT_FWMARK: u32 = 0x4553;

fn default_capture_bytes() -> u64 {
    16 << 20
}
fn default_capture_files() -> u32 {
    4
}
fn default_interface() -> String {
    "esptun0".into()
}
fn default_outer_mtu() -> u16 {
    1500
}
fn default_outer() -> String {
    "udp".into()
}
fn default_port() -> u16 {
    crate::wire::outer::NATT_PORT
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/esptun")
}
fn default_crypto() -> String {
    "auto".into()
}
fn default_selftest_interval() -> u64 {
    60
}
fn default_on_failure() -> String {
    "fallback".into()
}
fn default_fwmark() -> u32 {
    DEFAULT_FWMARK
}
fn default_rekey_switch() -> u64 {
    30
}
fn default_rekey_retire() -> u64 {
    120
}
fn default_icv() -> u8 {
    16
}
fn default_true() -> bool {
    true
}
