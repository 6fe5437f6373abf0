//! The pass's element-wise and attention kernels, each with its backward
//! pass.

use super::matmul::{matmul_here, View, ViewMut};
use super::Dims;
use rayon::prelude::*;

pub(super) fn rms_forward(x: &[f32], w: &[f32], eps: f32, r: &mut [f32], h: &mut [f32]) {
    let e = w.len();
    h.par_chunks_mut(e)
        .zip(x.par_chunks(e))
        .zip(r.par_iter_mut())
        .for_each(|((h, x), r)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / e as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((h, x), w) in h.iter_mut().zip(x).zip(w) {
                *h = x * *r * w;
            }
        });
}

/// `dx += ∂h/∂x · dh` for h = x · r · w, r = 1/√(mean(x²) + eps).
pub(super) fn rms_backward(x: &[f32], r: &[f32], w: &[f32], dh: &[f32], dx: &mut [f32]) {
    let e = w.len();
    dx.par_chunks_mut(e)
        .zip(x.par_chunks(e))
        .zip(dh.par_chunks(e))
        .zip(r.par_iter())
        .for_each(|(((dx, x), dh), &r)| {
            let a: f32 = dh.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
            let c = r * r * r * a / e as f32;
            for j in 0..e {
                dx[j] += r * w[j] * dh[j] - x[j] * c;
            }
        });
}

/// Rotates each head of each position (rows of `heads · d`) by the RoPE
/// angles; `inverse` rotates back (a rotation's transpose).
pub(super) fn rope(
    x: &mut [f32],
    heads: usize,
    d: usize,
    cos: &[f32],
    sin: &[f32],
    neox: bool,
    inverse: bool,
) {
    let half = d / 2;
    x.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(pos, row)| {
            let c = &cos[pos * half..(pos + 1) * half];
            let s = &sin[pos * half..(pos + 1) * half];
            for head in row.chunks_mut(d) {
                for i in 0..half {
                    let (a, b) = if neox {
                        (i, i + half)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let sn = if inverse { -s[i] } else { s[i] };
                    let (x1, x2) = (head[a], head[b]);
                    head[a] = x1 * c[i] - x2 * sn;
                    head[b] = x1 * sn + x2 * c[i];
                }
            }
        });
}

/// e^x to within 2 ulp of `f32::exp` (tested below) for x in [-87, 88]:
/// e^x = 2^n · e^r with |r| ≤ ln2/2 and a degree-6 polynomial for e^r,
/// the method of Cephes' expf. Branch-free, so the compiler vectorizes the
/// loops that call it; libm's expf is a call per element, and no kept
/// crate offers a vectorizable one on stable Rust.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Σ x, in 16 lanes (the compiler vectorizes it; a single running sum
/// cannot be reordered, so it would not).
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v);
    }
    lanes.iter().sum::<f32>() + rest
}

/// Σ a·b over two slices of one length, in 16 lanes as [`sum`].
fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Softmax of `scale · row` over keys 0..=i of each query row i of a
/// (t, t) block; the masked keys get 0 (their scores, which the blocked
/// products leave unwritten, are not read).
fn causal_softmax(p: &mut [f32], t: usize, scale: f32) {
    p.chunks_mut(t).enumerate().for_each(|(i, row)| {
        let (seen, masked) = row.split_at_mut(i + 1);
        let max = seen
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
        seen.iter_mut().for_each(|v| *v = exp(*v * scale - max));
        let inv = 1.0 / sum(seen);
        seen.iter_mut().for_each(|v| *v *= inv);
        masked.fill(0.0);
    });
}

/// `dp ← scale · p ∘ (dp − Σ p·dp)` over keys 0..=i of each query row i:
/// the softmax's backward pass. The masked keys get 0 (their dp values,
/// which the blocked products leave unwritten, are not read).
fn softmax_backward(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    dp.chunks_mut(t)
        .zip(p.chunks(t))
        .enumerate()
        .for_each(|(i, (dp, p))| {
            let (seen, masked) = dp.split_at_mut(i + 1);
            let dot = dot(seen, &p[..seen.len()]);
            for (g, y) in seen.iter_mut().zip(p) {
                *g = scale * y * (*g - dot);
            }
            masked.fill(0.0);
        });
}

/// Query blocks of the causal attention: block [b0, b1) attends to keys
/// [0, b1), so the products skip most of the masked half.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    const BLOCK: usize = 64;
    (0..t)
        .step_by(BLOCK)
        .map(move |b0| (b0, (b0 + BLOCK).min(t)))
}

/// Mean cross-entropy of the rows of `logits` against `targets`; leaves in
/// `logits` the loss's gradient times `grad_scale`.
pub(super) fn cross_entropy(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    grad_scale: f32,
) -> f64 {
    let n = targets.len();
    let per_row = grad_scale / n as f32;
    // Per row, then summed in order: a parallel sum's order (so its last
    // bit) would vary from run to run, and a seed fixes the loss curve.
    let per_target: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let shifted_target = (row[target as usize] - max) as f64;
            row.iter_mut().for_each(|v| *v = exp(*v - max));
            let sum: f64 = row.iter().map(|&v| v as f64).sum();
            let scale = (1.0 / sum) as f32 * per_row;
            row.iter_mut().for_each(|v| *v *= scale);
            row[target as usize] -= per_row;
            sum.ln() - shifted_target
        })
        .collect();
    let total: f64 = per_target.iter().sum();
    total / n as f64
}

/// Head `h`'s attention probabilities (t, t) into `ph`: softmax of the
/// scaled scores over keys 0..=i for each query i (the rest 0). Query block
/// [b0, b1) sees keys [0, b1) only, so the products skip most of the
/// masked half.
fn probabilities(dims: Dims, (q, k): (&[f32], &[f32]), h: usize, ph: &mut [f32]) {
    let (t, e, d, kv) = (dims.t, dims.e, dims.d, dims.kv());
    let g = h / (dims.heads / dims.kv_heads);
    for (b0, b1) in blocks(t) {
        matmul_here(
            ViewMut::strided(&mut ph[b0 * t..], b1 - b0, b1, t),
            View::strided(&q[b0 * e + h * d..], b1 - b0, d, e),
            View::strided(&k[g * d..], b1, d, kv).t(),
            false,
            1.0,
        );
    }
    causal_softmax(ph, t, 1.0 / (d as f32).sqrt());
}

/// Causal attention of each query head over its key-value head, the heads
/// in parallel: `y` gets the heads' outputs side by side (t, heads · d),
/// by way of `heads_out` (heads, t, d); `p` (heads, t, t) is scratch. The
/// probabilities are not kept: the backward pass computes them again,
/// which costs a sixth of the attention's products and saves holding
/// layers · heads · t² values (gigabytes at 2,048 tokens).
pub(super) fn attention_forward(
    dims: Dims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    p: &mut [f32],
    heads_out: &mut [f32],
    y: &mut [f32],
) {
    let (t, e, d, kv) = (dims.t, dims.e, dims.d, dims.kv());
    let rep = dims.heads / dims.kv_heads;
    p.par_chunks_mut(t * t)
        .zip(heads_out.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(h, (ph, yh))| {
            let g = h / rep;
            probabilities(dims, (q, k), h, ph);
            for (b0, b1) in blocks(t) {
                matmul_here(
                    ViewMut::new(&mut yh[b0 * d..], b1 - b0, d),
                    View::strided(&ph[b0 * t..], b1 - b0, b1, t),
                    View::strided(&v[g * d..], b1, d, kv),
                    false,
                    1.0,
                );
            }
        });
    let heads_out = &*heads_out;
    y.par_chunks_mut(e).enumerate().for_each(|(i, row)| {
        for (h, out) in row.chunks_mut(d).enumerate() {
            out.copy_from_slice(&heads_out[(h * t + i) * d..(h * t + i + 1) * d]);
        }
    });
}

/// Per-head buffers of the attention's backward pass.
pub(super) struct HeadScratch<'a> {
    /// (heads, t, t) each
    pub(super) p: &'a mut [f32],
    pub(super) dp: &'a mut [f32],
    /// (heads, t, d) each
    pub(super) dq: &'a mut [f32],
    pub(super) dk: &'a mut [f32],
    pub(super) dv: &'a mut [f32],
}

/// The backward pass of [`attention_forward`]: from the output's gradient
/// `dy` (t, heads · d), the gradients of the queries, keys and values
/// (after RoPE). Heads run in parallel, each computing its probabilities
/// again; the query heads of a group add up their key and value gradients
/// at the end.
pub(super) fn attention_backward(
    dims: Dims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    dy: &[f32],
    scratch: HeadScratch,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (t, e, d, kv) = (dims.t, dims.e, dims.d, dims.kv());
    let rep = dims.heads / dims.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    scratch
        .p
        .par_chunks_mut(t * t)
        .zip(scratch.dp.par_chunks_mut(t * t))
        .zip(scratch.dq.par_chunks_mut(t * d))
        .zip(scratch.dk.par_chunks_mut(t * d))
        .zip(scratch.dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(h, ((((ph, dp), dqh), dkh), dvh))| {
            let g = h / rep;
            probabilities(dims, (q, k), h, ph);
            let ph = &*ph;
            for (b0, b1) in blocks(t) {
                matmul_here(
                    ViewMut::strided(&mut dp[b0 * t..], b1 - b0, b1, t),
                    View::strided(&dy[b0 * e + h * d..], b1 - b0, d, e),
                    View::strided(&v[g * d..], b1, d, kv).t(),
                    false,
                    1.0,
                );
                // Key block [b0, b1) is seen by queries [b0, t) only.
                matmul_here(
                    ViewMut::new(&mut dvh[b0 * d..], b1 - b0, d),
                    View::strided(&ph[b0 * t + b0..], t - b0, b1 - b0, t).t(),
                    View::strided(&dy[b0 * e + h * d..], t - b0, d, e),
                    false,
                    1.0,
                );
            }
            softmax_backward(ph, dp, t, scale);
            for (b0, b1) in blocks(t) {
                matmul_here(
                    ViewMut::new(&mut dqh[b0 * d..], b1 - b0, d),
                    View::strided(&dp[b0 * t..], b1 - b0, b1, t),
                    View::strided(&k[g * d..], b1, d, kv),
                    false,
                    1.0,
                );
                matmul_here(
                    ViewMut::new(&mut dkh[b0 * d..], b1 - b0, d),
                    View::strided(&dp[b0 * t + b0..], t - b0, b1 - b0, t).t(),
                    View::strided(&q[b0 * e + h * d..], t - b0, d, e),
                    false,
                    1.0,
                );
            }
        });
    let (dqh, dkh, dvh) = (&*scratch.dq, &*scratch.dk, &*scratch.dv);
    let at = |h: usize, i: usize| (h * t + i) * d..(h * t + i + 1) * d;
    dq.par_chunks_mut(e).enumerate().for_each(|(i, row)| {
        for (h, out) in row.chunks_mut(d).enumerate() {
            out.copy_from_slice(&dqh[at(h, i)]);
        }
    });
    for (sum, per_head) in [(dk, dkh), (dv, dvh)] {
        sum.par_chunks_mut(kv).enumerate().for_each(|(i, row)| {
            for (g, out) in row.chunks_mut(d).enumerate() {
                out.copy_from_slice(&per_head[at(g * rep, i)]);
                for h in g * rep + 1..(g + 1) * rep {
                    out.iter_mut()
                        .zip(&per_head[at(h, i)])
                        .for_each(|(o, x)| *o += x);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2_ulp_of_libm_over_its_range() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(ours.to_bits().abs_diff(libm.to_bits()));
            x += 0.000_37;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e9) < 1e-37 && exp(-1e9) >= 0.0);
    }

    #[test]
    fn lane_sums_equal_the_plain_sums() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().sum();
            assert!((sum(&a) - plain).abs() < 1e-4, "{n}");
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-4, "{n}");
        }
    }
}
