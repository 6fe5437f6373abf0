//! PostgreSQL: the job state machine and the rows it leaves behind.
//!
//! Exactly-once effects rest on two facts: `jobs.job_id` is the primary
//! key, and every transition runs in a transaction that first locks the job
//! row and refuses to leave a terminal state. A redelivered message finds
//! the job `succeeded` and writes nothing.

use crate::config::{redact_url, Config};
use chrono::{DateTime, Utc};
use recap_engine::SummaryOutput;
use recap_job::Job;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("a batch transaction lost an item's result")]
    Batch,
}

pub async fn connect(config: &Config) -> Result<PgPool, StoreError> {
    PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&config.database.url)
        .await
        .map_err(|source| StoreError::Connect {
            url: redact_url(&config.database.url),
            source,
        })
}

pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The states of a job. Terminal ones are never left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Routed,
    Running,
    Succeeded,
    Failed,
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Routed => "routed",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Queued,
            Status::Routed,
            Status::Running,
            Status::Succeeded,
            Status::Failed,
            Status::Dead,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Dead)
    }
}

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// Runs `$step` (an async call on `$tx: &mut Tx` and `$item`) for each of
/// `$items` in one transaction, so that a batch of jobs costs one commit
/// (group commit). Items go in (tenant, job id) order, so that two
/// processes batching overlapping tenants take their row locks in the same
/// order. If the batch transaction fails, each item is tried in a
/// transaction of its own: one bad item cannot fail the others, and what
/// the batch wrote was rolled back. Results come back in the items' order.
/// A macro, not a function taking an async closure: the closure's borrow
/// of the transaction would not be `Send` for every lifetime, which the
/// consumer's spawned tasks need.
macro_rules! batched {
    ($pool:expr, $items:expr, |$tx:ident, $item:ident| $step:expr) => {{
        let pool: &PgPool = $pool;
        let items = $items;
        let order = lock_order(items);
        let mut together = None;
        if items.len() > 1 {
            let all: Result<Vec<_>, StoreError> = async {
                let mut tx = pool.begin().await?;
                let mut out = Vec::with_capacity(items.len());
                for &i in &order {
                    let $tx = &mut tx;
                    let $item = &items[i];
                    out.push($step.await?);
                }
                tx.commit().await?;
                Ok(out)
            }
            .await;
            match all {
                Ok(out) => together = Some(in_item_order(&order, out)),
                Err(e) => {
                    tracing::warn!(error = %e, items = items.len(), "batch transaction failed; one transaction per job instead");
                }
            }
        }
        match together {
            Some(results) => results,
            None => {
                let mut out = Vec::with_capacity(items.len());
                for item in items.iter() {
                    out.push(
                        async {
                            let mut tx = pool.begin().await?;
                            let $tx = &mut tx;
                            let $item = item;
                            let t = $step.await?;
                            tx.commit().await?;
                            Ok::<_, StoreError>(t)
                        }
                        .await,
                    );
                }
                out
            }
        }
    }};
}

/// The order a batch takes its row locks in: by tenant, then job id.
fn lock_order<I: HasJob>(items: &[I]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| {
        let (ja, jb) = (items[a].job(), items[b].job());
        (&ja.tenant, ja.job_id).cmp(&(&jb.tenant, jb.job_id))
    });
    order
}

/// Results computed in `order`, put back in the items' order.
fn in_item_order<T>(order: &[usize], out: Vec<T>) -> Vec<Result<T, StoreError>> {
    let mut by_item: Vec<Option<T>> = (0..order.len()).map(|_| None).collect();
    for (&i, t) in order.iter().zip(out) {
        by_item[i] = Some(t);
    }
    by_item
        .into_iter()
        .map(|t| t.ok_or(StoreError::Batch))
        .collect()
}

/// What a batch item is about, for lock ordering.
trait HasJob {
    fn job(&self) -> &Job;
}

impl HasJob for &Job {
    fn job(&self) -> &Job {
        self
    }
}

impl<T> HasJob for (&Job, T) {
    fn job(&self) -> &Job {
        self.0
    }
}

fn kinds(job: &Job) -> Vec<String> {
    job.summaries
        .iter()
        .map(|k| k.as_str().to_string())
        .collect()
}

/// Inserts the job in `status` unless it exists; returns the status it has
/// after the call, locked for the rest of the transaction.
async fn ensure_job_locked(tx: &mut Tx, job: &Job, status: Status) -> Result<Status, StoreError> {
    sqlx::query(
        "INSERT INTO jobs (job_id, tenant, status, quality, language, summary_kinds, metadata,
                           callback_url, input_bytes, utterances, queued_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job.job_id)
    .bind(&job.tenant)
    .bind(status.as_str())
    .bind(job.quality.as_str())
    .bind(job.language.as_deref())
    .bind(kinds(job))
    .bind(
        job.metadata
            .as_ref()
            .map(|m| serde_json::Value::Object(m.clone())),
    )
    .bind(job.callback_url.as_deref())
    .bind(job.transcript_bytes() as i32)
    .bind(job.transcript.len() as i32)
    .execute(&mut **tx)
    .await?;
    let row = sqlx::query("SELECT status FROM jobs WHERE job_id = $1 FOR UPDATE")
        .bind(job.job_id)
        .fetch_one(&mut **tx)
        .await?;
    let s: String = row.try_get("status")?;
    Ok(Status::parse(&s).unwrap_or(Status::Queued))
}

/// Gateway side: the job is accepted as `queued`. Returns false when a job
/// with this id already existed (nothing is written then).
pub async fn insert_queued(pool: &PgPool, job: &Job) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let existed: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = $1)")
        .bind(job.job_id)
        .fetch_one(&mut *tx)
        .await?;
    if !existed {
        ensure_job_locked(&mut tx, job, Status::Queued).await?;
    }
    tx.commit().await?;
    Ok(!existed)
}

/// Writes the webhook outbox row for a job that ended, when it gave a
/// callback URL; in the caller's transaction, so that the end and the
/// notification commit together.
async fn enqueue_webhook(
    tx: &mut Tx,
    job_id: Uuid,
    payload: &serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (job_id, tenant, url, event, payload)
         SELECT job_id, tenant, callback_url, $2, $3 FROM jobs WHERE job_id = $1 AND callback_url IS NOT NULL
         ON CONFLICT (job_id, event) DO NOTHING",
    )
    .bind(job_id)
    .bind(payload["event"].as_str().unwrap_or("job.completed"))
    .bind(payload)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What the router records for one decision.
#[derive(Debug, Clone)]
pub struct Decision {
    pub tier: String,
    pub model: String,
    pub reason: String,
    pub features: serde_json::Value,
    pub trail: serde_json::Value,
    pub estimated_cost_usd: f64,
    pub policy_version: String,
    pub shadow: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RouteOutcome {
    /// First decision for this job: publish it to `tier` (and to large as a
    /// shadow when `shadow`), naming `model`.
    Routed {
        tier: String,
        model: String,
        reason: String,
        shadow: bool,
    },
    /// Decided before (a redelivery or a duplicate publish): the earlier route.
    AlreadyRouted {
        tier: String,
        model: String,
        status: Status,
    },
    /// The policy refused the job (no tier, budget exhausted): no row written
    /// but the job's own.
    Refused { code: String, message: String },
}

/// Money left to a tenant, read under the lock of its budget row. Spent is
/// the actual cost of finished jobs and the estimate of the others.
async fn budget_state(tx: &mut Tx, tenant: &str) -> Result<recap_policy::BudgetState, StoreError> {
    let row: Option<(Option<f64>, Option<f64>)> = sqlx::query_as(
        "SELECT daily_usd::float8, monthly_usd::float8 FROM tenant_budgets WHERE tenant = $1 FOR UPDATE",
    )
    .bind(tenant)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((daily, monthly)) = row else {
        return Ok(recap_policy::BudgetState::default());
    };
    // The latest entry of each job counts: its actual cost once booked, its
    // estimate until then.
    const SPENT_SINCE: &str = "SELECT coalesce(sum(cost), 0)::float8 FROM (
            SELECT DISTINCT ON (job_id) cost_usd AS cost FROM usage_ledger
            WHERE tenant = $1 AND entry IN ('estimate', 'actual')
              AND created_at >= date_trunc($2, now())
            ORDER BY job_id, (entry = 'actual') DESC, id DESC) s";
    let day: f64 = sqlx::query_scalar(SPENT_SINCE)
        .bind(tenant)
        .bind("day")
        .fetch_one(&mut **tx)
        .await?;
    let month: f64 = sqlx::query_scalar(SPENT_SINCE)
        .bind(tenant)
        .bind("month")
        .fetch_one(&mut **tx)
        .await?;
    Ok(recap_policy::BudgetState {
        daily_remaining_usd: daily.map(|d| d - day),
        monthly_remaining_usd: monthly.map(|m| m - month),
        daily_limit_usd: daily,
        monthly_limit_usd: monthly,
    })
}

/// Decides and records the jobs' routes, all in one transaction: each job's
/// row and its tenant's budget row are locked, `decide` sees the budget
/// left (this batch's earlier estimates included), and the decisions, the
/// estimates in the ledger and the moves to `routed` commit together. An
/// already-routed job keeps its first decision.
pub async fn route_jobs(
    pool: &PgPool,
    jobs: &[&Job],
    mut decide: impl FnMut(
        &Job,
        recap_policy::BudgetState,
    ) -> Result<Decision, recap_policy::PolicyError>,
) -> Vec<Result<RouteOutcome, StoreError>> {
    batched!(pool, jobs, |tx, job| route_in(tx, job, |b| decide(job, b)))
}

async fn route_in(
    tx: &mut Tx,
    job: &Job,
    decide: impl FnOnce(recap_policy::BudgetState) -> Result<Decision, recap_policy::PolicyError>,
) -> Result<RouteOutcome, StoreError> {
    let status = ensure_job_locked(tx, job, Status::Queued).await?;
    if status != Status::Queued {
        let first: Option<(String, String)> = sqlx::query_as(
            "SELECT tier, model FROM route_decisions WHERE job_id = $1 ORDER BY id LIMIT 1",
        )
        .bind(job.job_id)
        .fetch_optional(&mut **tx)
        .await?;
        let (tier, model) = first.unwrap_or_default();
        return Ok(RouteOutcome::AlreadyRouted {
            tier,
            model,
            status,
        });
    }
    let budget = budget_state(tx, &job.tenant).await?;
    let decision = match decide(budget) {
        Ok(d) => d,
        Err(e) => {
            return Ok(RouteOutcome::Refused {
                code: e.code().to_string(),
                message: e.to_string(),
            });
        }
    };
    // The decision, the estimate and the move to `routed`: one statement
    // (one round trip) instead of three.
    let statement = sqlx::query(
        "WITH decision AS (
             INSERT INTO route_decisions (job_id, tier, model, reason, features, trail,
                                          estimated_cost_usd, policy_version, shadow)
             VALUES ($1, $2, $3, $4, $5, $6, $7::float8::numeric, $8, $9)),
         estimate AS (
             INSERT INTO usage_ledger (tenant, job_id, tier, model, entry, cost_usd)
             VALUES ($10, $1, $2, $3, 'estimate', $7::float8::numeric))
         UPDATE jobs SET status = 'routed', tier = $2, model = $3, routed_at = now(), updated_at = now()
         WHERE job_id = $1",
    );
    bind_decision(statement, job.job_id, &decision)
        .bind(&job.tenant)
        .execute(&mut **tx)
        .await?;
    Ok(RouteOutcome::Routed {
        tier: decision.tier,
        model: decision.model,
        reason: decision.reason,
        shadow: decision.shadow,
    })
}

async fn insert_decision(tx: &mut Tx, job_id: Uuid, d: &Decision) -> Result<(), StoreError> {
    let statement = sqlx::query(
        "INSERT INTO route_decisions (job_id, tier, model, reason, features, trail, estimated_cost_usd, policy_version, shadow)
         VALUES ($1, $2, $3, $4, $5, $6, $7::float8::numeric, $8, $9)",
    );
    bind_decision(statement, job_id, d)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds a decision as $1-$9 (job id, tier, model, reason, features,
/// trail, estimated cost, policy version, shadow): the order of every
/// statement that writes a `route_decisions` row.
fn bind_decision<'q>(q: PgQuery<'q>, job_id: Uuid, d: &'q Decision) -> PgQuery<'q> {
    q.bind(job_id)
        .bind(&d.tier)
        .bind(&d.model)
        .bind(&d.reason)
        .bind(&d.features)
        .bind(&d.trail)
        .bind(d.estimated_cost_usd)
        .bind(&d.policy_version)
        .bind(d.shadow)
}

/// The cascade: a compact output failed its checks, so the job goes to the
/// large tier. Records the `cascade` decision once (a redelivered compact
/// message finds it there) and moves the job back to `routed` on large.
/// Returns false when the job already ended.
pub async fn record_cascade(
    pool: &PgPool,
    job: &Job,
    decision: &Decision,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let status = ensure_job_locked(&mut tx, job, Status::Running).await?;
    if status.is_terminal() {
        tx.commit().await?;
        return Ok(false);
    }
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM route_decisions WHERE job_id = $1 AND reason = 'cascade')",
    )
    .bind(job.job_id)
    .fetch_one(&mut *tx)
    .await?;
    if !exists {
        insert_decision(&mut tx, job.job_id, decision).await?;
    }
    sqlx::query(
        "UPDATE jobs SET status = 'routed', tier = $2, model = $3, updated_at = now() WHERE job_id = $1",
    )
    .bind(job.job_id)
    .bind(&decision.tier)
    .bind(&decision.model)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// A shadow run's outputs: recorded for calibration, never returned, and
/// the job's own state untouched.
pub async fn record_shadow(
    pool: &PgPool,
    job: &Job,
    done: &Completion<'_>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    insert_summaries(&mut tx, job.job_id, done, true).await?;
    sqlx::query(
        "INSERT INTO usage_ledger (tenant, job_id, tier, model, entry, cost_usd)
         VALUES ($1, $2, $3, $4, 'shadow', $5::float8::numeric)
         ON CONFLICT DO NOTHING",
    )
    .bind(&job.tenant)
    .bind(job.job_id)
    .bind(done.tier)
    .bind(done.model)
    .bind(done.cost_usd)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Sets a tenant's budgets (None clears one).
pub async fn set_budget(
    pool: &PgPool,
    tenant: &str,
    daily: Option<f64>,
    monthly: Option<f64>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tenant_budgets (tenant, daily_usd, monthly_usd) VALUES ($1, $2::float8::numeric, $3::float8::numeric)
         ON CONFLICT (tenant) DO UPDATE SET daily_usd = EXCLUDED.daily_usd, monthly_usd = EXCLUDED.monthly_usd, updated_at = now()",
    )
    .bind(tenant)
    .bind(daily)
    .bind(monthly)
    .execute(pool)
    .await?;
    Ok(())
}

/// A tenant's budget state as the router would see it now.
pub async fn read_budget(
    pool: &PgPool,
    tenant: &str,
) -> Result<recap_policy::BudgetState, StoreError> {
    let mut tx = pool.begin().await?;
    let b = budget_state(&mut tx, tenant).await?;
    tx.rollback().await?;
    Ok(b)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Run it; this is try number `attempt`.
    Run { attempt: i32 },
    /// The job already ended (a redelivery): ack and move on.
    AlreadyDone(Status),
}

/// A worker takes the job: `running`, one more attempt.
pub async fn start_jobs(
    pool: &PgPool,
    tier: &str,
    jobs: &[(&Job, &str)],
) -> Vec<Result<StartOutcome, StoreError>> {
    batched!(pool, jobs, |tx, item| start_in(tx, item.0, tier, item.1))
}

async fn start_in(
    tx: &mut Tx,
    job: &Job,
    tier: &str,
    model: &str,
) -> Result<StartOutcome, StoreError> {
    // The common case, a routed job's row: one statement locks it and
    // counts the attempt. Otherwise (no row yet, or an ended job) the row
    // is created or read under its lock first.
    if let Some(attempt) = start_unended(tx, job.job_id, tier, model).await? {
        return Ok(StartOutcome::Run { attempt });
    }
    let status = ensure_job_locked(tx, job, Status::Routed).await?;
    if status.is_terminal() {
        return Ok(StartOutcome::AlreadyDone(status));
    }
    match start_unended(tx, job.job_id, tier, model).await? {
        Some(attempt) => Ok(StartOutcome::Run { attempt }),
        None => Err(StoreError::Db(sqlx::Error::RowNotFound)),
    }
}

/// `running`, one more attempt, unless the job ended; None when no row
/// changed.
async fn start_unended(
    tx: &mut Tx,
    job_id: Uuid,
    tier: &str,
    model: &str,
) -> Result<Option<i32>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, tier = $2, model = $3,
                         started_at = now(), updated_at = now()
         WHERE job_id = $1 AND status NOT IN ('succeeded', 'failed', 'dead')
         RETURNING attempts",
    )
    .bind(job_id)
    .bind(tier)
    .bind(model)
    .fetch_optional(&mut **tx)
    .await?)
}

/// The finished work of one job.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    pub tier: &'a str,
    pub model: &'a str,
    pub engine: &'a str,
    pub outputs: &'a [SummaryOutput],
    pub cost_usd: f64,
}

/// One `summaries` row per output; a row already there is kept.
async fn insert_summaries(
    tx: &mut Tx,
    job_id: Uuid,
    done: &Completion<'_>,
    shadow: bool,
) -> Result<(), StoreError> {
    for out in done.outputs {
        sqlx::query(
            "INSERT INTO summaries (job_id, kind, text, model, engine, input_tokens, output_tokens,
                                    prefill_ms, decode_ms, total_ms, shadow)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (job_id, kind, shadow) DO NOTHING",
        )
        .bind(job_id)
        .bind(out.kind.as_str())
        .bind(&out.text)
        .bind(done.model)
        .bind(done.engine)
        .bind(out.input_tokens as i32)
        .bind(out.output_tokens as i32)
        .bind(out.prefill_ms)
        .bind(out.decode_ms)
        .bind(out.total_ms)
        .bind(shadow)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Commits the summaries and `succeeded` in one transaction. Returns false
/// when the job had already ended: then nothing was written.
pub async fn complete_jobs(
    pool: &PgPool,
    jobs: &[(&Job, Completion<'_>)],
) -> Vec<Result<bool, StoreError>> {
    batched!(pool, jobs, |tx, item| complete_in(tx, item.0, &item.1))
}

async fn complete_in(tx: &mut Tx, job: &Job, done: &Completion<'_>) -> Result<bool, StoreError> {
    let mut input_tokens = 0i64;
    let mut output_tokens = 0i64;
    let mut chunks = 1i32;
    for out in done.outputs {
        input_tokens += out.input_tokens as i64;
        output_tokens += out.output_tokens as i64;
        chunks = chunks.max(out.chunks as i32);
    }
    // The common case, a running job's row: one statement locks it and
    // ends it; its rows follow in the same transaction. Otherwise the row
    // is created or read under its lock first.
    let callback = match end_unended(tx, job.job_id, chunks, done.cost_usd).await? {
        Some(callback) => callback,
        None => {
            let status = ensure_job_locked(tx, job, Status::Running).await?;
            if status.is_terminal() {
                return Ok(false);
            }
            end_unended(tx, job.job_id, chunks, done.cost_usd)
                .await?
                .ok_or(StoreError::Db(sqlx::Error::RowNotFound))?
        }
    };
    insert_summaries(tx, job.job_id, done, false).await?;
    sqlx::query(
        "INSERT INTO usage_ledger (tenant, job_id, tier, model, entry, input_tokens, output_tokens, cost_usd)
         VALUES ($1, $2, $3, $4, 'actual', $5, $6, $7::float8::numeric)
         ON CONFLICT DO NOTHING",
    )
    .bind(&job.tenant)
    .bind(job.job_id)
    .bind(done.tier)
    .bind(done.model)
    .bind(input_tokens.min(i32::MAX as i64) as i32)
    .bind(output_tokens.min(i32::MAX as i64) as i32)
    .bind(done.cost_usd)
    .execute(&mut **tx)
    .await?;
    if callback {
        let payload = crate::webhooks::event_payload(
            "job.completed",
            job.job_id,
            &job.tenant,
            "succeeded",
            serde_json::json!({
                "model": done.model,
                "tier": done.tier,
                "cost_usd": done.cost_usd,
                "summaries": done.outputs.iter().map(|o| serde_json::json!({"kind": o.kind, "text": o.text})).collect::<Vec<_>>(),
            }),
        );
        enqueue_webhook(tx, job.job_id, &payload).await?;
    }
    Ok(true)
}

/// `succeeded` unless the job ended; whether it has a callback URL, or
/// None when no row changed.
async fn end_unended(
    tx: &mut Tx,
    job_id: Uuid,
    chunks: i32,
    cost_usd: f64,
) -> Result<Option<bool>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET status = 'succeeded', chunks = $2, cost_usd = $3::float8::numeric,
                         error_code = NULL, error = NULL, finished_at = now(), updated_at = now()
         WHERE job_id = $1 AND status NOT IN ('succeeded', 'failed', 'dead')
         RETURNING callback_url IS NOT NULL",
    )
    .bind(job_id)
    .bind(chunks)
    .bind(cost_usd)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Marks a job `dead` (or `failed`) with its reason, creating the row when
/// the job never got one (a refused message whose id could be read).
/// A job that already ended keeps its state.
pub async fn mark_ended(
    pool: &PgPool,
    job_id: Uuid,
    tenant: Option<&str>,
    status: Status,
    code: &str,
    message: &str,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO jobs (job_id, tenant, status, queued_at) VALUES ($1, $2, $3, now())
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job_id)
    .bind(tenant.unwrap_or("(unknown)"))
    .bind(status.as_str())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE jobs SET status = $2, error_code = $3, error = $4, finished_at = now(), updated_at = now()
         WHERE job_id = $1
           AND (status NOT IN ('succeeded', 'failed', 'dead') OR (status = $2 AND error_code IS NULL))",
    )
    .bind(job_id)
    .bind(status.as_str())
    .bind(code)
    .bind(message)
    .execute(&mut *tx)
    .await?;
    let tenant: String = sqlx::query_scalar("SELECT tenant FROM jobs WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
    let payload = crate::webhooks::event_payload(
        "job.failed",
        job_id,
        &tenant,
        status.as_str(),
        serde_json::json!({"error_code": code, "error": message}),
    );
    enqueue_webhook(&mut tx, job_id, &payload).await?;
    tx.commit().await?;
    Ok(())
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
    let Some(r) = row else { return Ok(None) };
    Ok(Some(JobRow {
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
    }))
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

/// Liveness of the database connection, for readiness probes.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use recap_job::SummaryKind;

    /// `createdb` or `dropdb` on the local server (the SQL would have to
    /// be built at run time, which shipped sources never do).
    fn pg_tool(tool: &str, name: &str) {
        let ok = std::process::Command::new(tool)
            .args(["-h", "127.0.0.1", "-U", "postgres", name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "{tool} {name} failed");
    }

    /// A private database, migrated; dropped by the caller.
    async fn private_db() -> (PgPool, String) {
        let name = format!("recap_unit_{}", Uuid::new_v4().simple());
        pg_tool("createdb", &name);
        let db = PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
            .await
            .expect("connect");
        migrate(&db).await.expect("migrate");
        (db, name)
    }

    fn job(tenant: &str) -> Job {
        let body = serde_json::json!({
            "version": 1,
            "job_id": Uuid::new_v4(),
            "tenant": tenant,
            "transcript": [{"speaker": "A", "text": "We ship on Friday."}],
            "summaries": ["short"],
        });
        recap_job::parse_job(body.to_string().as_bytes(), &recap_job::Limits::default())
            .expect("a valid job")
    }

    fn output(text: &str) -> SummaryOutput {
        SummaryOutput {
            kind: SummaryKind::Short,
            text: text.into(),
            input_tokens: 5,
            output_tokens: 3,
            prefill_ms: 1.0,
            decode_ms: 1.0,
            total_ms: 2.0,
            chunks: 1,
        }
    }

    #[tokio::test]
    async fn one_bad_row_does_not_fail_its_batch_mates() {
        let (db, name) = private_db().await;
        let jobs = [job("b"), job("a"), job("c")];
        let started = start_jobs(
            &db,
            "compact",
            &jobs.iter().map(|j| (j, "m")).collect::<Vec<_>>(),
        )
        .await;
        assert!(started
            .iter()
            .all(|s| matches!(s, Ok(StartOutcome::Run { attempt: 1 }))));
        // PostgreSQL refuses U+0000 in text: the middle job's summary
        // cannot be written, and the batch transaction fails with it.
        let outs = [output("fine"), output("bad\0text"), output("fine too")];
        let items: Vec<(&Job, Completion<'_>)> = jobs
            .iter()
            .zip(&outs)
            .map(|(j, o)| {
                (
                    j,
                    Completion {
                        tier: "compact",
                        model: "m",
                        engine: "extractive",
                        outputs: std::slice::from_ref(o),
                        cost_usd: 0.0,
                    },
                )
            })
            .collect();
        let done = complete_jobs(&db, &items).await;
        assert!(matches!(done[0], Ok(true)), "{:?}", done[0]);
        assert!(done[1].is_err(), "{:?}", done[1]);
        assert!(matches!(done[2], Ok(true)), "{:?}", done[2]);
        for (j, want) in jobs.iter().zip(["succeeded", "running", "succeeded"]) {
            let row = get_job(&db, j.job_id).await.expect("read").expect("row");
            assert_eq!(row.status, want, "{}", j.tenant);
            assert_eq!(row.attempts, 1);
        }
        assert_eq!(
            get_summaries(&db, jobs[1].job_id)
                .await
                .expect("read")
                .len(),
            0
        );
        db.close().await;
        pg_tool("dropdb", &name);
    }
}
