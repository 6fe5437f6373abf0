//! `recap worker --tier compact|large`: the worker loop. Takes jobs from its
//! tier queue, runs them through the tier's model (loaded once), and commits
//! the summaries before it acks. A redelivered job that already succeeded
//! is acked without running.

use crate::consume::{Ctx, Handler, Verdict};
use crate::metrics::metrics;
use crate::policy::SharedPolicy;
use crate::queue::{self, EXCHANGE_JOBS, H_CASCADE, H_MODEL, H_SHADOW};
use crate::store::{self, Completion, Decision, StartOutcome};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use recap_engine::{EngineError, Extractive, SummarizeRequest, Summarizer, SummaryOutput};
use recap_job::{parse_job, Job};
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
    /// The free baseline, for jobs the policy routed to it (economy, budget).
    pub extractive: Arc<Extractive>,
    pub policy: SharedPolicy,
}

impl Worker {
    /// The cascade's verdict on compact outputs: the failed checks, if any.
    fn cascade_failures(&self, job: &Job, outputs: &[SummaryOutput]) -> Vec<String> {
        let policy = self.policy.current();
        if !policy.rules.cascade
            || self.tier != "compact"
            || self.config.tier_model("large").is_none()
        {
            return Vec::new();
        }
        let speakers = job.speakers();
        let mut failed: Vec<String> = outputs
            .iter()
            .flat_map(|o| {
                recap_policy::cascade::check(
                    &o.text,
                    o.kind.as_str(),
                    &speakers,
                    job.language.as_deref(),
                    &policy.cascade,
                )
                .into_iter()
                .map(move |f| format!("{}:{}", o.kind, f.as_str()))
            })
            .collect();
        failed.dedup();
        failed
    }

    /// Sends the job on to the large tier, once, with reason `cascade`.
    async fn cascade(
        &self,
        ch: &lapin::Channel,
        delivery: &Delivery,
        job: &Job,
        failed: &[String],
    ) -> Verdict {
        let Some(large) = self.config.tier_model("large") else {
            return Verdict::Ack;
        };
        let policy = self.policy.current();
        let decision = Decision {
            tier: "large".into(),
            model: large.to_string(),
            reason: "cascade".into(),
            features: serde_json::json!({ "failed_checks": failed, "compact_model": self.engine.model_id() }),
            trail: serde_json::json!([format!(
                "cascade: compact output failed {}",
                failed.join(", ")
            )]),
            estimated_cost_usd: 0.0,
            policy_version: policy.version.clone(),
            shadow: false,
        };
        match store::record_cascade(&self.pool, job, &decision).await {
            Ok(true) => {}
            Ok(false) => return Verdict::Ack,
            Err(e) => {
                return Verdict::Requeue {
                    detail: format!("recording the cascade: {e}"),
                }
            }
        }
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(queue::short(H_CASCADE), AMQPValue::Boolean(true));
        headers.insert(queue::short(H_MODEL), queue::string_value(large));
        let props = queue::job_properties(Some(job.job_id), headers);
        if let Err(e) =
            queue::publish_confirmed(ch, EXCHANGE_JOBS, "large", &delivery.data, props).await
        {
            return Verdict::Requeue {
                detail: format!("publishing the cascade: {e}"),
            };
        }
        for f in failed {
            let check = f.split(':').nth(1).unwrap_or(f);
            metrics().cascades_total.with_label_values(&[check]).inc();
        }
        tracing::info!(job_id = %job.job_id, failed = ?failed, "compact output failed its checks: cascaded to large");
        Verdict::Ack
    }
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
        let shadow = queue::header_bool(&delivery.properties, H_SHADOW);
        let routed_model = queue::header_str(&delivery.properties, H_MODEL);
        let engine: Arc<dyn Summarizer> =
            if routed_model.as_deref() == Some(self.extractive.model_id()) {
                self.extractive.clone()
            } else {
                self.engine.clone()
            };
        let model = engine.model_id().to_string();
        if !shadow {
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
        }

        let started = Instant::now();
        let engine_for_task = engine.clone();
        let deadline = started + Duration::from_secs(self.config.worker.job_deadline_s);
        let cancel = ctx.cancel.clone();
        let job_for_engine = job.clone();
        let result = tokio::task::spawn_blocking(move || {
            engine_for_task.summarize(&SummarizeRequest {
                transcript: &job_for_engine.transcript,
                kinds: &job_for_engine.summaries,
                language: job_for_engine.language.as_deref(),
                query: None,
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
        let price = if model == self.price.id {
            self.price.cost(tin, tout)
        } else {
            0.0
        };
        let done = Completion {
            tier: &self.tier,
            model: &model,
            engine: engine.engine(),
            outputs: &outputs,
            cost_usd: price,
        };
        if shadow {
            return match store::record_shadow(&self.pool, &job, &done).await {
                Ok(()) => Verdict::Ack,
                Err(e) => Verdict::Requeue {
                    detail: format!("recording the shadow run: {e}"),
                },
            };
        }
        if !queue::header_bool(&delivery.properties, H_CASCADE) && engine.engine() != "extractive" {
            let failed = self.cascade_failures(&job, &outputs);
            if !failed.is_empty() {
                return self.cascade(&ctx.publish, delivery, &job, &failed).await;
            }
        }
        match store::complete_job(&self.pool, &job, &done).await {
            Ok(true) => {
                let payload = crate::webhooks::event_payload(
                    "job.completed",
                    job.job_id,
                    &job.tenant,
                    "succeeded",
                    serde_json::json!({"model": model, "tier": self.tier, "cost_usd": done.cost_usd}),
                );
                // The summaries are committed; a lost event is logged, not retried.
                if let Err(e) = crate::webhooks::publish_event(&ctx.publish, &payload).await {
                    tracing::warn!(job_id = %job.job_id, error = %e, "completion event not published");
                }
            }
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
