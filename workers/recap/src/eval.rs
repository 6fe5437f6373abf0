//! `recap rouge` and `recap eval`: quality and cost, measured.
//!
//! `eval` runs every case through each model (loaded once), caches each
//! case's result (so an interrupted run resumes), scores them with ROUGE,
//! and adds the baselines: Lead-60, compact only, large only, the policy,
//! and an oracle. It writes results.md, results.json and frontier.svg.

use crate::config::Config;
use crate::{engines, policy, router};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use recap_engine::{Cancel, SummarizeRequest, SummaryOutput};
use recap_eval::frontier::{self, Outcome};
use recap_eval::qmsum::{self, Case, Setting};
use recap_eval::report::{self, Row};
use recap_eval::rouge::Rouge;
use recap_eval::stats::{bootstrap_ci, mean, percentile};
use recap_job::SummaryKind;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct RougeArgs {
    #[arg(long)]
    pub reference: PathBuf,
    #[arg(long)]
    pub candidate: PathBuf,
    /// Porter-stem words first, as rouge-score's use_stemmer=True.
    #[arg(long)]
    pub stemmer: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn rouge(args: RougeArgs) -> Result<()> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let s = Rouge::new(args.stemmer).score(&read(&args.reference)?, &read(&args.candidate)?);
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        for (name, p) in [
            ("rouge1", s.rouge1),
            ("rouge2", s.rouge2),
            ("rougeL", s.rouge_l),
            ("rougeLsum", s.rouge_lsum),
        ] {
            println!(
                "{name:<10} P {:.4}  R {:.4}  F1 {:.4}",
                p.precision, p.recall, p.fmeasure
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// QMSum file (JSON or JSONL).
    #[arg(long)]
    pub dataset: PathBuf,
    #[arg(long, value_enum, default_value = "span")]
    pub setting: SettingArg,
    /// Catalog ids, comma-separated; the first is the compact model, the
    /// second the large one (default: the tiers' models).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Policy file to evaluate (default: the configured policy).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// A seeded sample of this many cases.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "out/eval")]
    pub out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SettingArg {
    Span,
    Whole,
}

/// One case as run by one model: what the cache holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaseRun {
    id: String,
    text: String,
    input_tokens: u32,
    output_tokens: u32,
    latency_s: f64,
    cost_usd: f64,
}

fn load_cache(path: &PathBuf) -> HashMap<String, CaseRun> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<CaseRun>(l).ok())
        .map(|r| (r.id.clone(), r))
        .collect()
}

/// One case's answer as `recap eval` asks for it (the query-focused
/// prompt); fine-tuning's validation pass asks the same way.
pub fn answer(engine: &dyn recap_engine::Summarizer, case: &Case) -> Result<SummaryOutput> {
    engine
        .summarize(&SummarizeRequest {
            transcript: &case.transcript,
            kinds: &[SummaryKind::Overview],
            language: Some("en"),
            query: Some(&case.query),
            deadline: None,
            cancel: Cancel::default(),
        })?
        .into_iter()
        .next()
        .context("engine returned no summary")
}

fn run_model(
    config: &Config,
    model_id: &str,
    cases: &[Case],
    out: &std::path::Path,
) -> Result<Vec<CaseRun>> {
    let cache_path = out.join(format!("cache-{model_id}.jsonl"));
    let mut cache = load_cache(&cache_path);
    let todo = cases.iter().filter(|c| !cache.contains_key(&c.id)).count();
    eprintln!("{model_id}: {} cached, {todo} to run", cases.len() - todo);
    if todo > 0 {
        let (engine, price) = engines::load(model_id, config)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cache_path)?;
        let bar = ProgressBar::new(todo as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(model_id.to_string());
        let pending: Vec<&Case> = cases
            .iter()
            .filter(|c| !cache.contains_key(&c.id))
            .collect();
        for case in pending {
            let started = Instant::now();
            let o = answer(engine.as_ref(), case)?;
            let run = CaseRun {
                id: case.id.clone(),
                cost_usd: price.cost(o.input_tokens as u64, o.output_tokens as u64),
                text: o.text,
                input_tokens: o.input_tokens,
                output_tokens: o.output_tokens,
                latency_s: started.elapsed().as_secs_f64(),
            };
            writeln!(file, "{}", serde_json::to_string(&run)?)?;
            file.flush()?;
            cache.insert(run.id.clone(), run);
            bar.inc(1);
        }
        bar.finish();
    }
    cases
        .iter()
        .map(|c| {
            cache
                .get(&c.id)
                .cloned()
                .context("a case is missing from the cache")
        })
        .collect()
}

struct Scored {
    r1: Vec<f64>,
    r2: Vec<f64>,
    rl: Vec<f64>,
    copied: Vec<f64>,
}

fn score(rouge: &Rouge, cases: &[Case], texts: &[&str]) -> Scored {
    let mut s = Scored {
        r1: vec![],
        r2: vec![],
        rl: vec![],
        copied: vec![],
    };
    for (c, t) in cases.iter().zip(texts) {
        let r = rouge.score(&c.reference, t);
        s.copied.push(recap_eval::copying::copy_rate(
            t,
            &recap_engine::mapreduce::lines(&c.transcript),
        ));
        s.r1.push(r.rouge1.fmeasure);
        s.r2.push(r.rouge2.fmeasure);
        s.rl.push(r.rouge_l.fmeasure);
    }
    s
}

fn row(name: &str, s: &Scored, runs: &[&CaseRun], seed: u64, split: String) -> Row {
    let lat: Vec<f64> = runs.iter().map(|r| r.latency_s).collect();
    Row {
        name: name.to_string(),
        cases: s.rl.len(),
        rouge1: bootstrap_ci(&s.r1, 1000, seed),
        rouge2: bootstrap_ci(&s.r2, 1000, seed),
        rouge_l: bootstrap_ci(&s.rl, 1000, seed),
        mean_input_tokens: mean(
            &runs
                .iter()
                .map(|r| r.input_tokens as f64)
                .collect::<Vec<_>>(),
        ),
        mean_output_tokens: mean(
            &runs
                .iter()
                .map(|r| r.output_tokens as f64)
                .collect::<Vec<_>>(),
        ),
        p50_latency_s: percentile(&lat, 50.0),
        p95_latency_s: percentile(&lat, 95.0),
        total_cost_usd: runs.iter().map(|r| r.cost_usd).sum(),
        route_split: split,
        copy_rate: mean(&s.copied),
    }
}

pub fn eval(config: &Config, args: EvalArgs) -> Result<()> {
    let setting = match args.setting {
        SettingArg::Span => Setting::Span,
        SettingArg::Whole => Setting::Whole,
    };
    let text = std::fs::read_to_string(&args.dataset)
        .with_context(|| format!("reading {}", args.dataset.display()))?;
    let cases = qmsum::sample(qmsum::parse(&text, setting)?, args.limit, args.seed);
    if cases.is_empty() {
        bail!("{} has no cases for this setting", args.dataset.display());
    }
    let models: Vec<String> = if args.models.is_empty() {
        ["compact", "large"]
            .iter()
            .filter_map(|t| config.tier_model(t).map(str::to_string))
            .collect()
    } else {
        args.models.clone()
    };
    std::fs::create_dir_all(&args.out)?;
    let rouge = Rouge::new(true);
    let mut rows = Vec::new();

    // Lead-60: the first 60 words of the transcript.
    let lead: Vec<CaseRun> = cases
        .iter()
        .map(|c| {
            let text = qmsum::lead_words(&c.transcript, 60);
            CaseRun {
                id: c.id.clone(),
                input_tokens: 0,
                output_tokens: text.split_whitespace().count() as u32,
                text,
                latency_s: 0.0,
                cost_usd: 0.0,
            }
        })
        .collect();
    let lead_texts: Vec<&str> = lead.iter().map(|r| r.text.as_str()).collect();
    rows.push(row(
        "lead-60",
        &score(&rouge, &cases, &lead_texts),
        &lead.iter().collect::<Vec<_>>(),
        args.seed,
        String::new(),
    ));

    let mut runs: Vec<Vec<CaseRun>> = Vec::new();
    for m in &models {
        let r = run_model(config, m, &cases, &args.out)?;
        let texts: Vec<&str> = r.iter().map(|x| x.text.as_str()).collect();
        rows.push(row(
            m,
            &score(&rouge, &cases, &texts),
            &r.iter().collect::<Vec<_>>(),
            args.seed,
            String::new(),
        ));
        runs.push(r);
    }

    let mut frontier_json = serde_json::Value::Null;
    if runs.len() >= 2 {
        let (compact, large) = (&runs[0], &runs[1]);
        let q = |r: &[CaseRun]| -> Vec<Outcome> {
            r.iter()
                .zip(&cases)
                .map(|(x, c)| Outcome {
                    quality: rouge.score(&c.reference, &x.text).rouge_l.fmeasure,
                    cost_usd: x.cost_usd,
                })
                .collect()
        };
        let (qc, ql) = (q(compact), q(large));
        // The policy, as the router would apply it (no budgets), with the
        // cascade judged on the compact output.
        let mut cfg = config.clone();
        cfg.tiers.insert(
            "compact".into(),
            crate::config::TierConfig {
                model: models[0].clone(),
                batch_size: 1,
            },
        );
        cfg.tiers.insert(
            "large".into(),
            crate::config::TierConfig {
                model: models[1].clone(),
                batch_size: 1,
            },
        );
        if let Some(p) = &args.policy {
            cfg.policy.file = Some(p.clone());
        }
        let pol = policy::load(&cfg)?;
        let counter = engines::token_counter(&models[0], &cfg)?;
        let tiers = policy::tiers(&cfg);
        let mut picked: Vec<CaseRun> = Vec::new();
        let (mut n_compact, mut n_large, mut n_cascade) = (0, 0, 0);
        let mut signal = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            let mut job = recap_job::Job::from_text("eval", "x", vec![SummaryKind::Overview]);
            job.transcript = c.transcript.clone();
            job.job_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, c.id.as_bytes());
            let f = router::features(&job, &counter);
            signal.push(f.input_tokens as f64);
            let d = pol.decide(&f, &tiers, &recap_policy::BudgetState::default())?;
            let mut run = if d.tier == recap_policy::Tier::Large {
                n_large += 1;
                large[i].clone()
            } else {
                compact[i].clone()
            };
            if d.tier == recap_policy::Tier::Compact && pol.rules.cascade {
                let speakers = job.speakers();
                if !recap_policy::cascade::check(
                    &run.text,
                    "overview",
                    &speakers,
                    Some("en"),
                    &pol.cascade,
                )
                .is_empty()
                {
                    n_cascade += 1;
                    let mut l = large[i].clone();
                    l.cost_usd += run.cost_usd;
                    l.latency_s += run.latency_s;
                    run = l;
                } else {
                    n_compact += 1;
                }
            }
            picked.push(run);
        }
        let texts: Vec<&str> = picked.iter().map(|x| x.text.as_str()).collect();
        rows.push(row(
            &format!("policy {}", pol.version),
            &score(&rouge, &cases, &texts),
            &picked.iter().collect::<Vec<_>>(),
            args.seed,
            format!("compact {n_compact} / large {n_large} / cascade {n_cascade}"),
        ));
        let (_, picks) = frontier::oracle(&qc, &ql);
        let oracle_runs: Vec<&CaseRun> = picks
            .iter()
            .enumerate()
            .map(|(i, &l)| if l { &large[i] } else { &compact[i] })
            .collect();
        let texts: Vec<&str> = oracle_runs.iter().map(|x| x.text.as_str()).collect();
        let n_large_oracle = picks.iter().filter(|&&p| p).count();
        rows.push(row(
            "oracle (better of the two per case)",
            &score(&rouge, &cases, &texts),
            &oracle_runs,
            args.seed,
            format!(
                "compact {} / large {n_large_oracle}",
                picks.len() - n_large_oracle
            ),
        ));
        let curve = frontier::threshold_curve(&qc, &ql, &signal);
        let large_q = mean(&ql.iter().map(|o| o.quality).collect::<Vec<_>>());
        let large_cost: f64 = ql.iter().map(|o| o.cost_usd).sum();
        let targets: Vec<serde_json::Value> = [0.8, 0.9, 0.95]
            .iter()
            .map(|&share| {
                let p = frontier::cost_to_reach(&curve, share * large_q);
                serde_json::json!({
                    "share_of_large_quality": share,
                    "cost_usd": p.map(|p| p.total_cost_usd),
                    "share_of_large_cost": p.map(|p| p.total_cost_usd / large_cost.max(1e-12)),
                    "large_calls": p.map(|p| p.large_calls),
                })
            })
            .collect();
        frontier_json = serde_json::json!({"signal": "input_tokens", "large_only_rouge_l": large_q, "large_only_cost_usd": large_cost, "targets": targets, "curve": curve});
    }

    let md = format!(
        "QMSum {} setting, {} cases (seed {}), ROUGE with the Porter stemmer; cost from the catalog's prices.\n\n{}",
        match setting { Setting::Span => "span", Setting::Whole => "whole" },
        cases.len(),
        args.seed,
        report::markdown(&rows)
    );
    let mut md = md;
    if let Some(t) = frontier_json.get("targets").and_then(|t| t.as_array()) {
        md.push_str("\nCost to reach a share of large-only ROUGE-L (threshold router on input length):\n\n| share | cost USD | share of large-only cost | large calls |\n|---|---|---|---|\n");
        for x in t {
            let f = |k: &str| {
                x[k].as_f64()
                    .map(|v| format!("{v:.6}"))
                    .unwrap_or_else(|| "not reached".into())
            };
            md.push_str(&format!(
                "| {:.0}% | {} | {} | {} |\n",
                x["share_of_large_quality"].as_f64().unwrap_or(0.0) * 100.0,
                f("cost_usd"),
                f("share_of_large_cost"),
                x["large_calls"]
            ));
        }
    }
    std::fs::write(args.out.join("results.md"), &md)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"cases": cases.len(), "seed": args.seed, "rows": rows, "frontier": frontier_json}),
        )?,
    )?;
    std::fs::write(
        args.out.join("frontier.svg"),
        report::svg_plot(&rows, "QMSum: ROUGE-L F1 against cost"),
    )?;
    println!("{md}");
    println!(
        "wrote {}/results.md, results.json, frontier.svg",
        args.out.display()
    );
    Ok(())
}
