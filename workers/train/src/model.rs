//! The model being fine-tuned: a llama- or qwen2-family GGUF decoder whose
//! weights are frozen (dequantized once to f32) and whose projections carry
//! trainable low-rank adapters (candle `Var`s). The forward pass is the
//! serving decoder's arithmetic written with differentiable operations
//! (`crate::ops`); only the adapters get gradients. On the CPU a training
//! step runs the same arithmetic by hand instead (`crate::backprop`).

use crate::ops::{causal_softmax, frozen_linear, rope};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use recap_engine::models::adapter::{Adapter, BaseLayout, LoraConfig, LoraPair, Target};
use recap_engine::models::decoder::rope_tables;
use std::collections::BTreeMap;

/// Where adapters go and how large they are.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// Layers that get adapters (PEFT's `layers_to_transform`); all if None.
    pub layers: Option<Vec<usize>>,
}

pub(crate) struct FrozenLayer {
    pub(crate) w: BTreeMap<Target, Tensor>,
    pub(crate) bias: BTreeMap<Target, Tensor>,
    pub(crate) attn_norm: Tensor,
    pub(crate) ffn_norm: Tensor,
}

/// A frozen base with trainable adapters.
pub struct TrainModel {
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<FrozenLayer>,
    pub(crate) norm: Tensor,
    pub(crate) output: Tensor,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) eps: f64,
    pub(crate) rope_neox: bool,
    pub layout: BaseLayout,
    pub spec: LoraSpec,
    /// (A: rank × in, B: out × rank) per adapted projection.
    pub lora: BTreeMap<(usize, Target), (Var, Var)>,
    /// How the training step computes gradients.
    pub pass: Pass,
    device: Device,
    workspace: std::sync::Mutex<crate::backprop::Workspace>,
    /// The frozen weights transposed, for the hand-written pass.
    pub(crate) transposed: std::sync::OnceLock<Vec<BTreeMap<Target, Vec<f32>>>>,
}

/// How a training step computes gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// On the CPU, the hand-written forward and backward pass
    /// ([`crate::backprop`]); elsewhere, as `Autograd`.
    HandWritten,
    /// candle's autograd over recap's fused ops (`crate::ops`).
    Autograd,
    /// candle's autograd over plain candle ops: the speed benchmark's
    /// anchor, a plain candle loop on the same shapes.
    PlainCandle,
}

fn gguf_name(t: Target) -> &'static str {
    match t {
        Target::Q => "attn_q",
        Target::K => "attn_k",
        Target::V => "attn_v",
        Target::O => "attn_output",
        Target::Gate => "ffn_gate",
        Target::Up => "ffn_up",
        Target::Down => "ffn_down",
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

/// Dropout masks for one micro-step, drawn from its own seed so that a
/// resumed run draws the same ones.
pub struct Dropout {
    p: f64,
    rng: rand::rngs::StdRng,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Dropout {
        Dropout {
            p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// The next mask of `n` values (0, or 1/keep where kept); None when
    /// dropout is off. Both passes draw their masks here, in the same order.
    pub(crate) fn mask(&mut self, n: usize) -> Option<Vec<f32>> {
        if self.p <= 0.0 {
            return None;
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        Some(
            (0..n)
                .map(|_| {
                    if self.rng.random::<f64>() < keep {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    }

    fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        match self.mask(x.elem_count()) {
            None => Ok(x.clone()),
            Some(mask) => x * Tensor::from_vec(mask, x.shape(), x.device())?,
        }
    }
}

impl TrainModel {
    /// Loads the frozen base from a GGUF and puts fresh adapters on it (A
    /// as PEFT initializes it, Kaiming-uniform; B zero, so training starts
    /// from the base model exactly).
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        spec: &LoraSpec,
        seed: u64,
    ) -> Result<TrainModel> {
        let recap_engine::models::decoder::Hparams {
            arch,
            n_head,
            n_kv_head,
            n_layer,
            n_embd,
            eps,
            rope_base,
            rope_dim,
            context,
        } = recap_engine::models::decoder::Hparams::from_gguf(ct)?;
        let Some(layout) = recap_engine::catalog::Family::of_gguf(&arch).and_then(|f| f.dense)
        else {
            candle_core::bail!("fine-tuning takes llama and qwen2 GGUFs, not `{arch}`");
        };
        let rope_neox = layout.rope_neox;
        // As the serving decoder: RoPE over `rope_dim` of each head.
        let (cos, sin) = rope_tables(rope_dim, rope_base, context, device)?;
        let mut get = |name: &str| -> Result<Tensor> {
            ct.tensor(reader, name, device)?
                .dequantize(device)?
                .to_dtype(DType::F32)
        };
        let embed = get("token_embd.weight")?;
        let output = match get("output.weight") {
            Ok(w) => w,
            Err(_) => embed.clone(),
        };
        let norm = get("output_norm.weight")?;
        let n_ff = get("blk.0.ffn_gate.weight")?.dim(0)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let mut w = BTreeMap::new();
            let mut bias = BTreeMap::new();
            for t in Target::ALL {
                w.insert(t, get(&format!("blk.{i}.{}.weight", gguf_name(t)))?);
                if layout.qkv_bias && matches!(t, Target::Q | Target::K | Target::V) {
                    bias.insert(t, get(&format!("blk.{i}.{}.bias", gguf_name(t)))?);
                }
            }
            layers.push(FrozenLayer {
                w,
                bias,
                attn_norm: get(&format!("blk.{i}.attn_norm.weight"))?,
                ffn_norm: get(&format!("blk.{i}.ffn_norm.weight"))?,
            });
        }
        let layout = BaseLayout {
            n_layer,
            n_embd,
            n_head,
            n_kv_head,
            n_ff,
            permuted_qk: !rope_neox,
        };
        let mut model = TrainModel {
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            eps,
            rope_neox,
            layout,
            spec: spec.clone(),
            lora: BTreeMap::new(),
            pass: Pass::HandWritten,
            device: device.clone(),
            workspace: Default::default(),
            transposed: Default::default(),
        };
        model.init_adapters(seed)?;
        Ok(model)
    }

    fn adapted_layers(&self) -> Vec<usize> {
        match &self.spec.layers {
            Some(l) => l.clone(),
            None => (0..self.layout.n_layer).collect(),
        }
    }

    fn init_adapters(&mut self, seed: u64) -> Result<()> {
        if self.spec.r == 0 || self.spec.targets.is_empty() {
            candle_core::bail!("LoRA needs a rank above 0 and at least one target module");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for layer in self.adapted_layers() {
            if layer >= self.layout.n_layer {
                candle_core::bail!(
                    "layer {layer} to adapt: the base has {} layers",
                    self.layout.n_layer
                );
            }
            for &t in &self.spec.targets {
                let (out, inp) = self.layout.shape(t);
                // PEFT: kaiming_uniform_(A, a=√5), i.e. U(-1/√in, 1/√in).
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..self.spec.r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (self.spec.r, inp), &self.device)?)?;
                let b = Var::zeros((out, self.spec.r), DType::F32, &self.device)?;
                self.lora.insert((layer, t), (a, b));
            }
        }
        Ok(())
    }

    /// The trainable tensors, in a fixed order (the optimizer's and the
    /// checkpoint's).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (&(layer, t), (a, b)) in &self.lora {
            out.push((t.tensor_name(layer, 'A'), a.clone()));
            out.push((t.tensor_name(layer, 'B'), b.clone()));
        }
        out
    }

    pub fn scale(&self) -> f64 {
        self.spec.alpha / self.spec.r as f64
    }

    fn linear(
        &self,
        x: &Tensor,
        layer: usize,
        t: Target,
        dropped: Option<&Tensor>,
    ) -> Result<Tensor> {
        let l = &self.layers[layer];
        let mut y = self.frozen(x, &l.w[&t])?;
        if let Some(b) = l.bias.get(&t) {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b)) = self.lora.get(&(layer, t)) {
            let x = dropped.unwrap_or(x);
            let delta = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
            y = (y + (delta * self.scale())?)?;
        }
        Ok(y)
    }

    /// Mean cross-entropy of `ids[target_start..]`, each predicted from the
    /// ids before it: the loss on the summary's tokens only, the prompt
    /// read but not scored.
    pub fn loss(&self, ids: &[u32], target_start: usize, dropout: &mut Dropout) -> Result<Tensor> {
        let t = ids.len();
        if target_start == 0 || target_start >= t {
            candle_core::bail!("an example needs prompt and target tokens ({target_start} of {t})");
        }
        let logits = self.logits(ids, target_start - 1, dropout)?;
        let logits = logits.narrow(0, 0, t - target_start)?;
        let targets = Tensor::new(&ids[target_start..], &self.device)?;
        candle_nn::loss::cross_entropy(&logits, &targets)
    }

    /// One example's mean loss on its targets, with `loss_scale ×` its
    /// gradient with respect to each adapter added to `grads` (one buffer
    /// per [`TrainModel::vars`] entry, of its size).
    pub fn loss_and_grads(
        &self,
        ids: &[u32],
        target_start: usize,
        dropout: &mut Dropout,
        loss_scale: f64,
        grads: &mut [Vec<f32>],
    ) -> Result<f64> {
        if self.pass == Pass::HandWritten && self.device.is_cpu() {
            let mut ws = self
                .workspace
                .lock()
                .map_err(|_| candle_core::Error::Msg("a training step panicked".into()))?;
            return self.backprop(ids, target_start, dropout, loss_scale, grads, &mut ws);
        }
        let loss = self.loss(ids, target_start, dropout)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let g = (loss * loss_scale)?.backward()?;
        let vars = self.vars();
        if grads.len() != vars.len() {
            candle_core::bail!(
                "{} gradient buffers for {} tensors",
                grads.len(),
                vars.len()
            );
        }
        for ((_, var), acc) in vars.iter().zip(grads.iter_mut()) {
            if let Some(gk) = g.get(var) {
                let gk = gk.flatten_all()?.to_vec1::<f32>()?;
                acc.iter_mut().zip(gk).for_each(|(a, g)| *a += g);
            }
        }
        Ok(value)
    }

    /// Zeroed gradient buffers for [`TrainModel::loss_and_grads`].
    pub fn zero_grads(&self) -> Vec<Vec<f32>> {
        self.vars()
            .iter()
            .map(|(_, v)| vec![0.0; v.elem_count()])
            .collect()
    }

    fn frozen(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.pass == Pass::PlainCandle {
            x.matmul(&w.t()?)
        } else {
            frozen_linear(x, w)
        }
    }

    /// Next-token logits of positions `from..` of `ids`, (positions, vocab):
    /// the lm head runs on those rows only.
    pub fn logits(&self, ids: &[u32], from: usize, dropout: &mut Dropout) -> Result<Tensor> {
        let t = ids.len();
        if from >= t {
            candle_core::bail!("logits from position {from} of {t}");
        }
        let l = self.layout;
        let d = l.head_dim();
        let n_rep = l.n_head / l.n_kv_head;
        let ids_t = Tensor::new(ids, &self.device)?;
        let mut x = self.embed.index_select(&ids_t, 0)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        for (i, layer) in self.layers.iter().enumerate() {
            let adapted = self.lora.keys().any(|&(li, _)| li == i);
            let h = rms_norm(&x, &layer.attn_norm, self.eps)?;
            let hd = if adapted {
                Some(dropout.apply(&h)?)
            } else {
                None
            };
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                y.reshape((t, n, d))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)
            };
            let q = heads(self.linear(&h, i, Target::Q, hd.as_ref())?, l.n_head)?;
            let k = heads(self.linear(&h, i, Target::K, hd.as_ref())?, l.n_kv_head)?;
            let v = heads(self.linear(&h, i, Target::V, hd.as_ref())?, l.n_kv_head)?;
            let rotate = |x: &Tensor| {
                if self.pass == Pass::PlainCandle {
                    crate::ops::rope_by_tensor_ops(x, &cos, &sin, self.rope_neox)
                } else {
                    rope(x, &cos, &sin, self.rope_neox)
                }
            };
            let (q, k) = (rotate(&q)?, rotate(&k)?);
            // Query heads that share a KV head become extra rows (no copies
            // of keys and values), as in the serving decoder.
            let q = q.reshape((1, l.n_kv_head, n_rep * t, d))?;
            let scores = q.matmul(&k.t()?.contiguous()?)?;
            let p = if self.pass == Pass::PlainCandle {
                let mask = crate::ops::causal_mask(t, t, &self.device)?;
                let s = (scores.reshape((l.n_kv_head * n_rep, t, t))? * scale as f64)?;
                candle_nn::ops::softmax(&s.broadcast_add(&mask)?, D::Minus1)?.reshape((
                    1,
                    l.n_kv_head,
                    n_rep * t,
                    t,
                ))?
            } else {
                causal_softmax(&scores, t, scale)?
            };
            let y = p
                .matmul(&v)?
                .reshape((1, l.n_head, t, d))?
                .squeeze(0)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((t, l.n_embd))?;
            let yd = if adapted {
                Some(dropout.apply(&y)?)
            } else {
                None
            };
            x = (x + self.linear(&y, i, Target::O, yd.as_ref())?)?;
            let h = rms_norm(&x, &layer.ffn_norm, self.eps)?;
            let hd = if adapted {
                Some(dropout.apply(&h)?)
            } else {
                None
            };
            let gate = self.linear(&h, i, Target::Gate, hd.as_ref())?.silu()?;
            let up = self.linear(&h, i, Target::Up, hd.as_ref())?;
            let m = (gate * up)?;
            let md = if adapted {
                Some(dropout.apply(&m)?)
            } else {
                None
            };
            x = (x + self.linear(&m, i, Target::Down, md.as_ref())?)?;
        }
        let h = rms_norm(&x.narrow(0, from, t - from)?, &self.norm, self.eps)?;
        self.frozen(&h, &self.output)
    }

    /// The adapters as they stand, in recap's (GGUF row) order.
    pub fn adapter(&self) -> Result<Adapter> {
        let mut config = LoraConfig::new(
            self.spec.r,
            self.spec.alpha,
            self.spec.dropout,
            &self.spec.targets,
        );
        config.layers_to_transform = self.spec.layers.clone();
        let mut pairs = BTreeMap::new();
        for (&k, (a, b)) in &self.lora {
            pairs.insert(
                k,
                LoraPair {
                    a: a.as_tensor().to_device(&Device::Cpu)?,
                    b: b.as_tensor().to_device(&Device::Cpu)?,
                },
            );
        }
        Ok(Adapter {
            config,
            info: None,
            pairs,
        })
    }

    /// Starts from a trained adapter instead of fresh weights: a second
    /// pass over the data, or a company's summaries on top of a shipped
    /// adapter. Its rank, scale and adapted projections must be this run's;
    /// the error names each that differs.
    pub fn start_from(&self, adapter: &Adapter) -> Result<()> {
        let mut differ = Vec::new();
        if adapter.config.r != self.spec.r {
            differ.push(format!(
                "rank: the adapter's is {}, this run's {}",
                adapter.config.r, self.spec.r
            ));
        }
        if (adapter.scale() - self.scale()).abs() > 1e-9 * self.scale().abs().max(1.0) {
            differ.push(format!(
                "scale (alpha / rank): the adapter's is {}, this run's {}",
                adapter.scale(),
                self.scale()
            ));
        }
        let name = |&(layer, t): &(usize, Target)| format!("layer {layer} {}", t.peft_name());
        if let Some(k) = self.lora.keys().find(|k| !adapter.pairs.contains_key(k)) {
            differ.push(format!("{} is adapted here, not in the adapter", name(k)));
        }
        if let Some(k) = adapter.pairs.keys().find(|k| !self.lora.contains_key(k)) {
            differ.push(format!("{} is adapted in the adapter, not here", name(k)));
        }
        if !differ.is_empty() {
            candle_core::bail!("the adapter does not fit this run: {}", differ.join("; "));
        }
        for (k, (a, b)) in &self.lora {
            let pair = &adapter.pairs[k];
            a.set(&pair.a.to_device(&self.device)?)?;
            b.set(&pair.b.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Sets the adapters' values (a resumed checkpoint).
    pub fn set(&self, values: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.vars() {
            let v = values
                .get(&name)
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {name}")))?;
            var.set(&v.to_device(&self.device)?)?;
        }
        Ok(())
    }
}
