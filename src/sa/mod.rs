//! Security associations: SPI, keys per provider, salt, sequence numbers
//! (ESN), the anti-replay window, inner addresses and counters.
//!
//! Invariants:
//! - An outbound SA never hands out a sequence number twice and never
//!   passes its ceiling: 0 until its owner grants a durably recorded
//!   reservation ([`reservation`]: durable, keyed by a hash of the key),
//!   and never above the hard limit of the sequence space (RFC 4303
//!   section 3.3.3: the counter must not cycle). Since the IV is the sequence number,
//!   this is what makes (key, nonce) reuse impossible.
//! - An SA holds one key object per provider that passed its self-tests,
//!   so a switch of provider needs no rekeying.

pub mod fresh;
pub mod keymgr;
pub mod lifecycle;
pub mod replay;
pub mod reservation;
pub mod table;

use std::net::IpAddr;

use zeroize::Zeroizing;

use crate::crypto::select::Selector;
use crate::crypto::{AeadKey, CryptoError, IcvLen, ProviderId, SecretKey};

use replay::{ReplayWindow, WindowSizeError};

/// Errors creating an SA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaError {
    #[error(
        "key material must be a 16- or 32-byte AES key followed by a 4-byte salt (20 or 36 bytes), got {0} bytes"
    )]
    KeyMaterialLength(usize),
    #[error("SPI 0 is reserved (RFC 4303 section 2.1); SPIs 1-255 are reserved by IANA")]
    ReservedSpi,
    #[error("inner local and remote addresses must be the same IP version")]
    MixedFamilies,
    #[error("no provider could create a key: {0}")]
    NoKey(String),
    #[error(transparent)]
    Window(#[from] WindowSizeError),
}

/// RFC 4106 section 8.1 key material: AES key || 4-byte salt.
#[derive(Clone)]
pub struct KeyMaterial {
    key: SecretKey,
    salt: Zeroizing<[u8; 4]>,
}

impl KeyMaterial {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SaError> {
        let split = match bytes.len() {
            20 => 16,
            36 => 32,
            n => return Err(SaError::KeyMaterialLength(n)),
        };
        let key =
            SecretKey::new(&bytes[..split]).map_err(|_| SaError::KeyMaterialLength(bytes.len()))?;
        let mut salt = Zeroizing::new([0u8; 4]);
        salt.copy_from_slice(&bytes[split..]);
        Ok(KeyMaterial { key, salt })
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    /// The 4-byte salt (the implicit part of the GCM nonce). Secret like
    /// the key: for tools that must reproduce the key material, such as
    /// `esptun wireshark-keys`.
    pub fn salt(&self) -> &[u8; 4] {
        &self.salt
    }
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyMaterial({:?}, salt redacted)", self.key)
    }
}

/// The keys of one SA, one per usable provider.
pub struct SaKeys {
    keys: [Option<Box<dyn AeadKey>>; 2],
    /// Secret like the key (RFC 4106 section 8.1), so cleared on drop; an
    /// inline array, so copying it into a nonce allocates nothing.
    salt: Zeroizing<[u8; 4]>,
    icv: IcvLen,
}

impl SaKeys {
    /// Creates a key object with every provider the selector has not
    /// disabled.
    pub fn new(selector: &Selector, material: &KeyMaterial, icv: IcvLen) -> Result<Self, SaError> {
        let mut errors = Vec::new();
        let keys = ProviderId::ALL.map(|id| {
            if selector.is_disabled(id) {
                return None;
            }
            selector
                .provider(id)
                .new_key(material.key(), icv)
                .map_err(|e: CryptoError| errors.push(format!("{id}: {e}")))
                .ok()
        });
        if keys.iter().all(Option::is_none) {
            return Err(SaError::NoKey(errors.join("; ")));
        }
        Ok(SaKeys {
            keys,
            salt: material.salt.clone(),
            icv,
        })
    }

    pub fn key(&self, provider: ProviderId) -> Option<&dyn AeadKey> {
        self.keys[provider.index()].as_deref()
    }

    pub fn salt(&self) -> [u8; 4] {
        *self.salt
    }

    pub fn icv(&self) -> IcvLen {
        self.icv
    }
}

impl std::fmt::Debug for SaKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaKeys")
            .field("icv", &self.icv)
            .finish_non_exhaustive()
    }
}

/// The inner (TUN-side) addresses of an SA: what outbound packets must
/// carry, and what inbound packets are rebuilt with (RFC 3948 section
/// 3.1.2: behind a NAT the outer addresses differ from these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerAddrs {
    pub local: IpAddr,
    pub remote: IpAddr,
}

impl InnerAddrs {
    pub fn new(local: IpAddr, remote: IpAddr) -> Result<Self, SaError> {
        if local.is_ipv4() != remote.is_ipv4() {
            return Err(SaError::MixedFamilies);
        }
        Ok(InnerAddrs { local, remote })
    }
}

/// Packets and bytes through one SA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Why no sequence number can be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SeqError {
    #[error("sequence space exhausted: the SA must be rekeyed")]
    Exhausted,
    #[error("sequence reservation used up: waiting for the next durable reservation")]
    ReservationNeeded,
}

/// The sending side of an SA.
#[derive(Debug)]
pub struct OutboundSa {
    pub spi: u32,
    pub keys: SaKeys,
    pub esn: bool,
    pub inner: InnerAddrs,
    /// The next sequence number to use (the first is 1).
    next_seq: u64,
    /// The last sequence number that may be used now.
    ceiling: u64,
    /// Crossing this is reported once, so keys can be rolled in time.
    soft_limit: u64,
    soft_limit_reported: bool,
    pub stats: SaStats,
}

/// Last usable sequence number: 2^32 - 1 without ESN (RFC 4303 section
/// 3.3.3); with ESN 2^64 - 2, one short of the type's maximum so that the
/// counter itself can never overflow and wrap to reused nonces.
pub fn hard_limit(esn: bool) -> u64 {
    if esn {
        u64::MAX - 1
    } else {
        u64::from(u32::MAX)
    }
}

impl OutboundSa {
    /// Fails closed: the ceiling starts at 0, so nothing is sent until the
    /// owner grants sequence numbers with [`Self::set_ceiling`] after
    /// durably recording the reservation (or, for a key that can never
    /// outlive this process, grants them all).
    pub fn new(spi: u32, keys: SaKeys, esn: bool, inner: InnerAddrs) -> Result<Self, SaError> {
        if spi < 256 {
            return Err(SaError::ReservedSpi);
        }
        let hard = hard_limit(esn);
        Ok(OutboundSa {
            spi,
            keys,
            esn,
            inner,
            next_seq: 1,
            ceiling: 0,
            soft_limit: hard - hard / 8,
            soft_limit_reported: false,
            stats: SaStats::default(),
        })
    }

    /// Continues after `last_used` (e.g. a persisted reservation from
    /// before a restart). Never moves backwards.
    pub fn resume_after(&mut self, last_used: u64) {
        self.next_seq = self.next_seq.max(last_used.saturating_add(1));
    }

    /// Sets the last usable sequence number (capped at the hard limit).
    pub fn set_ceiling(&mut self, ceiling: u64) {
        self.ceiling = ceiling.min(hard_limit(self.esn));
    }

    pub fn set_soft_limit(&mut self, soft: u64) {
        self.soft_limit = soft;
    }

    /// The next sequence number, consumed whether or not the packet is
    /// then sent: a number is never reused.
    pub fn next_seq(&mut self) -> Result<u64, SeqError> {
        let seq = self.next_seq;
        if seq > self.ceiling {
            return Err(if seq > hard_limit(self.esn) {
                SeqError::Exhausted
            } else {
                SeqError::ReservationNeeded
            });
        }
        self.next_seq = seq + 1;
        Ok(seq)
    }

    /// The last sequence number that may be used now.
    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// The last sequence number handed out (0 if none).
    pub fn last_used(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn past_soft_limit(&self) -> bool {
        self.last_used() >= self.soft_limit
    }

    /// True exactly once: the first time this is asked after the soft
    /// limit was reached.
    pub fn take_soft_limit_crossing(&mut self) -> bool {
        let crossed = self.past_soft_limit() && !self.soft_limit_reported;
        self.soft_limit_reported |= crossed;
        crossed
    }
}

/// The receiving side of an SA.
#[derive(Debug)]
pub struct InboundSa {
    pub spi: u32,
    pub keys: SaKeys,
    pub esn: bool,
    pub inner: InnerAddrs,
    pub replay: ReplayWindow,
    pub stats: SaStats,
}

impl InboundSa {
    pub fn new(
        spi: u32,
        keys: SaKeys,
        esn: bool,
        inner: InnerAddrs,
        window: u32,
    ) -> Result<Self, SaError> {
        if spi < 256 {
            return Err(SaError::ReservedSpi);
        }
        Ok(InboundSa {
            spi,
            keys,
            esn,
            inner,
            replay: ReplayWindow::new(window, esn)?,
            stats: SaStats::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Provider;
    use crate::crypto::select::{BootOptions, FailurePolicy, Mode};

    pub(crate) fn selector() -> Selector {
        Selector::boot(
            Provider::detect_all(),
            Mode::Auto,
            FailurePolicy::Fallback,
            BootOptions::default(),
        )
    }

    fn addrs() -> InnerAddrs {
        InnerAddrs::new(
            "198.18.0.1".parse().expect("ip"),
            "198.18.0.2".parse().expect("ip"),
        )
        .expect("same family")
    }

    #[test]
    fn key_material_lengths_and_redaction() {
        assert!(KeyMaterial::from_bytes(&[1; 20]).is_ok());
        assert!(KeyMaterial::from_bytes(&[1; 36]).is_ok());
        for n in [0, 16, 19, 21, 32, 35, 37] {
            assert_eq!(
                KeyMaterial::from_bytes(&vec![1; n]).err(),
                Some(SaError::KeyMaterialLength(n))
            );
        }
        let shown = format!("{:?}", KeyMaterial::from_bytes(&[0xAB; 20]).expect("ok"));
        assert_eq!(
            shown,
            "KeyMaterial(SecretKey(AES-128, redacted), salt redacted)"
        );
    }

    #[test]
    fn sequence_numbers_are_unique_and_stop_at_the_ceiling() {
        let s = selector();
        let m = KeyMaterial::from_bytes(&[7; 20]).expect("ok");
        let keys = SaKeys::new(&s, &m, IcvLen::Icv16).expect("keys");
        let mut sa = OutboundSa::new(0x1000, keys, false, addrs()).expect("sa");
        assert_eq!(
            sa.next_seq(),
            Err(SeqError::ReservationNeeded),
            "fails closed"
        );
        sa.set_ceiling(2);
        assert_eq!(sa.next_seq(), Ok(1));
        assert_eq!(sa.next_seq(), Ok(2));
        sa.set_ceiling(3);
        assert_eq!(sa.next_seq(), Ok(3));
        assert_eq!(sa.next_seq(), Err(SeqError::ReservationNeeded));
        sa.set_ceiling(u64::MAX); // capped at 2^32 - 1 without ESN
        sa.resume_after(u64::from(u32::MAX) - 1);
        assert!(sa.past_soft_limit());
        assert_eq!(sa.next_seq(), Ok(u64::from(u32::MAX)));
        assert_eq!(sa.next_seq(), Err(SeqError::Exhausted));
        assert_eq!(sa.next_seq(), Err(SeqError::Exhausted), "stays exhausted");
        sa.resume_after(5);
        assert_eq!(
            sa.next_seq(),
            Err(SeqError::Exhausted),
            "never moves backwards"
        );
    }

    #[test]
    fn the_esn_counter_stops_before_it_could_wrap() {
        let s = selector();
        let m = KeyMaterial::from_bytes(&[7; 20]).expect("ok");
        let keys = SaKeys::new(&s, &m, IcvLen::Icv16).expect("keys");
        let mut sa = OutboundSa::new(0x1000, keys, true, addrs()).expect("sa");
        sa.set_ceiling(u64::MAX);
        sa.resume_after(u64::MAX - 3);
        assert_eq!(sa.next_seq(), Ok(u64::MAX - 2));
        assert_eq!(sa.next_seq(), Ok(u64::MAX - 1));
        assert_eq!(sa.next_seq(), Err(SeqError::Exhausted));
        assert_eq!(sa.next_seq(), Err(SeqError::Exhausted));
        assert_eq!(sa.last_used(), u64::MAX - 1);
        sa.resume_after(u64::MAX);
        assert_eq!(
            sa.next_seq(),
            Err(SeqError::Exhausted),
            "a corrupt resume point cannot wrap it"
        );
    }

    #[test]
    fn reserved_spis_and_mixed_families_are_refused() {
        let s = selector();
        let m = KeyMaterial::from_bytes(&[7; 36]).expect("ok");
        let keys = || SaKeys::new(&s, &m, IcvLen::Icv16).expect("keys");
        assert_eq!(
            OutboundSa::new(0, keys(), false, addrs()).err(),
            Some(SaError::ReservedSpi)
        );
        assert_eq!(
            InboundSa::new(255, keys(), false, addrs(), 64).err(),
            Some(SaError::ReservedSpi)
        );
        assert!(
            InboundSa::new(256, keys(), false, addrs(), 0).is_err(),
            "window 0"
        );
        let mixed = InnerAddrs::new(
            "198.18.0.1".parse().expect("ip"),
            "2001:db8::1".parse().expect("ip"),
        );
        assert_eq!(mixed, Err(SaError::MixedFamilies));
    }
}
