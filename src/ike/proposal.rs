//! What we offer and what we accept (RFC 7296 sections 2.7, 3.3).
//!
//! We offer one proposal per protocol holding every algorithm we allow
//! (section 3.3: several transforms of one type in a proposal are
//! alternatives); a rekey puts before it one proposal of exactly the
//! algorithms the SA being rekeyed uses. As responder we choose, in the
//! first of the peer's proposals that we can accept, one transform of
//! each type by our own order of preference. The peer's choice is then checked against our
//! offer: one transform of each type, each one we offered.

use super::crypto::{DhGroup, Encr, Prf};
use super::wire::consts::{protocol, transform as t};
use super::wire::sa_payload::{Proposal, Transform};

/// The IKE SA algorithms we allow, most preferred first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IkeAlgorithms {
    pub encr: Vec<Encr>,
    pub prf: Vec<Prf>,
    pub dh: Vec<DhGroup>,
}

impl Default for IkeAlgorithms {
    fn default() -> Self {
        IkeAlgorithms {
            encr: vec![Encr::AesGcm16_256, Encr::AesGcm16_128],
            prf: vec![Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512],
            dh: vec![DhGroup::Curve25519, DhGroup::Ecp256],
        }
    }
}

/// The ESP (CHILD SA) algorithms we allow, most preferred first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspAlgorithms {
    pub encr: Vec<Encr>,
    /// Extended sequence numbers (RFC 4303 section 2.2.1), in order.
    pub esn: Vec<bool>,
}

impl Default for EspAlgorithms {
    fn default() -> Self {
        EspAlgorithms {
            encr: vec![Encr::AesGcm16_256, Encr::AesGcm16_128],
            esn: vec![true, false],
        }
    }
}

/// The negotiated IKE SA algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IkeSuite {
    pub encr: Encr,
    pub prf: Prf,
    pub dh: DhGroup,
}

/// The negotiated ESP algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EspSuite {
    pub encr: Encr,
    pub esn: bool,
}

fn encr_transform(e: Encr) -> Transform {
    Transform::new(t::ENCR, t::ENCR_AES_GCM_16, Some(e.key_bits()))
}

fn esn_id(esn: bool) -> u16 {
    if esn { t::ESN_YES } else { t::ESN_NO }
}

impl IkeAlgorithms {
    /// Our IKE proposal for IKE_SA_INIT (no SPI: section 3.3.1).
    pub fn offer(&self) -> Proposal {
        let mut transforms: Vec<Transform> = self.encr.iter().map(|&e| encr_transform(e)).collect();
        transforms.extend(
            self.prf
                .iter()
                .map(|p| Transform::new(t::PRF, p.id(), None)),
        );
        transforms.extend(self.dh.iter().map(|d| Transform::new(t::DH, d.id(), None)));
        Proposal {
            num: 1,
            protocol: protocol::IKE,
            spi: Vec::new(),
            transforms,
        }
    }

    /// As responder: the first of the peer's proposals we can accept,
    /// with the suite we pick from it. `ke_group` is the group of the
    /// peer's KE payload: if the chosen proposal allows it and so do we,
    /// we take it, sparing a round trip (section 1.3).
    pub fn choose(&self, offers: &[Proposal], ke_group: u16) -> Option<(u8, IkeSuite)> {
        offers
            .iter()
            .filter(|p| p.protocol == protocol::IKE)
            .find_map(|p| {
                if !acceptable_types(p, &[t::ENCR, t::PRF, t::INTEG, t::DH]) || !no_integrity(p) {
                    return None;
                }
                let encr = pick(&self.encr, p, |&e| encr_transform(e))?;
                let prf = pick(&self.prf, p, |x| Transform::new(t::PRF, x.id(), None))?;
                let dh = DhGroup::from_id(ke_group)
                    .filter(|g| self.dh.contains(g) && offers_transform(p, t::DH, g.id()))
                    .or_else(|| pick(&self.dh, p, |x| Transform::new(t::DH, x.id(), None)))?;
                Some((p.num, IkeSuite { encr, prf, dh }))
            })
    }

    /// As initiator: the responder's answer, which must be one proposal
    /// holding exactly one ENCR, PRF and DH, each from our offer.
    pub fn accept(&self, answer: &[Proposal]) -> Option<IkeSuite> {
        let [p] = answer else { return None };
        if p.protocol != protocol::IKE || !p.spi.is_empty() {
            return None;
        }
        if !acceptable_types(p, &[t::ENCR, t::PRF, t::INTEG, t::DH]) || !no_integrity(p) {
            return None;
        }
        let encr = exactly_one(&self.encr, p, t::ENCR, |&e| encr_transform(e))?;
        let prf = exactly_one(&self.prf, p, t::PRF, |x| {
            Transform::new(t::PRF, x.id(), None)
        })?;
        let dh = exactly_one(&self.dh, p, t::DH, |x| Transform::new(t::DH, x.id(), None))?;
        Some(IkeSuite { encr, prf, dh })
    }
}

impl EspAlgorithms {
    /// Our ESP proposal with our inbound SPI (section 3.3.1: the SPI a
    /// proposal carries is the sender's inbound SPI).
    pub fn offer(&self, spi: u32) -> Proposal {
        let mut transforms: Vec<Transform> = self.encr.iter().map(|&e| encr_transform(e)).collect();
        transforms.extend(
            self.esn
                .iter()
                .map(|&e| Transform::new(t::ESN, esn_id(e), None)),
        );
        Proposal {
            num: 1,
            protocol: protocol::ESP,
            spi: spi.to_be_bytes().to_vec(),
            transforms,
        }
    }

    /// As responder: the first acceptable ESP proposal, its number, the
    /// peer's SPI and our suite. DH transforms are ignored: IKE_AUTH has
    /// no KE payload, so its CHILD SA uses none (section 1.2).
    pub fn choose(&self, offers: &[Proposal]) -> Option<(u8, u32, EspSuite)> {
        offers
            .iter()
            .filter(|p| p.protocol == protocol::ESP)
            .find_map(|p| {
                let spi = esp_spi(p)?;
                if !acceptable_types(p, &[t::ENCR, t::INTEG, t::DH, t::ESN]) || !no_integrity(p) {
                    return None;
                }
                let encr = pick(&self.encr, p, |&e| encr_transform(e))?;
                let esn = pick(&self.esn, p, |&e| Transform::new(t::ESN, esn_id(e), None))?;
                Some((p.num, spi, EspSuite { encr, esn }))
            })
    }

    /// As initiator: the responder's single ESP proposal, its SPI and the
    /// suite, which must be from our offer.
    pub fn accept(&self, answer: &[Proposal]) -> Option<(u32, EspSuite)> {
        let [p] = answer else { return None };
        if p.protocol != protocol::ESP {
            return None;
        }
        let spi = esp_spi(p)?;
        if !acceptable_types(p, &[t::ENCR, t::INTEG, t::ESN]) || !no_integrity(p) {
            return None;
        }
        let encr = exactly_one(&self.encr, p, t::ENCR, |&e| encr_transform(e))?;
        let esn = exactly_one(&self.esn, p, t::ESN, |&e| {
            Transform::new(t::ESN, esn_id(e), None)
        })?;
        Some((spi, EspSuite { encr, esn }))
    }

    /// The reply proposal for `suite`, numbered like the accepted offer.
    pub fn answer(num: u8, spi: u32, suite: EspSuite) -> Proposal {
        Proposal {
            num,
            protocol: protocol::ESP,
            spi: spi.to_be_bytes().to_vec(),
            transforms: vec![
                encr_transform(suite.encr),
                Transform::new(t::ESN, esn_id(suite.esn), None),
            ],
        }
    }
}

/// CREATE_CHILD_SA (RFC 7296 sections 1.3.1, 1.3.2): an ESP proposal may
/// carry DH transforms (PFS), and IKE proposals carry the sender's new
/// 8-byte SPI.
impl EspAlgorithms {
    /// Our ESP offer with the PFS groups `dh` (most preferred first; the
    /// KE payload uses the first).
    pub fn offer_pfs(&self, spi: u32, dh: &[DhGroup]) -> Proposal {
        let mut p = self.offer(spi);
        p.transforms
            .extend(dh.iter().map(|d| Transform::new(t::DH, d.id(), None)));
        p
    }

    /// As responder to CREATE_CHILD_SA: the first acceptable proposal,
    /// and the DH group, which must be the KE payload's (`ke_group`) when
    /// the proposal has DH transforms. `pfs` are the groups we accept, by
    /// preference; with `required` a proposal without DH is refused.
    /// `Err(Some(g))` asks for group `g` (INVALID_KE_PAYLOAD, section
    /// 1.3), `Err(None)` is no proposal.
    #[allow(clippy::type_complexity)]
    pub fn choose_pfs(
        &self,
        offers: &[Proposal],
        pfs: &[DhGroup],
        required: bool,
        ke_group: Option<u16>,
    ) -> Result<(u8, u32, EspSuite, Option<DhGroup>), Option<DhGroup>> {
        let mut wanted = None;
        for p in offers.iter().filter(|p| p.protocol == protocol::ESP) {
            let Some((num, spi, suite)) = self.choose(std::slice::from_ref(p)) else {
                continue;
            };
            let offered: Vec<u16> = p
                .transforms
                .iter()
                .filter(|x| x.ty == t::DH && x.id != 0)
                .map(|x| x.id)
                .collect();
            if offered.is_empty() {
                if !required && ke_group.is_none() {
                    return Ok((num, spi, suite, None));
                }
                continue;
            }
            let Some(g) = pfs.iter().copied().find(|g| offered.contains(&g.id())) else {
                continue;
            };
            let ke = ke_group
                .and_then(DhGroup::from_id)
                .filter(|k| offered.contains(&k.id()) && pfs.contains(k));
            match ke {
                Some(k) => return Ok((num, spi, suite, Some(k))),
                None => wanted = wanted.or(Some(g)),
            }
        }
        Err(wanted)
    }

    /// As initiator: the answer to [`EspAlgorithms::offer_pfs`], which
    /// must name exactly the group `dh` we sent a KE for (or none).
    pub fn accept_pfs(&self, answer: &[Proposal], dh: Option<DhGroup>) -> Option<(u32, EspSuite)> {
        let [p] = answer else { return None };
        let mut plain = p.clone();
        let groups: Vec<u16> = plain
            .transforms
            .iter()
            .filter(|x| x.ty == t::DH)
            .map(|x| x.id)
            .collect();
        plain.transforms.retain(|x| x.ty != t::DH);
        let ok = match dh {
            Some(g) => groups == [g.id()],
            None => groups.is_empty() || groups == [0],
        };
        ok.then(|| self.accept(&[plain])).flatten()
    }

    /// The reply proposal with the chosen PFS group.
    pub fn answer_pfs(num: u8, spi: u32, suite: EspSuite, dh: Option<DhGroup>) -> Proposal {
        let mut p = Self::answer(num, spi, suite);
        if let Some(g) = dh {
            p.transforms.push(Transform::new(t::DH, g.id(), None));
        }
        p
    }

    /// The offer of a CHILD SA rekey (sections 1.3.3, 2.8): first a
    /// proposal of exactly what the SA being rekeyed uses (`current`: its
    /// ENCR with key size and its ESN choice) with `ke`, the group of our
    /// KE payload, if any; then [`EspAlgorithms::offer_pfs`] with the
    /// groups `pfs`, unless it would say the same again. A responder that
    /// takes the first acceptable proposal keeps the suite, and one whose
    /// configuration allows only that suite finds it first (charon puts
    /// the current proposal first too). A suite we no longer allow, or a
    /// KE group outside `pfs`, is not offered again.
    pub fn offer_rekey(
        &self,
        spi: u32,
        current: EspSuite,
        ke: Option<DhGroup>,
        pfs: &[DhGroup],
    ) -> Vec<Proposal> {
        let mut all = self.offer_pfs(spi, pfs);
        let allowed = self.encr.contains(&current.encr)
            && self.esn.contains(&current.esn)
            && ke.map_or(pfs.is_empty(), |g| pfs.contains(&g));
        if !allowed {
            return vec![all];
        }
        let first = Self::answer_pfs(1, spi, current, ke);
        if same_transforms(&first, &all) {
            return vec![first];
        }
        all.num = 2;
        vec![first, all]
    }
}

impl IkeAlgorithms {
    /// Section 2.18: the IKE SA rekey offer carries our new SPI.
    pub fn offer_rekey(&self, spi: u64) -> Proposal {
        let mut p = self.offer();
        p.spi = spi.to_be_bytes().to_vec();
        p
    }

    /// As responder to an IKE SA rekey: the proposal number, the peer's
    /// new SPI and the suite.
    pub fn choose_rekey(&self, offers: &[Proposal], ke_group: u16) -> Option<(u8, u64, IkeSuite)> {
        let (num, suite) = self.choose(offers, ke_group)?;
        let p = offers
            .iter()
            .find(|p| p.num == num && p.protocol == protocol::IKE)?;
        let spi = u64::from_be_bytes(p.spi.as_slice().try_into().ok()?);
        (spi != 0).then_some((num, spi, suite))
    }

    /// The offer of an IKE SA rekey (sections 1.3.2, 2.18): first a
    /// proposal of exactly `current`, the rekeyed SA's ENCR and PRF with
    /// the group of our KE payload, then [`IkeAlgorithms::offer_rekey`]
    /// unless it would say the same again (see
    /// [`EspAlgorithms::offer_rekey`] for why). A suite we do not allow is
    /// not offered again.
    pub fn offer_rekey_keeping(&self, spi: u64, current: IkeSuite) -> Vec<Proposal> {
        let mut all = self.offer_rekey(spi);
        let allowed = self.encr.contains(&current.encr)
            && self.prf.contains(&current.prf)
            && self.dh.contains(&current.dh);
        if !allowed {
            return vec![all];
        }
        let first = current.answer_rekey(1, spi);
        if same_transforms(&first, &all) {
            return vec![first];
        }
        all.num = 2;
        vec![first, all]
    }

    /// As initiator of an IKE SA rekey: the answer and the responder's new SPI.
    pub fn accept_rekey(&self, answer: &[Proposal]) -> Option<(u64, IkeSuite)> {
        let [p] = answer else { return None };
        let spi = u64::from_be_bytes(p.spi.as_slice().try_into().ok()?);
        let mut plain = p.clone();
        plain.spi.clear();
        let suite = self.accept(&[plain])?;
        (spi != 0).then_some((spi, suite))
    }
}

impl IkeSuite {
    /// The rekey answer: [`IkeSuite::answer`] with our new SPI.
    pub fn answer_rekey(self, num: u8, spi: u64) -> Proposal {
        let mut p = self.answer(num);
        p.spi = spi.to_be_bytes().to_vec();
        p
    }
}

impl IkeSuite {
    /// The reply proposal for this suite, numbered like the accepted offer.
    pub fn answer(self, num: u8) -> Proposal {
        Proposal {
            num,
            protocol: protocol::IKE,
            spi: Vec::new(),
            transforms: vec![
                encr_transform(self.encr),
                Transform::new(t::PRF, self.prf.id(), None),
                Transform::new(t::DH, self.dh.id(), None),
            ],
        }
    }
}

/// ESP SPIs are 4 bytes; 0 to 255 are reserved (RFC 4303 section 2.1).
fn esp_spi(p: &Proposal) -> Option<u32> {
    let spi = u32::from_be_bytes(p.spi.as_slice().try_into().ok()?);
    (spi > 255).then_some(spi)
}

/// Section 3.3.6: a proposal with a transform type we do not know is
/// unacceptable as a whole.
fn acceptable_types(p: &Proposal, known: &[u8]) -> bool {
    p.transforms.iter().all(|x| known.contains(&x.ty))
}

/// RFC 5282 section 8: with a combined-mode cipher the only integrity
/// transform allowed is NONE (0), and it may be left out.
fn no_integrity(p: &Proposal) -> bool {
    let integ: Vec<_> = p.transforms.iter().filter(|x| x.ty == t::INTEG).collect();
    integ.is_empty() || integ.iter().any(|x| x.id == 0)
}

/// Whether two proposals hold the same transforms, in any order.
fn same_transforms(a: &Proposal, b: &Proposal) -> bool {
    a.transforms.len() == b.transforms.len()
        && a.transforms.iter().all(|x| b.transforms.contains(x))
}

fn offers_transform(p: &Proposal, ty: u8, id: u16) -> bool {
    p.transforms
        .iter()
        .any(|x| x.ty == ty && x.id == id && !x.unknown_attributes)
}

/// Our most preferred algorithm that the proposal offers.
fn pick<A: Copy>(ours: &[A], p: &Proposal, as_transform: impl Fn(&A) -> Transform) -> Option<A> {
    ours.iter()
        .copied()
        .find(|a| p.transforms.contains(&as_transform(a)))
}

/// The single transform of type `ty` in an answer, if it is one of ours.
fn exactly_one<A: Copy>(
    ours: &[A],
    p: &Proposal,
    ty: u8,
    as_transform: impl Fn(&A) -> Transform,
) -> Option<A> {
    let mut of_type = p.transforms.iter().filter(|x| x.ty == ty);
    let (Some(only), None) = (of_type.next(), of_type.next()) else {
        return None;
    };
    ours.iter().copied().find(|a| as_transform(a) == *only)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responder_takes_our_preference_and_the_offered_ke_group() {
        let ours = IkeAlgorithms::default();
        let offer = vec![ours.offer()];
        let (num, s) = ours.choose(&offer, t::DH_ECP_256).expect("choose");
        assert_eq!(num, 1);
        assert_eq!(s.encr, Encr::AesGcm16_256);
        assert_eq!(s.prf, Prf::HmacSha256);
        assert_eq!(s.dh, DhGroup::Ecp256, "KE's group, since both allow it");
        let (_, s) = ours.choose(&offer, 14).expect("choose");
        assert_eq!(
            s.dh,
            DhGroup::Curve25519,
            "our preference: INVALID_KE follows"
        );
        assert_eq!(ours.accept(&[s.answer(1)]), Some(s));
    }

    #[test]
    fn unacceptable_proposals() {
        let ours = IkeAlgorithms::default();
        let mut p = ours.offer();
        p.transforms.push(Transform::new(9, 1, None));
        assert_eq!(ours.choose(&[p], 31), None, "unknown transform type");
        let mut p = ours.offer();
        p.transforms.push(Transform::new(t::INTEG, 12, None));
        assert_eq!(ours.choose(&[p.clone()], 31), None, "integrity with AEAD");
        p.transforms.push(Transform::new(t::INTEG, 0, None));
        assert!(ours.choose(&[p], 31).is_some(), "INTEG NONE is fine");
        let mut p = ours.offer();
        p.transforms.retain(|x| x.ty != t::PRF);
        assert_eq!(ours.choose(&[p], 31), None, "no PRF");
        let mut p = ours.offer();
        for x in &mut p.transforms {
            if x.ty == t::ENCR {
                x.unknown_attributes = true;
            }
        }
        assert_eq!(ours.choose(&[p], 31), None, "ENCR with unknown attributes");
        // A second, acceptable proposal is taken.
        let mut bad = ours.offer();
        bad.transforms.retain(|x| x.ty != t::DH);
        let mut good = ours.offer();
        good.num = 2;
        assert_eq!(ours.choose(&[bad, good], 31).map(|c| c.0), Some(2));
    }

    #[test]
    fn initiator_checks_the_answer() {
        let ours = IkeAlgorithms::default();
        let s = IkeSuite {
            encr: Encr::AesGcm16_128,
            prf: Prf::HmacSha512,
            dh: DhGroup::Ecp256,
        };
        assert_eq!(ours.accept(&[s.answer(1)]), Some(s));
        assert_eq!(ours.accept(&[ours.offer()]), None, "several of a type");
        assert_eq!(ours.accept(&[s.answer(1), s.answer(2)]), None);
        let narrow = IkeAlgorithms {
            dh: vec![DhGroup::Curve25519],
            ..IkeAlgorithms::default()
        };
        assert_eq!(narrow.accept(&[s.answer(1)]), None, "not offered");
    }

    #[test]
    fn esp_choice_and_spi() {
        let ours = EspAlgorithms::default();
        let (num, spi, s) = ours.choose(&[ours.offer(0x1234)]).expect("choose");
        assert_eq!((num, spi), (1, 0x1234));
        assert_eq!(
            s,
            EspSuite {
                encr: Encr::AesGcm16_256,
                esn: true
            }
        );
        assert_eq!(
            ours.accept(&[EspAlgorithms::answer(1, 0x999, s)]),
            Some((0x999, s))
        );
        assert_eq!(ours.choose(&[ours.offer(7)]), None, "reserved SPI");
        let no_esn = EspAlgorithms {
            esn: vec![false],
            ..EspAlgorithms::default()
        };
        let (_, _, s) = no_esn.choose(&[ours.offer(0x1234)]).expect("choose");
        assert!(!s.esn);
        let only_esn = EspAlgorithms {
            esn: vec![true],
            ..EspAlgorithms::default()
        };
        assert_eq!(only_esn.choose(&[no_esn.offer(0x1234)]), None);
    }

    #[test]
    fn pfs_choice_and_answer() {
        let ours = EspAlgorithms::default();
        let x = DhGroup::Curve25519;
        let p = DhGroup::Ecp256;
        let offer = [ours.offer_pfs(0x1234, &[x, p])];
        let ke = Some(p.id());
        let (num, spi, s, g) = ours.choose_pfs(&offer, &[x, p], true, ke).expect("choose");
        assert_eq!((num, spi, g), (1, 0x1234, Some(p)), "the KE's group");
        let answer = [EspAlgorithms::answer_pfs(num, 0x999, s, g)];
        assert_eq!(ours.accept_pfs(&answer, Some(p)), Some((0x999, s)));
        assert_eq!(
            ours.accept_pfs(&answer, Some(x)),
            None,
            "not the group we sent"
        );
        assert_eq!(
            ours.accept_pfs(&answer, None),
            None,
            "PFS we did not ask for"
        );
        // A KE of a group we do not take: ask for ours.
        assert_eq!(ours.choose_pfs(&offer, &[x], true, ke), Err(Some(x)));
        // No DH offered: fine unless required.
        let plain = [ours.offer(0x1234)];
        assert!(ours.choose_pfs(&plain, &[x], false, None).is_ok());
        assert_eq!(ours.choose_pfs(&plain, &[x], true, None), Err(None));
        let answer = [EspAlgorithms::answer(1, 0x999, s)];
        assert_eq!(ours.accept_pfs(&answer, None), Some((0x999, s)));
    }

    #[test]
    fn ike_rekey_proposals_carry_spis() {
        let ours = IkeAlgorithms::default();
        let offer = [ours.offer_rekey(0xabc)];
        let (num, spi, suite) = ours.choose_rekey(&offer, 31).expect("choose");
        assert_eq!((num, spi), (1, 0xabc));
        assert_eq!(
            ours.accept_rekey(&[suite.answer_rekey(num, 0xdef)]),
            Some((0xdef, suite))
        );
        assert_eq!(ours.accept_rekey(&[suite.answer(num)]), None, "no SPI");
        assert_eq!(ours.choose_rekey(&[ours.offer()], 31), None, "no SPI");
        assert_eq!(
            ours.accept(&[suite.answer_rekey(num, 1)]),
            None,
            "IKE_SA_INIT takes none"
        );
    }

    #[test]
    fn rekey_offers_put_the_current_suite_first() {
        let ours = EspAlgorithms::default();
        let (x, p) = (DhGroup::Curve25519, DhGroup::Ecp256);
        let current = EspSuite {
            encr: Encr::AesGcm16_128,
            esn: false,
        };
        let offer = ours.offer_rekey(0x1234, current, Some(p), &[x, p]);
        assert_eq!(offer.len(), 2);
        assert_eq!(
            offer[0],
            EspAlgorithms::answer_pfs(1, 0x1234, current, Some(p))
        );
        let mut all = ours.offer_pfs(0x1234, &[x, p]);
        all.num = 2;
        assert_eq!(offer[1], all);
        // A responder preferring AES-256 with ESN still keeps the suite:
        // the first proposal it can accept.
        let chosen = ours.choose_pfs(&offer, &[x, p], true, Some(p.id()));
        assert_eq!(chosen, Ok((1, 0x1234, current, Some(p))));
        // Nothing more to say: one proposal.
        let narrow = EspAlgorithms {
            encr: vec![Encr::AesGcm16_128],
            esn: vec![false],
        };
        assert_eq!(narrow.offer_rekey(0x1234, current, None, &[]).len(), 1);
        // A suite or group we no longer allow is not offered.
        let other = EspAlgorithms {
            encr: vec![Encr::AesGcm16_256],
            ..EspAlgorithms::default()
        };
        let offer = other.offer_rekey(0x1234, current, Some(p), &[x, p]);
        assert_eq!(offer, vec![other.offer_pfs(0x1234, &[x, p])]);
        let offer = ours.offer_rekey(0x1234, current, Some(p), &[x]);
        assert_eq!(offer, vec![ours.offer_pfs(0x1234, &[x])]);

        let ours = IkeAlgorithms::default();
        let current = IkeSuite {
            encr: Encr::AesGcm16_128,
            prf: Prf::HmacSha512,
            dh: p,
        };
        let offer = ours.offer_rekey_keeping(0xabc, current);
        assert_eq!(offer.len(), 2);
        assert_eq!(offer[0], current.answer_rekey(1, 0xabc));
        assert_eq!(offer[1].num, 2);
        assert_eq!(ours.choose_rekey(&offer, p.id()), Some((1, 0xabc, current)));
        let narrow = IkeAlgorithms {
            encr: vec![Encr::AesGcm16_128],
            prf: vec![Prf::HmacSha512],
            dh: vec![p],
        };
        assert_eq!(narrow.offer_rekey_keeping(0xabc, current).len(), 1);
        let other = IkeAlgorithms {
            prf: vec![Prf::HmacSha256],
            ..IkeAlgorithms::default()
        };
        assert_eq!(
            other.offer_rekey_keeping(0xabc, current),
            vec![other.offer_rekey(0xabc)]
        );
    }
}
