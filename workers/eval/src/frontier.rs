//! The quality-cost frontier between a compact and a large model, reported
//! as RouteLLM does: how much must be spent to reach a given share of the
//! large model's quality. The curve comes from a threshold router on a
//! routing signal (here: input length, the signal recap's policy uses):
//! send the k highest-signal cases to large, k = 0..=n.

use serde::{Deserialize, Serialize};

/// One case as run by one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// ROUGE-L F1 (or any quality in [0, 1]).
    pub quality: f64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Cases sent to large.
    pub large_calls: usize,
    pub mean_quality: f64,
    pub total_cost_usd: f64,
}

/// The threshold-router curve, from all-compact to all-large.
pub fn threshold_curve(compact: &[Outcome], large: &[Outcome], signal: &[f64]) -> Vec<Point> {
    let n = compact.len().min(large.len()).min(signal.len());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| signal[b].total_cmp(&signal[a]).then(a.cmp(&b)));
    (0..=n)
        .map(|k| {
            let mut q = 0.0;
            let mut c = 0.0;
            for (rank, &i) in order.iter().enumerate() {
                let o = if rank < k { large[i] } else { compact[i] };
                q += o.quality;
                c += o.cost_usd;
            }
            Point {
                large_calls: k,
                mean_quality: if n == 0 { 0.0 } else { q / n as f64 },
                total_cost_usd: c,
            }
        })
        .collect()
}

/// The least cost on the curve that reaches `target` mean quality.
pub fn cost_to_reach(curve: &[Point], target: f64) -> Option<Point> {
    curve
        .iter()
        .filter(|p| p.mean_quality + 1e-12 >= target)
        .min_by(|a, b| a.total_cost_usd.total_cmp(&b.total_cost_usd))
        .copied()
}

/// The oracle: the better of the two on each case, at that one's cost.
pub fn oracle(compact: &[Outcome], large: &[Outcome]) -> (Point, Vec<bool>) {
    let n = compact.len().min(large.len());
    let mut picks = Vec::with_capacity(n);
    let (mut q, mut c) = (0.0, 0.0);
    for i in 0..n {
        let use_large = large[i].quality > compact[i].quality;
        let o = if use_large { large[i] } else { compact[i] };
        picks.push(use_large);
        q += o.quality;
        c += o.cost_usd;
    }
    let large_calls = picks.iter().filter(|&&p| p).count();
    (
        Point {
            large_calls,
            mean_quality: if n == 0 { 0.0 } else { q / n as f64 },
            total_cost_usd: c,
        },
        picks,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(q: f64, c: f64) -> Outcome {
        Outcome {
            quality: q,
            cost_usd: c,
        }
    }

    #[test]
    fn curve_runs_from_all_compact_to_all_large() {
        let compact = [o(0.2, 1.0), o(0.3, 1.0), o(0.1, 1.0)];
        let large = [o(0.4, 10.0), o(0.3, 10.0), o(0.5, 10.0)];
        let curve = threshold_curve(&compact, &large, &[5.0, 1.0, 9.0]);
        assert_eq!(curve.len(), 4);
        assert!((curve[0].mean_quality - 0.2).abs() < 1e-12 && curve[0].total_cost_usd == 3.0);
        assert!((curve[3].mean_quality - 0.4).abs() < 1e-12 && curve[3].total_cost_usd == 30.0);
        // The longest case (signal 9) goes first.
        assert!((curve[1].mean_quality - (0.2 + 0.3 + 0.5) / 3.0).abs() < 1e-12);
        let p = cost_to_reach(&curve, 0.9 * 0.4).unwrap();
        assert_eq!(p.large_calls, 2);
        assert!(cost_to_reach(&curve, 0.9).is_none());
    }

    #[test]
    fn oracle_takes_the_better() {
        let (p, picks) = oracle(&[o(0.2, 1.0), o(0.6, 1.0)], &[o(0.4, 10.0), o(0.5, 10.0)]);
        assert_eq!(picks, vec![true, false]);
        assert!((p.mean_quality - 0.5).abs() < 1e-12);
        assert_eq!(p.total_cost_usd, 11.0);
    }
}
