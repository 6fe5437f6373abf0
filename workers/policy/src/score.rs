//! The routing score: the probability that the compact tier's output is
//! enough for a job, from signals that cost nothing extra (the router's
//! features and the compact model's confidence in what it wrote). A small
//! logistic model, fitted by `recap policy calibrate` and applied in the
//! cascade: compact output whose score is under the threshold goes once to
//! the large tier. Pure: fitting, the frontier, the threshold choice and
//! cross-validation are here; the commands gather the cases.

use recap_job::SummaryKind;
use serde::{Deserialize, Serialize};

/// The features a score may name, and what each is.
pub const FEATURES: [(&str, &str); 13] = [
    ("log_input_tokens", "ln(1 + transcript tokens)"),
    ("speakers", "named speakers in the transcript"),
    ("query_words", "words of the job's query (0 without one)"),
    ("kind_overview", "1 for an overview, else 0"),
    ("kind_action_items", "1 for action items, else 0"),
    ("kind_decisions", "1 for decisions, else 0"),
    ("kind_short", "1 for a short summary, else 0"),
    ("non_english", "1 when the job's language is not English"),
    ("log_output_tokens", "ln(1 + generated tokens)"),
    (
        "mean_logprob",
        "mean log-probability of the generated tokens",
    ),
    ("mean_entropy", "mean next-token entropy while generating"),
    (
        "copy_rate",
        "share of output sentences copied from the transcript",
    ),
    (
        "repeat_ratio",
        "share of repeated word 4-grams in the output",
    ),
];

/// Fewest labelled cases `fit` accepts, and fewest of each class.
pub const MIN_CASES: usize = 20;
pub const MIN_PER_CLASS: usize = 3;

/// What is known of one compact output when the cascade judges it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Signals {
    pub input_tokens: u64,
    pub speakers: u32,
    pub kind: String,
    pub query_words: u32,
    pub non_english: bool,
    pub output_tokens: u32,
    /// None where the engine reports no confidence (the extractive baseline).
    pub mean_logprob: Option<f64>,
    pub mean_entropy: Option<f64>,
    pub copy_rate: f64,
    pub repeat_ratio: f64,
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// A feature's value; None for a signal the output lacks (or an unknown name).
pub fn value(name: &str, s: &Signals) -> Option<f64> {
    Some(match name {
        "log_input_tokens" => (1.0 + s.input_tokens as f64).ln(),
        "speakers" => s.speakers as f64,
        "query_words" => s.query_words as f64,
        "kind_overview" => flag(s.kind == "overview"),
        "kind_action_items" => flag(s.kind == "action_items"),
        "kind_decisions" => flag(s.kind == "decisions"),
        "kind_short" => flag(s.kind == "short"),
        "non_english" => flag(s.non_english),
        "log_output_tokens" => (1.0 + s.output_tokens as f64).ln(),
        "mean_logprob" => s.mean_logprob?,
        "mean_entropy" => s.mean_entropy?,
        "copy_rate" => s.copy_rate,
        "repeat_ratio" => s.repeat_ratio,
        _ => return None,
    })
}

pub fn is_known(name: &str) -> bool {
    FEATURES.iter().any(|(n, _)| *n == name)
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    #[error("unknown score features: {}; this build knows {}", .0.join(", "), known())]
    UnknownFeatures(Vec<String>),
    #[error("calibration needs at least {MIN_CASES} labelled cases, got {0}")]
    TooFewCases(usize),
    #[error("calibration needs at least {MIN_PER_CLASS} cases of each label; got {enough} where compact was enough and {not_enough} where it was not")]
    OneClass { enough: usize, not_enough: usize },
    #[error("score: {0}")]
    Invalid(String),
}

fn known() -> String {
    FEATURES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fitted score, as the policy file holds it (`[score]`). Features are
/// standardized with the calibration cases' `mean` and `scale` before the
/// weights apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Score {
    pub features: Vec<String>,
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    pub weights: Vec<f64>,
    pub bias: f64,
    /// Compact output scoring under this goes to the large tier.
    pub threshold: f64,
    /// The summary kinds it was fitted on and applies to; empty: all. A
    /// score learnt on one kind's outputs says nothing of another's.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// The compact model whose outputs it was fitted on; empty: any. A
    /// policy whose compact tier runs another model does not apply it.
    #[serde(default)]
    pub model: String,
    /// Where the fit came from, for people reading the file.
    #[serde(default)]
    pub fitted: String,
}

/// One feature's part in a score, for `recap policy explain`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Term {
    pub feature: String,
    /// None where the output lacks the signal: it then counts as the mean.
    pub value: Option<f64>,
    pub contribution: f64,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl Score {
    /// Checks a score read from a file: known features, matching lengths,
    /// finite numbers.
    pub fn validate(&self) -> Result<(), ScoreError> {
        let unknown: Vec<String> = self
            .features
            .iter()
            .filter(|f| !is_known(f))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(ScoreError::UnknownFeatures(unknown));
        }
        let n = self.features.len();
        for (name, len) in [
            ("mean", self.mean.len()),
            ("scale", self.scale.len()),
            ("weights", self.weights.len()),
        ] {
            if len != n {
                return Err(ScoreError::Invalid(format!(
                    "score.{name} has {len} values for {n} features"
                )));
            }
        }
        let finite = self
            .mean
            .iter()
            .chain(&self.weights)
            .chain(std::iter::once(&self.bias))
            .all(|v| v.is_finite());
        if !finite || self.scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ScoreError::Invalid(
                "score.mean, weights and bias must be finite and score.scale positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(ScoreError::Invalid(
                "score.threshold must be between 0 and 1".into(),
            ));
        }
        if let Some(k) = self.kinds.iter().find(|k| SummaryKind::parse(k).is_none()) {
            return Err(ScoreError::Invalid(format!(
                "score.kinds: unknown kind `{k}` (known: {})",
                SummaryKind::ALL.map(SummaryKind::as_str).join(", ")
            )));
        }
        Ok(())
    }

    fn z(&self, i: usize, s: &Signals) -> f64 {
        value(&self.features[i], s).map_or(0.0, |v| (v - self.mean[i]) / self.scale[i])
    }

    /// P(compact is enough) for one output.
    pub fn probability(&self, s: &Signals) -> f64 {
        let logit: f64 = (0..self.features.len())
            .map(|i| self.weights[i] * self.z(i, s))
            .sum::<f64>()
            + self.bias;
        sigmoid(logit)
    }

    /// Whether the score speaks for this output's kind.
    pub fn applies_to(&self, kind: &str) -> bool {
        self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind)
    }

    /// Whether the output goes on to the large tier. A threshold of 1
    /// escalates everything; an output lacking a signal the score needs is
    /// not judged by it (the other cascade checks still apply).
    pub fn escalates(&self, s: &Signals) -> bool {
        self.applies_to(&s.kind)
            && self.features.iter().all(|f| value(f, s).is_some())
            && (self.threshold >= 1.0 || self.probability(s) < self.threshold)
    }

    pub fn terms(&self, s: &Signals) -> Vec<Term> {
        (0..self.features.len())
            .map(|i| Term {
                feature: self.features[i].clone(),
                value: value(&self.features[i], s),
                contribution: self.weights[i] * self.z(i, s),
            })
            .collect()
    }
}

/// Fits a logistic score by Newton's method with an L2 penalty `l2` on the
/// standardized weights (not on the bias). The threshold is left at 0.5;
/// [`calibrate`] sets it for a target. Hand-written: a Newton solve over a
/// dozen features is a few lines, where linfa would bring ndarray and argmin.
pub fn fit(features: &[String], cases: &[(Signals, bool)], l2: f64) -> Result<Score, ScoreError> {
    fit_at_least(features, cases, l2, MIN_CASES)
}

/// `fit` with its own minimum: a cross-validation fold trains on part of
/// a set that met [`MIN_CASES`] as a whole.
fn fit_at_least(
    features: &[String],
    cases: &[(Signals, bool)],
    l2: f64,
    min_cases: usize,
) -> Result<Score, ScoreError> {
    let enough = check_fit(features, cases, l2, min_cases)?;
    let d = features.len();
    let (mean, scale, x) = standardized(features, cases);
    let y: Vec<f64> = cases.iter().map(|c| flag(c.1)).collect();
    let prior = enough as f64 / cases.len() as f64;
    let w = newton_fit(&x, &y, l2, prior)?;
    Ok(Score {
        features: features.to_vec(),
        mean,
        scale,
        weights: w[..d].to_vec(),
        bias: w[d],
        threshold: 0.5,
        kinds: {
            let mut k: Vec<String> = cases.iter().map(|c| c.0.kind.clone()).collect();
            k.sort();
            k.dedup();
            k
        },
        model: String::new(),
        fitted: String::new(),
    })
}

/// That the features are known, the penalty positive, and the cases many
/// enough with both labels; how many are labelled enough.
fn check_fit(
    features: &[String],
    cases: &[(Signals, bool)],
    l2: f64,
    min_cases: usize,
) -> Result<usize, ScoreError> {
    let unknown: Vec<String> = features.iter().filter(|f| !is_known(f)).cloned().collect();
    if !unknown.is_empty() {
        return Err(ScoreError::UnknownFeatures(unknown));
    }
    if !(l2.is_finite() && l2 > 0.0) {
        return Err(ScoreError::Invalid(format!(
            "the L2 penalty must be a positive number, got {l2}"
        )));
    }
    if cases.len() < min_cases {
        return Err(ScoreError::TooFewCases(cases.len()));
    }
    let enough = cases.iter().filter(|c| c.1).count();
    let not_enough = cases.len() - enough;
    if enough < MIN_PER_CLASS || not_enough < MIN_PER_CLASS {
        return Err(ScoreError::OneClass { enough, not_enough });
    }
    Ok(enough)
}

/// Each feature's mean and scale over the cases, and the cases' values
/// standardized by them. A missing signal takes the feature's mean over
/// the cases that have it (standardized: 0), as `probability` treats it.
fn standardized(
    features: &[String],
    cases: &[(Signals, bool)],
) -> (Vec<f64>, Vec<f64>, Vec<Vec<f64>>) {
    let d = features.len();
    let raw: Vec<Vec<Option<f64>>> = cases
        .iter()
        .map(|(s, _)| features.iter().map(|f| value(f, s)).collect())
        .collect();
    let mut mean = vec![0.0; d];
    let mut scale = vec![1.0; d];
    for j in 0..d {
        let present: Vec<f64> = raw.iter().filter_map(|r| r[j]).collect();
        if present.is_empty() {
            continue;
        }
        let m = present.iter().sum::<f64>() / present.len() as f64;
        let var = present.iter().map(|v| (v - m).powi(2)).sum::<f64>() / present.len() as f64;
        mean[j] = m;
        // A constant feature is left unscaled; its standardized value is 0.
        scale[j] = if var.sqrt() > 1e-9 { var.sqrt() } else { 1.0 };
    }
    let x: Vec<Vec<f64>> = raw
        .iter()
        .map(|r| {
            (0..d)
                .map(|j| r[j].map_or(0.0, |v| (v - mean[j]) / scale[j]))
                .collect()
        })
        .collect();
    (mean, scale, x)
}

/// L2-penalized logistic regression of `y` on `x` by Newton's method with
/// backtracking, from the prior's log-odds: the weights, then the bias.
fn newton_fit(x: &[Vec<f64>], y: &[f64], l2: f64, prior: f64) -> Result<Vec<f64>, ScoreError> {
    let d = x.first().map_or(0, Vec::len);
    let mut w = vec![0.0; d + 1];
    w[d] = (prior / (1.0 - prior)).ln();
    // The penalized negative log-likelihood Newton's steps descend.
    let loss = |w: &[f64]| -> f64 {
        let data: f64 = x
            .iter()
            .zip(y)
            .map(|(xi, &yi)| {
                let z: f64 = (0..d).map(|j| w[j] * xi[j]).sum::<f64>() + w[d];
                // log(1 + e^z) - y z, computed without overflow.
                z.max(0.0) + (-z.abs()).exp().ln_1p() - yi * z
            })
            .sum();
        data + 0.5 * l2 * w[..d].iter().map(|v| v * v).sum::<f64>()
    };
    for _ in 0..50 {
        let mut grad = vec![0.0; d + 1];
        let mut hess = vec![vec![0.0; d + 1]; d + 1];
        for (xi, &yi) in x.iter().zip(y) {
            let z: f64 = (0..d).map(|j| w[j] * xi[j]).sum::<f64>() + w[d];
            let p = sigmoid(z);
            let r = p * (1.0 - p);
            // The features with a 1 for the bias.
            let xe: Vec<f64> = xi.iter().copied().chain(std::iter::once(1.0)).collect();
            for (a, row) in hess.iter_mut().enumerate() {
                grad[a] += (p - yi) * xe[a];
                for (h, xb) in row.iter_mut().zip(&xe) {
                    *h += r * xe[a] * xb;
                }
            }
        }
        for j in 0..d {
            grad[j] += l2 * w[j];
            hess[j][j] += l2;
        }
        // A tiny ridge keeps the system solvable where a feature is constant.
        for (j, row) in hess.iter_mut().enumerate() {
            row[j] += 1e-9;
        }
        let Some(step) = solve(hess, grad) else {
            return Err(ScoreError::Invalid(
                "the fit did not converge (a singular system)".into(),
            ));
        };
        // Backtracking: halve the step until the loss does not rise.
        let before = loss(&w);
        let mut t = 1.0;
        let mut next: Vec<f64> = w.iter().zip(&step).map(|(wj, sj)| wj - sj).collect();
        while loss(&next) > before + 1e-12 && t > 1e-6 {
            t /= 2.0;
            next = w.iter().zip(&step).map(|(wj, sj)| wj - t * sj).collect();
        }
        let biggest = step.iter().fold(0f64, |m, s| m.max((t * s).abs()));
        w = next;
        if biggest < 1e-10 {
            break;
        }
    }
    Ok(w)
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (i, r) in rest.iter_mut().enumerate() {
            let f = r[col] / pivot_row[col];
            for (x, p) in r[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[col + 1 + i] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// One labelled case's two outcomes: what compact and large scored on it
/// (ROUGE-L against a reference, or a proxy) and what each cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outcomes {
    pub compact_quality: f64,
    pub large_quality: f64,
    pub compact_cost: f64,
    pub large_cost: f64,
}

/// A point of the cascade's quality-cost frontier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FrontierPoint {
    pub threshold: f64,
    /// Cases the cascade sends on to large.
    pub escalated: usize,
    pub mean_quality: f64,
    pub total_cost: f64,
    /// Against large-only, which is 1.0 on both.
    pub quality_share: f64,
    pub cost_share: f64,
}

/// The cascade's frontier over `probabilities`: escalating nothing, then
/// the lowest-scoring case, the two lowest, and so on to all. An escalated
/// case costs compact plus large (compact ran first) and scores large's.
pub fn frontier(probabilities: &[f64], outcomes: &[Outcomes]) -> Vec<FrontierPoint> {
    let n = probabilities.len().min(outcomes.len());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| probabilities[a].total_cmp(&probabilities[b]));
    let large_q: f64 = outcomes[..n].iter().map(|o| o.large_quality).sum();
    let large_c: f64 = outcomes[..n].iter().map(|o| o.large_cost).sum();
    let share = |v: f64, of: f64| if of > 0.0 { v / of } else { 0.0 };
    let mut q: f64 = outcomes[..n].iter().map(|o| o.compact_quality).sum();
    let mut c: f64 = outcomes[..n].iter().map(|o| o.compact_cost).sum();
    let mut points = Vec::with_capacity(n + 1);
    for k in 0..=n {
        if k > 0 {
            let o = &outcomes[order[k - 1]];
            q += o.large_quality - o.compact_quality;
            c += o.large_cost;
        }
        // A threshold between the k-th and (k+1)-th lowest scores; ties
        // cannot be split, so only the last of a run of equal scores counts.
        let below = if k == 0 {
            0.0
        } else {
            probabilities[order[k - 1]]
        };
        let above = if k == n { 1.0 } else { probabilities[order[k]] };
        if k > 0 && k < n && below == above {
            continue;
        }
        let threshold = match (k, k == n) {
            (0, _) => 0.0,
            (_, true) => 1.0,
            // Adjacent floats: the midpoint rounds to one of them.
            _ => match (below + above) / 2.0 {
                m if m > below => m,
                _ => above,
            },
        };
        points.push(FrontierPoint {
            threshold,
            escalated: k,
            mean_quality: if n == 0 { 0.0 } else { q / n as f64 },
            total_cost: c,
            quality_share: share(q, large_q),
            cost_share: share(c, large_c),
        });
    }
    points
}

/// What the calibrated policy is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Target {
    /// The cheapest threshold that reaches this share of large-only quality
    /// (above 1.0 asks to beat large-only).
    Quality(f64),
    /// The best quality at no more than this share of large-only cost.
    Cost(f64),
}

/// The frontier point that meets `target`; for a quality no point reaches,
/// the best one.
pub fn pick(points: &[FrontierPoint], target: Target) -> Option<FrontierPoint> {
    match target {
        Target::Quality(share) => points
            .iter()
            .filter(|p| p.quality_share >= share - 1e-12)
            .min_by(|a, b| a.total_cost.total_cmp(&b.total_cost))
            .or_else(|| {
                points.iter().max_by(|a, b| {
                    a.mean_quality
                        .total_cmp(&b.mean_quality)
                        .then(b.total_cost.total_cmp(&a.total_cost))
                })
            })
            .copied(),
        Target::Cost(share) => points
            .iter()
            .filter(|p| p.cost_share <= share + 1e-12)
            .max_by(|a, b| {
                a.mean_quality
                    .total_cmp(&b.mean_quality)
                    .then(b.total_cost.total_cmp(&a.total_cost))
            })
            .copied(),
    }
}

/// A labelled case: its signals, its label and its outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub signals: Signals,
    /// Compact was enough on this case.
    pub enough: bool,
    pub outcomes: Outcomes,
}

/// A fitted score with its threshold for a target, and the frontier it
/// was chosen on.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub score: Score,
    pub frontier: Vec<FrontierPoint>,
    pub chosen: FrontierPoint,
}

/// Fits the score on `cases` and sets its threshold for `target`.
pub fn calibrate(
    features: &[String],
    cases: &[Case],
    target: Target,
    l2: f64,
) -> Result<Calibration, ScoreError> {
    calibrate_at_least(features, cases, target, l2, MIN_CASES)
}

fn calibrate_at_least(
    features: &[String],
    cases: &[Case],
    target: Target,
    l2: f64,
    min_cases: usize,
) -> Result<Calibration, ScoreError> {
    let labelled: Vec<(Signals, bool)> = cases
        .iter()
        .map(|c| (c.signals.clone(), c.enough))
        .collect();
    let mut score = fit_at_least(features, &labelled, l2, min_cases)?;
    let probs: Vec<f64> = cases
        .iter()
        .map(|c| score.probability(&c.signals))
        .collect();
    let outcomes: Vec<Outcomes> = cases.iter().map(|c| c.outcomes).collect();
    let points = frontier(&probs, &outcomes);
    let chosen = pick(&points, target).ok_or_else(|| {
        ScoreError::Invalid(format!(
            "no threshold meets {target:?}: compact-only already costs more"
        ))
    })?;
    score.threshold = chosen.threshold;
    Ok(Calibration {
        score,
        frontier: points,
        chosen,
    })
}

/// Judges each case with a model built on the other folds (`i % folds`):
/// `build` makes one from a fold's training cases, `judge` applies it.
fn out_of_fold<M, T>(
    cases: &[Case],
    folds: usize,
    build: impl Fn(&[Case]) -> Result<M, ScoreError>,
    judge: impl Fn(&M, &Case) -> T,
) -> Result<Vec<T>, ScoreError> {
    if cases.len() < MIN_CASES {
        return Err(ScoreError::TooFewCases(cases.len()));
    }
    let folds = folds.max(2);
    let mut out: Vec<Option<T>> = cases.iter().map(|_| None).collect();
    for f in 0..folds {
        let train: Vec<Case> = cases
            .iter()
            .enumerate()
            .filter(|(i, _)| i % folds != f)
            .map(|(_, c)| c.clone())
            .collect();
        let model = build(&train)?;
        for (i, c) in cases.iter().enumerate().filter(|(i, _)| i % folds == f) {
            out[i] = Some(judge(&model, c));
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Out-of-fold escalation decisions: each case is judged by a score fitted
/// and thresholded on the other folds only, so the result says how the
/// policy does on cases it never saw.
pub fn cross_validate(
    features: &[String],
    cases: &[Case],
    folds: usize,
    target: Target,
    l2: f64,
) -> Result<Vec<bool>, ScoreError> {
    out_of_fold(
        cases,
        folds,
        |train| calibrate_at_least(features, train, target, l2, MIN_PER_CLASS * 2),
        |cal, c| cal.score.escalates(&c.signals),
    )
}

/// Each case's probability under a score fitted on the other folds: a
/// frontier over these is the held-out frontier.
pub fn out_of_fold_probabilities(
    features: &[String],
    cases: &[Case],
    folds: usize,
    l2: f64,
) -> Result<Vec<f64>, ScoreError> {
    out_of_fold(
        cases,
        folds,
        |train| {
            let labelled: Vec<(Signals, bool)> = train
                .iter()
                .map(|c| (c.signals.clone(), c.enough))
                .collect();
            fit_at_least(features, &labelled, l2, MIN_PER_CLASS * 2)
        },
        |score, c| score.probability(&c.signals),
    )
}

/// Mean quality and total cost of a cascade that escalates `escalate`.
pub fn cascade_outcome(outcomes: &[Outcomes], escalate: &[bool]) -> (f64, f64) {
    let n = outcomes.len().min(escalate.len());
    let (mut q, mut c) = (0.0, 0.0);
    for (o, &e) in outcomes.iter().zip(escalate) {
        q += if e {
            o.large_quality
        } else {
            o.compact_quality
        };
        c += o.compact_cost + if e { o.large_cost } else { 0.0 };
    }
    (if n == 0 { 0.0 } else { q / n as f64 }, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sig(logprob: f64, copy: f64) -> Signals {
        Signals {
            input_tokens: 500,
            kind: "overview".into(),
            output_tokens: 40,
            mean_logprob: Some(logprob),
            mean_entropy: Some(1.0),
            copy_rate: copy,
            ..Signals::default()
        }
    }

    fn names(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    /// Compact is enough when it was confident: a separable set.
    fn separable(n: usize) -> Vec<Case> {
        (0..n)
            .map(|i| {
                let lp = -0.2 - 1.6 * (i as f64 / n as f64);
                let enough = lp > -1.0;
                Case {
                    signals: sig(lp, 0.0),
                    enough,
                    outcomes: Outcomes {
                        compact_quality: if enough { 0.3 } else { 0.1 },
                        large_quality: 0.25,
                        compact_cost: 1.0,
                        large_cost: 5.0,
                    },
                }
            })
            .collect()
    }

    #[test]
    fn every_feature_has_a_value_and_unknown_ones_none() {
        let s = sig(-0.5, 0.25);
        for (name, _) in FEATURES {
            assert!(value(name, &s).is_some(), "{name}");
        }
        assert_eq!(value("vibes", &s), None);
        assert_eq!(value("mean_logprob", &Signals::default()), None);
    }

    #[test]
    fn fit_learns_the_direction_and_separates() {
        let cases = separable(40);
        let labelled: Vec<_> = cases
            .iter()
            .map(|c| (c.signals.clone(), c.enough))
            .collect();
        let mut s = fit(&names(&["mean_logprob", "copy_rate"]), &labelled, 0.1).unwrap();
        s.validate().unwrap();
        assert!(s.weights[0] > 0.0, "{s:?}");
        assert!(s.probability(&sig(-0.3, 0.0)) > 0.9);
        assert!(s.probability(&sig(-1.7, 0.0)) < 0.1);
        // It speaks for the kinds it was fitted on only.
        assert_eq!(s.kinds, ["overview"]);
        s.threshold = 0.5;
        assert!(s.escalates(&sig(-1.7, 0.0)));
        let other_kind = Signals {
            kind: "decisions".into(),
            ..sig(-1.7, 0.0)
        };
        assert!(!s.escalates(&other_kind));
        // A missing signal counts as the mean: the score stays finite.
        assert!(s.probability(&Signals::default()).is_finite());
    }

    #[test]
    fn bad_calibration_data_is_refused_with_counts() {
        let cases = separable(40);
        let labelled: Vec<_> = cases
            .iter()
            .map(|c| (c.signals.clone(), c.enough))
            .collect();
        let f = names(&["mean_logprob"]);
        assert_eq!(
            fit(&f, &labelled[..10], 1.0),
            Err(ScoreError::TooFewCases(10))
        );
        let all_good: Vec<_> = labelled.iter().map(|(s, _)| (s.clone(), true)).collect();
        let e = fit(&f, &all_good, 1.0).unwrap_err();
        assert_eq!(
            e,
            ScoreError::OneClass {
                enough: 40,
                not_enough: 0
            }
        );
        assert!(e.to_string().contains("40") && e.to_string().contains(" 0 "));
        assert!(matches!(fit(&f, &labelled, 0.0), Err(ScoreError::Invalid(m)) if m.contains("L2")));
        assert!(fit(&f, &labelled, -1.0).is_err());
        let e = fit(&names(&["mean_logprob", "vibes"]), &labelled, 1.0).unwrap_err();
        assert_eq!(e, ScoreError::UnknownFeatures(vec!["vibes".into()]));
        assert!(e.to_string().contains("vibes") && e.to_string().contains("copy_rate"));
    }

    #[test]
    fn validate_names_the_problem() {
        let cases = separable(40);
        let labelled: Vec<_> = cases
            .iter()
            .map(|c| (c.signals.clone(), c.enough))
            .collect();
        let good = fit(&names(&["mean_logprob"]), &labelled, 1.0).unwrap();
        let mut s = good.clone();
        s.features = names(&["future_signal"]);
        assert!(
            matches!(s.validate(), Err(ScoreError::UnknownFeatures(f)) if f == ["future_signal"])
        );
        let mut s = good.clone();
        s.weights.push(1.0);
        assert!(s.validate().unwrap_err().to_string().contains("weights"));
        let mut s = good.clone();
        s.scale[0] = 0.0;
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.threshold = 1.5;
        assert!(s.validate().unwrap_err().to_string().contains("threshold"));
        let mut s = good.clone();
        s.kinds = vec!["action-items".into()];
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("action-items"));
        // A threshold of 1 escalates everything; a missing signal, nothing.
        let mut s = good;
        s.threshold = 1.0;
        assert!(s.escalates(&sig(-0.1, 0.0)));
        let lacking = Signals {
            mean_logprob: None,
            ..sig(-0.1, 0.0)
        };
        assert!(!s.escalates(&lacking));
    }

    #[test]
    fn frontier_runs_from_compact_only_to_escalating_all() {
        let o = |cq: f64, lq: f64| Outcomes {
            compact_quality: cq,
            large_quality: lq,
            compact_cost: 1.0,
            large_cost: 4.0,
        };
        let outcomes = [o(0.1, 0.3), o(0.3, 0.2), o(0.2, 0.2)];
        let pts = frontier(&[0.2, 0.9, 0.5], &outcomes);
        assert_eq!(pts.len(), 4);
        assert_eq!(pts[0].escalated, 0);
        assert!((pts[0].mean_quality - 0.2).abs() < 1e-12);
        assert_eq!(pts[0].total_cost, 3.0);
        // The lowest score (case 0) goes first and gains 0.2.
        assert!((pts[1].mean_quality - 0.4 / 1.5).abs() < 1e-12);
        assert_eq!(pts[1].total_cost, 7.0);
        assert!(pts[1].threshold > 0.2 && pts[1].threshold < 0.5);
        assert_eq!(pts[3].total_cost, 15.0);
        assert!((pts[3].cost_share - 15.0 / 12.0).abs() < 1e-12);
        let best = pick(&pts, Target::Quality(1.0)).unwrap();
        assert_eq!(best.escalated, 1);
        let cheap = pick(&pts, Target::Cost(0.5)).unwrap();
        assert!(cheap.cost_share <= 0.5);
        // Ties are not split.
        assert_eq!(frontier(&[0.5, 0.5, 0.5], &outcomes).len(), 2);
    }

    #[test]
    fn calibrated_cross_validation_escalates_the_bad_cases() {
        let cases = separable(60);
        let f = names(&["mean_logprob", "log_output_tokens"]);
        let cal = calibrate(&f, &cases, Target::Quality(1.0), 0.1).unwrap();
        assert!(cal.chosen.quality_share >= 1.0 - 1e-9, "{:?}", cal.chosen);
        // The best quality within large-only's cost escalates exactly the
        // cases where compact was not enough.
        let esc = cross_validate(&f, &cases, 5, Target::Cost(1.0), 0.1).unwrap();
        // Folds of the smallest accepted set still fit.
        let few: Vec<Case> = cases.iter().step_by(3).cloned().collect();
        assert_eq!(few.len(), MIN_CASES);
        cross_validate(&f, &few, 5, Target::Cost(1.0), 0.1).unwrap();
        assert_eq!(
            cross_validate(&f, &few[1..], 5, Target::Cost(1.0), 0.1),
            Err(ScoreError::TooFewCases(MIN_CASES - 1))
        );
        let wrong = esc
            .iter()
            .zip(&cases)
            .filter(|(e, c)| **e == c.enough)
            .count();
        assert!(wrong <= 6, "{wrong} of 60 out-of-fold decisions wrong");
        let outcomes: Vec<_> = cases.iter().map(|c| c.outcomes).collect();
        let (q, c) = cascade_outcome(&outcomes, &esc);
        assert!(q > 0.27 && c < 60.0 * 6.0, "{q} {c}");
    }

    proptest! {
        #[test]
        fn frontier_shares_and_monotone_cost(
            ps in proptest::collection::vec(0.0f64..1.0, 1..30),
            seed in 0u64..1000,
        ) {
            let outcomes: Vec<Outcomes> = ps.iter().enumerate().map(|(i, _)| Outcomes {
                compact_quality: ((i as u64 * 7 + seed) % 10) as f64 / 10.0,
                large_quality: ((i as u64 * 3 + seed) % 10) as f64 / 10.0,
                compact_cost: 1.0,
                large_cost: 3.0,
            }).collect();
            let pts = frontier(&ps, &outcomes);
            prop_assert_eq!(pts[0].escalated, 0);
            prop_assert_eq!(pts.last().unwrap().escalated, ps.len());
            for w in pts.windows(2) {
                prop_assert!(w[1].total_cost > w[0].total_cost);
                prop_assert!(w[1].threshold >= w[0].threshold);
            }
            // A point's threshold escalates exactly its cases.
            for p in &pts {
                let n = if p.threshold >= 1.0 {
                    ps.len()
                } else {
                    ps.iter().filter(|&&x| x < p.threshold).count()
                };
                prop_assert_eq!(n, p.escalated);
            }
        }

        #[test]
        fn probability_is_a_probability(lp in -20.0f64..0.0, copy in 0.0f64..1.0) {
            let cases = separable(30);
            let labelled: Vec<_> = cases.iter().map(|c| (c.signals.clone(), c.enough)).collect();
            let s = fit(&names(&["mean_logprob", "copy_rate"]), &labelled, 1.0).unwrap();
            let p = s.probability(&sig(lp, copy));
            prop_assert!((0.0..=1.0).contains(&p));
        }
    }
}
