//! The IKEv2 cryptography: Diffie-Hellman, the PRF and prf+, the key
//! schedule and PSK authentication (RFC 7296 sections 2.13 to 2.17), all
//! over ring.
//!
//! Every secret (DH shared secret, SKEYSEED, SK_*, KEYMAT, the PSK pad
//! key) lives in a zeroizing buffer, and no type here prints a secret in
//! its `Debug` output. Randomness comes through [`Randomness`] so that the
//! state machines above can be driven deterministically in tests.

use ring::agreement;
use ring::hmac;
use zeroize::Zeroizing;

use super::wire::consts::transform as tid;
use crate::sa::KeyMaterial;

/// Why an IKE cryptographic operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IkeCryptoError {
    #[error("the random number generator failed")]
    Random,
    #[error("Diffie-Hellman group {0} is not supported")]
    UnsupportedGroup(u16),
    #[error("the peer's Diffie-Hellman public value is invalid")]
    BadPublicKey,
    #[error("prf+ cannot produce {0} bytes")]
    PrfPlusTooLong(usize),
    #[error("key material has the wrong length")]
    KeyLength,
    #[error("the Encrypted payload failed to decrypt or authenticate")]
    Decrypt,
    #[error("the Encrypted payload's padding is invalid")]
    BadPadding,
}

/// Where random bytes and Diffie-Hellman private keys come from. ring's
/// own generator is sealed, so key generation is part of the seam: the
/// production implementation draws both from the operating system, a test
/// implementation can make a whole exchange reproducible.
pub trait Randomness {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), IkeCryptoError>;
    fn dh_private(&mut self, group: DhGroup) -> Result<DhPrivate, IkeCryptoError>;
}

/// The operating system's generator, through ring.
#[derive(Debug)]
pub struct SystemRandomness(ring::rand::SystemRandom);

impl SystemRandomness {
    pub fn new() -> Self {
        SystemRandomness(ring::rand::SystemRandom::new())
    }
}

impl Default for SystemRandomness {
    fn default() -> Self {
        Self::new()
    }
}

impl Randomness for SystemRandomness {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), IkeCryptoError> {
        ring::rand::SecureRandom::fill(&self.0, dest).map_err(|_| IkeCryptoError::Random)
    }

    fn dh_private(&mut self, group: DhGroup) -> Result<DhPrivate, IkeCryptoError> {
        let key = agreement::EphemeralPrivateKey::generate(group.algorithm(), &self.0)
            .map_err(|_| IkeCryptoError::Random)?;
        DhPrivate::from_ring(group, key)
    }
}

/// The Diffie-Hellman groups we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhGroup {
    /// Group 19, RFC 5903.
    Ecp256,
    /// Group 31, RFC 8031.
    Curve25519,
}

impl DhGroup {
    pub fn id(self) -> u16 {
        match self {
            DhGroup::Ecp256 => tid::DH_ECP_256,
            DhGroup::Curve25519 => tid::DH_CURVE25519,
        }
    }

    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            tid::DH_ECP_256 => Some(DhGroup::Ecp256),
            tid::DH_CURVE25519 => Some(DhGroup::Curve25519),
            _ => None,
        }
    }

    /// The KE payload's data length: RFC 5903 section 7 (x || y, 64
    /// bytes), RFC 8031 section 2 (32 bytes).
    pub fn public_len(self) -> usize {
        match self {
            DhGroup::Ecp256 => 64,
            DhGroup::Curve25519 => 32,
        }
    }

    fn algorithm(self) -> &'static agreement::Algorithm {
        match self {
            DhGroup::Ecp256 => &agreement::ECDH_P256,
            DhGroup::Curve25519 => &agreement::X25519,
        }
    }
}

/// Our half of one Diffie-Hellman exchange. Used once (ring's ephemeral
/// key is consumed by the agreement).
pub struct DhPrivate {
    group: DhGroup,
    key: agreement::EphemeralPrivateKey,
    public: Vec<u8>,
}

impl std::fmt::Debug for DhPrivate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DhPrivate({:?}, private key redacted)", self.group)
    }
}

impl DhPrivate {
    /// Wraps a ring key of `group`'s algorithm.
    pub fn from_ring(
        group: DhGroup,
        key: agreement::EphemeralPrivateKey,
    ) -> Result<Self, IkeCryptoError> {
        if key.algorithm() != group.algorithm() {
            return Err(IkeCryptoError::UnsupportedGroup(group.id()));
        }
        let public = key
            .compute_public_key()
            .map_err(|_| IkeCryptoError::Random)?;
        let public = match group {
            // ring gives the SEC1 uncompressed point 0x04 || x || y; RFC
            // 5903 section 7 sends x || y without the prefix.
            DhGroup::Ecp256 => public.as_ref().get(1..).unwrap_or_default().to_vec(),
            DhGroup::Curve25519 => public.as_ref().to_vec(),
        };
        if public.len() != group.public_len() {
            return Err(IkeCryptoError::BadPublicKey);
        }
        Ok(DhPrivate { group, key, public })
    }

    pub fn group(&self) -> DhGroup {
        self.group
    }

    /// The KE payload's key exchange data.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The shared secret g^ir with the peer's KE data. ring validates the
    /// peer's point (on the curve, for ECP) and refuses an all-zero X25519
    /// result (a small-order point, RFC 7748 section 6.1, which RFC 8031
    /// section 2.3 says MUST be refused); we check the latter again because
    /// the rule matters more than the dependency's version.
    pub fn agree(self, peer: &[u8]) -> Result<SharedSecret, IkeCryptoError> {
        if peer.len() != self.group.public_len() {
            return Err(IkeCryptoError::BadPublicKey);
        }
        let mut point = Vec::with_capacity(65);
        if self.group == DhGroup::Ecp256 {
            point.push(0x04);
        }
        point.extend_from_slice(peer);
        let peer = agreement::UnparsedPublicKey::new(self.group.algorithm(), &point);
        // RFC 5903 section 7: the shared secret is the x coordinate only,
        // which is what ring's ECDH returns.
        let secret = agreement::agree_ephemeral(self.key, &peer, |z| Zeroizing::new(z.to_vec()))
            .map_err(|_| IkeCryptoError::BadPublicKey)?;
        if secret.iter().all(|&b| b == 0) {
            return Err(IkeCryptoError::BadPublicKey);
        }
        Ok(SharedSecret(secret))
    }
}

/// g^ir (section 2.14). Never printed.
pub struct SharedSecret(Zeroizing<Vec<u8>>);

impl SharedSecret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(redacted)")
    }
}

/// A secret byte string (SKEYSEED, SK_*, AUTH keys). Never printed.
pub type Secret = Zeroizing<Vec<u8>>;

/// The pseudorandom functions we implement (RFC 4868 section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prf {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl Prf {
    pub fn id(self) -> u16 {
        match self {
            Prf::HmacSha256 => tid::PRF_HMAC_SHA2_256,
            Prf::HmacSha384 => tid::PRF_HMAC_SHA2_384,
            Prf::HmacSha512 => tid::PRF_HMAC_SHA2_512,
        }
    }

    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            tid::PRF_HMAC_SHA2_256 => Some(Prf::HmacSha256),
            tid::PRF_HMAC_SHA2_384 => Some(Prf::HmacSha384),
            tid::PRF_HMAC_SHA2_512 => Some(Prf::HmacSha512),
            _ => None,
        }
    }

    fn algorithm(self) -> hmac::Algorithm {
        match self {
            Prf::HmacSha256 => hmac::HMAC_SHA256,
            Prf::HmacSha384 => hmac::HMAC_SHA384,
            Prf::HmacSha512 => hmac::HMAC_SHA512,
        }
    }

    /// Output length, which RFC 4868 section 2.1.2 also makes the key
    /// length of SK_d, SK_pi and SK_pr (section 2.14: "the preferred key
    /// length" of the PRF).
    pub fn output_len(self) -> usize {
        match self {
            Prf::HmacSha256 => 32,
            Prf::HmacSha384 => 48,
            Prf::HmacSha512 => 64,
        }
    }

    /// `prf(key, data[0] | data[1] | ...)`.
    pub fn prf(self, key: &[u8], data: &[&[u8]]) -> Secret {
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(self.algorithm(), key));
        for d in data {
            ctx.update(d);
        }
        Zeroizing::new(ctx.sign().as_ref().to_vec())
    }

    /// Checks `tag == prf(key, data...)` in constant time.
    pub fn verify(self, key: &[u8], data: &[&[u8]], tag: &[u8]) -> bool {
        let expected = self.prf(key, data);
        crate::crypto::ct_eq(&expected, tag)
    }

    /// Section 2.13: prf+(K, S) = T1 | T2 | ..., Tn = prf(K, Tn-1 | S | n),
    /// n a single octet, so at most 255 blocks.
    pub fn prf_plus(
        self,
        key: &[u8],
        seed: &[&[u8]],
        len: usize,
    ) -> Result<Secret, IkeCryptoError> {
        if len > 255 * self.output_len() {
            return Err(IkeCryptoError::PrfPlusTooLong(len));
        }
        let mut out = Zeroizing::new(Vec::with_capacity(len + self.output_len()));
        let mut t: Secret = Zeroizing::new(Vec::new());
        let mut n = 1u8;
        while out.len() < len {
            let mut data: Vec<&[u8]> = Vec::with_capacity(seed.len() + 2);
            data.push(&t);
            data.extend_from_slice(seed);
            let counter = [n];
            data.push(&counter);
            t = self.prf(key, &data);
            out.extend_from_slice(&t);
            n = n.wrapping_add(1);
        }
        out.truncate(len);
        Ok(out)
    }
}

/// ENCR transforms we implement: AES-GCM with a 16-byte ICV (RFC 5282 for
/// IKE, RFC 4106 for ESP), by key length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encr {
    AesGcm16_128,
    AesGcm16_256,
}

impl Encr {
    pub fn from_key_bits(bits: u16) -> Option<Self> {
        match bits {
            128 => Some(Encr::AesGcm16_128),
            256 => Some(Encr::AesGcm16_256),
            _ => None,
        }
    }

    pub fn key_bits(self) -> u16 {
        match self {
            Encr::AesGcm16_128 => 128,
            Encr::AesGcm16_256 => 256,
        }
    }

    pub fn key_len(self) -> usize {
        usize::from(self.key_bits()) / 8
    }

    /// Key and 4-byte salt: the keying material one direction takes (RFC
    /// 5282 section 7.1 for IKE, RFC 4106 section 8.1 for ESP).
    pub fn material_len(self) -> usize {
        self.key_len() + SALT_LEN
    }
}

pub const SALT_LEN: usize = 4;

/// The IKE SA's keys (section 2.14). SK_ai and SK_ar are absent: AES-GCM
/// is a combined-mode cipher and takes no integrity keys (RFC 5282
/// section 8).
pub struct IkeKeys {
    pub prf: Prf,
    pub encr: Encr,
    pub sk_d: Secret,
    /// Key || salt protecting initiator-to-responder messages.
    pub sk_ei: Secret,
    pub sk_er: Secret,
    pub sk_pi: Secret,
    pub sk_pr: Secret,
}

impl std::fmt::Debug for IkeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IkeKeys({:?}, {:?}, keys redacted)", self.prf, self.encr)
    }
}

impl IkeKeys {
    /// Section 2.14:
    /// SKEYSEED = prf(Ni | Nr, g^ir);
    /// {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}
    ///     = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr).
    /// HMAC takes a key of any length, so Ni | Nr is used whole.
    pub fn derive(
        prf: Prf,
        encr: Encr,
        shared: &SharedSecret,
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> Result<Self, IkeCryptoError> {
        let mut nonces = Zeroizing::new(Vec::with_capacity(ni.len() + nr.len()));
        nonces.extend_from_slice(ni);
        nonces.extend_from_slice(nr);
        let skeyseed = prf.prf(&nonces, &[shared.expose()]);
        Self::expand(prf, encr, &skeyseed, ni, nr, spi_i, spi_r)
    }

    /// Section 2.18, rekeying the IKE SA:
    /// SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the old SA's
    /// PRF, then the keys as in section 2.14 with the new SA's PRF, the
    /// new nonces and the new SPIs.
    #[allow(clippy::too_many_arguments)]
    pub fn derive_rekey(
        old_prf: Prf,
        old_sk_d: &[u8],
        prf: Prf,
        encr: Encr,
        shared: &SharedSecret,
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> Result<Self, IkeCryptoError> {
        let skeyseed = old_prf.prf(old_sk_d, &[shared.expose(), ni, nr]);
        Self::expand(prf, encr, &skeyseed, ni, nr, spi_i, spi_r)
    }

    /// {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}
    ///     = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr).
    fn expand(
        prf: Prf,
        encr: Encr,
        skeyseed: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> Result<Self, IkeCryptoError> {
        let (p, e) = (prf.output_len(), encr.material_len());
        let km = prf.prf_plus(
            skeyseed,
            &[ni, nr, &spi_i.to_be_bytes(), &spi_r.to_be_bytes()],
            3 * p + 2 * e,
        )?;
        let mut at = 0;
        let mut take = |n: usize| {
            let s = Zeroizing::new(km[at..at + n].to_vec());
            at += n;
            s
        };
        Ok(IkeKeys {
            prf,
            encr,
            sk_d: take(p),
            sk_ei: take(e),
            sk_er: take(e),
            sk_pi: take(p),
            sk_pr: take(p),
        })
    }
}

/// A CHILD SA's keys, by direction of the exchange that created it.
#[derive(Debug)]
pub struct ChildKeys {
    pub initiator_to_responder: KeyMaterial,
    pub responder_to_initiator: KeyMaterial,
}

/// Section 2.17: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr), the nonces
/// of the exchange that creates the CHILD SA. The first key is for the
/// direction from that exchange's initiator to its responder, the second
/// for the reverse; each is key || 4-byte salt for AES-GCM (RFC 4106
/// section 8.1). `pfs` is the new DH secret of a CREATE_CHILD_SA with KE.
pub fn child_keys(
    prf: Prf,
    sk_d: &[u8],
    pfs: Option<&SharedSecret>,
    ni: &[u8],
    nr: &[u8],
    encr: Encr,
) -> Result<ChildKeys, IkeCryptoError> {
    let e = encr.material_len();
    let mut seed: Vec<&[u8]> = Vec::with_capacity(3);
    if let Some(s) = pfs {
        seed.push(s.expose());
    }
    seed.push(ni);
    seed.push(nr);
    let km = prf.prf_plus(sk_d, &seed, 2 * e)?;
    let material = |b: &[u8]| KeyMaterial::from_bytes(b).map_err(|_| IkeCryptoError::KeyLength);
    Ok(ChildKeys {
        initiator_to_responder: material(&km[..e])?,
        responder_to_initiator: material(&km[e..])?,
    })
}

/// Section 2.15: the pad string mixed into the shared key.
const KEY_PAD: &[u8] = b"Key Pad for IKEv2";

/// What one side's AUTH payload covers (section 2.15): its first message
/// as sent, the peer's nonce, and prf(SK_px, its ID payload body).
pub struct SignedOctets<'a> {
    pub message: &'a [u8],
    pub peer_nonce: &'a [u8],
    pub sk_p: &'a [u8],
    pub id_body: &'a [u8],
}

/// Section 2.15, shared key:
/// `AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)`.
pub fn psk_auth(prf: Prf, psk: &[u8], s: &SignedOctets<'_>) -> Secret {
    let pad_key = prf.prf(psk, &[KEY_PAD]);
    let maced_id = prf.prf(s.sk_p, &[s.id_body]);
    prf.prf(&pad_key, &[s.message, s.peer_nonce, &maced_id])
}

/// Checks a received PSK AUTH in constant time.
pub fn verify_psk_auth(prf: Prf, psk: &[u8], s: &SignedOctets<'_>, auth: &[u8]) -> bool {
    let expected = psk_auth(prf, psk, s);
    crate::crypto::ct_eq(&expected, auth)
}

#[cfg(test)]
#[path = "crypto_tests.rs"]
pub(crate) mod tests;
