//! Fault injection: a provider wrapper that reproduces the field failure.
//! Before sealing, with a given probability, it overwrites one
//! 16-byte-aligned plaintext block with its neighbour, then seals normally,
//! so the ICV is valid over wrong data.
//!
//! Used to prove that the self-tests catch the fault and move traffic to
//! `soft`, and that the receiver's inner checksum check drops it
//! (`esptun demo --corrupt`, the end-to-end tests). Compiled into every
//! build so the demo works in a release binary, but reachable from a daemon
//! only through [`crate::daemon::RunOptions::inject_faults`], which
//! `esptun run` never sets: the only caller is the hidden lab endpoint,
//! which refuses to start outside a lab network namespace
//! ([`crate::lab::lab_namespace`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::{AeadAlgorithm, AeadKey, CryptoError, IcvLen, NONCE_LEN, Provider, SecretKey};

/// Shared control of one wrapped provider: the rate can change while
/// running (a fault that appears after boot, as after a live migration).
#[derive(Debug)]
pub struct FaultInjector {
    /// Probability per seal, in parts per million.
    rate_ppm: AtomicU32,
    rng: AtomicU64,
    injected: AtomicU64,
}

impl FaultInjector {
    /// `rate` is clamped to 0.0..=1.0.
    pub fn set_rate(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
        self.rate_ppm.store(ppm, Ordering::Relaxed);
    }

    /// How many blocks have been corrupted so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// splitmix64: cheap, lock-free, and good enough to pick blocks.
    fn next(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Maybe corrupts `plaintext` in place; needs two whole blocks.
    fn maybe_corrupt(&self, plaintext: &mut [u8]) {
        let blocks = plaintext.len() / 16;
        let ppm = u64::from(self.rate_ppm.load(Ordering::Relaxed));
        if blocks < 2 || ppm == 0 || self.next() % 1_000_000 >= ppm {
            return;
        }
        // Block `dst` takes the contents of its predecessor or successor.
        let dst = 1 + (self.next() % (blocks as u64 - 1)) as usize;
        let src = if dst + 1 < blocks && self.next().is_multiple_of(2) {
            dst + 1
        } else {
            dst - 1
        };
        plaintext.copy_within(src * 16..src * 16 + 16, dst * 16);
        self.injected.fetch_add(1, Ordering::Relaxed);
    }
}

/// Wraps `inner` so that its seals are corrupted at `rate`. The returned
/// provider keeps `inner`'s slot and availability.
pub fn wrap(inner: Provider, rate: f64, seed: u64) -> (Provider, Arc<FaultInjector>) {
    let injector = Arc::new(FaultInjector {
        rate_ppm: AtomicU32::new(0),
        rng: AtomicU64::new(seed),
        injected: AtomicU64::new(0),
    });
    injector.set_rate(rate);
    let algorithm = Arc::new(FaultyAlgorithm {
        inner: inner.algorithm.clone(),
        injector: injector.clone(),
    });
    let provider = Provider {
        name: "fault-injected",
        algorithm,
        ..inner
    };
    (provider, injector)
}

struct FaultyAlgorithm {
    inner: Arc<dyn AeadAlgorithm>,
    injector: Arc<FaultInjector>,
}

impl AeadAlgorithm for FaultyAlgorithm {
    fn new_key(&self, key: &SecretKey, icv: IcvLen) -> Result<Box<dyn AeadKey>, CryptoError> {
        Ok(Box::new(FaultyKey {
            inner: self.inner.new_key(key, icv)?,
            injector: self.injector.clone(),
        }))
    }
}

struct FaultyKey {
    inner: Box<dyn AeadKey>,
    injector: Arc<FaultInjector>,
}

impl AeadKey for FaultyKey {
    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.injector.maybe_corrupt(in_out);
        self.inner.seal_in_place(nonce, aad, in_out, tag)
    }

    fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner.open_in_place(nonce, aad, in_out, tag)
    }

    fn icv_len(&self) -> IcvLen {
        self.inner.icv_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::soft;

    #[test]
    fn corruption_repeats_a_neighbouring_aligned_block() {
        let (_, injector) = wrap(soft::provider(), 1.0, 7);
        for len in [32, 47, 64, 1400] {
            let original: Vec<u8> = (0..len).map(|i| (i / 16) as u8 + 1).collect();
            let mut data = original.clone();
            injector.maybe_corrupt(&mut data);
            let changed: Vec<usize> = (0..len / 16)
                .filter(|b| data[b * 16..b * 16 + 16] != original[b * 16..b * 16 + 16])
                .collect();
            assert_eq!(changed.len(), 1, "exactly one block changes (len {len})");
            let b = changed[0];
            let block = &data[b * 16..b * 16 + 16];
            let neighbour = |n: usize| original.get(n * 16..n * 16 + 16);
            assert!(neighbour(b - 1) == Some(block) || neighbour(b + 1) == Some(block));
            assert_eq!(
                data[len / 16 * 16..],
                original[len / 16 * 16..],
                "tail untouched"
            );
        }
        assert_eq!(injector.injected(), 4);
    }

    #[test]
    fn rate_zero_and_short_messages_are_left_alone() {
        let (_, injector) = wrap(soft::provider(), 0.0, 1);
        let mut data = vec![1u8; 1400];
        injector.maybe_corrupt(&mut data);
        injector.set_rate(1.0);
        let mut short = vec![2u8; 31];
        injector.maybe_corrupt(&mut short);
        assert!(data.iter().all(|&b| b == 1) && short.iter().all(|&b| b == 2));
        assert_eq!(injector.injected(), 0);
    }
}
