//! Responder protection (RFC 7296 section 2.6): stateless cookies and a
//! bounded table of half-open IKE SAs, in front of the responders.
//!
//! Every IKE_SA_INIT request costs a responder a Diffie-Hellman
//! computation and some state, before anything proves the initiator can
//! even receive at the address it claims. [`CookieGate`] is consulted for
//! each IKE_SA_INIT request that matches no existing IKE SA. While few
//! responders are half-open (they answered IKE_SA_INIT and IKE_AUTH has
//! not completed), it lets requests through. Above a threshold it answers
//! with a COOKIE notification computed from the request and a secret,
//! keeping no state, and lets through only a request that returns a
//! valid cookie: one only the owner of the source address could have
//! received. The secret rotates; a cookie from the previous secret still
//! counts, so a rotation does not fail a handshake under way.
//!
//! Beyond the cookies, the half-open table is bounded as a whole and per
//! source address, and its entries time out: a flood from real addresses
//! (which cookies do not stop) cannot grow it without bound.
//!
//! Sans-IO like the rest of `ike`: time and randomness are arguments.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::digest;
use zeroize::Zeroizing;

use super::crypto::{IkeCryptoError, Randomness};
use super::wire::consts::{exchange, flags, notify};
use super::wire::payload::{Notify, Payload};
use super::wire::{Header, IkeHeader, Message};

/// Length of a cookie: a 4-byte secret version and a SHA-256 (section
/// 2.6 allows 1 to 64 bytes).
pub const COOKIE_LEN: usize = 4 + 32;

/// The gate's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookiePolicy {
    /// Half-open IKE SAs from which on a cookie is demanded.
    pub threshold: usize,
    /// Half-open IKE SAs at most: beyond, requests are dropped, cookie or
    /// not.
    pub max_half_open: usize,
    /// Half-open IKE SAs per source address at most.
    pub per_source: usize,
    /// A responder still half-open this long after its IKE_SA_INIT is
    /// given up (section 2.6 wants half-open state short-lived).
    pub half_open_timeout: Duration,
    /// How often the secret changes (section 2.6: "frequently").
    pub rotate: Duration,
}

impl Default for CookiePolicy {
    fn default() -> Self {
        CookiePolicy {
            threshold: 16,
            max_half_open: 256,
            per_source: 8,
            half_open_timeout: Duration::from_secs(30),
            rotate: Duration::from_secs(120),
        }
    }
}

/// What to do with an IKE_SA_INIT request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to a new responder ([`crate::ike::sa::IkeSa::responder`]);
    /// the gate now counts it half-open under its initiator SPI.
    Accept,
    /// Send these bytes (a COOKIE answer) back to the source, and nothing
    /// else: no state was kept.
    Challenge(Vec<u8>),
    /// Drop it silently: not an IKE_SA_INIT request, or the half-open
    /// table is full (overall or for this source).
    Drop(&'static str),
}

/// A cookie secret and its version (section 2.6: the version lets the
/// responder tell which secret a cookie was made with).
struct Secret {
    version: u32,
    key: Zeroizing<[u8; 32]>,
}

impl Secret {
    fn draw(version: u32, rng: &mut dyn Randomness) -> Result<Self, IkeCryptoError> {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill(key.as_mut())?;
        Ok(Secret { version, key })
    }

    /// Section 2.6: `<VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)`.
    fn cookie(&self, ni: &[u8], ip: IpAddr, spi_i: u64) -> [u8; COOKIE_LEN] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(ni);
        match ip {
            IpAddr::V4(a) => ctx.update(&a.octets()),
            IpAddr::V6(a) => ctx.update(&a.octets()),
        }
        ctx.update(&spi_i.to_be_bytes());
        ctx.update(self.key.as_ref());
        let mut out = [0u8; COOKIE_LEN];
        out[..4].copy_from_slice(&self.version.to_be_bytes());
        out[4..].copy_from_slice(ctx.finish().as_ref());
        out
    }
}

struct HalfOpen {
    spi_i: u64,
    source: IpAddr,
    since: Instant,
}

/// The cookie mechanism and the half-open table; one per daemon (or per
/// listening address), shared by all responders.
pub struct CookieGate {
    policy: CookiePolicy,
    current: Secret,
    previous: Option<Secret>,
    rotated_at: Instant,
    half_open: Vec<HalfOpen>,
}

impl std::fmt::Debug for CookieGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieGate")
            .field("policy", &self.policy)
            .field("version", &self.current.version)
            .field("half_open", &self.half_open.len())
            .finish()
    }
}

impl CookieGate {
    pub fn new(
        policy: CookiePolicy,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Result<Self, IkeCryptoError> {
        Ok(CookieGate {
            policy,
            current: Secret::draw(0, rng)?,
            previous: None,
            rotated_at: now,
            half_open: Vec::new(),
        })
    }

    pub fn policy(&self) -> &CookiePolicy {
        &self.policy
    }

    /// Half-open IKE SAs counted now.
    pub fn half_open(&self) -> usize {
        self.half_open.len()
    }

    /// Whether a cookie is demanded now.
    pub fn demanding(&self) -> bool {
        self.half_open.len() >= self.policy.threshold
    }

    /// Decides on an IKE_SA_INIT request (without the non-ESP marker)
    /// from `source` that matches no existing IKE SA.
    pub fn check(
        &mut self,
        request: &[u8],
        source: SocketAddr,
        now: Instant,
        rng: &mut dyn Randomness,
    ) -> Verdict {
        self.rotate(now, rng);
        let Ok(header) = IkeHeader::new_checked(request).and_then(|h| Header::parse(&h)) else {
            return Verdict::Drop("malformed IKE header");
        };
        if header.is_response()
            || header.exchange != exchange::IKE_SA_INIT
            || header.spi_r != 0
            || header.message_id != 0
        {
            return Verdict::Drop("not an initial IKE_SA_INIT request");
        }
        let ip = source.ip();
        // The caller routes requests of known SPIs to their IKE SA; one
        // that still comes here (a retransmission racing its responder's
        // creation) is already counted.
        if self
            .half_open
            .iter()
            .any(|h| h.spi_i == header.spi_i && h.source == ip)
        {
            return Verdict::Accept;
        }
        if self.half_open.len() >= self.policy.max_half_open {
            return Verdict::Drop("half-open IKE SA table full");
        }
        if self.half_open.iter().filter(|h| h.source == ip).count() >= self.policy.per_source {
            return Verdict::Drop("too many half-open IKE SAs from this address");
        }
        if self.demanding() {
            let Ok(msg) = Message::parse(request) else {
                return Verdict::Drop("malformed IKE_SA_INIT request");
            };
            let Some(ni) = msg.payloads.iter().find_map(|p| match p {
                Payload::Nonce(n) => Some(n.as_slice()),
                _ => None,
            }) else {
                return Verdict::Drop("IKE_SA_INIT request without a nonce");
            };
            // Section 2.6: the initiator returns the cookie as the first
            // payload.
            let returned = match msg.payloads.first() {
                Some(Payload::Notify(n)) if n.ty == notify::COOKIE => Some(n.data.as_slice()),
                _ => None,
            };
            if !returned.is_some_and(|c| self.valid(c, ni, ip, header.spi_i)) {
                // No cookie, a forged one, or one from a retired secret:
                // a fresh one, and still no state.
                let cookie = self.current.cookie(ni, ip, header.spi_i);
                return match challenge(header.spi_i, &cookie) {
                    Ok(bytes) => Verdict::Challenge(bytes),
                    Err(_) => Verdict::Drop("COOKIE answer not built"),
                };
            }
        }
        self.half_open.push(HalfOpen {
            spi_i: header.spi_i,
            source: ip,
            since: now,
        });
        Verdict::Accept
    }

    /// A cookie made with the current or the previous secret.
    fn valid(&self, cookie: &[u8], ni: &[u8], ip: IpAddr, spi_i: u64) -> bool {
        let Some(version) = cookie
            .get(..4)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
        else {
            return false;
        };
        [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|s| s.version == version)
            .is_some_and(|s| crate::crypto::ct_eq(&s.cookie(ni, ip, spi_i), cookie))
    }

    /// The responder for `spi_i` completed IKE_AUTH (or ended): it is no
    /// longer half-open.
    pub fn completed(&mut self, spi_i: u64) {
        self.half_open.retain(|h| h.spi_i != spi_i);
    }

    /// Removes the half-open entries past their timeout and returns their
    /// initiator SPIs: drop those responders. Also rotates the secret.
    pub fn expire(&mut self, now: Instant, rng: &mut dyn Randomness) -> Vec<u64> {
        self.rotate(now, rng);
        let timeout = self.policy.half_open_timeout;
        let mut gone = Vec::new();
        self.half_open.retain(|h| {
            let keep = now.saturating_duration_since(h.since) < timeout;
            if !keep {
                gone.push(h.spi_i);
            }
            keep
        });
        gone
    }

    /// When [`CookieGate::expire`] must next be called.
    pub fn next_timeout(&self) -> Option<Instant> {
        let expiry = self
            .half_open
            .iter()
            .map(|h| h.since + self.policy.half_open_timeout)
            .min();
        let rotation = self.rotated_at + self.policy.rotate;
        Some(expiry.map_or(rotation, |e| e.min(rotation)))
    }

    /// A new secret when the current one is old enough; the current one
    /// becomes the previous, and the one before is forgotten. Without
    /// randomness the secret stays a little longer rather than becoming
    /// predictable.
    fn rotate(&mut self, now: Instant, rng: &mut dyn Randomness) {
        if now.saturating_duration_since(self.rotated_at) < self.policy.rotate {
            return;
        }
        if let Ok(next) = Secret::draw(self.current.version.wrapping_add(1), rng) {
            self.previous = Some(std::mem::replace(&mut self.current, next));
            self.rotated_at = now;
        }
    }
}

/// The stateless answer: the initiator's SPI, a responder SPI of zero,
/// and only the COOKIE notification (section 2.6).
fn challenge(spi_i: u64, cookie: &[u8]) -> Result<Vec<u8>, super::wire::WireError> {
    Message {
        header: Header {
            spi_i,
            spi_r: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::RESPONSE,
            message_id: 0,
        },
        payloads: vec![Payload::Notify(Notify::new(
            notify::COOKIE,
            cookie.to_vec(),
        ))],
    }
    .emit()
}

#[cfg(test)]
#[path = "cookie_tests.rs"]
mod tests;
