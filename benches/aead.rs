//! AES-GCM seal/open throughput: both providers through esptun's seam, and
//! ring and RustCrypto called directly, at the sizes `esptun bench` uses.
//! `cargo bench --bench aead`; compare `hardware` with `ring-direct` and
//! `soft` with `rustcrypto-direct` to see what the seam costs.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use esptun::crypto::{IcvLen, KeySize, MAX_ICV_LEN, Provider};
use esptun::tools::bench::{
    DEFAULT_SIZES, ProviderSubject, RingDirect, RustCryptoDirect, Subject, bench_key,
};

fn subjects() -> Vec<(String, Box<dyn Subject>)> {
    let key = bench_key(KeySize::Aes128);
    let mut out: Vec<(String, Box<dyn Subject>)> = Vec::new();
    for p in Provider::detect_all()
        .into_iter()
        .filter(Provider::is_available)
    {
        let k = p.new_key(&key, IcvLen::Icv16).expect("benchmark key");
        out.push((p.id.to_string(), Box::new(ProviderSubject(k))));
    }
    out.push((
        "ring-direct".into(),
        Box::new(RingDirect::new(&key).expect("ring key")),
    ));
    out.push((
        "rustcrypto-direct".into(),
        Box::new(RustCryptoDirect::new(&key).expect("rustcrypto key")),
    ));
    out
}

fn aead(c: &mut Criterion) {
    let subjects = subjects();
    for size in DEFAULT_SIZES {
        let mut seal = c.benchmark_group(format!("seal/{size}"));
        seal.throughput(Throughput::Bytes(size as u64));
        for (name, subject) in &subjects {
            let mut buf = vec![0u8; size];
            let mut tag = [0u8; MAX_ICV_LEN];
            seal.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| assert!(subject.seal(black_box(&mut buf), &mut tag)))
            });
        }
        seal.finish();

        let mut open = c.benchmark_group(format!("open/{size}"));
        open.throughput(Throughput::Bytes(size as u64));
        for (name, subject) in &subjects {
            let mut sealed = vec![0u8; size];
            let mut tag = [0u8; MAX_ICV_LEN];
            assert!(subject.seal(&mut sealed, &mut tag));
            let mut buf = sealed.clone();
            // Each iteration restores the ciphertext (a memcpy, the same for
            // every subject) because open works in place.
            open.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    assert!(subject.open(black_box(&mut buf), &tag));
                })
            });
        }
        open.finish();
    }
}

criterion_group!(benches, aead);
criterion_main!(benches);
