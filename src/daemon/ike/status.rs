//! What `esptun status` shows of IKE (serialized into the status reply).

use serde::{Deserialize, Serialize};

/// `esptun status`: IKE.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeStatus {
    /// IKE messages on port 4500 dropped because the IKE thread's queue
    /// was full.
    pub queue_drops: u64,
    /// With raw ESP: datagrams on the IKE-only port 4500 sockets that
    /// were no IKE message and no keepalive (ESP in UDP), dropped.
    #[serde(default)]
    pub natt_non_ike: u64,
    pub peers: Vec<IkePeerStatus>,
    /// The responders' COOKIE gate (RFC 7296 section 2.6).
    #[serde(default)]
    pub cookies: CookieCounters,
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
    /// `connecting`, `established`, `deleting` (our Delete awaits its
    /// answer) or `closed`.
    pub state: String,
    /// The IKE SPIs, 16 hex digits each.
    pub spi_i: String,
    pub spi_r: String,
    pub age_secs: u64,
    /// Where its messages go: `ADDR:500` or `ADDR:4500` (marker).
    pub remote: String,
    /// The negotiated suite, e.g. `aes256gcm16-prfsha256-x25519`.
    pub suite: Option<String>,
    /// The CHILD SAs it installed and still holds, oldest first.
    pub children: Vec<ChildStatus>,
    /// Rekeys of this IKE SA (RFC 7296 section 2.18) and of its CHILD SAs
    /// (section 2.8) so far.
    #[serde(default)]
    pub ike_rekeys: u32,
    #[serde(default)]
    pub child_rekeys: u32,
    /// Seconds since the current IKE SA generation was established (after
    /// a rekey: since the rekey).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_secs_ago: Option<u64>,
    /// Seconds until the IKE SA rekeys (0: due now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ike_rekey_in_secs: Option<u64>,
    /// Seconds since the last authenticated message, or ESP packet, from
    /// the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_secs_ago: Option<u64>,
    /// Seconds since our last liveness check (section 2.4); absent: none
    /// yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_liveness_check_secs_ago: Option<u64>,
    /// NAT detection's outcome (RFC 7296 section 2.23).
    #[serde(default)]
    pub nat: NatSaStatus,
}

/// What NAT detection found for one IKE SA, and what follows from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSaStatus {
    /// The peer sent NAT detection notifies.
    pub supported: bool,
    /// A NAT rewrote our address (or we fake it: `force_encap`).
    pub local_behind: bool,
    /// The peer is behind a NAT (or pretends to be).
    pub peer_behind: bool,
    /// IKE on the NAT-T port and ESP in UDP.
    pub natt: bool,
    /// We send NAT keepalives (RFC 3948 section 4): we are behind the NAT.
    pub keepalives: bool,
    /// NAT keepalives sent by this IKE SA.
    pub keepalives_sent: u64,
}

/// The COOKIE gate's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CookieCounters {
    /// COOKIE challenges sent.
    pub sent: u64,
    /// IKE_SA_INIT requests let through with a valid cookie.
    pub accepted: u64,
    /// IKE_SA_INIT requests refused (half-open table full, malformed).
    pub refused: u64,
    /// Half-open IKE SAs now.
    pub half_open: u64,
    /// Half-open IKE SAs given up after their timeout.
    pub expired: u64,
    /// Whether cookies are demanded now.
    pub demanding: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub inbound_spi: u32,
    pub outbound_spi: u32,
    /// `installed`, `rekeying`, `rekeyed` (its successor runs; a Delete
    /// removes it) or `deleting`.
    #[serde(default)]
    pub state: String,
    /// Seconds since it was installed.
    #[serde(default)]
    pub installed_secs_ago: u64,
    /// Seconds until we rekey it (0: due now); absent: no lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey_in_secs: Option<u64>,
    /// How many rekeys lie behind it (0: made by IKE_AUTH).
    #[serde(default)]
    pub generation: u32,
    /// The DH group of the rekey that made it (PFS); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pfs: Option<String>,
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
    /// NO_PROPOSAL_CHOSEN, either way, and answers with a proposal we
    /// did not offer.
    pub proposal_mismatches: u64,
    /// TS_UNACCEPTABLE, either way, and selectors the peer narrowed to
    /// ones we refuse (RFC 7296 section 2.9; we delete that CHILD SA).
    pub ts_unacceptable: u64,
    /// No answer after every retransmission.
    pub timeouts: u64,
    pub other_failures: u64,
    /// Messages dropped unprocessed (malformed, failed ICV, unexpected).
    pub messages_dropped: u64,
    /// IKE SA and CHILD SA rekeys (either side started them).
    #[serde(default)]
    pub ike_rekeys: u64,
    #[serde(default)]
    pub child_rekeys: u64,
    /// CHILD SA rekeys we started (our lifetime ran out first).
    #[serde(default)]
    pub child_rekeys_started: u64,
    /// IKE SA rekeys of ours that failed (refused, or INVALID_KE_PAYLOAD
    /// naming a group we cannot use): the old IKE SA carries on and its
    /// lifetime tries again.
    #[serde(default)]
    pub ike_rekeys_failed: u64,
    /// CHILD SAs removed: deleted by either side, replaced by a rekey,
    /// expired, or gone with their IKE SA.
    #[serde(default)]
    pub children_deleted: u64,
    /// IKE SAs given up because the peer stopped answering (section 2.4).
    #[serde(default)]
    pub dead_peers: u64,
    /// IKE SAs that reached their hard lifetime unrekeyed.
    #[serde(default)]
    pub expired: u64,
    /// INITIAL_CONTACT received: the peer restarted, its old SAs went.
    #[serde(default)]
    pub peer_restarts: u64,
    /// The peer's address changed under a NAT (RFC 7296 section 2.23).
    #[serde(default)]
    pub peer_moved: u64,
    /// NAT keepalives sent (RFC 3948 section 4).
    #[serde(default)]
    pub keepalives: u64,
    /// CHILD SAs refused because a NAT was detected with `outer = "esp"`.
    #[serde(default)]
    pub nat_refused: u64,
    /// Deletes of an IKE SA we sent (RFC 7296 section 1.4.1): on stop,
    /// and for a duplicate IKE SA with the peer.
    #[serde(default)]
    pub deletes_sent: u64,
    /// Deletes of an IKE SA the peer sent (it stopped, or closed a
    /// duplicate): its CHILD SAs went at once.
    #[serde(default)]
    pub deletes_received: u64,
    /// NAT keepalives not sent because ESP had gone to the peer within the
    /// interval (RFC 3948 section 4).
    #[serde(default)]
    pub keepalives_skipped: u64,
}
