//! The `soft` provider: RustCrypto's `aes-gcm` on its portable backends
//! (fixsliced constant-time AES, software POLYVAL), with no AES or CLMUL
//! instructions. It is the provider traffic falls back to when the hardware
//! path fails a self-test, so it must really be software.
//!
//! RustCrypto chooses its backends at compile time. `.cargo/config.toml`
//! passes `--cfg aes_backend="soft"` and `--cfg polyval_backend="soft"` to
//! every crate; a `RUSTFLAGS` variable silently replaces those flags. Two
//! checks catch that: `aes::hardware_accelerated()` at run time for AES, and
//! this crate seeing the same `polyval_backend` cfg at build time for POLYVAL
//! (which has no run-time probe; all crates get one set of rustflags).

use std::sync::Arc;

use aes_gcm::aead::consts::{U8, U12, U16};
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{Nonce, Tag};
use aes_gcm::aes::{Aes128, Aes256};
use aes_gcm::{AeadCore, AeadInOut, AesGcm, KeyInit};

use super::{
    AeadAlgorithm, AeadKey, CryptoError, IcvLen, KeySize, NONCE_LEN, Provider, ProviderId,
    SecretKey, check_tag_len,
};

/// Why the soft provider is not pure software in this build, if it is not.
pub fn backend_pin_failure() -> Option<String> {
    describe_pin(aes::hardware_accelerated(), cfg!(polyval_backend = "soft"))
}

fn describe_pin(aes_hardware: bool, polyval_soft: bool) -> Option<String> {
    if !aes_hardware && polyval_soft {
        return None;
    }
    Some(format!(
        "RustCrypto backends are not pinned to software (AES hardware: {aes_hardware}, \
         POLYVAL software: {polyval_soft}); a RUSTFLAGS setting probably replaced \
         .cargo/config.toml's --cfg aes_backend/polyval_backend flags"
    ))
}

fn provider_with(pin_failure: Option<String>) -> Provider {
    Provider {
        id: ProviderId::Soft,
        name: if pin_failure.is_none() {
            "rustcrypto-soft"
        } else {
            "rustcrypto-unpinned"
        },
        uses_aes_instructions: pin_failure.is_some(),
        availability: Ok(()),
        algorithm: Arc::new(RustCryptoAesGcm),
    }
}

pub fn provider() -> Provider {
    provider_with(backend_pin_failure())
}

/// RustCrypto's AES-GCM as an [`AeadAlgorithm`].
#[derive(Debug, Clone, Copy)]
pub struct RustCryptoAesGcm;

impl AeadAlgorithm for RustCryptoAesGcm {
    fn new_key(&self, key: &SecretKey, icv: IcvLen) -> Result<Box<dyn AeadKey>, CryptoError> {
        fn make<C>(key: &SecretKey, icv: IcvLen) -> Result<Box<dyn AeadKey>, CryptoError>
        where
            C: AeadInOut + AeadCore<NonceSize = U12> + KeyInit + Send + Sync + 'static,
        {
            let cipher = C::new_from_slice(key.expose())
                .map_err(|_| CryptoError::KeyLength(key.expose().len()))?;
            Ok(Box::new(SoftKey { cipher, icv }))
        }
        match (key.size(), icv) {
            (KeySize::Aes128, IcvLen::Icv8) => make::<AesGcm<Aes128, U12, U8>>(key, icv),
            (KeySize::Aes128, IcvLen::Icv12) => make::<AesGcm<Aes128, U12, U12>>(key, icv),
            (KeySize::Aes128, IcvLen::Icv16) => make::<AesGcm<Aes128, U12, U16>>(key, icv),
            (KeySize::Aes256, IcvLen::Icv8) => make::<AesGcm<Aes256, U12, U8>>(key, icv),
            (KeySize::Aes256, IcvLen::Icv12) => make::<AesGcm<Aes256, U12, U12>>(key, icv),
            (KeySize::Aes256, IcvLen::Icv16) => make::<AesGcm<Aes256, U12, U16>>(key, icv),
        }
    }
}

/// One RustCrypto cipher instance; `C` fixes key size and tag size.
/// `AesGcm` zeroizes its key schedule on drop (crate feature `zeroize`).
struct SoftKey<C> {
    cipher: C,
    icv: IcvLen,
}

impl<C> AeadKey for SoftKey<C>
where
    C: AeadInOut + AeadCore<NonceSize = U12> + Send + Sync,
{
    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), CryptoError> {
        check_tag_len(self.icv, tag.len())?;
        let nonce = Nonce::<C>::from(*nonce);
        let computed = self
            .cipher
            .encrypt_inout_detached(&nonce, aad, InOutBuf::from(in_out))
            .map_err(|_| CryptoError::TooLong)?;
        tag.copy_from_slice(computed.as_slice());
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
        let nonce = Nonce::<C>::from(*nonce);
        let tag = Tag::<C>::try_from(tag).map_err(|_| CryptoError::IcvLength(tag.len()))?;
        // RustCrypto verifies the tag over the ciphertext before decrypting,
        // so on failure `in_out` is untouched.
        self.cipher
            .decrypt_inout_detached(&nonce, aad, InOutBuf::from(in_out), &tag)
            .map_err(|_| CryptoError::Authentication)
    }

    fn icv_len(&self) -> IcvLen {
        self.icv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_pins_rustcrypto_to_software() {
        // The whole point of the soft provider: if this fails, the build lost
        // .cargo/config.toml's rustflags.
        assert_eq!(backend_pin_failure(), None);
        let p = provider();
        assert!(!p.uses_aes_instructions);
        assert_eq!(p.name, "rustcrypto-soft");
    }

    #[test]
    fn an_unpinned_build_is_never_labelled_software() {
        for (aes_hw, polyval_soft) in [(true, true), (false, false), (true, false)] {
            let why = describe_pin(aes_hw, polyval_soft).expect("not pinned");
            assert!(why.contains("RUSTFLAGS"), "{why}");
            let p = provider_with(Some(why));
            assert!(p.uses_aes_instructions);
            assert_eq!(p.name, "rustcrypto-unpinned");
        }
        assert_eq!(describe_pin(false, true), None);
    }
}
