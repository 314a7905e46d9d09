//! The cost of reassembling one datagram from the fragments the kernel
//! writes to the TUN device: 9,000 and 65,000 bytes of UDP in 1,400-byte
//! fragments, IPv4 and IPv6, in order and in reverse, through a warm
//! reassembler (its chunk pool and slots reused, as in steady state).
//! `cargo bench --bench reassembly`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use esptun::datapath::Counters;
use esptun::datapath::reassembly::{Pushed, Reassembler, ReassemblyConfig};
use esptun::wire::checksum;
use esptun::wire::inner::build;
use esptun::wire::ip::protocol;

const SIZES: [usize; 2] = [9_000, 65_000];
const FRAGMENT: usize = 1_400;

/// The fragments of `packet` (IPv4 or IPv6, no extension headers).
fn fragments(packet: &[u8], v6: bool) -> Vec<Vec<u8>> {
    let header = if v6 { 40 } else { 20 };
    let body = &packet[header..];
    (0..body.len().div_ceil(FRAGMENT))
        .map(|i| {
            let (s, e) = (i * FRAGMENT, ((i + 1) * FRAGMENT).min(body.len()));
            let more = e < body.len();
            let mut f = packet[..header].to_vec();
            if v6 {
                let next = f[6];
                f[6] = protocol::IPV6_FRAGMENT;
                let field = s as u16 | u16::from(more);
                f.extend_from_slice(&[next, 0]);
                f.extend_from_slice(&field.to_be_bytes());
                f.extend_from_slice(&7u32.to_be_bytes());
                f.extend_from_slice(&body[s..e]);
                let len = (f.len() - 40) as u16;
                f[4..6].copy_from_slice(&len.to_be_bytes());
            } else {
                f.extend_from_slice(&body[s..e]);
                let len = f.len() as u16;
                f[2..4].copy_from_slice(&len.to_be_bytes());
                f[4..6].copy_from_slice(&7u16.to_be_bytes());
                let field = (s / 8) as u16 | if more { 0x2000 } else { 0 };
                f[6..8].copy_from_slice(&field.to_be_bytes());
                f[10..12].copy_from_slice(&[0, 0]);
                let c = checksum::finish(checksum::sum(&f[..20]));
                f[10..12].copy_from_slice(&c.to_be_bytes());
            }
            f
        })
        .collect()
}

fn reassembly(c: &mut Criterion) {
    for size in SIZES {
        let mut group = c.benchmark_group(format!("reassembly/{size}"));
        group.throughput(Throughput::Bytes(size as u64));
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..size).map(|i| (i * 13) as u8).collect();
            let packet = if v6 {
                let a = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
                let b = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
                build::ipv6(a, b, protocol::UDP, &payload)
            } else {
                build::ipv4([198, 18, 0, 1], [198, 19, 0, 2], protocol::UDP, &payload)
            };
            let in_order = fragments(&packet, v6);
            let mut reversed = in_order.clone();
            reversed.reverse();
            let mut r = Reassembler::new(
                ReassemblyConfig::default(),
                65_535,
                Arc::new(Counters::default()),
            );
            let mut out = vec![0u8; 65_535];
            let now = Instant::now();
            let family = if v6 { "ipv6" } else { "ipv4" };
            for (order, fs) in [("in-order", &in_order), ("reversed", &reversed)] {
                group.bench_function(BenchmarkId::new(family, order), |b| {
                    b.iter(|| {
                        let mut whole = 0;
                        for f in fs {
                            if let Pushed::Complete(n) = r.push(black_box(f), now, &mut out) {
                                whole = n;
                            }
                        }
                        assert_eq!(whole, packet.len());
                        black_box(&out);
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, reassembly);
criterion_main!(benches);
