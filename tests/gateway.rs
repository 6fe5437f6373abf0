//! The HTTP gateway with a real HTTP client against a running gateway,
//! router and worker: the auth matrix, 1,000 concurrent submissions with
//! retries, malformed bodies, rate limits, signed webhooks with retries,
//! completion events, the OpenAPI document, and a producer that is not Rust.

mod common;

use common::*;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

async fn assert_problem(res: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(res.status().as_u16(), status);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["status"], status);
    assert!(
        v["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:recap:problem:"),
        "{v}"
    );
    assert!(!v["detail"].as_str().unwrap().is_empty(), "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_and_tenant_isolation() {
    let mut env = TestEnv::new("gwauth").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let other = create_tenant(&env, "other");
    let base = start_gateway(&mut env, &[]).await;
    let http = reqwest::Client::new();
    let id = Uuid::new_v4();
    let url = format!("{base}/v1/jobs");

    assert_problem(
        http.post(&url)
            .json(&job_body(id, serde_json::json!({})))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    assert_problem(
        http.post(&url)
            .bearer_auth("rk_wrong")
            .json(&job_body(id, serde_json::json!({})))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    let res = http
        .post(&url)
        .bearer_auth(&acme.key)
        .json(&job_body(id, serde_json::json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    assert_eq!(
        res.headers().get("location").unwrap().to_str().unwrap(),
        format!("/v1/jobs/{id}")
    );

    // Another tenant's job does not exist for you.
    assert_problem(
        http.get(format!("{url}/{id}"))
            .bearer_auth(&other.key)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert_problem(
        http.get(format!("{url}/{id}/summaries"))
            .bearer_auth(&other.key)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert_problem(
        http.post(format!("{url}/{id}/cancel"))
            .bearer_auth(&other.key)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    // Posting someone else's job_id reveals nothing and creates nothing.
    assert_problem(
        http.post(&url)
            .bearer_auth(&other.key)
            .json(&job_body(id, serde_json::json!({})))
            .send()
            .await
            .unwrap(),
        409,
    )
    .await;
    // Naming another tenant in the body is refused.
    let p = assert_problem(
        http.post(&url)
            .bearer_auth(&acme.key)
            .json(&job_body(
                Uuid::new_v4(),
                serde_json::json!({"tenant": "other"}),
            ))
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    assert_eq!(p["type"], "urn:recap:problem:tenant_mismatch");
    let mine: serde_json::Value = http
        .get(format!("{url}/{id}"))
        .bearer_auth(&acme.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine["tenant"], "acme");
    assert_eq!(mine["status"], "queued");
    let list: serde_json::Value = http
        .get(&url)
        .bearer_auth(&other.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);

    // Cancel works on a queued job (no router runs here), once.
    let c: serde_json::Value = http
        .post(format!("{url}/{id}/cancel"))
        .bearer_auth(&acme.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (c["status"].as_str(), c["error_code"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    assert_problem(
        http.post(format!("{url}/{id}/cancel"))
            .bearer_auth(&acme.key)
            .send()
            .await
            .unwrap(),
        409,
    )
    .await;

    // A revoked key stops working at once.
    let out = env
        .command(&["tenants", "revoke", "other"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_problem(
        http.get(&url).bearer_auth(&other.key).send().await.unwrap(),
        401,
    )
    .await;
    assert!(
        !env.logs().contains(&acme.key) && !env.logs().contains(&other.key),
        "keys never reach the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_submissions_and_retries_make_a_thousand_jobs() {
    let mut env = TestEnv::new("gwload").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let base = start_gateway(
        &mut env,
        &[
            ("RECAP_GATEWAY_RATE", "100000"),
            ("RECAP_GATEWAY_BURST", "100000"),
            ("RECAP_GATEWAY_CLIENT_RATE", "100000"),
            ("RECAP_GATEWAY_CLIENT_BURST", "100000"),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::new_v4()).collect();
    let post = |id: Uuid| {
        let http = http.clone();
        let url = format!("{base}/v1/jobs");
        let key = acme.key.clone();
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&job_body(id, serde_json::json!({})))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    let statuses: Vec<u16> = futures::stream::iter(ids.iter().copied().map(post))
        .buffer_unordered(64)
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert!(
        statuses.iter().all(|&s| s == 202),
        "{:?}",
        statuses
            .iter()
            .filter(|&&s| s != 202)
            .take(5)
            .collect::<Vec<_>>()
    );
    // Retried POSTs (a client that timed out and tried again) create nothing.
    let retries: Vec<u16> = futures::stream::iter(ids.iter().take(200).copied().map(post))
        .buffer_unordered(64)
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert!(retries.iter().all(|&s| s == 200 || s == 202), "{retries:?}");
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1000);
    let conn = env.amqp().await;
    // Retries of still-queued jobs are published again (the router deduplicates).
    let depth = queue_depth(&conn, "recap.ingest").await;
    assert!((1000..=1200).contains(&depth), "{depth} messages on ingest");
    // The router and a worker turn them into exactly 1,000 succeeded jobs.
    env.spawn(&["router"], &[("RECAP_AMQP_PREFETCH", "32")]);
    env.spawn(
        &["worker", "--tier", "compact"],
        &[("RECAP_AMQP_PREFETCH", "32")],
    );
    env.wait_succeeded(1000, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, 1000);
    assert_eq!(
        env.count("SELECT count(*) FROM route_decisions").await,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_problems_and_store_nothing() {
    let mut env = TestEnv::new("gwbad").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let base = start_gateway(
        &mut env,
        &[
            ("RECAP_GATEWAY_RATE", "1000"),
            ("RECAP_GATEWAY_BURST", "1000"),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/jobs");
    let raw = |body: Vec<u8>| {
        http.post(&url)
            .bearer_auth(&acme.key)
            .header("content-type", "application/json")
            .body(body)
    };
    let j =
        |extra: serde_json::Value| serde_json::to_vec(&job_body(Uuid::new_v4(), extra)).unwrap();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not json", b"{nope".to_vec(), 400, "invalid_json"),
        ("not utf-8", vec![b'{', 0xff, b'}'], 400, "invalid_utf8"),
        ("array", b"[1]".to_vec(), 422, "invalid_json"),
        (
            "unknown kind",
            j(serde_json::json!({"summaries": ["poem"]})),
            422,
            "unknown_summary_kind",
        ),
        (
            "bad version",
            j(serde_json::json!({"version": 3})),
            422,
            "unsupported_version",
        ),
        (
            "empty transcript",
            j(serde_json::json!({"transcript": ""})),
            422,
            "empty_transcript",
        ),
        (
            "mistyped quality",
            j(serde_json::json!({"quality": 5})),
            422,
            "invalid_field",
        ),
        (
            "malformed webvtt",
            j(serde_json::json!({"transcript": "WEBVTT\n\n00:05.000 --> 00:01.000\nhi\n"})),
            422,
            "malformed_transcript",
        ),
        (
            "unknown transcript format",
            j(serde_json::json!({"transcript_format": "docx"})),
            422,
            "unknown_transcript_format",
        ),
        (
            "whisper segment without text",
            j(serde_json::json!({"transcript": {"segments": [{"start": 0, "end": 1}]}})),
            422,
            "malformed_transcript",
        ),
        (
            "oversize transcript",
            j(serde_json::json!({"transcript": "x".repeat(3 * 1024 * 1024)})),
            413,
            "transcript_too_large",
        ),
        (
            "oversize body",
            j(serde_json::json!({"metadata": {"blob": "y".repeat(5 * 1024 * 1024)}})),
            413,
            "body_too_large",
        ),
    ];
    for (case, body, status, code) in cases {
        let p = assert_problem(raw(body).send().await.unwrap(), status).await;
        assert_eq!(
            p["type"],
            format!("urn:recap:problem:{code}"),
            "{case}: {p}"
        );
    }
    assert_eq!(
        env.count("SELECT count(*) FROM jobs").await,
        0,
        "a rejected request stores nothing"
    );
    let conn = env.amqp().await;
    assert_eq!(
        queue_depth(&conn, "recap.ingest").await,
        0,
        "and queues nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_with_retry_after() {
    let mut env = TestEnv::new("gwrate").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let base = start_gateway(
        &mut env,
        &[("RECAP_GATEWAY_RATE", "0.5"), ("RECAP_GATEWAY_BURST", "2")],
    )
    .await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..3 {
        let res = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&acme.key)
            .json(&job_body(Uuid::new_v4(), serde_json::json!({})))
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
        if res.status() == 429 {
            retry_after = res
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            assert_problem(res, 429).await;
        }
    }
    assert_eq!(statuses, vec![202, 202, 429]);
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 2);
}

type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A webhook receiver that answers 500 twice, then 200.
async fn receiver(seen: Seen) -> String {
    use axum::routing::post;
    let addr = free_addr();
    let app = axum::Router::new().route(
        "/hook",
        post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let seen = seen.clone();
                async move {
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let mut s = seen.lock().unwrap();
                    s.push((h("recap-signature"), h("recap-event"), body.to_vec()));
                    if s.len() <= 2 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_are_retried_and_events_published() {
    let mut env = TestEnv::new("gwhook").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let seen: Seen = Arc::default();
    let hook = receiver(seen.clone()).await;
    // The receiver is plain http on loopback: only an allow-listed host may be.
    let host = hook
        .trim_start_matches("http://")
        .trim_end_matches("/hook")
        .to_string();
    let base = start_gateway(&mut env, &[("RECAP_WEBHOOK_ALLOW", host.as_str())]).await;
    env.spawn(&["router"], &[]);
    env.spawn(&["worker", "--tier", "compact"], &[]);
    // Listen for completion events before the job runs.
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "events-test".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "events-test".into(),
        "recap.events".into(),
        "job.*.acme".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let id = Uuid::new_v4();
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&acme.key)
        .json(&job_body(id, serde_json::json!({"callback_url": hook})))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let delivered = env
        .wait_count(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'",
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(delivered, 1, "logs:\n{}", env.logs());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "two 500s, then a 200");
    for (sig, event, body) in &seen {
        assert_eq!(event, "job.completed");
        let (t, v1) = sig.split_once(',').unwrap();
        let ts = t.strip_prefix("t=").unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(acme.secret.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(body);
        assert_eq!(
            v1.strip_prefix("v1=").unwrap(),
            hex::encode(mac.finalize().into_bytes()),
            "signature checks out"
        );
        let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
        assert!((0..60).contains(&age), "timestamp is fresh");
        let payload: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(payload["job_id"], id.to_string());
        assert_eq!(payload["summaries"][0]["kind"], "short");
    }
    assert_eq!(env.count("SELECT count(*) FROM webhook_attempts").await, 3);
    let statuses: Vec<Option<i32>> =
        sqlx::query_scalar("SELECT http_status FROM webhook_attempts ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(statuses, vec![Some(500), Some(500), Some(200)]);

    let msg = ch
        .basic_get("events-test".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a completion event");
    assert_eq!(msg.delivery.routing_key.as_str(), "job.completed.acme");
    let ev: serde_json::Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(ev["job_id"], id.to_string());
    assert!(
        !env.logs().contains(&acme.secret),
        "webhook secrets never reach the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_is_the_committed_one() {
    let mut env = TestEnv::new("gwapi").await;
    env.migrate();
    let metrics = free_addr();
    let base = start_gateway(&mut env, &[("RECAP_METRICS_LISTEN", metrics.as_str())]).await;
    let served: serde_json::Value = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed: serde_json::Value = serde_json::from_str(include_str!("../openapi.json"))
        .expect("openapi.json at the repo root (recap openapi > openapi.json)");
    assert_eq!(
        served, committed,
        "regenerate with `recap openapi > openapi.json`"
    );
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/summaries",
        "/v1/jobs/{id}/cancel",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path}");
    }
    let ready = reqwest::get(format!("http://{metrics}/readyz"))
        .await
        .unwrap();
    assert_eq!(
        ready.status().as_u16(),
        200,
        "{}",
        ready.text().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_pika_producer_gets_the_same_result() {
    let mut env = TestEnv::new("gwpika").await;
    env.migrate();
    env.spawn(&["router"], &[]);
    env.spawn(&["worker", "--tier", "compact"], &[]);
    let id = Uuid::new_v4();
    let job = serde_json::json!({
        "version": 1, "job_id": id, "tenant": "py",
        "transcript": "Alice: We agreed to ship on Friday.\nBob: I'll update the roadmap.",
        "summaries": ["overview", "decisions"]
    });
    let script = r#"
import json, sys, pika
url, body, job_id = sys.argv[1], sys.argv[2], sys.argv[3]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
ch.basic_publish(exchange="recap.jobs", routing_key="ingest", body=body.encode(), mandatory=True,
                 properties=pika.BasicProperties(content_type="application/json", message_id=job_id, delivery_mode=2))
conn.close()
"#;
    let url = env.amqp_url.clone();
    let out = std::process::Command::new("python3")
        .args(["-c", script, &url, &job.to_string(), &id.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pika publish failed (scripts/test installs pika): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = env
        .wait_count(
            &format!("SELECT count(*) FROM jobs WHERE job_id = '{id}' AND status = 'succeeded'"),
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done, 1, "logs:\n{}", env.logs());
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM summaries WHERE job_id = '{id}'"
        ))
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_vtt_and_a_whisper_json_come_back_as_summaries_naming_the_speakers() {
    let mut env = TestEnv::new("gwformats").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let base = start_gateway(&mut env, &[]).await;
    env.spawn(&["router"], &[]);
    env.spawn(&["worker", "--tier", "compact"], &[]);
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/formats");
    // The files as a user has them, through `recap submit`.
    let out = env
        .command(&[
            "submit",
            "--wait",
            "--url",
            &base,
            "--kinds",
            "overview,decisions",
        ])
        .arg(samples.join("teams.vtt"))
        .arg(samples.join("whisperx.json"))
        .env("RECAP_API_KEY", &acme.key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}\nlogs:\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    assert_eq!(text.matches("status succeeded").count(), 2, "{text}");
    for speaker in ["Priya Raman", "Marcus Lee", "SPEAKER_00", "SPEAKER_01"] {
        assert!(text.contains(speaker), "{speaker} is not named:\n{text}");
    }
    // The compact tier here is the extractive baseline, which quotes the
    // turns: Priya's first two cues are one turn, markup gone.
    assert!(
        text.contains("Priya Raman: Morning everyone. Let's go through the launch plan for the mobile app. We said last week that the beta ships on the twelfth."),
        "{text}"
    );
    // The same VTT posted as the transcript's text, and Whisper's JSON as an
    // object, straight to the API.
    let http = reqwest::Client::new();
    for transcript in [
        serde_json::Value::String(std::fs::read_to_string(samples.join("zoom.vtt")).unwrap()),
        serde_json::from_str(
            &std::fs::read_to_string(samples.join("aws-transcribe.json")).unwrap(),
        )
        .unwrap(),
    ] {
        let res = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&acme.key)
            .json(&job_body(
                Uuid::new_v4(),
                serde_json::json!({"transcript": transcript}),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status().as_u16(),
            202,
            "{}",
            res.text().await.unwrap_or_default()
        );
    }
    env.wait_succeeded(4, Duration::from_secs(60)).await;
}
