//! Dense GGUF decoders of the llama and qwen2 families.
//!
//! Adapted from candle-transformers 0.11.1 (`quantized_llama`,
//! `quantized_qwen2`; MIT or Apache-2.0, LICENSES/candle.txt) with two
//! changes, both for speed on CPU (bench/RESULTS.md has the before/after):
//!
//! - every weight goes through [`QLinear`]: a prompt-sized input (many rows)
//!   is multiplied as dequantize-then-GEMM, which runs at the f32 GEMM's
//!   speed, instead of candle's row-by-row quantized dot products (scalar
//!   code for Q4_1), but for K-quants on a CPU with VNNI, where candle's
//!   int8 GEMM is faster; a single row (decoding) keeps the quantized
//!   kernels, which read 4-5 bits a weight instead of 32;
//! - the model is cheap to clone and its KV cache is plain tensors (f16 on
//!   CPU), so a
//!   prefilled prefix can be forked: [`crate::models::llm`] prefills a transcript
//!   once and continues each summary kind from a clone.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::build_causal_mask;
use std::sync::Arc;

/// Rows from which a quantized matmul runs as dequantize + f32 GEMM: the
/// dequantization (one pass over the weight) is paid back once the GEMM
/// reuses each weight for enough rows.
pub const GEMM_MIN_ROWS: usize = 8;

/// `Y = X Wᵀ` on a weight's raw blocks: (blocks, out, in, rows of X) -> Y.
type RowsProduct = fn(&[u8], usize, usize, &[f32]) -> Vec<f32>;

/// A linear layer over a quantized weight (out × in), with an optional bias.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Arc<QTensor>,
    quantized: QMatMul,
    bias: Option<Tensor>,
    /// An unmerged LoRA adapter's `scale · B A`, as (Aᵀ, scale · Bᵀ).
    lora: Option<(Tensor, Tensor)>,
}

impl QLinear {
    pub fn new(weight: QTensor, bias: Option<Tensor>) -> Result<QLinear> {
        QLinear::shared(Arc::new(weight), bias)
    }

    /// Over a weight another part also holds (tied embeddings).
    fn shared(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<QLinear> {
        let quantized = QMatMul::from_arc(weight.clone())?;
        Ok(QLinear {
            weight,
            quantized,
            bias,
            lora: None,
        })
    }

    /// Adds `scale · B A` beside the weight (unmerged): the base's
    /// quantized kernels stay, and the adapter costs two thin products.
    fn adapt(&mut self, pair: &crate::models::adapter::LoraPair, scale: f64) -> Result<()> {
        let device = self.quantized_device();
        let a_t = pair.a.t()?.contiguous()?.to_device(&device)?;
        let b_t = (pair.b.t()?.contiguous()? * scale)?.to_device(&device)?;
        self.lora = Some((a_t, b_t));
        Ok(())
    }

    /// Folds `scale · B A` into the weight, kept as f32 (requantizing would
    /// round most of a small update away).
    fn merge(&mut self, pair: &crate::models::adapter::LoraPair, scale: f64) -> Result<()> {
        let device = self.quantized_device();
        let w = self.weight.dequantize(&device)?.to_device(&Device::Cpu)?;
        let delta = (pair.b.matmul(&pair.a)? * scale)?;
        let merged = Arc::new(QTensor::quantize_onto(
            &(w + delta)?,
            GgmlDType::F32,
            &device,
        )?);
        self.quantized = QMatMul::from_arc(merged.clone())?;
        self.weight = merged;
        self.lora = None;
        Ok(())
    }

    fn quantized_device(&self) -> Device {
        self.weight.device()
    }

    /// (out, in) of the weight.
    fn dims(&self) -> Result<(usize, usize)> {
        self.weight.shape().dims2()
    }

    /// Whether candle multiplies a prompt-sized input by this weight as an
    /// int8 GEMM with AVX-512 VNNI (its repacked x86 kernels, llama.cpp's
    /// scheme): K-quants whose shape its tiles take, on a CPU with VNNI.
    /// There it beats dequantize + f32 GEMM (Qwen2.5's `ffn_down`: prefill
    /// +10%, of which Q6_K's 3%), for the tiles candle keeps beside the
    /// blocks (Qwen: 65 MB for Q4_K, 70 MB for Q6_K); without VNNI candle's
    /// fallback was not measured to win, so the f32 GEMM stays.
    fn has_int8_gemm(&self) -> bool {
        let vnni = {
            #[cfg(target_arch = "x86_64")]
            {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        };
        let tiles = self
            .weight
            .shape()
            .dims2()
            .is_ok_and(|(n, k)| n % 16 == 0 && k % 256 == 0);
        vnni && tiles && matches!(self.weight.dtype(), GgmlDType::Q4K | GgmlDType::Q6K)
    }

    fn is_quantized(&self) -> bool {
        !matches!(
            self.weight.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        )
    }
}

impl QLinear {
    /// The product on the quantized weights, whatever the rows: each row's
    /// result is the one it would get alone (a decoding batch relies on it).
    fn forward_quantized(&self, x: &Tensor) -> Result<Tensor> {
        // recap's own kernels where candle's are scalar (see `qdot`), and
        // candle's K-quant dot products on recap's pool (see `kquant`).
        let own: Option<RowsProduct> = match self.weight.dtype() {
            GgmlDType::Q4_1 => Some(crate::kernels::qdot::matmul::<crate::kernels::q4_1::Q4_1>),
            GgmlDType::Q5_0 => Some(crate::kernels::qdot::matmul::<crate::kernels::q5_0::Q5_0>),
            GgmlDType::Q8_0 => Some(crate::kernels::qdot::matmul::<crate::kernels::q8_0::Q8_0>),
            GgmlDType::Q4K => Some(crate::kernels::kquant::matmul::<BlockQ4K>),
            GgmlDType::Q5K => Some(crate::kernels::kquant::matmul::<BlockQ5K>),
            GgmlDType::Q6K => Some(crate::kernels::kquant::matmul::<BlockQ6K>),
            _ => None,
        };
        let y = if let (Some(matmul), true) = (own, x.device().is_cpu()) {
            let (n, k) = self.weight.shape().dims2()?;
            let data = self.weight.data()?;
            let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let out = matmul(&data, n, k, &xs);
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            Tensor::from_vec(out, dims, x.device())?
        } else {
            self.quantized.forward(x)?
        };
        self.add_bias(x, y)
    }

    /// The bias and an unmerged adapter's product of `x`, added to `y`.
    fn add_bias(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let y = match &self.lora {
            Some((a_t, b_t)) => {
                let x = x.to_dtype(a_t.dtype())?;
                (y + x.broadcast_matmul(a_t)?.broadcast_matmul(b_t)?)?
            }
            None => y,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        if rows >= GEMM_MIN_ROWS && x.device().is_cpu() && self.has_int8_gemm() {
            return self.add_bias(x, self.quantized.forward(x)?);
        }
        if rows >= GEMM_MIN_ROWS && self.is_quantized() && x.device().is_cpu() {
            let w = self.weight.dequantize(x.device())?;
            return self.add_bias(x, x.broadcast_matmul(&w.t()?)?);
        }
        self.forward_quantized(x)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    wq: QLinear,
    wk: QLinear,
    wv: QLinear,
    wo: QLinear,
    gate: QLinear,
    down: QLinear,
    up: QLinear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// NEOX RoPE (pairs i, i+d/2: qwen2) or interleaved (pairs 2i, 2i+1:
    /// llama GGUFs, whose q/k weights the converter permuted).
    rope_neox: bool,
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    kv_cache: KvCache,
}

/// A layer's keys and values, (batch, kv heads, capacity, head dim), f16 on
/// CPU (the input's dtype elsewhere), filled in place up to `len`. Appending copies only the new positions (candle's
/// models concatenate, copying the whole cache every token). Clones share
/// the buffers: a fork continues from a prefix by writing past it, and forks
/// run one after another, so none overwrites what another still reads.
#[derive(Debug, Clone, Default)]
struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl KvCache {
    /// Appends at `pos` (positions from `pos` on are replaced) and returns
    /// views of the keys and values up to the new end, in the cache's dtype.
    fn append(&mut self, k: &Tensor, v: &Tensor, pos: usize) -> Result<(Tensor, Tensor)> {
        let (b, h, n, d) = k.dims4()?;
        let need = pos + n;
        let cap = self.k.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        // f16 on CPU: decoding reads the whole cache every token, and that
        // read bounds its speed at a meeting's length (`attention`).
        let dtype = if k.device().is_cpu() {
            DType::F16
        } else {
            k.dtype()
        };
        if need > cap || pos > self.len {
            let new_cap = need.max(cap * 2).max(256).next_multiple_of(64);
            let nk = Tensor::zeros((b, h, new_cap, d), dtype, k.device())?;
            let nv = Tensor::zeros((b, h, new_cap, d), dtype, v.device())?;
            let keep = self.len.min(pos);
            if keep > 0 {
                if let (Some(ok), Some(ov)) = (&self.k, &self.v) {
                    nk.slice_set(&ok.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&ov.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
                }
            }
            self.k = Some(nk);
            self.v = Some(nv);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => candle_core::bail!("kv cache buffers missing"),
        };
        kb.slice_set(&k.to_dtype(dtype)?.contiguous()?, 2, pos)?;
        vb.slice_set(&v.to_dtype(dtype)?.contiguous()?, 2, pos)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

impl Layer {
    fn rope(&self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_b, _h, seq_len, _d) = x.dims4()?;
        let cos = self.cos.narrow(0, index_pos, seq_len)?;
        let sin = self.sin.narrow(0, index_pos, seq_len)?;
        let x = x.contiguous()?;
        if self.rope_neox {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        }
    }

    /// RoPE for one new token of each of several sequences, (n, heads, 1,
    /// head dim), each at its own position: one kernel for all (the angles
    /// gathered per row); per element the arithmetic of `rope`.
    fn rope_rows(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(positions, 0)?.reshape((n, 1, half))?;
        let sin = self.sin.index_select(positions, 0)?.reshape((n, 1, half))?;
        let x = x.contiguous()?;
        if self.rope_neox {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        }
    }

    fn attention(&mut self, x: &Tensor, mask: Option<&Tensor>, index_pos: usize) -> Result<Tensor> {
        let (b, seq_len, n_embd) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, seq_len, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.wq.forward(x)?, self.n_head)?;
        let k = heads(self.wk.forward(x)?, self.n_kv_head)?;
        let v = heads(self.wv.forward(x)?, self.n_kv_head)?;
        let q = self.rope(&q, index_pos)?;
        let k = self.rope(&k, index_pos)?;
        let (k, v) = self.kv_cache.append(&k, &v, index_pos)?;
        let kv_len = k.dim(2)?;
        if seq_len == 1 && b == 1 && q.device().is_cpu() {
            let y = self.attend_one(&q, kv_len)?;
            return self.wo.forward(&y.reshape((1, 1, n_embd))?);
        }
        self.wo.forward(&self.attend(&q, &k, &v, mask)?)
    }

    /// Attention of the queries, (batch, heads, positions, head dim), over
    /// keys and values with tensor ops, as (batch, positions, heads × head
    /// dim). Grouped-query attention without copying keys and values per
    /// query head: the query heads that share a KV head become extra rows.
    /// Also a decoding batch's path on devices whose caches the host cannot
    /// read (`attend_one` on CPU). `mask`: the prompt's causal mask, used
    /// off the CPU only; on CPU the fused softmax applies the same rule from
    /// the positions (the queries follow `kv_len - seq_len` cached ones; one
    /// token sees them all), so no mask is built there.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, seq_len, _) = q.dims4()?;
        let kv_len = k.dim(2)?;
        let n_rep = self.n_head / self.n_kv_head;
        // The cache's f16 (CPU) widened for the products.
        let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
        let q = q.reshape((b, self.n_kv_head, n_rep * seq_len, self.head_dim))?;
        let scores = q.matmul(&k.t()?)?;
        let att = if scores.device().is_cpu() {
            scores.inplace_op1(&crate::kernels::attention::CausalSoftmax {
                seq_len,
                // As the tensor path's division by √d rounds it.
                scale: (1.0 / (self.head_dim as f64).sqrt()) as f32,
            })?;
            scores
        } else {
            let att = (scores / (self.head_dim as f64).sqrt())?;
            let att = match mask {
                None => att,
                Some(mask) => {
                    let shape = (b, self.n_kv_head, n_rep, seq_len, kv_len);
                    let att = att.reshape(shape)?;
                    let mask = mask.broadcast_as(shape)?;
                    mask.where_cond(&self.neg_inf.broadcast_as(shape)?, &att)?
                        .reshape((b, self.n_kv_head, n_rep * seq_len, kv_len))?
                }
            };
            candle_nn::ops::softmax_last_dim(&att)?
        };
        att.matmul(v)?
            .reshape((b, self.n_head, seq_len, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, seq_len, self.n_head * self.head_dim))
    }

    /// Attention of one new token over the cache, straight on the buffers:
    /// candle's GEMM spends most of such a tiny product packing operands.
    /// The query heads that share a KV head read each cached key and value
    /// once, together (Qwen2.5-0.5B: 7 heads a KV head; reading the cache
    /// once per query head made decoding memory-bound), and each KV head's
    /// positions are cut into pieces for the pool's threads.
    fn attend_one(&self, q: &Tensor, kv_len: usize) -> Result<Tensor> {
        let (kb, vb) = match (&self.kv_cache.k, &self.kv_cache.v) {
            (Some(k), Some(v)) => (k, v),
            _ => candle_core::bail!("kv cache buffers missing"),
        };
        let cap = kb.dim(2)?;
        let d = self.head_dim;
        let n_rep = self.n_head / self.n_kv_head;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let (ks, _) = kb.storage_and_layout();
        let (vs, _) = vb.storage_and_layout();
        let (ks, vs) = match (&*ks, &*vs) {
            (candle_core::Storage::Cpu(k), candle_core::Storage::Cpu(v)) => {
                (k.as_slice::<half::f16>()?, v.as_slice::<half::f16>()?)
            }
            _ => candle_core::bail!("attend_one runs on CPU f16 caches"),
        };
        let simd = crate::kernels::qdot::has_avx2();
        let scale = 1.0 / (d as f32).sqrt();
        // Each KV head's positions in `splits` pieces, so that the pieces
        // share the pool's threads evenly (SmolLM2's 3 KV heads on 2 threads
        // left one idle a third of the time); merged as flash-decoding does.
        let threads = candle_core::utils::barrier_pool().n_workers() + 1;
        let splits = (threads / gcd(self.n_kv_head, threads))
            .min(kv_len / 64)
            .max(1);
        // A piece's result per query head of its group: the sum of the
        // values weighted by exp(score - max) (d values), the max, the sum
        // of the weights.
        let per_head = d + 2;
        let per_piece = n_rep * per_head;
        let piece = |p: usize, part: &mut [f32]| {
            let (kvh, s) = (p / splits, p % splits);
            let (lo, hi) = (kv_len * s / splits, kv_len * (s + 1) / splits);
            let base = kvh * cap * d;
            let qs = &q[kvh * n_rep * d..(kvh + 1) * n_rep * d];
            // scores[r * n + i]: query head r of the group, position lo + i.
            let n = hi - lo;
            let mut scores = vec![0f32; n_rep * n];
            for t in lo..hi {
                let kr = &ks[base + t * d..base + (t + 1) * d];
                for (r, qh) in qs.chunks_exact(d).enumerate() {
                    scores[r * n + t - lo] = crate::kernels::attention::dot(qh, kr, simd) * scale;
                }
            }
            for (row, out) in scores
                .chunks_exact_mut(n)
                .zip(part.chunks_exact_mut(per_head))
            {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
                let mut sum = 0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                crate::kernels::attention::weighted_sum(
                    &mut out[..d],
                    row,
                    &vs[base + lo * d..],
                    d,
                    simd,
                );
                out[d] = max;
                out[d + 1] = sum;
            }
        };
        let mut parts = vec![0f32; self.n_kv_head * splits * per_piece];
        // Waking the pool costs more than a short cache takes on one thread.
        if self.n_head * kv_len * d >= 1 << 16 {
            crate::kernels::qdot::for_each_chunk(&mut parts, per_piece, piece);
        } else {
            for (p, part) in parts.chunks_mut(per_piece).enumerate() {
                piece(p, part);
            }
        }
        let mut out = vec![0f32; self.n_head * d];
        for (h, oh) in out.chunks_exact_mut(d).enumerate() {
            let (kvh, r) = (h / n_rep, h % n_rep);
            let of = |s: usize| {
                let at = (kvh * splits + s) * per_piece + r * per_head;
                &parts[at..at + per_head]
            };
            let max = (0..splits).fold(f32::NEG_INFINITY, |m, s| m.max(of(s)[d]));
            let mut sum = 0f32;
            for s in 0..splits {
                let part = of(s);
                let w = (part[d] - max).exp();
                sum += part[d + 1] * w;
                for (o, a) in oh.iter_mut().zip(&part[..d]) {
                    *o += a * w;
                }
            }
            for o in oh.iter_mut() {
                *o /= sum;
            }
        }
        Tensor::from_vec(out, (1, 1, self.n_head * d), self.cos.device())
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }

    /// `mlp` on the quantized kernels (a decoding batch's rows).
    fn mlp_quantized(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward_quantized(x)?)?;
        self.down
            .forward_quantized(&(gate * self.up.forward_quantized(x)?)?)
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Token embeddings. On CPU the table stays quantized and each looked-up
/// row is dequantized (the values a dequantized table holds): as f32,
/// Qwen2.5-0.5B's 151,936 × 896 table alone took 545 MB of the process's
/// memory (75 MB as Q5_0). Other devices keep the f32 table and gather.
#[derive(Debug, Clone)]
enum TokenEmbedding {
    QuantizedRows { table: Arc<QTensor>, n_embd: usize },
    Dense(Embedding),
}

impl TokenEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (table, n_embd) = match self {
            TokenEmbedding::Dense(e) => return e.forward(ids),
            TokenEmbedding::QuantizedRows { table, n_embd } => (table, *n_embd),
        };
        let (vocab, width) = table.shape().dims2()?;
        let data = table.data()?;
        let row_bytes = data.len() / vocab.max(1);
        let mut rows = Vec::with_capacity(ids.elem_count());
        for id in ids.flatten_all()?.to_vec1::<u32>()? {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("token id {id} outside the vocabulary of {vocab}");
            }
            let bytes = &data[id * row_bytes..(id + 1) * row_bytes];
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(bytes),
                &Device::Cpu,
                table.dtype(),
            )?;
            rows.push(QTensor::new(storage, (1, width))?.dequantize(&Device::Cpu)?);
        }
        let mut dims = ids.dims().to_vec();
        dims.push(n_embd);
        Tensor::cat(&rows, 0)?.reshape(dims)
    }
}

/// The shapes and constants of a dense llama- or qwen2-family GGUF, as
/// its metadata gives them (the serving decoder and fine-tuning read the
/// same).
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: String,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub eps: f64,
    pub rope_base: f32,
    /// Dimensions of a head that RoPE rotates (all of it by default).
    pub rope_dim: usize,
    pub context: usize,
}

impl Hparams {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Hparams> {
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let md = |key: &str| match ct.metadata.get(&format!("{arch}.{key}")) {
            Some(v) => Ok(v),
            None => candle_core::bail!("cannot find {arch}.{key} in the GGUF metadata"),
        };
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_embd = md("embedding_length")?.to_u32()? as usize;
        Ok(Hparams {
            n_head,
            n_kv_head: md("attention.head_count_kv")?.to_u32()? as usize,
            n_layer: md("block_count")?.to_u32()? as usize,
            n_embd,
            eps: md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_base: md("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0),
            rope_dim: md("rope.dimension_count")
                .and_then(|v| v.to_u32())
                .map(|v| v as usize)
                .unwrap_or(n_embd / n_head.max(1)),
            context: md("context_length")
                .and_then(|v| v.to_u32())
                .map(|v| v as usize)
                .unwrap_or(4096),
            arch,
        })
    }
}

/// A dense llama- or qwen2-family decoder loaded from GGUF.
#[derive(Debug, Clone)]
pub struct DenseDecoder {
    tok_embeddings: TokenEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QLinear,
}

/// RoPE angle tables (positions × dim/2): cos and sin of position × θᵢ.
pub fn rope_tables(dim: usize, base: f32, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx = Tensor::arange(0, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx.cos()?, idx.sin()?))
}

impl DenseDecoder {
    /// Loads the weights of a family the registry lays out as dense
    /// (`recap_catalog::FAMILIES`: llama without experts, qwen2).
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<DenseDecoder> {
        let Hparams {
            arch,
            n_head,
            n_kv_head,
            n_layer,
            n_embd,
            eps,
            rope_base,
            rope_dim,
            context,
        } = Hparams::from_gguf(ct)?;
        let head_dim = n_embd / n_head;
        let Some(layout) = crate::catalog::Family::of_gguf(&arch).and_then(|f| f.dense) else {
            candle_core::bail!("`{arch}` is not a family of the dense decoder");
        };
        let (cos, sin) = rope_tables(rope_dim, rope_base, context, device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let embd_q = Arc::new(get("token_embd.weight")?);
        let tok_embeddings = if device.is_cpu() {
            TokenEmbedding::QuantizedRows {
                table: embd_q.clone(),
                n_embd,
            }
        } else {
            TokenEmbedding::Dense(Embedding::new(embd_q.dequantize(device)?, n_embd))
        };
        let norm = RmsNorm::from_qtensor(get("output_norm.weight")?, eps)?;
        let output = match get("output.weight") {
            Ok(w) => QLinear::new(w, None)?,
            // Tied embeddings.
            Err(_) => QLinear::shared(embd_q, None)?,
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            let mut lin = |name: &str, bias: bool| -> Result<QLinear> {
                let w = get(&format!("{p}.{name}.weight"))?;
                let b = if bias {
                    Some(get(&format!("{p}.{name}.bias"))?.dequantize(device)?)
                } else {
                    None
                };
                QLinear::new(w, b)
            };
            let wq = lin("attn_q", layout.qkv_bias)?;
            let wk = lin("attn_k", layout.qkv_bias)?;
            let wv = lin("attn_v", layout.qkv_bias)?;
            let wo = lin("attn_output", false)?;
            let gate = lin("ffn_gate", false)?;
            let down = lin("ffn_down", false)?;
            let up = lin("ffn_up", false)?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                gate,
                down,
                up,
                attn_norm: RmsNorm::from_qtensor(get(&format!("{p}.attn_norm.weight"))?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(get(&format!("{p}.ffn_norm.weight"))?, eps)?,
                n_head,
                n_kv_head,
                head_dim,
                rope_neox: layout.rope_neox,
                cos: cos.clone(),
                sin: sin.clone(),
                neg_inf: neg_inf.clone(),
                kv_cache: KvCache::default(),
            });
        }
        Ok(DenseDecoder {
            tok_embeddings,
            layers,
            norm,
            output,
        })
    }

    /// The shapes an adapter must fit.
    pub fn layout(&self) -> Result<crate::models::adapter::BaseLayout> {
        let Some(l) = self.layers.first() else {
            candle_core::bail!("a decoder without layers");
        };
        Ok(crate::models::adapter::BaseLayout {
            n_layer: self.layers.len(),
            n_embd: l.wq.dims()?.1,
            n_head: l.n_head,
            n_kv_head: l.n_kv_head,
            n_ff: l.gate.dims()?.0,
            permuted_qk: !l.rope_neox,
        })
    }

    /// Puts a LoRA adapter on the projections it names, unmerged (beside
    /// the quantized weights) or merged into f32 weights. The adapter was
    /// checked against [`DenseDecoder::layout`] when it was loaded.
    pub fn apply_adapter(
        &mut self,
        adapter: &crate::models::adapter::Adapter,
        merge: bool,
    ) -> Result<()> {
        use crate::models::adapter::Target;
        let scale = adapter.scale();
        for (&(i, target), pair) in &adapter.pairs {
            let Some(layer) = self.layers.get_mut(i) else {
                candle_core::bail!(
                    "adapter layer {i}: the base has {} layers",
                    self.layers.len()
                );
            };
            let linear = match target {
                Target::Q => &mut layer.wq,
                Target::K => &mut layer.wk,
                Target::V => &mut layer.wv,
                Target::O => &mut layer.wo,
                Target::Gate => &mut layer.gate,
                Target::Up => &mut layer.up,
                Target::Down => &mut layer.down,
            };
            let (out, inp) = linear.dims()?;
            if pair.a.dims() != [pair.a.dim(0)?, inp] || pair.b.dims() != [out, pair.a.dim(0)?] {
                candle_core::bail!(
                    "adapter layer {i} {}: A {:?}, B {:?} do not fit the weight ({out}, {inp})",
                    target.peft_name(),
                    pair.a.dims(),
                    pair.b.dims()
                );
            }
            if merge {
                linear.merge(pair, scale)?;
            } else {
                linear.adapt(pair, scale)?;
            }
        }
        Ok(())
    }

    /// A copy sharing the weights with its own, empty KV cache: a sequence
    /// that can decode beside others.
    pub fn detached(&self) -> DenseDecoder {
        let mut d = self.clone();
        for l in &mut d.layers {
            l.kv_cache = KvCache::default();
        }
        d
    }

    /// A copy whose KV cache holds a private copy of this one's: forks that
    /// decode at the same time cannot share buffers.
    pub fn fork_owned(&self) -> Result<DenseDecoder> {
        let mut d = self.clone();
        for l in &mut d.layers {
            let c = &mut l.kv_cache;
            if let (Some(k), Some(v)) = (&c.k, &c.v) {
                c.k = Some(k.copy()?);
                c.v = Some(v.copy()?);
            }
        }
        Ok(d)
    }

    /// One decoding step of several sequences at once: `seqs[i]` takes
    /// `tokens[i]` at `positions[i]` of its own KV cache. The weights (all
    /// sequences share them) are read once per step for all rows; each
    /// sequence attends over its own cache. Row i of the result is the
    /// logits `seqs[i].forward` would give, bit for bit (on CPU; on other
    /// devices as far as their matrix kernels treat rows alike).
    pub fn forward_batch(
        seqs: &mut [DenseDecoder],
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<Tensor> {
        let n = seqs.len();
        if n == 0 || tokens.len() != n || positions.len() != n {
            candle_core::bail!(
                "forward_batch: {n} sequences, {} tokens, {} positions",
                tokens.len(),
                positions.len()
            );
        }
        let device = seqs[0].norm_device();
        let ids = Tensor::new(tokens, &device)?.reshape((n, 1))?;
        let at: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let at = Tensor::new(at.as_slice(), &device)?;
        let mut h = seqs[0].tok_embeddings.forward(&ids)?;
        for l in 0..seqs[0].layers.len() {
            let w = seqs[0].layers[l].clone();
            let (n_embd, d) = (h.dim(2)?, w.head_dim);
            let x = w.attn_norm.forward(&h)?;
            // All rows' heads and rotations at once (few kernels on a GPU,
            // whatever the batch); then each sequence's own cache.
            let heads = |t: Tensor, nh: usize| t.reshape((n, nh, 1, d));
            let q = w.rope_rows(&heads(w.wq.forward_quantized(&x)?, w.n_head)?, &at)?;
            let k = w.rope_rows(&heads(w.wk.forward_quantized(&x)?, w.n_kv_head)?, &at)?;
            let v = heads(w.wv.forward_quantized(&x)?, w.n_kv_head)?.contiguous()?;
            let mut ys = Vec::with_capacity(n);
            for (i, seq) in seqs.iter_mut().enumerate() {
                let layer = &mut seq.layers[l];
                let qi = q.narrow(0, i, 1)?;
                let (ki, vi) = (k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
                let (kk, vv) = layer.kv_cache.append(&ki, &vi, positions[i])?;
                let y = if device.is_cpu() {
                    layer.attend_one(&qi, kk.dim(2)?)?
                } else {
                    layer.attend(&qi, &kk, &vv, None)?
                };
                ys.push(y.reshape((1, 1, n_embd))?);
            }
            let y = Tensor::cat(&ys, 0)?;
            h = (w.wo.forward_quantized(&y)? + h)?;
            let m = w.mlp_quantized(&w.ffn_norm.forward(&h)?)?;
            h = (m + h)?;
        }
        let h = seqs[0].norm.forward(&h)?;
        seqs[0].output.forward_quantized(&h.squeeze(1)?)
    }

    fn norm_device(&self) -> Device {
        self.layers
            .first()
            .map(|l| l.cos.device().clone())
            .unwrap_or(Device::Cpu)
    }

    pub fn clear_kv_cache(&mut self) {
        for l in &mut self.layers {
            // Keep the buffers: the next prompt writes over them.
            l.kv_cache.len = 0;
        }
    }

    /// Logits of the last position; the KV cache holds `index_pos` tokens
    /// before `x`.
    pub fn forward(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_b, seq_len) = x.dims2()?;
        // Built per call, not cached: forks at many prefix lengths would
        // otherwise pile up masks of up to context² bytes. Not on CPU, whose
        // attention masks by position (`Layer::attend`).
        let mask = if seq_len == 1 || x.device().is_cpu() {
            None
        } else {
            Some(build_causal_mask(seq_len, index_pos, x.device())?)
        };
        let mut h = self.tok_embeddings.forward(x)?;
        for layer in &mut self.layers {
            let a = layer.attention(&layer.attn_norm.forward(&h)?, mask.as_ref(), index_pos)?;
            h = (a + h)?;
            let m = layer.mlp(&layer.ffn_norm.forward(&h)?)?;
            h = (m + h)?;
        }
        let h = self.norm.forward(&h)?;
        let last = h.i((.., seq_len - 1, ..))?;
        self.output.forward(&last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer of `n_head` query heads over `n_kv_head` KV heads of 64
    /// values, for its attention alone (the weights are never used).
    fn attention_layer(n_head: usize, n_kv_head: usize) -> Layer {
        let dev = Device::Cpu;
        let w = || {
            let t = Tensor::zeros((32, 32), DType::F32, &dev).expect("zeros");
            QLinear::new(QTensor::quantize(&t, GgmlDType::F32).expect("weight"), None)
                .expect("linear")
        };
        let norm = || {
            let t = Tensor::ones(32, DType::F32, &dev).expect("ones");
            RmsNorm::from_qtensor(QTensor::quantize(&t, GgmlDType::F32).expect("norm"), 1e-6)
                .expect("norm")
        };
        let table = Tensor::zeros((8, 32), DType::F32, &dev).expect("rope");
        Layer {
            wq: w(),
            wk: w(),
            wv: w(),
            wo: w(),
            gate: w(),
            down: w(),
            up: w(),
            attn_norm: norm(),
            ffn_norm: norm(),
            n_head,
            n_kv_head,
            head_dim: 64,
            rope_neox: true,
            cos: table.clone(),
            sin: table,
            neg_inf: Tensor::new(f32::NEG_INFINITY, &dev).expect("neg inf"),
            kv_cache: KvCache::default(),
        }
    }

    // A prompt-sized product by a K-quant weight (candle's int8 GEMM on a
    // CPU with VNNI, dequantize + f32 GEMM elsewhere) is the f32 product of
    // the dequantized weight within the input's 8-bit quantization, and so
    // is one row (the decoding kernels).
    #[test]
    fn k_quant_products_of_prompts_and_rows_match_the_f32_product() {
        let dev = Device::Cpu;
        let (n, k, rows) = (48, 512, 12);
        let mut next = crate::kernels::qdot::testing::xorshift(5);
        let mut r = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let w = Tensor::from_vec(r(n * k), (n, k), &dev).expect("w");
        let x = Tensor::from_vec(r(rows * k), (1, rows, k), &dev).expect("x");
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let dequantized = q.dequantize(&dev).expect("dequantize");
            let exact = x
                .broadcast_matmul(&dequantized.t().expect("t"))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("f32 product");
            let values = dequantized.flatten_all().and_then(|t| t.to_vec1::<f32>());
            let values = values.expect("values");
            let linear = QLinear::new(q, None).expect("linear");
            let prompt = linear
                .forward(&x)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>());
            let row = linear
                .forward(&x.narrow(1, 0, 1).expect("row"))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>());
            let (prompt, row) = (prompt.expect("prompt"), row.expect("row"));
            assert_eq!(prompt.len(), rows * n);
            // Each input rounded to 8 bits moves by at most half a step
            // (max|x| / 127, max|x| ≤ 1): the products by Σ|w| / 254.
            let bound = |j: usize| {
                values[j * k..(j + 1) * k]
                    .iter()
                    .map(|v| v.abs())
                    .sum::<f32>()
                    / 254.0
            };
            for (i, (a, b)) in prompt.iter().zip(&exact).enumerate() {
                assert!(
                    (a - b).abs() <= bound(i % n),
                    "{dtype:?} value {i}: {a} vs {b}"
                );
            }
            for (j, (a, b)) in row.iter().zip(&exact).enumerate() {
                assert!(
                    (a - b).abs() <= bound(j),
                    "{dtype:?} row value {j}: {a} vs {b}"
                );
            }
            // Candle's int8 GEMM quantizes the input as the row kernel does:
            // the same products but for the order of float sums.
            if linear.has_int8_gemm() {
                for (j, (a, b)) in prompt.iter().zip(&row).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{dtype:?} {j}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// `n` values in [-4, 4], the same for the same seed.
    fn random_values(n: usize, seed: u32) -> Vec<f32> {
        let mut next = crate::kernels::qdot::testing::xorshift(seed);
        (0..n)
            .map(|_| (next() % 2001) as f32 / 250.0 - 4.0)
            .collect()
    }

    /// Equal values to 1e-4 of each, place by place.
    fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            ours.flatten_all().and_then(|t| t.to_vec1()).expect("ours"),
            theirs
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("theirs"),
        );
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}, value {i}: {x} vs {y}"
            );
        }
    }

    // One new token's attention straight on the f16 cache (grouped query
    // heads, positions in pieces merged as flash-decoding does) equals the
    // tensor ops' attention over the same cache, for SmolLM2's and Qwen's
    // head layouts and caches too short to split.
    #[test]
    fn one_tokens_attention_equals_the_tensor_attention() {
        let dev = Device::Cpu;
        for (n_head, n_kv_head, kv_len) in [(9, 3, 700), (14, 2, 1300), (4, 4, 5), (6, 3, 130)] {
            let mut layer = attention_layer(n_head, n_kv_head);
            let shape = (1, n_kv_head, kv_len, 64);
            let k = Tensor::from_vec(random_values(n_kv_head * kv_len * 64, 1), shape, &dev)
                .expect("k");
            let v = Tensor::from_vec(random_values(n_kv_head * kv_len * 64, 2), shape, &dev)
                .expect("v");
            let q = Tensor::from_vec(random_values(n_head * 64, 3), (1, n_head, 1, 64), &dev)
                .expect("q");
            let (kc, vc) = layer.kv_cache.append(&k, &v, 0).expect("append");
            let ours = layer.attend_one(&q, kv_len).expect("attend_one");
            let theirs = layer.attend(&q, &kc, &vc, None).expect("attend");
            assert_eq!(ours.elem_count(), n_head * 64);
            assert_close(
                &ours,
                &theirs,
                &format!("{n_head}/{n_kv_head} heads, {kv_len} positions"),
            );
        }
    }

    // A prompt's attention through the fused causal softmax equals the
    // tensor ops' (scale, causal mask, softmax) head by head, for prompts
    // that follow cached positions too.
    #[test]
    fn a_prompts_attention_equals_the_masked_tensor_attention() {
        let dev = Device::Cpu;
        for (n_head, n_kv_head, cached, seq_len) in [(9, 3, 0, 37), (14, 2, 20, 70), (4, 4, 3, 2)] {
            let mut layer = attention_layer(n_head, n_kv_head);
            let kv_len = cached + seq_len;
            let shape = (1, n_kv_head, kv_len, 64);
            let k = Tensor::from_vec(random_values(n_kv_head * kv_len * 64, 1), shape, &dev)
                .expect("k");
            let v = Tensor::from_vec(random_values(n_kv_head * kv_len * 64, 2), shape, &dev)
                .expect("v");
            let q = Tensor::from_vec(
                random_values(n_head * seq_len * 64, 3),
                (1, n_head, seq_len, 64),
                &dev,
            )
            .expect("q");
            let (kc, vc) = layer.kv_cache.append(&k, &v, 0).expect("append");
            let mask = build_causal_mask(seq_len, cached, &dev).expect("mask");
            let ours = layer.attend(&q, &kc, &vc, Some(&mask)).expect("attend");
            let (kc, vc) = (
                kc.to_dtype(DType::F32).expect("k"),
                vc.to_dtype(DType::F32).expect("v"),
            );
            let heads: Vec<Tensor> = (0..n_head)
                .map(|h| {
                    let kv = h / (n_head / n_kv_head);
                    let qh = q.i((0, h)).expect("q head");
                    let (kh, vh) = (
                        kc.i((0, kv)).expect("k head"),
                        vc.i((0, kv)).expect("v head"),
                    );
                    let scores =
                        (qh.matmul(&kh.t().expect("t")).expect("qk") / 8.0).expect("scale");
                    let neg_inf = Tensor::new(f32::NEG_INFINITY, &dev)
                        .and_then(|t| t.broadcast_as((seq_len, kv_len)))
                        .expect("-inf");
                    let masked = mask.where_cond(&neg_inf, &scores).expect("mask");
                    candle_nn::ops::softmax_last_dim(&masked)
                        .and_then(|p| p.matmul(&vh))
                        .expect("head")
                })
                .collect();
            let theirs = Tensor::cat(&heads, 1).expect("cat");
            assert_eq!(ours.dims(), &[1, seq_len, n_head * 64]);
            assert_close(
                &ours,
                &theirs,
                &format!("{n_head}/{n_kv_head} heads, {cached}+{seq_len} positions"),
            );
        }
    }

    // Rows dequantized one by one are the rows of the dequantized table,
    // for each block type a token table comes in; ids outside it are errors.
    #[test]
    fn quantized_embedding_rows_equal_the_dense_table() {
        let (vocab, width) = (40, 64);
        let values: Vec<f32> = (0..vocab * width)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect();
        let dense = Tensor::from_vec(values, (vocab, width), &Device::Cpu).expect("table");
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4_1,
            GgmlDType::F16,
        ] {
            let table = Arc::new(QTensor::quantize(&dense, dtype).expect("quantize"));
            let want = Embedding::new(table.dequantize(&Device::Cpu).expect("dequantize"), width);
            let rows = TokenEmbedding::QuantizedRows {
                table,
                n_embd: width,
            };
            let ids = Tensor::new(&[[3u32, 0, 39], [7, 7, 1]], &Device::Cpu).expect("ids");
            let got = rows.forward(&ids).expect("rows");
            assert_eq!(got.dims(), &[2, 3, width]);
            let (a, b): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().and_then(|t| t.to_vec1()).expect("got"),
                want.forward(&ids)
                    .and_then(|t| t.flatten_all()?.to_vec1())
                    .expect("want"),
            );
            assert_eq!(a, b, "{dtype:?}");
            let outside = Tensor::new(&[40u32], &Device::Cpu).expect("ids");
            assert!(rows.forward(&outside).is_err(), "{dtype:?}");
        }
    }
}
