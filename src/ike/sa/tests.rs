//! Whole exchanges between an initiator and a responder in memory.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::ike::crypto::tests::TestRandomness;
use crate::ike::crypto::{DhGroup, Encr, Prf};
use crate::ike::sk;
use crate::ike::wire::consts::{exchange as ex, id, notify, payload as pty};
use crate::ike::wire::{Message, Payload};

const I_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const R_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));

pub(super) fn config(local: IpAddr, remote: IpAddr, psk: &[u8]) -> Config {
    Config {
        local_id: Identification::new(id::FQDN, format!("{local}.example").into_bytes()),
        remote_id: Some(Identification::new(
            id::FQDN,
            format!("{remote}.example").into_bytes(),
        )),
        psk: Zeroizing::new(psk.to_vec()),
        ike: IkeAlgorithms::default(),
        esp: EspAlgorithms::default(),
        local_addr: local,
        remote_addr: remote,
        retransmit: Retransmit::default(),
    }
}

/// Two matching configurations (initiator, responder), also for tests
/// elsewhere in `ike`.
pub(crate) fn pair() -> (Config, Config) {
    (
        config(I_ADDR, R_ADDR, b"shared secret"),
        config(R_ADDR, I_ADDR, b"shared secret"),
    )
}

/// Both ends and their generators; `now` is shared.
pub(super) struct Lab {
    pub(super) i: IkeSa,
    pub(super) r: IkeSa,
    pub(super) ri: TestRandomness,
    rr: TestRandomness,
    pub(super) now: Instant,
    /// Every action either side produced, in order.
    pub(super) i_actions: Vec<Action>,
    pub(super) r_actions: Vec<Action>,
}

pub(super) fn sends(actions: &[Action]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn failures(actions: &[Action]) -> Vec<IkeError> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Failed(e) | Action::ChildFailed(e) => Some(*e),
            _ => None,
        })
        .collect()
}

pub(super) fn child(actions: &[Action]) -> Option<&ChildSa> {
    let mut c = actions.iter().filter_map(|a| match a {
        Action::InstallChild(c) => Some(c),
        _ => None,
    });
    let first = c.next();
    assert!(c.next().is_none(), "one CHILD SA at most");
    first
}

impl Lab {
    /// Starts the initiator; its first request is returned, not delivered.
    pub(super) fn start(ic: Config, rc: Config) -> (Self, Vec<Vec<u8>>) {
        let mut ri = TestRandomness::new(b"initiator");
        let now = Instant::now();
        let (i, actions) = IkeSa::initiate(Arc::new(ic), now, &mut ri).expect("initiate");
        let out = sends(&actions);
        let lab = Lab {
            i,
            r: IkeSa::responder(Arc::new(rc)),
            ri,
            rr: TestRandomness::new(b"responder"),
            now,
            i_actions: actions,
            r_actions: Vec::new(),
        };
        (lab, out)
    }

    pub(super) fn deliver_to_responder(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>, IkeError> {
        let a = self.r.handle(msg, self.now, &mut self.rr)?;
        let out = sends(&a);
        self.r_actions.extend(a);
        Ok(out)
    }

    pub(super) fn deliver_to_initiator(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>, IkeError> {
        let a = self.i.handle(msg, self.now, &mut self.ri)?;
        let out = sends(&a);
        self.i_actions.extend(a);
        Ok(out)
    }

    /// Delivers everything both ways until nobody has anything to send.
    pub(super) fn run(&mut self, mut to_r: Vec<Vec<u8>>) {
        for _ in 0..10 {
            let mut to_i = Vec::new();
            for m in to_r.drain(..) {
                to_i.extend(self.deliver_to_responder(&m).unwrap_or_default());
            }
            for m in to_i {
                to_r.extend(self.deliver_to_initiator(&m).unwrap_or_default());
            }
            if to_r.is_empty() {
                return;
            }
        }
        panic!("the exchange did not settle");
    }

    /// The initiator's and responder's CHILD SAs, which must exist.
    fn children(&self) -> (&ChildSa, &ChildSa) {
        (
            child(&self.i_actions).expect("initiator CHILD SA"),
            child(&self.r_actions).expect("responder CHILD SA"),
        )
    }
}

pub(super) fn assert_matching(i: &ChildSa, r: &ChildSa) {
    assert_eq!(i.outbound_spi, r.inbound_spi);
    assert_eq!(i.inbound_spi, r.outbound_spi);
    assert_eq!(i.outbound.key().expose(), r.inbound.key().expose());
    assert_eq!(i.outbound.salt(), r.inbound.salt());
    assert_eq!(i.inbound.key().expose(), r.outbound.key().expose());
    assert_eq!(i.inbound.salt(), r.outbound.salt());
    assert_ne!(i.inbound.key().expose(), i.outbound.key().expose());
    assert_eq!((i.encr, i.esn), (r.encr, r.esn));
    assert!(i.transport_mode && r.transport_mode);
    assert_eq!(i.local_ts, r.remote_ts);
    assert_eq!(i.remote_ts, r.local_ts);
    assert!(i.inbound_spi > 255 && i.outbound_spi > 255);
}

/// Section 2.17, checked from outside: KEYMAT = prf+(SK_d, Ni | Nr) with
/// the nonces as they went over the wire, and the initiator's outbound key
/// first. (Both ends share the code that derives it; this pins the order.)
fn assert_keymat_from_the_wire(lab: &Lab, request: &[u8], i: &ChildSa) {
    let nonce = |bytes: &[u8]| {
        Message::parse(bytes)
            .expect("parse")
            .payloads
            .into_iter()
            .find_map(|p| match p {
                Payload::Nonce(n) => Some(n),
                _ => None,
            })
            .expect("nonce")
    };
    let ni = nonce(request);
    let nr = nonce(&lab.r.init_response);
    let keys = lab.i.keys.as_ref().expect("keys");
    let prf = lab.i.suite().expect("suite").prf;
    let e = i.encr.material_len();
    let km = prf
        .prf_plus(&keys.ike.sk_d, &[&ni, &nr], 2 * e)
        .expect("prf+");
    let k = i.encr.key_len();
    assert_eq!(i.outbound.key().expose(), &km[..k]);
    assert_eq!(i.outbound.salt(), &km[k..e]);
    assert_eq!(i.inbound.key().expose(), &km[e..e + k]);
}

#[test]
fn full_exchange_for_every_algorithm() {
    for dh in [DhGroup::Curve25519, DhGroup::Ecp256] {
        for prf in [Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512] {
            for (encr, esn) in [(Encr::AesGcm16_128, false), (Encr::AesGcm16_256, true)] {
                let (mut ic, mut rc) = pair();
                // The responder narrows; the initiator offers everything.
                rc.ike = IkeAlgorithms {
                    encr: vec![encr],
                    prf: vec![prf],
                    dh: vec![dh],
                };
                rc.esp = EspAlgorithms {
                    encr: vec![encr],
                    esn: vec![esn],
                };
                ic.ike.dh = vec![dh];
                let (mut lab, first) = Lab::start(ic, rc);
                let request = first[0].clone();
                lab.run(first);
                assert_eq!(lab.i.status(), Status::Established);
                assert_eq!(lab.r.status(), Status::Established);
                assert_eq!(lab.i.suite(), lab.r.suite());
                assert_eq!(lab.i.spis(), lab.r.spis());
                let (i, r) = lab.children();
                assert_matching(i, r);
                assert_eq!((i.encr, i.esn), (encr, esn));
                assert_eq!(i.outbound.key().expose().len(), encr.key_len());
                assert!(failures(&lab.i_actions).is_empty() && failures(&lab.r_actions).is_empty());
                assert_eq!(lab.i.next_timeout(), None, "nothing left to retransmit");
                assert_keymat_from_the_wire(&lab, &request, i);
            }
        }
    }
}

#[test]
fn ipv6_hosts() {
    let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    let b = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
    let (mut lab, first) = Lab::start(config(a, b, b"k"), config(b, a, b"k"));
    lab.run(first);
    let (i, r) = lab.children();
    assert_matching(i, r);
    assert_eq!(i.local_ts, vec![TrafficSelector::host(a)]);
}

#[test]
fn wrong_psk_fails_on_both_sides() {
    let (ic, _) = pair();
    let rc = config(R_ADDR, I_ADDR, b"another secret");
    let (mut lab, first) = Lab::start(ic, rc);
    lab.run(first);
    assert_eq!(
        failures(&lab.r_actions),
        vec![IkeError::WeRefused(ErrorNotify::AuthenticationFailed)]
    );
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::AuthenticationFailed)]
    );
    assert_eq!(
        (lab.i.status(), lab.r.status()),
        (Status::Closed, Status::Closed)
    );
    assert!(child(&lab.i_actions).is_none() && child(&lab.r_actions).is_none());
}

#[test]
fn wrong_identity_fails_authentication() {
    let (ic, mut rc) = pair();
    rc.remote_id = Some(Identification::new(id::FQDN, b"someone.else".to_vec()));
    let (mut lab, first) = Lab::start(ic, rc);
    lab.run(first);
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::AuthenticationFailed)]
    );
    // And the initiator checks the responder's identity too.
    let (mut ic, rc) = pair();
    ic.remote_id = Some(Identification::new(id::FQDN, b"someone.else".to_vec()));
    let (mut lab, first) = Lab::start(ic, rc);
    lab.run(first);
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::WeRefused(ErrorNotify::AuthenticationFailed)]
    );
    assert_eq!(lab.i.status(), Status::Closed);
    // It said so in an INFORMATIONAL request (section 2.21.2).
    let last = sends(&lab.i_actions).pop().expect("informational");
    assert_eq!(last[18], ex::INFORMATIONAL);
}

#[test]
fn no_common_proposal() {
    let (mut ic, mut rc) = pair();
    ic.ike.dh = vec![DhGroup::Ecp256];
    rc.ike.dh = vec![DhGroup::Curve25519];
    let (mut lab, first) = Lab::start(ic, rc);
    lab.run(first);
    assert_eq!(
        failures(&lab.r_actions),
        vec![IkeError::WeRefused(ErrorNotify::NoProposalChosen)]
    );
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
    );
    assert_eq!(lab.i.status(), Status::Closed);
}

#[test]
fn no_common_esp_proposal_leaves_the_ike_sa_up() {
    let (mut ic, mut rc) = pair();
    ic.esp.encr = vec![Encr::AesGcm16_128];
    rc.esp.encr = vec![Encr::AesGcm16_256];
    let (mut lab, first) = Lab::start(ic, rc);
    lab.run(first);
    assert_eq!(
        (lab.i.status(), lab.r.status()),
        (Status::Established, Status::Established)
    );
    assert_eq!(
        failures(&lab.r_actions),
        vec![IkeError::WeRefused(ErrorNotify::NoProposalChosen)]
    );
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
    );
}

#[test]
fn selectors_not_covering_the_hosts_are_refused() {
    let (ic, _) = pair();
    let other = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 9));
    let rc = config(R_ADDR, other, b"shared secret");
    let (mut lab, first) = Lab::start(ic, rc);
    // Its remote ID no longer matches the initiator's; accept any.
    let mut rc = (*lab.r.config).clone();
    rc.remote_id = None;
    lab.r.config = Arc::new(rc);
    lab.run(first);
    assert_eq!(
        failures(&lab.r_actions),
        vec![IkeError::WeRefused(ErrorNotify::TsUnacceptable)]
    );
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::TsUnacceptable)]
    );
}

#[test]
fn invalid_ke_payload_retry() {
    let (mut ic, mut rc) = pair();
    ic.ike.dh = vec![DhGroup::Curve25519, DhGroup::Ecp256];
    rc.ike.dh = vec![DhGroup::Ecp256];
    let (mut lab, first) = Lab::start(ic, rc);
    let answer = lab.deliver_to_responder(&first[0]).expect("answer");
    let m = Message::parse(&answer[0]).expect("parse");
    assert_eq!(m.header.spi_r, 0, "stateless");
    assert_eq!(
        m.payloads,
        vec![Payload::Notify(Notify::new(
            notify::INVALID_KE_PAYLOAD,
            19u16.to_be_bytes().to_vec()
        ))]
    );
    assert_eq!(lab.r.status(), Status::Connecting);
    let retry = lab.deliver_to_initiator(&answer[0]).expect("retry");
    let m = Message::parse(&retry[0]).expect("parse");
    assert_eq!(m.header.message_id, 0);
    assert!(
        m.payloads
            .iter()
            .any(|p| matches!(p, Payload::Ke(k) if k.group == 19 && k.data.len() == 64))
    );
    lab.run(retry);
    let (i, r) = lab.children();
    assert_matching(i, r);
    assert_eq!(lab.i.suite().map(|s| s.dh), Some(DhGroup::Ecp256));
}

#[test]
fn invalid_ke_payload_for_a_group_we_did_not_offer() {
    let (mut ic, mut rc) = pair();
    ic.ike.dh = vec![DhGroup::Curve25519];
    rc.ike.dh = vec![DhGroup::Ecp256, DhGroup::Curve25519];
    let (mut lab, first) = Lab::start(ic, rc);
    let answer = lab.deliver_to_responder(&first[0]).expect("answer");
    // The responder takes the offered KE group it allows: no retry.
    assert_eq!(Message::parse(&answer[0]).expect("parse").payloads.len(), 3);
    // A forged INVALID_KE naming a group we did not offer ends the SA.
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let req = Message::parse(&first[0]).expect("parse");
    let forged = Message {
        header: Header {
            flags: flags::RESPONSE,
            ..req.header
        },
        payloads: vec![Payload::Notify(Notify::new(
            notify::INVALID_KE_PAYLOAD,
            14u16.to_be_bytes().to_vec(),
        ))],
    }
    .emit()
    .expect("emit");
    lab.deliver_to_initiator(&forged).expect("handled");
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::InvalidKePayload)]
    );
}

#[test]
fn retransmission_backs_off_and_gives_up() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let t0 = lab.now;
    let mut at = t0;
    let mut waits = Vec::new();
    loop {
        let due = lab.i.next_timeout().expect("timer");
        assert!(
            lab.i
                .handle_timeout(due - Duration::from_millis(1))
                .is_empty(),
            "early"
        );
        waits.push(due - at);
        at = due;
        let a = lab.i.handle_timeout(due);
        if let [Action::Failed(e)] = a.as_slice() {
            assert_eq!(*e, IkeError::Timeout);
            break;
        }
        assert_eq!(sends(&a), first, "the same bytes again");
    }
    let s = Duration::from_secs;
    assert_eq!(waits, vec![s(2), s(4), s(8), s(16), s(32), s(32)]);
    assert_eq!(lab.i.status(), Status::Closed);
    assert_eq!(lab.i.next_timeout(), None);
}

#[test]
fn duplicate_requests_get_the_cached_response() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let spis = lab.r.spis();
    let b = lab.deliver_to_responder(&first[0]).expect("init again");
    assert_eq!(a, b, "byte for byte");
    assert_eq!(lab.r.spis(), spis, "processed once");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    // The IKE_AUTH response is lost: the initiator retransmits.
    let lost = lab.deliver_to_responder(&auth[0]).expect("response");
    let due = lab.i.next_timeout().expect("timer");
    let again = sends(&lab.i.handle_timeout(due));
    assert_eq!(again, auth);
    let cached = lab.deliver_to_responder(&again[0]).expect("cached");
    assert_eq!(cached, lost);
    let installs = lab
        .r_actions
        .iter()
        .filter(|a| matches!(a, Action::InstallChild(_)));
    assert_eq!(
        installs.count(),
        1,
        "the retransmitted request was not processed again"
    );
    lab.deliver_to_initiator(&cached[0]).expect("established");
    let (i, r) = lab.children();
    assert_matching(i, r);
    // The duplicate response finds nothing outstanding.
    assert_eq!(
        lab.deliver_to_initiator(&lost[0]),
        Err(IkeError::Unexpected("no request outstanding"))
    );
    // A different request with a used message ID is dropped.
    let mut other = auth[0].clone();
    let n = other.len();
    other[n - 1] ^= 1;
    assert!(lab.deliver_to_responder(&other).is_err());
}

#[test]
fn tampered_messages_are_dropped_without_effect() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    let mut bad = auth[0].clone();
    bad[40] ^= 0x80;
    assert!(matches!(
        lab.deliver_to_responder(&bad),
        Err(IkeError::Protected(_))
    ));
    assert_eq!(lab.r.status(), Status::Connecting);
    let resp = lab.deliver_to_responder(&auth[0]).expect("real one");
    let mut bad = resp[0].clone();
    bad[20] ^= 1; // message ID
    assert!(lab.deliver_to_initiator(&bad).is_err());
    lab.deliver_to_initiator(&resp[0]).expect("established");
    assert_eq!(lab.i.status(), Status::Established);
}

/// Opens a protected message with the sender's outbound key, lets `edit`
/// change its payloads, and seals it again as the sender would.
pub(super) fn reseal(sender: &IkeSa, msg: &[u8], edit: impl FnOnce(&mut Vec<Payload>)) -> Vec<u8> {
    let keys = sender.keys.as_ref().expect("keys");
    let suite = sender.suite.expect("suite");
    let material = if sender.role == Role::Initiator {
        &keys.ike.sk_ei
    } else {
        &keys.ike.sk_er
    };
    let peer_key = sk::SkKey::new(suite.encr, material).expect("key");
    let mut opened = sk::open(msg, &peer_key).expect("open");
    edit(&mut opened.inner);
    sk::seal(&opened.header, &opened.inner, &keys.sk_out, [9; 8]).expect("seal")
}

#[test]
fn notify_order_and_idr_in_the_request_do_not_matter() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    // Request: notifies last, TS before SA, and an IDr naming the responder.
    let idr = Identification::new(id::FQDN, b"198.18.0.2.example".to_vec());
    let req = reseal(&lab.i, &auth[0], |p| {
        p.sort_by_key(|x| {
            (
                x.ty() == pty::NOTIFY,
                x.ty() != pty::TSI && x.ty() != pty::TSR,
            )
        });
        p.insert(1, Payload::IdR(idr));
    });
    let resp = lab.deliver_to_responder(&req).expect("response");
    // Response: notifies first.
    let resp = reseal(&lab.r, &resp[0], |p| {
        p.sort_by_key(|x| x.ty() != pty::NOTIFY)
    });
    lab.deliver_to_initiator(&resp).expect("established");
    let (i, r) = lab.children();
    assert_matching(i, r);
}

#[test]
fn tunnel_mode_request_gets_no_child() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    let req = reseal(&lab.i, &auth[0], |p| {
        p.retain(|x| !matches!(x, Payload::Notify(n) if n.ty == notify::USE_TRANSPORT_MODE))
    });
    let resp = lab.deliver_to_responder(&req).expect("response");
    assert_eq!(
        failures(&lab.r_actions),
        vec![IkeError::WeRefused(ErrorNotify::NoProposalChosen)]
    );
    lab.deliver_to_initiator(&resp[0]).expect("handled");
    assert_eq!(lab.i.status(), Status::Established);
    assert!(child(&lab.i_actions).is_none());
}

#[test]
fn secrets_are_not_in_debug_output() {
    let (ic, rc) = pair();
    let text = format!("{ic:?}");
    assert!(
        !text.contains("shared secret") && !text.contains("115, 104, 97"),
        "{text}"
    );
    let (mut lab, first) = Lab::start(ic, rc);
    lab.run(first);
    let (i, _) = lab.children();
    let text = format!("{i:?} {:?}", lab.i);
    let key = format!("{:?}", i.outbound.key().expose());
    assert!(!text.contains(&key[1..key.len() - 1]), "{text}");
}

#[test]
fn cookie_request_is_honoured() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let req = Message::parse(&first[0]).expect("parse");
    // A responder under load answers with a cookie (section 2.6).
    let cookie = Message {
        header: Header {
            flags: flags::RESPONSE,
            ..req.header
        },
        payloads: vec![Payload::Notify(Notify::new(notify::COOKIE, vec![0xc0; 16]))],
    }
    .emit()
    .expect("emit");
    let retry = lab.deliver_to_initiator(&cookie).expect("retry");
    let m = Message::parse(&retry[0]).expect("parse");
    assert_eq!(m.header.message_id, 0);
    assert_eq!(
        m.payloads[0],
        Payload::Notify(Notify::new(notify::COOKIE, vec![0xc0; 16])),
        "the cookie comes first"
    );
    assert_eq!(&m.payloads[1..], &req.payloads[..], "same offer, KE and Ni");
    // AUTH then signs the request with the cookie, on both sides.
    lab.run(retry);
    let (i, r) = lab.children();
    assert_matching(i, r);
}

/// Every single-byte change of each message is survived without panic;
/// the protected ones are all dropped, and the real message still works.
#[test]
fn every_byte_flip_of_each_message_is_survived() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic.clone(), rc.clone());
    for i in 0..first[0].len() {
        let mut r = IkeSa::responder(Arc::new(rc.clone()));
        let mut m = first[0].clone();
        m[i] ^= 0x55;
        let _ = r.handle(&m, lab.now, &mut lab.rr);
    }
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    for i in 0..a[0].len() {
        let (mut other, req) = Lab::start(ic.clone(), rc.clone());
        assert_eq!(req, first, "the test generator is deterministic");
        let mut m = a[0].clone();
        m[i] ^= 0x55;
        let _ = other.deliver_to_initiator(&m);
    }
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    for i in 0..auth[0].len() {
        let mut m = auth[0].clone();
        m[i] ^= 0x55;
        assert!(lab.deliver_to_responder(&m).is_err(), "byte {i}");
    }
    assert!(
        lab.r_actions.len() == 1,
        "nothing but the IKE_SA_INIT answer"
    );
    let resp = lab.deliver_to_responder(&auth[0]).expect("response");
    for i in 0..resp[0].len() {
        let mut m = resp[0].clone();
        m[i] ^= 0x55;
        assert!(lab.deliver_to_initiator(&m).is_err(), "byte {i}");
    }
    lab.deliver_to_initiator(&resp[0]).expect("established");
    let (i, r) = lab.children();
    assert_matching(i, r);
}

#[test]
fn unsolicited_and_misdirected_messages_are_dropped() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    // A request sent back to its sender (wrong I flag).
    assert_eq!(
        lab.deliver_to_initiator(&first[0]),
        Err(IkeError::Unexpected("wrong Initiator flag"))
    );
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    // The answer with another initiator SPI.
    let mut m = a[0].clone();
    m[0] ^= 1;
    assert_eq!(
        lab.deliver_to_initiator(&m),
        Err(IkeError::Unexpected("unknown initiator SPI"))
    );
    // Garbage and empty input.
    assert!(lab.deliver_to_responder(&[]).is_err());
    assert!(lab.deliver_to_responder(&[0u8; 100]).is_err());
    assert_eq!(lab.i.status(), Status::Connecting);
}

#[test]
fn authenticated_but_malformed_request_gets_invalid_syntax() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    let req = reseal(&lab.i, &auth[0], |p| {
        let ts = p.iter().find(|x| x.ty() == pty::TSI).cloned().expect("TSi");
        p.push(ts);
    });
    let resp = lab.deliver_to_responder(&req).expect("response");
    lab.deliver_to_initiator(&resp[0]).expect("handled");
    assert_eq!(
        failures(&lab.r_actions),
        vec![IkeError::WeRefused(ErrorNotify::InvalidSyntax)]
    );
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::InvalidSyntax)]
    );
    assert_eq!(
        (lab.i.status(), lab.r.status()),
        (Status::Closed, Status::Closed)
    );
}

#[test]
fn unsupported_critical_payloads_are_answered() {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    // In IKE_SA_INIT: splice a critical payload of type 200 in front.
    let mut m = first[0].clone();
    let next = m[16];
    m[16] = 200;
    m.splice(28..28, [next, 0x80, 0, 4]);
    let len = m.len() as u32;
    m[24..28].copy_from_slice(&len.to_be_bytes());
    let answer = lab.deliver_to_responder(&m).expect("answer");
    assert_eq!(
        Message::parse(&answer[0]).expect("parse").payloads,
        vec![Payload::Notify(Notify::new(
            notify::UNSUPPORTED_CRITICAL_PAYLOAD,
            vec![200]
        ))]
    );
    assert_eq!(lab.r.status(), Status::Connecting, "stateless");
    // In IKE_AUTH, inside the Encrypted payload.
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    let keys = lab.i.keys.as_ref().expect("keys");
    let opened = sk::open(
        &auth[0],
        &sk::SkKey::new(lab.i.suite().expect("s").encr, &keys.ike.sk_ei).expect("k"),
    )
    .expect("open");
    let mut pt = Vec::new();
    let first_inner = crate::ike::wire::chain::emit(&opened.inner, &mut pt).expect("emit");
    let mut critical = vec![first_inner, 0x80, 0, 4];
    critical.extend_from_slice(&pt);
    critical.push(0);
    let req =
        sk::seal_plaintext(&opened.header, 201, &critical, &keys.sk_out, [3; 8]).expect("seal");
    let resp = lab.deliver_to_responder(&req).expect("response");
    assert_eq!(
        failures(&lab.r_actions),
        vec![IkeError::WeRefused(ErrorNotify::Other(
            notify::UNSUPPORTED_CRITICAL_PAYLOAD
        ))]
    );
    lab.deliver_to_initiator(&resp[0]).expect("handled");
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::Other(
            notify::UNSUPPORTED_CRITICAL_PAYLOAD
        ))]
    );
}

#[test]
fn short_nonce_for_the_prf_is_refused() {
    let (mut ic, mut rc) = pair();
    ic.ike.prf = vec![Prf::HmacSha512];
    rc.ike.prf = vec![Prf::HmacSha512];
    let (mut lab, first) = Lab::start(ic, rc);
    // Replace the 32-byte Ni by a 16-byte one: enough for the wire, not
    // for HMAC-SHA-512's 64-byte key.
    let mut m = Message::parse(&first[0]).expect("parse");
    for p in &mut m.payloads {
        if let Payload::Nonce(n) = p {
            n.truncate(16);
        }
    }
    let short = m.emit().expect("emit");
    assert_eq!(
        lab.deliver_to_responder(&short),
        Err(IkeError::Wire(WireError::Invalid(
            "nonce shorter than half the PRF key"
        )))
    );
    assert_eq!(lab.r.status(), Status::Connecting);
    lab.run(first);
    assert_eq!(lab.i.status(), Status::Established);
}
