//! The lifecycle on a fake clock: `Sim` applies each plan to the views as
//! the daemon applies it to the tables, and moves time by hand.

use super::*;
use crate::sa::KeyMaterial;
use crate::sa::table::SaIds;

const SWITCH: Duration = Duration::from_secs(30);
const RETIRE: Duration = Duration::from_secs(120);

fn fp(key: u8) -> Fingerprint {
    Fingerprint::new(&KeyMaterial::from_bytes(&[key; 20]).expect("material"))
}

fn endpoint(last: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, last], 4500))
}

/// A peer wanting outbound (spi, key) and inbound (spi, key).
fn want(peer: &str, out: (u32, u8), inb: (u32, u8)) -> WantedPeer {
    WantedPeer {
        peer: peer.into(),
        endpoint: endpoint(2),
        outbound: Some(WantedSa {
            spi: out.0,
            fp: fp(out.1),
        }),
        inbound: Some(WantedSa {
            spi: inb.0,
            fp: fp(inb.1),
        }),
    }
}

struct Sim {
    views: Vec<SaView>,
    ids: SaIds,
    start: Instant,
    now: Instant,
}

impl Sim {
    fn new() -> Sim {
        let start = Instant::now();
        Sim {
            views: Vec::new(),
            ids: SaIds::default(),
            start,
            now: start,
        }
    }

    fn at(&mut self, secs: u64) {
        self.now = self.start + Duration::from_secs(secs);
    }

    /// Plans and applies; the datapath confirms every install at once.
    fn step(&mut self, wanted: &[WantedPeer]) -> Vec<Action> {
        let actions = self.step_unconfirmed(wanted);
        for v in &mut self.views {
            v.installed = true;
        }
        actions
    }

    /// Plans and applies, with installs not yet confirmed.
    fn step_unconfirmed(&mut self, wanted: &[WantedPeer]) -> Vec<Action> {
        let timing = Timing {
            switch_after: SWITCH,
            retire_after: RETIRE,
        };
        let actions = plan(wanted, &self.views, self.now, timing);
        for a in &actions {
            apply(&mut self.views, a, wanted, &mut self.ids);
        }
        actions
    }

    /// (direction, spi, state) of every SA, in table order.
    fn sas(&self) -> Vec<(Direction, u32, &'static str)> {
        self.views
            .iter()
            .map(|v| (v.direction, v.spi, v.state.as_str()))
            .collect()
    }

    fn id(&self, direction: Direction, spi: u32) -> SaId {
        self.views
            .iter()
            .find(|v| v.direction == direction && v.spi == spi)
            .map(|v| v.id)
            .expect("sa in table")
    }

    fn see(&mut self, spi: u32) {
        for v in &mut self.views {
            if v.direction == Direction::Inbound && v.spi == spi {
                v.seen = true;
            }
        }
    }
}

use Direction::{Inbound as In, Outbound as Out};

fn started() -> (Sim, Vec<WantedPeer>) {
    let mut sim = Sim::new();
    let wanted = vec![want("b", (0xa001, 1), (0xb001, 2))];
    let actions = sim.step(&wanted);
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert_eq!(
        sim.sas(),
        [(In, 0xb001, "active"), (Out, 0xa001, "active")],
        "a start sends at once: nothing to break"
    );
    (sim, wanted)
}

#[test]
fn an_unchanged_wish_changes_nothing() {
    let (mut sim, wanted) = started();
    sim.at(1000);
    assert_eq!(sim.step(&wanted), []);
    assert_eq!(sim.step(&[]), [], "peers not named keep their SAs");
}

#[test]
fn a_roll_is_make_before_break() {
    let (mut sim, _) = started();
    let (a1, b1) = (sim.id(Out, 0xa001), sim.id(In, 0xb001));
    sim.at(10);
    let rolled = vec![want("b", (0xa002, 3), (0xb002, 4))];
    sim.step(&rolled);
    // The new inbound SA accepts at once, the old one retires later; the
    // new outbound SA waits for the peer.
    assert_eq!(
        sim.sas(),
        [
            (In, 0xb001, "retiring"),
            (Out, 0xa001, "active"),
            (In, 0xb002, "active"),
            (Out, 0xa002, "pending"),
        ]
    );
    sim.at(11);
    assert_eq!(sim.step(&rolled), [], "still waiting for the peer");
    // The peer's first packet on our new inbound SA: switch, unforced.
    sim.see(0xb002);
    sim.at(12);
    let a2 = sim.id(Out, 0xa002);
    assert_eq!(
        sim.step(&[]),
        [Action::Switch {
            peer: "b".into(),
            from: Some(a1),
            to: a2,
            forced: false
        }]
    );
    assert_eq!(
        sim.sas(),
        [
            (In, 0xb001, "retiring"),
            (In, 0xb002, "active"),
            (Out, 0xa002, "active")
        ]
    );
    // The old inbound SA keeps accepting until exactly retire_after.
    sim.at(10 + RETIRE.as_secs() - 1);
    assert_eq!(sim.step(&rolled), []);
    sim.at(10 + RETIRE.as_secs());
    assert_eq!(
        sim.step(&rolled),
        [Action::Remove {
            id: b1,
            reason: RemoveReason::Retired
        }]
    );
    assert_eq!(sim.sas(), [(In, 0xb002, "active"), (Out, 0xa002, "active")]);
}

#[test]
fn a_pending_switch_is_forced_after_the_switch_timeout() {
    let (mut sim, _) = started();
    let rolled = vec![want("b", (0xa002, 3), (0xb002, 4))];
    sim.at(100);
    sim.step(&rolled);
    sim.at(100 + SWITCH.as_secs() - 1);
    assert_eq!(sim.step(&[]), []);
    sim.at(100 + SWITCH.as_secs());
    let actions = sim.step(&[]);
    assert!(
        matches!(actions.as_slice(), [Action::Switch { forced: true, .. }]),
        "{actions:?}"
    );
}

#[test]
fn an_outbound_change_alone_switches_once_installed() {
    let (mut sim, _) = started();
    let a1 = sim.id(Out, 0xa001);
    let rolled = [want("b", (0xa002, 3), (0xb001, 2))];
    let actions = sim.step_unconfirmed(&rolled);
    assert_eq!(
        actions,
        [Action::Install {
            peer: "b".into(),
            direction: Out,
            spi: 0xa002,
            state: SaState::Pending {
                since: sim.now,
                awaiting: None
            }
        }],
        "nothing waits for the peer, but the install must be confirmed"
    );
    assert_eq!(sim.step_unconfirmed(&[]), [], "not confirmed yet");
    let a2 = sim.id(Out, 0xa002);
    for v in &mut sim.views {
        v.installed = true;
    }
    assert_eq!(
        sim.step(&[]),
        [Action::Switch {
            peer: "b".into(),
            from: Some(a1),
            to: a2,
            forced: false
        }]
    );
    assert_eq!(sim.sas(), [(In, 0xb001, "active"), (Out, 0xa002, "active")]);
}

#[test]
fn a_refused_install_leaves_the_running_sa_sending() {
    let (mut sim, _) = started();
    sim.step_unconfirmed(&[want("b", (0xa002, 3), (0xb001, 2))]);
    // The datapath could not claim the new key's reservation.
    let a2 = sim.id(Out, 0xa002);
    sim.views.retain(|v| v.id != a2);
    sim.at(SWITCH.as_secs() * 2);
    assert_eq!(sim.step(&[]), []);
    assert_eq!(sim.sas(), [(In, 0xb001, "active"), (Out, 0xa001, "active")]);
}

#[test]
fn a_roll_reverted_before_its_switch_keeps_the_running_sa() {
    let (mut sim, original) = started();
    sim.at(5);
    sim.step(&[want("b", (0xa002, 3), (0xb002, 4))]);
    let a2 = sim.id(Out, 0xa002);
    sim.at(6);
    let actions = sim.step(&original);
    assert!(actions.contains(&Action::Remove {
        id: a2,
        reason: RemoveReason::Cancelled
    }));
    assert_eq!(
        sim.sas(),
        [
            (In, 0xb001, "active"),
            (Out, 0xa001, "active"),
            (In, 0xb002, "retiring")
        ],
        "{actions:?}"
    );
    // Nothing switches later either.
    sim.at(5 + SWITCH.as_secs() + 1);
    sim.step(&[]);
    assert!(sim.sas().contains(&(Out, 0xa001, "active")));
}

#[test]
fn a_key_is_never_in_two_sas() {
    let (mut sim, _) = started();
    let before = sim.sas();
    // A new SPI on the key that is still sending.
    let actions = sim.step(&[want("b", (0xa003, 1), (0xb001, 2))]);
    assert!(
        matches!(
            actions.as_slice(),
            [Action::Refuse {
                refusal: Refusal::KeyInUse {
                    holder_spi: 0xa001,
                    holder_direction: Out,
                    ..
                },
                ..
            }]
        ),
        "{actions:?}"
    );
    assert_eq!(sim.sas(), before);
    let text = match &actions[0] {
        Action::Refuse { refusal, .. } => refusal.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(
        text.contains("uses the key of the SA 0xa001 (outbound)"),
        "{text}"
    );

    // Our inbound key as a new outbound key: both directions on one key.
    let actions = sim.step(&[want("b", (0xa004, 2), (0xb001, 2))]);
    assert!(
        matches!(actions.as_slice(), [Action::Refuse { .. }]),
        "{actions:?}"
    );
    assert_eq!(sim.sas(), before);

    // A key still held by a retiring SA cannot come back under a new SPI.
    sim.step(&[want("b", (0xa001, 1), (0xb002, 4))]);
    let actions = sim.step(&[want("b", (0xa001, 1), (0xb003, 2))]);
    assert!(
        matches!(actions.as_slice(), [Action::Refuse { .. }]),
        "{actions:?}"
    );
}

#[test]
fn a_key_is_never_in_both_directions_or_two_peers_of_one_wish() {
    let mut sim = Sim::new();
    let actions = sim.step(&[want("b", (0xa001, 7), (0xb001, 7))]);
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Refuse { .. }))
            .count(),
        2,
        "{actions:?}"
    );
    assert_eq!(sim.sas(), []);
    let actions = sim.step(&[
        want("b", (0xa001, 1), (0xb001, 2)),
        want("c", (0xa101, 1), (0xb101, 3)),
    ]);
    let refused: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Refuse { peer, .. } => Some(peer.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(refused, ["b", "c"], "both holders refused: {actions:?}");
    assert_eq!(sim.sas(), [(In, 0xb001, "active"), (In, 0xb101, "active")]);
}

#[test]
fn an_inbound_spi_names_one_sa() {
    let (mut sim, _) = started();
    // Another peer asking for our SPI is refused.
    let mut c = want("c", (0xa101, 5), (0xb001, 6));
    c.endpoint = endpoint(3);
    let actions = sim.step(&[c]);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Refuse {
                refusal: Refusal::SpiInUse { spi: 0xb001, .. },
                ..
            }
        )),
        "{actions:?}"
    );
    // The same SPI with a new key replaces the SA at once.
    let b1 = sim.id(In, 0xb001);
    let actions = sim.step(&[want("b", (0xa001, 1), (0xb001, 9))]);
    assert!(actions.contains(&Action::Remove {
        id: b1,
        reason: RemoveReason::KeyChangedInPlace
    }));
    assert!(sim.sas().contains(&(In, 0xb001, "active")));
    assert_ne!(sim.id(In, 0xb001), b1);
}

#[test]
fn an_endpoint_change_moves_the_sas_without_reinstalling() {
    let (mut sim, mut wanted) = started();
    let (a1, b1) = (sim.id(Out, 0xa001), sim.id(In, 0xb001));
    wanted[0].endpoint = endpoint(9);
    let moved = |id| Action::SetEndpoint {
        id,
        endpoint: endpoint(9),
    };
    assert_eq!(sim.step(&wanted), [moved(b1), moved(a1)]);
    assert_eq!(sim.id(Out, 0xa001), a1);
    assert!(sim.views.iter().all(|v| v.endpoint == endpoint(9)));
    assert_eq!(sim.step(&wanted), []);
}

#[test]
fn a_direction_wanted_empty_is_deleted() {
    let (mut sim, mut wanted) = started();
    wanted[0].outbound = None;
    let actions = sim.step(&wanted);
    assert!(
        matches!(
            actions.as_slice(),
            [Action::Remove {
                reason: RemoveReason::Deleted,
                ..
            }]
        ),
        "{actions:?}"
    );
    assert_eq!(sim.sas(), [(In, 0xb001, "active")]);
}
