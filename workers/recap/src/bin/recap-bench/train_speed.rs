//! `recap-bench train`: the training loops' speed, beside PyTorch + PEFT
//! (`bench/train_anchor.py`).

use anyhow::{Context, Result};
use recap::config::Config;
use recap::engines;
use recap_engine::models::adapter::Target;
use recap_engine::models::llm::{GgufModel, GgufOptions};
use recap_train::data;
use recap_train::model::{LoraSpec, Pass, TrainModel};
use recap_train::trainer;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value = "smollm2-135m-instruct-q4_1")]
    pub model: String,
    /// QMSum train split (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Examples per round (seeded), each cut to --seq-len tokens.
    #[arg(long, default_value_t = 6)]
    pub examples: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Interleaved rounds of the three loops.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// The loops to run (for profiling one alone).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "recap,autograd,plain-candle"
    )]
    pub loops: Vec<TrainLoop>,
}

/// The training loops `recap-bench train` compares.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainLoop {
    /// recap's hand-written pass.
    Recap,
    /// candle's autograd over recap's fused ops.
    Autograd,
    /// candle's autograd over plain candle ops.
    PlainCandle,
}

/// `recap-bench train`: tokens/s of forward + backward (loss on the last
/// quarter of each sequence) for recap's hand-written pass, candle's
/// autograd over recap's fused ops, and candle's autograd over plain ops,
/// on one model with LoRA of `--rank` on all seven projections.
pub fn bench(config: &Config, args: BenchTrainArgs) -> Result<()> {
    recap::train::keep_the_heap();
    let catalog = config.catalog()?;
    let entry = catalog.get(&args.model)?.clone();
    let file = entry
        .file
        .as_deref()
        .context("catalog entry without a file")?;
    let path = config.models_dir().join(file);
    let device = engines::device(config)?;
    let serving = GgufModel::load(
        &path,
        &GgufOptions::for_entry(&entry, device.clone(), config.models.max_context),
    )?;
    let text =
        std::fs::read_to_string(&args.data).with_context(|| args.data.display().to_string())?;
    let mut items = Vec::new();
    for ex in data::parse_qmsum(&text, &args.data.display().to_string())? {
        if items.len() == args.examples {
            break;
        }
        let Some(mut ids) =
            serving.single_call_prompt(&ex.transcript, ex.kind, ex.query.as_deref(), None)?
        else {
            continue;
        };
        ids.extend(serving.target_ids(&ex.target)?);
        if ids.len() >= args.seq_len {
            ids.truncate(args.seq_len);
            items.push(ids);
        }
    }
    let spec = LoraSpec {
        r: args.rank,
        alpha: 2.0 * args.rank as f64,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        layers: None,
    };
    let mut f = std::fs::File::open(&path)?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f)?;
    let mut model = TrainModel::from_gguf(&ct, &mut f, &device, &spec, 1)?;
    let mut results: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..args.rounds {
        for (which, name, pass) in [
            (TrainLoop::Recap, "recap", Pass::HandWritten),
            (
                TrainLoop::Autograd,
                "candle_autograd_fused_ops",
                Pass::Autograd,
            ),
            (TrainLoop::PlainCandle, "plain_candle", Pass::PlainCandle),
        ] {
            if !args.loops.contains(&which) {
                continue;
            }
            model.pass = pass;
            let mut grads = model.zero_grads();
            // One untimed example first: the loop's buffers and the heap
            // grow to their size (PyTorch's anchor reports its warm round).
            if let Some(ids) = items.first() {
                let mut dropout = recap_train::model::Dropout::new(0.0, 0);
                model.loss_and_grads(ids, ids.len() * 3 / 4, &mut dropout, 1.0, &mut grads)?;
            }
            let started = std::time::Instant::now();
            let mut tokens = 0;
            for ids in &items {
                let mut dropout = recap_train::model::Dropout::new(0.0, 0);
                model.loss_and_grads(ids, ids.len() * 3 / 4, &mut dropout, 1.0, &mut grads)?;
                tokens += ids.len();
            }
            results
                .entry(name)
                .or_default()
                .push(tokens as f64 / started.elapsed().as_secs_f64());
        }
    }
    let best = |k: &str| {
        results
            .get(k)
            .map_or(f64::NAN, |r| r.iter().cloned().fold(0.0, f64::max))
    };
    println!(
        "{}",
        serde_json::json!({
            "model": args.model, "examples": items.len(), "seq_len": args.seq_len, "rank": args.rank,
            "tokens_per_s": results, "ratio_recap_over_plain": best("recap") / best("plain_candle"),
            "ratio_recap_over_autograd": best("recap") / best("candle_autograd_fused_ops"),
            "peak_rss_mib": trainer::peak_rss_mib(),
        })
    );
    Ok(())
}
