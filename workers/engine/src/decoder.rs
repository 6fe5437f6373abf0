//! Dense GGUF decoders of the llama and qwen2 families.
//!
//! Adapted from candle-transformers 0.11.1 (`quantized_llama`,
//! `quantized_qwen2`; MIT or Apache-2.0, LICENSES/candle.txt) with two
//! changes, both for speed on CPU (bench/RESULTS.md has the before/after):
//!
//! - every weight goes through [`QLinear`]: a prompt-sized input (many rows)
//!   is multiplied as dequantize-then-GEMM, which runs at the f32 GEMM's
//!   speed, instead of candle's row-by-row quantized dot products (scalar
//!   code for Q4_1); a single row (decoding) keeps the quantized kernels,
//!   which read 4-5 bits a weight instead of 32;
//! - the model is cheap to clone and its KV cache is plain tensors, so a
//!   prefilled prefix can be forked: [`crate::llm`] prefills a transcript
//!   once and continues each summary kind from a clone.

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::{build_causal_mask, repeat_kv};
use std::sync::Arc;

/// Rows from which a quantized matmul runs as dequantize + f32 GEMM: the
/// dequantization (one pass over the weight) is paid back once the GEMM
/// reuses each weight for enough rows.
pub const GEMM_MIN_ROWS: usize = 8;

/// A linear layer over a quantized weight (out × in), with an optional bias.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Arc<QTensor>,
    quantized: QMatMul,
    bias: Option<Tensor>,
}

impl QLinear {
    pub fn new(weight: QTensor, bias: Option<Tensor>) -> Result<QLinear> {
        let weight = Arc::new(weight);
        let quantized = QMatMul::from_arc(weight.clone())?;
        Ok(QLinear {
            weight,
            quantized,
            bias,
        })
    }

    fn is_quantized(&self) -> bool {
        !matches!(
            self.weight.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        )
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let y = if rows >= GEMM_MIN_ROWS && self.is_quantized() && x.device().is_cpu() {
            let w = self.weight.dequantize(x.device())?;
            x.broadcast_matmul(&w.t()?)?
        } else {
            self.quantized.forward(x)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
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
    kv_cache: Option<(Tensor, Tensor)>,
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
        let (k, v) = match &self.kv_cache {
            Some((kc, vc)) if index_pos > 0 => {
                (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?)
            }
            _ => (k, v),
        };
        self.kv_cache = Some((k.clone(), v.clone()));
        let k = repeat_kv(k, self.n_head / self.n_kv_head)?;
        let v = repeat_kv(v, self.n_head / self.n_kv_head)?;
        let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = match mask {
            None => att,
            Some(mask) => {
                let mask = mask.broadcast_as(att.shape())?;
                mask.where_cond(&self.neg_inf.broadcast_as(att.shape().dims())?, &att)?
            }
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?;
        let y = y.transpose(1, 2)?.reshape((b, seq_len, n_embd))?;
        self.wo.forward(&y)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// A dense llama- or qwen2-family decoder loaded from GGUF.
#[derive(Debug, Clone)]
pub struct DenseDecoder {
    tok_embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QLinear,
}

fn rope_tables(dim: usize, base: f32, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
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
    /// Loads `llama` (dense) or `qwen2` weights.
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<DenseDecoder> {
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
        let n_kv_head = md("attention.head_count_kv")?.to_u32()? as usize;
        let n_layer = md("block_count")?.to_u32()? as usize;
        let n_embd = md("embedding_length")?.to_u32()? as usize;
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let rope_base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        let head_dim = n_embd / n_head;
        let rope_dim = md("rope.dimension_count")
            .and_then(|v| v.to_u32())
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        let context = md("context_length")
            .and_then(|v| v.to_u32())
            .map(|v| v as usize)
            .unwrap_or(4096);
        let qwen2 = arch == "qwen2";
        let (cos, sin) = rope_tables(rope_dim, rope_base, context, device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let embd_q = get("token_embd.weight")?;
        let tok_embeddings = Embedding::new(embd_q.dequantize(device)?, n_embd);
        let norm = RmsNorm::from_qtensor(get("output_norm.weight")?, eps)?;
        let output = match get("output.weight") {
            Ok(w) => QLinear::new(w, None)?,
            // Tied embeddings.
            Err(_) => QLinear::new(embd_q, None)?,
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
            let wq = lin("attn_q", qwen2)?;
            let wk = lin("attn_k", qwen2)?;
            let wv = lin("attn_v", qwen2)?;
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
                rope_neox: qwen2,
                cos: cos.clone(),
                sin: sin.clone(),
                neg_inf: neg_inf.clone(),
                kv_cache: None,
            });
        }
        Ok(DenseDecoder {
            tok_embeddings,
            layers,
            norm,
            output,
        })
    }

    pub fn clear_kv_cache(&mut self) {
        for l in &mut self.layers {
            l.kv_cache = None;
        }
    }

    /// Logits of the last position; the KV cache holds `index_pos` tokens
    /// before `x`.
    pub fn forward(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_b, seq_len) = x.dims2()?;
        // Built per call, not cached: forks at many prefix lengths would
        // otherwise pile up masks of up to context² bytes.
        let mask = if seq_len == 1 {
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
