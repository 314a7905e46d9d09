//! How IKE SAs end: deleted on stop or as childless, failed (counted,
//! logged, retried after a back-off), reaped once closed.

use std::time::Instant;

use super::explain::{count, explain};
use super::{IkeWorker, LOG_EVERY, STOP_WAIT, Slot};
use crate::ike::sa::{IkeError, Role};

impl IkeWorker {
    /// The daemon stops: each established IKE SA is deleted (RFC 7296
    /// section 1.4.1: its CHILD SAs go with it), so the peer clears its
    /// SAs now instead of after its dead peer detection, and stops
    /// sending ESP into a tunnel that is gone. Answers are taken for at
    /// most [`STOP_WAIT`]; nothing new is started meanwhile. With
    /// `outer = "udp"` the answers come through the inbound thread, which
    /// keeps passing them on until this thread is done
    /// (`IkeShared::farewell`).
    pub(super) fn delete_all(&mut self, buf: &mut [u8]) {
        self.stopping = true;
        let now = Instant::now();
        for i in 0..self.peers.len() {
            for slot in 0..self.peers[i].slots.len() {
                if self.peers[i].slots[slot].live() {
                    self.close_slot(i, slot, now);
                }
            }
            self.reap(i, now);
        }
        let deadline = now + STOP_WAIT;
        let mut publish_due = now;
        while Instant::now() < deadline
            && self.peers.iter().any(|p| p.slots.iter().any(|s| s.closing))
        {
            self.step(buf, &mut publish_due, Some(deadline));
        }
    }

    /// Sends the Delete of the IKE SA in `slot` (RFC 7296 section 1.4.1).
    /// The slot stays, marked closing, until the answer or the end of its
    /// retransmissions closes it; its CHILD SAs go then.
    pub(super) fn close_slot(&mut self, i: usize, slot: usize, now: Instant) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        s.closing = true;
        let (spi_i, spi_r) = s.sa.spis();
        match s.sa.close(now, &mut self.rng) {
            Ok(actions) => {
                let out = s.sa.outputs(actions);
                p.counters.deletes_sent += 1;
                tracing::info!(
                    peer = %p.cfg.name,
                    spi_i = format_args!("{spi_i:016x}"),
                    spi_r = format_args!("{spi_r:016x}"),
                    "IKE: deleting the IKE SA"
                );
                self.act(i, slot, out, now);
            }
            Err(e) => {
                // Sealing failed (not expected with working crypto): the
                // SA stays as it was; its lifetimes or liveness end it.
                s.closing = false;
                tracing::warn!(peer = %p.cfg.name, "IKE: the Delete could not be sent: {e}");
            }
        }
    }

    /// After a CHILD SA failed: an IKE SA that holds no usable CHILD SA
    /// (IKE_AUTH's was refused, by either side; not a failed rekey, whose
    /// old CHILD SA lives on) carries nothing between two hosts, so it is
    /// deleted, and an initiator tries again after the back-off. The
    /// peer will likely answer the same again (it narrows the selectors,
    /// it wants another proposal), so the back-off keeps doubling: the
    /// establishment before the failure did not reset it (only an
    /// installed CHILD SA does, in [`IkeWorker::install`]).
    ///
    /// Not deleted at once: when we refused a CHILD SA the peer had
    /// created, the IKE SA has just sent its Delete (RFC 7296 section
    /// 2.9), and with a window of one (section 2.3) a Delete of the IKE
    /// SA now would abandon it: the peer, still waiting for that message
    /// ID, could ignore the next one. Deleting the IKE SA alone would
    /// also remove the CHILD SA (section 1.4.1), but the library has
    /// already spent the message ID; so: the CHILD SA's Delete, its
    /// answer, then the IKE SA's Delete ([`IkeWorker::close_idle`]). A
    /// peer that never answers ends the IKE SA as dead (section 2.4).
    pub(super) fn close_if_childless(&mut self, i: usize, slot: usize, now: Instant) {
        let p = &mut self.peers[i];
        let Some(s) = p.slots.get_mut(slot) else {
            return;
        };
        if s.carries() || s.sa.status() != crate::ike::sa::Status::Established {
            return;
        }
        s.close_when_idle = true;
        if p.cfg.ike.initiate {
            let wait = p.back_off(now);
            tracing::info!(
                peer = %p.cfg.name,
                "IKE: the IKE SA has no CHILD SA: deleting it; initiating again in {wait:?}"
            );
        } else {
            tracing::info!(peer = %p.cfg.name, "IKE: the IKE SA has no CHILD SA: deleting it");
        }
    }

    /// Deletes the IKE SAs of peer `i` marked by
    /// [`IkeWorker::close_if_childless`] whose window is free.
    pub(super) fn close_idle(&mut self, i: usize, now: Instant) {
        for slot in 0..self.peers[i].slots.len() {
            let Some(s) = self.peers[i].slots.get_mut(slot) else {
                break;
            };
            if !s.close_when_idle || s.sa.request_outstanding() {
                continue;
            }
            s.close_when_idle = false;
            self.close_slot(i, slot, now);
        }
    }

    /// The IKE SA failed: count, log, and for an initiator plan the next
    /// attempt.
    pub(super) fn failed(&mut self, i: usize, e: IkeError, now: Instant) {
        self.count_failure(i, &e);
        let p = &self.peers[i];
        let text = explain(p, &e);
        self.log_failure(i, &text, now);
        let p = &mut self.peers[i];
        // A stray SA failing next to an established one changes nothing.
        let established = p.slots.iter().any(Slot::live);
        if p.cfg.ike.initiate && !established {
            let wait = p.back_off(now);
            tracing::info!(peer = %p.cfg.name, "IKE: initiating again in {wait:?}");
        }
    }

    pub(super) fn count_failure(&mut self, i: usize, e: &IkeError) {
        count(&mut self.peers[i].counters, e);
    }

    /// Logs a failure, at most once per [`LOG_EVERY`] per peer.
    pub(super) fn log_failure(&mut self, i: usize, text: &str, now: Instant) {
        let p = &mut self.peers[i];
        p.last_error = Some(text.to_string());
        if p.last_log
            .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
        {
            p.suppressed += 1;
            return;
        }
        let more = std::mem::take(&mut p.suppressed);
        p.last_log = Some(now);
        tracing::warn!(peer = %p.cfg.name, suppressed = more, "IKE: {text}");
    }

    /// Removes closed IKE SAs; makes an initiator with none try again.
    pub(super) fn reap(&mut self, i: usize, now: Instant) {
        let p = &mut self.peers[i];
        let before = p.slots.len();
        let gate = &mut self.gate;
        p.slots.retain(|s| {
            let closed = s.sa.status() == crate::ike::sa::Status::Closed;
            if closed && let Some(g) = gate.as_mut() {
                g.completed(s.sa.spis().0);
            }
            !closed
        });
        if p.slots.len() != before {
            self.publish_keys();
        }
        let p = &mut self.peers[i];
        let slots = &p.slots;
        p.kept.retain(|c| {
            slots.iter().any(|s| {
                s.sa.children()
                    .iter()
                    .any(|l| l.inbound_spi == c.inbound_spi)
            })
        });
        let p = &mut self.peers[i];
        let up = p
            .slots
            .iter()
            .any(|s| s.established || s.sa.role() == Role::Initiator);
        if p.cfg.ike.initiate && !up && p.next_initiate.is_none() {
            p.next_initiate = Some(now + p.backoff);
        }
    }
}
