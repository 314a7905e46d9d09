//! What leaves the IKE thread with keys in it: CHILD SAs for the key
//! manager, and IKE and CHILD SA keys for a debugger's decryption tables.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use zeroize::Zeroizing;

use super::super::shared::Shared;
use super::PeerIke;
use crate::config::IkePeer;
use crate::crypto::IcvLen;
use crate::ike::crypto::Encr;
use crate::ike::sa::{ChildSa, IkeSa};
use crate::sa::keymgr::{NewInbound, NewOutbound, PeerSas};
use crate::sa::replay::DEFAULT_WINDOW;
use crate::sa::reservation::Fingerprint;
use crate::sa::{InboundSa, InnerAddrs, OutboundSa, SaKeys, hard_limit};

/// A [`PeerSas`] from a CHILD SA. The outbound SA gets its whole sequence
/// space at once, with no durable reservation: a CHILD SA's keys are new
/// (KEYMAT from fresh nonces and, here, a fresh IKE SA: RFC 7296 section
/// 2.17) and die with the process, so no (key, nonce) pair of it can be
/// used again after a restart (RFC 4106 section 2: the nonce must never
/// repeat under one key). Manual keys keep their reservations.
pub(super) fn build_child(
    shared: &Shared,
    peer: &IkePeer,
    child: ChildSa,
    learned: Option<std::net::IpAddr>,
) -> Result<PeerSas, crate::sa::SaError> {
    // Transport mode through a NAT (RFC 3948 section 3.1.2, RFC 7296
    // section 2.23.1): the peer's inner checksums cover the original
    // addresses of the traffic selectors, so inner packets are rebuilt
    // with them. Without a NAT they are the configured inner addresses.
    let inner = InnerAddrs::new(child.original.local, child.original.peer)?;
    // ESP AES-GCM as negotiated: the 16-byte ICV (ENCR_AES_GCM_16, RFC
    // 4106 section 8).
    let icv = IcvLen::Icv16;
    let keys = SaKeys::new(&shared.selector, &child.inbound, icv)?;
    let sa = InboundSa::new(child.inbound_spi, keys, child.esn, inner, DEFAULT_WINDOW)?;
    let inbound = NewInbound {
        sa,
        fp: Fingerprint::new(&child.inbound),
    };
    let keys = SaKeys::new(&shared.selector, &child.outbound, icv)?;
    let mut sa = OutboundSa::new(child.outbound_spi, keys, child.esn, inner)?;
    sa.set_ceiling(hard_limit(child.esn));
    let material = child.outbound;
    // Through a NAT, where the IKE SA last heard the peer (its NAT's
    // mapping, RFC 3948); else the address learned for an `any_source`
    // peer, or the configured endpoint, as for manual
    // keys (raw ESP has no port).
    let endpoint = child.udp_encap.unwrap_or_else(|| {
        SocketAddr::new(
            learned.unwrap_or(peer.endpoint),
            shared.outer.port().unwrap_or(0),
        )
    });
    Ok(PeerSas {
        peer: peer.name.clone(),
        endpoint,
        outbound: Some(NewOutbound {
            sa,
            material,
            key_file: None,
            // Nothing to claim: see above. The outbound thread claims and
            // tops up reservations only for SAs not marked claimed, and its
            // top-up skips an SA whose ceiling is the hard limit.
            claimed: true,
        }),
        inbound: Some(inbound),
    })
}

/// One line of Wireshark's IKEv2 decryption table (the
/// `ikev2_decryption_table` UAT of epan/dissectors/packet-isakmp.c, in
/// the form strongSwan's save-keys plugin writes): SPIi and SPIr as 16
/// hex digits, SK_ei and SK_er in hex, the encryption algorithm's name in
/// quotes, SK_ai and SK_ar in hex, the integrity algorithm's name in
/// quotes. For AES-GCM SK_e* is key || salt (RFC 5282 section 7.1) and
/// there are no integrity keys (section 8): SK_a* are empty and the
/// integrity algorithm is "NONE [RFC4306]".
pub(super) fn wireshark_record(sa: &IkeSa) -> Option<Zeroizing<String>> {
    let keys = sa.keys()?;
    let (spi_i, spi_r) = sa.spis();
    let encr = match keys.encr {
        Encr::AesGcm16_128 => "AES-GCM-128 with 16 octet ICV [RFC5282]",
        Encr::AesGcm16_256 => "AES-GCM-256 with 16 octet ICV [RFC5282]",
    };
    let ei = Zeroizing::new(crate::hex::encode(&keys.sk_ei));
    let er = Zeroizing::new(crate::hex::encode(&keys.sk_er));
    // Built in place, never through a temporary that would keep a copy
    // of the keys.
    let mut line = Zeroizing::new(String::with_capacity(160 + ei.len() + er.len()));
    line.push_str(&format!("{spi_i:016x},{spi_r:016x},"));
    line.push_str(&ei);
    line.push(',');
    line.push_str(&er);
    line.push_str(&format!(",\"{encr}\",,,\"NONE [RFC4306]\""));
    Some(line)
}

/// The Wireshark `esp_sa` records of a CHILD SA whose ESP goes between our
/// outer address `local` and the peer's outer address `peer`: outbound,
/// then inbound. The same formatter as for manual SAs
/// ([`crate::tools::wireshark::esp_sa_record`]), so the two kinds of
/// record cannot drift apart. ESP here is always AES-GCM with a 16-byte
/// ICV (see [`build_child`]).
pub(super) fn esp_sa_records(
    child: &ChildSa,
    local: IpAddr,
    peer: IpAddr,
) -> [Zeroizing<String>; 2] {
    use crate::tools::wireshark::esp_sa_record;
    [
        esp_sa_record(
            local,
            peer,
            child.outbound_spi,
            IcvLen::Icv16,
            &child.outbound,
        ),
        esp_sa_record(
            peer,
            local,
            child.inbound_spi,
            IcvLen::Icv16,
            &child.inbound,
        ),
    ]
}

/// The `esp_sa` records of every CHILD SA the peer's IKE SAs still hold
/// (installed, rekeying, or rekeyed and waiting for its Delete: the
/// peer may still send on a retiring one), oldest first. The addresses
/// are the ones the datapath puts on the wire, as in [`build_child`]:
/// through a NAT (UDP encapsulation), or for an `any_source` peer, where
/// the IKE SA now hears the peer (it follows the peer's NAT mapping);
/// else the configured endpoint.
pub(super) fn peer_esp_sa_records(p: &PeerIke) -> Vec<Zeroizing<String>> {
    let mut out = Vec::new();
    for child in &p.kept {
        let Some(slot) = p.slots.iter().find(|s| {
            s.sa.children()
                .iter()
                .any(|c| c.inbound_spi == child.inbound_spi)
        }) else {
            continue;
        };
        let peer = if child.udp_encap.is_some() || p.cfg.ike.any_source {
            slot.sa
                .route()
                .map(|r| r.to.ip())
                .or(child.udp_encap.map(|a| a.ip()))
                .unwrap_or(p.cfg.endpoint)
        } else {
            p.cfg.endpoint
        };
        out.extend(esp_sa_records(child, outer_source(p.cfg.local, peer), peer));
    }
    out
}

/// Our outer address towards `peer`: the configured `local`, which the
/// IKE SA was set up from and the datapath sends from. A wildcard
/// `local` (0.0.0.0 or ::) leaves the choice to the kernel's route to
/// the peer, so the kernel is asked: a UDP socket connected to the peer
/// (nothing is sent) is bound to the source address that route picks.
/// If that fails the wildcard stays, which Wireshark matches to nothing.
fn outer_source(local: IpAddr, peer: IpAddr) -> IpAddr {
    if !local.is_unspecified() {
        return local;
    }
    UdpSocket::bind(SocketAddr::new(local, 0))
        .and_then(|s| {
            s.connect(SocketAddr::new(peer, 4500))?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(local)
}
