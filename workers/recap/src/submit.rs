//! `recap submit FILE...`: sends transcripts (text, QMSum JSON or job JSON)
//! through the gateway, and with `--wait` prints their summaries.

use crate::config::Config;
use crate::summarize::read_input;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The gateway's base URL.
    #[arg(
        long,
        env = "RECAP_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// The tenant's API key.
    #[arg(long, env = "RECAP_API_KEY", hide_env_values = true)]
    pub api_key: String,
    #[command(flatten)]
    pub job: crate::enqueue::JobArgs,
}

pub async fn run(config: &Config, args: Args) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = args.url.trim_end_matches('/');
    let mut submitted = Vec::new();
    for file in &args.files {
        let id = submit_file(config, &args, &http, base, file).await?;
        submitted.push((file.clone(), id));
    }
    if !args.job.wait {
        return Ok(());
    }
    let start = Instant::now();
    let mut failed = 0;
    for (file, id) in submitted {
        let job = loop {
            let v: serde_json::Value = http
                .get(format!("{base}/v1/jobs/{id}"))
                .bearer_auth(&args.api_key)
                .send()
                .await?
                .json()
                .await?;
            if matches!(v["status"].as_str(), Some("succeeded" | "failed" | "dead")) {
                break v;
            }
            if start.elapsed() > Duration::from_secs(args.job.timeout_s) {
                bail!("timed out waiting for {id}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        if !print_ended(&args, &http, base, &file, &id, &job).await? {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} job(s) did not succeed");
    }
    Ok(())
}

/// Posts a transcript file as a job; its id.
async fn submit_file(
    config: &Config,
    args: &Args,
    http: &reqwest::Client,
    base: &str,
    file: &Path,
) -> Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let input =
        read_input(&bytes, config).with_context(|| format!("reading {}", file.display()))?;
    let kinds: Vec<String> = if args.job.kinds.is_empty() {
        input.kinds.iter().map(|k| k.as_str().to_string()).collect()
    } else {
        args.job.kinds.clone()
    };
    let mut body = serde_json::json!({
        "version": 1,
        "job_id": uuid::Uuid::new_v4(),
        "transcript": input.transcript,
        "summaries": kinds,
        "metadata": {"source_file": file.display().to_string()},
    });
    if let Some(l) = input.language {
        body["language"] = serde_json::json!(l);
    }
    if let Some(q) = &args.job.quality {
        body["quality"] = serde_json::json!(q);
    }
    let res = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&args.api_key)
        .json(&body)
        .send()
        .await?;
    let status = res.status();
    let v: serde_json::Value = res.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "{}: {} {}",
            file.display(),
            status,
            v["detail"].as_str().unwrap_or("")
        );
    }
    let id = v["job_id"].as_str().unwrap_or_default().to_string();
    println!(
        "{} {id} <- {}",
        if status.as_u16() == 202 {
            "queued"
        } else {
            "exists"
        },
        file.display()
    );
    Ok(id)
}

/// Prints an ended job: its route and cost, then its summaries or its
/// error. Whether it succeeded.
async fn print_ended(
    args: &Args,
    http: &reqwest::Client,
    base: &str,
    file: &Path,
    id: &str,
    job: &serde_json::Value,
) -> Result<bool> {
    println!(
        "\n=== {} ({id})\nstatus {} | tier {} | model {} | route {} | cost ${:.6}",
        file.display(),
        job["status"].as_str().unwrap_or("-"),
        job["tier"].as_str().unwrap_or("-"),
        job["model"].as_str().unwrap_or("-"),
        job["route_reason"].as_str().unwrap_or("-"),
        job["cost_usd"].as_f64().unwrap_or(0.0)
    );
    if job["status"] != "succeeded" {
        println!(
            "error {}: {}",
            job["error_code"].as_str().unwrap_or(""),
            job["error"].as_str().unwrap_or("")
        );
        return Ok(false);
    }
    let sums: serde_json::Value = http
        .get(format!("{base}/v1/jobs/{id}/summaries"))
        .bearer_auth(&args.api_key)
        .send()
        .await?
        .json()
        .await?;
    for s in sums.as_array().into_iter().flatten() {
        println!(
            "--- {} [{}]\n{}",
            s["kind"].as_str().unwrap_or(""),
            s["model"].as_str().unwrap_or(""),
            s["text"].as_str().unwrap_or("")
        );
    }
    Ok(true)
}
