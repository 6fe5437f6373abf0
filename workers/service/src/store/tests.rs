use super::*;
use recap_job::SummaryKind;
use recap_policy::{Reason, Tier};

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

fn output(text: &str) -> SummaryRecord {
    SummaryRecord {
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

/// The extractive run of one output on compact's model `m`, costing 0.5.
fn done(o: &SummaryRecord) -> Completion<'_> {
    Completion {
        tier: Tier::Compact,
        model: "m",
        engine: "extractive",
        outputs: std::slice::from_ref(o),
        signals: &[],
        cost_usd: 0.5,
    }
}

/// Routes `jobs` through the routing transaction as the router does, with
/// `decide` in the policy's place.
async fn route_jobs(
    db: &PgPool,
    jobs: &[&Job],
    defaults: DefaultBudget,
    mut decide: impl FnMut(
        &Job,
        recap_policy::BudgetState,
    ) -> Result<Decision, recap_policy::PolicyError>,
) -> Vec<Result<RouteOutcome, StoreError>> {
    let mut routing = Routing::new(db, jobs, defaults);
    while let Some((job, budget)) = routing.next().await {
        routing.record(decide(job, budget));
    }
    routing.outcomes()
}

fn decision(tier: Tier, cost: f64) -> Decision {
    Decision {
        tier,
        model: format!("{}-model", tier.as_str()),
        reason: Reason::Default,
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
        Ok(decision(Tier::Large, 0.0))
    })
    .await;
    assert!(matches!(out[0], Ok(RouteOutcome::Routed { .. })), "{out:?}");
    // Each job costs 0.3 of tenant a's 1.0. `first` comes twice;
    // `earlier` comes again.
    let mut seen = Vec::new();
    let batch = [&first, &second, &earlier, &first, &third];
    let out = route_jobs(&db, &batch, DefaultBudget::NONE, |job, budget| {
        seen.push((job.job_id, budget.daily_remaining_usd));
        Ok(decision(Tier::Compact, 0.3))
    })
    .await;
    let out: Vec<RouteOutcome> = out.into_iter().map(|o| o.expect("routed")).collect();
    assert!(matches!(&out[0], RouteOutcome::Routed { tier, .. } if *tier == Tier::Compact));
    assert!(matches!(&out[1], RouteOutcome::Routed { tier, .. } if *tier == Tier::Compact));
    assert_eq!(
        out[2],
        RouteOutcome::AlreadyRouted {
            tier: Some(Tier::Large),
            model: "large-model".into(),
            status: Status::Routed
        }
    );
    assert_eq!(
        out[3],
        RouteOutcome::AlreadyRouted {
            tier: Some(Tier::Compact),
            model: "compact-model".into(),
            status: Status::Routed
        }
    );
    assert!(matches!(&out[4], RouteOutcome::Routed { tier, .. } if *tier == Tier::Compact));
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
        Ok(decision(Tier::Compact, 0.0))
    })
    .await;
    let only = [output("done before")];
    let before = Completion {
        tier: Tier::Compact,
        model: "m",
        engine: "extractive",
        outputs: &only,
        signals: &[],
        cost_usd: 0.0,
    };
    start_jobs(&db, Tier::Compact, &[(&ended, "m")]).await;
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
    let started: Vec<StartOutcome> = start_jobs(&db, Tier::Compact, &items)
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
        Ok(decision(Tier::Compact, 0.0))
    })
    .await;
    let outs = [output("done before"), output("first"), output("second")];
    assert!(matches!(
        start_and_complete_jobs(
            &db,
            Tier::Compact,
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
    let ok: Vec<bool> = start_and_complete_jobs(&db, Tier::Compact, &items, rows_likely_missing)
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
        assert!(row.queued_at.is_some() && row.started_at.is_some() && row.finished_at.is_some());
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
        Tier::Compact,
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
        Tier::Compact,
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
                    cost_usd: 0.0,
                    ..done(o)
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
        Ok(decision(Tier::Compact, 0.4))
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

#[tokio::test]
async fn a_batch_whose_transaction_fails_is_routed_again_one_job_a_transaction() {
    let (db, name) = private_db().await;
    let [good, bad] = [job("a"), job("a")];
    let mut decided = Vec::new();
    let out = route_jobs(&db, &[&good, &bad], DefaultBudget::NONE, |job, _| {
        decided.push(job.job_id);
        let mut d = decision(Tier::Compact, 0.1);
        if job.job_id == bad.job_id {
            // Text PostgreSQL cannot store fails the transaction it is in.
            d.model = "compact\0model".into();
        }
        Ok(d)
    })
    .await;
    assert!(
        matches!(&out[0], Ok(RouteOutcome::Routed { tier, .. }) if *tier == Tier::Compact),
        "{out:?}"
    );
    assert!(matches!(out[1], Err(StoreError::Db(_))), "{out:?}");
    // Each job was decided in the batch, then again in its own transaction.
    for id in [good.job_id, bad.job_id] {
        assert_eq!(
            decided.iter().filter(|d| **d == id).count(),
            2,
            "{decided:?}"
        );
    }
    let row = get_job(&db, good.job_id).await.expect("read").expect("row");
    assert_eq!(row.status, "routed");
    // The bad job's transaction wrote nothing.
    assert!(get_job(&db, bad.job_id).await.expect("read").is_none());
    db.close().await;
    pg_tool("dropdb", &name);
}
