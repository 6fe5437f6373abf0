//! T5 / FLAN-T5 seq2seq models (the compact model of the Tiny Titans
//! paper) from the Hugging Face layout: `config.json`, `model.safetensors`,
//! `tokenizer.json`, in f32 or bf16 (FLAN-T5 overflows to NaN in f16, so
//! f16 is refused).

use crate::pipeline::generate::{finished_text, generate, Decoder, GenParams, Generation};
use crate::pipeline::mapreduce::{self, Step};
use crate::pipeline::prompts;
use crate::summarizer::{EngineError, SummarizeRequest, Summarizer, SummaryOutput};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5;
use recap_job::SummaryKind;
use std::path::Path;
use std::sync::Mutex;
use tokenizers::Tokenizer;

#[derive(Debug, Clone)]
pub struct T5Options {
    pub id: String,
    pub dtype: DType,
    pub device: Device,
    /// Tokens of input one call may hold; FLAN-T5 was trained on 512.
    pub max_input_tokens: usize,
    /// The weights' pinned sha256 ([`weights_sha256`]), checked at load.
    pub sha256: Option<String>,
}

/// A T5 directory's tokenizer (`tokenizer.json`), ending every input with
/// the model's end-of-sequence id as T5 was trained; the router loads it
/// alone to count tokens.
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    eos: u32,
}

impl T5Tokenizer {
    pub fn load(dir: &Path) -> Result<T5Tokenizer, EngineError> {
        Ok(T5Tokenizer {
            tokenizer: read_tokenizer(dir)?,
            eos: read_config(dir)?.eos_token_id as u32,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let mut ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        if ids.last() != Some(&self.eos) {
            ids.push(self.eos);
        }
        Ok(ids)
    }
}

/// The weights of a Hugging Face directory: `model.safetensors`, or the
/// shards that `model.safetensors.index.json` maps tensors to, in name order.
pub fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, EngineError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        bad(
            dir,
            "neither model.safetensors nor model.safetensors.index.json is there",
        )
    })?;
    let names =
        shard_names(&text).map_err(|e| bad(dir, format!("model.safetensors.index.json: {e}")))?;
    let files: Vec<_> = names.iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(bad(dir, format!("shard {} is missing", missing.display())));
    }
    if files.is_empty() {
        return Err(bad(dir, "model.safetensors.index.json maps no tensor"));
    }
    Ok(files)
}

/// The shards a `model.safetensors.index.json` maps tensors to, in name
/// order: plain file names beside the index, never a path out of it.
pub fn shard_names(index_json: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_str(index_json).map_err(|e| e.to_string())?;
    let map = value["weight_map"].as_object().ok_or("no weight_map")?;
    let mut names = std::collections::BTreeSet::new();
    for file in map.values() {
        let name = file
            .as_str()
            .filter(|n| !n.contains('/') && !n.contains('\\') && n.ends_with(".safetensors"))
            .ok_or_else(|| format!("weight_map names `{file}`, not a shard here"))?;
        names.insert(name.to_string());
    }
    Ok(names.into_iter().collect())
}

/// The sha256 a catalog pins for a directory's weights.
pub fn dir_sha256(dir: &Path) -> Result<String, EngineError> {
    weights_sha256(&weight_files(dir)?)
}

/// The sha256 a catalog pins for these weights: the file's own for one
/// file; for shards, that of their `sha256sum` listing (`sha256sum
/// model-*.safetensors | sha256sum`), so that each shard is pinned.
pub fn weights_sha256(files: &[std::path::PathBuf]) -> Result<String, EngineError> {
    use sha2::{Digest, Sha256};
    if let [one] = files {
        return Ok(crate::models::llm::sha256_file(one)?);
    }
    let mut listing = Sha256::new();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        listing.update(format!("{}  {name}\n", crate::models::llm::sha256_file(f)?));
    }
    Ok(hex::encode(listing.finalize()))
}

fn read_config(dir: &Path) -> Result<t5::Config, EngineError> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| bad(dir, format!("config.json: {e}")))?;
    let config: t5::Config =
        serde_json::from_slice(&bytes).map_err(|e| bad(dir, format!("config.json: {e}")))?;
    if !config.is_encoder_decoder {
        return Err(bad(dir, "config.json: not an encoder-decoder model"));
    }
    Ok(config)
}

fn read_tokenizer(dir: &Path) -> Result<Tokenizer, EngineError> {
    Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| bad(dir, format!("tokenizer.json: {e}")))
}

pub struct T5Summarizer {
    id: String,
    model: Mutex<t5::T5ForConditionalGeneration>,
    tokenizer: T5Tokenizer,
    config: t5::Config,
    device: Device,
    max_input: usize,
}

/// The decoder half, bound to one encoder output, for the generation loop.
struct BoundDecoder<'a> {
    model: &'a mut t5::T5ForConditionalGeneration,
    encoded: &'a Tensor,
}

impl Decoder for BoundDecoder<'_> {
    fn forward(&mut self, ids: &Tensor, _pos: usize) -> candle_core::Result<Tensor> {
        // T5's relative attention derives positions from its own KV cache.
        self.model.decode(ids, self.encoded)
    }
    fn clear_cache(&mut self) {
        self.model.clear_kv_cache();
    }
}

fn bad(dir: &Path, msg: impl std::fmt::Display) -> EngineError {
    EngineError::BadModel(format!("{}: {msg}", dir.display()))
}

impl T5Summarizer {
    pub fn load(dir: &Path, opts: &T5Options) -> Result<T5Summarizer, EngineError> {
        if opts.dtype == DType::F16 {
            return Err(bad(dir, "FLAN-T5 produces NaNs in f16: use bf16 or f32"));
        }
        let config = read_config(dir)?;
        let tokenizer = T5Tokenizer {
            tokenizer: read_tokenizer(dir)?,
            eos: config.eos_token_id as u32,
        };
        let weights = weight_files(dir)?;
        if let Some(want) = &opts.sha256 {
            let got = weights_sha256(&weights)?;
            if &got != want {
                return Err(bad(
                    dir,
                    format!("the weights have sha256 {got}, the catalog says {want}"),
                ));
            }
        }
        // SAFETY: the files are mapped read-only and not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, opts.dtype, &opts.device) }
            .map_err(|e| bad(dir, format!("the safetensors weights: {e}")))?;
        let model = t5::T5ForConditionalGeneration::load(vb, &config)
            .map_err(|e| bad(dir, format!("loading T5 weights: {e}")))?;
        Ok(T5Summarizer {
            id: opts.id.clone(),
            model: Mutex::new(model),
            tokenizer,
            config,
            device: opts.device.clone(),
            max_input: opts.max_input_tokens,
        })
    }

    fn encode_ids(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text)
    }

    fn count(&self, text: &str) -> usize {
        self.encode_ids(text)
            .map(|v| v.len())
            .unwrap_or(text.len() / 3 + 1)
    }

    /// One input text in, one output text out.
    pub fn complete(
        &self,
        input: &str,
        params: &GenParams,
        req: &SummarizeRequest<'_>,
    ) -> Result<(String, Generation), EngineError> {
        let ids = self.encode_ids(input)?;
        let mut model = self
            .model
            .lock()
            .map_err(|_| EngineError::Model("model lock poisoned by an earlier panic".into()))?;
        let input_t = Tensor::new(ids.as_slice(), &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| EngineError::Model(e.to_string()))?;
        model.clear_kv_cache();
        let started = std::time::Instant::now();
        let encoded = model
            .encode(&input_t)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let encode_ms = started.elapsed().as_secs_f64() * 1e3;
        let start_id = self
            .config
            .decoder_start_token_id
            .unwrap_or(self.config.pad_token_id) as u32;
        let decode = |t: &[u32]| {
            self.tokenizer
                .tokenizer
                .decode(t, true)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))
        };
        let mut bound = BoundDecoder {
            model: &mut model,
            encoded: &encoded,
        };
        let mut g = generate(
            &mut bound,
            &self.device,
            &[start_id],
            params,
            &[self.config.eos_token_id as u32],
            &decode,
            &req.cancel,
            req.deadline,
        )?;
        // The encoder pass is this model's prefill.
        g.prefill_ms += encode_ms;
        g.prompt_tokens = ids.len();
        let text = finished_text(&decode(&g.tokens)?, &g, params);
        Ok((text, g))
    }

    fn summarize_one(
        &self,
        req: &SummarizeRequest<'_>,
        kind: SummaryKind,
    ) -> Result<SummaryOutput, EngineError> {
        let params = GenParams {
            max_new_tokens: kind.max_output_tokens(),
            ..GenParams::default()
        };
        let overhead = self.count(prompts::instruction(kind)) + 16;
        let budget = self.max_input.saturating_sub(overhead).max(32);
        let suffix = crate::models::llm::language_suffix(req.language);
        let count = |s: &str| self.count(s);
        let task = prompts::task(kind, req.query);
        mapreduce::summarize_kind(req.transcript, kind, budget, &count, &mut |step| {
            let input = match step {
                Step::Map(t) => prompts::flan_input(t, &task)?,
                Step::Reduce(p) => prompts::flan_input(p, &task)?,
            };
            self.complete(&format!("{input}{suffix}"), &params, req)
                .map(|(text, g)| (text, (&g).into()))
        })
    }
}

impl Summarizer for T5Summarizer {
    fn model_id(&self) -> &str {
        &self.id
    }

    fn engine(&self) -> &'static str {
        "t5"
    }

    fn count_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(self.encode_ids(text)?.len())
    }

    fn summarize(&self, req: &SummarizeRequest<'_>) -> Result<Vec<SummaryOutput>, EngineError> {
        req.kinds
            .iter()
            .map(|&k| self.summarize_one(req, k))
            .collect()
    }
}
