//! The cookie gate (RFC 7296 section 2.6) against real IKE_SA_INIT
//! requests from our initiator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::ike::crypto::tests::TestRandomness;
use crate::ike::sa::{Action, Config, IkeSa, Status};

fn src(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)), 500)
}

fn configs() -> (Config, Config) {
    crate::ike::sa::test_pair()
}

/// A fresh initiator and its first request.
fn initiator(seed: &[u8], now: Instant) -> (IkeSa, TestRandomness, Vec<u8>) {
    let mut rng = TestRandomness::new(seed);
    let (sa, actions) = IkeSa::initiate(Arc::new(configs().0), now, &mut rng).expect("initiate");
    let Some(Action::Send(b)) = actions.into_iter().next() else {
        panic!("a request");
    };
    (sa, rng, b)
}

fn policy(threshold: usize) -> CookiePolicy {
    CookiePolicy {
        threshold,
        ..CookiePolicy::default()
    }
}

fn cookie_of(challenge: &[u8]) -> Vec<u8> {
    let msg = Message::parse(challenge).expect("parses");
    assert_eq!(msg.header.spi_r, 0, "stateless: no responder SPI");
    assert!(msg.header.is_response());
    match msg.payloads.as_slice() {
        [Payload::Notify(n)] if n.ty == notify::COOKIE => n.data.clone(),
        other => panic!("a COOKIE answer, not {other:?}"),
    }
}

/// `request` with its first payload (the returned cookie) replaced.
fn with_cookie(request: &[u8], cookie: Vec<u8>) -> Vec<u8> {
    let mut msg = Message::parse(request).expect("parses");
    match msg.payloads.first_mut() {
        Some(Payload::Notify(n)) if n.ty == notify::COOKIE => n.data = cookie,
        _ => msg
            .payloads
            .insert(0, Payload::Notify(Notify::new(notify::COOKIE, cookie))),
    }
    msg.emit().expect("emits")
}

fn spi_of(request: &[u8]) -> u64 {
    Message::parse(request).expect("parses").header.spi_i
}

#[test]
fn under_the_threshold_no_cookie() {
    let now = Instant::now();
    let mut rng = TestRandomness::new(b"gate");
    let mut gate = CookieGate::new(policy(2), now, &mut rng).expect("gate");
    let first = initiator(b"a", now).2;
    let second = initiator(b"b", now).2;
    assert!(!gate.demanding());
    assert_eq!(gate.check(&first, src(1), now, &mut rng), Verdict::Accept);
    assert_eq!(gate.check(&second, src(2), now, &mut rng), Verdict::Accept);
    assert_eq!(gate.half_open(), 2);
    assert!(gate.demanding());
    // The same request again is already counted, not challenged.
    assert_eq!(gate.check(&first, src(1), now, &mut rng), Verdict::Accept);
    assert_eq!(gate.half_open(), 2);
    let (_, _, third) = initiator(b"c", now);
    assert!(matches!(
        gate.check(&third, src(3), now, &mut rng),
        Verdict::Challenge(_)
    ));
    // One completes IKE_AUTH: below the threshold again, no cookie.
    gate.completed(spi_of(&first));
    assert_eq!(gate.check(&third, src(3), now, &mut rng), Verdict::Accept);
}

#[test]
fn over_the_threshold_a_valid_cookie_passes_and_forged_or_stale_ones_do_not() {
    let now = Instant::now();
    let mut rng = TestRandomness::new(b"gate");
    let mut gate = CookieGate::new(policy(0), now, &mut rng).expect("gate");
    let (_, _, req) = initiator(b"x", now);
    let Verdict::Challenge(answer) = gate.check(&req, src(7), now, &mut rng) else {
        panic!("a cookie is demanded");
    };
    let cookie = cookie_of(&answer);
    assert_eq!(cookie.len(), COOKIE_LEN);
    // Section 2.6's layout: version 0, then SHA-256(Ni | IPi | SPIi |
    // secret), the secret being the gate's first draw.
    let mut secret = [0u8; 32];
    crate::ike::crypto::Randomness::fill(&mut TestRandomness::new(b"gate"), &mut secret)
        .expect("draw");
    let msg = Message::parse(&req).expect("parses");
    let ni = msg
        .payloads
        .iter()
        .find_map(|p| match p {
            Payload::Nonce(n) => Some(n.clone()),
            _ => None,
        })
        .expect("a nonce");
    let mut input = ni;
    input.extend_from_slice(&[198, 18, 0, 7]);
    input.extend_from_slice(&msg.header.spi_i.to_be_bytes());
    input.extend_from_slice(&secret);
    assert_eq!(&cookie[..4], &[0, 0, 0, 0]);
    assert_eq!(
        &cookie[4..],
        digest::digest(&digest::SHA256, &input).as_ref()
    );
    // Stateless: nothing counted for a challenged request.
    assert_eq!(gate.half_open(), 0);
    // Bound to the source address: another one cannot use it.
    let retry = with_cookie(&req, cookie.clone());
    assert!(matches!(
        gate.check(&retry, src(8), now, &mut rng),
        Verdict::Challenge(_)
    ));
    // Forged: one bit off.
    let mut forged = cookie.clone();
    forged[10] ^= 1;
    let bad = with_cookie(&req, forged);
    assert!(matches!(
        gate.check(&bad, src(7), now, &mut rng),
        Verdict::Challenge(_)
    ));
    // Not first in the chain (section 2.6): not a returned cookie.
    let mut msg = Message::parse(&retry).expect("parses");
    msg.payloads.rotate_left(1);
    let late = msg.emit().expect("emits");
    assert!(matches!(
        gate.check(&late, src(7), now, &mut rng),
        Verdict::Challenge(_)
    ));
    // Valid, and still after one rotation (the previous secret).
    let later = now + gate.policy().rotate;
    assert_eq!(gate.check(&retry, src(7), later, &mut rng), Verdict::Accept);
    assert_eq!(gate.half_open(), 1);
    gate.completed(spi_of(&retry));
    // Two rotations on, the secret is gone: a new cookie is demanded.
    let stale = later + gate.policy().rotate;
    let Verdict::Challenge(again) = gate.check(&retry, src(7), stale, &mut rng) else {
        panic!("a stale cookie is refused");
    };
    assert_ne!(cookie_of(&again), cookie);
    let fresh = with_cookie(&req, cookie_of(&again));
    assert_eq!(gate.check(&fresh, src(7), stale, &mut rng), Verdict::Accept);
}

#[test]
fn the_half_open_table_is_bounded_and_times_out() {
    let now = Instant::now();
    let mut rng = TestRandomness::new(b"gate");
    let p = CookiePolicy {
        threshold: 100,
        max_half_open: 3,
        per_source: 2,
        ..CookiePolicy::default()
    };
    let mut gate = CookieGate::new(p, now, &mut rng).expect("gate");
    let reqs: Vec<Vec<u8>> = (0..5u8).map(|i| initiator(&[i], now).2).collect();
    assert_eq!(gate.check(&reqs[0], src(1), now, &mut rng), Verdict::Accept);
    assert_eq!(gate.check(&reqs[1], src(1), now, &mut rng), Verdict::Accept);
    assert!(matches!(
        gate.check(&reqs[2], src(1), now, &mut rng),
        Verdict::Drop(_)
    ));
    assert_eq!(gate.check(&reqs[2], src(2), now, &mut rng), Verdict::Accept);
    assert!(matches!(
        gate.check(&reqs[3], src(3), now, &mut rng),
        Verdict::Drop(_)
    ));
    // A response is no request.
    let (_, _, r) = initiator(b"resp", now);
    let mut msg = Message::parse(&r).expect("p");
    msg.header.flags = flags::RESPONSE;
    let resp = msg.emit().expect("e");
    assert!(matches!(
        gate.check(&resp, src(4), now, &mut rng),
        Verdict::Drop(_)
    ));

    let timeout = gate.policy().half_open_timeout;
    assert_eq!(gate.next_timeout(), Some(now + timeout));
    assert!(gate.expire(now + timeout / 2, &mut rng).is_empty());
    let gone = gate.expire(now + timeout, &mut rng);
    assert_eq!(gone.len(), 3);
    assert_eq!(gate.half_open(), 0);
    assert_eq!(
        gate.check(&reqs[3], src(3), now + timeout, &mut rng),
        Verdict::Accept
    );
}

/// Our initiator honours a COOKIE: it sends IKE_SA_INIT again with the
/// cookie as the first payload, and the handshake completes.
#[test]
fn our_initiator_returns_the_cookie_first_and_gets_through() {
    let now = Instant::now();
    let mut rng = TestRandomness::new(b"gate");
    let mut gate = CookieGate::new(policy(0), now, &mut rng).expect("gate");
    let (mut i, mut ri, req) = initiator(b"honest", now);
    let Verdict::Challenge(answer) = gate.check(&req, src(1), now, &mut rng) else {
        panic!("a cookie is demanded");
    };
    let actions = i.handle(&answer, now, &mut ri).expect("COOKIE answer");
    let [Action::Send(retry)] = actions.as_slice() else {
        panic!("one retry, not {actions:?}");
    };
    let msg = Message::parse(retry).expect("parses");
    assert_eq!(msg.header.message_id, 0);
    assert!(
        matches!(msg.payloads.first(), Some(Payload::Notify(n)) if n.ty == notify::COOKIE && n.data == cookie_of(&answer))
    );
    assert_eq!(gate.check(retry, src(1), now, &mut rng), Verdict::Accept);
    let mut r = IkeSa::responder(Arc::new(configs().1));
    let mut rr = TestRandomness::new(b"responder");
    let mut to_r = vec![retry.clone()];
    for _ in 0..4 {
        let mut to_i = Vec::new();
        for m in to_r.drain(..) {
            for a in r.handle(&m, now, &mut rr).expect("to responder") {
                if let Action::Send(b) = a {
                    to_i.push(b);
                }
            }
        }
        for m in to_i {
            for a in i.handle(&m, now, &mut ri).expect("to initiator") {
                if let Action::Send(b) = a {
                    to_r.push(b);
                }
            }
        }
    }
    assert_eq!(
        (i.status(), r.status()),
        (Status::Established, Status::Established)
    );
    gate.completed(i.spis().0);
    assert_eq!(gate.half_open(), 0);
}
