//! Reads: jobs and summaries as the gateway and `recap` commands show
//! them, shadow pairs for training and calibration, a job's decisions.

use super::*;

/// One shadow summary with its job's transcript: a training example.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ShadowExample {
    pub job_id: Uuid,
    pub kind: String,
    pub text: String,
    pub language: Option<String>,
    pub transcript: sqlx::types::Json<Vec<recap_job::Utterance>>,
}

/// Every shadow summary whose job kept its transcript, oldest first (of
/// one tenant where given).
pub async fn shadow_examples(
    pool: &PgPool,
    tenant: Option<&str>,
) -> Result<Vec<ShadowExample>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT s.job_id, s.kind, s.text, t.language, t.transcript
         FROM summaries s JOIN shadow_transcripts t ON t.job_id = s.job_id
         WHERE s.shadow AND ($1::text IS NULL OR t.tenant = $1)
         ORDER BY s.created_at, s.job_id, s.kind",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

/// A shadow pair: the compact output a job returned and the large tier's
/// shadow output of the same job and kind, with what the cascade knew.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ShadowPair {
    pub job_id: Uuid,
    pub kind: String,
    pub compact_model: String,
    pub compact_text: String,
    pub compact_input_tokens: i32,
    pub compact_output_tokens: i32,
    pub mean_logprob: Option<f64>,
    pub mean_entropy: Option<f64>,
    pub large_model: String,
    pub large_text: String,
    pub large_input_tokens: i32,
    pub large_output_tokens: i32,
    pub language: Option<String>,
    pub transcript: sqlx::types::Json<Vec<recap_job::Utterance>>,
}

/// Every shadow pair (of one tenant where given), oldest first. A job whose
/// compact output cascaded has no compact row and gives no pair.
pub async fn shadow_pairs(
    pool: &PgPool,
    tenant: Option<&str>,
) -> Result<Vec<ShadowPair>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT l.job_id, l.kind, c.model AS compact_model, c.text AS compact_text,
                c.input_tokens AS compact_input_tokens, c.output_tokens AS compact_output_tokens,
                c.mean_logprob, c.mean_entropy, l.model AS large_model, l.text AS large_text,
                l.input_tokens AS large_input_tokens, l.output_tokens AS large_output_tokens,
                t.language, t.transcript
         FROM summaries l
         JOIN summaries c ON c.job_id = l.job_id AND c.kind = l.kind AND NOT c.shadow
                          AND c.model <> l.model
         JOIN shadow_transcripts t ON t.job_id = l.job_id
         WHERE l.shadow AND ($1::text IS NULL OR t.tenant = $1)
         ORDER BY l.created_at, l.job_id, l.kind",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

/// A job's routing decisions and its outputs' recorded signals, oldest
/// first, for `recap policy explain --job`.
pub async fn explain_job(
    pool: &PgPool,
    job_id: Uuid,
) -> Result<(Vec<serde_json::Value>, Vec<serde_json::Value>), StoreError> {
    let decisions: Vec<sqlx::types::Json<serde_json::Value>> = sqlx::query_scalar(
        "SELECT json_build_object('tier', tier, 'model', model, 'reason', reason,
                'shadow', shadow, 'features', features, 'trail', trail,
                'policy_version', policy_version,
                'estimated_cost_usd', estimated_cost_usd::float8, 'decided_at', decided_at)
         FROM route_decisions WHERE job_id = $1 ORDER BY id",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    let summaries: Vec<sqlx::types::Json<serde_json::Value>> = sqlx::query_scalar(
        "SELECT json_build_object('kind', kind, 'model', model, 'shadow', shadow,
                'input_tokens', input_tokens, 'output_tokens', output_tokens,
                'mean_logprob', mean_logprob, 'mean_entropy', mean_entropy,
                'copy_rate', copy_rate)
         FROM summaries WHERE job_id = $1 ORDER BY created_at, kind",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    Ok((
        decisions.into_iter().map(|j| j.0).collect(),
        summaries.into_iter().map(|j| j.0).collect(),
    ))
}

/// A job's row, as `recap` shows it to people and the gateway to clients.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRow {
    pub job_id: Uuid,
    pub tenant: String,
    pub status: String,
    pub tier: Option<String>,
    pub model: Option<String>,
    pub attempts: i32,
    pub chunks: Option<i32>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub cost_usd: Option<f64>,
    pub queued_at: Option<DateTime<Utc>>,
    pub routed_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn get_job(pool: &PgPool, job_id: Uuid) -> Result<Option<JobRow>, StoreError> {
    let row = sqlx::query(
        "SELECT job_id, tenant, status, tier, model, attempts, chunks, error_code, error,
                cost_usd::float8 AS cost_usd, queued_at, routed_at, started_at, finished_at
         FROM jobs WHERE job_id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(job_row).transpose()
}

/// A `jobs` row read by the columns both job reads select.
pub(super) fn job_row(r: &sqlx::postgres::PgRow) -> Result<JobRow, StoreError> {
    Ok(JobRow {
        job_id: r.try_get("job_id")?,
        tenant: r.try_get("tenant")?,
        status: r.try_get("status")?,
        tier: r.try_get("tier")?,
        model: r.try_get("model")?,
        attempts: r.try_get("attempts")?,
        chunks: r.try_get("chunks")?,
        error_code: r.try_get("error_code")?,
        error: r.try_get("error")?,
        cost_usd: r.try_get("cost_usd")?,
        queued_at: r.try_get("queued_at")?,
        routed_at: r.try_get("routed_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

/// A job as its tenant sees it: the row and the reason of its latest route.
#[derive(Debug, Clone)]
pub struct TenantJob {
    pub row: JobRow,
    pub route_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The columns of a [`TenantJob`]: the tenant filter is in the SQL, and
/// the latest route comes in the same query.
macro_rules! tenant_job_select {
    ($where:literal) => {
        concat!(
            "SELECT j.job_id, j.tenant, j.status, j.tier, j.model, j.attempts, j.chunks,
                    j.error_code, j.error, j.cost_usd::float8 AS cost_usd, j.queued_at,
                    j.routed_at, j.started_at, j.finished_at, j.created_at, r.reason
             FROM jobs j
             LEFT JOIN LATERAL (SELECT reason FROM route_decisions d
                                WHERE d.job_id = j.job_id ORDER BY d.id DESC LIMIT 1) r ON true
             WHERE j.tenant = $1 AND ",
            $where
        )
    };
}

pub(super) fn tenant_job(r: &sqlx::postgres::PgRow) -> Result<TenantJob, StoreError> {
    Ok(TenantJob {
        row: job_row(r)?,
        route_reason: r.try_get("reason")?,
        created_at: r.try_get("created_at")?,
    })
}

/// A tenant's job, or None when there is no such job for this tenant.
pub async fn tenant_job_by_id(
    pool: &PgPool,
    tenant: &str,
    job_id: Uuid,
) -> Result<Option<TenantJob>, StoreError> {
    let row = sqlx::query(tenant_job_select!("j.job_id = $2"))
        .bind(tenant)
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(tenant_job).transpose()
}

/// Which of a tenant's jobs to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<Status>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only jobs before this (created_at, job_id): the page cursor.
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// A page of a tenant's jobs in one query.
pub async fn tenant_jobs(
    pool: &PgPool,
    tenant: &str,
    f: &JobFilter,
) -> Result<Vec<TenantJob>, StoreError> {
    let rows = sqlx::query(tenant_job_select!(
        "($2::text IS NULL OR j.status = $2)
           AND ($3::timestamptz IS NULL OR j.created_at >= $3)
           AND ($4::timestamptz IS NULL OR j.created_at < $4)
           AND ($5::timestamptz IS NULL OR (j.created_at, j.job_id) < ($5, $6))
         ORDER BY j.created_at DESC, j.job_id DESC LIMIT $7"
    ))
    .bind(tenant)
    .bind(f.status.map(|s| s.as_str()))
    .bind(f.since)
    .bind(f.until)
    .bind(f.before.map(|b| b.0))
    .bind(f.before.map(|b| b.1))
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(tenant_job).collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SummaryRow {
    pub kind: String,
    pub text: String,
    pub model: String,
    pub engine: String,
    pub input_tokens: i32,
    pub output_tokens: i32,
    pub total_ms: f64,
}

/// The reason of a job's first routing decision, where it has one.
pub async fn first_route_reason(pool: &PgPool, job_id: Uuid) -> Result<Option<String>, StoreError> {
    let reason: Option<(String,)> =
        sqlx::query_as("SELECT reason FROM route_decisions WHERE job_id = $1 ORDER BY id LIMIT 1")
            .bind(job_id)
            .fetch_optional(pool)
            .await?;
    Ok(reason.map(|(r,)| r))
}

pub async fn get_summaries(pool: &PgPool, job_id: Uuid) -> Result<Vec<SummaryRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT kind, text, model, engine, input_tokens, output_tokens, total_ms
         FROM summaries WHERE job_id = $1 AND NOT shadow ORDER BY created_at, kind",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(SummaryRow {
                kind: r.try_get("kind")?,
                text: r.try_get("text")?,
                model: r.try_get("model")?,
                engine: r.try_get("engine")?,
                input_tokens: r.try_get("input_tokens")?,
                output_tokens: r.try_get("output_tokens")?,
                total_ms: r.try_get("total_ms")?,
            })
        })
        .collect()
}

/// A tenant's job's summaries; None when there is no such job for it.
pub async fn tenant_summaries(
    pool: &PgPool,
    tenant: &str,
    job_id: Uuid,
) -> Result<Option<Vec<SummaryRow>>, StoreError> {
    let owned: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = $1 AND tenant = $2)")
            .bind(job_id)
            .bind(tenant)
            .fetch_one(pool)
            .await?;
    if !owned {
        return Ok(None);
    }
    get_summaries(pool, job_id).await.map(Some)
}
