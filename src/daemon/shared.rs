//! State every daemon thread sees: the stop flag, the provider selector,
//! live counters and the SA rows the datapath threads publish for
//! `esptun status`.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::status::{self, InboundSaStatus, IoCounters, OutboundSaStatus, Status};
use crate::crypto::select::Selector;
use crate::datapath::Counters;
use crate::wire::inner::InnerPolicy;
use crate::wire::outer::Encap;
use std::sync::Arc;

/// State shared by all threads.
pub(crate) struct Shared {
    pub stop: AtomicBool,
    pub selector: Selector,
    pub started: Instant,
    pub selftest_interval: Duration,
    pub out_counters: Arc<Counters>,
    pub in_counters: Arc<Counters>,
    pub io: IoCounters,
    pub out_status: Mutex<Vec<OutboundSaStatus>>,
    pub in_status: Mutex<Vec<InboundSaStatus>>,
    pub interface: String,
    pub outer: Encap,
    /// `[inner]`: the checksum policy both pipelines apply.
    pub inner: InnerPolicy,
}

impl Shared {
    pub fn status(&self) -> Status {
        fn lock<T: Clone>(m: &Mutex<Vec<T>>) -> Vec<T> {
            m.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
        Status {
            interface: self.interface.clone(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            outer: self.outer,
            provider: self.selector.active(),
            crypto_mode: self.selector.mode(),
            on_selftest_failure: self.selector.policy(),
            providers: self.selector.reports().iter().map(Into::into).collect(),
            selftest_history: self.selector.history().iter().map(Into::into).collect(),
            outbound: status::DirectionStatus::of(&self.out_counters),
            inbound: status::DirectionStatus::of(&self.in_counters),
            io: self.io.snapshot(),
            outbound_sas: lock(&self.out_status),
            inbound_sas: lock(&self.in_status),
        }
    }

    pub fn status_json(&self) -> String {
        serde_json::to_string(&self.status())
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
    }
}
