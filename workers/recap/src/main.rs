//! The `recap` binary: one executable, one subcommand per role. It parses
//! the command line and dispatches; the roles are put together in the
//! library's `startup` module.

use anyhow::Result;
use clap::{Parser, Subcommand};
use recap::config::Config;
use recap::startup::{migrate, run_gateway, run_router, run_worker};
use recap::{bench, enqueue, eval, gateway, models, policy_cmd, submit, summarize, tenants, train};
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
    /// Benchmarks' recap side (bench/run runs them beside their anchors).
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCommand,
    },
}

fn init_tracing() {
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
/// keeping them in the heap instead cut prompt time by a fifth
/// (bench/RESULTS.md).
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Synchronous until the runtime starts: `mallopt` and `set_var` are only
/// sound while the process has one thread.
fn main() {
    keep_freed_memory();
    init_tracing();
    let cli = Cli::parse();
    let config = match prepare(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("recap: {e:#}");
            std::process::exit(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("recap: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli, config)) {
        eprintln!("recap: {e:#}");
        std::process::exit(1);
    }
}

/// The config, checked, and the process settings that must precede threads.
fn prepare(cli: &Cli) -> Result<Arc<Config>> {
    let config = Arc::new(Config::load(cli.config.as_deref())?);
    if cli.command.uses_services() {
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
        Command::Bench { cmd } => bench::run(&config, cmd).await,
    }
}
