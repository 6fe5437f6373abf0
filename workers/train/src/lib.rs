//! Fine-tuning for recap's compact tier: LoRA adapters trained on a frozen
//! GGUF decoder, by a hand-written forward and backward pass on the CPU
//! and candle's autograd elsewhere.
//!
//! - [`data`]: training examples (QMSum, a company's JSONL, shadow outputs).
//! - [`model`]: the frozen base with trainable adapters, and its loss.
//! - [`backprop`]: the training step on the CPU, forward and backward by hand.
//! - [`ops`]: the differentiable operations the autograd pass needs.
//! - [`optim`]: AdamW, the learning-rate schedule, gradient clipping.
//! - [`trainer`]: the loop (accumulation, checkpoints, resume, validation).
//! - [`checkpoint`]: checkpoints written then renamed.
//! - [`report`]: the loss curve as SVG.
//! - [`testing`]: tiny GGUF decoders for tests.

pub mod backprop;
pub mod checkpoint;
pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod testing;
pub mod trainer;
