//! Every provider against every AEAD vector file, and the providers against
//! each other on random inputs of every length from 0 to 9216 bytes.

mod common;

use common::TestRng;
use esptun::crypto::selftest::run_kats;
use esptun::crypto::vectors::{self, AeadVector};
use esptun::crypto::{CryptoError, IcvLen, MAX_ICV_LEN, Provider, SecretKey};

/// The providers this machine has; each missing one is reported as a
/// visible (partial) skip of `test`.
fn available_providers(test: &str) -> Vec<Provider> {
    let all = Provider::detect_all();
    for p in &all {
        if let Err(why) = &p.availability {
            common::skip(test, &format!("provider {} not tested here: {why}", p.id));
        }
    }
    all.into_iter().filter(Provider::is_available).collect()
}

fn vector_file(name: &str) -> Vec<AeadVector> {
    let path = format!("{}/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    vectors::parse(name, &text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_vector_file_passes_on_every_provider() {
    for file in ["aes_gcm_spec.txt", "aes_gcm_esp.txt"] {
        let vectors = vector_file(file);
        assert!(vectors.len() >= 12, "{file} has {} cases", vectors.len());
        for provider in available_providers("every_vector_file_passes_on_every_provider") {
            let report = run_kats(&provider, &vectors);
            assert_eq!(
                report.failures,
                Vec::<String>::new(),
                "{} on {file}",
                provider.id
            );
            assert_eq!(report.passed as usize, vectors.len());
        }
    }
}

#[test]
fn compiled_in_vectors_are_the_files_on_disk() {
    for (name, text) in vectors::BUILTIN_FILES {
        let path = format!("{}/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(*text, on_disk, "{name}");
    }
}

#[test]
fn a_wrong_expected_value_makes_the_kat_fail() {
    // The KAT runner must be able to fail: corrupt one expected byte of each
    // kind and check every provider reports it.
    let good = vector_file("aes_gcm_spec.txt");
    let tc4 = good.iter().find(|v| v.name == "gcm-spec-tc4").expect("tc4");
    let mut wrong_ct = tc4.clone();
    wrong_ct.ct[10] ^= 0x04;
    let mut wrong_tag = tc4.clone();
    wrong_tag.tag[15] ^= 0x80;
    let mut wrong_pt = tc4.clone();
    wrong_pt.pt[0] ^= 0x01;
    for provider in available_providers("a_wrong_expected_value_makes_the_kat_fail") {
        let report = run_kats(
            &provider,
            &[wrong_ct.clone(), wrong_tag.clone(), wrong_pt.clone()],
        );
        assert_eq!(
            (report.passed, report.failed),
            (0, 3),
            "{}: {:?}",
            provider.id,
            report
        );
    }
}

#[test]
fn providers_agree_on_random_inputs_of_every_length() {
    let providers = available_providers("providers_agree_on_random_inputs_of_every_length");
    if providers.len() < 2 {
        common::skip_or_fail_without_aesni("providers_agree_on_random_inputs_of_every_length");
        return;
    }
    let mut rng = TestRng::from_env("providers_agree_on_random_inputs_of_every_length");
    for len in 0..=9216usize {
        let key_len = if rng.next_u64().is_multiple_of(2) {
            16
        } else {
            32
        };
        let secret = SecretKey::new(&rng.bytes(key_len)).expect("valid length");
        let icv = IcvLen::ALL[rng.below(3)];
        let nonce: [u8; 12] = rng.bytes(12).try_into().expect("12 bytes");
        let aad_len = rng.below(65);
        let aad = rng.bytes(aad_len);
        let plaintext = rng.bytes(len);
        let keys: Vec<_> = providers
            .iter()
            .map(|p| p.new_key(&secret, icv).expect("key"))
            .collect();

        let mut sealed = Vec::new();
        for key in &keys {
            let mut buf = plaintext.clone();
            let mut tag = vec![0u8; icv.bytes()];
            key.seal_in_place(&nonce, &aad, &mut buf, &mut tag)
                .expect("seal");
            sealed.push((buf, tag));
        }
        assert_eq!(
            sealed[0], sealed[1],
            "providers disagree at len {len} icv {icv:?}"
        );

        let (ct, tag) = &sealed[0];
        for (i, key) in keys.iter().enumerate() {
            let mut buf = ct.clone();
            key.open_in_place(&nonce, &aad, &mut buf, tag)
                .unwrap_or_else(|e| panic!("provider {i} rejects at len {len}: {e}"));
            assert_eq!(buf, plaintext, "provider {i} len {len}");

            // One flipped bit anywhere in ciphertext, tag or AAD: rejected,
            // and no plaintext is left in the buffer.
            let mut bad_ct = ct.clone();
            let mut bad_tag = tag.clone();
            let mut bad_aad = aad.clone();
            let bit = 1u8 << rng.below(8);
            match rng.below(3) {
                0 if !bad_ct.is_empty() => {
                    let at = rng.below(bad_ct.len());
                    bad_ct[at] ^= bit;
                }
                1 if !bad_aad.is_empty() => {
                    let at = rng.below(bad_aad.len());
                    bad_aad[at] ^= bit;
                }
                _ => {
                    let at = rng.below(bad_tag.len());
                    bad_tag[at] ^= bit;
                }
            }
            let mut buf = bad_ct.clone();
            assert_eq!(
                key.open_in_place(&nonce, &bad_aad, &mut buf, &bad_tag),
                Err(CryptoError::Authentication),
                "provider {i} accepted a forgery at len {len}"
            );
            // The AeadKey invariant: after a failed open the buffer is the
            // ciphertext again or zeros, never (partial) plaintext.
            assert!(
                buf == bad_ct || buf.iter().all(|&b| b == 0),
                "provider {i} left decrypted bytes behind after a failed open at len {len}"
            );
        }
    }
}

#[test]
fn mismatched_tag_buffer_is_an_error_not_a_truncation() {
    for provider in available_providers("mismatched_tag_buffer_is_an_error_not_a_truncation") {
        let key = provider
            .new_key(&SecretKey::new(&[7; 16]).expect("key"), IcvLen::Icv12)
            .expect("key");
        let mut buf = [0u8; 32];
        let mut tag = [0u8; MAX_ICV_LEN];
        assert_eq!(
            key.seal_in_place(&[0; 12], b"", &mut buf, &mut tag),
            Err(CryptoError::TagMismatch {
                expected: 12,
                got: 16
            })
        );
        assert_eq!(buf, [0u8; 32], "nothing was encrypted");
        assert_eq!(
            key.open_in_place(&[0; 12], b"", &mut buf, &tag[..8]),
            Err(CryptoError::TagMismatch {
                expected: 12,
                got: 8
            })
        );
    }
}
