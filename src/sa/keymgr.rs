//! The key-manager interface: how SAs enter and leave the datapath. The
//! daemon implements it over its SA tables ([`super::lifecycle`] decides,
//! the datapath threads apply); configuration reload uses it now, and an
//! IKE daemon (RFC 7296: CREATE_CHILD_SA, Delete, NAT mapping updates)
//! uses the same calls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use super::lifecycle::Refusal;
use super::reservation::Fingerprint;
use super::table::Direction;
use super::{InboundSa, KeyMaterial, OutboundSa};

/// A new outbound SA and the key material behind it.
pub struct NewOutbound {
    pub sa: OutboundSa,
    /// For the durable sequence reservation, which is claimed (on the
    /// thread that owns the SAs) before the SA may send.
    pub material: KeyMaterial,
    /// Where the key came from, for error messages.
    pub key_file: Option<PathBuf>,
    /// Already holds a durable reservation (claimed before the datapath
    /// threads started).
    pub claimed: bool,
}

impl NewOutbound {
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::new(&self.material)
    }
}

/// A new inbound SA.
pub struct NewInbound {
    pub sa: InboundSa,
    pub fp: Fingerprint,
}

/// The SAs a key manager wants for one peer. A direction left `None` has
/// its SAs deleted.
pub struct PeerSas {
    pub peer: String,
    pub endpoint: SocketAddr,
    pub outbound: Option<NewOutbound>,
    pub inbound: Option<NewInbound>,
}

/// Installs, replaces and removes SAs. Every call takes the time, so an
/// implementation needs no clock of its own.
pub trait KeyManager {
    /// Installs the SAs of peers that have none, and replaces those of
    /// peers that have (make-before-break: see [`super::lifecycle`]). SAs
    /// that cannot be installed are refused, and the peer's running SAs
    /// stay; the refusals are returned.
    fn install(&mut self, peers: Vec<PeerSas>, now: Instant) -> Vec<(String, Refusal)>;

    /// Removes the peer's SA in `direction` with this SPI (an IKE Delete,
    /// or a hard lifetime: RFC 7296 section 1.4.1): at once, unless a
    /// rekey already replaced it. Then make-before-break finishes
    /// instead: a replaced inbound SA retires a few seconds later, and an
    /// outbound SA whose successor is pending hands over to it when the
    /// peer is seen on the new SA or a second later at the latest (time
    /// for the peer's datapath to install what its IKE thread negotiated),
    /// so no packet is left without an SA.
    fn delete(&mut self, peer: &str, direction: Direction, spi: u32, now: Instant);

    /// The peer's outer address changed (a NAT mapping, RFC 7296 section
    /// 2.23): its SAs follow without being reinstalled.
    fn update_endpoint(&mut self, peer: &str, endpoint: SocketAddr, now: Instant);

    /// Advances time: pending switches and retirements that are due.
    fn expire(&mut self, now: Instant);
}
