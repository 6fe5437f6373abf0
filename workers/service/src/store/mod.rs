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

/// Liveness of the database connection, for readiness probes.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

mod outbox;
mod reads;
mod routing;
mod runs;

pub use outbox::*;
pub use reads::*;
pub use routing::*;
pub use runs::*;

#[cfg(test)]
mod tests;
