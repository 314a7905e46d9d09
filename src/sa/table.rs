//! The SA table: every SA of one direction with its metadata, under an id
//! that stays the same for the SA's whole life. The datapath looks SAs up
//! here (outbound by inner remote address, inbound by SPI); the key manager
//! changes it only through ids, so nothing is ever kept in step by index.
//!
//! Invariant: no two entries share a key fingerprint ([`SaTable::insert`]
//! refuses it), whatever the key manager asked for: one key in two SAs
//! would reuse GCM nonces.

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::reservation::Fingerprint;

/// An SA's name for its whole life, unique within a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SaId(pub u32);

impl SaId {
    /// An SA a plan installs, before the table has named it.
    pub const PLANNED: SaId = SaId(0);
}

impl fmt::Display for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Hands out SA ids, never the same twice (0 is [`SaId::PLANNED`]).
#[derive(Debug, Default)]
pub struct SaIds(u32);

impl SaIds {
    pub fn allocate(&mut self) -> SaId {
        self.0 += 1;
        SaId(self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an SA is in its life ([`super::lifecycle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaState {
    /// Outbound: installed (and its sequence numbers reserved) but not yet
    /// sending; waits for the peer to be seen on our inbound SA with SPI
    /// `awaiting`, or for the switch timeout counted from `since`.
    Pending {
        since: Instant,
        awaiting: Option<u32>,
    },
    /// Outbound: the SA the peer's packets are sealed with. Inbound:
    /// accepting.
    Active,
    /// Inbound: replaced, still accepting until `at`.
    Retiring { at: Instant },
}

impl SaState {
    pub fn as_str(self) -> &'static str {
        match self {
            SaState::Pending { .. } => "pending",
            SaState::Active => "active",
            SaState::Retiring { .. } => "retiring",
        }
    }
}

/// What the table keeps beside an SA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaMeta {
    pub peer: String,
    /// Outbound: where packets go. Inbound: the peer's configured address.
    pub endpoint: SocketAddr,
    /// Names the key's nonce space (and its reservation record).
    pub fp: Fingerprint,
    pub state: SaState,
}

impl SaMeta {
    /// An SA in use from the start (tools and tests build these directly;
    /// the daemon's come from the key manager).
    pub fn active(peer: impl Into<String>, endpoint: SocketAddr, fp: Fingerprint) -> Self {
        SaMeta {
            peer: peer.into(),
            endpoint,
            fp,
            state: SaState::Active,
        }
    }
}

/// One SA with its metadata and its per-SA counters `C` (the datapath's
/// drops by reason).
#[derive(Debug)]
pub struct SaEntry<S, C> {
    pub id: SaId,
    pub sa: S,
    pub meta: SaMeta,
    pub counters: C,
}

/// Why [`SaTable::insert`] refused an SA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("SA {0} is already in the table")]
    DuplicateId(SaId),
    #[error("the key is already used by SA {holder} of peer {peer}")]
    KeyInUse { holder: SaId, peer: String },
}

/// The SAs of one direction. A linear scan: hosts have few peers, and it
/// beats hashing below a few dozen.
#[derive(Debug)]
pub struct SaTable<S, C> {
    entries: Vec<SaEntry<S, C>>,
}

impl<S, C> Default for SaTable<S, C> {
    fn default() -> Self {
        SaTable {
            entries: Vec::new(),
        }
    }
}

impl<S, C: Default> SaTable<S, C> {
    /// Adds an SA under `id`; refuses an id or a key already present.
    pub fn insert(&mut self, id: SaId, sa: S, meta: SaMeta) -> Result<(), TableError> {
        if self.get(id).is_some() {
            return Err(TableError::DuplicateId(id));
        }
        if let Some(holder) = self.entries.iter().find(|e| e.meta.fp == meta.fp) {
            return Err(TableError::KeyInUse {
                holder: holder.id,
                peer: holder.meta.peer.clone(),
            });
        }
        self.entries.push(SaEntry {
            id,
            sa,
            meta,
            counters: C::default(),
        });
        Ok(())
    }
}

impl<S, C: Default> SaTable<S, C> {
    /// Adds an SA under the next free id (for tools and tests; the daemon
    /// names its SAs itself, through [`Self::insert`]).
    pub fn add(&mut self, sa: S, meta: SaMeta) -> Result<SaId, TableError> {
        let id = SaId(self.entries.iter().map(|e| e.id.0).max().unwrap_or(0) + 1);
        self.insert(id, sa, meta)?;
        Ok(id)
    }
}

impl<S, C> SaTable<S, C> {
    pub fn sa_mut(&mut self, id: SaId) -> Option<&mut S> {
        self.get_mut(id).map(|e| &mut e.sa)
    }

    pub fn remove(&mut self, id: SaId) -> Option<SaEntry<S, C>> {
        let i = self.entries.iter().position(|e| e.id == id)?;
        Some(self.entries.remove(i))
    }

    pub fn get(&self, id: SaId) -> Option<&SaEntry<S, C>> {
        self.entries.iter().find(|e| e.id == id)
    }

    pub fn get_mut(&mut self, id: SaId) -> Option<&mut SaEntry<S, C>> {
        self.entries.iter_mut().find(|e| e.id == id)
    }

    /// The first entry `matches` accepts (for the datapath's lookups).
    pub fn find_mut(
        &mut self,
        matches: impl Fn(&SaEntry<S, C>) -> bool,
    ) -> Option<&mut SaEntry<S, C>> {
        self.entries.iter_mut().find(|e| matches(e))
    }

    pub fn iter(&self) -> impl Iterator<Item = &SaEntry<S, C>> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut SaEntry<S, C>> {
        self.entries.iter_mut()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sa::KeyMaterial;

    fn meta(peer: &str, key: u8) -> SaMeta {
        SaMeta {
            peer: peer.into(),
            endpoint: "198.18.0.2:4500".parse().expect("addr"),
            fp: Fingerprint::new(&KeyMaterial::from_bytes(&[key; 20]).expect("material")),
            state: SaState::Active,
        }
    }

    #[test]
    fn ids_are_stable_and_keys_unique() {
        let mut ids = SaIds::default();
        let mut t: SaTable<&str, u32> = SaTable::default();
        let (a, b, c) = (ids.allocate(), ids.allocate(), ids.allocate());
        assert!(a != SaId::PLANNED && a != b && b != c);
        t.insert(a, "a", meta("p", 1)).expect("a");
        t.insert(b, "b", meta("p", 2)).expect("b");
        assert_eq!(
            t.insert(c, "c", meta("q", 1)),
            Err(TableError::KeyInUse {
                holder: a,
                peer: "p".into()
            })
        );
        assert_eq!(
            t.insert(b, "c", meta("q", 3)),
            Err(TableError::DuplicateId(b))
        );
        // Removing an entry does not rename the others.
        assert_eq!(t.remove(a).map(|e| e.sa), Some("a"));
        assert_eq!(t.get(b).map(|e| e.sa), Some("b"));
        t.get_mut(b).expect("b").counters += 1;
        assert_eq!(t.get(b).map(|e| e.counters), Some(1));
        assert!(t.remove(a).is_none());
        // The key is free again once its SA is gone.
        t.insert(c, "c", meta("q", 1)).expect("c");
        assert_eq!(t.len(), 2);
    }
}
