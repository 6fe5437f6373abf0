//! `recap gateway`: the HTTP front door. Validates job v1, stores the
//! `queued` row, publishes with a confirm and answers 202 only once the job
//! is durably queued. Tenants see only their own jobs.

mod problem;
mod ratelimit;
mod serve;

use crate::config::Config;
use crate::metrics::metrics;
use crate::probes::Readiness;
use crate::queue::{self, EXCHANGE_JOBS, ROUTE_INGEST};
use crate::store;
use crate::tenants;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use lapin::types::FieldTable;
use problem::Problem;
use ratelimit::RateLimiter;
use recap_job::{RejectCode, SubmissionError};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::Mutex;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

pub struct Gateway {
    pub pool: PgPool,
    pub config: Arc<Config>,
    publisher: Mutex<Option<(lapin::Connection, lapin::Channel)>>,
    limiter: RateLimiter,
    pub readiness: Arc<Readiness>,
    webhook_allow: crate::webhooks::egress::AllowList,
}

type Shared = Arc<Gateway>;

impl Gateway {
    pub fn new(pool: PgPool, config: Arc<Config>, readiness: Arc<Readiness>) -> Gateway {
        // Validated with the rest of the config at start.
        let webhook_allow =
            crate::webhooks::egress::AllowList::parse(&config.gateway.webhook_allow)
                .unwrap_or_default();
        Gateway {
            limiter: RateLimiter::new(config.gateway.rate_per_s, config.gateway.burst),
            pool,
            config,
            publisher: Mutex::new(None),
            readiness,
            webhook_allow,
        }
    }

    /// Publishes with a confirm, reconnecting to the broker when needed.
    async fn publish(&self, job_id: Uuid, body: &[u8]) -> Result<(), Problem> {
        let mut guard = self.publisher.lock().await;
        let healthy = guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !healthy {
            let conn = queue::connect(&self.config, "gateway")
                .await
                .map_err(broker_unavailable)?;
            let ch = queue::confirm_channel(&conn)
                .await
                .map_err(broker_unavailable)?;
            *guard = Some((conn, ch));
            self.readiness.set_broker(true);
        }
        let Some((_, ch)) = guard.as_ref() else {
            return Err(Problem::unavailable("broker unavailable"));
        };
        let props = queue::job_properties(Some(job_id), FieldTable::default());
        let result = queue::publish_confirmed(ch, EXCHANGE_JOBS, ROUTE_INGEST, body, props).await;
        if let Err(e) = result {
            *guard = None;
            self.readiness.set_broker(false);
            tracing::warn!(error = %e, %job_id, "publishing a job failed");
            return Err(Problem::unavailable(
                "the job could not be queued; retry with the same job_id",
            ));
        }
        Ok(())
    }
}

/// A job as clients see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub job_id: Uuid,
    pub tenant: String,
    /// queued, routed, running, succeeded, failed or dead
    pub status: String,
    pub tier: Option<String>,
    pub model: Option<String>,
    pub route_reason: Option<String>,
    pub attempts: i32,
    pub chunks: Option<i32>,
    pub cost_usd: Option<f64>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub queued_at: Option<DateTime<Utc>>,
    pub routed_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SummaryView {
    pub kind: String,
    pub text: String,
    pub model: String,
    pub engine: String,
    pub input_tokens: i32,
    pub output_tokens: i32,
    pub total_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// Only jobs in this status.
    pub status: Option<String>,
    /// Only jobs created at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Only jobs created before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// Page size, 1-200 (default 50).
    pub limit: Option<i64>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

/// The database failed: logged with its cause; the client hears only that.
fn db_unavailable(e: impl std::fmt::Display) -> Problem {
    tracing::warn!(error = %e, "database error answering a request");
    Problem::unavailable("the database is unavailable; retry")
}

/// The broker failed: logged with its cause; the client hears only that.
fn broker_unavailable(e: impl std::fmt::Display) -> Problem {
    tracing::warn!(error = %e, "broker error answering a request");
    Problem::unavailable("the broker is unavailable; retry with the same job_id")
}

/// The tenant of the request's API key, within the tenant's request rate.
async fn authorize(gw: &Gateway, headers: &HeaderMap) -> Result<String, Problem> {
    let tenant = authenticate(gw, headers).await?;
    rate_limit(gw, &tenant)?;
    Ok(tenant)
}

async fn authenticate(gw: &Gateway, headers: &HeaderMap) -> Result<String, Problem> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Problem::unauthorized("an API key is required: Authorization: Bearer <key>")
        })?;
    let key = value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 200)
        .ok_or_else(|| Problem::unauthorized("the Authorization header must be `Bearer <key>`"))?;
    match tenants::authenticate(&gw.pool, key).await {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(Problem::unauthorized("the API key is unknown or revoked")),
        Err(e) => Err(db_unavailable(e)),
    }
}

fn rate_limit(gw: &Gateway, tenant: &str) -> Result<(), Problem> {
    gw.limiter
        .check(tenant, std::time::Instant::now())
        .map_err(|wait| {
            let mut p = Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("tenant {tenant} is over its request rate; retry after {wait} s"),
            );
            p.retry_after_s = Some(wait);
            p
        })
}

async fn job_view(pool: &PgPool, job_id: Uuid, tenant: &str) -> Result<Option<JobView>, Problem> {
    Ok(store::tenant_job_by_id(pool, tenant, job_id)
        .await
        .map_err(db_unavailable)?
        .map(view))
}

fn view(j: store::TenantJob) -> JobView {
    let r = j.row;
    JobView {
        job_id: r.job_id,
        tenant: r.tenant,
        status: r.status,
        tier: r.tier,
        model: r.model,
        route_reason: j.route_reason,
        attempts: r.attempts,
        chunks: r.chunks,
        cost_usd: r.cost_usd,
        error_code: r.error_code,
        error: r.error,
        queued_at: r.queued_at,
        routed_at: r.routed_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
    }
}

fn with_location(status: StatusCode, view: JobView) -> Response {
    let loc = format!("/v1/jobs/{}", view.job_id);
    let mut res = (status, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&loc) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

fn rejection(r: recap_job::Rejection) -> Problem {
    let status = match r.code {
        RejectCode::InvalidJson | RejectCode::InvalidUtf8 => StatusCode::BAD_REQUEST,
        RejectCode::TranscriptTooLarge | RejectCode::TooManyUtterances => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let mut p = Problem::new(status, r.code.as_str(), r.message.clone());
    p.field = r.field;
    p
}

/// Submit a job.
///
/// The body is a job v1 (schemas/job-v1.schema.json). `tenant` is taken from
/// the API key (a different one is refused); `version` defaults to 1 and
/// `job_id` to a fresh UUID. Posting the same `job_id` again returns the
/// existing job and creates nothing. `transcript` may be a meeting tool's
/// file: WebVTT or SubRip text, or the JSON of Whisper, AWS Transcribe or a
/// diarized list (`transcript_format` names it, or it is detected).
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body(content = Object, content_type = "application/json", description = "A job v1"),
    responses(
        (status = 202, description = "Queued (durably: the broker confirmed it)", body = JobView, headers(("Location" = String))),
        (status = 200, description = "This job_id was submitted before: the existing job", body = JobView),
        (status = 400, description = "Not JSON or not UTF-8", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No key, or an unknown or revoked one", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The body names another tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job_id belongs to another tenant", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or transcript over the limits", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid job", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the tenant's rate; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker or database unavailable; retry with the same job_id", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
async fn submit(
    State(gw): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, Problem> {
    let tenant = authorize(&gw, &headers).await?;
    let limit = gw.config.gateway.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {limit} bytes"),
        )
    })?;
    let job = recap_job::parse_submission(&bytes, &tenant, Uuid::new_v4(), &gw.config.limits)
        .map_err(|e| {
            metrics()
                .gateway_submissions_total
                .with_label_values(&["rejected"])
                .inc();
            match e {
                SubmissionError::TenantMismatch => Problem::new(
                    StatusCode::FORBIDDEN,
                    "tenant_mismatch",
                    "the body names another tenant than the API key's",
                ),
                SubmissionError::NotAnObject => Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_json",
                    "a job must be a JSON object",
                ),
                SubmissionError::Rejected(r) => rejection(r),
            }
        })?;
    if let Some(url) = &job.callback_url {
        vet_callback(url, &gw.webhook_allow).await.map_err(|r| {
            metrics()
                .gateway_submissions_total
                .with_label_values(&["rejected"])
                .inc();
            let mut p = Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "callback_refused",
                format!("callback_url is refused: {r}"),
            );
            p.field = Some("callback_url".into());
            p
        })?;
    }

    let created = store::insert_queued(&gw.pool, &job)
        .await
        .map_err(db_unavailable)?;
    let existing = job_view(&gw.pool, job.job_id, &tenant).await?;
    let Some(view) = existing else {
        // job_ids are global: one held by another tenant is refused
        // without a word on whose it is.
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "job_id_in_use",
            "this job_id cannot be used; choose another (job_ids are global)",
        ));
    };
    // A job still `queued` may never have reached the broker (a crash or a
    // 503 between the row and the publish): publish it (again); the router
    // deduplicates.
    if created || view.status == "queued" {
        gw.publish(job.job_id, &job.to_json()).await?;
        metrics()
            .gateway_submissions_total
            .with_label_values(&["accepted"])
            .inc();
        return Ok(with_location(StatusCode::ACCEPTED, view));
    }
    metrics()
        .gateway_submissions_total
        .with_label_values(&["duplicate"])
        .inc();
    Ok(with_location(StatusCode::OK, view))
}

/// A job's status, route, timings and cost.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "job_id")),
    responses(
        (status = 200, body = JobView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
async fn get_job(
    State(gw): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobView>, Problem> {
    let tenant = authorize(&gw, &headers).await?;
    let id = Uuid::parse_str(&id).map_err(|_| Problem::not_found())?;
    job_view(&gw.pool, id, &tenant)
        .await?
        .map(Json)
        .ok_or_else(Problem::not_found)
}

/// A job's summaries (empty until it succeeds).
#[utoipa::path(
    get, path = "/v1/jobs/{id}/summaries", tag = "jobs",
    params(("id" = Uuid, Path, description = "job_id")),
    responses(
        (status = 200, body = [SummaryView]),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
async fn get_summaries(
    State(gw): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Vec<SummaryView>>, Problem> {
    let tenant = authorize(&gw, &headers).await?;
    let id = Uuid::parse_str(&id).map_err(|_| Problem::not_found())?;
    let rows = store::tenant_summaries(&gw.pool, &tenant, id)
        .await
        .map_err(db_unavailable)?
        .ok_or_else(Problem::not_found)?;
    Ok(Json(
        rows.into_iter()
            .map(|s| SummaryView {
                kind: s.kind,
                text: s.text,
                model: s.model,
                engine: s.engine,
                input_tokens: s.input_tokens,
                output_tokens: s.output_tokens,
                total_ms: s.total_ms,
            })
            .collect(),
    ))
}

/// The tenant's jobs, newest first, paged.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(ListParams),
    responses(
        (status = 200, body = JobPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
async fn list_jobs(
    State(gw): State<Shared>,
    headers: HeaderMap,
    Query(p): Query<ListParams>,
) -> Result<Json<JobPage>, Problem> {
    let tenant = authorize(&gw, &headers).await?;
    let limit = p.limit.unwrap_or(50);
    let bad = |detail: String| Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail);
    if !(1..=200).contains(&limit) {
        return Err(bad("limit must be 1-200".into()));
    }
    let status = match &p.status {
        None => None,
        Some(s) => {
            Some(store::Status::parse(s).ok_or_else(|| bad(format!("unknown status {s:?}")))?)
        }
    };
    // The cursor is the last row's (created_at, job_id).
    let before = match &p.after {
        None => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| bad("bad `after` cursor".into()))?),
    };
    let filter = store::JobFilter {
        status,
        since: p.since,
        until: p.until,
        before,
        limit: limit + 1,
    };
    let mut rows = store::tenant_jobs(&gw.pool, &tenant, &filter)
        .await
        .map_err(db_unavailable)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = rows
        .last()
        .filter(|_| more)
        .map(|j| format!("{}_{}", j.created_at.timestamp_micros(), j.row.job_id));
    Ok(Json(JobPage {
        jobs: rows.into_iter().map(view).collect(),
        next,
    }))
}

fn parse_cursor(c: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (t, id) = c.split_once('_')?;
    Some((
        DateTime::from_timestamp_micros(t.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

/// Cancel a job that is still queued or routed.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "job_id")),
    responses(
        (status = 200, description = "Cancelled: status failed, error_code cancelled", body = JobView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already running or ended", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
async fn cancel(
    State(gw): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobView>, Problem> {
    let tenant = authorize(&gw, &headers).await?;
    let id = Uuid::parse_str(&id).map_err(|_| Problem::not_found())?;
    match store::cancel_job(&gw.pool, id, &tenant)
        .await
        .map_err(db_unavailable)?
    {
        store::Cancelled::NotFound => Err(Problem::not_found()),
        store::Cancelled::TooLate(status) => Err(Problem::new(
            StatusCode::CONFLICT,
            "not_cancellable",
            format!(
                "the job is {}; only queued or routed jobs can be cancelled",
                status.as_str()
            ),
        )),
        store::Cancelled::Done => {
            gw.publish_event(&store::cancel_event(id, &tenant)).await;
            job_view(&gw.pool, id, &tenant)
                .await?
                .map(Json)
                .ok_or_else(Problem::not_found)
        }
    }
}

/// Checks a callback URL before the job is accepted: the same guard the
/// dispatcher applies, with the host resolved now (the dispatcher resolves
/// it again at delivery, and connects only to what it vetted then).
async fn vet_callback(
    url: &str,
    allow: &crate::webhooks::egress::AllowList,
) -> Result<(), crate::webhooks::egress::Refusal> {
    let target = crate::webhooks::egress::check_url(url, allow)?;
    if target.literal.is_some() || target.allowed {
        return Ok(());
    }
    crate::webhooks::vet_name(&target).await.map(|_| ())
}

struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A tenant's API key from `recap tenants create`"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "recap", description = "Meeting transcripts in, summaries out. Jobs are queued on RabbitMQ and summarized by compact or large models according to a cost policy."),
    paths(submit, get_job, get_summaries, list_jobs, cancel),
    components(schemas(JobView, SummaryView, JobPage, Problem)),
    modifiers(&ApiKeyScheme),
    tags((name = "jobs", description = "Submit jobs and read their results"))
)]
pub struct ApiDoc;

pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}

/// The API routes behind the server's guards, with `/healthz` for load
/// balancers. Readiness and metrics are served on `metrics.listen` only:
/// they name tenants and ping the database.
pub fn app(gw: Shared) -> Router {
    let guards = Arc::new(serve::Guards::new(&gw.config.gateway));
    let api = Router::new()
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/summaries", get(get_summaries))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/openapi.json", get(openapi))
        // The body limit is enforced in `submit`, so that it answers problem+json.
        .layer(DefaultBodyLimit::disable())
        .with_state(gw)
        .route("/healthz", get(|| async { "ok" }));
    serve::guarded(api, guards)
}

/// `recap gateway` and `recap-gateway`: the API on `listen` (default
/// `gateway.listen`), until SIGTERM or SIGINT.
pub async fn run_until_signalled(
    config: Arc<Config>,
    listen: Option<String>,
) -> anyhow::Result<()> {
    let crate::role::Started {
        mut shutdown,
        pool,
        readiness,
    } = crate::role::start(&config).await?;
    let listen = listen.unwrap_or_else(|| config.gateway.listen.clone());
    readiness.set_model(true);
    let gw = Arc::new(Gateway::new(
        pool.clone(),
        config.clone(),
        readiness.clone(),
    ));
    // Connect to the broker up front so that readiness is true from the start.
    if let Err(p) = gw.publish_probe().await {
        tracing::warn!(detail = %p.detail, "broker not reachable yet; readiness stays false until it is");
    }
    crate::webhooks::spawn_dispatcher(pool, gw.webhook_allow.clone(), shutdown.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, metrics = %config.metrics.listen, "gateway serving /v1/jobs, /openapi.json and /healthz; /readyz and /metrics on the metrics address");
    let stop = readiness.clone();
    serve::serve(listener, app(gw), &config.gateway, async move {
        shutdown.wait().await;
        stop.set_stopping();
    })
    .await;
    Ok(())
}

impl Gateway {
    /// Publishes a job event on recap.events; a lost one is logged (the
    /// webhook outbox row is already committed).
    async fn publish_event(&self, payload: &serde_json::Value) {
        let guard = self.publisher.lock().await;
        let sent = match guard.as_ref() {
            Some((_, ch)) => crate::webhooks::publish_event(ch, payload)
                .await
                .map_err(|e| e.to_string()),
            None => Err("no broker connection".into()),
        };
        if let Err(e) = sent {
            tracing::warn!(job_id = %payload["job_id"], error = %e, "event not published");
        }
    }

    async fn publish_probe(&self) -> Result<(), Problem> {
        let mut guard = self.publisher.lock().await;
        let conn = queue::connect(&self.config, "gateway")
            .await
            .map_err(|e| Problem::unavailable(e.to_string()))?;
        let ch = queue::confirm_channel(&conn)
            .await
            .map_err(|e| Problem::unavailable(e.to_string()))?;
        *guard = Some((conn, ch));
        self.readiness.set_broker(true);
        Ok(())
    }
}
