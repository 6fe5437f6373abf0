//! recap's inference engine: everything between a transcript and its
//! summaries. No network, no database: the worker feeds it jobs, and
//! `recap summarize` and `recap eval` call it directly.
//!
//! - [`summarizer`]: the [`Summarizer`] interface every engine implements.
//! - [`extractive`]: the deterministic Lead-N baseline (economy fallback, eval baseline).
//! - [`catalog`]: the model catalog (ids, files, sha256, prices).
//! - [`tokenizer`]: tokenizers built from GGUF metadata, matching llama.cpp.
//! - [`prompts`]: versioned prompt templates and chat templates (minijinja).
//! - [`generate`]: the generation loop (KV cache, sampling, stops, deadline).
//! - [`chunking`]: long transcripts cut on utterance boundaries to a budget.
//! - [`llm`]: GGUF decoder models (llama, qwen2) as a `Summarizer`.
//! - [`t5`]: T5 / FLAN-T5 seq2seq models (Hugging Face safetensors layout).
//! - [`mapreduce`]: one summary over a transcript of any length.
//! - [`testing`]: tiny models in the real formats, written by tests.

pub mod adapter;
pub mod attention;
pub mod catalog;
pub mod chunking;
pub mod decoder;
pub mod extractive;
pub mod generate;
pub mod kquant;
pub mod llm;
pub mod mapreduce;
pub mod prompts;
pub mod q4_1;
pub mod q5_0;
pub mod q8_0;
pub mod qdot;
pub mod spm;
pub mod summarizer;
pub mod t5;
pub mod testing;
pub mod tokenizer;

pub use extractive::Extractive;
pub use summarizer::{
    Cancel, Confidence, EngineError, SummarizeRequest, Summarizer, SummaryOutput,
};
