//! From a transcript to a summary, for any model: the prompts, the
//! chunking of long transcripts, map-reduce over the chunks, and the
//! generation loop.

pub mod chunking;
pub mod generate;
pub mod mapreduce;
pub mod prompts;
