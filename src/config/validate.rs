//! From [`RawConfig`] to [`Config`]: one function per section, each adding
//! what is wrong to one [`Problems`] list so that every problem is
//! reported at once. A section with a problem still yields a placeholder
//! value so that the sections after it are checked too; the list decides.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{
    DEFAULT_FWMARK, DropCaptureConfig, RawConfig, RawOffloads, RawPeer, RawReassembly, RawSa,
};
use super::{
    Config, CryptoConfig, HopByHopMode, IkePeer, InterfaceConfig, Offloads, OperationsConfig,
    OuterConfig, Peer, Problem, RekeyConfig, Sa,
};
use crate::crypto::IcvLen;
use crate::crypto::select::{FailurePolicy, Mode};
use crate::datapath::reassembly::{CHUNK, ReassemblyConfig};
use crate::sa::replay::{DEFAULT_WINDOW, MAX_WINDOW};
use crate::wire::icmp::MssClamp;
use crate::wire::outer::Encap;

/// The smallest MTU IPv4 requires of a link (RFC 791), inside the tunnel.
const MIN_INNER_MTU: u16 = 576;
/// The smallest MTU IPv6 requires of a link (RFC 8200 section 5): below
/// it Linux disables IPv6 on the interface.
const MIN_INNER_MTU_V6: u16 = 1280;

/// The problems found so far.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.to_string(),
            message: message.into(),
        });
    }
}

/// Validates every section; `Err` lists every problem found.
pub(super) fn config(raw: &RawConfig) -> Result<Config, Vec<Problem>> {
    let mut p = Problems::default();
    let outer = outer(raw, &mut p);
    let interface = interface(raw, outer.encap, &mut p);
    let crypto = crypto(raw, &mut p);
    let rekey = rekey(raw, &mut p);
    let operations = operations(raw, &mut p);
    let inner = raw.inner.policy();
    let clamp_mss = clamp_mss(raw.inner.clamp_mss, &mut p);
    let ipv6_hop_by_hop = ipv6_hop_by_hop(raw.inner.ipv6_hop_by_hop, &mut p);
    let offloads = offloads(&raw.offloads, &mut p);
    let reassembly = reassembly(&raw.reassembly, &mut p);
    let (peers, ike_peers) = peers(&raw.peers, &mut p);
    ipv6_mtu(raw, &interface, outer.encap, &peers, &ike_peers, &mut p);
    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        interface,
        outer,
        crypto,
        rekey,
        operations,
        inner,
        clamp_mss,
        ipv6_hop_by_hop,
        offloads,
        reassembly,
        peers,
        ike_peers,
    })
}

/// Most bytes `[reassembly]` may hold: 1 GiB.
const MAX_REASSEMBLY_BYTES: u64 = 1 << 30;
/// Most datagrams in flight `[reassembly]` may allow (each costs about
/// 3.5 KiB of bookkeeping besides its data).
const MAX_REASSEMBLY_DATAGRAMS: u64 = 65_536;
/// The longest timeout: RFC 8200 section 4.5 says 60 seconds.
const MAX_REASSEMBLY_TIMEOUT: u64 = 60;

/// `[reassembly]`: every cap at least one chunk or one datagram, each
/// per-destination cap at most its total, a timeout of 1 to 60 seconds.
fn reassembly(raw: &RawReassembly, p: &mut Problems) -> ReassemblyConfig {
    let d = ReassemblyConfig::default();
    let mut cap =
        |name: &str, value: Option<u64>, default: usize, least: u64, most: u64, unit: &str| {
            let Some(v) = value else {
                return default;
            };
            if !(least..=most).contains(&v) {
                p.add(
                    &format!("reassembly.{name}"),
                    format!(
                        "{v} is out of range: use {least} to {most} {unit} (default {default})"
                    ),
                );
                return default;
            }
            usize::try_from(v).unwrap_or(default)
        };
    let chunk = CHUNK as u64;
    let max_bytes = cap(
        "max_bytes",
        raw.max_bytes,
        d.max_bytes,
        chunk,
        MAX_REASSEMBLY_BYTES,
        "bytes",
    );
    let max_datagrams = cap(
        "max_datagrams",
        raw.max_datagrams,
        d.max_datagrams,
        1,
        MAX_REASSEMBLY_DATAGRAMS,
        "datagrams",
    );
    let max_bytes_per_destination = cap(
        "max_bytes_per_destination",
        raw.max_bytes_per_destination,
        d.max_bytes_per_destination.min(max_bytes),
        chunk,
        max_bytes as u64,
        "bytes (at most max_bytes)",
    );
    let max_datagrams_per_destination = cap(
        "max_datagrams_per_destination",
        raw.max_datagrams_per_destination,
        d.max_datagrams_per_destination.min(max_datagrams),
        1,
        max_datagrams as u64,
        "datagrams (at most max_datagrams)",
    );
    let timeout = cap(
        "timeout_secs",
        raw.timeout_secs,
        d.timeout.as_secs() as usize,
        1,
        MAX_REASSEMBLY_TIMEOUT,
        "seconds (RFC 8200 section 4.5: at most 60)",
    );
    ReassemblyConfig {
        enabled: raw.enabled.unwrap_or(d.enabled),
        max_bytes,
        max_datagrams,
        max_bytes_per_destination,
        max_datagrams_per_destination,
        timeout: Duration::from_secs(timeout as u64),
    }
}

/// `[inner] clamp_mss`: `"auto"` when absent (it lowers only SYNs whose
/// MSS would not fit the tunnel or the learned path anyway, as the
/// `TCPMSS --clamp-mss-to-pmtu` rule every tunnel router carries does),
/// `"off"`, or a number of bytes (536, RFC 879's default, to 65495).
fn clamp_mss(raw: Option<super::raw::RawClamp>, p: &mut Problems) -> MssClamp {
    use super::raw::RawClamp;
    match raw {
        None | Some(RawClamp::Auto) => MssClamp::Auto,
        Some(RawClamp::Off) => MssClamp::Off,
        Some(RawClamp::Number(n)) => match u16::try_from(n) {
            Ok(n) if (536..=65495).contains(&n) => MssClamp::Fixed(n),
            _ => {
                p.add(
                    "inner.clamp_mss",
                    format!("{n} is not a usable MSS: use 536 to 65495, \"auto\" or \"off\""),
                );
                MssClamp::Auto
            }
        },
        Some(RawClamp::Unknown) => {
            p.add(
                "inner.clamp_mss",
                "use \"off\", \"auto\" (the default) or a number of bytes",
            );
            MssClamp::Auto
        }
    }
}

/// `[inner] ipv6_hop_by_hop`: `"drop"` when absent.
fn ipv6_hop_by_hop(raw: Option<super::raw::RawHopByHop>, p: &mut Problems) -> HopByHopMode {
    use super::raw::RawHopByHop;
    match raw {
        None | Some(RawHopByHop::Drop) => HopByHopMode::Drop,
        Some(RawHopByHop::Carry) => HopByHopMode::Carry,
        Some(RawHopByHop::Unknown) => {
            p.add(
                "inner.ipv6_hop_by_hop",
                "use \"drop\" (the default: such packets are dropped as hop_by_hop) or \"carry\" \
                 (the header goes on the outer packet; needs CAP_NET_RAW)",
            );
            HopByHopMode::Drop
        }
    }
}

/// `[offloads]`: `"auto"` or `"off"` each. TSO, USO and coalescing ride
/// on the TUN checksum offload, so they go with it.
fn offloads(raw: &RawOffloads, p: &mut Problems) -> Offloads {
    let mut one = |name: &str, value: &Option<String>| match value.as_deref() {
        None | Some("auto") => true,
        Some("off") => false,
        Some(other) => {
            p.add(
                &format!("offloads.{name}"),
                format!(
                    "{other:?} is not an offload setting: use \"auto\" (the default) or \"off\""
                ),
            );
            true
        }
    };
    let tun_checksum = one("tun_checksum", &raw.tun_checksum);
    Offloads {
        tun_checksum,
        tso: one("tso", &raw.tso) && tun_checksum,
        uso: one("uso", &raw.uso) && tun_checksum,
        coalesce: one("coalesce", &raw.coalesce) && tun_checksum,
        udp_gso: one("udp_gso", &raw.udp_gso),
        udp_gro: one("udp_gro", &raw.udp_gro),
    }
}

/// `outer`, `port`, `outer_mtu` and `fwmark`.
fn outer(raw: &RawConfig, p: &mut Problems) -> OuterConfig {
    let encap = match raw.outer.as_str() {
        "udp" => Encap::Udp { port: raw.port },
        "esp" => Encap::RawEsp,
        other => {
            p.add(
                "outer",
                format!(
                    "{other:?} is not an outer mode: use \"udp\" (NAT-T, port 4500) or \"esp\" (IP protocol 50)"
                ),
            );
            Encap::Udp { port: raw.port }
        }
    };
    if encap == (Encap::Udp { port: 0 }) {
        p.add(
            "port",
            "0 is not a port: use 4500 (the NAT-T port) unless the peers agree on another",
        );
    }
    let least = MIN_INNER_MTU + overhead(encap);
    if raw.outer_mtu < least {
        p.add(
            "outer_mtu",
            format!(
                "{} is too small: IPv4 needs at least 576 bytes inside the tunnel, so use {least} or more",
                raw.outer_mtu
            ),
        );
    }
    if raw.fwmark == 0 || raw.fwmark > 0x7fff_ffff {
        p.add(
            "fwmark",
            format!(
                "{:#x} cannot be used: the mark is also a routing table number, use 0x1 to 0x7fffffff \
                 (default {DEFAULT_FWMARK:#x}) that no other routing policy on this host uses",
                raw.fwmark
            ),
        );
    }
    OuterConfig {
        encap,
        outer_mtu: raw.outer_mtu,
        fwmark: raw.fwmark,
    }
}

/// The ESP overhead of `encap` as an MTU difference.
fn overhead(encap: Encap) -> u16 {
    // At most 45 bytes: always fits.
    u16::try_from(encap.overhead()).unwrap_or(u16::MAX)
}

/// An IPv6 peer needs a TUN MTU of at least 1280 (RFC 8200 section 5):
/// Linux turns IPv6 off on a smaller link, and the routes would fail.
fn ipv6_mtu(
    raw: &RawConfig,
    interface: &InterfaceConfig,
    encap: Encap,
    peers: &[Peer],
    ike_peers: &[IkePeer],
    p: &mut Problems,
) {
    if interface.mtu >= MIN_INNER_MTU_V6 {
        return;
    }
    let manual = peers
        .iter()
        .find(|peer| peer.inner_remote.is_ipv6())
        .map(|peer| &peer.name);
    let ike = ike_peers
        .iter()
        .find(|peer| peer.inner_remote.is_ipv6())
        .map(|peer| &peer.name);
    let Some(v6_name) = manual.or(ike) else {
        return;
    };
    let least_outer = MIN_INNER_MTU_V6 + overhead(encap);
    let (field, fix) = match raw.mtu {
        Some(_) => (
            "mtu",
            format!(
                "use mtu = {MIN_INNER_MTU_V6} or more (with an outer_mtu of at least {least_outer})"
            ),
        ),
        None => (
            "outer_mtu",
            format!("use an outer_mtu of {least_outer} or more"),
        ),
    };
    p.add(
        field,
        format!(
            "the TUN MTU would be {}, below the {MIN_INNER_MTU_V6} bytes IPv6 needs on a link \
             (RFC 8200 section 5), and peer {} is IPv6: {fix}",
            interface.mtu, v6_name
        ),
    );
}

/// `interface` and `mtu`, which depends on the outer mode's overhead.
fn interface(raw: &RawConfig, encap: Encap, p: &mut Problems) -> InterfaceConfig {
    let name = &raw.interface;
    // IFNAMSIZ is 16 including the terminating NUL.
    let name_ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !name_ok {
        p.add(
            "interface",
            format!(
                "{name:?} is not a usable interface name: use 1 to 15 letters, digits, '-', '_' or '.'"
            ),
        );
    }
    let overhead = overhead(encap);
    let most = raw.outer_mtu.saturating_sub(overhead);
    if let Some(m) = raw.mtu
        && (m < MIN_INNER_MTU || m > most)
    {
        p.add(
            "mtu",
            format!(
                "{m} does not fit: use 576 to {most} (outer_mtu {} minus {overhead} bytes of ESP overhead), or leave it out to derive it",
                raw.outer_mtu
            ),
        );
    }
    InterfaceConfig {
        name: name.clone(),
        mtu: raw.mtu.unwrap_or(most),
    }
}

/// `crypto`, `on_selftest_failure` and `selftest_interval_secs`.
fn crypto(raw: &RawConfig, p: &mut Problems) -> CryptoConfig {
    let mode = raw.crypto.parse::<Mode>().unwrap_or_else(|e| {
        p.add("crypto", e);
        Mode::Auto
    });
    let on_selftest_failure = raw
        .on_selftest_failure
        .parse::<FailurePolicy>()
        .unwrap_or_else(|e| {
            p.add("on_selftest_failure", e);
            FailurePolicy::Fallback
        });
    if !(1..=86_400).contains(&raw.selftest_interval_secs) {
        p.add(
            "selftest_interval_secs",
            format!(
                "{} is out of range: use 1 to 86400 seconds (default 60)",
                raw.selftest_interval_secs
            ),
        );
    }
    CryptoConfig {
        mode,
        on_selftest_failure,
        selftest_interval: Duration::from_secs(raw.selftest_interval_secs),
    }
}

/// `rekey_switch_secs` and `rekey_retire_secs`.
fn rekey(raw: &RawConfig, p: &mut Problems) -> RekeyConfig {
    let (switch, retire) = (raw.rekey_switch_secs, raw.rekey_retire_secs);
    if !(1..=3600).contains(&switch) || retire <= switch || retire > 86_400 {
        p.add(
            "rekey_switch_secs",
            format!(
                "{switch} (with rekey_retire_secs {retire}) does not work: use 1 to 3600 seconds, and a \
                 rekey_retire_secs above it (at most 86400), so an old inbound SA outlives the \
                 switch (defaults 30 and 120)"
            ),
        );
    }
    RekeyConfig {
        switch: Duration::from_secs(switch),
        retire: Duration::from_secs(retire),
    }
}

/// `state_dir`, `control_socket`, `metrics_listen` and `[drop_capture]`.
fn operations(raw: &RawConfig, p: &mut Problems) -> OperationsConfig {
    if !raw.state_dir.is_absolute() {
        p.add(
            "state_dir",
            format!(
                "{} is relative: use an absolute path such as /var/lib/esptun",
                raw.state_dir.display()
            ),
        );
    }
    let control_socket = raw
        .control_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/esptun/{}.sock", raw.interface)));
    if !control_socket.is_absolute() {
        p.add(
            "control_socket",
            format!(
                "{} is relative: use an absolute path such as /run/esptun/esptun0.sock",
                control_socket.display()
            ),
        );
    }
    let metrics_listen = raw.metrics_listen.as_ref().and_then(|text| {
        text.parse::<SocketAddr>()
            .map_err(|_| {
                p.add(
                    "metrics_listen",
                    format!(
                        "{text:?} is not an address and port: use e.g. \"127.0.0.1:9150\" (metrics are \
                         unauthenticated: keep them on a local or management address)"
                    ),
                )
            })
            .ok()
    });
    if let Some(c) = &raw.drop_capture {
        drop_capture(c, p);
    }
    OperationsConfig {
        state_dir: raw.state_dir.clone(),
        control_socket,
        metrics_listen,
        drop_capture: raw.drop_capture.clone(),
    }
}

fn drop_capture(c: &DropCaptureConfig, p: &mut Problems) {
    if !c.path.is_absolute() {
        p.add(
            "drop_capture.path",
            format!(
                "{} is relative: use an absolute path such as /var/lib/esptun/drops.pcap",
                c.path.display()
            ),
        );
    }
    if c.max_bytes < 64 << 10 || c.max_files == 0 || c.max_files > 100 {
        p.add(
            "drop_capture",
            format!(
                "max_bytes {} and max_files {} do not work: use max_bytes of at least 65536 \
                 and 1 to 100 files (defaults 16 MiB and 4)",
                c.max_bytes, c.max_files
            ),
        );
    }
}

/// What must be unique across peers.
#[derive(Default)]
struct Seen {
    names: HashSet<String>,
    inbound_spis: HashSet<u32>,
    outbound_spis: HashSet<u32>,
    inner_remotes: HashSet<IpAddr>,
    /// Key file paths and where they were first used.
    key_files: Vec<(PathBuf, String)>,
}

/// Every `[[peer]]`; only the peers without a problem are returned, the
/// manually keyed ones and those keyed by IKE apart.
fn peers(raw: &[RawPeer], p: &mut Problems) -> (Vec<Peer>, Vec<IkePeer>) {
    if raw.is_empty() {
        p.add(
            "peer",
            "no [[peer]] sections: add at least one peer with its addresses and SAs",
        );
    }
    let mut seen = Seen::default();
    let mut manual = Vec::new();
    let mut ike = Vec::new();
    for (i, peer_raw) in raw.iter().enumerate() {
        match peer(i, peer_raw, &mut seen, p) {
            Some(Keyed::Manual(peer)) => manual.push(peer),
            Some(Keyed::Ike(peer)) => ike.push(*peer),
            None => {}
        }
    }
    (manual, ike)
}

/// A valid peer, by how it is keyed.
enum Keyed {
    Manual(Peer),
    // Boxed: an IKE peer's settings are twice a manual peer's size.
    Ike(Box<IkePeer>),
}

fn peer(i: usize, raw: &RawPeer, seen: &mut Seen, p: &mut Problems) -> Option<Keyed> {
    let at = |f: &str| format!("peer[{i}] ({}).{f}", raw.name);
    if raw.name.is_empty() || !seen.names.insert(raw.name.clone()) {
        p.add(&at("name"), "must be present and unique among peers");
    }
    let addresses = addresses(raw, &at, seen, p);
    let (raw_out, raw_in) = match (&raw.outbound, &raw.inbound, &raw.ike) {
        (None, None, Some(ike)) => {
            let [local, endpoint, inner_local, inner_remote] = addresses?;
            let mut add = |f: &str, m: String| p.add(&at(&format!("ike.{f}")), m);
            let settings = super::ike::settings(ike, Some(local), Some(endpoint), &mut add)?;
            return Some(Keyed::Ike(Box::new(IkePeer {
                name: raw.name.clone(),
                local,
                endpoint,
                inner_local,
                inner_remote,
                ike: settings,
            })));
        }
        (Some(o), Some(i), None) => (o, i),
        (_, _, Some(_)) => {
            p.add(
                &at("ike"),
                "a peer is keyed either by hand (outbound and inbound) or by IKE ([peer.ike]):                  remove one of them",
            );
            return None;
        }
        (o, _, None) => {
            let missing = if o.is_none() { "outbound" } else { "inbound" };
            p.add(
                &at(missing),
                "is missing: a peer needs both outbound and inbound SAs (manual keys), or                  neither and a [peer.ike] table (keys by IKE)",
            );
            return None;
        }
    };
    let outbound = sa(&at, "outbound", raw_out, &mut seen.outbound_spis, p);
    let inbound = sa(&at, "inbound", raw_in, &mut seen.inbound_spis, p);
    if raw_out.key_file == raw_in.key_file {
        p.add(
            &at("inbound.key_file"),
            "is the outbound key file too: each direction needs its own key (one per host, see esptun genkey)",
        );
    } else {
        // One key in two SAs of different peers shares its nonce space
        // just as much (the SPI is not in the GCM nonce).
        for (dir, sa) in [("outbound", raw_out), ("inbound", raw_in)] {
            let here = at(&format!("{dir}.key_file"));
            match seen.key_files.iter().find(|(k, _)| *k == sa.key_file) {
                Some((_, first)) => p.add(
                    &here,
                    format!(
                        "{} is {first} too: every SA needs its own key (see esptun genkey)",
                        sa.key_file.display()
                    ),
                ),
                None => seen.key_files.push((sa.key_file.clone(), here)),
            }
        }
    }
    let [local, endpoint, inner_local, inner_remote] = addresses?;
    Some(Keyed::Manual(Peer {
        name: raw.name.clone(),
        local,
        endpoint,
        inner_local,
        inner_remote,
        outbound: outbound?,
        inbound: inbound?,
    }))
}

/// `local`, `endpoint`, `inner_local` and `inner_remote`, in that order.
fn addresses(
    raw: &RawPeer,
    at: &dyn Fn(&str) -> String,
    seen: &mut Seen,
    p: &mut Problems,
) -> Option<[IpAddr; 4]> {
    let mut addr = |field: &str, value: &str| -> Option<IpAddr> {
        value
            .parse::<IpAddr>()
            .map_err(|_| {
                p.add(
                    &at(field),
                    format!("{value:?} is not an IP address (write it without a port)"),
                )
            })
            .ok()
    };
    let local = addr("local", &raw.local);
    let endpoint = addr("endpoint", &raw.endpoint);
    let inner_local = match &raw.inner_local {
        Some(v) => addr("inner_local", v),
        None => local,
    };
    let inner_remote = match &raw.inner_remote {
        Some(v) => addr("inner_remote", v),
        None => endpoint,
    };
    let (l, e) = (local?, endpoint?);
    if l.is_ipv4() != e.is_ipv4() {
        p.add(
            &at("endpoint"),
            "local and endpoint must both be IPv4 or both IPv6",
        );
    }
    let (il, ir) = (inner_local?, inner_remote?);
    if il.is_ipv4() != l.is_ipv4() || ir.is_ipv4() != l.is_ipv4() {
        p.add(
            &at("inner_local"),
            "transport mode keeps the IP header: inner addresses must be the same IP version as the outer ones",
        );
    }
    if !seen.inner_remotes.insert(ir) {
        p.add(
            &at("inner_remote"),
            format!("{ir} is already another peer's inner address: each peer needs its own"),
        );
    }
    Some([l, e, il, ir])
}

/// One direction's SA; `spis` holds the SPIs of that direction so far.
fn sa(
    at: &dyn Fn(&str) -> String,
    dir: &str,
    c: &RawSa,
    spis: &mut HashSet<u32>,
    p: &mut Problems,
) -> Option<Sa> {
    let field = |f: &str| at(&format!("{dir}.{f}"));
    let mut ok = true;
    if c.spi < 256 {
        p.add(
            &field("spi"),
            format!(
                "{} is reserved (RFC 4303 section 2.1, IANA): use 256 to 4294967295",
                c.spi
            ),
        );
        ok = false;
    } else if !spis.insert(c.spi) {
        p.add(
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
            p.add(
                &field("icv"),
                format!(
                    "{} is not an ICV length: use 16 (default), 12 or 8 (RFC 4106 section 6)",
                    c.icv
                ),
            );
        })
        .ok();
    let window = c.replay_window.unwrap_or(DEFAULT_WINDOW);
    if dir == "outbound" && c.replay_window.is_some() {
        p.add(
            &field("replay_window"),
            "only inbound SAs have a replay window: remove it here",
        );
        ok = false;
    } else if !(1..=MAX_WINDOW).contains(&window) {
        p.add(
            &field("replay_window"),
            format!(
                "{window} is out of range: use 1 to {MAX_WINDOW} packets (default {DEFAULT_WINDOW})"
            ),
        );
        ok = false;
    }
    Some(Sa {
        spi: c.spi,
        key_file: c.key_file.clone(),
        icv: icv?,
        esn: c.esn,
        replay_window: window,
    })
    .filter(|_| ok)
}
