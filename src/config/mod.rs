//! The configuration file (TOML), validated up front.
//!
//! Parsing refuses unknown fields (a typo is an error, not a silently
//! ignored setting). Validation then collects every problem at once, each
//! naming the field and what to do, so an operator fixes a file in one
//! pass. What the file names (key files, the state directory) is checked
//! separately ([`Config::preflight`]), because reading key files needs the
//! daemon's user; `esptun check-config` and `esptun run` both run it
//! ([`Config::load_checked`]) before anything on the system changes.
//!
//! Two layers: [`raw`] mirrors the file (serde, defaults), and [`Config`]
//! is what passed validation, grouped by concern: the TUN interface, the
//! outer path, crypto, key rolls, operations, the inner-checksum policy
//! and the peers. Each group is validated by its own function in
//! `validate.rs`, every problem going to one list.
//!
//! The optional `[inner]` table sets the inner-checksum policy
//! ([`InnerPolicy`]); each key defaults to the built-in policy:
//!
//! ```toml
//! [inner]
//! allow_udp4_zero_checksum = true         # IPv4 UDP "no checksum" (RFC 768), counted
//! allow_unverifiable_protocols = false    # protocols without a checksum esptun knows
//! allow_udplite_partial_coverage = false  # UDP-Lite covering part of the datagram
//! clamp_mss = "auto"                      # TCP SYN MSS: "auto", "off" or a number
//! ipv6_hop_by_hop = "drop"                # inner IPv6 hop-by-hop header: "drop" or "carry"
//! ```
//!
//! The optional `[reassembly]` table limits the outbound reassembly of the
//! IP fragments the kernel writes to the TUN device
//! ([`ReassemblyConfig`]):
//!
//! ```toml
//! [reassembly]
//! enabled = true                          # false: fragments are dropped
//! max_bytes = 4194304                     # fragment data held, in total
//! max_datagrams = 256                     # datagrams in flight, in total
//! max_bytes_per_destination = 1048576     # the same for one destination
//! max_datagrams_per_destination = 64
//! timeout_secs = 30                       # RFC 8200 4.5: at most 60
//! ```

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::crypto::IcvLen;
use crate::crypto::select::{FailurePolicy, Mode};
use crate::datapath::reassembly::ReassemblyConfig;
use crate::keyfile;
use crate::wire::icmp::MssClamp;
use crate::wire::inner::InnerPolicy;
use crate::wire::outer::Encap;

pub mod ike;
mod preflight;
pub mod raw;
mod validate;

pub use ike::{IkePeer, IkeSettings};
pub use raw::{DEFAULT_FWMARK, DropCaptureConfig, RawConfig};

/// The worst-case ESP overhead of NAT-T (the default outer mode): what the
/// default TUN MTU leaves below an outer MTU. See [`Encap::overhead`].
pub const WORST_CASE_OVERHEAD: u16 = Encap::NATT.overhead() as u16;

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
    /// Valid, but what it names cannot be used: key files, the state
    /// directory ([`Config::preflight`]).
    #[error(
        "config {path} is valid, but esptun run would refuse it ({} problem(s)):\n  - {}",
        problems.len(), problems.join("\n  - ")
    )]
    Unusable {
        path: PathBuf,
        problems: Vec<String>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A top-level key written after a table header belongs to that table
/// (TOML), so `fwmark = 1` below a `[[peer]]` is an unknown field of the
/// peer: say where it belongs.
fn with_hint(message: String) -> String {
    let key = message
        .split("unknown field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next());
    match key {
        Some(key) if raw::TOP_LEVEL_KEYS.contains(&key) => format!(
            "{message}\nhint: `{key}` is a top-level setting, but TOML puts every key after a \
             table header ([[peer]], [inner], [drop_capture]) into that table: move `{key} = ...` \
             above the first table header"
        ),
        _ => message,
    }
}

/// A configuration that passed validation.
#[derive(Debug, Clone)]
pub struct Config {
    pub interface: InterfaceConfig,
    pub outer: OuterConfig,
    pub crypto: CryptoConfig,
    pub rekey: RekeyConfig,
    pub operations: OperationsConfig,
    /// `[inner]`: which packets without a verifiable inner checksum pass.
    pub inner: InnerPolicy,
    /// `[inner] clamp_mss`: TCP MSS clamping of SYNs ([`MssClamp`]).
    pub clamp_mss: MssClamp,
    /// `[inner] ipv6_hop_by_hop`: what becomes of inner IPv6 packets with
    /// a hop-by-hop options header ([`HopByHopMode`]).
    pub ipv6_hop_by_hop: HopByHopMode,
    /// `[offloads]`: which kernel offloads may be used.
    pub offloads: Offloads,
    /// `[reassembly]`: the outbound reassembly of fragments.
    pub reassembly: ReassemblyConfig,
    /// The manually keyed peers.
    pub peers: Vec<Peer>,
    /// The peers keyed by IKE (`[peer.ike]`).
    pub ike_peers: Vec<IkePeer>,
}

/// `[inner] ipv6_hop_by_hop`. In transport mode ESP goes after the IPv6
/// hop-by-hop header, which belongs to the outer packet (RFC 4303 section
/// 3.1.1). `Drop` (the default): inner packets with one are dropped as
/// `hop_by_hop`. `Carry`: the header goes on the outer packet
/// (IPV6_HOPOPTS, which Linux allows only with CAP_NET_RAW, so the daemon
/// needs it in NAT-T mode too) and the receiver puts it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HopByHopMode {
    #[default]
    Drop,
    Carry,
}

/// `[offloads]`: each true unless turned `"off"`. The daemon uses what the
/// kernel then grants, and `esptun status` shows what is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    pub tun_checksum: bool,
    pub tso: bool,
    pub uso: bool,
    pub coalesce: bool,
    pub udp_gso: bool,
    pub udp_gro: bool,
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads {
            tun_checksum: true,
            tso: true,
            uso: true,
            coalesce: true,
            udp_gso: true,
            udp_gro: true,
        }
    }
}

/// The TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub name: String,
    /// Given, or derived: `outer_mtu` minus [`Encap::overhead`].
    pub mtu: u16,
}

/// The path between the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterConfig {
    /// `outer` and `port`.
    pub encap: Encap,
    pub outer_mtu: u16,
    /// Mark of the daemon's own outer packets and its routing table number.
    pub fwmark: u32,
}

/// Provider selection and self-tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoConfig {
    pub mode: Mode,
    pub on_selftest_failure: FailurePolicy,
    /// Between long-message self-tests on the datapath threads.
    pub selftest_interval: Duration,
}

/// Key rolls by reload (`rekey_switch_secs`, `rekey_retire_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RekeyConfig {
    pub switch: Duration,
    pub retire: Duration,
}

/// Where the daemon keeps state and how it is observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationsConfig {
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub drop_capture: Option<DropCaptureConfig>,
}

/// A validated peer, with parsed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub local: IpAddr,
    pub endpoint: IpAddr,
    pub inner_local: IpAddr,
    pub inner_remote: IpAddr,
    pub outbound: Sa,
    pub inbound: Sa,
}

/// A validated SA of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sa {
    pub spi: u32,
    pub key_file: PathBuf,
    pub icv: IcvLen,
    pub esn: bool,
    pub replay_window: u32,
}

/// Earlier names of the validated types.
pub type Valid = Config;
pub type ValidPeer = Peer;
pub type ValidSa = Sa;

impl Config {
    /// Reads, parses and validates `path` (key files not yet read).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
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
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::new(),
            message: with_hint(e.to_string()),
        })?;
        validate::config(&raw).map_err(|problems| ConfigError::Invalid {
            path: PathBuf::new(),
            problems,
        })
    }

    /// [`Config::load`], then [`Config::preflight`]: every check
    /// `esptun run` makes before it changes anything on the system, the
    /// same for `esptun check-config` and `esptun run`.
    pub fn load_checked(path: &Path) -> Result<Config, ConfigError> {
        let config = Self::load(path)?;
        config
            .preflight()
            .map_err(|problems| ConfigError::Unusable {
                path: path.to_path_buf(),
                problems,
            })?;
        Ok(config)
    }

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
    use crate::sa::replay::DEFAULT_WINDOW;

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
        assert_eq!(v.interface.name, "esptun0");
        assert_eq!(v.interface.mtu, 1500 - WORST_CASE_OVERHEAD);
        assert!(v.outer.encap.is_udp());
        assert_eq!(v.outer.encap.port(), Some(4500));
        assert_eq!(v.crypto.mode, Mode::Auto);
        assert_eq!(v.crypto.on_selftest_failure, FailurePolicy::Fallback);
        assert_eq!(v.inner, InnerPolicy::default());
        let p = &v.peers[0];
        assert_eq!(p.inner_local, p.local, "classic transport mode by default");
        assert_eq!(p.inner_remote, p.endpoint);
        assert_eq!((p.outbound.icv, p.outbound.esn), (IcvLen::Icv16, true));
        assert_eq!(p.inbound.replay_window, DEFAULT_WINDOW);
    }

    #[test]
    fn the_derived_mtu_counts_a_udp_header_only_for_nat_t() {
        // 1500 - (8 SPI/seq + 8 IV + 3 pad + 2 trailer + 16 ICV) - 8 UDP.
        let udp = Config::parse(MINIMAL).expect("valid");
        assert_eq!(udp.interface.mtu, 1455);
        let esp = Config::parse(&format!("outer = \"esp\"\n{MINIMAL}")).expect("valid");
        assert_eq!(esp.outer.encap, Encap::RawEsp);
        assert_eq!(esp.interface.mtu, 1463);
        // The limits move with it.
        let fits = Config::parse(&format!("outer = \"esp\"\nmtu = 1463\n{MINIMAL}"));
        assert!(fits.is_ok(), "{fits:?}");
        let found = problems(&format!("mtu = 1463\n{MINIMAL}"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].message.contains("576 to 1455"), "{}", found[0]);
        let found = problems(&format!("outer = \"esp\"\nouter_mtu = 612\n{MINIMAL}"));
        assert!(found[0].message.contains("use 613 or more"), "{}", found[0]);
    }

    #[test]
    fn the_inner_table_sets_the_checksum_policy_over_its_defaults() {
        let v = Config::parse(&format!(
            "[inner]\nallow_unverifiable_protocols = true\n{MINIMAL}"
        ))
        .expect("valid");
        assert_eq!(
            v.inner,
            InnerPolicy {
                allow_unverifiable_protocols: true,
                ..InnerPolicy::default()
            }
        );
        let v = Config::parse(&format!(
            "[inner]\nallow_udp4_zero_checksum = false\nallow_udplite_partial_coverage = true\n{MINIMAL}"
        ))
        .expect("valid");
        assert!(!v.inner.allow_udp4_zero_checksum);
        assert!(v.inner.allow_udplite_partial_coverage);
        assert!(!v.inner.allow_unverifiable_protocols);
        let err = Config::parse(&format!("[inner]\nallow_everything = true\n{MINIMAL}"))
            .expect_err("unknown key");
        assert!(err.to_string().contains("allow_everything"), "{err}");
        let err = Config::parse(&format!("[inner]\nallow_udp4_zero_checksum = 1\n{MINIMAL}"))
            .expect_err("not a bool");
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn ipv6_hop_by_hop_is_drop_unless_set_to_carry() {
        assert_eq!(
            Config::parse(MINIMAL).expect("valid").ipv6_hop_by_hop,
            HopByHopMode::Drop
        );
        for (value, want) in [("drop", HopByHopMode::Drop), ("carry", HopByHopMode::Carry)] {
            let v = Config::parse(&format!(
                "[inner]\nipv6_hop_by_hop = \"{value}\"\n{MINIMAL}"
            ))
            .expect("valid");
            assert_eq!(v.ipv6_hop_by_hop, want, "{value}");
        }
        for bad in ["\"pass\"", "\"Carry\"", "true"] {
            let e = Config::parse(&format!("[inner]\nipv6_hop_by_hop = {bad}\n{MINIMAL}"))
                .expect_err(bad);
            let text = e.to_string();
            assert!(
                text.contains("ipv6_hop_by_hop"),
                "{bad}: the error names the field: {text}"
            );
        }
    }

    #[test]
    fn clamp_mss_is_auto_unless_set_to_off_or_a_number() {
        assert_eq!(
            Config::parse(MINIMAL).expect("valid").clamp_mss,
            MssClamp::Auto
        );
        for (value, want) in [
            ("\"off\"", MssClamp::Off),
            ("\"auto\"", MssClamp::Auto),
            ("1200", MssClamp::Fixed(1200)),
            ("536", MssClamp::Fixed(536)),
        ] {
            let v =
                Config::parse(&format!("[inner]\nclamp_mss = {value}\n{MINIMAL}")).expect("valid");
            assert_eq!(v.clamp_mss, want, "{value}");
        }
        for bad in ["100", "70000", "-1", "\"maybe\""] {
            let err =
                Config::parse(&format!("[inner]\nclamp_mss = {bad}\n{MINIMAL}")).expect_err(bad);
            assert!(
                matches!(&err, ConfigError::Invalid { problems, .. }
                    if problems.iter().any(|p| p.field == "inner.clamp_mss")),
                "{bad}: {err}"
            );
        }
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
    fn a_top_level_key_after_a_peer_table_gets_a_hint() {
        let err = Config::parse(&format!("{MINIMAL}fwmark = 0x4554\n")).expect_err("in the peer");
        let text = err.to_string();
        assert!(
            text.contains("unknown field `fwmark`") && text.contains("top-level setting"),
            "{text}"
        );
        // A plain typo gets no such hint.
        let err = Config::parse(&format!("{MINIMAL}fwmrk = 1\n")).expect_err("typo");
        assert!(!err.to_string().contains("hint"), "{err}");
        // The list is the file's: serde names the known keys of an unknown one.
        let err = Config::parse("zzz = 1\n").expect_err("unknown").to_string();
        let listed = err
            .split("expected one of")
            .nth(1)
            .unwrap_or_else(|| panic!("{err}"));
        let known: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
        let mut ours = raw::TOP_LEVEL_KEYS.to_vec();
        let mut theirs = known.clone();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(ours, theirs, "{err}");
    }

    #[test]
    fn an_ipv6_peer_needs_a_tun_mtu_of_1280() {
        let v6 = MINIMAL
            .replace("198.18.0.1", "2001:db8::1")
            .replace("198.19.0.2", "2001:db8::2");
        let found = problems(&format!("outer_mtu = 1300\n{v6}"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "outer_mtu");
        assert!(
            found[0].message.contains("1280")
                && found[0].message.contains("use an outer_mtu of 1325"),
            "{}",
            found[0]
        );
        let found = problems(&format!("mtu = 1279\n{v6}"));
        assert_eq!(found[0].field, "mtu", "{found:?}");
        assert!(Config::parse(&format!("outer_mtu = 1325\n{v6}")).is_ok());
        // IPv4 keeps its 576.
        assert!(Config::parse(&format!("outer_mtu = 1300\n{MINIMAL}")).is_ok());
    }

    #[test]
    fn one_key_file_in_two_peers_is_refused() {
        let second = MINIMAL
            .replace("name = \"b\"", "name = \"c\"")
            .replace("198.19.0.2", "198.19.0.3")
            .replace("0x1001", "0x1002")
            .replace("0x2001", "0x2002")
            .replace("b-to-a.key", "c-to-a.key");
        let found = problems(&format!("{MINIMAL}{second}"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "peer[1] (c).outbound.key_file");
        assert!(
            found[0].message.contains("peer[0] (b).outbound.key_file"),
            "{}",
            found[0]
        );
        // Peer c's inbound key is peer b's outbound key.
        let crossed = second
            .replace("a-to-b.key", "a-to-c.key")
            .replace("c-to-a.key", "a-to-b.key");
        let found = problems(&format!("{MINIMAL}{crossed}"));
        assert_eq!(found[0].field, "peer[1] (c).inbound.key_file", "{found:?}");
    }

    #[test]
    fn a_bad_fwmark_is_shown_in_hex() {
        let found = problems(&format!("fwmark = 0x80000000\n{MINIMAL}"));
        assert!(
            found[0].message.starts_with("0x80000000 ") && found[0].message.contains("0x4553"),
            "{}",
            found[0]
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

    #[test]
    fn reassembly_limits_default_and_are_checked() {
        let v = Config::parse(MINIMAL).expect("valid");
        assert_eq!(v.reassembly, ReassemblyConfig::default());
        assert!(v.reassembly.enabled);
        assert_eq!(v.reassembly.timeout, Duration::from_secs(30));
        let set = Config::parse(&format!(
            "[reassembly]\nenabled = false\nmax_bytes = 65536\nmax_datagrams = 8\n\
             max_bytes_per_destination = 32768\nmax_datagrams_per_destination = 2\n\
             timeout_secs = 10\n{MINIMAL}"
        ))
        .expect("valid");
        assert_eq!(
            set.reassembly,
            ReassemblyConfig {
                enabled: false,
                max_bytes: 65536,
                max_datagrams: 8,
                max_bytes_per_destination: 32768,
                max_datagrams_per_destination: 2,
                timeout: Duration::from_secs(10),
            }
        );
        let bad = problems(&format!(
            "[reassembly]\nmax_bytes = 100\nmax_datagrams = 0\ntimeout_secs = 61\n\
             max_datagrams_per_destination = 300\n{MINIMAL}"
        ));
        for field in [
            "reassembly.max_bytes",
            "reassembly.max_datagrams",
            "reassembly.timeout_secs",
            "reassembly.max_datagrams_per_destination",
        ] {
            assert!(bad.iter().any(|p| p.field == field), "{field}: {bad:?}");
        }
        assert!(
            bad.iter()
                .any(|p| p.field == "reassembly.timeout_secs" && p.message.contains("1 to 60")),
            "{bad:?}"
        );
        // Per destination at most the total.
        let over = problems(&format!(
            "[reassembly]\nmax_bytes = 65536\nmax_bytes_per_destination = 131072\n{MINIMAL}"
        ));
        assert!(
            over.iter()
                .any(|p| p.field == "reassembly.max_bytes_per_destination"),
            "{over:?}"
        );
    }
}
