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
use recap_policy::{BudgetState, Features, Tier, Tiers};
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
    /// The message for a tier queue: the ingest message with the routed
    /// model (and the shadow mark) in its headers.
    fn tier_message<'a>(
        delivery: &'a Delivery,
        tier: &'a str,
        model: &str,
        shadow: bool,
    ) -> queue::Outgoing<'a> {
        let mut headers = queue::forwarded_headers(&delivery.properties);
        headers.insert(queue::short(H_MODEL), queue::string_value(model));
        if shadow {
            headers.insert(queue::short(H_SHADOW), AMQPValue::Boolean(true));
        }
        let mut props = queue::job_properties(None, headers);
        if let Some(id) = delivery.properties.message_id() {
            props = props.with_message_id(id.clone());
        }
        queue::Outgoing {
            exchange: EXCHANGE_JOBS,
            routing_key: tier,
            payload: &delivery.data,
            props,
            mandatory: true,
        }
    }

    /// The policy's decision for one job, with the budget gauges set.
    fn decide(
        &self,
        job: &Job,
        budget: BudgetState,
    ) -> Result<Decision, recap_policy::PolicyError> {
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
        let features = features(job, &self.counter);
        let policy = self.policy.current();
        policy
            .decide(&features, &self.tiers, &budget)
            .map(|d| Decision {
                tier: d.tier,
                model: d.model.clone(),
                reason: d.reason,
                features: serde_json::to_value(&features).unwrap_or_default(),
                trail: serde_json::to_value(&d.trail).unwrap_or_default(),
                estimated_cost_usd: d.estimated_cost_usd,
                policy_version: policy.version.clone(),
                shadow: d.shadow,
            })
    }
}

/// Where a routed job goes.
struct Route {
    at: usize,
    job_id: uuid::Uuid,
    tier: Tier,
    model: String,
    shadow: bool,
}

impl Router {
    /// The batch's routes, through the store's routing transaction: the
    /// store hands out each job with its tenant's budget left, the policy
    /// decides, the store commits.
    async fn route(&self, jobs: &[&Job]) -> Vec<Result<RouteOutcome, store::StoreError>> {
        let mut routing = store::Routing::new(&self.pool, jobs, self.config.budgets.defaults());
        while let Some((job, budget)) = routing.next().await {
            routing.record(self.decide(job, budget));
        }
        routing.outcomes()
    }

    /// Where a job goes after its route is settled: to a tier queue, or
    /// straight to its verdict.
    fn after_routing(
        delivery: &Delivery,
        at: usize,
        job: &Job,
        outcome: Result<RouteOutcome, store::StoreError>,
    ) -> Result<Route, Verdict> {
        match outcome {
            Ok(RouteOutcome::Routed {
                tier,
                model,
                reason,
                shadow,
            }) => {
                metrics()
                    .route_decisions_total
                    .with_label_values(&[tier.as_str(), reason.as_str()])
                    .inc();
                Ok(Route {
                    at,
                    job_id: job.job_id,
                    tier,
                    model,
                    shadow,
                })
            }
            Ok(RouteOutcome::AlreadyRouted {
                tier,
                model,
                status,
            }) => {
                // A redelivery may be one whose first tier publish never
                // got confirmed: publish again (workers deduplicate). A
                // fresh duplicate of a routed job is dropped.
                match tier.filter(|_| !status.is_terminal() && delivery.redelivered) {
                    Some(tier) => Ok(Route {
                        at,
                        job_id: job.job_id,
                        tier,
                        model,
                        shadow: false,
                    }),
                    None => {
                        tracing::info!(job_id = %job.job_id, status = status.as_str(), "duplicate job on ingest; dropped");
                        Err(Verdict::Ack)
                    }
                }
            }
            Ok(RouteOutcome::TenantMismatch) => Err(Verdict::tenant_mismatch(job)),
            Ok(RouteOutcome::Refused { code, message }) => Err(Verdict::DeadLetter {
                code,
                detail: message,
                job_id: Some(job.job_id),
                tenant: Some(job.tenant.clone()),
            }),
            Err(e) => Err(Verdict::Requeue {
                detail: format!("recording the route: {e}"),
            }),
        }
    }

    /// Publishes the routed jobs to their tiers (and the shadows to large)
    /// with pipelined confirms: each route's verdict, in order.
    async fn publish(&self, deliveries: &[Delivery], routes: &[Route], ctx: &Ctx) -> Vec<Verdict> {
        let large = self.tiers.large.as_deref();
        let messages = routes
            .iter()
            .map(|r| Self::tier_message(&deliveries[r.at], r.tier.as_str(), &r.model, false))
            .collect();
        let published = queue::publish_all_confirmed(&ctx.publish, messages).await;
        let shadows: Vec<&Route> = routes
            .iter()
            .filter(|r| r.shadow && large.is_some())
            .collect();
        let shadow_messages = shadows
            .iter()
            .filter_map(|r| large.map(|l| Self::tier_message(&deliveries[r.at], "large", l, true)))
            .collect();
        for (r, result) in shadows
            .iter()
            .zip(queue::publish_all_confirmed(&ctx.publish, shadow_messages).await)
        {
            if let Err(e) = result {
                // The job itself is on its way; a lost shadow costs only calibration data.
                tracing::warn!(job_id = %r.job_id, error = %e, "shadow publish failed");
            }
        }
        routes
            .iter()
            .zip(published)
            .map(|(r, result)| match result {
                Ok(()) => Verdict::Ack,
                Err(e) => Verdict::Requeue {
                    detail: format!("publishing to tier {}: {e}", r.tier.as_str()),
                },
            })
            .collect()
    }
}

impl Handler for Router {
    /// Decides the batch's routes in one commit, publishes the jobs to
    /// their tiers with pipelined confirms, and acks each job whose tier
    /// publish the broker confirmed.
    async fn handle(&self, deliveries: &[Delivery], ctx: Ctx) -> Vec<Verdict> {
        let started = Instant::now();
        let mut verdicts: Vec<Option<Verdict>> = deliveries.iter().map(|_| None).collect();
        let mut jobs = Vec::with_capacity(deliveries.len());
        for (at, delivery) in deliveries.iter().enumerate() {
            match parse_job(&delivery.data, &self.config.limits) {
                Ok(job) => jobs.push((at, job)),
                Err(r) => verdicts[at] = Some(Verdict::refused(r)),
            }
        }
        let refs: Vec<&Job> = jobs.iter().map(|(_, j)| j).collect();
        let outcomes = self.route(&refs).await;
        let mut routes = Vec::with_capacity(jobs.len());
        for ((at, job), outcome) in jobs.iter().zip(outcomes) {
            match Self::after_routing(&deliveries[*at], *at, job, outcome) {
                Ok(route) => routes.push(route),
                Err(verdict) => verdicts[*at] = Some(verdict),
            }
        }
        let published = self.publish(deliveries, &routes, &ctx).await;
        for (r, verdict) in routes.iter().zip(published) {
            verdicts[r.at] = Some(verdict);
        }
        let per_job = started.elapsed().as_secs_f64();
        for _ in &routes {
            metrics()
                .job_duration_seconds
                .with_label_values(&["routing"])
                .observe(per_job);
        }
        Verdict::all(verdicts)
    }
}
