//! Publication of the IKE thread's state: the status rows for `esptun
//! status` and the keys for `esptun wireshark-keys`.

use std::time::Instant;

use super::explain::{dh_name, role_name, suite_name};
use super::keys::{peer_esp_sa_records, wireshark_record};
use super::{ChildStatus, IkePeerStatus, IkeSaStatus, IkeWorker, NatSaStatus};
use crate::config::ike::identity_text;
use crate::ike::sa::ChildState;

impl IkeWorker {
    pub(super) fn publish(&self, now: Instant) {
        let rows = self
            .peers
            .iter()
            .map(|p| IkePeerStatus {
                peer: p.cfg.name.clone(),
                initiate: p.cfg.ike.initiate,
                local_id: identity_text(&p.cfg.ike.local_id),
                remote_id: identity_text(&p.cfg.ike.remote_id),
                sas: p
                    .slots
                    .iter()
                    .map(|s| {
                        let (spi_i, spi_r) = s.sa.spis();
                        IkeSaStatus {
                            role: role_name(s.sa.role()).into(),
                            state: match s.sa.status() {
                                crate::ike::sa::Status::Connecting => "connecting",
                                crate::ike::sa::Status::Established if s.closing => "deleting",
                                crate::ike::sa::Status::Established => "established",
                                crate::ike::sa::Status::Closed => "closed",
                            }
                            .into(),
                            spi_i: format!("{spi_i:016x}"),
                            spi_r: format!("{spi_r:016x}"),
                            age_secs: now.saturating_duration_since(s.created).as_secs(),
                            remote: s.to.to_string(),
                            suite: s.sa.suite().map(suite_name),
                            children: s
                                .sa
                                .children()
                                .iter()
                                .map(|c| ChildStatus {
                                    inbound_spi: c.inbound_spi,
                                    outbound_spi: c.outbound_spi,
                                    state: child_state_name(c.state).into(),
                                    installed_secs_ago: secs_since(now, c.installed),
                                    rekey_in_secs: c.rekey_at.map(|t| secs_until(now, t)),
                                    generation: c.generation,
                                    pfs: c.pfs.map(|g| dh_name(g).to_string()),
                                })
                                .collect(),
                            ike_rekeys: s.sa.rekeys().0,
                            child_rekeys: s.sa.rekeys().1,
                            established_secs_ago: s.sa.established_at().map(|t| secs_since(now, t)),
                            ike_rekey_in_secs: s.sa.ike_rekey_at().map(|t| secs_until(now, t)),
                            last_heard_secs_ago: s.sa.last_heard().map(|t| secs_since(now, t)),
                            last_liveness_check_secs_ago: s
                                .sa
                                .last_liveness_check()
                                .map(|t| secs_since(now, t)),
                            nat: {
                                let n = s.sa.nat();
                                NatSaStatus {
                                    supported: n.supported,
                                    local_behind: n.local_behind,
                                    peer_behind: n.peer_behind,
                                    natt: s.sa.use_natt(),
                                    keepalives: n.local_behind,
                                    keepalives_sent: s.keepalives,
                                }
                            },
                        }
                    })
                    .collect(),
                counters: p.counters.clone(),
                last_error: p.last_error.clone(),
            })
            .collect();
        *self.ike.status.lock().unwrap_or_else(|p| p.into_inner()) = rows;
        // The gauges are read from the gate itself: it changes wherever a
        // responder completes or is given up, so a stored copy went stale.
        let mut cookies = self.cookies.clone();
        if let Some(g) = self.gate.as_ref() {
            cookies.half_open = g.half_open() as u64;
            cookies.demanding = g.demanding();
        }
        *self.ike.cookies.lock().unwrap_or_else(|p| p.into_inner()) = cookies;
    }

    /// The established IKE SAs' keys and the CHILD SAs' keys, for
    /// `esptun wireshark-keys`.
    pub(super) fn publish_keys(&self) {
        let records = self
            .peers
            .iter()
            .flat_map(|p| p.slots.iter())
            .filter(|s| s.established)
            .filter_map(|s| wireshark_record(&s.sa))
            .collect();
        *self.ike.keys.lock().unwrap_or_else(|p| p.into_inner()) = records;
        let esp = self
            .peers
            .iter()
            .map(|p| (p.cfg.name.clone(), peer_esp_sa_records(p)))
            .collect();
        *self.ike.esp_keys.lock().unwrap_or_else(|p| p.into_inner()) = esp;
    }
}

fn secs_since(now: Instant, t: Instant) -> u64 {
    now.saturating_duration_since(t).as_secs()
}

fn secs_until(now: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(now).as_secs()
}

fn child_state_name(state: ChildState) -> &'static str {
    match state {
        ChildState::Installed => "installed",
        ChildState::Rekeying => "rekeying",
        ChildState::Rekeyed => "rekeyed",
        ChildState::Deleting => "deleting",
    }
}
