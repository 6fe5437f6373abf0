//! Loading a tier's model: catalog id in, a ready `Summarizer` out.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use recap_engine::catalog::ModelEntry;
use recap_engine::llm::{AdapterOptions, GgufModel, GgufOptions};
use recap_engine::{Extractive, Summarizer};
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
        .find(|c| c.join(recap_engine::adapter::CONFIG_FILE).exists())
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
            let file = entry
                .file
                .as_deref()
                .context("catalog entry without a file")?;
            let path = config.models_dir().join(file);
            Arc::new(GgufModel::load(&path, &gguf_options(&entry, config)?)?)
        }
        other => bail!("model {model_id}: format `{other}` cannot be served by this build"),
    };
    Ok((model, entry))
}

/// Counts tokens as a model does, without loading its weights: the router
/// needs only the compact model's tokenizer.
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

pub fn token_counter(model_id: &str, config: &Config) -> Result<TokenCounter> {
    let catalog = config.catalog()?;
    let entry = catalog.get(model_id)?;
    match entry.format.as_str() {
        "gguf" => {
            let file = entry
                .file
                .as_deref()
                .context("catalog entry without a file")?;
            let path = config.models_dir().join(file);
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("{}: run `recap models fetch`", path.display()))?;
            let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
                .with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
            let tk = recap_engine::tokenizer::GgufTokenizer::from_gguf(&ct)?;
            Ok(Arc::new(move |text: &str| {
                // A tokenizer failure must not lose the job: bytes/4 is the
                // usual rule of thumb.
                tk.encode(text, false)
                    .map(|v| v.len())
                    .unwrap_or(text.len() / 4)
            }))
        }
        _ => Ok(Arc::new(|text: &str| text.split_whitespace().count())),
    }
}
