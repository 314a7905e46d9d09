//! IKEv2 interoperability with strongSwan: esptun's sans-IO IKE state
//! machine (`esptun::ike::sa::IkeSa`) against charon 5.9.8 in the qemu
//! guest of the kernel-interop suite.
//!
//! A test binary of its own, not a case of `tests/interop/`: that suite is
//! one long test over static keys and esptun's datapath, this one is about
//! IKE and needs none of its host side (esptun process, tshark, traffic);
//! as a separate binary it also never boots a second TCG guest next to the
//! first (cargo runs test binaries one after another, but the tests of one
//! binary in parallel). It shares the guest: the same image, built and
//! cached by `tests/interop/build-guest.sh` (which puts charon and swanctl
//! in it), and the same boot and control code, `tests/interop/guest.rs`.
//!
//! The guest's charon is configured through swanctl (PSK, IKEv2,
//! `aes128gcm16-prfsha256-x25519`, one CHILD SA in transport mode with
//! `esp_proposals = aes128gcm16-x25519`). The host side runs the IKE state
//! machine over a real UDP socket on port 500 in the test's network
//! namespace, feeding it the datagrams it receives and its timeouts, until
//! it yields the CHILD SA; then charon's view (`swanctl --list-sas`: the
//! IKE SA ESTABLISHED with our SPIs, the CHILD SA INSTALLED in TRANSPORT
//! mode with our ESP SPIs) and the guest kernel's (`ip xfrm state`: two
//! transport-mode SAs whose SPIs, algorithm and key bytes are the ones
//! esptun derived) must agree with esptun's. Then `esptun run` takes the
//! CHILD SA's SPIs and keys (raw ESP) and pings cross it both ways, counted
//! by charon on its CHILD SA. Both roles: esptun initiates and charon
//! responds, then charon initiates (`swanctl --initiate`) and esptun
//! responds. As initiator esptun also meets charon's refusals: its KE for
//! the wrong group (INVALID_KE_PAYLOAD, then a new start), no IKE or no
//! ESP algorithm in common (NO_PROPOSAL_CHOSEN; the IKE SA stays in the
//! second case), another PSK (AUTHENTICATION_FAILED).
//!
//! Addresses: 198.18.51.1 (the TAP in the namespace) and 198.18.51.2 (the
//! guest). Needs root and qemu; without either prints a SKIPPED line (a
//! failure under `ESPTUN_REQUIRE_NETNS=1`). A failure prints every IKE
//! message both ways (header, payload types, bytes), charon's log and the
//! guest's console, xfrm state and counters.

#[path = "common/mod.rs"]
mod common;
// The kernel-interop suite's guest; this binary uses part of it.
#[allow(dead_code)]
#[path = "interop/guest.rs"]
mod guest;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use esptun::ike::crypto::{DhGroup, Encr, Prf, Randomness, SystemRandomness};
use esptun::ike::proposal::{EspAlgorithms, IkeAlgorithms};
use esptun::ike::sa::{
    Action, ChildSa, Config, ErrorNotify, IkeError, IkeSa, Retransmit, Role, Status,
};
use esptun::ike::wire::consts::{exchange, id};
use esptun::ike::wire::payload::Identification;
use esptun::ike::wire::{Message, Payload};
use esptun::lab::{self, Netns};
use esptun::sa::reservation::ReservationStore;

use guest::{Guest, GuestImage, build_guest};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 1);
const GUEST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 2);

/// One address family: its addresses and charon's names for it.
#[derive(Debug, Clone, Copy)]
struct Family {
    host: IpAddr,
    guest: IpAddr,
    /// charon's connection and CHILD SA.
    conn: &'static str,
    child: &'static str,
}

const V4: Family = Family {
    host: IpAddr::V4(HOST),
    guest: IpAddr::V4(GUEST),
    conn: "esptun",
    child: "host",
};
const V6: Family = Family {
    host: IpAddr::V6(HOST6),
    guest: IpAddr::V6(GUEST6),
    conn: "esptun6",
    child: "host6",
};
const IKE_PORT: u16 = 500;
// The names tests/interop/guest.rs takes from its crate's root.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// One whole IKE_SA_INIT + IKE_AUTH under TCG, retransmissions included.
const IKE_TIMEOUT: Duration = Duration::from_secs(90);
/// Reading charon's log over the serial channel.
const LOG_TIMEOUT: Duration = Duration::from_secs(30);
/// charon's vici socket after its start.
const CHARON_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest with charon running and configured, and the namespace it is
/// attached to. Dropped: qemu first, then the files, then the namespace.
struct Lab {
    guest: Option<Guest>,
    ns: Netns,
    dir: PathBuf,
    /// Every IKE message either way, for a failure's report.
    trace: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(self.guest.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn guest(&mut self) -> &mut Guest {
        self.guest
            .as_mut()
            .expect("the guest runs until the lab drops")
    }

    fn sh(&mut self, cmd: &str) -> Result<String, String> {
        let (rc, out) = self.guest().run(cmd, CMD_TIMEOUT)?;
        if rc != 0 {
            return Err(format!("guest: `{cmd}` failed ({rc}): {out}"));
        }
        Ok(out)
    }

    /// Panics with `what`, the IKE trace, charon's log and the guest's
    /// diagnostics.
    fn fail(&mut self, what: &str) -> ! {
        let trace = self.trace.join("\n");
        let charon = self.charon_log();
        let diag = self.guest().diagnostics();
        panic!(
            "{what}\n--- IKE messages (host side) ---\n{trace}\n--- charon's log (guest) ---\n{charon}\n{diag}"
        )
    }

    /// The end of charon's log. The trailing `echo`: the control channel
    /// finds the end of an answer at a line start, and the log may end
    /// in the middle of a line.
    fn charon_log(&mut self) -> String {
        let t = Instant::now();
        let text = match self
            .guest()
            .run("tail -c 16000 /tmp/charon.log; echo", LOG_TIMEOUT)
        {
            Ok((_, out)) => out,
            Err(e) => format!("(cannot read /tmp/charon.log: {e})"),
        };
        eprintln!(
            "(charon's log: {} bytes in {:.1} s)",
            text.len(),
            t.elapsed().as_secs_f64()
        );
        text
    }
}

/// One guest at a time: two TCG guests at once would only slow both.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Boots the guest and starts charon in it; `None` when the test skips.
fn lab(test: &str, psk_hex: &str) -> Option<Lab> {
    if !common::require_root(test, "network namespace, TAP device, qemu guest") {
        return None;
    }
    if !in_path("qemu-system-x86_64") {
        common::skip_unless_required(test, "ESPTUN_REQUIRE_NETNS", "qemu-system-x86_64 missing");
        return None;
    }
    let prefix = lab::unique_prefix("swan");
    let dir = std::env::temp_dir().join(format!("esptun-{prefix}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image: GuestImage = build_guest(&dir);
    let ns = Netns::create(&format!("{prefix}h")).expect("namespace");
    for args in [
        vec!["tuntap", "add", "mode", "tap", "name", "tap0"],
        vec!["addr", "add", "198.18.51.1/24", "dev", "tap0"],
        vec!["addr", "add", "2001:db8:51::1/64", "dev", "tap0", "nodad"],
        vec!["link", "set", "tap0", "up"],
    ] {
        ns.ip(&args).expect("TAP in the namespace");
    }
    let guest = Guest::boot(&ns, &image, &dir).unwrap_or_else(|e| {
        let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        panic!("{test}: booting the guest: {e}\n--- console ---\n{console}")
    });
    eprintln!("{test}: guest Linux {}", image.version);
    let mut lab = Lab {
        guest: Some(guest),
        ns,
        dir,
        trace: Vec::new(),
    };
    if let Err(e) = start_charon(&mut lab, psk_hex) {
        lab.fail(&format!("{test}: starting charon in the guest: {e}"));
    }
    Some(lab)
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// The guest's swanctl.conf: one connection to the host, PSK both ways,
/// one host-to-host CHILD SA in transport mode. `start_action = none`:
/// charon initiates only when told (`swanctl --initiate`).
fn swanctl_conf(psk_hex: &str) -> Vec<String> {
    let conn = |f: Family| {
        format!(
            "  {conn} {{
    version = 2
    local_addrs = {guest}
    remote_addrs = {host}
    proposals = aes128gcm16-prfsha256-x25519
    rekey_time = 0
    local {{
      auth = psk
      id = {guest}
    }}
    remote {{
      auth = psk
      id = {host}
    }}
    children {{
      {child} {{
        mode = transport
        esp_proposals = aes128gcm16-x25519
        start_action = none
        rekey_time = 0
      }}
    }}
  }}",
            conn = f.conn,
            child = f.child,
            guest = f.guest,
            host = f.host,
        )
    };
    let text = format!(
        "connections {{
{}
{}
}}
secrets {{
  ike-esptun {{
    id-guest = {GUEST}
    id-host = {HOST}
    id-guest6 = {GUEST6}
    id-host6 = {HOST6}
    secret = 0x{psk_hex}
  }}
}}",
        conn(V4),
        conn(V6)
    );
    text.lines().map(str::to_string).collect()
}

fn start_charon(lab: &mut Lab, psk_hex: &str) -> Result<(), String> {
    lab.sh(
        "/sbin/ip link set eth0 up && /sbin/ip addr add 198.18.51.2/24 dev eth0 && \
         /sbin/ip -6 addr add 2001:db8:51::2/64 dev eth0 nodad",
    )?;
    // The plain path first, so a failure later is about IKE.
    for fam in [V4, V6] {
        let p =
            lab::ping(&lab.ns, fam.guest, 3, Duration::from_secs(30)).map_err(|e| e.to_string())?;
        if p.received == 0 {
            return Err(format!(
                "the guest does not answer plain ping {}: {p:?}",
                fam.guest
            ));
        }
    }
    // The control channel takes one line per command: the file in chunks.
    lab.sh("rm -f /etc/swanctl/swanctl.conf")?;
    for chunk in swanctl_conf(psk_hex).chunks(8) {
        let args: Vec<String> = chunk.iter().map(|l| format!("'{l}'")).collect();
        lab.sh(&format!(
            "printf '%s\\n' {} >> /etc/swanctl/swanctl.conf",
            args.join(" ")
        ))?;
    }
    lab.guest().spawn("charon", "/usr/lib/ipsec/charon")?;
    let started = Instant::now();
    loop {
        let (rc, out) = lab.guest().run("/usr/sbin/swanctl --stats", CMD_TIMEOUT)?;
        if rc == 0 {
            break;
        }
        if started.elapsed() > CHARON_TIMEOUT {
            return Err(format!(
                "charon's vici socket not up in {CHARON_TIMEOUT:?}: {out}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = lab.sh("/usr/sbin/swanctl --load-all")?;
    if !out.contains("loaded connection 'esptun'")
        || !out.contains("loaded connection 'esptun6'")
        || !out.contains("loaded ike secret")
    {
        return Err(format!("swanctl --load-all: {out}"));
    }
    eprintln!(
        "charon up and configured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// esptun's side: the same algorithms as the guest's swanctl.conf
/// offered among others (esptun's defaults), the addresses as IDs
/// (swanctl's `id = <address>` is ID_IPV4_ADDR or ID_IPV6_ADDR).
fn esptun_config(psk: &[u8], fam: Family) -> Arc<Config> {
    let address_id = |a: IpAddr| match a {
        IpAddr::V4(a) => Identification::new(id::IPV4_ADDR, a.octets().to_vec()),
        IpAddr::V6(a) => Identification::new(id::IPV6_ADDR, a.octets().to_vec()),
    };
    Arc::new(Config {
        local_id: address_id(fam.host),
        remote_id: Some(address_id(fam.guest)),
        psk: Zeroizing::new(psk.to_vec()),
        ike: IkeAlgorithms::default(),
        esp: EspAlgorithms::default(),
        local_addr: fam.host,
        remote_addr: fam.guest,
        retransmit: Retransmit::default(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One IKE message for the trace: header, payload types as charon logs
/// them (`[ SA KE No N(16388) ]`; SK's contents are encrypted) and bytes.
fn describe(dir: &str, bytes: &[u8]) -> String {
    let what = match Message::parse(bytes) {
        Ok(m) => {
            let h = &m.header;
            let ex = match h.exchange {
                exchange::IKE_SA_INIT => "IKE_SA_INIT".to_string(),
                exchange::IKE_AUTH => "IKE_AUTH".to_string(),
                other => format!("exchange {other}"),
            };
            let kind = if h.is_response() {
                "response"
            } else {
                "request"
            };
            let payloads: Vec<String> = m
                .payloads
                .iter()
                .map(|p| match p {
                    Payload::Sa(_) => "SA".into(),
                    Payload::Ke(k) => format!("KE({})", k.group),
                    Payload::Nonce(_) => "No".into(),
                    Payload::Notify(n) => format!("N({})", n.ty),
                    Payload::IdI(_) => "IDi".into(),
                    Payload::IdR(_) => "IDr".into(),
                    Payload::Auth(_) => "AUTH".into(),
                    Payload::TsI(_) => "TSi".into(),
                    Payload::TsR(_) => "TSr".into(),
                    Payload::Delete(_) => "D".into(),
                    Payload::Encrypted(_) => "SK".into(),
                    other => format!("P({})", other.ty()),
                })
                .collect();
            format!(
                "{ex} {kind} {} spi {:016x}/{:016x} [ {} ]",
                h.message_id,
                h.spi_i,
                h.spi_r,
                payloads.join(" ")
            )
        }
        Err(e) => format!("unparsable ({e})"),
    };
    format!("{dir} {what}, {} bytes: {}", bytes.len(), hex(bytes))
}

/// How [`drive`] ended without a CHILD SA.
#[derive(Debug)]
enum Driven {
    /// `Action::Failed`: the IKE SA is dead.
    Failed(IkeError),
    /// `Action::ChildFailed`: the IKE SA is up, its CHILD SA is not.
    ChildFailed(IkeError),
    /// The socket, or no outcome in time.
    Io(String),
}

impl std::fmt::Display for Driven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Driven::Failed(e) => write!(f, "IKE SA failed: {e}"),
            Driven::ChildFailed(e) => write!(f, "CHILD SA failed: {e}"),
            Driven::Io(e) => f.write_str(e),
        }
    }
}

/// A message [`drive`] loses on purpose, once: the first one of this
/// exchange in this direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lose {
    incoming: bool,
    exchange: u8,
}

/// Whether `bytes` is the message `lose` still waits for; it waits no more.
fn lost(lose: &mut Vec<Lose>, incoming: bool, bytes: &[u8]) -> bool {
    let Ok(m) = Message::parse(bytes) else {
        return false;
    };
    let want = Lose {
        incoming,
        exchange: m.header.exchange,
    };
    match lose.iter().position(|l| *l == want) {
        Some(i) => {
            lose.remove(i);
            true
        }
        None => false,
    }
}

/// Runs `sa` over `sock` until it yields its CHILD SA: sends what it says,
/// feeds it what arrives and its timeouts, losing the messages `lose`
/// names. Bounded by [`IKE_TIMEOUT`].
fn drive(
    lab: &mut Lab,
    sock: &UdpSocket,
    sa: &mut IkeSa,
    first: Vec<Action>,
    rng: &mut dyn Randomness,
    mut lose: Vec<Lose>,
) -> Result<ChildSa, Driven> {
    let deadline = Instant::now() + IKE_TIMEOUT;
    let mut actions = first;
    let mut buf = vec![0u8; 65536];
    let mut peer: Option<SocketAddr> = None;
    let guest = match sock.local_addr() {
        Ok(a) if a.is_ipv6() => V6.guest,
        _ => V4.guest,
    };
    loop {
        // Every action in order: a responder's last answer comes with
        // its CHILD SA and must still go out.
        let mut child = None;
        for action in actions.drain(..) {
            match action {
                Action::Send(bytes) => {
                    if lost(&mut lose, false, &bytes) {
                        lab.trace.push(describe("-> (lost on purpose)", &bytes));
                        continue;
                    }
                    lab.trace.push(describe("->", &bytes));
                    let to = peer.unwrap_or(SocketAddr::new(guest, IKE_PORT));
                    sock.send_to(&bytes, to)
                        .map_err(|e| Driven::Io(format!("sending to {to}: {e}")))?;
                }
                Action::InstallChild(c) => child = Some(c),
                Action::ChildFailed(e) => return Err(Driven::ChildFailed(e)),
                Action::Failed(e) => return Err(Driven::Failed(e)),
                // Not before the first CHILD SA: nothing to rekey or delete.
                other @ (Action::DeleteChild { .. }
                | Action::PeerRestarted
                | Action::IkeRekeyed { .. }
                | Action::Closed) => {
                    lab.trace
                        .push(format!("action before the CHILD SA: {other:?}"));
                }
            }
        }
        if let Some(c) = child {
            return Ok(c);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Driven::Io(format!(
                "no CHILD SA within {IKE_TIMEOUT:?} (state {:?})",
                sa.status()
            )));
        }
        let wake = sa.next_timeout().unwrap_or(deadline).min(deadline);
        let wait = wake
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), Duration::from_millis(500));
        sock.set_read_timeout(Some(wait))
            .map_err(|e| Driven::Io(e.to_string()))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let bytes = &buf[..n];
                if lost(&mut lose, true, bytes) {
                    lab.trace.push(describe(
                        &format!("<- from {from} (lost on purpose)"),
                        bytes,
                    ));
                    continue;
                }
                lab.trace.push(describe(&format!("<- from {from}"), bytes));
                if from.ip() != guest {
                    lab.trace.push("   (not from the guest: ignored)".into());
                    continue;
                }
                peer = Some(from);
                match sa.handle(bytes, Instant::now(), rng) {
                    Ok(a) => actions = a,
                    Err(e) => lab.trace.push(format!("   esptun dropped it: {e}")),
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                actions = sa.handle_timeout(Instant::now());
            }
            Err(e) => return Err(Driven::Io(format!("receiving: {e}"))),
        }
    }
}

/// One SA of `ip xfrm state`.
#[derive(Debug, Default)]
struct XfrmState {
    src: String,
    dst: String,
    spi: u32,
    mode: String,
    aead: Option<(String, String, String)>,
}

/// Parses `ip xfrm state`'s output: each SA starts with `src A dst B`.
fn parse_xfrm_state(text: &str) -> Vec<XfrmState> {
    let mut states: Vec<XfrmState> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["src", src, "dst", dst, ..] => states.push(XfrmState {
                src: src.to_string(),
                dst: dst.to_string(),
                ..XfrmState::default()
            }),
            ["proto", "esp", "spi", spi, rest @ ..] => {
                if let Some(s) = states.last_mut() {
                    s.spi = spi
                        .strip_prefix("0x")
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .unwrap_or(0);
                    if let Some(i) = rest.iter().position(|w| *w == "mode") {
                        s.mode = rest.get(i + 1).unwrap_or(&"").to_string();
                    }
                }
            }
            ["aead", alg, key, icv, ..] => {
                if let Some(s) = states.last_mut() {
                    s.aead = Some((alg.to_string(), key.to_string(), icv.to_string()));
                }
            }
            _ => {}
        }
    }
    states
}

/// charon's and the guest kernel's view of the SAs must be esptun's.
fn check_guest(
    lab: &mut Lab,
    fam: Family,
    spis: (u64, u64),
    child: &ChildSa,
) -> Result<Vec<String>, String> {
    let mut report = Vec::new();
    // esptun's own result first: what the two configurations allow.
    if child.encr != Encr::AesGcm16_128 || child.esn || !child.transport_mode {
        return Err(format!(
            "esptun's CHILD SA: {:?}, ESN {}, transport {} (want AES-GCM-16 128, no ESN, transport)",
            child.encr, child.esn, child.transport_mode
        ));
    }
    let sas = lab.sh(&format!("/usr/sbin/swanctl --list-sas --ike {}", fam.conn))?;
    let ike_spis = [format!("{:016x}_i", spis.0), format!("{:016x}_r", spis.1)];
    let esp_in = format!("in  {:08x}", child.outbound_spi);
    let esp_out = format!("out {:08x}", child.inbound_spi);
    for (want, what) in [
        ("ESTABLISHED, IKEv2", "the IKE SA ESTABLISHED"),
        (ike_spis[0].as_str(), "esptun's IKE SPIs"),
        (ike_spis[1].as_str(), "esptun's IKE SPIs"),
        (
            "AES_GCM_16-128/PRF_HMAC_SHA2_256/CURVE_25519",
            "the IKE algorithms",
        ),
        (
            "INSTALLED, TRANSPORT",
            "the CHILD SA INSTALLED in transport mode",
        ),
        ("ESP:AES_GCM_16-128", "the ESP algorithm"),
        (esp_in.as_str(), "charon's inbound SPI = esptun's outbound"),
        (esp_out.as_str(), "charon's outbound SPI = esptun's inbound"),
    ] {
        if !sas.contains(want) {
            return Err(format!(
                "swanctl --list-sas lacks {what} ({want:?}):\n{sas}"
            ));
        }
    }
    report.push(format!("swanctl --list-sas:\n{}", sas.trim_end()));

    let text = lab.sh("/sbin/ip xfrm state")?;
    let ours =
        |s: &&XfrmState| [s.src.as_str(), s.dst.as_str()].contains(&fam.host.to_string().as_str());
    if parse_xfrm_state(&text).iter().filter(ours).count() != 2 {
        return Err(format!(
            "ip xfrm state: want 2 SAs with {}:\n{text}",
            fam.host
        ));
    }
    report.extend(check_xfrm(lab, fam, child)?);
    Ok(report)
}

/// The guest kernel's two SAs of `child` (found by SPI): transport mode,
/// AES-GCM with a 128-bit ICV, esptun's keys and salts.
fn check_xfrm(lab: &mut Lab, fam: Family, child: &ChildSa) -> Result<Vec<String>, String> {
    let mut report = Vec::new();
    let text = lab.sh("/sbin/ip xfrm state")?;
    let states = parse_xfrm_state(&text);
    let key_hex =
        |m: &esptun::sa::KeyMaterial| format!("0x{}{}", hex(m.key().expose()), hex(m.salt()));
    for (src, dst, spi, material, what) in [
        (
            fam.host,
            fam.guest,
            child.outbound_spi,
            &child.outbound,
            "host -> guest",
        ),
        (
            fam.guest,
            fam.host,
            child.inbound_spi,
            &child.inbound,
            "guest -> host",
        ),
    ] {
        let Some(s) = states
            .iter()
            .find(|s| s.src == src.to_string() && s.dst == dst.to_string() && s.spi == spi)
        else {
            return Err(format!("ip xfrm state has no {what} SA:\n{text}"));
        };
        let want_key = key_hex(material);
        let aead_ok = s.aead.as_ref().is_some_and(|(alg, key, icv)| {
            alg == "rfc4106(gcm(aes))" && *key == want_key && icv == "128"
        });
        if s.spi != spi || s.mode != "transport" || !aead_ok {
            return Err(format!(
                "the guest kernel's {what} SA differs from esptun's (SPI {spi:#010x}, \
                 transport, rfc4106(gcm(aes)) with esptun's key and salt, 128-bit ICV): \
                 {s:?}\n{text}"
            ));
        }
        report.push(format!(
            "ip xfrm state {what}: SPI {spi:#010x}, transport, rfc4106(gcm(aes)) 128, \
             key and salt ({} bytes) equal to esptun's",
            want_key.len() / 2 - 1
        ));
    }
    Ok(report)
}

fn random_psk() -> (Vec<u8>, String) {
    let mut psk = vec![0u8; 32];
    SystemRandomness::new().fill(&mut psk).expect("random PSK");
    let h = hex(&psk);
    (psk, h)
}

fn ike_socket(lab: &Lab, fam: Family) -> UdpSocket {
    lab.ns
        .run(move || UdpSocket::bind(SocketAddr::new(fam.host, IKE_PORT)))
        .expect("entering the namespace")
        .expect("binding UDP port 500 in the namespace")
}

fn finish(
    lab: &mut Lab,
    test: &str,
    fam: Family,
    started: Instant,
    child: &ChildSa,
    spis: (u64, u64),
) {
    match check_guest(lab, fam, spis, child) {
        Ok(report) => {
            for l in report {
                eprintln!("{test}: {l}");
            }
        }
        Err(e) => lab.fail(&format!("{test}: {e}")),
    }
    // What went over the wire (since the last scenario's mark), and
    // charon's account of it.
    let from = lab
        .trace
        .iter()
        .rposition(|l| l.starts_with("==="))
        .unwrap_or(0);
    for l in &lab.trace[from..] {
        eprintln!("{test}: {}", l.split(", ").next().unwrap_or(l));
    }
    let log = lab.charon_log();
    eprintln!("{test}: charon's log:\n{log}");
    eprintln!(
        "{test}: SAs checked after {:.1} s (guest under TCG)",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn strongswan_responder_esptun_initiator() {
    let test = "strongswan_responder_esptun_initiator";
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let (psk, psk_hex) = random_psk();
    let Some(mut lab) = lab(test, &psk_hex) else {
        return;
    };
    let sock = ike_socket(&lab, V4);
    let mut rng = SystemRandomness::new();
    let config = esptun_config(&psk, V4);
    let ike_started = Instant::now();
    let (mut sa, first) = IkeSa::initiate(config, Instant::now(), &mut rng)
        .unwrap_or_else(|e| panic!("{test}: IkeSa::initiate: {e}"));
    let child = match drive(&mut lab, &sock, &mut sa, first, &mut rng, Vec::new()) {
        Ok(c) => c,
        Err(e) => lab.fail(&format!("{test}: esptun as initiator: {e}")),
    };
    eprintln!(
        "{test}: CHILD SA after {:.1} s, {} IKE messages; suite {:?}",
        ike_started.elapsed().as_secs_f64(),
        lab.trace.len(),
        sa.suite()
    );
    if sa.status() != Status::Established || sa.role() != Role::Initiator {
        lab.fail(&format!("{test}: esptun's IKE SA is {:?}", sa.status()));
    }
    let suite = sa.suite();
    if suite.is_none_or(|s| s.prf != Prf::HmacSha256 || s.dh != DhGroup::Curve25519) {
        lab.fail(&format!("{test}: negotiated IKE suite {suite:?}"));
    }
    finish(&mut lab, test, V4, started, &child, sa.spis());
    if let Err(e) = traffic(&mut lab, test, V4, &child) {
        lab.fail(&format!(
            "{test}: esptun's datapath with the negotiated CHILD SA: {e}"
        ));
    }
    further_exchanges(&mut lab, test, &sock, &psk, &mut rng);
    over_ipv6(&mut lab, test, &psk, &mut rng);
}

/// The same over IPv6: ID_IPV6_ADDR identities, IPv6 traffic selectors,
/// IKE and ESP over IPv6.
fn over_ipv6(lab: &mut Lab, test: &str, psk: &[u8], rng: &mut dyn Randomness) {
    let started = Instant::now();
    let sock = ike_socket(lab, V6);
    lab.trace.push("=== IPv6".into());
    let child = match IkeSa::initiate(esptun_config(psk, V6), Instant::now(), rng)
        .map_err(Driven::Failed)
        .and_then(|(mut sa, first)| {
            let child = drive(lab, &sock, &mut sa, first, rng, Vec::new())?;
            Ok((child, sa.spis()))
        }) {
        Ok(c) => c,
        Err(e) => lab.fail(&format!("{test}: IPv6: esptun as initiator: {e}")),
    };
    let (child, spis) = child;
    finish(lab, test, V6, started, &child, spis);
    // Neighbour discovery stays in the clear (ICMPv6 135/136, protocol 58:
    // the guest has no /etc/protocols): charon's host-to-host policies
    // cover the unicast solicitations, and the host's kernel sends its own
    // on the TAP, outside esptun. tests/interop/xfrm.rs does the same.
    for ty in [135, 136] {
        for dir in ["out", "in"] {
            if let Err(e) = lab.sh(&format!(
                "/sbin/ip xfrm policy add src ::/0 dst ::/0 proto 58 type {ty} dir {dir} priority 1"
            )) {
                lab.fail(&format!("{test}: IPv6: {e}"));
            }
        }
    }
    if let Err(e) = traffic(lab, test, V6, &child) {
        lab.fail(&format!(
            "{test}: IPv6: esptun's datapath with the negotiated CHILD SA: {e}"
        ));
    }
}

/// esptun's own datapath (`esptun run`, raw ESP) with the CHILD SA's SPIs
/// and keys, against the SAs charon installed in the guest kernel: ICMP
/// echo both ways, and charon's counters of the CHILD SA move.
fn traffic(lab: &mut Lab, test: &str, fam: Family, child: &ChildSa) -> Result<(), String> {
    let dir = lab.dir.join(format!("esptun-{}", fam.conn));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let key_bytes = |m: &esptun::sa::KeyMaterial| {
        let mut b = Zeroizing::new(m.key().expose().to_vec());
        b.extend_from_slice(m.salt());
        b
    };
    esptun::keyfile::write_new(&dir.join("out.key"), &key_bytes(&child.outbound))
        .map_err(|e| e.to_string())?;
    esptun::keyfile::write_new(&dir.join("in.key"), &key_bytes(&child.inbound))
        .map_err(|e| e.to_string())?;
    let state = dir.join("state");
    // A key never used before: its sequence numbers start at 1.
    ReservationStore::open(&state)
        .and_then(|s| s.mark_fresh(&child.outbound))
        .map_err(|e| format!("marking the outbound key fresh: {e}"))?;
    let config = dir.join("esptun.toml");
    let sock = dir.join("esptun.sock");
    let text = format!(
        "# esptun with the CHILD SA negotiated with strongSwan.\n\
         interface = \"esptun0\"\n\
         outer = \"esp\"\n\
         state_dir = \"{state}\"\n\
         control_socket = \"{control}\"\n\
         \n\
         [[peer]]\n\
         name = \"charon\"\n\
         local = \"{host}\"\n\
         endpoint = \"{guest}\"\n\
         outbound = {{ spi = {out:#x}, key_file = \"{out_key}\", icv = 16, esn = {esn} }}\n\
         inbound = {{ spi = {inb:#x}, key_file = \"{in_key}\", icv = 16, esn = {esn} }}\n",
        host = fam.host,
        guest = fam.guest,
        state = state.display(),
        control = sock.display(),
        out = child.outbound_spi,
        inb = child.inbound_spi,
        out_key = dir.join("out.key").display(),
        in_key = dir.join("in.key").display(),
        esn = child.esn,
    );
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    let log = dir.join("esptun.log");
    let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut esptun = Esptun(Some(
        lab.ns
            .command(env!("CARGO_BIN_EXE_esptun"))
            .args(["run", "--log-level", "debug", "-c"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("starting esptun: {e}"))?,
    ));
    let esptun_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + CHARON_TIMEOUT;
    while esptun::daemon::control::query(&sock, "status").is_err() {
        if let Some(Ok(Some(status))) = esptun.0.as_mut().map(|c| c.try_wait()) {
            return Err(format!("esptun exited with {status}:\n{}", esptun_log()));
        }
        if Instant::now() >= deadline {
            return Err(format!("esptun not ready:\n{}", esptun_log()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = lab::ping(&lab.ns, fam.guest, 5, Duration::from_secs(20)).map_err(|e| e.to_string())?;
    if p.received != 5 {
        return Err(format!("host -> guest ping: {p:?}\n{}", esptun_log()));
    }
    let ping = if fam.guest.is_ipv6() { "ping6" } else { "ping" };
    let out = lab.sh(&format!("{ping} -c 3 -W 3 {}", fam.host))?;
    if !out.contains("3 packets received") {
        return Err(format!("guest -> host ping: {out}\n{}", esptun_log()));
    }
    // charon's counters of the CHILD SA: the kernel's, for these SPIs.
    let sas = lab.sh(&format!("/usr/sbin/swanctl --list-sas --ike {}", fam.conn))?;
    let packets = |spi: u32| {
        sas.lines()
            .find(|l| l.contains(&format!("{spi:08x},")))
            .and_then(|l| l.split(',').nth(2))
            .and_then(|w| w.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    let (inb, outb) = (packets(child.outbound_spi), packets(child.inbound_spi));
    // Our requests and the guest's 3 replies in, as many out.
    let want = u64::from(p.sent) + 3;
    if inb != Some(want) || outb != Some(want) {
        return Err(format!(
            "charon's CHILD SA counters: in {inb:?}, out {outb:?} packets, want {want}:\n{sas}"
        ));
    }
    eprintln!(
        "{test}: esptun's datapath with the negotiated {} SA: ping host->guest {}/{}, \
         guest->host 3/3; charon counts {want} packets in and {want} out on the CHILD SA",
        fam.conn, p.received, p.sent
    );
    Ok(())
}

/// `esptun run`, stopped when dropped.
struct Esptun(Option<std::process::Child>);

impl Drop for Esptun {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// esptun initiates again, against the same charon, where the two
/// configurations differ: each outcome is what RFC 7296 prescribes.
fn further_exchanges(
    lab: &mut Lab,
    test: &str,
    sock: &UdpSocket,
    psk: &[u8],
    rng: &mut dyn Randomness,
) {
    let base = esptun_config(psk, V4);
    let with = |f: &dyn Fn(&mut Config)| {
        let mut c = (*base).clone();
        f(&mut c);
        Arc::new(c)
    };
    // KE for P-256 first: charon takes X25519 from our SA payload and asks
    // for its KE (INVALID_KE_PAYLOAD, section 1.3); we start over with it.
    let ecp_first = with(&|c| c.ike.dh = vec![DhGroup::Ecp256, DhGroup::Curve25519]);
    // No IKE algorithm in common (charon has AES-128-GCM only): section
    // 2.21.1, NO_PROPOSAL_CHOSEN in the IKE_SA_INIT response.
    let ike_256 = with(&|c| c.ike.encr = vec![Encr::AesGcm16_256]);
    // No ESP algorithm in common: the IKE SA is set up, the CHILD SA is
    // refused in the IKE_AUTH response (sections 1.2 and 2.21.2).
    let esp_256 = with(&|c| c.esp.encr = vec![Encr::AesGcm16_256]);
    // Another PSK: AUTHENTICATION_FAILED in the IKE_AUTH response (2.21.2).
    let wrong_psk = with(&|c| c.psk = Zeroizing::new(b"not the guest's key".to_vec()));
    type Expect = fn(&Result<ChildSa, Driven>) -> bool;
    let auth_response = Lose {
        incoming: true,
        exchange: exchange::IKE_AUTH,
    };
    let cases: [(&str, Arc<Config>, &[Lose], Expect); 5] = [
        (
            "KE for P-256 first: INVALID_KE_PAYLOAD, then X25519",
            ecp_first,
            &[],
            |r| r.is_ok(),
        ),
        // Section 2.1: we retransmit the request unchanged, charon answers
        // the retransmission from its cache.
        (
            "charon's IKE_AUTH response lost: esptun retransmits its request",
            base.clone(),
            &[auth_response],
            |r| r.is_ok(),
        ),
        (
            "IKE AES-256-GCM only: NO_PROPOSAL_CHOSEN",
            ike_256,
            &[],
            |r| {
                matches!(
                    r,
                    Err(Driven::Failed(IkeError::PeerRefused(
                        ErrorNotify::NoProposalChosen
                    )))
                )
            },
        ),
        (
            "ESP AES-256-GCM only: IKE SA up, CHILD SA refused with NO_PROPOSAL_CHOSEN",
            esp_256,
            &[],
            |r| {
                matches!(
                    r,
                    Err(Driven::ChildFailed(IkeError::PeerRefused(
                        ErrorNotify::NoProposalChosen
                    )))
                )
            },
        ),
        ("another PSK: AUTHENTICATION_FAILED", wrong_psk, &[], |r| {
            matches!(
                r,
                Err(Driven::Failed(IkeError::PeerRefused(
                    ErrorNotify::AuthenticationFailed
                )))
            )
        }),
    ];
    for (what, config, lose, expected) in cases {
        lab.trace.push(format!("=== {what}"));
        let from = lab.trace.len();
        let result = IkeSa::initiate(config, Instant::now(), rng)
            .map_err(Driven::Failed)
            .and_then(|(mut sa, first)| drive(lab, sock, &mut sa, first, rng, lose.to_vec()));
        if !expected(&result) {
            lab.fail(&format!("{test}: {what}: got {result:?}"));
        }
        let messages: Vec<String> = lab.trace[from..]
            .iter()
            .map(|l| l.split(", ").next().unwrap_or(l).to_string())
            .collect();
        if let Ok(child) = &result {
            if lose.is_empty() && !messages.iter().any(|m| m.contains("N(17)")) {
                lab.fail(&format!("{test}: {what}: no INVALID_KE_PAYLOAD seen"));
            }
            if !lose.is_empty() && !retransmitted(&lab.trace[from..], "-> IKE_AUTH request 1 ") {
                lab.fail(&format!(
                    "{test}: {what}: no identical retransmission of the IKE_AUTH request"
                ));
            }
            match check_xfrm(lab, V4, child) {
                Ok(lines) => messages_report(test, what, &lines),
                Err(e) => lab.fail(&format!("{test}: {what}: {e}")),
            }
        }
        eprintln!(
            "{test}: {what}: as expected ({}):\n    {}",
            match &result {
                Ok(_) => "CHILD SA".to_string(),
                Err(e) => e.to_string(),
            },
            messages.join("\n    ")
        );
    }
}

/// Whether `trace` holds the message `what` (direction and header, as
/// [`describe`] writes them) at least twice, with the same bytes each time.
fn retransmitted(trace: &[String], what: &str) -> bool {
    let copies: Vec<&str> = trace
        .iter()
        .filter(|l| l.replace(" (lost on purpose)", "").starts_with(what))
        .filter_map(|l| l.rsplit(" bytes: ").next())
        .collect();
    copies.len() >= 2 && copies.iter().all(|c| *c == copies[0])
}

fn messages_report(test: &str, what: &str, lines: &[String]) {
    for l in lines {
        eprintln!("{test}: {what}: {l}");
    }
}

#[test]
fn strongswan_initiator_esptun_responder() {
    let test = "strongswan_initiator_esptun_responder";
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let (psk, psk_hex) = random_psk();
    let Some(mut lab) = lab(test, &psk_hex) else {
        return;
    };
    let sock = ike_socket(&lab, V4);
    let mut rng = SystemRandomness::new();
    let mut sa = IkeSa::responder(esptun_config(&psk, V4));
    if let Err(e) = lab.guest().spawn(
        "initiate",
        "/usr/sbin/swanctl --initiate --child host --timeout 80",
    ) {
        lab.fail(&format!("{test}: {e}"));
    }
    let ike_started = Instant::now();
    let child = match drive(&mut lab, &sock, &mut sa, Vec::new(), &mut rng, Vec::new()) {
        Ok(c) => c,
        Err(e) => lab.fail(&format!("{test}: esptun as responder: {e}")),
    };
    eprintln!(
        "{test}: CHILD SA after {:.1} s, {} IKE messages; suite {:?}",
        ike_started.elapsed().as_secs_f64(),
        lab.trace.len(),
        sa.suite()
    );
    if sa.status() != Status::Established || sa.role() != Role::Responder {
        lab.fail(&format!("{test}: esptun's IKE SA is {:?}", sa.status()));
    }
    // swanctl reports the outcome once charon has installed its side.
    let out =
        match lab
            .guest()
            .wait_output("initiate", "initiate completed successfully", IKE_TIMEOUT)
        {
            Ok(out) => out,
            Err(e) => lab.fail(&format!("{test}: swanctl --initiate: {e}")),
        };
    eprintln!("{test}: swanctl --initiate:\n{}", out.trim_end());
    finish(&mut lab, test, V4, started, &child, sa.spis());
    if let Err(e) = traffic(&mut lab, test, V4, &child) {
        lab.fail(&format!(
            "{test}: esptun's datapath with the negotiated CHILD SA: {e}"
        ));
    }

    // Section 2.1 as responder: our IKE_SA_INIT response is lost, charon
    // retransmits its request, and we send the same response again (not a
    // second IKE SA). charon's SA goes first, without waiting for an
    // answer to its Delete (which we drop: no IKE SA of ours has it).
    let what =
        "esptun's IKE_SA_INIT response lost: charon retransmits, esptun answers from its cache";
    if let Err(e) = lab.sh("/usr/sbin/swanctl --terminate --ike esptun --force") {
        lab.fail(&format!("{test}: {e}"));
    }
    lab.trace.push(format!("=== {what}"));
    let from = lab.trace.len();
    let mut sa = IkeSa::responder(esptun_config(&psk, V4));
    if let Err(e) = lab.guest().spawn(
        "initiate",
        "/usr/sbin/swanctl --initiate --child host --timeout 80",
    ) {
        lab.fail(&format!("{test}: {e}"));
    }
    let lose = vec![Lose {
        incoming: false,
        exchange: exchange::IKE_SA_INIT,
    }];
    let child = match drive(&mut lab, &sock, &mut sa, Vec::new(), &mut rng, lose) {
        Ok(c) => c,
        Err(e) => lab.fail(&format!("{test}: {what}: {e}")),
    };
    if !retransmitted(&lab.trace[from..], "-> IKE_SA_INIT response 0 ") {
        lab.fail(&format!(
            "{test}: {what}: the IKE_SA_INIT response was not sent again unchanged"
        ));
    }
    if let Err(e) =
        lab.guest()
            .wait_output("initiate", "initiate completed successfully", IKE_TIMEOUT)
    {
        lab.fail(&format!("{test}: {what}: swanctl --initiate: {e}"));
    }
    match check_guest(&mut lab, V4, sa.spis(), &child) {
        Ok(_) => {}
        Err(e) => lab.fail(&format!("{test}: {what}: {e}")),
    }
    for l in &lab.trace[from..] {
        eprintln!("{test}: {}", l.split(", ").next().unwrap_or(l));
    }
    eprintln!("{test}: {what}: as expected");
}
