//! `recap summarize FILE|-`: the engine on one transcript, no broker, no
//! database. Reads plain text, a QMSum meeting JSON or a job JSON.

use crate::config::Config;
use crate::engines;
use anyhow::{bail, Context, Result};
use recap_engine::{Cancel, SummarizeRequest};
use recap_job::{parse_job_value, SummaryKind, Utterance};
use recap_policy::Tier;
use std::io::Read;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The transcript file, or - for standard input.
    pub file: PathBuf,
    /// Catalog id of the model; default: the compact tier's model.
    #[arg(long)]
    pub model: Option<String>,
    /// Summary kinds, comma-separated (overview, action_items, decisions, short).
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A transcript read from any of the accepted formats.
pub struct Input {
    pub transcript: Vec<Utterance>,
    pub kinds: Vec<SummaryKind>,
    pub language: Option<String>,
}

pub fn read_input(bytes: &[u8], config: &Config) -> Result<Input> {
    let text = std::str::from_utf8(bytes).context("the transcript is not UTF-8")?;
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        if value.get("meeting_transcripts").is_some() {
            return qmsum_meeting(&value);
        }
        if value.get("job_id").is_some() || value.get("version").is_some() {
            let job =
                parse_job_value(&value, &config.limits).map_err(|r| anyhow::anyhow!("{r}"))?;
            return Ok(Input {
                transcript: job.transcript,
                kinds: job.summaries,
                language: job.language,
            });
        }
        // A transcript file's JSON: Whisper, AWS Transcribe, a diarized list.
        let transcript = recap_job::formats::parse_value(&value, None).map_err(|e| {
            anyhow::anyhow!(
                "JSON input is neither a job (job_id, version), a QMSum meeting (meeting_transcripts) nor a transcript: {e}"
            )
        })?;
        return transcript_input(transcript);
    }
    // Plain text, WebVTT or SubRip, told apart by their content.
    transcript_input(recap_job::formats::parse_text(text, None)?)
}

fn transcript_input(transcript: Vec<Utterance>) -> Result<Input> {
    if transcript.is_empty() {
        bail!("the transcript is empty");
    }
    Ok(Input {
        transcript,
        kinds: vec![SummaryKind::Overview],
        language: None,
    })
}

fn qmsum_meeting(value: &serde_json::Value) -> Result<Input> {
    let turns = value["meeting_transcripts"]
        .as_array()
        .context("meeting_transcripts is not an array")?;
    let transcript: Vec<Utterance> = turns
        .iter()
        .filter_map(|t| {
            let text = t.get("content")?.as_str()?.trim().to_string();
            (!text.is_empty()).then(|| Utterance {
                speaker: t
                    .get("speaker")
                    .and_then(|s| s.as_str())
                    .map(str::to_string),
                start_s: None,
                end_s: None,
                text,
            })
        })
        .collect();
    if transcript.is_empty() {
        bail!("the QMSum meeting has no utterances");
    }
    Ok(Input {
        transcript,
        kinds: vec![SummaryKind::Overview],
        language: Some("en".into()),
    })
}

pub fn run(config: &Config, args: Args) -> Result<()> {
    let mut bytes = Vec::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
    }
    let mut input = read_input(&bytes, config)?;
    if !args.kinds.is_empty() {
        input.kinds = args
            .kinds
            .iter()
            .map(|k| SummaryKind::parse(k).with_context(|| format!("unknown summary kind {k:?}")))
            .collect::<Result<_>>()?;
    }
    let model_id = match args.model {
        Some(m) => m,
        None => config
            .tier_model(Tier::Compact)
            .context("no --model and no tiers.compact.model")?
            .to_string(),
    };
    let (engine, _) = engines::load(&model_id, config)?;
    let outputs = engine.summarize(&SummarizeRequest {
        transcript: &input.transcript,
        kinds: &input.kinds,
        language: input.language.as_deref(),
        query: None,
        deadline: None,
        cancel: Cancel::default(),
    })?;
    let rss = resident_memory();
    let source = recap_policy::copying::Source::new(&recap_engine::pipeline::mapreduce::lines(
        &input.transcript,
    ));
    let copied = |text: &str| source.rate(text);
    if args.json {
        let out: Vec<_> = outputs
            .iter()
            .map(|o| {
                serde_json::json!({
                    "kind": o.kind, "text": o.text, "model": model_id, "engine": engine.engine(),
                    "input_tokens": o.input_tokens, "output_tokens": o.output_tokens,
                    "prefill_ms": o.prefill_ms, "decode_ms": o.decode_ms, "total_ms": o.total_ms,
                    "chunks": o.chunks, "copy_rate": copied(&o.text),
                    "mean_logprob": o.confidence.mean_logprob(), "mean_entropy": o.confidence.mean_entropy(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model_id, "summaries": out,
                "rss_bytes": rss.map(|r| r.0), "peak_rss_bytes": rss.map(|r| r.1),
            }))?
        );
    } else {
        for o in &outputs {
            println!("== {} ({} via {}) ==", o.kind, model_id, engine.engine());
            println!("{}", o.text);
            println!(
                "-- {} input tokens, {} output tokens, prefill {:.0} ms, decode {:.0} ms, total {:.0} ms, {} chunk(s), {:.0}% of sentences copied, mean log-probability {}\n",
                o.input_tokens, o.output_tokens, o.prefill_ms, o.decode_ms, o.total_ms, o.chunks,
                100.0 * copied(&o.text),
                o.confidence
                    .mean_logprob()
                    .map_or("-".to_string(), |l| format!("{l:.3}"))
            );
        }
        if let Some((now, peak)) = rss {
            println!(
                "resident memory: {} MiB (peak {} MiB)",
                now >> 20,
                peak >> 20
            );
        }
    }
    Ok(())
}

/// Resident memory now and at peak, in bytes, from /proc (Linux).
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
