//! The field failure, injected: a provider that seals one plaintext block
//! replaced by its neighbour. The self-tests must catch it and traffic must
//! move to the soft provider (or halt, by policy).

mod common;

use esptun::crypto::fault;
use esptun::crypto::select::{BootOptions, FailurePolicy, Mode, Selector, Transition};
use esptun::crypto::selftest::SelfTestFailure;
use esptun::crypto::{ProviderId, soft};

fn boot(rate: f64, policy: FailurePolicy) -> (Selector, std::sync::Arc<fault::FaultInjector>) {
    let (faulty, injector) = fault::wrap(common::hardware_or_stand_in(), rate, 0x5EED);
    let selector = Selector::boot(
        [faulty, soft::provider()],
        Mode::Auto,
        policy,
        BootOptions::default(),
    );
    (selector, injector)
}

#[test]
fn a_provider_that_corrupts_from_the_start_fails_its_known_answers() {
    let (s, injector) = boot(1.0, FailurePolicy::Fallback);
    assert!(injector.injected() > 0);
    assert_eq!(s.active(), Some(ProviderId::Soft));
    let [hw, soft] = s.reports();
    assert!(hw.kat_failed > 0, "{hw:?}");
    assert!(hw.disabled.is_some());
    assert_eq!(soft.kat_failed, 0);
}

#[test]
fn a_fault_that_appears_while_running_is_caught_and_traffic_moves_to_soft() {
    let (s, injector) = boot(0.0, FailurePolicy::Fallback);
    assert_eq!(
        s.active(),
        Some(ProviderId::Hardware),
        "{:?}",
        s.reports()[0]
    );
    // Healthy first.
    assert!(matches!(s.periodic_check(), Ok(Some(_))));

    // The long message has 76 pieces of two or more blocks: at 50% per
    // seal, the chance that none is corrupted is 2^-76.
    injector.set_rate(0.5);
    let (failure, transition) = s.periodic_check().expect_err("the fault must be detected");
    assert!(injector.injected() > 0);
    assert_eq!(transition, Transition::SwitchedTo(ProviderId::Soft));
    assert_eq!(s.active(), Some(ProviderId::Soft));
    match failure {
        SelfTestFailure::WrongCiphertext {
            repeats_neighbour, ..
        } => {
            assert!(
                repeats_neighbour,
                "the report should name the field pattern"
            )
        }
        other => panic!("expected a ciphertext mismatch, got {other}"),
    }
    let [hw, _] = s.reports();
    assert_eq!((hw.periodic_runs, hw.periodic_failures), (2, 1));
    assert!(
        hw.disabled
            .as_deref()
            .is_some_and(|d| d.contains("long-message"))
    );

    // Soft now carries traffic and is the reference: nothing more to check,
    // and the hardware provider stays disabled even if the fault goes away.
    injector.set_rate(0.0);
    assert_eq!(s.periodic_check(), Ok(None));
    assert!(s.is_disabled(ProviderId::Hardware));
}

#[test]
fn with_the_halt_policy_a_fault_stops_traffic() {
    let (s, injector) = boot(0.0, FailurePolicy::Halt);
    assert_eq!(s.active(), Some(ProviderId::Hardware));
    injector.set_rate(1.0);
    let (_, transition) = s.periodic_check().expect_err("detected");
    assert_eq!(transition, Transition::Halted);
    assert_eq!(s.active(), None);
}

/// The whole field failure through the datapath: the sender's cipher
/// replaces a plaintext block after the sender validated the checksum,
/// seals it with a valid ICV, and the receiver must refuse to deliver it.
use esptun::datapath::inbound::Inbound;
use esptun::datapath::{DropReason, Verdict};
use esptun::wire::inner::{InnerPolicy, build};
use esptun::wire::ip::protocol;

/// Eight copies of `plain` sealed by a sender whose cipher corrupts every
/// seal (one block copied over its neighbour, the ICV valid over it), then
/// opened by a sound receiver; the receiver's verdicts and pipeline.
fn through_a_corrupting_cipher(
    plain: &[u8],
    sender_policy: InnerPolicy,
    receiver_policy: InnerPolicy,
) -> (Vec<Verdict>, Inbound) {
    use esptun::crypto::IcvLen;
    use esptun::datapath::inbound::Encap;
    use esptun::datapath::outbound::Outbound;
    use esptun::packet::PacketBuf;
    use esptun::sa::reservation::Fingerprint;
    use esptun::sa::table::SaMeta;
    use esptun::sa::{InboundSa, InnerAddrs, KeyMaterial, OutboundSa, SaKeys};
    use std::net::SocketAddr;

    let (sender, injector) = boot(0.0, FailurePolicy::Fallback);
    let receiver = Selector::boot(
        [common::hardware_or_stand_in(), soft::provider()],
        Mode::Auto,
        FailurePolicy::Fallback,
        BootOptions::default(),
    );
    let (a, b) = ([198, 18, 0, 1], [198, 19, 0, 2]);
    let material = KeyMaterial::from_bytes(&[9u8; 20]).expect("material");
    let addrs = |l: [u8; 4], r: [u8; 4]| InnerAddrs::new(l.into(), r.into()).expect("addrs");
    let mut out = Outbound::new(sender_policy);
    let keys = SaKeys::new(&sender, &material, IcvLen::Icv16).expect("keys");
    let meta = || {
        SaMeta::active(
            "b",
            SocketAddr::from((b, 4500)),
            Fingerprint::new(&material),
        )
    };
    let id = out
        .add_sa(
            OutboundSa::new(0x2000, keys, false, addrs(a, b)).expect("sa"),
            meta(),
        )
        .expect("table");
    // Keys made for this test never outlive it: grant every number.
    out.sa_mut(id).expect("sa").set_ceiling(u64::MAX);
    let mut inb = Inbound::new(receiver_policy);
    let keys = SaKeys::new(&receiver, &material, IcvLen::Icv16).expect("keys");
    inb.add_sa(
        InboundSa::new(0x2000, keys, false, addrs(b, a), 64).expect("sa"),
        meta(),
    )
    .expect("table");

    injector.set_rate(1.0);
    let mut batch: Vec<PacketBuf> = (0..8)
        .map(|_| {
            let mut buf = PacketBuf::new(2048);
            assert!(buf.fill(plain));
            buf
        })
        .collect();
    let mut verdicts = Vec::new();
    out.process(&sender, &mut batch, &mut verdicts);
    assert!(
        verdicts.iter().all(|v| matches!(v, Verdict::Send { .. })),
        "{verdicts:?}"
    );
    assert_eq!(injector.injected(), 8, "every seal was corrupted");
    inb.process(&receiver, Encap::NATT, &mut batch, &mut verdicts);
    (verdicts, inb)
}

/// Non-zero payload: a block copied over its neighbour must change the
/// bytes (in a stream of zeros it would be invisible, and harmless).
fn payload() -> Vec<u8> {
    (0..1024u32).map(|i| (i / 16) as u8).collect()
}

#[test]
fn a_block_corrupted_inside_the_cipher_passes_the_icv_and_is_dropped_by_the_inner_checksum() {
    let plain = build::ipv4([198, 18, 0, 1], [198, 19, 0, 2], protocol::TCP, &payload());
    let (verdicts, inb) =
        through_a_corrupting_cipher(&plain, InnerPolicy::default(), InnerPolicy::default());
    assert_eq!(verdicts, vec![Verdict::Drop(DropReason::InnerChecksum); 8]);
    assert_eq!(inb.counters.drops(DropReason::InnerChecksum), 8);
    assert_eq!(
        inb.counters.drops(DropReason::IcvFailure),
        0,
        "the ICV vouched for the corrupted bytes"
    );
    assert_eq!(inb.counters.total_drops(), 8);
}

/// An IPv4 UDP datagram sent with checksum 0 carries nothing to check it
/// by. The sender fills in the real checksum by default, which protects it
/// end to end; without that the receiver's policy decides, and delivering
/// (the default, counted) delivers the corrupted bytes.
#[test]
fn a_zero_udp_checksum_is_protected_when_the_sender_fills_it_in() {
    let mut plain = build::ipv4([198, 18, 0, 1], [198, 19, 0, 2], protocol::UDP, &payload());
    plain[26..28].copy_from_slice(&[0, 0]);
    let no_fill = InnerPolicy {
        fill_udp4_zero_checksum: false,
        ..InnerPolicy::default()
    };

    let (verdicts, inb) =
        through_a_corrupting_cipher(&plain, InnerPolicy::default(), InnerPolicy::default());
    assert_eq!(verdicts, vec![Verdict::Drop(DropReason::InnerChecksum); 8]);
    assert_eq!(
        inb.counters
            .udp4_zero_checksum
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let (verdicts, inb) = through_a_corrupting_cipher(&plain, no_fill, InnerPolicy::default());
    assert_eq!(
        verdicts,
        vec![Verdict::Deliver; 8],
        "the documented trade-off of delivering zero checksums"
    );
    assert_eq!(
        inb.counters
            .udp4_zero_checksum
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );

    let strict = InnerPolicy {
        allow_udp4_zero_checksum: false,
        ..InnerPolicy::default()
    };
    let (verdicts, _) = through_a_corrupting_cipher(&plain, no_fill, strict);
    assert_eq!(
        verdicts,
        vec![Verdict::Drop(DropReason::ZeroUdpChecksum); 8]
    );
}
