//! `recap-gateway`: the HTTP gateway alone, in a binary that links no
//! model engine. It serves what `recap gateway` serves.

use clap::Parser;
use recap_service::gateway;
use recap_service::process::{block_on, init_tracing, prepare};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "recap-gateway",
    version,
    about = "The HTTP gateway: /v1/jobs, /openapi.json, probes and metrics."
)]
struct Cli {
    /// TOML configuration file (environment: RECAP_CONFIG).
    #[arg(long, env = "RECAP_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (default: gateway.listen).
    #[arg(long)]
    listen: Option<String>,
}

/// Synchronous until the runtime starts, as `recap`'s own main.
fn main() {
    init_tracing();
    let cli = Cli::parse();
    let result = prepare(cli.config.as_deref(), true)
        .and_then(|config| block_on(gateway::run_until_signalled(config, cli.listen)));
    if let Err(e) = result {
        eprintln!("recap-gateway: {e:#}");
        std::process::exit(1);
    }
}
