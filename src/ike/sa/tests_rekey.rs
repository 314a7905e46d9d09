//! CHILD and IKE SA rekeys (plain, PFS, crossed, refused), Delete and
//! INITIAL_CONTACT between two parties (see `tests_harness`).

use super::tests_harness::Net;
use super::*;
use crate::ike::crypto::{DhGroup, IkeKeys, Prf};

fn only_child(p: &super::tests_harness::Party) -> &ChildSa {
    assert_eq!(p.installed.len(), 1, "one CHILD SA");
    p.installed.values().next().expect("child")
}

fn nonce(b: u8) -> Vec<u8> {
    vec![b; NONCE_LEN]
}

/// Section 2.17 from outside: KEYMAT = prf+(SK_d, [g^ir |] Ni | Nr), and
/// the rekey initiator's outbound key comes first.
fn assert_keymat(sk_d: &[u8], prf: Prf, gir: Option<&[u8]>, ni: &[u8], nr: &[u8], init: &ChildSa) {
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

fn failures_of(actions: &[Action]) -> Vec<IkeError> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ChildFailed(e) | Action::Failed(e) => Some(*e),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------
// A rekey offers what the SA being rekeyed uses first (sections 1.3.2,
// 1.3.3, 2.8), and INVALID_KE_PAYLOAD in CREATE_CHILD_SA (section 1.3).

use super::tests_harness::Party;
use crate::ike::crypto::Encr;
use crate::ike::proposal::{EspAlgorithms, EspSuite, IkeSuite};
use crate::ike::sk;
use crate::ike::wire::consts::{exchange, notify};

const X: DhGroup = DhGroup::Curve25519;
const P: DhGroup = DhGroup::Ecp256;

/// The bytes the actions send.
fn sends(actions: &[Action]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

/// The one request a rekey sends.
fn the_request(actions: &[Action]) -> Vec<u8> {
    let [request] = sends(actions).try_into().expect("one request");
    request
}

/// A message of the reader's peer, opened as the reader reads it.
fn opened(reader: &Party, bytes: &[u8]) -> Vec<Payload> {
    let keys = reader.sa.keys.as_ref().expect("keys");
    sk::open(bytes, &keys.sk_in).expect("open").inner
}

fn message_id(bytes: &[u8]) -> u32 {
    let view = IkeHeader::new_checked(bytes).expect("header");
    Header::parse(&view).expect("header").message_id
}

fn proposals(payloads: &[Payload]) -> Vec<Proposal> {
    payloads
        .iter()
        .find_map(|p| match p {
            Payload::Sa(x) => Some(x.clone()),
            _ => None,
        })
        .expect("SA payload")
}

fn ke_group(payloads: &[Payload]) -> Option<u16> {
    payloads.iter().find_map(|p| match p {
        Payload::Ke(k) => Some(k.group),
        _ => None,
    })
}

fn invalid_ke(payloads: &[Payload]) -> Option<Vec<u8>> {
    payloads.iter().find_map(|p| match p {
        Payload::Notify(n) if n.ty == notify::INVALID_KE_PAYLOAD => Some(n.data.clone()),
        _ => None,
    })
}

/// `from`'s answer to its peer's CREATE_CHILD_SA `request`, made by hand:
/// what a confused or dishonest peer could send.
fn forged_answer(from: &Party, request: &[u8], payloads: &[Payload]) -> Vec<u8> {
    let header = from
        .sa
        .header(exchange::CREATE_CHILD_SA, message_id(request), true);
    let keys = from.sa.keys.as_ref().expect("keys");
    sk::seal(&header, payloads, &keys.sk_out, [7; 8]).expect("seal")
}

fn invalid_ke_naming(g: DhGroup) -> Payload {
    Payload::Notify(Notify::new(
        notify::INVALID_KE_PAYLOAD,
        g.id().to_be_bytes().to_vec(),
    ))
}

fn renumbered(mut p: Proposal, num: u8) -> Proposal {
    p.num = num;
    p
}

fn esp_of(c: &ChildSa) -> EspSuite {
    EspSuite {
        encr: c.encr,
        esn: c.esn,
    }
}

/// a prefers AES-256 with ESN, b AES-128 without: IKE_AUTH (a offers, b
/// chooses) makes the CHILD SA on a's second choices.
fn esp_second_choice() -> Net {
    let (mut ac, mut bc) = super::tests::pair();
    ac.esp.encr = vec![Encr::AesGcm16_256, Encr::AesGcm16_128];
    ac.esp.esn = vec![true, false];
    bc.esp.encr = vec![Encr::AesGcm16_128, Encr::AesGcm16_256];
    bc.esp.esn = vec![false, true];
    Net::up_configs(ac, bc, Policy::default())
}

const SECOND: EspSuite = EspSuite {
    encr: Encr::AesGcm16_128,
    esn: false,
};

#[test]
fn a_child_rekey_offers_the_current_suite_first_and_keeps_it() {
    let mut net = esp_second_choice();
    assert_eq!(esp_of(only_child(&net.a)), SECOND, "a's second choice");
    // b rekeys: a, choosing by its own preference from one proposal of
    // everything b allows, would move to AES-256 with ESN; the current
    // suite as first proposal keeps the SA as it is.
    let sb = only_child(&net.b).inbound_spi;
    let b = net
        .b
        .sa
        .rekey_child(sb, net.now, &mut net.b.rng)
        .expect("rekey");
    let offer = proposals(&opened(&net.a, &the_request(&b)));
    assert_eq!(offer.len(), 2, "the current suite, then everything");
    let spi = u32::from_be_bytes(offer[0].spi.as_slice().try_into().expect("spi"));
    assert_eq!(offer[0], EspAlgorithms::answer(1, spi, SECOND));
    assert_eq!(
        offer[1],
        renumbered(net.b.sa.config.esp.offer_pfs(spi, &[]), 2)
    );
    net.push(false, b);
    net.settle();
    assert_ne!(only_child(&net.b).inbound_spi, sb, "rekeyed");
    assert_eq!(esp_of(only_child(&net.a)), SECOND);
    assert_eq!(esp_of(only_child(&net.b)), SECOND);
    // a rekeys the successor: the same.
    let sa = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(sa, net.now, &mut net.a.rng)
        .expect("rekey");
    let offer = proposals(&opened(&net.b, &the_request(&a)));
    assert_eq!(
        offer[0].transforms,
        EspAlgorithms::answer(1, 0, SECOND).transforms
    );
    net.push(true, a);
    net.settle();
    assert_ne!(only_child(&net.a).inbound_spi, sa, "rekeyed");
    assert_eq!(esp_of(only_child(&net.a)), SECOND);
    assert_eq!(esp_of(only_child(&net.b)), SECOND);
    assert_eq!(net.a.sa.rekeys(), (0, 2));
    assert!(net.a.child_failed.is_empty() && net.b.child_failed.is_empty());
}

#[test]
fn a_child_rekey_keeps_its_pfs_group() {
    let a = Policy {
        pfs: vec![X, P],
        ..Policy::default()
    };
    let b = Policy {
        pfs: vec![P, X],
        ..Policy::default()
    };
    let mut net = Net::up_with(a, b);
    // The CHILD SA from IKE_AUTH has no group: a's first, which b takes
    // since it allows it.
    let sa = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(sa, net.now, &mut net.a.rng)
        .expect("rekey");
    net.push(true, a);
    net.settle();
    assert_eq!(net.a.sa.children()[0].pfs, Some(X));
    assert_eq!(net.b.sa.children()[0].pfs, Some(X));
    // b rekeys it with X first, not with its own first choice P.
    let sb = only_child(&net.b).inbound_spi;
    let b = net
        .b
        .sa
        .rekey_child(sb, net.now, &mut net.b.rng)
        .expect("rekey");
    let request = opened(&net.a, &the_request(&b));
    assert_eq!(ke_group(&request), Some(X.id()));
    let offer = proposals(&request);
    let suite = esp_of(only_child(&net.b));
    assert_eq!(
        offer[0].transforms,
        EspAlgorithms::answer_pfs(1, 0, suite, Some(X)).transforms
    );
    net.push(false, b);
    net.settle();
    assert_eq!(net.b.rng.dh.last().map(|d| d.0), Some(X));
    assert_eq!(net.a.rng.dh.last().map(|d| d.0), Some(X));
    assert_eq!(net.a.sa.children()[0].pfs, Some(X));
    assert_eq!(net.a.sa.children()[0].generation, 2);
}

/// a prefers AES-256, SHA-256 and X25519, b AES-128 and SHA-384 (and
/// allows X25519): IKE_SA_INIT makes the IKE SA on a's second ENCR and
/// PRF, with the group of a's KE payload.
fn ike_second_choice() -> (Net, IkeSuite) {
    let (mut ac, mut bc) = super::tests::pair();
    ac.ike.encr = vec![Encr::AesGcm16_256, Encr::AesGcm16_128];
    ac.ike.prf = vec![Prf::HmacSha256, Prf::HmacSha384];
    ac.ike.dh = vec![X, P];
    bc.ike.encr = vec![Encr::AesGcm16_128, Encr::AesGcm16_256];
    bc.ike.prf = vec![Prf::HmacSha384, Prf::HmacSha256];
    bc.ike.dh = vec![P, X];
    let net = Net::up_configs(ac, bc, Policy::default());
    let suite = IkeSuite {
        encr: Encr::AesGcm16_128,
        prf: Prf::HmacSha384,
        dh: X,
    };
    assert_eq!(net.a.sa.suite(), Some(suite));
    (net, suite)
}

#[test]
fn an_ike_rekey_offers_the_current_suite_first_and_keeps_it() {
    let (mut net, suite) = ike_second_choice();
    let old = net.a.sa.spis();
    let b = net.b.sa.rekey_ike(net.now, &mut net.b.rng).expect("rekey");
    let offer = proposals(&opened(&net.a, &the_request(&b)));
    assert_eq!(offer.len(), 2, "the current suite, then everything");
    let spi = u64::from_be_bytes(offer[0].spi.as_slice().try_into().expect("spi"));
    assert_eq!(offer[0], suite.answer_rekey(1, spi));
    assert_eq!(
        offer[1],
        renumbered(net.b.sa.config.ike.offer_rekey(spi), 2)
    );
    net.push(false, b);
    net.settle();
    assert_ne!(net.a.sa.spis(), old, "rekeyed");
    assert_eq!(net.a.sa.suite(), Some(suite));
    assert_eq!(net.b.sa.suite(), Some(suite));
    // And a rekey by a of the new SA.
    let a = net.a.sa.rekey_ike(net.now, &mut net.a.rng).expect("rekey");
    let offer = proposals(&opened(&net.b, &the_request(&a)));
    assert_eq!(offer[0].transforms, suite.answer(1).transforms);
    net.push(true, a);
    net.settle();
    assert_eq!((net.a.ike_rekeyed, net.b.ike_rekeyed), (2, 2));
    assert_eq!(net.a.sa.suite(), Some(suite));
    assert_eq!(net.b.sa.suite(), Some(suite));
    assert_eq!(net.a.sa.ike_rekey_failure(), None);
}

/// Section 1.3 as responder: a CHILD SA rekey whose KE group is not the
/// group we take is answered with INVALID_KE_PAYLOAD naming ours; the
/// initiator sends a new request with that group, and the new CHILD SA's
/// keys come from that exchange.
#[test]
fn a_child_rekey_retries_with_the_group_the_responder_names() {
    let a = Policy {
        pfs: vec![X, P],
        ..Policy::default()
    };
    let b = Policy {
        pfs: vec![P],
        ..Policy::default()
    };
    let mut net = Net::up_with(a, b);
    let sk_d = net.a.sa.keys.as_ref().expect("keys").ike.sk_d.clone();
    let prf = net.a.sa.suite().expect("suite").prf;
    let old = only_child(&net.a).inbound_spi;
    let (ni1, ni2, nr) = (nonce(0x51), nonce(0x52), nonce(0x53));
    net.a.rng.nonces.extend([ni1, ni2.clone()]);
    net.b.rng.nonces.push_back(nr.clone());
    let a = net
        .a
        .sa
        .rekey_child(old, net.now, &mut net.a.rng)
        .expect("rekey");
    let first = the_request(&a);
    assert_eq!(ke_group(&opened(&net.b, &first)), Some(X.id()));
    let answer = net
        .b
        .sa
        .handle(&first, net.now, &mut net.b.rng)
        .expect("answer");
    assert!(!answer.iter().any(|x| matches!(x, Action::InstallChild(_))));
    let answer = the_request(&answer);
    assert_eq!(
        invalid_ke(&opened(&net.a, &answer)),
        Some(P.id().to_be_bytes().to_vec()),
        "b names its group"
    );
    let retry = net
        .a
        .sa
        .handle(&answer, net.now, &mut net.a.rng)
        .expect("response");
    // A new request; the old SA still carries the traffic.
    let second = the_request(&retry);
    assert_eq!(retry.len(), 1, "nothing installed or deleted yet");
    assert_eq!(message_id(&second), message_id(&first) + 1);
    let request = opened(&net.b, &second);
    assert_eq!(ke_group(&request), Some(P.id()));
    assert_eq!(net.a.sa.children()[0].inbound_spi, old);
    assert_eq!(net.a.sa.children()[0].state, ChildState::Rekeying);
    assert!(net.a.installed.contains_key(&old));
    net.a.sent += 1;
    net.push(true, vec![Action::Send(second)]);
    net.settle();
    let child = only_child(&net.a);
    assert_ne!(child.inbound_spi, old);
    assert_eq!(net.a.sa.children()[0].pfs, Some(P));
    assert_eq!(net.b.rng.dh.last().map(|d| d.0), Some(P));
    let b_public = net.b.rng.last_dh().public().to_vec();
    let gir = net.a.rng.last_dh().agree(&b_public).expect("agree");
    assert_keymat(&sk_d, prf, Some(gir.expose()), &ni2, &nr, child);
    assert!(net.a.child_failed.is_empty());
    assert_eq!(net.a.sa.rekeys(), (0, 1));
}

/// A CHILD SA rekey answered with INVALID_KE_PAYLOAD naming a group we
/// did not offer (or, without PFS, any group), or the very group we sent,
/// fails at once: no second request, the old SA carries on.
#[test]
fn a_child_rekey_refused_with_a_group_it_did_not_offer_fails() {
    for (ours, named) in [(vec![X], P), (vec![X, P], X), (Vec::new(), X)] {
        let policy = Policy {
            pfs: ours,
            ..Policy::default()
        };
        let mut net = Net::up(policy);
        let old = only_child(&net.a).inbound_spi;
        let a = net
            .a
            .sa
            .rekey_child(old, net.now, &mut net.a.rng)
            .expect("rekey");
        let answer = forged_answer(&net.b, &the_request(&a), &[invalid_ke_naming(named)]);
        let after = net
            .a
            .sa
            .handle(&answer, net.now, &mut net.a.rng)
            .expect("response");
        assert!(sends(&after).is_empty(), "no second request");
        assert_eq!(
            failures_of(&after),
            vec![IkeError::PeerRefused(ErrorNotify::InvalidKePayload)]
        );
        assert!(net.a.sa.outstanding.is_none());
        assert_eq!(
            net.a.sa.children()[0].inbound_spi,
            old,
            "the old SA carries on"
        );
        assert_eq!(net.a.sa.children()[0].state, ChildState::Installed);
    }
    // Honest peers with no group in common never get that far: no
    // proposal (section 1.3: INVALID_KE_PAYLOAD names a group offered).
    let a = Policy {
        pfs: vec![X],
        ..Policy::default()
    };
    let b = Policy {
        pfs: vec![P],
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
    assert_eq!(
        net.a.child_failed,
        vec![IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
    );
    assert_eq!(only_child(&net.a).inbound_spi, old);
}

/// A peer that keeps naming another group (each one we offered) gets at
/// most MAX_KE_RETRIES new requests, then the rekey fails.
#[test]
fn a_child_rekey_retries_a_bounded_number_of_times() {
    let pfs = Policy {
        pfs: vec![X, P],
        ..Policy::default()
    };
    let mut net = Net::up(pfs);
    let old = only_child(&net.a).inbound_spi;
    let a = net
        .a
        .sa
        .rekey_child(old, net.now, &mut net.a.rng)
        .expect("rekey");
    let mut request = the_request(&a);
    let mut requests = 1;
    let last = loop {
        let sent = ke_group(&opened(&net.b, &request)).and_then(DhGroup::from_id);
        let other = if sent == Some(X) { P } else { X };
        let answer = forged_answer(&net.b, &request, &[invalid_ke_naming(other)]);
        let actions = net
            .a
            .sa
            .handle(&answer, net.now, &mut net.a.rng)
            .expect("response");
        match sends(&actions).as_slice() {
            [again] => request = again.clone(),
            [] => break actions,
            more => panic!("{} requests at once", more.len()),
        }
        requests += 1;
        assert!(requests <= 10, "no end to the retries");
    };
    assert_eq!(requests, 1 + usize::from(super::rekey::MAX_KE_RETRIES));
    assert_eq!(
        failures_of(&last),
        vec![IkeError::PeerRefused(ErrorNotify::InvalidKePayload)]
    );
    assert!(net.a.sa.outstanding.is_none());
    assert_eq!(net.a.sa.children()[0].inbound_spi, old);
    assert_eq!(net.a.sa.children()[0].state, ChildState::Installed);
}

/// b's configuration changes to allow only P while the IKE SA uses X:
/// b answers a's IKE SA rekey with INVALID_KE_PAYLOAD naming P, and a
/// rekeys again with P; the new IKE SA's keys come from the P exchange.
#[test]
fn an_ike_rekey_retries_with_the_group_the_responder_names() {
    let mut net = Net::up(Policy::default());
    assert_eq!(net.a.sa.suite().map(|s| s.dh), Some(X));
    let mut bc = (*net.b.sa.config).clone();
    bc.ike.dh = vec![P];
    net.b.sa.config = std::sync::Arc::new(bc);
    let (old_prf, old_sk_d) = (
        net.a.sa.suite().expect("suite").prf,
        net.a.sa.keys.as_ref().expect("keys").ike.sk_d.clone(),
    );
    let old_spis = net.a.sa.spis();
    let (ni1, ni2, nr) = (nonce(0x61), nonce(0x62), nonce(0x63));
    net.a.rng.nonces.extend([ni1, ni2.clone()]);
    net.b.rng.nonces.push_back(nr.clone());
    let a = net.a.sa.rekey_ike(net.now, &mut net.a.rng).expect("rekey");
    let first = the_request(&a);
    let answer = net
        .b
        .sa
        .handle(&first, net.now, &mut net.b.rng)
        .expect("answer");
    assert_eq!(answer.len(), 1, "only the answer");
    let answer = the_request(&answer);
    assert_eq!(
        invalid_ke(&opened(&net.a, &answer)),
        Some(P.id().to_be_bytes().to_vec()),
        "b names its group"
    );
    let retry = net
        .a
        .sa
        .handle(&answer, net.now, &mut net.a.rng)
        .expect("response");
    assert_eq!(retry.len(), 1, "a new request, nothing else");
    let second = the_request(&retry);
    assert_eq!(message_id(&second), message_id(&first) + 1);
    assert_eq!(net.a.sa.spis(), old_spis, "the old IKE SA carries on");
    let request = opened(&net.b, &second);
    assert_eq!(ke_group(&request), Some(P.id()));
    let offer = proposals(&request);
    let keep = IkeSuite {
        dh: P,
        ..net.a.sa.suite().expect("suite")
    };
    assert_eq!(offer[0].transforms, keep.answer(1).transforms);
    net.a.sent += 1;
    net.push(true, vec![Action::Send(second)]);
    net.settle();
    assert_eq!((net.a.ike_rekeyed, net.b.ike_rekeyed), (1, 1));
    let spis = net.a.sa.spis();
    assert_eq!(spis, net.b.sa.spis());
    assert_eq!(net.a.sa.suite(), Some(keep));
    assert_eq!(net.b.sa.suite(), Some(keep));
    assert_eq!(net.a.rng.dh.last().map(|d| d.0), Some(P));
    let gir = net
        .a
        .rng
        .last_dh()
        .agree(net.b.rng.last_dh().public())
        .expect("agree");
    let want = IkeKeys::derive_rekey(
        old_prf, &old_sk_d, keep.prf, keep.encr, &gir, &ni2, &nr, spis.0, spis.1,
    )
    .expect("derive");
    let got = &net.a.sa.keys.as_ref().expect("keys").ike;
    assert_eq!(got.sk_d, want.sk_d);
    assert_eq!(got.sk_ei, want.sk_ei);
    assert_eq!(net.b.sa.keys.as_ref().expect("keys").ike.sk_er, want.sk_er);
    assert_eq!(net.a.sa.ike_rekey_failure(), None);
    // The new IKE SA works.
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

/// An IKE SA rekey answered with INVALID_KE_PAYLOAD naming a group we did
/// not offer, or the very group we sent, fails at once; one answered so
/// again and again stops after MAX_KE_RETRIES new requests.
#[test]
fn an_ike_rekey_fails_cleanly_on_groups_it_cannot_use() {
    for (ours, named) in [(vec![X], P), (vec![X, P], X)] {
        let (mut ac, bc) = super::tests::pair();
        ac.ike.dh = ours;
        let mut net = Net::up_configs(ac, bc, Policy::default());
        let spis = net.a.sa.spis();
        let a = net.a.sa.rekey_ike(net.now, &mut net.a.rng).expect("rekey");
        let answer = forged_answer(&net.b, &the_request(&a), &[invalid_ke_naming(named)]);
        let after = net
            .a
            .sa
            .handle(&answer, net.now, &mut net.a.rng)
            .expect("response");
        assert!(after.is_empty(), "no new request, no failure of the SA");
        assert_eq!(
            net.a.sa.ike_rekey_failure(),
            Some(IkeError::PeerRefused(ErrorNotify::InvalidKePayload))
        );
        assert!(net.a.sa.outstanding.is_none());
        assert_eq!(net.a.sa.spis(), spis, "the old IKE SA carries on");
        assert_eq!(net.a.sa.status(), Status::Established);
    }
    let mut net = Net::up(Policy::default());
    let a = net.a.sa.rekey_ike(net.now, &mut net.a.rng).expect("rekey");
    let mut request = the_request(&a);
    let mut requests = 1;
    loop {
        let sent = ke_group(&opened(&net.b, &request)).and_then(DhGroup::from_id);
        let other = if sent == Some(X) { P } else { X };
        let answer = forged_answer(&net.b, &request, &[invalid_ke_naming(other)]);
        let actions = net
            .a
            .sa
            .handle(&answer, net.now, &mut net.a.rng)
            .expect("response");
        match sends(&actions).as_slice() {
            [again] => request = again.clone(),
            [] => break,
            more => panic!("{} requests at once", more.len()),
        }
        requests += 1;
        assert!(requests <= 10, "no end to the retries");
    }
    assert_eq!(requests, 1 + usize::from(super::rekey::MAX_KE_RETRIES));
    assert_eq!(
        net.a.sa.ike_rekey_failure(),
        Some(IkeError::PeerRefused(ErrorNotify::InvalidKePayload))
    );
    assert!(net.a.sa.outstanding.is_none());
    assert_eq!(net.a.ike_rekeyed, 0);
}
