//! The policy file (TOML) and its validation. A bad file is refused whole,
//! naming the offending key; the router then keeps its last good policy.

use crate::score::{Score, ScoreError};
use crate::{Tier, Tiers};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy: {0}")]
    Parse(String),
    #[error("policy key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("no tier has a model: configure tiers.compact.model or tiers.large.model")]
    NoTier,
    #[error("tenant {tenant} has ${remaining_usd:.6} of budget left; the cheapest route costs ${needed_usd:.6}")]
    BudgetExhausted {
        tenant: String,
        needed_usd: f64,
        remaining_usd: f64,
    },
}

impl PolicyError {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::Parse(_) | PolicyError::Invalid { .. } => "bad_policy",
            PolicyError::NoTier => "no_tier",
            PolicyError::BudgetExhausted { .. } => "budget_exhausted",
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Price of a model: per 1k tokens, or per GPU-second with a throughput.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
    /// USD per GPU-second; with the two rates below it turns tokens into time.
    pub gpu_second: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

impl Prices {
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        let mut c = (input_tokens as f64 * self.input_per_1k
            + output_tokens as f64 * self.output_per_1k)
            / 1000.0;
        if self.gpu_second > 0.0 {
            let secs = input_tokens as f64 / self.prefill_tokens_per_s.max(1e-9)
                + output_tokens as f64 / self.decode_tokens_per_s.max(1e-9);
            c += secs * self.gpu_second;
        }
        c
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub quality: bool,
    pub context_fit: bool,
    pub budget: bool,
    pub shadow: bool,
    pub cascade: bool,
    /// The calibrated score judges compact output in the cascade.
    pub score: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextFit {
    /// Transcript tokens the compact model handles in one pass.
    pub compact_window: usize,
    /// `large`, or `compact` to chunk on the compact tier.
    #[serde(deserialize_with = "tier_de")]
    pub overflow: Tier,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quality {
    /// The tier `best` asks for.
    #[serde(deserialize_with = "tier_de")]
    pub best: Tier,
    /// `economy` runs the extractive baseline instead of the compact model.
    pub economy_extractive: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shadow {
    /// Share of compact jobs also run on large, 0 to 1.
    pub rate: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cascade {
    pub min_words: usize,
    pub max_words: usize,
    /// Largest share of repeated word 4-grams before the output counts as a loop.
    pub max_repeat_ratio: f64,
    /// The output names at least one speaker of the transcript (when it has any).
    pub require_speaker: bool,
    /// The output is in the job's language (when the job gives one).
    pub check_language: bool,
    /// Largest share of output sentences copied verbatim from the
    /// transcript (8 or more words in a row).
    pub max_copy_rate: f64,
}

fn tier_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Tier, D::Error> {
    let s = String::deserialize(d)?;
    Tier::parse(&s)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown tier `{s}` (compact or large)")))
}

impl Default for ContextFit {
    fn default() -> Self {
        ContextFit {
            compact_window: 2048,
            overflow: Tier::Large,
        }
    }
}

impl Default for Quality {
    fn default() -> Self {
        Quality {
            best: Tier::Large,
            economy_extractive: false,
        }
    }
}

impl Default for Shadow {
    fn default() -> Self {
        Shadow { rate: 0.0, seed: 1 }
    }
}

impl Default for Cascade {
    fn default() -> Self {
        Cascade {
            min_words: 3,
            max_words: 600,
            max_repeat_ratio: 0.35,
            require_speaker: true,
            check_language: true,
            // Off unless the policy sets it (config/policy.toml does).
            max_copy_rate: 1.0,
        }
    }
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: String,
    rules: Vec<String>,
    #[serde(default)]
    extractive_model: Option<String>,
    #[serde(default)]
    context_fit: ContextFit,
    #[serde(default)]
    quality: Quality,
    #[serde(default)]
    shadow: Shadow,
    #[serde(default)]
    cascade: Cascade,
    #[serde(default)]
    prices: BTreeMap<String, Prices>,
    #[serde(default)]
    score: Option<Score>,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub version: String,
    pub rules: Rules,
    pub extractive_model: Option<String>,
    pub context_fit: ContextFit,
    pub quality: Quality,
    pub shadow: Shadow,
    pub cascade: Cascade,
    pub prices: BTreeMap<String, Prices>,
    /// The fitted routing score (`recap policy calibrate`).
    pub score: Option<Score>,
    /// What loading noticed and the process should log: e.g. a score fitted
    /// for another compact model, which is then not applied.
    pub warnings: Vec<String>,
}

const RULES: [&str; 6] = [
    "quality",
    "context_fit",
    "budget",
    "shadow",
    "cascade",
    "score",
];

/// Parses and validates a policy against the deployment's tiers and the
/// catalog's prices (`catalog_prices`, overridden by the file's `[prices]`).
pub fn load_policy(
    text: &str,
    tiers: &Tiers,
    catalog_prices: &BTreeMap<String, Prices>,
) -> Result<PolicyConfig, PolicyError> {
    let f: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
    if f.version.trim().is_empty() {
        return Err(invalid("version", "must name this policy's version"));
    }
    let rules = read_rules(&f)?;
    check_tiers(&f, rules, tiers)?;
    check_cascade_and_score(&f, rules)?;
    let prices = merged_prices(&f, tiers, catalog_prices)?;
    let (rules, warnings) = score_for_the_compact_model(&f, rules, tiers);
    Ok(PolicyConfig {
        version: f.version,
        rules,
        extractive_model: f.extractive_model,
        context_fit: f.context_fit,
        quality: f.quality,
        shadow: f.shadow,
        cascade: f.cascade,
        prices,
        score: f.score,
        warnings,
    })
}

/// The rules the file turns on, each a known one.
fn read_rules(f: &PolicyFile) -> Result<Rules, PolicyError> {
    for (i, r) in f.rules.iter().enumerate() {
        if !RULES.contains(&r.as_str()) {
            return Err(invalid(
                &format!("rules[{i}]"),
                format!("unknown rule `{r}`; known rules: {}", RULES.join(", ")),
            ));
        }
    }
    let on = |r: &str| f.rules.iter().any(|x| x == r);
    Ok(Rules {
        quality: on("quality"),
        context_fit: on("context_fit"),
        budget: on("budget"),
        shadow: on("shadow"),
        cascade: on("cascade"),
        score: on("score"),
    })
}

/// That the rules send jobs only to tiers that have a model.
fn check_tiers(f: &PolicyFile, rules: Rules, tiers: &Tiers) -> Result<(), PolicyError> {
    if tiers.compact.is_none() && tiers.large.is_none() {
        return Err(PolicyError::NoTier);
    }
    if rules.quality && f.quality.best == Tier::Large && tiers.large.is_none() {
        return Err(invalid(
            "quality.best",
            "sends jobs to the large tier, which has no model",
        ));
    }
    if rules.context_fit && f.context_fit.overflow == Tier::Large && tiers.large.is_none() {
        return Err(invalid(
            "context_fit.overflow",
            "sends jobs to the large tier, which has no model",
        ));
    }
    if rules.context_fit && f.context_fit.compact_window < 64 {
        return Err(invalid(
            "context_fit.compact_window",
            "must be at least 64 tokens",
        ));
    }
    if rules.shadow && tiers.large.is_none() {
        return Err(invalid(
            "shadow.rate",
            "shadow runs need a large tier with a model",
        ));
    }
    if !(0.0..=1.0).contains(&f.shadow.rate) || f.shadow.rate.is_nan() {
        return Err(invalid("shadow.rate", "must be between 0 and 1"));
    }
    if f.quality.economy_extractive && f.extractive_model.is_none() {
        return Err(invalid(
            "quality.economy_extractive",
            "needs extractive_model",
        ));
    }
    Ok(())
}

/// The cascade's checks in range, and the score valid and used with them.
fn check_cascade_and_score(f: &PolicyFile, rules: Rules) -> Result<(), PolicyError> {
    let c = &f.cascade;
    if c.min_words > c.max_words {
        return Err(invalid("cascade.min_words", "is above cascade.max_words"));
    }
    if !(0.0..=1.0).contains(&c.max_repeat_ratio) {
        return Err(invalid(
            "cascade.max_repeat_ratio",
            "must be between 0 and 1",
        ));
    }
    if !(0.0..=1.0).contains(&c.max_copy_rate) {
        return Err(invalid("cascade.max_copy_rate", "must be between 0 and 1"));
    }
    if let Some(s) = &f.score {
        s.validate().map_err(|e| match e {
            ScoreError::UnknownFeatures(names) => invalid(
                "score.features",
                format!(
                    "unknown to this build: {} (it knows {})",
                    names.join(", "),
                    crate::score::FEATURES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            other => invalid("score", other.to_string()),
        })?;
    }
    if rules.score && f.score.is_none() {
        return Err(invalid(
            "rules",
            "the `score` rule needs a [score] section (fit one with `recap policy calibrate`)",
        ));
    }
    if rules.score && !rules.cascade {
        return Err(invalid(
            "rules",
            "the `score` rule judges compact output in the cascade: add `cascade` too",
        ));
    }
    Ok(())
}

/// The catalog's prices with the file's over them; every tier's model has one.
fn merged_prices(
    f: &PolicyFile,
    tiers: &Tiers,
    catalog_prices: &BTreeMap<String, Prices>,
) -> Result<BTreeMap<String, Prices>, PolicyError> {
    let mut prices = catalog_prices.clone();
    for (model, p) in &f.prices {
        for (name, v) in [
            ("input_per_1k", p.input_per_1k),
            ("output_per_1k", p.output_per_1k),
            ("gpu_second", p.gpu_second),
            ("prefill_tokens_per_s", p.prefill_tokens_per_s),
            ("decode_tokens_per_s", p.decode_tokens_per_s),
        ] {
            if v < 0.0 || !v.is_finite() {
                return Err(invalid(
                    &format!("prices.{model}.{name}"),
                    format!("must be a non-negative number, got {v}"),
                ));
            }
        }
        if p.gpu_second > 0.0 && (p.prefill_tokens_per_s <= 0.0 || p.decode_tokens_per_s <= 0.0) {
            return Err(invalid(
                &format!("prices.{model}.gpu_second"),
                "needs prefill_tokens_per_s and decode_tokens_per_s to turn tokens into seconds",
            ));
        }
        prices.insert(model.clone(), *p);
    }
    for (tier, model) in [("compact", &tiers.compact), ("large", &tiers.large)] {
        if let Some(m) = model {
            if !prices.contains_key(m) {
                return Err(invalid(
                    &format!("prices.{m}"),
                    format!("the {tier} tier's model has no price"),
                ));
            }
        }
    }
    Ok(prices)
}

/// A score fitted for another compact model is not applied, with a warning.
fn score_for_the_compact_model(
    f: &PolicyFile,
    mut rules: Rules,
    tiers: &Tiers,
) -> (Rules, Vec<String>) {
    let mut warnings = Vec::new();
    if let (true, Some(s), Some(compact)) = (rules.score, &f.score, &tiers.compact) {
        if !s.model.is_empty() && &s.model != compact {
            warnings.push(format!(
                "the score was fitted for compact model {}, but the compact tier runs {compact}: \
                 the score is not applied until `recap policy calibrate` fits one for it",
                s.model
            ));
            rules.score = false;
        }
    }
    (rules, warnings)
}

impl PolicyConfig {
    pub fn price(&self, model: &str) -> Prices {
        self.prices.get(model).copied().unwrap_or_default()
    }
}
