//! What `esptun status` shows of IKE (serialized into the status reply).

use serde::{Deserialize, Serialize};

/// `esptun status`: IKE.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeStatus {
    /// IKE messages on port 4500 dropped because the IKE thread's queue
    /// was full.
    pub queue_drops: u64,
    pub peers: Vec<IkePeerStatus>,
}

/// One peer keyed by IKE.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkePeerStatus {
    pub peer: String,
    pub initiate: bool,
    pub local_id: String,
    pub remote_id: String,
    pub sas: Vec<IkeSaStatus>,
    pub counters: IkeCounters,
    /// The last failure, as logged.
    pub last_error: Option<String>,
}

/// One IKE SA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeSaStatus {
    /// `initiator` or `responder`.
    pub role: String,
    /// `connecting`, `established` or `closed`.
    pub state: String,
    /// The IKE SPIs, 16 hex digits each.
    pub spi_i: String,
    pub spi_r: String,
    pub age_secs: u64,
    /// Where its messages go: `ADDR:500` or `ADDR:4500` (marker).
    pub remote: String,
    /// The negotiated suite, e.g. `aes256gcm16-prfsha256-x25519`.
    pub suite: Option<String>,
    /// The CHILD SAs it installed: (inbound SPI, outbound SPI).
    pub children: Vec<ChildStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub inbound_spi: u32,
    pub outbound_spi: u32,
}

/// Per peer, since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeCounters {
    pub established: u64,
    pub children_installed: u64,
    pub children_failed: u64,
    /// AUTHENTICATION_FAILED, either way: wrong PSK or an identity that
    /// is not the one configured (RFC 7296 section 2.21.2 gives both the
    /// same answer).
    pub auth_failures: u64,
    /// NO_PROPOSAL_CHOSEN, either way.
    pub proposal_mismatches: u64,
    /// TS_UNACCEPTABLE, either way.
    pub ts_unacceptable: u64,
    /// No answer after every retransmission.
    pub timeouts: u64,
    pub other_failures: u64,
    /// Messages dropped unprocessed (malformed, failed ICV, unexpected).
    pub messages_dropped: u64,
}
