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
