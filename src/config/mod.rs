//! The configuration file (TOML), validated up front.
//!
//! Parsing refuses unknown fields (a typo is an error, not a silently
//! ignored setting). Validation then collects every problem at once, each
//! naming the field and what to do, so an operator fixes a file in one
//! pass. Key files are checked separately ([`Valid::check_key_files`]),
//! because reading them needs the daemon's privileges.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crypto::IcvLen;
use crate::crypto::select::{FailurePolicy, Mode};
use crate::keyfile;
use crate::sa::replay::{DEFAULT_WINDOW, MAX_WINDOW};

/// Bytes transport-mode ESP adds to an inner packet at most: UDP (8), ESP
/// header (8), IV (8), padding (3), trailer (2), ICV (16). The IP header is
/// reused, so it adds nothing.
pub const WORST_CASE_OVERHEAD: u16 = 8 + 8 + 8 + 3 + 2 + 16;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TUN interface name.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// MTU of the path between the hosts, from which the TUN MTU is derived.
    #[serde(default = "default_outer_mtu")]
    pub outer_mtu: u16,
    /// TUN MTU; default `outer_mtu` minus [`WORST_CASE_OVERHEAD`].
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
    #[serde(default, rename = "peer")]
    pub peers: Vec<Peer>,
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

fn default_capture_bytes() -> u64 {
    16 << 20
}
fn default_capture_files() -> u32 {
    4
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    /// This host's outer address toward the peer.
    pub local: String,
    /// The peer's outer address.
    pub endpoint: String,
    /// Inner addresses; default the outer ones (classic transport mode).
    pub inner_local: Option<String>,
    pub inner_remote: Option<String>,
    pub outbound: SaConfig,
    pub inbound: SaConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaConfig {
    pub spi: u32,
    pub key_file: PathBuf,
    #[serde(default = "default_icv")]
    pub icv: u8,
    #[serde(default = "default_true")]
    pub esn: bool,
    /// Inbound only.
    pub replay_window: Option<u32>,
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
/// "ES": any value works that no other policy-routing user on the host takes.
pub const DEFAULT_FWMARK: u32 = 0x4553;
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

/// One problem in a configuration: where, what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {path} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A validated peer, with parsed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPeer {
    pub name: String,
    pub local: IpAddr,
    pub endpoint: IpAddr,
    pub inner_local: IpAddr,
    pub inner_remote: IpAddr,
    pub outbound: ValidSa,
    pub inbound: ValidSa,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSa {
    pub spi: u32,
    pub key_file: PathBuf,
    pub icv: IcvLen,
    pub esn: bool,
    pub replay_window: u32,
}

/// A configuration that passed validation.
#[derive(Debug, Clone)]
pub struct Valid {
    pub interface: String,
    pub mtu: u16,
    pub outer_udp: bool,
    pub port: u16,
    pub state_dir: PathBuf,
    pub crypto: Mode,
    pub selftest_interval_secs: u64,
    pub on_selftest_failure: FailurePolicy,
    pub fwmark: u32,
    pub rekey_switch: std::time::Duration,
    pub rekey_retire: std::time::Duration,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub drop_capture: Option<DropCaptureConfig>,
    pub peers: Vec<ValidPeer>,
}

impl Config {
    /// Reads, parses and validates `path` (key files not yet read).
    pub fn load(path: &Path) -> Result<Valid, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Valid, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|problems| ConfigError::Invalid {
            path: PathBuf::new(),
            problems,
        })
    }

    fn validate(&self) -> Result<Valid, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: String| {
            problems.push(Problem {
                field: field.to_string(),
                message,
            })
        };

        // IFNAMSIZ is 16 including the terminating NUL.
        let name_ok = !self.interface.is_empty()
            && self.interface.len() <= 15
            && self.interface != "."
            && self.interface != ".."
            && self
                .interface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            problem(
                "interface",
                format!(
                    "{:?} is not a usable interface name: use 1 to 15 letters, digits, '-', '_' or '.'",
                    self.interface
                ),
            );
        }
        let outer_udp = match self.outer.as_str() {
            "udp" => true,
            "esp" => false,
            other => {
                problem(
                    "outer",
                    format!(
                        "{other:?} is not an outer mode: use \"udp\" (NAT-T, port 4500) or \"esp\" (IP protocol 50)"
                    ),
                );
                true
            }
        };
        if self.outer_mtu < 576 + WORST_CASE_OVERHEAD {
            problem(
                "outer_mtu",
                format!(
                    "{} is too small: IPv4 needs at least 576 bytes inside the tunnel, so use {} or more",
                    self.outer_mtu,
                    576 + WORST_CASE_OVERHEAD
                ),
            );
        }
        let mtu = self
            .mtu
            .unwrap_or(self.outer_mtu.saturating_sub(WORST_CASE_OVERHEAD));
        if let Some(m) = self.mtu
            && (m < 576 || m > self.outer_mtu.saturating_sub(WORST_CASE_OVERHEAD))
        {
            problem(
                "mtu",
                format!(
                    "{m} does not fit: use 576 to {} (outer_mtu {} minus {WORST_CASE_OVERHEAD} bytes of ESP overhead), or leave it out to derive it",
                    self.outer_mtu.saturating_sub(WORST_CASE_OVERHEAD),
                    self.outer_mtu
                ),
            );
        }
        if outer_udp && self.port == 0 {
            problem(
                "port",
                "0 is not a port: use 4500 (the NAT-T port) unless the peers agree on another"
                    .into(),
            );
        }
        if !self.state_dir.is_absolute() {
            problem(
                "state_dir",
                format!(
                    "{} is relative: use an absolute path such as /var/lib/esptun",
                    self.state_dir.display()
                ),
            );
        }
        let crypto = self.crypto.parse::<Mode>().unwrap_or_else(|e| {
            problem("crypto", e);
            Mode::Auto
        });
        let on_failure = self
            .on_selftest_failure
            .parse::<FailurePolicy>()
            .unwrap_or_else(|e| {
                problem("on_selftest_failure", e);
                FailurePolicy::Fallback
            });
        if !(1..=86_400).contains(&self.selftest_interval_secs) {
            problem(
                "selftest_interval_secs",
                format!(
                    "{} is out of range: use 1 to 86400 seconds (default 60)",
                    self.selftest_interval_secs
                ),
            );
        }
        if self.fwmark == 0 || self.fwmark > 0x7fff_ffff {
            problem(
                "fwmark",
                format!(
                    "{} cannot be used: the mark is also a routing table number, use 1 to 2147483647 (default {DEFAULT_FWMARK}) \
                     that no other routing policy on this host uses",
                    self.fwmark
                ),
            );
        }
        if !(1..=3600).contains(&self.rekey_switch_secs)
            || self.rekey_retire_secs <= self.rekey_switch_secs
            || self.rekey_retire_secs > 86_400
        {
            problem(
                "rekey_switch_secs",
                format!(
                    "{} (with rekey_retire_secs {}) does not work: use 1 to 3600 seconds, and a \
                     rekey_retire_secs above it (at most 86400), so an old inbound SA outlives the \
                     switch (defaults 30 and 120)",
                    self.rekey_switch_secs, self.rekey_retire_secs
                ),
            );
        }
        let control_socket = self
            .control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/esptun/{}.sock", self.interface)));
        if !control_socket.is_absolute() {
            problem(
                "control_socket",
                format!(
                    "{} is relative: use an absolute path such as /run/esptun/esptun0.sock",
                    control_socket.display()
                ),
            );
        }
        let metrics_listen = match &self.metrics_listen {
            None => None,
            Some(text) => match text.parse::<std::net::SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    problem(
                        "metrics_listen",
                        format!(
                            "{text:?} is not an address and port: use e.g. \"127.0.0.1:9150\" (metrics are \
                             unauthenticated: keep them on a local or management address)"
                        ),
                    );
                    None
                }
            },
        };
        if let Some(c) = &self.drop_capture {
            if !c.path.is_absolute() {
                problem(
                    "drop_capture.path",
                    format!(
                        "{} is relative: use an absolute path such as /var/lib/esptun/drops.pcap",
                        c.path.display()
                    ),
                );
            }
            if c.max_bytes < 64 << 10 || c.max_files == 0 || c.max_files > 100 {
                problem(
                    "drop_capture",
                    format!(
                        "max_bytes {} and max_files {} do not work: use max_bytes of at least 65536 \
                         and 1 to 100 files (defaults 16 MiB and 4)",
                        c.max_bytes, c.max_files
                    ),
                );
            }
        }
        if self.peers.is_empty() {
            problem(
                "peer",
                "no [[peer]] sections: add at least one peer with its addresses and SAs".into(),
            );
        }

        let mut names = HashSet::new();
        let mut inbound_spis = HashSet::new();
        let mut outbound_spis = HashSet::new();
        let mut inner_remotes = HashSet::new();
        let mut peers = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let at = |f: &str| format!("peer[{i}] ({}).{f}", p.name);
            if p.name.is_empty() || !names.insert(p.name.clone()) {
                problem(&at("name"), "must be present and unique among peers".into());
            }
            let mut addr = |field: &str, value: &str| -> Option<IpAddr> {
                value
                    .parse::<IpAddr>()
                    .map_err(|_| {
                        problem(
                            &at(field),
                            format!("{value:?} is not an IP address (write it without a port)"),
                        )
                    })
                    .ok()
            };
            let local = addr("local", &p.local);
            let endpoint = addr("endpoint", &p.endpoint);
            let inner_local = match &p.inner_local {
                Some(v) => addr("inner_local", v),
                None => local,
            };
            let inner_remote = match &p.inner_remote {
                Some(v) => addr("inner_remote", v),
                None => endpoint,
            };
            if let (Some(l), Some(e)) = (local, endpoint) {
                if l.is_ipv4() != e.is_ipv4() {
                    problem(
                        &at("endpoint"),
                        "local and endpoint must both be IPv4 or both IPv6".into(),
                    );
                }
                if let (Some(il), Some(ir)) = (inner_local, inner_remote) {
                    if il.is_ipv4() != l.is_ipv4() || ir.is_ipv4() != l.is_ipv4() {
                        problem(&at("inner_local"), "transport mode keeps the IP header: inner addresses must be the same IP version as the outer ones".into());
                    }
                    if !inner_remotes.insert(ir) {
                        problem(
                            &at("inner_remote"),
                            format!(
                                "{ir} is already another peer's inner address: each peer needs its own"
                            ),
                        );
                    }
                }
            }
            let mut sa = |dir: &str, c: &SaConfig, spis: &mut HashSet<u32>| -> Option<ValidSa> {
                let field = |f: &str| at(&format!("{dir}.{f}"));
                let mut ok = true;
                if c.spi < 256 {
                    problem(
                        &field("spi"),
                        format!(
                            "{} is reserved (RFC 4303 section 2.1, IANA): use 256 to 4294967295",
                            c.spi
                        ),
                    );
                    ok = false;
                } else if !spis.insert(c.spi) {
                    problem(
                        &field("spi"),
                        format!(
                            "{:#x} is used by another {dir} SA: every {dir} SPI must be unique",
                            c.spi
                        ),
                    );
                    ok = false;
                }
                let icv = IcvLen::from_bytes(usize::from(c.icv))
                    .map_err(|_| {
                        problem(&field("icv"), format!("{} is not an ICV length: use 16 (default), 12 or 8 (RFC 4106 section 6)", c.icv));
                    })
                    .ok();
                let window = c.replay_window.unwrap_or(DEFAULT_WINDOW);
                if dir == "outbound" && c.replay_window.is_some() {
                    problem(
                        &field("replay_window"),
                        "only inbound SAs have a replay window: remove it here".into(),
                    );
                    ok = false;
                } else if !(1..=MAX_WINDOW).contains(&window) {
                    problem(
                        &field("replay_window"),
                        format!(
                            "{window} is out of range: use 1 to {MAX_WINDOW} packets (default {DEFAULT_WINDOW})"
                        ),
                    );
                    ok = false;
                }
                Some(ValidSa {
                    spi: c.spi,
                    key_file: c.key_file.clone(),
                    icv: icv?,
                    esn: c.esn,
                    replay_window: window,
                })
                .filter(|_| ok)
            };
            let outbound = sa("outbound", &p.outbound, &mut outbound_spis);
            let inbound = sa("inbound", &p.inbound, &mut inbound_spis);
            if p.outbound.key_file == p.inbound.key_file {
                problem(&at("inbound.key_file"), "is the outbound key file too: each direction needs its own key (one per host, see esptun genkey)".into());
            }
            if let (
                Some(local),
                Some(endpoint),
                Some(inner_local),
                Some(inner_remote),
                Some(outbound),
                Some(inbound),
            ) = (
                local,
                endpoint,
                inner_local,
                inner_remote,
                outbound,
                inbound,
            ) {
                peers.push(ValidPeer {
                    name: p.name.clone(),
                    local,
                    endpoint,
                    inner_local,
                    inner_remote,
                    outbound,
                    inbound,
                });
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Valid {
            interface: self.interface.clone(),
            mtu,
            outer_udp,
            port: self.port,
            state_dir: self.state_dir.clone(),
            crypto,
            selftest_interval_secs: self.selftest_interval_secs,
            on_selftest_failure: on_failure,
            fwmark: self.fwmark,
            rekey_switch: std::time::Duration::from_secs(self.rekey_switch_secs),
            rekey_retire: std::time::Duration::from_secs(self.rekey_retire_secs),
            control_socket,
            metrics_listen,
            drop_capture: self.drop_capture.clone(),
            peers,
        })
    }
}

impl Valid {
    /// Reads every key file (permissions, length, hex), reporting all
    /// problems together.
    pub fn check_key_files(&self) -> Result<(), Vec<String>> {
        let errors: Vec<String> = self
            .peers
            .iter()
            .flat_map(|p| [&p.outbound.key_file, &p.inbound.key_file])
            .filter_map(|path| keyfile::load(path).err().map(|e| e.to_string()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[peer]]
name = "b"
local = "198.18.0.1"
endpoint = "198.19.0.2"
outbound = { spi = 0x1001, key_file = "/etc/esptun/a-to-b.key" }
inbound = { spi = 0x2001, key_file = "/etc/esptun/b-to-a.key" }
"#;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let v = Config::parse(MINIMAL).expect("valid");
        assert_eq!(v.interface, "esptun0");
        assert_eq!(v.mtu, 1500 - WORST_CASE_OVERHEAD);
        assert!(v.outer_udp);
        assert_eq!(v.port, 4500);
        assert_eq!(v.crypto, Mode::Auto);
        assert_eq!(v.on_selftest_failure, FailurePolicy::Fallback);
        let p = &v.peers[0];
        assert_eq!(p.inner_local, p.local, "classic transport mode by default");
        assert_eq!(p.inner_remote, p.endpoint);
        assert_eq!((p.outbound.icv, p.outbound.esn), (IcvLen::Icv16, true));
        assert_eq!(p.inbound.replay_window, DEFAULT_WINDOW);
    }

    #[test]
    fn typos_are_syntax_errors_with_a_location() {
        let err = Config::parse(&format!("intrface = \"x\"\n{MINIMAL}")).expect_err("typo");
        let text = err.to_string();
        assert!(
            text.contains("intrface") && text.contains("line 1"),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_field_and_fix() {
        let bad = r#"
interface = "a/very/long/interface/name"
outer = "tcp"
mtu = 9000
crypto = "fast"
on_selftest_failure = "ignore"
selftest_interval_secs = 0
state_dir = "relative"

[[peer]]
name = "b"
local = "198.18.0.1"
endpoint = "198.19.0.2:4500"
inner_remote = "2001:db8::2"
outbound = { spi = 5, key_file = "/k/same", icv = 10, replay_window = 64 }
inbound = { spi = 0x2001, key_file = "/k/same", replay_window = 0 }

[[peer]]
name = "b"
local = "198.18.0.1"
endpoint = "198.19.0.3"
outbound = { spi = 0x1002, key_file = "/k/o2" }
inbound = { spi = 0x2001, key_file = "/k/i2" }
"#;
        let found = problems(bad);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        for expected in [
            "interface",
            "outer",
            "mtu",
            "crypto",
            "on_selftest_failure",
            "selftest_interval_secs",
            "state_dir",
            "peer[0] (b).endpoint",
            "peer[0] (b).outbound.spi",
            "peer[0] (b).outbound.icv",
            "peer[0] (b).outbound.replay_window",
            "peer[0] (b).inbound.replay_window",
            "peer[0] (b).inbound.key_file",
            "peer[1] (b).name",
            "peer[1] (b).inbound.spi",
        ] {
            assert!(
                fields.contains(&expected),
                "missing {expected} in {found:#?}"
            );
        }
        // Each message says what to do.
        for p in &found {
            assert!(
                ["use", "must", "remove", "needs", "write", "add"]
                    .iter()
                    .any(|w| p.message.contains(w)),
                "{p}"
            );
        }
    }

    #[test]
    fn overlay_inner_addresses_and_ipv6_are_accepted() {
        let v6 = MINIMAL
            .replace("198.18.0.1", "2001:db8::1")
            .replace("198.19.0.2", "2001:db8::2")
            .replace(
                "endpoint",
                "inner_local = \"2001:db8:1::1\"\ninner_remote = \"2001:db8:1::2\"\nendpoint",
            );
        let v = Config::parse(&v6).expect("valid");
        assert_eq!(
            v.peers[0].inner_remote,
            "2001:db8:1::2".parse::<IpAddr>().expect("ip")
        );
        assert_ne!(v.peers[0].inner_remote, v.peers[0].endpoint);
    }

    #[test]
    fn the_example_configs_in_deploy_are_valid() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        for (name, peers) in [
            ("host-a.toml", 1),
            ("host-b.toml", 1),
            ("mesh/host-a.toml", 2),
            ("mesh/host-b.toml", 2),
            ("mesh/host-c.toml", 2),
        ] {
            let v = Config::load(&deploy.join(name)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(v.peers.len(), peers, "{name}");
        }
        // The mesh is consistent: each outbound SA is its peer's inbound SA.
        let load = |h: &str| {
            Config::load(&deploy.join(format!("mesh/host-{h}.toml")))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let hosts = [("a", load("a")), ("b", load("b")), ("c", load("c"))];
        for (name, host) in &hosts {
            for peer in &host.peers {
                let (_, other) = hosts
                    .iter()
                    .find(|(n, _)| format!("host-{n}") == peer.name)
                    .unwrap_or_else(|| panic!("unknown peer {}", peer.name));
                let back = other
                    .peers
                    .iter()
                    .find(|p| p.name == format!("host-{name}"))
                    .unwrap_or_else(|| panic!("{} has no peer host-{name}", peer.name));
                assert_eq!(peer.outbound, back.inbound, "{name} -> {}", peer.name);
                assert_eq!(peer.endpoint, back.local);
            }
        }
    }
}
