//! A deterministic, structure-aware mutation campaign over every IKE input
//! path (issue 13): the header and payload-chain parser, each payload
//! parser, the Encrypted payload's opening, and the state machines in each
//! state that reads from the network. cargo-fuzz needs a nightly toolchain
//! (`-Z sanitizer`), which this project does not use, so the mutator lives
//! here and runs on stable inside `cargo test`.
//!
//! Seeds are the messages of a real exchange run in memory with scripted
//! randomness: IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA (CHILD SA rekey),
//! INFORMATIONAL (liveness), CREATE_CHILD_SA (IKE SA rekey) and an
//! INFORMATIONAL Delete sent by the responder, requests and responses.
//! Mutations: bit flips, interesting bytes and words, insertions,
//! deletions, truncations, extensions, and, on the payload chain, removal,
//! duplication, swaps, type changes and length-field edits. Protected
//! messages are opened with the session keys, mutated inside and sealed
//! again with the same keys, so the mutations reach the inner parsers and
//! the state machines past the ICV.
//!
//! Checked per input: no panic (caught, and the input printed in hex), each
//! call returns within a time bound, the bytes one call allocates stay
//! bounded, a refused message leaves no memory behind in the SA, and the
//! SA's lists stay bounded.
//!
//! `cargo test --test ike_fuzz` runs a CI-sized campaign (50,000 inputs);
//! the full one:
//! `ESPTUN_FUZZ_INPUTS=2000000 cargo test --release --test ike_fuzz -- --ignored --nocapture`
//! (`ESPTUN_FUZZ_SEED` picks the seed). A test binary of its own, because
//! it replaces the global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use esptun::ike::crypto::{DhGroup, DhPrivate, Encr, IkeCryptoError, Randomness};
use esptun::ike::proposal::{EspAlgorithms, IkeAlgorithms};
use esptun::ike::sa::{Action, Config, IkeError, IkeSa, Retransmit, Status};
use esptun::ike::sk::{self, SkKey};
use esptun::ike::wire::consts::{id, payload as pty};
use esptun::ike::wire::payload::Identification;
use esptun::ike::wire::{Message, Payload, chain, sa_payload};
use zeroize::Zeroizing;

// ---------------------------------------------------------------------------
// Allocation accounting, per thread.

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    /// Whether a panic now is a fuzzed call's, caught and reported.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

// SAFETY: defers every call to the system allocator unchanged; the
// thread-locals are const-initialised `Cell`s without destructors, so
// touching them never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        sub(layout.size());
        add(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn add(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().wrapping_add(n);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn sub(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().wrapping_sub(n)));
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> usize {
    LIVE.with(Cell::get)
}

/// Runs `f`, returning its result, its duration, the most bytes it had
/// allocated at once on top of what was live before, and what it left
/// allocated (its result included).
fn measured<R>(f: impl FnOnce() -> R) -> (R, Duration, usize, isize) {
    let before = live();
    PEAK.with(|p| p.set(before));
    let t = Instant::now();
    let r = f();
    let d = t.elapsed();
    let after = live();
    let peak = PEAK.with(Cell::get).saturating_sub(before);
    (r, d, peak, after.wrapping_sub(before) as isize)
}

// ---------------------------------------------------------------------------
// Bounds every input must respect.

/// No single call may take longer (generous: debug builds, a loaded 2-core
/// machine; a release call takes well under a millisecond).
const TIME_BOUND: Duration = Duration::from_secs(2);
/// No single call may allocate more at once than this (an input is at most
/// a few KiB; the SA copies it a few times).
const ALLOC_BOUND: usize = 1 << 20;
/// CHILD SAs and retiring IKE SAs one SA may hold in this campaign.
const LIST_BOUND: usize = 8;

// ---------------------------------------------------------------------------
// Deterministic randomness.

/// SplitMix64: tiny, fast and good enough for choosing mutations.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn fill(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.byte();
        }
    }
}

/// The state machines' randomness: reproducible, including the DH keys.
struct Scripted(Rng);

impl Randomness for Scripted {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), IkeCryptoError> {
        self.0.fill(dest);
        Ok(())
    }

    fn dh_private(&mut self, group: DhGroup) -> Result<DhPrivate, IkeCryptoError> {
        let mut b = [0u8; 32];
        self.0.fill(&mut b);
        #[allow(deprecated)]
        let fixed = ring::test::rand::FixedSliceRandom { bytes: &b };
        let alg = match group {
            DhGroup::Ecp256 => &ring::agreement::ECDH_P256,
            DhGroup::Curve25519 => &ring::agreement::X25519,
        };
        let key = ring::agreement::EphemeralPrivateKey::generate(alg, &fixed)
            .map_err(|_| IkeCryptoError::Random)?;
        DhPrivate::from_ring(group, key)
    }
}

// ---------------------------------------------------------------------------
// The scripted exchange.

const I_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const R_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));

fn config(local: IpAddr, remote: IpAddr) -> Arc<Config> {
    Arc::new(Config {
        local_id: Identification::new(id::FQDN, format!("{local}.example").into_bytes()),
        remote_id: Some(Identification::new(
            id::FQDN,
            format!("{remote}.example").into_bytes(),
        )),
        psk: Zeroizing::new(b"fuzzing shared secret".to_vec()),
        ike: IkeAlgorithms::default(),
        esp: EspAlgorithms::default(),
        local_addr: local,
        remote_addr: remote,
        retransmit: Retransmit::default(),
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    I,
    R,
}

/// Both ends of one exchange, replayed deterministically up to a message.
struct Lab {
    i: Option<IkeSa>,
    r: IkeSa,
    ri: Scripted,
    rr: Scripted,
    now: Instant,
    /// Every message produced so far, with its receiver and a name.
    sent: Vec<(Side, Vec<u8>, String)>,
    /// Whether the last message in `sent` has been delivered.
    delivered: bool,
    /// Messages produced but not yet taken into `sent`.
    queue: VecDeque<(Side, Vec<u8>)>,
    /// The next scripted operation.
    script: usize,
    child_spi: u32,
    /// Every SK_e key seen so far.
    keys: Vec<(Encr, Vec<u8>)>,
}

fn sends(actions: &[Action]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

/// "IKE_AUTH response to I", from the header.
fn name(bytes: &[u8], to: Side) -> String {
    let ex = match bytes.get(18) {
        Some(34) => "IKE_SA_INIT",
        Some(35) => "IKE_AUTH",
        Some(36) => "CREATE_CHILD_SA",
        Some(37) => "INFORMATIONAL",
        _ => "exchange ?",
    };
    let dir = if bytes.get(19).is_some_and(|f| f & 0x20 != 0) {
        "response"
    } else {
        "request"
    };
    format!("{ex} {dir} to {to:?}")
}

impl Lab {
    fn new() -> Self {
        Lab {
            i: None,
            r: IkeSa::responder(config(R_ADDR, I_ADDR)),
            ri: Scripted(Rng(0x1_0000)),
            rr: Scripted(Rng(0x2_0000)),
            now: Instant::now(),
            sent: Vec::new(),
            delivered: true,
            queue: VecDeque::new(),
            script: 0,
            child_spi: 0,
            keys: Vec::new(),
        }
    }

    /// Delivers the last produced message to its receiver.
    fn deliver(&mut self) -> Result<Vec<Action>, IkeError> {
        let (to, bytes, _) = self.sent.last().cloned().expect("a message");
        self.delivered = true;
        let now = self.now;
        let (sa, rng) = self.receiver(to);
        sa.handle(&bytes, now, rng)
    }

    /// Runs the next scripted operation, when the network is quiet; false
    /// when the script is done. In order: the initiator's IKE_SA_INIT, a
    /// CHILD SA rekey, a liveness check, an IKE SA rekey, and a Delete of
    /// the IKE SA from the responder. What the SAs send on their own (the
    /// Deletes of what a rekey replaced) is delivered in between.
    fn run_script(&mut self) -> bool {
        let now = self.now;
        let (from, r) = match self.script {
            0 => {
                let (sa, a) = IkeSa::initiate(config(I_ADDR, R_ADDR), now, &mut self.ri)
                    .unwrap_or_else(|e| panic!("initiate: {e}"));
                self.i = Some(sa);
                (Side::I, Ok(a))
            }
            1 => {
                let spi = self.child_spi;
                let i = self.i.as_mut().expect("initiator");
                (Side::I, i.rekey_child(spi, now, &mut self.ri))
            }
            2 => {
                let i = self.i.as_mut().expect("initiator");
                (Side::I, i.check_liveness(now, &mut self.ri))
            }
            3 => {
                let i = self.i.as_mut().expect("initiator");
                (Side::I, i.rekey_ike(now, &mut self.ri))
            }
            4 => (Side::R, self.r.close(now, &mut self.rr)),
            _ => return false,
        };
        let op = self.script;
        self.script += 1;
        let a = r.unwrap_or_else(|e| panic!("scripted operation {op}: {e}"));
        self.take(from, &a);
        self.collect_keys();
        true
    }

    /// Queues what `from` sent; remembers the CHILD SA it installed.
    fn take(&mut self, from: Side, actions: &[Action]) {
        let to = if from == Side::I { Side::R } else { Side::I };
        for a in actions {
            if let Action::InstallChild(c) = a
                && from == Side::I
            {
                self.child_spi = c.inbound_spi;
            }
        }
        for b in sends(actions) {
            self.queue.push_back((to, b));
        }
    }

    /// Produces the next message (delivering the last one first); false
    /// when the exchange is over.
    fn advance(&mut self) -> bool {
        loop {
            if !self.delivered {
                let to = self.sent.last().expect("a message").0;
                let a = self.deliver();
                let what = &self.sent.last().expect("a message").2;
                let a = a.unwrap_or_else(|e| panic!("delivering {what}: {e}"));
                self.take(to, &a);
            }
            self.collect_keys();
            if let Some((to, b)) = self.queue.pop_front() {
                let n = name(&b, to);
                self.sent.push((to, b, n));
                self.delivered = false;
                return true;
            }
            if !self.run_script() {
                return false;
            }
        }
    }

    /// A lab whose message `k` is produced and not yet delivered.
    fn at(k: usize) -> Self {
        let mut lab = Lab::new();
        while lab.sent.len() <= k {
            assert!(lab.advance(), "the exchange has no message {k}");
        }
        lab
    }

    fn receiver(&mut self, side: Side) -> (&mut IkeSa, &mut Scripted) {
        match side {
            Side::I => (self.i.as_mut().expect("initiator"), &mut self.ri),
            Side::R => (&mut self.r, &mut self.rr),
        }
    }

    /// Remembers both sides' current SK_ei and SK_er: a rekeyed IKE SA's
    /// old keys still protect its Delete.
    fn collect_keys(&mut self) {
        let sides = [self.i.as_ref(), Some(&self.r)];
        for sa in sides.into_iter().flatten() {
            let Some(k) = sa.keys() else { continue };
            for m in [&k.sk_ei, &k.sk_er] {
                if !self.keys.iter().any(|(_, have)| have == &m[..]) {
                    self.keys.push((k.encr, m.to_vec()));
                }
            }
        }
    }

    /// The key material (key || salt) that opens `msg`.
    fn key_for(&self, msg: &[u8]) -> Option<Vec<u8>> {
        self.keys.iter().find_map(|(encr, m)| {
            let key = SkKey::new(*encr, m).ok()?;
            sk::open(msg, &key).ok().map(|_| m.clone())
        })
    }
}

// ---------------------------------------------------------------------------
// Messages as a header and a chain of payloads, without validation.

#[derive(Clone, Debug)]
struct RawPl {
    ty: u8,
    /// The byte after next-payload: the critical bit and reserved bits.
    flags: u8,
    body: Vec<u8>,
}

/// Splits a chain starting with type `first` leniently (stops at the first
/// inconsistency); for SK, returns its body as the last payload.
fn split_chain(first: u8, mut bytes: &[u8]) -> Vec<RawPl> {
    let mut out = Vec::new();
    let mut ty = first;
    while ty != 0 && bytes.len() >= 4 && out.len() < 64 {
        let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if len < 4 || len > bytes.len() {
            break;
        }
        out.push(RawPl {
            ty,
            flags: bytes[1],
            body: bytes[4..len].to_vec(),
        });
        if ty == pty::SK {
            break;
        }
        ty = bytes[0];
        bytes = &bytes[len..];
    }
    out
}

/// Emits a chain; returns the first type. The SK payload's next-payload
/// field is `sk_next` (the type of its first inner payload).
fn emit_chain(pls: &[RawPl], sk_next: u8, out: &mut Vec<u8>) -> u8 {
    for (n, p) in pls.iter().enumerate() {
        let next = if p.ty == pty::SK {
            sk_next
        } else {
            pls.get(n + 1).map_or(0, |q| q.ty)
        };
        let len = (4 + p.body.len()).min(0xffff) as u16;
        out.push(next);
        out.push(p.flags);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&p.body[..usize::from(len) - 4]);
    }
    pls.first().map_or(0, |p| p.ty)
}

/// Payload types worth switching to: ours, neighbours, extremes.
const TYPES: [u8; 20] = [
    0, 1, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 255,
];

const INTERESTING8: [u8; 9] = [0, 1, 2, 3, 4, 0x7f, 0x80, 0xfe, 0xff];
const INTERESTING16: [u16; 12] = [0, 1, 3, 4, 5, 8, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff];

/// Unstructured mutations of `b`, `rounds` of them.
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>, rounds: usize) {
    for _ in 0..rounds {
        let len = b.len();
        match rng.below(11) {
            0 | 1 if len > 0 => {
                let at = rng.below(len);
                b[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let at = rng.below(len);
                b[at] = INTERESTING8[rng.below(INTERESTING8.len())];
            }
            3 if len > 0 => {
                let at = rng.below(len);
                b[at] = rng.byte();
            }
            4 if len > 1 => {
                let at = rng.below(len - 1);
                let v = INTERESTING16[rng.below(INTERESTING16.len())];
                let v = if rng.chance(3) {
                    // Off by a little from the field's current value.
                    u16::from_be_bytes([b[at], b[at + 1]])
                        .wrapping_add((rng.below(9) as u16).wrapping_sub(4))
                } else {
                    v
                };
                b[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
            5 if len > 0 => {
                let at = rng.below(len);
                b.truncate(at);
            }
            6 => {
                let max = if rng.chance(8) { 2048 } else { 16 };
                let n = 1 + rng.below(max);
                let at = rng.below(len + 1);
                let mut ins = vec![0u8; n];
                if !rng.chance(3) {
                    rng.fill(&mut ins);
                }
                b.splice(at..at, ins);
            }
            7 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                b.drain(at..at + n);
            }
            8 if len > 1 => {
                // Copy a block within the input.
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(64));
                let block = b[from..from + n].to_vec();
                let to = rng.below(len);
                let end = (to + n).min(len);
                b[to..end].copy_from_slice(&block[..end - to]);
            }
            9 if len > 0 => {
                let at = rng.below(len);
                let n = rng.below((len - at).min(16) + 1);
                for x in &mut b[at..at + n] {
                    *x = 0xff;
                }
            }
            _ => {
                let n = rng.below(8);
                for _ in 0..n {
                    b.push(rng.byte());
                }
            }
        }
    }
}

/// Structure-aware mutations of a payload list.
fn mutate_chain(rng: &mut Rng, pls: &mut Vec<RawPl>) {
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let n = pls.len();
        match rng.below(9) {
            0 if n > 0 => {
                pls.remove(rng.below(n));
            }
            1 if n > 0 => {
                let p = pls[rng.below(n)].clone();
                pls.insert(rng.below(n + 1), p);
            }
            2 if n > 1 => {
                let (a, b) = (rng.below(n), rng.below(n));
                pls.swap(a, b);
            }
            3 if n > 0 => {
                let at = rng.below(n);
                pls[at].ty = TYPES[rng.below(TYPES.len())];
            }
            4 if n > 0 => {
                let at = rng.below(n);
                pls[at].flags = if rng.chance(2) { 0x80 } else { rng.byte() };
            }
            5 => {
                let mut body = vec![0u8; rng.below(64)];
                rng.fill(&mut body);
                pls.insert(
                    rng.below(n + 1),
                    RawPl {
                        ty: TYPES[rng.below(TYPES.len())],
                        flags: if rng.chance(4) { 0x80 } else { 0 },
                        body,
                    },
                );
            }
            6 if n > 0 && n < 40 => {
                // Many copies: the payload count limits.
                let p = pls[rng.below(n)].clone();
                for _ in 0..rng.below(40) {
                    pls.push(p.clone());
                }
            }
            _ if n > 0 => {
                let at = rng.below(n);
                let r = 1 + rng.below(4);
                mutate_bytes(rng, &mut pls[at].body, r);
            }
            _ => {}
        }
    }
}

/// After emitting, sometimes break a length field on purpose: the
/// header's, or one payload's.
fn break_lengths(rng: &mut Rng, msg: &mut [u8], chain_at: usize) {
    if !rng.chance(6) || msg.len() < 28 {
        return;
    }
    if rng.chance(2) {
        let len = u32::from_be_bytes([msg[24], msg[25], msg[26], msg[27]]);
        let v = match rng.below(4) {
            0 => 0,
            1 => u32::MAX,
            _ => len.wrapping_add((rng.below(17) as u32).wrapping_sub(8)),
        };
        msg[24..28].copy_from_slice(&v.to_be_bytes());
    } else {
        // Walk to a random payload and edit its length.
        let mut at = chain_at;
        let hops = rng.below(4);
        for _ in 0..hops {
            if at + 4 > msg.len() {
                break;
            }
            let l = usize::from(u16::from_be_bytes([msg[at + 2], msg[at + 3]]));
            if l < 4 || at + l + 4 > msg.len() {
                break;
            }
            at += l;
        }
        if at + 4 <= msg.len() {
            let l = u16::from_be_bytes([msg[at + 2], msg[at + 3]]);
            let v = match rng.below(4) {
                0 => INTERESTING16[rng.below(INTERESTING16.len())],
                _ => l.wrapping_add((rng.below(17) as u16).wrapping_sub(8)),
            };
            msg[at + 2..at + 4].copy_from_slice(&v.to_be_bytes());
        }
    }
}

/// Header field edits that reach the state machines' dispatch.
fn mutate_header(rng: &mut Rng, h: &mut [u8]) {
    if h.len() < 28 {
        return;
    }
    match rng.below(7) {
        0 => h[18] = [34, 35, 36, 37, 0, 33, 255][rng.below(7)],
        1 => h[19] ^= [0x08, 0x20, 0x28, 0x10, 0xff][rng.below(5)],
        2 => {
            let id = u32::from_be_bytes([h[20], h[21], h[22], h[23]]);
            let v = [id.wrapping_add(1), id.wrapping_sub(1), 0, u32::MAX][rng.below(4)];
            h[20..24].copy_from_slice(&v.to_be_bytes());
        }
        3 => h[17] = [0x20, 0x21, 0x30, 0x10, 0][rng.below(5)],
        4 => {
            let at = rng.below(16);
            h[at] ^= 1 << rng.below(8);
        }
        5 => h[8..16].fill(0),
        _ => {}
    }
}

/// A mutated plain message: raw, or header + chain edits re-emitted.
fn mutate_plain(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut msg = seed.to_vec();
    if rng.chance(3) || seed.len() < 28 {
        let rounds = 1 + rng.below(4);
        mutate_bytes(rng, &mut msg, rounds);
        return msg;
    }
    let mut head = seed[..28].to_vec();
    let mut pls = split_chain(seed[16], &seed[28..]);
    mutate_chain(rng, &mut pls);
    if rng.chance(4) {
        mutate_header(rng, &mut head);
    }
    let mut out = head;
    let first = emit_chain(&pls, 0, &mut out);
    out[16] = first;
    let len = out.len() as u32;
    out[24..28].copy_from_slice(&len.to_be_bytes());
    break_lengths(rng, &mut out, 28);
    out
}

/// A protected seed, opened: header, plain payloads before SK, the SK
/// payload's flags and inner first type, and the plaintext (inner chain,
/// padding, pad length).
#[derive(Clone)]
struct Protected {
    material: Vec<u8>,
    head: Vec<u8>,
    sk_flags: u8,
    sk_next: u8,
    plaintext: Vec<u8>,
}

fn open_raw(msg: &[u8], material: &[u8]) -> Option<Protected> {
    use ring::aead;
    let head = msg.get(..28)?.to_vec();
    let pls = split_chain(msg[16], &msg[28..]);
    let sk = pls.last()?;
    if pls.len() != 1 || sk.ty != pty::SK {
        return None;
    }
    let key = gcm_key(material)?;
    let (iv, sealed) = sk.body.split_at(8);
    let mut buf = sealed.to_vec();
    let aad = &msg[..32];
    let pt = key
        .open_in_place(nonce(material, iv), aead::Aad::from(aad), &mut buf)
        .ok()?;
    Some(Protected {
        material: material.to_vec(),
        head,
        sk_flags: msg[29],
        sk_next: msg[28],
        plaintext: pt.to_vec(),
    })
}

fn gcm_key(material: &[u8]) -> Option<ring::aead::LessSafeKey> {
    use ring::aead;
    let alg = match material.len() {
        20 => &aead::AES_128_GCM,
        36 => &aead::AES_256_GCM,
        _ => return None,
    };
    let k = aead::UnboundKey::new(alg, &material[..material.len() - 4]).ok()?;
    Some(aead::LessSafeKey::new(k))
}

fn nonce(material: &[u8], iv: &[u8]) -> ring::aead::Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&material[material.len() - 4..]);
    n[4..].copy_from_slice(&iv[..8]);
    ring::aead::Nonce::assume_unique_for_key(n)
}

/// Seals a header and plaintext as a message with one SK payload, with the
/// lengths computed (then perhaps broken, before sealing, so the ICV still
/// holds over them).
fn seal_raw(rng: &mut Rng, p: &Protected) -> Vec<u8> {
    let mut out = p.head.clone();
    out[16] = pty::SK;
    let sk_len = (4 + 8 + p.plaintext.len() + 16).min(0xffff) as u16;
    out.push(p.sk_next);
    out.push(p.sk_flags);
    out.extend_from_slice(&sk_len.to_be_bytes());
    let total = (28 + 4 + 8 + p.plaintext.len() + 16) as u32;
    out[24..28].copy_from_slice(&total.to_be_bytes());
    if rng.chance(16) {
        break_lengths(rng, &mut out, 28);
    }
    let mut iv = [0u8; 8];
    rng.fill(&mut iv);
    let Some(key) = gcm_key(&p.material) else {
        return out;
    };
    let aad = out.clone();
    let mut pt = p.plaintext.clone();
    if key
        .seal_in_place_append_tag(
            nonce(&p.material, &iv),
            ring::aead::Aad::from(&aad[..]),
            &mut pt,
        )
        .is_err()
    {
        return out;
    }
    out.extend_from_slice(&iv);
    out.extend_from_slice(&pt);
    out
}

/// A mutated protected message, sealed with the right key; `msg_id`, if
/// given, overrides the message ID after the mutations.
fn mutate_protected(rng: &mut Rng, p: &Protected, msg_id: Option<u32>) -> Vec<u8> {
    let mut q = p.clone();
    match rng.below(8) {
        0 => {
            // The plaintext as bytes, padding and pad length included.
            let rounds = 1 + rng.below(4);
            mutate_bytes(rng, &mut q.plaintext, rounds);
        }
        1 => {
            // Padding of every size, with a pad length that may lie.
            let pad = rng.below(300);
            let body_end = q.plaintext.len().saturating_sub(1);
            q.plaintext.truncate(body_end);
            for _ in 0..pad {
                q.plaintext.push(rng.byte());
            }
            q.plaintext.push(if rng.chance(2) {
                pad.min(255) as u8
            } else {
                rng.byte()
            });
        }
        2 => {
            q.sk_next = TYPES[rng.below(TYPES.len())];
            if rng.chance(2) {
                q.sk_flags = 0x80;
            }
        }
        _ => {
            // The inner chain, structurally.
            let body_end = q.plaintext.len().saturating_sub(1);
            let pad = usize::from(q.plaintext.last().copied().unwrap_or(0));
            let chain_end = body_end.saturating_sub(pad);
            let mut pls = split_chain(q.sk_next, &q.plaintext[..chain_end]);
            mutate_chain(rng, &mut pls);
            let mut pt = Vec::new();
            q.sk_next = emit_chain(&pls, 0, &mut pt);
            if rng.chance(8) {
                break_lengths_inner(rng, &mut pt);
            }
            pt.push(0);
            q.plaintext = pt;
        }
    }
    if rng.chance(6) {
        mutate_header(rng, &mut q.head);
    }
    if let Some(id) = msg_id {
        q.head[20..24].copy_from_slice(&id.to_be_bytes());
    }
    let mut out = seal_raw(rng, &q);
    if rng.chance(20) {
        // Past the ICV: the authentication failure paths.
        mutate_bytes(rng, &mut out, 1);
    }
    out
}

fn break_lengths_inner(rng: &mut Rng, pt: &mut [u8]) {
    if pt.len() >= 4 {
        let l = u16::from_be_bytes([pt[2], pt[3]]);
        let v = l.wrapping_add((rng.below(17) as u16).wrapping_sub(8));
        pt[2..4].copy_from_slice(&v.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------
// The campaign.

#[derive(Default)]
struct Stats {
    inputs: u64,
    /// In the calls under test, and in all (mutating, re-building the SA).
    time: Duration,
    wall: Duration,
    max_call: Duration,
    max_alloc: usize,
    outcomes: BTreeMap<String, u64>,
    /// Long-lived targets: the most the SA grew, and requests answered.
    max_growth: usize,
    answered: u64,
}

struct Campaign {
    rng: Rng,
    seed: u64,
    stats: BTreeMap<String, Stats>,
    failures: Vec<String>,
    /// Bytes the last call left allocated (its result included).
    last_kept: isize,
    /// When the last call returned.
    lap: Instant,
}

/// The variant path of a result, for counting outcomes: `Err(Wire(
/// Truncated))`, `Ok[Send,InstallChild]`.
fn outcome<T: std::fmt::Debug, E: std::fmt::Debug>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "Ok".to_string(),
        Err(e) => shorten(&format!("Err({e:?})")),
    }
}

fn actions_outcome(r: &Result<Vec<Action>, IkeError>) -> String {
    match r {
        Ok(a) => {
            let kinds: Vec<String> = a
                .iter()
                .map(|a| match a {
                    Action::Send(_) => "Send".to_string(),
                    Action::InstallChild(_) => "InstallChild".to_string(),
                    Action::ChildFailed(e) => shorten(&format!("ChildFailed({e:?})")),
                    Action::Failed(e) => shorten(&format!("Failed({e:?})")),
                    Action::DeleteChild { .. } => "DeleteChild".to_string(),
                    Action::PeerRestarted => "PeerRestarted".to_string(),
                    Action::IkeRekeyed { .. } => "IkeRekeyed".to_string(),
                    Action::Closed => "Closed".to_string(),
                })
                .collect();
            format!("Ok[{}]", kinds.join(","))
        }
        Err(e) => shorten(&format!("Err({e:?})")),
    }
}

/// Drops numbers that vary per input (payload types in
/// UnsupportedCritical, notify types), keeping the variant structure.
fn shorten(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_num = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_num {
                out.push('N');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Campaign {
    fn new(seed: u64) -> Self {
        Campaign {
            rng: Rng(seed),
            seed,
            stats: BTreeMap::new(),
            failures: Vec::new(),
            last_kept: 0,
            lap: Instant::now(),
        }
    }

    /// Runs one input through `f` under every check; returns its outcome
    /// or `None` when it panicked.
    fn run<R>(
        &mut self,
        target: &str,
        input: &[u8],
        f: impl FnOnce() -> R,
        label: impl FnOnce(&R) -> String,
    ) -> Option<R> {
        // Since the last call: making this input, re-building the SA.
        let between = self.lap.elapsed();
        QUIET.with(|q| q.set(true));
        let (r, d, peak, kept) = measured(|| catch_unwind(AssertUnwindSafe(f)));
        QUIET.with(|q| q.set(false));
        self.lap = Instant::now();
        self.last_kept = kept;
        let st = self.stats.entry(target.to_string()).or_default();
        st.inputs += 1;
        st.time += d;
        st.wall += between + d;
        st.max_call = st.max_call.max(d);
        st.max_alloc = st.max_alloc.max(peak);
        let fail = |why: String| {
            format!(
                "{target}: {why} (seed {:#x}, input #{}): {}",
                self.seed,
                st.inputs,
                hex(input)
            )
        };
        let mut failure = None;
        if d > TIME_BOUND {
            failure = Some(fail(format!("took {d:?}")));
        }
        if peak > ALLOC_BOUND {
            failure = Some(fail(format!("allocated {peak} bytes at once")));
        }
        let out = match r {
            Ok(r) => {
                *st.outcomes.entry(label(&r)).or_default() += 1;
                Some(r)
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                *st.outcomes.entry("PANIC".into()).or_default() += 1;
                failure = Some(fail(format!("panicked: {msg}")));
                None
            }
        };
        if let Some(f) = failure
            && self.failures.len() < 20
        {
            eprintln!("FAILURE {f}");
            self.failures.push(f);
        }
        out
    }

    fn report(&self, total: Duration) {
        println!("IKE fuzz campaign, seed {:#x}", self.seed);
        let mut sum = 0u64;
        let mut outcomes = 0usize;
        for (name, st) in &self.stats {
            println!(
                "  {name}: {} inputs in {:.2} s ({:.0}/s; {:.3} s in the calls, {:.0}/s), max call {:?}, max alloc {} B, {} distinct outcomes",
                st.inputs,
                st.wall.as_secs_f64(),
                st.inputs as f64 / st.wall.as_secs_f64().max(1e-9),
                st.time.as_secs_f64(),
                st.inputs as f64 / st.time.as_secs_f64().max(1e-9),
                st.max_call,
                st.max_alloc,
                st.outcomes.len()
            );
            if st.answered > 0 {
                println!(
                    "      long-lived: {} requests answered, the SA grew by at most {} B",
                    st.answered, st.max_growth
                );
            }
            for (o, n) in &st.outcomes {
                println!("      {n:>9}  {o}");
            }
            sum += st.inputs;
            outcomes += st.outcomes.len();
        }
        println!(
            "  total: {sum} inputs in {:.1} s wall ({:.0} inputs/s), {outcomes} distinct (target, outcome) pairs, {} failures",
            total.as_secs_f64(),
            sum as f64 / total.as_secs_f64().max(1e-9),
            self.failures.len()
        );
    }
}

/// Everything the targets share: the seeds and a protected view of each.
struct Seeds {
    msgs: Vec<(Side, Vec<u8>, String)>,
    protected: Vec<Option<Protected>>,
}

fn seeds() -> Seeds {
    // The whole exchange, every message delivered and accepted.
    let mut lab = Lab::new();
    while lab.advance() {}
    assert!(
        lab.sent.len() >= 12,
        "{:?}",
        lab.sent.iter().map(|m| &m.2).collect::<Vec<_>>()
    );
    // Keys change with the IKE rekey: find each message's key in the lab
    // that produced it.
    let mut protected = Vec::new();
    for (k, (_, msg, what)) in lab.sent.iter().enumerate() {
        let at = Lab::at(k);
        let p = at.key_for(msg).and_then(|m| open_raw(msg, &m));
        assert_eq!(p.is_some(), k >= 2, "message {k}, {what}: opened");
        protected.push(p);
    }
    Seeds {
        msgs: lab.sent,
        protected,
    }
}

/// Wire parsers on their own: the whole-message parser, the chain walker
/// with each payload parser (on plaintexts too), and the SA payload parser.
fn fuzz_parsers(c: &mut Campaign, s: &Seeds, n: u64) {
    let mut sa_bodies = Vec::new();
    let mut chains = Vec::new();
    for (k, (_, m, _)) in s.msgs.iter().enumerate() {
        for p in split_chain(m[16], &m[28..]) {
            if p.ty == pty::SA {
                sa_bodies.push(p.body);
            }
        }
        if let Some(p) = &s.protected[k] {
            let end = p.plaintext.len() - 1 - usize::from(*p.plaintext.last().unwrap_or(&0));
            chains.push((p.sk_next, p.plaintext[..end].to_vec()));
            for q in split_chain(p.sk_next, &p.plaintext[..end]) {
                if q.ty == pty::SA {
                    sa_bodies.push(q.body);
                }
            }
        } else {
            chains.push((m[16], m[28..].to_vec()));
        }
    }
    for _ in 0..n {
        match c.rng.below(3) {
            0 => {
                let seed = &s.msgs[c.rng.below(s.msgs.len())].1;
                let input = mutate_plain(&mut c.rng, seed);
                c.run(
                    "wire::Message::parse",
                    &input,
                    || Message::parse(&input),
                    outcome,
                );
            }
            1 => {
                let (first, bytes) = &chains[c.rng.below(chains.len())];
                let mut pls = split_chain(*first, bytes);
                let mut input = Vec::new();
                let mut first = *first;
                if c.rng.chance(3) {
                    input = bytes.clone();
                    let r = 1 + c.rng.below(4);
                    mutate_bytes(&mut c.rng, &mut input, r);
                } else {
                    mutate_chain(&mut c.rng, &mut pls);
                    first = emit_chain(&pls, 0, &mut input);
                    if c.rng.chance(8) {
                        break_lengths_inner(&mut c.rng, &mut input);
                    }
                }
                c.run(
                    "wire::chain::walk + Payload::parse",
                    &input,
                    || {
                        let raw = chain::walk(first, &input, 0)?;
                        raw.iter()
                            .map(Payload::parse)
                            .collect::<Result<Vec<_>, _>>()
                    },
                    outcome,
                );
            }
            _ => {
                let mut input = sa_bodies[c.rng.below(sa_bodies.len())].clone();
                let r = 1 + c.rng.below(6);
                mutate_bytes(&mut c.rng, &mut input, r);
                c.run(
                    "wire::sa_payload::parse",
                    &input,
                    || sa_payload::parse(&input),
                    outcome,
                );
            }
        }
    }
}

/// The Encrypted payload with the right keys: mutated plaintexts sealed
/// again reach the inner parsers.
fn fuzz_sk(c: &mut Campaign, s: &Seeds, n: u64) {
    let prot: Vec<&Protected> = s.protected.iter().flatten().collect();
    let keys: Vec<(SkKey, &Protected)> = prot
        .iter()
        .map(|p| {
            let encr = if p.material.len() == 20 {
                Encr::AesGcm16_128
            } else {
                Encr::AesGcm16_256
            };
            (SkKey::new(encr, &p.material).expect("key"), *p)
        })
        .collect();
    for _ in 0..n {
        let (key, p) = &keys[c.rng.below(keys.len())];
        let input = mutate_protected(&mut c.rng, p, None);
        c.run("sk::open", &input, || sk::open(&input, key), outcome);
    }
}

/// The state machines: step k's message, mutated, delivered to its
/// receiver in the state that awaits it. A refused message must leave the
/// SA as it was (same status, SPIs and memory); an accepted one moves the
/// SA on, so the lab is rebuilt.
fn fuzz_state(c: &mut Campaign, s: &Seeds, k: usize, n: u64) {
    let (to, seed, what) = s.msgs[k].clone();
    let target = format!("IkeSa::handle, message {k:02}: {what}");
    let mut lab = Lab::at(k);
    let mut fresh = true;
    for _ in 0..n {
        if !fresh {
            lab = Lab::at(k);
            fresh = true;
        }
        let input = match &s.protected[k] {
            Some(p) if !c.rng.chance(10) => mutate_protected(&mut c.rng, p, None),
            _ => mutate_plain(&mut c.rng, &seed),
        };
        let now = lab.now;
        let (sa, rng) = lab.receiver(to);
        let before = (sa.status(), sa.spis());
        let r = c.run(
            &target,
            &input,
            || sa.handle(&input, now, rng),
            actions_outcome,
        );
        let after = (sa.status(), sa.spis());
        let bounded = sa.children().len() <= LIST_BOUND && sa.retiring_spis().len() <= LIST_BOUND;
        match r {
            Some(Err(_)) => {
                // Dropped: nothing changed, nothing kept.
                let kept = c.last_kept;
                if after != before || kept != 0 || !bounded {
                    let f = format!(
                        "{target}: a refused message changed the SA ({before:?} -> {after:?}, {kept} bytes kept, lists bounded: {bounded}) (seed {:#x}): {}",
                        c.seed,
                        hex(&input)
                    );
                    eprintln!("FAILURE {f}");
                    c.failures.push(f);
                }
            }
            Some(Ok(_)) => {
                if !bounded {
                    let f = format!("{target}: lists grew past {LIST_BOUND}: {}", hex(&input));
                    eprintln!("FAILURE {f}");
                    c.failures.push(f);
                }
                fresh = false;
            }
            None => fresh = false,
        }
        if c.failures.len() >= 20 {
            return;
        }
    }
    // The unmutated seed is still accepted: the lab matches the seeds.
    if !fresh {
        lab = Lab::at(k);
    }
    let now = lab.now;
    let (sa, rng) = lab.receiver(to);
    let r = sa.handle(&seed, now, rng);
    let ok = r
        .as_ref()
        .is_ok_and(|a| !a.iter().any(|a| matches!(a, Action::Failed(_))));
    assert!(ok, "{target}: the seed itself was refused: {r:?}");
}

/// Bytes a long-lived SA may hold on top of what it held when established:
/// the last request and response (section 2.1) and a few CHILD SAs.
const GROWTH_BOUND: usize = 256 << 10;

/// One established SA, never rebuilt while it lives, receiving message
/// `k` mutated again and again with the message ID it expects next, so
/// that the mutations are accepted and answered: the memory it holds must
/// stay bounded, and so must its lists.
fn fuzz_long(c: &mut Campaign, s: &Seeds, k: usize, n: u64) {
    let (to, seed, what) = s.msgs[k].clone();
    let Some(p) = s.protected[k].clone() else {
        return;
    };
    let target = format!("IkeSa::handle, long-lived, message {k:02}: {what}");
    let first_id = u32::from_be_bytes([seed[20], seed[21], seed[22], seed[23]]);
    let mut lab = Lab::at(k);
    let mut next_id = first_id;
    let mut baseline = live();
    let mut max_growth = 0usize;
    let mut answered = 0u64;
    for _ in 0..n {
        let input = mutate_protected(&mut c.rng, &p, Some(next_id));
        let now = lab.now;
        let (sa, rng) = lab.receiver(to);
        let r = c.run(
            &target,
            &input,
            || sa.handle(&input, now, rng),
            actions_outcome,
        );
        let sent = matches!(&r, Some(Ok(a)) if a.iter().any(|a| matches!(a, Action::Send(_))));
        let lists = (sa.children().len(), sa.retiring_spis().len());
        let mut over = sa.status() == Status::Closed || r.is_none();
        drop(r);
        if lists.0 > LIST_BOUND || lists.1 > LIST_BOUND {
            let f = format!(
                "{target}: lists grew to {lists:?} (seed {:#x}): {}",
                c.seed,
                hex(&input)
            );
            eprintln!("FAILURE {f}");
            c.failures.push(f);
            over = true;
        }
        if sent {
            next_id = next_id.wrapping_add(1);
            answered += 1;
        }
        if over {
            // Closed (a Delete of the IKE SA got through) or broken:
            // start again.
            lab = Lab::at(k);
            next_id = first_id;
            baseline = live();
            continue;
        }
        let growth = live().saturating_sub(baseline);
        max_growth = max_growth.max(growth);
        if growth > GROWTH_BOUND {
            let f = format!(
                "{target}: the SA holds {growth} more bytes than when established (seed {:#x}): {}",
                c.seed,
                hex(&input)
            );
            eprintln!("FAILURE {f}");
            c.failures.push(f);
            lab = Lab::at(k);
            next_id = first_id;
            baseline = live();
        }
        if c.failures.len() >= 20 {
            return;
        }
    }
    let st = c.stats.entry(target).or_default();
    st.max_growth = st.max_growth.max(max_growth);
    st.answered += answered;
}

fn campaign(inputs: u64, seed: u64) {
    let t = Instant::now();
    let s = seeds();
    let mut c = Campaign::new(seed);
    // Quiet panics inside a fuzzed call: each is caught and reported with
    // its input. Any other panic (the harness's own checks) prints.
    let hook = Arc::new(std::panic::take_hook());
    let inner = Arc::clone(&hook);
    std::panic::set_hook(Box::new(move |info| {
        if !QUIET.with(Cell::get) {
            inner(info);
        }
    }));
    // A third to the parsers, a tenth to SK, a tenth to the long-lived
    // SAs, the rest over the states.
    let parsers = inputs / 3;
    let sk = inputs / 10;
    let long = inputs / 10;
    let states = s.msgs.len();
    let per_state = (inputs - parsers - sk - long) / states as u64;
    // Long-lived: the responder's first CREATE_CHILD_SA and INFORMATIONAL
    // requests, the initiator's INFORMATIONAL request.
    let long_targets: Vec<usize> = [
        "CREATE_CHILD_SA request to R",
        "INFORMATIONAL request to R",
        "INFORMATIONAL request to I",
    ]
    .iter()
    .filter_map(|w| s.msgs.iter().position(|m| m.2 == *w))
    .collect();
    assert_eq!(long_targets.len(), 3, "long-lived seeds");
    fuzz_parsers(&mut c, &s, parsers);
    fuzz_sk(&mut c, &s, sk);
    for k in 0..states {
        fuzz_state(&mut c, &s, k, per_state);
    }
    for &k in &long_targets {
        fuzz_long(&mut c, &s, k, long / long_targets.len() as u64);
    }
    let _ = std::panic::take_hook();
    c.report(t.elapsed());
    let total: u64 = c.stats.values().map(|s| s.inputs).sum();
    assert!(
        total >= inputs - 2 * states as u64,
        "ran {total} of {inputs}"
    );
    assert!(
        c.failures.is_empty(),
        "{} failures (seed {seed:#x}):\n{}",
        c.failures.len(),
        c.failures.join("\n")
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            let v = v.trim();
            v.strip_prefix("0x")
                .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(default)
}

/// The CI-sized campaign: part of `cargo test`.
#[test]
fn ike_fuzz_ci() {
    campaign(50_000, env_u64("ESPTUN_FUZZ_SEED", 0xe5b7_0013));
}

/// The full campaign: `ESPTUN_FUZZ_INPUTS=2000000 cargo test --release
/// --test ike_fuzz -- --ignored --nocapture`.
#[test]
#[ignore = "the full campaign: minutes in release; run with --ignored"]
fn ike_fuzz_full() {
    campaign(
        env_u64("ESPTUN_FUZZ_INPUTS", 1_000_000),
        env_u64("ESPTUN_FUZZ_SEED", 0xe5b7_0013),
    );
}
