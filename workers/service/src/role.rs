//! What every long-running role (gateway, router, worker) starts with:
//! shutdown on SIGTERM and SIGINT, the database pool, and the probes and
//! metrics listener, not ready until the role says so.

use crate::config::Config;
use crate::{probes, shutdown, store};
use std::sync::Arc;

pub struct Started {
    pub shutdown: shutdown::Shutdown,
    pub pool: sqlx::PgPool,
    pub readiness: Arc<probes::Readiness>,
}

pub async fn start(config: &Config) -> anyhow::Result<Started> {
    let (trigger, shutdown) = shutdown::channel();
    shutdown::on_signals(trigger)?;
    let pool = store::connect(config).await?;
    let readiness = Arc::new(probes::Readiness::default());
    probes::serve(
        &config.metrics.listen,
        probes::ProbeState {
            readiness: readiness.clone(),
            pool: Some(pool.clone()),
        },
    )
    .await?;
    Ok(Started {
        shutdown,
        pool,
        readiness,
    })
}
