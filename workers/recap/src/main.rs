//! The `recap` binary: one executable, one subcommand per role. It parses
//! the command line and dispatches; the roles are put together in the
//! library's `startup` module.

use anyhow::Result;
use clap::{Parser, Subcommand};
use recap::config::Config;
use recap::process::{block_on, init_tracing, keep_freed_memory, prepare};
use recap::startup::{migrate, run_gateway, run_router, run_worker};
use recap::{enqueue, eval, gateway, models, policy_cmd, submit, summarize, tenants, train};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "recap",
    version,
    about = "Meeting transcripts in, summaries out, at fleet scale."
)]
struct Cli {
    /// TOML configuration file (environment: RECAP_CONFIG).
    #[arg(long, global = true, env = "RECAP_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the SQL migrations and declare the RabbitMQ topology (idempotent).
    Migrate,
    /// Route jobs from recap.ingest to the tier queues with the cost policy.
    Router,
    /// Run a tier's model over the jobs of its queue.
    Worker {
        /// compact or large
        #[arg(long)]
        tier: String,
    },
    /// Publish transcript files as jobs on RabbitMQ; with --wait, print their summaries.
    Enqueue(enqueue::Args),
    /// The model catalog: list it, fetch weights.
    Models {
        #[command(subcommand)]
        cmd: models::ModelsCommand,
    },
    /// The cost policy: explain a decision.
    Policy {
        #[command(subcommand)]
        cmd: policy_cmd::PolicyCommand,
    },
    /// Tenant budgets.
    Budget {
        #[command(subcommand)]
        cmd: policy_cmd::BudgetCommand,
    },
    /// ROUGE of a candidate summary against a reference.
    Rouge(eval::RougeArgs),
    /// Evaluate models, baselines and the policy on QMSum: quality, cost, latency.
    Eval(eval::EvalArgs),
    /// Fine-tune a LoRA adapter for a GGUF model on QMSum or your own summaries.
    Train(train::TrainArgs),
    /// The HTTP gateway: /v1/jobs, /openapi.json, probes and metrics.
    Gateway {
        /// Address to listen on (default: gateway.listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Tenants and their API keys.
    Tenants {
        #[command(subcommand)]
        cmd: tenants::TenantsCommand,
    },
    /// Send transcripts through the gateway; with --wait, print their summaries.
    Submit(submit::Args),
    /// Print the OpenAPI document of the gateway.
    Openapi,
    /// Summarize a transcript file (plain text, QMSum meeting JSON or job JSON; - for stdin).
    Summarize(summarize::Args),
}

/// Synchronous until the runtime starts: `mallopt` and `set_var` are only
/// sound while the process has one thread.
fn main() {
    keep_freed_memory();
    init_tracing();
    let cli = Cli::parse();
    let uses_services = cli.command.uses_services();
    let result =
        prepare(cli.config.as_deref(), uses_services).and_then(|config| block_on(run(cli, config)));
    if let Err(e) = result {
        eprintln!("recap: {e:#}");
        std::process::exit(1);
    }
}

impl Command {
    /// Whether the command connects to the broker or the database with the
    /// configured credentials (and so must not run with placeholder ones).
    fn uses_services(&self) -> bool {
        !matches!(
            self,
            Command::Summarize(_)
                | Command::Models { .. }
                | Command::Openapi
                | Command::Rouge(_)
                | Command::Eval(_)
                | Command::Train(_)
        )
    }
}

async fn run(cli: Cli, config: Arc<Config>) -> Result<()> {
    match cli.command {
        Command::Migrate => migrate(&config).await,
        Command::Router => run_router(config).await,
        Command::Worker { tier } => run_worker(config, tier).await,
        Command::Summarize(args) => summarize::run(&config, args),
        Command::Enqueue(args) => enqueue::run(&config, args).await,
        Command::Models { cmd } => models::run(&config, cmd),
        Command::Gateway { listen } => run_gateway(config, listen).await,
        Command::Tenants { cmd } => tenants::run(&config, cmd).await,
        Command::Submit(args) => submit::run(&config, args).await,
        Command::Openapi => {
            use std::io::Write;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{}", gateway::openapi_json());
            Ok(())
        }
        Command::Rouge(args) => eval::rouge(args),
        Command::Eval(args) => eval::eval(&config, args),
        Command::Train(args) => train::run(&config, args).await,
        Command::Policy { cmd } => policy_cmd::policy(&config, cmd).await,
        Command::Budget { cmd } => policy_cmd::budget(&config, cmd).await,
    }
}
