//! Power-on and periodic self-tests, after Linux `crypto/testmgr.c`: every
//! provider runs every known-answer vector before it may carry a packet, and
//! the hardware provider keeps being compared with the software one on a long
//! message while running.
//!
//! The long-message check exists for the field failure: AES-NI code running
//! with corrupted XMM state produced wrong 16-byte blocks that GCM then
//! authenticated. One KAT on a few blocks would likely miss a fault that
//! depends on the scheduler, so the check seals more than 1 MiB in many
//! pieces of packet-like sizes, yielding the CPU between pieces (so the
//! register state is saved and restored around each piece, and the large
//! pieces run long enough to be preempted), and compares every byte and tag
//! with a reference the soft provider computed once at start.

use std::ops::Range;
use std::time::Instant;

use super::vectors::AeadVector;
use super::{AeadKey, IcvLen, MAX_ICV_LEN, NONCE_LEN, Provider, ProviderId, SecretKey};

/// Result of running the known-answer vectors against one provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KatReport {
    pub passed: u32,
    pub failed: u32,
    /// `vector: what went wrong`, for each failed vector.
    pub failures: Vec<String>,
}

impl KatReport {
    pub fn all_passed(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }
}

/// Runs every vector against `provider`. A valid vector passes when seal
/// gives the expected ciphertext and tag, open gives the plaintext back (both
/// in place, at an aligned and an unaligned offset), and one flipped bit in
/// the tag, the ciphertext or the AAD makes open fail. An invalid vector
/// passes when open rejects it.
pub fn run_kats(provider: &Provider, vectors: &[AeadVector]) -> KatReport {
    let mut report = KatReport::default();
    for v in vectors {
        match check_vector(provider, v) {
            Ok(()) => report.passed += 1,
            Err(what) => {
                report.failed += 1;
                report.failures.push(format!("{}: {what}", v.name));
            }
        }
    }
    report
}

fn check_vector(provider: &Provider, v: &AeadVector) -> Result<(), String> {
    let icv = v.icv_len().ok_or("unsupported tag length")?;
    let secret = SecretKey::new(&v.key).map_err(|e| e.to_string())?;
    let key = provider.new_key(&secret, icv).map_err(|e| e.to_string())?;
    if !v.valid {
        return match open_at(key.as_ref(), v, &v.aad, &v.ct, &v.tag, 0) {
            Ok(_) => Err("an invalid case was accepted".into()),
            Err(()) => Ok(()),
        };
    }
    // Offset 1 puts the data off any natural alignment; SIMD code with an
    // alignment assumption fails there.
    for offset in [0, 1] {
        let mut buf = vec![0u8; offset + v.pt.len()];
        buf[offset..].copy_from_slice(&v.pt);
        let mut tag = [0u8; MAX_ICV_LEN];
        let tag = &mut tag[..icv.bytes()];
        key.seal_in_place(&v.nonce, &v.aad, &mut buf[offset..], tag)
            .map_err(|e| format!("seal at offset {offset}: {e}"))?;
        if buf[offset..] != v.ct[..] {
            return Err(format!("seal at offset {offset}: wrong ciphertext"));
        }
        if tag != &v.tag[..] {
            return Err(format!("seal at offset {offset}: wrong tag"));
        }
        let pt = open_at(key.as_ref(), v, &v.aad, &v.ct, &v.tag, offset)
            .map_err(|()| format!("open at offset {offset}: rejected a valid case"))?;
        if pt != v.pt {
            return Err(format!("open at offset {offset}: wrong plaintext"));
        }
    }
    // Negative cases derived from the valid one: each must be rejected.
    let mut tag = v.tag.clone();
    tag[0] ^= 0x01;
    if open_at(key.as_ref(), v, &v.aad, &v.ct, &tag, 0).is_ok() {
        return Err("accepted a tag with one bit flipped".into());
    }
    if !v.ct.is_empty() {
        let mut ct = v.ct.clone();
        let last = ct.len() - 1;
        ct[last] ^= 0x80;
        if open_at(key.as_ref(), v, &v.aad, &ct, &v.tag, 0).is_ok() {
            return Err("accepted a ciphertext with one bit flipped".into());
        }
    }
    if !v.aad.is_empty() {
        let mut aad = v.aad.clone();
        aad[0] ^= 0x01;
        if open_at(key.as_ref(), v, &aad, &v.ct, &v.tag, 0).is_ok() {
            return Err("accepted AAD with one bit flipped".into());
        }
    }
    Ok(())
}

fn open_at(
    key: &dyn AeadKey,
    v: &AeadVector,
    aad: &[u8],
    ct: &[u8],
    tag: &[u8],
    offset: usize,
) -> Result<Vec<u8>, ()> {
    let mut buf = vec![0u8; offset + ct.len()];
    buf[offset..].copy_from_slice(ct);
    key.open_in_place(&v.nonce, aad, &mut buf[offset..], tag)
        .map_err(|_| ())?;
    Ok(buf.split_off(offset))
}

/// At least this many bytes go through the long-message check.
pub const LONG_MESSAGE_BYTES: usize = 1 << 20;

/// Piece sizes cycled through: packet sizes (64, 576, 1400, 1500, 9000),
/// a 64 KiB GSO-sized piece, and odd sizes that end mid-block.
const PIECE_SIZES: [usize; 11] = [1400, 64, 9000, 65536, 576, 1, 16, 4095, 1500, 32768, 17];

/// A self-test failure, with enough detail to recognise the field pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum SelfTestFailure {
    #[error("{provider} could not create a key: {reason}")]
    Key {
        provider: ProviderId,
        reason: String,
    },
    #[error(
        "{provider} sealed piece {piece} wrong at byte {offset} of the long message{}",
        if *repeats_neighbour { " (the block repeats its neighbour: the field corruption pattern)" } else { "" }
    )]
    WrongCiphertext {
        provider: ProviderId,
        piece: usize,
        offset: usize,
        /// The hardware sealed a 16-byte plaintext block equal to the block
        /// before or after it, as in the field.
        repeats_neighbour: bool,
    },
    #[error("{provider} produced a wrong tag for piece {piece} of the long message")]
    WrongTag { provider: ProviderId, piece: usize },
    #[error("{provider} rejected or mis-decrypted piece {piece} of the long message")]
    WrongOpen { provider: ProviderId, piece: usize },
}

/// What one successful long-message check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LongMessageStats {
    pub bytes: usize,
    pub pieces: usize,
    pub micros: u64,
}

/// The plaintext, piece layout and soft-provider result of the long-message
/// check, computed once at start. About 2 MiB of memory.
pub struct LongMessageReference {
    keys: [SecretKey; 2],
    plaintext: Vec<u8>,
    pieces: Vec<Range<usize>>,
    expected: Vec<u8>,
    expected_tags: Vec<[u8; MAX_ICV_LEN]>,
}

impl std::fmt::Debug for LongMessageReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongMessageReference")
            .field("bytes", &self.plaintext.len())
            .field("pieces", &self.pieces.len())
            .finish_non_exhaustive()
    }
}

impl LongMessageReference {
    /// Builds the message and seals it with `reference` (the soft provider).
    pub fn compute(reference: &Provider) -> Result<Self, SelfTestFailure> {
        let mut pieces = Vec::new();
        let mut total = 0;
        for size in PIECE_SIZES.iter().cycle() {
            if total >= LONG_MESSAGE_BYTES {
                break;
            }
            pieces.push(total..total + size);
            total += size;
        }
        // Every 16-byte block differs from its neighbours, so a block that
        // repeats a neighbour (the field pattern) always changes the output.
        // An all-zero message would hide exactly that corruption.
        let plaintext: Vec<u8> = (0..total)
            .map(|i| {
                let block = (i / 16) as u64;
                let mixed = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i % 16) as u64;
                (mixed >> 24) as u8 ^ (i % 16) as u8
            })
            .collect();
        // Public test keys, one per AES key size; pieces alternate between them.
        let keys = [
            test_key(16, 0x11).map_err(|r| key_err(reference.id, r))?,
            test_key(32, 0x42).map_err(|r| key_err(reference.id, r))?,
        ];
        let aead = make_keys(reference, &keys)?;
        let mut expected = plaintext.clone();
        let mut expected_tags = Vec::with_capacity(pieces.len());
        for (i, range) in pieces.iter().enumerate() {
            let mut tag = [0u8; MAX_ICV_LEN];
            aead[i % 2]
                .seal_in_place(
                    &piece_nonce(i),
                    &piece_aad(i),
                    &mut expected[range.clone()],
                    &mut tag,
                )
                .map_err(|e| key_err(reference.id, e.to_string()))?;
            expected_tags.push(tag);
        }
        Ok(LongMessageReference {
            keys,
            plaintext,
            pieces,
            expected,
            expected_tags,
        })
    }

    /// Seals the message with `provider` piece by piece, yielding between
    /// pieces, compares with the reference, then opens every piece back.
    pub fn check(&self, provider: &Provider) -> Result<LongMessageStats, SelfTestFailure> {
        let start = Instant::now();
        let aead = make_keys(provider, &self.keys)?;
        let id = provider.id;
        let mut buf = self.plaintext.clone();
        let mut tags = vec![[0u8; MAX_ICV_LEN]; self.pieces.len()];
        for (i, range) in self.pieces.iter().enumerate() {
            aead[i % 2]
                .seal_in_place(
                    &piece_nonce(i),
                    &piece_aad(i),
                    &mut buf[range.clone()],
                    &mut tags[i],
                )
                .map_err(|e| key_err(id, e.to_string()))?;
            // A context switch between pieces: the next piece starts on
            // register state the kernel restored.
            std::thread::yield_now();
        }
        for (i, range) in self.pieces.iter().enumerate() {
            if buf[range.clone()] != self.expected[range.clone()] {
                return Err(self.describe_wrong_ciphertext(id, i, &buf));
            }
            if tags[i] != self.expected_tags[i] {
                return Err(SelfTestFailure::WrongTag {
                    provider: id,
                    piece: i,
                });
            }
        }
        for (i, range) in self.pieces.iter().enumerate() {
            let opened = aead[i % 2].open_in_place(
                &piece_nonce(i),
                &piece_aad(i),
                &mut buf[range.clone()],
                &self.expected_tags[i],
            );
            if opened.is_err() || buf[range.clone()] != self.plaintext[range.clone()] {
                return Err(SelfTestFailure::WrongOpen {
                    provider: id,
                    piece: i,
                });
            }
            std::thread::yield_now();
        }
        Ok(LongMessageStats {
            bytes: buf.len(),
            pieces: self.pieces.len(),
            micros: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    /// Locates the first wrong byte of piece `i` and recovers the plaintext
    /// block the provider actually encrypted (ciphertext XOR the reference
    /// keystream) to see whether it is a copy of a neighbouring block.
    fn describe_wrong_ciphertext(
        &self,
        provider: ProviderId,
        i: usize,
        got: &[u8],
    ) -> SelfTestFailure {
        let range = self.pieces[i].clone();
        let rel = got[range.clone()]
            .iter()
            .zip(&self.expected[range.clone()])
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let block_start = rel - rel % 16;
        let block = |buf: &[u8], b: usize| -> Option<Vec<u8>> {
            let s = range.start + b;
            let e = (s + 16).min(range.end);
            (b < range.len()).then(|| buf[s..e].to_vec())
        };
        let sealed_pt: Option<Vec<u8>> = block(got, block_start).map(|c| {
            let want_c = block(&self.expected, block_start).unwrap_or_default();
            let want_p = block(&self.plaintext, block_start).unwrap_or_default();
            c.iter()
                .zip(&want_c)
                .zip(&want_p)
                .map(|((c, wc), wp)| c ^ wc ^ wp)
                .collect()
        });
        let neighbour = |b: Option<usize>| b.and_then(|b| block(&self.plaintext, b));
        let repeats_neighbour = sealed_pt.is_some_and(|p| {
            [
                neighbour(block_start.checked_sub(16)),
                neighbour(Some(block_start + 16)),
            ]
            .into_iter()
            .flatten()
            .any(|n| n.len() == p.len() && n == p)
        });
        SelfTestFailure::WrongCiphertext {
            provider,
            piece: i,
            offset: range.start + rel,
            repeats_neighbour,
        }
    }
}

fn key_err(provider: ProviderId, reason: String) -> SelfTestFailure {
    SelfTestFailure::Key { provider, reason }
}

fn test_key(len: usize, seed: u8) -> Result<SecretKey, String> {
    let bytes: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(31) ^ seed).collect();
    SecretKey::new(&bytes).map_err(|e| e.to_string())
}

fn make_keys(
    provider: &Provider,
    keys: &[SecretKey; 2],
) -> Result<[Box<dyn AeadKey>; 2], SelfTestFailure> {
    let make = |k: &SecretKey| {
        provider
            .new_key(k, IcvLen::Icv16)
            .map_err(|e| key_err(provider.id, e.to_string()))
    };
    Ok([make(&keys[0])?, make(&keys[1])?])
}

fn piece_nonce(i: usize) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(b"selt");
    n[4..].copy_from_slice(&(i as u64).to_be_bytes());
    n
}

/// ESP-shaped AAD: SPI || sequence number.
fn piece_aad(i: usize) -> [u8; 8] {
    let mut a = [0u8; 8];
    a[..4].copy_from_slice(&0x5E1F_7E57u32.to_be_bytes());
    a[4..].copy_from_slice(&(i as u32).to_be_bytes());
    a
}
