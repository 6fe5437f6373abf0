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

/// The routing transaction, driven by the router. `next` hands out each
/// job to decide with the budget its tenant has left (the estimates of
/// jobs decided before it in the same transaction taken off); `record`
/// takes the router's decision for it. Once a transaction's jobs are all
/// decided, `next` commits them together: each job's row and its tenant's
/// budget row are locked from the start (job rows in id order, budget
/// rows in tenant order), and the decisions, the estimates in the ledger and the moves to
/// `routed` commit at once. The batch is tried as one transaction; where
/// that fails, each job is routed again in a transaction of its own, so
/// that one bad job costs only itself. An already-routed job keeps its
/// first decision.
///
/// ```ignore
/// let mut routing = Routing::new(&pool, &jobs, defaults);
/// while let Some((job, budget)) = routing.next().await {
///     routing.record(decide(job, budget));
/// }
/// let outcomes = routing.outcomes(); // one per job, in the jobs' order
/// ```
pub struct Routing<'j> {
    pool: PgPool,
    jobs: Vec<&'j Job>,
    defaults: DefaultBudget,
    /// Whether the whole batch has had its one transaction.
    tried_together: bool,
    /// The next job to route alone, once the batch's transaction failed.
    next_alone: usize,
    open: Option<OpenRouting>,
    results: Vec<Option<Result<RouteOutcome, StoreError>>>,
}

/// One open routing transaction: its jobs (indices into the batch, in
/// lock order), what their locked rows say, and what is decided so far.
struct OpenRouting {
    tx: Tx,
    items: Vec<usize>,
    statuses: HashMap<Uuid, Status>,
    owners: HashMap<Uuid, String>,
    /// The first route of each job already past `queued`: (tier, model).
    earlier: HashMap<Uuid, (String, String)>,
    budgets: BTreeMap<String, recap_policy::BudgetState>,
    /// The outcome of each of `items` settled so far, in order.
    outcomes: Vec<RouteOutcome>,
    decided: Vec<(Uuid, Decision)>,
    /// Whether the job at `outcomes.len()` has been handed out by `next`.
    handed_out: bool,
    /// What makes the transaction fail at commit (a job row that could not
    /// be read back).
    failure: Option<StoreError>,
}

impl<'j> Routing<'j> {
    pub fn new(pool: &PgPool, jobs: &[&'j Job], defaults: DefaultBudget) -> Self {
        Routing {
            pool: pool.clone(),
            jobs: jobs.to_vec(),
            defaults,
            tried_together: false,
            next_alone: 0,
            open: None,
            results: jobs.iter().map(|_| None).collect(),
        }
    }

    /// The next job to decide and its tenant's budget left; None once
    /// every job's route is settled (committed, or failed).
    pub async fn next(&mut self) -> Option<(&'j Job, recap_policy::BudgetState)> {
        loop {
            if self.open.is_none() {
                let items = self.next_transaction()?;
                match self.begin(&items).await {
                    Ok(open) => self.open = Some(open),
                    Err(e) => {
                        self.failed(&items, e);
                        continue;
                    }
                }
            }
            if let Some(open) = self.open.as_mut() {
                if let Some(pending) = open.settle_until_a_decision(&self.jobs) {
                    return Some(pending);
                }
            }
            if let Some(open) = self.open.take() {
                let items = open.items.clone();
                match open.commit().await {
                    Ok(outcomes) => {
                        for (i, outcome) in items.into_iter().zip(outcomes) {
                            self.results[i] = Some(Ok(outcome));
                        }
                    }
                    Err(e) => self.failed(&items, e),
                }
            }
        }
    }

    /// The decision for the job `next` handed out last.
    pub fn record(&mut self, decision: Result<Decision, recap_policy::PolicyError>) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        if !open.handed_out {
            return;
        }
        open.handed_out = false;
        let job = self.jobs[open.items[open.outcomes.len()]];
        let outcome = match decision {
            Ok(d) => {
                // What the ledger's estimate row would make budget_state say.
                let budget = open.budgets.entry(job.tenant.clone()).or_default();
                let cost = d.estimated_cost_usd;
                budget.daily_remaining_usd = budget.daily_remaining_usd.map(|r| r - cost);
                budget.monthly_remaining_usd = budget.monthly_remaining_usd.map(|r| r - cost);
                let outcome = RouteOutcome::Routed {
                    tier: d.tier,
                    model: d.model.clone(),
                    reason: d.reason,
                    shadow: d.shadow,
                };
                open.decided.push((job.job_id, d));
                outcome
            }
            Err(e) => RouteOutcome::Refused {
                code: e.code().to_string(),
                message: e.to_string(),
            },
        };
        open.outcomes.push(outcome);
    }

    /// Each job's outcome, in the order of the jobs given to `new`.
    pub fn outcomes(self) -> Vec<Result<RouteOutcome, StoreError>> {
        self.results
            .into_iter()
            .map(|r| r.unwrap_or(Err(StoreError::Batch)))
            .collect()
    }

    /// The jobs of the next transaction: the whole batch first (in lock
    /// order), then, where that failed, one job at a time.
    fn next_transaction(&mut self) -> Option<Vec<usize>> {
        if !self.tried_together && self.jobs.len() > 1 {
            self.tried_together = true;
            return Some(lock_order(&self.jobs));
        }
        self.tried_together = true;
        while self.next_alone < self.jobs.len() {
            let i = self.next_alone;
            self.next_alone += 1;
            if self.results[i].is_none() {
                return Some(vec![i]);
            }
        }
        None
    }

    fn failed(&mut self, items: &[usize], e: StoreError) {
        if items.len() > 1 {
            tracing::warn!(error = %e, items = items.len(), "batch transaction failed; one transaction per job instead");
        } else if let Some(&i) = items.first() {
            self.results[i] = Some(Err(e));
        }
    }

    /// Opens a transaction for `items` with a fixed number of statements:
    /// inserts the rows that are missing, locks them all (job id order),
    /// reads the earlier routes of jobs past `queued`, and locks and reads
    /// each tenant's budget (tenant order).
    async fn begin(&self, items: &[usize]) -> Result<OpenRouting, StoreError> {
        let mut tx = self.pool.begin().await?;
        let jobs: Vec<&Job> = items.iter().map(|&i| self.jobs[i]).collect();
        insert_jobs(&mut tx, &jobs, NewRow::As(Status::Queued)).await?;
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.job_id).collect();
        let locked = lock_jobs(&mut tx, &ids).await?;
        let statuses: HashMap<Uuid, Status> = locked.iter().map(|(id, (s, _))| (*id, *s)).collect();
        let owners: HashMap<Uuid, String> =
            locked.into_iter().map(|(id, (_, t))| (id, t)).collect();
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
            .fetch_all(&mut *tx)
            .await?;
            earlier.extend(rows.into_iter().map(|(id, t, m)| (id, (t, m))));
        }
        let mut budgets: BTreeMap<String, recap_policy::BudgetState> = BTreeMap::new();
        for job in &jobs {
            let own = owners.get(&job.job_id).is_none_or(|t| *t == job.tenant);
            if statuses.get(&job.job_id) == Some(&Status::Queued) && own {
                budgets.insert(job.tenant.clone(), recap_policy::BudgetState::default());
            }
        }
        for (tenant, budget) in budgets.iter_mut() {
            *budget = budget_state(&mut tx, tenant, self.defaults).await?;
        }
        Ok(OpenRouting {
            tx,
            items: items.to_vec(),
            statuses,
            owners,
            earlier,
            budgets,
            outcomes: Vec::with_capacity(items.len()),
            decided: Vec::new(),
            handed_out: false,
            failure: None,
        })
    }
}

impl OpenRouting {
    /// Settles the jobs that need no decision (another tenant's id, a
    /// duplicate, a job already routed) up to the next one that does, and
    /// hands that one out; None when none is left.
    fn settle_until_a_decision<'j>(
        &mut self,
        jobs: &[&'j Job],
    ) -> Option<(&'j Job, recap_policy::BudgetState)> {
        if self.handed_out {
            // `next` again without `record`: the job stays undecided.
            self.handed_out = false;
            self.outcomes.push(RouteOutcome::Refused {
                code: "undecided".into(),
                message: "the router gave no decision".into(),
            });
        }
        while let Some(&i) = self.items.get(self.outcomes.len()) {
            if self.failure.is_some() {
                return None;
            }
            let job = jobs[i];
            match self.settled(job) {
                Ok(Some(outcome)) => self.outcomes.push(outcome),
                Err(e) => self.failure = Some(e),
                Ok(None) => {
                    self.handed_out = true;
                    let budget = *self.budgets.entry(job.tenant.clone()).or_default();
                    return Some((job, budget));
                }
            }
        }
        None
    }

    /// The outcome of a job that needs no decision; None for one that does.
    fn settled(&self, job: &Job) -> Result<Option<RouteOutcome>, StoreError> {
        let status = *self
            .statuses
            .get(&job.job_id)
            .ok_or(StoreError::Db(sqlx::Error::RowNotFound))?;
        if self
            .owners
            .get(&job.job_id)
            .is_some_and(|t| *t != job.tenant)
        {
            return Ok(Some(RouteOutcome::TenantMismatch));
        }
        // The same job twice in one batch: the second finds the first's route.
        if let Some((_, d)) = self.decided.iter().find(|(id, _)| *id == job.job_id) {
            return Ok(Some(RouteOutcome::AlreadyRouted {
                tier: Some(d.tier),
                model: d.model.clone(),
                status: Status::Routed,
            }));
        }
        if status != Status::Queued {
            let (tier, model) = self.earlier.get(&job.job_id).cloned().unwrap_or_default();
            return Ok(Some(RouteOutcome::AlreadyRouted {
                tier: Tier::parse(&tier),
                model,
                status,
            }));
        }
        Ok(None)
    }

    /// Writes the decisions, the estimates and the moves to `routed` in one
    /// statement, and commits.
    async fn commit(mut self) -> Result<Vec<RouteOutcome>, StoreError> {
        if let Some(e) = self.failure {
            return Err(e);
        }
        if !self.decided.is_empty() {
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
            bind_decisions(statement, &self.decided)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        Ok(self.outcomes)
    }
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
