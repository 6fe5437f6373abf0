//! `recap-bench`: the recap side of the benchmarks under `bench/` (which
//! run each beside its anchor and write bench/RESULTS.md).
//!
//! - `prompt`: the ~1,000-token meeting prompt as token ids, the same
//!   ids fed to recap and to llama.cpp;
//! - `infer`: prefill and greedy decode of those ids, timed per run,
//!   with the process's peak RSS;
//! - `kinds`: one transcript, several summary kinds, with and without
//!   prefilling the transcript once;
//! - `batch`: compact-tier throughput at batch sizes N.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use recap::config::Config;
use recap_engine::models::llm::GgufModel;
use recap_engine::pipeline::generate::GenParams;
use recap_engine::pipeline::prompts;
use recap_job::SummaryKind;
use std::path::{Path, PathBuf};

/// The model a benchmark loads: a catalog id, and optionally another GGUF
/// of the same architecture to load in its place.
#[derive(clap::Args)]
pub struct ModelArg {
    /// The model's catalog id (`recap models list`).
    #[arg(long = "model", value_name = "MODEL")]
    id: String,
    /// Load this GGUF (same architecture as the model) instead of the
    /// catalog's verified file.
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training speed: LoRA forward + backward on QMSum train examples,
    /// recap's ops against a plain candle autograd loop on the same
    /// model, shapes and data, interleaved; prints one JSON line.
    Train(crate::train_speed::BenchTrainArgs),
    /// Write the benchmark prompt's token ids (JSON array) for a model.
    Prompt {
        #[command(flatten)]
        model: ModelArg,
        /// QMSum meetings (JSONL); the first meeting's opening is used.
        #[arg(long, default_value = "tests/fixtures/qmsum/val-head3.jsonl")]
        qmsum: PathBuf,
        /// Prompt length to reach, in tokens (whole utterances are added).
        #[arg(long, default_value_t = 1000)]
        tokens: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Prefill the ids, then decode greedily; prints one JSON line.
    Infer {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        ids: PathBuf,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the prompt's next-token logits here (f32,
        /// little-endian), to compare devices.
        #[arg(long)]
        logits: Option<PathBuf>,
    },
    /// One 4-kind job over the benchmark meeting, with the transcript
    /// prefilled once (what workers do) and once per kind (before);
    /// prints jobs/hour for both and whether the texts agree.
    Kinds {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long, default_value = "tests/fixtures/qmsum/val-head3.jsonl")]
        qmsum: PathBuf,
        /// Transcript length to reach, in tokens.
        #[arg(long, default_value_t = 900)]
        tokens: usize,
        #[arg(long, default_value_t = 2)]
        runs: usize,
    },
    /// Compact-tier batching: the same jobs (windows of the QMSum
    /// meetings, one overview each) run N at a time through the engine's
    /// batch path, for each N; prints jobs/s per N, the ratio to N = 1 and
    /// whether every N gives the texts of N = 1.
    Batch {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long, default_value = "tests/fixtures/qmsum/val-head3.jsonl")]
        qmsum: PathBuf,
        /// Batch sizes to compare.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
        sizes: Vec<usize>,
        /// Jobs per batch size.
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        /// Transcript tokens per job.
        #[arg(long, default_value_t = 500)]
        tokens: usize,
    },
    /// Publish N small jobs (confirmed, pipelined) to recap.jobs with a
    /// routing key (`ingest`: the full path; `compact`: one hop), each with
    /// `metadata.sent_at` (Unix seconds) for latency; `--rate` paces them.
    Publish {
        #[arg(long)]
        messages: usize,
        #[arg(long, default_value = "ingest")]
        routing_key: String,
        /// Jobs per second; 0 publishes as fast as confirms allow.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// The broker's own limit: publish N persistent messages with confirms
    /// to a fresh quorum queue while consuming them with manual acks.
    RawBroker {
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
    },
    /// PostgreSQL's own limit: N single-row INSERT commits over C connections.
    RawPostgres {
        #[arg(long, default_value_t = 10_000)]
        rows: usize,
        #[arg(long, default_value_t = 2)]
        connections: usize,
    },
}

/// A catalog model, or with `file` another GGUF of the same architecture
/// loaded with the entry's options (a file of the same shapes with other
/// values, for timing where the real weights cannot travel: no sha256, since
/// it is not the catalog's file).
fn gguf(config: &Config, model: &ModelArg) -> Result<GgufModel> {
    let catalog = config.catalog()?;
    let entry = catalog.get(&model.id)?.clone();
    if entry.format != "gguf" {
        bail!("{} is not a GGUF model", model.id);
    }
    let file = entry
        .file
        .as_deref()
        .context("catalog entry without a file")?;
    // With the entry's adapter: the PEFT round trip compares its logits.
    let mut options = recap::engines::gguf_options(&entry, config)?;
    let path = match &model.file {
        Some(path) => {
            options.sha256 = None;
            path.to_path_buf()
        }
        None => config.models_dir().join(file),
    };
    Ok(GgufModel::load(&path, &options)?)
}

/// The process's peak resident set (VmHWM), in KiB, as the trainer reads it.
fn peak_rss_kib() -> u64 {
    (recap_train::trainer::peak_rss_mib() * 1024.0).round() as u64
}

fn kinds(
    config: &Config,
    model: &ModelArg,
    qmsum: &Path,
    tokens: usize,
    runs: usize,
) -> Result<()> {
    use recap_engine::{Cancel, SummarizeRequest, Summarizer};
    let m = gguf(config, model)?;
    let case = first_meeting(qmsum)?;
    let mut transcript = Vec::new();
    for u in &case.transcript {
        transcript.push(u.clone());
        if m.count_tokens(&recap_engine::pipeline::mapreduce::lines(&transcript))? >= tokens {
            break;
        }
    }
    let req = |kinds: &'static [SummaryKind]| SummarizeRequest {
        transcript: &transcript,
        kinds,
        language: None,
        query: None,
        deadline: None,
        cancel: Cancel::default(),
    };
    const ALL: [SummaryKind; 4] = [
        SummaryKind::Overview,
        SummaryKind::ActionItems,
        SummaryKind::Decisions,
        SummaryKind::Short,
    ];
    // One untimed call first: a GPU loads its kernels on first use.
    m.summarize(&req(&ALL[..1]))?;
    let mut shared_s = Vec::new();
    let mut per_kind_s = Vec::new();
    let mut same = true;
    for _ in 0..runs {
        let t = std::time::Instant::now();
        let shared = m.summarize(&req(&ALL))?;
        shared_s.push(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let mut alone = Vec::new();
        for k in &ALL {
            alone.extend(m.summarize(&req(std::slice::from_ref(k)))?);
        }
        per_kind_s.push(t.elapsed().as_secs_f64());
        same &= shared.iter().zip(&alone).all(|(a, b)| a.text == b.text);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (s, p) = (med(&mut shared_s), med(&mut per_kind_s));
    println!(
        "{}",
        serde_json::json!({
            "model": model.id,
            "device": config.models.device,
            "kinds": ALL.len(),
            "transcript_tokens": m.count_tokens(&recap_engine::pipeline::mapreduce::lines(&transcript))?,
            "prefill_once_s": s,
            "prefill_per_kind_s": p,
            "prefill_once_jobs_per_hour": 3600.0 / s,
            "prefill_per_kind_jobs_per_hour": 3600.0 / p,
            "speedup": p / s,
            "same_texts": same,
        })
    );
    Ok(())
}

fn batch(
    config: &Config,
    model: &ModelArg,
    qmsum: &Path,
    sizes: &[usize],
    jobs: usize,
    tokens: usize,
) -> Result<()> {
    use recap_engine::{Cancel, SummarizeRequest, Summarizer};
    let m = gguf(config, model)?;
    let text =
        std::fs::read_to_string(qmsum).with_context(|| format!("reading {}", qmsum.display()))?;
    let cases = recap_eval::qmsum::parse(&text, recap_eval::qmsum::Setting::Whole)?;
    // Consecutive windows of `tokens` across the meetings: distinct jobs.
    let mut transcripts = Vec::new();
    'cases: for case in &cases {
        let mut window = Vec::new();
        for u in &case.transcript {
            window.push(u.clone());
            if m.count_tokens(&recap_engine::pipeline::mapreduce::lines(&window))? >= tokens {
                transcripts.push(std::mem::take(&mut window));
                if transcripts.len() == jobs {
                    break 'cases;
                }
            }
        }
    }
    if transcripts.len() < jobs {
        bail!(
            "the QMSum file holds only {} windows of {tokens} tokens",
            transcripts.len()
        );
    }
    let kinds = [SummaryKind::Overview];
    let reqs: Vec<SummarizeRequest<'_>> = transcripts
        .iter()
        .map(|t| SummarizeRequest {
            transcript: t,
            kinds: &kinds,
            language: None,
            query: None,
            deadline: None,
            cancel: Cancel::default(),
        })
        .collect();
    // One job first, untimed: a GPU loads its kernels on first use.
    m.summarize(&reqs[0])?;
    let mut rows = Vec::new();
    let mut first: Option<(f64, Vec<String>)> = None;
    for &n in sizes {
        let t = std::time::Instant::now();
        let mut texts = Vec::new();
        let mut out_tokens = 0u64;
        for group in reqs.chunks(n.max(1)) {
            for r in m.summarize_batch(group) {
                let outs = r?;
                out_tokens += outs.iter().map(|o| o.output_tokens as u64).sum::<u64>();
                texts.extend(outs.into_iter().map(|o| o.text));
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let jobs_s = jobs as f64 / secs;
        let (base, same) = match &first {
            None => {
                first = Some((jobs_s, texts));
                (jobs_s, true)
            }
            Some((b, t1)) => (*b, *t1 == texts),
        };
        rows.push(serde_json::json!({
            "batch_size": n,
            "seconds": secs,
            "jobs_per_s": jobs_s,
            "output_tokens": out_tokens,
            "ratio_to_first": jobs_s / base,
            "same_texts_as_first": same,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "model": model.id,
            "device": config.models.device,
            "jobs": jobs,
            "transcript_tokens": tokens,
            "kinds": ["overview"],
            "threads": rayon_threads(),
            "sizes": rows,
            "peak_rss_kib": peak_rss_kib(),
        })
    );
    Ok(())
}

/// The first meeting of a QMSum file: the benchmarks' transcript.
fn first_meeting(qmsum: &Path) -> Result<recap_eval::qmsum::Case> {
    let text =
        std::fs::read_to_string(qmsum).with_context(|| format!("reading {}", qmsum.display()))?;
    let cases = recap_eval::qmsum::parse(&text, recap_eval::qmsum::Setting::Whole)?;
    cases
        .into_iter()
        .next()
        .context("no meeting in the QMSum file")
}

/// Publisher confirms in flight.
type Confirms = futures::stream::FuturesUnordered<lapin::PublisherConfirm>;

/// Publishes keep at most this many confirms outstanding.
const CONFIRM_WINDOW: usize = 256;

/// Waits for confirms until at most `keep` are outstanding; a nack is an error.
async fn settle(pending: &mut Confirms, keep: usize) -> Result<()> {
    use futures::StreamExt;
    while pending.len() > keep {
        if let Some(c) = pending.next().await {
            anyhow::ensure!(c?.is_ack(), "the broker refused a publish");
        }
    }
    Ok(())
}

fn meeting_prompt(model: &GgufModel, qmsum: &Path, tokens: usize) -> Result<Vec<u32>> {
    let case = first_meeting(qmsum)?;
    let task = prompts::task(SummaryKind::Overview, None);
    let mut lines = Vec::new();
    let mut ids = Vec::new();
    for u in &case.transcript {
        lines.push(u.line());
        ids = model.prompt_ids(&prompts::user_turn(&lines.join("\n"), &task)?)?;
        if ids.len() >= tokens {
            break;
        }
    }
    Ok(ids)
}

pub async fn run(config: &Config, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => {
            tokio::task::block_in_place(|| crate::train_speed::bench(config, args))?
        }
        BenchCommand::Kinds {
            model,
            qmsum,
            tokens,
            runs,
        } => kinds(config, &model, &qmsum, tokens, runs)?,
        BenchCommand::Batch {
            model,
            qmsum,
            sizes,
            jobs,
            tokens,
        } => batch(config, &model, &qmsum, &sizes, jobs, tokens)?,
        BenchCommand::Publish {
            messages,
            routing_key,
            rate,
        } => publish(config, messages, &routing_key, rate).await?,
        BenchCommand::RawBroker { messages } => raw_broker(config, messages).await?,
        BenchCommand::RawPostgres { rows, connections } => {
            raw_postgres(config, rows, connections).await?
        }
        BenchCommand::Prompt {
            model,
            qmsum,
            tokens,
            out,
        } => {
            let m = gguf(config, &model)?;
            let ids = meeting_prompt(&m, &qmsum, tokens)?;
            std::fs::write(&out, serde_json::to_vec(&ids)?)?;
            eprintln!("{} prompt tokens -> {}", ids.len(), out.display());
        }
        BenchCommand::Infer {
            model,
            ids,
            new_tokens,
            runs,
            logits,
        } => {
            let load = std::time::Instant::now();
            let m = gguf(config, &model)?;
            let load_ms = load.elapsed().as_secs_f64() * 1e3;
            let ids: Vec<u32> = serde_json::from_slice(&std::fs::read(&ids)?)?;
            if let Some(path) = logits {
                let l = m.prompt_logits(&ids)?;
                let bytes: Vec<u8> = l.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            let params = GenParams {
                max_new_tokens: new_tokens,
                repeat_penalty: 1.0,
                ..GenParams::default()
            };
            let mut out = Vec::new();
            let mut tokens = Vec::new();
            for _ in 0..runs {
                let g = m.generate_ids(&ids, &params, false)?;
                out.push(serde_json::json!({
                    "prefill_ms": g.prefill_ms,
                    "decode_ms": g.decode_ms,
                    "prefill_tok_s": g.prefill_tok_s(),
                    // The first new token comes from the prefill's logits:
                    // decode speed counts the tokens decoded after it.
                    "decode_tok_s": (g.tokens.len().saturating_sub(1)) as f64 / (g.decode_ms / 1e3),
                }));
                tokens = g.tokens;
            }
            println!(
                "{}",
                serde_json::json!({
                    "engine": "recap",
                    "model": model.id,
                    "device": config.models.device,
                    "weights": model.file.as_ref().map_or("catalog".to_string(), |f| f.display().to_string()),
                    "prompt_tokens": ids.len(),
                    "new_tokens": tokens.len(),
                    "load_ms": load_ms,
                    "runs": out,
                    "peak_rss_kib": peak_rss_kib(),
                    "tokens": tokens,
                    "threads": rayon_threads(),
                })
            );
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Publishes with up to `window` confirms outstanding.
async fn publish(config: &Config, messages: usize, routing_key: &str, rate: f64) -> Result<()> {
    let conn = recap::queue::connect(config, "bench-publish").await?;
    let ch = recap::queue::confirm_channel(&conn).await?;
    let mut pending = Confirms::new();
    let start = std::time::Instant::now();
    for i in 0..messages {
        if rate > 0.0 {
            let due = start + std::time::Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let id = uuid::Uuid::new_v4();
        let sent_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let body = serde_json::to_vec(&serde_json::json!({
            "version": 1,
            "job_id": id,
            "tenant": "bench",
            "transcript": [
                {"speaker": "Alice", "text": "We agreed to ship the release on Friday."},
                {"speaker": "Bob", "text": "I will update the roadmap and tell marketing."},
                {"speaker": "Carol", "text": "Budget is approved for two more contractors."}
            ],
            "summaries": ["short"],
            "metadata": {"sent_at": sent_at},
        }))?;
        let confirm = ch
            .basic_publish(
                recap::queue::EXCHANGE_JOBS.into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                recap::queue::job_properties(Some(id), Default::default()),
            )
            .await?;
        pending.push(confirm);
        settle(&mut pending, CONFIRM_WINDOW - 1).await?;
    }
    settle(&mut pending, 0).await?;
    let s = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"published": messages, "seconds": s, "per_s": messages as f64 / s})
    );
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

async fn raw_broker(config: &Config, messages: usize) -> Result<()> {
    use futures::stream::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    let conn = recap::queue::connect(config, "bench-raw").await?;
    let queue = format!("recap.bench.raw.{}", uuid::Uuid::new_v4().simple());
    let ch = recap::queue::confirm_channel(&conn).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let consume_ch = recap::queue::consumer_channel(&conn, 256).await?;
    let mut consumer = consume_ch
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = std::time::Instant::now();
    let consuming = tokio::spawn(async move {
        let mut n = 0;
        while n < messages {
            match consumer.next().await {
                Some(Ok(d)) => {
                    d.ack(BasicAckOptions::default()).await?;
                    n += 1;
                }
                Some(Err(e)) => return Err(anyhow::anyhow!(e)),
                None => anyhow::bail!("consumer ended"),
            }
        }
        Ok::<_, anyhow::Error>(std::time::Instant::now())
    });
    let body = vec![b'x'; 400];
    let mut pending = Confirms::new();
    for _ in 0..messages {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                Default::default(),
                &body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push(confirm);
        settle(&mut pending, CONFIRM_WINDOW - 1).await?;
    }
    settle(&mut pending, 0).await?;
    let published = start.elapsed().as_secs_f64();
    let done = consuming.await??;
    let total = (done - start).as_secs_f64();
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    println!(
        "{}",
        serde_json::json!({
            "messages": messages,
            "publish_confirm_per_s": messages as f64 / published,
            "publish_and_ack_per_s": messages as f64 / total,
            "seconds": total,
        })
    );
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

async fn raw_postgres(config: &Config, rows: usize, connections: usize) -> Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections as u32)
        .connect(&config.database.url)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_raw_rows (id uuid PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
        .execute(&pool)
        .await?;
    let start = std::time::Instant::now();
    let per = rows / connections.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let pool = pool.clone();
        tasks.spawn(async move {
            for _ in 0..per {
                // One row, one transaction, one commit (autocommit).
                sqlx::query("INSERT INTO bench_raw_rows (id) VALUES ($1)")
                    .bind(uuid::Uuid::new_v4())
                    .execute(&pool)
                    .await?;
            }
            Ok::<_, sqlx::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let s = start.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_raw_rows")
        .execute(&pool)
        .await?;
    println!(
        "{}",
        serde_json::json!({"rows": per * connections, "connections": connections, "commits_per_s": (per * connections) as f64 / s})
    );
    Ok(())
}
