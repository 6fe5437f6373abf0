//! Prometheus metrics, named as in ARCHITECTURE.md (in the spirit of TGI's
//! and vLLM's). One registry per process, served at /metrics.

use prometheus::{
    exponential_buckets, CounterVec, GaugeVec, HistogramOpts, HistogramVec, Opts, Registry,
};
use std::sync::OnceLock;

pub struct Metrics {
    pub registry: Registry,
    pub jobs_total: CounterVec,
    pub job_duration_seconds: HistogramVec,
    pub batch_deliveries: HistogramVec,
    pub tokens_total: CounterVec,
    pub cost_usd_total: CounterVec,
    pub route_decisions_total: CounterVec,
    pub inflight_jobs: GaugeVec,
    pub generation_tokens_per_second: GaugeVec,
    pub model_load_seconds: GaugeVec,
    pub dead_letters_total: CounterVec,
    pub ready: GaugeVec,
    pub policy_reloads_total: CounterVec,
    pub budget_remaining_usd: GaugeVec,
    pub cascades_total: CounterVec,
    pub budget_limit_usd: GaugeVec,
    pub model_load_failures_total: CounterVec,
    pub gateway_submissions_total: CounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    let c = CounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        // Jobs take milliseconds (extractive) to many minutes (large model on CPU).
        let buckets = exponential_buckets(0.005, 2.5, 14).expect("valid buckets");
        let job_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "recap_job_duration_seconds",
                "Time spent per stage: queue_wait, routing, inference, persist.",
            )
            .buckets(buckets),
            &["stage"],
        )
        .expect("valid metric");
        r.register(Box::new(job_duration_seconds.clone()))
            .expect("metric registered once");
        let batch_deliveries = HistogramVec::new(
            HistogramOpts::new(
                "recap_batch_deliveries",
                "Deliveries handled together (one commit, one batched pass), by tier or router.",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            &["tier"],
        )
        .expect("valid metric");
        r.register(Box::new(batch_deliveries.clone()))
            .expect("metric registered once");
        Metrics {
            jobs_total: counter(
                &r,
                "recap_jobs_total",
                "Jobs finished, by tier, model and outcome.",
                &["tier", "model", "outcome"],
            ),
            job_duration_seconds,
            batch_deliveries,
            tokens_total: counter(
                &r,
                "recap_tokens_total",
                "Tokens processed, by model and direction (input/output).",
                &["model", "direction"],
            ),
            cost_usd_total: counter(
                &r,
                "recap_cost_usd_total",
                "Cost booked, by tenant and tier.",
                &["tenant", "tier"],
            ),
            route_decisions_total: counter(
                &r,
                "recap_route_decisions_total",
                "Routing decisions, by tier and reason.",
                &["tier", "reason"],
            ),
            inflight_jobs: gauge(
                &r,
                "recap_inflight_jobs",
                "Jobs being worked on now.",
                &["tier"],
            ),
            generation_tokens_per_second: gauge(
                &r,
                "recap_generation_tokens_per_second",
                "Decode speed of the last job.",
                &["model"],
            ),
            model_load_seconds: gauge(
                &r,
                "recap_model_load_seconds",
                "How long the model took to load.",
                &["model"],
            ),
            dead_letters_total: counter(
                &r,
                "recap_dead_letters_total",
                "Messages sent to recap.dead, by reason.",
                &["reason"],
            ),
            ready: gauge(
                &r,
                "recap_ready",
                "1 when this process is ready to take work.",
                &["role", "tier"],
            ),
            policy_reloads_total: counter(
                &r,
                "recap_policy_reloads_total",
                "Policy reloads on SIGHUP, by outcome (ok, refused).",
                &["outcome"],
            ),
            budget_remaining_usd: gauge(
                &r,
                "recap_budget_remaining_usd",
                "Budget left at the last decision, by tenant and period.",
                &["tenant", "period"],
            ),
            cascades_total: counter(
                &r,
                "recap_cascades_total",
                "Compact outputs sent on to the large tier, by failed check.",
                &["check"],
            ),
            budget_limit_usd: gauge(
                &r,
                "recap_budget_limit_usd",
                "A tenant's budget for the period, as of the last decision.",
                &["tenant", "period"],
            ),
            model_load_failures_total: counter(
                &r,
                "recap_model_load_failures_total",
                "Models that failed to load, by model.",
                &["model"],
            ),
            gateway_submissions_total: counter(
                &r,
                "recap_gateway_submissions_total",
                "Jobs submitted over HTTP, by outcome (accepted, duplicate, rejected).",
                &["outcome"],
            ),
            registry: r,
        }
    }
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}
