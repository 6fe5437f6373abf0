//! Matrix-vector (and few-rows) product for Q4_1 weights, the decoding hot path of
//! SmolLM2-135M-Instruct.Q4_1. candle 0.11.1 has no SIMD kernel for Q4_1 (its
//! `vec_dot` for it is the scalar reference code), so a few rows per token
//! dominated decoding. This is ggml's scheme (`ggml_vec_dot_q4_1_q8_1`):
//! the input row is quantized to 8 bits per block of 32 with its scale and
//! the block's sum (`qdot`), and each weight block contributes
//! `d4·d8·Σ q4·q8 + m4·(d8·Σ q8)`; with AVX2 the integer products run 32
//! lanes at a time (`maddubs`).

use crate::kernels::qdot::{BlockFormat, Q8Block, MANY, QK};
use half::f16;

/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles
/// (element j in the low nibble of byte j, element j+16 in the high one).
pub const BLOCK_BYTES: usize = 20;

/// The Q4_1 format's kernels, for `qdot::matmul::<Q4_1>`.
pub struct Q4_1;

impl BlockFormat for Q4_1 {
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn dot_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
        let mut acc = 0f32;
        for (b, xb) in w.chunks_exact(BLOCK_BYTES).zip(x) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
            let mut sumi = 0i32;
            for j in 0..QK / 2 {
                let byte = b[4 + j];
                sumi += (byte & 0x0F) as i32 * xb.q[j] as i32;
                sumi += (byte >> 4) as i32 * xb.q[j + QK / 2] as i32;
            }
            acc += d * xb.d * sumi as f32 + m * xb.s;
        }
        acc
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
        dot_avx2(w, x)
    }

    fn dot_many(w: &[u8], xs: &[&[Q8Block]], out: &mut [f32], avx2: bool) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked by the caller).
            unsafe { dot_many_avx2(w, xs, out) };
            return;
        }
        for (o, x) in out.iter_mut().zip(xs) {
            *o = Self::dot(w, x, avx2);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (b, xb) in w.chunks_exact(BLOCK_BYTES).zip(x) {
        let (d, m) = crate::kernels::qdot::two_halves(b);
        // SAFETY: `b` holds 20 bytes, so 16 can be read at offset 4; `xb.q`
        // holds 32 bytes. Unaligned loads.
        let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let q4 = _mm256_set_m128i(hi, lo);
        let q8 = _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i);
        // u8 (≤ 15) × i8 pairs summed to i16: at most 2·15·128, no saturation.
        let p32 = crate::kernels::qdot::sum_u8_i8(q4, q8);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc);
        mins += m * xb.s;
    }
    crate::kernels::qdot::hsum(acc) + mins
}

/// `dot_avx2` of one weight row with up to `MANY` inputs: each block's
/// nibbles are unpacked once for all of them. Per input, the operations and
/// their order are `dot_avx2`'s, so each result equals it bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_many_avx2(w: &[u8], xs: &[&[Q8Block]], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let m = xs.len().min(MANY).min(out.len());
    let low = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); MANY];
    let mut mins = [0f32; MANY];
    for (bi, b) in w.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, mn) = crate::kernels::qdot::two_halves(b);
        // SAFETY: as in `dot_avx2`: 16 bytes at offset 4 of a 20-byte block.
        let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let q4 = _mm256_set_m128i(hi, lo);
        for j in 0..m {
            let xb = &xs[j][bi];
            // SAFETY: `xb.q` holds 32 bytes.
            let q8 = _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i);
            let p32 = crate::kernels::qdot::sum_u8_i8(q4, q8);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc[j]);
            mins[j] += mn * xb.s;
        }
    }
    for j in 0..m {
        let a = acc[j];
        out[j] = crate::kernels::qdot::hsum(a) + mins[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_1 blocks for `rows` × `k` random-ish values, and their f32 values.
    fn weights(rows: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        crate::kernels::qdot::testing::blocks(rows, k, seed, |next, d, bytes, vals| {
            let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
            bytes.extend(m.to_le_bytes());
            let nibbles: Vec<u8> = (0..QK).map(|_| (next() % 16) as u8).collect();
            for j in 0..QK / 2 {
                bytes.push(nibbles[j] | (nibbles[j + 16] << 4));
            }
            vals.extend(nibbles.iter().map(|&q| d * q as f32 + m.to_f32()));
        })
    }

    crate::kernels::qdot::kernel_proptests!(Q4_1);
}
