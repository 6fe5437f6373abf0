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

    env.wait_succeeded(2, Duration::from_secs(300)).await;
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

/// A user catalog entry for a FLAN-T5 directory.
fn t5_entry(id: &str, dir: &std::path::Path, sha256: &str) -> String {
    format!(
        "[[model]]\nid = \"{id}\"\nfamily = \"t5\"\nformat = \"t5\"\nfile = \"file://{}\"\nsha256 = \"{sha256}\"\ncontext_length = 512\ndtype = \"f32\"\nprice_per_1k_input = 0.0001\nprice_per_1k_output = 0.0002\nlicence = \"Apache-2.0\"\n",
        dir.display()
    )
}

// A FLAN-T5 directory (tiny weights under the real names, the real
// config keys) named in a user catalog: the router counts its tokens, the
// compact worker serves it, and the row says t5 made the summary and what
// it cost. `recap summarize` serves it too. A sha256 that is not the
// weights', or weights that do not fit config.json, is refused naming the
// entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flan_t5_directory_serves_jobs_from_queue_to_row() {
    use recap_engine::testing::{write_tiny_flan_t5, TINY_T5_VOCAB};
    let mut env = TestEnv::new("t5").await;
    env.migrate();
    let flan = env.dir.path().join("flan-t5-tiny");
    std::fs::create_dir(&flan).unwrap();
    write_tiny_flan_t5(&flan).unwrap();
    let weights = std::fs::read(flan.join("model.safetensors")).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&weights));
    // The same weights under a config with a third layer, which they lack.
    let misfit = env.dir.path().join("flan-t5-misfit");
    std::fs::create_dir(&misfit).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(flan.join(file), misfit.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(misfit.join("config.json")).unwrap();
    std::fs::write(
        misfit.join("config.json"),
        config.replace("\"num_layers\": 2", "\"num_layers\": 3"),
    )
    .unwrap();
    let catalog = env.dir.path().join("models.toml");
    std::fs::write(
        &catalog,
        [
            t5_entry("flan-t5-tiny", &flan, &sha),
            t5_entry("flan-t5-damaged", &flan, &"0".repeat(64)),
            t5_entry("flan-t5-misfit", &misfit, &sha),
        ]
        .concat(),
    )
    .unwrap();
    let catalog = catalog.to_str().unwrap();
    // Routing and the model path only: random weights would fail the
    // cascade's checks and go on to a large tier this test does not run.
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"t5\"\nrules = [\"quality\"]\n").unwrap();
    let models = [
        ("RECAP_MODELS_CATALOG", catalog),
        ("RECAP_COMPACT_MODEL", "flan-t5-tiny"),
        ("RECAP_POLICY", policy.to_str().unwrap()),
    ];
    env.spawn(&["router"], &models);
    env.spawn(&["worker", "--tier", "compact"], &models);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    publish(
        &ch,
        "ingest",
        &job_json(id, "acme", &["short", "decisions"]),
        Some(&id.to_string()),
    )
    .await;
    env.wait_succeeded(1, Duration::from_secs(120)).await;
    let rows = env.summary_rows(id).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (kind, engine, model, text, input_tokens, output_tokens) in &rows {
        assert_eq!((engine.as_str(), model.as_str()), ("t5", "flan-t5-tiny"));
        // The FLAN prompt and the transcript went in; random weights say
        // words of the tiny vocabulary.
        assert!(
            *input_tokens > 20 && *output_tokens > 0,
            "{kind}: {input_tokens} in, {output_tokens} out"
        );
        let words: Vec<&str> = text
            .split_whitespace()
            .map(|w| w.trim_start_matches("- "))
            .filter(|w| *w != "-")
            .collect();
        assert!(!words.is_empty(), "{kind}: empty summary");
        assert!(
            words
                .iter()
                .all(|w| TINY_T5_VOCAB.split_whitespace().any(|v| v == *w)),
            "not the tiny model's words: {text}"
        );
    }
    let (tier, cost): (String, f64) =
        sqlx::query_as("SELECT tier, cost_usd::float8 FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(tier, "compact");
    assert!(cost > 0.0, "cost {cost}");

    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/formats/teams.vtt");
    let summarize = |model: &str| {
        outcome(
            env.command(&[
                "summarize",
                sample.to_str().unwrap(),
                "--model",
                model,
                "--kinds",
                "short",
            ])
            .env("RECAP_MODELS_CATALOG", catalog)
            .output(),
        )
    };
    let (ok, out) = summarize("flan-t5-tiny");
    assert!(
        ok && out.contains("== short (flan-t5-tiny via t5) =="),
        "{out}"
    );
    let (ok, out) = summarize("flan-t5-damaged");
    assert!(
        !ok && out.contains("flan-t5-damaged")
            && out.contains(&sha)
            && out.contains(&"0".repeat(64)),
        "{out}"
    );
    // `models fetch` verifies a directory by its weights, and reports a
    // user's directory that does not match, leaving it in place.
    let fetch = |model: &str| {
        env.command(&["models", "fetch", model])
            .env("RECAP_MODELS_CATALOG", catalog)
            .output()
            .unwrap()
    };
    let out = fetch("flan-t5-tiny");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("flan-t5-tiny: installed and verified"),
        "{text}"
    );
    let out = fetch("flan-t5-damaged");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains(&sha), "{text}");
    assert!(
        flan.join("model.safetensors").exists(),
        "the user's weights were deleted"
    );
    let (ok, out) = summarize("flan-t5-misfit");
    assert!(
        !ok && out.contains("flan-t5-misfit") && out.contains("block.2"),
        "{out}"
    );
}
