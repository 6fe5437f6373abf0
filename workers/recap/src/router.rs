//! `recap router`: consumes `recap.ingest`, decides each job's tier with the
//! cost policy, records the decision and publishes the job to its tier
//! queue. The decision row and the job's move to `routed` commit together;
//! the ingest message is acked only after the tier publish is confirmed.

use crate::consume::{Ctx, Handler, Verdict};
use crate::metrics::metrics;
use crate::queue::{self, EXCHANGE_JOBS};
use crate::store::{self, Decision, RouteOutcome};
use lapin::message::Delivery;
use lapin::Channel;
use recap_engine::Summarizer;
use recap_job::{parse_job, Job};
use recap_policy::{Features, Tiers};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Instant;

pub const POLICY_VERSION: &str = "foundation-1";

pub struct Router {
    pub pool: PgPool,
    pub config: Arc<crate::config::Config>,
    /// The compact model's tokenizer, for the `input_tokens` feature.
    pub counter: Arc<dyn Summarizer>,
    /// Publishes to the tier queues; confirm mode.
    pub publish: Channel,
}

impl Router {
    pub fn tiers(&self) -> Tiers {
        Tiers {
            compact: self.config.tier_model("compact").map(str::to_string),
            large: self.config.tier_model("large").map(str::to_string),
        }
    }

    pub fn features(&self, job: &Job) -> Features {
        let text: String = job
            .transcript
            .iter()
            .map(|u| u.line())
            .collect::<Vec<_>>()
            .join("\n");
        // A tokenizer failure must not lose the job: fall back to bytes/4,
        // the usual rule of thumb, and say so in the log.
        let input_tokens = self.counter.count_tokens(&text).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "token count failed; estimating from bytes");
            text.len() / 4
        }) as u64;
        Features {
            tenant: job.tenant.clone(),
            input_tokens,
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

    async fn publish_to_tier(
        &self,
        delivery: &Delivery,
        tier: &str,
    ) -> Result<(), queue::QueueError> {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut props = queue::job_properties(None, headers);
        if let Some(id) = delivery.properties.message_id() {
            props = props.with_message_id(id.clone());
        }
        queue::publish_confirmed(&self.publish, EXCHANGE_JOBS, tier, &delivery.data, props).await
    }
}

impl Handler for Router {
    async fn handle(&self, delivery: &Delivery, _ctx: Ctx) -> Verdict {
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
        let features = self.features(&job);
        let decision = match recap_policy::decide(&features, &self.tiers()) {
            Ok(d) => d,
            Err(e) => {
                return Verdict::DeadLetter {
                    code: "no_tier".into(),
                    detail: e.to_string(),
                    job_id: Some(job.job_id),
                    tenant: Some(job.tenant.clone()),
                }
            }
        };
        let row = Decision {
            tier: decision.tier.clone(),
            model: decision.model.clone(),
            reason: decision.reason.clone(),
            features: serde_json::to_value(&features).unwrap_or_default(),
            estimated_cost_usd: decision.estimated_cost_usd,
            policy_version: POLICY_VERSION.into(),
        };
        let tier = match store::record_route(&self.pool, &job, &row).await {
            Ok(RouteOutcome::Routed) => {
                metrics()
                    .route_decisions_total
                    .with_label_values(&[&decision.tier, &decision.reason])
                    .inc();
                decision.tier
            }
            Ok(RouteOutcome::AlreadyRouted { tier, status }) => {
                // A redelivery may be one whose first tier publish never
                // got confirmed: publish again (workers deduplicate). A
                // fresh duplicate of a routed job is dropped.
                if status.is_terminal() || !delivery.redelivered {
                    tracing::info!(job_id = %job.job_id, status = status.as_str(), "duplicate job on ingest; dropped");
                    return Verdict::Ack;
                }
                tier
            }
            Err(e) => {
                return Verdict::Requeue {
                    detail: format!("recording the route: {e}"),
                }
            }
        };
        if let Err(e) = self.publish_to_tier(delivery, &tier).await {
            return Verdict::Requeue {
                detail: format!("publishing to tier {tier}: {e}"),
            };
        }
        metrics()
            .job_duration_seconds
            .with_label_values(&["routing"])
            .observe(started.elapsed().as_secs_f64());
        Verdict::Ack
    }
}
