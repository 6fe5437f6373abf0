//! recap's inference engine: everything between a transcript and its
//! summaries. No network, no database: the worker feeds it jobs, and
//! `recap summarize` and `recap eval` call it directly.
//!
//! - [`summarizer`]: the [`Summarizer`] interface every engine implements.
//! - [`extractive`]: the deterministic Lead-N baseline (economy fallback, eval baseline).
//! - [`catalog`]: the model catalog (ids, files, sha256, prices, formats).
//! - [`models`]: the architectures: GGUF decoders (llama, qwen2) served by
//!   [`models::llm`], T5 / FLAN-T5, and LoRA adapters.
//! - [`pipeline`]: prompts and chat templates, chunking, map-reduce, and
//!   the generation loop (KV cache, sampling, stops, deadline).
//! - [`tokenize`]: tokenizers built from GGUF metadata, matching llama.cpp.
//! - `kernels` (crate-private): the quantized products and attention loops.
//! - [`testing`]: tiny models in the real formats, written by tests.

pub mod extractive;
mod kernels;
pub mod models;
pub mod pipeline;
pub mod summarizer;
pub mod testing;
pub mod tokenize;

pub use extractive::Extractive;
pub use kernels::attention::CausalSoftmax;
/// The catalog lives in its own crate, so that what serves no model (the
/// gateway, the config) reads it without linking the engine.
pub use recap_catalog as catalog;
pub use summarizer::{
    Cancel, Confidence, EngineError, SummarizeRequest, Summarizer, SummaryOutput,
};
