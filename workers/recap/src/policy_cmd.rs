//! `recap policy explain` and `recap budget set|show`: the policy's view of
//! a job and of a tenant's money, without running anything.

use crate::config::Config;
use crate::{engines, policy, router, store, summarize};
use anyhow::{Context, Result};
use recap_policy::Tier;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the decision for a job (job JSON, QMSum JSON or text) and its
    /// reasons, without running it; or, with --job, what was decided for a
    /// job that ran (its decisions, the cascade's signals and score).
    Explain {
        #[arg(required_unless_present = "job")]
        file: Option<PathBuf>,
        /// A job that ran: its routing decisions and recorded signals.
        #[arg(long, conflicts_with = "file")]
        job: Option<uuid::Uuid>,
        /// Tenant, for inputs that do not name one.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Decide without the tenant's budget (no database needed).
        #[arg(long)]
        no_budget: bool,
    },
    /// Fit the routing score from labelled cases (an eval's cases.jsonl, or
    /// shadow pairs), print the quality-cost frontier, write a new policy.
    Calibrate(crate::calibrate::CalibrateArgs),
}

#[derive(clap::Subcommand)]
pub enum BudgetCommand {
    /// Set a tenant's daily and/or monthly budget in USD (omit one to leave it unlimited).
    Set {
        tenant: String,
        #[arg(long)]
        daily: Option<f64>,
        #[arg(long)]
        monthly: Option<f64>,
    },
    /// What a tenant has left today and this month.
    Show { tenant: String },
}

pub async fn policy(config: &Config, cmd: PolicyCommand) -> Result<()> {
    let (file, tenant, no_budget) = match cmd {
        PolicyCommand::Calibrate(args) => return crate::calibrate::run(config, args).await,
        PolicyCommand::Explain { job: Some(id), .. } => return explain_job(config, id).await,
        PolicyCommand::Explain {
            file: Some(file),
            tenant,
            no_budget,
            ..
        } => (file, tenant, no_budget),
        PolicyCommand::Explain { .. } => anyhow::bail!("name a job file, or --job ID"),
    };
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let job = match recap_job::parse_job(&bytes, &config.limits) {
        Ok(job) => job,
        Err(_) => {
            let input = summarize::read_input(&bytes, config)?;
            let mut job = recap_job::Job::from_text(&tenant, "x", input.kinds);
            job.transcript = input.transcript;
            job.language = input.language;
            job
        }
    };
    let p = policy::load(config)?;
    let compact = config
        .tier_model(Tier::Compact)
        .or(config.tier_model(Tier::Large))
        .unwrap_or("extractive-lead");
    let counter = engines::token_counter(compact, config)?;
    let features = router::features(&job, &counter);
    let budget = if no_budget {
        recap_policy::BudgetState::default()
    } else {
        let pool = store::connect(config)
            .await
            .context("reading the tenant's budget (or pass --no-budget)")?;
        store::read_budget(&pool, &job.tenant, config.budgets.defaults()).await?
    };
    let decision = p.decide(&features, &policy::tiers(config), &budget);
    let out = serde_json::json!({
        "policy_version": p.version,
        "features": features,
        "score": score_view(&p),
        "budget": budget,
        "decision": match &decision {
            Ok(d) => serde_json::to_value(d)?,
            Err(e) => serde_json::json!({"refused": e.code(), "message": e.to_string()}),
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The calibrated score as the cascade applies it, feature by feature.
fn score_view(p: &recap_policy::PolicyConfig) -> serde_json::Value {
    match &p.score {
        None => serde_json::json!(null),
        Some(s) => serde_json::json!({
            "applied": p.rules.score && p.rules.cascade,
            "when": "after the compact tier answers: compact output with P(compact is enough) under the threshold goes once to large",
            "threshold": s.threshold,
            "kinds": if s.kinds.is_empty() { serde_json::json!("all") } else { serde_json::json!(s.kinds) },
            "bias": s.bias,
            "features": s.features.iter().enumerate().map(|(i, f)| serde_json::json!({
                "feature": f,
                "meaning": recap_policy::score::FEATURES.iter().find(|(n, _)| n == f).map(|(_, m)| *m),
                "mean": s.mean[i],
                "scale": s.scale[i],
                "weight": s.weights[i],
            })).collect::<Vec<_>>(),
            "fitted": s.fitted,
        }),
    }
}

async fn explain_job(config: &Config, id: uuid::Uuid) -> Result<()> {
    let pool = store::connect(config).await?;
    let (decisions, summaries) = store::explain_job(&pool, id).await?;
    if decisions.is_empty() && summaries.is_empty() {
        anyhow::bail!("job {id} has no routing decisions or summaries");
    }
    let p = policy::load(config)?;
    let summaries: Vec<serde_json::Value> = summaries
        .into_iter()
        .map(|mut s| {
            if let Some(sc) = &p.score {
                s["score_now"] = score_of_row(sc, &s);
            }
            s
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "job_id": id,
            "decisions": decisions,
            "summaries": summaries,
            "policy_now": {"version": p.version, "score": score_view(&p)},
        }))?
    );
    Ok(())
}

/// The current score of a stored summary row, from the signals the row
/// records; a score needing one it does not record says which.
fn score_of_row(sc: &recap_policy::score::Score, row: &serde_json::Value) -> serde_json::Value {
    const RECORDED: [&str; 9] = [
        "log_input_tokens",
        "log_output_tokens",
        "mean_logprob",
        "mean_entropy",
        "copy_rate",
        "kind_overview",
        "kind_action_items",
        "kind_decisions",
        "kind_short",
    ];
    let missing: Vec<&str> = sc
        .features
        .iter()
        .map(String::as_str)
        .filter(|f| !RECORDED.contains(f))
        .collect();
    if !missing.is_empty() {
        return serde_json::json!({"unavailable": format!("the row does not record {}", missing.join(", "))});
    }
    let signals = recap_policy::score::Signals {
        kind: row["kind"].as_str().unwrap_or_default().to_string(),
        input_tokens: row["input_tokens"].as_u64().unwrap_or(0),
        output_tokens: row["output_tokens"].as_u64().unwrap_or(0) as u32,
        mean_logprob: row["mean_logprob"].as_f64(),
        mean_entropy: row["mean_entropy"].as_f64(),
        copy_rate: row["copy_rate"].as_f64().unwrap_or(0.0),
        ..Default::default()
    };
    serde_json::json!({
        "probability": sc.probability(&signals),
        "threshold": sc.threshold,
        "applies": sc.applies_to(&signals.kind),
        "escalates": sc.escalates(&signals),
        "terms": sc.terms(&signals),
    })
}

pub async fn budget(config: &Config, cmd: BudgetCommand) -> Result<()> {
    let pool = store::connect(config).await?;
    match cmd {
        BudgetCommand::Set {
            tenant,
            daily,
            monthly,
        } => {
            for (name, v) in [("--daily", daily), ("--monthly", monthly)] {
                if v.is_some_and(|v| v < 0.0 || !v.is_finite()) {
                    anyhow::bail!("{name} must be a non-negative amount of USD");
                }
            }
            store::set_budget(&pool, &tenant, daily, monthly).await?;
            println!("budget of {tenant}: daily {daily:?} USD, monthly {monthly:?} USD");
        }
        BudgetCommand::Show { tenant } => {
            let b = store::read_budget(&pool, &tenant, config.budgets.defaults()).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"tenant": tenant, "remaining": b})
                )?
            );
        }
    }
    Ok(())
}
