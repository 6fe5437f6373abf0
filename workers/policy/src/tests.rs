use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const POLICY: &str = r#"
version = "test-1"
rules = ["quality", "context_fit", "budget", "shadow", "cascade"]
extractive_model = "extractive-lead"

[context_fit]
compact_window = 1000
overflow = "large"

[quality]
best = "large"
economy_extractive = true

[shadow]
rate = 0.1
seed = 7

[prices.small]
input_per_1k = 0.001
output_per_1k = 0.002

[prices.big]
input_per_1k = 0.01
output_per_1k = 0.03

[prices.extractive-lead]
input_per_1k = 0.0
output_per_1k = 0.0
"#;

fn tiers() -> Tiers {
    Tiers {
        compact: Some("small".into()),
        large: Some("big".into()),
    }
}

fn policy() -> PolicyConfig {
    load_policy(POLICY, &tiers(), &BTreeMap::new()).unwrap()
}

fn f(quality: &str, tokens: u64) -> Features {
    Features {
        job_id: "job-1".into(),
        tenant: "acme".into(),
        input_tokens: tokens,
        utterances: 10,
        speakers: 2,
        kinds: vec!["overview".into()],
        quality: quality.into(),
    }
}

fn unlimited() -> BudgetState {
    BudgetState::default()
}

#[test]
fn quality_and_context_rules() {
    let p = policy();
    let d = p
        .decide(&f("balanced", 500), &tiers(), &unlimited())
        .unwrap();
    assert_eq!(
        (d.tier, d.reason.as_str(), d.model.as_str()),
        (Tier::Compact, "default", "small")
    );
    let d = p.decide(&f("best", 500), &tiers(), &unlimited()).unwrap();
    assert_eq!((d.tier, d.reason.as_str()), (Tier::Large, "quality_best"));
    let d = p
        .decide(&f("economy", 500), &tiers(), &unlimited())
        .unwrap();
    assert_eq!(
        (d.tier, d.reason.as_str(), d.model.as_str()),
        (Tier::Compact, "quality_economy", "extractive-lead")
    );
    let d = p
        .decide(&f("balanced", 5000), &tiers(), &unlimited())
        .unwrap();
    assert_eq!(
        (d.tier, d.reason.as_str()),
        (Tier::Large, "context_overflow")
    );
}

#[test]
fn overflow_can_chunk_on_compact() {
    let text = POLICY.replace("overflow = \"large\"", "overflow = \"compact\"");
    let p = load_policy(&text, &tiers(), &BTreeMap::new()).unwrap();
    let d = p
        .decide(&f("balanced", 5000), &tiers(), &unlimited())
        .unwrap();
    assert_eq!(
        (d.tier, d.reason.as_str(), d.chunked),
        (Tier::Compact, "context_chunked", true)
    );
}

#[test]
fn estimates_use_the_price_table() {
    let p = policy();
    // 1000 tokens in, 200 out (overview) on big: 0.01 + 0.006.
    let d = p.decide(&f("best", 1000), &tiers(), &unlimited()).unwrap();
    assert!(
        (d.estimated_cost_usd - 0.016).abs() < 1e-12,
        "{}",
        d.estimated_cost_usd
    );
    let gpu = Prices {
        gpu_second: 0.001,
        prefill_tokens_per_s: 1000.0,
        decode_tokens_per_s: 100.0,
        ..Prices::default()
    };
    assert!((gpu.cost(1000, 200) - 0.003).abs() < 1e-12);
}

#[test]
fn budgets_move_jobs_down_or_refuse_them() {
    let p = policy();
    let tight = BudgetState {
        daily_remaining_usd: Some(0.005),
        monthly_remaining_usd: Some(1.0),
        ..BudgetState::default()
    };
    let d = p.decide(&f("best", 1000), &tiers(), &tight).unwrap();
    assert_eq!(
        (d.tier, d.reason.as_str(), d.model.as_str()),
        (Tier::Compact, "budget", "small")
    );
    let tighter = BudgetState {
        daily_remaining_usd: Some(0.0001),
        monthly_remaining_usd: None,
        ..BudgetState::default()
    };
    let d = p.decide(&f("best", 1000), &tiers(), &tighter).unwrap();
    assert_eq!(d.model, "extractive-lead");
    let none_left = BudgetState {
        daily_remaining_usd: Some(-1.0),
        monthly_remaining_usd: None,
        ..BudgetState::default()
    };
    assert!(matches!(
        p.decide(&f("best", 1000), &tiers(), &none_left),
        Err(PolicyError::BudgetExhausted { .. })
    ));
}

#[test]
fn bad_policies_name_the_key() {
    let cases = [
        (
            POLICY.replace("\"cascade\"]", "\"cascade\", \"magic\"]"),
            "rules[5]",
        ),
        (
            POLICY.replace("input_per_1k = 0.001", "input_per_1k = -0.001"),
            "prices.small.input_per_1k",
        ),
        (POLICY.replace("rate = 0.1", "rate = 1.5"), "shadow.rate"),
        (
            POLICY.replace(
                "[prices.small]\ninput_per_1k = 0.001\noutput_per_1k = 0.002\n",
                "",
            ),
            "prices.small",
        ),
    ];
    for (text, key) in cases {
        let e = load_policy(&text, &tiers(), &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains(&format!("`{key}`")), "{key}: {e}");
    }
    // A rule that needs the large tier, where none has a model.
    let only_compact = Tiers {
        compact: Some("small".into()),
        large: None,
    };
    let e = load_policy(POLICY, &only_compact, &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("quality.best"), "{e}");
    assert!(load_policy(
        "version = \"x\"\nrules = []\nsurprise = 1\n",
        &tiers(),
        &BTreeMap::new()
    )
    .is_err());
}

#[test]
fn shadow_rate_within_tolerance_over_1000_decisions() {
    let p = policy();
    let shadows = (0..1000)
        .filter(|i| {
            let mut x = f("balanced", 300);
            x.job_id = format!("6f1c1c8e-3f7a-4d5e-9d43-{i:012}");
            p.decide(&x, &tiers(), &unlimited()).unwrap().shadow
        })
        .count();
    // rate 0.1: binomial sd is about 9.5; allow 4 sd.
    assert!((62..=138).contains(&shadows), "{shadows} shadows in 1000");
}

proptest! {
    #[test]
    fn never_a_tier_without_a_model_never_over_budget_always_the_same(
        q in "economy|balanced|best",
        tokens in 0u64..20_000,
        c in any::<bool>(),
        l in any::<bool>(),
        daily in proptest::option::of(0.0f64..0.5),
        monthly in proptest::option::of(0.0f64..0.5),
        id in "[a-f0-9]{8}",
    ) {
        let t = Tiers { compact: c.then(|| "small".to_string()), large: l.then(|| "big".to_string()) };
        // Load a policy that fits these tiers (the rules that need large off when it is missing).
        let text = if l { POLICY.to_string() } else { POLICY.replace("\"quality\", \"context_fit\", \"budget\", \"shadow\", \"cascade\"", "\"budget\", \"cascade\"") };
        let Ok(p) = load_policy(&text, &t, &BTreeMap::new()) else {
            prop_assert!(!c && !l);
            return Ok(());
        };
        let mut x = f(&q, tokens);
        x.job_id = id;
        let budget = BudgetState { daily_remaining_usd: daily, monthly_remaining_usd: monthly, ..BudgetState::default() };
        match p.decide(&x, &t, &budget) {
            Ok(d) => {
                if d.model != "extractive-lead" {
                    prop_assert_eq!(t.model(d.tier), Some(d.model.as_str()));
                } else {
                    prop_assert!(t.compact.is_some());
                }
                if let Some(r) = budget.remaining() {
                    prop_assert!(d.estimated_cost_usd <= r + 1e-12, "{} > {}", d.estimated_cost_usd, r);
                }
                prop_assert_eq!(p.decide(&x, &t, &budget).unwrap(), d);
            }
            Err(PolicyError::BudgetExhausted { needed_usd, remaining_usd, .. }) => {
                prop_assert!(needed_usd > remaining_usd);
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}

const SCORED: &str = r#"
[score]
features = ["mean_logprob", "copy_rate"]
mean = [-1.0, 0.1]
scale = [0.5, 0.2]
weights = [2.0, -1.0]
bias = 0.0
threshold = 0.4
fitted = "test"
"#;

fn with_score(rules: &str) -> String {
    POLICY.replace(
        r#"rules = ["quality", "context_fit", "budget", "shadow", "cascade"]"#,
        rules,
    ) + SCORED
}

#[test]
fn the_score_rule_escalates_low_confidence_output() {
    let p = load_policy(
        &(with_score(r#"rules = ["cascade", "score"]"#) + "\n[cascade]\nmax_copy_rate = 0.5\n"),
        &tiers(),
        &BTreeMap::new(),
    )
    .unwrap();
    let text = "Maria and Tom agreed to ship the release on Friday after the fix.";
    let sig = |lp: f64| score::Signals {
        kind: "overview".into(),
        mean_logprob: Some(lp),
        ..score::Signals::default()
    };
    assert!(p.judge(text, &["Maria"], Some("en"), &sig(-0.5)).is_empty());
    assert_eq!(
        p.judge(text, &["Maria"], Some("en"), &sig(-2.0)),
        vec![cascade::Failure::Score]
    );
    // Without the rule the score is carried but not applied.
    let off = load_policy(
        &with_score(r#"rules = ["cascade"]"#),
        &tiers(),
        &BTreeMap::new(),
    )
    .unwrap();
    assert!(off
        .judge(text, &["Maria"], Some("en"), &sig(-2.0))
        .is_empty());
    // The copy-rate check is a cascade check with its own threshold.
    let copied = score::Signals {
        copy_rate: 0.9,
        ..sig(-0.5)
    };
    assert_eq!(
        p.judge(text, &["Maria"], Some("en"), &copied),
        vec![cascade::Failure::Copying]
    );
}

#[test]
fn a_score_this_build_does_not_know_is_refused_naming_it() {
    let text = with_score(r#"rules = ["cascade", "score"]"#).replace(
        r#"["mean_logprob", "copy_rate"]"#,
        r#"["mean_logprob", "gaze"]"#,
    );
    let e = load_policy(&text, &tiers(), &BTreeMap::new()).unwrap_err();
    let m = e.to_string();
    assert!(m.contains("score.features") && m.contains("gaze"), "{m}");
    assert!(
        !m.contains("mean_logprob,") || m.contains("it knows"),
        "{m}"
    );
    // The score rule without a score, or without the cascade, is refused.
    let e = load_policy(
        &POLICY.replace(
            r#"rules = ["quality", "context_fit", "budget", "shadow", "cascade"]"#,
            r#"rules = ["cascade", "score"]"#,
        ),
        &tiers(),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("[score]"), "{e}");
    let e = load_policy(
        &with_score(r#"rules = ["score"]"#),
        &tiers(),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cascade"), "{e}");
    let e = load_policy(
        &(POLICY.to_string() + "\n[cascade]\nmax_copy_rate = 1.5\n"),
        &tiers(),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cascade.max_copy_rate"), "{e}");
}

#[test]
fn a_score_fitted_for_another_compact_model_is_not_applied_and_said() {
    let text = with_score(r#"rules = ["cascade", "score"]"#).replace(
        "fitted = \"test\"",
        "fitted = \"test\"\nmodel = \"another-model\"",
    );
    let p = load_policy(&text, &tiers(), &BTreeMap::new()).unwrap();
    assert!(!p.rules.score);
    assert!(
        p.warnings[0].contains("another-model") && p.warnings[0].contains("small"),
        "{:?}",
        p.warnings
    );
    let same = text.replace("another-model", "small");
    let p = load_policy(&same, &tiers(), &BTreeMap::new()).unwrap();
    assert!(p.rules.score && p.warnings.is_empty());
    // Without a copy-rate threshold in the file, the check is off.
    assert_eq!(p.cascade.max_copy_rate, 1.0);
}

#[test]
fn each_reason_is_written_as_its_serde_name() {
    let mut seen = std::collections::HashSet::new();
    for r in Reason::ALL {
        assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        assert_eq!(r.to_string(), r.as_str());
        assert!(seen.insert(r.as_str()), "{r} twice");
    }
}
