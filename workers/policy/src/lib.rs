//! The cost policy as pure code: job features and budget state in, a
//! routing decision out. No IO: the router gathers the features and the
//! tenant's budget under a lock, this crate decides, and the same inputs
//! always give the same decision.
//!
//! Rules, in the order they apply:
//! 1. `quality`: `best` asks for the large tier, `economy` for compact (or
//!    the extractive baseline where configured).
//! 2. `context_fit`: a transcript longer than the compact window goes to the
//!    large tier, or stays compact and is chunked, as configured.
//! 3. `budget`: a job whose estimate would overspend the tenant's daily or
//!    monthly budget moves to a cheaper tier; if none fits, it is refused.
//! 4. `shadow`: a configured share of compact jobs also runs on large, for
//!    calibration (recorded, never returned).
//!
//! The cascade (compact output that fails checks goes once to large) is
//! judged after inference by [`cascade::check`] and, where the policy has
//! one, by the calibrated [`score::Score`] over the output's signals.

pub mod cascade;
mod config;
pub mod copying;
pub mod language;
pub mod score;

pub use config::{load_policy, PolicyConfig, PolicyError, Prices};

use serde::{Deserialize, Serialize};

/// What the router knows about a job when it decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    pub job_id: String,
    pub tenant: String,
    /// Input tokens, counted with the compact model's tokenizer.
    pub input_tokens: u64,
    pub utterances: u32,
    pub speakers: u32,
    pub kinds: Vec<String>,
    /// `economy`, `balanced` or `best`.
    pub quality: String,
}

/// Money a tenant has left, from the ledger, read under the tenant's lock.
/// `None` means no budget is set for that period.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct BudgetState {
    pub daily_remaining_usd: Option<f64>,
    pub monthly_remaining_usd: Option<f64>,
    /// The budgets themselves, for reporting.
    #[serde(default)]
    pub daily_limit_usd: Option<f64>,
    #[serde(default)]
    pub monthly_limit_usd: Option<f64>,
}

impl BudgetState {
    pub fn remaining(&self) -> Option<f64> {
        match (self.daily_remaining_usd, self.monthly_remaining_usd) {
            (Some(d), Some(m)) => Some(d.min(m)),
            (Some(d), None) => Some(d),
            (None, Some(m)) => Some(m),
            (None, None) => None,
        }
    }

    fn affords(&self, cost: f64) -> bool {
        self.remaining().is_none_or(|r| cost <= r + 1e-12)
    }
}

/// The tiers this deployment runs, and their models.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Tiers {
    pub compact: Option<String>,
    pub large: Option<String>,
}

impl Tiers {
    pub fn model(&self, tier: Tier) -> Option<&str> {
        match tier {
            Tier::Compact => self.compact.as_deref(),
            Tier::Large => self.large.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Compact,
    Large,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Compact => "compact",
            Tier::Large => "large",
        }
    }

    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "compact" => Some(Tier::Compact),
            "large" => Some(Tier::Large),
            _ => None,
        }
    }
}

/// Where a job goes and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub tier: Tier,
    pub model: String,
    /// A stable reason code: `default`, `quality_best`, `quality_economy`,
    /// `context_overflow`, `budget`, `no_large_tier`, `no_compact_tier`.
    pub reason: String,
    /// Every rule that had a say, in order, for `recap policy explain`.
    pub trail: Vec<String>,
    pub estimated_cost_usd: f64,
    /// Also run on the large tier as a shadow (compact decisions only).
    pub shadow: bool,
    /// The transcript will be chunked (it overflows the compact window).
    pub chunked: bool,
}

/// Expected output tokens of one summary kind (the engine's caps).
pub fn expected_output_tokens(kind: &str) -> u64 {
    match kind {
        "overview" => 200,
        "action_items" | "decisions" => 160,
        "short" => 60,
        _ => 200,
    }
}

/// A stable uniform number in [0, 1) from the job id: shadow sampling is
/// reproducible (FNV-1a, then the top 53 bits).
fn unit_hash(s: &str, seed: u64) -> f64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // Final avalanche (splitmix64) so that similar ids spread out.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d049bb133111eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl PolicyConfig {
    /// Estimated USD of running `features` on `model`.
    pub fn estimate(&self, model: &str, f: &Features) -> f64 {
        let p = self.price(model);
        let out: u64 = f.kinds.iter().map(|k| expected_output_tokens(k)).sum();
        // Each kind reads the whole transcript once.
        let input = f.input_tokens * f.kinds.len().max(1) as u64;
        p.cost(input, out)
    }

    /// The cascade's verdict on one compact output: the checks it fails,
    /// and `score` where the calibrated score puts it under the threshold.
    /// Empty means it stands. The caller applies the `cascade` rule.
    pub fn judge(
        &self,
        text: &str,
        speakers: &[&str],
        language: Option<&str>,
        signals: &score::Signals,
    ) -> Vec<cascade::Failure> {
        let mut failed = cascade::check(
            text,
            &signals.kind,
            speakers,
            language,
            signals.copy_rate,
            &self.cascade,
        );
        if let (true, Some(s)) = (self.rules.score, &self.score) {
            if failed.is_empty() && s.escalates(signals) {
                failed.push(cascade::Failure::Score);
            }
        }
        failed
    }

    /// The decision for one job. `Err` only when no tier can take it.
    pub fn decide(
        &self,
        f: &Features,
        tiers: &Tiers,
        budget: &BudgetState,
    ) -> Result<Decision, PolicyError> {
        let mut trail = Vec::new();
        let has = |t: Tier| tiers.model(t).is_some();
        // 1. quality hint.
        let (mut tier, mut reason) = match f.quality.as_str() {
            "best"
                if self.rules.quality && self.quality.best == Tier::Large && has(Tier::Large) =>
            {
                trail.push("quality: best asks for the large tier".to_string());
                (Tier::Large, "quality_best")
            }
            "economy"
                if self.rules.quality
                    && self.quality.economy_extractive
                    && self.extractive_model.is_some() =>
            {
                trail.push("quality: economy runs the extractive baseline".to_string());
                (Tier::Compact, "quality_economy")
            }
            _ => (Tier::Compact, "default"),
        };
        let mut extractive = reason == "quality_economy";
        // 2. context fit.
        let mut chunked = false;
        if self.rules.context_fit
            && tier == Tier::Compact
            && !extractive
            && f.input_tokens > self.context_fit.compact_window as u64
        {
            if self.context_fit.overflow == Tier::Large && has(Tier::Large) {
                trail.push(format!(
                    "context_fit: {} tokens exceed the compact window of {}: large",
                    f.input_tokens, self.context_fit.compact_window
                ));
                tier = Tier::Large;
                reason = "context_overflow";
            } else {
                trail.push(format!(
                    "context_fit: {} tokens exceed the compact window of {}: chunked on compact",
                    f.input_tokens, self.context_fit.compact_window
                ));
                chunked = true;
                reason = "context_chunked";
            }
        }
        // A tier without a model is never chosen.
        if !has(tier) {
            let other = if tier == Tier::Compact {
                Tier::Large
            } else {
                Tier::Compact
            };
            if !has(other) {
                return Err(PolicyError::NoTier);
            }
            trail.push(format!(
                "tier {} has no model: {}",
                tier.as_str(),
                other.as_str()
            ));
            reason = if tier == Tier::Compact {
                "no_compact_tier"
            } else {
                "no_large_tier"
            };
            tier = other;
            extractive = false;
        }
        let model_for = |t: Tier, extractive: bool| -> String {
            if extractive {
                self.extractive_model.clone().unwrap_or_default()
            } else {
                tiers.model(t).unwrap_or_default().to_string()
            }
        };
        let mut model = model_for(tier, extractive);
        let mut cost = self.estimate(&model, f);
        // 3. budgets: move down the price ladder until the estimate fits.
        if self.rules.budget && !budget.affords(cost) {
            let mut ladder: Vec<(Tier, bool)> = vec![];
            if tier == Tier::Large && has(Tier::Compact) {
                ladder.push((Tier::Compact, false));
            }
            if self.extractive_model.is_some() && has(Tier::Compact) {
                ladder.push((Tier::Compact, true));
            }
            let remaining = budget.remaining().unwrap_or(f64::INFINITY);
            let fit = ladder
                .into_iter()
                .find(|&(t, x)| budget.affords(self.estimate(&model_for(t, x), f)));
            match fit {
                Some((t, x)) => {
                    trail.push(format!(
                        "budget: {} costs ${cost:.6}, ${remaining:.6} left: {}",
                        model,
                        model_for(t, x)
                    ));
                    tier = t;
                    extractive = x;
                    model = model_for(t, x);
                    cost = self.estimate(&model, f);
                    reason = "budget";
                }
                None => {
                    return Err(PolicyError::BudgetExhausted {
                        tenant: f.tenant.clone(),
                        needed_usd: cost,
                        remaining_usd: remaining,
                    })
                }
            }
        }
        // 4. shadow sampling of compact model jobs.
        let shadow = self.rules.shadow
            && tier == Tier::Compact
            && !extractive
            && has(Tier::Large)
            && unit_hash(&f.job_id, self.shadow.seed) < self.shadow.rate;
        if shadow {
            trail.push(format!("shadow: sampled at rate {}", self.shadow.rate));
        }
        if trail.is_empty() {
            trail.push("default: compact".to_string());
        }
        Ok(Decision {
            tier,
            model,
            reason: reason.to_string(),
            trail,
            estimated_cost_usd: cost,
            shadow,
            chunked,
        })
    }
}

#[cfg(test)]
mod tests;
