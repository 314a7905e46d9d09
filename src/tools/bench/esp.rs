//! Whole packets through the pipelines, next to raw seal/open of the same
//! size, so framing and checksum overhead shows as a ratio.
//!
//! A [`DatapathRig`] is one sender and one receiver in memory: an IPv4/UDP
//! packet of the given total size goes through `Outbound::process` in
//! batches, and previously sealed copies through `Inbound::process`.
//! Refilling the batch (and resetting the receiver's replay window, since
//! the same sealed packets come back every pass) happens outside the timed
//! region. Throughput counts inner packet bytes.
//!
//! Raw seal and open with the same provider and key are measured in the
//! same alternating slices, so the share of raw throughput each direction
//! reaches is a ratio of measurements taken side by side.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{
    BenchConfig, BenchResult, Op, POOL_BYTES, Pool, ProviderSubject, SLICE, bench_key,
    measure_pool, slices, validated_duration,
};
use crate::crypto::select::{BootOptions, FailurePolicy, Mode, Selector};
use crate::crypto::{IcvLen, KeySize, Provider, ProviderId};
use crate::datapath::Verdict;
use crate::datapath::inbound::{Encap, Inbound};
use crate::datapath::outbound::Outbound;
use crate::packet::PacketBuf;
use crate::sa::replay::ReplayWindow;
use crate::sa::reservation::Fingerprint;
use crate::sa::table::{SaId, SaMeta};
use crate::sa::{InboundSa, InnerAddrs, KeyMaterial, OutboundSa, SaKeys};
use crate::wire::esp;
use crate::wire::inner::{InnerPolicy, build};
use crate::wire::ip::protocol;

/// Smallest packet: IPv4 and UDP headers.
pub const MIN_PACKET: usize = 28;
/// Largest packet: the IPv4 total length field.
pub const MAX_PACKET: usize = 65535;
const WINDOW: u32 = 4096;
const SPI: u32 = 0x0000_BE00;
const A: [u8; 4] = [198, 18, 0, 1];
const B: [u8; 4] = [198, 19, 0, 2];

/// One sender and one receiver for one provider and packet size.
pub struct DatapathRig {
    selector: Selector,
    out: Outbound,
    inb: Inbound,
    inbound_sa: SaId,
    plain: Vec<u8>,
    sealed: Vec<Vec<u8>>,
    batch: Vec<PacketBuf>,
    verdicts: Vec<Verdict>,
    raw: ProviderSubject,
    raw_pool: Pool,
}

impl DatapathRig {
    /// `None` if `provider` cannot carry traffic on this machine.
    pub fn new(
        provider: ProviderId,
        key_size: KeySize,
        size: usize,
    ) -> Result<Option<Self>, String> {
        if !(MIN_PACKET..=MAX_PACKET).contains(&size) {
            return Err(format!(
                "datapath sizes must be {MIN_PACKET} to {MAX_PACKET} bytes, got {size}"
            ));
        }
        let mode = match provider {
            ProviderId::Hardware => Mode::Hardware,
            ProviderId::Soft => Mode::Soft,
        };
        let selector = Selector::boot(
            Provider::detect_all(),
            mode,
            FailurePolicy::Fallback,
            BootOptions::default(),
        );
        if selector.active() != Some(provider) {
            return Ok(None);
        }
        let mut material = bench_key(key_size).expose().to_vec();
        material.extend_from_slice(&[0xCA, 0xFE, 0x5A, 0x17]);
        let material = KeyMaterial::from_bytes(&material).map_err(|e| e.to_string())?;
        let keys = || SaKeys::new(&selector, &material, IcvLen::Icv16).map_err(|e| e.to_string());
        let addrs =
            |l: [u8; 4], r: [u8; 4]| InnerAddrs::new(l.into(), r.into()).map_err(|e| e.to_string());
        let mut out = Outbound::new(InnerPolicy::default());
        let mut sa =
            OutboundSa::new(SPI, keys()?, false, addrs(A, B)?).map_err(|e| e.to_string())?;
        // A benchmark key lives only in this process: no restart can reuse it.
        sa.set_ceiling(u64::MAX);
        let meta = || {
            let endpoint = SocketAddr::from((B, 4500));
            SaMeta::active("bench", endpoint, Fingerprint::new(&material))
        };
        out.add_sa(sa, meta()).map_err(|e| e.to_string())?;
        let mut inb = Inbound::new(InnerPolicy::default());
        let inbound_sa = inb
            .add_sa(
                InboundSa::new(SPI, keys()?, false, addrs(B, A)?, WINDOW)
                    .map_err(|e| e.to_string())?,
                meta(),
            )
            .map_err(|e| e.to_string())?;

        let payload: Vec<u8> = (0..size - MIN_PACKET).map(|i| (i * 31 + 7) as u8).collect();
        let plain = build::ipv4(A, B, protocol::UDP, &payload);
        let raw = ProviderSubject(
            selector
                .provider(provider)
                .new_key(material.key(), IcvLen::Icv16)
                .map_err(|e| e.to_string())?,
        );
        let raw_pool = Pool::new(size, &raw).ok_or("raw seal failed")?;
        let count = (POOL_BYTES / size).clamp(8, 128);
        // Sealed packets are larger than the inner one: ESP header and IV
        // replace at least 20 bytes of IP header, then trailer and ICV.
        let batch = (0..count)
            .map(|_| PacketBuf::new(size + esp::MAX_TAIL + 16))
            .collect();
        let mut rig = DatapathRig {
            selector,
            out,
            inb,
            inbound_sa,
            plain,
            sealed: Vec::new(),
            batch,
            verdicts: Vec::with_capacity(count),
            raw,
            raw_pool,
        };
        rig.outbound_pass()?;
        rig.sealed = rig.batch.iter().map(|b| b.data().to_vec()).collect();
        Ok(Some(rig))
    }

    /// Seals one batch; returns the time `process` took.
    pub fn outbound_pass(&mut self) -> Result<Duration, String> {
        for buf in &mut self.batch {
            if !buf.fill(&self.plain) {
                return Err("benchmark buffer too small".into());
            }
        }
        let start = Instant::now();
        self.out
            .process(&self.selector, &mut self.batch, &mut self.verdicts);
        let elapsed = start.elapsed();
        match self
            .verdicts
            .iter()
            .find(|v| !matches!(v, Verdict::Send { .. }))
        {
            Some(v) => Err(format!("outbound gave {v:?}")),
            None => Ok(elapsed),
        }
    }

    /// Opens one batch of the sealed copies; returns the time taken.
    pub fn inbound_pass(&mut self) -> Result<Duration, String> {
        for (buf, sealed) in self.batch.iter_mut().zip(&self.sealed) {
            if !buf.fill(sealed) {
                return Err("benchmark buffer too small".into());
            }
        }
        if let Some(sa) = self.inb.sa_mut(self.inbound_sa) {
            sa.replay = ReplayWindow::new(WINDOW, false).map_err(|e| e.to_string())?;
        }
        let start = Instant::now();
        self.inb.process(
            &self.selector,
            Encap::NATT,
            &mut self.batch,
            &mut self.verdicts,
        );
        let elapsed = start.elapsed();
        match self.verdicts.iter().find(|v| **v != Verdict::Deliver) {
            Some(v) => Err(format!("inbound gave {v:?}")),
            None => Ok(elapsed),
        }
    }

    /// Inner bytes per pass.
    pub fn bytes_per_pass(&self) -> u64 {
        (self.batch.len() * self.plain.len()) as u64
    }

    /// MB/s of `op` over `duration`: `Outbound`/`Inbound` through the
    /// pipelines, `Seal`/`Open` raw with the same provider and key.
    fn measure(&mut self, op: Op, duration: Duration) -> Result<f64, String> {
        if matches!(op, Op::Seal | Op::Open) {
            return measure_pool(&self.raw, &mut self.raw_pool, op, duration)
                .ok_or_else(|| format!("raw {} failed", op.as_str()));
        }
        let deadline = Instant::now() + duration;
        let (mut busy, mut bytes) = (Duration::ZERO, 0u64);
        while busy.is_zero() || Instant::now() < deadline {
            busy += match op {
                Op::Outbound => self.outbound_pass()?,
                _ => self.inbound_pass()?,
            };
            bytes += self.bytes_per_pass();
        }
        Ok(bytes as f64 / busy.as_secs_f64() / 1e6)
    }
}

/// One provider and size: both directions and the raw operations measured
/// alongside them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DatapathRow {
    pub provider: ProviderId,
    pub size: usize,
    pub outbound_mb_per_s: f64,
    pub inbound_mb_per_s: f64,
    pub seal_mb_per_s: f64,
    pub open_mb_per_s: f64,
}

impl DatapathRow {
    /// Outbound as a fraction of raw seal, inbound of raw open.
    pub fn shares(&self) -> (f64, f64) {
        (
            self.outbound_mb_per_s / self.seal_mb_per_s,
            self.inbound_mb_per_s / self.open_mb_per_s,
        )
    }

    /// The two directions in the common result format.
    pub fn results(&self) -> [BenchResult; 2] {
        [
            (Op::Outbound, self.outbound_mb_per_s),
            (Op::Inbound, self.inbound_mb_per_s),
        ]
        .map(|(op, mb_per_s)| BenchResult {
            provider: self.provider.to_string(),
            op,
            size: self.size,
            mb_per_s,
        })
    }
}

/// Every provider that can carry traffic, at each size from
/// [`MIN_PACKET`] to [`MAX_PACKET`] bytes (other sizes cannot be an IPv4
/// packet and are skipped, e.g. the cipher table's 65536): outbound, raw seal, inbound, raw open in alternating 25 ms
/// slices, fastest slice kept.
pub fn run(config: &BenchConfig) -> Result<Vec<DatapathRow>, String> {
    const OPS: [Op; 4] = [Op::Outbound, Op::Seal, Op::Inbound, Op::Open];
    let duration = validated_duration(config.seconds)?;
    let slice = duration.min(SLICE);
    let mut rows = Vec::new();
    let sizes: Vec<usize> = config
        .sizes
        .iter()
        .copied()
        .filter(|s| (MIN_PACKET..=MAX_PACKET).contains(s))
        .collect();
    let cells = sizes.len() * ProviderId::ALL.len();
    let mut cell = 0;
    for provider in ProviderId::ALL {
        for &size in &sizes {
            cell += 1;
            let Some(mut rig) = DatapathRig::new(provider, config.key_size, size)? else {
                continue;
            };
            config.report(format_args!(
                "measuring {size} B datapath packets on {provider} ({cell}/{cells})"
            ));
            let mut best = [0.0f64; OPS.len()];
            for _ in 0..config.rounds.max(1) * slices(duration) {
                for (i, op) in OPS.into_iter().enumerate() {
                    best[i] = best[i].max(rig.measure(op, slice)?);
                }
            }
            rows.push(DatapathRow {
                provider,
                size,
                outbound_mb_per_s: best[0],
                seal_mb_per_s: best[1],
                inbound_mb_per_s: best[2],
                open_mb_per_s: best[3],
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rig_round_trips_and_reports_every_direction() {
        let config = BenchConfig {
            seconds: 0.001,
            sizes: vec![16, 64, 1400, 65536],
            rounds: 1,
            ..BenchConfig::default()
        };
        let rows = run(&config).expect("runs");
        // Sizes 16 and 65536 are skipped; soft always runs; hardware where
        // available.
        let soft: Vec<_> = rows
            .iter()
            .filter(|r| r.provider == ProviderId::Soft)
            .collect();
        assert_eq!(soft.len(), 2);
        for r in &rows {
            assert!(r.size == 64 || r.size == 1400, "{r:?}");
            let (out, inb) = r.shares();
            assert!(out > 0.0 && inb > 0.0, "{r:?}");
            assert!(r.results().iter().all(|b| b.mb_per_s > 0.0));
        }
        assert!(DatapathRig::new(ProviderId::Soft, KeySize::Aes128, 27).is_err());
    }
}
