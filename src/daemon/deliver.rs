//! Writing delivered packets to the TUN device, coalesced where the
//! promise allows it.
//!
//! A coalesced train is written with NEEDS_CSUM, and the kernel never
//! checks such a packet's checksum again (`virtio_net_hdr_to_skb`): only
//! segments that passed the inner checksum at their final position may be
//! in it. [`crate::wire::gso::check`] validates each one again where it
//! lies, and only what passes becomes a `Verified` that a train accepts; a
//! packet under a policy exception, or anything else, goes out alone behind
//! an all-zero header, which makes the kernel check it itself.

use std::ops::Range;

use crate::io::tun::Tun;
use crate::packet::{PacketBuf, VNET_HDR_LEN};
use crate::wire::gso::{Checked, TRAIN_BUFFER_LEN, Train, TrainConfig, check};
use crate::wire::inner::InnerPolicy;

use crate::datapath::Verdict;

/// Coalesces and writes delivered packets.
pub(crate) struct Deliverer {
    /// Where a train is built: its virtio-net header, then the packet.
    train: Box<[u8]>,
    config: TrainConfig,
    /// Off without the virtio-net header, and for good once the kernel
    /// refuses a GSO write (some 6.1 and 6.6 point releases do).
    coalesce: bool,
}

/// What a call to [`Deliverer::deliver`] did, for counters and logs.
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    pub written: u64,
    /// Packets that went out inside trains of two or more.
    pub coalesced: u64,
    pub errors: u64,
    pub last_error: Option<std::io::Error>,
    /// The kernel refused a GSO write: coalescing is now off.
    pub gso_refused: bool,
}

impl Deliverer {
    pub fn new(tun: &Tun, coalesce: bool) -> Self {
        let offloads = tun.offloads();
        Deliverer {
            train: vec![0; TRAIN_BUFFER_LEN].into_boxed_slice(),
            config: TrainConfig {
                udp: offloads.uso,
                ..TrainConfig::default()
            },
            coalesce: coalesce && tun.has_vnet_hdr() && offloads.tso,
        }
    }

    /// Writes every packet with verdict [`Verdict::Deliver`], in order
    /// within each flow: consecutive segments of one flow as one train.
    pub fn deliver(
        &mut self,
        tun: &Tun,
        policy: InnerPolicy,
        bufs: &[PacketBuf],
        verdicts: &[Verdict],
    ) -> Delivered {
        let mut out = Delivered::default();
        let delivered = |i: usize| verdicts.get(i) == Some(&Verdict::Deliver);
        let mut i = 0;
        while i < bufs.len() {
            if !delivered(i) {
                i += 1;
                continue;
            }
            if !self.coalesce {
                write_alone(tun, &bufs[i], &mut out);
                i += 1;
                continue;
            }
            let first = match check(bufs[i].data(), policy) {
                Ok(Checked::Verified(p)) => p,
                // A policy exception (or, impossibly, a packet that no
                // longer validates): alone, for the kernel to check.
                _ => {
                    write_alone(tun, &bufs[i], &mut out);
                    i += 1;
                    continue;
                }
            };
            let Ok(mut train) = Train::start(&mut self.train, first, self.config) else {
                write_alone(tun, &bufs[i], &mut out);
                i += 1;
                continue;
            };
            let mut end = i + 1;
            let mut members = 1;
            while end < bufs.len() && !train.is_closed() {
                if !delivered(end) {
                    // Dropped: not written. The next one's sequence number
                    // no longer follows, which ends the train.
                    end += 1;
                    continue;
                }
                let Ok(Checked::Verified(p)) = check(bufs[end].data(), policy) else {
                    break;
                };
                if train.push(p).is_err() {
                    // It starts the next train (or goes alone).
                    break;
                }
                members += 1;
                end += 1;
            }
            let len = train.finish();
            self.write_train(tun, len, members, bufs, verdicts, i..end, &mut out);
            i = end;
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn write_train(
        &mut self,
        tun: &Tun,
        len: usize,
        members: usize,
        bufs: &[PacketBuf],
        verdicts: &[Verdict],
        range: Range<usize>,
        out: &mut Delivered,
    ) {
        let (hdr, packet) = self.train[..len].split_at(VNET_HDR_LEN);
        let mut header = [0u8; VNET_HDR_LEN];
        header.copy_from_slice(hdr);
        match tun.write_with_header(&header, packet) {
            Ok(()) => {
                out.written += 1;
                if members > 1 {
                    out.coalesced += members as u64;
                }
            }
            Err(e) if members > 1 && e.raw_os_error() == Some(libc::EINVAL) => {
                // The kernel does not take GSO writes: off for good, and
                // this train's packets go out one by one.
                self.coalesce = false;
                out.gso_refused = true;
                for i in range {
                    if verdicts.get(i) == Some(&Verdict::Deliver) {
                        write_alone(tun, &bufs[i], out);
                    }
                }
            }
            Err(e) => {
                out.errors += 1;
                out.last_error = Some(e);
            }
        }
    }
}

fn write_alone(tun: &Tun, buf: &PacketBuf, out: &mut Delivered) {
    match tun.write(buf.data()) {
        Ok(()) => out.written += 1,
        Err(e) => {
            out.errors += 1;
            out.last_error = Some(e);
        }
    }
}
