//! `recap router`: consumes `recap.ingest`, decides each job's tier with the
//! cost policy, records the decision and publishes the job to its tier
//! queue. The decision row, the budget estimate and the job's move to
//! `routed` commit together under the tenant's budget lock; the ingest
//! message is acked only after the tier publish is confirmed.

use crate::consume::{Ctx, Handler, Verdict};
use crate::engines::TokenCounter;
use crate::metrics::metrics;
use crate::policy::SharedPolicy;
use crate::queue::{self, EXCHANGE_JOBS, H_MODEL, H_SHADOW};
use crate::store::{self, Decision, RouteOutcome};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use recap_job::{parse_job, Job};
use recap_policy::{BudgetState, Features, Tiers};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Instant;

pub struct Router {
    pub pool: PgPool,
    pub config: Arc<crate::config::Config>,
    pub policy: SharedPolicy,
    pub tiers: Tiers,
    /// The compact model's tokenizer, for the `input_tokens` feature.
    pub counter: TokenCounter,
}

/// The features the policy decides on.
pub fn features(job: &Job, counter: &TokenCounter) -> Features {
    let text: String = job
        .transcript
        .iter()
        .map(|u| u.line())
        .collect::<Vec<_>>()
        .join("\n");
    Features {
        job_id: job.job_id.to_string(),
        tenant: job.tenant.clone(),
        input_tokens: counter(&text) as u64,
        utterances: job.transcript.len() as u32,
        speakers: job.speakers().len() as u32,
        kinds: job
            .summaries
            .iter()
            .map(|k| k.as_str().to_string())
            .collect(),
        quality: job.quality.as_str().to_string(),
    }
}

impl Router {
    async fn publish_to(
        &self,
        ch: &lapin::Channel,
        delivery: &Delivery,
        tier: &str,
        model: &str,
        shadow: bool,
    ) -> Result<(), queue::QueueError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(queue::short(H_MODEL), queue::string_value(model));
        if shadow {
            headers.insert(queue::short(H_SHADOW), AMQPValue::Boolean(true));
        }
        let mut props = queue::job_properties(None, headers);
        if let Some(id) = delivery.properties.message_id() {
            props = props.with_message_id(id.clone());
        }
        queue::publish_confirmed(ch, EXCHANGE_JOBS, tier, &delivery.data, props).await
    }
}

impl Handler for Router {
    async fn handle(&self, delivery: &Delivery, ctx: Ctx) -> Verdict {
        let started = Instant::now();
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
        let features = features(&job, &self.counter);
        let policy = self.policy.current();
        let tiers = self.tiers.clone();
        let decide = |budget: BudgetState| {
            let m = metrics();
            if let Some(d) = budget.daily_remaining_usd {
                m.budget_remaining_usd
                    .with_label_values(&[&job.tenant, "daily"])
                    .set(d);
            }
            if let Some(mo) = budget.monthly_remaining_usd {
                m.budget_remaining_usd
                    .with_label_values(&[&job.tenant, "monthly"])
                    .set(mo);
            }
            for (period, limit) in [
                ("daily", budget.daily_limit_usd),
                ("monthly", budget.monthly_limit_usd),
            ] {
                if let Some(l) = limit {
                    m.budget_limit_usd
                        .with_label_values(&[&job.tenant, period])
                        .set(l);
                }
            }
            policy.decide(&features, &tiers, &budget).map(|d| Decision {
                tier: d.tier.as_str().to_string(),
                model: d.model.clone(),
                reason: d.reason.clone(),
                features: serde_json::to_value(&features).unwrap_or_default(),
                trail: serde_json::to_value(&d.trail).unwrap_or_default(),
                estimated_cost_usd: d.estimated_cost_usd,
                policy_version: policy.version.clone(),
                shadow: d.shadow,
            })
        };
        let (tier, model, shadow) = match store::route_job(&self.pool, &job, decide).await {
            Ok(RouteOutcome::Routed {
                tier,
                model,
                reason,
                shadow,
            }) => {
                metrics()
                    .route_decisions_total
                    .with_label_values(&[&tier, &reason])
                    .inc();
                (tier, model, shadow)
            }
            Ok(RouteOutcome::AlreadyRouted {
                tier,
                model,
                status,
            }) => {
                // A redelivery may be one whose first tier publish never
                // got confirmed: publish again (workers deduplicate). A
                // fresh duplicate of a routed job is dropped.
                if status.is_terminal() || !delivery.redelivered || tier.is_empty() {
                    tracing::info!(job_id = %job.job_id, status = status.as_str(), "duplicate job on ingest; dropped");
                    return Verdict::Ack;
                }
                (tier, model, false)
            }
            Ok(RouteOutcome::Refused { code, message }) => {
                return Verdict::DeadLetter {
                    code,
                    detail: message,
                    job_id: Some(job.job_id),
                    tenant: Some(job.tenant.clone()),
                }
            }
            Err(e) => {
                return Verdict::Requeue {
                    detail: format!("recording the route: {e}"),
                }
            }
        };
        if let Err(e) = self
            .publish_to(&ctx.publish, delivery, &tier, &model, false)
            .await
        {
            return Verdict::Requeue {
                detail: format!("publishing to tier {tier}: {e}"),
            };
        }
        if shadow {
            if let Some(large) = self.tiers.large.as_deref() {
                if let Err(e) = self
                    .publish_to(&ctx.publish, delivery, "large", large, true)
                    .await
                {
                    // The job itself is on its way; a lost shadow costs only calibration data.
                    tracing::warn!(job_id = %job.job_id, error = %e, "shadow publish failed");
                }
            }
        }
        metrics()
            .job_duration_seconds
            .with_label_values(&["routing"])
            .observe(started.elapsed().as_secs_f64());
        Verdict::Ack
    }
}
