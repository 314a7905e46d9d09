//! The Security Association payload body (RFC 7296 section 3.3): a list of
//! proposals, each a list of transforms, each with attributes.
//!
//! ```text
//! proposal:  | last(0)/more(2) | rsvd | len(2) | num | proto | spi size | #transforms | SPI | transforms
//! transform: | last(0)/more(3) | rsvd | len(2) | type | rsvd | id(2) | attributes
//! attribute: | AF+type(2) | value(2)                      (TV, AF = 1)
//!            | type(2)    | length(2) | value             (TLV, AF = 0)
//! ```

use super::WireError;
use super::header::be16;

pub const MAX_PROPOSALS: usize = 16;
pub const MAX_TRANSFORMS: usize = 32;
pub const MAX_ATTRIBUTES: usize = 4;
const PROPOSAL_HEADER: usize = 8;
const TRANSFORM_HEADER: usize = 8;
const MORE_PROPOSALS: u8 = 2;
const MORE_TRANSFORMS: u8 = 3;
const ATTR_TV: u16 = 0x8000;

/// One transform. Attributes other than the key length are not ours to
/// interpret: section 3.3.6 makes a transform with an unknown attribute
/// unacceptable, so we remember that there was one instead of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transform {
    pub ty: u8,
    pub id: u16,
    /// The Key Length attribute (section 3.3.5), in bits.
    pub key_len: Option<u16>,
    pub unknown_attributes: bool,
}

impl Transform {
    pub fn new(ty: u8, id: u16, key_len: Option<u16>) -> Self {
        Transform {
            ty,
            id,
            key_len,
            unknown_attributes: false,
        }
    }
}

/// One proposal: a protocol, its SPI (empty for IKE in IKE_SA_INIT,
/// 8 bytes when rekeying IKE, 4 for ESP) and its transforms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub num: u8,
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
}

pub fn parse(mut body: &[u8]) -> Result<Vec<Proposal>, WireError> {
    let mut out = Vec::new();
    loop {
        if out.len() == MAX_PROPOSALS {
            return Err(WireError::TooMany(MAX_PROPOSALS, "proposals"));
        }
        if body.len() < PROPOSAL_HEADER {
            return Err(WireError::Truncated);
        }
        let more = body[0];
        let len = usize::from(be16(&body[2..4]));
        if len < PROPOSAL_HEADER || len > body.len() {
            return Err(WireError::BadLength);
        }
        let (num, protocol, spi_size, count) = (body[4], body[5], body[6], body[7]);
        let p = &body[PROPOSAL_HEADER..len];
        let spi = p
            .get(..usize::from(spi_size))
            .ok_or(WireError::BadLength)?
            .to_vec();
        if !matches!(spi.len(), 0 | 4 | 8) {
            return Err(WireError::Invalid("SPI size"));
        }
        let transforms = parse_transforms(&p[spi.len()..], count)?;
        out.push(Proposal {
            num,
            protocol,
            spi,
            transforms,
        });
        body = &body[len..];
        match more {
            0 if body.is_empty() => return Ok(out),
            MORE_PROPOSALS if !body.is_empty() => {}
            _ => return Err(WireError::Invalid("last-proposal flag")),
        }
    }
}

fn parse_transforms(mut body: &[u8], count: u8) -> Result<Vec<Transform>, WireError> {
    if usize::from(count) > MAX_TRANSFORMS {
        return Err(WireError::TooMany(MAX_TRANSFORMS, "transforms"));
    }
    let mut out = Vec::with_capacity(usize::from(count));
    for i in 0..count {
        if body.len() < TRANSFORM_HEADER {
            return Err(WireError::Truncated);
        }
        let more = body[0];
        let len = usize::from(be16(&body[2..4]));
        if len < TRANSFORM_HEADER || len > body.len() {
            return Err(WireError::BadLength);
        }
        let last = i + 1 == count;
        if (more == 0) != last || (more != 0 && more != MORE_TRANSFORMS) {
            return Err(WireError::Invalid("last-transform flag"));
        }
        let mut t = Transform::new(body[4], be16(&body[6..8]), None);
        parse_attributes(&body[TRANSFORM_HEADER..len], &mut t)?;
        out.push(t);
        body = &body[len..];
    }
    if !body.is_empty() {
        return Err(WireError::BadLength);
    }
    Ok(out)
}

fn parse_attributes(mut a: &[u8], t: &mut Transform) -> Result<(), WireError> {
    let mut n = 0;
    while !a.is_empty() {
        n += 1;
        if n > MAX_ATTRIBUTES {
            return Err(WireError::TooMany(MAX_ATTRIBUTES, "attributes"));
        }
        if a.len() < 4 {
            return Err(WireError::Truncated);
        }
        let kind = be16(&a[0..2]);
        let value = be16(&a[2..4]);
        if kind & ATTR_TV != 0 {
            if kind & !ATTR_TV == super::consts::transform::ATTR_KEY_LENGTH {
                if t.key_len.is_some() {
                    return Err(WireError::Invalid("repeated key length"));
                }
                t.key_len = Some(value);
            } else {
                t.unknown_attributes = true;
            }
            a = &a[4..];
        } else {
            let end = 4 + usize::from(value);
            if end > a.len() {
                return Err(WireError::Truncated);
            }
            // The key length is defined as TV only (section 3.3.5).
            t.unknown_attributes = true;
            a = &a[end..];
        }
    }
    Ok(())
}

pub fn emit(proposals: &[Proposal], out: &mut Vec<u8>) -> Result<(), WireError> {
    if proposals.is_empty() || proposals.len() > MAX_PROPOSALS {
        return Err(WireError::TooMany(MAX_PROPOSALS, "proposals"));
    }
    for (i, p) in proposals.iter().enumerate() {
        if p.transforms.len() > MAX_TRANSFORMS {
            return Err(WireError::TooMany(MAX_TRANSFORMS, "transforms"));
        }
        if !matches!(p.spi.len(), 0 | 4 | 8) {
            return Err(WireError::Invalid("SPI size"));
        }
        let start = out.len();
        let more = if i + 1 == proposals.len() {
            0
        } else {
            MORE_PROPOSALS
        };
        out.extend_from_slice(&[
            more,
            0,
            0,
            0,
            p.num,
            p.protocol,
            p.spi.len() as u8,
            p.transforms.len() as u8,
        ]);
        out.extend_from_slice(&p.spi);
        for (j, t) in p.transforms.iter().enumerate() {
            let more = if j + 1 == p.transforms.len() {
                0
            } else {
                MORE_TRANSFORMS
            };
            let len: u16 = if t.key_len.is_some() { 12 } else { 8 };
            out.extend_from_slice(&[more, 0]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[t.ty, 0]);
            out.extend_from_slice(&t.id.to_be_bytes());
            if let Some(k) = t.key_len {
                out.extend_from_slice(
                    &(ATTR_TV | super::consts::transform::ATTR_KEY_LENGTH).to_be_bytes(),
                );
                out.extend_from_slice(&k.to_be_bytes());
            }
        }
        let len = u16::try_from(out.len() - start).map_err(|_| WireError::TooLong)?;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}
