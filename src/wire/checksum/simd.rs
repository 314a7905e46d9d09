//! The explicit AVX2 loop of [`super::sum`], picked at run time.

use super::{combine, fold, sum_lanes};

/// [`sum_avx2`] if the CPU has AVX2, else None.
#[inline]
pub(super) fn sum_if_avx2(data: &[u8]) -> Option<u16> {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return None;
    }
    // SAFETY: the CPU (and OS) support AVX2, the only requirement of
    // `sum_avx2`'s target_feature attribute.
    Some(unsafe { sum_avx2(data) })
}

/// AVX2: per 32 bytes, one unaligned load, the eight 32-bit words
/// zero-extended to 64 bits by two unpacks against zero, and two 64-bit
/// adds into independent accumulators (four, with the loop unrolled
/// twice). The crate is built for baseline x86-64 and picks this at run
/// time; the last bytes (under 32) go through the portable loop.
#[target_feature(enable = "avx2")]
fn sum_avx2(data: &[u8]) -> u16 {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_setzero_si256, _mm256_storeu_si256,
        _mm256_unpackhi_epi32, _mm256_unpacklo_epi32,
    };
    let zero = _mm256_setzero_si256();
    let mut acc = [zero; 4];
    let mut pairs = data.chunks_exact(64);
    for pair in &mut pairs {
        for (half, acc) in pair.chunks_exact(32).zip(acc.chunks_exact_mut(2)) {
            // SAFETY: `half` is exactly 32 readable bytes; loadu has no
            // alignment requirement.
            let v = unsafe { _mm256_loadu_si256(half.as_ptr().cast::<__m256i>()) };
            acc[0] = _mm256_add_epi64(acc[0], _mm256_unpacklo_epi32(v, zero));
            acc[1] = _mm256_add_epi64(acc[1], _mm256_unpackhi_epi32(v, zero));
        }
    }
    let mut rest = pairs.remainder();
    if let Some((half, more)) = rest.split_first_chunk::<32>() {
        // SAFETY: `half` is exactly 32 readable bytes; loadu has no
        // alignment requirement.
        let v = unsafe { _mm256_loadu_si256(half.as_ptr().cast::<__m256i>()) };
        acc[0] = _mm256_add_epi64(acc[0], _mm256_unpacklo_epi32(v, zero));
        acc[1] = _mm256_add_epi64(acc[1], _mm256_unpackhi_epi32(v, zero));
        rest = more;
    }
    let mut total = 0u64;
    for a in acc {
        let mut words = [0u64; 4];
        // SAFETY: `words` is 32 writable bytes; storeu has no alignment
        // requirement.
        unsafe { _mm256_storeu_si256(words.as_mut_ptr().cast::<__m256i>(), a) };
        // Each word is below 2^45 for any slice under 2^35 bytes.
        total += words
            .iter()
            .map(|&w| (w & 0xFFFF_FFFF) + (w >> 32))
            .sum::<u64>();
    }
    // The rest (< 32 bytes) starts at an even offset, so its sum combines
    // directly.
    let vector = u16::from_be(fold(total));
    combine(vector, sum_lanes(rest))
}
