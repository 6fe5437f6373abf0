//! The cost policy as pure code: job features in, routing decision out.
//! No IO: the router gathers the features and the budget state, this crate
//! decides, and the same inputs always give the same decision.

use serde::{Deserialize, Serialize};

/// What the router knows about a job when it decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    pub tenant: String,
    /// Input tokens, counted with the compact model's tokenizer.
    pub input_tokens: u64,
    pub utterances: u32,
    pub speakers: u32,
    pub kinds: Vec<String>,
    /// `economy`, `balanced` or `best`.
    pub quality: String,
}

/// Where a job goes and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub tier: String,
    pub model: String,
    /// A stable reason code: `default`, `quality_best`, ...
    pub reason: String,
    pub estimated_cost_usd: f64,
}

/// The tiers this deployment has, and their models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tiers {
    pub compact: Option<String>,
    pub large: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("no tier has a model: configure tiers.compact.model or tiers.large.model")]
    NoTier,
}

/// The foundation's policy: `best` goes to the large tier where there is
/// one, everything else to compact. A tier without a model is never chosen.
pub fn decide(features: &Features, tiers: &Tiers) -> Result<Decision, PolicyError> {
    let pick = |tier: &str, model: &Option<String>, reason: &str| {
        model.as_ref().map(|m| Decision {
            tier: tier.to_string(),
            model: m.clone(),
            reason: reason.to_string(),
            estimated_cost_usd: 0.0,
        })
    };
    let preferred = if features.quality == "best" {
        pick("large", &tiers.large, "quality_best")
    } else {
        None
    };
    preferred
        .or_else(|| pick("compact", &tiers.compact, "default"))
        .or_else(|| pick("large", &tiers.large, "no_compact_tier"))
        .ok_or(PolicyError::NoTier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn features(quality: &str) -> Features {
        Features {
            tenant: "t".into(),
            input_tokens: 100,
            utterances: 3,
            speakers: 2,
            kinds: vec!["overview".into()],
            quality: quality.into(),
        }
    }

    fn both() -> Tiers {
        Tiers {
            compact: Some("c".into()),
            large: Some("l".into()),
        }
    }

    #[test]
    fn best_goes_large_others_compact() {
        assert_eq!(decide(&features("best"), &both()).unwrap().tier, "large");
        assert_eq!(
            decide(&features("best"), &both()).unwrap().reason,
            "quality_best"
        );
        assert_eq!(
            decide(&features("balanced"), &both()).unwrap().tier,
            "compact"
        );
        assert_eq!(
            decide(&features("economy"), &both()).unwrap().reason,
            "default"
        );
    }

    #[test]
    fn missing_tiers() {
        let only_compact = Tiers {
            compact: Some("c".into()),
            large: None,
        };
        assert_eq!(
            decide(&features("best"), &only_compact).unwrap().tier,
            "compact"
        );
        let only_large = Tiers {
            compact: None,
            large: Some("l".into()),
        };
        assert_eq!(
            decide(&features("economy"), &only_large).unwrap().reason,
            "no_compact_tier"
        );
        let none = Tiers {
            compact: None,
            large: None,
        };
        assert_eq!(decide(&features("best"), &none), Err(PolicyError::NoTier));
    }

    proptest! {
        #[test]
        fn never_a_tier_without_a_model(q in "economy|balanced|best", c in any::<bool>(), l in any::<bool>(), tokens in 0u64..1_000_000) {
            let tiers = Tiers { compact: c.then(|| "c".to_string()), large: l.then(|| "l".to_string()) };
            let mut f = features(&q);
            f.input_tokens = tokens;
            match decide(&f, &tiers) {
                Ok(d) => {
                    let model = if d.tier == "compact" { &tiers.compact } else { &tiers.large };
                    prop_assert_eq!(model.as_deref(), Some(d.model.as_str()));
                    prop_assert_eq!(decide(&f, &tiers).unwrap(), d);
                }
                Err(_) => prop_assert!(!c && !l),
            }
        }
    }
}
