use std::sync::mpsc::{Receiver, channel};

use super::*;
use crate::crypto::IcvLen;
use crate::crypto::select::{BootOptions, FailurePolicy, Mode};

const TIMING: Timing = Timing {
    switch_after: Duration::from_secs(30),
    retire_after: Duration::from_secs(120),
};

struct Rig {
    sas: SaManager,
    out_rx: Receiver<OutboundCommands>,
    in_rx: Receiver<InboundCommands>,
    events: Sender<SaEvent>,
    selector: Selector,
}

fn rig() -> Rig {
    let (out_tx, out_rx) = channel();
    let (in_tx, in_rx) = channel();
    let (events, ev_rx) = channel();
    let selector = Selector::boot(
        crate::crypto::Provider::detect_all(),
        Mode::Auto,
        FailurePolicy::Fallback,
        BootOptions::default(),
    );
    Rig {
        sas: SaManager {
            // No inbound thread here confirms by itself.
            inbound_first: Duration::ZERO,
            ..SaManager::new(TIMING, out_tx, in_tx, ev_rx)
        },
        out_rx,
        in_rx,
        events,
        selector,
    }
}

/// A CHILD SA pair as the IKE thread hands it over: fresh keys, no
/// durable reservation.
fn child(selector: &Selector, inbound_spi: u32, outbound_spi: u32, seed: u8) -> PeerSas {
    let inner = InnerAddrs::new([198, 18, 0, 1].into(), [198, 18, 0, 2].into()).expect("inner");
    let material = |b: u8| KeyMaterial::from_bytes(&[b; 20]).expect("material");
    let (m_in, m_out) = (material(seed), material(seed.wrapping_add(1)));
    let keys = SaKeys::new(selector, &m_in, IcvLen::Icv16).expect("keys");
    let inbound = InboundSa::new(inbound_spi, keys, true, inner, 64).expect("inbound");
    let keys = SaKeys::new(selector, &m_out, IcvLen::Icv16).expect("keys");
    let outbound = OutboundSa::new(outbound_spi, keys, true, inner).expect("outbound");
    PeerSas {
        peer: "b".into(),
        endpoint: "198.18.0.2:4500".parse().expect("addr"),
        outbound: Some(NewOutbound {
            sa: outbound,
            material: m_out,
            key_file: None,
            claimed: true,
        }),
        inbound: Some(NewInbound {
            sa: inbound,
            fp: Fingerprint::new(&m_in),
        }),
    }
}

/// Confirms every install the threads were sent, as they would.
fn confirm(r: &mut Rig) {
    let mut ids = Vec::new();
    for batch in r.out_rx.try_iter() {
        for c in batch {
            if let SaCommand::Install { id, .. } = c {
                ids.push(id);
            }
        }
    }
    for batch in r.in_rx.try_iter() {
        for c in batch {
            if let SaCommand::Install { id, .. } = c {
                ids.push(id);
            }
        }
    }
    for id in ids {
        r.events.send(SaEvent::Installed { id }).expect("send");
    }
}

fn state(r: &SaManager, direction: Direction, spi: u32) -> Option<SaState> {
    r.views
        .iter()
        .find(|v| v.direction == direction && v.spi == spi)
        .map(|v| v.state)
}

/// A peer's first CHILD SA: the outbound SA, active at once, reaches
/// the outbound thread only after the inbound thread holds the
/// inbound SA (else the peer's answer to our first packet could meet
/// no SA).
#[test]
fn a_first_outbound_sa_waits_for_its_inbound_sa() {
    let mut r = rig();
    r.sas.inbound_first = Duration::from_secs(5);
    let (in_rx, out_rx, events) = (r.in_rx, r.out_rx, r.events.clone());
    // The inbound thread: installs late, and looks whether the
    // outbound thread got anything before.
    let inbound = std::thread::spawn(move || {
        let batch = in_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the inbound install");
        std::thread::sleep(Duration::from_millis(150));
        let early = out_rx.try_recv().is_ok();
        for c in batch {
            if let SaCommand::Install { id, .. } = c {
                let _ = events.send(SaEvent::Installed { id });
            }
        }
        (early, out_rx)
    });
    let started = Instant::now();
    let first = child(&r.selector, 0x1001, 0x2001, 1);
    assert!(r.sas.install(vec![first], started).is_empty());
    let waited = started.elapsed();
    let (early, out_rx) = inbound.join().expect("inbound thread");
    assert!(
        !early,
        "the outbound SA went out before the inbound SA was installed"
    );
    let batch = out_rx.try_recv().expect("the outbound install, after");
    assert!(batch.iter().any(|c| matches!(
        c,
        SaCommand::Install { meta, .. } if meta.state == SaState::Active
    )));
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
}

#[test]
fn a_rekeyed_child_sa_is_deleted_make_before_break() {
    let mut r = rig();
    let now = Instant::now();
    let old = child(&r.selector, 0x1001, 0x2001, 1);
    assert!(r.sas.install(vec![old], now).is_empty());
    confirm(&mut r);
    r.sas.expire(now);
    // The rekey's InstallChild: the new inbound SA accepts at once, the
    // new outbound one waits for the peer, the old pair still runs.
    let new = child(&r.selector, 0x1002, 0x2002, 3);
    assert!(r.sas.install(vec![new], now).is_empty());
    confirm(&mut r);
    r.sas.expire(now);
    assert_eq!(
        state(&r.sas, Direction::Inbound, 0x1002),
        Some(SaState::Active)
    );
    assert!(matches!(
        state(&r.sas, Direction::Inbound, 0x1001),
        Some(SaState::Retiring { .. })
    ));
    assert_eq!(
        state(&r.sas, Direction::Outbound, 0x2001),
        Some(SaState::Active)
    );
    assert!(matches!(
        state(&r.sas, Direction::Outbound, 0x2002),
        Some(SaState::Pending { .. })
    ));
    // The Delete of the old pair: the successor sends soon (when the
    // peer is seen on the new SA, or HURRY_AFTER_DELETE later, time
    // for the peer's datapath to install it), the old inbound SA
    // accepts a little longer, never with no SA at all.
    let later = now + Duration::from_millis(50);
    r.sas.delete("b", Direction::Inbound, 0x1001, later);
    r.sas.delete("b", Direction::Outbound, 0x2001, later);
    assert_eq!(
        state(&r.sas, Direction::Outbound, 0x2001),
        Some(SaState::Active),
        "not before the peer can have installed its new inbound SA"
    );
    r.sas.expire(later + HURRY_AFTER_DELETE);
    assert_eq!(
        state(&r.sas, Direction::Outbound, 0x2002),
        Some(SaState::Active)
    );
    assert_eq!(state(&r.sas, Direction::Outbound, 0x2001), None);
    assert_eq!(
        state(&r.sas, Direction::Inbound, 0x1001),
        Some(SaState::Retiring {
            at: later + DELETED_GRACE
        })
    );
    r.sas.expire(later + DELETED_GRACE);
    assert_eq!(state(&r.sas, Direction::Inbound, 0x1001), None);
    assert_eq!(
        state(&r.sas, Direction::Inbound, 0x1002),
        Some(SaState::Active)
    );
    // A Delete of the running pair (no successor) removes it at once.
    r.sas.delete("b", Direction::Inbound, 0x1002, later);
    r.sas.delete("b", Direction::Outbound, 0x2002, later);
    assert!(r.sas.views.is_empty(), "{:?}", r.sas.views);
}

#[test]
fn a_delete_before_the_successor_is_installed_switches_once_it_is() {
    let mut r = rig();
    let now = Instant::now();
    assert!(
        r.sas
            .install(vec![child(&r.selector, 0x1001, 0x2001, 1)], now)
            .is_empty()
    );
    confirm(&mut r);
    r.sas.expire(now);
    assert!(
        r.sas
            .install(vec![child(&r.selector, 0x1002, 0x2002, 3)], now)
            .is_empty()
    );
    // Not yet confirmed by the outbound thread: the old SA keeps
    // sending until then.
    r.sas.delete("b", Direction::Outbound, 0x2001, now);
    assert_eq!(
        state(&r.sas, Direction::Outbound, 0x2001),
        Some(SaState::Active)
    );
    confirm(&mut r);
    r.sas.expire(now + HURRY_AFTER_DELETE);
    assert_eq!(
        state(&r.sas, Direction::Outbound, 0x2002),
        Some(SaState::Active)
    );
    assert_eq!(state(&r.sas, Direction::Outbound, 0x2001), None);
}

/// Crossed rekeys (RFC 7296 section 2.8.1) as the host sees them that
/// installed the survivor X first and the redundant Y after it: Y's
/// Delete leaves the peer without the SA it wants until the IKE thread
/// hands X over again, which brings X's retiring inbound SA back and
/// installs its never-used outbound SA; then the old pair's Delete
/// switches to X. A key that has sent never comes back.
#[test]
fn the_survivor_of_crossed_rekeys_comes_back_and_a_spent_key_does_not() {
    let mut r = rig();
    let now = Instant::now();
    for (i, o, seed) in [
        (0x1001, 0x2001, 1),
        (0x1003, 0x2003, 3),
        (0x1005, 0x2005, 5),
    ] {
        assert!(
            r.sas
                .install(vec![child(&r.selector, i, o, seed)], now)
                .is_empty()
        );
        confirm(&mut r);
        r.sas.expire(now);
    }
    // Y (0x1005) is redundant and deleted: its inbound SA was the
    // active one, its outbound SA never sent.
    r.sas.delete("b", Direction::Inbound, 0x1005, now);
    r.sas.delete("b", Direction::Outbound, 0x2005, now);
    assert_eq!(state(&r.sas, Direction::Outbound, 0x2005), None);
    // X again, with the same keys.
    assert!(
        r.sas
            .install(vec![child(&r.selector, 0x1003, 0x2003, 3)], now)
            .is_empty()
    );
    confirm(&mut r);
    r.sas.expire(now);
    assert_eq!(
        state(&r.sas, Direction::Inbound, 0x1003),
        Some(SaState::Active)
    );
    // The old pair's Delete ends the rekey on X.
    r.sas.delete("b", Direction::Inbound, 0x1001, now);
    r.sas.delete("b", Direction::Outbound, 0x2001, now);
    r.sas.expire(now + HURRY_AFTER_DELETE);
    assert_eq!(
        state(&r.sas, Direction::Outbound, 0x2003),
        Some(SaState::Active)
    );
    assert_eq!(state(&r.sas, Direction::Outbound, 0x2001), None);
    // The old outbound key sent: once nothing holds it any more it is
    // still refused in a new SA, whose sequence numbers would start
    // again.
    let later = now + DELETED_GRACE;
    r.sas.expire(later);
    assert_eq!(state(&r.sas, Direction::Inbound, 0x1001), None);
    let refused = r
        .sas
        .install(vec![child(&r.selector, 0x1007, 0x2007, 1)], later);
    assert!(
        matches!(refused.as_slice(), [(_, Refusal::KeySpent { spi: 0x2007 })]),
        "{refused:?}"
    );
    assert_eq!(
        state(&r.sas, Direction::Outbound, 0x2003),
        Some(SaState::Active)
    );
}
