//! `recap worker --tier compact|large`: the worker loop. Takes jobs from its
//! tier queue, runs them through the tier's model (loaded once), and commits
//! the summaries before it acks. A redelivered job that already succeeded
//! is acked without running.

use crate::consume::{Ctx, Handler, Verdict};
use crate::metrics::metrics;
use crate::store::{self, Completion, StartOutcome};
use lapin::message::Delivery;
use recap_engine::{EngineError, SummarizeRequest, Summarizer};
use recap_job::parse_job;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Worker {
    pub tier: String,
    pub pool: PgPool,
    pub config: Arc<crate::config::Config>,
    pub engine: Arc<dyn Summarizer>,
    /// The model's catalog entry: its prices make the job's cost.
    pub price: recap_engine::catalog::ModelEntry,
}

impl Handler for Worker {
    async fn handle(&self, delivery: &Delivery, ctx: Ctx) -> Verdict {
        let job = match parse_job(&delivery.data, &self.config.limits) {
            Ok(job) => job,
            Err(r) => {
                return Verdict::DeadLetter {
                    code: r.code.as_str().to_string(),
                    detail: r.to_string(),
                    job_id: r.job_id,
                    tenant: r.tenant,
                }
            }
        };
        let model = self.engine.model_id().to_string();
        match store::start_job(&self.pool, &job, &self.tier, &model).await {
            Ok(StartOutcome::Run { .. }) => {}
            Ok(StartOutcome::AlreadyDone(status)) => {
                tracing::info!(job_id = %job.job_id, status = status.as_str(), "job already ended; redelivery acked");
                return Verdict::Ack;
            }
            Err(e) => {
                return Verdict::Requeue {
                    detail: format!("starting the job: {e}"),
                }
            }
        }

        let started = Instant::now();
        let engine = self.engine.clone();
        let deadline = started + Duration::from_secs(self.config.worker.job_deadline_s);
        let cancel = ctx.cancel.clone();
        let job_for_engine = job.clone();
        let result = tokio::task::spawn_blocking(move || {
            engine.summarize(&SummarizeRequest {
                transcript: &job_for_engine.transcript,
                kinds: &job_for_engine.summaries,
                language: job_for_engine.language.as_deref(),
                deadline: Some(deadline),
                cancel,
            })
        })
        .await;
        let outputs = match result {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(EngineError::Cancelled)) => {
                return Verdict::Requeue {
                    detail: "cancelled by shutdown".into(),
                }
            }
            Ok(Err(e)) => {
                metrics()
                    .jobs_total
                    .with_label_values(&[&self.tier, &model, "error"])
                    .inc();
                return Verdict::Retry {
                    code: e.code().to_string(),
                    detail: e.to_string(),
                    job_id: job.job_id,
                    tenant: job.tenant.clone(),
                };
            }
            Err(join) => {
                // A panic inside the engine: treat like a model failure.
                return Verdict::Retry {
                    code: "engine_panic".into(),
                    detail: format!("engine panicked: {join}"),
                    job_id: job.job_id,
                    tenant: job.tenant.clone(),
                };
            }
        };
        let inference = started.elapsed();

        let persist_start = Instant::now();
        let (tin, tout) = outputs.iter().fold((0u64, 0u64), |(a, b), o| {
            (a + o.input_tokens as u64, b + o.output_tokens as u64)
        });
        let done = Completion {
            tier: &self.tier,
            model: &model,
            engine: self.engine.engine(),
            outputs: &outputs,
            cost_usd: self.price.cost(tin, tout),
        };
        match store::complete_job(&self.pool, &job, &done).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(job_id = %job.job_id, "job ended meanwhile; result discarded");
                return Verdict::Ack;
            }
            Err(e) => {
                return Verdict::Requeue {
                    detail: format!("committing the summaries: {e}"),
                }
            }
        }
        let m = metrics();
        m.job_duration_seconds
            .with_label_values(&["inference"])
            .observe(inference.as_secs_f64());
        m.job_duration_seconds
            .with_label_values(&["persist"])
            .observe(persist_start.elapsed().as_secs_f64());
        m.jobs_total
            .with_label_values(&[&self.tier, &model, "succeeded"])
            .inc();
        m.tokens_total
            .with_label_values(&[&model, "input"])
            .inc_by(tin as f64);
        m.tokens_total
            .with_label_values(&[&model, "output"])
            .inc_by(tout as f64);
        m.cost_usd_total
            .with_label_values(&[&job.tenant, &self.tier])
            .inc_by(done.cost_usd);
        let decode_ms: f64 = outputs.iter().map(|o| o.decode_ms).sum();
        if decode_ms > 0.0 {
            m.generation_tokens_per_second
                .with_label_values(&[&model])
                .set(tout as f64 / (decode_ms / 1e3));
        }
        tracing::debug!(job_id = %job.job_id, ms = inference.as_millis() as u64, "job succeeded");
        Verdict::Ack
    }
}
