//! Matrix-vector (and few-rows) product for Q8_0 weights: the tied token
//! table that Qwen2.5-0.5B Q4_K_M multiplies every decoded token by (the
//! output projection, 151,936 × 896: 136 of about 410 MB read per token).
//! candle's own Q8_0 kernel is vectorized, but a product of this shape goes
//! through candle's generic driver (no repacked kernel for rows of 896);
//! here it runs through `qdot`'s driver like Q4_1 and Q5_0.
//! ggml's scheme (`ggml_vec_dot_q8_0_q8_0`): each weight block contributes
//! `dw·dx·Σ qw·qx`, the signed products 32 lanes at a time.

use crate::kernels::qdot::{BlockFormat, Q8Block};

/// Bytes of one Q8_0 block: f16 scale, then 32 signed bytes.
pub const BLOCK_BYTES: usize = 34;

/// The Q8_0 format's kernels, for `qdot::matmul::<Q8_0>`.
pub struct Q8_0;

// Batches (few rows) take `dot` per input (the trait's default): the same
// results, and batched decoding is not what CPU workers run.
impl BlockFormat for Q8_0 {
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn dot_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
        crate::kernels::qdot::dot_scaled_blocks(w, x, BLOCK_BYTES, |b, q| {
            b[2..]
                .iter()
                .zip(q)
                .map(|(&qw, &qx)| qw as i8 as i32 * qx as i32)
                .sum()
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
    let mut acc = _mm256_setzero_ps();
    for (b, xb) in w.chunks_exact(BLOCK_BYTES).zip(x) {
        let (d, _) = crate::kernels::qdot::two_halves(b);
        // SAFETY: `b` holds 34 bytes, so 32 can be read at offset 2; `xb.q`
        // holds 32 bytes. Unaligned loads.
        let qw = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
        let qx = _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i);
        acc = crate::kernels::qdot::fma_signed_products(acc, qw, qx, d * xb.d);
    }
    crate::kernels::qdot::hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qdot::QK;

    /// Q8_0 blocks for `rows` × `k` random-ish values, and their f32 values.
    fn weights(rows: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        crate::kernels::qdot::testing::blocks(rows, k, seed, |next, d, bytes, vals| {
            for _ in 0..QK {
                // The whole i8 range, -128 included.
                let q = (next() % 256) as u8;
                bytes.push(q);
                vals.push(d * q as i8 as f32);
            }
        })
    }

    crate::kernels::qdot::kernel_proptests!(Q8_0, candle: Q8_0);
}
