//! Security: SQL only as static text with bound parameters; passwords never
//! reach logs or errors, whatever the log level; a size limit at every entry
//! point; API keys and webhook secrets never reach the logs at trace level.
//! (Tenant isolation: tests/gateway.rs and tests/abuse.rs.)

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read source dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn sql_is_only_static_text_with_bound_parameters() {
    // sqlx 0.9 takes only `&'static str` as SQL; dynamic SQL needs an
    // explicit AssertSqlSafe (or raw_sql). No shipped code may use either,
    // so every value reaches PostgreSQL as a bound parameter.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    // Every crate of the workspace, so that a new one is scanned too.
    for krate in std::fs::read_dir(root.join("workers")).expect("read workers/") {
        let src = krate.expect("a workers/ entry").path().join("src");
        if src.is_dir() {
            rust_sources(&src, &mut files);
        }
    }
    assert!(files.len() > 20, "found the sources ({})", files.len());
    let mut queries = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        for needle in [
            "AssertSqlSafe",
            "raw_sql(",
            "query_unchecked",
            "format!(\"SELECT",
            "format!(\"INSERT",
            "format!(\"UPDATE",
            "format!(\"DELETE",
        ] {
            assert!(!text.contains(needle), "{} uses {needle}", f.display());
        }
        queries += text.matches("sqlx::query").count();
    }
    assert!(queries > 20, "the scan saw the queries ({queries})");
}

/// Runs every case at once, at trace level, for at most `secs` (a process
/// that retries forever is stopped then); returns what each wrote.
/// A command line and its environment.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);

fn run_all(env: &TestEnv, cases: &[Case<'_>], secs: u64) -> Vec<String> {
    let mut running = Vec::new();
    for (args, vars) in cases {
        let mut c = env.command(args);
        c.env("RECAP_LOG", "trace");
        for (k, v) in vars {
            c.env(k, v);
        }
        let log = env.dir.path().join(format!("{}.log", Uuid::new_v4()));
        let file = std::fs::File::create(&log).expect("log file");
        let file2 = file.try_clone().expect("log file");
        c.stdout(file).stderr(file2);
        running.push((c.spawn().expect("start recap"), log));
    }
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if running
            .iter_mut()
            .all(|(c, _)| matches!(c.try_wait(), Ok(Some(_))))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    running
        .into_iter()
        .map(|(mut c, log)| {
            let _ = c.kill();
            let _ = c.wait();
            std::fs::read_to_string(&log).unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_logs_or_errors() {
    let env = TestEnv::new("secrets").await;
    env.migrate();
    let amqp_pw = "amqp-pw-0f9e8d7c";
    let db_pw = "db-pw-1a2b3c4d";
    let bad_amqp = format!("amqp://guest:{amqp_pw}@127.0.0.1:5672/{}", env.name);
    let good_db_with_pw = env
        .db_url
        .replace("postgres@", &format!("postgres:{db_pw}@"));
    let missing_db = format!(
        "postgres://postgres:{db_pw}@127.0.0.1:5432/no_such_db_{}",
        env.name
    );
    let unreachable_db = format!("postgres://postgres:{db_pw}@127.0.0.1:1/x");
    let cases: Vec<Case<'_>> = vec![
        // The broker refuses the password; the database is fine.
        (
            vec!["worker", "--tier", "compact"],
            vec![
                ("RECAP_AMQP_URL", &bad_amqp),
                ("RECAP_DATABASE_URL", &good_db_with_pw),
            ],
        ),
        (
            vec!["router"],
            vec![
                ("RECAP_AMQP_URL", &bad_amqp),
                ("RECAP_DATABASE_URL", &good_db_with_pw),
            ],
        ),
        // The database is missing or unreachable.
        (vec!["migrate"], vec![("RECAP_DATABASE_URL", &missing_db)]),
        (
            vec!["migrate"],
            vec![("RECAP_DATABASE_URL", &unreachable_db)],
        ),
        (
            vec!["worker", "--tier", "compact"],
            vec![("RECAP_DATABASE_URL", &unreachable_db)],
        ),
        (
            vec!["gateway"],
            vec![
                ("RECAP_DATABASE_URL", &missing_db),
                ("RECAP_GATEWAY_LISTEN", "127.0.0.1:0"),
            ],
        ),
        // A healthy start with passwords in both URLs, at trace level.
        (
            vec!["router"],
            vec![("RECAP_DATABASE_URL", &good_db_with_pw)],
        ),
    ];
    let outputs = run_all(&env, &cases, 15);
    for ((args, _), out) in cases.iter().zip(&outputs) {
        assert!(!out.is_empty(), "{args:?} said something");
        for pw in [amqp_pw, db_pw] {
            assert!(!out.contains(pw), "{args:?} leaked a password:\n{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dead_lettered_at_every_queue_without_being_parsed() {
    let mut env = TestEnv::new("oversize").await;
    env.migrate();
    env.spawn(&["router"], &[]);
    env.spawn(&["worker", "--tier", "compact"], &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    // 5 MiB of one JSON string: over the 2 MiB transcript limit's message bound.
    let mut body = b"{\"transcript\": \"".to_vec();
    body.extend(std::iter::repeat_n(b'a', 5 * 1024 * 1024));
    body.extend(b"\"}");
    for key in ["ingest", "compact"] {
        publish(&ch, key, &body, None).await;
    }
    let dead = drain_dead(&conn, 2, Duration::from_secs(60)).await;
    assert_eq!(dead.len(), 2, "logs:\n{}", env.logs());
    for d in &dead {
        assert_eq!(d.reason, "transcript_too_large", "{}", d.detail);
        assert!(
            d.detail.contains("the largest a job may be"),
            "{}",
            d.detail
        );
        assert_eq!(
            d.body.len(),
            body.len(),
            "the dead letter keeps the message"
        );
    }
}

/// A loopback webhook receiver answering 200; counts the deliveries.
async fn counting_receiver() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let addr = free_addr();
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_webhook_secrets_never_reach_the_logs_at_trace() {
    use std::sync::atomic::Ordering;
    let mut env = TestEnv::new("keyleak").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let (hook, hits) = counting_receiver().await;
    let trace = [("RECAP_LOG", "trace")];
    let base = start_gateway(
        &mut env,
        &[
            ("RECAP_LOG", "trace"),
            ("RECAP_WEBHOOK_ALLOW", hook.as_str()),
        ],
    )
    .await;
    env.spawn(&["router"], &trace);
    env.spawn(&["worker", "--tier", "compact"], &trace);
    let http = reqwest::Client::new();
    // A job with a signed callback, read back with the key; and a near
    // miss of the key, which is refused.
    let id = Uuid::new_v4();
    let res = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&acme.key)
        .json(&job_body(
            id,
            serde_json::json!({"callback_url": format!("http://{hook}/hook")}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let mut wrong = acme.key.clone();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);
    let res = http
        .get(format!("{base}/v1/jobs/{id}"))
        .bearer_auth(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    let start = std::time::Instant::now();
    while hits.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the webhook never came; logs:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = http
        .get(format!("{base}/v1/jobs/{id}"))
        .bearer_auth(&acme.key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    // A rotation at trace: the new key goes to stdout only.
    let out = run_ok(
        env.command(&["tenants", "rotate", "acme", "--grace-s", "60"])
            .env("RECAP_LOG", "trace"),
    );
    let rotated = String::from_utf8_lossy(&out.stdout).to_string();
    let new_key = rotated
        .split_whitespace()
        .find(|w| w.starts_with("rk_") && w.len() > 20)
        .unwrap_or_else(|| panic!("no new key in {rotated}"))
        .to_string();
    let mut logs = env.logs();
    logs.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(logs.contains("TRACE"), "trace logs were written:\n{logs}");
    for (what, secret) in [
        ("API key", acme.key.as_str()),
        ("near-miss key", wrong.as_str()),
        ("rotated key", new_key.as_str()),
        ("webhook secret", acme.secret.as_str()),
    ] {
        // The whole value, or its tail past the prefix that `tenants list` shows.
        let tail = &secret[secret.len() - 16..];
        assert!(!logs.contains(tail), "the {what} reached the logs:\n{logs}");
    }
}
