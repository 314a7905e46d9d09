//! State every daemon thread sees: the stop flag, the provider selector,
//! live counters and the SA rows the datapath threads publish for
//! `esptun status`.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::status::{DirectionStatus, InboundSaStatus, IoCounters, OutboundSaStatus, Status};
use crate::crypto::select::Selector;
use crate::datapath::Counters;
use crate::sa::table::SaId;
use crate::wire::inner::InnerPolicy;
use crate::wire::outer::Encap;
use std::sync::Arc;

/// What one datapath thread last published: its SA rows and its
/// direction's totals, taken together between two batches, so that the
/// per-SA counts add up with the totals they are shown next to.
pub(crate) struct Published<T> {
    pub rows: Vec<T>,
    /// `None` until the first publication (the live counters stand in).
    pub totals: Option<DirectionStatus>,
    pub at: Option<Instant>,
}

impl<T> Default for Published<T> {
    fn default() -> Self {
        Published {
            rows: Vec::new(),
            totals: None,
            at: None,
        }
    }
}

/// When each SA last carried a packet, as seen from one publication to
/// the next (a packet count that grew since the last look): resolution
/// is the publication interval, with no clock read on the packet path.
#[derive(Default)]
pub(crate) struct Activity(Vec<(SaId, u64, Option<Instant>)>);

impl Activity {
    /// Records `packets` for `id` at `now`; the milliseconds since the
    /// SA's last packet as of `now`, `None` if it never had one.
    pub fn note(&mut self, id: SaId, packets: u64, now: Instant) -> Option<u64> {
        let i = match self.0.iter().position(|(i, _, _)| *i == id) {
            Some(i) => i,
            None => {
                self.0.push((id, 0, None));
                self.0.len() - 1
            }
        };
        let entry = &mut self.0[i];
        if packets > entry.1 {
            entry.1 = packets;
            entry.2 = Some(now);
        }
        entry
            .2
            .map(|t| now.saturating_duration_since(t).as_millis() as u64)
    }

    /// Forgets SAs that left the table.
    pub fn retain(&mut self, live: impl Fn(SaId) -> bool) {
        self.0.retain(|(id, _, _)| live(*id));
    }
}

/// State shared by all threads.
pub(crate) struct Shared {
    pub stop: AtomicBool,
    pub selector: Selector,
    pub started: Instant,
    pub selftest_interval: Duration,
    pub out_counters: Arc<Counters>,
    pub in_counters: Arc<Counters>,
    pub io: IoCounters,
    pub out_status: Mutex<Published<OutboundSaStatus>>,
    pub in_status: Mutex<Published<InboundSaStatus>>,
    pub interface: String,
    pub outer: Encap,
    /// `[inner]`: the checksum policy both pipelines apply.
    pub inner: InnerPolicy,
    /// Whether validated segments are coalesced on the way to TUN: allowed
    /// by the configuration, and TSO granted by the device.
    pub coalesce: bool,
    /// The offloads in use, as the threads find them.
    pub offloads: super::status::OffloadState,
    /// The path MTU per peer as the outbound thread last learned it, for
    /// the inbound thread's MSS clamping, and a count of its changes (read
    /// without the lock to see whether there is anything new).
    pub path_mtu: Mutex<crate::datapath::outbound::PathMtus>,
    pub path_mtu_changes: std::sync::atomic::AtomicU64,
    /// The IKE thread's status, keys and queue drops.
    pub ike: Arc<super::ike::IkeShared>,
}

/// Milliseconds, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Shared {
    pub fn status(&self) -> Status {
        let now = Instant::now();
        /// The rows and totals of one publication; row ages move on to
        /// `now`.
        fn take<T: Clone>(
            m: &Mutex<Published<T>>,
            live: &Counters,
            now: Instant,
            age: impl Fn(&mut T, u64),
        ) -> (Vec<T>, DirectionStatus, Option<Instant>) {
            let p = m.lock().unwrap_or_else(|p| p.into_inner());
            let since = p.at.map_or(0, |at| ms(now.saturating_duration_since(at)));
            let mut rows = p.rows.clone();
            for row in &mut rows {
                age(row, since);
            }
            let totals = p
                .totals
                .clone()
                .unwrap_or_else(|| DirectionStatus::of(live));
            (rows, totals, p.at)
        }
        let (outbound_sas, outbound, out_at) =
            take(&self.out_status, &self.out_counters, now, |r, since| {
                r.last_packet_ms_ago = r.last_packet_ms_ago.map(|m| m.saturating_add(since));
            });
        let (inbound_sas, inbound, in_at) =
            take(&self.in_status, &self.in_counters, now, |r, since| {
                r.last_packet_ms_ago = r.last_packet_ms_ago.map(|m| m.saturating_add(since));
            });
        let oldest = out_at.into_iter().chain(in_at).min();
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
            outbound,
            inbound,
            io: self.io.snapshot(),
            outbound_sas,
            inbound_sas,
            now_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(ms),
            sas_age_ms: oldest.map(|at| ms(now.saturating_duration_since(at))),
            offloads: self.offloads.snapshot(),
            ike: Some(self.ike.snapshot()).filter(|s| !s.peers.is_empty()),
        }
    }

    pub fn status_json(&self) -> String {
        serde_json::to_string(&self.status())
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
    }

    /// Waits, at most `timeout`, until both datapath threads have
    /// published once; `false` if one has not (it then shows up later).
    pub fn wait_first_publish(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.out_status.lock().unwrap_or_else(|p| p.into_inner()).at;
            let inb = self.in_status.lock().unwrap_or_else(|p| p.into_inner()).at;
            if out.is_some() && inb.is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stores a thread's publication (rows and totals together).
    pub fn publish<T>(m: &Mutex<Published<T>>, rows: Vec<T>, counters: &Counters) {
        let totals = DirectionStatus::of(counters);
        *m.lock().unwrap_or_else(|p| p.into_inner()) = Published {
            rows,
            totals: Some(totals),
            at: Some(Instant::now()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_tracks_the_last_growth_of_the_packet_count() {
        let mut a = Activity::default();
        let t0 = Instant::now();
        let id = SaId(1);
        assert_eq!(a.note(id, 0, t0), None, "never");
        assert_eq!(a.note(id, 3, t0), Some(0));
        let later = t0 + Duration::from_millis(400);
        assert_eq!(a.note(id, 3, later), Some(400), "no packet since");
        assert_eq!(a.note(id, 4, later), Some(0));
        a.retain(|_| false);
        assert_eq!(a.note(id, 4, later), Some(0), "a new SA with packets");
    }
}
