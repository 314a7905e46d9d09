//! The Internet checksum (RFC 1071), its pseudo-headers (RFC 768, RFC 793,
//! RFC 8200 section 8.1) and incremental update (RFC 1624).
//!
//! Values are 16-bit ones' complement sums in host order, not yet
//! complemented: [`sum`] of the bytes, [`combine`] to add sums of adjacent
//! even-length pieces, [`pseudo_header_v4`]/[`pseudo_header_v6`] for the
//! transport pseudo-header. A segment whose checksum field is intact sums,
//! with its pseudo-header, to `0xFFFF` ([`is_valid`]).
//!
//! Speed matters: esptun validates the inner checksum of every packet on
//! both sides of the cipher, so [`sum`] must run far faster than AES-GCM.
//! It adds 32-bit words into four independent 64-bit lanes (no carry
//! handling in the loop: 2^32 words fit in a lane) and folds once at the
//! end; on CPUs with AVX2, inputs of 128 bytes or more go through an
//! explicit 256-bit loop of the same arithmetic (`sum_avx2`). Summing native-endian words and byte-swapping the folded result is
//! exact (RFC 1071 section 2(B), byte-order independence).

/// Adds two ones' complement sums (end-around carry).
#[inline]
pub fn combine(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    (s as u16).wrapping_add((s >> 16) as u16)
}

/// Folds a wide accumulator of 16-bit words to 16 bits.
#[inline]
fn fold(mut x: u64) -> u16 {
    x = (x & 0xFFFF_FFFF) + (x >> 32);
    x = (x & 0xFFFF) + (x >> 16);
    x = (x & 0xFFFF) + (x >> 16);
    x = (x & 0xFFFF) + (x >> 16);
    x as u16
}

/// Ones' complement sum of `data` as big-endian 16-bit words; an odd final
/// byte is padded with zero (RFC 1071).
#[inline]
pub fn sum(data: &[u8]) -> u16 {
    // Below a few blocks the vector setup and fold cost more than they
    // save (an IPv4 header is 20 bytes).
    #[cfg(target_arch = "x86_64")]
    if data.len() >= 128
        && let Some(total) = simd::sum_if_avx2(data)
    {
        return total;
    }
    sum_portable(data)
}

/// The AVX2 loop, the one place in `wire` that needs `unsafe`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd;

/// The loop for baseline CPUs.
pub(crate) fn sum_portable(data: &[u8]) -> u16 {
    sum_lanes(data)
}

#[inline(always)]
fn sum_lanes(data: &[u8]) -> u16 {
    let mut lanes = [0u64; 4];
    let mut blocks = data.chunks_exact(32);
    for block in &mut blocks {
        for (lane, pair) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let lo = u32::from_ne_bytes([pair[0], pair[1], pair[2], pair[3]]);
            let hi = u32::from_ne_bytes([pair[4], pair[5], pair[6], pair[7]]);
            *lane += u64::from(lo) + u64::from(hi);
        }
    }
    let mut rest = blocks.remainder();
    let mut tail = 0u64;
    while let [a, b, c, d, more @ ..] = rest {
        tail += u64::from(u32::from_ne_bytes([*a, *b, *c, *d]));
        rest = more;
    }
    match rest {
        [a, b, c] => {
            tail += u64::from(u16::from_ne_bytes([*a, *b]));
            tail += u64::from(u16::from_ne_bytes([*c, 0]));
        }
        [a, b] => tail += u64::from(u16::from_ne_bytes([*a, *b])),
        [a] => tail += u64::from(u16::from_ne_bytes([*a, 0])),
        _ => {}
    }
    // A lane gains at most 2^33 per 32-byte block: about 2^44 for a 64 KiB
    // packet, and below 2^64 for any slice under 2^35 bytes, so neither the
    // lanes nor this total can overflow.
    let total = lanes
        .iter()
        .chain(std::iter::once(&tail))
        .map(|&l| (l & 0xFFFF_FFFF) + (l >> 32))
        .sum::<u64>();
    // Native-endian words: swap back to the network-order value.
    u16::from_be(fold(total))
}

/// Pseudo-header sum for TCP/UDP/UDP-Lite/ICMP-less IPv4 transports
/// (RFC 768, RFC 793 section 3.1): source, destination, zero, protocol,
/// transport length.
#[inline]
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], protocol: u8, length: u16) -> u16 {
    let words = [
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
        u16::from(protocol),
        length,
    ];
    fold(words.iter().map(|&w| u64::from(w)).sum())
}

/// Pseudo-header sum for IPv6 upper layers (RFC 8200 section 8.1):
/// source, destination, 32-bit upper-layer length, next header.
#[inline]
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, length: u32) -> u16 {
    let addresses = combine(sum(src), sum(dst));
    let rest = fold(u64::from(length >> 16) + u64::from(length & 0xFFFF) + u64::from(next_header));
    combine(addresses, rest)
}

/// The value to store in a checksum field for a segment whose sum (with
/// the field zero) is `sum`.
#[inline]
pub fn finish(sum: u16) -> u16 {
    !sum
}

/// Whether a segment's sum, including its checksum field and pseudo-header,
/// is the all-ones value that means "intact".
#[inline]
pub fn is_valid(total: u16) -> bool {
    total == 0xFFFF
}

/// RFC 1624 equation 3: the new checksum after one 16-bit word of the
/// covered data changes from `old` to `new`: HC' = ~(~HC + ~m + m').
#[inline]
pub fn update(checksum: u16, old: u16, new: u16) -> u16 {
    !combine(combine(!checksum, !old), new)
}

#[cfg(test)]
pub(crate) mod reference {
    /// The obvious RFC 1071 loop, one big-endian word at a time.
    pub fn sum(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            acc += u32::from(word);
            acc = (acc & 0xFFFF) + (acc >> 16);
        }
        acc as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn rfc1071_worked_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(reference::sum(&data), 0xddf2);
    }

    #[test]
    fn matches_the_reference_at_every_length_and_alignment() {
        let data = noise(4096 + 64, 1);
        for len in (0..=300).chain([1399, 1400, 1401, 4095, 4096]) {
            for offset in 0..8 {
                let slice = &data[offset..offset + len];
                assert_eq!(
                    sum(slice),
                    reference::sum(slice),
                    "len {len} offset {offset}"
                );
            }
        }
    }

    #[test]
    fn the_portable_loop_matches_the_reference_too() {
        // `sum` takes the AVX2 copy on most x86-64 machines; the baseline
        // copy must be right as well.
        let data = noise(2048 + 8, 4);
        for len in (0..=200).chain([1399, 1400, 2048]) {
            for offset in [0, 1, 3] {
                let slice = &data[offset..offset + len];
                assert_eq!(sum_portable(slice), reference::sum(slice), "len {len}");
            }
        }
        let ones = vec![0xFF; 65535];
        assert_eq!(sum_portable(&ones), reference::sum(&ones));
    }

    #[test]
    fn lanes_do_not_lose_carries_on_all_ones() {
        // The worst case for carries: every word 0xFFFF.
        for len in [2, 32, 64, 1400, 65536, 65535] {
            let data = vec![0xFF; len];
            assert_eq!(sum(&data), reference::sum(&data), "len {len}");
        }
    }

    #[test]
    fn sums_of_even_pieces_combine() {
        let data = noise(2000, 2);
        for split in (0..2000).step_by(2) {
            let (a, b) = data.split_at(split);
            assert_eq!(combine(sum(a), sum(b)), sum(&data), "split {split}");
        }
    }

    #[test]
    fn a_real_ipv4_header_verifies_and_a_flipped_bit_does_not() {
        // IPv4 header of draft-mcgrew-gcm-test-01 case 2 (checksum 4dcc).
        let mut header = [
            0x45, 0x00, 0x00, 0x3e, 0x69, 0x8f, 0x00, 0x00, 0x80, 0x11, 0x4d, 0xcc, 0xc0, 0xa8,
            0x01, 0x02, 0xc0, 0xa8, 0x01, 0x01,
        ];
        assert!(is_valid(sum(&header)));
        header[11] = 0;
        header[10] = 0;
        assert_eq!(finish(sum(&header)), 0x4dcc);
        header[15] ^= 0x04;
        assert!(!is_valid(combine(sum(&header), 0x4dcc)));
    }

    #[test]
    fn pseudo_headers_match_the_bytes_they_stand_for() {
        let (src4, dst4) = ([198, 18, 0, 1], [198, 19, 255, 254]);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src4);
        bytes.extend_from_slice(&dst4);
        bytes.extend_from_slice(&[0, 17, 0x05, 0xdc]);
        assert_eq!(
            pseudo_header_v4(src4, dst4, 17, 1500),
            reference::sum(&bytes)
        );

        let src6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst6: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 2,
        ];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src6);
        bytes.extend_from_slice(&dst6);
        bytes.extend_from_slice(&70_000u32.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 58]);
        assert_eq!(
            pseudo_header_v6(&src6, &dst6, 58, 70_000),
            reference::sum(&bytes)
        );
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        let mut data = noise(64, 3);
        data[10] = 0;
        data[11] = 0;
        let checksum = finish(sum(&data));
        for (i, seed) in (0..32).zip(100u64..) {
            let at = 2 * (i % 32);
            if at == 10 {
                continue;
            }
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            let new = noise(2, seed);
            let mut changed = data.clone();
            changed[at..at + 2].copy_from_slice(&new);
            let new = u16::from_be_bytes([new[0], new[1]]);
            let updated = update(checksum, old, new);
            changed[10..12].copy_from_slice(&updated.to_be_bytes());
            assert!(is_valid(sum(&changed)), "word {at}");
        }
    }
}
