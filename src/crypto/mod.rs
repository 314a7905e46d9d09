//! The AEAD seam: AES-GCM keys behind a small trait, and providers that are
//! values chosen at run time (after rustls' `CryptoProvider`).
//!
//! Two providers exist: [`hardware`] (ring's AES-NI/VAES/CLMUL code, offered
//! only when the CPU confirms the instructions) and [`soft`] (RustCrypto's
//! constant-time portable AES and POLYVAL). [`selftest`] proves each one with
//! known-answer tests and SIMD-state checks; [`select`] picks the one that
//! carries traffic and can switch to `soft` while running.
//!
//! Invariants:
//! - Key bytes live in [`SecretKey`], which zeroizes on drop and whose
//!   `Debug` never prints them.
//! - A key object is bound to one ICV length at creation (an SA has one), so
//!   a tag slice of any other length is an error, never a silent truncation.
//! - When `open_in_place` fails, the buffer holds no unauthenticated
//!   plaintext: it is the ciphertext again, or zeros (ring wipes it).

pub mod hardware;
pub mod select;
pub mod selftest;
pub mod simd_state;
pub mod soft;
pub mod vectors;

pub mod fault;

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

/// GCM nonce length used by ESP: 4-byte salt || 8-byte explicit IV (RFC 4106 section 4).
pub const NONCE_LEN: usize = 12;
/// Full GCM tag length.
pub const MAX_ICV_LEN: usize = 16;

/// Errors from the AEAD seam. Authentication failure is one variant, with no
/// detail: which byte was wrong is not something a caller may learn.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    #[error("AES key must be 16 or 32 bytes, got {0}")]
    KeyLength(usize),
    #[error("ICV must be 8, 12 or 16 bytes (RFC 4106 section 6), got {0}")]
    IcvLength(usize),
    #[error("tag buffer is {got} bytes but this key was created for a {expected}-byte ICV")]
    TagMismatch { expected: usize, got: usize },
    #[error("authentication failed")]
    Authentication,
    #[error("message too long for AES-GCM")]
    TooLong,
    #[error("provider {0} is unavailable: {1}")]
    Unavailable(&'static str, String),
}

/// ICV (tag) length of an SA. RFC 4106 section 6: 8, 12 or 16 octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IcvLen {
    Icv8,
    Icv12,
    Icv16,
}

impl IcvLen {
    pub const ALL: [IcvLen; 3] = [IcvLen::Icv8, IcvLen::Icv12, IcvLen::Icv16];

    pub fn bytes(self) -> usize {
        match self {
            IcvLen::Icv8 => 8,
            IcvLen::Icv12 => 12,
            IcvLen::Icv16 => 16,
        }
    }

    pub fn from_bytes(n: usize) -> Result<Self, CryptoError> {
        match n {
            8 => Ok(IcvLen::Icv8),
            12 => Ok(IcvLen::Icv12),
            16 => Ok(IcvLen::Icv16),
            other => Err(CryptoError::IcvLength(other)),
        }
    }
}

/// AES key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySize {
    Aes128,
    Aes256,
}

impl KeySize {
    pub fn bytes(self) -> usize {
        match self {
            KeySize::Aes128 => 16,
            KeySize::Aes256 => 32,
        }
    }

    pub fn bits(self) -> u32 {
        (self.bytes() * 8) as u32
    }
}

/// AES key bytes in zeroizing memory. `Debug` names the size, never the bytes.
#[derive(Clone)]
pub struct SecretKey {
    bytes: Zeroizing<Vec<u8>>,
    size: KeySize,
}

impl SecretKey {
    pub fn new(bytes: &[u8]) -> Result<Self, CryptoError> {
        let size = match bytes.len() {
            16 => KeySize::Aes128,
            32 => KeySize::Aes256,
            n => return Err(CryptoError::KeyLength(n)),
        };
        Ok(SecretKey {
            bytes: Zeroizing::new(bytes.to_vec()),
            size,
        })
    }

    pub fn size(&self) -> KeySize {
        self.size
    }

    /// The raw key bytes, for handing to a provider. Never log them.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(AES-{}, redacted)", self.size.bits())
    }
}

/// One AES-GCM key, expanded by a provider, bound to one ICV length.
///
/// Both operations work in place over the caller's buffer with a detached
/// tag, so the datapath never copies a packet to encrypt it.
pub trait AeadKey: Send + Sync {
    /// Encrypts `in_out` in place and writes the ICV into `tag`
    /// (`tag.len()` must equal the key's ICV length).
    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), CryptoError>;

    /// Verifies `tag` and decrypts `in_out` in place. On any error `in_out`
    /// holds the ciphertext or zeros, never unauthenticated plaintext.
    fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8],
    ) -> Result<(), CryptoError>;

    fn icv_len(&self) -> IcvLen;
}

/// An AES-GCM implementation: turns key bytes into [`AeadKey`] objects.
pub trait AeadAlgorithm: Send + Sync {
    fn new_key(&self, key: &SecretKey, icv: IcvLen) -> Result<Box<dyn AeadKey>, CryptoError>;
}

/// Which slot a provider fills. There are exactly two: the fast one we must
/// keep proving, and the portable one we fall back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderId {
    Hardware,
    Soft,
}

impl ProviderId {
    pub const ALL: [ProviderId; 2] = [ProviderId::Hardware, ProviderId::Soft];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderId::Hardware => "hardware",
            ProviderId::Soft => "soft",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            ProviderId::Hardware => 0,
            ProviderId::Soft => 1,
        }
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider is a value: its slot, a truthful description, whether this
/// machine can run it, and the algorithm object.
#[derive(Clone)]
pub struct Provider {
    pub id: ProviderId,
    /// Implementation name, e.g. `ring` or `rustcrypto-soft`.
    pub name: &'static str,
    /// True when the implementation uses AES/CLMUL instructions. For `soft`
    /// this is true only if the backend pin did not take effect, and then the
    /// provider must not be presented as software.
    pub uses_aes_instructions: bool,
    /// `Err(reason)` when this CPU or build cannot run the provider.
    pub availability: Result<(), String>,
    pub algorithm: Arc<dyn AeadAlgorithm>,
}

impl Provider {
    pub fn is_available(&self) -> bool {
        self.availability.is_ok()
    }

    pub fn new_key(&self, key: &SecretKey, icv: IcvLen) -> Result<Box<dyn AeadKey>, CryptoError> {
        if let Err(reason) = &self.availability {
            return Err(CryptoError::Unavailable(self.name, reason.clone()));
        }
        self.algorithm.new_key(key, icv)
    }

    /// The two providers this build offers on this machine.
    pub fn detect_all() -> [Provider; 2] {
        [hardware::provider(), soft::provider()]
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("uses_aes_instructions", &self.uses_aes_instructions)
            .field("availability", &self.availability)
            .finish_non_exhaustive()
    }
}

/// Checks a tag slice against the key's ICV length.
pub(crate) fn check_tag_len(icv: IcvLen, tag_len: usize) -> Result<(), CryptoError> {
    if tag_len == icv.bytes() {
        Ok(())
    } else {
        Err(CryptoError::TagMismatch {
            expected: icv.bytes(),
            got: tag_len,
        })
    }
}

/// Compares two equal-length byte strings without an early exit, so the time
/// taken does not say where a forged tag first differs.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_key_debug_never_prints_bytes() {
        let key = SecretKey::new(&[0xAB; 16]).expect("16-byte key");
        assert_eq!(format!("{key:?}"), "SecretKey(AES-128, redacted)");
        assert_eq!(
            format!("{:?}", SecretKey::new(&[1; 32]).expect("32-byte key")),
            "SecretKey(AES-256, redacted)"
        );
    }

    #[test]
    fn secret_key_rejects_bad_lengths() {
        for n in [0, 15, 17, 24, 31, 33] {
            assert_eq!(
                SecretKey::new(&vec![0; n]).err(),
                Some(CryptoError::KeyLength(n))
            );
        }
    }

    #[test]
    fn icv_len_round_trips_and_rejects_others() {
        for icv in IcvLen::ALL {
            assert_eq!(IcvLen::from_bytes(icv.bytes()), Ok(icv));
        }
        assert_eq!(IcvLen::from_bytes(4), Err(CryptoError::IcvLength(4)));
    }
}
