//! What the two datapath threads share: batch sizes and timing, the outer
//! sockets, rate-limited drop logs and the periodic self-test.

use std::time::{Duration, Instant};

use super::shared::Shared;
use super::status::IoCounters;
use crate::crypto::select::Transition;
use crate::datapath::{DropContext, DropReason};
use crate::io::socket::OuterSocket;
use crate::sa::reservation::DEFAULT_BLOCK;
use crate::wire::outer::Encap;

/// Packets per pipeline batch: enough to amortize the syscalls and the
/// provider lookup (a 64 KiB GRO train or TSO packet is about 45
/// segments), small enough that a batch's headers stay in cache.
pub(crate) const BATCH: usize = 64;
/// Datagrams per receive call; a GRO train fills one buffer.
pub(crate) const RX_BATCH: usize = 16;
/// Largest datagram or TUN read accepted; anything larger is truncated by
/// the kernel and dropped as such.
pub(crate) const BUF_CAPACITY: usize = 65535;
/// How long a thread sleeps in poll(2) before it checks for stop, plans,
/// self-tests and publishing.
pub(crate) const POLL: Duration = Duration::from_millis(100);
pub(crate) const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// Pause after a failed read, so a persistent error cannot spin a thread.
pub(crate) const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Top up a reservation when fewer than this many numbers are left, so
/// the next block is durable long before it is needed.
pub(crate) const TOP_UP_BELOW: u64 = DEFAULT_BLOCK / 2;

/// The outer sockets, one per address family in use.
pub(crate) struct Sockets {
    pub v4: Option<OuterSocket>,
    pub v6: Option<OuterSocket>,
    /// How ESP is carried on them (the same for both).
    pub encap: Encap,
}

/// At most one log line per drop reason per second, saying how many more
/// were dropped since the last line.
pub(crate) struct DropLog {
    direction: &'static str,
    last: [Option<Instant>; DropReason::ALL.len()],
    suppressed: [u64; DropReason::ALL.len()],
}

impl DropLog {
    pub fn new(direction: &'static str) -> Self {
        DropLog {
            direction,
            last: [None; DropReason::ALL.len()],
            suppressed: [0; DropReason::ALL.len()],
        }
    }

    /// Counts a drop; returns true if it should be logged now (the caller
    /// then gathers the context and calls [`Self::log`]).
    pub fn due(&mut self, reason: DropReason, now: Instant) -> bool {
        let i = reason.index();
        match self.last[i] {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed[i] += 1;
                false
            }
            _ => {
                self.last[i] = Some(now);
                true
            }
        }
    }

    pub fn take_suppressed(&mut self, reason: DropReason) -> u64 {
        std::mem::take(&mut self.suppressed[reason.index()])
    }

    pub fn log(&mut self, reason: DropReason, context: &DropContext) {
        let more = self.take_suppressed(reason);
        let spi = context.spi.map(|s| format!("{s:#010x}"));
        let flow = context.flow.map(|f| f.to_string());
        let spi = spi.as_deref().unwrap_or("-");
        let seq = context
            .seq
            .map_or_else(|| "-".to_string(), |s| s.to_string());
        let flow = flow.as_deref().unwrap_or("-");
        let hint = reason.hint().unwrap_or("-");
        // Routine noise (the kernel's own IPv6 chatter into the TUN,
        // keepalives) at debug; everything else says something is wrong.
        if matches!(reason, DropReason::NoSa | DropReason::Keepalive) {
            tracing::debug!(
                direction = self.direction,
                reason = reason.as_str(),
                spi,
                seq,
                flow,
                suppressed = more,
                hint,
                "dropped"
            );
        } else {
            tracing::warn!(
                direction = self.direction,
                reason = reason.as_str(),
                spi,
                seq,
                flow,
                suppressed = more,
                hint,
                "dropped"
            );
        }
    }
}

/// Runs the long-message self-test when due, on the calling (datapath)
/// thread.
pub(crate) fn maybe_selftest(shared: &Shared, next: &mut Instant, thread: &str) {
    let now = Instant::now();
    if now < *next {
        return;
    }
    *next = now + shared.selftest_interval;
    match shared.selector.periodic_check() {
        Ok(Some(stats)) => tracing::debug!(
            thread,
            "periodic long-message self-test passed ({} bytes in {} us)",
            stats.bytes,
            stats.micros
        ),
        Ok(None) => {}
        Err((failure, transition)) => {
            let now_on = match transition {
                Transition::SwitchedTo(p) => format!("traffic moved to the {p} provider"),
                Transition::Halted => {
                    "traffic HALTED by policy (no provider carries traffic)".into()
                }
                Transition::Unchanged => "the active provider is unchanged".into(),
            };
            tracing::error!(
                thread,
                "periodic long-message self-test FAILED: {failure}; {now_on}"
            );
        }
    }
}

pub(crate) fn count(counter: &std::sync::atomic::AtomicU64) {
    IoCounters::add(counter, 1);
}

/// At most one I/O error line per second per thread.
pub(crate) struct ErrorLog {
    thread: &'static str,
    last: Option<Instant>,
}

impl ErrorLog {
    pub fn new(thread: &'static str) -> Self {
        ErrorLog { thread, last: None }
    }

    /// Whether a line may be logged now (and, if so, counts it as logged).
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            self.last = Some(now);
        }
        due
    }

    pub fn io(&mut self, what: &str, e: &std::io::Error) {
        if self.due() {
            tracing::warn!("{}: {what}: {e}", self.thread);
        }
    }
}
