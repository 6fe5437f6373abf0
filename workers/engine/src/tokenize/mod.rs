//! Tokenizers built from GGUF metadata, reproducing llama.cpp's ids.
//!
//! GGUF files carry the vocabulary, merges and token types but not the
//! pre-tokenizer: llama.cpp picks it by `tokenizer.ggml.pre`. We do the
//! same, with each family's own split rules, and assemble the byte-level
//! BPE from the `tokenizers` crate. Special-token text (`<|im_start|>`) is
//! parsed only when asked, as llama.cpp's `parse_special` does; user-defined
//! tokens are always matched whole, as in llama.cpp.

pub mod spm;

use crate::summarizer::EngineError;
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

// llama.cpp's llama-vocab.cpp, per pre-tokenizer type.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// llama_token_type values in GGUF `tokenizer.ggml.token_type`.
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// A GGUF model's tokenizer, in two forms: one that parses special-token
/// text and one that treats it as plain text.
pub struct GgufTokenizer {
    backend: Backend,
    pub tokens: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Ids that end generation: EOS, EOT and the chat turn ends.
    pub stop_ids: Vec<u32>,
    pub pre: String,
}

enum Backend {
    /// Byte-level BPE (`gpt2`): with and without special-token parsing.
    Bpe {
        with_special: Box<Tokenizer>,
        plain: Box<Tokenizer>,
    },
    /// SentencePiece-style (`llama`), as llama.cpp's SPM tokenizer.
    Spm(Box<crate::tokenize::spm::Spm>),
}

fn bad(msg: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(msg.into())
}

fn md<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

fn md_u32(ct: &Content, key: &str) -> Option<u32> {
    md(ct, key).and_then(|v| {
        v.to_u32()
            .ok()
            .or_else(|| v.to_i32().ok().map(|x| x as u32))
    })
}

fn md_strings(ct: &Content, key: &str) -> Result<Vec<String>, EngineError> {
    let arr = md(ct, key)
        .ok_or_else(|| bad(format!("GGUF has no `{key}`: no tokenizer in this file")))?
        .to_vec()
        .map_err(|e| bad(format!("`{key}`: {e}")))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| bad(format!("`{key}`: {e}")))
        })
        .collect()
}

fn value_i64(v: &Value) -> Option<i64> {
    match v {
        Value::I32(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U8(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        Value::U64(x) => Some(*x as i64),
        _ => None,
    }
}

/// Each token's type (1: normal; 3: control, ...), all normal where the
/// GGUF gives none.
fn token_types(ct: &Content, tokens: usize) -> Result<Vec<i64>, EngineError> {
    Ok(match md(ct, "tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| bad(format!("token_type: {e}")))?
            .iter()
            .map(|x| value_i64(x).unwrap_or(1))
            .collect(),
        None => vec![1; tokens],
    })
}

fn split(regex: &str) -> Result<PreTokenizerWrapper, EngineError> {
    Ok(Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| bad(format!("pre-tokenizer regex: {e}")))?
    .into())
}

/// The split rules llama.cpp applies before BPE, by `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, EngineError> {
    let byte_level: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
    let steps = match pre {
        "qwen2" | "deepseek-r1-qwen" => vec![split(QWEN2_SPLIT)?, byte_level],
        "llama3" | "llama-bpe" | "smaug-bpe" => vec![split(LLAMA3_SPLIT)?, byte_level],
        // SmolLM and friends: every digit alone first, then GPT-2's rules.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![split(r"\p{N}")?, split(GPT2_SPLIT)?, byte_level]
        }
        "gpt2" | "default" => vec![split(GPT2_SPLIT)?, byte_level],
        other => {
            return Err(bad(format!(
                "pre-tokenizer `{other}` is not supported (known: qwen2, llama3, smollm, gpt2)"
            )))
        }
    };
    Ok(Sequence::new(steps).into())
}

impl GgufTokenizer {
    pub fn from_gguf(ct: &Content) -> Result<GgufTokenizer, EngineError> {
        let model = md(ct, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| bad("GGUF has no `tokenizer.ggml.model`: no tokenizer in this file"))?;
        if model == "llama" {
            return Self::spm_from_gguf(ct);
        }
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer model `{model}` is not supported (byte-level BPE `gpt2` and SentencePiece `llama` are)"
            )));
        }
        let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = md_strings(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("bad merge `{m}`")))
            })
            .collect::<Result<_, _>>()?;
        let types = token_types(ct, tokens.len())?;
        let pre = md(ct, "tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".to_string());

        let build = |parse_special: bool| -> Result<Tokenizer, EngineError> {
            let vocab: tokenizers::models::bpe::Vocab = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect();
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges.clone())
                .build()
                .map_err(|e| bad(format!("BPE: {e}")))?;
            let mut tk = Tokenizer::new(bpe);
            tk.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
            tk.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
            let added: Vec<AddedToken> = tokens
                .iter()
                .zip(&types)
                .filter(|(_, &ty)| {
                    ty == TYPE_USER_DEFINED
                        || (parse_special && (ty == TYPE_CONTROL || ty == TYPE_UNKNOWN))
                })
                .map(|(t, &ty)| AddedToken::from(t.clone(), ty != TYPE_USER_DEFINED))
                .collect();
            tk.add_special_tokens(added)
                .map_err(|e| bad(format!("special tokens: {e}")))?;
            Ok(tk)
        };

        let bos_id = md_u32(ct, "tokenizer.ggml.bos_token_id");
        let eos_id = md_u32(ct, "tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(eot) = md_u32(ct, "tokenizer.ggml.eot_token_id") {
            stop_ids.push(eot);
        }
        for end in [
            "<|im_end|>",
            "<|endoftext|>",
            "<end_of_turn>",
            "<|eot_id|>",
            "<|end|>",
        ] {
            if let Some(i) = tokens.iter().position(|t| t == end) {
                stop_ids.push(i as u32);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(GgufTokenizer {
            backend: Backend::Bpe {
                with_special: Box::new(build(true)?),
                plain: Box::new(build(false)?),
            },
            tokens,
            bos_id,
            eos_id,
            stop_ids,
            pre,
        })
    }

    /// Token ids of `text`, without BOS. `parse_special` maps special-token
    /// text to its id (for rendered chat prompts); off, it is plain text
    /// (for transcripts, which must not inject control tokens).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, EngineError> {
        match &self.backend {
            Backend::Bpe {
                with_special,
                plain,
            } => {
                let tk = if parse_special { with_special } else { plain };
                let enc = tk
                    .encode(text, false)
                    .map_err(|e| bad(format!("encode: {e}")))?;
                Ok(enc.get_ids().to_vec())
            }
            Backend::Spm(spm) => Ok(spm.encode(text, parse_special)),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        match &self.backend {
            Backend::Bpe { with_special, .. } => with_special
                .decode(ids, true)
                .map_err(|e| bad(format!("decode: {e}"))),
            Backend::Spm(spm) => Ok(spm.decode(ids)),
        }
    }

    /// A SentencePiece-style tokenizer (`tokenizer.ggml.model = llama`).
    fn spm_from_gguf(ct: &Content) -> Result<GgufTokenizer, EngineError> {
        let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
        let scores: Vec<f32> =
            match md(ct, "tokenizer.ggml.scores") {
                Some(v) => v
                    .to_vec()
                    .map_err(|e| bad(format!("scores: {e}")))?
                    .iter()
                    .map(|x| x.to_f32().unwrap_or(0.0))
                    .collect(),
                None => return Err(bad(
                    "GGUF has no `tokenizer.ggml.scores`: a SentencePiece vocabulary needs them",
                )),
            };
        let types = token_types(ct, tokens.len())?;
        let add_space_prefix = md(ct, "tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        let bos_id = md_u32(ct, "tokenizer.ggml.bos_token_id");
        let eos_id = md_u32(ct, "tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(eot) = md_u32(ct, "tokenizer.ggml.eot_token_id") {
            stop_ids.push(eot);
        }
        for end in ["<end_of_turn>", "<|im_end|>", "<|eot_id|>"] {
            if let Some(i) = tokens.iter().position(|t| t == end) {
                stop_ids.push(i as u32);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let pre = md(ct, "tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "spm".into());
        Ok(GgufTokenizer {
            backend: Backend::Spm(Box::new(crate::tokenize::spm::Spm::new(
                tokens.clone(),
                scores,
                &types,
                add_space_prefix,
            ))),
            tokens,
            bos_id,
            eos_id,
            stop_ids,
            pre,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
}
