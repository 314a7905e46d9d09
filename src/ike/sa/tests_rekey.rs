//! CHILD and IKE SA rekeys (plain, PFS, crossed, refused), Delete and
//! INITIAL_CONTACT between two parties (see `tests_harness`).

use super::tests_harness::Net;
use super::*;
use crate::ike::crypto::{DhGroup, IkeKeys, Prf};

pub(super) fn only_child(p: &super::tests_harness::Party) -> &ChildSa {
    assert_eq!(p.installed.len(), 1, "one CHILD SA");
    p.installed.values().next().expect("child")
}

pub(super) fn nonce(b: u8) -> Vec<u8> {
    vec![b; NONCE_LEN]
}

/// Section 2.17 from outside: KEYMAT = prf+(SK_d, [g^ir |] Ni | Nr), and
/// the rekey initiator's outbound key comes first.
pub(super) fn assert_keymat(
    sk_d: &[u8],
    prf: Prf,
    gir: Option<&[u8]>,
    ni: &[u8],
    nr: &[u8],
    init: &ChildSa,
) {
    let e = init.encr.material_len();
    let k = init.encr.key_len();
    let mut seed: Vec<&[u8]> = gir.into_iter().collect();
    seed.push(ni);
    seed.push(nr);
    let km = prf.prf_plus(sk_d, &seed, 2 * e).expect("prf+");
    assert_eq!(init.outbound.key().expose(), &km[..k]);
    assert_eq!(init.outbound.salt(), &km[k..e]);
    assert_eq!(init.inbound.key().expose(), &km[e..e + k]);
    assert_eq!(init.inbound.salt(), &km[e + k..2 * e]);
}

fn rekey_by(by_a: bool, pfs: bool) {
    let policy = Policy {
        pfs: if pfs {
            vec![DhGroup::Curve25519]
        } else {
            Vec::new()
        },
        ..Policy::default()
    };
    let mut net = Net::up(policy);
    let old_a = only_child(&net.a).inbound_spi;
    let old_b = only_child(&net.b).inbound_spi;
    let sk_d = net.a.sa.keys.as_ref().expect("keys").ike.sk_d.clone();
    let prf = net.a.sa.suite().expect("suite").prf;
    let (ni, nr) = (nonce(0x11), nonce(0x22));
    let actions = {
        let (init, resp) = if by_a {
            (&mut net.a, &mut net.b)
        } else {
            (&mut net.b, &mut net.a)
        };
        init.rng.nonces.push_back(ni.clone());
        resp.rng.nonces.push_back(nr.clone());
        let old = if by_a { old_a } else { old_b };
        init.sa
            .rekey_child(old, net.now, &mut init.rng)
            .expect("rekey")
    };
    net.push(by_a, actions);
    net.settle();
    let (init, resp) = if by_a {
        (&net.a, &net.b)
    } else {
        (&net.b, &net.a)
    };
    let child = only_child(init);
    assert!(
        child.inbound_spi != old_a && child.inbound_spi != old_b,
        "old one deleted"
    );
    assert!(child.transport_mode && only_child(resp).transport_mode);
    let gir = pfs.then(|| {
        let resp_public = resp.rng.last_dh().public().to_vec();
        init.rng
            .last_dh()
            .agree(&resp_public)
            .expect("agree")
            .expose()
            .to_vec()
    });
    assert_keymat(&sk_d, prf, gir.as_deref(), &ni, &nr, child);
    assert_eq!(init.sa.children()[0].generation, 1);
    assert_eq!(init.sa.rekeys(), (0, 1));
    assert_eq!(resp.sa.rekeys(), (0, 1));
    assert!(init.child_failed.is_empty() && resp.child_failed.is_empty());
}

#[test]
fn child_rekey_by_the_original_initiator() {
    rekey_by(true, false);
}

#[test]
fn child_rekey_by_the_original_responder_flips_keymat() {
    rekey_by(false, false);
}

#[test]
fn child_rekey_with_pfs_by_either_side() {
    rekey_by(true, true);
    rekey_by(false, true);
}

#[test]
fn pfs_required_but_not_offered_is_refused() {
    let mut net = Net::up_with(
        Policy::default(),
        Policy {
            pfs: vec![DhGroup::Ecp256],
            ..Policy::default()
        },
    );
    let old = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(old, net.now, &mut net.a.rng)
        .expect("rekey");
    net.push(true, a);
    net.settle();
    assert_eq!(only_child(&net.a).inbound_spi, old, "the old SA carries on");
    assert_eq!(
        net.a.child_failed,
        vec![IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
    );
    assert_eq!(net.a.sa.children()[0].state, ChildState::Installed);
}

/// Section 2.8.1: both sides rekey the same CHILD SA at once. `a_low`:
/// a's exchange holds the lowest nonce, so a's new SA is redundant.
fn crossed_child_rekeys(a_low: bool) {
    let mut net = Net::up(Policy::default());
    let sk_d = net.a.sa.keys.as_ref().expect("keys").ike.sk_d.clone();
    let prf = net.a.sa.suite().expect("suite").prf;
    let (lo, hi) = if a_low { (0x10, 0x80) } else { (0x80, 0x10) };
    // a's exchange: Ni = lo, Nr (b's answer) = lo + 1; b's: hi, hi + 1.
    // Draw order on each side: own Ni (rekey), then Nr (answer).
    net.a.rng.nonces.extend([nonce(lo), nonce(hi + 1)]);
    net.b.rng.nonces.extend([nonce(hi), nonce(lo + 1)]);
    let sa = only_child(&net.a).inbound_spi;
    let sb = only_child(&net.b).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(sa, net.now, &mut net.a.rng)
        .expect("a");
    let b = net
        .b
        .sa
        .rekey_child(sb, net.now, &mut net.b.rng)
        .expect("b");
    net.push(true, a);
    net.push(false, b);
    net.settle();
    // One pair survives: the one made by the exchange with the higher
    // nonces, keyed from its initiator's side.
    let (winner, ni, nr) = if a_low {
        (&net.b, nonce(hi), nonce(hi + 1))
    } else {
        (&net.a, nonce(lo), nonce(lo + 1))
    };
    let child = only_child(winner);
    assert_keymat(&sk_d, prf, None, &ni, &nr, child);
    assert_eq!(net.a.installs, 3, "the first, and one from each exchange");
    assert_eq!(net.b.installs, 3);
    assert!(net.a.child_failed.is_empty() && net.b.child_failed.is_empty());
    assert_eq!(net.a.sa.next_timeout(), None);
}

#[test]
fn crossed_child_rekeys_lowest_nonce_loses_a() {
    crossed_child_rekeys(true);
}

#[test]
fn crossed_child_rekeys_lowest_nonce_loses_b() {
    crossed_child_rekeys(false);
}

#[test]
fn rekey_crossing_a_delete() {
    let mut net = Net::up(Policy::default());
    let sa = only_child(&net.a).inbound_spi;
    let sb = only_child(&net.b).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(sa, net.now, &mut net.a.rng)
        .expect("rekey");
    let b = net
        .b
        .sa
        .delete_child(sb, net.now, &mut net.b.rng)
        .expect("delete");
    net.push(true, a);
    net.push(false, b);
    net.settle();
    // Section 2.25: b refuses to rekey what it is deleting
    // (TEMPORARY_FAILURE), a deletes it as asked.
    assert!(net.a.installed.is_empty() && net.b.installed.is_empty());
    assert!(
        net.a.child_failed.is_empty(),
        "TEMPORARY_FAILURE is no failure"
    );
    assert_eq!(net.a.installs, 1);
}

#[test]
fn rekey_of_an_unknown_child_is_refused() {
    let mut net = Net::up(Policy::default());
    let sa = only_child(&net.a).inbound_spi;
    // b forgets it (as after a hard lifetime with the Delete lost).
    let sb = only_child(&net.b).inbound_spi;
    net.b.sa.children.retain(|c| c.inbound_spi != sb);
    net.b.installed.clear();
    let a = net
        .a
        .sa
        .rekey_child(sa, net.now, &mut net.a.rng)
        .expect("rekey");
    net.push(true, a);
    net.settle();
    assert!(
        net.a.installed.is_empty(),
        "CHILD_SA_NOT_FOUND: gone here too"
    );
}

#[test]
fn delete_both_ways_and_close() {
    let mut net = Net::up(Policy::default());
    let sa = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .delete_child(sa, net.now, &mut net.a.rng)
        .expect("delete");
    net.push(true, a);
    net.settle();
    assert!(net.a.installed.is_empty() && net.b.installed.is_empty());
    assert_eq!(net.a.sa.status(), Status::Established, "the IKE SA stays");

    let mut net = Net::up(Policy::default());
    let b = net.b.sa.close(net.now, &mut net.b.rng).expect("close");
    net.push(false, b);
    net.settle();
    assert!(net.a.installed.is_empty() && net.b.installed.is_empty());
    assert!(net.a.closed && net.b.closed);
    assert_eq!(
        (net.a.sa.status(), net.b.sa.status()),
        (Status::Closed, Status::Closed)
    );
    assert!(net.a.failed.is_empty() && net.b.failed.is_empty());
}

#[test]
fn initial_contact_is_sent_and_reported() {
    let net = Net::up(Policy::default());
    assert_eq!((net.a.restarted, net.b.restarted), (0, 1));
    let off = Policy {
        initial_contact: false,
        ..Policy::default()
    };
    let net = Net::up(off);
    assert_eq!(net.b.restarted, 0);
}

fn ike_keys_after_rekey(by_a: bool) {
    let mut net = Net::up(Policy::default());
    let old_spis = net.a.sa.spis();
    let old_keys = net.a.sa.keys.as_ref().expect("keys");
    let (old_prf, old_sk_d) = (
        net.a.sa.suite().expect("suite").prf,
        old_keys.ike.sk_d.clone(),
    );
    let (ni, nr) = (nonce(0x33), nonce(0x44));
    {
        let (init, resp) = if by_a {
            (&mut net.a, &mut net.b)
        } else {
            (&mut net.b, &mut net.a)
        };
        init.rng.nonces.push_back(ni.clone());
        resp.rng.nonces.push_back(nr.clone());
    }
    let actions = if by_a {
        net.a.sa.rekey_ike(net.now, &mut net.a.rng)
    } else {
        net.b.sa.rekey_ike(net.now, &mut net.b.rng)
    }
    .expect("rekey");
    net.push(by_a, actions);
    net.settle();
    let (init, resp) = if by_a {
        (&net.a, &net.b)
    } else {
        (&net.b, &net.a)
    };
    let spis = init.sa.spis();
    assert_eq!(spis, resp.sa.spis());
    assert!(spis.0 != old_spis.0 && spis.1 != old_spis.1, "new SPIs");
    assert_eq!(init.sa.role(), Role::Initiator, "the rekey's initiator");
    assert_eq!(resp.sa.role(), Role::Responder);
    assert_eq!((init.ike_rekeyed, resp.ike_rekeyed), (1, 1));
    assert!(init.sa.retiring_spis().is_empty(), "old SA deleted");
    assert!(resp.sa.retiring_spis().is_empty());
    // Section 2.18, recomputed: SKEYSEED = prf(SK_d (old), g^ir | Ni | Nr).
    let gir = init
        .rng
        .last_dh()
        .agree(resp.rng.last_dh().public())
        .expect("agree");
    let suite = init.sa.suite().expect("suite");
    let skeyseed = old_prf.prf(&old_sk_d, &[gir.expose(), &ni, &nr]);
    let want = IkeKeys::derive_rekey(
        old_prf, &old_sk_d, suite.prf, suite.encr, &gir, &ni, &nr, spis.0, spis.1,
    )
    .expect("derive");
    let got = &init.sa.keys.as_ref().expect("keys").ike;
    let p = suite.prf.output_len();
    let km = suite
        .prf
        .prf_plus(
            &skeyseed,
            &[&ni, &nr, &spis.0.to_be_bytes(), &spis.1.to_be_bytes()],
            p,
        )
        .expect("prf+");
    assert_eq!(&got.sk_d[..], &km[..p], "SK_d from the recomputed SKEYSEED");
    assert_eq!(got.sk_ei, want.sk_ei);
    assert_eq!(got.sk_pr, want.sk_pr);
    assert_eq!(resp.sa.keys.as_ref().expect("keys").ike.sk_er, want.sk_er);
    // Message IDs start again at 0; the CHILD SA moved over.
    assert_eq!(init.sa.next_request_id, 0, "the Delete went on the old SA");
    assert_eq!(init.installed.len(), 1);
    assert_eq!(init.sa.next_peer_request_id, 0);
    // The new SA works: a CHILD SA rekey under the new SK_d.
    let (init_spi, by) = (only_child(init).inbound_spi, by_a);
    let actions = if by {
        net.a.sa.rekey_child(init_spi, net.now, &mut net.a.rng)
    } else {
        net.b.sa.rekey_child(init_spi, net.now, &mut net.b.rng)
    }
    .expect("child rekey on the new IKE SA");
    net.push(by, actions);
    net.settle();
    assert_eq!(net.a.installs, 2);
}

#[test]
fn ike_rekey_by_either_side() {
    ike_keys_after_rekey(true);
    ike_keys_after_rekey(false);
}

/// Crossed IKE SA rekeys (section 2.8.2): the new SA whose exchange holds
/// the lowest of the four nonces is deleted by its maker; one survives.
fn crossed_ike_rekeys(a_low: bool) {
    let mut net = Net::up(Policy::default());
    let (lo, hi) = if a_low { (0x10, 0x80) } else { (0x80, 0x10) };
    // Each side draws its own Ni, then its Nr answering the other.
    net.a.rng.nonces.extend([nonce(lo), nonce(hi + 1)]);
    net.b.rng.nonces.extend([nonce(hi), nonce(lo + 1)]);
    let a = net.a.sa.rekey_ike(net.now, &mut net.a.rng).expect("a");
    let b = net.b.sa.rekey_ike(net.now, &mut net.b.rng).expect("b");
    net.push(true, a);
    net.push(false, b);
    net.settle();
    assert_eq!(net.a.sa.spis(), net.b.sa.spis());
    let winner_is_a = !a_low;
    assert_eq!(
        net.a.sa.role(),
        if winner_is_a {
            Role::Initiator
        } else {
            Role::Responder
        }
    );
    // The switch, and the redundant SA's SPIs routed until its Delete.
    assert_eq!((net.a.ike_rekeyed, net.b.ike_rekeyed), (2, 2));
    assert_eq!(net.a.sa.rekeys(), (1, 0));
    assert!(net.a.sa.retiring_spis().is_empty());
    assert!(net.b.sa.retiring_spis().is_empty());
    // Still usable both ways.
    let s = only_child(&net.b).inbound_spi;
    let b = net
        .b
        .sa
        .rekey_child(s, net.now, &mut net.b.rng)
        .expect("rekey");
    net.push(false, b);
    net.settle();
    assert_eq!(net.b.installs, 2);
}

#[test]
fn crossed_ike_rekeys_both_outcomes() {
    crossed_ike_rekeys(true);
    crossed_ike_rekeys(false);
}

#[test]
fn delete_by_the_original_responder() {
    let mut net = Net::up(Policy::default());
    let sb = only_child(&net.b).inbound_spi;
    let b = net
        .b
        .sa
        .delete_child(sb, net.now, &mut net.b.rng)
        .expect("delete");
    net.push(false, b);
    net.settle();
    assert!(net.a.installed.is_empty() && net.b.installed.is_empty());
    // And the original initiator closes the IKE SA.
    let a = net.a.sa.close(net.now, &mut net.a.rng).expect("close");
    net.push(true, a);
    net.settle();
    assert!(net.a.closed && net.b.closed);
}

#[test]
fn a_retransmitted_rekey_request_is_answered_from_the_cache() {
    let mut net = Net::up(Policy::default());
    let sa = only_child(&net.a).inbound_spi;
    let request = net
        .a
        .sa
        .rekey_child(sa, net.now, &mut net.a.rng)
        .expect("rekey");
    let Action::Send(request) = &request[0] else {
        panic!("a request");
    };
    // b answers; the answer is lost.
    let lost = net
        .b
        .sa
        .handle(request, net.now, &mut net.b.rng)
        .expect("answer");
    let installs = net.b.installs;
    let mut lost = lost.into_iter();
    let first = lost.next();
    let rest: Vec<Action> = lost.collect();
    assert!(matches!(first, Some(Action::Send(_))));
    let _ = net.b.apply_for_test(rest);
    let due = net.a.sa.next_timeout().expect("retransmission");
    net.now = due;
    let again = net.a.sa.handle_timer(net.now, &mut net.a.rng);
    net.push(true, again);
    net.settle();
    assert_eq!(net.b.installs, installs + 1, "processed once");
    assert_eq!(net.a.installed.len(), 1);
    assert_eq!(net.a.installs, 2);
}

#[test]
fn esn_choice_carries_into_rekeys() {
    let (mut ac, mut bc) = super::tests::pair();
    ac.esp.esn = vec![false];
    bc.esp.esn = vec![false, true];
    let mut net = Net::up_configs(ac, bc, Policy::default());
    assert!(!only_child(&net.a).esn);
    let sa = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(sa, net.now, &mut net.a.rng)
        .expect("rekey");
    net.push(true, a);
    net.settle();
    assert!(!only_child(&net.a).esn && !only_child(&net.b).esn);
    assert_eq!(net.a.sa.children()[0].generation, 1);
}

#[test]
fn a_responder_without_pfs_policy_follows_the_initiator() {
    let pfs = Policy {
        pfs: vec![DhGroup::Ecp256],
        ..Policy::default()
    };
    let mut net = Net::up_with(pfs, Policy::default());
    let old = only_child(&net.a).inbound_spi;
    let dh_before = net.b.rng.dh.len();
    let a = net
        .a
        .sa
        .rekey_child(old, net.now, &mut net.a.rng)
        .expect("rekey");
    net.push(true, a);
    net.settle();
    assert!(net.a.child_failed.is_empty());
    assert_ne!(only_child(&net.a).inbound_spi, old);
    assert_eq!(net.b.rng.dh.len(), dh_before + 1, "b did a DH exchange");
    assert_eq!(net.b.rng.dh.last().map(|d| d.0), Some(DhGroup::Ecp256));
}

#[test]
fn a_pfs_group_the_responder_refuses_is_retried_with_its_choice() {
    let a = Policy {
        pfs: vec![DhGroup::Curve25519, DhGroup::Ecp256],
        ..Policy::default()
    };
    let b = Policy {
        pfs: vec![DhGroup::Ecp256],
        ..Policy::default()
    };
    let mut net = Net::up_with(a, b);
    let old = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(old, net.now, &mut net.a.rng)
        .expect("rekey");
    net.push(true, a);
    net.settle();
    assert!(net.a.child_failed.is_empty());
    assert_ne!(only_child(&net.a).inbound_spi, old);
    let groups: Vec<DhGroup> = net.a.rng.dh.iter().map(|d| d.0).collect();
    assert_eq!(
        groups[groups.len() - 2..],
        [DhGroup::Curve25519, DhGroup::Ecp256],
        "INVALID_KE_PAYLOAD, then b's group"
    );
}

/// Crossed IKE rekeys where b's request is lost: b answered a's and holds
/// that SA aside; a finishes and deletes the old SA, which makes b take
/// the SA it answered (section 2.8.2) and drop its own attempt.
#[test]
fn crossed_ike_rekey_with_our_request_lost() {
    let mut net = Net::up(Policy::default());
    let a = net.a.sa.rekey_ike(net.now, &mut net.a.rng).expect("a");
    let _lost = net.b.sa.rekey_ike(net.now, &mut net.b.rng).expect("b");
    net.push(true, a);
    net.settle();
    assert_eq!(net.a.sa.spis(), net.b.sa.spis());
    assert_eq!(net.a.sa.role(), Role::Initiator);
    assert_eq!((net.a.ike_rekeyed, net.b.ike_rekeyed), (1, 1));
    assert!(net.a.sa.retiring_spis().is_empty() && net.b.sa.retiring_spis().is_empty());
    assert_eq!(
        net.b.sa.next_timeout(),
        None,
        "b's own attempt is abandoned"
    );
    // The new SA carries on.
    let s = only_child(&net.b).inbound_spi;
    let b = net
        .b
        .sa
        .rekey_child(s, net.now, &mut net.b.rng)
        .expect("rekey");
    net.push(false, b);
    net.settle();
    assert_eq!(net.b.installs, 2);
}

/// Section 1.3.1: every rekey of a transport-mode SA repeats
/// USE_TRANSPORT_MODE; a rekey without it (tunnel mode) is refused.
#[test]
fn rekeys_repeat_use_transport_mode() {
    use crate::ike::sk;
    use crate::ike::wire::consts::notify;
    let mut net = Net::up(Policy::default());
    let old = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(old, net.now, &mut net.a.rng)
        .expect("rekey");
    let Some(Action::Send(request)) = a.first() else {
        panic!("a request");
    };
    let keys = net.b.sa.keys.as_ref().expect("keys");
    let opened = sk::open(request, &keys.sk_in).expect("open");
    let notifies: Vec<u16> = opened
        .inner
        .iter()
        .filter_map(|p| match p {
            Payload::Notify(n) => Some(n.ty),
            _ => None,
        })
        .collect();
    assert!(notifies.contains(&notify::USE_TRANSPORT_MODE));
    assert!(notifies.contains(&notify::REKEY_SA));
    // The same request without it, sealed as a would.
    let mut inner = opened.inner.clone();
    inner.retain(|p| !matches!(p, Payload::Notify(n) if n.ty == notify::USE_TRANSPORT_MODE));
    let a_keys = net.a.sa.keys.as_ref().expect("keys");
    let tunnel = sk::seal(&opened.header, &inner, &a_keys.sk_out, [3; 8]).expect("seal");
    let answer = net
        .b
        .sa
        .handle(&tunnel, net.now, &mut net.b.rng)
        .expect("answered");
    assert!(!answer.iter().any(|x| matches!(x, Action::InstallChild(_))));
    let Some(Action::Send(response)) = answer.first() else {
        panic!("a response");
    };
    let a = net
        .a
        .sa
        .handle(response, net.now, &mut net.a.rng)
        .expect("response");
    assert_eq!(
        failures_of(&a),
        vec![IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
    );
    assert_eq!(only_child(&net.a).inbound_spi, old, "the old SA carries on");
}

pub(super) fn failures_of(actions: &[Action]) -> Vec<IkeError> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ChildFailed(e) | Action::Failed(e) => Some(*e),
            _ => None,
        })
        .collect()
}
