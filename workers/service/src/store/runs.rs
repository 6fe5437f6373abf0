//! A job's run: `running`, then `succeeded` with its summaries and cost,
//! or `failed`/`dead`, or cancelled before it ran; shadow runs.

use super::*;
use recap_job::SummaryKind;
use recap_policy::Tier;

/// A job that ended without running: its estimate stops counting against
/// the tenant's budget (an `actual` entry of zero supersedes it).
pub(super) async fn release_estimate(tx: &mut Tx, job_id: Uuid) -> Result<(), StoreError> {
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
    .bind(done.tier.as_str())
    .bind(done.model)
    .bind(done.cost_usd)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Committed::Written)
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
    tier: Tier,
    jobs: &[(&Job, &str)],
) -> Vec<Result<StartOutcome, StoreError>> {
    batched!(pool, jobs, |tx, chunk| start_set(tx, chunk, tier))
}

/// The common case, routed jobs' rows: one statement locks them and counts
/// the attempts. The jobs it did not change are inserted as started where
/// their rows are missing (a job published straight onto a tier queue);
/// the others are locked and read, and an ended one is left as it is.
pub(super) async fn start_set(
    tx: &mut Tx,
    items: &[&(&Job, &str)],
    tier: Tier,
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
                tier: tier.as_str(),
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
pub(super) async fn mark_running(
    tx: &mut Tx,
    jobs: &[(&Job, &str)],
    tier: Tier,
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
    .bind(tier.as_str())
    .bind(jobs.iter().map(|j| j.1).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.0.tenant.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().collect())
}

pub(super) async fn start_alone(
    tx: &mut Tx,
    job: &Job,
    tier: Tier,
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

/// One summary as a `summaries` row holds it: what an engine wrote, with
/// its token counts and timings.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRecord {
    pub kind: SummaryKind,
    pub text: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
    /// How many transcript chunks went into it (1 when it fit whole).
    pub chunks: u32,
}

/// The finished work of one job.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    pub tier: Tier,
    pub model: &'a str,
    pub engine: &'a str,
    pub outputs: &'a [SummaryRecord],
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
pub(super) async fn insert_summaries(
    tx: &mut Tx,
    jobs: &[(Uuid, &Completion<'_>)],
    shadow: bool,
) -> Result<(), StoreError> {
    type Row<'r> = (
        Uuid,
        &'r Completion<'r>,
        &'r SummaryRecord,
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
    tier: Tier,
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

pub(super) async fn start_and_complete_set(
    tx: &mut Tx,
    items: &[&(&Job, Completion<'_>)],
    tier: Tier,
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
pub(super) async fn insert_ended(
    tx: &mut Tx,
    tier: Tier,
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
            tier: tier.as_str(),
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
        .bind(booked.iter().map(|i| i.1.tier.as_str()).collect::<Vec<_>>())
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
pub(super) async fn complete_set(
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

/// `succeeded` and the `actual` ledger row for each job that has not
/// ended; for each job it ended, whether the job has a callback URL.
pub(super) async fn end_jobs(
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
    .bind(column(items, |_, d| d.tier.as_str()))
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
