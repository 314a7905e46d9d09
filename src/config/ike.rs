//! `[peer.ike]`: a peer keyed by IKEv2 (RFC 7296) with a pre-shared key,
//! instead of the manual `outbound`/`inbound` SAs.
//!
//! ```toml
//! [[peer]]
//! name = "host-b"
//! local = "198.18.0.1"
//! endpoint = "198.18.0.2"
//! [peer.ike]
//! psk_file = "/etc/esptun/host-b.psk"   # mode 0600, at least 16 bytes
//! local_id = "198.18.0.1"                # default: local (an IP identity)
//! remote_id = "host-b.example"           # default: endpoint; an FQDN, user@fqdn or IP
//! initiate = true                        # default false: wait for the peer
//! ike_proposals = ["aes256gcm16-prfsha256-x25519"]
//! esp_proposals = ["aes256gcm16-esn"]
//! ike_rekey_secs = 14400
//! child_rekey_secs = 3600
//! liveness_secs = 30
//! keepalive_secs = 20                    # NAT keepalives behind a NAT, when idle
//! force_encap = false                    # true: fake NAT detection, ESP in UDP
//! cookie_threshold = 16                  # half-open IKE SAs before cookies
//! any_source = false                     # true: the peer's NAT address is learned
//! ```
//!
//! A proposal string names one algorithm of each kind, strongSwan style,
//! separated by `-`. The list is merged, in order, into the one proposal
//! per protocol that `ike::proposal` offers (RFC 7296 section 3.3: several
//! transforms of one type are alternatives), so the first listed is the
//! one preferred.
//!
//! The PSK file obeys the key files' rules (`crate::keyfile`): a regular
//! file owned by the daemon's user or root, no group or other access. Its
//! contents, without a trailing newline, are the key.

use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::fsperm;
use crate::ike::crypto::{DhGroup, Encr, Prf};
use crate::ike::proposal::{EspAlgorithms, IkeAlgorithms};
use crate::ike::wire::consts::id;
use crate::ike::wire::payload::Identification;

/// `[peer.ike]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIke {
    pub psk_file: PathBuf,
    pub local_id: Option<String>,
    pub remote_id: Option<String>,
    #[serde(default)]
    pub initiate: bool,
    pub ike_proposals: Option<Vec<String>>,
    pub esp_proposals: Option<Vec<String>>,
    #[serde(default = "default_ike_rekey")]
    pub ike_rekey_secs: u64,
    #[serde(default = "default_child_rekey")]
    pub child_rekey_secs: u64,
    #[serde(default = "default_liveness")]
    pub liveness_secs: u64,
    /// Behind a NAT: a NAT keepalive (RFC 3948 section 4) after this many
    /// seconds without ESP to the peer.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    /// Fakes our NAT detection source hash (like strongSwan's `encap =
    /// yes`): IKE moves to the NAT-T port and ESP goes in UDP even
    /// without a NAT (RFC 7296 section 2.23 allows it).
    #[serde(default)]
    pub force_encap: bool,
    /// Half-open IKE SAs from which the responder demands a COOKIE (RFC
    /// 7296 section 2.6); the daemon's one gate uses the lowest of its
    /// peers'. Default 16.
    pub cookie_threshold: Option<usize>,
    /// The peer is behind a NAT whose address is not known beforehand:
    /// its IKE_SA_INIT is accepted from any address no other peer has
    /// (IKE_AUTH still checks its PSK and `remote_id`), and its ESP goes
    /// where its IKE comes from. The first such peer takes them.
    #[serde(default)]
    pub any_source: bool,
}

fn default_ike_rekey() -> u64 {
    4 * 3600
}
fn default_child_rekey() -> u64 {
    3600
}
fn default_liveness() -> u64 {
    30
}
/// RFC 3948 section 4 suggests 20 seconds.
fn default_keepalive() -> u64 {
    20
}

/// The default IKE proposal: AES-GCM-16-256, PRF HMAC-SHA2-256, X25519.
pub const DEFAULT_IKE_PROPOSAL: &str = "aes256gcm16-prfsha256-x25519";
/// The default ESP proposal: AES-GCM-16-256 with extended sequence numbers.
pub const DEFAULT_ESP_PROPOSAL: &str = "aes256gcm16-esn";

/// A validated `[peer.ike]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IkeSettings {
    pub psk_file: PathBuf,
    pub local_id: Identification,
    pub remote_id: Identification,
    pub initiate: bool,
    pub ike: IkeAlgorithms,
    pub esp: EspAlgorithms,
    /// DH groups for a fresh key exchange in CHILD SA rekeys we start
    /// (empty: none; as responder we follow a peer that asks for one).
    pub pfs: Vec<DhGroup>,
    /// When to rekey the IKE SA and the CHILD SA (the jitter is the IKE
    /// module's business).
    pub ike_rekey: Duration,
    pub child_rekey: Duration,
    /// Between liveness checks of a quiet peer (RFC 7296 section 2.4).
    pub liveness: Duration,
    /// Behind a NAT, the NAT keepalive interval (RFC 3948 section 4).
    pub keepalive: Duration,
    /// Fake NAT detection to force UDP encapsulation.
    pub force_encap: bool,
    /// See [`RawIke::cookie_threshold`].
    pub cookie_threshold: Option<usize>,
    /// See [`RawIke::any_source`].
    pub any_source: bool,
}

/// A validated peer keyed by IKE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IkePeer {
    pub name: String,
    pub local: IpAddr,
    pub endpoint: IpAddr,
    pub inner_local: IpAddr,
    pub inner_remote: IpAddr,
    pub ike: IkeSettings,
}

/// A peer's addresses, whichever way it is keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddrs {
    pub local: IpAddr,
    pub endpoint: IpAddr,
    pub inner_local: IpAddr,
    pub inner_remote: IpAddr,
}

impl super::Config {
    /// The addresses of every peer, manually keyed and keyed by IKE: what
    /// the interface, routes and sockets are set up for.
    pub fn peer_addrs(&self) -> Vec<PeerAddrs> {
        let manual = self.peers.iter().map(|p| PeerAddrs {
            local: p.local,
            endpoint: p.endpoint,
            inner_local: p.inner_local,
            inner_remote: p.inner_remote,
        });
        let ike = self.ike_peers.iter().map(|p| PeerAddrs {
            local: p.local,
            endpoint: p.endpoint,
            inner_local: p.inner_local,
            inner_remote: p.inner_remote,
        });
        manual.chain(ike).collect()
    }
}

/// An identity as written: an IP address, `user@domain` (RFC822_ADDR) or
/// a domain name (FQDN), RFC 7296 section 3.5.
pub fn parse_identity(text: &str) -> Result<Identification, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(match ip {
            IpAddr::V4(a) => Identification::new(id::IPV4_ADDR, a.octets().to_vec()),
            IpAddr::V6(a) => Identification::new(id::IPV6_ADDR, a.octets().to_vec()),
        });
    }
    let ok = !text.is_empty()
        && text.len() <= 255
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if !ok {
        return Err(format!(
            "{text:?} is not an identity: use an IP address, a domain name (host.example) or \
             user@domain"
        ));
    }
    let ty = if text.contains('@') {
        id::RFC822_ADDR
    } else {
        id::FQDN
    };
    Ok(Identification::new(ty, text.as_bytes().to_vec()))
}

/// An identity for logs and status: as it would be written.
pub fn identity_text(id: &Identification) -> String {
    match (id.id_type, id.data.len()) {
        (id::IPV4_ADDR, 4) => {
            let b: [u8; 4] = id.data.as_slice().try_into().unwrap_or([0; 4]);
            IpAddr::from(b).to_string()
        }
        (id::IPV6_ADDR, 16) => {
            let b: [u8; 16] = id.data.as_slice().try_into().unwrap_or([0; 16]);
            IpAddr::from(b).to_string()
        }
        (id::FQDN | id::RFC822_ADDR, _) => String::from_utf8_lossy(&id.data).into_owned(),
        (ty, _) => format!("type {ty} ({} bytes)", id.data.len()),
    }
}

/// The IKE proposals, merged into one offer.
pub fn parse_ike_proposals(list: &[String]) -> Result<IkeAlgorithms, String> {
    let mut out = IkeAlgorithms {
        encr: Vec::new(),
        prf: Vec::new(),
        dh: Vec::new(),
    };
    if list.is_empty() {
        return Err(format!(
            "is empty: list at least one proposal, such as \"{DEFAULT_IKE_PROPOSAL}\""
        ));
    }
    for p in list {
        let (mut encr, mut prf, mut dh) = (None, None, None);
        for part in p.split('-') {
            let slot_ok = if let Some(e) = encr_name(part) {
                encr.replace(e).is_none()
            } else if let Some(f) = match part {
                "prfsha256" => Some(Prf::HmacSha256),
                "prfsha384" => Some(Prf::HmacSha384),
                "prfsha512" => Some(Prf::HmacSha512),
                _ => None,
            } {
                prf.replace(f).is_none()
            } else if let Some(g) = dh_group_name(part) {
                dh.replace(g).is_none()
            } else {
                return Err(format!(
                    "{p:?}: {part:?} is not an algorithm esptun offers for IKE: use \
                     aes256gcm16 or aes128gcm16, prfsha256, prfsha384 or prfsha512, and x25519 \
                     or ecp256 (e.g. \"{DEFAULT_IKE_PROPOSAL}\")"
                ));
            };
            if !slot_ok {
                return Err(format!(
                    "{p:?} names two algorithms of one kind: write one encryption, one PRF and \
                     one DH group per proposal, and list more proposals for alternatives"
                ));
            }
        }
        let (Some(e), Some(f), Some(g)) = (encr, prf, dh) else {
            return Err(format!(
                "{p:?} lacks an encryption, PRF or DH group: write all three, e.g. \
                 \"{DEFAULT_IKE_PROPOSAL}\""
            ));
        };
        push_new(&mut out.encr, e);
        push_new(&mut out.prf, f);
        push_new(&mut out.dh, g);
    }
    Ok(out)
}

/// The ESP proposals, merged into one offer, and the PFS groups: a DH
/// group in an ESP proposal (strongSwan's `aes128gcm16-x25519`) asks for a
/// fresh key exchange in every CHILD SA rekey (RFC 7296 section 1.3.1);
/// IKE_AUTH's CHILD SA has none (section 1.2: no KE payload there).
pub fn parse_esp_proposals(list: &[String]) -> Result<(EspAlgorithms, Vec<DhGroup>), String> {
    let mut out = EspAlgorithms {
        encr: Vec::new(),
        esn: Vec::new(),
    };
    let mut pfs = Vec::new();
    if list.is_empty() {
        return Err(format!(
            "is empty: list at least one proposal, such as \"{DEFAULT_ESP_PROPOSAL}\""
        ));
    }
    let usage = |p: &str| {
        format!(
            "{p:?} is not an ESP proposal: use aes256gcm16 or aes128gcm16, then optionally a \
             DH group for PFS in rekeys (x25519 or ecp256), then optionally -esn (the default) \
             or -noesn (e.g. \"{DEFAULT_ESP_PROPOSAL}\", \"aes128gcm16-x25519-esn\")"
        )
    };
    let mut with_group = None;
    for p in list {
        let mut parts = p.split('-').peekable();
        let Some(encr) = parts.next().and_then(encr_name) else {
            return Err(usage(p));
        };
        let group = parts.peek().copied().and_then(dh_group_name);
        if group.is_some() {
            parts.next();
        }
        let esn = match parts.next() {
            None | Some("esn") => true,
            Some("noesn") => false,
            Some(_) => return Err(usage(p)),
        };
        if parts.next().is_some() {
            return Err(usage(p));
        }
        if with_group.is_some_and(|w| w != group.is_some()) {
            return Err(format!(
                "{p:?}: name a DH group in every ESP proposal (PFS in every rekey) or in none"
            ));
        }
        with_group = Some(group.is_some());
        push_new(&mut out.encr, encr);
        push_new(&mut out.esn, esn);
        if let Some(g) = group {
            push_new(&mut pfs, g);
        }
    }
    Ok((out, pfs))
}

fn encr_name(part: &str) -> Option<Encr> {
    match part {
        "aes256gcm16" | "aes256gcm" => Some(Encr::AesGcm16_256),
        "aes128gcm16" | "aes128gcm" => Some(Encr::AesGcm16_128),
        _ => None,
    }
}

/// A DH group's name in a proposal, for IKE and ESP (PFS) alike.
fn dh_group_name(part: &str) -> Option<DhGroup> {
    match part {
        "x25519" | "curve25519" => Some(DhGroup::Curve25519),
        "ecp256" => Some(DhGroup::Ecp256),
        _ => None,
    }
}

fn push_new<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// Validates `[peer.ike]`; `add(field, message)` records a problem under
/// `ike.FIELD`. `local` and `endpoint` give the default identities.
pub(super) fn settings(
    raw: &RawIke,
    local: Option<IpAddr>,
    endpoint: Option<IpAddr>,
    add: &mut dyn FnMut(&str, String),
) -> Option<IkeSettings> {
    let mut ok = true;
    let mut id_of = |field: &str, text: &Option<String>, default: Option<IpAddr>| match text {
        Some(t) => parse_identity(t)
            .map_err(|e| {
                add(field, e);
            })
            .ok(),
        None => default.and_then(|ip| parse_identity(&ip.to_string()).ok()),
    };
    let local_id = id_of("local_id", &raw.local_id, local);
    let remote_id = id_of("remote_id", &raw.remote_id, endpoint);
    let ike = match &raw.ike_proposals {
        None => parse_ike_proposals(&[DEFAULT_IKE_PROPOSAL.to_string()]),
        Some(list) => parse_ike_proposals(list),
    }
    .map_err(|e| add("ike_proposals", e))
    .ok();
    let esp_pfs = match &raw.esp_proposals {
        None => parse_esp_proposals(&[DEFAULT_ESP_PROPOSAL.to_string()]),
        Some(list) => parse_esp_proposals(list),
    }
    .map_err(|e| add("esp_proposals", e))
    .ok();
    let (esp, pfs) = match esp_pfs {
        Some((e, p)) => (Some(e), p),
        None => (None, Vec::new()),
    };
    if !raw.psk_file.is_absolute() {
        add(
            "psk_file",
            format!(
                "{} is relative: use an absolute path such as /etc/esptun/PEER.psk",
                raw.psk_file.display()
            ),
        );
        ok = false;
    }
    let (ike_s, child_s) = (raw.ike_rekey_secs, raw.child_rekey_secs);
    // Seconds are accepted down to MIN_REKEY_SECS so tests can watch many
    // rekeys; in production anything under a minute only costs exchanges
    // (the README says so).
    let range = MIN_REKEY_SECS..=86_400 * 7;
    if !range.contains(&child_s) || !range.contains(&ike_s) {
        add(
            "child_rekey_secs",
            format!(
                "child_rekey_secs {child_s} and ike_rekey_secs {ike_s} do not work: use \
                 {MIN_REKEY_SECS} to 604800 seconds each, 60 or more in production (defaults \
                 3600 and 14400)"
            ),
        );
        ok = false;
    }
    if !(1..=3600).contains(&raw.liveness_secs) {
        add(
            "liveness_secs",
            format!(
                "{} is out of range: use 1 to 3600 seconds (default 30)",
                raw.liveness_secs
            ),
        );
        ok = false;
    }
    if !(1..=3600).contains(&raw.keepalive_secs) {
        add(
            "keepalive_secs",
            format!(
                "{} is out of range: use 1 to 3600 seconds, below the NAT's mapping timeout \
                 (default 20)",
                raw.keepalive_secs
            ),
        );
        ok = false;
    }
    Some(IkeSettings {
        psk_file: raw.psk_file.clone(),
        local_id: local_id?,
        remote_id: remote_id?,
        initiate: raw.initiate,
        ike: ike?,
        esp: esp?,
        pfs,
        ike_rekey: Duration::from_secs(ike_s),
        child_rekey: Duration::from_secs(child_s),
        liveness: Duration::from_secs(raw.liveness_secs),
        keepalive: Duration::from_secs(raw.keepalive_secs),
        force_encap: raw.force_encap,
        cookie_threshold: raw.cookie_threshold,
        any_source: raw.any_source,
    })
    .filter(|_| ok)
}

/// Shortest rekey interval accepted (tests); production wants 60 s or
/// more.
pub const MIN_REKEY_SECS: u64 = 2;

/// Shortest PSK accepted: RFC 7296 section 2.15 warns that a PSK is only
/// as strong as its unpredictability, and a dictionary word falls to an
/// offline search over one captured IKE_AUTH.
pub const MIN_PSK_LEN: usize = 16;
const MAX_PSK_FILE: u64 = 4096;

/// Why a PSK file cannot be used; every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    #[error("cannot read PSK file {path}: {source} (check psk_file in the configuration)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "PSK file {path} has mode {mode:04o}: group or others have access, so the key may be \
         known elsewhere; make a new PSK and give it to the peer, or if you are sure it is \
         unexposed, `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "PSK file {path} holds {got} bytes: use at least {MIN_PSK_LEN} random bytes, e.g. \
         `head -c 32 /dev/urandom | base64 > {path}` (mode 600), and the same file on the peer"
    )]
    TooShort { path: PathBuf, got: usize },
    #[error("PSK file {path} is larger than {MAX_PSK_FILE} bytes: it is not a PSK file")]
    TooLarge { path: PathBuf },
    #[error("PSK file refused: {0}")]
    Unsafe(fsperm::Unsafe),
}

/// Reads and checks a PSK file (the rules of key files: see the module
/// documentation). Trailing whitespace (a newline from an editor) is not
/// part of the key.
pub fn load_psk(path: &Path) -> Result<Zeroizing<Vec<u8>>, PskError> {
    let read_err = |source| PskError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = fsperm::open_secret(path).map_err(|e| match e {
        Ok(link) => PskError::Unsafe(link),
        Err(e) => read_err(e),
    })?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(PskError::Unsafe(fsperm::Unsafe::Type {
            path: path.to_path_buf(),
            kind: fsperm::kind(&meta),
            want: "a regular file",
        }));
    }
    fsperm::check_owner(path, &meta, true).map_err(PskError::Unsafe)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PskError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_PSK_FILE {
        return Err(PskError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    // Sized once, never grown (see crate::keyfile on zeroizing buffers).
    let mut buf = Zeroizing::new(vec![0u8; MAX_PSK_FILE as usize + 1]);
    let mut len = 0;
    let mut reader = file.take(MAX_PSK_FILE + 1);
    loop {
        match reader.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    if len as u64 > MAX_PSK_FILE {
        return Err(PskError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    while len > 0 && buf[len - 1].is_ascii_whitespace() {
        len -= 1;
    }
    if len < MIN_PSK_LEN {
        return Err(PskError::TooShort {
            path: path.to_path_buf(),
            got: len,
        });
    }
    Ok(Zeroizing::new(buf[..len].to_vec()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::{Config, ConfigError};
    use crate::testutil::TempDir;

    const IKE: &str = r#"
[[peer]]
name = "b"
local = "198.18.0.1"
endpoint = "198.18.0.2"
[peer.ike]
psk_file = "/etc/esptun/b.psk"
"#;

    fn problems(text: &str) -> Vec<crate::config::Problem> {
        match Config::parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn an_ike_peer_gets_the_documented_defaults() {
        let v = Config::parse(IKE).expect("valid");
        assert!(v.peers.is_empty(), "not a manually keyed peer");
        let p = &v.ike_peers[0];
        assert_eq!(p.name, "b");
        assert_eq!(p.inner_remote, p.endpoint);
        let s = &p.ike;
        assert!(!s.initiate);
        assert_eq!(
            s.local_id,
            Identification::new(id::IPV4_ADDR, vec![198, 18, 0, 1])
        );
        assert_eq!(identity_text(&s.remote_id), "198.18.0.2");
        assert_eq!(s.ike.encr, vec![Encr::AesGcm16_256]);
        assert_eq!(s.ike.prf, vec![Prf::HmacSha256]);
        assert_eq!(s.ike.dh, vec![DhGroup::Curve25519]);
        assert_eq!(s.esp.encr, vec![Encr::AesGcm16_256]);
        assert_eq!(s.esp.esn, vec![true]);
        assert_eq!(s.child_rekey, Duration::from_secs(3600));
        assert_eq!(s.ike_rekey, Duration::from_secs(14400));
        assert_eq!(s.liveness, Duration::from_secs(30));
        assert_eq!(s.keepalive, Duration::from_secs(20));
        assert!(!s.force_encap);
        assert_eq!(s.cookie_threshold, None);
        assert!(!s.any_source);
    }

    #[test]
    fn keepalive_secs_is_read_and_checked() {
        let text = IKE.replace("psk_file", "keepalive_secs = 5\npsk_file");
        let v = Config::parse(&text).expect("valid");
        assert_eq!(v.ike_peers[0].ike.keepalive, Duration::from_secs(5));
        let top = IKE.replace("psk_file", "keepalive_secs = 3600\npsk_file");
        let v = Config::parse(&top).expect("valid");
        assert_eq!(v.ike_peers[0].ike.keepalive, Duration::from_secs(3600));
        for bad in ["0", "3601"] {
            let text = IKE.replace("psk_file", &format!("keepalive_secs = {bad}\npsk_file"));
            let found = problems(&text);
            let field = "peer[0] (b).ike.keepalive_secs";
            let p = found
                .iter()
                .find(|p| p.field == field)
                .unwrap_or_else(|| panic!("{field} for {bad} in {found:#?}"));
            assert!(p.message.contains("1 to 3600"), "{p}");
        }
        let negative = IKE.replace("psk_file", "keepalive_secs = -1\npsk_file");
        assert!(Config::parse(&negative).is_err(), "a negative interval");
    }

    #[test]
    fn force_encap_and_the_cookie_threshold_are_read() {
        let text = IKE.replace(
            "psk_file",
            "force_encap = true\ncookie_threshold = 0\npsk_file",
        );
        let v = Config::parse(&text).expect("valid");
        let s = &v.ike_peers[0].ike;
        assert!(s.force_encap);
        assert_eq!(s.cookie_threshold, Some(0));
        let bad = IKE.replace("psk_file", "cookie_threshold = -1\npsk_file");
        assert!(Config::parse(&bad).is_err(), "a negative threshold");
    }

    #[test]
    fn identities_proposals_and_lifetimes_are_read() {
        let text = IKE.replace(
            "psk_file",
            "local_id = \"a.example\"\nremote_id = \"ops@b.example\"\ninitiate = true\n\
             ike_proposals = [\"aes128gcm16-prfsha384-ecp256\", \"aes256gcm16-prfsha256-x25519\"]\n\
             esp_proposals = [\"aes128gcm16-noesn\", \"aes256gcm16\"]\n\
             child_rekey_secs = 600\nliveness_secs = 5\npsk_file",
        );
        let v = Config::parse(&text).expect("valid");
        let s = &v.ike_peers[0].ike;
        assert!(s.initiate);
        assert_eq!(
            s.local_id,
            Identification::new(id::FQDN, b"a.example".to_vec())
        );
        assert_eq!(s.remote_id.id_type, id::RFC822_ADDR);
        assert_eq!(s.ike.encr, vec![Encr::AesGcm16_128, Encr::AesGcm16_256]);
        assert_eq!(s.ike.prf, vec![Prf::HmacSha384, Prf::HmacSha256]);
        assert_eq!(s.ike.dh, vec![DhGroup::Ecp256, DhGroup::Curve25519]);
        assert_eq!(s.esp.esn, vec![false, true]);
        assert_eq!(s.child_rekey, Duration::from_secs(600));
        assert_eq!(s.liveness, Duration::from_secs(5));
        // Seconds-long lifetimes, for tests, are the shortest accepted.
        let short = IKE.replace(
            "psk_file",
            "child_rekey_secs = 2\nike_rekey_secs = 2\npsk_file",
        );
        let v = Config::parse(&short).expect("valid");
        assert_eq!(
            v.ike_peers[0].ike.child_rekey,
            Duration::from_secs(MIN_REKEY_SECS)
        );
    }

    #[test]
    fn bad_ike_settings_are_each_reported_with_a_fix() {
        let text = IKE.replace(
            "psk_file = \"/etc/esptun/b.psk\"",
            "psk_file = \"b.psk\"\nremote_id = \"not an id!\"\n\
             ike_proposals = [\"aes256gcm16-prfmd5-x25519\"]\nesp_proposals = [\"3des\"]\n\
             child_rekey_secs = 1\nliveness_secs = 0",
        );
        let found = problems(&text);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "psk_file",
            "remote_id",
            "ike_proposals",
            "esp_proposals",
            "child_rekey_secs",
            "liveness_secs",
        ] {
            let want = format!("peer[0] (b).ike.{f}");
            assert!(fields.contains(&want.as_str()), "{want} in {found:#?}");
        }
        for p in &found {
            assert!(p.message.contains("use"), "{p}");
        }
        // A proposal lacking a part, or naming two of one kind.
        assert!(parse_ike_proposals(&["aes256gcm16-x25519".into()]).is_err());
        assert!(parse_ike_proposals(&["aes256gcm16-aes128gcm16-prfsha256-x25519".into()]).is_err());
        assert!(parse_esp_proposals(&["aes256gcm16-esn-noesn".into()]).is_err());
        assert!(parse_ike_proposals(&[]).is_err());
    }

    /// A DH group in the ESP proposals (strongSwan's spelling) asks for
    /// PFS in every CHILD SA rekey; in all of them or in none.
    #[test]
    fn esp_proposals_may_name_a_pfs_group() {
        let (esp, pfs) = parse_esp_proposals(&[
            "aes128gcm16-x25519-esn".into(),
            "aes256gcm16-ecp256".into(),
            "aes256gcm16-x25519-noesn".into(),
        ])
        .expect("valid");
        assert_eq!(esp.encr, vec![Encr::AesGcm16_128, Encr::AesGcm16_256]);
        assert_eq!(esp.esn, vec![true, false]);
        assert_eq!(pfs, vec![DhGroup::Curve25519, DhGroup::Ecp256]);
        let (_, none) = parse_esp_proposals(&["aes256gcm16-esn".into()]).expect("valid");
        assert!(none.is_empty());
        let mixed = parse_esp_proposals(&["aes256gcm16-x25519".into(), "aes128gcm16".into()]);
        assert!(mixed.is_err_and(|e| e.contains("every ESP proposal")));
        for bad in [
            "aes256gcm16-esn-x25519",
            "aes256gcm16-x25519-ecp256",
            "aes256gcm16-modp2048",
        ] {
            assert!(parse_esp_proposals(&[bad.into()]).is_err(), "{bad}");
        }
        let v = Config::parse(&IKE.replace(
            "[peer.ike]",
            "[peer.ike]\nesp_proposals = [\"aes256gcm16-ecp256-esn\"]",
        ))
        .expect("valid");
        assert_eq!(v.ike_peers[0].ike.pfs, vec![DhGroup::Ecp256]);
        assert!(
            Config::parse(IKE).expect("valid").ike_peers[0]
                .ike
                .pfs
                .is_empty()
        );
    }

    #[test]
    fn a_peer_is_keyed_by_hand_or_by_ike_not_both_nor_neither() {
        let both = IKE.replace(
            "[peer.ike]",
            "outbound = { spi = 0x1001, key_file = \"/k/o\" }\n\
             inbound = { spi = 0x2001, key_file = \"/k/i\" }\n[peer.ike]",
        );
        let found = problems(&both);
        assert!(
            found
                .iter()
                .any(|p| p.field == "peer[0] (b).ike" && p.message.contains("either")),
            "{found:#?}"
        );
        let neither = "[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.18.0.2\"\n";
        let found = problems(neither);
        assert!(
            found.iter().any(|p| p.message.contains("[peer.ike]")),
            "{found:#?}"
        );
        let half = "[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.18.0.2\"\n\
                    outbound = { spi = 0x1001, key_file = \"/k/o\" }\n";
        let found = problems(half);
        assert!(
            found.iter().any(|p| p.field.ends_with("inbound")),
            "{found:#?}"
        );
    }

    #[test]
    fn names_and_inner_addresses_are_unique_across_both_kinds_of_peer() {
        let manual = "[[peer]]\nname = \"b\"\nlocal = \"198.18.0.1\"\nendpoint = \"198.18.0.2\"\n\
                      outbound = { spi = 0x1001, key_file = \"/k/o\" }\n\
                      inbound = { spi = 0x2001, key_file = \"/k/i\" }\n";
        let found = problems(&format!("{manual}{IKE}"));
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"peer[1] (b).name"), "{found:#?}");
        assert!(fields.contains(&"peer[1] (b).inner_remote"), "{found:#?}");
    }

    fn write(dir: &Path, name: &str, body: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn a_psk_file_must_be_private_and_long_enough() {
        let dir = TempDir::new("psk");
        std::fs::create_dir_all(&dir.0).expect("dir");
        let good = write(&dir.0, "good", b"0123456789abcdefXYZ\n", 0o600);
        assert_eq!(
            load_psk(&good).expect("good").as_slice(),
            b"0123456789abcdefXYZ"
        );
        for mode in [0o640, 0o604, 0o660] {
            let open = write(
                &dir.0,
                &format!("open{mode:o}"),
                b"0123456789abcdefXYZ",
                mode,
            );
            let e = load_psk(&open).expect_err("readable by others");
            let text = e.to_string();
            assert!(matches!(e, PskError::Permissions { .. }), "{text}");
            assert!(
                text.contains("chmod 600") && !text.contains("0123456789"),
                "{text}"
            );
        }
        let short = write(&dir.0, "short", b"secret\n", 0o600);
        let e = load_psk(&short).expect_err("short");
        assert!(e.to_string().contains("at least 16"), "{e}");
        let e = load_psk(&dir.0.join("missing")).expect_err("missing");
        assert!(e.to_string().contains("psk_file"), "{e}");
        std::os::unix::fs::symlink(&good, dir.0.join("link")).expect("symlink");
        assert!(matches!(
            load_psk(&dir.0.join("link")),
            Err(PskError::Unsafe(_))
        ));
    }

    #[test]
    fn preflight_reads_the_psk_files() {
        let dir = TempDir::new("psk-preflight");
        std::fs::create_dir_all(&dir.0).expect("dir");
        let psk = write(&dir.0, "b.psk", b"0123456789abcdefXYZ", 0o644);
        let state = dir.0.join("state");
        let text = format!(
            "state_dir = \"{}\"\n{}",
            state.display(),
            IKE.replace("/etc/esptun/b.psk", &psk.display().to_string())
        );
        let v = Config::parse(&text).expect("valid");
        let problems = v.preflight().expect_err("open PSK");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("PSK file") && p.contains("0644")),
            "{problems:?}"
        );
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        v.preflight().expect("private PSK");
    }
}
