//! Lowercase hex encoding and strict decoding, for key files and test
//! vectors. Small enough not to be worth a dependency.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    #[error("odd number of hex digits ({0})")]
    OddLength(usize),
    #[error("invalid hex digit {0:?} at position {1}")]
    InvalidDigit(char, usize),
    #[error("{0} bytes do not fit in a buffer of {1}")]
    TooLong(usize, usize),
}

pub fn decode(text: &str) -> Result<Vec<u8>, HexError> {
    // Sized once, never grown: growth would leave copies of the bytes
    // (keys, for key files) behind in freed memory.
    let mut out = vec![0u8; text.len() / 2];
    decode_into(text.as_bytes(), &mut out)?;
    Ok(out)
}

/// Decodes `digits` into the start of `out` (which the caller owns, and
/// zeroizes if the bytes are secret) and returns how many bytes it wrote.
pub fn decode_into(digits: &[u8], out: &mut [u8]) -> Result<usize, HexError> {
    if !digits.len().is_multiple_of(2) {
        return Err(HexError::OddLength(digits.len()));
    }
    let len = digits.len() / 2;
    if len > out.len() {
        return Err(HexError::TooLong(len, out.len()));
    }
    let nibble = |i: usize| -> Result<u8, HexError> {
        let c = digits[i];
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(HexError::InvalidDigit(char::from(c), i)),
        }
    };
    for (i, byte) in out[..len].iter_mut().enumerate() {
        *byte = nibble(2 * i)? << 4 | nibble(2 * i + 1)?;
    }
    Ok(len)
}

pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Encodes `bytes` into `out` (at least twice as long), for callers that
/// keep secret text in a buffer of their own.
pub fn encode_into(bytes: &[u8], out: &mut [u8]) -> Result<usize, HexError> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    if out.len() < bytes.len() * 2 {
        return Err(HexError::TooLong(bytes.len() * 2, out.len()));
    }
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    Ok(bytes.len() * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&bytes)), Ok(bytes));
        assert_eq!(decode("ABcd"), Ok(vec![0xab, 0xcd]));
        assert_eq!(decode("abc"), Err(HexError::OddLength(3)));
        assert_eq!(decode("zz"), Err(HexError::InvalidDigit('z', 0)));
        assert_eq!(decode(""), Ok(vec![]));
    }

    #[test]
    fn into_fixed_buffers_without_overrunning_them() {
        let mut out = [0u8; 4];
        assert_eq!(decode_into(b"0aFf", &mut out), Ok(2));
        assert_eq!(out, [0x0a, 0xff, 0, 0]);
        assert_eq!(
            decode_into(b"0011223344", &mut out),
            Err(HexError::TooLong(5, 4))
        );
        assert_eq!(
            decode_into(b"0g", &mut out),
            Err(HexError::InvalidDigit('g', 1))
        );
        let mut text = [0u8; 6];
        assert_eq!(encode_into(&[0xde, 0xad, 0x01], &mut text), Ok(6));
        assert_eq!(&text, b"dead01");
        assert_eq!(
            encode_into(&[0; 4], &mut text),
            Err(HexError::TooLong(8, 6))
        );
    }
}
