//! `recap-bench`: the recap side of the benchmarks under `bench/`, which
//! run each beside its anchor. A binary of its own, so that developer
//! tooling (one of its commands creates and drops a table) stays out of
//! the serving `recap` binary.

mod commands;
mod train_speed;

use clap::Parser;
use recap::process::{block_on, init_tracing, keep_freed_memory, prepare};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "recap-bench",
    version,
    about = "Benchmarks' recap side (bench/run runs them beside their anchors)."
)]
struct Cli {
    /// TOML configuration file (environment: RECAP_CONFIG).
    #[arg(long, global = true, env = "RECAP_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: commands::BenchCommand,
}

/// Synchronous until the runtime starts, as `recap`'s own main.
fn main() {
    keep_freed_memory();
    init_tracing();
    let cli = Cli::parse();
    let result = prepare(cli.config.as_deref(), true)
        .and_then(|config| block_on(commands::run(&config, cli.command)));
    if let Err(e) = result {
        eprintln!("recap-bench: {e:#}");
        std::process::exit(1);
    }
}
