//! The extractive Lead-N baseline: deterministic, instant, free. It is the
//! `economy` fallback, the evaluation baseline every model must beat, and
//! the engine of the pipeline tests and load tests. It never pretends to be
//! a model: its rows say `engine = extractive`.

use crate::summarizer::{EngineError, SummarizeRequest, Summarizer, SummaryOutput};
use recap_job::{SummaryKind, Utterance};
use std::time::Instant;

pub const MODEL_ID: &str = "extractive-lead";

/// Lead-N over utterances, with cue-word selection for action items and
/// decisions.
#[derive(Debug, Clone)]
pub struct Extractive {
    /// Utterances taken for an `overview`.
    pub lead_n: usize,
}

impl Default for Extractive {
    fn default() -> Self {
        Extractive { lead_n: 5 }
    }
}

const ACTION_CUES: [&str; 10] = [
    "will ",
    "i'll ",
    "we'll ",
    "need to",
    "needs to",
    "action",
    "todo",
    "to do",
    "follow up",
    "let's ",
];
const DECISION_CUES: [&str; 7] = [
    "agreed",
    "decided",
    "decision",
    "we'll go with",
    "approved",
    "settled",
    "conclude",
];

impl Extractive {
    fn pick(&self, transcript: &[Utterance], kind: SummaryKind) -> Vec<String> {
        let lead =
            |n: usize| -> Vec<String> { transcript.iter().take(n).map(Utterance::line).collect() };
        let cued = |cues: &[&str], n: usize| -> Vec<String> {
            transcript
                .iter()
                .filter(|u| {
                    let t = u.text.to_lowercase();
                    cues.iter().any(|c| t.contains(c))
                })
                .take(n)
                .map(Utterance::line)
                .collect()
        };
        match kind {
            SummaryKind::Overview => lead(self.lead_n),
            SummaryKind::Short => lead(self.lead_n.min(2)),
            SummaryKind::ActionItems => {
                let c = cued(&ACTION_CUES, self.lead_n);
                if c.is_empty() {
                    vec!["No action items were identified.".into()]
                } else {
                    c.into_iter().map(|l| format!("- {l}")).collect()
                }
            }
            SummaryKind::Decisions => {
                let c = cued(&DECISION_CUES, self.lead_n);
                if c.is_empty() {
                    vec!["No decisions were identified.".into()]
                } else {
                    c.into_iter().map(|l| format!("- {l}")).collect()
                }
            }
        }
    }
}

/// Whitespace words: the baseline has no tokenizer, and words are what its
/// cost and the features need.
fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

impl Summarizer for Extractive {
    fn model_id(&self) -> &str {
        MODEL_ID
    }

    fn engine(&self) -> &'static str {
        "extractive"
    }

    fn is_instant(&self) -> bool {
        true
    }

    fn count_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(words(text))
    }

    fn summarize(&self, req: &SummarizeRequest<'_>) -> Result<Vec<SummaryOutput>, EngineError> {
        let input_tokens: usize = req.transcript.iter().map(|u| words(&u.text)).sum();
        req.kinds
            .iter()
            .map(|&kind| {
                if req.cancel.is_cancelled() {
                    return Err(EngineError::Cancelled);
                }
                let start = Instant::now();
                let text = self.pick(req.transcript, kind).join("\n");
                Ok(SummaryOutput {
                    kind,
                    output_tokens: words(&text) as u32,
                    text,
                    input_tokens: input_tokens as u32,
                    prefill_ms: 0.0,
                    decode_ms: 0.0,
                    total_ms: start.elapsed().as_secs_f64() * 1e3,
                    chunks: 1,
                    confidence: Default::default(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cancel;
    use recap_job::utterances_from_text;

    fn run(text: &str, kinds: &[SummaryKind]) -> Vec<SummaryOutput> {
        let t = utterances_from_text(text);
        Extractive { lead_n: 3 }
            .summarize(&SummarizeRequest {
                transcript: &t,
                kinds,
                language: None,
                query: None,
                deadline: None,
                cancel: Cancel::default(),
            })
            .unwrap()
    }

    #[test]
    fn lead_and_cues() {
        let text = "Alice: Welcome everyone.\nBob: The budget is tight.\nAlice: We agreed to cut travel.\nBob: I'll send the memo tomorrow.\nCarol: Fine.";
        let out = run(
            text,
            &[
                SummaryKind::Overview,
                SummaryKind::Short,
                SummaryKind::ActionItems,
                SummaryKind::Decisions,
            ],
        );
        assert_eq!(out.len(), 4);
        assert_eq!(
            out[0].text,
            "Alice: Welcome everyone.\nBob: The budget is tight.\nAlice: We agreed to cut travel."
        );
        assert_eq!(
            out[1].text,
            "Alice: Welcome everyone.\nBob: The budget is tight."
        );
        assert_eq!(out[2].text, "- Bob: I'll send the memo tomorrow.");
        assert_eq!(out[3].text, "- Alice: We agreed to cut travel.");
        assert_eq!(out[0].input_tokens, 17);
    }

    #[test]
    fn no_cues_says_so() {
        let out = run("A: hello\nB: hi", &[SummaryKind::Decisions]);
        assert_eq!(out[0].text, "No decisions were identified.");
    }

    #[test]
    fn cancelled_before_start() {
        let t = utterances_from_text("A: hello");
        let cancel = Cancel::default();
        cancel.cancel();
        let err = Extractive::default()
            .summarize(&SummarizeRequest {
                transcript: &t,
                kinds: &[SummaryKind::Short],
                language: None,
                query: None,
                deadline: None,
                cancel,
            })
            .unwrap_err();
        assert!(matches!(err, EngineError::Cancelled));
    }
}
