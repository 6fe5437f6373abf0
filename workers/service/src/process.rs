//! What every recap binary does before its runtime starts: logging, the
//! allocator's tunables, the checked config and the settings that must
//! precede threads, then one multi-threaded runtime.

use crate::config::Config;
use anyhow::{Context, Result};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

/// Logs to stderr, filtered by `RECAP_LOG` (default `info`), as JSON when
/// `RECAP_LOG_FORMAT=json`.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RECAP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("RECAP_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Inference allocates and frees buffers of many MiB per layer (prompt
/// activations, attention scores, dequantized weights). glibc serves those
/// with fresh mmaps that the kernel must fault in and zero on every use;
/// keeping them in the heap instead saves that work (bench/RESULTS.md).
pub fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The config, checked (its credentials too where the command connects to
/// the broker or the database), and the process settings that must
/// precede threads.
pub fn prepare(path: Option<&Path>, uses_services: bool) -> Result<Arc<Config>> {
    let config = Arc::new(Config::load(path)?);
    if uses_services {
        let allow_dev = std::env::var("RECAP_ALLOW_DEV_CREDENTIALS").is_ok_and(|v| v == "1");
        config.check_credentials(allow_dev)?;
    }
    if config.models.threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle's CPU kernels run on rayon's global pool, sized from this
        // variable the first time it is used, which is after this point.
        // Sound only while the process has one thread: the runtime starts after.
        std::env::set_var("RAYON_NUM_THREADS", config.models.threads.to_string());
    }
    Ok(config)
}

/// Runs a command to its end on a new multi-threaded runtime.
pub fn block_on(command: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(command)
}
