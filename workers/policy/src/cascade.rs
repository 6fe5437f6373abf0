//! The cascade's checks on a compact model's output. Output that fails any
//! of them is sent once to the large tier with reason `cascade`.

use crate::config::Cascade;
use recap_job::SummaryKind;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    Empty,
    Repetition,
    TooShort,
    TooLong,
    MissingSpeakers,
    WrongLanguage,
    /// Too many output sentences copied verbatim from the transcript.
    Copying,
    /// The calibrated score says compact is not enough.
    Score,
}

impl Failure {
    pub fn as_str(&self) -> &'static str {
        match self {
            Failure::Empty => "empty",
            Failure::Repetition => "repetition",
            Failure::TooShort => "too_short",
            Failure::TooLong => "too_long",
            Failure::MissingSpeakers => "missing_speakers",
            Failure::WrongLanguage => "wrong_language",
            Failure::Copying => "copying",
            Failure::Score => "score",
        }
    }
}

/// Share of word 4-grams that repeat an earlier one: 0 for fresh text,
/// near 1 for a loop.
pub fn repeat_ratio(text: &str) -> f64 {
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    if words.len() < 8 {
        return 0.0;
    }
    let mut seen = HashSet::new();
    let grams: Vec<_> = words.windows(4).collect();
    let repeated = grams.iter().filter(|g| !seen.insert(g.to_vec())).count();
    repeated as f64 / grams.len() as f64
}

/// The checks one summary fails; empty means it passes. `speakers` are the
/// transcript's named speakers; `kind` matters because a "no decisions"
/// answer is legitimately short and names nobody. `copy_rate` is the
/// output's (see [`crate::copying::copy_rate`]).
pub fn check(
    text: &str,
    kind: &str,
    speakers: &[&str],
    language: Option<&str>,
    copy_rate: f64,
    cfg: &Cascade,
) -> Vec<Failure> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return vec![Failure::Empty];
    }
    let mut failures = Vec::new();
    if repeat_ratio(trimmed) > cfg.max_repeat_ratio {
        failures.push(Failure::Repetition);
    }
    let words = trimmed.split_whitespace().count();
    let says_none = {
        let l = trimmed.to_lowercase();
        l.starts_with("no action") || l.starts_with("no decision")
    };
    if words < cfg.min_words && !says_none {
        failures.push(Failure::TooShort);
    }
    if words > cfg.max_words {
        failures.push(Failure::TooLong);
    }
    if cfg.require_speaker
        && !says_none
        && SummaryKind::parse(kind).is_some_and(|k| k.spec().names_speakers)
        && !speakers.is_empty()
    {
        let lower = trimmed.to_lowercase();
        let named = speakers.iter().any(|s| {
            s.split_whitespace()
                .next()
                .is_some_and(|first| first.len() > 1 && lower.contains(&first.to_lowercase()))
        });
        if !named {
            failures.push(Failure::MissingSpeakers);
        }
    }
    if copy_rate > cfg.max_copy_rate {
        failures.push(Failure::Copying);
    }
    if cfg.check_language {
        if let Some(lang) = language {
            if !crate::language::matches(trimmed, lang) {
                failures.push(Failure::WrongLanguage);
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Cascade {
        Cascade::default()
    }

    #[test]
    fn good_output_passes() {
        let t = "Maria and Tom agreed to launch on the 14th once the login fix lands.";
        assert!(check(t, "overview", &["Maria", "Tom"], Some("en"), 0.0, &cfg()).is_empty());
    }

    #[test]
    fn each_failure() {
        assert_eq!(
            check("  ", "overview", &[], None, 0.0, &cfg()),
            vec![Failure::Empty]
        );
        let looped = "we will ship it soon ".repeat(20);
        assert!(check(&looped, "short", &[], None, 0.0, &cfg()).contains(&Failure::Repetition));
        assert!(check("Fine.", "short", &[], None, 0.0, &cfg()).contains(&Failure::TooShort));
        let long = "word ".repeat(700);
        assert!(check(&long, "short", &[], None, 0.0, &cfg()).contains(&Failure::TooLong));
        assert!(check(
            "The team agreed to launch on Friday.",
            "overview",
            &["Maria"],
            None,
            0.0,
            &cfg()
        )
        .contains(&Failure::MissingSpeakers));
        assert!(check(
            "Maria a dit que le lancement est pour vendredi et que la date est fixée.",
            "overview",
            &["Maria"],
            Some("en"),
            0.0,
            &cfg()
        )
        .contains(&Failure::WrongLanguage));
    }

    #[test]
    fn copying_past_the_threshold_fails() {
        let t = "Maria and Tom agreed to launch on the 14th once the login fix lands.";
        let c = cfg();
        assert!(check(t, "overview", &["Maria"], None, c.max_copy_rate, &c).is_empty());
        assert_eq!(
            check(t, "overview", &["Maria"], None, c.max_copy_rate + 0.01, &c),
            vec![Failure::Copying]
        );
    }

    #[test]
    fn saying_none_is_fine() {
        assert!(check(
            "No decisions.",
            "decisions",
            &["Maria"],
            Some("en"),
            0.0,
            &cfg()
        )
        .is_empty());
        assert!(check(
            "No action items.",
            "action_items",
            &["Maria"],
            Some("en"),
            0.0,
            &cfg()
        )
        .is_empty());
    }

    #[test]
    fn repeat_ratio_bounds() {
        assert_eq!(
            repeat_ratio("one two three four five six seven eight nine"),
            0.0
        );
        assert!(repeat_ratio(&"a b c d ".repeat(10)) > 0.8);
    }
}
