//! Long runs on the fake clock (see `tests_harness`): lifetimes with and
//! without jitter, loss, liveness checks, hard lifetimes.

use std::time::Duration;

use super::tests_harness::Net;
use super::*;
use crate::ike::crypto::DhGroup;

#[test]
fn liveness_with_a_live_and_a_dead_peer() {
    let policy = Policy {
        liveness: Some(Duration::from_secs(30)),
        ..Policy::default()
    };
    let mut net = Net::up(policy.clone());
    net.run_for(Duration::from_secs(200));
    let checked = net.a.sa.last_liveness_check().expect("checked");
    assert!(checked > net.start + Duration::from_secs(150));
    assert!(net.a.failed.is_empty() && net.b.failed.is_empty());
    assert_eq!(net.a.installed.len(), 1);

    let mut net = Net::up(policy);
    net.drop_to_b = true;
    net.drop_to_a = true;
    net.run_for(Duration::from_secs(400));
    assert_eq!(net.a.failed, vec![IkeError::DeadPeer]);
    assert!(net.a.installed.is_empty(), "its CHILD SAs went with it");
    assert_eq!(net.a.sa.status(), Status::Closed);
    assert_eq!(net.a.sa.next_timeout(), None);
}

#[test]
fn long_run_with_lifetimes_on_both_sides() {
    let policy = Policy {
        child_rekey: Some(Duration::from_secs(60)),
        child_hard: Some(Duration::from_secs(90)),
        ike_rekey: Some(Duration::from_secs(250)),
        ike_hard: Some(Duration::from_secs(400)),
        liveness: Some(Duration::from_secs(20)),
        pfs: vec![DhGroup::Curve25519],
        ..Policy::default()
    };
    let mut net = Net::up(policy);
    net.run_for(Duration::from_secs(3000));
    assert!(net.a.failed.is_empty() && net.b.failed.is_empty());
    assert!(net.a.child_failed.is_empty() && net.b.child_failed.is_empty());
    assert_eq!(net.a.installed.len(), 1);
    let (ike_a, child_a) = net.a.sa.rekeys();
    let (ike_b, child_b) = net.b.sa.rekeys();
    assert!(ike_a >= 10 && child_a >= 40, "rekeyed: {ike_a} {child_a}");
    assert_eq!((ike_a, child_a), (ike_b, child_b));
    // Both sides took turns: jitter makes either one first.
    assert!(net.a.sent > 20 && net.b.sent > 20);
    assert!(net.a.sa.children()[0].generation >= 40);
}

#[test]
fn hard_lifetimes_without_rekeying() {
    let policy = Policy {
        child_hard: Some(Duration::from_secs(100)),
        ike_hard: Some(Duration::from_secs(300)),
        ..Policy::default()
    };
    let longer = Policy {
        ike_hard: Some(Duration::from_secs(500)),
        ..policy.clone()
    };
    let mut net = Net::up_with(policy, longer);
    net.run_for(Duration::from_secs(150));
    assert!(net.a.installed.is_empty() && net.b.installed.is_empty());
    assert_eq!(net.a.sa.status(), Status::Established);
    net.run_for(Duration::from_secs(400));
    // a's clock ran out first and ended the IKE SA; b heard of it in a
    // Delete.
    assert_eq!(net.a.failed, vec![IkeError::Expired]);
    assert!(net.b.failed.is_empty() && net.b.closed);
    assert_eq!(
        (net.a.sa.status(), net.b.sa.status()),
        (Status::Closed, Status::Closed)
    );
}

#[test]
fn rekey_times_are_jittered_within_the_margin() {
    let lifetime = Duration::from_secs(1000);
    let policy = Policy {
        child_rekey: Some(lifetime),
        ike_rekey: Some(lifetime),
        jitter_percent: 10,
        ..Policy::default()
    };
    let net = Net::up(policy);
    let mut times = Vec::new();
    for p in [&net.a, &net.b] {
        let c = &p.sa.children()[0];
        times.push(c.rekey_at.expect("child rekey") - c.installed);
        let est = p.sa.established_at().expect("established");
        times.push(p.sa.ike_rekey_at().expect("ike rekey") - est);
    }
    for t in &times {
        assert!(*t <= lifetime && *t >= lifetime * 9 / 10, "{t:?}");
    }
    times.dedup();
    assert!(times.len() > 1, "not all the same: {times:?}");
}

#[test]
fn long_lossy_runs_recover() {
    for every in 3..=30 {
        lossy_run(every);
    }
}

/// Without jitter both sides rekey at the same moments, so every CHILD
/// and IKE SA rekey crosses the peer's (sections 2.8.1, 2.8.2).
#[test]
fn long_run_without_jitter_crosses_every_rekey() {
    for (every, pfs) in [
        (None, false),
        (None, true),
        (Some(7), true),
        (Some(4), false),
    ] {
        let policy = Policy {
            child_rekey: Some(Duration::from_secs(60)),
            child_hard: Some(Duration::from_secs(90)),
            ike_rekey: Some(Duration::from_secs(250)),
            ike_hard: Some(Duration::from_secs(400)),
            liveness: Some(Duration::from_secs(20)),
            jitter_percent: 0,
            pfs: if pfs {
                vec![DhGroup::Ecp256]
            } else {
                Vec::new()
            },
            ..Policy::default()
        };
        let mut net = Net::up(policy);
        net.drop_every = every;
        net.run_for(Duration::from_secs(2000));
        net.drop_every = None;
        net.run_for(Duration::from_secs(3000));
        net.check();
        let ctx = format!("{every:?} {pfs}");
        assert!(net.a.failed.is_empty() && net.b.failed.is_empty(), "{ctx}");
        assert_eq!(net.a.installed.len(), 1, "{ctx}: {:?}", net.a.sa.children());
        let (ike, child) = net.a.sa.rekeys();
        assert!(ike >= 10 && child >= 40, "{ctx}: {ike} {child}");
        if every.is_none() {
            // Every round crossed: two CHILD SAs made per round (one
            // deleted as redundant), and each IKE rekey announced the
            // redundant SA's SPIs besides the switch.
            assert!(child >= 80, "{ctx}: {child}");
            assert_eq!(net.a.ike_rekeyed, 2 * ike, "{ctx}");
        }
    }
}

#[test]
fn a_hard_lifetime_is_announced_with_a_delete() {
    let short = Policy {
        child_hard: Some(Duration::from_secs(100)),
        ..Policy::default()
    };
    let mut net = Net::up_with(short, Policy::default());
    net.run_for(Duration::from_secs(99));
    assert_eq!(net.b.installed.len(), 1);
    net.run_for(Duration::from_secs(101));
    assert!(net.a.installed.is_empty());
    assert!(net.b.installed.is_empty(), "b heard of it in a Delete");
    assert_eq!(net.a.sa.next_timeout(), None);
}

#[test]
fn an_unanswered_ike_delete_still_closes() {
    let mut net = Net::up(Policy::default());
    net.drop_to_b = true;
    let a = net.a.sa.close(net.now, &mut net.a.rng).expect("close");
    net.push(true, a);
    net.run_for(Duration::from_secs(300));
    assert!(net.a.closed && net.a.failed.is_empty());
    assert!(net.a.installed.is_empty());
}

fn lossy_run(every: u32) {
    let policy = Policy {
        child_rekey: Some(Duration::from_secs(60)),
        child_hard: Some(Duration::from_secs(90)),
        ike_rekey: Some(Duration::from_secs(250)),
        ike_hard: Some(Duration::from_secs(400)),
        liveness: Some(Duration::from_secs(20)),
        ..Policy::default()
    };
    let mut net = Net::up(policy);
    // Every n-th message is lost; retransmissions carry the exchanges
    // through, and no (key, SPI) is installed twice meanwhile.
    net.drop_every = Some(every);
    net.run_for(Duration::from_secs(2000));
    net.drop_every = None;
    net.run_for(Duration::from_secs(4300));
    net.check();
    assert!(
        net.a.failed.is_empty() && net.b.failed.is_empty(),
        "every {every}: {:?} {:?}",
        net.a.failed,
        net.b.failed
    );
    assert_eq!(
        net.a.installed.len(),
        1,
        "every {every}: {:?}",
        net.a.sa.children()
    );
    let (ike, child) = net.a.sa.rekeys();
    assert!(ike >= 14 && child >= 60, "every {every}: {ike} {child}");
}

#[test]
fn esp_traffic_puts_off_liveness_checks() {
    let policy = Policy {
        liveness: Some(Duration::from_secs(30)),
        ..Policy::default()
    };
    let mut net = Net::up(policy);
    let first = net.a.sa.next_timeout().expect("liveness timer");
    assert_eq!(first, net.start + Duration::from_secs(30));
    net.a.sa.peer_seen(net.start + Duration::from_secs(25));
    assert_eq!(
        net.a.sa.next_timeout(),
        Some(net.start + Duration::from_secs(55))
    );
    net.a.sa.peer_seen(net.start + Duration::from_secs(5));
    assert_eq!(
        net.a.sa.next_timeout(),
        Some(net.start + Duration::from_secs(55)),
        "never earlier"
    );
    net.run_for(Duration::from_secs(54));
    assert_eq!(net.a.sa.last_liveness_check(), None);
    assert!(net.b.sa.last_liveness_check().is_some(), "b saw no traffic");
}
