//! Known answers for the IKE cryptography, and the deterministic
//! [`TestRandomness`] the state machine tests use.
//!
//! Sources: RFC 4231 section 4 (HMAC-SHA-256/384/512 test cases 1 and 2),
//! RFC 7748 sections 5.2 and 6.1 (X25519), RFC 5903 section 8.1 (ECP-256).
//! prf+ and the key schedule have no published IKEv2 vectors for these
//! algorithms; they are checked against their definitions over the
//! HMAC the RFC 4231 vectors pin down.

use super::*;
use crate::hex;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test hex")
}

/// A reproducible generator: an HMAC-SHA-256 counter stream over a seed.
/// DH keys are drawn from the same stream and handed to ring through its
/// fixed-bytes generator (ring's `SecureRandom` is sealed otherwise).
pub(crate) struct TestRandomness {
    seed: Vec<u8>,
    counter: u64,
}

impl TestRandomness {
    pub(crate) fn new(seed: &[u8]) -> Self {
        TestRandomness {
            seed: seed.to_vec(),
            counter: 0,
        }
    }
}

impl Randomness for TestRandomness {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), IkeCryptoError> {
        for chunk in dest.chunks_mut(32) {
            self.counter += 1;
            let block = Prf::HmacSha256.prf(&self.seed, &[&self.counter.to_be_bytes()]);
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }

    fn dh_private(&mut self, group: DhGroup) -> Result<DhPrivate, IkeCryptoError> {
        let mut bytes = [0u8; 32];
        self.fill(&mut bytes)?;
        dh_from_bytes(group, &bytes)
    }
}

/// A ring private key with exactly these bytes.
pub(crate) fn dh_from_bytes(group: DhGroup, bytes: &[u8]) -> Result<DhPrivate, IkeCryptoError> {
    #[allow(deprecated)]
    let rng = ring::test::rand::FixedSliceRandom { bytes };
    let key = agreement::EphemeralPrivateKey::generate(group.algorithm(), &rng)
        .map_err(|_| IkeCryptoError::Random)?;
    DhPrivate::from_ring(group, key)
}

#[test]
fn hmac_sha2_rfc4231() {
    let cases: [(&[u8], &[u8], [&str; 3]); 2] = [
        (
            &[0x0b; 20],
            b"Hi There",
            [
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
                "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6",
                "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cdedaa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
            ],
        ),
        (
            b"Jefe",
            b"what do ya want for nothing?",
            [
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
                "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649",
                "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
            ],
        ),
    ];
    for (key, data, expected) in cases {
        for (prf, want) in [Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512]
            .into_iter()
            .zip(expected)
        {
            assert_eq!(&prf.prf(key, &[data])[..], &h(want)[..], "{prf:?}");
            // Split input gives the same answer.
            assert_eq!(&prf.prf(key, &[&data[..3], &data[3..]])[..], &h(want)[..]);
            assert_eq!(prf.output_len(), want.len() / 2);
        }
    }
}

#[test]
fn prf_plus_follows_section_2_13() {
    // RFC 4231 test case 2 key, seed split across two slices.
    for prf in [Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512] {
        let (key, s1, s2) = (b"Jefe", &b"what do ya "[..], &b"want for nothing?"[..]);
        let n = prf.output_len();
        let out = prf.prf_plus(key, &[s1, s2], 3 * n - 5).expect("prf+");
        let t1 = prf.prf(key, &[s1, s2, &[1]]);
        let t2 = prf.prf(key, &[&t1, s1, s2, &[2]]);
        let t3 = prf.prf(key, &[&t2, s1, s2, &[3]]);
        assert_eq!(&out[..n], &t1[..]);
        assert_eq!(&out[n..2 * n], &t2[..]);
        assert_eq!(&out[2 * n..], &t3[..n - 5]);
        // T1 is the RFC 4231 HMAC of S | 0x01.
        assert_eq!(t1, prf.prf(key, &[b"what do ya want for nothing?\x01"]));
        assert!(prf.prf_plus(key, &[s1], 255 * n).is_ok());
        assert_eq!(
            prf.prf_plus(key, &[s1], 255 * n + 1),
            Err(IkeCryptoError::PrfPlusTooLong(255 * n + 1))
        );
    }
}

#[test]
fn x25519_rfc7748() {
    // Section 5.2, first vector: scalar times u-coordinate.
    let k = h("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
    let u = h("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
    let out = h("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552");
    let key = dh_from_bytes(DhGroup::Curve25519, &k).expect("key");
    assert_eq!(key.agree(&u).expect("agree").expose(), &out[..]);

    // Section 6.1: Alice and Bob.
    let a = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
    let a_pub = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    let b = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
    let b_pub = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
    let k = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    let alice = dh_from_bytes(DhGroup::Curve25519, &a).expect("alice");
    let bob = dh_from_bytes(DhGroup::Curve25519, &b).expect("bob");
    assert_eq!(alice.public(), &a_pub[..]);
    assert_eq!(bob.public(), &b_pub[..]);
    assert_eq!(alice.agree(&b_pub).expect("a").expose(), &k[..]);
    assert_eq!(bob.agree(&a_pub).expect("b").expose(), &k[..]);
}

/// RFC 7748 section 6.1 / RFC 8031 section 2.3: a small-order point gives
/// the all-zero secret, which must be refused.
#[test]
fn x25519_all_zero_result_is_refused() {
    let mut small_order = vec![[0u8; 32], [0u8; 32]];
    small_order[1][0] = 1; // u = 1
    // u = 325606250916557431795983626356110631294008115727848805560023387167927233504
    // (order 8), RFC 7748 section 7 / libsodium's blocklist.
    small_order.push(
        h("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
            .try_into()
            .expect("32 bytes"),
    );
    for (i, u) in small_order.iter().enumerate() {
        let mut rng = TestRandomness::new(b"x25519 zero");
        let key = rng.dh_private(DhGroup::Curve25519).expect("key");
        assert_eq!(
            key.agree(u).err(),
            Some(IkeCryptoError::BadPublicKey),
            "point {i}"
        );
    }
}

#[test]
fn ecp256_rfc5903_section_8_1() {
    let i = h("c88f01f510d9ac3f70a292daa2316de544e9aab8afe84049c62a9c57862d1433");
    let gi = h(concat!(
        "dad0b65394221cf9b051e1feca5787d098dfe637fc90b9ef945d0c3772581180",
        "5271a0461cdb8252d61f1c456fa3e59ab1f45b33accf5f58389e0577b8990bb3"
    ));
    let r = h("c6ef9c5d78ae012a011164acb397ce2088685d8f06bf9be0b283ab46476bee53");
    let gr = h(concat!(
        "d12dfb5289c8d4f81208b70270398c342296970a0bccb74c736fc7554494bf63",
        "56fbf3ca366cc23e8157854c13c58d6aac23f046ada30f8353e74f33039872ab"
    ));
    let girx = h("d6840f6b42f6edafd13116e0e12565202fef8e9ece7dce03812464d04b9442de");
    let ki = dh_from_bytes(DhGroup::Ecp256, &i).expect("i");
    let kr = dh_from_bytes(DhGroup::Ecp256, &r).expect("r");
    // The KE payload carries x || y, no 0x04 prefix (RFC 5903 section 7).
    assert_eq!(ki.public(), &gi[..]);
    assert_eq!(kr.public(), &gr[..]);
    // The shared secret is x alone.
    assert_eq!(ki.agree(&gr).expect("i").expose(), &girx[..]);
    assert_eq!(kr.agree(&gi).expect("r").expose(), &girx[..]);
}

#[test]
fn ecp256_invalid_points_are_refused() {
    let mut rng = TestRandomness::new(b"ecp bad");
    let peer = rng.dh_private(DhGroup::Ecp256).expect("peer");
    let mut off_curve = peer.public().to_vec();
    off_curve[63] ^= 1;
    let with_prefix = [&[4u8][..], peer.public()].concat();
    for bad in [
        &off_curve[..],
        &with_prefix[..],
        &[0u8; 64][..],
        &peer.public()[..32],
    ] {
        let me = rng.dh_private(DhGroup::Ecp256).expect("me");
        assert_eq!(me.agree(bad).err(), Some(IkeCryptoError::BadPublicKey));
    }
}

#[test]
fn key_schedule_follows_section_2_14() {
    let mut rng = TestRandomness::new(b"schedule");
    let a = rng.dh_private(DhGroup::Curve25519).expect("a");
    let b = rng.dh_private(DhGroup::Curve25519).expect("b");
    let b_pub = b.public().to_vec();
    let shared = a.agree(&b_pub).expect("agree");
    let (ni, nr) = ([1u8; 32], [2u8; 32]);
    for prf in [Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512] {
        for encr in [Encr::AesGcm16_128, Encr::AesGcm16_256] {
            let k = IkeKeys::derive(prf, encr, &shared, &ni, &nr, 0x11, 0x22).expect("derive");
            let (p, e) = (prf.output_len(), encr.material_len());
            let seed = prf.prf(&[ni, nr].concat(), &[shared.expose()]);
            let mut spis = 0x11u64.to_be_bytes().to_vec();
            spis.extend_from_slice(&0x22u64.to_be_bytes());
            let km = prf
                .prf_plus(&seed, &[&ni, &nr, &spis], 3 * p + 2 * e)
                .expect("prf+");
            let parts = [&k.sk_d, &k.sk_ei, &k.sk_er, &k.sk_pi, &k.sk_pr].map(|s| s.to_vec());
            assert_eq!(parts.concat(), km.to_vec());
            assert_eq!((k.sk_d.len(), k.sk_ei.len(), k.sk_pr.len()), (p, e, p));
            let dbg = format!("{k:?}");
            assert!(!dbg.contains(&format!("{:?}", &k.sk_d[..4])), "{dbg}");
        }
    }
}

#[test]
fn child_keys_follow_section_2_17() {
    let prf = Prf::HmacSha256;
    let sk_d = [7u8; 32];
    let (ni, nr) = ([1u8; 16], [2u8; 16]);
    let k = child_keys(prf, &sk_d, None, &ni, &nr, Encr::AesGcm16_256).expect("keys");
    let km = prf.prf_plus(&sk_d, &[&ni, &nr], 72).expect("prf+");
    assert_eq!(k.initiator_to_responder.key().expose(), &km[..32]);
    assert_eq!(k.initiator_to_responder.salt(), &km[32..36]);
    assert_eq!(k.responder_to_initiator.key().expose(), &km[36..68]);
    assert_eq!(k.responder_to_initiator.salt(), &km[68..72]);
    let k = child_keys(prf, &sk_d, None, &ni, &nr, Encr::AesGcm16_128).expect("keys");
    assert_eq!(k.initiator_to_responder.key().expose(), &km[..16]);
    assert_eq!(k.responder_to_initiator.salt(), &km[36..40]);
}

#[test]
fn psk_auth_follows_section_2_15() {
    let prf = Prf::HmacSha384;
    let s = SignedOctets {
        message: b"first message",
        peer_nonce: &[9; 32],
        sk_p: &[3; 48],
        id_body: &[2, 0, 0, 0, b'a'],
    };
    let auth = psk_auth(prf, b"secret", &s);
    let pad = prf.prf(b"secret", &[b"Key Pad for IKEv2"]);
    let maced = prf.prf(&[3; 48], &[&[2, 0, 0, 0, b'a']]);
    let want = prf.prf(&pad, &[b"first message", &[9; 32], &maced]);
    assert_eq!(auth, want);
    assert!(verify_psk_auth(prf, b"secret", &s, &auth));
    assert!(!verify_psk_auth(prf, b"secreT", &s, &auth));
    assert!(!verify_psk_auth(prf, b"secret", &s, &auth[..47]));
}
