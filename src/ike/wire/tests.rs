//! Round trips and hostile input for the IKE wire format.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::consts::{exchange, flags, id, notify, payload as ty, protocol, transform};
use super::payload::*;
use super::sa_payload::{Proposal, Transform};
use super::*;

fn proposals() -> Vec<Proposal> {
    vec![
        Proposal {
            num: 1,
            protocol: protocol::IKE,
            spi: vec![],
            transforms: vec![
                Transform::new(transform::ENCR, transform::ENCR_AES_GCM_16, Some(256)),
                Transform::new(transform::PRF, transform::PRF_HMAC_SHA2_384, None),
                Transform::new(transform::DH, transform::DH_CURVE25519, None),
            ],
        },
        Proposal {
            num: 2,
            protocol: protocol::ESP,
            spi: vec![1, 2, 3, 4],
            transforms: vec![
                Transform::new(transform::ENCR, transform::ENCR_AES_GCM_16, Some(128)),
                Transform::new(transform::ESN, transform::ESN_YES, None),
            ],
        },
    ]
}

/// A message with every payload type we know, unencrypted.
fn every_payload() -> Message {
    let v4 = TrafficSelector::host(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)));
    let v6 = TrafficSelector {
        ip_protocol: 6,
        start_port: 22,
        end_port: 22,
        start: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        end: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9)),
    };
    Message {
        header: Header {
            spi_i: 0x0102_0304_0506_0708,
            spi_r: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::INITIATOR,
            message_id: 0,
        },
        payloads: vec![
            Payload::Notify(Notify::new(notify::COOKIE, vec![7; 20])),
            Payload::Sa(proposals()),
            Payload::Ke(KeyExchange {
                group: 31,
                data: vec![9; 32],
            }),
            Payload::Nonce(vec![3; 32]),
            Payload::IdI(Identification::new(id::FQDN, b"a.example".to_vec())),
            Payload::IdR(Identification::new(id::IPV4_ADDR, vec![198, 18, 0, 2])),
            Payload::Auth(Auth {
                method: 2,
                data: vec![5; 48],
            }),
            Payload::TsI(vec![v4]),
            Payload::TsR(vec![v6, v6]),
            Payload::Notify(Notify {
                protocol: protocol::ESP,
                spi: vec![0, 0, 1, 0],
                ty: notify::REKEY_SA,
                data: vec![],
            }),
            Payload::Notify(Notify::new(notify::USE_TRANSPORT_MODE, vec![])),
            Payload::Delete(Delete {
                protocol: protocol::ESP,
                spis: vec![0x1000, 0x2000],
            }),
            Payload::Delete(Delete {
                protocol: protocol::IKE,
                spis: vec![],
            }),
            Payload::Unknown {
                ty: ty::VENDOR_ID,
                body: b"esptun".to_vec(),
            },
            Payload::Encrypted(Encrypted {
                inner_first: ty::IDI,
                data: vec![0xaa; 40],
            }),
        ],
    }
}

#[test]
fn round_trip_every_payload() {
    let m = every_payload();
    let bytes = m.emit().expect("emit");
    assert_eq!(Message::parse(&bytes).expect("parse"), m);
    // And the emitted bytes are canonical.
    assert_eq!(Message::parse(&bytes).and_then(|m| m.emit()), Ok(bytes));
}

#[test]
fn header_fields_at_rfc_offsets() {
    let m = every_payload();
    let bytes = m.emit().expect("emit");
    let h = IkeHeader::new_checked(&bytes[..]).expect("header");
    assert_eq!(h.spi_i(), 0x0102_0304_0506_0708);
    assert_eq!(h.next_payload(), ty::NOTIFY);
    assert_eq!(bytes[17], 0x20, "version 2.0");
    assert_eq!(h.exchange(), exchange::IKE_SA_INIT);
    assert_eq!(h.length() as usize, bytes.len());
}

/// Every prefix is refused: first as is (the header length disagrees),
/// then with the header length patched to match, so that the payload
/// lengths themselves are what refuses it.
#[test]
fn every_truncation_is_refused() {
    let bytes = every_payload().emit().expect("emit");
    for n in 0..bytes.len() {
        let mut cut = bytes[..n].to_vec();
        assert!(Message::parse(&cut).is_err(), "prefix {n}");
        if n >= header::HEADER_LEN {
            cut[24..28].copy_from_slice(&(n as u32).to_be_bytes());
            assert!(Message::parse(&cut).is_err(), "patched prefix {n}");
        }
    }
}

/// Every single-byte change parses or is refused, never panics; a change
/// in a length field is refused.
#[test]
fn every_byte_flip_is_survived() {
    let bytes = every_payload().emit().expect("emit");
    for i in 0..bytes.len() {
        for v in [0u8, 1, 0x7f, 0x80, 0xff, bytes[i] ^ 0x01] {
            let mut b = bytes.clone();
            b[i] = v;
            let _ = Message::parse(&b);
        }
    }
    let mut b = bytes.clone();
    b[header::HEADER_LEN + 3] ^= 0x04; // the first payload's length
    assert!(Message::parse(&b).is_err());
}

#[test]
fn body_parsers_survive_every_truncation() {
    let m = every_payload();
    let mut bytes = Vec::new();
    for p in &m.payloads {
        bytes.clear();
        p.emit_body(&mut bytes).expect("emit");
        for n in 0..bytes.len() {
            let raw = RawPayload {
                ty: p.ty(),
                next: 0,
                critical: false,
                offset: 0,
                body: &bytes[..n],
            };
            let r = Payload::parse(&raw);
            // Structures with counts or fixed layouts must refuse a cut.
            if matches!(
                p,
                Payload::Sa(_) | Payload::TsI(_) | Payload::TsR(_) | Payload::Delete(_)
            ) {
                assert!(r.is_err(), "type {} cut at {n}", p.ty());
            }
        }
    }
}

#[test]
fn payload_count_is_bounded() {
    let n = Payload::Notify(Notify::new(notify::INITIAL_CONTACT, vec![]));
    let mut m = every_payload();
    m.payloads = vec![n; chain::MAX_PAYLOADS];
    let mut bytes = m.emit().expect("emit at the bound");
    assert!(Message::parse(&bytes).is_ok());
    // One more, spliced in by hand, since emit refuses to build it.
    let last = bytes.len() - 8;
    bytes[last] = ty::NOTIFY;
    bytes.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0x40, 0x00]);
    let len = bytes.len() as u32;
    bytes[24..28].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        Message::parse(&bytes),
        Err(WireError::TooMany(chain::MAX_PAYLOADS, "payloads"))
    );
}

#[test]
fn sk_must_be_last() {
    let mut m = every_payload();
    m.payloads.swap(0, 14);
    assert_eq!(m.emit(), Err(WireError::SkNotLast));
}

#[test]
fn critical_unknown_payload_is_refused() {
    let raw = RawPayload {
        ty: 200,
        next: 0,
        critical: true,
        offset: 0,
        body: &[],
    };
    assert_eq!(
        Payload::parse(&raw),
        Err(WireError::UnsupportedCritical(200))
    );
    let raw = RawPayload {
        critical: false,
        ..raw
    };
    assert!(matches!(
        Payload::parse(&raw),
        Ok(Payload::Unknown { ty: 200, .. })
    ));
}

#[test]
fn nonce_bounds() {
    for (len, ok) in [(15, false), (16, true), (256, true), (257, false)] {
        let body = vec![0u8; len];
        let raw = RawPayload {
            ty: ty::NONCE,
            next: 0,
            critical: false,
            offset: 0,
            body: &body,
        };
        assert_eq!(Payload::parse(&raw).is_ok(), ok, "{len}");
    }
}

#[test]
fn key_length_attribute_and_unknown_attributes() {
    // One ENCR transform with Key Length 256 (TV) and an unknown TLV.
    let body = [
        0, 0, 0, 24, 1, 1, 0, 1, // proposal 1, IKE, no SPI, 1 transform
        0, 0, 0, 16, 1, 0, 0, 20, // ENCR AES-GCM-16
        0x80, 14, 1, 0, // key length 256
        0, 99, 0, 0, // unknown TLV, empty
    ];
    let p = sa_payload::parse(&body).expect("parse");
    assert_eq!(p[0].transforms[0].key_len, Some(256));
    assert!(p[0].transforms[0].unknown_attributes);
}

#[test]
fn wrong_major_version_is_refused() {
    let mut bytes = every_payload().emit().expect("emit");
    bytes[17] = 0x30;
    assert_eq!(Message::parse(&bytes), Err(WireError::Version));
}
