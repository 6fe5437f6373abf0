//! The cost policy in a running process: loaded from its file against the
//! deployment's tiers and the catalog's prices, shared by the tasks that
//! decide, and reloaded on SIGHUP. A bad file is refused and the last good
//! policy stays in force.

use crate::config::Config;
use crate::metrics::metrics;
use anyhow::{Context, Result};
use recap_engine::SummaryOutput;
use recap_job::Job;
use recap_policy::score::Signals;
use recap_policy::Tier;
use recap_policy::{load_policy, PolicyConfig, Prices, Tiers};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The policy shipped with recap, used when `policy.file` is not set.
pub const DEFAULT_POLICY: &str = include_str!("../../../config/policy.toml");

pub fn tiers(config: &Config) -> Tiers {
    Tiers {
        compact: config.tier_model(Tier::Compact).map(str::to_string),
        large: config.tier_model(Tier::Large).map(str::to_string),
    }
}

pub fn catalog_prices(config: &Config) -> Result<BTreeMap<String, Prices>> {
    Ok(config
        .catalog()?
        .models
        .iter()
        .map(|m| {
            (
                m.id.clone(),
                Prices {
                    input_per_1k: m.price_per_1k_input,
                    output_per_1k: m.price_per_1k_output,
                    ..Prices::default()
                },
            )
        })
        .collect())
}

pub fn load(config: &Config) -> Result<PolicyConfig> {
    let (text, source) = match &config.policy.file {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading policy file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            DEFAULT_POLICY.to_string(),
            "the built-in policy".to_string(),
        ),
    };
    let p = load_policy(&text, &tiers(config), &catalog_prices(config)?)
        .with_context(|| format!("loading {source}"))?;
    for w in &p.warnings {
        tracing::warn!(version = %p.version, "{source}: {w}");
    }
    Ok(p)
}

/// One output as the cascade sees it: from an engine's `SummaryOutput`,
/// an eval cache line or a stored `summaries` row.
pub struct Said<'a> {
    pub kind: &'a str,
    pub text: &'a str,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub mean_logprob: Option<f64>,
    pub mean_entropy: Option<f64>,
}

impl<'a> From<&'a SummaryOutput> for Said<'a> {
    fn from(o: &'a SummaryOutput) -> Said<'a> {
        Said {
            kind: o.kind.as_str(),
            text: &o.text,
            input_tokens: o.input_tokens,
            output_tokens: o.output_tokens,
            mean_logprob: o.confidence.mean_logprob(),
            mean_entropy: o.confidence.mean_entropy(),
        }
    }
}

/// What the cascade and the calibrated score know of a job, read once
/// from its transcript and asked of each of its outputs.
pub struct JobView {
    source: recap_policy::copying::Source,
    speakers: u32,
    non_english: bool,
}

impl JobView {
    pub fn of(job: &Job) -> JobView {
        JobView {
            source: recap_policy::copying::Source::new(&recap_engine::pipeline::mapreduce::lines(
                &job.transcript,
            )),
            speakers: job.speakers().len() as u32,
            non_english: job
                .language
                .as_deref()
                .is_some_and(|l| !l.to_ascii_lowercase().starts_with("en")),
        }
    }

    /// One output's signals: the job's features and the output's own, all
    /// free to compute.
    pub fn signals(&self, said: Said<'_>, query: Option<&str>) -> Signals {
        Signals {
            input_tokens: said.input_tokens as u64,
            speakers: self.speakers,
            kind: said.kind.to_string(),
            query_words: query.map_or(0, |q| q.split_whitespace().count() as u32),
            non_english: self.non_english,
            output_tokens: said.output_tokens,
            mean_logprob: said.mean_logprob,
            mean_entropy: said.mean_entropy,
            copy_rate: self.source.rate(said.text),
            repeat_ratio: recap_policy::cascade::repeat_ratio(said.text),
        }
    }
}

/// The policy in force, swapped whole on reload.
#[derive(Clone)]
pub struct SharedPolicy(Arc<RwLock<Arc<PolicyConfig>>>);

impl SharedPolicy {
    pub fn new(p: PolicyConfig) -> SharedPolicy {
        SharedPolicy(Arc::new(RwLock::new(Arc::new(p))))
    }

    pub fn current(&self) -> Arc<PolicyConfig> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, p: PolicyConfig) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(p),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(p),
        }
    }

    /// Reloads on every SIGHUP for the life of the process.
    pub fn reload_on_sighup(&self, config: Arc<Config>) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let shared = self.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match load(&config) {
                    Ok(p) => {
                        tracing::info!(version = %p.version, "SIGHUP: policy reloaded");
                        metrics()
                            .policy_reloads_total
                            .with_label_values(&["ok"])
                            .inc();
                        shared.replace(p);
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), version = %shared.current().version, "SIGHUP: policy refused; keeping the last good one");
                        metrics()
                            .policy_reloads_total
                            .with_label_values(&["refused"])
                            .inc();
                    }
                }
            }
        });
        Ok(())
    }
}
