//! The training step on the CPU, written by hand: a forward pass that keeps
//! exactly the activations its backward pass reads, in buffers reused from
//! step to step, and a backward pass that computes the adapters' gradients
//! and the activations' (never the frozen weights'). Candle's autograd holds
//! every intermediate of the graph in fresh allocations, seeds each gradient
//! with zeros and adds to it; this pass keeps its large buffers from step
//! to step, grown to the longest example. The attention probabilities are
//! computed again in the backward pass rather than kept, so memory grows
//! with t² for one layer only.
//!
//! - [`matmul`]: products over slices with strides, by `gemm`;
//! - [`kernels`]: RMS norm, RoPE, causal attention (in query blocks, so the
//!   masked half is mostly skipped), cross-entropy, each with its backward.
//!
//! The arithmetic is the autograd pass's (`TrainModel::loss`), which the
//! tests compare it against, gradient by gradient.

mod kernels;
mod matmul;

use crate::model::{Dropout, TrainModel};
use candle_core::{CpuStorage, Result, Storage, Tensor};
use kernels::{
    attention_backward, attention_forward, cross_entropy, exp, rms_backward, rms_forward, rope,
    HeadScratch,
};
use matmul::{matmul, View, ViewMut};
use rayon::prelude::*;
use recap_engine::models::adapter::{BaseLayout, Target};
use std::collections::BTreeMap;
use std::ops::Deref;

/// A tensor's f32 values (a frozen weight, or an adapter between optimizer
/// steps), read in place for the whole pass.
struct Held<'a> {
    guard: Box<dyn Deref<Target = Storage> + 'a>,
    start: usize,
    end: usize,
}

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Result<Held<'a>> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("a weight is not contiguous");
        };
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("the hand-written pass runs on f32 weights on the CPU");
        }
        Ok(Held {
            guard: Box::new(guard),
            start,
            end,
        })
    }

    fn values(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => &[],
        }
    }
}

/// A buffer of `n` values, grown (never shrunk) as the longest example
/// needs. Its old values stay: every user writes before it reads.
fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// The shapes of one pass.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    e: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    ff: usize,
    r: usize,
    /// The adapters' scale, alpha / r.
    s: f32,
}

impl Dims {
    fn kv(&self) -> usize {
        self.kv_heads * self.d
    }
}

/// The four inputs of a layer's projections: the normed input (q, k, v),
/// the attention output (o), the normed residual (gate, up) and
/// silu(gate) · up (down).
const H1: usize = 0;
const Y: usize = 1;
const H2: usize = 2;
const M: usize = 3;

fn input_of(t: Target) -> usize {
    match t {
        Target::Q | Target::K | Target::V => H1,
        Target::O => Y,
        Target::Gate | Target::Up => H2,
        Target::Down => M,
    }
}

/// The projections' inputs, and the adapters' (after dropout).
#[derive(Default)]
struct Inputs {
    values: [Vec<f32>; 4],
    /// Dropout masks, when dropout is on and the layer is adapted.
    masks: [Option<Vec<f32>>; 4],
    dropped: [Vec<f32>; 4],
}

impl Inputs {
    /// Input `i` as the adapters see it.
    fn for_adapter(&self, i: usize, n: usize) -> &[f32] {
        if self.masks[i].is_some() {
            &self.dropped[i][..n]
        } else {
            &self.values[i][..n]
        }
    }

    /// Draws input `i`'s mask (the draws' order is the autograd pass's).
    fn drop_out(&mut self, i: usize, n: usize, dropout: Option<&mut Dropout>) {
        self.masks[i] = dropout.and_then(|d| d.mask(n));
        if let Some(mask) = &self.masks[i] {
            grow(&mut self.dropped[i], n)
                .par_iter_mut()
                .zip(self.values[i][..n].par_iter())
                .zip(mask.par_iter())
                .for_each(|((o, x), m)| *o = x * m);
        }
    }
}

/// What one layer's backward pass reads, kept by its forward pass.
#[derive(Default)]
struct Saved {
    /// The layer's input and its inverse RMS.
    x: Vec<f32>,
    r1: Vec<f32>,
    /// Queries and keys after RoPE, values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The residual after attention and its inverse RMS.
    x2: Vec<f32>,
    r2: Vec<f32>,
    /// Gate and up projections.
    g: Vec<f32>,
    u: Vec<f32>,
    inputs: Inputs,
    /// x·Aᵀ of each adapted projection, (t, r), by `Target::ALL` order.
    xa: [Vec<f32>; 7],
}

/// The backward pass's buffers.
#[derive(Default)]
struct Scratch {
    dx: Vec<f32>,
    dh: Vec<f32>,
    dy: Vec<f32>,
    /// Attention probabilities, (heads, t, t), of one layer at a time.
    p: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dp: Vec<f32>,
    dq_heads: Vec<f32>,
    dk_heads: Vec<f32>,
    dv_heads: Vec<f32>,
    dg: Vec<f32>,
    du: Vec<f32>,
    dm: Vec<f32>,
    /// A projection's adapter path: d(x·Aᵀ), and d(xd) under dropout.
    dxa: Vec<f32>,
    dxd: Vec<f32>,
}

/// The pass's buffers, reused from step to step.
#[derive(Default)]
pub struct Workspace {
    saved: Vec<Saved>,
    x: Vec<f32>,
    tmp: Vec<f32>,
    heads_out: Vec<f32>,
    logits: Vec<f32>,
    hf: Vec<f32>,
    rf: Vec<f32>,
    scratch: Scratch,
}

fn slot(t: Target) -> usize {
    match t {
        Target::Q => 0,
        Target::K => 1,
        Target::V => 2,
        Target::O => 3,
        Target::Gate => 4,
        Target::Up => 5,
        Target::Down => 6,
    }
}

/// One adapter as the pass sees it: its values, and where its gradients
/// go in the trainer's list (A at `index`, B at `index + 1`).
struct Lora<'a> {
    a: Held<'a>,
    b: Held<'a>,
    index: usize,
}

/// A projection: its frozen weight (out, in) and the same transposed
/// (in, out), bias and adapter.
struct Proj<'a> {
    w: &'a [f32],
    wt: &'a [f32],
    bias: Option<&'a [f32]>,
    lora: Option<&'a Lora<'a>>,
    n_out: usize,
    n_in: usize,
}

impl Proj<'_> {
    /// `out = x·Wᵀ + bias + s · (xd·Aᵀ)·Bᵀ`, keeping xd·Aᵀ in `xa`.
    fn forward(&self, dims: Dims, x: &[f32], xd: &[f32], out: &mut [f32], xa: &mut Vec<f32>) {
        let (t, r) = (dims.t, dims.r);
        let (n_out, n_in) = (self.n_out, self.n_in);
        matmul(
            ViewMut::new(out, t, n_out),
            View::new(x, t, n_in),
            View::new(self.wt, n_in, n_out),
            false,
            1.0,
        );
        if let Some(bias) = self.bias {
            out.par_chunks_mut(n_out).for_each(|row| {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            });
        }
        if let Some(l) = self.lora {
            let xa = grow(xa, t * r);
            matmul(
                ViewMut::new(xa, t, r),
                View::new(xd, t, n_in),
                View::new(l.a.values(), r, n_in).t(),
                false,
                1.0,
            );
            matmul(
                ViewMut::new(out, t, n_out),
                View::new(xa, t, r),
                View::new(l.b.values(), n_out, r).t(),
                true,
                dims.s,
            );
        }
    }

    /// The backward pass of [`Proj::forward`] from the output's gradient
    /// `dy`: the adapter's gradients added to `grads`, and, where `dx` is
    /// given, the input's gradient written (or added, with its flag).
    fn backward(
        &self,
        dims: Dims,
        dy: &[f32],
        (xd, xa, mask): (&[f32], &[f32], Option<&[f32]>),
        dx: Option<(&mut [f32], bool)>,
        grads: &mut [Vec<f32>],
        (dxa, dxd): (&mut Vec<f32>, &mut Vec<f32>),
    ) {
        let (t, r) = (dims.t, dims.r);
        let (n_out, n_in) = (self.n_out, self.n_in);
        let dx = dx.map(|(dx, accumulate)| {
            matmul(
                ViewMut::new(dx, t, n_in),
                View::new(dy, t, n_out),
                View::new(self.w, n_out, n_in),
                accumulate,
                1.0,
            );
            dx
        });
        let Some(l) = self.lora else { return };
        let (da, db) = grads[l.index..l.index + 2].split_at_mut(1);
        // dB += s · dyᵀ·(xd·Aᵀ)
        matmul(
            ViewMut::new(&mut db[0], n_out, r),
            View::new(dy, t, n_out).t(),
            View::new(xa, t, r),
            true,
            dims.s,
        );
        // d(xd·Aᵀ) = s · dy·B
        let dxa = grow(dxa, t * r);
        matmul(
            ViewMut::new(dxa, t, r),
            View::new(dy, t, n_out),
            View::new(l.b.values(), n_out, r),
            false,
            dims.s,
        );
        // dA += d(xd·Aᵀ)ᵀ·xd
        matmul(
            ViewMut::new(&mut da[0], r, n_in),
            View::new(dxa, t, r).t(),
            View::new(xd, t, n_in),
            true,
            1.0,
        );
        let Some(dx) = dx else { return };
        let through_adapter = |out: ViewMut, accumulate| {
            matmul(
                out,
                View::new(dxa, t, r),
                View::new(l.a.values(), r, n_in),
                accumulate,
                1.0,
            )
        };
        match mask {
            None => through_adapter(ViewMut::new(dx, t, n_in), true),
            Some(mask) => {
                let dxd = grow(dxd, t * n_in);
                through_adapter(ViewMut::new(dxd, t, n_in), false);
                dx.par_iter_mut()
                    .zip(dxd.par_iter())
                    .zip(mask.par_iter())
                    .for_each(|((g, d), m)| *g += d * m);
            }
        }
    }
}

/// One layer's frozen weights and adapters.
struct Layer<'a> {
    proj: BTreeMap<Target, Proj<'a>>,
    attn_norm: &'a [f32],
    ffn_norm: &'a [f32],
    adapted: bool,
}

/// A layer's held tensors (the [`Layer`]'s slices borrow from them).
struct HeldLayer<'a> {
    w: BTreeMap<Target, Held<'a>>,
    bias: BTreeMap<Target, Held<'a>>,
    attn_norm: Held<'a>,
    ffn_norm: Held<'a>,
}

/// What stays fixed through one example's pass.
struct Pass<'a> {
    dims: Dims,
    eps: f32,
    neox: bool,
    cos: &'a [f32],
    sin: &'a [f32],
}

/// Vocabulary rows of the lm head per product.
const VOCAB_SLICE: usize = 8192;

/// The forward pass's scratch buffers (none is kept for the backward).
struct ForwardScratch<'a> {
    tmp: &'a mut Vec<f32>,
    heads_out: &'a mut Vec<f32>,
    probs: &'a mut Vec<f32>,
}

impl Pass<'_> {
    /// One layer forward: `x` goes in as the layer's input and comes out
    /// as its output; `sv` keeps what the backward pass reads.
    fn forward_layer(
        &self,
        layer: &Layer,
        sv: &mut Saved,
        x: &mut [f32],
        mut scratch: ForwardScratch,
        dropout: &mut Dropout,
    ) {
        let mut dropout = layer.adapted.then_some(dropout);
        self.forward_attention(layer, sv, x, &mut scratch, dropout.as_deref_mut());
        self.forward_mlp(layer, sv, x, scratch.tmp, dropout);
    }

    /// `x += o(attention(q(h1), k(h1), v(h1)))`, h1 = norm(x).
    fn forward_attention(
        &self,
        layer: &Layer,
        sv: &mut Saved,
        x: &mut [f32],
        scratch: &mut ForwardScratch,
        mut dropout: Option<&mut Dropout>,
    ) {
        let Dims { t, e, d, heads, .. } = self.dims;
        let kv = self.dims.kv();
        grow(&mut sv.x, t * e).copy_from_slice(x);
        let h1 = grow(&mut sv.inputs.values[H1], t * e);
        rms_forward(x, layer.attn_norm, self.eps, grow(&mut sv.r1, t), h1);
        sv.inputs.drop_out(H1, t * e, dropout.as_deref_mut());
        for (target, out) in [
            (Target::Q, &mut sv.q),
            (Target::K, &mut sv.k),
            (Target::V, &mut sv.v),
        ] {
            let proj = &layer.proj[&target];
            proj.forward(
                self.dims,
                &sv.inputs.values[H1][..t * e],
                sv.inputs.for_adapter(H1, t * e),
                grow(out, t * proj.n_out),
                &mut sv.xa[slot(target)],
            );
        }
        self.rope(&mut sv.q[..t * e], heads, false);
        self.rope(&mut sv.k[..t * kv], self.dims.kv_heads, false);
        attention_forward(
            self.dims,
            (&sv.q[..t * e], &sv.k[..t * kv], &sv.v[..t * kv]),
            grow(scratch.probs, heads * t * t),
            grow(scratch.heads_out, heads * t * d),
            grow(&mut sv.inputs.values[Y], t * e),
        );
        sv.inputs.drop_out(Y, t * e, dropout);
        self.residual(&layer.proj[&Target::O], sv, Y, x, scratch.tmp);
    }

    /// `x += down(silu(gate(h2)) · up(h2))`, h2 = norm(x).
    fn forward_mlp(
        &self,
        layer: &Layer,
        sv: &mut Saved,
        x: &mut [f32],
        tmp: &mut Vec<f32>,
        mut dropout: Option<&mut Dropout>,
    ) {
        let Dims { t, e, ff, .. } = self.dims;
        grow(&mut sv.x2, t * e).copy_from_slice(x);
        let h2 = grow(&mut sv.inputs.values[H2], t * e);
        rms_forward(x, layer.ffn_norm, self.eps, grow(&mut sv.r2, t), h2);
        sv.inputs.drop_out(H2, t * e, dropout.as_deref_mut());
        for (target, out) in [(Target::Gate, &mut sv.g), (Target::Up, &mut sv.u)] {
            layer.proj[&target].forward(
                self.dims,
                &sv.inputs.values[H2][..t * e],
                sv.inputs.for_adapter(H2, t * e),
                grow(out, t * ff),
                &mut sv.xa[slot(target)],
            );
        }
        grow(&mut sv.inputs.values[M], t * ff)
            .par_iter_mut()
            .zip(sv.g[..t * ff].par_iter())
            .zip(sv.u[..t * ff].par_iter())
            .for_each(|((m, &g), &u)| *m = g / (1.0 + exp(-g)) * u);
        sv.inputs.drop_out(M, t * ff, dropout);
        self.residual(&layer.proj[&Target::Down], sv, M, x, tmp);
    }

    /// RoPE over `heads` heads of each position of `x` (or back).
    fn rope(&self, x: &mut [f32], heads: usize, inverse: bool) {
        rope(
            x,
            heads,
            self.dims.d,
            self.cos,
            self.sin,
            self.neox,
            inverse,
        );
    }

    /// `x += proj(input)`.
    fn residual(
        &self,
        proj: &Proj,
        sv: &mut Saved,
        input: usize,
        x: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        let (t, e) = (self.dims.t, self.dims.e);
        let n = t * proj.n_in;
        let target = if input == Y { Target::O } else { Target::Down };
        let out = grow(tmp, t * e);
        proj.forward(
            self.dims,
            &sv.inputs.values[input][..n],
            sv.inputs.for_adapter(input, n),
            out,
            &mut sv.xa[slot(target)],
        );
        x.par_iter_mut()
            .zip(out.par_iter())
            .for_each(|(x, o)| *x += o);
    }

    /// A projection's backward pass from the saved activations.
    fn project_back(
        &self,
        (layer, sv, target): (&Layer, &Saved, Target),
        dy: &[f32],
        dx: Option<(&mut [f32], bool)>,
        grads: &mut [Vec<f32>],
        (dxa, dxd): (&mut Vec<f32>, &mut Vec<f32>),
    ) {
        let proj = &layer.proj[&target];
        let input = input_of(target);
        let xd = sv.inputs.for_adapter(input, self.dims.t * proj.n_in);
        let mask = sv.inputs.masks[input].as_deref();
        let saved = (xd, &sv.xa[slot(target)][..], mask);
        proj.backward(self.dims, dy, saved, dx, grads, (dxa, dxd));
    }

    /// One layer backward: `s.dx` goes in as the gradient of the layer's
    /// output and comes out as its input's (not computed for the lowest
    /// layer that runs backward: below it nothing is trained).
    fn backward_layer(
        &self,
        layer: &Layer,
        sv: &Saved,
        lowest: bool,
        grads: &mut [Vec<f32>],
        s: &mut Scratch,
    ) {
        self.backward_mlp(layer, sv, grads, s);
        self.backward_attention(layer, sv, lowest, grads, s);
    }

    /// The backward pass of [`Pass::forward_mlp`].
    fn backward_mlp(&self, layer: &Layer, sv: &Saved, grads: &mut [Vec<f32>], s: &mut Scratch) {
        let Dims { t, e, ff, .. } = self.dims;
        let dx = &mut s.dx[..t * e];
        let dm = grow(&mut s.dm, t * ff);
        let sides = (&mut s.dxa, &mut s.dxd);
        let down = (layer, sv, Target::Down);
        self.project_back(down, dx, Some((dm, false)), grads, (sides.0, sides.1));
        let dg = grow(&mut s.dg, t * ff);
        let du = grow(&mut s.du, t * ff);
        dg.par_iter_mut()
            .zip(du.par_iter_mut())
            .zip(dm.par_iter())
            .zip(sv.g[..t * ff].par_iter().zip(sv.u[..t * ff].par_iter()))
            .for_each(|(((dg, du), &dm), (&g, &u))| {
                let sg = 1.0 / (1.0 + exp(-g));
                *du = dm * g * sg;
                *dg = dm * u * sg * (1.0 + g * (1.0 - sg));
            });
        let dh = grow(&mut s.dh, t * e);
        for (target, dout, accumulate) in [(Target::Gate, &*dg, false), (Target::Up, &*du, true)] {
            let dh = Some((&mut *dh, accumulate));
            self.project_back((layer, sv, target), dout, dh, grads, (sides.0, sides.1));
        }
        rms_backward(&sv.x2[..t * e], &sv.r2[..t], layer.ffn_norm, dh, dx);
    }

    /// The backward pass of [`Pass::forward_attention`].
    fn backward_attention(
        &self,
        layer: &Layer,
        sv: &Saved,
        lowest: bool,
        grads: &mut [Vec<f32>],
        s: &mut Scratch,
    ) {
        let Dims { t, e, d, heads, .. } = self.dims;
        let kv = self.dims.kv();
        let dx = &mut s.dx[..t * e];
        let sides = (&mut s.dxa, &mut s.dxd);
        let dy = grow(&mut s.dy, t * e);
        let o = (layer, sv, Target::O);
        self.project_back(o, dx, Some((&mut *dy, false)), grads, (sides.0, sides.1));
        let (dq, dk, dv) = (
            grow(&mut s.dq, t * e),
            grow(&mut s.dk, t * kv),
            grow(&mut s.dv, t * kv),
        );
        attention_backward(
            self.dims,
            (&sv.q[..t * e], &sv.k[..t * kv], &sv.v[..t * kv]),
            dy,
            HeadScratch {
                p: grow(&mut s.p, heads * t * t),
                dp: grow(&mut s.dp, heads * t * t),
                dq: grow(&mut s.dq_heads, heads * t * d),
                dk: grow(&mut s.dk_heads, heads * t * d),
                dv: grow(&mut s.dv_heads, heads * t * d),
            },
            (&mut *dq, &mut *dk, &mut *dv),
        );
        self.rope(dq, heads, true);
        self.rope(dk, self.dims.kv_heads, true);
        let dh = &mut s.dh[..t * e];
        for (target, dout, accumulate) in [
            (Target::Q, &*dq, false),
            (Target::K, &*dk, true),
            (Target::V, &*dv, true),
        ] {
            let dh = (!lowest).then_some((&mut *dh, accumulate));
            self.project_back((layer, sv, target), dout, dh, grads, (sides.0, sides.1));
        }
        if !lowest {
            rms_backward(&sv.x[..t * e], &sv.r1[..t], layer.attn_norm, dh, dx);
        }
    }

    /// The lm head on the rows that predict the targets (`from..from + n`
    /// of the final `x`), and the loss: leaves in `s.dx` the gradient of
    /// the final `x` (zero on the other rows).
    fn head(
        &self,
        (x, from, targets): (&[f32], usize, &[u32]),
        (norm, out_w): (&[f32], &[f32]),
        ws_head: (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
        loss_scale: f32,
        s: &mut Scratch,
    ) -> f64 {
        let (t, e) = (self.dims.t, self.dims.e);
        let n = targets.len();
        let vocab = out_w.len() / e;
        let rows = &x[from * e..(from + n) * e];
        let rf = grow(ws_head.0, n);
        let hf = grow(ws_head.1, n * e);
        rms_forward(rows, norm, self.eps, rf, hf);
        let logits = grow(ws_head.2, n * vocab);
        // In slices of the vocabulary: gemm packs its right operand whole,
        // and a slice's fits the heap (see `recap train`'s heap settings)
        // where the whole head's would be mapped afresh on every call.
        for c0 in (0..vocab).step_by(VOCAB_SLICE) {
            let c1 = (c0 + VOCAB_SLICE).min(vocab);
            matmul(
                ViewMut::strided(&mut logits[c0..], n, c1 - c0, vocab),
                View::new(hf, n, e),
                View::new(&out_w[c0 * e..c1 * e], c1 - c0, e).t(),
                false,
                1.0,
            );
        }
        let loss = cross_entropy(logits, vocab, targets, loss_scale);
        let dh = grow(&mut s.dh, n * e);
        matmul(
            ViewMut::new(dh, n, e),
            View::new(logits, n, vocab),
            View::new(out_w, vocab, e),
            false,
            1.0,
        );
        let dx = grow(&mut s.dx, t * e);
        dx.fill(0.0);
        rms_backward(rows, rf, norm, dh, &mut dx[from * e..(from + n) * e]);
        loss
    }
}

impl TrainModel {
    /// The mean cross-entropy of `ids[target_start..]` (as
    /// [`TrainModel::loss`]), with `loss_scale ×` its gradient with
    /// respect to each adapter added to `grads` (in [`TrainModel::vars`]'s
    /// order). CPU only.
    pub(crate) fn backprop(
        &self,
        ids: &[u32],
        target_start: usize,
        dropout: &mut Dropout,
        loss_scale: f64,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<f64> {
        let t = ids.len();
        if target_start == 0 || target_start >= t {
            candle_core::bail!("an example needs prompt and target tokens ({target_start} of {t})");
        }
        let l = self.layout;
        let dims = Dims {
            t,
            e: l.n_embd,
            heads: l.n_head,
            kv_heads: l.n_kv_head,
            d: l.head_dim(),
            ff: l.n_ff,
            r: self.spec.r,
            s: self.scale() as f32,
        };
        let frozen = [&self.embed, &self.output, &self.norm, &self.cos, &self.sin];
        let [embed, output, norm, cos, sin] = frozen.map(Held::new);
        let (embed, output, norm, cos, sin) = (embed?, output?, norm?, cos?, sin?);
        let half = dims.d / 2;
        self.check_inputs(ids, &embed, &output, &cos, grads)?;
        let loras = self.lora_values()?;
        let held = self.held_layers()?;
        let transposed = self.transposed_weights(&held);
        let layers: Vec<Layer> = held
            .iter()
            .zip(transposed)
            .enumerate()
            .map(|(i, (h, wt))| layer_view(l, i, h, wt, &loras))
            .collect();
        let pass = Pass {
            dims,
            eps: self.eps as f32,
            neox: self.rope_neox,
            cos: &cos.values()[..t * half],
            sin: &sin.values()[..t * half],
        };

        ws.saved.resize_with(l.n_layer, Saved::default);
        let e = dims.e;
        let x = grow(&mut ws.x, t * e);
        for (row, &id) in x.chunks_mut(e).zip(ids) {
            let id = id as usize;
            row.copy_from_slice(&embed.values()[id * e..(id + 1) * e]);
        }
        for (layer, sv) in layers.iter().zip(ws.saved.iter_mut()) {
            let scratch = ForwardScratch {
                tmp: &mut ws.tmp,
                heads_out: &mut ws.heads_out,
                probs: &mut ws.scratch.p,
            };
            pass.forward_layer(layer, sv, x, scratch, dropout);
        }
        let loss = pass.head(
            (x, target_start - 1, &ids[target_start..]),
            (norm.values(), output.values()),
            (&mut ws.rf, &mut ws.hf, &mut ws.logits),
            loss_scale as f32,
            &mut ws.scratch,
        );
        // Below the lowest adapted layer nothing is trained.
        let lowest = self.lora.keys().map(|&(li, _)| li).min().unwrap_or(0);
        for (i, (layer, sv)) in layers.iter().zip(&ws.saved).enumerate().rev() {
            if i < lowest {
                break;
            }
            pass.backward_layer(layer, sv, i == lowest, grads, &mut ws.scratch);
        }
        Ok(loss)
    }

    /// Refuses what the pass would otherwise index out of bounds: token ids
    /// outside the vocabulary, examples past the RoPE tables, a RoPE over
    /// part of the head, gradient buffers of other sizes.
    fn check_inputs(
        &self,
        ids: &[u32],
        embed: &Held,
        output: &Held,
        cos: &Held,
        grads: &[Vec<f32>],
    ) -> Result<()> {
        let l = self.layout;
        let vocab = (embed.values().len() / l.n_embd).min(output.values().len() / l.n_embd);
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("token id {bad} outside the vocabulary of {vocab}");
        }
        let (positions, half) = self.cos.dims2()?;
        if half != l.head_dim() / 2 {
            candle_core::bail!(
                "RoPE over {} of the head's {} dimensions: the hand-written pass rotates whole heads",
                2 * half,
                l.head_dim()
            );
        }
        if ids.len() > positions || cos.values().len() < ids.len() * half {
            candle_core::bail!(
                "{} tokens: longer than the model's context ({positions})",
                ids.len()
            );
        }
        // In `vars()`'s order (A then B of each adapter), whose names are
        // only made for the error.
        let sizes = self
            .lora
            .values()
            .flat_map(|(a, b)| [a.elem_count(), b.elem_count()]);
        if grads.len() != 2 * self.lora.len() {
            candle_core::bail!(
                "{} gradient buffers for {} tensors",
                grads.len(),
                2 * self.lora.len()
            );
        }
        if let Some(i) = grads.iter().zip(sizes).position(|(g, n)| g.len() != n) {
            let (name, var) = &self.vars()[i];
            candle_core::bail!(
                "gradient buffer for {name}: {} values, not {}",
                grads[i].len(),
                var.elem_count()
            );
        }
        Ok(())
    }

    /// The adapters, read in place, each with its gradients' place.
    fn lora_values(&self) -> Result<BTreeMap<(usize, Target), Lora<'_>>> {
        let mut loras = BTreeMap::new();
        for (j, (&key, (a, b))) in self.lora.iter().enumerate() {
            let lora = Lora {
                a: Held::new(a.as_tensor())?,
                b: Held::new(b.as_tensor())?,
                index: 2 * j,
            };
            loras.insert(key, lora);
        }
        Ok(loras)
    }

    /// Each frozen weight transposed, made on the first step and kept: the
    /// forward product `x·Wᵀ` reads Wᵀ row by row, which gemm then uses
    /// without repacking it on every call (W itself serves the backward
    /// product `dy·W` the same way).
    fn transposed_weights(&self, held: &[HeldLayer]) -> &[BTreeMap<Target, Vec<f32>>] {
        self.transposed.get_or_init(|| {
            let l = self.layout;
            held.iter()
                .map(|layer| {
                    layer
                        .w
                        .iter()
                        .map(|(&target, w)| {
                            let (out, inp) = l.shape(target);
                            (target, transpose(w.values(), out, inp))
                        })
                        .collect()
                })
                .collect()
        })
    }

    fn held_layers(&self) -> Result<Vec<HeldLayer<'_>>> {
        fn hold(m: &BTreeMap<Target, Tensor>) -> Result<BTreeMap<Target, Held<'_>>> {
            m.iter().map(|(&k, v)| Ok((k, Held::new(v)?))).collect()
        }
        self.layers
            .iter()
            .map(|layer| {
                Ok(HeldLayer {
                    w: hold(&layer.w)?,
                    bias: hold(&layer.bias)?,
                    attn_norm: Held::new(&layer.attn_norm)?,
                    ffn_norm: Held::new(&layer.ffn_norm)?,
                })
            })
            .collect()
    }
}

fn layer_view<'a>(
    layout: BaseLayout,
    i: usize,
    held: &'a HeldLayer,
    transposed: &'a BTreeMap<Target, Vec<f32>>,
    loras: &'a BTreeMap<(usize, Target), Lora<'a>>,
) -> Layer<'a> {
    let proj = held
        .w
        .iter()
        .map(|(&target, w)| {
            let (n_out, n_in) = layout.shape(target);
            let proj = Proj {
                w: w.values(),
                wt: &transposed[&target],
                bias: held.bias.get(&target).map(|b| b.values()),
                lora: loras.get(&(i, target)),
                n_out,
                n_in,
            };
            (target, proj)
        })
        .collect();
    Layer {
        proj,
        attn_norm: held.attn_norm.values(),
        ffn_norm: held.ffn_norm.values(),
        adapted: loras.keys().any(|&(li, _)| li == i),
    }
}

/// `m` (rows × cols, row-major) transposed, in tiles that stay in cache.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = m[r * cols + c];
                }
            }
        }
    }
    out
}
