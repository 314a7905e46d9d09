//! One packet read from the TUN device into the outbound batch: a
//! fragment through the reassembler, a virtio-net super-packet split into
//! segments, a NEEDS_CSUM packet finished, anything else handed over.

use std::time::Instant;

use crate::datapath::DropReason;
use crate::datapath::reassembly::{Pushed, Reassembler};
use crate::packet::{Batch, PacketBuf};
use crate::wire::gso::{GsoError, Splitter, complete_single};
use crate::wire::hop_by_hop;
use crate::wire::inner::{InnerError, InnerPolicy};
use crate::wire::ip::{self, protocol};
use crate::wire::vnet::{GsoType, VirtioNetHdr};

/// The drop reason for a packet the offload code refused: a bad checksum
/// or inner header is what it would have been without offloads.
fn offload_reason(e: &GsoError) -> DropReason {
    match e {
        GsoError::Inner(inner) => DropReason::from(*inner),
        _ => DropReason::Offload,
    }
}

/// RFC 8200 section 8.1: an IPv6 UDP checksum that computes to zero is
/// sent as 0xFFFF (zero means "none", which IPv6 does not allow).
/// `complete_single` does this for UDP right behind the IPv6 header; this
/// does it for UDP behind a hop-by-hop header, which it leaves alone.
fn udp6_zero_checksum_behind_hop_by_hop(hdr: &VirtioNetHdr, packet: &mut [u8]) {
    /// The UDP checksum's offset in its header (RFC 768).
    const UDP_CHECKSUM: usize = 6;
    let Ok(Some(h)) = hop_by_hop::first_header(packet) else {
        return;
    };
    let start = usize::from(hdr.csum_start);
    if !hdr.needs_csum()
        || h.next != protocol::UDP
        || start != ip::IPV6_HEADER_LEN + h.len
        || usize::from(hdr.csum_offset) != UDP_CHECKSUM
    {
        return;
    }
    if let Some(field) = packet.get_mut(start + UDP_CHECKSUM..start + UDP_CHECKSUM + 2)
        && field == [0, 0]
    {
        field.copy_from_slice(&[0xFF, 0xFF]);
    }
}

/// Moves one packet read from the TUN device into `batch` at `filled`,
/// calling `full` with the batch whenever it fills up (the caller seals
/// and sends it; it is then empty); returns the new fill, never above the
/// batch size. `drop` hears of each segment or packet refused.
///
/// With the virtio-net header (`vnet`), the packet is finished first, from
/// the bytes as the kernel handed them over: a NEEDS_CSUM packet gets its
/// checksum computed in place, a super-packet is split with each segment's
/// checksum summed from the source payload. Either way the pipeline then
/// validates the copy it seals, so the receiver's check covers our copy
/// and our cipher.
#[allow(clippy::too_many_arguments)]
pub(super) fn take_packet(
    vnet: bool,
    policy: InnerPolicy,
    reassembler: Option<(&mut Reassembler, Instant)>,
    slot: &mut PacketBuf,
    batch: &mut Batch,
    mut filled: usize,
    full: &mut dyn FnMut(&mut Batch),
    drop: &mut dyn FnMut(DropReason),
) -> usize {
    let capacity = batch.slots().len();
    let mut make_room = |batch: &mut Batch, filled: &mut usize| {
        if *filled == capacity {
            batch.set_len(*filled);
            full(batch);
            *filled = 0;
        }
    };
    let hdr = if vnet {
        match VirtioNetHdr::parse(&slot.meta.vnet) {
            Ok(hdr) => Some(hdr),
            Err(_) => {
                drop(DropReason::Offload);
                return filled;
            }
        }
    } else {
        None
    };
    // A fragment (never a super-packet, never NEEDS_CSUM: the kernel
    // finishes the checksum before it fragments) goes to the reassembler,
    // and its datagram, once whole, into the batch like any packet.
    if let Some((reassembler, now)) = reassembler
        && hdr.is_none_or(|h| h.gso() == Ok(GsoType::None) && !h.needs_csum())
    {
        make_room(batch, &mut filled);
        let out = &mut batch.slots()[filled];
        match reassembler.push(slot.data(), now, out.read_area()) {
            Pushed::NotFragment => {}
            Pushed::Held => return filled,
            Pushed::Dropped(reason) => {
                drop(reason);
                return filled;
            }
            Pushed::Complete(len) => {
                out.set_len(len);
                out.meta.reassembled = true;
                return filled + 1;
            }
        }
    }
    match hdr {
        Some(hdr) if hdr.gso() != Ok(GsoType::None) => {
            let splitter = match Splitter::new(&hdr, slot.data()) {
                Ok(s) => s,
                Err(e) => {
                    drop(offload_reason(&e));
                    return filled;
                }
            };
            for i in 0..splitter.count() {
                make_room(batch, &mut filled);
                let out = &mut batch.slots()[filled];
                let written = splitter
                    .write_segment(i, out.read_area(), policy)
                    .map(|v| v.total_len);
                match written {
                    Ok(len) => {
                        out.set_len(len);
                        out.meta.reassembled = false;
                        filled += 1;
                    }
                    Err(e) => drop(offload_reason(&e)),
                }
            }
            return filled;
        }
        Some(hdr) => match complete_single(&hdr, slot.data_mut(), policy) {
            Ok(_) => {}
            // An IPv6 hop-by-hop header in front of the transport header:
            // the checksum behind it is filled in, and the pipeline
            // decides (carried, validated behind the header, or dropped
            // as hop_by_hop, counted there once).
            Err(GsoError::Inner(InnerError::HopByHop)) => {
                udp6_zero_checksum_behind_hop_by_hop(&hdr, slot.data_mut());
            }
            Err(e) => {
                drop(offload_reason(&e));
                return filled;
            }
        },
        None => {}
    }
    // A whole packet: handed over, not copied. A split before it may have
    // left the batch full.
    make_room(batch, &mut filled);
    std::mem::swap(slot, &mut batch.slots()[filled]);
    batch.slots()[filled].meta.reassembled = false;
    filled + 1
}
