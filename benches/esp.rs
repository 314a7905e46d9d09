//! Whole packets through the outbound and inbound pipelines per provider,
//! next to raw seal/open of the same size through the same seam, so the
//! cost of framing and checksum validation shows as a ratio.
//! `cargo bench --bench esp`. `esptun bench` reports the same comparison
//! with interleaved measurements.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use esptun::crypto::{IcvLen, KeySize, MAX_ICV_LEN, Provider, ProviderId};
use esptun::tools::bench::esp::DatapathRig;
use esptun::tools::bench::{ProviderSubject, Subject, bench_key};

const SIZES: [usize; 4] = [64, 576, 1400, 9000];

fn esp(c: &mut Criterion) {
    for size in SIZES {
        let mut group = c.benchmark_group(format!("esp/{size}"));
        group.throughput(Throughput::Bytes(size as u64));
        for id in ProviderId::ALL {
            let Some(mut rig) = DatapathRig::new(id, KeySize::Aes128, size).expect("rig") else {
                eprintln!("{id}: not available here");
                continue;
            };
            let per_pass = rig.bytes_per_pass() / size as u64;
            // Only `process` is timed; refilling the batch is not.
            for direction in ["outbound", "inbound"] {
                group.bench_function(BenchmarkId::new(direction, id), |b| {
                    b.iter_custom(|iters| {
                        let passes = iters.div_ceil(per_pass);
                        let total: Duration = (0..passes)
                            .map(|_| match direction {
                                "outbound" => rig.outbound_pass(),
                                _ => rig.inbound_pass(),
                            })
                            .map(|pass| pass.expect(direction))
                            .sum();
                        // Scale whole passes down to the packets asked for.
                        total.mul_f64(iters as f64 / (passes * per_pass) as f64)
                    })
                });
            }
            let provider = Provider::detect_all()
                .into_iter()
                .find(|p| p.id == id)
                .expect("provider");
            let raw = ProviderSubject(
                provider
                    .new_key(&bench_key(KeySize::Aes128), IcvLen::Icv16)
                    .expect("key"),
            );
            let mut buf = vec![0u8; size];
            let mut tag = [0u8; MAX_ICV_LEN];
            group.bench_function(BenchmarkId::new("raw-seal", id), |b| {
                b.iter(|| assert!(raw.seal(black_box(&mut buf), &mut tag)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, esp);
criterion_main!(benches);
