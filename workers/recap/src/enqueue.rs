//! `recap enqueue FILE...`: publishes transcripts straight onto RabbitMQ as
//! job v1 messages, the way any AMQP producer would, and with `--wait`
//! prints each job's summaries, route and cost from PostgreSQL.

use crate::config::Config;
use crate::queue::{self, EXCHANGE_JOBS, ROUTE_INGEST};
use crate::store;
use crate::summarize::read_input;
use anyhow::{bail, Context, Result};
use lapin::types::FieldTable;
use recap_job::{Job, Quality, SCHEMA_VERSION};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(clap::Args)]
pub struct Args {
    /// Transcript files: plain text, QMSum meeting JSON or job JSON.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    #[command(flatten)]
    pub job: JobArgs,
}

/// What `enqueue` and `submit` ask of each job, and whether they wait.
#[derive(clap::Args)]
pub struct JobArgs {
    /// Summary kinds, comma-separated; default: the file's own, or overview.
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// economy, balanced or best
    #[arg(long)]
    pub quality: Option<String>,
    /// Wait for the jobs to end and print their summaries.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_s: u64,
}

pub async fn run(config: &Config, args: Args) -> Result<()> {
    let mut jobs = Vec::new();
    for file in &args.files {
        jobs.push((file.clone(), job_of_file(config, &args, file)?));
    }
    let conn = queue::connect(config, "enqueue").await?;
    let ch = queue::confirm_channel(&conn).await?;
    for (file, job) in &jobs {
        let props = queue::job_properties(Some(job.job_id), FieldTable::default());
        queue::publish_confirmed(&ch, EXCHANGE_JOBS, ROUTE_INGEST, &job.to_json(), props).await?;
        println!("queued {} <- {}", job.job_id, file.display());
    }
    let _ = conn.close(200, "done".into()).await;
    if !args.job.wait {
        return Ok(());
    }
    let pool = store::connect(config).await?;
    let start = Instant::now();
    let mut failed = 0;
    for (file, job) in &jobs {
        let row = loop {
            if let Some(row) = store::get_job(&pool, job.job_id).await? {
                if matches!(row.status.as_str(), "succeeded" | "failed" | "dead") {
                    break row;
                }
            }
            if start.elapsed() > Duration::from_secs(args.job.timeout_s) {
                bail!(
                    "timed out after {} s waiting for {}",
                    args.job.timeout_s,
                    job.job_id
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        if !print_ended(&pool, file, job.job_id, row).await? {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} job(s) did not succeed");
    }
    Ok(())
}

/// A transcript file as a job, checked as the router would check it.
fn job_of_file(config: &Config, args: &Args, file: &Path) -> Result<Job> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let input =
        read_input(&bytes, config).with_context(|| format!("reading {}", file.display()))?;
    let kinds = if args.job.kinds.is_empty() {
        input.kinds
    } else {
        args.job
            .kinds
            .iter()
            .map(|k| {
                recap_job::SummaryKind::parse(k)
                    .with_context(|| format!("unknown summary kind {k:?}"))
            })
            .collect::<Result<_>>()?
    };
    let quality = match &args.job.quality {
        Some(q) => Quality::parse(q).with_context(|| format!("unknown quality {q:?}"))?,
        None => Quality::default(),
    };
    let job = Job {
        version: SCHEMA_VERSION,
        job_id: Uuid::new_v4(),
        tenant: args.tenant.clone(),
        transcript: input.transcript,
        summaries: kinds,
        quality,
        language: input.language,
        metadata: Some(serde_json::Map::from_iter([(
            "source_file".to_string(),
            serde_json::Value::String(file.display().to_string()),
        )])),
        callback_url: None,
    };
    // Refuse here what the router would dead-letter.
    recap_job::parse_job(&job.to_json(), &config.limits)
        .map_err(|r| anyhow::anyhow!("{}: {r}", file.display()))?;
    Ok(job)
}

/// Prints an ended job: its route and cost, then its summaries or its
/// error. Whether it succeeded.
async fn print_ended(pool: &PgPool, file: &Path, job_id: Uuid, row: store::JobRow) -> Result<bool> {
    let reason = store::first_route_reason(pool, job_id).await?;
    println!("\n=== {} ({})", file.display(), job_id);
    let wall = match (row.queued_at, row.finished_at) {
        (Some(q), Some(f)) => format!("{:.1} s", (f - q).num_milliseconds() as f64 / 1e3),
        _ => "-".into(),
    };
    println!(
        "status {} | tier {} | model {} | route reason {} | cost ${:.6} | attempts {} | chunks {} | queued-to-done {}",
        row.status,
        row.tier.as_deref().unwrap_or("-"),
        row.model.as_deref().unwrap_or("-"),
        reason.as_deref().unwrap_or("-"),
        row.cost_usd.unwrap_or(0.0),
        row.attempts,
        row.chunks.unwrap_or(0),
        wall,
    );
    if row.status != "succeeded" {
        println!(
            "error {}: {}",
            row.error_code.unwrap_or_default(),
            row.error.unwrap_or_default()
        );
        return Ok(false);
    }
    for s in store::get_summaries(pool, job_id).await? {
        println!(
            "--- {} [{} via {}; {} in / {} out tokens; {:.0} ms]\n{}",
            s.kind, s.model, s.engine, s.input_tokens, s.output_tokens, s.total_ms, s.text
        );
    }
    Ok(true)
}
