//! The `openai` tier against a real OpenAI-compatible server on loopback:
//! llama-cpp-python's `llama_cpp.server` serving the SmolLM2 GGUF
//! (`scripts/llama-server-venv` builds it). A `best` job goes through
//! router, worker and commit to the endpoint; the row's tokens are the
//! server's `usage` and its cost the catalog's prices; the API key is
//! sent and never logged; a wrong key and a dead endpoint are clear errors.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

const KEY: &str = "sk-recap-test-4f7a9c";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server on a free port, once it answers: (its API base, the process).
fn start_server(log: &std::path::Path) -> (String, Server) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/llama-server-venv"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/llama-server-venv runs");
    assert!(out.status.success(), "scripts/llama-server-venv failed");
    let python = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let models = std::env::var_os("RECAP_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/recap/models")
        });
    let port = free_port();
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(models.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .args([
            "--model_alias",
            "smollm2-135m",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--n_ctx",
            "4096",
            "--n_threads",
            "1",
            "--api_key",
            KEY,
            "--verbose",
            "false",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start llama_cpp.server");
    let server = Server(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "llama_cpp.server did not listen:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (format!("http://127.0.0.1:{port}/v1"), server)
}

const ENTRY: &str = "[[model]]\nid = \"remote-large\"\nfamily = \"openai\"\nformat = \"openai\"\ncontext_length = 4096\nprice_per_1k_input = 0.0005\nprice_per_1k_output = 0.0015\nlicence = \"the endpoint's\"\nendpoint = { base_url_env = \"TEAM_LLM_URL\", model_env = \"TEAM_LLM_MODEL\", api_key_env = \"TEAM_LLM_KEY\", max_retries = 1, timeout_s = 120, max_concurrency = 2 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_jobs_go_to_an_openai_compatible_endpoint() {
    let mut env = TestEnv::new("openai").await;
    env.migrate();
    let (base, _server) = start_server(&env.dir.path().join("llama-server.stderr"));
    let catalog = env.dir.path().join("models.toml");
    std::fs::write(&catalog, ENTRY).unwrap();
    let catalog = catalog.to_str().unwrap().to_string();
    let vars = [
        ("RECAP_MODELS_CATALOG", catalog.as_str()),
        ("RECAP_LARGE_MODEL", "remote-large"),
        ("TEAM_LLM_URL", base.as_str()),
        ("TEAM_LLM_MODEL", "smollm2-135m"),
        ("TEAM_LLM_KEY", KEY),
    ];
    env.spawn(&["router"], &vars);
    env.spawn(&["worker", "--tier", "large"], &vars);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    let mut job: serde_json::Value =
        serde_json::from_slice(&job_json(id, "acme", &["short", "decisions"])).unwrap();
    job["quality"] = serde_json::json!("best");
    publish(
        &ch,
        "ingest",
        &serde_json::to_vec(&job).unwrap(),
        Some(&id.to_string()),
    )
    .await;
    env.wait_succeeded(1, Duration::from_secs(300)).await;
    let rows = env.summary_rows(id).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (mut tokens_in, mut tokens_out) = (0i64, 0i64);
    for (kind, engine, model, text, input_tokens, output_tokens) in &rows {
        assert_eq!(
            (engine.as_str(), model.as_str()),
            ("openai", "remote-large")
        );
        assert!(!text.trim().is_empty(), "{kind}: empty");
        // The server's usage: the system and user turns through SmolLM2's
        // tokenizer and chat template are well over 50 tokens.
        assert!(
            *input_tokens > 50 && *output_tokens > 0,
            "{kind}: {input_tokens} in, {output_tokens} out"
        );
        tokens_in += *input_tokens as i64;
        tokens_out += *output_tokens as i64;
        eprintln!("{kind}: {text}");
    }
    let (tier, cost): (String, f64) =
        sqlx::query_as("SELECT tier, cost_usd::float8 FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(tier, "large");
    let want = tokens_in as f64 / 1000.0 * 0.0005 + tokens_out as f64 / 1000.0 * 0.0015;
    assert!(
        (cost - want).abs() < 1e-9,
        "cost {cost}, tokens give {want}"
    );
    assert!(!env.logs().contains(KEY), "the API key was logged");

    // `recap summarize` through the same entry: a wrong key is refused by
    // the server (401, no retry), a dead endpoint is retried then named.
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/product-sync.txt");
    let summarize = |url: &str, key: &str| {
        outcome(
            env.command(&[
                "summarize",
                sample.to_str().unwrap(),
                "--model",
                "remote-large",
                "--kinds",
                "short",
            ])
            .env("RECAP_MODELS_CATALOG", &catalog)
            .env("TEAM_LLM_URL", url)
            .env("TEAM_LLM_MODEL", "smollm2-135m")
            .env("TEAM_LLM_KEY", key)
            .output(),
        )
    };
    let (ok, out) = summarize(&base, KEY);
    assert!(
        ok && out.contains("== short (remote-large via openai) =="),
        "{out}"
    );
    let (ok, out) = summarize(&base, "sk-wrong-key");
    assert!(
        !ok && out.contains("remote-large") && out.contains("401") && out.contains("API key"),
        "{out}"
    );
    assert!(!out.contains("sk-wrong-key"), "the key was shown: {out}");
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let (ok, out) = summarize(&dead, KEY);
    assert!(
        !ok && out.contains("remote-large") && out.contains("cannot connect"),
        "{out}"
    );
    // Unset variables: the entry names what to set.
    let out = env
        .command(&[
            "summarize",
            sample.to_str().unwrap(),
            "--model",
            "remote-large",
        ])
        .env("RECAP_MODELS_CATALOG", &catalog)
        .env_remove("TEAM_LLM_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("set TEAM_LLM_URL"),
        "{err}"
    );
}
