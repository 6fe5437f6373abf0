//! CPU kernels under the models: the quantized matrix-vector products
//! (`qdot`'s driver with `q4_1`, `q5_0`, `q8_0` and candle's K-quants in
//! `kquant`) and the attention loops over an f16 KV cache. Crate-private:
//! the models call them, and the one op another crate needs (the causal
//! softmax of the training pass) is re-exported at the crate root.

pub(crate) mod attention;
pub(crate) mod kquant;
pub(crate) mod q4_1;
pub(crate) mod q5_0;
pub(crate) mod q8_0;
pub(crate) mod qdot;
