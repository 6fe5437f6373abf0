//! Matrix-vector (and few-rows) product for Q4_1 weights, the decoding hot path of
//! SmolLM2-135M-Instruct.Q4_1. candle 0.11.1 has no SIMD kernel for Q4_1 (its
//! `vec_dot` for it is the scalar reference code), so a few rows per token
//! dominated decoding. This is ggml's scheme (`ggml_vec_dot_q4_1_q8_1`):
//! the input row is quantized to 8 bits per block of 32 with its scale and
//! the block's sum, and each weight block contributes
//! `d4·d8·Σ q4·q8 + m4·(d8·Σ q8)`; with AVX2 the integer products run 32
//! lanes at a time (`maddubs`). Rows are split across rayon's threads.

use half::f16;
use rayon::prelude::*;

const QK: usize = 32;
/// Weights from which a product is split across threads.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 21;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles
/// (element j in the low nibble of byte j, element j+16 in the high one).
pub const BLOCK_BYTES: usize = 20;

/// One block of the quantized input row.
#[derive(Clone, Copy)]
struct Q8Block {
    d: f32,
    /// d · Σ q, for the minimum's term.
    s: f32,
    q: [i8; QK],
}

fn quantize_row(x: &[f32]) -> Vec<Q8Block> {
    x.chunks_exact(QK)
        .map(|c| {
            let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0i8; QK];
            let mut sum = 0i32;
            for (o, v) in q.iter_mut().zip(c) {
                *o = (v * id).round() as i8;
                sum += *o as i32;
            }
            Q8Block {
                d,
                s: d * sum as f32,
                q,
            }
        })
        .collect()
}

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
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (b, xb) in w.chunks_exact(BLOCK_BYTES).zip(x) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
        // SAFETY: `b` holds 20 bytes, so 16 can be read at offset 4; `xb.q`
        // holds 32 bytes. Unaligned loads.
        let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let q4 = _mm256_set_m128i(hi, lo);
        let q8 = _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i);
        // u8 (≤ 15) × i8 pairs summed to i16: at most 2·15·128, no saturation.
        let p16 = _mm256_maddubs_epi16(q4, q8);
        let p32 = _mm256_madd_epi16(p16, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc);
        mins += m * xb.s;
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h) + mins
}

/// Most inputs one pass over a weight row serves (accumulators in registers).
const MANY: usize = 8;

/// `dot_avx2` of one weight row with up to `MANY` inputs: each block's
/// nibbles are unpacked once for all of them. Per input, the operations and
/// their order are `dot_avx2`'s, so each result equals it bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_many_avx2(w: &[u8], xs: &[&[Q8Block]], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let m = xs.len().min(MANY).min(out.len());
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); MANY];
    let mut mins = [0f32; MANY];
    for (bi, b) in w.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mn = f16::from_le_bytes([b[2], b[3]]).to_f32();
        // SAFETY: as in `dot_avx2`: 16 bytes at offset 4 of a 20-byte block.
        let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let q4 = _mm256_set_m128i(hi, lo);
        for j in 0..m {
            let xb = &xs[j][bi];
            // SAFETY: `xb.q` holds 32 bytes.
            let q8 = _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i);
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc[j]);
            mins[j] += mn * xb.s;
        }
    }
    for j in 0..m {
        let a = acc[j];
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        out[j] = _mm_cvtss_f32(h) + mins[j];
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot(w: &[u8], x: &[Q8Block], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
        return unsafe { dot_avx2(w, x) };
    }
    let _ = avx2;
    dot_scalar(w, x)
}

/// `y = W x` for one input row: `weights` holds `n` rows of `k` Q4_1 values
/// (`k` a multiple of 32), `x` has `k` values; returns `n` values.
pub fn matvec(weights: &[u8], n: usize, k: usize, x: &[f32]) -> Vec<f32> {
    matmul(weights, n, k, x)
}

/// `Y = X Wᵀ` for a few input rows (`xs` holds `m` rows of `k` values, as in
/// a batch of sequences decoding together); returns `m` rows of `n`. Each
/// weight row is read once for all inputs, while it sits in L1, and each
/// output is the same dot product `matvec` computes for that row alone.
pub fn matmul(weights: &[u8], n: usize, k: usize, xs: &[f32]) -> Vec<f32> {
    debug_assert_eq!(k % QK, 0);
    let row_bytes = k / QK * BLOCK_BYTES;
    debug_assert_eq!(weights.len(), n * row_bytes);
    let xq: Vec<Vec<Q8Block>> = xs.chunks_exact(k).map(quantize_row).collect();
    let m = xq.len();
    let avx2 = has_avx2();
    // Computed weight row by weight row (n × m), then transposed.
    let mut yt = vec![0f32; n * m];
    const CHUNK: usize = 64;
    let inputs: Vec<&[Q8Block]> = xq.iter().map(Vec::as_slice).collect();
    let rows = |c: usize, out: &mut [f32]| {
        for (i, o) in out.chunks_mut(m.max(1)).enumerate() {
            let r = c * CHUNK + i;
            let w = &weights[r * row_bytes..(r + 1) * row_bytes];
            #[cfg(target_arch = "x86_64")]
            if avx2 && m > 1 {
                for (oc, xc) in o.chunks_mut(MANY).zip(inputs.chunks(MANY)) {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe { dot_many_avx2(w, xc, oc) };
                }
                continue;
            }
            for (oj, xj) in o.iter_mut().zip(&inputs) {
                *oj = dot(w, xj, avx2);
            }
        }
    };
    // Waking the pool costs more than a small product takes on one thread.
    if n * k * m >= PARALLEL_MIN_WEIGHTS {
        yt.par_chunks_mut(CHUNK * m.max(1))
            .enumerate()
            .for_each(|(c, out)| rows(c, out));
    } else {
        yt.chunks_mut(CHUNK * m.max(1))
            .enumerate()
            .for_each(|(c, out)| rows(c, out));
    }
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (r, row) in yt.chunks_exact(m).enumerate() {
        for (j, v) in row.iter().enumerate() {
            y[j * n + r] = *v;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Q4_1 blocks for `rows` × `k` random-ish values, and their f32 values.
    fn weights(rows: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut vals = Vec::new();
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        for _ in 0..rows * k / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 20000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
            bytes.extend(d.to_le_bytes());
            bytes.extend(m.to_le_bytes());
            let nibbles: Vec<u8> = (0..QK).map(|_| (next() % 16) as u8).collect();
            for j in 0..QK / 2 {
                bytes.push(nibbles[j] | (nibbles[j + 16] << 4));
            }
            vals.extend(nibbles.iter().map(|&q| d.to_f32() * q as f32 + m.to_f32()));
        }
        (bytes, vals)
    }

    proptest! {
        // Rows multiplied together give, bit for bit, what each gives
        // alone: a batch of sequences decodes exactly as each would.
        #[test]
        fn matmul_rows_equal_matvec(
            n in 1usize..150,
            m in 1usize..20,
            seed in any::<u32>(),
            x in proptest::collection::vec(-4f32..4.0, 20 * 96),
        ) {
            let k = 96;
            let (w, _) = weights(n, k, seed);
            let xs = &x[..m * k];
            let y = matmul(&w, n, k, xs);
            prop_assert_eq!(y.len(), m * n);
            for (j, row) in xs.chunks_exact(k).enumerate() {
                let alone = matvec(&w, n, k, row);
                prop_assert_eq!(&y[j * n..(j + 1) * n], alone.as_slice());
            }
        }
    }

    proptest! {
        // The SIMD kernel equals the scalar one, and both equal the f32
        // product within the input quantization's error.
        #[test]
        fn matvec_matches_the_f32_product(
            rows in 1usize..80,
            blocks in 1usize..6,
            seed in any::<u32>(),
            x in proptest::collection::vec(-4f32..4.0, 192),
        ) {
            let k = blocks * QK;
            let x = &x[..k];
            let (w, vals) = weights(rows, k, seed);
            let y = matvec(&w, rows, k, x);
            let xq = quantize_row(x);
            for r in 0..rows {
                let exact: f32 = vals[r * k..(r + 1) * k].iter().zip(x).map(|(a, b)| a * b).sum();
                let norm: f32 = vals[r * k..(r + 1) * k].iter().map(|a| a.abs()).sum::<f32>() * 4.0 / 127.0;
                prop_assert!((y[r] - exact).abs() <= norm + 1e-3, "row {r}: {} vs {exact}", y[r]);
                let rb = k / QK * BLOCK_BYTES;
                let scalar = dot_scalar(&w[r * rb..(r + 1) * rb], &xq);
                prop_assert!((y[r] - scalar).abs() <= 1e-3 * (1.0 + scalar.abs()), "row {r}: simd {} scalar {scalar}", y[r]);
            }
        }
    }
}
