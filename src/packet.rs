//! Packet buffers: one allocation per buffer, reused for every packet,
//! with headroom and tailroom so that the pipelines grow and shrink packets
//! in place (like the kernel's `sk_buff` push/pull). Used by the OS edge
//! ([`crate::io`]), which fills them, and by the pipelines
//! ([`crate::datapath`]), which transform them; neither knows the other.

use crate::wire::esp;

/// Bytes in front of the data: inbound rebuilds a 40-byte IPv6 header
/// where a 16-byte ESP header and IV were.
pub const HEADROOM: usize = 64;
/// Bytes behind the data: outbound appends padding, trailer and ICV.
pub const TAILROOM: usize = esp::MAX_TAIL;

/// One packet buffer with headroom and tailroom, allocated once and reused
/// for every packet (after the `sk_buff`'s push/pull).
#[derive(Clone)]
pub struct PacketBuf {
    storage: Box<[u8]>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PacketBuf({} bytes)", self.end - self.start)
    }
}

impl PacketBuf {
    /// A buffer for packets of up to `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        PacketBuf {
            storage: vec![0u8; HEADROOM + capacity + TAILROOM].into_boxed_slice(),
            start: HEADROOM,
            end: HEADROOM,
        }
    }

    pub fn capacity(&self) -> usize {
        self.storage.len() - HEADROOM - TAILROOM
    }

    /// Where an I/O read should land; follow with [`Self::set_len`].
    pub fn read_area(&mut self) -> &mut [u8] {
        let end = self.storage.len() - TAILROOM;
        &mut self.storage[HEADROOM..end]
    }

    /// Marks the first `len` bytes of the read area as the packet.
    pub fn set_len(&mut self, len: usize) {
        self.start = HEADROOM;
        self.end = HEADROOM + len.min(self.capacity());
    }

    /// Copies `data` in as the packet; false if it does not fit.
    pub fn fill(&mut self, data: &[u8]) -> bool {
        if data.len() > self.capacity() {
            return false;
        }
        self.read_area()[..data.len()].copy_from_slice(data);
        self.set_len(data.len());
        true
    }

    pub fn data(&self) -> &[u8] {
        &self.storage[self.start..self.end]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Grows the data `n` bytes into the headroom (for outer headers, see
    /// [`crate::wire::outer`]); false if the headroom is smaller.
    pub fn prepend(&mut self, n: usize) -> bool {
        match self.start.checked_sub(n) {
            Some(start) => {
                self.start = start;
                true
            }
            None => false,
        }
    }

    /// The whole storage and the data's position in it, for pipelines
    /// that grow the data into the headroom or tailroom.
    pub(crate) fn parts(&mut self) -> (&mut [u8], usize, usize) {
        (&mut self.storage, self.start, self.end)
    }

    pub(crate) fn set_range(&mut self, start: usize, end: usize) {
        debug_assert!(start <= end && end <= self.storage.len());
        self.start = start;
        self.end = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_buffers_refuse_what_does_not_fit() {
        let mut b = PacketBuf::new(100);
        assert!(b.fill(&[1; 100]));
        assert_eq!(b.len(), 100);
        assert!(!b.fill(&[1; 101]));
        b.set_len(1000);
        assert_eq!(b.len(), 100, "set_len is clamped");
        assert!(b.prepend(HEADROOM));
        assert_eq!(b.len(), 100 + HEADROOM);
        assert!(!b.prepend(1), "no headroom left");
    }
}
