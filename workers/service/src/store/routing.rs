//! A job's way in and its route: `queued` from the gateway, then the
//! router's decision, estimate and move to `routed` in one transaction;
//! the cascade's second route; tenant budgets.

use super::*;
use recap_policy::{Reason, Tier};

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

/// What the router records for one decision.
#[derive(Debug, Clone)]
pub struct Decision {
    pub tier: Tier,
    pub model: String,
    pub reason: Reason,
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
        tier: Tier,
        model: String,
        reason: Reason,
        shadow: bool,
    },
    /// Decided before (a redelivery or a duplicate publish): the earlier
    /// route (no tier where the row names none this build knows).
    AlreadyRouted {
        tier: Option<Tier>,
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
pub(super) async fn budget_state(
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
pub(super) async fn route_set(
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
                tier: Some(d.tier),
                model: d.model.clone(),
                status: Status::Routed,
            });
            continue;
        }
        if status != Status::Queued {
            let (tier, model) = earlier.get(&job.job_id).cloned().unwrap_or_default();
            outcomes.push(RouteOutcome::AlreadyRouted {
                tier: Tier::parse(&tier),
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
                    tier: d.tier,
                    model: d.model.clone(),
                    reason: d.reason,
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

pub(super) async fn insert_decision(
    tx: &mut Tx,
    job_id: Uuid,
    d: &Decision,
) -> Result<(), StoreError> {
    let statement = sqlx::query(concat!(insert_decisions_from!(), " ", decision_rows!()));
    bind_decisions(statement, &[(job_id, d.clone())])
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds decisions as the arrays $1-$9 of `decision_rows!`.
pub(super) fn bind_decisions<'q>(q: PgQuery<'q>, decisions: &[(Uuid, Decision)]) -> PgQuery<'q> {
    let column = |f: fn(&Decision) -> &str| -> Vec<String> {
        decisions.iter().map(|(_, d)| f(d).to_string()).collect()
    };
    q.bind(decisions.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(column(|d| d.tier.as_str()))
        .bind(column(|d| &d.model))
        .bind(column(|d| d.reason.as_str()))
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
    .bind(decision.tier.as_str())
    .bind(&decision.model)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Committed::Written)
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
