//! recap's inference engine: everything between a transcript and its
//! summaries. No network, no database: the worker feeds it jobs, and
//! `recap summarize` and `recap eval` call it directly.
//!
//! - [`summarizer`]: the [`Summarizer`] interface every engine implements.
//! - [`extractive`]: the deterministic Lead-N baseline (economy fallback, eval baseline).

pub mod extractive;
pub mod summarizer;

pub use extractive::Extractive;
pub use summarizer::{Cancel, EngineError, SummarizeRequest, Summarizer, SummaryOutput};
