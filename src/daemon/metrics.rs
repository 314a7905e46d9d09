//! Prometheus metrics: the text exposition format (version 0.0.4) over a
//! minimal HTTP/1.1 endpoint, rendered from the same [`Status`] snapshot
//! that `esptun status` shows, so the two can never disagree.
//!
//! Served on the control thread by [`super::control::Server`], with the
//! control socket: one request per connection, a request must arrive
//! whole within a deadline, and nothing but `GET /metrics` is answered.
//! Metrics are unauthenticated: the daemon warns at start unless
//! `metrics_listen` is a loopback address.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};

use super::status::Status;
use crate::crypto::ProviderId;

/// Longest request (line and headers) read.
pub(super) const MAX_REQUEST: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve metrics on {addr}: {source} (is metrics_listen an address of this host, and \
     the port free?)"
)]
pub struct MetricsError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// The listening metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub fn bind(addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let err = |source| MetricsError { addr, source };
        let listener = TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(MetricsServer { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub(super) fn listener(&self) -> &TcpListener {
        &self.listener
    }
}

/// The HTTP reply to one request (`render` is called for `GET /metrics`
/// only).
pub(super) fn respond(request: &[u8], render: &dyn Fn() -> String) -> Vec<u8> {
    let first_line = request
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut words = first_line.split(|&b| b == b' ');
    let (method, path) = (words.next(), words.next());
    let (code, content_type, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Escapes a label value (exposition format: backslash, quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends one metric family: HELP and TYPE, then its samples.
fn family<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
            continue;
        }
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// The IKE families (only with peers keyed by IKE).
fn ike(out: &mut String, s: &Status) {
    if let Some(ike) = &s.ike {
        ike_families(out, ike);
    }
}

fn ike_families(out: &mut String, ike: &super::ike::IkeStatus) {
    family(
        out,
        "esptun_ike_sas",
        "gauge",
        "IKE SAs per peer and state.",
        ike.peers.iter().flat_map(|p| {
            ["connecting", "established", "deleting"].map(|state| {
                let n = p.sas.iter().filter(|sa| sa.state == state).count() as u64;
                (vec![("peer", p.peer.as_str()), ("state", state)], n)
            })
        }),
    );
    family(
        out,
        "esptun_ike_events_total",
        "counter",
        "IKE events per peer: established, CHILD SAs installed and failed, authentication \
         failures, proposal mismatches, TS_UNACCEPTABLE, timeouts, other failures, messages \
         dropped, IKE and CHILD SA rekeys, CHILD SAs deleted, dead peers (liveness checks \
         unanswered), IKE SAs expired, peer restarts (INITIAL_CONTACT), peer addresses \
         changed under a NAT, NAT keepalives sent and skipped (ESP went out in the \
         interval), CHILD SAs refused for a NAT with raw ESP, Deletes of an IKE SA sent and \
         received.",
        ike.peers.iter().flat_map(|p| {
            let c = &p.counters;
            [
                ("established", c.established),
                ("child_installed", c.children_installed),
                ("child_failed", c.children_failed),
                ("auth_failed", c.auth_failures),
                ("no_proposal", c.proposal_mismatches),
                ("ts_unacceptable", c.ts_unacceptable),
                ("timeout", c.timeouts),
                ("other_failure", c.other_failures),
                ("message_dropped", c.messages_dropped),
                ("ike_rekey", c.ike_rekeys),
                ("child_rekey", c.child_rekeys),
                ("child_rekey_started", c.child_rekeys_started),
                ("ike_rekey_failed", c.ike_rekeys_failed),
                ("child_deleted", c.children_deleted),
                ("dead_peer", c.dead_peers),
                ("expired", c.expired),
                ("peer_restarted", c.peer_restarts),
                ("peer_moved", c.peer_moved),
                ("nat_keepalive", c.keepalives),
                ("nat_keepalive_skipped", c.keepalives_skipped),
                ("nat_refused", c.nat_refused),
                ("delete_sent", c.deletes_sent),
                ("delete_received", c.deletes_received),
            ]
            .map(|(event, n)| (vec![("peer", p.peer.as_str()), ("event", event)], n))
        }),
    );
    family(
        out,
        "esptun_ike_queue_drops_total",
        "counter",
        "IKE messages on the NAT-T port dropped because the IKE thread's queue was full.",
        [(vec![], ike.queue_drops)],
    );
    family(
        out,
        "esptun_ike_natt_non_ike_total",
        "counter",
        "With raw ESP: datagrams on the IKE-only UDP 4500 sockets that were neither IKE nor a \
         NAT keepalive (ESP in UDP, which raw ESP has no SA for), dropped.",
        [(vec![], ike.natt_non_ike)],
    );
    let c = &ike.cookies;
    family(
        out,
        "esptun_ike_cookies_total",
        "counter",
        "IKE_SA_INIT requests at the COOKIE gate (RFC 7296 section 2.6): challenges sent, \
         requests accepted with a valid cookie, requests refused, half-open IKE SAs expired.",
        [
            ("sent", c.sent),
            ("accepted", c.accepted),
            ("refused", c.refused),
            ("expired", c.expired),
        ]
        .map(|(event, n)| (vec![("event", event)], n)),
    );
    family(
        out,
        "esptun_ike_half_open_sas",
        "gauge",
        "Half-open IKE SAs (IKE_SA_INIT answered, IKE_AUTH not yet done).",
        [(vec![], c.half_open)],
    );
}

fn sa<'a>(peer: &'a str, spi: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("peer", peer), ("spi", spi)]
}

fn sa_dir<'a>(peer: &'a str, spi: &'a str, direction: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("peer", peer), ("spi", spi), ("direction", direction)]
}

/// The metrics text for one status snapshot.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    // Each SA's SPI label, formatted once.
    let spis_out: Vec<String> = s
        .outbound_sas
        .iter()
        .map(|sa| format!("{:#010x}", sa.spi))
        .collect();
    let spis_in: Vec<String> = s
        .inbound_sas
        .iter()
        .map(|sa| format!("{:#010x}", sa.spi))
        .collect();
    let outbound = || s.outbound_sas.iter().zip(&spis_out);
    let inbound = || s.inbound_sas.iter().zip(&spis_in);
    let providers = [ProviderId::Hardware, ProviderId::Soft];

    family(
        &mut out,
        "esptun_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        [(vec![], s.uptime_secs)],
    );
    let o = s.offloads;
    family(
        &mut out,
        "esptun_offload_active",
        "gauge",
        "1 for each kernel offload in use (TUN checksum, TSO, USO, coalescing, UDP GSO, UDP GRO).",
        [
            ("tun_checksum", o.tun_checksum),
            ("tso", o.tso),
            ("uso", o.uso),
            ("coalesce", o.coalesce),
            ("udp_gso", o.udp_gso),
            ("udp_gro", o.udp_gro),
        ]
        .into_iter()
        .map(|(name, on)| (vec![("offload", name)], u64::from(on))),
    );
    family(
        &mut out,
        "esptun_provider_active",
        "gauge",
        "1 for the AES-GCM provider carrying traffic, 0 otherwise (all 0: halted).",
        providers.map(|p| {
            (
                vec![("provider", p.as_str())],
                u64::from(s.provider == Some(p)),
            )
        }),
    );
    family(
        &mut out,
        "esptun_provider_disabled",
        "gauge",
        "1 for a provider disabled by a failed self-test (for the life of the process).",
        s.providers.iter().map(|r| {
            (
                vec![("provider", r.name.as_str())],
                u64::from(r.disabled.is_some()),
            )
        }),
    );
    family(
        &mut out,
        "esptun_selftest_runs_total",
        "counter",
        "Periodic long-message self-tests run on the datapath threads.",
        s.providers
            .iter()
            .map(|r| (vec![("provider", r.name.as_str())], r.periodic_runs)),
    );
    family(
        &mut out,
        "esptun_selftest_failures_total",
        "counter",
        "Periodic long-message self-tests that failed.",
        s.providers
            .iter()
            .map(|r| (vec![("provider", r.name.as_str())], r.periodic_failures)),
    );
    family(
        &mut out,
        "esptun_packets_total",
        "counter",
        "Packets sent (outbound) or delivered (inbound), by SA.",
        outbound()
            .map(|(x, spi)| (sa_dir(&x.peer, spi, "outbound"), x.packets))
            .chain(inbound().map(|(x, spi)| (sa_dir(&x.peer, spi, "inbound"), x.packets))),
    );
    family(
        &mut out,
        "esptun_bytes_total",
        "counter",
        "Inner packet bytes sent or delivered, by SA.",
        outbound()
            .map(|(x, spi)| (sa_dir(&x.peer, spi, "outbound"), x.bytes))
            .chain(inbound().map(|(x, spi)| (sa_dir(&x.peer, spi, "inbound"), x.bytes))),
    );
    family(
        &mut out,
        "esptun_drops_total",
        "counter",
        "Packets dropped, by direction and reason (inner_checksum: decrypted with a valid ICV but a wrong inner TCP/UDP/ICMP checksum).",
        [("outbound", &s.outbound), ("inbound", &s.inbound)]
            .into_iter()
            .flat_map(|(direction, d)| {
                d.drops.iter().map(move |(reason, n)| {
                    (
                        vec![("direction", direction), ("reason", reason.as_ref())],
                        *n,
                    )
                })
            }),
    );
    family(
        &mut out,
        "esptun_sa_drops_total",
        "counter",
        "Packets dropped after they were matched to an SA, by SA and reason.",
        outbound()
            .flat_map(|(x, spi)| {
                x.drops.iter().map(move |(reason, n)| {
                    let mut labels = sa_dir(&x.peer, spi, "outbound");
                    labels.push(("reason", reason.as_ref()));
                    (labels, *n)
                })
            })
            .chain(inbound().flat_map(|(x, spi)| {
                x.drops.iter().map(move |(reason, n)| {
                    let mut labels = sa_dir(&x.peer, spi, "inbound");
                    labels.push(("reason", reason.as_ref()));
                    (labels, *n)
                })
            })),
    );
    let r = &s.outbound.reassembly;
    family(
        &mut out,
        "esptun_reassembly_datagrams_total",
        "counter",
        "Outbound datagrams reassembled from the fragments the kernel wrote to the TUN device, and those that did not complete, by outcome.",
        [("reassembled", r.reassembled)]
            .into_iter()
            .chain(r.failures())
            .map(|(outcome, n)| (vec![("outcome", outcome)], n)),
    );
    family(
        &mut out,
        "esptun_reassembly_fragments_total",
        "counter",
        "Outbound fragments taken from the TUN device (all), IPv6 atomic fragments passed whole, and exact duplicates dropped.",
        [
            ("all", r.fragments),
            ("atomic", r.atomic),
            ("duplicate", r.duplicates),
        ]
        .map(|(kind, n)| (vec![("kind", kind)], n)),
    );
    family(
        &mut out,
        "esptun_reassembly_in_flight_datagrams",
        "gauge",
        "Outbound datagrams being reassembled now.",
        [(vec![], r.datagrams_in_flight)],
    );
    family(
        &mut out,
        "esptun_reassembly_in_flight_bytes",
        "gauge",
        "Bytes of fragment data held for reassembly now.",
        [(vec![], r.bytes_in_flight)],
    );
    family(
        &mut out,
        "esptun_sequence_used",
        "gauge",
        "The last sequence number used by an outbound SA.",
        outbound().map(|(x, spi)| (sa(&x.peer, spi), x.seq_used)),
    );
    family(
        &mut out,
        "esptun_sequence_reserved",
        "gauge",
        "The durably reserved sequence-number ceiling of an outbound SA.",
        outbound().map(|(x, spi)| (sa(&x.peer, spi), x.seq_reserved)),
    );
    family(
        &mut out,
        "esptun_replay_top",
        "gauge",
        "The highest authenticated sequence number of an inbound SA.",
        inbound().map(|(x, spi)| (sa(&x.peer, spi), x.replay_top)),
    );
    family(
        &mut out,
        "esptun_path_mtu",
        "gauge",
        "The path MTU to an outbound SA's endpoint as the kernel knows it (ICMP Fragmentation Needed / Packet Too Big lower it).",
        outbound().filter_map(|(x, spi)| x.path_mtu.map(|m| (sa(&x.peer, spi), u64::from(m)))),
    );
    family(
        &mut out,
        "esptun_inner_mtu",
        "gauge",
        "The largest inner packet that fits the path MTU after ESP, by outbound SA.",
        outbound().filter_map(|(x, spi)| x.inner_mtu.map(|m| (sa(&x.peer, spi), u64::from(m)))),
    );
    family(
        &mut out,
        "esptun_packet_too_big_total",
        "counter",
        "ICMP Fragmentation Needed / Packet Too Big for packet_too_big drops: written to the TUN device (sent) or held back by the rate limit or because the packet was an ICMP error (suppressed).",
        [
            ("sent", s.outbound.too_big_sent),
            ("suppressed", s.outbound.too_big_suppressed),
        ]
        .into_iter()
        .map(|(result, n)| (vec![("result", result)], n)),
    );
    family(
        &mut out,
        "esptun_mss_clamped_total",
        "counter",
        "TCP SYNs whose MSS option was lowered ([inner] clamp_mss), by direction.",
        [
            ("outbound", s.outbound.mss_clamped),
            ("inbound", s.inbound.mss_clamped),
        ]
        .into_iter()
        .map(|(direction, n)| (vec![("direction", direction)], n)),
    );
    family(
        &mut out,
        "esptun_io_errors_total",
        "counter",
        "Failures at the TUN and socket edge, by kind.",
        s.io.iter()
            .map(|(kind, n)| (vec![("kind", kind.as_ref())], *n)),
    );
    ike(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), "x\\ny");
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_parse() {
        let selector = crate::crypto::select::Selector::boot(
            crate::crypto::Provider::detect_all(),
            crate::crypto::select::Mode::Auto,
            crate::crypto::select::FailurePolicy::Fallback,
            crate::crypto::select::BootOptions::default(),
        );
        let counters = crate::datapath::Counters::default();
        counters.count_drop(crate::datapath::DropReason::InnerChecksum);
        let status = Status {
            offloads: crate::daemon::status::OffloadsStatus {
                tso: true,
                ..crate::daemon::status::OffloadsStatus::default()
            },
            interface: "esptun0".into(),
            pid: 1,
            uptime_secs: 5,
            outer: crate::wire::outer::Encap::NATT,
            provider: selector.active(),
            crypto_mode: selector.mode(),
            on_selftest_failure: selector.policy(),
            providers: selector.reports().iter().map(Into::into).collect(),
            selftest_history: Vec::new(),
            outbound: {
                let c = crate::datapath::Counters::default();
                c.reassembly
                    .overlap
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                c.reassembly
                    .bytes_in_flight
                    .store(2048, std::sync::atomic::Ordering::Relaxed);
                super::super::status::DirectionStatus::of(&c)
            },
            inbound: super::super::status::DirectionStatus::of(&counters),
            io: std::collections::BTreeMap::new(),
            outbound_sas: vec![super::super::status::OutboundSaStatus {
                peer: "b\"x".into(),
                spi: 0xa001,
                endpoint: "198.18.0.2:4500".into(),
                state: "active",
                packets: 3,
                bytes: 300,
                seq_used: 3,
                seq_reserved: 1 << 20,
                soft_limit_reached: false,
                drops: Default::default(),
                last_packet_ms_ago: None,
                path_mtu: Some(1280),
                inner_mtu: Some(1238),
            }],
            inbound_sas: Vec::new(),
            now_unix_ms: None,
            sas_age_ms: None,
            ike: None,
        };
        let text = render(&status);
        let mut families = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.insert(rest.split(' ').next().unwrap_or("").to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').expect("name and value");
            value.parse::<u64>().expect("integer value");
            let family = name.split('{').next().unwrap_or("");
            assert!(
                families.contains(family),
                "{family} has no TYPE line before it"
            );
        }
        assert!(
            text.contains("esptun_drops_total{direction=\"inbound\",reason=\"inner_checksum\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("esptun_sequence_reserved{peer=\"b\\\"x\",spi=\"0x0000a001\"} 1048576"),
            "{text}"
        );
        assert!(
            text.contains("esptun_path_mtu{peer=\"b\\\"x\",spi=\"0x0000a001\"} 1280"),
            "{text}"
        );
        assert!(
            text.contains("esptun_packet_too_big_total{result=\"sent\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("esptun_offload_active{offload=\"tso\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("esptun_reassembly_datagrams_total{outcome=\"overlap\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("esptun_reassembly_in_flight_bytes 2048"),
            "{text}"
        );
        assert!(
            text.contains("esptun_offload_active{offload=\"uso\"} 0"),
            "{text}"
        );
        let active: u64 = text
            .lines()
            .filter(|l| l.starts_with("esptun_provider_active{"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<u64>().ok()))
            .sum();
        assert_eq!(active, 1, "exactly one provider carries traffic");
    }

    #[test]
    fn ike_queue_drops_and_non_ike_on_4500_are_exported() {
        let mut out = String::new();
        let status = crate::daemon::ike::IkeStatus {
            queue_drops: 2,
            natt_non_ike: 7,
            peers: vec![crate::daemon::ike::IkePeerStatus {
                peer: "b".into(),
                counters: crate::daemon::ike::IkeCounters {
                    deletes_received: 1,
                    keepalives_skipped: 3,
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        };
        ike_families(&mut out, &status);
        for want in [
            "esptun_ike_queue_drops_total 2",
            "esptun_ike_natt_non_ike_total 7",
            "esptun_ike_events_total{peer=\"b\",event=\"delete_received\"} 1",
            "esptun_ike_events_total{peer=\"b\",event=\"nat_keepalive_skipped\"} 3",
        ] {
            assert!(out.lines().any(|l| l == want), "{want} in\n{out}");
        }
        assert!(
            out.contains("# TYPE esptun_ike_natt_non_ike_total counter"),
            "{out}"
        );
    }

    #[test]
    fn only_get_metrics_renders() {
        let render = || -> String { panic!("not asked for on a refused request") };
        let reply = |r: &[u8]| String::from_utf8(respond(r, &render)).expect("text");
        assert!(reply(b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(reply(b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        let ok = String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\n\r\n", &|| {
            "x 1\n".to_string()
        }))
        .expect("text");
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("\r\n\r\nx 1\n"),
            "{ok}"
        );
        assert!(ok.contains("Content-Length: 4\r\n"), "{ok}");
    }
}
