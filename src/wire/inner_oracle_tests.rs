//! `validate` against an independent implementation: etherparse (a
//! dev-dependency) builds IPv4 packets with options and IPv6 packets with
//! extension-header chains, computing their checksums itself; esptun must
//! verify exactly those it can carry, refuse hop-by-hop and routing headers
//! by name, and catch any corrupted byte.

use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader,
    PacketBuilder,
};
use proptest::prelude::*;

use super::{InnerError, InnerPolicy, InnerVerdict, validate};
use crate::wire::ip::protocol;

/// The headers in front of the transport header of a generated packet.
#[derive(Debug, Clone)]
enum Shape {
    /// IPv4 with this many 4-byte words of options (no-op options).
    V4 { option_words: usize },
    /// IPv6 with optional hop-by-hop, destination options (before the
    /// routing header) and routing headers; each `Some(n)` is a header of
    /// `8 * (n + 1)` bytes.
    V6 {
        hop_by_hop: Option<u8>,
        dest_opts: Option<u8>,
        routing: Option<u8>,
    },
}

fn shape() -> impl Strategy<Value = Shape> {
    let ext = || proptest::option::of(0u8..4);
    prop_oneof![
        (0usize..=10).prop_map(|option_words| Shape::V4 { option_words }),
        (ext(), ext(), ext()).prop_map(|(hop_by_hop, dest_opts, routing)| Shape::V6 {
            hop_by_hop,
            dest_opts,
            routing,
        }),
    ]
}

/// A raw extension header of `8 * (units + 1)` bytes whose options are
/// PadN (RFC 8200 section 4.2), so it is well-formed for any reader.
fn raw_ext(units: u8) -> Ipv6RawExtHeader {
    let len = 8 * (usize::from(units) + 1) - 2;
    let mut body = vec![0u8; len];
    body[0] = 1; // PadN
    body[1] = (len - 2) as u8;
    // The next-header field is filled in by the builder.
    Ipv6RawExtHeader::new_raw(IpNumber::UDP, &body).expect("aligned length")
}

/// Builds the packet with etherparse; `tcp` chooses the transport.
fn build(shape: &Shape, tcp: bool, payload: &[u8]) -> Vec<u8> {
    let ip = match shape {
        Shape::V4 { option_words } => {
            let mut h = Ipv4Header::new(0, 64, IpNumber::UDP, [198, 18, 0, 1], [198, 18, 0, 2])
                .expect("header");
            let options = vec![1u8; option_words * 4]; // NOP
            h.options = Ipv4Options::try_from(&options[..]).expect("options");
            IpHeaders::Ipv4(h, Default::default())
        }
        Shape::V6 {
            hop_by_hop,
            dest_opts,
            routing,
        } => {
            let h = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: 0,
                next_header: IpNumber::UDP,
                hop_limit: 64,
                source: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                destination: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            };
            let exts = Ipv6Extensions {
                hop_by_hop_options: hop_by_hop.map(raw_ext),
                destination_options: dest_opts.map(raw_ext),
                routing: routing.map(|n| etherparse::Ipv6RoutingExtensions {
                    routing: raw_ext(n),
                    final_destination_options: None,
                }),
                fragment: None,
                auth: None,
            };
            IpHeaders::Ipv6(h, exts)
        }
    };
    let builder = PacketBuilder::ip(ip);
    let mut out = Vec::new();
    if tcp {
        builder
            .tcp(40000, 443, 0x1234_5678, 1000)
            .ack(7)
            .write(&mut out, payload)
            .expect("write");
    } else {
        builder
            .udp(40000, 53)
            .write(&mut out, payload)
            .expect("write");
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever etherparse builds, esptun verifies or refuses by name, and
    /// agrees with etherparse on the header length and the first protocol.
    #[test]
    fn what_etherparse_builds_esptun_verifies_or_refuses_by_name(
        shape in shape(),
        tcp in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..1500),
        flip in any::<(usize, u8)>(),
    ) {
        let packet = build(&shape, tcp, &payload);
        let policy = InnerPolicy::default();
        // The first of them is refused by its own name (etherparse puts
        // hop-by-hop first, RFC 8200 section 4.1).
        let refused = match shape {
            Shape::V6 { hop_by_hop: Some(_), .. } => Some(InnerError::HopByHop),
            Shape::V6 { routing: Some(_), .. } => Some(InnerError::RoutingHeader),
            _ => None,
        };
        let result = validate(&packet, policy);
        if let Some(refused) = refused {
            prop_assert_eq!(result, Err(refused));
            return Ok(());
        }
        let v = result.map_err(|e| TestCaseError::fail(format!("{e}: {packet:02x?}")))?;
        prop_assert_eq!(v.verdict, InnerVerdict::Verified);
        prop_assert_eq!(v.total_len, packet.len());
        let parsed = etherparse::SlicedPacket::from_ip(&packet)
            .map_err(|e| TestCaseError::fail(format!("etherparse: {e}")))?;
        let transport_start = match parsed.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => {
                prop_assert_eq!(v.header_len, ip.header().slice().len());
                prop_assert_eq!(v.protocol, ip.header().protocol().0);
                v.header_len
            }
            Some(etherparse::NetSlice::Ipv6(ip)) => {
                prop_assert_eq!(v.header_len, 40);
                prop_assert_eq!(v.protocol, ip.header().next_header().0);
                // Destination options are carried: the chain esptun
                // walked ends where etherparse's does.
                let want = if tcp { protocol::TCP } else { protocol::UDP };
                prop_assert_eq!(ip.payload().ip_number.0, want);
                packet.len() - ip.payload().payload.len()
            }
            _ => return Err(TestCaseError::fail("etherparse found no IP header")),
        };

        // Any one byte of the transport header or payload changed is
        // caught (a one's complement sum changes for every single-byte
        // change; destination options are not under the checksum).
        let start = transport_start;
        let (at, delta) = flip;
        let at = start + at % (packet.len() - start);
        let mut bad = packet.clone();
        bad[at] ^= delta.max(1);
        prop_assert!(
            validate(&bad, policy).is_err(),
            "byte {} changed and still valid", at
        );
    }
}
