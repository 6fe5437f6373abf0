//! Foundation: jobs flow from RabbitMQ to PostgreSQL exactly once in effect,
//! bad input reaches the dead-letter queue with its reason, and a worker
//! stopped mid-batch loses nothing. Real RabbitMQ, real PostgreSQL, the real
//! `recap` binary.

mod common;

use common::*;
use std::time::{Duration, Instant};
use uuid::Uuid;

const ALL_KINDS: [&str; 4] = ["overview", "action_items", "decisions", "short"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_each_succeed_once_with_their_summaries() {
    let mut env = TestEnv::new("thousand").await;
    env.migrate();
    let fast = [("RECAP_AMQP_PREFETCH", "32")];
    env.spawn(&["router"], &fast);
    env.spawn(&["worker", "--tier", "compact"], &fast);

    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let mut expected_summaries = 0i64;
    for i in 0..1000 {
        let id = Uuid::new_v4();
        let kinds = &ALL_KINDS[..1 + i % 4];
        expected_summaries += kinds.len() as i64;
        publish(
            &ch,
            "ingest",
            &job_json(id, &format!("tenant-{}", i % 7), kinds),
            Some(&id.to_string()),
        )
        .await;
    }
    let done = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            1000,
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(done, 1000, "succeeded jobs; logs:\n{}", env.logs());
    // Settle, then check nothing more appears: exactly 1,000, never more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1000);
    assert_eq!(
        env.count("SELECT count(*) FROM summaries").await,
        expected_summaries
    );
    // Each job has exactly the kinds it asked for.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs j WHERE cardinality(j.summary_kinds) <>
               (SELECT count(*) FROM summaries s WHERE s.job_id = j.job_id
                  AND s.kind = ANY (j.summary_kinds))"
        )
        .await,
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM route_decisions").await,
        1000
    );
    assert_eq!(
        env.count("SELECT count(*) FROM usage_ledger WHERE entry = 'actual'")
            .await,
        1000
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE queued_at IS NULL OR routed_at IS NULL
               OR started_at IS NULL OR finished_at IS NULL OR attempts <> 1"
        )
        .await,
        0,
        "every step is timestamped and every job ran once"
    );
    assert_eq!(queue_depth(&conn, "recap.ingest").await, 0);
    assert_eq!(queue_depth(&conn, "recap.compact").await, 0);
    assert_eq!(queue_depth(&conn, "recap.dead").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_twice_gives_one_job_and_one_set_of_summaries() {
    let mut env = TestEnv::new("twice").await;
    env.migrate();
    env.spawn(&["router"], &[]);
    env.spawn(&["worker", "--tier", "compact"], &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    let body = job_json(id, "acme", &["overview", "short"]);
    publish(&ch, "ingest", &body, Some(&id.to_string())).await;
    env.wait_succeeded(1, Duration::from_secs(30)).await;
    // And once more straight onto the tier queue after success, as a late
    // redelivery would arrive, and once more on ingest.
    publish(&ch, "compact", &body, Some(&id.to_string())).await;
    publish(&ch, "ingest", &body, Some(&id.to_string())).await;
    // Every copy is taken and settled: nothing in flight.
    env.wait_drained(&["recap.ingest", "recap.compact"], Duration::from_secs(30))
        .await;
    // The keys make one row of each; recap's own code decides that the
    // copies were routed and run no second time.
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM route_decisions").await, 1);
    assert_eq!(
        env.count("SELECT attempts::bigint FROM jobs").await,
        1,
        "the late copy was not run again"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM usage_ledger WHERE entry = 'actual'")
            .await,
        1
    );
    assert_eq!(queue_depth(&conn, "recap.dead").await, 0);
}

// Jobs published straight onto a tier queue (no router) on the extractive
// baseline: each row is written whole in the worker's one commit, as a start
// then a completion would leave it, and a second copy changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_published_straight_onto_a_tier_are_recorded_whole_once() {
    let mut env = TestEnv::new("straight").await;
    env.migrate();
    env.spawn(
        &["worker", "--tier", "compact"],
        &[
            ("RECAP_AMQP_PREFETCH", "64"),
            ("RECAP_COMPACT_BATCH_SIZE", "16"),
        ],
    );
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let jobs: Vec<(Uuid, Vec<u8>)> = (0..50)
        .map(|i| {
            let id = Uuid::new_v4();
            (id, job_json(id, "acme", &ALL_KINDS[..1 + i % 4]))
        })
        .collect();
    publish_jobs(&ch, "compact", &jobs).await;
    env.wait_succeeded(50, Duration::from_secs(60)).await;
    // The copies arrive after every job has ended, and are all settled.
    publish_jobs(&ch, "compact", &jobs[..10]).await;
    env.wait_drained(&["recap.compact"], Duration::from_secs(30))
        .await;
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND attempts = 1
               AND tier = 'compact' AND model = 'extractive-lead' AND chunks >= 1
               AND queued_at IS NOT NULL AND started_at IS NOT NULL AND finished_at IS NOT NULL"
        )
        .await,
        50
    );
    let kinds: i64 = (0..50).map(|i| 1 + i % 4).sum();
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, kinds);
    assert_eq!(
        env.count("SELECT count(*) FROM usage_ledger WHERE entry = 'actual'")
            .await,
        50
    );
    assert_eq!(env.count("SELECT count(*) FROM route_decisions").await, 0);
    assert_eq!(queue_depth(&conn, "recap.dead").await, 0);
}

/// (case, body, routing key, expected reason, job id readable)
fn bad_inputs() -> Vec<(&'static str, Vec<u8>, &'static str, Option<Uuid>)> {
    let id = |n: u8| Uuid::from_bytes([n; 16]);
    let job = |id: Uuid, patch: serde_json::Value| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&job_json(id, "acme", &["overview"])).unwrap();
        for (k, val) in patch.as_object().unwrap() {
            if val.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = val.clone();
            }
        }
        serde_json::to_vec(&v).unwrap()
    };
    vec![
        (
            "not json",
            b"this is not json".to_vec(),
            "invalid_json",
            None,
        ),
        (
            "invalid utf-8",
            vec![b'{', 0xff, 0xfe, b'}'],
            "invalid_utf8",
            None,
        ),
        (
            "unknown version",
            job(id(1), serde_json::json!({"version": 9})),
            "unsupported_version",
            Some(id(1)),
        ),
        (
            "missing tenant",
            job(id(2), serde_json::json!({"tenant": null})),
            "missing_field",
            Some(id(2)),
        ),
        (
            "mistyped summaries",
            job(id(3), serde_json::json!({"summaries": 5})),
            "invalid_field",
            Some(id(3)),
        ),
        (
            "empty transcript",
            job(id(4), serde_json::json!({"transcript": "   "})),
            "empty_transcript",
            Some(id(4)),
        ),
        (
            "oversize transcript",
            job(
                id(5),
                serde_json::json!({"transcript": "x".repeat(3 * 1024 * 1024)}),
            ),
            "transcript_too_large",
            Some(id(5)),
        ),
        (
            "unknown kind",
            job(id(6), serde_json::json!({"summaries": ["poem"]})),
            "unknown_summary_kind",
            Some(id(6)),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_its_reason_and_workers_live_on() {
    let mut env = TestEnv::new("bad").await;
    env.migrate();
    let router = env.spawn(&["router"], &[]);
    let worker = env.spawn(&["worker", "--tier", "compact"], &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let cases = bad_inputs();
    // Through the router (ingest), and straight onto the worker's queue.
    for queue in ["ingest", "compact"] {
        for (_, body, _, _) in &cases {
            publish(&ch, queue, body, None).await;
        }
        let dead = drain_dead(&conn, cases.len(), Duration::from_secs(30)).await;
        assert_eq!(
            dead.len(),
            cases.len(),
            "via {queue}: dead letters; logs:\n{}",
            env.logs()
        );
        for (case, body, reason, _) in &cases {
            let d = dead
                .iter()
                .find(|d| &d.body == body)
                .unwrap_or_else(|| panic!("via {queue}: {case} is not in recap.dead"));
            assert_eq!(
                &d.reason, reason,
                "via {queue}: {case}: detail {}",
                d.detail
            );
            assert!(
                !d.detail.is_empty(),
                "{case}: a human-readable detail travels too"
            );
        }
    }
    for (case, _, reason, id) in &cases {
        if let Some(id) = id {
            let row = sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT status, error_code FROM jobs WHERE job_id = $1",
            )
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap_or_else(|e| panic!("{case}: no dead row: {e}"));
            assert_eq!(
                row,
                ("dead".to_string(), Some(reason.to_string())),
                "{case}"
            );
        }
    }
    assert!(env.is_running(router), "router survived bad input");
    assert!(env.is_running(worker), "worker survived bad input");
    // And both still do good work.
    let id = Uuid::new_v4();
    publish(
        &ch,
        "ingest",
        &job_json(id, "acme", &["short"]),
        Some(&id.to_string()),
    )
    .await;
    let ok = env
        .wait_count(
            &format!("SELECT count(*) FROM jobs WHERE job_id = '{id}' AND status = 'succeeded'"),
            1,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(ok, 1);
    assert_eq!(queue_depth(&conn, "recap.ingest").await, 0);
    assert_eq!(queue_depth(&conn, "recap.compact").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_then_restart_loses_nothing_and_doubles_nothing() {
    let mut env = TestEnv::new("sigterm").await;
    env.migrate();
    // SmolLM2 takes long enough per job that the signal lands while jobs
    // run; a policy without rules keeps every job on the compact tier.
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"sigterm\"\nrules = []\n").unwrap();
    let policy = policy.to_str().unwrap().to_string();
    let vars = [
        ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
        ("RECAP_POLICY", policy.as_str()),
        ("RECAP_AMQP_PREFETCH", "4"),
    ];
    env.spawn(&["router"], &vars);
    let worker = env.spawn(&["worker", "--tier", "compact"], &vars);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let total = 24i64;
    let jobs: Vec<(Uuid, Vec<u8>)> = (0..total)
        .map(|_| {
            let id = Uuid::new_v4();
            (id, job_json(id, "acme", &["short"]))
        })
        .collect();
    publish_jobs(&ch, "ingest", &jobs).await;
    let started = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            2,
            Duration::from_secs(120),
        )
        .await;
    assert!(started >= 2, "the worker ran jobs; logs:\n{}", env.logs());
    // Signal while jobs are running.
    let begin = Instant::now();
    let running: Vec<Uuid> = loop {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT job_id FROM jobs WHERE status = 'running'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
        if !ids.is_empty() {
            break ids;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(60),
            "no job was ever running; logs:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    env.signal(worker, libc::SIGTERM);
    let code = env.wait_exit(worker, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "worker exits 0 on SIGTERM; logs:\n{}",
        env.logs()
    );
    let at_stop = env
        .count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        .await;
    assert!(
        at_stop < total,
        "the batch was not finished when the worker stopped ({at_stop})"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'running'")
            .await,
        0,
        "in-flight jobs finished or were handed back"
    );
    // Each job that ran at the signal finished within the grace period.
    let states: Vec<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE job_id = ANY($1)")
        .bind(&running)
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(states.len(), running.len());
    assert!(states.iter().all(|s| s == "succeeded"), "{states:?}");

    env.spawn(&["worker", "--tier", "compact"], &vars);
    env.wait_succeeded(total, Duration::from_secs(240)).await;
    env.wait_drained(&["recap.ingest", "recap.compact"], Duration::from_secs(30))
        .await;
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, total);
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, total);
    assert_eq!(
        env.count("SELECT count(*) FROM usage_ledger WHERE entry = 'actual'")
            .await,
        total
    );
    assert_eq!(queue_depth(&conn, "recap.dead").await, 0);
}

#[test]
fn a_bad_config_value_exits_non_zero_naming_the_key() {
    let out = std::process::Command::new(bin())
        .args(["migrate"])
        .env("RECAP_AMQP_URL", "http://nope")
        .env_remove("RECAP_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("amqp.url") && err.contains("RECAP_AMQP_URL"),
        "{err}"
    );
    // A config file with an unknown key is refused too, naming it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recap.toml");
    std::fs::write(&path, "[amqp]\nprefech = 3\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["migrate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prefech"));
}
