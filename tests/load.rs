//! Load through the whole fleet (gateway → router → tier queue → workers):
//! 10,000 jobs on the extractive engine, and a smaller run on the real
//! compact model. Zero lost, zero duplicated, and the counts agree between
//! RabbitMQ (its per-queue publish and ack counters), PostgreSQL and each
//! process's own metrics.

mod common;

use common::*;
use futures::StreamExt;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The fleet under test: one gateway, one router and `workers` compact
/// workers, each with its own metrics port.
struct Fleet {
    api: String,
    metrics: Vec<String>,
}

async fn start_fleet(env: &mut TestEnv, workers: usize, extra: &[(&str, &str)]) -> Fleet {
    let gw_metrics = free_addr();
    let mut gw_vars = vec![
        ("RECAP_GATEWAY_RATE", "1000000"),
        ("RECAP_GATEWAY_BURST", "1000000"),
        ("RECAP_GATEWAY_CLIENT_RATE", "1000000"),
        ("RECAP_GATEWAY_CLIENT_BURST", "1000000"),
        ("RECAP_METRICS_LISTEN", gw_metrics.as_str()),
    ];
    gw_vars.extend_from_slice(extra);
    let api = start_gateway(env, &gw_vars).await;
    let mut metrics = vec![format!("http://{gw_metrics}/metrics")];
    let mut roles = vec![vec!["router"]];
    roles.extend((0..workers).map(|_| vec!["worker", "--tier", "compact"]));
    for args in roles {
        let addr = free_addr();
        let mut vars = vec![("RECAP_METRICS_LISTEN", addr.as_str())];
        vars.extend_from_slice(extra);
        env.spawn(&args, &vars);
        metrics.push(format!("http://{addr}/metrics"));
    }
    Fleet { api, metrics }
}

/// POSTs every job (64 in flight) and asserts each was accepted.
async fn submit_all(base: &str, key: &str, ids: &[Uuid]) {
    let http = reqwest::Client::new();
    let statuses: Vec<u16> = futures::stream::iter(ids.iter().copied().map(|id| {
        let req = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(key)
            .json(&job_body(id, serde_json::json!({})));
        async move {
            match req.send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }
    }))
    .buffer_unordered(64)
    .collect()
    .await;
    let refused: Vec<&u16> = statuses.iter().filter(|&&s| s != 202).collect();
    assert!(
        refused.is_empty(),
        "{} refused: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
}

/// Submits `total` new jobs and waits until all have succeeded, then a
/// moment more for the last acks and metrics.
async fn push_through(env: &TestEnv, fleet: &Fleet, key: &str, total: i64, timeout: Duration) {
    let ids: Vec<Uuid> = (0..total).map(|_| Uuid::new_v4()).collect();
    submit_all(&fleet.api, key, &ids).await;
    let done = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            total,
            timeout,
        )
        .await;
    assert_eq!(done, total, "logs:\n{}", env.logs());
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Sums a metric over every process of the fleet.
async fn fleet_sum(fleet: &Fleet, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for url in &fleet.metrics {
        total += metric_sum(&scrape(url).await, name, labels);
    }
    total
}

/// RabbitMQ's own counters for this test's vhost (rabbitmq_prometheus'
/// detailed endpoint): messages published into and acked from `queue`.
async fn broker_counts(vhost: &str, queue: &str) -> (f64, f64, f64) {
    let text = scrape(&format!(
        "http://127.0.0.1:15692/metrics/detailed?vhost={vhost}\
         &family=queue_coarse_metrics&family=channel_queue_metrics\
         &family=channel_queue_exchange_metrics"
    ))
    .await;
    let published = metric_sum(
        &text,
        "rabbitmq_detailed_queue_messages_published_total",
        &[("queue_vhost", vhost), ("queue", queue)],
    );
    let acked = metric_sum(
        &text,
        "rabbitmq_detailed_channel_messages_acked_total",
        &[("vhost", vhost), ("queue", queue)],
    );
    let waiting = metric_sum(
        &text,
        "rabbitmq_detailed_queue_messages",
        &[("vhost", vhost), ("queue", queue)],
    );
    (published, acked, waiting)
}

/// Checks every count against `total` once the fleet is idle.
async fn reconcile(env: &TestEnv, fleet: &Fleet, total: i64, kinds: i64) {
    // PostgreSQL: every job once, succeeded, with exactly its summaries.
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, total);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status <> 'succeeded'")
            .await,
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM summaries").await,
        kinds * total
    );
    assert_eq!(
        env.count("SELECT count(*) FROM route_decisions").await,
        total
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE attempts <> 1")
            .await,
        0,
        "no job ran twice"
    );
    // The processes' metrics.
    let t = total as f64;
    assert_eq!(
        fleet_sum(
            fleet,
            "recap_gateway_submissions_total",
            &[("outcome", "accepted")]
        )
        .await,
        t
    );
    assert_eq!(
        fleet_sum(fleet, "recap_route_decisions_total", &[]).await,
        t
    );
    assert_eq!(
        fleet_sum(fleet, "recap_jobs_total", &[("outcome", "succeeded")]).await,
        t
    );
    assert_eq!(fleet_sum(fleet, "recap_jobs_total", &[]).await, t);
    assert_eq!(fleet_sum(fleet, "recap_dead_letters_total", &[]).await, 0.0);
    // RabbitMQ: each hop saw every job published and acked once; nothing
    // waits anywhere. Channels report their counters every few seconds.
    let start = Instant::now();
    let want = (t, t, 0.0);
    let mut last = Vec::new();
    while start.elapsed() < Duration::from_secs(30) {
        last = vec![
            broker_counts(&env.name, "recap.ingest").await,
            broker_counts(&env.name, "recap.compact").await,
        ];
        if last.iter().all(|c| *c == want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        last,
        vec![want, want],
        "(published, acked, waiting) per hop"
    );
    let (dead_published, _, dead_waiting) = broker_counts(&env.name, "recap.dead").await;
    assert_eq!((dead_published, dead_waiting), (0.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_through_the_fleet_reconcile_across_broker_database_and_metrics() {
    let mut env = TestEnv::new("load10k").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let fleet = start_fleet(
        &mut env,
        2,
        &[
            ("RECAP_AMQP_PREFETCH", "64"),
            ("RECAP_COMPACT_BATCH_SIZE", "16"),
        ],
    )
    .await;
    let total = 10_000i64;
    let start = Instant::now();
    push_through(&env, &fleet, &acme.key, total, Duration::from_secs(900)).await;
    eprintln!(
        "10,000 jobs through gateway, router and 2 workers in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    reconcile(&env, &fleet, total, 1).await;
    assert_batched(&fleet, "router").await;
    assert_batched(&fleet, "compact").await;
}

/// Deliveries that waited together were handled together: more
/// deliveries than batches.
async fn assert_batched(fleet: &Fleet, tier: &str) {
    let deliveries = fleet_sum(fleet, "recap_batch_deliveries_sum", &[("tier", tier)]).await;
    let batches = fleet_sum(fleet, "recap_batch_deliveries_count", &[("tier", tier)]).await;
    eprintln!("{tier}: {deliveries} deliveries in {batches} batches");
    assert!(
        batches > 0.0 && deliveries > batches,
        "{tier}: {deliveries} deliveries in {batches} batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_load_on_the_real_compact_model_reconciles_too() {
    let mut env = TestEnv::new("loadreal").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    // No cascade or shadow rule: every job stays on the compact tier.
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"load\"\nrules = []\n").expect("write policy");
    let policy = policy.to_string_lossy().to_string();
    let fleet = start_fleet(
        &mut env,
        1,
        &[
            ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
            ("RECAP_POLICY", policy.as_str()),
            ("RECAP_AMQP_PREFETCH", "4"),
            ("RECAP_COMPACT_BATCH_SIZE", "4"),
        ],
    )
    .await;
    let total = 24i64;
    push_through(&env, &fleet, &acme.key, total, Duration::from_secs(600)).await;
    assert_eq!(
        env.count(
            "SELECT count(*) FROM summaries \
             WHERE model = 'smollm2-135m-instruct-q4_1' AND length(text) > 0"
        )
        .await,
        total,
        "every summary came from the real model"
    );
    reconcile(&env, &fleet, total, 1).await;
}
