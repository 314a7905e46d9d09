//! Register-preservation check: does this process get its SIMD registers
//! back intact after the kernel switches it out?
//!
//! The field failure was AES-NI code running on corrupted XMM state. This
//! check loads every XMM register (and every YMM/ZMM register where the CPU
//! has them) with distinct patterns, then, inside the same `asm!` block so
//! the compiler cannot touch them, makes `sched_yield` and `nanosleep`
//! system calls while a second thread pinned to the same CPU runs AES-GCM
//! (dirtying the same registers), and finally stores the registers and
//! compares them with the patterns. The number of context switches that
//! actually happened is measured (`getrusage(RUSAGE_THREAD)`), so a run that
//! was never switched out says so instead of passing silently.
//!
//! The inline assembly and the scheduler calls are the only `unsafe` here.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{IcvLen, MAX_ICV_LEN, NONCE_LEN, Provider, SecretKey};

/// How hard to try. Defaults take a few milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct RegisterCheckConfig {
    /// `sched_yield` calls made with the patterns loaded.
    pub yields: u64,
    /// `nanosleep` calls made with the patterns loaded; each one is a
    /// guaranteed voluntary context switch.
    pub sleeps: u64,
    pub sleep_nanos: i64,
    /// Checks the checker: overwrite xmm5 between load and store, which
    /// must be reported as corruption. Never set outside tests.
    pub inject_corruption: bool,
}

impl Default for RegisterCheckConfig {
    fn default() -> Self {
        RegisterCheckConfig {
            yields: 200,
            sleeps: 8,
            sleep_nanos: 100_000,
            inject_corruption: false,
        }
    }
}

/// The outcome for one register width.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LevelReport {
    /// `xmm`, `ymm` or `zmm`.
    pub level: &'static str,
    pub registers: usize,
    /// Voluntary plus involuntary switches while the patterns were loaded.
    pub context_switches: u64,
    /// Register numbers whose contents changed.
    pub corrupted_registers: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegisterCheckReport {
    /// The CPU both threads were pinned to, if pinning was allowed.
    pub pinned_cpu: Option<usize>,
    /// AES-GCM seals the partner thread completed while the registers were
    /// being checked (0: no partner, or it never got the CPU).
    pub aes_partner_seals: u64,
    pub levels: Vec<LevelReport>,
}

impl RegisterCheckReport {
    /// True when no register changed and every level was switched out at
    /// least once (otherwise nothing was tested).
    pub fn passed(&self) -> bool {
        !self.levels.is_empty()
            && self
                .levels
                .iter()
                .all(|l| l.corrupted_registers.is_empty() && l.context_switches > 0)
    }

    /// One line for logs and the self-test table.
    pub fn summary(&self) -> String {
        let levels: Vec<String> = self
            .levels
            .iter()
            .map(|l| {
                if !l.corrupted_registers.is_empty() {
                    format!("{} CORRUPTED regs {:?}", l.level, l.corrupted_registers)
                } else if l.context_switches == 0 {
                    format!("{} inconclusive (never switched out)", l.level)
                } else {
                    format!("{} ok ({} switches)", l.level, l.context_switches)
                }
            })
            .collect();
        format!(
            "{}; AES partner: {} seals",
            levels.join(", "),
            self.aes_partner_seals
        )
    }
}

/// Runs the check at every register width this CPU has, with `partner`
/// (normally the hardware provider) doing AES-GCM on the same CPU. Returns
/// `None` on architectures without an implementation.
pub fn run(config: RegisterCheckConfig, partner: Option<&Provider>) -> Option<RegisterCheckReport> {
    #[cfg(target_arch = "x86_64")]
    {
        Some(x86::run(config, partner))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (config, partner);
        None
    }
}

/// Each run uses fresh patterns, so a value left over from an earlier run
/// in some register cannot pass for a preserved one.
static RUN_COUNTER: AtomicU64 = AtomicU64::new(1);

fn pattern(buf: &mut [u8], width: usize, run: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let reg = (i / width) as u64;
        let x = (run << 40) ^ (reg << 16) ^ (i % width) as u64;
        *b = (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
    }
}

/// Runs AES-GCM seals until `stop`, yielding between them so the two
/// threads on one CPU alternate quickly, and counts them in `seals`.
fn aes_partner(provider: &Provider, stop: &AtomicBool, seals: &AtomicU64, cpu: Option<usize>) {
    // If this pin fails the partner runs on another CPU: less stress on our
    // registers, which the seal count and pinned_cpu let a reader judge.
    if cpu.is_some_and(|cpu| !os::pin_to(cpu)) {
        return;
    }
    let Ok(secret) = SecretKey::new(&[0x5A; 32]) else {
        return;
    };
    let Ok(key) = provider.new_key(&secret, IcvLen::Icv16) else {
        return;
    };
    let mut buf = vec![0xA5u8; 1400];
    let mut tag = [0u8; MAX_ICV_LEN];
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        // The output is irrelevant; the register traffic is the point.
        if key
            .seal_in_place(&nonce, b"partner!", &mut buf, &mut tag)
            .is_ok()
        {
            seals.fetch_add(1, Ordering::Relaxed);
        }
        n = n.wrapping_add(1);
        std::thread::yield_now();
    }
}

mod os {
    /// Pins the calling thread to one CPU. Returns false if not allowed.
    pub fn pin_to(cpu: usize) -> bool {
        // cpu_set_t holds CPU_SETSIZE CPUs; libc's CPU_SET indexes (and
        // would panic) past that.
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: cpu_set_t is plain data we own; CPU_ZERO/CPU_SET write
        // only inside it (cpu < CPU_SETSIZE checked above).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }

    /// The calling thread's affinity mask, to restore afterwards.
    pub fn affinity() -> Option<libc::cpu_set_t> {
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into
        // the zeroed set we own.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
                .then_some(set)
        }
    }

    /// Restores the saved affinity mask when dropped, also on unwind.
    pub struct RestoreAffinity(pub libc::cpu_set_t);

    impl Drop for RestoreAffinity {
        fn drop(&mut self) {
            // SAFETY: `self.0` is a valid cpu_set_t for the duration of the call.
            let _restored = unsafe {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0)
            };
        }
    }

    pub fn current_cpu() -> Option<usize> {
        // SAFETY: sched_getcpu has no arguments and no memory effects.
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu).ok()
    }

    /// Context switches of the calling thread so far.
    pub fn thread_switches() -> u64 {
        // SAFETY: getrusage writes one rusage struct into memory we own.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            if libc::getrusage(libc::RUSAGE_THREAD, &mut usage) != 0 {
                return 0;
            }
            (usage.ru_nvcsw as u64).wrapping_add(usage.ru_nivcsw as u64)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::{
        LevelReport, RUN_COUNTER, RegisterCheckConfig, RegisterCheckReport, aes_partner, os,
        pattern,
    };
    use crate::crypto::Provider;

    /// Patterns in, results out, and the sleep interval, in one block of
    /// memory so the assembly needs a single base register.
    #[repr(C, align(64))]
    struct Frame {
        src: [u8; ZMM_BYTES],
        dst: [u8; ZMM_BYTES],
        sleep: libc::timespec,
        /// Non-zero: the xmm check clobbers xmm5 (see `inject_corruption`).
        corrupt: u64,
    }

    const ZMM_BYTES: usize = 32 * 64;
    const DST: usize = std::mem::offset_of!(Frame, dst);
    const SLEEP: usize = std::mem::offset_of!(Frame, sleep);
    const CORRUPT: usize = std::mem::offset_of!(Frame, corrupt);

    /// The system-call loop shared by every width: `yields` (r12) sched_yield
    /// calls, then `sleeps` (r13) nanosleep calls, with the registers untouched.
    /// The frame pointer lives in r14. All three are callee-saved, so the
    /// syscalls leave them alone, and they are explicit because
    /// clobber_abi's clobbers are late outputs that a generic input could
    /// share (rdi, say, which nanosleep overwrites).
    /// x86-64 Linux syscall numbers: sched_yield = 24, nanosleep = 35.
    macro_rules! syscall_loop {
        () => {
            concat!(
                "2:\n",
                "mov eax, 24\n",
                "syscall\n",
                "dec r12\n",
                "jnz 2b\n",
                "3:\n",
                "mov eax, 35\n",
                "lea rdi, [r14 + {sleep}]\n",
                "xor esi, esi\n",
                "syscall\n",
                "dec r13\n",
                "jnz 3b\n",
            )
        };
    }

    macro_rules! load_store {
        ($mov:literal, $reg:literal, $width:literal, $after:literal, $end:literal; $($n:literal),*) => {
            concat!(
                $( $mov, " ", $reg, $n, ", [r14 + ", $width, "*", $n, "]\n", )*
                syscall_loop!(),
                $after,
                $( $mov, " [r14 + {dst} + ", $width, "*", $n, "], ", $reg, $n, "\n", )*
                $end,
            )
        };
    }

    fn xmm(frame: &mut Frame, yields: u64, sleeps: u64) {
        // `dec; jnz` loops: zero would mean 2^64 iterations.
        let (yields, sleeps) = (yields.max(1), sleeps.max(1));
        // SAFETY: the template reads frame.src and writes frame.dst and reads
        // frame.sleep, all inside `*frame`, which we borrow mutably. It uses
        // only SSE2 (baseline on x86-64). clobber_abi("C") tells the compiler
        // every caller-saved register, which covers all vector registers and
        // the syscall's rax/rcx/r11/rdi/rsi, may change; `yields` and
        // `sleeps` are at least 1 (clamped above) so the loops end.
        unsafe {
            asm!(
                load_store!("movdqu", "xmm", 16,
                    "cmp qword ptr [r14 + {corrupt}], 0\nje 4f\npcmpeqd xmm5, xmm5\n4:\n", "";
                    0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15),
                in("r14") std::ptr::from_mut(frame),
                dst = const DST,
                sleep = const SLEEP,
                corrupt = const CORRUPT,
                inout("r12") yields => _,
                inout("r13") sleeps => _,
                clobber_abi("C"),
                options(nostack),
            );
        }
    }

    #[target_feature(enable = "avx")]
    fn ymm(frame: &mut Frame, yields: u64, sleeps: u64) {
        // `dec; jnz` loops: zero would mean 2^64 iterations.
        let (yields, sleeps) = (yields.max(1), sleeps.max(1));
        // SAFETY: as in `xmm`; the caller checked AVX (and its OS support)
        // before calling this `target_feature` function.
        unsafe {
            asm!(
                load_store!("vmovdqu", "ymm", 32, "", "vzeroupper"; 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15),
                in("r14") std::ptr::from_mut(frame),
                dst = const DST,
                sleep = const SLEEP,
                inout("r12") yields => _,
                inout("r13") sleeps => _,
                clobber_abi("C"),
                options(nostack),
            );
        }
    }

    #[target_feature(enable = "avx512f")]
    fn zmm(frame: &mut Frame, yields: u64, sleeps: u64) {
        // `dec; jnz` loops: zero would mean 2^64 iterations.
        let (yields, sleeps) = (yields.max(1), sleeps.max(1));
        // SAFETY: as in `xmm`; the caller checked AVX-512F (and its OS
        // support). With avx512f enabled clobber_abi("C") covers zmm0-31.
        unsafe {
            asm!(
                load_store!("vmovdqu64", "zmm", 64, "", "vzeroupper";
                    0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,
                    16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31),
                in("r14") std::ptr::from_mut(frame),
                dst = const DST,
                sleep = const SLEEP,
                inout("r12") yields => _,
                inout("r13") sleeps => _,
                clobber_abi("C"),
                options(nostack),
            );
        }
    }

    #[derive(Clone, Copy)]
    enum Level {
        Xmm,
        Ymm,
        Zmm,
    }

    impl Level {
        fn name(self) -> &'static str {
            match self {
                Level::Xmm => "xmm",
                Level::Ymm => "ymm",
                Level::Zmm => "zmm",
            }
        }

        fn shape(self) -> (usize, usize) {
            match self {
                Level::Xmm => (16, 16),
                Level::Ymm => (16, 32),
                Level::Zmm => (32, 64),
            }
        }
    }

    fn check_level(level: Level, config: RegisterCheckConfig) -> LevelReport {
        let (count, width) = level.shape();
        let bytes = count * width;
        let run = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut frame = Box::new(Frame {
            src: [0; ZMM_BYTES],
            dst: [0; ZMM_BYTES],
            sleep: libc::timespec {
                tv_sec: 0,
                tv_nsec: config.sleep_nanos.clamp(1, 999_999_999),
            },
            corrupt: u64::from(config.inject_corruption),
        });
        pattern(&mut frame.src[..bytes], width, run);
        let (yields, sleeps) = (config.yields, config.sleeps);
        let before = os::thread_switches();
        match level {
            Level::Xmm => xmm(&mut frame, yields, sleeps),
            // SAFETY: `levels()` offers Ymm only when AVX is detected.
            Level::Ymm => unsafe { ymm(&mut frame, yields, sleeps) },
            // SAFETY: `levels()` offers Zmm only when AVX-512F is detected.
            Level::Zmm => unsafe { zmm(&mut frame, yields, sleeps) },
        }
        let context_switches = os::thread_switches().saturating_sub(before);
        let corrupted_registers = (0..count)
            .filter(|r| {
                let span = r * width..(r + 1) * width;
                frame.src[span.clone()] != frame.dst[span]
            })
            .collect();
        LevelReport {
            level: level.name(),
            registers: count,
            context_switches,
            corrupted_registers,
        }
    }

    fn levels() -> Vec<Level> {
        let mut levels = vec![Level::Xmm];
        if std::arch::is_x86_feature_detected!("avx") {
            levels.push(Level::Ymm);
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            levels.push(Level::Zmm);
        }
        levels
    }

    pub fn run(config: RegisterCheckConfig, partner: Option<&Provider>) -> RegisterCheckReport {
        // Pin only if the current mask could be saved, and restore it when
        // `_restore` drops, also on unwind.
        let _restore = os::affinity().map(os::RestoreAffinity);
        let pinned_cpu = if _restore.is_some() {
            os::current_cpu().filter(|&cpu| os::pin_to(cpu))
        } else {
            None
        };
        let stop = AtomicBool::new(false);
        let seals = AtomicU64::new(0);
        let levels = std::thread::scope(|s| {
            let partner_running = partner.map(|p| {
                let (stop, seals) = (&stop, &seals);
                s.spawn(move || aes_partner(p, stop, seals, pinned_cpu))
            });
            let levels: Vec<LevelReport> = levels()
                .into_iter()
                .map(|l| check_level(l, config))
                .collect();
            stop.store(true, Ordering::Relaxed);
            if let Some(handle) = partner_running {
                // A panic in the partner only means less stress; the
                // register results stand on their own.
                let _joined = handle.join();
            }
            levels
        });
        RegisterCheckReport {
            pinned_cpu,
            aes_partner_seals: seals.load(Ordering::Relaxed),
            levels,
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::crypto::hardware;

    #[test]
    fn registers_survive_context_switches_under_aes_load() {
        let hw = hardware::provider();
        let partner = hw.is_available().then_some(&hw);
        let report = run(RegisterCheckConfig::default(), partner).expect("x86_64 has the check");
        assert!(report.levels.iter().any(|l| l.level == "xmm"));
        for level in &report.levels {
            assert!(
                level.context_switches > 0,
                "{level:?} was never switched out"
            );
        }
        if partner.is_some() {
            assert!(report.aes_partner_seals > 0, "the AES partner never ran");
        }
        assert!(report.passed(), "{}", report.summary());
    }

    #[test]
    fn the_checker_reports_a_clobbered_register() {
        let config = RegisterCheckConfig {
            yields: 2,
            sleeps: 1,
            inject_corruption: true,
            ..RegisterCheckConfig::default()
        };
        let report = run(config, None).expect("x86_64 has the check");
        let xmm = report
            .levels
            .iter()
            .find(|l| l.level == "xmm")
            .expect("xmm level");
        assert_eq!(xmm.corrupted_registers, vec![5]);
        assert!(!report.passed());
        assert!(report.summary().contains("CORRUPTED"));
        assert_eq!(report.aes_partner_seals, 0);
    }

    #[test]
    fn patterns_differ_between_registers_and_runs() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        pattern(&mut a, 16, 1);
        pattern(&mut b, 16, 2);
        assert_ne!(a, b);
        assert_ne!(a[..16], a[16..32]);
    }
}
