//! Payload bodies (RFC 7296 sections 3.3 to 3.14): parse from the body a
//! [`super::chain::walk`] found, emit after a generic header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::WireError;
use super::chain::RawPayload;
use super::consts::{payload as ty, protocol, ts};
use super::header::be16;
use super::sa_payload::{self, Proposal};

/// Section 3.9: a nonce is 16 to 256 bytes.
pub const NONCE_MIN: usize = 16;
pub const NONCE_MAX: usize = 256;
pub const MAX_TRAFFIC_SELECTORS: usize = 16;
/// A Delete payload names at most this many SPIs (we only ever send one).
pub const MAX_DELETE_SPIS: usize = 64;

/// Key Exchange (section 3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExchange {
    pub group: u16,
    pub data: Vec<u8>,
}

/// IDi or IDr (section 3.5). The reserved bytes are kept as received:
/// AUTH covers the payload body as sent (section 2.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identification {
    pub id_type: u8,
    pub reserved: [u8; 3],
    pub data: Vec<u8>,
}

impl Identification {
    pub fn new(id_type: u8, data: Vec<u8>) -> Self {
        Identification {
            id_type,
            reserved: [0; 3],
            data,
        }
    }

    /// The body as AUTH signs it: `RestOfInitIDPayload` (section 2.15).
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 + self.data.len());
        b.push(self.id_type);
        b.extend_from_slice(&self.reserved);
        b.extend_from_slice(&self.data);
        b
    }
}

/// Authentication (section 3.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub method: u8,
    pub data: Vec<u8>,
}

/// One traffic selector (section 3.13.1): an address range of one family,
/// a protocol (0: any) and a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficSelector {
    pub ip_protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub start: IpAddr,
    pub end: IpAddr,
}

impl TrafficSelector {
    /// All traffic between one address and itself: host-to-host transport
    /// mode's selector.
    pub fn host(addr: IpAddr) -> Self {
        TrafficSelector {
            ip_protocol: 0,
            start_port: 0,
            end_port: 0xffff,
            start: addr,
            end: addr,
        }
    }

    pub fn contains(&self, other: &TrafficSelector) -> bool {
        let proto = self.ip_protocol == 0 || self.ip_protocol == other.ip_protocol;
        proto
            && self.start_port <= other.start_port
            && other.end_port <= self.end_port
            && addr_le(self.start, other.start)
            && addr_le(other.end, self.end)
    }
}

fn addr_le(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a <= b,
        (IpAddr::V6(a), IpAddr::V6(b)) => a <= b,
        _ => false,
    }
}

/// Notify (section 3.10). `spi` is empty unless the notification is about
/// a particular SA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub ty: u16,
    pub data: Vec<u8>,
}

impl Notify {
    /// A notification about the IKE SA, or none in particular.
    pub fn new(ty: u16, data: Vec<u8>) -> Self {
        Notify {
            protocol: 0,
            spi: Vec::new(),
            ty,
            data,
        }
    }

    pub fn is_error(&self) -> bool {
        self.ty < super::consts::notify::FIRST_STATUS
    }
}

/// Delete (section 3.11): the IKE SA (no SPIs), or ESP SAs by inbound SPI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub protocol: u8,
    pub spis: Vec<u32>,
}

/// The Encrypted payload (section 3.14) before opening: IV, ciphertext
/// and ICV as one block, and the type of the first payload inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    pub inner_first: u8,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Sa(Vec<Proposal>),
    Ke(KeyExchange),
    IdI(Identification),
    IdR(Identification),
    Auth(Auth),
    Nonce(Vec<u8>),
    Notify(Notify),
    Delete(Delete),
    TsI(Vec<TrafficSelector>),
    TsR(Vec<TrafficSelector>),
    Encrypted(Encrypted),
    /// A payload we do not interpret and that was not marked critical
    /// (section 2.5: skip it), such as Vendor ID or CERTREQ.
    Unknown {
        ty: u8,
        body: Vec<u8>,
    },
}

impl Payload {
    pub fn ty(&self) -> u8 {
        match self {
            Payload::Sa(_) => ty::SA,
            Payload::Ke(_) => ty::KE,
            Payload::IdI(_) => ty::IDI,
            Payload::IdR(_) => ty::IDR,
            Payload::Auth(_) => ty::AUTH,
            Payload::Nonce(_) => ty::NONCE,
            Payload::Notify(_) => ty::NOTIFY,
            Payload::Delete(_) => ty::DELETE,
            Payload::TsI(_) => ty::TSI,
            Payload::TsR(_) => ty::TSR,
            Payload::Encrypted(_) => ty::SK,
            Payload::Unknown { ty, .. } => *ty,
        }
    }

    pub fn parse(raw: &RawPayload<'_>) -> Result<Self, WireError> {
        let b = raw.body;
        Ok(match raw.ty {
            ty::SA => Payload::Sa(sa_payload::parse(b)?),
            ty::KE => {
                let data = b.get(4..).ok_or(WireError::Truncated)?;
                if data.is_empty() {
                    return Err(WireError::Truncated);
                }
                Payload::Ke(KeyExchange {
                    group: be16(&b[0..2]),
                    data: data.to_vec(),
                })
            }
            ty::IDI | ty::IDR => {
                let data = b.get(4..).ok_or(WireError::Truncated)?;
                if data.is_empty() {
                    return Err(WireError::Truncated);
                }
                let id = Identification {
                    id_type: b[0],
                    reserved: [b[1], b[2], b[3]],
                    data: data.to_vec(),
                };
                if raw.ty == ty::IDI {
                    Payload::IdI(id)
                } else {
                    Payload::IdR(id)
                }
            }
            ty::AUTH => {
                let data = b.get(4..).ok_or(WireError::Truncated)?;
                if data.is_empty() {
                    return Err(WireError::Truncated);
                }
                Payload::Auth(Auth {
                    method: b[0],
                    data: data.to_vec(),
                })
            }
            ty::NONCE => {
                if !(NONCE_MIN..=NONCE_MAX).contains(&b.len()) {
                    return Err(WireError::Invalid("nonce length"));
                }
                Payload::Nonce(b.to_vec())
            }
            ty::NOTIFY => Payload::Notify(parse_notify(b)?),
            ty::DELETE => Payload::Delete(parse_delete(b)?),
            ty::TSI => Payload::TsI(parse_ts(b)?),
            ty::TSR => Payload::TsR(parse_ts(b)?),
            ty::SK => Payload::Encrypted(Encrypted {
                inner_first: raw.next,
                data: b.to_vec(),
            }),
            other if raw.critical => return Err(WireError::UnsupportedCritical(other)),
            other => Payload::Unknown {
                ty: other,
                body: b.to_vec(),
            },
        })
    }

    /// Appends the body (not the generic header) to `out`.
    pub fn emit_body(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Payload::Sa(p) => sa_payload::emit(p, out)?,
            Payload::Ke(k) => {
                out.extend_from_slice(&k.group.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&k.data);
            }
            Payload::IdI(id) | Payload::IdR(id) => out.extend_from_slice(&id.body()),
            Payload::Auth(a) => {
                out.extend_from_slice(&[a.method, 0, 0, 0]);
                out.extend_from_slice(&a.data);
            }
            Payload::Nonce(n) => {
                if !(NONCE_MIN..=NONCE_MAX).contains(&n.len()) {
                    return Err(WireError::Invalid("nonce length"));
                }
                out.extend_from_slice(n);
            }
            Payload::Notify(n) => {
                let spi_size = u8::try_from(n.spi.len()).map_err(|_| WireError::TooLong)?;
                out.extend_from_slice(&[n.protocol, spi_size]);
                out.extend_from_slice(&n.ty.to_be_bytes());
                out.extend_from_slice(&n.spi);
                out.extend_from_slice(&n.data);
            }
            Payload::Delete(d) => {
                let spi_size = if d.protocol == protocol::IKE { 0 } else { 4 };
                if d.spis.len() > MAX_DELETE_SPIS || (spi_size == 0 && !d.spis.is_empty()) {
                    return Err(WireError::Invalid("Delete SPIs"));
                }
                out.extend_from_slice(&[d.protocol, spi_size]);
                out.extend_from_slice(&(d.spis.len() as u16).to_be_bytes());
                for spi in &d.spis {
                    out.extend_from_slice(&spi.to_be_bytes());
                }
            }
            Payload::TsI(t) | Payload::TsR(t) => emit_ts(t, out)?,
            Payload::Encrypted(e) => out.extend_from_slice(&e.data),
            Payload::Unknown { body, .. } => out.extend_from_slice(body),
        }
        Ok(())
    }
}

fn parse_notify(b: &[u8]) -> Result<Notify, WireError> {
    if b.len() < 4 {
        return Err(WireError::Truncated);
    }
    let spi_size = usize::from(b[1]);
    let spi = b.get(4..4 + spi_size).ok_or(WireError::Truncated)?;
    Ok(Notify {
        protocol: b[0],
        spi: spi.to_vec(),
        ty: be16(&b[2..4]),
        data: b[4 + spi_size..].to_vec(),
    })
}

fn parse_delete(b: &[u8]) -> Result<Delete, WireError> {
    if b.len() < 4 {
        return Err(WireError::Truncated);
    }
    let (proto, spi_size, count) = (b[0], b[1], usize::from(be16(&b[2..4])));
    let expected = match proto {
        protocol::IKE => 0,
        protocol::AH | protocol::ESP => 4,
        _ => return Err(WireError::Invalid("Delete protocol")),
    };
    if usize::from(spi_size) != expected || (expected == 0 && count != 0) {
        return Err(WireError::Invalid("Delete SPI size"));
    }
    if count > MAX_DELETE_SPIS {
        return Err(WireError::TooMany(MAX_DELETE_SPIS, "deleted SPIs"));
    }
    let spis = &b[4..];
    if spis.len() != count * expected {
        return Err(WireError::BadLength);
    }
    Ok(Delete {
        protocol: proto,
        spis: spis
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}

fn parse_ts(b: &[u8]) -> Result<Vec<TrafficSelector>, WireError> {
    if b.len() < 4 {
        return Err(WireError::Truncated);
    }
    let count = usize::from(b[0]);
    if count == 0 {
        return Err(WireError::Invalid("empty traffic selector list"));
    }
    if count > MAX_TRAFFIC_SELECTORS {
        return Err(WireError::TooMany(
            MAX_TRAFFIC_SELECTORS,
            "traffic selectors",
        ));
    }
    let mut rest = &b[4..];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        if rest.len() < 8 {
            return Err(WireError::Truncated);
        }
        let (kind, len) = (rest[0], usize::from(be16(&rest[2..4])));
        let alen = match kind {
            ts::IPV4_ADDR_RANGE => 4,
            ts::IPV6_ADDR_RANGE => 16,
            _ => return Err(WireError::Invalid("traffic selector type")),
        };
        if len != 8 + 2 * alen {
            return Err(WireError::BadLength);
        }
        let s = rest.get(..len).ok_or(WireError::Truncated)?;
        let addr = |a: &[u8]| -> IpAddr {
            if alen == 4 {
                IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            } else {
                let mut o = [0u8; 16];
                o.copy_from_slice(a);
                IpAddr::V6(Ipv6Addr::from(o))
            }
        };
        out.push(TrafficSelector {
            ip_protocol: s[1],
            start_port: be16(&s[4..6]),
            end_port: be16(&s[6..8]),
            start: addr(&s[8..8 + alen]),
            end: addr(&s[8 + alen..8 + 2 * alen]),
        });
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(WireError::BadLength);
    }
    Ok(out)
}

fn emit_ts(t: &[TrafficSelector], out: &mut Vec<u8>) -> Result<(), WireError> {
    if t.is_empty() || t.len() > MAX_TRAFFIC_SELECTORS {
        return Err(WireError::TooMany(
            MAX_TRAFFIC_SELECTORS,
            "traffic selectors",
        ));
    }
    out.extend_from_slice(&[t.len() as u8, 0, 0, 0]);
    for s in t {
        let (kind, len): (u8, u16) = match (s.start, s.end) {
            (IpAddr::V4(_), IpAddr::V4(_)) => (ts::IPV4_ADDR_RANGE, 16),
            (IpAddr::V6(_), IpAddr::V6(_)) => (ts::IPV6_ADDR_RANGE, 40),
            _ => return Err(WireError::Invalid("traffic selector families")),
        };
        out.extend_from_slice(&[kind, s.ip_protocol]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&s.start_port.to_be_bytes());
        out.extend_from_slice(&s.end_port.to_be_bytes());
        for a in [s.start, s.end] {
            match a {
                IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
            }
        }
    }
    Ok(())
}
