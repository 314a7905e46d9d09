//! The payloads of a received message, collected by type.

use super::super::wire::WireError;
use super::super::wire::payload::{
    Auth, Delete, Identification, KeyExchange, Notify, Payload, TrafficSelector,
};
use super::super::wire::sa_payload::Proposal;
use super::{ErrorNotify, IkeError};

/// The payloads of one message by type, in whatever order they came
/// (section 3.2 fixes no order but for SK being last; peers put notifies
/// before or after SA and TS). A payload that may appear once and appears
/// twice fails the message.
#[derive(Default)]
pub(super) struct Found<'a> {
    pub(super) deletes: Vec<&'a Delete>,
    pub(super) sa: Option<&'a [Proposal]>,
    pub(super) ke: Option<&'a KeyExchange>,
    pub(super) nonce: Option<&'a [u8]>,
    pub(super) idi: Option<&'a Identification>,
    pub(super) idr: Option<&'a Identification>,
    pub(super) auth: Option<&'a Auth>,
    pub(super) tsi: Option<&'a [TrafficSelector]>,
    pub(super) tsr: Option<&'a [TrafficSelector]>,
    pub(super) notifies: Vec<&'a Notify>,
}

impl<'a> Found<'a> {
    pub(super) fn new(payloads: &'a [Payload]) -> Result<Self, IkeError> {
        let mut f = Found::default();
        let dup = || IkeError::Wire(WireError::Invalid("repeated payload"));
        for p in payloads {
            match p {
                Payload::Sa(x) => set(&mut f.sa, x.as_slice()).ok_or_else(dup)?,
                Payload::Ke(x) => set(&mut f.ke, x).ok_or_else(dup)?,
                Payload::Nonce(x) => set(&mut f.nonce, x.as_slice()).ok_or_else(dup)?,
                Payload::IdI(x) => set(&mut f.idi, x).ok_or_else(dup)?,
                Payload::IdR(x) => set(&mut f.idr, x).ok_or_else(dup)?,
                Payload::Auth(x) => set(&mut f.auth, x).ok_or_else(dup)?,
                Payload::TsI(x) => set(&mut f.tsi, x.as_slice()).ok_or_else(dup)?,
                Payload::TsR(x) => set(&mut f.tsr, x.as_slice()).ok_or_else(dup)?,
                Payload::Notify(n) => f.notifies.push(n),
                Payload::Delete(d) => f.deletes.push(d),
                // Encrypted (never inside) and unknown non-critical
                // payloads (vendor IDs, CERTREQ) are not ours here.
                _ => {}
            }
        }
        Ok(f)
    }

    pub(super) fn notify(&self, ty: u16) -> Option<&'a Notify> {
        self.notifies.iter().copied().find(|n| n.ty == ty)
    }

    /// The first error notification, if any (section 3.10.1).
    pub(super) fn error(&self) -> Option<ErrorNotify> {
        self.notifies
            .iter()
            .find(|n| n.is_error())
            .map(|n| ErrorNotify::from_type(n.ty))
    }
}

fn set<'a, T: ?Sized>(slot: &mut Option<&'a T>, v: &'a T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(v);
    Some(())
}
