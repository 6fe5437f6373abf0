//! The two loops of one decoded token's attention over a CPU KV cache held
//! as f16 (as llama.cpp holds it): decoding reads the whole cache for every
//! token, and at a meeting's length (1,000+ positions) that read, not the
//! arithmetic, bounds the speed; f16 halves it. Keys and values are
//! widened to f32 as they are read (F16C), and the sums are f32.
//! And the softmax of a prompt's attention scores, causal mask included.

use candle_core::{CpuStorage, InplaceOp1, Layout};
use half::f16;

/// The scaled, causally masked softmax of a prompt's attention scores, in
/// place: one pass per row instead of the tensor ops' three over a
/// heads × positions² buffer (scale, mask to -inf, softmax), and no
/// exponentials of the masked half. The scores are rows of `kv_len`, the
/// prompt's `seq_len` queries repeated for every head; the prompt follows
/// `kv_len - seq_len` cached positions, and query `i` sees keys
/// `0..=kv_len - seq_len + i` (`build_causal_mask`'s rule); the others get 0.
pub struct CausalSoftmax {
    pub seq_len: usize,
    pub scale: f32,
}

impl CausalSoftmax {
    pub fn apply(&self, scores: &mut [f32], kv_len: usize) {
        let first = kv_len.saturating_sub(self.seq_len);
        crate::kernels::qdot::for_each_chunk(scores, kv_len, |r, row| {
            let visible = (first + r % self.seq_len.max(1) + 1).min(row.len());
            let (seen, hidden) = row.split_at_mut(visible);
            let mut max = f32::NEG_INFINITY;
            for x in seen.iter_mut() {
                *x *= self.scale;
                max = max.max(*x);
            }
            for x in seen.iter_mut() {
                *x = (*x - max).exp();
            }
            hidden.fill(0.0);
            // Summed and divided as candle's softmax does (its SIMD sum over
            // the whole row, the masked zeros included), so that the result
            // is the tensor ops' to the bit: a rounding apart, greedy
            // decoding took other tokens at near-ties.
            let mut sum = 0.0f32;
            // SAFETY: `row` holds `row.len()` values and `sum` is one.
            unsafe {
                <f32 as candle_core::cpu::kernels::VecOps>::vec_reduce_sum(
                    row.as_ptr(),
                    &mut sum,
                    row.len(),
                )
            };
            for x in &mut row[..visible] {
                *x /= sum;
            }
        });
    }
}

impl InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("causal-softmax: contiguous f32 scores only");
        };
        let kv_len = layout.dims().last().copied().unwrap_or(0);
        if kv_len > 0 {
            self.apply(&mut data[start..end], kv_len);
        }
        Ok(())
    }
}

/// `q · k`, an f32 query against an f16 key. `simd`: the CPU has AVX2,
/// FMA and F16C (`qdot::has_avx2`).
#[inline]
pub fn dot(q: &[f32], k: &[f16], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller checked AVX2, FMA and F16C.
        return unsafe { dot_avx2(q, k) };
    }
    let _ = simd;
    q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
}

/// `out = Σ_t weights[t] · values[t]`, where value row `t` is
/// `values[t * stride..][..out.len()]`.
#[inline]
pub fn weighted_sum(out: &mut [f32], weights: &[f32], values: &[f16], stride: usize, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller checked AVX2, FMA and F16C.
        return unsafe { weighted_sum_avx2(out, weights, values, stride) };
    }
    let _ = simd;
    out.fill(0.0);
    for (t, p) in weights.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&values[t * stride..]) {
            *o += p * v.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(q: &[f32], k: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len().min(k.len());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: every load reads 16 values below `n` of both slices.
    while i + 16 <= n {
        let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
        let k1 = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i + 8) as *const __m128i));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8)), k1, a1);
        i += 16;
    }
    let mut sum = crate::kernels::qdot::hsum(_mm256_add_ps(a0, a1));
    for j in i..n {
        sum += q[j] * k[j].to_f32();
    }
    sum
}

/// 16 lanes of the output at a time, held in registers over all positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2(out: &mut [f32], weights: &[f32], values: &[f16], stride: usize) {
    use std::arch::x86_64::*;
    let d = out.len();
    let rows = weights.len();
    assert!(rows == 0 || values.len() >= (rows - 1) * stride + d);
    let mut c = 0;
    while c + 16 <= d {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (t, p) in weights.iter().enumerate() {
            // SAFETY: row t's lanes c..c+16 lie within `values` (asserted).
            let v = values.as_ptr().add(t * stride + c);
            let p = _mm256_set1_ps(*p);
            a0 = _mm256_fmadd_ps(p, _mm256_cvtph_ps(_mm_loadu_si128(v as *const __m128i)), a0);
            a1 = _mm256_fmadd_ps(
                p,
                _mm256_cvtph_ps(_mm_loadu_si128(v.add(8) as *const __m128i)),
                a1,
            );
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(c), a0);
        _mm256_storeu_ps(out.as_mut_ptr().add(c + 8), a1);
        c += 16;
    }
    for (j, o) in out.iter_mut().enumerate().skip(c) {
        *o = weights
            .iter()
            .enumerate()
            .map(|(t, p)| p * values[t * stride + j].to_f32())
            .sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f32, b: f32, scale: f32) -> bool {
        (a - b).abs() <= 1e-5 * (1.0 + scale)
    }

    proptest! {
        #[test]
        fn simd_dot_equals_the_plain_one(
            q in proptest::collection::vec(-4f32..4.0, 1..200),
            seed in any::<u32>(),
        ) {
            let mut next = crate::kernels::qdot::testing::xorshift(seed);
            let k: Vec<f16> = q.iter().map(|_| f16::from_f32((next() % 2001) as f32 / 500.0 - 2.0)).collect();
            let plain = dot(&q, &k, false);
            let scale: f32 = q.iter().zip(&k).map(|(a, b)| (a * b.to_f32()).abs()).sum();
            prop_assert!(close(dot(&q, &k, crate::kernels::qdot::has_avx2()), plain, scale));
        }

        #[test]
        fn the_causal_softmax_weighs_each_querys_visible_keys(
            seq_len in 1usize..12,
            cached in 0usize..9,
            heads in 1usize..4,
            scale in 0.05f32..2.0,
            seed in any::<u32>(),
        ) {
            let kv_len = cached + seq_len;
            let mut next = crate::kernels::qdot::testing::xorshift(seed);
            let scores: Vec<f32> = (0..heads * seq_len * kv_len)
                .map(|_| (next() % 4001) as f32 / 100.0 - 20.0)
                .collect();
            let mut fused = scores.clone();
            CausalSoftmax { seq_len, scale }.apply(&mut fused, kv_len);
            for (r, (row, got)) in scores.chunks(kv_len).zip(fused.chunks(kv_len)).enumerate() {
                let visible = cached + r % seq_len + 1;
                let max = row[..visible].iter().map(|x| x * scale).fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f64> = row[..visible].iter().map(|x| f64::from(x * scale - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (j, g) in got.iter().enumerate() {
                    let want = if j < visible { (exps[j] / sum) as f32 } else { 0.0 };
                    prop_assert!((g - want).abs() <= 1e-5, "row {} key {}: {} vs {}", r, j, g, want);
                }
            }
        }

        #[test]
        fn simd_weighted_sum_equals_the_plain_one(
            d in 1usize..80,
            extra in 0usize..20,
            rows in 0usize..40,
            seed in any::<u32>(),
        ) {
            let stride = d + extra;
            let mut next = crate::kernels::qdot::testing::xorshift(seed);
            let weights: Vec<f32> = (0..rows).map(|_| (next() % 1000) as f32 / 1000.0).collect();
            let values: Vec<f16> = (0..rows * stride)
                .map(|_| f16::from_f32((next() % 2001) as f32 / 500.0 - 2.0))
                .collect();
            let (mut plain, mut simd) = (vec![1f32; d], vec![1f32; d]);
            weighted_sum(&mut plain, &weights, &values, stride, false);
            weighted_sum(&mut simd, &weights, &values, stride, crate::kernels::qdot::has_avx2());
            for j in 0..d {
                let scale: f32 = (0..rows).map(|t| (weights[t] * values[t * stride + j].to_f32()).abs()).sum();
                prop_assert!(close(simd[j], plain[j], scale), "lane {}: {} vs {}", j, simd[j], plain[j]);
            }
        }
    }
}
