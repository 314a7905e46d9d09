//! NAT traversal (RFC 7296 section 2.23, RFC 3948) through the
//! address-aware entry points: the detection hashes, the move to port
//! 4500, UDP-encapsulated CHILD SAs, peer moves and keepalives.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tests::config;
use super::*;
use crate::ike::crypto::tests::TestRandomness;
use crate::ike::wire::Message;
use crate::ike::wire::consts::notify;

const I: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const R: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
/// The initiator's NAT, as the responder sees it.
const NAT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1));

fn at(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The one datagram in `out`, with its route.
fn sent(out: &[Output]) -> (Vec<u8>, Route) {
    let mut s = out.iter().filter_map(|o| match o {
        Output::Send { bytes, route } => Some((bytes.clone(), *route)),
        _ => None,
    });
    let one = s.next().expect("a datagram");
    assert!(s.next().is_none(), "one datagram");
    one
}

fn installed(out: &[Output]) -> &ChildSa {
    out.iter()
        .find_map(|o| match o {
            Output::Act(Action::InstallChild(c)) => Some(c),
            _ => None,
        })
        .expect("a CHILD SA")
}

fn moved(out: &[Output]) -> Vec<SocketAddr> {
    out.iter()
        .filter_map(|o| match o {
            Output::PeerMoved(a) => Some(*a),
            _ => None,
        })
        .collect()
}

fn notify_data(bytes: &[u8], ty: u16) -> Vec<Vec<u8>> {
    Message::parse(bytes)
        .expect("parses")
        .payloads
        .into_iter()
        .filter_map(|p| match p {
            Payload::Notify(n) if n.ty == ty => Some(n.data),
            _ => None,
        })
        .collect()
}

/// Computed with Python's hashlib, independently of ring:
/// `sha1(pack('>QQ', spi_i, spi_r) + inet_pton(ip) + pack('>H', port))`.
#[test]
fn natd_hash_matches_an_independent_computation() {
    let v4 = natd_hash(
        0x0123_4567_89ab_cdef,
        0,
        "192.0.2.1:500".parse().expect("addr"),
    );
    assert_eq!(hex(&v4), "9426429034924268452f8e3ff79fb69e2a8d71eb");
    let v6 = natd_hash(
        0x0123_4567_89ab_cdef,
        0xfedc_ba98_7654_3210,
        "[2001:db8::1]:4500".parse().expect("addr"),
    );
    assert_eq!(hex(&v6), "9de8bfefaab479f0d5a5609a6de20595c6307502");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Lab {
    i: IkeSa,
    r: IkeSa,
    ri: TestRandomness,
    rr: TestRandomness,
    now: Instant,
}

/// IKE_SA_INIT: the initiator at `i_local` sends to `R:500`; the
/// responder sees the request arrive at `r_local` from `seen_from`.
fn init(
    ic: Config,
    rc: Config,
    i_local: SocketAddr,
    r_local: SocketAddr,
    seen_from: SocketAddr,
) -> (Lab, Vec<u8>, Route) {
    let now = Instant::now();
    let mut ri = TestRandomness::new(b"nat i");
    let mut rr = TestRandomness::new(b"nat r");
    let (i, out) = IkeSa::initiate_from(
        Arc::new(ic),
        i_local,
        at(R, 500),
        NatPolicy::default(),
        now,
        &mut ri,
    )
    .expect("initiate");
    let (request, route) = sent(&out);
    assert_eq!(
        route,
        Route {
            to: at(R, 500),
            natt: false
        }
    );
    // Section 2.23: SPIr is zero in the first request's hashes.
    let spi_i = i.spis().0;
    assert_eq!(
        notify_data(&request, notify::NAT_DETECTION_SOURCE_IP),
        vec![natd_hash(spi_i, 0, i_local).to_vec()]
    );
    assert_eq!(
        notify_data(&request, notify::NAT_DETECTION_DESTINATION_IP),
        vec![natd_hash(spi_i, 0, at(R, 500)).to_vec()]
    );
    let mut r = IkeSa::responder(Arc::new(rc));
    r.set_nat_policy(NatPolicy::default());
    let out = r
        .handle_from(&request, r_local, seen_from, now, &mut rr)
        .expect("request");
    let (response, route) = sent(&out);
    assert_eq!(
        route,
        Route {
            to: seen_from,
            natt: false
        },
        "the answer goes where the request came from"
    );
    let spis = r.spis();
    assert_eq!(
        notify_data(&response, notify::NAT_DETECTION_SOURCE_IP),
        vec![natd_hash(spis.0, spis.1, r_local).to_vec()]
    );
    let lab = Lab { i, r, ri, rr, now };
    (lab, response, route)
}

#[test]
fn initiator_behind_a_nat_moves_to_4500_and_encapsulates() {
    // The responder knows the initiator by its NAT's address, and by the
    // identity it always had.
    let mut rc = config(R, NAT, b"k");
    rc.remote_id = config(R, I, b"k").remote_id;
    let (mut lab, response, _) = init(
        config(I, R, b"k"),
        rc,
        at(I, 500),
        at(R, 500),
        at(NAT, 61000),
    );
    let peer_behind = NatStatus {
        supported: true,
        local_behind: false,
        peer_behind: true,
    };
    assert_eq!(lab.r.nat(), peer_behind);
    let out = lab
        .i
        .handle_from(&response, at(I, 500), at(R, 500), lab.now, &mut lab.ri)
        .expect("response");
    assert_eq!(
        lab.i.nat(),
        NatStatus {
            supported: true,
            local_behind: true,
            peer_behind: false
        }
    );
    assert!(lab.i.use_natt() && lab.r.use_natt());
    // Section 2.23: IKE_AUTH already goes to port 4500.
    let (auth, route) = sent(&out);
    let natt = |to| Route { to, natt: true };
    assert_eq!(route, natt(at(R, 4500)));
    // The NAT maps the initiator's port 4500 anew.
    let out = lab
        .r
        .handle_from(&auth, at(R, 4500), at(NAT, 61001), lab.now, &mut lab.rr)
        .expect("IKE_AUTH");
    assert_eq!(moved(&out), vec![at(NAT, 61001)]);
    let (answer, route) = sent(&out);
    assert_eq!(route, natt(at(NAT, 61001)));
    let rc = installed(&out);
    assert_eq!(rc.udp_encap, Some(at(NAT, 61001)));
    // Transport mode: the initiator's own address is in its TSi.
    assert_eq!(rc.original, OriginalAddrs { local: R, peer: I });
    assert_eq!(lab.r.route(), Some(natt(at(NAT, 61001))));
    let out = lab
        .i
        .handle_from(&answer, at(I, 4500), at(R, 4500), lab.now, &mut lab.ri)
        .expect("IKE_AUTH response");
    assert!(moved(&out).is_empty());
    let ic = installed(&out);
    assert_eq!(ic.udp_encap, Some(at(R, 4500)));
    assert_eq!(ic.original, OriginalAddrs { local: I, peer: R });
    assert_eq!(lab.i.status(), Status::Established);
    assert_eq!(lab.r.status(), Status::Established);

    // RFC 3948 section 4: only the side behind the NAT keeps it open.
    let later = lab.now + Duration::from_secs(20);
    assert_eq!(lab.i.next_timeout(), Some(later));
    let out = lab.i.handle_timer_from(later, &mut lab.ri);
    assert!(matches!(out.as_slice(), [Output::SendKeepalive(r)] if *r == natt(at(R, 4500))));
    assert_eq!(lab.i.next_timeout(), Some(later + Duration::from_secs(20)));
    assert_eq!(lab.r.next_timeout(), None);
    let out = lab.r.handle_timer_from(later, &mut lab.rr);
    assert!(out.is_empty());

    // The NAT's mapping changes: an authenticated request moves the peer.
    let check = lab.i.check_liveness(later, &mut lab.ri).expect("liveness");
    let (request, route) = sent(&lab.i.outputs(check));
    assert_eq!(route, natt(at(R, 4500)));
    let out = lab
        .r
        .handle_from(&request, at(R, 4500), at(NAT, 62000), later, &mut lab.rr)
        .expect("INFORMATIONAL");
    assert_eq!(moved(&out), vec![at(NAT, 62000)]);
    assert_eq!(sent(&out).1, natt(at(NAT, 62000)));
    // The same request replayed from elsewhere is answered there, but
    // moves nothing.
    let out = lab
        .r
        .handle_from(&request, at(R, 4500), at(NAT, 63000), later, &mut lab.rr)
        .expect("retransmission");
    assert!(moved(&out).is_empty());
    assert_eq!(sent(&out).1, natt(at(NAT, 63000)));
    assert_eq!(lab.r.route(), Some(natt(at(NAT, 62000))));
}

#[test]
fn no_nat_stays_on_500_without_encapsulation() {
    let (mut lab, response, _) = init(
        config(I, R, b"k"),
        config(R, I, b"k"),
        at(I, 500),
        at(R, 500),
        at(I, 500),
    );
    let out = lab
        .i
        .handle_from(&response, at(I, 500), at(R, 500), lab.now, &mut lab.ri)
        .expect("response");
    let none = NatStatus {
        supported: true,
        ..NatStatus::default()
    };
    assert_eq!((lab.i.nat(), lab.r.nat()), (none, none));
    let (auth, route) = sent(&out);
    assert_eq!(
        route,
        Route {
            to: at(R, 500),
            natt: false
        }
    );
    // Without a NAT a new address moves nothing (section 2.23 moves only
    // through a NAT).
    let out = lab
        .r
        .handle_from(&auth, at(R, 500), at(I, 501), lab.now, &mut lab.rr)
        .expect("IKE_AUTH");
    assert!(moved(&out).is_empty());
    assert_eq!(installed(&out).udp_encap, None);
    let (answer, _) = sent(&out);
    let out = lab
        .i
        .handle_from(&answer, at(I, 500), at(R, 500), lab.now, &mut lab.ri)
        .expect("IKE_AUTH response");
    let c = installed(&out);
    assert_eq!(
        (c.udp_encap, c.original),
        (None, OriginalAddrs { local: I, peer: R })
    );
    assert_eq!(lab.i.next_timeout(), None, "no keepalives");
}

/// strongSwan's `encap = yes` fakes its source hash to force UDP
/// encapsulation; a responder whose address a NAT rewrote looks the same.
#[test]
fn a_faked_source_hash_still_moves_ike_and_esp_to_4500() {
    let fake = at(IpAddr::V4(Ipv4Addr::new(198, 18, 9, 9)), 500);
    let (mut lab, response, _) = init(
        config(I, R, b"k"),
        config(R, I, b"k"),
        at(I, 500),
        fake,
        at(I, 500),
    );
    let out = lab
        .i
        .handle_from(&response, at(I, 500), at(R, 500), lab.now, &mut lab.ri)
        .expect("response");
    assert!(lab.i.nat().peer_behind && !lab.i.nat().local_behind);
    let (auth, route) = sent(&out);
    assert_eq!(
        route,
        Route {
            to: at(R, 4500),
            natt: true
        }
    );
    let out = lab
        .r
        .handle_from(&auth, at(R, 4500), at(I, 4500), lab.now, &mut lab.rr)
        .expect("IKE_AUTH");
    assert_eq!(installed(&out).udp_encap, Some(at(I, 4500)));
    let (answer, _) = sent(&out);
    let out = lab
        .i
        .handle_from(&answer, at(I, 4500), at(R, 4500), lab.now, &mut lab.ri)
        .expect("IKE_AUTH response");
    assert_eq!(installed(&out).udp_encap, Some(at(R, 4500)));
    // We are not behind a NAT: no keepalives from us.
    assert_eq!(lab.i.next_timeout(), None);
}

/// The entry points without addresses send no NAT detection data, and a
/// responder answers such a request without any either.
#[test]
fn without_addresses_no_nat_detection() {
    let now = Instant::now();
    let mut ri = TestRandomness::new(b"plain i");
    let mut rr = TestRandomness::new(b"plain r");
    let (_, actions) =
        IkeSa::initiate(Arc::new(config(I, R, b"k")), now, &mut ri).expect("initiate");
    let Some(Action::Send(request)) = actions.first() else {
        panic!("a request");
    };
    assert!(notify_data(request, notify::NAT_DETECTION_SOURCE_IP).is_empty());
    let mut r = IkeSa::responder(Arc::new(config(R, I, b"k")));
    let out = r
        .handle_from(request, at(R, 500), at(I, 500), now, &mut rr)
        .expect("request");
    let (response, _) = sent(&out);
    assert!(notify_data(&response, notify::NAT_DETECTION_SOURCE_IP).is_empty());
    assert_eq!(r.nat(), NatStatus::default());
}

/// Only authenticated messages move the peer: one whose ICV fails, sent
/// from a new address, is dropped and moves nothing. And the older timer
/// entry point reschedules a due keepalive rather than spinning on it.
#[test]
fn forged_messages_move_nothing_and_old_timers_do_not_spin() {
    let mut rc = config(R, NAT, b"k");
    rc.remote_id = config(R, I, b"k").remote_id;
    let (mut lab, response, _) = init(
        config(I, R, b"k"),
        rc,
        at(I, 500),
        at(R, 500),
        at(NAT, 61000),
    );
    let out = lab
        .i
        .handle_from(&response, at(I, 500), at(R, 500), lab.now, &mut lab.ri)
        .expect("response");
    let (auth, _) = sent(&out);
    let out = lab
        .r
        .handle_from(&auth, at(R, 4500), at(NAT, 61001), lab.now, &mut lab.rr)
        .expect("IKE_AUTH");
    let (answer, _) = sent(&out);
    lab.i
        .handle_from(&answer, at(I, 4500), at(R, 4500), lab.now, &mut lab.ri)
        .expect("IKE_AUTH response");
    let due = lab.i.next_timeout().expect("keepalive");
    assert_eq!(due, lab.now + Duration::from_secs(20));
    assert!(lab.i.handle_timeout(due).is_empty());
    assert_eq!(lab.i.next_timeout(), Some(due + Duration::from_secs(20)));

    let check = lab
        .i
        .check_liveness(lab.now, &mut lab.ri)
        .expect("liveness");
    let (mut request, _) = sent(&lab.i.outputs(check));
    let last = request.len() - 1;
    request[last] ^= 1;
    let before = lab.r.route();
    assert!(
        lab.r
            .handle_from(&request, at(R, 4500), at(NAT, 9), lab.now, &mut lab.rr)
            .is_err()
    );
    assert_eq!(lab.r.route(), before);
}

/// A COOKIE restart keeps the NAT detection notifies (same hashes: SPIr
/// is still zero), behind the returned cookie.
#[test]
fn a_cookie_restart_keeps_nat_detection() {
    let now = Instant::now();
    let mut ri = TestRandomness::new(b"cookie nat");
    let (mut i, out) = IkeSa::initiate_from(
        Arc::new(config(I, R, b"k")),
        at(I, 500),
        at(R, 500),
        NatPolicy::default(),
        now,
        &mut ri,
    )
    .expect("initiate");
    let (first, _) = sent(&out);
    let spi_i = i.spis().0;
    let challenge = Message {
        header: crate::ike::wire::Header {
            spi_i,
            spi_r: 0,
            exchange: crate::ike::wire::consts::exchange::IKE_SA_INIT,
            flags: crate::ike::wire::consts::flags::RESPONSE,
            message_id: 0,
        },
        payloads: vec![Payload::Notify(crate::ike::wire::payload::Notify::new(
            notify::COOKIE,
            vec![7; 16],
        ))],
    }
    .emit()
    .expect("emits");
    let out = i
        .handle_from(&challenge, at(I, 500), at(R, 500), now, &mut ri)
        .expect("challenge");
    let (retry, route) = sent(&out);
    assert_eq!(route.to, at(R, 500));
    let msg = Message::parse(&retry).expect("parses");
    assert!(matches!(msg.payloads.first(), Some(Payload::Notify(n)) if n.ty == notify::COOKIE));
    for ty in [
        notify::NAT_DETECTION_SOURCE_IP,
        notify::NAT_DETECTION_DESTINATION_IP,
    ] {
        assert_eq!(notify_data(&retry, ty), notify_data(&first, ty));
        assert_eq!(notify_data(&retry, ty).len(), 1);
    }
}
