//! ESP (RFC 4303) with AES-GCM (RFC 4106), and the UDP encapsulation
//! classification of RFC 3948.
//!
//! ```text
//!  0               4               8              16                     end
//!  | SPI | seq low | IV (8, = 64-bit seq) | ciphertext ... | ICV (8/12/16) |
//!                                          plaintext = payload | pad 1,2,.. | pad len | next header
//! ```
//!
//! After [`EspPacket::new_checked`] succeeds for an ICV length, no getter
//! panics. Nothing here allocates.

/// SPI and sequence number.
pub const HEADER_LEN: usize = 8;
/// RFC 4106 section 3.1: the explicit IV is 8 octets.
pub const IV_LEN: usize = 8;
/// Pad length and next header.
pub const TRAILER_LEN: usize = 2;
/// The most a sealed packet grows past its payload at the tail: padding,
/// trailer and the largest ICV.
pub const MAX_TAIL: usize = 3 + TRAILER_LEN + 16;

/// Why ESP bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    #[error("ESP packet too short")]
    Truncated,
    #[error("ESP padding or pad length invalid")]
    BadPadding,
}

mod field {
    use std::ops::Range;
    pub const SPI: Range<usize> = 0..4;
    pub const SEQ: Range<usize> = 4..8;
    pub const IV: Range<usize> = 8..16;
}

/// A view of one ESP packet whose ICV is `icv_len` bytes.
#[derive(Debug, Clone, Copy)]
pub struct EspPacket<T: AsRef<[u8]>> {
    buffer: T,
    icv_len: usize,
}

impl<T: AsRef<[u8]>> EspPacket<T> {
    pub fn new_unchecked(buffer: T, icv_len: usize) -> Self {
        EspPacket { buffer, icv_len }
    }

    /// Room for header, IV, the 2-byte trailer and the ICV.
    pub fn new_checked(buffer: T, icv_len: usize) -> Result<Self, EspError> {
        let packet = Self::new_unchecked(buffer, icv_len);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), EspError> {
        if self.buffer.as_ref().len() < HEADER_LEN + IV_LEN + TRAILER_LEN + self.icv_len {
            Err(EspError::Truncated)
        } else {
            Ok(())
        }
    }

    pub fn spi(&self) -> u32 {
        be32(&self.buffer.as_ref()[field::SPI])
    }

    pub fn seq_low(&self) -> u32 {
        be32(&self.buffer.as_ref()[field::SEQ])
    }

    pub fn iv(&self) -> [u8; IV_LEN] {
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&self.buffer.as_ref()[field::IV]);
        iv
    }

    fn ciphertext_range(&self) -> std::ops::Range<usize> {
        HEADER_LEN + IV_LEN..self.buffer.as_ref().len() - self.icv_len
    }

    pub fn ciphertext(&self) -> &[u8] {
        &self.buffer.as_ref()[self.ciphertext_range()]
    }

    pub fn icv(&self) -> &[u8] {
        let len = self.buffer.as_ref().len();
        &self.buffer.as_ref()[len - self.icv_len..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EspPacket<T> {
    /// The ciphertext to decrypt in place and the ICV, borrowed together.
    pub fn ciphertext_and_icv_mut(&mut self) -> (&mut [u8], &[u8]) {
        let range = self.ciphertext_range();
        let (head, icv) = self.buffer.as_mut().split_at_mut(range.end);
        (&mut head[range.start..], icv)
    }
}

/// Writes SPI, low sequence number and IV (the 64-bit sequence number,
/// unique per key by construction, RFC 4106 section 3.1) into `header`.
pub fn emit_header(header: &mut [u8; HEADER_LEN + IV_LEN], spi: u32, seq: u64) {
    header[field::SPI].copy_from_slice(&spi.to_be_bytes());
    header[field::SEQ].copy_from_slice(&(seq as u32).to_be_bytes());
    header[field::IV].copy_from_slice(&seq.to_be_bytes());
}

/// Padding needed so that payload, padding and trailer end on a 4-byte
/// boundary (RFC 4303 section 2.4; GCM needs no block alignment).
pub fn pad_len(payload_len: usize) -> usize {
    (4 - (payload_len + TRAILER_LEN) % 4) % 4
}

/// Writes padding 1, 2, 3, ... (RFC 4303 section 2.4 default), pad length
/// and next header into `tail`, which is exactly `pad_len + 2` bytes.
pub fn emit_trailer(tail: &mut [u8], next_header: u8) {
    let pad = tail.len() - TRAILER_LEN;
    for (i, b) in tail[..pad].iter_mut().enumerate() {
        *b = (i + 1) as u8;
    }
    tail[pad] = pad as u8;
    tail[pad + 1] = next_header;
}

/// Parses a decrypted ESP plaintext: returns the payload length and next
/// header after checking the padding is 1, 2, 3, ... as sent.
pub fn parse_trailer(plaintext: &[u8]) -> Result<(usize, u8), EspError> {
    let len = plaintext.len();
    if len < TRAILER_LEN {
        return Err(EspError::Truncated);
    }
    let pad = usize::from(plaintext[len - 2]);
    let next_header = plaintext[len - 1];
    let payload_len = (len - TRAILER_LEN)
        .checked_sub(pad)
        .ok_or(EspError::BadPadding)?;
    let padding = &plaintext[payload_len..len - TRAILER_LEN];
    if padding
        .iter()
        .enumerate()
        .any(|(i, &b)| usize::from(b) != i + 1)
    {
        return Err(EspError::BadPadding);
    }
    Ok((payload_len, next_header))
}

/// RFC 4106 section 5: the AAD is SPI || seq (8 bytes), or with ESN
/// SPI || seq high || seq low (12 bytes). Returns the buffer and its length.
pub fn aad(spi: u32, seq: u64, esn: bool) -> ([u8; 12], usize) {
    let mut a = [0u8; 12];
    a[0..4].copy_from_slice(&spi.to_be_bytes());
    if esn {
        a[4..12].copy_from_slice(&seq.to_be_bytes());
        (a, 12)
    } else {
        a[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 8)
    }
}

/// RFC 4106 section 4: nonce = salt || explicit IV.
pub fn nonce(salt: [u8; 4], iv: [u8; IV_LEN]) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&salt);
    n[4..].copy_from_slice(&iv);
    n
}

/// What a UDP payload on the NAT-T port is (RFC 3948 sections 2.2, 2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpPayload {
    /// The single byte 0xFF, sent to keep NAT bindings alive.
    Keepalive,
    /// Starts with the 4-byte non-ESP marker (zero): IKE traffic.
    Ike,
    /// Anything else: ESP (SPI 0 is reserved, so ESP never starts with 0).
    Esp,
}

pub fn classify_udp_payload(payload: &[u8]) -> UdpPayload {
    match payload {
        [0xFF] => UdpPayload::Keepalive,
        [0, 0, 0, 0, ..] => UdpPayload::Ike,
        _ => UdpPayload::Esp,
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_aligns_to_four_and_parses_back() {
        for payload_len in 0..64 {
            let pad = pad_len(payload_len);
            assert!(pad < 4);
            assert_eq!((payload_len + pad + TRAILER_LEN) % 4, 0);
            let mut plaintext = vec![0xEEu8; payload_len + pad + TRAILER_LEN];
            emit_trailer(&mut plaintext[payload_len..], 6);
            assert_eq!(parse_trailer(&plaintext), Ok((payload_len, 6)));
        }
    }

    #[test]
    fn bad_padding_is_refused() {
        // pad length larger than what precedes it
        assert_eq!(parse_trailer(&[5, 6]), Err(EspError::BadPadding));
        assert_eq!(parse_trailer(&[9, 9, 9, 2, 6]), Err(EspError::BadPadding));
        assert_eq!(parse_trailer(&[9, 1, 3, 2, 6]), Err(EspError::BadPadding));
        assert_eq!(parse_trailer(&[9, 1, 2, 2, 6]), Ok((1, 6)));
        assert_eq!(parse_trailer(&[6]), Err(EspError::Truncated));
    }

    #[test]
    fn header_view_and_emit_agree() {
        let mut bytes = [0u8; 16 + 4 + 16];
        let mut header = [0u8; 16];
        emit_header(&mut header, 0xDEAD_BEEF, 0x0000_0001_0000_0005);
        bytes[..16].copy_from_slice(&header);
        let p = EspPacket::new_checked(&bytes[..], 16).expect("long enough");
        assert_eq!(p.spi(), 0xDEAD_BEEF);
        assert_eq!(p.seq_low(), 5);
        assert_eq!(p.iv(), 0x0000_0001_0000_0005u64.to_be_bytes());
        assert_eq!(p.ciphertext().len(), 4);
        assert_eq!(p.icv().len(), 16);
        for len in 0..16 + 2 + 16 {
            assert!(
                EspPacket::new_checked(&bytes[..len], 16).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn aad_shapes_follow_rfc4106() {
        let (a, n) = aad(0x0102_0304, 0x0A0B_0C0D_1112_1314, false);
        assert_eq!(&a[..n], &[1, 2, 3, 4, 0x11, 0x12, 0x13, 0x14]);
        let (a, n) = aad(0x0102_0304, 0x0A0B_0C0D_1112_1314, true);
        assert_eq!(
            &a[..n],
            &[1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D, 0x11, 0x12, 0x13, 0x14]
        );
        assert_eq!(nonce([1, 2, 3, 4], [5; 8])[..5], [1, 2, 3, 4, 5]);
    }

    #[test]
    fn udp_payloads_are_classified() {
        assert_eq!(classify_udp_payload(&[0xFF]), UdpPayload::Keepalive);
        assert_eq!(classify_udp_payload(&[0, 0, 0, 0, 1, 2]), UdpPayload::Ike);
        assert_eq!(classify_udp_payload(&[0, 0, 0, 1, 1, 2]), UdpPayload::Esp);
        assert_eq!(classify_udp_payload(&[0xFF, 0xFF]), UdpPayload::Esp);
        assert_eq!(classify_udp_payload(&[]), UdpPayload::Esp);
    }
}
