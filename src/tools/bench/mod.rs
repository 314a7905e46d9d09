//! `esptun bench`: seal and open throughput of each provider, so anyone can
//! compare AES-NI with software AES on their own machine.
//!
//! Method: each cell works over a pool of buffers small enough to stay in
//! L2 (256 KiB in all), so seal and open see the same cache state. `open`
//! needs valid ciphertext each time, so the pool is refilled from a sealed
//! master copy outside the timed region. Each cell gets `rounds x seconds`
//! of time per implementation, cut into 25 ms slices that alternate between
//! implementations, and the fastest slice is kept: on a shared machine
//! noise only ever slows a slice down, and alternation gives every
//! implementation the same machine to run on.
//!
//! The benchmark reuses one fixed nonce under a fixed public test key; that
//! is harmless here (nothing is sent) and is never done on the datapath.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aes::{Aes128, Aes256};
use aes_gcm::{AeadInOut, AesGcm, KeyInit};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

pub mod esp;

use crate::crypto::{AeadKey, IcvLen, KeySize, MAX_ICV_LEN, NONCE_LEN, Provider, SecretKey};

/// The sizes the issue names: minimum packet, IPv4 minimum MTU, a typical
/// tunnel MTU, jumbo frames, and a GSO-sized super-packet.
pub const DEFAULT_SIZES: [usize; 5] = [64, 576, 1400, 9000, 65536];
/// Largest size accepted on the command line.
pub const MAX_SIZE: usize = 1 << 20;

pub(crate) const POOL_BYTES: usize = 256 * 1024;
/// Length of one timed slice; see [`run`].
pub(crate) const SLICE: Duration = Duration::from_millis(25);
const NONCE: [u8; NONCE_LEN] = [0x42; NONCE_LEN];
/// ESP-shaped AAD: SPI || sequence number.
const AAD: [u8; 8] = [0, 0, 0x12, 0x34, 0, 0, 0, 1];

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Time per measurement.
    pub seconds: f64,
    pub sizes: Vec<usize>,
    pub key_size: KeySize,
    pub rounds: u32,
    /// Also measure ring and RustCrypto called directly, to show what the
    /// provider seam costs.
    pub baseline: bool,
    /// Told, before each cell, what is about to be measured and how far
    /// along the run is ("measuring 1400 B seal on hardware, soft (3/10)").
    pub progress: Option<fn(&str)>,
}

impl BenchConfig {
    fn report(&self, what: std::fmt::Arguments<'_>) {
        if let Some(progress) = self.progress {
            progress(&what.to_string());
        }
    }
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            seconds: 0.25,
            sizes: DEFAULT_SIZES.to_vec(),
            key_size: KeySize::Aes128,
            rounds: 3,
            baseline: false,
            progress: None,
        }
    }
}

/// Seal or open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Seal,
    Open,
    /// The RFC 1071 sum of [`crate::wire::checksum`], which validates every
    /// inner packet on both sides of the cipher.
    Checksum,
    /// A whole packet through [`crate::datapath::outbound`].
    Outbound,
    /// A whole packet through [`crate::datapath::inbound`].
    Inbound,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Seal => "seal",
            Op::Open => "open",
            Op::Checksum => "checksum",
            Op::Outbound => "outbound",
            Op::Inbound => "inbound",
        }
    }
}

/// One measured cell.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchResult {
    /// `hardware`, `soft`, or a baseline: `ring-direct`, `rustcrypto-direct`.
    pub provider: String,
    pub op: Op,
    pub size: usize,
    pub mb_per_s: f64,
}

/// Something that can seal and open in place with a detached 16-byte tag.
/// Both return false on failure, which voids the measurement.
pub trait Subject {
    fn seal(&self, buf: &mut [u8], tag: &mut [u8; MAX_ICV_LEN]) -> bool;
    fn open(&self, buf: &mut [u8], tag: &[u8; MAX_ICV_LEN]) -> bool;
}

/// A provider key seen through esptun's seam.
pub struct ProviderSubject(pub Box<dyn AeadKey>);

impl Subject for ProviderSubject {
    fn seal(&self, buf: &mut [u8], tag: &mut [u8; MAX_ICV_LEN]) -> bool {
        self.0.seal_in_place(&NONCE, &AAD, buf, tag).is_ok()
    }
    fn open(&self, buf: &mut [u8], tag: &[u8; MAX_ICV_LEN]) -> bool {
        self.0.open_in_place(&NONCE, &AAD, buf, tag).is_ok()
    }
}

/// ring with no esptun code in between.
pub struct RingDirect(LessSafeKey);

impl RingDirect {
    pub fn new(key: &SecretKey) -> Option<Self> {
        let alg = match key.size() {
            KeySize::Aes128 => &AES_128_GCM,
            KeySize::Aes256 => &AES_256_GCM,
        };
        UnboundKey::new(alg, key.expose())
            .ok()
            .map(|k| RingDirect(LessSafeKey::new(k)))
    }
}

impl Subject for RingDirect {
    fn seal(&self, buf: &mut [u8], tag: &mut [u8; MAX_ICV_LEN]) -> bool {
        let sealed = self.0.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(NONCE),
            Aad::from(AAD),
            buf,
        );
        sealed.map(|t| tag.copy_from_slice(t.as_ref())).is_ok()
    }
    fn open(&self, buf: &mut [u8], tag: &[u8; MAX_ICV_LEN]) -> bool {
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(NONCE),
                Aad::from(AAD),
                Tag::from(*tag),
                buf,
                0..,
            )
            .is_ok()
    }
}

/// RustCrypto `aes-gcm` with no esptun code in between (same build flags,
/// so the same backends as the soft provider).
pub enum RustCryptoDirect {
    Aes128(Box<AesGcm<Aes128, U12>>),
    Aes256(Box<AesGcm<Aes256, U12>>),
}

impl RustCryptoDirect {
    pub fn new(key: &SecretKey) -> Option<Self> {
        match key.size() {
            KeySize::Aes128 => AesGcm::new_from_slice(key.expose())
                .ok()
                .map(|c| RustCryptoDirect::Aes128(Box::new(c))),
            KeySize::Aes256 => AesGcm::new_from_slice(key.expose())
                .ok()
                .map(|c| RustCryptoDirect::Aes256(Box::new(c))),
        }
    }
}

impl Subject for RustCryptoDirect {
    fn seal(&self, buf: &mut [u8], tag: &mut [u8; MAX_ICV_LEN]) -> bool {
        let nonce = NONCE.into();
        let sealed = match self {
            RustCryptoDirect::Aes128(c) => {
                c.encrypt_inout_detached(&nonce, &AAD, InOutBuf::from(buf))
            }
            RustCryptoDirect::Aes256(c) => {
                c.encrypt_inout_detached(&nonce, &AAD, InOutBuf::from(buf))
            }
        };
        sealed.map(|t| tag.copy_from_slice(t.as_slice())).is_ok()
    }
    fn open(&self, buf: &mut [u8], tag: &[u8; MAX_ICV_LEN]) -> bool {
        let nonce = NONCE.into();
        let tag = (*tag).into();
        match self {
            RustCryptoDirect::Aes128(c) => {
                c.decrypt_inout_detached(&nonce, &AAD, InOutBuf::from(buf), &tag)
            }
            RustCryptoDirect::Aes256(c) => {
                c.decrypt_inout_detached(&nonce, &AAD, InOutBuf::from(buf), &tag)
            }
        }
        .is_ok()
    }
}

/// `seconds` as a duration, if it is in (0, 60].
pub(crate) fn validated_duration(seconds: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero() && d.as_secs() <= 60)
        .ok_or_else(|| format!("seconds must be more than 0 and at most 60, got {seconds}"))
}

/// How many slices of at most [`SLICE`] make up `duration`.
pub(crate) fn slices(duration: Duration) -> u32 {
    (duration.as_secs_f64() / SLICE.as_secs_f64())
        .ceil()
        .max(1.0) as u32
}

/// The public key used for every benchmark.
pub fn bench_key(size: KeySize) -> SecretKey {
    let bytes: Vec<u8> = (0..size.bytes() as u8).collect();
    // 16 or 32 bytes by construction.
    SecretKey::new(&bytes).unwrap_or_else(|_| unreachable!("KeySize gives 16 or 32 bytes"))
}

/// Buffers for one size: working copies, the sealed master, and tags.
pub(crate) struct Pool {
    bufs: Vec<Vec<u8>>,
    tags: Vec<[u8; MAX_ICV_LEN]>,
    master: Vec<u8>,
    master_tag: [u8; MAX_ICV_LEN],
}

impl Pool {
    /// `None` if the subject cannot seal the master copy.
    pub(crate) fn new(size: usize, subject: &dyn Subject) -> Option<Self> {
        let count = (POOL_BYTES / size.max(1)).clamp(2, 4096);
        let mut master: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let mut master_tag = [0u8; MAX_ICV_LEN];
        if !subject.seal(&mut master, &mut master_tag) {
            return None;
        }
        Some(Pool {
            bufs: vec![master.clone(); count],
            tags: vec![master_tag; count],
            master,
            master_tag,
        })
    }

    fn refill(&mut self) {
        for (buf, tag) in self.bufs.iter_mut().zip(&mut self.tags) {
            buf.copy_from_slice(&self.master);
            *tag = self.master_tag;
        }
    }
}

/// Measures one cell: MB/s (10^6 bytes per second) over `duration`.
/// Returns `None` if a seal or open failed (the figure would be a lie) or
/// no time could be measured.
pub fn measure(subject: &dyn Subject, op: Op, size: usize, duration: Duration) -> Option<f64> {
    let mut pool = Pool::new(size, subject)?;
    measure_pool(subject, &mut pool, op, duration)
}

pub(crate) fn measure_pool(
    subject: &dyn Subject,
    pool: &mut Pool,
    op: Op,
    duration: Duration,
) -> Option<f64> {
    let size = pool.master.len();
    let mut bytes = 0u64;
    let mut busy = Duration::ZERO;
    // Pass 0 is an untimed warm-up; the deadline starts after it, and at
    // least one timed pass always runs, however short `duration` is.
    let mut passes = 0u64;
    let mut deadline = Instant::now();
    while passes < 2 || Instant::now() < deadline {
        if op == Op::Open {
            pool.refill();
        }
        let start = Instant::now();
        for (buf, tag) in pool.bufs.iter_mut().zip(&mut pool.tags) {
            let ok = match op {
                Op::Seal => subject.seal(black_box(buf), tag),
                Op::Open => subject.open(black_box(buf), tag),
                // Not cipher operations: see `run_checksum`, `esp::run`.
                Op::Checksum | Op::Outbound | Op::Inbound => return None,
            };
            if !ok {
                return None;
            }
        }
        let elapsed = start.elapsed();
        if passes == 0 {
            deadline = Instant::now() + duration;
        } else {
            busy += elapsed;
            bytes += (pool.bufs.len() * size) as u64;
        }
        passes += 1;
    }
    let secs = busy.as_secs_f64();
    (secs > 0.0).then(|| bytes as f64 / secs / 1e6)
}

/// Runs the whole table: every available provider (and baselines if
/// asked), both operations, every size: the best 25 ms slice out of
/// `rounds x seconds` per implementation.
pub fn run(providers: &[Provider], config: &BenchConfig) -> Result<Vec<BenchResult>, String> {
    let duration = validated_duration(config.seconds)?;
    if let Some(bad) = config.sizes.iter().find(|&&s| s == 0 || s > MAX_SIZE) {
        return Err(format!("size {bad} is outside 1..={MAX_SIZE}"));
    }
    let key = bench_key(config.key_size);
    let mut subjects: Vec<(String, Box<dyn Subject>)> = Vec::new();
    for p in providers.iter().filter(|p| p.is_available()) {
        let k = p
            .new_key(&key, IcvLen::Icv16)
            .map_err(|e| format!("{}: {e}", p.id))?;
        subjects.push((p.id.to_string(), Box::new(ProviderSubject(k))));
    }
    if config.baseline {
        let ring = RingDirect::new(&key).ok_or("ring rejected the benchmark key")?;
        let rc = RustCryptoDirect::new(&key).ok_or("RustCrypto rejected the benchmark key")?;
        subjects.push(("ring-direct".into(), Box::new(ring)));
        subjects.push(("rustcrypto-direct".into(), Box::new(rc)));
    }
    let mut results = Vec::new();
    let slices = slices(duration);
    let slice = duration.min(SLICE);
    let names: Vec<&str> = subjects.iter().map(|(n, _)| n.as_str()).collect();
    let cells = config.sizes.len() * 2;
    let mut cell = 0;
    for &size in &config.sizes {
        let mut pools = Vec::with_capacity(subjects.len());
        for (name, subject) in &subjects {
            pools.push(
                Pool::new(size, subject.as_ref())
                    .ok_or_else(|| format!("{name}: seal at {size} bytes failed"))?,
            );
        }
        for op in [Op::Seal, Op::Open] {
            cell += 1;
            config.report(format_args!(
                "measuring {size} B {} on {} ({cell}/{cells})",
                op.as_str(),
                names.join(", ")
            ));
            let mut best = vec![0.0f64; subjects.len()];
            // Short slices, alternating between subjects: every subject
            // sees the same machine, and the best slice is the one noise
            // disturbed least.
            for _ in 0..config.rounds.max(1) * slices {
                for (i, (name, subject)) in subjects.iter().enumerate() {
                    let mbps = measure_pool(subject.as_ref(), &mut pools[i], op, slice)
                        .ok_or_else(|| {
                            format!(
                                "{name}: {} at {size} bytes failed or could not be timed",
                                op.as_str()
                            )
                        })?;
                    best[i] = best[i].max(mbps);
                }
            }
            for ((name, _), mb_per_s) in subjects.iter().zip(best) {
                results.push(BenchResult {
                    provider: name.clone(),
                    op,
                    size,
                    mb_per_s,
                });
            }
        }
    }
    Ok(results)
}

/// `a / b` for one cell, if both were measured.
/// Measures [`crate::wire::checksum::sum`] at `size` bytes, in the same
/// alternating-slice way as the ciphers; reported as `provider = "rfc1071"`,
/// `op = checksum`. Half the calls start one byte off alignment, as packet
/// payloads behind odd-length headers do.
pub fn run_checksum(config: &BenchConfig) -> Result<Vec<BenchResult>, String> {
    let duration = validated_duration(config.seconds)?;
    let mut results = Vec::new();
    for (i, &size) in config.sizes.iter().enumerate() {
        if size == 0 || size > MAX_SIZE {
            return Err(format!("size {size} is outside 1..={MAX_SIZE}"));
        }
        config.report(format_args!(
            "measuring {size} B inner checksum ({}/{})",
            i + 1,
            config.sizes.len()
        ));
        let data: Vec<u8> = (0..size + 1).map(|i| (i * 7) as u8).collect();
        let per_pass = (POOL_BYTES / size).max(1);
        let mut best = 0.0f64;
        let slices = slices(duration);
        for _ in 0..config.rounds.max(1) * slices {
            let deadline = Instant::now() + duration.min(SLICE);
            let (mut bytes, mut busy) = (0u64, Duration::ZERO);
            while busy.is_zero() || Instant::now() < deadline {
                let start = Instant::now();
                let mut acc = 0u16;
                for i in 0..per_pass {
                    let at = i & 1;
                    acc ^= crate::wire::checksum::sum(black_box(&data[at..at + size]));
                }
                black_box(acc);
                busy += start.elapsed();
                bytes += (per_pass * size) as u64;
            }
            best = best.max(bytes as f64 / busy.as_secs_f64() / 1e6);
        }
        results.push(BenchResult {
            provider: "rfc1071".into(),
            op: Op::Checksum,
            size,
            mb_per_s: best,
        });
    }
    Ok(results)
}

pub fn ratio(results: &[BenchResult], a: &str, b: &str, op: Op, size: usize) -> Option<f64> {
    let find = |name: &str| {
        results
            .iter()
            .find(|r| r.provider == name && r.op == op && r.size == size)
            .map(|r| r.mb_per_s)
    };
    match (find(a), find(b)) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::soft;

    #[test]
    fn baselines_agree_with_the_providers_they_stand_for() {
        for size in [KeySize::Aes128, KeySize::Aes256] {
            let key = bench_key(size);
            let soft = ProviderSubject(soft::provider().new_key(&key, IcvLen::Icv16).expect("key"));
            let subjects: Vec<Box<dyn Subject>> = vec![
                Box::new(soft),
                Box::new(RingDirect::new(&key).expect("ring")),
                Box::new(RustCryptoDirect::new(&key).expect("rustcrypto")),
            ];
            let outputs: Vec<(Vec<u8>, [u8; 16])> = subjects
                .iter()
                .map(|s| {
                    let mut buf = vec![7u8; 100];
                    let mut tag = [0u8; 16];
                    assert!(s.seal(&mut buf, &mut tag));
                    assert!(s.open(&mut buf.clone(), &tag));
                    (buf, tag)
                })
                .collect();
            assert!(outputs.windows(2).all(|w| w[0] == w[1]));
        }
    }

    #[test]
    fn a_failing_open_voids_the_measurement() {
        struct Liar;
        impl Subject for Liar {
            fn seal(&self, _: &mut [u8], _: &mut [u8; MAX_ICV_LEN]) -> bool {
                true
            }
            fn open(&self, _: &mut [u8], _: &[u8; MAX_ICV_LEN]) -> bool {
                false
            }
        }
        assert_eq!(measure(&Liar, Op::Open, 64, Duration::from_millis(1)), None);
        assert!(measure(&Liar, Op::Seal, 64, Duration::from_millis(1)).is_some_and(|m| m > 0.0));
    }

    #[test]
    fn run_rejects_bad_durations_and_sizes_instead_of_panicking() {
        let providers = [soft::provider()];
        for seconds in [0.0, -1.0, f64::NAN, 1e30] {
            let config = BenchConfig {
                seconds,
                ..BenchConfig::default()
            };
            assert!(run(&providers, &config).is_err(), "seconds {seconds}");
        }
        for size in [0, MAX_SIZE + 1] {
            let config = BenchConfig {
                sizes: vec![size],
                ..BenchConfig::default()
            };
            assert!(run(&providers, &config).is_err(), "size {size}");
        }
    }

    #[test]
    fn run_produces_one_row_per_subject_op_and_size() {
        let config = BenchConfig {
            seconds: 0.001,
            sizes: vec![64, 100],
            rounds: 1,
            baseline: true,
            ..BenchConfig::default()
        };
        let providers = [soft::provider()];
        let rows = run(&providers, &config).expect("bench runs");
        assert_eq!(rows.len(), 3 * 2 * 2);
        assert!(rows.iter().all(|r| r.mb_per_s > 0.0));
        assert!(ratio(&rows, "soft", "rustcrypto-direct", Op::Seal, 64).is_some());
        assert_eq!(ratio(&rows, "hardware", "soft", Op::Seal, 64), None);
    }
}
