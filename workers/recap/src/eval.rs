//! `recap rouge` and `recap eval`: quality and cost, measured.
//!
//! `eval` runs every case through each model (loaded once), caches each
//! case's result (so an interrupted run resumes), scores them with ROUGE,
//! and adds the baselines: Lead-60, compact only, large only, the policy,
//! and an oracle. It writes results.md, results.json and frontier.svg.

use crate::calibrate::{self, CaseLine, Labels};
use crate::config::Config;
use crate::{engines, policy, router};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use recap_engine::{Cancel, SummarizeRequest, SummaryOutput};
use recap_eval::frontier::{self, Outcome};
use recap_eval::qmsum::{self, Case, Setting};
use recap_eval::report::{self, Row};
use recap_eval::rouge::Rouge;
use recap_eval::stats::{bootstrap_ci, mean, percentile};
use recap_policy::copying::Source;
use recap_policy::score::{self as rscore, Target};
use recap_policy::Tier;
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
    /// QMSum file (JSON or JSONL), or `jsonl:PATH`: a company's own
    /// references in the format `recap train --data jsonl:` reads
    /// (transcript, kind or query, target).
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
    /// The calibrated score's target: the best quality at no more than
    /// this share of large-only cost...
    #[arg(long, default_value_t = 0.4)]
    pub max_cost_share: f64,
    /// ...or the cheapest threshold reaching this share of large-only quality.
    #[arg(long)]
    pub target_quality: Option<f64>,
    #[command(flatten)]
    pub fit: calibrate::FitArgs,
    /// Reference labels: compact is enough where its ROUGE-L reaches this
    /// share of large's.
    #[arg(long, default_value_t = 1.0)]
    pub label_share: f64,
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
    /// The model's confidence (absent in caches written before it was kept).
    #[serde(default)]
    mean_logprob: Option<f64>,
    #[serde(default)]
    mean_entropy: Option<f64>,
    /// Written by a build that records confidence (None above then means
    /// the engine has none).
    #[serde(default)]
    has_confidence: bool,
}

fn load_cache(path: &PathBuf) -> HashMap<String, CaseRun> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<CaseRun>(l).ok())
        .map(|r| (r.id.clone(), r))
        .collect()
}

/// A company's references (the JSONL of `recap train --data jsonl:`) as
/// evaluation cases: the target is the reference.
fn references(text: &str, source: &str) -> Result<Vec<Case>> {
    Ok(recap_train::data::parse_jsonl(text, source)?
        .into_iter()
        .map(|ex| Case {
            id: ex.id,
            query: ex.query.unwrap_or_default(),
            kind: ex.kind,
            transcript: ex.transcript,
            reference: ex.target,
        })
        .collect())
}

/// One case's answer as `recap eval` asks for it (the query-focused
/// prompt); fine-tuning's validation pass asks the same way.
pub fn answer(engine: &dyn recap_engine::Summarizer, case: &Case) -> Result<SummaryOutput> {
    engine
        .summarize(&SummarizeRequest {
            transcript: &case.transcript,
            kinds: &[case.kind],
            language: Some("en"),
            query: case.query(),
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
    need_confidence: bool,
) -> Result<Vec<CaseRun>> {
    let cache_path = out.join(format!("cache-{model_id}.jsonl"));
    let mut cache = load_cache(&cache_path);
    // The compact model's confidence feeds the cascade: older cache lines
    // without it run again (the texts come out the same, greedy).
    if need_confidence {
        cache.retain(|_, r| r.has_confidence);
    }
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
                mean_logprob: o.confidence.mean_logprob(),
                mean_entropy: o.confidence.mean_entropy(),
                has_confidence: true,
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

/// Each case's transcript, ready for the copy rate of every row's output.
fn sources(cases: &[Case]) -> Vec<Source> {
    cases
        .iter()
        .map(|c| Source::new(&recap_engine::pipeline::mapreduce::lines(&c.transcript)))
        .collect()
}

fn score(rouge: &Rouge, cases: &[Case], sources: &[Source], texts: &[&str]) -> Scored {
    let mut s = Scored {
        r1: vec![],
        r2: vec![],
        rl: vec![],
        copied: vec![],
    };
    for ((c, source), t) in cases.iter().zip(sources).zip(texts) {
        let r = rouge.score(&c.reference, t);
        s.copied.push(source.rate(t));
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
    let cases = eval_cases(&args, setting)?;
    let models: Vec<String> = if args.models.is_empty() {
        [Tier::Compact, Tier::Large]
            .into_iter()
            .filter_map(|t| config.tier_model(t).map(str::to_string))
            .collect()
    } else {
        args.models.clone()
    };
    std::fs::create_dir_all(&args.out)?;
    let rouge = Rouge::new(true);
    let sources = sources(&cases);
    let mut rows = Vec::new();

    let lead = lead_runs(&cases);
    let lead_texts: Vec<&str> = lead.iter().map(|r| r.text.as_str()).collect();
    rows.push(row(
        "lead-60",
        &score(&rouge, &cases, &sources, &lead_texts),
        &lead.iter().collect::<Vec<_>>(),
        args.seed,
        String::new(),
    ));

    let mut runs: Vec<Vec<CaseRun>> = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let r = run_model(config, m, &cases, &args.out, i == 0)?;
        let texts: Vec<&str> = r.iter().map(|x| x.text.as_str()).collect();
        rows.push(row(
            m,
            &score(&rouge, &cases, &sources, &texts),
            &r.iter().collect::<Vec<_>>(),
            args.seed,
            String::new(),
        ));
        runs.push(r);
    }

    let mut frontier_json = serde_json::Value::Null;
    let mut curves = Vec::new();
    let mut extra_md = String::new();
    if runs.len() >= 2 {
        let routed = route(
            config, &args, &models, &cases, &sources, &runs[0], &runs[1], &rouge,
        )?;
        rows.extend(routed.rows);
        frontier_json = routed.json;
        curves = routed.curves;
        extra_md = routed.markdown;
    }

    let md = format!(
        "QMSum {} setting, {} cases (seed {}), ROUGE with the Porter stemmer; cost from the catalog's prices.\n\n{}",
        match setting { Setting::Span => "span", Setting::Whole => "whole" },
        cases.len(),
        args.seed,
        report::markdown(&rows)
    );
    let mut md = md;
    md.push_str(&extra_md);
    std::fs::write(args.out.join("results.md"), &md)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"cases": cases.len(), "seed": args.seed, "rows": rows, "frontier": frontier_json}),
        )?,
    )?;
    std::fs::write(
        args.out.join("frontier.svg"),
        report::svg_plot(&rows, &curves, "QMSum: ROUGE-L F1 against cost"),
    )?;
    println!("{md}");
    println!(
        "wrote {}/results.md, results.json, frontier.svg",
        args.out.display()
    );
    Ok(())
}

/// The seeded sample of QMSum cases (or of a company's own references,
/// `jsonl:PATH`) that the run evaluates.
fn eval_cases(args: &EvalArgs, setting: Setting) -> Result<Vec<Case>> {
    let spec = args.dataset.to_string_lossy().to_string();
    let (path, own) = match spec.strip_prefix("jsonl:") {
        Some(p) => (PathBuf::from(p), true),
        None => (args.dataset.clone(), false),
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let all = if own {
        references(&text, &path.display().to_string())?
    } else {
        qmsum::parse(&text, setting)?
    };
    let cases = qmsum::sample(all, args.limit, args.seed);
    if cases.is_empty() {
        bail!("{} has no cases for this setting", args.dataset.display());
    }
    Ok(cases)
}

/// Lead-60: the first 60 words of each transcript, the baseline row.
fn lead_runs(cases: &[Case]) -> Vec<CaseRun> {
    cases
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
                mean_logprob: None,
                mean_entropy: None,
                has_confidence: true,
            }
        })
        .collect()
}

/// The routers side by side, and what they add to the report.
struct Routed {
    rows: Vec<Row>,
    curves: Vec<report::Curve>,
    json: serde_json::Value,
    markdown: String,
}

/// A cascade's runs: compact's, or where it escalated, large's on top of
/// it (compact's cost and time included, since compact ran first).
fn cascade_runs(compact: &[CaseRun], large: &[CaseRun], escalate: &[bool]) -> Vec<CaseRun> {
    compact
        .iter()
        .zip(large)
        .zip(escalate)
        .map(|((c, l), &e)| {
            if e {
                let mut l = l.clone();
                l.cost_usd += c.cost_usd;
                l.latency_s += c.latency_s;
                l
            } else {
                c.clone()
            }
        })
        .collect()
}

/// Runs routed before inference: large's where `to_large`, else compact's.
fn routed_runs(compact: &[CaseRun], large: &[CaseRun], to_large: &[bool]) -> Vec<CaseRun> {
    compact
        .iter()
        .zip(large)
        .zip(to_large)
        .map(|((c, l), &t)| if t { l.clone() } else { c.clone() })
        .collect()
}

/// The most cases, taken in `order`, that a pre-routing router can send to
/// large without its total cost passing `budget`.
fn large_within(compact: &[CaseRun], large: &[CaseRun], order: &[usize], budget: f64) -> Vec<bool> {
    let mut to_large = vec![false; compact.len()];
    let mut cost: f64 = compact.iter().map(|r| r.cost_usd).sum();
    for &i in order {
        let next = cost - compact[i].cost_usd + large[i].cost_usd;
        if next > budget + 1e-15 {
            break;
        }
        cost = next;
        to_large[i] = true;
    }
    to_large
}

fn split(to_large: &[bool], cascade: bool) -> String {
    let n = to_large.iter().filter(|&&l| l).count();
    format!(
        "compact {} / {} {n}",
        to_large.len() - n,
        if cascade { "cascade" } else { "large" }
    )
}

/// What the routing rows are made from: the cases and both tiers' runs
/// over them, with each output's ROUGE-L and cost.
struct RouteInput<'a> {
    args: &'a EvalArgs,
    cases: &'a [Case],
    sources: &'a [Source],
    compact: &'a [CaseRun],
    large: &'a [CaseRun],
    rouge: &'a Rouge,
    qc: Vec<Outcome>,
    ql: Vec<Outcome>,
}

impl RouteInput<'_> {
    fn row(&self, name: &str, runs: &[CaseRun], split: String) -> Row {
        let texts: Vec<&str> = runs.iter().map(|x| x.text.as_str()).collect();
        row(
            name,
            &score(self.rouge, self.cases, self.sources, &texts),
            &runs.iter().collect::<Vec<_>>(),
            self.args.seed,
            split,
        )
    }

    fn large_cost(&self) -> f64 {
        self.ql.iter().map(|o| o.cost_usd).sum()
    }
}

#[allow(clippy::too_many_arguments)]
fn route(
    config: &Config,
    args: &EvalArgs,
    models: &[String],
    cases: &[Case],
    sources: &[Source],
    compact: &[CaseRun],
    large: &[CaseRun],
    rouge: &Rouge,
) -> Result<Routed> {
    let quality = |r: &[CaseRun]| -> Vec<Outcome> {
        r.iter()
            .zip(cases)
            .map(|(x, c)| Outcome {
                quality: rouge.score(&c.reference, &x.text).rouge_l.fmeasure,
                cost_usd: x.cost_usd,
            })
            .collect()
    };
    let input = RouteInput {
        args,
        cases,
        sources,
        compact,
        large,
        rouge,
        qc: quality(compact),
        ql: quality(large),
    };
    let (policy_row, lines, input_tokens) = the_policy_as_routed(config, models, &input)?;
    let mut rows = vec![policy_row];
    calibrate::write_lines(&args.out.join("cases.jsonl"), &lines)?;

    let target = match args.target_quality {
        Some(q) => Target::Quality(q),
        None => Target::Cost(args.max_cost_share),
    };
    let calibrated = calibrated_rows(&input, &lines, target);
    rows.extend(calibrated.rows);
    // Without a fitted score the other routers get the target's money.
    let budget = calibrated
        .cost_usd
        .unwrap_or(args.max_cost_share * input.large_cost());
    let (same_cost, random_mean) = same_cost_rows(&input, &input_tokens, budget);
    rows.extend(same_cost);

    let length_curve = frontier::threshold_curve(&input.qc, &input.ql, &input_tokens);
    let score_curve = held_out_score_curve(args, &lines);
    let curves = routing_curves(&score_curve, &length_curve);
    let large_q = mean(&input.ql.iter().map(|o| o.quality).collect::<Vec<_>>());
    let large_cost = input.large_cost();
    let mut md: String = calibrated
        .not_fitted
        .iter()
        .map(|l| format!("\n{l}.\n"))
        .collect();
    md += &format!(
        "\nThe random router's expected ROUGE-L at that cost, over 1,000 draws: {random_mean:.3}.\n\
         Calibration target: {target:?}; reference labels at {:.2} of large's ROUGE-L; features: {}.\n",
        args.label_share,
        args.fit.features().join(", ")
    );
    let (table, targets) = cost_to_reach(&length_curve, &score_curve, large_q, large_cost);
    md += &table;
    md.push_str(&where_large_wins(
        &input_tokens,
        &input.qc,
        &input.ql,
        &calibrated.escalated_by_reference,
    ));
    Ok(Routed {
        rows,
        curves,
        json: serde_json::json!({
            "large_only_rouge_l": large_q,
            "large_only_cost_usd": large_cost,
            "random_router_expected_rouge_l": random_mean,
            "targets": targets,
            "length_curve": length_curve,
            "score_curve": score_curve,
            "calibrated": calibrated.json,
        }),
        markdown: md,
    })
}

/// The policy, as the router would apply it (no budgets), with the cascade
/// judging compact output as the worker does: its row, each case's line
/// (signals and both tiers' quality) and each case's input tokens.
fn the_policy_as_routed(
    config: &Config,
    models: &[String],
    input: &RouteInput,
) -> Result<(Row, Vec<CaseLine>, Vec<f64>)> {
    let (args, cases, compact, large) = (input.args, input.cases, input.compact, input.large);
    let mut cfg = config.clone();
    for (tier, model) in [("compact", &models[0]), ("large", &models[1])] {
        cfg.tiers.insert(
            tier.into(),
            crate::config::TierConfig {
                model: model.clone(),
                batch_size: 1,
            },
        );
    }
    if let Some(p) = &args.policy {
        cfg.policy.file = Some(p.clone());
    }
    let pol = policy::load(&cfg)?;
    let counter = engines::token_counter(&models[0], &cfg)?;
    let tiers = policy::tiers(&cfg);
    let mut picked: Vec<CaseRun> = Vec::new();
    let (mut n_compact, mut n_large, mut n_cascade) = (0, 0, 0);
    let mut input_tokens = Vec::new();
    let mut lines = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let mut job = recap_job::Job::from_text("eval", "x", vec![c.kind]);
        job.transcript = c.transcript.clone();
        job.language = Some("en".into());
        job.job_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, c.id.as_bytes());
        let f = router::features(&job, &counter);
        input_tokens.push(f.input_tokens as f64);
        let r = &compact[i];
        let signals = policy::JobView::of(&job).signals(
            policy::Said {
                kind: c.kind.as_str(),
                text: &r.text,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                mean_logprob: r.mean_logprob,
                mean_entropy: r.mean_entropy,
            },
            c.query(),
        );
        let d = pol.decide(&f, &tiers, &recap_policy::BudgetState::default())?;
        if d.tier == recap_policy::Tier::Large {
            n_large += 1;
            picked.push(large[i].clone());
        } else if pol.rules.cascade
            // A query's answer need not name a speaker, as a summary must.
            && !pol
                .judge(
                    &r.text,
                    &if c.query().is_some() { vec![] } else { job.speakers() },
                    Some("en"),
                    &signals,
                )
                .is_empty()
        {
            n_cascade += 1;
            picked.extend(cascade_runs(&compact[i..=i], &large[i..=i], &[true]));
        } else {
            n_compact += 1;
            picked.push(r.clone());
        }
        lines.push(CaseLine {
            id: c.id.clone(),
            signals,
            compact_quality: input.qc[i].quality,
            large_quality: input.ql[i].quality,
            compact_cost: r.cost_usd,
            large_cost: large[i].cost_usd,
            agreement: input.rouge.score(&large[i].text, &r.text).rouge_l.fmeasure,
            compact_model: models[0].clone(),
        });
    }
    let row = input.row(
        &format!("policy {}", pol.version),
        &picked,
        format!("compact {n_compact} / large {n_large} / cascade {n_cascade}"),
    );
    Ok((row, lines, input_tokens))
}

/// The calibrated score's rows, each case judged by a fit that never saw it.
struct Calibrated {
    rows: Vec<Row>,
    json: Vec<serde_json::Value>,
    /// The reference-labelled fit's total cost, where it was fitted.
    cost_usd: Option<f64>,
    escalated_by_reference: Vec<bool>,
    /// Too few cases, or one label only, leaves the other rows standing.
    not_fitted: Vec<String>,
}

fn calibrated_rows(input: &RouteInput, lines: &[CaseLine], target: Target) -> Calibrated {
    let args = input.args;
    let features = args.fit.features();
    let folds = args.fit.folds.max(2);
    let mut out = Calibrated {
        rows: Vec::new(),
        json: Vec::new(),
        cost_usd: None,
        escalated_by_reference: Vec::new(),
        not_fitted: Vec::new(),
    };
    for (labels, name) in [
        (Labels::Reference, "calibrated score, reference labels"),
        (Labels::Agreement, "calibrated score, agreement labels"),
    ] {
        let (labelled, _) = calibrate::label(lines, labels, args.label_share, None);
        let escalate =
            match rscore::cross_validate(&features, &labelled, folds, target, args.fit.l2) {
                Ok(e) => e,
                Err(e) => {
                    out.not_fitted.push(format!("{name}: not fitted: {e}"));
                    continue;
                }
            };
        let runs = cascade_runs(input.compact, input.large, &escalate);
        let r = input.row(
            &format!("{name} ({folds}-fold held out)"),
            &runs,
            split(&escalate, true),
        );
        out.json
            .push(serde_json::json!({"labels": format!("{labels:?}"), "escalated": escalate}));
        if labels == Labels::Reference {
            out.cost_usd = Some(r.total_cost_usd);
            out.escalated_by_reference = escalate;
        }
        out.rows.push(r);
    }
    out
}

/// The length threshold used today, a random router and the oracle, given
/// `budget`; with the random router's expected ROUGE-L over many draws,
/// beside the one drawn.
fn same_cost_rows(input: &RouteInput, input_tokens: &[f64], budget: f64) -> (Vec<Row>, f64) {
    let (compact, large, n) = (input.compact, input.large, input.cases.len());
    let mut rows = Vec::new();
    let mut longest: Vec<usize> = (0..n).collect();
    longest.sort_by(|&a, &b| input_tokens[b].total_cmp(&input_tokens[a]));
    let by_length = large_within(compact, large, &longest, budget);
    rows.push(input.row(
        "length threshold, same cost",
        &routed_runs(compact, large, &by_length),
        split(&by_length, false),
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(input.args.seed);
    let mut shuffled: Vec<usize> = (0..n).collect();
    shuffled.shuffle(&mut rng);
    let at_random = large_within(compact, large, &shuffled, budget);
    rows.push(input.row(
        "random router, same cost",
        &routed_runs(compact, large, &at_random),
        split(&at_random, false),
    ));
    let random_mean = {
        let draws = 1000;
        let mut total = 0.0;
        for _ in 0..draws {
            shuffled.shuffle(&mut rng);
            let to_large = large_within(compact, large, &shuffled, budget);
            total += mean(
                &to_large
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| {
                        if l {
                            input.ql[i].quality
                        } else {
                            input.qc[i].quality
                        }
                    })
                    .collect::<Vec<_>>(),
            );
        }
        total / draws as f64
    };
    let (_, picks) = frontier::oracle(&input.qc, &input.ql);
    rows.push(input.row(
        "oracle (better of the two per case)",
        &routed_runs(compact, large, &picks),
        split(&picks, false),
    ));
    (rows, random_mean)
}

/// The held-out score's cascade curve; empty where it cannot be fitted.
fn held_out_score_curve(args: &EvalArgs, lines: &[CaseLine]) -> Vec<rscore::FrontierPoint> {
    let (labelled, _) = calibrate::label(lines, Labels::Reference, args.label_share, None);
    match rscore::out_of_fold_probabilities(
        &args.fit.features(),
        &labelled,
        args.fit.folds.max(2),
        args.fit.l2,
    ) {
        Ok(p) => {
            let outcomes: Vec<rscore::Outcomes> = labelled.iter().map(|c| c.outcomes).collect();
            rscore::frontier(&p, &outcomes)
        }
        Err(_) => Vec::new(),
    }
}

/// Quality against cost: the held-out score's cascade (where fitted) and
/// the length threshold.
fn routing_curves(
    score_curve: &[rscore::FrontierPoint],
    length_curve: &[frontier::Point],
) -> Vec<report::Curve> {
    let mut curves = Vec::new();
    if !score_curve.is_empty() {
        curves.push(report::Curve {
            name: "calibrated score (held out)".into(),
            points: score_curve
                .iter()
                .map(|p| (p.total_cost, p.mean_quality))
                .collect(),
        });
    }
    curves.push(report::Curve {
        name: "length threshold".into(),
        points: length_curve
            .iter()
            .map(|p| (p.total_cost_usd, p.mean_quality))
            .collect(),
    });
    curves
}

/// The cost to reach shares of large-only ROUGE-L, by the length threshold
/// and by the held-out score: a markdown table and its JSON.
fn cost_to_reach(
    length_curve: &[frontier::Point],
    score_curve: &[rscore::FrontierPoint],
    large_q: f64,
    large_cost: f64,
) -> (String, Vec<serde_json::Value>) {
    let mut md = format!(
        "\nCost to reach a share of large-only ROUGE-L (ROUGE-L {large_q:.3}, cost ${large_cost:.6}):\n\n\
         | share | length threshold: cost share | large calls | calibrated score (held out): cost share | escalated |\n|---|---|---|---|---|\n"
    );
    let mut targets = Vec::new();
    for share in [0.8, 0.9, 0.95, 1.0, 1.05] {
        let by_len = frontier::cost_to_reach(length_curve, share * large_q);
        let by_score = rscore::pick(score_curve, Target::Quality(share))
            .filter(|p| p.quality_share >= share - 1e-12);
        let cell = |v: Option<f64>| v.map_or("not reached".to_string(), |v| format!("{v:.3}"));
        md.push_str(&format!(
            "| {:.0}% | {} | {} | {} | {} |\n",
            share * 100.0,
            cell(by_len.map(|p| p.total_cost_usd / large_cost.max(1e-12))),
            by_len.map_or("-".into(), |p| p.large_calls.to_string()),
            cell(by_score.map(|p| p.cost_share)),
            by_score.map_or("-".into(), |p| p.escalated.to_string()),
        ));
        targets.push(serde_json::json!({
            "share_of_large_quality": share,
            "length_threshold_cost_share": by_len.map(|p| p.total_cost_usd / large_cost.max(1e-12)),
            "calibrated_score_cost_share": by_score.map(|p| p.cost_share),
        }));
    }
    (md, targets)
}

/// Where large still beats compact, by transcript length (thirds of the
/// cases), and whether the calibrated cascade sends those cases there.
fn where_large_wins(
    input_tokens: &[f64],
    qc: &[Outcome],
    ql: &[Outcome],
    escalated: &[bool],
) -> String {
    let n = input_tokens.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| input_tokens[a].total_cmp(&input_tokens[b]));
    let mut md = String::from(
        "\nWhere large still wins (thirds by transcript length; gain = large minus compact ROUGE-L):\n\n\
         | transcript tokens | cases | compact | large | large better on | escalated | gain on escalated | gain on kept |\n|---|---|---|---|---|---|---|---|\n",
    );
    for third in 0..3 {
        let part = &order[third * n / 3..(third + 1) * n / 3];
        if part.is_empty() {
            continue;
        }
        let avg = |f: &dyn Fn(usize) -> f64, ids: &[usize]| {
            if ids.is_empty() {
                f64::NAN
            } else {
                ids.iter().map(|&i| f(i)).sum::<f64>() / ids.len() as f64
            }
        };
        let gain = |i: usize| ql[i].quality - qc[i].quality;
        let (esc, kept): (Vec<usize>, Vec<usize>) =
            part.iter().partition(|&&i| escalated.get(i) == Some(&true));
        let signed = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:+.3}")
            }
        };
        md.push_str(&format!(
            "| {:.0}-{:.0} | {} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
            input_tokens[part[0]],
            input_tokens[part[part.len() - 1]],
            part.len(),
            avg(&|i| qc[i].quality, part),
            avg(&|i| ql[i].quality, part),
            part.iter().filter(|&&i| gain(i) > 0.0).count(),
            esc.len(),
            signed(avg(&gain, &esc)),
            signed(avg(&gain, &kept)),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: usize, cost: f64) -> CaseRun {
        CaseRun {
            id: id.to_string(),
            text: format!("text {id}"),
            input_tokens: 10,
            output_tokens: 5,
            latency_s: 1.0,
            cost_usd: cost,
            mean_logprob: None,
            mean_entropy: None,
            has_confidence: true,
        }
    }

    #[test]
    fn a_budget_buys_large_calls_in_order_and_a_cascade_pays_both() {
        let compact: Vec<CaseRun> = (0..4).map(|i| run(i, 1.0)).collect();
        let large: Vec<CaseRun> = (0..4).map(|i| run(i, 4.0)).collect();
        // 4 compact = 4.0; each large call adds 3.0.
        assert_eq!(
            large_within(&compact, &large, &[2, 0, 1, 3], 10.0),
            [true, false, true, false]
        );
        assert_eq!(
            large_within(&compact, &large, &[2, 0, 1, 3], 3.9),
            [false; 4]
        );
        assert_eq!(
            large_within(&compact, &large, &[3, 2, 1, 0], 16.0),
            [true; 4]
        );
        let c = cascade_runs(&compact, &large, &[false, true, false, false]);
        assert_eq!(c[1].cost_usd, 5.0);
        assert_eq!(c[1].latency_s, 2.0);
        assert_eq!(c[0].cost_usd, 1.0);
        let r = routed_runs(&compact, &large, &[false, true, false, false]);
        assert_eq!(r[1].cost_usd, 4.0);
        assert_eq!(split(&[false, true, true], true), "compact 1 / cascade 2");
    }
}
