//! K-quant products (Q4_K, Q5_K, Q6_K: Qwen2.5's `ffn_down` in a Q4_K_M
//! file) through `qdot`'s driver, with candle's own dot products (its AVX2
//! `vec_dot` against a Q8_K input row, ggml's scheme): each row's result is
//! then the one it gets alone whatever the rows (candle's several-row
//! kernels round otherwise), and the product is split the way the token's
//! other products are (`qdot::for_each_chunk`).

use crate::kernels::qdot::RowKernel;
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, GgmlType, QK_K};
use std::marker::PhantomData;

/// Candle's block types that any bytes are a valid value of.
///
/// # Safety
/// The type is `repr(C)` without padding, and every field is a number or
/// an array of numbers (u8, i8, f16): any bit pattern is a valid value.
pub unsafe trait PlainBlocks: GgmlType<VecDotType = BlockQ8K> + Sync {}
// SAFETY: `repr(C)`, fields f16 and u8 arrays; candle asserts the sizes
// (no padding).
unsafe impl PlainBlocks for BlockQ4K {}
// SAFETY: as Q4_K (f16, u8 arrays).
unsafe impl PlainBlocks for BlockQ5K {}
// SAFETY: as Q4_K (u8 and i8 arrays, f16).
unsafe impl PlainBlocks for BlockQ6K {}

/// The format of candle's block type `T`, for [`crate::kernels::qdot::matmul`].
pub struct KQuant<T>(PhantomData<T>);

impl<T: PlainBlocks> RowKernel for KQuant<T> {
    const BLOCK_VALUES: usize = QK_K;
    const BLOCK_BYTES: usize = std::mem::size_of::<T>();
    type Input = BlockQ8K;

    fn quantize(x: &[f32]) -> Vec<BlockQ8K> {
        let mut blocks = vec![BlockQ8K::zeros(); x.len() / QK_K];
        BlockQ8K::from_float(x, &mut blocks);
        blocks
    }

    #[inline(always)]
    fn dot_row(w: &[u8], x: &[BlockQ8K], _avx2: bool) -> f32 {
        // `matmul` hands rows that start aligned for `T`.
        debug_assert_eq!(w.as_ptr().align_offset(std::mem::align_of::<T>()), 0);
        // SAFETY: `T: PlainBlocks` (any bytes are valid blocks), the row is
        // aligned for `T` (checked by `matmul`, rows are whole blocks) and
        // the slice covers `w.len() / size_of::<T>()` whole blocks of `w`.
        let blocks = unsafe {
            std::slice::from_raw_parts(w.as_ptr().cast::<T>(), w.len() / std::mem::size_of::<T>())
        };
        T::vec_dot(x.len() * QK_K, blocks, x)
    }
}

/// `Y = X Wᵀ` for a weight in candle's blocks `T` (`weights` its raw bytes,
/// n × k), as [`crate::kernels::qdot::matmul`]. Bytes that are not aligned for `T`
/// (never candle's own storage) are copied once into an aligned buffer.
pub fn matmul<T: PlainBlocks>(weights: &[u8], n: usize, k: usize, xs: &[f32]) -> Vec<f32> {
    if weights.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
        return crate::kernels::qdot::matmul::<KQuant<T>>(weights, n, k, xs);
    }
    // u64 words: aligned for any of candle's block types.
    let mut words = vec![0u64; weights.len().div_ceil(8)];
    // SAFETY: `words` holds at least `weights.len()` bytes; u8 has no
    // invalid values and no alignment.
    let aligned =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), weights.len()) };
    aligned.copy_from_slice(weights);
    crate::kernels::qdot::matmul::<KQuant<T>>(aligned, n, k, xs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Weights of `n` rows of `k` values quantized by candle to `dtype`:
    /// the blocks' bytes and the values candle reads back from them.
    fn weights(dtype: GgmlDType, n: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let mut next = crate::kernels::qdot::testing::xorshift(seed);
        let vals: Vec<f32> = (0..n * k)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let back: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .expect("dequantize");
        (q.data().expect("data").into_owned(), back)
    }

    fn input(k: usize, seed: u32) -> Vec<f32> {
        let mut next = crate::kernels::qdot::testing::xorshift(seed);
        (0..k)
            .map(|_| (next() % 801) as f32 / 100.0 - 4.0)
            .collect()
    }

    /// The product equals candle's reference dot product of each row with
    /// the same quantized input (but for the order of float sums), and the
    /// f32 product within the input quantization's error.
    fn check<T: PlainBlocks>(dtype: GgmlDType) {
        let (n, k) = (40, 2 * QK_K);
        for seed in 1..4 {
            let (w, vals) = weights(dtype, n, k, seed);
            let x = input(k, seed + 100);
            let y = matmul::<T>(&w, n, k, &x);
            let xq = KQuant::<T>::quantize(&x);
            let rb = k / QK_K * std::mem::size_of::<T>();
            for r in 0..n {
                let mut blocks = vec![T::zeros(); k / QK_K];
                // SAFETY: `blocks` holds `rb` bytes of plain blocks.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        w[r * rb..].as_ptr(),
                        blocks.as_mut_ptr().cast::<u8>(),
                        rb,
                    )
                };
                let reference = T::vec_dot_unopt(k, &blocks, &xq);
                assert!(
                    (y[r] - reference).abs() <= 1e-4 * (1.0 + reference.abs()),
                    "{dtype:?} row {r}: {} vs candle's reference {reference}",
                    y[r]
                );
                let v = &vals[r * k..(r + 1) * k];
                let exact: f32 = v.iter().zip(&x).map(|(a, b)| a * b).sum();
                let bound: f32 = v.iter().map(|a| a.abs()).sum::<f32>() * 4.0 / 127.0;
                assert!(
                    (y[r] - exact).abs() <= bound + 1e-3,
                    "{dtype:?} row {r}: {} vs the f32 product {exact}",
                    y[r]
                );
            }
        }
    }

    #[test]
    fn q4k_rows_match_candles_dot_product_and_the_f32_product() {
        check::<BlockQ4K>(GgmlDType::Q4K);
    }

    #[test]
    fn q6k_rows_match_candles_dot_product_and_the_f32_product() {
        check::<BlockQ6K>(GgmlDType::Q6K);
    }

    #[test]
    fn q5k_rows_match_candles_dot_product_and_the_f32_product() {
        check::<BlockQ5K>(GgmlDType::Q5K);
    }

    #[test]
    fn rows_together_equal_rows_alone_and_misaligned_bytes_give_the_same() {
        let (n, k) = (70, 3 * QK_K);
        let (w, _) = weights(GgmlDType::Q4K, n, k, 7);
        let xs: Vec<f32> = (0..5).flat_map(|i| input(k, 50 + i)).collect();
        let r = crate::kernels::qdot::testing::check_rows_alone(matmul::<BlockQ4K>, &w, n, k, &xs);
        assert!(r.is_ok(), "{r:?}");
        // The same bytes one byte off their alignment.
        let mut shifted = vec![0u8; w.len() + 1];
        shifted[1..].copy_from_slice(&w);
        assert_eq!(
            matmul::<BlockQ4K>(&shifted[1..], n, k, &xs),
            matmul::<BlockQ4K>(&w, n, k, &xs)
        );
    }
}
