//! IKEv2 messages on the wire (RFC 7296 section 3).
//!
//! [`header::IkeHeader`] and [`chain::GenericPayload`] are views over a
//! byte slice in the house style: `new_checked` validates every length the
//! getters use, so after it returns `Ok` no getter panics. Above them,
//! [`Message`] and [`payload::Payload`] are parse/emit pairs (`Repr`s in
//! smoltcp's terms) that own their bytes, since the state machine keeps
//! parts of messages (nonces, ID payloads) across exchanges.
//!
//! Every length read from the wire is checked against the bytes it claims
//! before it is used, and every repeated structure has a fixed upper bound
//! (payloads per message, proposals, transforms, attributes, traffic
//! selectors, SPIs), so no message can make us loop or allocate without
//! bound. Nothing here panics on any input.

pub mod chain;
pub mod consts;
pub mod header;
pub mod payload;
pub mod sa_payload;

#[cfg(test)]
mod tests;

pub use chain::{GenericPayload, RawPayload};
pub use header::{Header, IkeHeader};
pub use payload::Payload;

/// Why IKE bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("IKE message or payload truncated")]
    Truncated,
    #[error("IKE length field disagrees with the bytes")]
    BadLength,
    #[error("IKE major version is not 2")]
    Version,
    #[error("more than {0} {1} in one IKE message")]
    TooMany(usize, &'static str),
    #[error("the Encrypted payload is not the last payload")]
    SkNotLast,
    #[error("unsupported critical payload type {0}")]
    UnsupportedCritical(u8),
    #[error("invalid {0} in an IKE payload")]
    Invalid(&'static str),
    #[error("an IKE payload is too long to emit")]
    TooLong,
}

/// A whole IKE message: the header and its payloads in order. For a
/// protected message the last payload is [`Payload::Encrypted`], which
/// [`crate::ike::sk`] opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payloads: Vec<Payload>,
}

impl Message {
    /// Parses a whole datagram (without the RFC 3948 non-ESP marker). The
    /// header's length must equal the datagram's (RFC 7296 section 3.1).
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let view = IkeHeader::new_checked(bytes)?;
        let header = Header::parse(&view)?;
        let raw = chain::walk(
            view.next_payload(),
            &bytes[header::HEADER_LEN..],
            header::HEADER_LEN,
        )?;
        let payloads = raw
            .iter()
            .map(Payload::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Message { header, payloads })
    }

    /// Emits the message; the header's next payload and length are
    /// computed from the payloads.
    pub fn emit(&self) -> Result<Vec<u8>, WireError> {
        let mut out = vec![0u8; header::HEADER_LEN];
        let first = chain::emit(&self.payloads, &mut out)?;
        self.header.emit(&mut out, first)?;
        Ok(out)
    }
}
