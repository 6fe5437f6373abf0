//! AdamW with its moments in the open (a checkpoint saves and restores
//! them; candle-nn's AdamW keeps them private), the learning-rate schedule
//! and gradient clipping.

use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Linear,
}

/// Linear warmup to `peak`, then cosine or linear decay to `floor` at
/// `total` steps. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub floor: f64,
    pub warmup: usize,
    pub total: usize,
    pub decay: Decay,
}

impl Schedule {
    /// The rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let done = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let k = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
            Decay::Linear => 1.0 - done,
        };
        self.floor + (self.peak - self.floor) * k
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW (Loshchilov and Hutter), decoupled weight decay.
pub struct AdamW {
    pub params: AdamWParams,
    /// Steps taken.
    pub t: usize,
    /// First and second moments, per variable, in the variables' order.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<AdamW> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(AdamW {
            params,
            t: 0,
            m: vars.iter().map(zeros).collect::<Result<_>>()?,
            v: vars.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// One update of every variable by its gradient at rate `lr`.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        let p = self.params;
        self.t += 1;
        let t = self.t as i32;
        let c1 = 1.0 - p.beta1.powi(t);
        let c2 = 1.0 - p.beta2.powi(t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m / c1)?;
            let v_hat = (&v / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The global L2 norm of the gradients.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

/// Scales the gradients down so that their global norm is at most `max`
/// (unchanged below it); returns the norm before clipping.
pub fn clip(grads: &mut [Tensor], max: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max > 0.0 && norm > max {
        let k = max / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * k)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use proptest::prelude::*;

    fn sched(decay: Decay) -> Schedule {
        Schedule {
            peak: 1e-3,
            floor: 1e-5,
            warmup: 10,
            total: 110,
            decay,
        }
    }

    #[test]
    fn the_schedule_warms_up_then_decays_to_the_floor() {
        for decay in [Decay::Cosine, Decay::Linear] {
            let s = sched(decay);
            assert!((s.lr(0) - 1e-4).abs() < 1e-12);
            assert!((s.lr(9) - 1e-3).abs() < 1e-12);
            assert!((s.lr(10) - 1e-3).abs() < 1e-12);
            assert!((s.lr(110) - 1e-5).abs() < 1e-12);
            assert!((s.lr(500) - 1e-5).abs() < 1e-12);
            let mid = s.lr(60);
            assert!(
                (mid - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-9,
                "{decay:?} {mid}"
            );
        }
    }

    proptest! {
        #[test]
        fn the_rate_stays_between_floor_and_peak_and_never_rises_after_warmup(
            warmup in 0usize..50, extra in 1usize..500, step in 0usize..1000,
        ) {
            for decay in [Decay::Cosine, Decay::Linear] {
                let s = Schedule { peak: 2e-4, floor: 0.0, warmup, total: warmup + extra, decay };
                let lr = s.lr(step);
                prop_assert!((0.0..=2e-4 + 1e-15).contains(&lr));
                if step >= warmup {
                    prop_assert!(s.lr(step + 1) <= lr + 1e-15);
                }
            }
        }
    }

    // AdamW's first step moves each weight by lr (times the gradient's
    // sign), as the bias-corrected moments make it; decay shrinks first.
    #[test]
    fn adamw_takes_the_textbook_first_step() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap()).unwrap();
        let g = Tensor::new(&[0.3f32, -0.1, 0.0], &dev).unwrap();
        let mut opt = AdamW::new(
            std::slice::from_ref(&var),
            AdamWParams {
                weight_decay: 0.1,
                ..AdamWParams::default()
            },
        )
        .unwrap();
        opt.step(std::slice::from_ref(&var), &[g], 0.01).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.t, 1);
        assert_eq!(opt.m[0].dtype(), DType::F32);
    }

    #[test]
    fn clipping_caps_the_global_norm_and_leaves_small_gradients() {
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32, 0.0], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        let before = clip(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-4);
        let norm = clip(&mut g, 10.0).unwrap();
        assert!((norm - 1.0).abs() < 1e-4);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-4);
    }
}
