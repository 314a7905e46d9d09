//! Packet buffers: one allocation per buffer, reused for every packet,
//! with headroom and tailroom so that the pipelines grow and shrink packets
//! in place (like the kernel's `sk_buff` push/pull). Used by the OS edge
//! ([`crate::io`]), which fills them, and by the pipelines
//! ([`crate::datapath`]), which transform them; neither knows the other.

use std::net::SocketAddr;

use crate::wire::esp;

/// The virtio-net header a TUN device opened with `IFF_VNET_HDR` puts in
/// front of every packet (`struct virtio_net_hdr`, 10 bytes, the size
/// TUNSETVNETHDRSZ defaults to); see [`crate::wire::vnet`] once parsed.
pub const VNET_HDR_LEN: usize = 10;

/// Room for a virtio-net header in front of a packet, so that one can be
/// put there for a single write without moving the packet.
pub const VNET_HDR_ROOM: usize = 12;

/// Bytes in front of the data: inbound rebuilds a 40-byte IPv6 header,
/// and a carried hop-by-hop header of up to 64 bytes behind it
/// ([`crate::wire::hop_by_hop`]), where a 16-byte ESP header and IV were
/// (88 more bytes), and a virtio-net header may precede that.
pub const HEADROOM: usize = 128;
const _: () = assert!(
    HEADROOM
        >= 40 + crate::wire::hop_by_hop::MAX_LEN - (esp::HEADER_LEN + esp::IV_LEN) + VNET_HDR_ROOM
);
/// Bytes behind the data: outbound appends padding, trailer and ICV.
pub const TAILROOM: usize = esp::MAX_TAIL;

/// What travels with a packet besides its bytes (the length is the
/// buffer's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketMeta {
    /// The outer peer: the source of a received datagram, as the socket
    /// reported it.
    pub peer: Option<SocketAddr>,
    /// For a GSO/GRO train: the size of each segment but the last; 0 for a
    /// single packet.
    pub segment_size: u16,
    /// The virtio-net header read with the packet from a TUN device opened
    /// with `IFF_VNET_HDR` (all zero otherwise).
    pub vnet: [u8; VNET_HDR_LEN],
    /// The IPv4 TOS / IPv6 traffic class byte (DSCP and ECN, see
    /// [`crate::wire::ecn`]): outbound, the sealed inner packet's, for the
    /// socket to send the outer packet with; inbound, the received outer
    /// packet's as the socket reported it (0 if it did not).
    pub tos: u8,
    /// Outbound: a datagram put back together from the fragments the
    /// local kernel cut (`datapath::reassembly`). Its sender chose to
    /// fragment, so its ESP packet goes out whole and the host fragments
    /// the outer packet (RFC 4301 section 4.1, as Linux does); it never
    /// gets a Packet Too Big. Set for every packet that enters a batch.
    pub reassembled: bool,
}

/// One packet buffer with headroom and tailroom, allocated once and reused
/// for every packet (after the `sk_buff`'s push/pull).
#[derive(Clone)]
pub struct PacketBuf {
    storage: Box<[u8]>,
    start: usize,
    end: usize,
    pub meta: PacketMeta,
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
            meta: PacketMeta::default(),
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

    /// Marks the first `len` bytes of the read area as the packet, with
    /// no metadata yet.
    pub fn set_len(&mut self, len: usize) {
        self.start = HEADROOM;
        self.end = HEADROOM + len.min(self.capacity());
        self.meta = PacketMeta::default();
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

/// A batch of packet buffers, allocated once: the I/O edge fills a prefix
/// of it ([`Self::slots`], then [`Self::set_len`]), the pipelines work on
/// [`Self::packets_mut`], one verdict per packet.
pub struct Batch {
    bufs: Vec<PacketBuf>,
    len: usize,
}

impl Batch {
    /// `count` buffers for packets of up to `capacity` bytes each.
    pub fn new(count: usize, capacity: usize) -> Self {
        Batch {
            bufs: (0..count).map(|_| PacketBuf::new(capacity)).collect(),
            len: 0,
        }
    }

    /// Every buffer, for a read to fill from the start.
    pub fn slots(&mut self) -> &mut [PacketBuf] {
        &mut self.bufs
    }

    /// How many buffers, from the start, hold packets.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.bufs.len());
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn packets(&self) -> &[PacketBuf] {
        &self.bufs[..self.len]
    }

    pub fn packets_mut(&mut self) -> &mut [PacketBuf] {
        &mut self.bufs[..self.len]
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

    #[test]
    fn a_batch_shows_only_what_was_filled_and_refilling_clears_metadata() {
        let mut batch = Batch::new(4, 100);
        assert!(batch.is_empty());
        for (i, slot) in batch.slots().iter_mut().take(2).enumerate() {
            assert!(slot.fill(&[i as u8; 10]));
            slot.meta.peer = Some(SocketAddr::from(([198, 18, 0, 2], 4500)));
        }
        batch.set_len(2);
        assert_eq!(batch.packets().len(), 2);
        assert_eq!(batch.packets()[1].data(), [1u8; 10]);
        batch.set_len(99);
        assert_eq!(batch.len(), 4, "clamped to the buffers there are");
        let slot = &mut batch.slots()[0];
        slot.set_len(3);
        assert_eq!(
            slot.meta,
            PacketMeta::default(),
            "a new packet, no old peer"
        );
    }
}
