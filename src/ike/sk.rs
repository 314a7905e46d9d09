//! The Encrypted payload (RFC 7296 section 3.14) with AES-GCM and a
//! 16-byte ICV (RFC 5282).
//!
//! ```text
//!  | IKE header | [plain payloads] | SK generic header | IV (8) | ciphertext | ICV (16) |
//!  '------------------- AAD -----------------------'           plaintext = payloads | padding | pad length
//! ```
//!
//! RFC 5282 section 5.1: the AAD runs from the start of the IKE header to
//! the end of the Encrypted payload's generic header. Section 3.1: the
//! nonce is the 4-byte salt from the keying material followed by the
//! 8-byte explicit IV carried in the payload; the IV must never repeat
//! under one key, so the caller draws it at random per message (64 bits:
//! far past the number of IKE messages one SA exchanges).

use ring::aead;
use zeroize::Zeroizing;

use super::crypto::{Encr, IkeCryptoError, SALT_LEN};
use super::wire::chain;
use super::wire::consts::payload as ty;
use super::wire::header::{HEADER_LEN, Header, IkeHeader};
use super::wire::{Payload, WireError};

pub const IV_LEN: usize = 8;
pub const ICV_LEN: usize = 16;

/// Why a protected message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SkError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Crypto(#[from] IkeCryptoError),
    #[error("the message has no Encrypted payload")]
    NotEncrypted,
    /// The ICV was good but the payloads inside are malformed: unlike the
    /// others, this one came from the peer and deserves an answer
    /// (INVALID_SYNTAX or UNSUPPORTED_CRITICAL_PAYLOAD, RFC 7296 sections
    /// 2.5 and 2.21.2).
    #[error("authenticated but malformed: {0}")]
    Inner(WireError),
}

/// One direction's key and salt (SK_ei or SK_er).
pub struct SkKey {
    key: aead::LessSafeKey,
    salt: Zeroizing<[u8; SALT_LEN]>,
}

impl std::fmt::Debug for SkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SkKey(redacted)")
    }
}

impl SkKey {
    /// `material` is key || salt, as the key schedule produces it.
    pub fn new(encr: Encr, material: &[u8]) -> Result<Self, IkeCryptoError> {
        if material.len() != encr.material_len() {
            return Err(IkeCryptoError::KeyLength);
        }
        let alg = match encr {
            Encr::AesGcm16_128 => &aead::AES_128_GCM,
            Encr::AesGcm16_256 => &aead::AES_256_GCM,
        };
        let (k, s) = material.split_at(encr.key_len());
        let key = aead::UnboundKey::new(alg, k).map_err(|_| IkeCryptoError::KeyLength)?;
        let mut salt = Zeroizing::new([0u8; SALT_LEN]);
        salt.copy_from_slice(s);
        Ok(SkKey {
            key: aead::LessSafeKey::new(key),
            salt,
        })
    }

    fn nonce(&self, iv: &[u8]) -> aead::Nonce {
        let mut n = [0u8; aead::NONCE_LEN];
        n[..SALT_LEN].copy_from_slice(&*self.salt);
        n[SALT_LEN..].copy_from_slice(iv);
        aead::Nonce::assume_unique_for_key(n)
    }
}

/// A protected message, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub header: Header,
    /// Payloads before the Encrypted payload: authenticated, not secret.
    /// Empty in every exchange of RFC 7296; kept for RFC 7383 fragments.
    pub plain: Vec<Payload>,
    pub inner: Vec<Payload>,
}

/// Builds a protected message: `header`, then an Encrypted payload holding
/// `inner`, with no padding (GCM needs no alignment, RFC 5282 section 3).
pub fn seal(
    header: &Header,
    inner: &[Payload],
    key: &SkKey,
    iv: [u8; IV_LEN],
) -> Result<Vec<u8>, SkError> {
    let mut plaintext = Vec::new();
    let first = chain::emit(inner, &mut plaintext)?;
    plaintext.push(0); // pad length
    seal_plaintext(header, first, &plaintext, key, iv)
}

/// Seals a plaintext that already ends in its padding and pad length.
pub(crate) fn seal_plaintext(
    header: &Header,
    first: u8,
    plaintext: &[u8],
    key: &SkKey,
    iv: [u8; IV_LEN],
) -> Result<Vec<u8>, SkError> {
    let sk_len = chain::GENERIC_LEN + IV_LEN + plaintext.len() + ICV_LEN;
    let sk_len16 = u16::try_from(sk_len).map_err(|_| WireError::TooLong)?;
    let mut out = vec![0u8; HEADER_LEN + sk_len];
    header.emit(&mut out, ty::SK)?;
    let aad_end = HEADER_LEN + chain::GENERIC_LEN;
    out[HEADER_LEN] = first;
    out[HEADER_LEN + 2..aad_end].copy_from_slice(&sk_len16.to_be_bytes());
    out[aad_end..aad_end + IV_LEN].copy_from_slice(&iv);
    let (head, body) = out.split_at_mut(aad_end + IV_LEN);
    let (pt, icv) = body.split_at_mut(plaintext.len());
    pt.copy_from_slice(plaintext);
    let tag = key
        .key
        .seal_in_place_separate_tag(key.nonce(&iv), aead::Aad::from(&head[..aad_end]), pt)
        .map_err(|_| IkeCryptoError::Decrypt)?;
    icv.copy_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens a protected message: checks the ICV over the AAD, strips the
/// padding and parses the payloads inside.
pub fn open(bytes: &[u8], key: &SkKey) -> Result<Opened, SkError> {
    let view = IkeHeader::new_checked(bytes)?;
    let header = Header::parse(&view)?;
    let raw = chain::walk(view.next_payload(), &bytes[HEADER_LEN..], HEADER_LEN)?;
    let (sk, plain) = raw.split_last().ok_or(SkError::NotEncrypted)?;
    if sk.ty != ty::SK {
        return Err(SkError::NotEncrypted);
    }
    let plain = plain
        .iter()
        .map(Payload::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let body = sk.body;
    // IV, at least the pad length byte, and the ICV.
    if body.len() < IV_LEN + 1 + ICV_LEN {
        return Err(WireError::Truncated.into());
    }
    let aad = &bytes[..sk.offset + chain::GENERIC_LEN];
    let (iv, sealed) = body.split_at(IV_LEN);
    let mut buf = sealed.to_vec();
    let pt = key
        .key
        .open_in_place(key.nonce(iv), aead::Aad::from(aad), &mut buf)
        .map_err(|_| IkeCryptoError::Decrypt)?;
    // Section 3.14: the last octet is the pad length; the padding's
    // contents are the sender's choice and are not checked.
    let (&pad_len, rest) = pt.split_last().ok_or(IkeCryptoError::BadPadding)?;
    let end = rest
        .len()
        .checked_sub(usize::from(pad_len))
        .ok_or(IkeCryptoError::BadPadding)?;
    let inner_raw = chain::walk(sk.next, &rest[..end], 0).map_err(SkError::Inner)?;
    if inner_raw.iter().any(|p| p.ty == ty::SK) {
        return Err(SkError::Inner(WireError::Invalid(
            "nested Encrypted payload",
        )));
    }
    let inner = inner_raw
        .iter()
        .map(Payload::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(SkError::Inner)?;
    Ok(Opened {
        header,
        plain,
        inner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ike::wire::consts::{exchange, flags, notify};
    use crate::ike::wire::payload::{Identification, Notify};

    fn header() -> Header {
        Header {
            spi_i: 1,
            spi_r: 2,
            exchange: exchange::IKE_AUTH,
            flags: flags::INITIATOR,
            message_id: 1,
        }
    }

    fn inner() -> Vec<Payload> {
        vec![
            Payload::IdI(Identification::new(2, b"host.example".to_vec())),
            Payload::Notify(Notify::new(notify::USE_TRANSPORT_MODE, vec![])),
        ]
    }

    fn keys() -> Vec<(SkKey, SkKey)> {
        [Encr::AesGcm16_128, Encr::AesGcm16_256]
            .map(|e| {
                let m: Vec<u8> = (0..e.material_len() as u8).collect();
                let mut other = m.clone();
                other[0] ^= 1;
                (
                    SkKey::new(e, &m).expect("key"),
                    SkKey::new(e, &other).expect("key"),
                )
            })
            .into_iter()
            .collect()
    }

    #[test]
    fn round_trip_and_layout() {
        for (key, _) in keys() {
            let m = seal(&header(), &inner(), &key, [7; 8]).expect("seal");
            assert_eq!(m[16], ty::SK);
            assert_eq!(m[28], ty::IDI, "SK's next payload names the first inside");
            assert_eq!(
                &m[32..40],
                &[7; 8],
                "explicit IV follows the generic header"
            );
            let o = open(&m, &key).expect("open");
            assert_eq!(o.header, header());
            assert!(o.plain.is_empty());
            assert_eq!(o.inner, inner());
        }
    }

    #[test]
    fn every_byte_is_authenticated() {
        for (key, wrong) in keys() {
            let m = seal(&header(), &inner(), &key, [7; 8]).expect("seal");
            assert!(open(&m, &wrong).is_err(), "wrong key");
            for i in 0..m.len() {
                let mut t = m.clone();
                t[i] ^= 0x40;
                assert!(open(&t, &key).is_err(), "byte {i} flipped");
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let (key, _) = keys().remove(0);
        let m = seal(&header(), &inner(), &key, [7; 8]).expect("seal");
        for n in 0..m.len() {
            let mut t = m[..n].to_vec();
            assert!(open(&t, &key).is_err(), "prefix {n}");
            if n >= HEADER_LEN {
                t[24..28].copy_from_slice(&(n as u32).to_be_bytes());
                assert!(open(&t, &key).is_err(), "patched prefix {n}");
            }
        }
    }

    #[test]
    fn padding_is_accepted_and_bounded() {
        let (key, _) = keys().remove(0);
        let mut payloads = Vec::new();
        let first = chain::emit(&inner(), &mut payloads).expect("emit");
        // Any padding contents, any length that fits.
        let mut pt = payloads.clone();
        pt.extend_from_slice(&[0xee, 0xff, 0x00, 3]);
        let m = seal_plaintext(&header(), first, &pt, &key, [1; 8]).expect("seal");
        assert_eq!(open(&m, &key).expect("open").inner, inner());
        // A pad length longer than the plaintext.
        let mut pt = payloads.clone();
        pt.push(pt.len() as u8 + 1);
        let m = seal_plaintext(&header(), first, &pt, &key, [1; 8]).expect("seal");
        assert!(matches!(
            open(&m, &key),
            Err(SkError::Crypto(IkeCryptoError::BadPadding))
        ));
        // A pad length that cuts into the payloads.
        let mut pt = payloads;
        pt.extend_from_slice(&[0, 2]);
        let m = seal_plaintext(&header(), first, &pt, &key, [1; 8]).expect("seal");
        assert!(matches!(open(&m, &key), Err(SkError::Inner(_))));
    }

    #[test]
    fn unprotected_and_nested_are_refused() {
        let (key, _) = keys().remove(0);
        let plain = crate::ike::wire::Message {
            header: header(),
            payloads: inner(),
        }
        .emit()
        .expect("emit");
        assert_eq!(open(&plain, &key), Err(SkError::NotEncrypted));
        let nested = vec![Payload::Encrypted(crate::ike::wire::payload::Encrypted {
            inner_first: 0,
            data: vec![0; 30],
        })];
        let m = seal(&header(), &nested, &key, [2; 8]).expect("seal");
        assert!(matches!(
            open(&m, &key),
            Err(SkError::Inner(WireError::Invalid(_)))
        ));
    }
}
