//! The generic payload header (RFC 7296 section 3.2) and the payload
//! chain: each payload names the type of the next, the first is named by
//! the IKE header (or, inside an Encrypted payload, by the Encrypted
//! payload's own next-payload field).
//!
//! ```text
//!  0    1   2        4
//!  | NP | C | Length | body ...
//! ```

use super::WireError;
use super::consts::payload as ty;
use super::header::be16;
use super::payload::Payload;

pub const GENERIC_LEN: usize = 4;
/// A bound on payloads per message. IKE_AUTH with every optional payload
/// we know carries about a dozen; 32 leaves room for vendor IDs and
/// notifies without letting a message make us build an unbounded list.
pub const MAX_PAYLOADS: usize = 32;
const CRITICAL: u8 = 0x80;

mod field {
    use std::ops::Range;
    pub const NEXT_PAYLOAD: usize = 0;
    pub const FLAGS: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
}

/// A view of one payload: generic header and body.
#[derive(Debug, Clone, Copy)]
pub struct GenericPayload<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> GenericPayload<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        GenericPayload { buffer }
    }

    /// Room for the generic header, and a length field between the header
    /// length and the buffer's length (the payload may be followed by
    /// others).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < GENERIC_LEN {
            return Err(WireError::Truncated);
        }
        let plen = usize::from(self.length());
        if plen < GENERIC_LEN {
            return Err(WireError::BadLength);
        }
        if plen > len {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn next_payload(&self) -> u8 {
        self.buffer.as_ref()[field::NEXT_PAYLOAD]
    }

    /// Section 2.5: an unknown payload with this bit set fails the message.
    pub fn critical(&self) -> bool {
        self.buffer.as_ref()[field::FLAGS] & CRITICAL != 0
    }

    pub fn length(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::LENGTH])
    }

    pub fn body(&self) -> &[u8] {
        &self.buffer.as_ref()[GENERIC_LEN..usize::from(self.length())]
    }
}

/// One payload found by [`walk`], not yet interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPayload<'a> {
    pub ty: u8,
    /// The generic header's next-payload field. For every payload but the
    /// Encrypted one it names the following payload; for the Encrypted
    /// payload, the first payload inside it (section 3.14).
    pub next: u8,
    pub critical: bool,
    /// Where the generic header starts, counted from the start of the
    /// message: for the Encrypted payload's AAD (RFC 5282 section 5.1).
    pub offset: usize,
    pub body: &'a [u8],
}

/// Walks the chain starting with type `first` over `bytes`, which must be
/// used exactly. `base` is the offset of `bytes` within the message.
pub fn walk(first: u8, bytes: &[u8], base: usize) -> Result<Vec<RawPayload<'_>>, WireError> {
    let mut out = Vec::new();
    let mut ty = first;
    let mut at = 0usize;
    while ty != ty::NONE {
        if out.len() == MAX_PAYLOADS {
            return Err(WireError::TooMany(MAX_PAYLOADS, "payloads"));
        }
        let rest = bytes.get(at..).ok_or(WireError::Truncated)?;
        let view = GenericPayload::new_checked(rest)?;
        let len = usize::from(view.length());
        out.push(RawPayload {
            ty,
            next: view.next_payload(),
            critical: view.critical(),
            offset: base + at,
            body: &rest[GENERIC_LEN..len],
        });
        at += len;
        if ty == ty::SK {
            // Section 3.14: the Encrypted payload is the last one; its
            // next-payload field describes its contents instead.
            if at != bytes.len() {
                return Err(WireError::SkNotLast);
            }
            return Ok(out);
        }
        ty = view.next_payload();
    }
    if at != bytes.len() {
        return Err(WireError::BadLength);
    }
    Ok(out)
}

/// Appends the payloads to `out`, each with its generic header, and
/// returns the type of the first (for the IKE header or the Encrypted
/// payload that will carry them).
pub fn emit(payloads: &[Payload], out: &mut Vec<u8>) -> Result<u8, WireError> {
    if payloads.len() > MAX_PAYLOADS {
        return Err(WireError::TooMany(MAX_PAYLOADS, "payloads"));
    }
    for (i, p) in payloads.iter().enumerate() {
        if p.ty() == ty::SK && i + 1 != payloads.len() {
            return Err(WireError::SkNotLast);
        }
        let next = match (p, payloads.get(i + 1)) {
            (Payload::Encrypted(sk), _) => sk.inner_first,
            (_, Some(n)) => n.ty(),
            (_, None) => ty::NONE,
        };
        let start = out.len();
        out.extend_from_slice(&[next, 0, 0, 0]);
        p.emit_body(out)?;
        let len = u16::try_from(out.len() - start).map_err(|_| WireError::TooLong)?;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
    Ok(payloads.first().map_or(ty::NONE, Payload::ty))
}
