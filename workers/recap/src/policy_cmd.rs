//! `recap policy explain` and `recap budget set|show`: the policy's view of
//! a job and of a tenant's money, without running anything.

use crate::config::Config;
use crate::{engines, policy, router, store, summarize};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the decision for a job (job JSON, QMSum JSON or text) and its reasons, without running it.
    Explain {
        file: PathBuf,
        /// Tenant, for inputs that do not name one.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Decide without the tenant's budget (no database needed).
        #[arg(long)]
        no_budget: bool,
    },
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
    let PolicyCommand::Explain {
        file,
        tenant,
        no_budget,
    } = cmd;
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
        .tier_model("compact")
        .or(config.tier_model("large"))
        .unwrap_or("extractive-lead");
    let counter = engines::token_counter(compact, config)?;
    let features = router::features(&job, &counter);
    let budget = if no_budget {
        recap_policy::BudgetState::default()
    } else {
        let pool = store::connect(config)
            .await
            .context("reading the tenant's budget (or pass --no-budget)")?;
        store::read_budget(&pool, &job.tenant).await?
    };
    let decision = p.decide(&features, &policy::tiers(config), &budget);
    let out = serde_json::json!({
        "policy_version": p.version,
        "features": features,
        "budget": budget,
        "decision": match &decision {
            Ok(d) => serde_json::to_value(d)?,
            Err(e) => serde_json::json!({"refused": e.code(), "message": e.to_string()}),
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
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
            let b = store::read_budget(&pool, &tenant).await?;
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
