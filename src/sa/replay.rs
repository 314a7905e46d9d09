//! Anti-replay window with extended sequence numbers.
//!
//! RFC 4303 section 3.4.3: check a packet's sequence number against the
//! window *before* decrypting (cheap rejection), and update the window only
//! *after* the ICV verified (so forged packets cannot move it). With ESN the
//! high 32 bits are not on the wire; Appendix A2.2 infers them from the
//! window, and a wrong guess simply fails the ICV.
//!
//! The bitmap follows RFC 6479: a ring of 64-bit blocks with at least one
//! block more than the window needs (rounded up to a power of two, so the
//! index is a mask), so advancing the window clears whole blocks instead of
//! shifting the bitmap, and the cost of a packet does not grow with the
//! window size. Memory is allocated once, when the SA is created.

/// Largest window accepted (packets): 8 KiB of bitmap, 16 KiB allocated
/// once the ring is rounded up to a power of two.
pub const MAX_WINDOW: u32 = 65536;
/// Default window: comfortably above what reordering on a LAN or a
/// multi-queue NIC produces at 10 Gb/s.
pub const DEFAULT_WINDOW: u32 = 4096;

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Already received within the window.
    #[error("sequence number already received")]
    Replayed,
    /// Left of the window (or, with ESN, would need a high half below 0).
    #[error("sequence number older than the replay window")]
    TooOld,
    /// With ESN, the inferred high half would pass 2^32 - 1: the sender
    /// must have rekeyed long before this.
    #[error("sequence number beyond the 64-bit space")]
    Exhausted,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replay window must be 1 to {MAX_WINDOW} packets, got {0}")]
pub struct WindowSizeError(pub u32);

/// The receive-side window of one inbound SA.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Packets accepted to the left of `top`, `top` included.
    size: u64,
    esn: bool,
    /// Highest sequence number that passed the ICV (0: none yet; sequence
    /// number 0 is never sent, RFC 4303 section 3.3.3).
    top: u64,
    blocks: Box<[u64]>,
}

impl ReplayWindow {
    pub fn new(size: u32, esn: bool) -> Result<Self, WindowSizeError> {
        if size == 0 || size > MAX_WINDOW {
            return Err(WindowSizeError(size));
        }
        // One spare block (RFC 6479 section 2): the block `top` is in may be
        // partly ahead of the window, so the window spans one more block.
        // Rounded up to a power of two so the ring index is a mask, not a
        // division, on every packet.
        let blocks = ((size as usize).div_ceil(64) + 1).next_power_of_two();
        Ok(ReplayWindow {
            size: u64::from(size),
            esn,
            top: 0,
            blocks: vec![0u64; blocks].into_boxed_slice(),
        })
    }

    pub fn size(&self) -> u32 {
        self.size as u32
    }

    /// Highest sequence number accepted so far (0 before the first).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// The full sequence number for the 32 bits on the wire (RFC 4303
    /// Appendix A2.2); without ESN the high half is always 0.
    pub fn infer(&self, seq_low: u32) -> Result<u64, ReplayError> {
        if !self.esn {
            return Ok(u64::from(seq_low));
        }
        let w = self.size as u32;
        let (th, tl) = ((self.top >> 32) as u32, self.top as u32);
        let bottom = tl.wrapping_sub(w - 1);
        let seq_high = if tl >= w - 1 {
            // Case A: the window lies within one 2^32 subspace.
            if seq_low >= bottom {
                Some(th)
            } else {
                th.checked_add(1).ok_or(ReplayError::Exhausted).map(Some)?
            }
        } else if seq_low >= bottom {
            // Case B, the window spans two subspaces; seq_low is in the
            // upper part of the previous one.
            th.checked_sub(1)
        } else {
            Some(th)
        };
        let seq_high = seq_high.ok_or(ReplayError::TooOld)?;
        Ok(u64::from(seq_high) << 32 | u64::from(seq_low))
    }

    /// Before decryption: may `seq` (already inferred) be a new packet?
    /// Does not change the window.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            // Never sent; before the first packet it is "too old" by rule.
            return Err(ReplayError::TooOld);
        }
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= self.size {
            return Err(ReplayError::TooOld);
        }
        let (block, bit) = self.position(seq);
        if self.blocks[block] & bit != 0 {
            Err(ReplayError::Replayed)
        } else {
            Ok(())
        }
    }

    /// After the ICV verified: record `seq`. Checks again, so a duplicate
    /// that raced its twin through decryption in one batch is still caught.
    pub fn update(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check(seq)?;
        if seq > self.top {
            let old_block = self.top >> 6;
            let new_block = seq >> 6;
            // Clear the blocks the window slides into; after a jump of a
            // whole ring or more, all of them.
            let n = self.blocks.len() as u64;
            let steps = (new_block - old_block).min(n);
            for k in 1..=steps {
                let index = ((old_block + k) & (n - 1)) as usize;
                self.blocks[index] = 0;
            }
            self.top = seq;
        }
        let (block, bit) = self.position(seq);
        self.blocks[block] |= bit;
        Ok(())
    }

    fn position(&self, seq: u64) -> (usize, u64) {
        let block = ((seq >> 6) & (self.blocks.len() as u64 - 1)) as usize;
        (block, 1u64 << (seq & 63))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn accept(w: &mut ReplayWindow, seq: u64) -> Result<(), ReplayError> {
        w.check(seq)?;
        w.update(seq)
    }

    #[test]
    fn duplicates_reordering_and_old_packets() {
        let mut w = ReplayWindow::new(64, false).expect("window");
        assert_eq!(accept(&mut w, 0), Err(ReplayError::TooOld));
        for seq in [1, 3, 2, 10, 5] {
            assert_eq!(accept(&mut w, seq), Ok(()), "seq {seq}");
        }
        assert_eq!(accept(&mut w, 3), Err(ReplayError::Replayed));
        assert_eq!(accept(&mut w, 10), Err(ReplayError::Replayed));
        assert_eq!(accept(&mut w, 200), Ok(()));
        // Window is 137..=200 now.
        assert_eq!(accept(&mut w, 136), Err(ReplayError::TooOld));
        assert_eq!(accept(&mut w, 137), Ok(()));
        assert_eq!(accept(&mut w, 137), Err(ReplayError::Replayed));
        assert_eq!(accept(&mut w, 199), Ok(()));
        assert_eq!(w.top(), 200);
    }

    #[test]
    fn check_does_not_change_the_window() {
        let mut w = ReplayWindow::new(32, false).expect("window");
        assert_eq!(w.check(5), Ok(()));
        assert_eq!(
            w.check(5),
            Ok(()),
            "a packet that failed its ICV leaves no trace"
        );
        assert_eq!(w.top(), 0);
        w.update(5).expect("first");
        assert_eq!(w.update(5), Err(ReplayError::Replayed));
    }

    #[test]
    fn window_sizes_are_bounded() {
        assert_eq!(ReplayWindow::new(0, false).err(), Some(WindowSizeError(0)));
        assert!(ReplayWindow::new(MAX_WINDOW + 1, true).is_err());
        assert!(ReplayWindow::new(MAX_WINDOW, true).is_ok());
        assert!(ReplayWindow::new(1, true).is_ok());
    }

    #[test]
    fn esn_inference_round_trips_around_the_2_32_boundary() {
        for size in [1u32, 64, 4096] {
            for top in [
                size as u64,
                (1u64 << 32) - 1,
                1u64 << 32,
                (1u64 << 32) + 5,
                (1u64 << 32) + u64::from(size) + 7,
                (7u64 << 32) - 3,
            ] {
                let mut w = ReplayWindow::new(size, true).expect("window");
                w.update(top).expect("top");
                // Everything inside the window, and well ahead of it, infers
                // back to itself from its low 32 bits alone.
                let behind = (0..u64::from(size)).map(|d| top - d);
                let ahead = [1u64, 2, 1000, 1 << 31].map(|d| top + d);
                for seq in behind.chain(ahead) {
                    assert_eq!(
                        w.infer(seq as u32),
                        Ok(seq),
                        "size {size} top {top:#x} seq {seq:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn esn_rollover_accepts_the_new_subspace_and_rejects_replays_across_it() {
        let mut w = ReplayWindow::new(128, true).expect("window");
        let start = (1u64 << 32) - 100;
        // An SA that has been running: its window already sits below 2^32.
        w.update(start - 1).expect("seed");
        for seq in start..start + 200 {
            let inferred = w.infer(seq as u32).expect("infer");
            assert_eq!(inferred, seq);
            accept(&mut w, inferred).expect("in order");
        }
        assert_eq!(w.top(), (1u64 << 32) + 99);
        // A replay of a packet from just before the boundary, inside the
        // window: inferred into the old subspace and refused as a replay.
        let old = (1u64 << 32) - 10;
        let inferred = w.infer(old as u32).expect("infer");
        assert_eq!(inferred, old);
        assert_eq!(w.check(inferred), Err(ReplayError::Replayed));
    }

    #[test]
    fn esn_edges_are_typed_errors_not_overflows() {
        let mut w = ReplayWindow::new(64, true).expect("window");
        // Before anything was received, a low half near 2^32 would need
        // high half -1.
        assert_eq!(w.infer(u32::MAX), Err(ReplayError::TooOld));
        w.update(u64::MAX - 1).expect("near the end");
        assert_eq!(w.infer(5), Err(ReplayError::Exhausted));
    }

    #[test]
    fn matches_a_naive_model_on_random_traffic() {
        // Model: a set of everything accepted; accept iff unseen and within
        // `size` of the highest accepted.
        let mut x = 0x1234_5678_9ABC_DEF1u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for size in [1u32, 63, 64, 65, 1000, 4096] {
            let mut w = ReplayWindow::new(size, false).expect("window");
            let mut seen = HashSet::new();
            let mut top = 0u64;
            let mut base = 1u64;
            for _ in 0..20_000 {
                let r = rand();
                // Mostly near the front, sometimes far behind or far ahead.
                let seq = match r % 16 {
                    0 => base + (r >> 8) % 20_000,
                    1 => base.saturating_sub((r >> 8) % 10_000).max(1),
                    _ => (base + (r >> 8) % 64).saturating_sub(32).max(1),
                };
                base = base.max(seq);
                let expected = if seen.contains(&seq) {
                    Err(ReplayError::Replayed)
                } else if top >= seq && top - seq >= u64::from(size) {
                    Err(ReplayError::TooOld)
                } else {
                    Ok(())
                };
                let got = accept(&mut w, seq);
                // The window forgets what slid out, so a very old duplicate
                // is TooOld rather than Replayed: both refuse it.
                match (expected, got) {
                    (Err(ReplayError::Replayed), Err(ReplayError::TooOld)) => {
                        assert!(top - seq >= u64::from(size));
                    }
                    (e, g) => assert_eq!(e, g, "size {size} seq {seq} top {top}"),
                }
                if got.is_ok() {
                    seen.insert(seq);
                    top = top.max(seq);
                }
            }
        }
    }
}
