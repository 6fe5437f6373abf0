//! The composition root: how each long-running role is put together from
//! the config (signals, the database pool, probes and metrics, the policy,
//! the engine, the consumer loop), shared by the `recap` subcommands.

use crate::config::{redact_url, Config};
use crate::{consume, engines, metrics, policy, queue, router, store, summarize, worker};
use anyhow::{Context, Result};
use recap_policy::Tier;
use recap_service::role;
use std::sync::Arc;

/// `recap migrate`: the schema and the broker topology.
pub async fn migrate(config: &Config) -> Result<()> {
    let pool = store::connect(config).await?;
    store::migrate(&pool).await?;
    tracing::info!(database = %redact_url(&config.database.url), "migrations applied");
    let conn = queue::connect(config, "migrate").await?;
    queue::declare_topology(&conn, config).await?;
    let _ = conn.close(200, "done".into()).await;
    tracing::info!(broker = %redact_url(&config.amqp.url), "topology declared");
    println!("migrations applied and topology declared");
    Ok(())
}

/// `recap gateway`: the gateway's own start, in the crate that links no
/// engine (`recap-gateway` runs the same).
pub use recap_service::gateway::run_until_signalled as run_gateway;

pub async fn run_router(config: Arc<Config>) -> Result<()> {
    let role::Started {
        shutdown,
        pool,
        readiness,
    } = role::start(&config).await?;
    let policy = policy::SharedPolicy::new(policy::load(&config)?);
    policy.reload_on_sighup(config.clone())?;
    // The router counts tokens with the compact model's tokenizer.
    let compact = config
        .tier_model(Tier::Compact)
        .or(config.tier_model(Tier::Large))
        .unwrap_or(recap_engine::extractive::MODEL_ID);
    let counter = engines::token_counter(compact, &config)
        .with_context(|| format!("loading the tokenizer of {compact}"))?;
    readiness.set_model(true);
    metrics::metrics()
        .ready
        .with_label_values(&["router", ""])
        .set(1.0);
    let handler = Arc::new(router::Router {
        pool: pool.clone(),
        config: config.clone(),
        tiers: policy::tiers(&config),
        policy,
        counter,
    });
    let consumer = consume::Consumer {
        queue: queue::QUEUE_INGEST.to_string(),
        tier_label: "router".into(),
        handler,
        pool,
        batch_size: config.router.batch_size,
        config,
        readiness,
    };
    consumer.run(shutdown).await?;
    tracing::info!("router stopped");
    Ok(())
}

pub async fn run_worker(config: Arc<Config>, tier: String) -> Result<()> {
    let Some(parsed_tier) = Tier::parse(&tier) else {
        anyhow::bail!("unknown tier `{tier}`; the tiers are compact and large");
    };
    let model_id = config
        .tier_model(parsed_tier)
        .with_context(|| format!("tier {tier} has no model (config key tiers.{tier}.model)"))?
        .to_string();
    let role::Started {
        shutdown,
        pool,
        readiness,
    } = role::start(&config).await?;
    // A model that will not load leaves the worker up but not ready (its
    // probes say why), retrying now and then: an operator fixes the file
    // and the worker comes up without a restart.
    let mut wait_shutdown = shutdown.clone();
    let (engine, price) = loop {
        let loaded = std::time::Instant::now();
        match engines::load(&model_id, &config) {
            Ok(ok) => {
                metrics::metrics()
                    .model_load_seconds
                    .with_label_values(&[&model_id])
                    .set(loaded.elapsed().as_secs_f64());
                break ok;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), %tier, model = %model_id, "model failed to load; not ready, retrying in 30 s");
                readiness.set_model(false);
                metrics::metrics()
                    .model_load_failures_total
                    .with_label_values(&[&model_id])
                    .inc();
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                    _ = wait_shutdown.wait() => return Ok(()),
                }
            }
        }
    };
    readiness.set_model(true);
    metrics::metrics()
        .ready
        .with_label_values(&["worker", &tier])
        .set(1.0);
    let rss = summarize::resident_memory().map(|r| r.0 >> 20).unwrap_or(0);
    tracing::info!(%tier, model = %model_id, rss_mib = rss, "model loaded");
    let policy = policy::SharedPolicy::new(policy::load(&config)?);
    policy.reload_on_sighup(config.clone())?;
    let handler = Arc::new(worker::Worker {
        tier: parsed_tier,
        pool: pool.clone(),
        config: config.clone(),
        engine,
        price,
        extractive: Arc::new(recap_engine::Extractive::default()),
        policy,
    });
    let consumer = consume::Consumer {
        queue: queue::tier_queue(parsed_tier),
        tier_label: tier.clone(),
        handler,
        pool,
        batch_size: config.tier(parsed_tier).map_or(1, |t| t.batch_size),
        config,
        readiness,
    };
    consumer.run(shutdown).await?;
    metrics::metrics()
        .ready
        .with_label_values(&["worker", &tier])
        .set(0.0);
    tracing::info!(%tier, "worker stopped");
    Ok(())
}
