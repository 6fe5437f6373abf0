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

use recap_job::SummaryKind;
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
    pub const ALL: [Tier; 2] = [Tier::Compact, Tier::Large];

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

/// Why the policy chose a tier: a stable code, written as `as_str` gives
/// it in SQL, JSON and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Default,
    QualityBest,
    QualityEconomy,
    ContextOverflow,
    ContextChunked,
    Budget,
    NoLargeTier,
    NoCompactTier,
    /// Compact output failed the cascade's checks or score: sent on to the
    /// large tier once (the worker's decision, not `decide`'s).
    Cascade,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::Default,
        Reason::QualityBest,
        Reason::QualityEconomy,
        Reason::ContextOverflow,
        Reason::ContextChunked,
        Reason::Budget,
        Reason::NoLargeTier,
        Reason::NoCompactTier,
        Reason::Cascade,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Default => "default",
            Reason::QualityBest => "quality_best",
            Reason::QualityEconomy => "quality_economy",
            Reason::ContextOverflow => "context_overflow",
            Reason::ContextChunked => "context_chunked",
            Reason::Budget => "budget",
            Reason::NoLargeTier => "no_large_tier",
            Reason::NoCompactTier => "no_compact_tier",
            Reason::Cascade => "cascade",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a job goes and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub tier: Tier,
    pub model: String,
    pub reason: Reason,
    /// Every rule that had a say, in order, for `recap policy explain`.
    pub trail: Vec<String>,
    pub estimated_cost_usd: f64,
    /// Also run on the large tier as a shadow (compact decisions only).
    pub shadow: bool,
    /// The transcript will be chunked (it overflows the compact window).
    pub chunked: bool,
}

/// Expected output tokens of one summary kind: its cap
/// (`SummaryKind::max_output_tokens`), an overview's for a name that is no kind.
pub fn expected_output_tokens(kind: &str) -> u64 {
    let kind = SummaryKind::parse(kind).unwrap_or(SummaryKind::Overview);
    kind.max_output_tokens() as u64
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

    /// The decision for one job: the rules in order, each its own step.
    /// `Err` only when no tier can take it.
    pub fn decide(
        &self,
        f: &Features,
        tiers: &Tiers,
        budget: &BudgetState,
    ) -> Result<Decision, PolicyError> {
        let mut route = self.quality_rule(f, tiers);
        self.context_fit_rule(f, tiers, &mut route);
        route.onto_a_served_tier(tiers)?;
        let cost = self.budget_rule(f, tiers, budget, &mut route)?;
        let shadow = self.shadow_rule(f, tiers, &mut route);
        if route.trail.is_empty() {
            route.trail.push("default: compact".to_string());
        }
        Ok(Decision {
            tier: route.tier,
            model: self.model_for(tiers, route.tier, route.extractive),
            reason: route.reason,
            trail: route.trail,
            estimated_cost_usd: cost,
            shadow,
            chunked: route.chunked,
        })
    }

    fn model_for(&self, tiers: &Tiers, tier: Tier, extractive: bool) -> String {
        if extractive {
            self.extractive_model.clone().unwrap_or_default()
        } else {
            tiers.model(tier).unwrap_or_default().to_string()
        }
    }

    /// Rule 1, quality: `best` asks for the large tier; `economy` for the
    /// extractive baseline where one is configured.
    fn quality_rule(&self, f: &Features, tiers: &Tiers) -> Route {
        let mut route = Route::new(Tier::Compact, Reason::Default);
        match f.quality.as_str() {
            "best"
                if self.rules.quality
                    && self.quality.best == Tier::Large
                    && tiers.model(Tier::Large).is_some() =>
            {
                route
                    .trail
                    .push("quality: best asks for the large tier".to_string());
                route.tier = Tier::Large;
                route.reason = Reason::QualityBest;
            }
            "economy"
                if self.rules.quality
                    && self.quality.economy_extractive
                    && self.extractive_model.is_some() =>
            {
                route
                    .trail
                    .push("quality: economy runs the extractive baseline".to_string());
                route.reason = Reason::QualityEconomy;
                route.extractive = true;
            }
            _ => {}
        }
        route
    }

    /// Rule 2, context fit: a transcript over the compact window goes to
    /// the large tier, or stays compact and is chunked, as configured.
    fn context_fit_rule(&self, f: &Features, tiers: &Tiers, route: &mut Route) {
        let window = self.context_fit.compact_window;
        if !self.rules.context_fit
            || route.tier != Tier::Compact
            || route.extractive
            || f.input_tokens <= window as u64
        {
            return;
        }
        let tokens = f.input_tokens;
        if self.context_fit.overflow == Tier::Large && tiers.model(Tier::Large).is_some() {
            route.trail.push(format!(
                "context_fit: {tokens} tokens exceed the compact window of {window}: large"
            ));
            route.tier = Tier::Large;
            route.reason = Reason::ContextOverflow;
        } else {
            route.trail.push(format!(
                "context_fit: {tokens} tokens exceed the compact window of {window}: chunked on compact"
            ));
            route.chunked = true;
            route.reason = Reason::ContextChunked;
        }
    }

    /// Rule 3, budget: an estimate that would overspend the tenant's budget
    /// moves down the price ladder (compact, then the extractive baseline)
    /// until one fits; none fitting refuses the job. Returns the estimate.
    fn budget_rule(
        &self,
        f: &Features,
        tiers: &Tiers,
        budget: &BudgetState,
        route: &mut Route,
    ) -> Result<f64, PolicyError> {
        let model = self.model_for(tiers, route.tier, route.extractive);
        let cost = self.estimate(&model, f);
        if !self.rules.budget || budget.affords(cost) {
            return Ok(cost);
        }
        let has_compact = tiers.model(Tier::Compact).is_some();
        let mut ladder: Vec<(Tier, bool)> = vec![];
        if route.tier == Tier::Large && has_compact {
            ladder.push((Tier::Compact, false));
        }
        if self.extractive_model.is_some() && has_compact {
            ladder.push((Tier::Compact, true));
        }
        let remaining = budget.remaining().unwrap_or(f64::INFINITY);
        let fit = ladder
            .into_iter()
            .map(|(t, x)| {
                let m = self.model_for(tiers, t, x);
                let c = self.estimate(&m, f);
                (t, x, m, c)
            })
            .find(|&(_, _, _, c)| budget.affords(c));
        let Some((tier, extractive, cheaper, cheaper_cost)) = fit else {
            return Err(PolicyError::BudgetExhausted {
                tenant: f.tenant.clone(),
                needed_usd: cost,
                remaining_usd: remaining,
            });
        };
        route.trail.push(format!(
            "budget: {model} costs ${cost:.6}, ${remaining:.6} left: {cheaper}"
        ));
        route.tier = tier;
        route.extractive = extractive;
        route.reason = Reason::Budget;
        Ok(cheaper_cost)
    }

    /// Rule 4, shadow: a seeded share of compact model jobs also runs on the
    /// large tier.
    fn shadow_rule(&self, f: &Features, tiers: &Tiers, route: &mut Route) -> bool {
        let shadow = self.rules.shadow
            && route.tier == Tier::Compact
            && !route.extractive
            && tiers.model(Tier::Large).is_some()
            && unit_hash(&f.job_id, self.shadow.seed) < self.shadow.rate;
        if shadow {
            route
                .trail
                .push(format!("shadow: sampled at rate {}", self.shadow.rate));
        }
        shadow
    }
}

/// A decision while the rules make it.
struct Route {
    tier: Tier,
    extractive: bool,
    reason: Reason,
    chunked: bool,
    trail: Vec<String>,
}

impl Route {
    fn new(tier: Tier, reason: Reason) -> Route {
        Route {
            tier,
            extractive: false,
            reason,
            chunked: false,
            trail: Vec::new(),
        }
    }

    /// A tier without a model is never chosen: the other one takes the
    /// job, or `NoTier` when neither has a model.
    fn onto_a_served_tier(&mut self, tiers: &Tiers) -> Result<(), PolicyError> {
        if tiers.model(self.tier).is_some() {
            return Ok(());
        }
        let other = match self.tier {
            Tier::Compact => Tier::Large,
            Tier::Large => Tier::Compact,
        };
        if tiers.model(other).is_none() {
            return Err(PolicyError::NoTier);
        }
        self.trail.push(format!(
            "tier {} has no model: {}",
            self.tier.as_str(),
            other.as_str()
        ));
        self.reason = match self.tier {
            Tier::Compact => Reason::NoCompactTier,
            Tier::Large => Reason::NoLargeTier,
        };
        self.tier = other;
        self.extractive = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
