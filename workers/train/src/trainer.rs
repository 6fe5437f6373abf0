//! The training loop: seeded epochs of shuffled examples, gradient
//! accumulation and clipping, AdamW on a warmup-then-decay schedule,
//! checkpoints every N steps, a validation pass after each epoch, and the
//! run's record (`train.json`, `loss.svg`).

use crate::checkpoint;
use crate::model::{Dropout, TrainModel};
use crate::optim::{clip, AdamW, AdamWParams, Decay, Schedule};
use candle_core::{Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One example as token ids: the prompt the worker would prefill, then
/// the summary's tokens (from `target_start` on), the only ones scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub id: String,
    pub ids: Vec<u32>,
    pub target_start: usize,
}

/// What a run is: every key that shapes its loss curve. `--resume`
/// refuses a checkpoint whose config differs, naming the keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub base_model: String,
    pub base_sha256: String,
    /// `task_first` or `transcript_first`, as the base's catalog entry.
    pub prompt_order: String,
    pub lora: crate::model::LoraSpec,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub decay: Decay,
    pub epochs: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub max_seq_len: usize,
    pub seed: u64,
    /// The data, as given, with the sha256 of what was read.
    pub data: Vec<DataSource>,
    /// A seeded subset of this many examples (all if None).
    pub max_examples: Option<usize>,
    /// Examples whose target copies more than this share of its sentences
    /// from the transcript are left out (`--max-target-copy`); all kept if None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_target_copy: Option<f64>,
    /// The adapter the run starts from (`--init-adapter`); fresh weights if None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<StartingAdapter>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartingAdapter {
    pub dir: String,
    /// sha256 of its `adapter_model.safetensors`.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    pub spec: String,
    pub sha256: String,
    pub examples: usize,
}

impl TrainConfig {
    /// Keys whose values differ between two configs.
    pub fn differing_keys(&self, other: &TrainConfig) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(other).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec!["(config)".into()];
        };
        let mut keys: Vec<String> = a
            .keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValScores {
    pub epoch: usize,
    pub cases: usize,
    pub rouge1: f64,
    pub rouge2: f64,
    pub rouge_l: f64,
    /// Share of output sentences copied from the transcript.
    pub copy_rate: f64,
}

impl ValScores {
    /// An epoch without a validation set.
    pub fn none(epoch: usize) -> ValScores {
        ValScores {
            epoch,
            cases: 0,
            rouge1: 0.0,
            rouge2: 0.0,
            rouge_l: 0.0,
            copy_rate: 0.0,
        }
    }
}

/// What a checkpoint carries beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    config: TrainConfig,
    /// Optimizer steps done.
    step: usize,
    steps: Vec<StepLog>,
    val: Vec<ValScores>,
}

/// The record of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub examples: usize,
    pub skipped: BTreeMap<String, usize>,
    pub train_tokens: usize,
    pub steps_total: usize,
    pub steps: Vec<StepLog>,
    pub val: Vec<ValScores>,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
    pub resumed_from_step: Option<usize>,
    pub adapter: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("no example fits: {0}")]
    NoExamples(String),
    #[error(
        "--resume: the checkpoint in {dir} was made with another config; differing keys: {keys}"
    )]
    ConfigMismatch { dir: String, keys: String },
    #[error("the loss is {value} at step {step}; stopped. The last good checkpoint: {last_good}")]
    NonFinite {
        value: f64,
        step: usize,
        last_good: String,
    },
    #[error("validation: {0}")]
    Validation(String),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Adapter(#[from] recap_engine::models::adapter::AdapterError),
    #[error("training: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// Where a run writes: checkpoints, the adapter, train.json, loss.svg.
pub struct RunPaths {
    pub out: PathBuf,
}

impl RunPaths {
    pub fn checkpoints(&self) -> PathBuf {
        self.out.join("checkpoints")
    }
    pub fn adapter(&self) -> PathBuf {
        self.out.join("adapter")
    }
}

/// A seeded permutation of 0..n for one epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order.shuffle(&mut rng);
    order
}

/// The seed of one micro-step's dropout masks.
fn micro_seed(seed: u64, step: usize, micro: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ ((step as u64) << 20) ^ micro as u64
}

/// How this invocation runs (not part of the run's config: a resumed run
/// may change them).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Optimizer steps between checkpoints (each epoch's end writes one).
    pub checkpoint_every: usize,
    /// Continue from the latest checkpoint, on the same curve.
    pub resume: bool,
    /// Stop after this many steps of this invocation, checkpointed, to be
    /// resumed later (a long run split across sessions).
    pub stop_after: Option<usize>,
}

/// Trains `model` on `items`; `validate` scores an adapter after each epoch
/// (it gets the adapter's directory, saved for it). Returns None where the
/// run stopped early (`stop_after`), its checkpoint written.
pub fn train(
    model: &TrainModel,
    items: &[Tokenized],
    skipped: BTreeMap<String, usize>,
    config: &TrainConfig,
    paths: &RunPaths,
    options: RunOptions,
    validate: &mut dyn FnMut(&Path, usize) -> Result<ValScores, String>,
) -> Result<Option<TrainReport>, TrainError> {
    let RunOptions {
        checkpoint_every,
        resume,
        stop_after,
    } = options;
    if items.is_empty() {
        return Err(TrainError::NoExamples(format!(
            "every example was skipped ({skipped:?})"
        )));
    }
    let started = Instant::now();
    let named = model.vars();
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let accum = config.grad_accum.max(1);
    let steps_per_epoch = items.len().div_ceil(accum);
    let total = steps_per_epoch * config.epochs.max(1);
    let (schedule, mut opt) = optimizer(config, &vars, total)?;
    let mut state = RunState {
        config: config.clone(),
        step: 0,
        steps: Vec::new(),
        val: Vec::new(),
    };
    let mut resumed_from = None;
    let ckpt_root = paths.checkpoints();
    if resume {
        if let Some(saved) = resume_from(&ckpt_root, model, &named, &mut opt, config)? {
            resumed_from = Some(saved.step);
            state = saved;
        }
    }
    let save_checkpoint = |state: &RunState, opt: &AdamW| -> Result<PathBuf, TrainError> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, var)) in named.iter().enumerate() {
            t.insert(name.clone(), var.as_tensor().clone());
            t.insert(format!("adam_m.{name}"), opt.m[i].clone());
            t.insert(format!("adam_v.{name}"), opt.v[i].clone());
        }
        Ok(checkpoint::save(&ckpt_root, state.step, state, &t)?)
    };

    let bar = progress_bar(total, state.step);
    let mut last_good = match resumed_from {
        Some(s) => format!("{} (step {s})", ckpt_root.display()),
        None => "none (no checkpoint was written yet)".to_string(),
    };
    let mut order_epoch = usize::MAX;
    let mut order = Vec::new();
    let mut run_tokens = 0usize;
    let mut run_seconds = 0f64;
    let first_step = state.step;
    while state.step < total {
        if stop_after.is_some_and(|n| state.step - first_step >= n) {
            save_checkpoint(&state, &opt)?;
            bar.abandon();
            return Ok(None);
        }
        let step = state.step;
        let epoch = step / steps_per_epoch;
        if order_epoch != epoch {
            order = epoch_order(items.len(), config.seed, epoch);
            order_epoch = epoch;
        }
        let within = step % steps_per_epoch;
        let batch = &order[within * accum..((within + 1) * accum).min(items.len())];
        let step_started = Instant::now();
        let (loss, tokens, grad_norm, grads) =
            match gradients(model, items, batch, &vars, config, step) {
                Ok(g) => g,
                Err(GradError::NonFinite(value)) => {
                    bar.abandon();
                    return Err(TrainError::NonFinite {
                        value,
                        step,
                        last_good,
                    });
                }
                Err(GradError::Candle(e)) => return Err(e.into()),
            };
        let lr = schedule.lr(step);
        opt.step(&vars, &grads, lr)?;
        let seconds = step_started.elapsed().as_secs_f64();
        run_tokens += tokens;
        run_seconds += seconds;
        state.steps.push(StepLog {
            step,
            epoch,
            loss,
            lr,
            grad_norm,
            tokens,
            seconds,
        });
        state.step += 1;
        bar.set_position(state.step as u64);
        bar.set_message(format!(
            "loss {loss:.3} lr {lr:.2e} {:.0} tok/s",
            run_tokens as f64 / run_seconds.max(1e-9)
        ));
        let epoch_done = state.step.is_multiple_of(steps_per_epoch);
        if epoch_done {
            // The epoch's adapter, saved for `validate` to score.
            let dir = paths.out.join(format!("epoch-{}", epoch + 1));
            save_adapter(model, config, &dir)?;
            bar.suspend(|| -> Result<(), TrainError> {
                let scores = validate(&dir, epoch + 1).map_err(TrainError::Validation)?;
                state.val.push(scores);
                Ok(())
            })?;
        }
        if epoch_done || (checkpoint_every > 0 && state.step.is_multiple_of(checkpoint_every)) {
            let dir = save_checkpoint(&state, &opt)?;
            last_good = format!("{} (step {})", dir.display(), state.step);
        }
    }
    bar.finish();
    save_adapter(model, config, &paths.adapter())?;
    let all_tokens: usize = state.steps.iter().map(|s| s.tokens).sum();
    let all_seconds: f64 = state.steps.iter().map(|s| s.seconds).sum();
    let report = TrainReport {
        config: config.clone(),
        examples: items.len(),
        skipped,
        train_tokens: items.iter().map(|i| i.ids.len()).sum(),
        steps_total: total,
        steps: state.steps,
        val: state.val,
        tokens_per_s: all_tokens as f64 / all_seconds.max(1e-9),
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
        resumed_from_step: resumed_from,
        adapter: paths.adapter().display().to_string(),
    };
    write_report(&paths.out, &report)?;
    Ok(Some(report))
}

/// The LoRA weights as a PEFT adapter in `dir`, with recap's record of
/// the base and the prompt order.
fn save_adapter(model: &TrainModel, config: &TrainConfig, dir: &Path) -> Result<(), TrainError> {
    let mut adapter = model.adapter()?;
    adapter.info = Some(adapter_info(config));
    adapter.save(dir, &model.layout)?;
    Ok(())
}

/// The learning rate's schedule over `total` steps, and AdamW over `vars`.
fn optimizer(
    config: &TrainConfig,
    vars: &[Var],
    total: usize,
) -> Result<(Schedule, AdamW), TrainError> {
    let schedule = Schedule {
        peak: config.lr,
        floor: config.min_lr,
        warmup: config.warmup_steps,
        total,
        decay: config.decay,
    };
    let opt = AdamW::new(
        vars,
        AdamWParams {
            weight_decay: config.weight_decay,
            ..AdamWParams::default()
        },
    )?;
    Ok((schedule, opt))
}

/// The run state of the newest checkpoint under `root`, with the model's
/// LoRA weights and the optimizer's moments restored from it; None where
/// there is none. A checkpoint of another configuration is refused.
fn resume_from(
    root: &Path,
    model: &TrainModel,
    named: &[(String, Var)],
    opt: &mut AdamW,
    config: &TrainConfig,
) -> Result<Option<RunState>, TrainError> {
    let Some((dir, saved, tensors)) = checkpoint::load::<RunState>(root)? else {
        return Ok(None);
    };
    let keys = saved.config.differing_keys(config);
    if !keys.is_empty() {
        return Err(TrainError::ConfigMismatch {
            dir: dir.display().to_string(),
            keys: keys.join(", "),
        });
    }
    model.set(&tensors)?;
    for (i, (name, var)) in named.iter().enumerate() {
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {k}")))
        };
        opt.m[i] = get(format!("adam_m.{name}"))?.to_device(var.device())?;
        opt.v[i] = get(format!("adam_v.{name}"))?.to_device(var.device())?;
    }
    opt.t = saved.step;
    Ok(Some(saved))
}

fn progress_bar(total: usize, at: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {msg} elapsed {elapsed_precise} eta {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(at as u64);
    bar
}

/// Why a step's gradients could not be had.
enum GradError {
    /// A loss or the gradients' norm that is not a finite number.
    NonFinite(f64),
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for GradError {
    fn from(e: candle_core::Error) -> Self {
        GradError::Candle(e)
    }
}

/// One optimizer step's gradients over its micro-batches (`batch`, indices
/// of `items`), clipped: (mean loss, tokens, norm before clipping, grads).
fn gradients(
    model: &TrainModel,
    items: &[Tokenized],
    batch: &[usize],
    vars: &[Var],
    config: &TrainConfig,
    step: usize,
) -> Result<(f64, usize, f64, Vec<Tensor>), GradError> {
    let mut sums = model.zero_grads();
    let mut loss_sum = 0f64;
    let mut tokens = 0usize;
    for (j, &ix) in batch.iter().enumerate() {
        let item = &items[ix];
        let mut dropout = Dropout::new(config.lora.dropout, micro_seed(config.seed, step, j));
        let value = model.loss_and_grads(
            &item.ids,
            item.target_start,
            &mut dropout,
            1.0 / batch.len() as f64,
            &mut sums,
        )?;
        if !value.is_finite() {
            return Err(GradError::NonFinite(value));
        }
        loss_sum += value;
        tokens += item.ids.len();
    }
    let mut grads: Vec<Tensor> = sums
        .into_iter()
        .zip(vars)
        .map(|(g, v)| Tensor::from_vec(g, v.shape(), v.device()))
        .collect::<candle_core::Result<_>>()?;
    let grad_norm = clip(&mut grads, config.max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Err(GradError::NonFinite(grad_norm));
    }
    Ok((loss_sum / batch.len() as f64, tokens, grad_norm, grads))
}

fn adapter_info(config: &TrainConfig) -> recap_engine::models::adapter::RecapAdapterInfo {
    recap_engine::models::adapter::RecapAdapterInfo {
        base_sha256: config.base_sha256.clone(),
        base_model: Some(config.base_model.clone()),
        prompt_order: Some(config.prompt_order.clone()),
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn write_report(out: &Path, report: &TrainReport) -> Result<(), TrainError> {
    let io = |p: &Path, e: &dyn std::fmt::Display| TrainError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let json = serde_json::to_string_pretty(report).map_err(|e| io(out, &e))?;
    recap_engine::models::adapter::write_atomic(&out.join("train.json"), &json)?;
    recap_engine::models::adapter::write_atomic(
        &out.join("loss.svg"),
        &crate::report::loss_svg(report),
    )?;
    Ok(())
}
