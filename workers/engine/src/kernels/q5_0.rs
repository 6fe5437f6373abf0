//! Matrix-vector (and few-rows) product for Q5_0 weights, which hold most of
//! what a decoded token reads in Qwen2.5-0.5B Q4_K_M (attention and the
//! feed-forward gate and up projections: 190 of about 410 MB per token).
//! candle 0.11.1 computes Q5_0 with its scalar reference `vec_dot`. This is
//! ggml's scheme (`ggml_vec_dot_q5_0_q8_0`): the input row in 8-bit blocks
//! (`qdot`), and each weight block contributes `d5·d8·Σ (q5 − 16)·q8`; with
//! AVX2 the fifth bits are spread to bytes by a shuffle and a compare, and
//! the signed products run 32 lanes at a time.

use crate::kernels::qdot::{BlockFormat, Q8Block, QK};

/// Bytes of one Q5_0 block: f16 scale, 32 fifth bits (bit j for element j),
/// 16 bytes of low nibbles (element j in the low nibble of byte j, element
/// j+16 in the high one).
pub const BLOCK_BYTES: usize = 22;

/// The Q5_0 format's kernels, for `qdot::matmul::<Q5_0>`.
pub struct Q5_0;

// Batches (few rows) take `dot` per input (the trait's default): the same
// results, and batched decoding is not what CPU workers run.
impl BlockFormat for Q5_0 {
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn dot_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
        crate::kernels::qdot::dot_scaled_blocks(w, x, BLOCK_BYTES, |b, q| {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let mut sumi = 0i32;
            for j in 0..QK / 2 {
                let byte = b[6 + j];
                let lo = (byte & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
                let hi = (byte >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
                sumi += (lo - 16) * q[j] as i32 + (hi - 16) * q[j + QK / 2] as i32;
            }
            sumi
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
        dot_avx2(w, x)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    // Byte j of the spread bits takes bit j of the 32: each byte first gets
    // the bits' byte j/8, then every bit but j%8 set; all ones iff bit j.
    let spread = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let all = _mm256_set1_epi8(-1);
    let high_nibble = _mm256_set1_epi8(0xF0u8 as i8);
    let mut acc = _mm256_setzero_ps();
    for (b, xb) in w.chunks_exact(BLOCK_BYTES).zip(x) {
        // The block's scale (the second half read is part of `qh`).
        let (d, _) = crate::kernels::qdot::two_halves(b);
        let qh = i32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        // SAFETY: `b` holds 22 bytes, so 16 can be read at offset 6; `xb.q`
        // holds 32 bytes. Unaligned loads.
        let packed = _mm_loadu_si128(b.as_ptr().add(6) as *const __m128i);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let q4 = _mm256_set_m128i(hi, lo);
        let bits = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh), spread), others);
        let bits = _mm256_cmpeq_epi8(bits, all);
        // q5 − 16 as i8: a clear fifth bit makes the nibble negative
        // (nibble | 0xF0 = nibble − 16); a set one leaves nibble = q5 − 16.
        let q5 = _mm256_or_si256(q4, _mm256_andnot_si256(bits, high_nibble));
        let q8 = _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i);
        acc = crate::kernels::qdot::fma_signed_products(acc, q5, q8, d * xb.d);
    }
    crate::kernels::qdot::hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q5_0 blocks for `rows` × `k` random-ish values, and their f32 values.
    fn weights(rows: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        crate::kernels::qdot::testing::blocks(rows, k, seed, |next, d, bytes, vals| {
            let q: Vec<u8> = (0..QK).map(|_| (next() % 32) as u8).collect();
            let qh = q
                .iter()
                .enumerate()
                .fold(0u32, |h, (j, &v)| h | (((v >> 4) as u32) << j));
            bytes.extend(qh.to_le_bytes());
            for j in 0..QK / 2 {
                bytes.push((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
            }
            vals.extend(q.iter().map(|&v| d * (v as f32 - 16.0)));
        })
    }

    crate::kernels::qdot::kernel_proptests!(Q5_0, candle: Q5_0);
}
