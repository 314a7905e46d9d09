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
    /// Coalescing TCP if `coalesce`, and UDP too if `udp` (USO granted).
    pub fn with(coalesce: bool, udp: bool) -> Self {
        Deliverer {
            train: vec![0; TRAIN_BUFFER_LEN].into_boxed_slice(),
            config: TrainConfig {
                udp,
                ..TrainConfig::default()
            },
            coalesce,
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
        self.deliver_to(
            &mut |w: Write<'_>| match w {
                Write::Train { vnet, packet, .. } => tun.write_with_header(vnet, packet),
                Write::Alone(packet) => tun.write(packet),
            },
            policy,
            bufs,
            verdicts,
        )
    }

    /// [`Self::deliver`] into any sink (the TUN device, or a test).
    pub fn deliver_to(
        &mut self,
        sink: &mut dyn FnMut(Write<'_>) -> std::io::Result<()>,
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
                write_alone(sink, &bufs[i], &mut out);
                i += 1;
                continue;
            }
            let first = match check(bufs[i].data(), policy) {
                Ok(Checked::Verified(p)) => p,
                // A policy exception (or, impossibly, a packet that no
                // longer validates): alone, for the kernel to check.
                _ => {
                    write_alone(sink, &bufs[i], &mut out);
                    i += 1;
                    continue;
                }
            };
            let Ok(mut train) = Train::start(&mut self.train, first, self.config) else {
                write_alone(sink, &bufs[i], &mut out);
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
            self.write_train(sink, len, members, bufs, verdicts, i..end, &mut out);
            i = end;
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn write_train(
        &mut self,
        sink: &mut dyn FnMut(Write<'_>) -> std::io::Result<()>,
        len: usize,
        members: usize,
        bufs: &[PacketBuf],
        verdicts: &[Verdict],
        range: Range<usize>,
        out: &mut Delivered,
    ) {
        let (hdr, packet) = self.train[..len].split_at(VNET_HDR_LEN);
        let mut vnet = [0u8; VNET_HDR_LEN];
        vnet.copy_from_slice(hdr);
        let write = Write::Train {
            vnet: &vnet,
            packet,
            members,
        };
        match sink(write) {
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
                        write_alone(sink, &bufs[i], out);
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

/// One write to the TUN device.
#[derive(Debug)]
pub(crate) enum Write<'a> {
    /// A train behind its virtio-net header (all zero for one member).
    Train {
        vnet: &'a [u8; VNET_HDR_LEN],
        packet: &'a [u8],
        /// Segments in it (the TUN sink needs only the bytes; the tests
        /// check what was coalesced).
        #[cfg_attr(not(test), allow(dead_code))]
        members: usize,
    },
    /// One packet with no offload claims.
    Alone(&'a [u8]),
}

fn write_alone(
    sink: &mut dyn FnMut(Write<'_>) -> std::io::Result<()>,
    buf: &PacketBuf,
    out: &mut Delivered,
) {
    match sink(Write::Alone(buf.data())) {
        Ok(()) => out.written += 1,
        Err(e) => {
            out.errors += 1;
            out.last_error = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::DropReason;
    use crate::wire::gso::testutil::{Spec, payload};
    use crate::wire::ip::protocol;

    /// What a sink saw: (members, bytes) per write; members 0 = alone.
    fn run(
        d: &mut Deliverer,
        packets: &[Vec<u8>],
        verdicts: &[Verdict],
        mut fail: impl FnMut(&Write<'_>) -> Option<i32>,
    ) -> (Vec<(usize, Vec<u8>)>, Delivered) {
        let bufs: Vec<PacketBuf> = packets
            .iter()
            .map(|p| {
                let mut b = PacketBuf::new(2048);
                assert!(b.fill(p));
                b
            })
            .collect();
        let mut seen = Vec::new();
        let done = d.deliver_to(
            &mut |w: Write<'_>| {
                if let Some(errno) = fail(&w) {
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
                seen.push(match w {
                    Write::Train {
                        vnet,
                        packet,
                        members,
                    } => {
                        if members == 1 {
                            assert_eq!(vnet, &[0; VNET_HDR_LEN], "a train of one claims nothing");
                        }
                        (members, packet.to_vec())
                    }
                    Write::Alone(p) => (0, p.to_vec()),
                });
                Ok(())
            },
            InnerPolicy::default(),
            &bufs,
            verdicts,
        );
        (seen, done)
    }

    /// Five consecutive 1000-byte TCP segments of one flow; segment `i`'s
    /// payload bytes are all `0x10 + i`.
    fn segments() -> Vec<Vec<u8>> {
        (0..5u32)
            .map(|i| {
                let mut spec = Spec::new(false, protocol::TCP);
                spec.seq = 1000 + i * 1000;
                spec.id = 7 + i as u16;
                spec.build(&[0x10 + i as u8; 1000], false)
            })
            .collect()
    }

    #[test]
    fn validated_segments_of_a_flow_go_out_as_one_train() {
        let mut d = Deliverer::with(true, false);
        let (seen, done) = run(&mut d, &segments(), &[Verdict::Deliver; 5], |_| None);
        assert_eq!(
            seen.len(),
            1,
            "{:?}",
            seen.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        assert_eq!(seen[0].0, 5);
        assert_eq!(seen[0].1.len(), 20 + 20 + 5000);
        assert_eq!((done.written, done.coalesced, done.errors), (1, 5, 0));
    }

    #[test]
    fn a_dropped_segment_is_never_written_and_ends_the_train() {
        // Segment 2 failed its inner checksum after decryption: the
        // pipeline dropped it. It must appear in no write, and the rest
        // of the flow still goes out.
        let mut d = Deliverer::with(true, false);
        let mut verdicts = [Verdict::Deliver; 5];
        verdicts[2] = Verdict::Drop(DropReason::InnerChecksum);
        let (seen, _) = run(&mut d, &segments(), &verdicts, |_| None);
        assert_eq!(
            seen.iter().map(|s| s.0).collect::<Vec<_>>(),
            [2, 2],
            "two trains around the gap"
        );
        for (_, bytes) in &seen {
            let dropped_payload = |w: &[u8]| w.iter().all(|&b| b == 0x12);
            assert!(
                !bytes.windows(64).any(dropped_payload),
                "the dropped segment's bytes went out"
            );
        }
        let total: usize = seen.iter().map(|s| s.1.len()).sum();
        assert_eq!(total, 2 * (40 + 2000));
    }

    #[test]
    fn a_segment_that_no_longer_validates_is_never_coalesced() {
        // Delivered by the pipeline, then changed (a bit flip in memory):
        // it fails the check where it lies, so it goes out alone, with no
        // claim, and the kernel checks it itself.
        let mut d = Deliverer::with(true, false);
        let mut packets = segments();
        packets[2][40 + 500] ^= 0x01;
        let (seen, _) = run(&mut d, &packets, &[Verdict::Deliver; 5], |_| None);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [2, 0, 2]);
        assert_eq!(seen[1].1, packets[2], "alone, as it was");
    }

    #[test]
    fn policy_exceptions_go_out_alone() {
        let mut d = Deliverer::with(true, true);
        let mut spec = Spec::new(false, protocol::UDP);
        let mut zero = spec.build(&payload(100, 1), false);
        zero[26..28].copy_from_slice(&[0, 0]); // IPv4 UDP checksum 0
        spec.src_port += 1;
        let other = spec.build(&payload(100, 2), false);
        let (seen, _) = run(
            &mut d,
            &[zero.clone(), other],
            &[Verdict::Deliver; 2],
            |_| None,
        );
        assert_eq!(seen[0], (0, zero), "an exception is never in a train");
    }

    #[test]
    fn a_kernel_that_refuses_gso_writes_gets_packets_one_by_one() {
        let mut d = Deliverer::with(true, false);
        let refuse = |w: &Write<'_>| match w {
            Write::Train { members, .. } if *members > 1 => Some(libc::EINVAL),
            _ => None,
        };
        let (seen, done) = run(&mut d, &segments(), &[Verdict::Deliver; 5], refuse);
        assert!(done.gso_refused);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0; 5]);
        // And from then on, without trying again.
        let (seen, done) = run(&mut d, &segments(), &[Verdict::Deliver; 5], refuse);
        assert!(!done.gso_refused);
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn without_coalescing_every_packet_goes_alone() {
        let mut d = Deliverer::with(false, false);
        let (seen, _) = run(&mut d, &segments(), &[Verdict::Deliver; 5], |_| None);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0; 5]);
    }
}
