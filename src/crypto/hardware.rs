//! The `hardware` provider: ring's AES-GCM, whose x86-64 assembly uses
//! AES-NI, VAES and (V)PCLMULQDQ where the CPU has them.
//!
//! ring silently falls back to its own portable code on a CPU without AES-NI,
//! so "hardware" would be a lie there: the provider is offered only when
//! `cpufeatures` confirms both `aes` and `pclmulqdq`.
//!
//! ring only produces and checks full 16-byte tags. Sealing with a shorter
//! ICV truncates (RFC 4106 section 6: the ICV is the leading octets of the
//! tag). Opening with a shorter ICV is done in three passes, because ring
//! does not expose the tag without also checking it; see `RingKey::open_truncated`.

use std::sync::Arc;

use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use super::{
    AeadAlgorithm, AeadKey, CryptoError, IcvLen, KeySize, MAX_ICV_LEN, NONCE_LEN, Provider,
    ProviderId, SecretKey, check_tag_len, ct_eq,
};

#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
cpufeatures::new!(cpuid_aes_clmul, "aes", "pclmulqdq");

/// Whether this CPU has the instructions ring's fast AES-GCM needs, and if
/// not, why not (in words an operator can act on).
pub fn cpu_support() -> Result<(), String> {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        if cpuid_aes_clmul::get() {
            Ok(())
        } else {
            Err("CPU does not report both AES-NI (aes) and PCLMULQDQ; \
                 check the hypervisor's CPU model passes them through"
                .to_string())
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    {
        Err("the hardware provider is only offered on x86/x86-64".to_string())
    }
}

pub fn provider() -> Provider {
    Provider {
        id: ProviderId::Hardware,
        name: "ring",
        uses_aes_instructions: true,
        availability: cpu_support(),
        algorithm: Arc::new(RingAesGcm),
    }
}

/// ring's AES-GCM as an [`AeadAlgorithm`].
#[derive(Debug, Clone, Copy)]
pub struct RingAesGcm;

impl AeadAlgorithm for RingAesGcm {
    fn new_key(&self, key: &SecretKey, icv: IcvLen) -> Result<Box<dyn AeadKey>, CryptoError> {
        let alg = match key.size() {
            KeySize::Aes128 => &AES_128_GCM,
            KeySize::Aes256 => &AES_256_GCM,
        };
        // ring keeps its expanded key schedule in its own type, which it does
        // not zeroize on drop; our copy of the raw bytes is in `SecretKey`.
        let unbound = UnboundKey::new(alg, key.expose())
            .map_err(|_| CryptoError::KeyLength(key.expose().len()))?;
        Ok(Box::new(RingKey {
            key: LessSafeKey::new(unbound),
            icv,
        }))
    }
}

struct RingKey {
    key: LessSafeKey,
    icv: IcvLen,
}

impl RingKey {
    fn seal_full(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<Tag, CryptoError> {
        self.key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                in_out,
            )
            .map_err(|_| CryptoError::TooLong)
    }

    /// Opens with an 8- or 12-byte ICV using only ring's seal.
    ///
    /// GCM encryption and decryption apply the same CTR keystream (both start
    /// at inc32(J0)), so: pass 1 seals the ciphertext, which yields the
    /// plaintext (its tag is discarded); pass 2 seals that plaintext, which
    /// restores the exact ciphertext and yields the full tag over it; the
    /// received ICV is compared with the tag's leading bytes; pass 3 yields
    /// the plaintext again only if they match. No output of the repeated
    /// nonce leaves this function: pass 2's tag is the tag of the received
    /// ciphertext (what any GCM open computes) and the other two are dropped.
    /// On failure the buffer holds the ciphertext. The cost is three passes,
    /// which is why 16-byte ICVs (RFC 4106's MUST) are the default.
    fn open_truncated(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8],
    ) -> Result<(), CryptoError> {
        let _tag_over_plaintext = self.seal_full(nonce, aad, in_out)?;
        let full = match self.seal_full(nonce, aad, in_out) {
            Ok(tag) => tag,
            Err(e) => {
                // Cannot happen (pass 1 accepted the same length), but the
                // buffer now holds unauthenticated plaintext: wipe it.
                in_out.fill(0);
                return Err(e);
            }
        };
        if !ct_eq(&full.as_ref()[..tag.len()], tag) {
            return Err(CryptoError::Authentication);
        }
        let _tag_over_plaintext = self.seal_full(nonce, aad, in_out)?;
        Ok(())
    }
}

impl AeadKey for RingKey {
    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), CryptoError> {
        check_tag_len(self.icv, tag.len())?;
        let full = self.seal_full(nonce, aad, in_out)?;
        tag.copy_from_slice(&full.as_ref()[..tag.len()]);
        Ok(())
    }

    fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8],
    ) -> Result<(), CryptoError> {
        check_tag_len(self.icv, tag.len())?;
        if tag.len() < MAX_ICV_LEN {
            return self.open_truncated(nonce, aad, in_out, tag);
        }
        let tag = Tag::try_from(tag).map_err(|_| CryptoError::IcvLength(tag.len()))?;
        self.key
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                tag,
                in_out,
                0..,
            )
            .map(|_| ())
            .map_err(|_| CryptoError::Authentication)
    }

    fn icv_len(&self) -> IcvLen {
        self.icv
    }
}
