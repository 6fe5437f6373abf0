//! Real models behind the queues: a job routed to the compact tier is
//! summarized by SmolLM2, a `best` job by Qwen on the large tier, and the
//! rows say which model and engine made each summary, and what it cost.

mod common;

use common::*;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_models_summarize_jobs_from_both_tiers() {
    let mut env = TestEnv::new("engine").await;
    env.migrate();
    let models = [
        ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
        ("RECAP_LARGE_MODEL", "qwen2.5-coder-0.5b-instruct-q4_k_m"),
    ];
    env.spawn(&["router"], &models);
    env.spawn(&["worker", "--tier", "compact"], &models);
    env.spawn(&["worker", "--tier", "large"], &models);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;

    let compact = Uuid::new_v4();
    publish(
        &ch,
        "ingest",
        &job_json(compact, "acme", &["short"]),
        Some(&compact.to_string()),
    )
    .await;
    let large = Uuid::new_v4();
    let mut best: serde_json::Value =
        serde_json::from_slice(&job_json(large, "acme", &["decisions"])).unwrap();
    best["quality"] = serde_json::json!("best");
    publish(
        &ch,
        "ingest",
        &serde_json::to_vec(&best).unwrap(),
        Some(&large.to_string()),
    )
    .await;

    let done = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            2,
            Duration::from_secs(300),
        )
        .await;
    assert_eq!(done, 2, "logs:\n{}", env.logs());
    for (id, tier, model) in [
        (compact, "compact", "smollm2-135m-instruct-q4_1"),
        (large, "large", "qwen2.5-coder-0.5b-instruct-q4_k_m"),
    ] {
        let (text, engine, m, input_tokens): (String, String, String, i32) = sqlx::query_as(
            "SELECT text, engine, model, input_tokens FROM summaries WHERE job_id = $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!((engine.as_str(), m.as_str()), ("gguf", model));
        assert!(
            !text.trim().is_empty() && input_tokens > 50,
            "{tier}: {text:?} ({input_tokens} tokens)"
        );
        let (t, cost): (String, f64) =
            sqlx::query_as("SELECT tier, cost_usd::float8 FROM jobs WHERE job_id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_eq!(t, tier);
        assert!(cost > 0.0, "{tier}: cost {cost}");
        // The estimate made at routing and the actual cost from real tokens
        // both sit in the ledger; budgets count the actual once it exists.
        let entries: Vec<(String, f64)> = sqlx::query_as(
            "SELECT entry, cost_usd::float8 FROM usage_ledger WHERE job_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(
            entries.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            ["estimate", "actual"],
            "{tier}"
        );
        assert!((entries[1].1 - cost).abs() < 1e-9);
        eprintln!("{tier} ({model}): {text}");
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_model_will_not_load_stays_up_and_not_ready() {
    let mut env = TestEnv::new("notready").await;
    env.migrate();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let empty = tempfile::tempdir().unwrap();
    let w = env.spawn(
        &["worker", "--tier", "compact"],
        &[
            ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
            ("RECAP_MODELS_DIR", empty.path().to_str().unwrap()),
            ("RECAP_METRICS_LISTEN", &addr),
        ],
    );
    let mut ready = None;
    for _ in 0..100 {
        if let Some(r) = http_get(&addr, "/readyz") {
            ready = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = ready.expect("probe server answers");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("model=false"), "{ready}");
    assert!(http_get(&addr, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert!(env.is_running(w), "the worker stays up");
    assert!(
        env.logs().contains("recap models fetch"),
        "the log says how to fix it:\n{}",
        env.logs()
    );
}
