//! The cost policy in the running router and workers, on the real broker,
//! database and models: routes and reasons, budgets under two concurrent
//! routers, the cascade, a policy change by SIGHUP, and the calibrated
//! score: fitted from shadow pairs, applied in the cascade, explained.

mod common;

use common::*;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use std::time::Duration;
use uuid::Uuid;

const COMPACT: &str = "smollm2-135m-instruct-q4_1";
const LARGE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m";

fn models(policy: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("RECAP_COMPACT_MODEL", COMPACT.to_string()),
        ("RECAP_LARGE_MODEL", LARGE.to_string()),
        ("RECAP_POLICY", policy.display().to_string()),
    ]
}

fn spawn_with(
    env: &mut TestEnv,
    args: &[&str],
    vars: &[(&'static str, String)],
    extra: &[(&str, &str)],
) -> usize {
    let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    env.spawn(args, &all)
}

fn job(tenant: &str, quality: &str, kinds: &[&str], repeat: usize) -> (Uuid, Vec<u8>) {
    let id = Uuid::new_v4();
    let mut v: serde_json::Value = serde_json::from_slice(&job_json(id, tenant, kinds)).unwrap();
    v["quality"] = serde_json::json!(quality);
    if repeat > 1 {
        let t = v["transcript"].as_array().unwrap().clone();
        v["transcript"] =
            serde_json::Value::Array(t.iter().cycle().take(t.len() * repeat).cloned().collect());
    }
    (id, serde_json::to_vec(&v).unwrap())
}

async fn reasons(env: &TestEnv, id: Uuid) -> Vec<(String, String)> {
    sqlx::query_as("SELECT tier, reason FROM route_decisions WHERE job_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn wait_routed(env: &TestEnv, n: i64) {
    let got = env
        .wait_count(
            "SELECT count(*) FROM route_decisions",
            n,
            Duration::from_secs(60),
        )
        .await;
    assert!(got >= n, "{got} of {n} routed; logs:\n{}", env.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_land_in_the_expected_queues_with_their_reasons() {
    let mut env = TestEnv::new("routes").await;
    env.migrate();
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
version = "routes-1"
rules = ["quality", "context_fit"]
extractive_model = "extractive-lead"
[quality]
best = "large"
economy_extractive = true
[context_fit]
compact_window = 200
overflow = "large"
"#,
    )
    .unwrap();
    let vars = models(&policy);
    spawn_with(&mut env, &["router"], &vars, &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let cases = [
        (
            job("alpha", "balanced", &["short"], 1),
            "compact",
            "default",
        ),
        (
            job("beta", "balanced", &["short"], 40),
            "large",
            "context_overflow",
        ),
        (job("alpha", "best", &["short"], 1), "large", "quality_best"),
        (
            job("beta", "economy", &["short"], 1),
            "compact",
            "quality_economy",
        ),
    ];
    for ((id, body), _, _) in &cases {
        publish(&ch, "ingest", body, Some(&id.to_string())).await;
    }
    wait_routed(&env, cases.len() as i64).await;
    for ((id, _), tier, reason) in &cases {
        assert_eq!(
            reasons(&env, *id).await,
            vec![(tier.to_string(), reason.to_string())],
            "job {id}"
        );
    }
    assert_eq!(queue_depth(&conn, "recap.compact").await, 2);
    assert_eq!(queue_depth(&conn, "recap.large").await, 2);
    // The economy job carries the model the policy chose: the extractive baseline.
    let ch2 = conn.create_channel().await.unwrap();
    let mut models_seen = Vec::new();
    while let Some(m) = ch2
        .basic_get("recap.compact".into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        if let Some(AMQPValue::LongString(s)) = h.inner().get("x-recap-model") {
            models_seen.push(String::from_utf8_lossy(s.as_bytes()).into_owned());
        }
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    models_seen.sort();
    assert_eq!(
        models_seen,
        vec!["extractive-lead".to_string(), COMPACT.to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_budget_holds_under_two_concurrent_routers() {
    let mut env = TestEnv::new("budget").await;
    env.migrate();
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
version = "budget-1"
rules = ["quality", "budget"]
extractive_model = "extractive-lead"
[prices."{LARGE}"]
input_per_1k = 0.01
output_per_1k = 0.01
[prices."{COMPACT}"]
input_per_1k = 0.001
output_per_1k = 0.001
"#
        ),
    )
    .unwrap();
    let budget = 0.01;
    run_ok(&mut env.command(&["budget", "set", "thrifty", "--daily", &budget.to_string()]));
    let vars = models(&policy);
    // Each router serves its metrics, so that the test sees both route.
    let addrs = [free_addr(), free_addr()];
    for addr in &addrs {
        spawn_with(
            &mut env,
            &["router"],
            &vars,
            &[("RECAP_AMQP_PREFETCH", "8"), ("RECAP_METRICS_LISTEN", addr)],
        );
    }
    // Both consume before the first job comes.
    for addr in &addrs {
        let start = std::time::Instant::now();
        while reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .ok()
            != Some(200)
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "router on {addr} never ready; logs:\n{}",
                env.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let n = 40;
    for _ in 0..n {
        let (id, body) = job("thrifty", "best", &["short"], 1);
        publish(&ch, "ingest", &body, Some(&id.to_string())).await;
    }
    wait_routed(&env, n).await;
    let spent: f64 = sqlx::query_scalar("SELECT coalesce(sum(cost_usd), 0)::float8 FROM usage_ledger WHERE tenant = 'thrifty' AND entry = 'estimate'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(spent <= budget + 1e-9, "spent {spent} of a {budget} budget");
    let by_reason: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT tier, model, count(*) FROM route_decisions GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    eprintln!("spent {spent:.6} of {budget}: {by_reason:?}");
    let count = |m: &str| {
        by_reason
            .iter()
            .filter(|r| r.1 == m)
            .map(|r| r.2)
            .sum::<i64>()
    };
    assert!(count(LARGE) >= 1, "some best jobs got the large model");
    assert!(
        count("extractive-lead") >= 1,
        "the budget ran out and jobs stepped down"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM route_decisions WHERE reason = 'budget'")
            .await
            + count(LARGE),
        n
    );
    // The budget held with both routers deciding, not one.
    let mut each = Vec::new();
    for addr in &addrs {
        let text = scrape(&format!("http://{addr}/metrics")).await;
        each.push(metric_sum(&text, "recap_route_decisions_total", &[]));
    }
    assert!(
        each.iter().all(|n| *n >= 1.0),
        "routed by each router: {each:?}"
    );
    assert_eq!(each.iter().sum::<f64>() as i64, n, "{each:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degenerate_compact_output_cascades_exactly_once() {
    let mut env = TestEnv::new("cascade").await;
    env.migrate();
    let policy = env.dir.path().join("policy.toml");
    // Any real summary is longer than two words: every compact output
    // counts as degenerate (too long) and must be sent on, once.
    std::fs::write(
        &policy,
        r#"
version = "cascade-1"
rules = ["cascade"]
[cascade]
min_words = 0
max_words = 2
"#,
    )
    .unwrap();
    let vars = models(&policy);
    spawn_with(&mut env, &["router"], &vars, &[]);
    spawn_with(&mut env, &["worker", "--tier", "compact"], &vars, &[]);
    spawn_with(&mut env, &["worker", "--tier", "large"], &vars, &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let (id, body) = job("acme", "balanced", &["short"], 1);
    publish(&ch, "ingest", &body, Some(&id.to_string())).await;
    env.wait_succeeded(1, Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        reasons(&env, id).await,
        vec![
            ("compact".to_string(), "default".to_string()),
            ("large".to_string(), "cascade".to_string())
        ]
    );
    let rows: Vec<(String, bool)> =
        sqlx::query_as("SELECT model, shadow FROM summaries WHERE job_id = $1")
            .bind(id)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![(LARGE.to_string(), false)]);
    let (tier, model): (String, String) =
        sqlx::query_as("SELECT tier, model FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((tier.as_str(), model.as_str()), ("large", LARGE));
    assert_eq!(queue_depth(&conn, "recap.large").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_policy_change_applies_to_the_next_job_and_a_bad_one_is_refused() {
    let mut env = TestEnv::new("sighup").await;
    env.migrate();
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"a\"\nrules = [\"quality\"]\n").unwrap();
    let vars = models(&policy);
    let router = spawn_with(&mut env, &["router"], &vars, &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;

    let (first, body) = job("acme", "best", &["short"], 1);
    publish(&ch, "ingest", &body, Some(&first.to_string())).await;
    wait_routed(&env, 1).await;
    assert_eq!(
        reasons(&env, first).await,
        vec![("large".to_string(), "quality_best".to_string())]
    );

    // Policy b: the quality rule is off. Best jobs now go compact.
    std::fs::write(&policy, "version = \"b\"\nrules = []\n").unwrap();
    env.signal(router, libc::SIGHUP);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (second, body) = job("acme", "best", &["short"], 1);
    publish(&ch, "ingest", &body, Some(&second.to_string())).await;
    wait_routed(&env, 2).await;
    assert_eq!(
        reasons(&env, second).await,
        vec![("compact".to_string(), "default".to_string())]
    );
    let version: String =
        sqlx::query_scalar("SELECT policy_version FROM route_decisions WHERE job_id = $1")
            .bind(second)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(version, "b");

    // A bad policy is refused; the router keeps b and lives on.
    std::fs::write(&policy, "version = \"c\"\nrules = [\"telepathy\"]\n").unwrap();
    env.signal(router, libc::SIGHUP);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (third, body) = job("acme", "best", &["short"], 1);
    publish(&ch, "ingest", &body, Some(&third.to_string())).await;
    wait_routed(&env, 3).await;
    assert_eq!(
        reasons(&env, third).await,
        vec![("compact".to_string(), "default".to_string())]
    );
    let version: String =
        sqlx::query_scalar("SELECT policy_version FROM route_decisions WHERE job_id = $1")
            .bind(third)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(version, "b", "the refused policy c never applied");
    assert!(env.is_running(router));
    assert!(
        env.logs().contains("telepathy"),
        "the refusal names the bad rule:\n{}",
        env.logs()
    );

    // A score naming a feature this build does not know: refused, named,
    // and policy b stays.
    std::fs::write(
        &policy,
        r#"
version = "d"
rules = ["quality", "cascade", "score"]
[score]
features = ["gaze_direction"]
mean = [0.0]
scale = [1.0]
weights = [1.0]
bias = 0.0
threshold = 0.5
"#,
    )
    .unwrap();
    env.signal(router, libc::SIGHUP);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (fourth, body) = job("acme", "best", &["short"], 1);
    publish(&ch, "ingest", &body, Some(&fourth.to_string())).await;
    wait_routed(&env, 4).await;
    let version: String =
        sqlx::query_scalar("SELECT policy_version FROM route_decisions WHERE job_id = $1")
            .bind(fourth)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(version, "b");
    assert!(
        env.logs().contains("gaze_direction"),
        "the refusal names the unknown feature:\n{}",
        env.logs()
    );
}

/// A job over a window of the sample meetings, so that jobs differ.
fn sample_job(tenant: &str, at: usize) -> (Uuid, Vec<u8>) {
    let lines: Vec<(String, String)> = [
        "../../samples/product-sync.txt",
        "../../samples/budget-review.txt",
    ]
    .iter()
    .flat_map(|p| {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p))
            .expect("sample")
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .collect::<Vec<_>>()
    })
    .collect();
    let take = 3 + at % 4;
    let transcript: Vec<serde_json::Value> = (0..take)
        .map(|k| {
            let (s, t) = &lines[(at * 2 + k) % lines.len()];
            serde_json::json!({"speaker": s, "text": t})
        })
        .collect();
    let id = Uuid::new_v4();
    let body = serde_json::json!({
        "version": 1, "job_id": id, "tenant": tenant, "transcript": transcript,
        "summaries": ["short"], "quality": "balanced",
    });
    (id, serde_json::to_vec(&body).unwrap())
}

// Jobs run with shadow sampling on every job; `recap policy calibrate
// --shadow` fits a score from those pairs alone and writes a policy that
// loads. A score that judges every compact output not enough then sends a
// job on to large, and the decision row and `recap policy explain --job`
// show the signals, the score and the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_pairs_calibrate_the_score_and_the_cascade_applies_it() {
    let mut env = TestEnv::new("calibrate").await;
    env.migrate();
    let policy = shadow_every_job_policy(env.dir.path());
    let vars = models(&policy);
    let router = spawn_with(&mut env, &["router"], &vars, &[]);
    let compact = spawn_with(&mut env, &["worker", "--tier", "compact"], &vars, &[]);
    let large = spawn_with(&mut env, &["worker", "--tier", "large"], &vars, &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let calibrate = |env: &TestEnv, out: &std::path::Path| {
        env.command(&[
            "policy",
            "calibrate",
            "--shadow",
            "--tenant",
            "acme",
            "--max-cost-share",
            "0.6",
            "--features",
            "mean_logprob,mean_entropy,log_output_tokens,copy_rate",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("RECAP_COMPACT_MODEL", COMPACT)
        .env("RECAP_LARGE_MODEL", LARGE)
        .env("RECAP_POLICY", &policy)
        .output()
        .unwrap()
    };
    let shadows = |n: i64| {
        env.wait_count(
            "SELECT count(*) FROM summaries WHERE shadow",
            n,
            Duration::from_secs(600),
        )
    };
    let (id, body) = sample_job("acme", 0);
    publish(&ch, "ingest", &body, Some(&id.to_string())).await;
    assert_eq!(shadows(1).await, 1, "logs:\n{}", env.logs());
    let answered = |n: i64| {
        env.wait_count(
            "SELECT count(*) FROM summaries WHERE NOT shadow",
            n,
            Duration::from_secs(300),
        )
    };
    assert_eq!(answered(1).await, 1, "logs:\n{}", env.logs());
    // One pair is too few: refused with the count, nothing written.
    let out = env.dir.path().join("calibrated.toml");
    let few = calibrate(&env, &out);
    let err = String::from_utf8_lossy(&few.stderr).to_string();
    assert!(
        !few.status.success() && err.contains("at least 20") && err.contains("got 1"),
        "{err}"
    );
    assert!(!out.exists());
    // The compact row carries its signals.
    let (lp, copy): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT mean_logprob, copy_rate FROM summaries WHERE job_id = $1 AND NOT shadow",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(lp.is_some_and(|v| v < 0.0) && copy.is_some_and(|c| (0.0..=1.0).contains(&c)));

    for at in 1..24 {
        let (id, body) = sample_job("acme", at);
        publish(&ch, "ingest", &body, Some(&id.to_string())).await;
    }
    assert_eq!(shadows(24).await, 24, "logs:\n{}", env.logs());
    assert_eq!(answered(24).await, 24, "logs:\n{}", env.logs());
    let fitted = calibrate(&env, &out);
    let said = String::from_utf8_lossy(&fitted.stdout).to_string();
    assert!(
        fitted.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&fitted.stderr)
    );
    assert!(
        said.contains("24 cases from shadow pairs of tenant acme") && said.contains("chosen"),
        "{said}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("[score]") && text.contains("\"score\""),
        "{text}"
    );

    // A score under which no compact output is enough: every job cascades.
    std::fs::write(
        &policy,
        r#"
version = "score-all"
rules = ["cascade", "score"]
[cascade]
min_words = 0
max_words = 10000
require_speaker = false
check_language = false
max_copy_rate = 1.0
[score]
features = ["mean_logprob"]
mean = [-1.0]
scale = [1.0]
weights = [0.0]
bias = -10.0
threshold = 0.5
"#,
    )
    .unwrap();
    for i in [router, compact, large] {
        env.signal(i, libc::SIGHUP);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (id, body) = sample_job("acme", 5);
    publish(&ch, "ingest", &body, Some(&id.to_string())).await;
    env.wait_succeeded(25, Duration::from_secs(300)).await;
    assert_eq!(
        reasons(&env, id).await,
        vec![
            ("compact".to_string(), "default".to_string()),
            ("large".to_string(), "cascade".to_string())
        ]
    );
    let explained = env
        .command(&["policy", "explain", "--job", &id.to_string()])
        .env("RECAP_COMPACT_MODEL", COMPACT)
        .env("RECAP_LARGE_MODEL", LARGE)
        .env("RECAP_POLICY", &policy)
        .output()
        .unwrap();
    assert!(
        explained.status.success(),
        "{}",
        String::from_utf8_lossy(&explained.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&explained.stdout).unwrap();
    let cascade = &v["decisions"][1];
    assert_eq!(cascade["reason"], "cascade", "{v:#}");
    assert_eq!(cascade["policy_version"], "score-all");
    assert_eq!(cascade["features"]["failed_checks"][0], "short:score");
    assert_eq!(cascade["features"]["threshold"], 0.5);
    let out0 = &cascade["features"]["outputs"][0];
    assert!(out0["score"].as_f64().is_some_and(|p| p < 0.5), "{v:#}");
    assert!(out0["signals"]["mean_logprob"]
        .as_f64()
        .is_some_and(|p| p < 0.0));
    assert_eq!(v["policy_now"]["score"]["threshold"], 0.5);
    assert_eq!(v["summaries"][0]["model"], LARGE);
    // The stored row's signals give the current score too.
    let now = &v["summaries"][0]["score_now"];
    assert!(
        now["probability"].as_f64().is_some_and(|p| p < 0.5),
        "{v:#}"
    );
    assert_eq!(now["escalates"], true);
}
