//! The driver of recap's quantized matrix-vector kernels (`q4_1`, `q5_0`,
//! `q8_0`, and candle's K-quant dot products in `kquant`): candle 0.11.1 has
//! no SIMD `vec_dot` for Q4_1 and Q5_0 (its code for them is the scalar
//! reference), and they hold most of the weights a token reads in the
//! default models (SmolLM2: Q4_1; Qwen2.5-0.5B Q4_K_M: Q5_0). As in ggml,
//! the input row is quantized to 8 bits per block (of 32 here: scale, and
//! scale times the block's sum for formats with a minimum); each format
//! supplies the dot product of a weight row with it. Rows are split across
//! threads when the product is big enough ([`for_each_chunk`]).

pub const QK: usize = 32;
/// Weights from which a product is split across threads.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;

/// `f(c, chunk)` for each `chunk`-long piece of `out` (the last may be
/// shorter), split across candle's barrier pool: its threads spin a while
/// between tasks, so each of a decoded token's hundreds of small products
/// starts within microseconds, where waking rayon's sleeping threads cost
/// more than most of them take (so they ran on one thread, and SmolLM2
/// decoded at half of llama.cpp's speed). Every product of a decoded token
/// uses this one pool (these kernels, `kquant`, the decoder's attention):
/// with two pools, one's spinning threads held the cores the other needed.
pub fn for_each_chunk(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let (len, chunk) = (out.len(), chunk.max(1));
    // The base address as an integer: a raw pointer is not `Sync`.
    let base = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(chunk), |range| {
        for c in range {
            let start = c * chunk;
            let end = len.min(start + chunk);
            // SAFETY: `execute_chunked` hands out each index once, so the
            // pieces are disjoint ranges of `out`, which outlives the call
            // (it returns when every thread is done).
            let piece = unsafe {
                std::slice::from_raw_parts_mut((base as *mut f32).add(start), end - start)
            };
            f(c, piece);
        }
    });
}
/// Most inputs one pass over a weight row serves (accumulators in registers).
pub const MANY: usize = 8;

/// One block of the quantized input row.
#[derive(Clone, Copy)]
pub struct Q8Block {
    pub d: f32,
    /// d · Σ q, for the minimum's term.
    pub s: f32,
    pub q: [i8; QK],
}

/// The input row in blocks of 32 signed bytes, scale amax / 127: ggml's
/// Q8_0 and Q8_1, whose scale and scaled sum are stored as halves, so that
/// the products round as llama.cpp's (and, for Q5_0, candle's) do: with f32
/// scales, greedy decoding parted from llama.cpp's after 10 tokens instead
/// of 70.
pub fn quantize_row(x: &[f32]) -> Vec<Q8Block> {
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
                d: half::f16::from_f32(d).to_f32(),
                s: half::f16::from_f32(d * sum as f32).to_f32(),
                q,
            }
        })
        .collect()
}

pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The two halves at the start of a block (`bytes` holds at least 4), as
/// f32. One 32-bit load into a zeroed register: converting each half with
/// an insert into a register that holds a loop's accumulator chained every
/// block to the one before (a false dependency that cost Q4_1 a third of
/// its speed).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C (`has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn two_halves(bytes: &[u8]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let bits = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The sum of the eight lanes.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// `acc + scale·Σ a·b` over 32 pairs of signed bytes (ggml's
/// `mul_sum_i8_pairs`): |a| × (b with a's sign), so that `maddubs` (unsigned
/// × signed) serves; `a` must not hold -128 with `b` -128, and pairs of
/// products stay within i16 for |a| ≤ 128, |b| ≤ 127.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn fma_signed_products(
    acc: std::arch::x86_64::__m256,
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
    scale: f32,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let p32 = sum_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p32), acc)
}

/// The dot product in plain Rust of the formats whose block is an f16 scale
/// and 32 signed weights (Q5_0, Q8_0): Σ over blocks of `dw·dx·Σ qw·qx`,
/// where `signed_sum(block, input)` is the block's `Σ qw·qx`. (Their AVX2
/// loops stay apart: one loop shared through a closure decodes slower;
/// bench/RESULTS.md, "Inference against llama.cpp".)
pub fn dot_scaled_blocks(
    w: &[u8],
    x: &[Q8Block],
    block_bytes: usize,
    signed_sum: impl Fn(&[u8], &[i8; QK]) -> i32,
) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.chunks_exact(block_bytes).zip(x) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        acc += d * xb.d * signed_sum(b, &xb.q) as f32;
    }
    acc
}

/// Unsigned bytes `u` times signed bytes `s`, each four neighbouring
/// products summed into an i32 lane. The callers' pairs of products stay
/// within i16, so the AVX2 form (`maddubs`, which saturates pairs at i16,
/// then `madd`) and the VNNI one (`dpbusd`, one instruction, chosen where
/// the build targets a CPU with it: `-C target-cpu=native`) are equal.
///
/// # Safety
/// The CPU must have AVX2 (and VNNI where the build enables it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn sum_u8_i8(
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
    #[cfg(all(
        target_feature = "avxvnni",
        not(all(target_feature = "avx512vnni", target_feature = "avx512vl"))
    ))]
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
    #[allow(unreachable_code)]
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// A weight format's kernels: the dot product of one weight row
/// (`BLOCK_BYTES` per block of 32) with a quantized input row, and the same
/// for up to `MANY` inputs at once, equal to `dot` bit for bit. A trait, not
/// function pointers: short rows (576 values in SmolLM2) make an indirect
/// call per row cost about a tenth of the decode.
pub trait BlockFormat {
    const BLOCK_BYTES: usize;
    /// The dot product in plain Rust, for any CPU (and the tests' reference).
    fn dot_scalar(w: &[u8], x: &[Q8Block]) -> f32;
    /// The same with AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C (`has_avx2`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_avx2(w: &[u8], x: &[Q8Block]) -> f32;
    /// `avx2`: the CPU has AVX2, FMA and F16C. Inlined into the row loop: a
    /// call per short row costs a tenth of the decode (measured on SmolLM2's
    /// 576-value rows).
    #[inline(always)]
    fn dot(w: &[u8], x: &[Q8Block], avx2: bool) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked by the caller).
            return unsafe { Self::dot_avx2(w, x) };
        }
        let _ = avx2;
        Self::dot_scalar(w, x)
    }
    fn dot_many(w: &[u8], xs: &[&[Q8Block]], out: &mut [f32], avx2: bool) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = Self::dot(w, x, avx2);
        }
    }
}

/// What [`matmul`] needs of a weight format: how it quantizes an input row
/// and the dot product of one weight row (`BLOCK_BYTES` per block of
/// `BLOCK_VALUES`) with it, alone and for several inputs (bit for bit the
/// same). Every [`BlockFormat`] is one; `kquant` adds candle's K-quants.
pub trait RowKernel {
    const BLOCK_VALUES: usize;
    const BLOCK_BYTES: usize;
    type Input: Sync;
    fn quantize(x: &[f32]) -> Vec<Self::Input>;
    fn dot_row(w: &[u8], x: &[Self::Input], avx2: bool) -> f32;
    fn dot_rows(w: &[u8], xs: &[&[Self::Input]], out: &mut [f32], avx2: bool) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = Self::dot_row(w, x, avx2);
        }
    }
}

impl<F: BlockFormat> RowKernel for F {
    const BLOCK_VALUES: usize = QK;
    const BLOCK_BYTES: usize = <F as BlockFormat>::BLOCK_BYTES;
    type Input = Q8Block;
    fn quantize(x: &[f32]) -> Vec<Q8Block> {
        quantize_row(x)
    }
    #[inline(always)]
    fn dot_row(w: &[u8], x: &[Q8Block], avx2: bool) -> f32 {
        F::dot(w, x, avx2)
    }
    fn dot_rows(w: &[u8], xs: &[&[Q8Block]], out: &mut [f32], avx2: bool) {
        F::dot_many(w, xs, out, avx2)
    }
}

/// `Y = X Wᵀ` for a few input rows (`xs` holds `m` rows of `k` values, as in
/// a batch of sequences decoding together); returns `m` rows of `n`. Each
/// weight row is read once for all inputs, while it sits in L1, and each
/// output is the same dot product that row gets alone.
pub fn matmul<F: RowKernel>(weights: &[u8], n: usize, k: usize, xs: &[f32]) -> Vec<f32> {
    debug_assert_eq!(k % F::BLOCK_VALUES, 0);
    let row_bytes = k / F::BLOCK_VALUES * F::BLOCK_BYTES;
    debug_assert_eq!(weights.len(), n * row_bytes);
    let xq: Vec<Vec<F::Input>> = xs.chunks_exact(k).map(F::quantize).collect();
    let m = xq.len();
    let avx2 = has_avx2();
    // Computed weight row by weight row (n × m), then transposed.
    let mut yt = vec![0f32; n * m];
    const CHUNK: usize = 64;
    let inputs: Vec<&[F::Input]> = xq.iter().map(Vec::as_slice).collect();
    let rows = |c: usize, out: &mut [f32]| {
        for (i, o) in out.chunks_mut(m.max(1)).enumerate() {
            let r = c * CHUNK + i;
            let w = &weights[r * row_bytes..(r + 1) * row_bytes];
            if m == 1 {
                o[0] = F::dot_row(w, inputs[0], avx2);
                continue;
            }
            for (oc, xc) in o.chunks_mut(MANY).zip(inputs.chunks(MANY)) {
                F::dot_rows(w, xc, oc, avx2);
            }
        }
    };
    // Waking the pool costs more than a small product takes on one thread.
    if n * k * m >= PARALLEL_MIN_WEIGHTS {
        for_each_chunk(&mut yt, CHUNK * m.max(1), rows);
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

/// Checks both kernels' tests share (`q4_1`, `q5_0`).
/// The property tests every weight format's kernel passes, given the format
/// (`kernel_proptests!(Q4_1)`; with `candle: Q5_0`, also the check against
/// candle's reading of the blocks and its product) and its test `weights(rows, k, seed) ->
/// (blocks, values)` in scope: the product equals the scalar dot product of
/// each row and the f32 product (within the input quantization's error), and
/// rows multiplied together give, bit for bit, what each gives alone.
#[cfg(test)]
macro_rules! kernel_proptests {
    ($format:ty, candle: $dtype:ident) => {
        crate::kernels::qdot::kernel_proptests!($format);

        #[test]
        fn blocks_and_products_equal_candles() {
            let (n, k) = (64, 896);
            let (w, vals) = weights(n, k, 11);
            let r = crate::kernels::qdot::testing::check_against_candle(
                candle_core::quantized::GgmlDType::$dtype,
                (&w, &vals),
                (n, k),
                crate::kernels::qdot::matmul::<$format>,
            );
            assert!(r.is_ok(), "{r:?}");
        }
    };
    ($format:ty) => {
        proptest::proptest! {
            #[test]
            fn matvec_matches_the_f32_product(
                rows in 1usize..80,
                blocks in 1usize..6,
                seed in proptest::prelude::any::<u32>(),
                x in proptest::collection::vec(-4f32..4.0, 192),
            ) {
                use crate::kernels::qdot::BlockFormat;
                let k = blocks * crate::kernels::qdot::QK;
                let (w, vals) = weights(rows, k, seed);
                let r = crate::kernels::qdot::testing::check_matvec(
                    crate::kernels::qdot::matmul::<$format>,
                    <$format>::dot_scalar,
                    <$format>::BLOCK_BYTES,
                    (&w, &vals),
                    rows,
                    &x[..k],
                );
                proptest::prop_assert!(r.is_ok(), "{:?}", r);
            }

            #[test]
            fn matmul_rows_equal_matvec(
                n in 1usize..150,
                m in 1usize..20,
                seed in proptest::prelude::any::<u32>(),
                x in proptest::collection::vec(-4f32..4.0, 20 * 96),
            ) {
                let (w, _) = weights(n, 96, seed);
                let r = crate::kernels::qdot::testing::check_rows_alone(
                    crate::kernels::qdot::matmul::<$format>, &w, n, 96, &x[..m * 96],
                );
                proptest::prop_assert!(r.is_ok(), "{:?}", r);
            }
        }
    };
}
#[cfg(test)]
pub(crate) use kernel_proptests;

#[cfg(test)]
pub mod testing {
    use super::{quantize_row, Q8Block, QK};

    /// A deterministic xorshift stream for test weights.
    pub fn xorshift(seed: u32) -> impl FnMut() -> u32 {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        }
    }

    /// Test weights of `rows` × `k` values: each block of 32 starts with a
    /// small random f16 scale `d`, then `block(next, d, bytes, values)`
    /// writes the rest of its bytes and its 32 values.
    pub fn blocks(
        rows: usize,
        k: usize,
        seed: u32,
        mut block: impl FnMut(&mut dyn FnMut() -> u32, f32, &mut Vec<u8>, &mut Vec<f32>),
    ) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut vals = Vec::new();
        let mut next = xorshift(seed);
        for _ in 0..rows * k / QK {
            let d = half::f16::from_f32((next() % 1000) as f32 / 20000.0);
            bytes.extend(d.to_le_bytes());
            block(&mut next, d.to_f32(), &mut bytes, &mut vals);
        }
        (bytes, vals)
    }

    /// `y = W x` from a kernel (`matvec`) against the f32 product of the
    /// weights' values `vals` (within the input quantization's error) and
    /// against the format's scalar dot product of each row.
    pub fn check_matvec(
        matvec: fn(&[u8], usize, usize, &[f32]) -> Vec<f32>,
        scalar: fn(&[u8], &[Q8Block]) -> f32,
        block_bytes: usize,
        (w, vals): (&[u8], &[f32]),
        rows: usize,
        x: &[f32],
    ) -> Result<(), String> {
        let k = x.len();
        let y = matvec(w, rows, k, x);
        let xq = quantize_row(x);
        let rb = k / QK * block_bytes;
        for r in 0..rows {
            let v = &vals[r * k..(r + 1) * k];
            let exact: f32 = v.iter().zip(x).map(|(a, b)| a * b).sum();
            let norm: f32 = v.iter().map(|a| a.abs()).sum::<f32>() * 4.0 / 127.0;
            if (y[r] - exact).abs() > norm + 1e-3 {
                return Err(format!("row {r}: {} vs the f32 product {exact}", y[r]));
            }
            let s = scalar(&w[r * rb..(r + 1) * rb], &xq);
            if (y[r] - s).abs() > 1e-3 * (1.0 + s.abs()) {
                return Err(format!("row {r}: simd {} vs scalar {s}", y[r]));
            }
        }
        Ok(())
    }

    /// Rows multiplied together give, bit for bit, what each gives alone
    /// with the same product: a batch of sequences decodes as each would.
    pub fn check_rows_alone(
        matmul: fn(&[u8], usize, usize, &[f32]) -> Vec<f32>,
        w: &[u8],
        n: usize,
        k: usize,
        xs: &[f32],
    ) -> Result<(), String> {
        let y = matmul(w, n, k, xs);
        if y.len() != xs.len() / k * n {
            return Err(format!(
                "{} outputs for {} rows of {n}",
                y.len(),
                xs.len() / k
            ));
        }
        for (j, row) in xs.chunks_exact(k).enumerate() {
            if y[j * n..(j + 1) * n] != matmul(w, n, k, row)[..] {
                return Err(format!("row {j} differs from its product alone"));
            }
        }
        Ok(())
    }

    /// Against candle, whose code a kernel replaces: candle dequantizes the
    /// blocks `w` to the values `vals` the test wrote (the layout), and its
    /// product (which quantizes the input the same way) equals the kernel's
    /// but for the order of the float sums.
    pub fn check_against_candle(
        dtype: candle_core::quantized::GgmlDType,
        (w, vals): (&[u8], &[f32]),
        (n, k): (usize, usize),
        matvec: fn(&[u8], usize, usize, &[f32]) -> Vec<f32>,
    ) -> Result<(), String> {
        use candle_core::quantized::{QMatMul, QStorage, QTensor};
        use candle_core::{Device, Module, Shape, Tensor};
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(w), &Device::Cpu, dtype)
            .map_err(|e| e.to_string())?;
        let t = QTensor::new(storage, Shape::from((n, k))).map_err(|e| e.to_string())?;
        let dequantized: Vec<f32> = t
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(|e| e.to_string())?;
        if dequantized != vals {
            return Err("candle reads other values from the blocks".into());
        }
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let theirs: Vec<f32> = QMatMul::from_qtensor(t)
            .and_then(|mm| mm.forward(&Tensor::from_slice(&x, (1, k), &Device::Cpu)?))
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(|e| e.to_string())?;
        for (r, (a, b)) in matvec(w, n, k, &x).iter().zip(&theirs).enumerate() {
            if (a - b).abs() > 1e-5 * (1.0 + b.abs()) {
                return Err(format!("row {r}: ours {a}, candle {b}"));
            }
        }
        Ok(())
    }
}
