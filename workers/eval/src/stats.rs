//! Means, percentiles and seeded bootstrap confidence intervals.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Interval {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The `p`-th percentile (0-100), linear between closest ranks.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// The mean with a 95% percentile-bootstrap interval over `resamples`
/// resamples, reproducible from `seed`.
pub fn bootstrap_ci(xs: &[f64], resamples: usize, seed: u64) -> Interval {
    let m = mean(xs);
    if xs.len() < 2 {
        return Interval {
            mean: m,
            low: m,
            high: m,
        };
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            let s: f64 = (0..xs.len())
                .map(|_| xs[rng.random_range(0..xs.len())])
                .sum();
            s / xs.len() as f64
        })
        .collect();
    Interval {
        mean: m,
        low: percentile(&means, 2.5),
        high: percentile(&means, 97.5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basics() {
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 50.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0], 50.0), 1.5);
        let ci = bootstrap_ci(&[0.5; 10], 200, 1);
        assert_eq!((ci.low, ci.mean, ci.high), (0.5, 0.5, 0.5));
    }

    proptest! {
        #[test]
        fn the_interval_holds_the_mean_and_is_reproducible(xs in proptest::collection::vec(0.0f64..1.0, 2..60), seed in any::<u64>()) {
            let a = bootstrap_ci(&xs, 300, seed);
            let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(a.low <= a.high);
            prop_assert!(a.low >= lo - 1e-12 && a.high <= hi + 1e-12);
            prop_assert_eq!(a, bootstrap_ci(&xs, 300, seed));
        }
    }
}
