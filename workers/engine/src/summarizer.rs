//! The engine interface. A worker holds one `Summarizer` (its tier's model,
//! loaded once) and calls it for every job it takes.

use recap_job::{SummaryKind, Utterance};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What to summarize: one transcript, one or more kinds.
#[derive(Debug, Clone)]
pub struct SummarizeRequest<'a> {
    pub transcript: &'a [Utterance],
    pub kinds: &'a [SummaryKind],
    pub language: Option<&'a str>,
    /// A question to answer about the meeting (query-focused summarization,
    /// as in QMSum); it replaces the kinds' own instructions.
    pub query: Option<&'a str>,
    /// Give up (with [`EngineError::DeadlineExceeded`]) after this instant.
    pub deadline: Option<Instant>,
    pub cancel: Cancel,
}

/// One summary and what it cost to make.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryOutput {
    pub kind: SummaryKind,
    pub text: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
    /// How many transcript chunks went into it (1 when it fit whole).
    pub chunks: u32,
    /// The model's confidence in what it wrote; the router's cascade reads it.
    pub confidence: Confidence,
}

/// Sums over generated tokens of the model's own log-probability of the
/// token it chose and of the entropy of its next-token distribution (both
/// before any repeat penalty), in nats. Engines that do not sample from a
/// distribution (the extractive baseline) leave it empty.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Confidence {
    pub logprob_sum: f64,
    pub entropy_sum: f64,
    pub tokens: u32,
}

impl Confidence {
    /// Adds one step: `logits` of the next-token distribution, `chosen` the
    /// token taken.
    pub fn observe(&mut self, logits: &[f32], chosen: u32) {
        let Some(&chosen_logit) = logits.get(chosen as usize) else {
            return;
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return;
        }
        // log-sum-exp and the expected logit, in one pass over the vocabulary.
        let (mut z, mut weighted) = (0f64, 0f64);
        for &l in logits {
            let e = ((l - max) as f64).exp();
            z += e;
            weighted += e * (l - max) as f64;
        }
        let lse = z.ln();
        self.logprob_sum += (chosen_logit - max) as f64 - lse;
        self.entropy_sum += lse - weighted / z;
        self.tokens += 1;
    }

    pub fn add(&mut self, other: &Confidence) {
        self.logprob_sum += other.logprob_sum;
        self.entropy_sum += other.entropy_sum;
        self.tokens += other.tokens;
    }

    /// Mean log-probability per generated token; None without tokens.
    pub fn mean_logprob(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.logprob_sum / self.tokens as f64)
    }

    /// Mean entropy per generated token; None without tokens.
    pub fn mean_entropy(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.entropy_sum / self.tokens as f64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cancelled")]
    Cancelled,
    #[error("deadline exceeded after {0} output tokens")]
    DeadlineExceeded(u32),
    #[error("model error: {0}")]
    Model(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("prompt template error: {0}")]
    Template(String),
    #[error("bad model files: {0}")]
    BadModel(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    /// A stable code for the `error_code` column and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::Cancelled => "cancelled",
            EngineError::DeadlineExceeded(_) => "deadline_exceeded",
            EngineError::Model(_) => "model_error",
            EngineError::Tokenizer(_) => "tokenizer_error",
            EngineError::Template(_) => "template_error",
            EngineError::BadModel(_) => "bad_model",
            EngineError::Io(_) => "io_error",
        }
    }
}

/// A cancellation flag shared between the caller and a running generation.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Turns transcripts into summaries. Implementations are loaded once per
/// worker process and shared; `summarize` is blocking CPU/GPU work, to be
/// called from a blocking thread.
pub trait Summarizer: Send + Sync {
    /// The catalog id of the model (`extractive-lead`, `smollm2-135m-instruct-q4_1`, ...).
    fn model_id(&self) -> &str;
    /// Which engine produced the text: `extractive`, `gguf`, `t5`.
    fn engine(&self) -> &'static str;
    /// Whether a job takes this engine about a millisecond, with no model
    /// to run (the extractive baseline): the worker then records the job's
    /// start with its completion, in one transaction, instead of before the run.
    fn is_instant(&self) -> bool {
        false
    }
    /// Counts tokens the way this model does (for policy features and cost).
    fn count_tokens(&self, text: &str) -> Result<usize, EngineError>;
    /// One output per requested kind, in the order requested.
    fn summarize(&self, req: &SummarizeRequest<'_>) -> Result<Vec<SummaryOutput>, EngineError>;
    /// Several jobs at once, one result per request in order. Engines that
    /// can share work across jobs (one batched forward pass) override it;
    /// the default runs them one after another.
    fn summarize_batch(
        &self,
        reqs: &[SummarizeRequest<'_>],
    ) -> Vec<Result<Vec<SummaryOutput>, EngineError>> {
        reqs.iter().map(|r| self.summarize(r)).collect()
    }
}

#[cfg(test)]
mod confidence_tests {
    use super::Confidence;

    #[test]
    fn uniform_and_peaked_distributions() {
        let mut c = Confidence::default();
        assert_eq!(c.mean_logprob(), None);
        c.observe(&[0.0; 4], 2);
        let ln4 = 4f64.ln();
        assert!((c.mean_logprob().unwrap() + ln4).abs() < 1e-9);
        assert!((c.mean_entropy().unwrap() - ln4).abs() < 1e-9);
        let mut p = Confidence::default();
        p.observe(&[30.0, 0.0, 0.0], 0);
        assert!(p.mean_logprob().unwrap() > -1e-9 && p.mean_logprob().unwrap() <= 0.0);
        assert!(p.mean_entropy().unwrap() < 1e-9);
        // Choosing an unlikely token is a low log-probability.
        let mut q = Confidence::default();
        q.observe(&[30.0, 0.0, 0.0], 1);
        assert!(q.mean_logprob().unwrap() < -29.0);
        c.add(&q);
        assert_eq!(c.tokens, 2);
        // A token outside the vocabulary, or logits without a finite value, add nothing.
        c.observe(&[0.0; 2], 7);
        c.observe(&[f32::NEG_INFINITY; 2], 0);
        assert_eq!(c.tokens, 2);
    }
}
