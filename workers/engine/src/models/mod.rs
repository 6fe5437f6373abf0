//! The model architectures and how each serves as a [`crate::Summarizer`]:
//! dense GGUF decoders of the llama and qwen2 families (`decoder`, served
//! by `llm`), T5 / FLAN-T5 (`t5`), and LoRA adapters over the decoders
//! (`adapter`).

pub mod adapter;
pub mod decoder;
pub mod llm;
pub mod t5;
