//! Loading a tier's model: catalog id in, a ready `Summarizer` out.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use recap_engine::catalog::{Catalog, ModelEntry};
use recap_engine::llm::{GgufModel, GgufOptions};
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

/// The catalog entry and the loaded model.
pub fn load(model_id: &str, config: &Config) -> Result<(Arc<dyn Summarizer>, ModelEntry)> {
    let catalog = Catalog::builtin()?;
    let entry = catalog.get(model_id)?.clone();
    let model: Arc<dyn Summarizer> = match entry.format.as_str() {
        "builtin" => Arc::new(Extractive::default()),
        "gguf" => {
            let file = entry
                .file
                .as_deref()
                .context("catalog entry without a file")?;
            let path = config.models_dir().join(file);
            Arc::new(GgufModel::load(
                &path,
                &GgufOptions::for_entry(&entry, device(config)?, config.models.max_context),
            )?)
        }
        other => bail!("model {model_id}: format `{other}` cannot be served by this build"),
    };
    Ok((model, entry))
}

/// Counts tokens as a model does, without loading its weights: the router
/// needs only the compact model's tokenizer.
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

pub fn token_counter(model_id: &str, config: &Config) -> Result<TokenCounter> {
    let catalog = Catalog::builtin()?;
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
