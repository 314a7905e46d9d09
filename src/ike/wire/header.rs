//! The IKE header (RFC 7296 section 3.1).
//!
//! ```text
//!  0        8        16   17   18   19   20       24       28
//!  | SPIi   | SPIr   | NP | V  | ET | Fl | Msg ID | Length |
//! ```
//!
//! After [`IkeHeader::new_checked`] succeeds, no getter panics.

use super::WireError;

pub const HEADER_LEN: usize = 28;
/// Major version 2, minor 0 (section 3.1).
pub const VERSION: u8 = 0x20;

mod field {
    use std::ops::Range;
    pub const SPI_I: Range<usize> = 0..8;
    pub const SPI_R: Range<usize> = 8..16;
    pub const NEXT_PAYLOAD: usize = 16;
    pub const VERSION: usize = 17;
    pub const EXCHANGE: usize = 18;
    pub const FLAGS: usize = 19;
    pub const MESSAGE_ID: Range<usize> = 20..24;
    pub const LENGTH: Range<usize> = 24..28;
}

/// A view of the IKE header at the start of a message.
#[derive(Debug, Clone, Copy)]
pub struct IkeHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> IkeHeader<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        IkeHeader { buffer }
    }

    /// Room for the header, and a length field equal to the buffer's: a
    /// datagram holds exactly one message (section 3.1).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let h = Self::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if self.length() as usize != len {
            return Err(WireError::BadLength);
        }
        Ok(())
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn spi_i(&self) -> u64 {
        be64(&self.b()[field::SPI_I])
    }

    pub fn spi_r(&self) -> u64 {
        be64(&self.b()[field::SPI_R])
    }

    pub fn next_payload(&self) -> u8 {
        self.b()[field::NEXT_PAYLOAD]
    }

    pub fn version(&self) -> u8 {
        self.b()[field::VERSION]
    }

    pub fn exchange(&self) -> u8 {
        self.b()[field::EXCHANGE]
    }

    pub fn flags(&self) -> u8 {
        self.b()[field::FLAGS]
    }

    pub fn message_id(&self) -> u32 {
        be32(&self.b()[field::MESSAGE_ID])
    }

    pub fn length(&self) -> u32 {
        be32(&self.b()[field::LENGTH])
    }
}

/// The header's fields but the two that describe the rest of the message
/// (next payload, length): those [`super::Message::emit`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    pub exchange: u8,
    pub flags: u8,
    pub message_id: u32,
}

impl Header {
    /// Section 3.1: a major version above 2 is refused (we answer nothing:
    /// INVALID_MAJOR_VERSION is the caller's business); the minor version
    /// is ignored.
    pub fn parse<T: AsRef<[u8]>>(view: &IkeHeader<T>) -> Result<Self, WireError> {
        if view.version() >> 4 != 2 {
            return Err(WireError::Version);
        }
        Ok(Header {
            spi_i: view.spi_i(),
            spi_r: view.spi_r(),
            exchange: view.exchange(),
            flags: view.flags(),
            message_id: view.message_id(),
        })
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`,
    /// with the length of all of `out`.
    pub fn emit(&self, out: &mut [u8], next_payload: u8) -> Result<(), WireError> {
        let length = u32::try_from(out.len()).map_err(|_| WireError::TooLong)?;
        let h = out.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        h[field::SPI_I].copy_from_slice(&self.spi_i.to_be_bytes());
        h[field::SPI_R].copy_from_slice(&self.spi_r.to_be_bytes());
        h[field::NEXT_PAYLOAD] = next_payload;
        h[field::VERSION] = VERSION;
        h[field::EXCHANGE] = self.exchange;
        h[field::FLAGS] = self.flags;
        h[field::MESSAGE_ID].copy_from_slice(&self.message_id.to_be_bytes());
        h[field::LENGTH].copy_from_slice(&length.to_be_bytes());
        Ok(())
    }

    pub fn is_response(&self) -> bool {
        self.flags & super::consts::flags::RESPONSE != 0
    }

    pub fn is_initiator(&self) -> bool {
        self.flags & super::consts::flags::INITIATOR != 0
    }
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
