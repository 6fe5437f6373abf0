//! PostgreSQL: the job state machine and the rows it leaves behind.
//!
//! Exactly-once effects rest on two facts: `jobs.job_id` is the primary
//! key, and every transition runs in a transaction that first locks the job
//! row and refuses to leave a terminal state. A redelivered message finds
//! the job `succeeded` and writes nothing.
//!
//! The batch statements that join arrays of ids against the growing tables
//! are not kept prepared (`persistent(false)`): PostgreSQL plans them for
//! each call, for the tables as they are then. A kept statement's generic
//! plan, made while a table is small, scans it whole as it grows. Planning
//! every statement of the session (`plan_cache_mode`) would also replan the
//! foreign-key checks for each row, which costs more than it saves.

use crate::config::{redact_url, Config};
use chrono::{DateTime, Utc};
use recap_engine::SummaryOutput;
use recap_job::Job;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap, HashSet};
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

/// Runs `$step` (an async call on `$tx: &mut Tx` and `$items`, a slice of
/// item references, returning one result per item) over the whole batch in
/// one transaction, so that a batch of jobs costs one commit and a few
/// set-based statements. Items go in (tenant, job id) order, so that two
/// processes batching overlapping tenants take their row locks in the same
/// order. If the batch transaction fails, each item is tried alone in a
/// transaction of its own: one bad item cannot fail the others, and what
/// the batch wrote was rolled back. Results come back in the items' order.
/// A macro, not a function taking an async closure: the closure's borrow
/// of the transaction would not be `Send` for every lifetime, which the
/// consumer's spawned tasks need.
macro_rules! batched {
    ($pool:expr, $items:expr, |$tx:ident, $chunk:ident| $step:expr) => {{
        let pool: &PgPool = $pool;
        let items = $items;
        let order = lock_order(items);
        let mut together = None;
        if items.len() > 1 {
            let ordered: Vec<_> = order.iter().map(|&i| &items[i]).collect();
            let all: Result<Vec<_>, StoreError> = async {
                let mut tx = pool.begin().await?;
                let $tx = &mut tx;
                let $chunk = ordered.as_slice();
                let out = $step.await?;
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
                            let $chunk = std::slice::from_ref(&item);
                            let t = $step.await?.into_iter().next().ok_or(StoreError::Batch)?;
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

/// How a missing job row is created.
#[derive(Clone, Copy)]
enum NewRow<'a> {
    /// In this status.
    As(Status),
    /// Already `running` on its first attempt, on `tier` with each job's
    /// model: a worker's start of a job that never had a row.
    Running {
        tier: &'a str,
        models: &'a [&'a str],
    },
    /// Already `succeeded` on its first attempt, with each job's model,
    /// chunk count and cost: an instant run of a job that never had a row.
    Succeeded {
        tier: &'a str,
        models: &'a [&'a str],
        chunks: &'a [i32],
        costs: &'a [f64],
    },
}

/// Inserts each job unless it exists: one statement for the batch. The ids
/// of the rows inserted.
async fn insert_jobs(tx: &mut Tx, jobs: &[&Job], new: NewRow<'_>) -> Result<Vec<Uuid>, StoreError> {
    fn column<'j, T>(jobs: &[&'j Job], f: impl Fn(&'j Job) -> T) -> Vec<T> {
        jobs.iter().map(|j| f(j)).collect()
    }
    let n = jobs.len();
    type Columns<'m> = (
        Status,
        Option<&'m str>,
        Vec<Option<&'m str>>,
        Vec<Option<i32>>,
        Vec<Option<f64>>,
    );
    let (status, tier, models, chunks, costs): Columns<'_> = match new {
        NewRow::As(status) => (status, None, vec![None; n], vec![None; n], vec![None; n]),
        NewRow::Running { tier, models } => (
            Status::Running,
            Some(tier),
            models.iter().map(|m| Some(*m)).collect(),
            vec![None; n],
            vec![None; n],
        ),
        NewRow::Succeeded {
            tier,
            models,
            chunks,
            costs,
        } => (
            Status::Succeeded,
            Some(tier),
            models.iter().map(|m| Some(*m)).collect(),
            chunks.iter().map(|c| Some(*c)).collect(),
            costs.iter().map(|c| Some(*c)).collect(),
        ),
    };
    Ok(sqlx::query_scalar(
        "INSERT INTO jobs (job_id, tenant, status, quality, language, summary_kinds, metadata,
                           callback_url, input_bytes, utterances, queued_at,
                           tier, model, attempts, started_at, chunks, cost_usd, finished_at)
         SELECT j.job_id, j.tenant, $3, j.quality, j.language, string_to_array(j.kinds, ','),
                j.metadata, j.callback_url, j.input_bytes, j.utterances, now(),
                $11, j.model, CASE WHEN $13 THEN 1 ELSE 0 END, CASE WHEN $13 THEN now() END,
                j.chunks, j.cost::numeric, CASE WHEN $3 = 'succeeded' THEN now() END
         FROM unnest($1::uuid[], $2::text[], $4::text[], $5::text[], $6::text[], $7::jsonb[],
                     $8::text[], $9::int4[], $10::int4[], $12::text[], $14::int4[], $15::float8[])
              AS j(job_id, tenant, quality, language, kinds, metadata, callback_url, input_bytes,
                   utterances, model, chunks, cost)
         ON CONFLICT (job_id) DO NOTHING
         RETURNING job_id",
    )
    .bind(column(jobs, |j| j.job_id))
    .bind(column(jobs, |j| j.tenant.as_str()))
    .bind(status.as_str())
    .bind(column(jobs, |j| j.quality.as_str()))
    .bind(column(jobs, |j| j.language.as_deref()))
    // A job's kinds as one comma-joined text: arrays of arrays do not
    // unnest row by row. Kind names are fixed identifiers, never commas.
    .bind(column(jobs, |j| {
        j.summaries
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }))
    .bind(column(jobs, |j| {
        j.metadata
            .as_ref()
            .map(|m| serde_json::Value::Object(m.clone()))
    }))
    .bind(column(jobs, |j| j.callback_url.as_deref()))
    .bind(column(jobs, |j| j.transcript_bytes() as i32))
    .bind(column(jobs, |j| j.transcript.len() as i32))
    .bind(tier)
    .bind(models)
    .bind(tier.is_some())
    .bind(chunks)
    .bind(costs)
    .fetch_all(&mut **tx)
    .await?)
}

/// A job row under its lock: its status, and whether it belongs to the
/// tenant of the message at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locked {
    Own(Status),
    /// The row is another tenant's: a message reused its job_id. Nothing
    /// is written to it; the message is dead-lettered as `tenant_mismatch`.
    Foreign,
}

/// Locks the jobs' rows, in job id order; the status and tenant of each.
async fn lock_jobs(
    tx: &mut Tx,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, (Status, String)>, StoreError> {
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT job_id, status, tenant FROM jobs WHERE job_id = ANY($1) ORDER BY job_id FOR UPDATE",
    )
    .persistent(false)
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, s, t)| (id, (Status::parse(&s).unwrap_or(Status::Queued), t)))
        .collect())
}

/// Inserts the job in `status` unless it exists; returns the status it has
/// after the call, locked for the rest of the transaction, or Foreign when
/// the row belongs to another tenant than the job's.
async fn ensure_job_locked(tx: &mut Tx, job: &Job, status: Status) -> Result<Locked, StoreError> {
    insert_jobs(tx, &[job], NewRow::As(status)).await?;
    let (status, tenant) = lock_jobs(tx, &[job.job_id])
        .await?
        .remove(&job.job_id)
        .ok_or(StoreError::Db(sqlx::Error::RowNotFound))?;
    Ok(if tenant == job.tenant {
        Locked::Own(status)
    } else {
        Locked::Foreign
    })
}

/// The tenant that owns each of the job rows that exist.
async fn owners(tx: &mut Tx, ids: &[Uuid]) -> Result<HashMap<Uuid, String>, StoreError> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT job_id, tenant FROM jobs WHERE job_id = ANY($1)")
            .persistent(false)
            .bind(ids)
            .fetch_all(&mut **tx)
            .await?;
    Ok(rows.into_iter().collect())
}

/// What a transition did to a job that a message named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written.
    Written,
    /// The job had already ended: nothing was written.
    AlreadyEnded,
    /// The job_id is another tenant's: nothing was written.
    TenantMismatch,
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

/// A job that ended without running: its estimate stops counting against
/// the tenant's budget (an `actual` entry of zero supersedes it).
async fn release_estimate(tx: &mut Tx, job_id: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO usage_ledger (tenant, job_id, tier, model, entry, cost_usd)
         SELECT tenant, job_id, tier, model, 'actual', 0 FROM usage_ledger
         WHERE job_id = $1 AND entry = 'estimate'
         ON CONFLICT DO NOTHING",
    )
    .bind(job_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Now `failed` with `cancelled`; its estimate released, its
    /// `job.failed` webhook queued.
    Done,
    /// Past the point of cancelling: the job's status.
    TooLate(Status),
    /// No such job for this tenant.
    NotFound,
}

/// Cancels a tenant's job that is still `queued` or `routed`, as one
/// transition: the row, the ledger and the outbox in one transaction.
pub async fn cancel_job(
    pool: &PgPool,
    job_id: Uuid,
    tenant: &str,
) -> Result<Cancelled, StoreError> {
    let mut tx = pool.begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM jobs WHERE job_id = $1 AND tenant = $2 FOR UPDATE")
            .bind(job_id)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(status) = status.as_deref().and_then(Status::parse) else {
        return Ok(Cancelled::NotFound);
    };
    if !matches!(status, Status::Queued | Status::Routed) {
        return Ok(Cancelled::TooLate(status));
    }
    const MESSAGE: &str = "cancelled by the client";
    sqlx::query(
        "UPDATE jobs SET status = 'failed', error_code = 'cancelled', error = $2,
                         finished_at = now(), updated_at = now()
         WHERE job_id = $1",
    )
    .bind(job_id)
    .bind(MESSAGE)
    .execute(&mut *tx)
    .await?;
    release_estimate(&mut tx, job_id).await?;
    let payload = cancel_event(job_id, tenant);
    enqueue_webhook(&mut tx, job_id, &payload).await?;
    tx.commit().await?;
    Ok(Cancelled::Done)
}

/// The `job.failed` event of a cancelled job.
pub fn cancel_event(job_id: Uuid, tenant: &str) -> serde_json::Value {
    crate::webhooks::event_payload(
        "job.failed",
        job_id,
        tenant,
        Status::Failed.as_str(),
        serde_json::json!({"error_code": "cancelled", "error": "cancelled by the client"}),
    )
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
    /// The job_id is another tenant's: nothing written.
    TenantMismatch,
}

/// The budget of a tenant that has no `tenant_budgets` row (config
/// `[budgets]`); None is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DefaultBudget {
    pub daily_usd: Option<f64>,
    pub monthly_usd: Option<f64>,
}

impl DefaultBudget {
    /// No limit for tenants without a budget row.
    pub const NONE: DefaultBudget = DefaultBudget {
        daily_usd: None,
        monthly_usd: None,
    };
}

/// Money left to a tenant, read under the lock of its budget row (or of an
/// advisory lock on its name, where it has none and the default budget
/// applies). Spent is the actual cost of finished jobs and the estimate of
/// the others.
async fn budget_state(
    tx: &mut Tx,
    tenant: &str,
    defaults: DefaultBudget,
) -> Result<recap_policy::BudgetState, StoreError> {
    let row: Option<(Option<f64>, Option<f64>)> = sqlx::query_as(
        "SELECT daily_usd::float8, monthly_usd::float8 FROM tenant_budgets WHERE tenant = $1 FOR UPDATE",
    )
    .bind(tenant)
    .fetch_optional(&mut **tx)
    .await?;
    let (daily, monthly) = match row {
        Some(limits) => limits,
        None if defaults == DefaultBudget::NONE => return Ok(recap_policy::BudgetState::default()),
        None => {
            // Two routers spending one tenant's default budget take turns.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('recap.budget.' || $1, 0))")
                .bind(tenant)
                .execute(&mut **tx)
                .await?;
            (defaults.daily_usd, defaults.monthly_usd)
        }
    };
    // The latest entry of each job counts: its actual cost once booked, its
    // estimate until then.
    const SPENT_SINCE: &str = "SELECT coalesce(sum(cost), 0)::float8 FROM (
            SELECT DISTINCT ON (job_id) cost_usd AS cost FROM usage_ledger
            WHERE tenant = $1 AND entry IN ('estimate', 'actual')
              AND created_at >= date_trunc($2, now())
            ORDER BY job_id, (entry = 'actual') DESC, id DESC) s";
    let day: f64 = sqlx::query_scalar(SPENT_SINCE)
        .persistent(false)
        .bind(tenant)
        .bind("day")
        .fetch_one(&mut **tx)
        .await?;
    let month: f64 = sqlx::query_scalar(SPENT_SINCE)
        .persistent(false)
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

/// Decisions as rows: `unnest` of the arrays that `bind_decisions` binds
/// as $1-$9, the order of every statement that writes `route_decisions`.
macro_rules! decision_rows {
    () => {
        "unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
                $7::float8[], $8::text[], $9::bool[])
         AS d(job_id, tier, model, reason, features, trail, cost, policy_version, shadow)"
    };
}

/// The insert of `route_decisions` rows from a source named after it.
macro_rules! insert_decisions_from {
    () => {
        "INSERT INTO route_decisions (job_id, tier, model, reason, features, trail,
                                      estimated_cost_usd, policy_version, shadow)
         SELECT job_id, tier, model, reason, features, trail, cost::numeric, policy_version, shadow
         FROM"
    };
}

/// Decides and records the jobs' routes, all in one transaction: each job's
/// row and its tenant's budget row are locked, `decide` sees the budget
/// left (this batch's earlier estimates included), and the decisions, the
/// estimates in the ledger and the moves to `routed` commit together. An
/// already-routed job keeps its first decision.
pub async fn route_jobs(
    pool: &PgPool,
    jobs: &[&Job],
    defaults: DefaultBudget,
    mut decide: impl FnMut(
        &Job,
        recap_policy::BudgetState,
    ) -> Result<Decision, recap_policy::PolicyError>,
) -> Vec<Result<RouteOutcome, StoreError>> {
    batched!(pool, jobs, |tx, chunk| route_set(
        tx,
        chunk,
        defaults,
        &mut decide
    ))
}

/// A batch's routes in a fixed number of statements: insert the rows that
/// are missing, lock them all (job id order), read the earlier routes of
/// jobs past `queued`, lock and read each tenant's budget (tenant order),
/// then write every decision, estimate and move to `routed` at once.
async fn route_set(
    tx: &mut Tx,
    jobs: &[&&Job],
    defaults: DefaultBudget,
    decide: &mut impl FnMut(
        &Job,
        recap_policy::BudgetState,
    ) -> Result<Decision, recap_policy::PolicyError>,
) -> Result<Vec<RouteOutcome>, StoreError> {
    let jobs: Vec<&Job> = jobs.iter().map(|j| **j).collect();
    insert_jobs(tx, &jobs, NewRow::As(Status::Queued)).await?;
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.job_id).collect();
    let locked = lock_jobs(tx, &ids).await?;
    let statuses: HashMap<Uuid, Status> = locked.iter().map(|(id, (s, _))| (*id, *s)).collect();
    let foreign = |job: &Job| {
        locked
            .get(&job.job_id)
            .is_some_and(|(_, t)| *t != job.tenant)
    };
    let past: Vec<Uuid> = statuses
        .iter()
        .filter(|(_, s)| **s != Status::Queued)
        .map(|(id, _)| *id)
        .collect();
    let mut earlier: HashMap<Uuid, (String, String)> = HashMap::new();
    if !past.is_empty() {
        let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
            "SELECT DISTINCT ON (job_id) job_id, tier, model FROM route_decisions
             WHERE job_id = ANY($1) ORDER BY job_id, id",
        )
        .persistent(false)
        .bind(&past)
        .fetch_all(&mut **tx)
        .await?;
        earlier.extend(rows.into_iter().map(|(id, t, m)| (id, (t, m))));
    }
    let mut budgets: BTreeMap<&str, recap_policy::BudgetState> = BTreeMap::new();
    for job in &jobs {
        if statuses.get(&job.job_id) == Some(&Status::Queued) && !foreign(job) {
            budgets.insert(&job.tenant, recap_policy::BudgetState::default());
        }
    }
    for (tenant, budget) in budgets.iter_mut() {
        *budget = budget_state(tx, tenant, defaults).await?;
    }

    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut decided: Vec<(Uuid, Decision)> = Vec::new();
    for job in &jobs {
        let status = *statuses
            .get(&job.job_id)
            .ok_or(StoreError::Db(sqlx::Error::RowNotFound))?;
        if foreign(job) {
            outcomes.push(RouteOutcome::TenantMismatch);
            continue;
        }
        // The same job twice in one batch: the second finds the first's route.
        if let Some((_, d)) = decided.iter().find(|(id, _)| *id == job.job_id) {
            outcomes.push(RouteOutcome::AlreadyRouted {
                tier: d.tier.clone(),
                model: d.model.clone(),
                status: Status::Routed,
            });
            continue;
        }
        if status != Status::Queued {
            let (tier, model) = earlier.get(&job.job_id).cloned().unwrap_or_default();
            outcomes.push(RouteOutcome::AlreadyRouted {
                tier,
                model,
                status,
            });
            continue;
        }
        let budget = budgets.entry(&job.tenant).or_default();
        match decide(job, *budget) {
            Ok(d) => {
                // What the ledger's estimate row would make budget_state say.
                let cost = d.estimated_cost_usd;
                budget.daily_remaining_usd = budget.daily_remaining_usd.map(|r| r - cost);
                budget.monthly_remaining_usd = budget.monthly_remaining_usd.map(|r| r - cost);
                outcomes.push(RouteOutcome::Routed {
                    tier: d.tier.clone(),
                    model: d.model.clone(),
                    reason: d.reason.clone(),
                    shadow: d.shadow,
                });
                decided.push((job.job_id, d));
            }
            Err(e) => outcomes.push(RouteOutcome::Refused {
                code: e.code().to_string(),
                message: e.to_string(),
            }),
        }
    }
    if !decided.is_empty() {
        // The decisions, the estimates and the moves to `routed`: one statement.
        let statement = sqlx::query(concat!(
            "WITH d AS (SELECT * FROM ",
            decision_rows!(),
            "), decision AS (",
            insert_decisions_from!(),
            " d), estimate AS (
                 INSERT INTO usage_ledger (tenant, job_id, tier, model, entry, cost_usd)
                 SELECT jobs.tenant, d.job_id, d.tier, d.model, 'estimate', d.cost::numeric
                 FROM d JOIN jobs USING (job_id))
             UPDATE jobs SET status = 'routed', tier = d.tier, model = d.model,
                             routed_at = now(), updated_at = now()
             FROM d WHERE jobs.job_id = d.job_id"
        ))
        .persistent(false);
        bind_decisions(statement, &decided)
            .execute(&mut **tx)
            .await?;
    }
    Ok(outcomes)
}

async fn insert_decision(tx: &mut Tx, job_id: Uuid, d: &Decision) -> Result<(), StoreError> {
    let statement = sqlx::query(concat!(insert_decisions_from!(), " ", decision_rows!()));
    bind_decisions(statement, &[(job_id, d.clone())])
        .execute(&mut **tx)
        .await?;
    Ok(())
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds decisions as the arrays $1-$9 of `decision_rows!`.
fn bind_decisions<'q>(q: PgQuery<'q>, decisions: &[(Uuid, Decision)]) -> PgQuery<'q> {
    let column = |f: fn(&Decision) -> &String| -> Vec<String> {
        decisions.iter().map(|(_, d)| f(d).clone()).collect()
    };
    q.bind(decisions.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(column(|d| &d.tier))
        .bind(column(|d| &d.model))
        .bind(column(|d| &d.reason))
        .bind(
            decisions
                .iter()
                .map(|(_, d)| d.features.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            decisions
                .iter()
                .map(|(_, d)| d.trail.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            decisions
                .iter()
                .map(|(_, d)| d.estimated_cost_usd)
                .collect::<Vec<_>>(),
        )
        .bind(column(|d| &d.policy_version))
        .bind(decisions.iter().map(|(_, d)| d.shadow).collect::<Vec<_>>())
}

/// The cascade: a compact output failed its checks, so the job goes to the
/// large tier. Records the `cascade` decision once (a redelivered compact
/// message finds it there) and moves the job back to `routed` on large.
pub async fn record_cascade(
    pool: &PgPool,
    job: &Job,
    decision: &Decision,
) -> Result<Committed, StoreError> {
    let mut tx = pool.begin().await?;
    match ensure_job_locked(&mut tx, job, Status::Running).await? {
        Locked::Foreign => return Ok(Committed::TenantMismatch),
        Locked::Own(status) if status.is_terminal() => {
            tx.commit().await?;
            return Ok(Committed::AlreadyEnded);
        }
        Locked::Own(_) => {}
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
    Ok(Committed::Written)
}

/// A shadow run's outputs: recorded for calibration, never returned, and
/// the job's own state untouched.
pub async fn record_shadow(
    pool: &PgPool,
    job: &Job,
    done: &Completion<'_>,
) -> Result<Committed, StoreError> {
    let mut tx = pool.begin().await?;
    let owner = owners(&mut tx, &[job.job_id]).await?.remove(&job.job_id);
    if owner.is_some_and(|t| t != job.tenant) {
        return Ok(Committed::TenantMismatch);
    }
    insert_summaries(&mut tx, &[(job.job_id, done)], true).await?;
    // The transcript stays beside its shadow summaries: the pair is a
    // training example for the compact tier (`recap train --data shadow`).
    sqlx::query(
        "INSERT INTO shadow_transcripts (job_id, tenant, language, transcript)
         VALUES ($1, $2, $3, $4) ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job.job_id)
    .bind(&job.tenant)
    .bind(job.language.as_deref())
    .bind(sqlx::types::Json(&job.transcript))
    .execute(&mut *tx)
    .await?;
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
    Ok(Committed::Written)
}

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
    defaults: DefaultBudget,
) -> Result<recap_policy::BudgetState, StoreError> {
    let mut tx = pool.begin().await?;
    let b = budget_state(&mut tx, tenant, defaults).await?;
    tx.rollback().await?;
    Ok(b)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Run it; this is try number `attempt`.
    Run { attempt: i32 },
    /// The job already ended (a redelivery): ack and move on.
    AlreadyDone(Status),
    /// The job_id is another tenant's: nothing written.
    TenantMismatch,
}

/// A worker takes the jobs: `running`, one more attempt each.
pub async fn start_jobs(
    pool: &PgPool,
    tier: &str,
    jobs: &[(&Job, &str)],
) -> Vec<Result<StartOutcome, StoreError>> {
    batched!(pool, jobs, |tx, chunk| start_set(tx, chunk, tier))
}

/// The common case, routed jobs' rows: one statement locks them and counts
/// the attempts. The jobs it did not change are inserted as started where
/// their rows are missing (a job published straight onto a tier queue);
/// the others are locked and read, and an ended one is left as it is.
async fn start_set(
    tx: &mut Tx,
    items: &[&(&Job, &str)],
    tier: &str,
) -> Result<Vec<StartOutcome>, StoreError> {
    let all: Vec<(&Job, &str)> = items.iter().map(|(j, m)| (*j, *m)).collect();
    let mut started = mark_running(tx, &all, tier).await?;
    let mut rest: Vec<(&Job, &str)> = Vec::new();
    for (job, model) in items {
        if !started.contains_key(&job.job_id) && !rest.iter().any(|(j, _)| j.job_id == job.job_id) {
            rest.push((job, model));
        }
    }
    let mut ended: HashMap<Uuid, Status> = HashMap::new();
    if !rest.is_empty() {
        let jobs: Vec<&Job> = rest.iter().map(|(j, _)| *j).collect();
        let models: Vec<&str> = rest.iter().map(|(_, m)| *m).collect();
        let inserted = insert_jobs(
            tx,
            &jobs,
            NewRow::Running {
                tier,
                models: &models,
            },
        )
        .await?;
        started.extend(inserted.iter().map(|id| (*id, 1)));
        let existing: Vec<Uuid> = jobs
            .iter()
            .map(|j| j.job_id)
            .filter(|id| !inserted.contains(id))
            .collect();
        if !existing.is_empty() {
            let mut runnable = Vec::new();
            for (id, (status, owner)) in lock_jobs(tx, &existing).await? {
                let own = rest
                    .iter()
                    .find(|(j, _)| j.job_id == id && j.tenant == owner);
                if status.is_terminal() {
                    ended.insert(id, status);
                } else if let Some((job, model)) = own {
                    // Created by someone else since this batch's first statement.
                    runnable.push((*job, *model));
                }
            }
            started.extend(mark_running(tx, &runnable, tier).await?);
        }
    }
    let ids: Vec<Uuid> = items.iter().map(|(j, _)| j.job_id).collect();
    let owners = owners(tx, &ids).await?;
    let mut out = Vec::with_capacity(items.len());
    for (job, model) in items {
        if owners.get(&job.job_id).is_some_and(|t| *t != job.tenant) {
            out.push(StartOutcome::TenantMismatch);
            continue;
        }
        out.push(
            match (started.remove(&job.job_id), ended.get(&job.job_id)) {
                (Some(attempt), _) => StartOutcome::Run { attempt },
                (None, Some(status)) => StartOutcome::AlreadyDone(*status),
                // The same job again in this batch: one more attempt, as if alone.
                (None, None) => start_alone(tx, job, tier, model).await?,
            },
        );
    }
    Ok(out)
}

/// `running`, one more attempt, for each of the jobs that has not ended
/// and is its tenant's; the attempt of each one changed.
async fn mark_running(
    tx: &mut Tx,
    jobs: &[(&Job, &str)],
    tier: &str,
) -> Result<HashMap<Uuid, i32>, StoreError> {
    if jobs.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, tier = $2, model = m.model,
                         started_at = now(), updated_at = now()
         FROM unnest($1::uuid[], $3::text[], $4::text[]) AS m(job_id, model, tenant)
         WHERE jobs.job_id = m.job_id AND jobs.tenant = m.tenant
           AND jobs.status NOT IN ('succeeded', 'failed', 'dead')
         RETURNING jobs.job_id, jobs.attempts",
    )
    .persistent(false)
    .bind(jobs.iter().map(|j| j.0.job_id).collect::<Vec<_>>())
    .bind(tier)
    .bind(jobs.iter().map(|j| j.1).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.0.tenant.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().collect())
}

async fn start_alone(
    tx: &mut Tx,
    job: &Job,
    tier: &str,
    model: &str,
) -> Result<StartOutcome, StoreError> {
    match ensure_job_locked(tx, job, Status::Routed).await? {
        Locked::Foreign => return Ok(StartOutcome::TenantMismatch),
        Locked::Own(status) if status.is_terminal() => {
            return Ok(StartOutcome::AlreadyDone(status))
        }
        Locked::Own(_) => {}
    }
    mark_running(tx, &[(job, model)], tier)
        .await?
        .remove(&job.job_id)
        .map(|attempt| StartOutcome::Run { attempt })
        .ok_or(StoreError::Db(sqlx::Error::RowNotFound))
}

/// The finished work of one job.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    pub tier: &'a str,
    pub model: &'a str,
    pub engine: &'a str,
    pub outputs: &'a [SummaryOutput],
    /// The outputs' signals, in the same order (recorded where given).
    pub signals: &'a [recap_policy::score::Signals],
    pub cost_usd: f64,
}

impl Completion<'_> {
    /// The job's chunk count: its most chunked output's, at least 1.
    fn chunks(&self) -> i32 {
        self.outputs
            .iter()
            .map(|o| o.chunks as i32)
            .fold(1, i32::max)
    }

    fn input_tokens(&self) -> i32 {
        Self::total(self.outputs.iter().map(|o| o.input_tokens))
    }

    fn output_tokens(&self) -> i32 {
        Self::total(self.outputs.iter().map(|o| o.output_tokens))
    }

    fn total(counts: impl Iterator<Item = u32>) -> i32 {
        let sum: i64 = counts.map(i64::from).sum();
        sum.min(i64::from(i32::MAX)) as i32
    }
}

/// One `summaries` row per output of the jobs, in one statement; a row
/// already there is kept.
async fn insert_summaries(
    tx: &mut Tx,
    jobs: &[(Uuid, &Completion<'_>)],
    shadow: bool,
) -> Result<(), StoreError> {
    type Row<'r> = (
        Uuid,
        &'r Completion<'r>,
        &'r SummaryOutput,
        Option<&'r recap_policy::score::Signals>,
    );
    let rows: Vec<Row<'_>> = jobs
        .iter()
        .flat_map(|(id, done)| {
            done.outputs
                .iter()
                .enumerate()
                .map(move |(i, o)| (*id, *done, o, done.signals.get(i)))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO summaries (job_id, kind, text, model, engine, input_tokens, output_tokens,
                                prefill_ms, decode_ms, total_ms, mean_logprob, mean_entropy,
                                copy_rate, shadow)
         SELECT s.*, $14 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                     $6::int4[], $7::int4[], $8::float8[], $9::float8[], $10::float8[],
                                     $11::float8[], $12::float8[], $13::float8[]) AS s
         ON CONFLICT (job_id, kind, shadow) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.kind.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.text.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.model).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.engine).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.input_tokens as i32).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.output_tokens as i32).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.prefill_ms).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.decode_ms).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.total_ms).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.3.and_then(|s| s.mean_logprob))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.3.and_then(|s| s.mean_entropy))
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.3.map(|s| s.copy_rate)).collect::<Vec<_>>())
    .bind(shadow)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Commits the summaries and `succeeded` in one transaction; nothing is
/// written for a job that had already ended or is another tenant's.
pub async fn complete_jobs(
    pool: &PgPool,
    jobs: &[(&Job, Completion<'_>)],
) -> Vec<Result<Committed, StoreError>> {
    batched!(pool, jobs, |tx, chunk| complete_set(tx, chunk))
}

/// For jobs whose engine has already run and took no time to speak of (the
/// extractive baseline): the start and the completion in one transaction,
/// as `start_jobs` then `complete_jobs` would write them (one more attempt,
/// `running`, then `succeeded` with the summaries and the cost). Nothing
/// could be seen of the `running` state in between, and a worker that dies
/// during such a run is bounded by the queue's delivery limit as any other.
/// `rows_likely_missing` (jobs published straight onto the tier queue):
/// insert the rows already ended first, rather than look for them first.
/// Nothing is written for a job that had already ended or is another tenant's.
pub async fn start_and_complete_jobs(
    pool: &PgPool,
    tier: &str,
    jobs: &[(&Job, Completion<'_>)],
    rows_likely_missing: bool,
) -> Vec<Result<Committed, StoreError>> {
    batched!(pool, jobs, |tx, chunk| start_and_complete_set(
        tx,
        chunk,
        tier,
        rows_likely_missing
    ))
}

async fn start_and_complete_set(
    tx: &mut Tx,
    items: &[&(&Job, Completion<'_>)],
    tier: &str,
    insert_first: bool,
) -> Result<Vec<Committed>, StoreError> {
    let mut out: Vec<Option<Committed>> = vec![None; items.len()];
    if insert_first {
        // The first copy of each job: a later one in the batch is a duplicate.
        let mut seen = HashSet::new();
        let firsts: Vec<(usize, &(&Job, Completion<'_>))> = items
            .iter()
            .enumerate()
            .filter(|(_, i)| seen.insert(i.0.job_id))
            .map(|(at, i)| (at, *i))
            .collect();
        let first_items: Vec<&(&Job, Completion<'_>)> = firsts.iter().map(|(_, i)| *i).collect();
        let inserted: HashSet<Uuid> = insert_ended(tx, tier, &first_items).await?;
        let mut new: Vec<&(&Job, Completion<'_>)> = Vec::with_capacity(inserted.len());
        for (at, item) in firsts {
            if inserted.contains(&item.0.job_id) {
                out[at] = Some(Committed::Written);
                new.push(item);
            }
        }
        let written: Vec<(Uuid, &Completion<'_>)> =
            new.iter().map(|i| (i.0.job_id, &i.1)).collect();
        insert_summaries(tx, &written, false).await?;
        let callbacks: Vec<&(&Job, Completion<'_>)> = new
            .into_iter()
            .filter(|i| i.0.callback_url.is_some())
            .collect();
        enqueue_completion_webhooks(tx, &callbacks).await?;
    }
    let rest: Vec<&(&Job, Completion<'_>)> = items
        .iter()
        .zip(&out)
        .filter(|(_, o)| o.is_none())
        .map(|(i, _)| *i)
        .collect();
    let starts: Vec<(&Job, &str)> = rest.iter().map(|i| (i.0, i.1.model)).collect();
    let start_refs: Vec<&(&Job, &str)> = starts.iter().collect();
    let started = start_set(tx, &start_refs, tier).await?;
    let runs: Vec<&(&Job, Completion<'_>)> = rest
        .iter()
        .zip(&started)
        .filter(|(_, s)| matches!(s, StartOutcome::Run { .. }))
        .map(|(i, _)| *i)
        .collect();
    let mut completed = complete_set(tx, &runs).await?.into_iter();
    let mut rest_done = started.iter().map(|s| match s {
        StartOutcome::Run { .. } => completed.next().unwrap_or(Committed::AlreadyEnded),
        StartOutcome::AlreadyDone(_) => Committed::AlreadyEnded,
        StartOutcome::TenantMismatch => Committed::TenantMismatch,
    });
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| rest_done.next().unwrap_or(Committed::AlreadyEnded)))
        .collect())
}

/// Inserts the jobs' rows already `succeeded`, with their `actual` ledger
/// rows, where they do not exist: the ids inserted.
async fn insert_ended(
    tx: &mut Tx,
    tier: &str,
    items: &[&(&Job, Completion<'_>)],
) -> Result<HashSet<Uuid>, StoreError> {
    let jobs: Vec<&Job> = items.iter().map(|i| i.0).collect();
    let models: Vec<&str> = items.iter().map(|i| i.1.model).collect();
    let chunks: Vec<i32> = items.iter().map(|i| i.1.chunks()).collect();
    let costs: Vec<f64> = items.iter().map(|i| i.1.cost_usd).collect();
    let inserted: HashSet<Uuid> = insert_jobs(
        tx,
        &jobs,
        NewRow::Succeeded {
            tier,
            models: &models,
            chunks: &chunks,
            costs: &costs,
        },
    )
    .await?
    .into_iter()
    .collect();
    let booked: Vec<&(&Job, Completion<'_>)> = items
        .iter()
        .filter(|i| inserted.contains(&i.0.job_id))
        .copied()
        .collect();
    if !booked.is_empty() {
        sqlx::query(
            "INSERT INTO usage_ledger (tenant, job_id, tier, model, entry, input_tokens, output_tokens, cost_usd)
             SELECT d.tenant, d.job_id, d.tier, d.model, 'actual', d.input_tokens, d.output_tokens, d.cost::numeric
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int4[], $7::float8[])
             AS d(job_id, tenant, tier, model, input_tokens, output_tokens, cost)
             ON CONFLICT DO NOTHING",
        )
        .bind(booked.iter().map(|i| i.0.job_id).collect::<Vec<_>>())
        .bind(booked.iter().map(|i| i.0.tenant.as_str()).collect::<Vec<_>>())
        .bind(booked.iter().map(|i| i.1.tier).collect::<Vec<_>>())
        .bind(booked.iter().map(|i| i.1.model).collect::<Vec<_>>())
        .bind(booked.iter().map(|i| i.1.input_tokens()).collect::<Vec<_>>())
        .bind(booked.iter().map(|i| i.1.output_tokens()).collect::<Vec<_>>())
        .bind(booked.iter().map(|i| i.1.cost_usd).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(inserted)
}

/// The common case, running jobs' rows: one statement ends them and books
/// their actual costs, one writes their summaries. A job it did not end (no
/// row yet, or ended) is created or read under its lock first, alone.
async fn complete_set(
    tx: &mut Tx,
    items: &[&(&Job, Completion<'_>)],
) -> Result<Vec<Committed>, StoreError> {
    let mut ended = end_jobs(tx, items).await?;
    let mut out = Vec::with_capacity(items.len());
    let mut written: Vec<(Uuid, &Completion<'_>)> = Vec::with_capacity(items.len());
    let mut callbacks = Vec::new();
    for item in items {
        let (job, done) = (item.0, &item.1);
        let callback = match ended.remove(&job.job_id) {
            Some(callback) => callback,
            None => {
                match ensure_job_locked(tx, job, Status::Running).await? {
                    Locked::Foreign => {
                        out.push(Committed::TenantMismatch);
                        continue;
                    }
                    Locked::Own(status) if status.is_terminal() => {
                        out.push(Committed::AlreadyEnded);
                        continue;
                    }
                    Locked::Own(_) => {}
                }
                end_jobs(tx, std::slice::from_ref(item))
                    .await?
                    .remove(&job.job_id)
                    .ok_or(StoreError::Db(sqlx::Error::RowNotFound))?
            }
        };
        written.push((job.job_id, done));
        if callback {
            callbacks.push(*item);
        }
        out.push(Committed::Written);
    }
    insert_summaries(tx, &written, false).await?;
    enqueue_completion_webhooks(tx, &callbacks).await?;
    Ok(out)
}

/// The `job.completed` outbox rows of jobs that succeeded here and gave a
/// callback URL.
async fn enqueue_completion_webhooks(
    tx: &mut Tx,
    callbacks: &[&(&Job, Completion<'_>)],
) -> Result<(), StoreError> {
    for (job, done) in callbacks.iter().map(|i| (i.0, &i.1)) {
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
    Ok(())
}

/// `succeeded` and the `actual` ledger row for each job that has not
/// ended; for each job it ended, whether the job has a callback URL.
async fn end_jobs(
    tx: &mut Tx,
    items: &[&(&Job, Completion<'_>)],
) -> Result<HashMap<Uuid, bool>, StoreError> {
    fn column<'i, T>(
        items: &[&'i (&Job, Completion<'_>)],
        f: impl Fn(&'i Job, &'i Completion<'_>) -> T,
    ) -> Vec<T> {
        items.iter().map(|i| f(i.0, &i.1)).collect()
    }
    let rows: Vec<(Uuid, bool)> = sqlx::query_as(
        "WITH done AS (
             SELECT * FROM unnest($1::uuid[], $2::int4[], $3::float8[], $4::text[], $5::text[],
                                  $6::int4[], $7::int4[], $8::text[])
             AS d(job_id, chunks, cost, tier, model, input_tokens, output_tokens, tenant)),
         ended AS (
             UPDATE jobs SET status = 'succeeded', chunks = done.chunks, cost_usd = done.cost::numeric,
                             error_code = NULL, error = NULL, finished_at = now(), updated_at = now()
             FROM done
             WHERE jobs.job_id = done.job_id AND jobs.tenant = done.tenant
               AND jobs.status NOT IN ('succeeded', 'failed', 'dead')
             RETURNING jobs.job_id, jobs.tenant, jobs.callback_url IS NOT NULL AS callback),
         ledger AS (
             INSERT INTO usage_ledger (tenant, job_id, tier, model, entry, input_tokens, output_tokens, cost_usd)
             SELECT ended.tenant, done.job_id, done.tier, done.model, 'actual',
                    done.input_tokens, done.output_tokens, done.cost::numeric
             FROM done JOIN ended USING (job_id)
             ON CONFLICT DO NOTHING)
         SELECT job_id, callback FROM ended",
    )
    .persistent(false)
    .bind(column(items, |j, _| j.job_id))
    .bind(column(items, |_, d| d.chunks()))
    .bind(column(items, |_, d| d.cost_usd))
    .bind(column(items, |_, d| d.tier))
    .bind(column(items, |_, d| d.model))
    .bind(column(items, |_, d| d.input_tokens()))
    .bind(column(items, |_, d| d.output_tokens()))
    .bind(column(items, |j, _| j.tenant.as_str()))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().collect())
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
    // Only the message's own tenant's row (or the row made for a message
    // whose tenant could not be read) is ended: a message cannot end
    // another tenant's job by naming its job_id.
    let owner = tenant.unwrap_or("(unknown)");
    let ended = sqlx::query(
        "UPDATE jobs SET status = $2, error_code = $3, error = $4, finished_at = now(), updated_at = now()
         WHERE job_id = $1 AND tenant = $5
           AND (status NOT IN ('succeeded', 'failed', 'dead') OR (status = $2 AND error_code IS NULL))",
    )
    .bind(job_id)
    .bind(status.as_str())
    .bind(code)
    .bind(message)
    .bind(owner)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if ended == 0 {
        tx.commit().await?;
        return Ok(());
    }
    release_estimate(&mut tx, job_id).await?;
    let tenant = owner;
    let payload = crate::webhooks::event_payload(
        "job.failed",
        job_id,
        tenant,
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
    row.as_ref().map(job_row).transpose()
}

/// A `jobs` row read by the columns both job reads select.
fn job_row(r: &sqlx::postgres::PgRow) -> Result<JobRow, StoreError> {
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

fn tenant_job(r: &sqlx::postgres::PgRow) -> Result<TenantJob, StoreError> {
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
            confidence: Default::default(),
        }
    }

    /// The extractive run of one output on compact's model `m`, costing 0.5.
    fn done(o: &SummaryOutput) -> Completion<'_> {
        Completion {
            tier: "compact",
            model: "m",
            engine: "extractive",
            outputs: std::slice::from_ref(o),
            signals: &[],
            cost_usd: 0.5,
        }
    }

    fn decision(tier: &str, cost: f64) -> Decision {
        Decision {
            tier: tier.into(),
            model: format!("{tier}-model"),
            reason: "test".into(),
            features: serde_json::json!({}),
            trail: serde_json::json!([]),
            estimated_cost_usd: cost,
            policy_version: "v".into(),
            shadow: false,
        }
    }

    #[tokio::test]
    async fn a_routing_batch_sees_its_own_estimates_duplicates_and_earlier_routes() {
        let (db, name) = private_db().await;
        set_budget(&db, "a", Some(1.0), None).await.expect("budget");
        let [first, second, third, earlier] = [job("a"), job("a"), job("a"), job("b")];
        // `earlier` was routed by an earlier batch, to large.
        let out = route_jobs(&db, &[&earlier], DefaultBudget::NONE, |_, _| {
            Ok(decision("large", 0.0))
        })
        .await;
        assert!(matches!(out[0], Ok(RouteOutcome::Routed { .. })), "{out:?}");
        // Each job costs 0.3 of tenant a's 1.0. `first` comes twice;
        // `earlier` comes again.
        let mut seen = Vec::new();
        let batch = [&first, &second, &earlier, &first, &third];
        let out = route_jobs(&db, &batch, DefaultBudget::NONE, |job, budget| {
            seen.push((job.job_id, budget.daily_remaining_usd));
            Ok(decision("compact", 0.3))
        })
        .await;
        let out: Vec<RouteOutcome> = out.into_iter().map(|o| o.expect("routed")).collect();
        assert!(matches!(&out[0], RouteOutcome::Routed { tier, .. } if tier == "compact"));
        assert!(matches!(&out[1], RouteOutcome::Routed { tier, .. } if tier == "compact"));
        assert_eq!(
            out[2],
            RouteOutcome::AlreadyRouted {
                tier: "large".into(),
                model: "large-model".into(),
                status: Status::Routed
            }
        );
        assert_eq!(
            out[3],
            RouteOutcome::AlreadyRouted {
                tier: "compact".into(),
                model: "compact-model".into(),
                status: Status::Routed
            }
        );
        assert!(matches!(&out[4], RouteOutcome::Routed { tier, .. } if tier == "compact"));
        // Each of tenant a's jobs was decided once, and saw the estimates
        // of those decided before it.
        let mut lefts: Vec<f64> = seen.iter().filter_map(|s| s.1).collect();
        lefts.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(lefts.len(), 3);
        for (left, want) in lefts.iter().zip([1.0, 0.7, 0.4]) {
            assert!((left - want).abs() < 1e-9, "{lefts:?}");
        }
        for j in [&first, &second, &third] {
            let row = get_job(&db, j.job_id).await.expect("read").expect("row");
            assert_eq!(row.status, "routed");
        }
        let count = |sql: &'static str| {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&db)
                    .await
                    .expect("count")
            }
        };
        assert_eq!(count("SELECT count(*) FROM route_decisions").await, 4);
        assert_eq!(
            count("SELECT count(*) FROM usage_ledger WHERE entry = 'estimate'").await,
            4
        );
        let budget = read_budget(&db, "a", DefaultBudget::NONE)
            .await
            .expect("budget");
        assert!((budget.daily_remaining_usd.unwrap_or(0.0) - 0.1).abs() < 1e-9);
        db.close().await;
        pg_tool("dropdb", &name);
    }

    #[tokio::test]
    async fn a_worker_batch_starts_and_ends_rows_it_finds_in_any_state() {
        let (db, name) = private_db().await;
        let [routed, missing, ended] = [job("a"), job("a"), job("a")];
        route_jobs(&db, &[&routed, &ended], DefaultBudget::NONE, |_, _| {
            Ok(decision("compact", 0.0))
        })
        .await;
        let only = [output("done before")];
        let before = Completion {
            tier: "compact",
            model: "m",
            engine: "extractive",
            outputs: &only,
            signals: &[],
            cost_usd: 0.0,
        };
        start_jobs(&db, "compact", &[(&ended, "m")]).await;
        assert!(matches!(
            complete_jobs(&db, &[(&ended, before)]).await[0],
            Ok(Committed::Written)
        ));
        // `missing` has no row yet (its router never wrote one), `ended`
        // is a redelivery of a finished job, `routed` comes twice.
        let items = [
            (&routed, "m"),
            (&missing, "m"),
            (&ended, "m"),
            (&routed, "m"),
        ];
        let started: Vec<StartOutcome> = start_jobs(&db, "compact", &items)
            .await
            .into_iter()
            .map(|s| s.expect("started"))
            .collect();
        assert_eq!(started[0], StartOutcome::Run { attempt: 1 });
        assert_eq!(started[1], StartOutcome::Run { attempt: 1 });
        assert_eq!(started[2], StartOutcome::AlreadyDone(Status::Succeeded));
        assert_eq!(started[3], StartOutcome::Run { attempt: 2 });
        let row = get_job(&db, missing.job_id)
            .await
            .expect("read")
            .expect("row");
        assert_eq!(
            (
                row.status.as_str(),
                row.tier.as_deref(),
                row.model.as_deref()
            ),
            ("running", Some("compact"), Some("m"))
        );
        assert_eq!(row.attempts, 1);
        assert!(row.started_at.is_some() && row.queued_at.is_some());
        let outs = [output("first"), output("second")];
        let items = [
            (&routed, done(&outs[0])),
            (&missing, done(&outs[1])),
            (&ended, done(&outs[1])),
            (&routed, done(&outs[1])),
        ];
        let ok: Vec<bool> = complete_jobs(&db, &items)
            .await
            .into_iter()
            .map(|r| r.expect("completed") == Committed::Written)
            .collect();
        assert_eq!(ok, [true, true, false, false]);
        let texts = |id| {
            let db = db.clone();
            async move {
                get_summaries(&db, id)
                    .await
                    .expect("read")
                    .into_iter()
                    .map(|s| s.text)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(texts(routed.job_id).await, ["first"]);
        assert_eq!(texts(missing.job_id).await, ["second"]);
        assert_eq!(texts(ended.job_id).await, ["done before"]);
        let actual: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM usage_ledger WHERE entry = 'actual' AND cost_usd = 0.5",
        )
        .fetch_one(&db)
        .await
        .expect("count");
        assert_eq!(actual, 2, "one actual cost per job that ended here");
        for j in [&routed, &missing] {
            let row = get_job(&db, j.job_id).await.expect("read").expect("row");
            assert_eq!(row.status, "succeeded");
        }
        db.close().await;
        pg_tool("dropdb", &name);
    }

    #[tokio::test]
    async fn an_instant_batch_starts_and_ends_its_jobs_in_one_transaction() {
        instant_batch(false).await;
    }

    #[tokio::test]
    async fn an_instant_batch_that_inserts_first_writes_the_same() {
        instant_batch(true).await;
    }

    /// Jobs in every state through `start_and_complete_jobs`: the rows,
    /// summaries and costs are those of a start then a completion.
    async fn instant_batch(rows_likely_missing: bool) {
        let (db, name) = private_db().await;
        let [routed, mut missing, ended, bad] = [job("a"), job("a"), job("a"), job("b")];
        missing.callback_url = Some("https://example.com/hook".into());
        route_jobs(&db, &[&routed, &ended], DefaultBudget::NONE, |_, _| {
            Ok(decision("compact", 0.0))
        })
        .await;
        let outs = [output("done before"), output("first"), output("second")];
        assert!(matches!(
            start_and_complete_jobs(
                &db,
                "compact",
                &[(&ended, done(&outs[0]))],
                rows_likely_missing
            )
            .await[0],
            Ok(Committed::Written)
        ));
        // `missing` has no row yet, `ended` is a redelivery of a finished
        // job, `routed` comes twice.
        let items = [
            (&routed, done(&outs[1])),
            (&missing, done(&outs[2])),
            (&ended, done(&outs[2])),
            (&routed, done(&outs[2])),
        ];
        let ok: Vec<bool> = start_and_complete_jobs(&db, "compact", &items, rows_likely_missing)
            .await
            .into_iter()
            .map(|r| r.expect("completed") == Committed::Written)
            .collect();
        assert_eq!(ok, [true, true, false, false]);
        for (j, text, attempts) in [
            (&routed, "first", 2),
            (&missing, "second", 1),
            (&ended, "done before", 1),
        ] {
            let row = get_job(&db, j.job_id).await.expect("read").expect("row");
            assert_eq!(
                (
                    row.status.as_str(),
                    row.tier.as_deref(),
                    row.model.as_deref(),
                    row.attempts
                ),
                ("succeeded", Some("compact"), Some("m"), attempts)
            );
            assert_eq!((row.chunks, row.cost_usd), (Some(1), Some(0.5)));
            assert!(
                row.queued_at.is_some() && row.started_at.is_some() && row.finished_at.is_some()
            );
            let texts: Vec<String> = get_summaries(&db, j.job_id)
                .await
                .expect("read")
                .into_iter()
                .map(|s| s.text)
                .collect();
            assert_eq!(texts, [text]);
        }
        let actual: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM usage_ledger WHERE entry = 'actual' AND cost_usd = 0.5
               AND tenant = 'a' AND tier = 'compact' AND model = 'm'
               AND input_tokens = 5 AND output_tokens = 3",
        )
        .fetch_one(&db)
        .await
        .expect("count");
        assert_eq!(actual, 3, "one actual cost per job that ended");
        let hooks: Vec<Uuid> = sqlx::query_scalar(
            "SELECT job_id FROM webhook_deliveries WHERE event = 'job.completed' AND url = 'https://example.com/hook'",
        )
        .fetch_all(&db)
        .await
        .expect("outbox");
        assert_eq!(hooks, [missing.job_id]);
        // A job whose summary cannot be written leaves no trace, not even
        // its start; its batch mate commits.
        let outs = [output("fine"), output("bad\0text")];
        let fine = job("b");
        let out = start_and_complete_jobs(
            &db,
            "compact",
            &[(&fine, done(&outs[0])), (&bad, done(&outs[1]))],
            rows_likely_missing,
        )
        .await;
        assert!(matches!(out[0], Ok(Committed::Written)), "{:?}", out[0]);
        assert!(out[1].is_err(), "{:?}", out[1]);
        assert!(get_job(&db, bad.job_id).await.expect("read").is_none());
        db.close().await;
        pg_tool("dropdb", &name);
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
                        signals: &[],
                        cost_usd: 0.0,
                    },
                )
            })
            .collect();
        let done = complete_jobs(&db, &items).await;
        assert!(matches!(done[0], Ok(Committed::Written)), "{:?}", done[0]);
        assert!(done[1].is_err(), "{:?}", done[1]);
        assert!(matches!(done[2], Ok(Committed::Written)), "{:?}", done[2]);
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
    #[tokio::test]
    async fn a_tenant_without_a_budget_row_spends_the_default_budget() {
        let (db, name) = private_db().await;
        let defaults = DefaultBudget {
            daily_usd: Some(0.5),
            monthly_usd: None,
        };
        // Tenant "free" has no budget row; "paid" has its own, larger one.
        set_budget(&db, "paid", Some(10.0), None)
            .await
            .expect("budget");
        let fresh = read_budget(&db, "free", defaults).await.expect("budget");
        assert_eq!(fresh.daily_limit_usd, Some(0.5));
        assert_eq!(fresh.monthly_limit_usd, None);
        let [a, b, c] = [job("free"), job("free"), job("paid")];
        let mut seen = Vec::new();
        let out = route_jobs(&db, &[&a, &b, &c], defaults, |job, budget| {
            seen.push((job.tenant.clone(), budget.daily_remaining_usd));
            Ok(decision("compact", 0.4))
        })
        .await;
        assert!(
            out.iter()
                .all(|o| matches!(o, Ok(RouteOutcome::Routed { .. }))),
            "{out:?}"
        );
        // The second of "free"'s jobs sees the first one's estimate taken
        // from the default; "paid" sees its own row.
        let mut free: Vec<f64> = seen
            .iter()
            .filter(|(t, _)| t == "free")
            .filter_map(|(_, left)| *left)
            .collect();
        free.sort_by(|x, y| y.total_cmp(x));
        assert_eq!(free.len(), 2, "{seen:?}");
        assert!(
            (free[0] - 0.5).abs() < 1e-9 && (free[1] - 0.1).abs() < 1e-9,
            "{free:?}"
        );
        let paid: Vec<f64> = seen
            .iter()
            .filter(|(t, _)| t == "paid")
            .filter_map(|(_, left)| *left)
            .collect();
        assert_eq!(paid, vec![10.0]);
        let left = read_budget(&db, "free", defaults).await.expect("budget");
        assert!(
            (left.daily_remaining_usd.unwrap_or(f64::NAN) + 0.3).abs() < 1e-9,
            "{left:?}"
        );
        // Without a default, a tenant without a row has no limit.
        let none = read_budget(&db, "free", DefaultBudget::NONE)
            .await
            .expect("budget");
        assert_eq!(none.daily_limit_usd, None);
        assert_eq!(none.daily_remaining_usd, None);
        db.close().await;
        pg_tool("dropdb", &name);
    }
}
