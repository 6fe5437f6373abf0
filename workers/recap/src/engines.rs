//! Loading a tier's model: catalog id in, a ready `Summarizer` out.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use recap_engine::catalog::ModelEntry;
use recap_engine::models::llm::{AdapterOptions, GgufModel, GgufOptions};
use recap_engine::models::t5::{T5Options, T5Summarizer};
use recap_engine::{Extractive, Summarizer};
use std::path::PathBuf;
use std::sync::Arc;

pub fn device(config: &Config) -> Result<Device> {
    match config.models.device.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            Device::new_cuda(0).context("models.device = cuda (is this a --features cuda build?)")
        }
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .context("models.device")?;
            Device::new_cuda(n).with_context(|| format!("models.device = {other}"))
        }
    }
}

/// The repository's adapters, for catalog entries that name them by a
/// relative path (the shipped compact tier's).
const REPO_ADAPTERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../adapters");

/// An adapter's directory: absolute as given; relative, in the models
/// directory, `RECAP_ADAPTERS_DIR` (the images' copy of `adapters/`), or
/// the repository's `adapters/`.
pub fn adapter_dir(path: &str, config: &Config) -> Result<std::path::PathBuf> {
    let p = std::path::Path::new(path);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let mut candidates = vec![config.models_dir().join(p)];
    if let Some(d) = std::env::var_os("RECAP_ADAPTERS_DIR") {
        candidates.push(std::path::PathBuf::from(d).join(p));
    }
    candidates.push(std::path::Path::new(REPO_ADAPTERS).join(p));
    candidates
        .iter()
        .find(|c| c.join(recap_engine::models::adapter::CONFIG_FILE).exists())
        .cloned()
        .with_context(|| {
            let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
            format!("adapter `{path}` is in none of {}", tried.join(", "))
        })
}

/// How a GGUF catalog entry is served: its options, with its adapter.
pub fn gguf_options(entry: &ModelEntry, config: &Config) -> Result<GgufOptions> {
    let mut opts = GgufOptions::for_entry(entry, device(config)?, config.models.max_context);
    if let Some(a) = &entry.adapter {
        opts.adapter = Some(AdapterOptions {
            dir: adapter_dir(&a.path, config)?,
            sha256: Some(a.sha256.clone()),
            merge: a.merge,
        });
    }
    Ok(opts)
}

/// The catalog entry and the loaded model.
pub fn load(model_id: &str, config: &Config) -> Result<(Arc<dyn Summarizer>, ModelEntry)> {
    let catalog = config.catalog()?;
    let entry = catalog.get(model_id)?.clone();
    let model: Arc<dyn Summarizer> = match entry.format.as_str() {
        "builtin" => Arc::new(Extractive::default()),
        "gguf" => {
            let path = weights_path(&entry, config)?;
            Arc::new(GgufModel::load(&path, &gguf_options(&entry, config)?)?)
        }
        "t5" => Arc::new(load_t5(&entry, config).with_context(|| format!("model {model_id}"))?),
        "openai" => Arc::new(recap_openai::OpenAiSummarizer::new(endpoint(&entry)?)?),
        other => bail!("model {model_id}: format `{other}` cannot be served by this build"),
    };
    Ok((model, entry))
}

/// An `openai` entry's endpoint, its base URL, model name and key read
/// from the variables the entry names.
fn endpoint(entry: &ModelEntry) -> Result<recap_openai::EndpointConfig> {
    let e = entry.endpoint.clone().unwrap_or_default();
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let need = |name: &str, what: &str| {
        var(name).with_context(|| format!("model {}: set {name} to {what}", entry.id))
    };
    Ok(recap_openai::EndpointConfig {
        id: entry.id.clone(),
        base_url: need(
            &e.base_url_env,
            "the endpoint's API base (http://host:port/v1)",
        )?,
        model: need(&e.model_env, "the model name the endpoint serves")?,
        api_key: var(&e.api_key_env),
        timeout: std::time::Duration::from_secs(e.timeout_s),
        max_retries: e.max_retries,
        max_concurrency: e.max_concurrency,
        context_length: entry.context_length,
        transcript_first: entry.prompt_order.as_deref() != Some("task_first"),
    })
}

/// The entry's file (a directory for `t5`) in the models directory.
fn weights_path(entry: &ModelEntry, config: &Config) -> Result<PathBuf> {
    let file = entry
        .file
        .as_deref()
        .with_context(|| format!("model {}: catalog entry without a file", entry.id))?;
    Ok(config.models_dir().join(file))
}

/// A T5 / FLAN-T5 directory, checked against the entry's sha256.
fn load_t5(entry: &ModelEntry, config: &Config) -> Result<T5Summarizer> {
    let dir = weights_path(entry, config)?;
    let dtype = match entry.dtype.as_deref() {
        Some("bf16") => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    };
    let opts = T5Options {
        id: entry.id.clone(),
        dtype,
        device: device(config)?,
        max_input_tokens: entry.context_length,
        sha256: entry.sha256.clone(),
    };
    Ok(T5Summarizer::load(&dir, &opts)?)
}

/// Counts tokens as a model does, without loading its weights: the router
/// needs only the compact model's tokenizer.
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

pub fn token_counter(model_id: &str, config: &Config) -> Result<TokenCounter> {
    let catalog = config.catalog()?;
    let entry = catalog.get(model_id)?;
    match entry.format.as_str() {
        "gguf" => {
            let path = weights_path(entry, config)?;
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("{}: run `recap models fetch`", path.display()))?;
            let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
                .with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
            let tk = recap_engine::tokenize::GgufTokenizer::from_gguf(&ct)?;
            Ok(Arc::new(move |text: &str| {
                // A tokenizer failure must not lose the job: bytes/4 is the
                // usual rule of thumb.
                tk.encode(text, false)
                    .map(|v| v.len())
                    .unwrap_or(text.len() / 4)
            }))
        }
        "t5" => {
            let tk = recap_engine::models::t5::T5Tokenizer::load(&weights_path(entry, config)?)
                .with_context(|| format!("model {model_id}"))?;
            Ok(Arc::new(move |text: &str| {
                tk.encode(text).map(|v| v.len()).unwrap_or(text.len() / 4)
            }))
        }
        "openai" => Ok(Arc::new(recap_openai::estimate_tokens)),
        _ => Ok(Arc::new(|text: &str| text.split_whitespace().count())),
    }
}
