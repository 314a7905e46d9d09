//! CHILD SAs the initiator cannot use (narrowed, tunnel mode, foreign proposal) are deleted.

use super::tests::{Lab, child, failures, pair, reseal, sends};
use super::*;
use crate::ike::crypto::Encr;
use crate::ike::sk;
use crate::ike::wire::consts::{exchange as ex, notify};

/// The payloads of a protected message `to` can open (the keys it
/// receives with), with the exchange type.
fn opened_by(to: &IkeSa, msg: &[u8]) -> (u8, Vec<Payload>) {
    let keys = to.keys.as_ref().expect("keys");
    let opened = sk::open(msg, &keys.sk_in).expect("open");
    (opened.header.exchange, opened.inner)
}

/// Runs IKE_SA_INIT and IKE_AUTH with the responder's IKE_AUTH response
/// changed by `edit`; returns the initiator's inbound ESP SPI (from its
/// request) and what the initiator sent in reply to that response.
fn auth_with_response(edit: impl FnOnce(&mut Vec<Payload>)) -> (Lab, u32, Vec<Vec<u8>>) {
    let (ic, rc) = pair();
    let (mut lab, first) = Lab::start(ic, rc);
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    let (_, request) = opened_by(&lab.r, &auth[0]);
    let esp_spi = request
        .iter()
        .find_map(|p| match p {
            Payload::Sa(props) => props.first().map(|pr| pr.spi.clone()),
            _ => None,
        })
        .and_then(|spi| <[u8; 4]>::try_from(spi.as_slice()).ok())
        .map(u32::from_be_bytes)
        .expect("the ESP SPI of our offer");
    let resp = lab.deliver_to_responder(&auth[0]).expect("response");
    let resp = reseal(&lab.r, &resp[0], edit);
    let out = lab.deliver_to_initiator(&resp).expect("handled");
    (lab, esp_spi, out)
}

/// The Delete payloads of an INFORMATIONAL request from the initiator.
fn deletes_in(lab: &Lab, msg: &[u8]) -> Vec<(u8, Vec<u32>)> {
    let (exchange, payloads) = opened_by(&lab.r, msg);
    assert_eq!(exchange, ex::INFORMATIONAL);
    payloads
        .into_iter()
        .filter_map(|p| match p {
            Payload::Delete(d) => Some((d.protocol, d.spis)),
            _ => None,
        })
        .collect()
}

/// RFC 7296 section 2.9: the responder narrows the selectors (UDP only,
/// as strongSwan can) and has created the CHILD SA; the initiator, which
/// wants host to host, refuses it and deletes it by its own inbound SPI
/// (section 3.11), which removes it on the responder's side. It never
/// reaches the initiator's key manager.
#[test]
fn a_narrowed_child_sa_is_refused_and_deleted() {
    use crate::ike::wire::consts::protocol;
    let (mut lab, esp_spi, out) = auth_with_response(|p| {
        for x in p.iter_mut() {
            if let Payload::TsI(ts) | Payload::TsR(ts) = x {
                for t in ts.iter_mut() {
                    t.ip_protocol = 17;
                }
            }
        }
    });
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::BadAnswer("traffic selectors")]
    );
    assert!(child(&lab.i_actions).is_none(), "no InstallChild");
    assert!(lab.i.children().is_empty());
    assert_eq!(lab.i.status(), Status::Established, "the IKE SA stays");
    // The responder created it: InstallChild, with our SPI as outbound.
    let r_child = child(&lab.r_actions).expect("the responder's CHILD SA");
    assert_eq!(r_child.outbound_spi, esp_spi);
    let r_inbound = r_child.inbound_spi;
    assert_eq!(out.len(), 1, "the initiator sends one Delete");
    assert_eq!(
        deletes_in(&lab, &out[0]),
        vec![(protocol::ESP, vec![esp_spi])],
        "a Delete of exactly our inbound SPI"
    );
    assert!(lab.i.request_outstanding());
    let answer = lab.deliver_to_responder(&out[0]).expect("Delete handled");
    assert!(lab.r_actions.iter().any(|a| matches!(
        a,
        Action::DeleteChild { inbound_spi, outbound_spi }
            if *inbound_spi == r_inbound && *outbound_spi == esp_spi
    )));
    assert!(
        lab.r.children().is_empty(),
        "the responder's CHILD SA is gone"
    );
    assert_eq!(lab.r.status(), Status::Established);
    // The answer ends the exchange and brings nothing to install.
    let before = lab.i_actions.len();
    let more = lab.deliver_to_initiator(&answer[0]).expect("answer");
    assert!(more.is_empty());
    assert!(!lab.i.request_outstanding());
    assert!(lab.i_actions[before..].iter().all(|a| !matches!(
        a,
        Action::InstallChild(_) | Action::DeleteChild { .. } | Action::Failed(_)
    )));
    assert_eq!(lab.i.status(), Status::Established);
    // The caller may now close the IKE SA: its window is free.
    let close = lab.i.close(lab.now, &mut lab.ri).expect("close");
    let bye = sends(&close);
    assert_eq!(deletes_in(&lab, &bye[0]), vec![(protocol::IKE, vec![])]);
}

/// A CHILD SA in a mode or with a proposal we cannot use was created all
/// the same: deleted like a narrowed one.
#[test]
fn a_child_sa_in_tunnel_mode_or_with_a_foreign_proposal_is_deleted() {
    use crate::ike::wire::consts::protocol;
    for why in ["tunnel mode", "ESP proposal"] {
        let edit = |p: &mut Vec<Payload>| {
            if why == "tunnel mode" {
                p.retain(
                    |x| !matches!(x, Payload::Notify(n) if n.ty == notify::USE_TRANSPORT_MODE),
                );
                return;
            }
            for x in p.iter_mut() {
                // Two proposals in an answer: not one we can use.
                if let Payload::Sa(props) = x
                    && let Some(first) = props.first().cloned()
                {
                    props.push(first);
                }
            }
        };
        let (lab, esp_spi, out) = auth_with_response(edit);
        assert_eq!(failures(&lab.i_actions), vec![IkeError::BadAnswer(why)]);
        assert!(child(&lab.i_actions).is_none());
        assert_eq!(out.len(), 1, "{why}: one Delete");
        assert_eq!(
            deletes_in(&lab, &out[0]),
            vec![(protocol::ESP, vec![esp_spi])],
            "{why}"
        );
    }
}

/// A responder that refused the CHILD SA with an error notification made
/// none: nothing to delete, nothing sent.
#[test]
fn a_child_sa_the_responder_refused_is_not_deleted() {
    let (mut ic, mut rc) = pair();
    ic.esp.encr = vec![Encr::AesGcm16_128];
    rc.esp.encr = vec![Encr::AesGcm16_256];
    let (mut lab, first) = Lab::start(ic, rc);
    let a = lab.deliver_to_responder(&first[0]).expect("init");
    let auth = lab.deliver_to_initiator(&a[0]).expect("auth");
    let resp = lab.deliver_to_responder(&auth[0]).expect("response");
    let out = lab.deliver_to_initiator(&resp[0]).expect("handled");
    assert_eq!(
        failures(&lab.i_actions),
        vec![IkeError::PeerRefused(ErrorNotify::NoProposalChosen)]
    );
    assert!(out.is_empty(), "no Delete for a CHILD SA never made");
    assert!(!lab.i.request_outstanding());
}
