//! Unit tests of the IKE thread's pieces: records, failures, the queue.

use super::explain::{count, explain, suite_name};
use super::keys::{peer_esp_sa_records, wireshark_record};
use super::slots::survivor;
use super::*;
use crate::ike::crypto::Encr;
use crate::ike::sa::{Action, ErrorNotify};
use crate::ike::wire::consts::id;
use crate::ike::wire::payload::Identification;

fn config(local: [u8; 4], remote: [u8; 4], psk: &[u8]) -> Arc<IkeConfig> {
    Arc::new(IkeConfig {
        local_id: Identification::new(id::IPV4_ADDR, local.to_vec()),
        remote_id: Some(Identification::new(id::IPV4_ADDR, remote.to_vec())),
        psk: Zeroizing::new(psk.to_vec()),
        ike: Default::default(),
        esp: Default::default(),
        local_addr: local.into(),
        remote_addr: remote.into(),
        retransmit: Default::default(),
    })
}

const PSK: &[u8] = b"a shared key, long enough";

/// Runs IKE_SA_INIT and IKE_AUTH in memory; both SAs afterwards, with
/// the failures each side reported.
fn run(a_cfg: Arc<IkeConfig>, b_cfg: Arc<IkeConfig>) -> [(IkeSa, Vec<IkeError>); 2] {
    let mut rng = SystemRandomness::new();
    let now = Instant::now();
    let (mut a, mut to_b) = IkeSa::initiate(a_cfg, now, &mut rng).expect("initiate");
    let mut b = IkeSa::responder(b_cfg);
    let (mut a_failed, mut b_failed) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let mut to_a = Vec::new();
        for action in to_b.drain(..) {
            if let Action::Send(bytes) = action {
                to_a.extend(b.handle(&bytes, now, &mut rng).unwrap_or_default());
            }
        }
        for action in to_a {
            match action {
                Action::Send(bytes) => {
                    to_b.extend(a.handle(&bytes, now, &mut rng).unwrap_or_default())
                }
                Action::Failed(e) => b_failed.push(e),
                _ => {}
            }
        }
        for action in &to_b {
            if let Action::Failed(e) = action {
                a_failed.push(*e);
            }
        }
    }
    [(a, a_failed), (b, b_failed)]
}

fn exchange(psk_b: &[u8]) -> (IkeSa, IkeSa) {
    let a_cfg = config([198, 18, 0, 1], [198, 18, 0, 2], PSK);
    let b_cfg = config([198, 18, 0, 2], [198, 18, 0, 1], psk_b);
    let [(a, _), (b, _)] = run(a_cfg, b_cfg);
    (a, b)
}

fn ike_peer(cfg: &Arc<IkeConfig>, remote_id: Identification) -> IkePeer {
    IkePeer {
        name: "b".into(),
        local: cfg.local_addr,
        endpoint: cfg.remote_addr,
        inner_local: cfg.local_addr,
        inner_remote: cfg.remote_addr,
        ike: crate::config::IkeSettings {
            psk_file: "/etc/esptun/b.psk".into(),
            local_id: cfg.local_id.clone(),
            remote_id,
            initiate: true,
            ike: cfg.ike.clone(),
            esp: cfg.esp.clone(),
            pfs: Vec::new(),
            ike_rekey: Duration::from_secs(14400),
            child_rekey: Duration::from_secs(3600),
            liveness: Duration::from_secs(30),
            keepalive: Duration::from_secs(20),
            force_encap: false,
            cookie_threshold: None,
            any_source: false,
        },
    }
}

/// A peer as the IKE thread holds it, for [`explain`].
fn peer(cfg: &Arc<IkeConfig>) -> PeerIke {
    let remote_id = cfg.remote_id.clone().expect("a remote id");
    let cfg_peer = ike_peer(cfg, remote_id);
    PeerIke {
        policy: policy(&cfg_peer),
        contacted: false,
        current: None,
        kept: Vec::new(),
        cfg: cfg_peer,
        ike: cfg.clone(),
        initiate_via: (Via::NatT, SocketAddr::new(cfg.remote_addr, 4500)),
        slots: Vec::new(),
        next_initiate: None,
        backoff: RETRY_FIRST,
        counters: IkeCounters::default(),
        last_error: None,
        last_log: None,
        suppressed: 0,
    }
}

#[test]
fn an_identity_mismatch_and_disjoint_proposals_are_explained_without_secrets() {
    // b expects a at another identity: both sides fail authentication.
    let a_cfg = config([198, 18, 0, 1], [198, 18, 0, 2], PSK);
    let b_cfg = config([198, 18, 0, 2], [198, 18, 0, 9], PSK);
    let [(_, a_failed), (_, b_failed)] = run(a_cfg.clone(), b_cfg.clone());
    assert_eq!(
        a_failed,
        [IkeError::PeerRefused(ErrorNotify::AuthenticationFailed)]
    );
    assert_eq!(
        b_failed,
        [IkeError::WeRefused(ErrorNotify::AuthenticationFailed)]
    );
    let b_text = explain(&peer(&b_cfg), &b_failed[0]);
    assert!(
        b_text.contains("expected remote_id 198.18.0.9") && b_text.contains("psk_file"),
        "{b_text}"
    );
    let a_text = explain(&peer(&a_cfg), &a_failed[0]);
    assert!(a_text.contains("our local_id 198.18.0.1"), "{a_text}");
    for t in [&a_text, &b_text] {
        assert!(!t.contains("shared key"), "a secret in {t}");
    }

    // No IKE encryption in common: NO_PROPOSAL_CHOSEN on both sides.
    let mut only_128 = (*a_cfg).clone();
    only_128.ike.encr = vec![Encr::AesGcm16_128];
    let mut only_256 = (*config([198, 18, 0, 2], [198, 18, 0, 1], PSK)).clone();
    only_256.ike.encr = vec![Encr::AesGcm16_256];
    let (a_cfg, b_cfg) = (Arc::new(only_128), Arc::new(only_256));
    let [(_, a_failed), (_, b_failed)] = run(a_cfg.clone(), b_cfg.clone());
    assert_eq!(
        a_failed,
        [IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
    );
    assert_eq!(
        b_failed,
        [IkeError::WeRefused(ErrorNotify::NoProposalChosen)]
    );
    let mut counters = IkeCounters::default();
    count(&mut counters, &b_failed[0]);
    assert_eq!(counters.proposal_mismatches, 1);
    let text = explain(&peer(&b_cfg), &b_failed[0]);
    assert!(
        text.contains("no proposal in common") && text.contains("AesGcm16_256"),
        "{text}"
    );
}

#[test]
fn both_ends_print_the_same_wireshark_record() {
    let (a, b) = exchange(PSK);
    let ra = wireshark_record(&a).expect("a has keys");
    let rb = wireshark_record(&b).expect("b has keys");
    assert_eq!(ra.as_str(), rb.as_str());
    let fields: Vec<&str> = ra.split(',').collect();
    let (spi_i, spi_r) = a.spis();
    assert_eq!(fields.len(), 8, "{}", ra.as_str());
    assert_eq!(fields[0], format!("{spi_i:016x}"));
    assert_eq!(fields[1], format!("{spi_r:016x}"));
    // AES-256 key and 4-byte salt, in hex; the two directions differ.
    assert_eq!((fields[2].len(), fields[3].len()), (72, 72));
    assert_ne!(fields[2], fields[3]);
    assert_eq!(fields[4], "\"AES-GCM-256 with 16 octet ICV [RFC5282]\"");
    assert_eq!((fields[5], fields[6]), ("", ""));
    assert_eq!(fields[7], "\"NONE [RFC4306]\"");
}

#[test]
fn a_wrong_psk_fails_both_sides_as_authentication_failures() {
    let (a, b) = exchange(b"another key, also long enough");
    assert_eq!(a.status(), crate::ike::sa::Status::Closed);
    assert_eq!(b.status(), crate::ike::sa::Status::Closed);
    let mut counters = IkeCounters::default();
    for e in [
        IkeError::WeRefused(ErrorNotify::AuthenticationFailed),
        IkeError::PeerRefused(ErrorNotify::AuthenticationFailed),
        IkeError::PeerRefused(ErrorNotify::NoProposalChosen),
        IkeError::Timeout,
    ] {
        count(&mut counters, &e);
    }
    assert_eq!(counters.auth_failures, 2);
    assert_eq!(counters.proposal_mismatches, 1);
    assert_eq!(counters.timeouts, 1);
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let shared = Arc::new(IkeShared::default());
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let queue = IkeQueue {
        tx,
        shared: shared.clone(),
    };
    let from = Some(SocketAddr::from(([198, 18, 0, 2], 4500)));
    queue.offer(&[0, 0, 0, 0, 1, 2, 3], from);
    queue.offer(&[0, 0, 0, 0, 4, 5, 6], from);
    assert_eq!(shared.queue_drops.load(Ordering::Relaxed), 1);
    let first = rx.try_recv().expect("the first is queued");
    assert_eq!(first.bytes, [1, 2, 3], "the marker is removed");
    // Nothing to hand over without a source or a whole marker.
    queue.offer(&[0, 0, 0, 0, 7], None);
    queue.offer(&[0, 0], from);
    assert!(rx.try_recv().is_err());
    assert_eq!(shared.queue_drops.load(Ordering::Relaxed), 1);
}

#[test]
fn suites_read_as_configured() {
    use crate::ike::crypto::{DhGroup, Prf};
    let s = crate::ike::proposal::IkeSuite {
        encr: Encr::AesGcm16_256,
        prf: Prf::HmacSha256,
        dh: DhGroup::Curve25519,
    };
    assert_eq!(suite_name(s), crate::config::ike::DEFAULT_IKE_PROPOSAL);
}

#[test]
fn the_configured_lifetimes_and_liveness_become_the_policy_and_retransmissions() {
    let cfg = config([198, 18, 0, 1], [198, 18, 0, 2], PSK);
    let mut p = ike_peer(&cfg, cfg.remote_id.clone().expect("id"));
    p.ike.child_rekey = Duration::from_secs(5);
    p.ike.ike_rekey = Duration::from_secs(20);
    p.ike.liveness = Duration::from_secs(2);
    let policy = policy(&p);
    assert_eq!(policy.child_rekey, Some(Duration::from_secs(5)));
    assert_eq!(policy.child_hard, Some(Duration::from_secs(6)));
    assert_eq!(policy.ike_rekey, Some(Duration::from_secs(20)));
    assert_eq!(policy.ike_hard, Some(Duration::from_secs(24)));
    assert_eq!(policy.liveness, Some(Duration::from_secs(2)));
    // A short liveness interval gives up on a silent peer sooner ...
    let short = retransmit(Duration::from_secs(2));
    assert_eq!(short.initial, Duration::from_millis(500));
    assert_eq!(short.max_interval, Duration::from_secs(4));
    // ... the default keeps RFC 7296's usual schedule.
    assert_eq!(retransmit(Duration::from_secs(30)), Retransmit::default());
    // INITIAL_CONTACT only until the first IKE SA with the peer is up.
    let mut peer = peer(&cfg);
    assert!(peer.slot_policy().initial_contact);
    peer.contacted = true;
    assert!(!peer.slot_policy().initial_contact);
}

/// Each failed attempt (an IKE SA that failed, or one left without a
/// CHILD SA) doubles the wait before the next, up to the maximum: a peer
/// that always narrows our selectors is not asked again every 2 s.
#[test]
fn attempts_back_off_doubling_up_to_the_maximum() {
    let cfg = config([198, 18, 0, 1], [198, 18, 0, 2], PSK);
    let mut p = peer(&cfg);
    let now = Instant::now();
    let waits: Vec<u64> = (0..9).map(|_| p.back_off(now).as_secs()).collect();
    assert_eq!(waits, [2, 4, 8, 16, 32, 64, 120, 120, 120]);
    assert_eq!(p.next_initiate, Some(now + RETRY_MAX));
}

#[test]
fn port_4500_datagrams_are_told_apart_by_the_non_esp_marker() {
    use super::receive::{NattDatagram, classify_natt};
    assert_eq!(classify_natt(&[0xff]), NattDatagram::Keepalive);
    assert_eq!(
        classify_natt(&[0, 0, 0, 0, 0x11, 0x22]),
        NattDatagram::Ike(&[0x11, 0x22])
    );
    // ESP in UDP: a non-zero SPI where the marker would be.
    assert_eq!(
        classify_natt(&[0, 0, 0, 1, 0, 0, 0, 1]),
        NattDatagram::Other
    );
    assert_eq!(classify_natt(&[0xff, 0xff]), NattDatagram::Other);
    assert_eq!(classify_natt(&[]), NattDatagram::Other);
}

/// Runs IKE_SA_INIT and IKE_AUTH in memory like [`run`], keeping the
/// CHILD SA each side hands to its key manager.
fn exchange_with_children() -> ((IkeSa, ChildSa), (IkeSa, ChildSa)) {
    let a_cfg = config([198, 18, 0, 1], [198, 18, 0, 2], PSK);
    let b_cfg = config([198, 18, 0, 2], [198, 18, 0, 1], PSK);
    let mut rng = SystemRandomness::new();
    let now = Instant::now();
    let (mut a, mut to_b) = IkeSa::initiate(a_cfg, now, &mut rng).expect("initiate");
    let mut b = IkeSa::responder(b_cfg);
    let (mut a_child, mut b_child) = (None, None);
    for _ in 0..4 {
        let mut to_a = Vec::new();
        for action in to_b.drain(..) {
            match action {
                Action::Send(bytes) => {
                    to_a.extend(b.handle(&bytes, now, &mut rng).unwrap_or_default())
                }
                Action::InstallChild(c) => a_child = Some(c),
                _ => {}
            }
        }
        for action in to_a {
            match action {
                Action::Send(bytes) => {
                    to_b.extend(a.handle(&bytes, now, &mut rng).unwrap_or_default())
                }
                Action::InstallChild(c) => b_child = Some(c),
                _ => {}
            }
        }
    }
    for action in to_b {
        if let Action::InstallChild(c) = action {
            a_child = Some(c);
        }
    }
    (
        (a, a_child.expect("a installs a CHILD SA")),
        (b, b_child.expect("b installs a CHILD SA")),
    )
}

/// The IKE thread's view of one end: the peer with its IKE SA and kept
/// CHILD SA.
fn holding(local: [u8; 4], remote: [u8; 4], sa: IkeSa, child: ChildSa) -> PeerIke {
    let cfg = config(local, remote, PSK);
    let mut p = peer(&cfg);
    p.kept.push(child);
    let mut slot = Slot::new(sa, SocketAddr::new(cfg.remote_addr, 500), Instant::now());
    slot.established = true;
    p.slots.push(slot);
    p
}

#[test]
fn both_ends_of_an_ike_child_sa_print_matching_esp_sa_records() {
    let ((a, a_child), (b, b_child)) = exchange_with_children();
    let (a_spis, b_spis) = (
        (a_child.inbound_spi, a_child.outbound_spi),
        (b_child.inbound_spi, b_child.outbound_spi),
    );
    assert_eq!(
        a_spis,
        (b_spis.1, b_spis.0),
        "one CHILD SA, seen from both ends"
    );
    let ra = peer_esp_sa_records(&holding([198, 18, 0, 1], [198, 18, 0, 2], a, a_child));
    let rb = peer_esp_sa_records(&holding([198, 18, 0, 2], [198, 18, 0, 1], b, b_child));
    assert_eq!(ra.len(), 2, "one record per direction");
    assert_eq!(rb.len(), 2, "one record per direction");
    // a's outbound is b's inbound and the other way round: same SPI, key
    // and (swapped, outer) addresses, so the two records are equal.
    assert_eq!(ra[0].as_str(), rb[1].as_str());
    assert_eq!(ra[1].as_str(), rb[0].as_str());
    assert_ne!(ra[0].as_str(), ra[1].as_str());
    let fields: Vec<&str> = ra[0].split(',').collect();
    assert_eq!(fields.len(), 8, "{}", ra[0].as_str());
    assert_eq!(
        &fields[..5],
        [
            "\"IPv4\"",
            "\"198.18.0.1\"",
            "\"198.18.0.2\"",
            format!("\"0x{:08x}\"", a_spis.1).as_str(),
            "\"AES-GCM with 16 octet ICV [RFC4106]\"",
        ]
    );
    // AES-256 key and salt: "0x" and 72 hex digits, quoted.
    assert_eq!(fields[5].len(), 2 + 2 + 72, "{}", fields[5]);
    assert_eq!(&fields[6..], ["\"NULL\"", "\"\""]);
    let back: Vec<&str> = ra[1].split(',').collect();
    assert_eq!(
        &back[1..4],
        [
            "\"198.18.0.2\"",
            "\"198.18.0.1\"",
            format!("\"0x{:08x}\"", a_spis.0).as_str()
        ]
    );
}

#[test]
fn a_nat_keepalive_is_skipped_only_when_esp_went_out_in_the_interval() {
    use super::send::esp_sent;
    // No outbound SA, or one that sent nothing: the keepalive goes.
    assert!(!esp_sent(&[], &[]));
    assert!(!esp_sent(&[], &[(0xa001, 0)]));
    assert!(!esp_sent(&[(0xa001, 5)], &[(0xa001, 5)]));
    // ESP went out since the last look: skipped (RFC 3948 section 4).
    assert!(esp_sent(&[(0xa001, 5)], &[(0xa001, 6)]));
    // A rekeyed SA that sent counts; the old one gone does not hide it.
    assert!(esp_sent(&[(0xa001, 5)], &[(0xa002, 1)]));
    // The old SA gone and the new one silent: the keepalive goes.
    assert!(!esp_sent(&[(0xa001, 5)], &[(0xa002, 0)]));
}

/// An established IKE SA in a slot created at `created`, up at `up_at`.
fn slot(created: Instant, up_at: Instant) -> Slot {
    let (a, _) = exchange(PSK);
    assert_eq!(a.status(), crate::ike::sa::Status::Established);
    let mut s = Slot::new(a, SocketAddr::from(([198, 18, 0, 2], 500)), created);
    s.established = true;
    s.up_at = Some(up_at);
    s
}

#[test]
fn of_two_ike_sas_set_up_at_once_both_sides_keep_the_same_one() {
    let t0 = Instant::now();
    let rank = |s: &Slot| {
        let (i, r) = s.sa.spis();
        (i.min(r), i.max(r))
    };
    // Both sides initiated: each one's new IKE SA was created before the
    // other came up. Either order of establishment keeps the same one.
    let x = slot(t0, t0 + Duration::from_millis(30));
    let y = slot(
        t0 + Duration::from_millis(1),
        t0 + Duration::from_millis(20),
    );
    let winner = if rank(&x) > rank(&y) {
        x.sa.spis()
    } else {
        y.sa.spis()
    };
    let mut here = vec![y, x];
    // x just came up here; y was up before.
    let kept = survivor(&here, 1);
    assert_eq!(here[kept].sa.spis(), winner);
    // The mirror image: y comes up last.
    here.swap(0, 1);
    let (x_up, y_up) = (here[0].up_at, here[1].up_at);
    here[0].up_at = y_up;
    here[1].up_at = x_up;
    let kept = survivor(&here, 1);
    assert_eq!(here[kept].sa.spis(), winner);
    // A later IKE SA (the peer reconnected) replaces an earlier one, SPIs
    // regardless.
    let old = slot(t0, t0 + Duration::from_millis(10));
    let new = slot(t0 + Duration::from_secs(15), t0 + Duration::from_secs(15));
    let slots = vec![old, new];
    assert_eq!(survivor(&slots, 1), 1);
    // Within SETUP_RACE of the other coming up it is a race: the
    // responder creates its slot only when a retransmission arrives.
    let mut slots = slots;
    slots[1].created = t0 + Duration::from_secs(5);
    let race = survivor(&slots, 1);
    let winner = if rank(&slots[0]) > rank(&slots[1]) {
        0
    } else {
        1
    };
    assert_eq!(race, winner);
    // One being deleted already is no contender.
    slots[1].created = t0;
    slots[0].closing = true;
    assert_eq!(survivor(&slots, 1), 1);
    // A later IKE SA left without a CHILD SA (ours refused, or being
    // deleted) never replaces one that carries traffic.
    let old = slot(t0, t0 + Duration::from_millis(10));
    let mut new = slot(t0 + Duration::from_secs(15), t0 + Duration::from_secs(15));
    let spi = new.sa.children()[0].inbound_spi;
    new.sa
        .delete_child(spi, t0, &mut SystemRandomness::new())
        .expect("delete");
    assert_eq!(survivor(&[old, new], 1), 0);
}

/// INITIAL_CONTACT on an IKE SA created after our other one came up is a
/// restart of the peer (the old one is stale, the new one's CHILD SA is
/// installed), whatever the SPIs; created before ours came up, it is
/// both sides initiating at once.
#[test]
fn initial_contact_after_ours_came_up_is_a_restart_not_a_race() {
    use super::slots::set_up_alongside;
    let t0 = Instant::now();
    let old = slot(t0, t0 + Duration::from_millis(10));
    let mut new = slot(t0 + Duration::from_secs(1), t0 + Duration::from_secs(1));
    new.established = false;
    new.up_at = None;
    let slots = vec![old, new];
    assert!(!set_up_alongside(&slots, 1));
    let mut slots = slots;
    slots[0].up_at = Some(t0 + Duration::from_secs(2));
    assert!(set_up_alongside(&slots, 1));
}
