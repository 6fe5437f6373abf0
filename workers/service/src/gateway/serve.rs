//! The gateway's HTTP server: hyper with a timer, so that a client gets
//! `gateway.header_timeout_s` to send its headers (slowloris) and
//! `gateway.request_timeout_s` for the whole request, body included (a
//! trickled body); a cap on open connections and on requests in flight;
//! and a per-client-address limit that runs before any API key is looked up.

use super::problem::Problem;
use super::ratelimit::RateLimiter;
use crate::config::GatewayConfig;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// The peer address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// What the guard layers share.
pub struct Guards {
    clients: RateLimiter,
    in_flight: Arc<Semaphore>,
    request_timeout: Duration,
}

impl Guards {
    pub fn new(c: &GatewayConfig) -> Guards {
        Guards {
            clients: RateLimiter::new(c.client_rate_per_s, c.client_burst),
            in_flight: Arc::new(Semaphore::new(c.max_concurrent_requests)),
            request_timeout: Duration::from_secs(c.request_timeout_s),
        }
    }
}

/// Wraps every route: the per-client limit, then the cap on requests in
/// flight, then the request deadline. Hand-written rather than tower's
/// layers so that each refusal is a problem+json like every other answer.
pub fn guarded(app: Router, guards: Arc<Guards>) -> Router {
    app.layer(axum::middleware::from_fn_with_state(guards, guard))
}

async fn guard(State(g): State<Arc<Guards>>, req: Request, next: Next) -> Response {
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0.ip());
    if let Some(ip) = client {
        if let Err(wait) = g.clients.check(&ip.to_string(), Instant::now()) {
            let mut p = Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests from this address; retry after {wait} s"),
            );
            p.retry_after_s = Some(wait);
            return p.into_response();
        }
    }
    let Ok(_permit) = g.in_flight.clone().try_acquire_owned() else {
        let mut p = Problem::unavailable("the gateway is at its limit of requests in flight");
        p.retry_after_s = Some(1);
        return p.into_response();
    };
    match tokio::time::timeout(g.request_timeout, next.run(req)).await {
        Ok(res) => res,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request took over {} s (a slow body?)",
                g.request_timeout.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Serves `app` on `listener` until `stop` resolves, then lets requests in
/// flight finish (at most the request timeout).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    c: &GatewayConfig,
    stop: impl std::future::Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(c.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let header_timeout = Duration::from_secs(c.header_timeout_s);
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = app
            .clone()
            .map_request(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(ClientAddr(peer));
                req
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    let wait = Duration::from_secs(c.request_timeout_s);
    if tokio::time::timeout(wait, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight at shutdown were cut");
    }
}
