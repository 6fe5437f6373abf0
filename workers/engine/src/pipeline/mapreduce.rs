//! One summary kind over a transcript of any length, for any engine: the
//! whole transcript in one call when it fits the budget, otherwise map (each
//! chunk summarized) then reduce (partials merged, in rounds while they
//! overflow). Never a silent truncation: the output says how many chunks.

use crate::pipeline::chunking::{pack, split_oversize};
use crate::pipeline::generate::Generation;
use crate::summarizer::{Confidence, EngineError, SummaryOutput};
use recap_job::{SummaryKind, Utterance};
use std::time::Instant;

/// What one model call is asked to do.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// Summarize these transcript lines.
    Map(&'a str),
    /// Merge these partial summaries.
    Reduce(&'a str),
}

/// What one model call cost, as `summarize_kind` adds it up: from a local
/// generation, or from a remote endpoint's usage report.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallCounts {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub confidence: Confidence,
}

impl From<&Generation> for CallCounts {
    fn from(g: &Generation) -> CallCounts {
        CallCounts {
            prompt_tokens: g.prompt_tokens,
            output_tokens: g.tokens.len(),
            prefill_ms: g.prefill_ms,
            decode_ms: g.decode_ms,
            confidence: g.confidence,
        }
    }
}

/// What a model call returns: the clean text and its counts.
pub type CallResult = Result<(String, CallCounts), EngineError>;

pub fn lines(us: &[Utterance]) -> String {
    us.iter()
        .map(Utterance::line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The transcript cut to the budget (over-long utterances split) and
/// packed into chunks of consecutive pieces.
fn chunk(
    transcript: &[Utterance],
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> (Vec<Utterance>, Vec<std::ops::Range<usize>>) {
    let pieces = split_oversize(transcript, budget, count);
    let costs: Vec<usize> = pieces.iter().map(|u| count(&u.line())).collect();
    let chunks = pack(&costs, budget, 1);
    (pieces, chunks)
}

/// The text of the one call `summarize_kind` makes when the transcript fits
/// the budget whole; None when it needs map-reduce.
pub fn single_call_text(
    transcript: &[Utterance],
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> Option<String> {
    let (pieces, chunks) = chunk(transcript, budget, count);
    (chunks.len() <= 1).then(|| lines(&pieces))
}

/// Runs `call` as often as the transcript needs; `budget` is the tokens of
/// transcript (or partials) one call may hold, `count` counts tokens.
pub fn summarize_kind(
    transcript: &[Utterance],
    kind: SummaryKind,
    budget: usize,
    count: &dyn Fn(&str) -> usize,
    call: &mut dyn FnMut(Step<'_>) -> CallResult,
) -> Result<SummaryOutput, EngineError> {
    let started = Instant::now();
    let mut out = SummaryOutput {
        kind,
        text: String::new(),
        input_tokens: 0,
        output_tokens: 0,
        prefill_ms: 0.0,
        decode_ms: 0.0,
        total_ms: 0.0,
        chunks: 0,
        confidence: Default::default(),
    };
    let mut run = |step: Step<'_>, out: &mut SummaryOutput| -> Result<String, EngineError> {
        let (text, g) = call(step)?;
        out.input_tokens += g.prompt_tokens as u32;
        out.output_tokens += g.output_tokens as u32;
        out.prefill_ms += g.prefill_ms;
        out.decode_ms += g.decode_ms;
        out.confidence.add(&g.confidence);
        Ok(text)
    };
    let (pieces, chunks) = chunk(transcript, budget, count);
    out.chunks = chunks.len().max(1) as u32;
    let text = if chunks.len() <= 1 {
        run(Step::Map(&lines(&pieces)), &mut out)?
    } else {
        let mut partials = Vec::with_capacity(chunks.len());
        for r in &chunks {
            partials.push(run(Step::Map(&lines(&pieces[r.clone()])), &mut out)?);
        }
        loop {
            let costs: Vec<usize> = partials.iter().map(|p| count(p)).collect();
            let mut groups = pack(&costs, budget, 2);
            // Partials longer than half the budget pack one per group and a
            // round would make no progress (forever, with a model that
            // writes long): merge them two by two, slightly over budget.
            if groups.len() >= partials.len() && partials.len() > 1 {
                groups = (0..partials.len())
                    .step_by(2)
                    .map(|i| i..(i + 2).min(partials.len()))
                    .collect();
            }
            if groups.len() <= 1 {
                break run(Step::Reduce(&partials.join("\n\n")), &mut out)?;
            }
            let mut next = Vec::with_capacity(groups.len());
            for g in groups {
                next.push(run(Step::Reduce(&partials[g].join("\n\n")), &mut out)?);
            }
            partials = next;
        }
    };
    out.text = text;
    out.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use recap_job::utterances_from_text;

    fn gen(n: usize) -> CallCounts {
        CallCounts {
            prompt_tokens: 10,
            output_tokens: n,
            prefill_ms: 1.0,
            decode_ms: 1.0,
            confidence: Default::default(),
        }
    }

    #[test]
    fn fits_in_one_call() {
        let t = utterances_from_text("A: one two\nB: three four");
        let mut calls = Vec::new();
        let out = summarize_kind(
            &t,
            SummaryKind::Short,
            100,
            &|s| s.split_whitespace().count(),
            &mut |step| {
                calls.push(format!("{step:?}"));
                Ok(("sum".into(), gen(3)))
            },
        )
        .unwrap();
        assert_eq!(out.chunks, 1);
        assert_eq!(calls.len(), 1);
        assert_eq!((out.input_tokens, out.output_tokens), (10, 3));
    }

    #[test]
    fn long_transcripts_map_then_reduce() {
        let text: String = (0..40)
            .map(|i| format!("S{}: word word word word\n", i % 3))
            .collect();
        let t = utterances_from_text(&text);
        let (mut maps, mut reduces) = (0, 0);
        let out = summarize_kind(
            &t,
            SummaryKind::Overview,
            20,
            &|s| s.split_whitespace().count(),
            &mut |step| {
                match step {
                    Step::Map(s) => {
                        maps += 1;
                        assert!(s.split_whitespace().count() <= 20);
                    }
                    Step::Reduce(_) => reduces += 1,
                }
                Ok(("partial summary".into(), gen(2)))
            },
        )
        .unwrap();
        assert!(out.chunks >= 8, "{}", out.chunks);
        assert_eq!(maps, out.chunks as usize);
        assert!(reduces >= 1);
        assert_eq!(out.text, "partial summary");
    }

    #[test]
    fn partials_longer_than_the_budget_still_reduce_to_one() {
        // A model whose every answer overflows the budget: each round must
        // still halve the partials, so the reduction ends.
        let text: String = (0..40)
            .map(|i| format!("S{i}: word word word word\n"))
            .collect();
        let t = utterances_from_text(&text);
        let mut calls = 0;
        let long = "w ".repeat(50);
        let out = summarize_kind(
            &t,
            SummaryKind::Overview,
            20,
            &|s| s.split_whitespace().count(),
            &mut |_| {
                calls += 1;
                assert!(calls < 200, "the reduction does not end");
                Ok((long.clone(), gen(50)))
            },
        )
        .unwrap();
        assert!(out.chunks >= 8);
        assert_eq!(out.text, long);
    }
}
