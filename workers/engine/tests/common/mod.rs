//! Shared by the engine's tests: where the fetched weights are.
#![allow(dead_code)]

use std::path::PathBuf;

/// `RECAP_MODELS_DIR`, or `~/.cache/recap/models` as `recap models fetch` uses.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RECAP_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    cache.join("recap/models")
}
