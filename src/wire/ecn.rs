//! DSCP and ECN across the tunnel: the IPv4 TOS / IPv6 traffic class byte
//! (RFC 2474 DSCP in the upper six bits, RFC 3168 ECN in the lower two).
//!
//! In transport mode there is one IP header (RFC 4301 section 5.1.2): the
//! header on the wire is the sender's own, with ESP in front of the
//! transport payload. Kernel transport mode therefore carries DSCP and ECN
//! end to end without doing anything, and so does esptun: the sender puts
//! the inner packet's TOS byte on the outer packet (per packet, in a
//! control message), and the receiver writes the outer packet's TOS byte,
//! as it arrived, into the header it rebuilds.
//!
//! ECN. RFC 6040 section 4.2 says what a decapsulator may deliver for each
//! pair of arriving inner and outer ECN fields; [`decapsulate`] is that
//! table. Its one rule that matters for safety: a CE mark is never put on
//! a packet that was not ECN-capable (inner Not-ECT with outer CE is
//! dropped), because its transport would not react to it. Transport mode
//! is the table's degenerate case: the inner ECN field is not carried at
//! all (ESP holds no inner IP header), so the "inner" is unknowable and the
//! outer one is the packet's own ([`transport_mode`]):
//! - The sender copies the inner field to the outer one, so a Not-ECT
//!   packet leaves as Not-ECT, and a router following RFC 3168 section 5
//!   never marks it CE (it drops instead). A CE that arrives was set on an
//!   ECN-capable packet, or by a non-compliant router, which no receiver
//!   can tell apart.
//! - esptun therefore delivers an arriving CE as CE, as Linux transport
//!   mode does. Dropping every CE packet instead would turn each
//!   congestion mark into a loss and defeat ECN for every peer.
//! - What esptun never does is invent a mark: a datagram whose TOS the
//!   socket did not report is delivered Not-ECT with DSCP 0, and nothing
//!   sets ECT on a Not-ECT packet, so no router on the path can give it CE.

/// The ECN field (RFC 3168 section 5), the low two bits of the TOS byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ecn {
    NotEct,
    /// ECT(1): the L4S identifier (RFC 9331).
    Ect1,
    Ect0,
    Ce,
}

pub const ECN_MASK: u8 = 0x03;

/// DSCP EF, Expedited Forwarding (RFC 3246).
pub const DSCP_EF: u8 = 46;

impl Ecn {
    pub const ALL: [Ecn; 4] = [Ecn::NotEct, Ecn::Ect1, Ecn::Ect0, Ecn::Ce];

    pub fn from_tos(tos: u8) -> Ecn {
        match tos & ECN_MASK {
            0 => Ecn::NotEct,
            1 => Ecn::Ect1,
            2 => Ecn::Ect0,
            _ => Ecn::Ce,
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            Ecn::NotEct => 0,
            Ecn::Ect1 => 1,
            Ecn::Ect0 => 2,
            Ecn::Ce => 3,
        }
    }
}

/// The DSCP of a TOS byte.
pub fn dscp(tos: u8) -> u8 {
    tos >> 2
}

/// A TOS byte from a DSCP and an ECN field.
pub fn tos(dscp: u8, ecn: Ecn) -> u8 {
    (dscp << 2) | ecn.bits()
}

/// RFC 6040 section 4.2, figure 4: the ECN field a decapsulator delivers
/// for the arriving `inner` and `outer` fields; `None` means drop (the
/// table's "(!!!)" cases: a CE on a packet that was not ECN-capable).
/// The table's other marked cells (an ECT outer on a Not-ECT inner, ECT(1)
/// outer on a CE inner, ECT(0) outer on an ECT(1) inner) are combinations
/// no compliant encapsulator makes, delivered as shown (RFC 6040 asks to
/// log them; no caller here sees an inner field, so there is none to log).
pub fn decapsulate(inner: Ecn, outer: Ecn) -> Option<Ecn> {
    match (inner, outer) {
        // Not-ECT inner: the transport does not understand ECN.
        (Ecn::NotEct, Ecn::Ce) => None,
        (Ecn::NotEct, _) => Some(Ecn::NotEct),
        // ECT(1) outer on an ECT(0) inner: the outer ECT(1) is passed on.
        (Ecn::Ect0, Ecn::Ect1) => Some(Ecn::Ect1),
        // Congestion experienced on the path is passed on.
        (_, Ecn::Ce) => Some(Ecn::Ce),
        // Otherwise the inner is delivered unchanged.
        (inner, _) => Some(inner),
    }
}

/// The TOS byte for the header esptun rebuilds from a transport-mode
/// packet whose outer TOS byte was `outer` (0, Not-ECT, when the socket
/// did not report it). DSCP is the outer's; ECN is [`decapsulate`] with the inner
/// field taken to be what the sender put on the outer packet (the inner is
/// not carried; see the module notes for why an arriving CE is kept).
pub fn transport_mode(outer: u8) -> u8 {
    let outer_ecn = Ecn::from_tos(outer);
    // The sender's inner field was copied to the outer one; a router can
    // only have changed ECT into CE (RFC 3168 section 5), so the original
    // was ECN-capable whenever a compliant path delivers CE.
    let inner_as_sent = match outer_ecn {
        Ecn::Ce => Ecn::Ect0,
        other => other,
    };
    let ecn = decapsulate(inner_as_sent, outer_ecn).unwrap_or(Ecn::NotEct);
    tos(dscp(outer), ecn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6040_decapsulation_table() {
        use Ecn::*;
        // RFC 6040 section 4.2, figure 4: rows are the arriving inner
        // field, columns the arriving outer field (Not-ECT, ECT(0),
        // ECT(1), CE); None is drop.
        let table: [(Ecn, [Option<Ecn>; 4]); 4] = [
            (NotEct, [Some(NotEct), Some(NotEct), Some(NotEct), None]),
            (Ect0, [Some(Ect0), Some(Ect0), Some(Ect1), Some(Ce)]),
            (Ect1, [Some(Ect1), Some(Ect1), Some(Ect1), Some(Ce)]),
            (Ce, [Some(Ce), Some(Ce), Some(Ce), Some(Ce)]),
        ];
        for (inner, row) in table {
            for (outer, want) in [NotEct, Ect0, Ect1, Ce].into_iter().zip(row) {
                assert_eq!(decapsulate(inner, outer), want, "{inner:?}/{outer:?}");
            }
        }
        // The rule that matters: no CE is ever delivered on a packet
        // that was not ECN-capable.
        for outer in Ecn::ALL {
            assert_ne!(decapsulate(NotEct, outer), Some(Ce), "{outer:?}");
        }
    }

    #[test]
    fn transport_mode_keeps_dscp_and_ecn_and_never_invents_a_mark() {
        for d in [0, 8, 10, DSCP_EF, 63] {
            for ecn in Ecn::ALL {
                let t = tos(d, ecn);
                assert_eq!(transport_mode(t), t, "dscp {d} {ecn:?}");
                assert_eq!((dscp(t), Ecn::from_tos(t)), (d, ecn));
            }
        }
        // EF + ECT(0), and EF + CE (a mark set on the path).
        assert_eq!(transport_mode(0xBA), 0xBA);
        assert_eq!(transport_mode(0xBB), 0xBB);
        // A Not-ECT packet stays Not-ECT whatever its DSCP.
        for t in (0..=255u8).filter(|t| t & ECN_MASK == 0) {
            assert_eq!(Ecn::from_tos(transport_mode(t)), Ecn::NotEct);
        }
    }
}
