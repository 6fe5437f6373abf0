//! `recap worker --tier compact|large`: the worker loop. Takes jobs from its
//! tier queue, runs them through the tier's model (loaded once), and commits
//! the summaries before it acks. A redelivered job that already succeeded
//! is acked without running.

use crate::consume::{Ctx, Handler, Verdict};
use crate::metrics::metrics;
use crate::policy::SharedPolicy;
use crate::queue::{self, EXCHANGE_JOBS, H_CASCADE, H_MODEL, H_SHADOW};
use crate::store::{self, Committed, Completion, Decision, StartOutcome, SummaryRecord};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use recap_engine::{EngineError, Extractive, SummarizeRequest, Summarizer, SummaryOutput};
use recap_job::{parse_job, Job};
use recap_policy::Tier;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Worker {
    pub tier: Tier,
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
    fn cascade_failures(&self, ran: &Ran) -> Vec<String> {
        let policy = self.policy.current();
        if !policy.rules.cascade
            || self.tier != Tier::Compact
            || self.config.tier_model(Tier::Large).is_none()
        {
            return Vec::new();
        }
        let job = &ran.run.job;
        let speakers = job.speakers();
        let mut failed: Vec<String> = ran
            .outputs
            .iter()
            .zip(&ran.signals)
            .flat_map(|(o, s)| {
                policy
                    .judge(&o.text, &speakers, job.language.as_deref(), s)
                    .into_iter()
                    .map(move |f| format!("{}:{}", o.kind, f.as_str()))
            })
            .collect();
        failed.dedup();
        failed
    }

    /// Sends the job on to the large tier, once, with reason `cascade`. The
    /// decision row keeps what the cascade saw: each output's signals and,
    /// with a calibrated policy, its score and the threshold.
    async fn cascade(
        &self,
        ch: &lapin::Channel,
        delivery: &Delivery,
        ran: &Ran,
        failed: &[String],
    ) -> Verdict {
        let job = &ran.run.job;
        let Some(large) = self.config.tier_model(Tier::Large) else {
            return Verdict::Ack;
        };
        let policy = self.policy.current();
        let decision = Decision {
            tier: Tier::Large,
            model: large.to_string(),
            reason: recap_policy::Reason::Cascade,
            features: serde_json::json!({
                "failed_checks": failed,
                "compact_model": self.engine.model_id(),
                "outputs": ran.outputs.iter().zip(&ran.signals).map(|(o, s)| serde_json::json!({
                    "kind": o.kind,
                    "signals": s,
                    "score": policy.score.as_ref().map(|sc| sc.probability(s)),
                })).collect::<Vec<_>>(),
                "threshold": policy.score.as_ref().filter(|_| policy.rules.score).map(|sc| sc.threshold),
            }),
            trail: serde_json::json!([format!(
                "cascade: compact output failed {}",
                failed.join(", ")
            )]),
            estimated_cost_usd: 0.0,
            policy_version: policy.version.clone(),
            shadow: false,
        };
        match store::record_cascade(&self.pool, job, &decision).await {
            Ok(Committed::Written) => {}
            Ok(Committed::AlreadyEnded) => return Verdict::Ack,
            Ok(Committed::TenantMismatch) => return Verdict::tenant_mismatch(job),
            Err(e) => {
                return Verdict::Requeue {
                    detail: format!("recording the cascade: {e}"),
                }
            }
        }
        let mut headers = queue::forwarded_headers(&delivery.properties);
        headers.insert(queue::short(H_CASCADE), AMQPValue::Boolean(true));
        headers.insert(queue::short(H_MODEL), queue::string_value(large));
        let props = queue::job_properties(Some(job.job_id), headers);
        if let Err(e) = queue::publish_confirmed(
            ch,
            EXCHANGE_JOBS,
            Tier::Large.as_str(),
            &delivery.data,
            props,
        )
        .await
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

/// A parsed job on its way through a batch.
struct Run {
    /// Its delivery's place in the batch.
    at: usize,
    job: Job,
    shadow: bool,
    engine: Arc<dyn Summarizer>,
    start: Start,
}

/// When a job's row moves to `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Start {
    /// Before the run, in a transaction of its own.
    BeforeRun,
    /// In the transaction that completes it (an instant engine's run); its
    /// row most likely there (the router wrote it).
    WithCompletion,
    /// The same, the row most likely missing (the job was published
    /// straight onto the tier queue): it is inserted already ended.
    WithCompletionNewRow,
}

/// A run whose engine is through with it.
struct Ran {
    run: Run,
    outputs: Vec<SummaryRecord>,
    /// Each output's signals, for the cascade and the `summaries` row.
    signals: Vec<recap_policy::score::Signals>,
    inference: Duration,
}

impl Worker {
    /// The engine the router chose: the tier's model, or the free baseline.
    fn engine_for(&self, delivery: &Delivery) -> Arc<dyn Summarizer> {
        let routed_model = queue::header_str(&delivery.properties, H_MODEL);
        if routed_model.as_deref() == Some(self.extractive.model_id()) {
            self.extractive.clone()
        } else {
            self.engine.clone()
        }
    }

    /// Moves the batch's jobs to `running` in one commit. Returns the runs
    /// to carry on with; the others have their verdicts.
    async fn start(&self, runs: Vec<Run>, verdicts: &mut [Option<Verdict>]) -> Vec<Run> {
        let items: Vec<(&Job, &str)> = runs
            .iter()
            .filter(|r| !r.shadow)
            .map(|r| (&r.job, r.engine.model_id()))
            .collect();
        let mut outcomes = store::start_jobs(&self.pool, self.tier, &items)
            .await
            .into_iter();
        let mut keep = Vec::with_capacity(runs.len());
        for run in runs {
            if run.shadow {
                keep.push(run);
                continue;
            }
            match outcomes.next() {
                Some(Ok(StartOutcome::Run { .. })) => keep.push(run),
                Some(Ok(StartOutcome::TenantMismatch)) => {
                    verdicts[run.at] = Some(Verdict::tenant_mismatch(&run.job));
                }
                Some(Ok(StartOutcome::AlreadyDone(status))) => {
                    tracing::info!(job_id = %run.job.job_id, status = status.as_str(), "job already ended; redelivery acked");
                    verdicts[run.at] = Some(Verdict::Ack);
                }
                Some(Err(e)) => {
                    verdicts[run.at] = Some(Verdict::Requeue {
                        detail: format!("starting the job: {e}"),
                    })
                }
                None => {
                    verdicts[run.at] = Some(Verdict::Requeue {
                        detail: "starting the job: no result".into(),
                    })
                }
            }
        }
        keep
    }

    /// Runs the engines: the jobs of one engine go to it together, so that
    /// an engine that batches runs them in one pass. The batch shares one
    /// deadline, counted from the start of the pass.
    async fn infer(&self, runs: Vec<Run>, ctx: &Ctx, verdicts: &mut [Option<Verdict>]) -> Vec<Ran> {
        let mut groups: Vec<Vec<Run>> = Vec::new();
        for run in runs {
            match groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(&g[0].engine, &run.engine))
            {
                Some(g) => g.push(run),
                None => groups.push(vec![run]),
            }
        }
        let mut ran = Vec::new();
        for group in groups {
            let ids: Vec<(usize, uuid::Uuid, String)> = group
                .iter()
                .map(|r| (r.at, r.job.job_id, r.job.tenant.clone()))
                .collect();
            let started = Instant::now();
            let deadline = started + Duration::from_secs(self.config.worker.job_deadline_s);
            let cancel = ctx.cancel.clone();
            let engine = group[0].engine.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let reqs: Vec<SummarizeRequest<'_>> = group
                    .iter()
                    .map(|r| SummarizeRequest {
                        transcript: &r.job.transcript,
                        kinds: &r.job.summaries,
                        language: r.job.language.as_deref(),
                        query: None,
                        deadline: Some(deadline),
                        cancel: cancel.clone(),
                    })
                    .collect();
                let results = engine.summarize_batch(&reqs);
                drop(reqs);
                (group, results)
            })
            .await;
            let inference = started.elapsed();
            let (group, results) = match joined {
                Ok(done) => done,
                Err(join) => {
                    // A panic inside the engine: treat like a model failure.
                    for (at, job_id, tenant) in ids {
                        verdicts[at] = Some(Verdict::Retry {
                            code: "engine_panic".into(),
                            detail: format!("engine panicked: {join}"),
                            job_id,
                            tenant,
                        });
                    }
                    continue;
                }
            };
            let mut results = results.into_iter();
            for run in group {
                let at = run.at;
                match self.after_inference(run, results.next(), inference) {
                    Ok(r) => ran.push(r),
                    Err(verdict) => verdicts[at] = Some(verdict),
                }
            }
        }
        ran
    }

    /// A job's engine result: its outputs with their signals, or the
    /// verdict of a job the engine did not summarize.
    fn after_inference(
        &self,
        run: Run,
        result: Option<Result<Vec<SummaryOutput>, EngineError>>,
        inference: Duration,
    ) -> Result<Ran, Verdict> {
        match result {
            Some(Ok(outputs)) => Ok(Ran {
                signals: {
                    let view = crate::policy::JobView::of(&run.job);
                    outputs
                        .iter()
                        .map(|o| view.signals(o.into(), None))
                        .collect()
                },
                run,
                outputs: outputs.into_iter().map(summary_record).collect(),
                inference,
            }),
            Some(Err(EngineError::Cancelled)) => Err(Verdict::Requeue {
                detail: "cancelled by shutdown".into(),
            }),
            Some(Err(e)) => {
                metrics()
                    .jobs_total
                    .with_label_values(&[self.tier.as_str(), run.engine.model_id(), "error"])
                    .inc();
                Err(Verdict::Retry {
                    code: e.code().to_string(),
                    detail: e.to_string(),
                    job_id: run.job.job_id,
                    tenant: run.job.tenant.clone(),
                })
            }
            None => Err(Verdict::Retry {
                code: "model_error".into(),
                detail: "the engine returned no result for this job".into(),
                job_id: run.job.job_id,
                tenant: run.job.tenant.clone(),
            }),
        }
    }

    /// One commit for each way of starting, in `Start`'s order (`ran` is
    /// sorted by it; `items` are its completions).
    async fn commit_completions(
        &self,
        ran: &[&Ran],
        items: &[(&Job, Completion<'_>)],
    ) -> Vec<Result<Committed, store::StoreError>> {
        let mut outcomes = Vec::with_capacity(items.len());
        let mut from = 0;
        while from < items.len() {
            let start = ran[from].run.start;
            let to = from + ran[from..].partition_point(|r| r.run.start == start);
            let group = &items[from..to];
            outcomes.extend(match start {
                Start::BeforeRun => store::complete_jobs(&self.pool, group).await,
                Start::WithCompletion | Start::WithCompletionNewRow => {
                    let new_rows = start == Start::WithCompletionNewRow;
                    store::start_and_complete_jobs(&self.pool, self.tier, group, new_rows).await
                }
            });
            from = to;
        }
        outcomes
    }

    fn completion<'a>(&'a self, ran: &'a Ran) -> Completion<'a> {
        let (tin, tout) = token_totals(&ran.outputs);
        let model = ran.run.engine.model_id();
        Completion {
            tier: self.tier,
            model,
            engine: ran.run.engine.engine(),
            outputs: &ran.outputs,
            signals: &ran.signals,
            cost_usd: if model == self.price.id {
                self.price.cost(tin, tout)
            } else {
                0.0
            },
        }
    }

    /// Shadow runs are recorded, failed compact outputs cascade, and the
    /// rest commit together, then their events go out with pipelined
    /// confirms.
    async fn persist(
        &self,
        ran: Vec<Ran>,
        deliveries: &[Delivery],
        ctx: &Ctx,
        verdicts: &mut [Option<Verdict>],
    ) {
        let persist_start = Instant::now();
        let mut to_complete = Vec::with_capacity(ran.len());
        for r in &ran {
            let delivery = &deliveries[r.run.at];
            if r.run.shadow {
                let done = self.completion(r);
                verdicts[r.run.at] = Some(
                    match store::record_shadow(&self.pool, &r.run.job, &done).await {
                        Ok(Committed::TenantMismatch) => Verdict::tenant_mismatch(&r.run.job),
                        Ok(_) => Verdict::Ack,
                        Err(e) => Verdict::Requeue {
                            detail: format!("recording the shadow run: {e}"),
                        },
                    },
                );
                continue;
            }
            if !queue::header_bool(&delivery.properties, H_CASCADE)
                && r.run.engine.engine() != "extractive"
            {
                let failed = self.cascade_failures(r);
                if !failed.is_empty() {
                    verdicts[r.run.at] =
                        Some(self.cascade(&ctx.publish, delivery, r, &failed).await);
                    continue;
                }
            }
            to_complete.push(r);
        }
        to_complete.sort_by_key(|r| r.run.start);
        let items: Vec<(&Job, Completion<'_>)> = to_complete
            .iter()
            .map(|r| (&r.run.job, self.completion(r)))
            .collect();
        let outcomes = self.commit_completions(&to_complete, &items).await;
        let mut events = Vec::new();
        let mut succeeded = Vec::new();
        for ((r, (_, done)), outcome) in to_complete.iter().zip(&items).zip(outcomes) {
            verdicts[r.run.at] = Some(match outcome {
                Ok(Committed::Written) => {
                    events.push(crate::webhooks::event_payload(
                        "job.completed",
                        r.run.job.job_id,
                        &r.run.job.tenant,
                        "succeeded",
                        serde_json::json!({"model": done.model, "tier": self.tier.as_str(), "cost_usd": done.cost_usd}),
                    ));
                    succeeded.push((*r, done.cost_usd));
                    Verdict::Ack
                }
                Ok(Committed::AlreadyEnded) => {
                    tracing::info!(job_id = %r.run.job.job_id, "job ended meanwhile; result discarded");
                    Verdict::Ack
                }
                Ok(Committed::TenantMismatch) => Verdict::tenant_mismatch(&r.run.job),
                Err(e) => Verdict::Requeue {
                    detail: format!("committing the summaries: {e}"),
                },
            });
        }
        // The summaries are committed; a lost event is logged, not retried.
        for (result, event) in crate::webhooks::publish_events(&ctx.publish, &events)
            .await
            .into_iter()
            .zip(&events)
        {
            if let Err(e) = result {
                tracing::warn!(job_id = %event["job_id"], error = %e, "completion event not published");
            }
        }
        let persist = persist_start.elapsed();
        for (r, cost_usd) in succeeded {
            record_success(self.tier, r, persist, cost_usd);
        }
    }
}

/// An engine's output as the store writes it (its confidence has gone
/// into the signals by then).
fn summary_record(o: SummaryOutput) -> SummaryRecord {
    SummaryRecord {
        kind: o.kind,
        text: o.text,
        input_tokens: o.input_tokens,
        output_tokens: o.output_tokens,
        prefill_ms: o.prefill_ms,
        decode_ms: o.decode_ms,
        total_ms: o.total_ms,
        chunks: o.chunks,
    }
}

fn token_totals(outputs: &[SummaryRecord]) -> (u64, u64) {
    outputs.iter().fold((0u64, 0u64), |(a, b), o| {
        (a + o.input_tokens as u64, b + o.output_tokens as u64)
    })
}

fn record_success(tier: Tier, r: &Ran, persist: Duration, cost_usd: f64) {
    let model = r.run.engine.model_id();
    let (tin, tout) = token_totals(&r.outputs);
    let m = metrics();
    m.job_duration_seconds
        .with_label_values(&["inference"])
        .observe(r.inference.as_secs_f64());
    m.job_duration_seconds
        .with_label_values(&["persist"])
        .observe(persist.as_secs_f64());
    m.jobs_total
        .with_label_values(&[tier.as_str(), model, "succeeded"])
        .inc();
    m.tokens_total
        .with_label_values(&[model, "input"])
        .inc_by(tin as f64);
    m.tokens_total
        .with_label_values(&[model, "output"])
        .inc_by(tout as f64);
    m.cost_usd_total
        .with_label_values(&[&r.run.job.tenant, tier.as_str()])
        .inc_by(cost_usd);
    let decode_ms: f64 = r.outputs.iter().map(|o| o.decode_ms).sum();
    if decode_ms > 0.0 {
        m.generation_tokens_per_second
            .with_label_values(&[model])
            .set(tout as f64 / (decode_ms / 1e3));
    }
    tracing::debug!(job_id = %r.run.job.job_id, ms = r.inference.as_millis() as u64, "job succeeded");
}

impl Handler for Worker {
    async fn handle(&self, deliveries: &[Delivery], ctx: Ctx) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = deliveries.iter().map(|_| None).collect();
        let mut runs = Vec::with_capacity(deliveries.len());
        for (at, delivery) in deliveries.iter().enumerate() {
            match parse_job(&delivery.data, &self.config.limits) {
                Ok(job) => {
                    let shadow = queue::header_bool(&delivery.properties, H_SHADOW);
                    let engine = self.engine_for(delivery);
                    let start = if shadow || !engine.is_instant() {
                        Start::BeforeRun
                    } else if queue::header_str(&delivery.properties, H_MODEL).is_some() {
                        Start::WithCompletion
                    } else {
                        Start::WithCompletionNewRow
                    };
                    runs.push(Run {
                        at,
                        job,
                        shadow,
                        engine,
                        start,
                    })
                }
                Err(r) => verdicts[at] = Some(Verdict::refused(r)),
            }
        }
        let (to_start, mut runs): (Vec<Run>, Vec<Run>) =
            runs.into_iter().partition(|r| r.start == Start::BeforeRun);
        runs.extend(self.start(to_start, &mut verdicts).await);
        let ran = self.infer(runs, &ctx, &mut verdicts).await;
        self.persist(ran, deliveries, &ctx, &mut verdicts).await;
        Verdict::all(verdicts)
    }
}
