//! Differentiable operations the training forward pass needs and candle
//! lacks or makes dear:
//!
//! - [`frozen_linear`]: `x Wᵀ` by a frozen weight whose backward pass gives
//!   the input's gradient only (candle's matmul also computes the weight's,
//!   a third of the work, thrown away for a frozen base);
//! - [`rope`]: candle's fused rotary embedding, whose backward pass is the
//!   inverse rotation (candle's has none);
//! - [`causal_softmax`]: scale, causal mask and softmax in one pass (the
//!   engine's kernel), with the softmax's backward pass.
//!
//! Each runs its forward pass on candle's kernels over a tensor view of the
//! input and returns the result's storage.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

/// A tensor over a custom op's (contiguous) input storage.
fn input(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let values = storage.as_slice::<f32>()?;
    let t = match layout.contiguous_offsets() {
        Some((a, b)) => {
            Tensor::from_slice(&values[a..b], layout.shape(), &candle_core::Device::Cpu)?
        }
        // The wrappers below make their inputs contiguous first.
        None => candle_core::bail!("custom op input is not contiguous"),
    };
    Ok(t)
}

/// A result's storage and shape.
fn output(t: Tensor) -> Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let shape = t.shape().clone();
    let (storage, layout) = t.storage_and_layout();
    let values = match &*storage {
        candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?,
        _ => candle_core::bail!("expected CPU storage"),
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("result not contiguous".into()))?;
    Ok((CpuStorage::F32(values[a..b].to_vec()), shape))
}

struct FrozenLinear {
    /// (out, in), f32.
    weight: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        output(input(storage, layout)?.matmul(&self.weight.t()?)?)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x Wᵀ` for x (rows, in) and a frozen W (out, in). Off the CPU, the
/// plain product (whose weight gradient is computed and dropped).
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(FrozenLinear {
            weight: weight.clone(),
        })
    } else {
        x.matmul(&weight.t()?)
    }
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Pairs (i, i + d/2) (qwen2) or (2i, 2i + 1) (llama GGUFs).
    neox: bool,
}

impl Rope {
    fn rotate(&self, x: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if self.neox {
            candle_nn::rotary_emb::rope(&x, &self.cos, sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x, &self.cos, sin)
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-with-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        output(self.rotate(&input(storage, layout)?, &self.sin)?)
    }

    /// A rotation's transpose is the rotation by the opposite angle.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.rotate(grad, &self.sin.neg()?)?))
    }
}

/// Rotary embedding of x (batch, heads, positions, head dim) by the angle
/// tables (positions, head dim / 2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Tensor> {
    let op = Rope {
        cos: cos.clone(),
        sin: sin.clone(),
        neox,
    };
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(op)
    } else {
        // Off the CPU: the same rotation from differentiable tensor ops.
        rope_by_tensor_ops(x, cos, sin, neox)
    }
}

/// The rotation written with differentiable tensor ops (also the reference
/// the fused op is tested against).
pub fn rope_by_tensor_ops(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let cos = cos.reshape((1, 1, t, d / 2))?;
    let sin = sin.reshape((1, 1, t, d / 2))?;
    let (x1, x2) = if neox {
        (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?)
    } else {
        let p = x.reshape((b, h, t, d / 2, 2))?;
        (
            p.narrow(4, 0, 1)?.squeeze(4)?,
            p.narrow(4, 1, 1)?.squeeze(4)?,
        )
    };
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    if neox {
        Tensor::cat(&[r1, r2], 3)
    } else {
        Tensor::stack(&[r1, r2], 4)?.reshape((b, h, t, d))
    }
}

struct CausalSoftmax {
    seq_len: usize,
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax-with-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = input(storage, layout)?;
        let kv_len = t.dim(D::Minus1)?;
        let mut values = t.flatten_all()?.to_vec1::<f32>()?;
        recap_engine::CausalSoftmax {
            seq_len: self.seq_len,
            scale: self.scale,
        }
        .apply(&mut values, kv_len);
        Ok((CpuStorage::F32(values), t.shape().clone()))
    }

    /// y = softmax(s·x) where visible: dx = s·y·(g − Σ g·y); the masked
    /// places have y = 0 and so no gradient.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        let g = (res * grad.broadcast_sub(&dot)?)?;
        Ok(Some((g * self.scale as f64)?))
    }
}

/// Softmax of `scale · scores` over the last axis under the causal mask:
/// rows are a prompt's `seq_len` queries (repeated for each head group),
/// query i sees keys 0..=i.
pub fn causal_softmax(scores: &Tensor, seq_len: usize, scale: f32) -> Result<Tensor> {
    if scores.device().is_cpu() {
        return scores
            .contiguous()?
            .apply_op1(CausalSoftmax { seq_len, scale });
    }
    let kv_len = scores.dim(D::Minus1)?;
    let mask = causal_mask(seq_len, kv_len, scores.device())?;
    let rows = scores.elem_count() / kv_len;
    let shape = scores.shape().clone();
    let s = (scores.reshape((rows / seq_len, seq_len, kv_len))? * scale as f64)?;
    let s = s.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&s, D::Minus1)?.reshape(shape)
}

/// 0 where query i may see key j, −∞ elsewhere: (seq_len, kv_len).
pub fn causal_mask(seq_len: usize, kv_len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let first = kv_len - seq_len;
    let values: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j <= first + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (seq_len, kv_len), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what} {i}: {x} vs {y}"
            );
        }
    }

    /// The gradient of Σ (op(x) · w) with respect to x, for a fixed random w.
    fn grad_of(x: &Var, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> (Tensor, Tensor) {
        let y = f(x.as_tensor()).unwrap();
        let w = Tensor::from_vec(values(y.elem_count(), 99), y.shape(), &Device::Cpu).unwrap();
        let loss = (y.clone() * w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        (y, grads.get(x).unwrap().clone())
    }

    #[test]
    fn frozen_linear_equals_the_matmul_and_its_input_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(24 * 16, 1), (24, 16), &dev).unwrap();
        let x =
            Var::from_tensor(&Tensor::from_vec(values(5 * 16, 2), (5, 16), &dev).unwrap()).unwrap();
        let (ours, g_ours) = grad_of(&x, &|x| frozen_linear(x, &w));
        let (theirs, g_theirs) = grad_of(&x, &|x| x.matmul(&w.t()?));
        close(&ours, &theirs, "forward");
        close(&g_ours, &g_theirs, "gradient");
    }

    #[test]
    fn fused_rope_equals_the_tensor_ops_and_their_gradient() {
        let dev = Device::Cpu;
        let (t, d) = (6, 8);
        let cos = Tensor::from_vec(values(t * d / 2, 3), (t, d / 2), &dev)
            .unwrap()
            .cos()
            .unwrap();
        let sin = Tensor::from_vec(values(t * d / 2, 3), (t, d / 2), &dev)
            .unwrap()
            .sin()
            .unwrap();
        for neox in [true, false] {
            let x = Var::from_tensor(
                &Tensor::from_vec(values(2 * t * d, 4), (1, 2, t, d), &dev).unwrap(),
            )
            .unwrap();
            let (ours, g_ours) = grad_of(&x, &|x| rope(x, &cos, &sin, neox));
            let (theirs, g_theirs) = grad_of(&x, &|x| rope_by_tensor_ops(x, &cos, &sin, neox));
            close(&ours, &theirs, &format!("forward neox={neox}"));
            close(&g_ours, &g_theirs, &format!("gradient neox={neox}"));
        }
    }

    #[test]
    fn fused_causal_softmax_equals_the_masked_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        // Two head groups of two query heads, 5 positions.
        let (groups, rep, t) = (2, 2, 5);
        let x = Var::from_tensor(
            &Tensor::from_vec(
                values(groups * rep * t * t, 5),
                (1, groups, rep * t, t),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let scale = 0.35f32;
        let (ours, g_ours) = grad_of(&x, &|x| causal_softmax(x, t, scale));
        let reference = |x: &Tensor| -> Result<Tensor> {
            let mask = causal_mask(t, t, &dev)?;
            let s = (x.reshape((groups * rep, t, t))? * scale as f64)?.broadcast_add(&mask)?;
            candle_nn::ops::softmax(&s, D::Minus1)?.reshape((1, groups, rep * t, t))
        };
        let (theirs, g_theirs) = grad_of(&x, &reference);
        close(&ours, &theirs, "forward");
        close(&g_ours, &g_theirs, "gradient");
    }
}
