//! Rekeys offer the current suite first (RFC 7296 1.3.2, 1.3.3, 2.8); INVALID_KE_PAYLOAD retries.

use super::tests::sends;
use super::tests_harness::{Net, Party};
use super::tests_rekey::{assert_keymat, failures_of, nonce, only_child};
use super::*;
use crate::ike::crypto::{DhGroup, Encr, Prf};
use crate::ike::proposal::{EspAlgorithms, EspSuite, IkeSuite};
use crate::ike::sk;
use crate::ike::wire::consts::{exchange, notify};
use crate::ike::wire::sa_payload::Proposal;

const X: DhGroup = DhGroup::Curve25519;
const P: DhGroup = DhGroup::Ecp256;

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
