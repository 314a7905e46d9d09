//! Which provider carries traffic, decided at boot by self-tests and changed
//! while running only in one direction: away from a provider that failed.
//!
//! The datapath reads [`Selector::active`] once per batch (one atomic load)
//! and uses that provider's key for the whole batch. A failed provider is
//! disabled for the life of the process; with [`FailurePolicy::Fallback`]
//! traffic moves to `soft`, with [`FailurePolicy::Halt`] `active` becomes
//! `None` and the datapath must stop.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::selftest::{self, LongMessageReference, LongMessageStats, SelfTestFailure};
use super::simd_state::{self, RegisterCheckConfig, RegisterCheckReport};
use super::vectors;
use super::{Provider, ProviderId};

/// How the provider is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Hardware when available and every self-test passed, else soft.
    Auto,
    /// Hardware only at boot: no provider if it is unavailable or failed.
    /// A failure while running is handled by the [`FailurePolicy`] as in
    /// any mode (`fallback` moves traffic to soft).
    Hardware,
    /// Soft only.
    Soft,
}

impl Mode {
    pub const NAMES: [&'static str; 3] = ["auto", "hardware", "soft"];
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "hardware" => Ok(Mode::Hardware),
            "soft" => Ok(Mode::Soft),
            other => Err(format!(
                "unknown crypto mode {other:?}: use auto, hardware or soft"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Hardware => "hardware",
            Mode::Soft => "soft",
        })
    }
}

/// What to do when the provider carrying traffic fails a self-test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Move traffic to `soft` (if it passed its self-tests).
    Fallback,
    /// Stop carrying traffic.
    Halt,
}

impl FromStr for FailurePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fallback" => Ok(FailurePolicy::Fallback),
            "halt" => Ok(FailurePolicy::Halt),
            other => Err(format!(
                "unknown failure policy {other:?}: use fallback or halt"
            )),
        }
    }
}

/// What a failure did to the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Transition {
    /// The failed provider was not carrying traffic.
    Unchanged,
    /// Traffic now uses this provider.
    SwitchedTo(ProviderId),
    /// No provider carries traffic any more.
    Halted,
}

/// Everything known about one provider's fitness, for `selftest` and `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderReport {
    /// The slot: `hardware` or `soft`.
    pub name: ProviderId,
    /// The implementation behind it, e.g. `ring`.
    pub implementation: &'static str,
    /// True when it uses AES instructions (for `soft`: only if the
    /// software pin failed, in which case it is not software).
    pub hardware: bool,
    pub available: bool,
    pub unavailable_reason: Option<String>,
    pub kat_passed: u32,
    pub kat_failed: u32,
    pub kat_failures: Vec<String>,
    /// Both SIMD checks passed (`None`: not run, as for `soft`).
    pub simd_ok: Option<bool>,
    pub register_check: Option<RegisterCheckReport>,
    pub long_message_ok: Option<bool>,
    pub long_message_detail: Option<String>,
    /// Why this provider carries no traffic, once disabled.
    pub disabled: Option<String>,
    pub periodic_runs: u64,
    pub periodic_failures: u64,
}

/// One entry of the self-test history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelfTestEvent {
    pub unix_ms: u64,
    pub provider: ProviderId,
    pub check: &'static str,
    pub ok: bool,
    pub detail: String,
}

const HISTORY_LEN: usize = 64;
const NONE: u8 = u8::MAX;

/// Boot-time knobs.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootOptions {
    pub register_check: RegisterCheckConfig,
}

/// The provider selection shared by the datapath threads.
pub struct Selector {
    providers: [Provider; 2],
    disabled: [AtomicBool; 2],
    active: AtomicU8,
    mode: Mode,
    policy: FailurePolicy,
    reference: Option<LongMessageReference>,
    reports: Mutex<[ProviderReport; 2]>,
    history: Mutex<VecDeque<SelfTestEvent>>,
    /// Serializes failures, so two threads failing two providers at once
    /// cannot leave a disabled provider active.
    transitions: Mutex<()>,
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selector")
            .field("mode", &self.mode)
            .field("policy", &self.policy)
            .field("active", &self.active())
            .finish_non_exhaustive()
    }
}

impl Selector {
    /// Runs every power-on self-test and picks the active provider.
    /// `providers` is indexed by [`ProviderId`]: hardware first, soft second.
    pub fn boot(
        providers: [Provider; 2],
        mode: Mode,
        policy: FailurePolicy,
        options: BootOptions,
    ) -> Self {
        let reports = providers.clone().map(|p| ProviderReport {
            name: p.id,
            implementation: p.name,
            hardware: p.uses_aes_instructions,
            available: p.is_available(),
            unavailable_reason: p.availability.clone().err(),
            kat_passed: 0,
            kat_failed: 0,
            kat_failures: Vec::new(),
            simd_ok: None,
            register_check: None,
            long_message_ok: None,
            long_message_detail: None,
            disabled: None,
            periodic_runs: 0,
            periodic_failures: 0,
        });
        let mut selector = Selector {
            providers,
            disabled: [AtomicBool::new(false), AtomicBool::new(false)],
            active: AtomicU8::new(NONE),
            mode,
            policy,
            reference: None,
            reports: Mutex::new(reports),
            history: Mutex::new(VecDeque::with_capacity(HISTORY_LEN)),
            transitions: Mutex::new(()),
        };
        selector.run_boot_tests(options);
        let pick = |id: ProviderId| (!selector.is_disabled(id)).then_some(id);
        let active = match mode {
            Mode::Auto => pick(ProviderId::Hardware).or_else(|| pick(ProviderId::Soft)),
            Mode::Hardware => pick(ProviderId::Hardware),
            Mode::Soft => pick(ProviderId::Soft),
        };
        selector.active.store(
            active.map_or(NONE, |id| id.index() as u8),
            Ordering::Release,
        );
        selector
    }

    fn run_boot_tests(&mut self, options: BootOptions) {
        let vectors = vectors::builtin();
        for id in ProviderId::ALL {
            let provider = &self.providers[id.index()];
            if let Err(reason) = &provider.availability {
                self.disable(id, format!("unavailable: {reason}"));
                continue;
            }
            let report = match &vectors {
                Ok(vectors) => selftest::run_kats(provider, vectors),
                Err(e) => selftest::KatReport {
                    passed: 0,
                    failed: 1,
                    failures: vec![format!("compiled-in vectors do not parse: {e}")],
                },
            };
            let ok = report.all_passed();
            self.record(
                id,
                "known-answer",
                ok,
                format!("{} passed, {} failed", report.passed, report.failed),
            );
            self.with_report(id, |r| {
                r.kat_passed = report.passed;
                r.kat_failed = report.failed;
                r.kat_failures = report.failures.clone();
            });
            if !ok {
                self.disable(
                    id,
                    format!("failed {} known-answer vector(s)", report.failed),
                );
            }
        }

        // The soft provider's output is the reference the hardware is held
        // to; it is trusted only after passing its own vectors.
        let reference = if self.is_disabled(ProviderId::Soft) {
            Err("no reference: the soft provider did not pass its own vectors".to_string())
        } else {
            LongMessageReference::compute(&self.providers[ProviderId::Soft.index()])
                .map_err(|e| format!("no reference: {e}"))
        };

        // The hardware provider carries traffic only if both SIMD checks ran
        // and passed; a check that could not run is not a pass.
        let hw = ProviderId::Hardware;
        if self.is_disabled(hw) {
            self.reference = reference.ok();
            return;
        }
        let hardware = &self.providers[hw.index()];
        let registers = simd_state::run(options.register_check, Some(hardware));
        let registers_ok = registers.as_ref().is_some_and(RegisterCheckReport::passed);
        let summary = registers.as_ref().map_or_else(
            || "not implemented on this architecture".to_string(),
            RegisterCheckReport::summary,
        );
        self.record(hw, "simd-registers", registers_ok, summary.clone());
        let long = match &reference {
            Ok(reference) => reference.check(hardware).map_err(|f| f.to_string()),
            Err(why) => Err(why.clone()),
        };
        let long_ok = long.is_ok();
        let long_detail = match &long {
            Ok(stats) => describe_stats(stats),
            Err(why) => why.clone(),
        };
        self.record(hw, "long-message", long_ok, long_detail.clone());
        self.with_report(hw, |r| {
            r.register_check = registers;
            r.long_message_ok = Some(long_ok);
            r.long_message_detail = Some(long_detail.clone());
            r.simd_ok = Some(registers_ok && long_ok);
        });
        if !registers_ok {
            self.disable(hw, format!("SIMD register check did not pass: {summary}"));
        } else if !long_ok {
            self.disable(
                hw,
                format!("long-message check did not pass: {long_detail}"),
            );
        }
        self.reference = reference.ok();
    }

    /// The provider that carries traffic now, or `None` after a halt (or if
    /// none passed at boot). One atomic load: read it once per batch.
    pub fn active(&self) -> Option<ProviderId> {
        match self.active.load(Ordering::Acquire) {
            0 => Some(ProviderId::Hardware),
            1 => Some(ProviderId::Soft),
            _ => None,
        }
    }

    pub fn provider(&self, id: ProviderId) -> &Provider {
        &self.providers[id.index()]
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn policy(&self) -> FailurePolicy {
        self.policy
    }

    pub fn is_disabled(&self, id: ProviderId) -> bool {
        self.disabled[id.index()].load(Ordering::Acquire)
    }

    /// Runs the long-message check against the active provider, if that is
    /// the hardware one (soft is the reference; it is not checked against
    /// itself). Meant to be called by the datapath threads at the configured
    /// interval. On failure the provider is disabled and the policy applied.
    pub fn periodic_check(
        &self,
    ) -> Result<Option<LongMessageStats>, (SelfTestFailure, Transition)> {
        let (Some(ProviderId::Hardware), Some(reference)) = (self.active(), &self.reference) else {
            return Ok(None);
        };
        let hw = ProviderId::Hardware;
        let outcome = reference.check(self.provider(hw));
        let ok = outcome.is_ok();
        self.with_report(hw, |r| {
            r.periodic_runs += 1;
            r.periodic_failures += u64::from(!ok);
        });
        match outcome {
            Ok(stats) => {
                self.record(hw, "long-message", true, describe_stats(&stats));
                Ok(Some(stats))
            }
            Err(failure) => {
                self.record(hw, "long-message", false, failure.to_string());
                let transition =
                    self.fail(hw, format!("periodic long-message check failed: {failure}"));
                Err((failure, transition))
            }
        }
    }

    /// Disables `id` for the life of the process and, if it was carrying
    /// traffic, applies the failure policy.
    pub fn fail(&self, id: ProviderId, reason: String) -> Transition {
        let _serial = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        self.disable(id, reason);
        let next = match self.policy {
            FailurePolicy::Fallback
                if id != ProviderId::Soft && !self.is_disabled(ProviderId::Soft) =>
            {
                ProviderId::Soft.index() as u8
            }
            _ => NONE,
        };
        // Only move away from `id`: if traffic is already elsewhere, that
        // stands. Under `transitions`, `next` cannot be disabled meanwhile.
        match self.active.compare_exchange(
            id.index() as u8,
            next,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Err(_) => Transition::Unchanged,
            Ok(_) if next == NONE => Transition::Halted,
            Ok(_) => Transition::SwitchedTo(ProviderId::Soft),
        }
    }

    fn disable(&self, id: ProviderId, reason: String) {
        self.disabled[id.index()].store(true, Ordering::Release);
        self.with_report(id, |r| {
            r.disabled.get_or_insert(reason);
        });
    }

    fn with_report(&self, id: ProviderId, f: impl FnOnce(&mut ProviderReport)) {
        // A poisoned lock only means a panic elsewhere mid-update of a
        // report; the data is still the best we have.
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut reports[id.index()]);
    }

    fn record(&self, provider: ProviderId, check: &'static str, ok: bool, detail: String) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(SelfTestEvent {
            unix_ms,
            provider,
            check,
            ok,
            detail,
        });
    }

    pub fn reports(&self) -> [ProviderReport; 2] {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The most recent self-test events, oldest first.
    pub fn history(&self) -> Vec<SelfTestEvent> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

fn describe_stats(stats: &LongMessageStats) -> String {
    format!(
        "{} bytes in {} pieces matched the soft reference ({} us)",
        stats.bytes, stats.pieces, stats.micros
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::{
        AeadAlgorithm, AeadKey, CryptoError, IcvLen, NONCE_LEN, SecretKey, hardware, soft,
    };

    fn quick() -> BootOptions {
        BootOptions {
            register_check: RegisterCheckConfig {
                yields: 4,
                sleeps: 1,
                ..RegisterCheckConfig::default()
            },
        }
    }

    fn unavailable(mut p: Provider) -> Provider {
        p.availability = Err("test: pretend the CPU lacks AES-NI".into());
        p
    }

    /// A unit-test stand-in for a provider whose AES is wrong: it seals
    /// correctly and then flips one ciphertext bit.
    struct Broken(Arc<dyn AeadAlgorithm>);
    struct BrokenKey(Box<dyn AeadKey>);

    impl AeadAlgorithm for Broken {
        fn new_key(&self, key: &SecretKey, icv: IcvLen) -> Result<Box<dyn AeadKey>, CryptoError> {
            Ok(Box::new(BrokenKey(self.0.new_key(key, icv)?)))
        }
    }

    impl AeadKey for BrokenKey {
        fn seal_in_place(
            &self,
            n: &[u8; NONCE_LEN],
            a: &[u8],
            io: &mut [u8],
            t: &mut [u8],
        ) -> Result<(), CryptoError> {
            self.0.seal_in_place(n, a, io, t)?;
            if let Some(b) = io.first_mut() {
                *b ^= 1;
            }
            Ok(())
        }
        fn open_in_place(
            &self,
            n: &[u8; NONCE_LEN],
            a: &[u8],
            io: &mut [u8],
            t: &[u8],
        ) -> Result<(), CryptoError> {
            self.0.open_in_place(n, a, io, t)
        }
        fn icv_len(&self) -> IcvLen {
            self.0.icv_len()
        }
    }

    #[test]
    fn auto_prefers_hardware_when_it_passes() {
        let s = Selector::boot(
            Provider::detect_all(),
            Mode::Auto,
            FailurePolicy::Fallback,
            quick(),
        );
        let hw_available = hardware::provider().is_available();
        let expected = if hw_available {
            ProviderId::Hardware
        } else {
            ProviderId::Soft
        };
        assert_eq!(s.active(), Some(expected));
        let [hw, soft] = s.reports();
        assert!(
            soft.kat_passed > 20 && soft.kat_failed == 0,
            "{:?}",
            soft.kat_failures
        );
        if hw_available {
            assert_eq!(hw.kat_failed, 0, "{:?}", hw.kat_failures);
            assert_eq!(hw.simd_ok, Some(true), "{:?}", hw.long_message_detail);
            assert_eq!(hw.kat_passed, soft.kat_passed);
        }
    }

    #[test]
    fn unavailable_hardware_falls_back_in_auto_and_refuses_in_hardware_mode() {
        let providers = || [unavailable(hardware::provider()), soft::provider()];
        let auto = Selector::boot(providers(), Mode::Auto, FailurePolicy::Fallback, quick());
        assert_eq!(auto.active(), Some(ProviderId::Soft));
        let [hw, _] = auto.reports();
        assert!(!hw.available);
        assert_eq!(
            hw.kat_passed + hw.kat_failed,
            0,
            "unavailable providers run nothing"
        );
        let strict = Selector::boot(
            providers(),
            Mode::Hardware,
            FailurePolicy::Fallback,
            quick(),
        );
        assert_eq!(strict.active(), None);
    }

    #[test]
    fn a_provider_failing_known_answers_is_disabled_at_boot() {
        let mut hw = soft::provider();
        hw.id = ProviderId::Hardware;
        hw.algorithm = Arc::new(Broken(hw.algorithm.clone()));
        let s = Selector::boot(
            [hw, soft::provider()],
            Mode::Auto,
            FailurePolicy::Fallback,
            quick(),
        );
        assert_eq!(s.active(), Some(ProviderId::Soft));
        let [hw, _] = s.reports();
        assert!(hw.kat_failed > 0);
        assert!(
            hw.disabled
                .as_deref()
                .is_some_and(|d| d.contains("known-answer"))
        );
        assert!(s.is_disabled(ProviderId::Hardware));
    }

    #[test]
    fn no_passing_provider_means_no_selection() {
        let mut soft_broken = soft::provider();
        soft_broken.algorithm = Arc::new(Broken(soft_broken.algorithm.clone()));
        let s = Selector::boot(
            [unavailable(hardware::provider()), soft_broken],
            Mode::Auto,
            FailurePolicy::Fallback,
            quick(),
        );
        assert_eq!(s.active(), None);
    }

    #[test]
    fn hardware_without_a_soft_reference_does_not_pass() {
        // If soft fails its vectors there is nothing to hold the hardware
        // to: the long-message check cannot run, which is not a pass.
        let mut soft_broken = soft::provider();
        soft_broken.algorithm = Arc::new(Broken(soft_broken.algorithm.clone()));
        let s = Selector::boot(
            [hardware::provider(), soft_broken],
            Mode::Auto,
            FailurePolicy::Fallback,
            quick(),
        );
        assert_eq!(s.active(), None);
        let [hw, _] = s.reports();
        if hw.available {
            assert_eq!(hw.long_message_ok, Some(false));
            assert_eq!(hw.simd_ok, Some(false));
            assert!(
                hw.disabled
                    .as_deref()
                    .is_some_and(|d| d.contains("no reference")),
                "{hw:?}"
            );
        }
    }

    #[test]
    fn failure_moves_traffic_by_policy_and_never_back() {
        for (policy, want) in [
            (
                FailurePolicy::Fallback,
                Transition::SwitchedTo(ProviderId::Soft),
            ),
            (FailurePolicy::Halt, Transition::Halted),
        ] {
            let s = Selector::boot(Provider::detect_all(), Mode::Auto, policy, quick());
            let Some(ProviderId::Hardware) = s.active() else {
                assert_ne!(
                    std::env::var("ESPTUN_REQUIRE_AESNI").as_deref(),
                    Ok("1"),
                    "hardware provider not selected: {:?}",
                    s.reports()[0]
                );
                crate::testutil::skipped("the hardware provider is not selected on this machine");
                return;
            };
            assert_eq!(s.fail(ProviderId::Hardware, "test".into()), want);
            assert_eq!(
                s.fail(ProviderId::Hardware, "again".into()),
                Transition::Unchanged
            );
            assert!(s.is_disabled(ProviderId::Hardware));
            assert_ne!(s.active(), Some(ProviderId::Hardware));
            // The first reason is kept.
            assert_eq!(s.reports()[0].disabled.as_deref(), Some("test"));
        }
    }

    #[test]
    fn periodic_check_passes_on_a_healthy_machine_and_is_recorded() {
        let s = Selector::boot(
            Provider::detect_all(),
            Mode::Auto,
            FailurePolicy::Fallback,
            quick(),
        );
        match s.active() {
            Some(ProviderId::Hardware) => {
                let stats = s.periodic_check().expect("healthy hardware").expect("ran");
                assert!(stats.bytes >= selftest::LONG_MESSAGE_BYTES);
                assert_eq!(s.reports()[0].periodic_runs, 1);
                assert!(
                    s.history()
                        .iter()
                        .any(|e| e.check == "long-message" && e.ok)
                );
            }
            _ => assert_eq!(s.periodic_check(), Ok(None)),
        }
    }

    #[test]
    fn mode_and_policy_parse() {
        for name in Mode::NAMES {
            assert_eq!(
                name.parse::<Mode>().map(|m| m.to_string()),
                Ok(name.to_string())
            );
        }
        assert!("fast".parse::<Mode>().is_err());
        assert_eq!("halt".parse(), Ok(FailurePolicy::Halt));
        assert!("ignore".parse::<FailurePolicy>().is_err());
    }
}
