//! Loading a tier's model: catalog id in, a ready `Summarizer` out.

use crate::config::Config;
use anyhow::{bail, Result};
use recap_engine::{extractive, Extractive, Summarizer};
use std::sync::Arc;

pub fn load(model_id: &str, _config: &Config) -> Result<Arc<dyn Summarizer>> {
    match model_id {
        extractive::MODEL_ID => Ok(Arc::new(Extractive::default())),
        other => bail!(
            "unknown model `{other}`; known models: {}",
            extractive::MODEL_ID
        ),
    }
}
