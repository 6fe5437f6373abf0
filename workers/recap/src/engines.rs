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
                &GgufOptions {
                    id: entry.id.clone(),
                    sha256: entry.sha256.clone(),
                    device: device(config)?,
                    max_context: config.models.max_context,
                },
            )?)
        }
        other => bail!("model {model_id}: format `{other}` cannot be served by this build"),
    };
    Ok((model, entry))
}
