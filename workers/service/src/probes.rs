//! /metrics, /healthz and /readyz on every process.
//!
//! Liveness says the process answers; readiness says it can take work now:
//! broker connected, database answering, model loaded, not shutting down.

use crate::metrics::metrics;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, TextEncoder};
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Readiness {
    pub broker: AtomicBool,
    pub model: AtomicBool,
    pub stopping: AtomicBool,
}

impl Readiness {
    pub fn set_broker(&self, up: bool) {
        self.broker.store(up, Ordering::SeqCst);
    }
    pub fn set_model(&self, loaded: bool) {
        self.model.store(loaded, Ordering::SeqCst);
    }
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
    fn flags_ok(&self) -> bool {
        self.broker.load(Ordering::SeqCst)
            && self.model.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
pub struct ProbeState {
    pub readiness: Arc<Readiness>,
    pub pool: Option<PgPool>,
}

impl ProbeState {
    pub async fn is_ready(&self) -> (bool, String) {
        let r = &self.readiness;
        let db = match &self.pool {
            Some(pool) => tokio::time::timeout(Duration::from_secs(2), crate::store::ping(pool))
                .await
                .unwrap_or(false),
            None => true,
        };
        let ok = r.flags_ok() && db;
        let detail = format!(
            "broker={} database={} model={} stopping={}",
            r.broker.load(Ordering::SeqCst),
            db,
            r.model.load(Ordering::SeqCst),
            r.stopping.load(Ordering::SeqCst)
        );
        (ok, detail)
    }
}

async fn metrics_text() -> impl IntoResponse {
    let mut buf = Vec::new();
    let families = metrics().registry.gather();
    if TextEncoder::new().encode(&families, &mut buf).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode metrics".to_string(),
        )
            .into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        buf,
    )
        .into_response()
}

async fn readyz(State(state): State<ProbeState>) -> impl IntoResponse {
    let (ok, detail) = state.is_ready().await;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, detail)
}

/// The probe routes, to serve alone or to merge into the gateway's router.
pub fn routes(state: ProbeState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the probes on `listen` until the process ends. An empty address
/// disables them.
pub async fn serve(listen: &str, state: ProbeState) -> anyhow::Result<()> {
    if listen.is_empty() {
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (metrics.listen): {e}"))?;
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, routes(state)).await {
            tracing::error!(error = %e, "probe server stopped");
        }
    });
    Ok(())
}
