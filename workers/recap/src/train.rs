//! `recap train`: LoRA fine-tuning of a catalog GGUF decoder on QMSum, a
//! company's JSONL of summaries, or both (`recap-train` does the work;
//! this is the IO around it: files, the catalog, the validation pass).

use crate::config::Config;
use crate::engines;
use anyhow::{bail, Context, Result};
use recap_engine::models::adapter::Target;
use recap_engine::models::llm::{AdapterOptions, GgufModel, GgufOptions};
use recap_eval::qmsum::{self, Setting};
use recap_eval::rouge::Rouge;
use recap_eval::stats::mean;
use recap_policy::copying::copy_rate;
use recap_policy::Tier;
use recap_train::data::{self, Example};
use recap_train::model::{LoraSpec, TrainModel};
use recap_train::optim::Decay;
use recap_train::trainer::{
    self, DataSource, RunPaths, StartingAdapter, Tokenized, TrainConfig, ValScores,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Catalog id of the base GGUF (llama or qwen2 family; default: the
    /// compact tier's model).
    #[arg(long)]
    pub model: Option<String>,
    /// Training data, repeatable: `qmsum:PATH` (QMSum's train split),
    /// `jsonl:PATH` (README: transcript, kind or query, target), or
    /// `shadow` / `shadow:TENANT` (the large tier's shadow summaries in
    /// PostgreSQL, each with its job's transcript).
    #[arg(long, required = true)]
    pub data: Vec<String>,
    /// Output directory: adapter/, checkpoints/, epoch-N/, train.json, loss.svg.
    #[arg(long, default_value = "out/train")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f64,
    /// Projections to adapt: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    /// Layers to adapt (PEFT's layers_to_transform), e.g. 20-29 or 0,5,9; all by default.
    #[arg(long)]
    pub layers: Option<String>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 10)]
    pub warmup_steps: usize,
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: ScheduleArg,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Longest example (prompt + summary) in tokens; longer ones are
    /// skipped and counted.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// A seeded subset of this many examples.
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Leave out examples whose target copies more than this share of its
    /// sentences from the transcript (recap's copy rate: 8+ words verbatim),
    /// so that the model learns to summarize rather than copy; counted.
    #[arg(long, value_parser = share)]
    pub max_target_copy: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Optimizer steps between checkpoints (each epoch's end writes one too).
    #[arg(long, default_value_t = 20)]
    pub checkpoint_every: usize,
    /// Start from this trained adapter (a PEFT directory for the same base,
    /// with the same rank, alpha, targets and layers) instead of fresh weights.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Continue from the latest checkpoint in --out (same config only).
    #[arg(long)]
    pub resume: bool,
    /// Stop (checkpointed) after this many optimizer steps; --resume goes on.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// QMSum file for the validation pass after each epoch (span setting).
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Seeded val cases scored after each epoch.
    #[arg(long, default_value_t = 8)]
    pub val_cases: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ScheduleArg {
    Cosine,
    Linear,
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{text}` is not a share in [0, 1]")),
    }
}

fn parse_layers(spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim()
                        .parse()
                        .with_context(|| format!("--layers: `{part}`"))?,
                    b.trim()
                        .parse()
                        .with_context(|| format!("--layers: `{part}`"))?,
                );
                if a > b {
                    bail!("--layers: `{part}` runs backwards");
                }
                out.extend(a..=b);
            }
            None => out.push(
                part.parse()
                    .with_context(|| format!("--layers: `{part}`"))?,
            ),
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("--layers: no layer in `{spec}`");
    }
    Ok(out)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads every `--data` source: its examples, and its record (sha256).
async fn read_data(config: &Config, specs: &[String]) -> Result<(Vec<Example>, Vec<DataSource>)> {
    let mut all = Vec::new();
    let mut sources = Vec::new();
    for spec in specs {
        let (kind, arg) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
        let (examples, sha256) = match kind {
            "shadow" => {
                let tenant = (!arg.is_empty()).then_some(arg);
                let pool = crate::store::connect(config).await?;
                let rows = crate::store::shadow_examples(&pool, tenant).await?;
                let examples = shadow_to_examples(rows)?;
                if examples.is_empty() {
                    bail!("--data {spec}: no shadow summaries with transcripts in the database; run jobs with shadow sampling on (policy.toml [shadow] rate)");
                }
                let mut h = Sha256::new();
                for e in &examples {
                    h.update(e.id.as_bytes());
                    h.update(e.target.as_bytes());
                }
                (examples, hex::encode(h.finalize()))
            }
            "qmsum" | "jsonl" if !arg.is_empty() => {
                let text = std::fs::read_to_string(arg)
                    .with_context(|| format!("--data: reading {arg}"))?;
                let examples = if kind == "qmsum" {
                    data::parse_qmsum(&text, arg)?
                } else {
                    data::parse_jsonl(&text, arg)?
                };
                (examples, sha256_hex(text.as_bytes()))
            }
            _ => bail!("--data `{spec}`: expected qmsum:PATH, jsonl:PATH or shadow[:TENANT]"),
        };
        sources.push(DataSource {
            spec: spec.clone(),
            sha256,
            examples: examples.len(),
        });
        all.extend(examples);
    }
    Ok((all, sources))
}

/// Shadow summaries as examples: the job's transcript, the summary's kind,
/// the large tier's text as the target.
fn shadow_to_examples(rows: Vec<crate::store::ShadowExample>) -> Result<Vec<Example>> {
    rows.into_iter()
        .map(|r| {
            let kind = recap_job::SummaryKind::parse(&r.kind).with_context(|| {
                format!(
                    "shadow summary of job {}: unknown kind `{}`",
                    r.job_id, r.kind
                )
            })?;
            Ok(Example {
                id: format!("shadow-{}-{}", r.job_id, r.kind),
                transcript: r.transcript.0,
                kind,
                query: None,
                language: r.language,
                target: r.text,
            })
        })
        .filter(|e: &Result<Example>| e.as_ref().map_or(true, |e| !e.target.trim().is_empty()))
        .collect()
}

/// Each example as the worker would see it, or the reason it is skipped.
pub fn tokenize(
    model: &GgufModel,
    examples: &[Example],
    max_seq_len: usize,
    max_target_copy: Option<f64>,
) -> Result<(Vec<Tokenized>, BTreeMap<String, usize>)> {
    let mut items = Vec::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    for ex in examples {
        if let Some(most) = max_target_copy {
            let copied = copy_rate(
                &ex.target,
                &recap_engine::pipeline::mapreduce::lines(&ex.transcript),
            );
            if copied > most {
                *skipped
                    .entry(format!("target copies over --max-target-copy {most}"))
                    .or_default() += 1;
                continue;
            }
        }
        let prompt = model.single_call_prompt(
            &ex.transcript,
            ex.kind,
            ex.query.as_deref(),
            ex.language.as_deref(),
        )?;
        let Some(mut ids) = prompt else {
            *skipped
                .entry("needs map-reduce (longer than models.max_context)".into())
                .or_default() += 1;
            continue;
        };
        let target = model.target_ids(&ex.target)?;
        if ids.len() + target.len() > max_seq_len {
            *skipped
                .entry(format!("longer than --max-seq-len {max_seq_len}"))
                .or_default() += 1;
            continue;
        }
        let target_start = ids.len();
        ids.extend(target);
        items.push(Tokenized {
            id: ex.id.clone(),
            ids,
            target_start,
        });
    }
    Ok((items, skipped))
}

/// Puts `--init-adapter`'s weights on the model, after the checks that
/// serving makes (base sha256, prompt order, shapes) and the run's own
/// (rank, scale, adapted projections).
fn start_from(
    model: &TrainModel,
    dir: &Path,
    config: &TrainConfig,
    base_path: &Path,
) -> Result<StartingAdapter> {
    let context = || format!("--init-adapter {}", dir.display());
    let adapter =
        recap_engine::models::adapter::Adapter::load(dir, &model.layout).with_context(context)?;
    adapter
        .check_base(
            dir,
            &base_path.display().to_string(),
            &config.prompt_order,
            || Ok(config.base_sha256.clone()),
        )
        .map_err(anyhow::Error::msg)
        .with_context(context)?;
    model.start_from(&adapter).with_context(context)?;
    let weights = dir.join(recap_engine::models::adapter::WEIGHTS_FILE);
    Ok(StartingAdapter {
        dir: dir.display().to_string(),
        sha256: recap_engine::models::llm::sha256_file(&weights).with_context(context)?,
    })
}

/// A training step allocates and frees large buffers: the GEMM's packed
/// operands (megabytes, on every product) and, in the autograd passes, the
/// activations. Memory the heap returns to the kernel, or maps afresh, is
/// faulted in and zeroed again on its next use. So the heap keeps what it
/// frees (no trimming), and buffers up to glibc's largest mmap threshold
/// (32 MiB) come from the heap; setting either turns off glibc's dynamic
/// threshold, which would otherwise stay at 128 KiB (mallopt(3)).
pub fn keep_the_heap() {
    // SAFETY: mallopt only changes allocator tunables.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// The base model a run trains: a catalog GGUF of a dense-decoder family,
/// without an adapter, with its file and that file's sha256.
struct Base {
    model_id: String,
    entry: recap_engine::catalog::ModelEntry,
    path: PathBuf,
    sha256: String,
}

/// `model`, or the compact tier's model, checked as a base to train.
fn trainable_base(config: &Config, model: Option<&str>) -> Result<Base> {
    let catalog = config.catalog()?;
    let model_id = match model {
        Some(m) => m.to_string(),
        None => config
            .tier_model(Tier::Compact)
            .context("no compact tier model configured")?
            .to_string(),
    };
    let entry = catalog.get(&model_id)?.clone();
    let dense =
        recap_engine::catalog::Family::named(&entry.family).is_some_and(|f| f.dense.is_some());
    if entry.format != "gguf" || !dense {
        bail!("{model_id}: fine-tuning takes llama- and qwen2-family GGUF models");
    }
    if entry.adapter.is_some() {
        bail!(
            "{model_id} already carries an adapter: train on its base `{}`",
            entry.base.as_deref().unwrap_or("?")
        );
    }
    let file = entry
        .file
        .as_deref()
        .context("catalog entry without a file")?;
    let path = config.models_dir().join(file);
    let sha256 = match &entry.sha256 {
        Some(s) => s.clone(),
        None => recap_engine::models::llm::sha256_file(&path)
            .with_context(|| format!("{}: run `recap models fetch {model_id}`", path.display()))?,
    };
    Ok(Base {
        model_id,
        entry,
        path,
        sha256,
    })
}

/// `n` of `examples`, drawn by `seed`, in their order.
fn seeded_sample(examples: Vec<Example>, n: usize, seed: u64) -> Vec<Example> {
    let order = trainer::epoch_order(examples.len(), seed, usize::MAX);
    let mut keep: Vec<usize> = order.into_iter().take(n).collect();
    keep.sort_unstable();
    keep.into_iter().map(|i| examples[i].clone()).collect()
}

/// The LoRA of `--rank`, `--alpha`, `--dropout`, `--targets` and `--layers`.
fn lora_spec(args: &TrainArgs) -> Result<LoraSpec> {
    let targets = args
        .targets
        .iter()
        .map(|t| {
            Target::parse(t.trim()).with_context(|| {
                format!("--targets: `{t}` is none of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = LoraSpec {
        r: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        targets,
        layers: args.layers.as_deref().map(parse_layers).transpose()?,
    };
    if !(0.0..1.0).contains(&args.dropout) {
        bail!("--dropout must be in [0, 1)");
    }
    Ok(spec)
}

/// The run's record of what it trains, on what and how (`train.json`,
/// and what a resumed run must match).
fn train_config(
    args: &TrainArgs,
    base_model: &str,
    base_sha256: &str,
    transcript_first: bool,
    lora: LoraSpec,
    data: Vec<DataSource>,
) -> TrainConfig {
    TrainConfig {
        base_model: base_model.to_string(),
        base_sha256: base_sha256.to_string(),
        prompt_order: if transcript_first {
            "transcript_first".into()
        } else {
            "task_first".into()
        },
        lora,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        decay: match args.schedule {
            ScheduleArg::Cosine => Decay::Cosine,
            ScheduleArg::Linear => Decay::Linear,
        },
        epochs: args.epochs,
        grad_accum: args.grad_accum,
        max_grad_norm: args.max_grad_norm,
        weight_decay: args.weight_decay,
        max_seq_len: args.max_seq_len,
        seed: args.seed,
        data,
        max_examples: args.max_examples,
        max_target_copy: args.max_target_copy,
        init_adapter: None,
    }
}

/// Each epoch's adapter scored on QMSum val cases: ROUGE and copy rate.
struct Validation {
    cases: Vec<qmsum::Case>,
    opts: GgufOptions,
    path: PathBuf,
    rouge: Rouge,
}

impl Validation {
    fn score(&self, dir: &Path, epoch: usize) -> std::result::Result<ValScores, String> {
        if self.cases.is_empty() {
            return Ok(ValScores::none(epoch));
        }
        let mut o = self.opts.clone();
        o.adapter = Some(AdapterOptions {
            dir: dir.to_path_buf(),
            sha256: None,
            merge: false,
        });
        let tuned = GgufModel::load(&self.path, &o).map_err(|e| e.to_string())?;
        let (mut r1, mut r2, mut rl, mut cp) = (vec![], vec![], vec![], vec![]);
        for case in &self.cases {
            let out = crate::eval::answer(&tuned, case).map_err(|e| e.to_string())?;
            let s = self.rouge.score(&case.reference, &out.text);
            r1.push(s.rouge1.fmeasure);
            r2.push(s.rouge2.fmeasure);
            rl.push(s.rouge_l.fmeasure);
            cp.push(copy_rate(
                &out.text,
                &recap_engine::pipeline::mapreduce::lines(&case.transcript),
            ));
        }
        let scores = ValScores {
            epoch,
            cases: self.cases.len(),
            rouge1: mean(&r1),
            rouge2: mean(&r2),
            rouge_l: mean(&rl),
            copy_rate: mean(&cp),
        };
        eprintln!(
            "epoch {epoch}: val ROUGE-1/2/L {:.3}/{:.3}/{:.3} over {} cases, copy rate {:.2}",
            scores.rouge1, scores.rouge2, scores.rouge_l, scores.cases, scores.copy_rate
        );
        Ok(scores)
    }
}

pub async fn run(config: &Config, args: TrainArgs) -> Result<()> {
    keep_the_heap();
    let (examples, sources) = read_data(config, &args.data).await?;
    // Training holds the cores for minutes to hours: off the async workers.
    tokio::task::block_in_place(|| train_on(config, args, examples, sources))
}

fn train_on(
    config: &Config,
    args: TrainArgs,
    mut examples: Vec<Example>,
    sources: Vec<DataSource>,
) -> Result<()> {
    let Base {
        model_id,
        entry,
        path,
        sha256: base_sha256,
    } = trainable_base(config, args.model.as_deref())?;
    let device = engines::device(config)?;
    let opts = GgufOptions::for_entry(&entry, device.clone(), config.models.max_context);
    let serving = GgufModel::load(&path, &opts)?;

    if let Some(n) = args.max_examples {
        examples = seeded_sample(examples, n, args.seed);
    }
    let (items, skipped) = tokenize(&serving, &examples, args.max_seq_len, args.max_target_copy)?;
    let tokens: usize = items.iter().map(|i| i.ids.len()).sum();
    eprintln!(
        "{} examples read, {} kept ({tokens} tokens), skipped: {skipped:?}",
        examples.len(),
        items.len()
    );
    let spec = lora_spec(&args)?;
    let mut train_config = train_config(
        &args,
        &model_id,
        &base_sha256,
        opts.transcript_first,
        spec.clone(),
        sources,
    );
    let mut f = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
        .with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
    let model = TrainModel::from_gguf(&ct, &mut f, &device, &spec, args.seed)
        .with_context(|| format!("loading {} for training", path.display()))?;
    if let Some(dir) = &args.init_adapter {
        train_config.init_adapter = Some(start_from(&model, dir, &train_config, &path)?);
    }

    let validation = Validation {
        cases: match &args.val {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
                qmsum::sample(
                    qmsum::parse(&text, Setting::Span)?,
                    Some(args.val_cases),
                    args.seed,
                )
            }
            None => Vec::new(),
        },
        opts: opts.clone(),
        path: path.clone(),
        rouge: Rouge::new(true),
    };
    let mut validate = |dir: &Path, epoch: usize| validation.score(dir, epoch);
    let paths = RunPaths {
        out: args.out.clone(),
    };
    let report = trainer::train(
        &model,
        &items,
        skipped,
        &train_config,
        &paths,
        trainer::RunOptions {
            checkpoint_every: args.checkpoint_every,
            resume: args.resume,
            stop_after: args.stop_after,
        },
        &mut validate,
    )?;
    let Some(report) = report else {
        eprintln!(
            "stopped after {} steps as asked; `--resume` continues from {}",
            args.stop_after.unwrap_or(0),
            paths.checkpoints().display()
        );
        return Ok(());
    };
    eprintln!(
        "trained {} steps at {:.0} tokens/s ({:.0} s, peak RSS {:.0} MiB); adapter in {}, record in {}",
        report.steps.len(),
        report.tokens_per_s,
        report.wall_s,
        report.peak_rss_mib,
        report.adapter,
        args.out.join("train.json").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists_and_ranges_parse_and_bad_ones_are_named() {
        assert_eq!(parse_layers("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_layers("7, 3,3").unwrap(), vec![3, 7]);
        assert!(parse_layers("3-1")
            .unwrap_err()
            .to_string()
            .contains("backwards"));
        assert!(parse_layers("x").unwrap_err().to_string().contains("`x`"));
        assert!(parse_layers(",").is_err());
    }
}
