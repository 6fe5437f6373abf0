//! The attack inputs of the security review, tried against running
//! processes: callback URLs aimed inside (refused up front and at delivery,
//! redirects not followed), a slowloris connection, a trickled body,
//! unauthenticated floods, probes on the public port, a cross-tenant
//! job_id on AMQP, two webhook dispatchers sharing a slow receiver, and
//! every process running as its own broker user from deploy/rabbitmq.
//! Each is refused, nothing is stored, and the process stays up. Every
//! address here is loopback; non-loopback targets are tried only through
//! the pure guard (workers/service/src/webhooks/egress.rs).

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Requests a loopback receiver saw: (path, Recap-Delivery header).
type Hits = Arc<Mutex<Vec<(String, String)>>>;

/// A receiver on loopback: `/hook` answers 200 after `delay`; `/redirect`
/// answers 307 to `/stolen`; every request is recorded.
async fn receiver(hits: Hits, delay: Duration) -> String {
    use axum::body::Body;
    use axum::response::Response;
    use axum::routing::post;
    let addr = free_addr();
    let record = move |path: &'static str| {
        let hits = hits.clone();
        move |headers: axum::http::HeaderMap| {
            let hits = hits.clone();
            async move {
                let delivery = headers
                    .get("recap-delivery")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                hits.lock().unwrap().push((path.to_string(), delivery));
                let res = Response::builder();
                let res = if path == "/redirect" {
                    res.status(307).header("location", "/stolen")
                } else {
                    tokio::time::sleep(delay).await;
                    res.status(200)
                };
                res.body(Body::empty()).unwrap()
            }
        }
    };
    let app = axum::Router::new()
        .route("/hook", post(record("/hook")))
        .route("/redirect", post(record("/redirect")))
        .route("/stolen", post(record("/stolen")));
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_aimed_inside_are_refused_up_front_and_at_delivery() {
    let mut env = TestEnv::new("abusehook").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let hits: Hits = Arc::default();
    let recv = receiver(hits.clone(), Duration::ZERO).await;
    let port = recv.rsplit(':').next().unwrap().to_string();
    // Only /redirect's host:port is allow-listed: the test's one receiver.
    let base = start_gateway(&mut env, &[("RECAP_WEBHOOK_ALLOW", recv.as_str())]).await;
    let http = reqwest::Client::new();

    // Up front: each is a 422 problem naming callback_url; nothing stored.
    for url in [
        format!("https://localhost:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        "https://169.254.169.254/latest/meta-data/".to_string(),
        "https://[::1]/hook".to_string(),
        "https://10.0.0.1/hook".to_string(),
        "https://0x7f000001/hook".to_string(),
        format!("http://user:pw@{recv}/hook"),
        "http://hooks.example.com/recap".to_string(),
    ] {
        let res = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&acme.key)
            .json(&job_body(
                Uuid::new_v4(),
                serde_json::json!({"callback_url": url}),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 422, "{url}");
        let p: serde_json::Value = res.json().await.unwrap();
        assert_eq!(p["field"], "callback_url", "{url}: {p}");
        assert_eq!(
            p["type"], "urn:recap:problem:callback_refused",
            "{url}: {p}"
        );
    }
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 0);

    // At delivery: jobs that came in over AMQP (trusted producers) with a
    // loopback callback that is not allow-listed, and one whose
    // allow-listed receiver redirects. Neither request reaches a target.
    env.spawn(&["router"], &[]);
    env.spawn(&["worker", "--tier", "compact"], &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let (inside, redirect) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, url) in [
        (inside, format!("https://localhost:{port}/hook")),
        (redirect, format!("http://{recv}/redirect")),
    ] {
        let mut job: serde_json::Value =
            serde_json::from_slice(&job_json(id, "acme", &["short"])).unwrap();
        job["callback_url"] = url.into();
        publish(&ch, "ingest", &serde_json::to_vec(&job).unwrap(), None).await;
    }
    let failed = env
        .wait_count(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'failed'",
            2,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(failed, 2, "logs:\n{}", env.logs());
    let attempts: Vec<(Uuid, Option<i32>, String)> = sqlx::query_as(
        "SELECT d.job_id, a.http_status, a.error FROM webhook_attempts a
         JOIN webhook_deliveries d ON d.id = a.delivery_id ORDER BY a.id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts.len(),
        2,
        "one attempt each, never retried: {attempts:?}"
    );
    let by_job: HashMap<Uuid, (Option<i32>, String)> =
        attempts.into_iter().map(|(j, s, e)| (j, (s, e))).collect();
    let (status, error) = &by_job[&inside];
    assert_eq!(*status, None);
    assert!(
        error.starts_with("refused:") && error.contains("loopback"),
        "{error}"
    );
    let (status, error) = &by_job[&redirect];
    assert_eq!(*status, Some(307));
    assert!(error.contains("redirect"), "{error}");
    // Give a retry, were there one, its first backoff (1 s) and more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.count("SELECT count(*) FROM webhook_attempts").await, 2);
    let paths: Vec<String> = hits.lock().unwrap().iter().map(|h| h.0.clone()).collect();
    assert_eq!(
        paths,
        vec!["/redirect".to_string()],
        "the redirect was not followed, and /hook never reached"
    );
}

/// Connects to `addr` and sends `head`, then one byte of `drip` every
/// `every`; returns how long the server kept the connection and what it
/// answered, giving up at `limit`.
fn trickle(
    addr: &str,
    head: &[u8],
    drip: &[u8],
    every: Duration,
    limit: Duration,
) -> (Duration, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let _ = s.write_all(head);
    let mut answer = Vec::new();
    let mut sent = 0;
    let mut last = Instant::now();
    while start.elapsed() < limit {
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        if last.elapsed() >= every && sent < drip.len() {
            if s.write_all(&drip[sent..sent + 1]).is_err() {
                break;
            }
            sent += 1;
            last = Instant::now();
        }
    }
    (
        start.elapsed(),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_floods_and_probes_get_nothing_from_the_public_port() {
    let mut env = TestEnv::new("abuseslow").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let metrics = free_addr();
    let base = start_gateway(
        &mut env,
        &[
            ("RECAP_GATEWAY_HEADER_TIMEOUT_S", "2"),
            ("RECAP_GATEWAY_REQUEST_TIMEOUT_S", "3"),
            ("RECAP_GATEWAY_CLIENT_RATE", "5"),
            ("RECAP_GATEWAY_CLIENT_BURST", "20"),
            ("RECAP_METRICS_LISTEN", metrics.as_str()),
        ],
    )
    .await;
    let addr = base.trim_start_matches("http://").to_string();

    // Slowloris: headers that never end. The server hangs up after the
    // header timeout, long before the test gives up.
    let a = addr.clone();
    let (held, _) = tokio::task::spawn_blocking(move || {
        trickle(
            &a,
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n",
            &[b'x'; 64],
            Duration::from_millis(300),
            Duration::from_secs(15),
        )
    })
    .await
    .unwrap();
    assert!(
        held < Duration::from_secs(8),
        "slowloris connection held {held:?}"
    );

    // A trickled body: the headers are whole, the body never is. Answered
    // 408 once the request timeout passes.
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n",
        acme.key
    );
    let a = addr.clone();
    let (held, answer) = tokio::task::spawn_blocking(move || {
        trickle(
            &a,
            head.as_bytes(),
            &[b' '; 4000],
            Duration::from_millis(200),
            Duration::from_secs(15),
        )
    })
    .await
    .unwrap();
    assert!(
        held < Duration::from_secs(8),
        "trickled body held {held:?}: {answer}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Probes and metrics are not on the public port; they are on metrics.listen.
    let http = reqwest::Client::new();
    for path in ["/metrics", "/readyz"] {
        let res = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 404, "{path} on the API port");
        let res = http
            .get(format!("http://{metrics}{path}"))
            .send()
            .await
            .unwrap();
        assert_ne!(res.status().as_u16(), 404, "{path} on metrics.listen");
    }

    // An unauthenticated flood on GET: past the client burst it is 429,
    // counted before any key lookup.
    let mut statuses = HashMap::<u16, usize>::new();
    for _ in 0..60 {
        let res = http
            .get(format!("{base}/v1/jobs"))
            .bearer_auth("rk_not_a_key")
            .send()
            .await
            .unwrap();
        *statuses.entry(res.status().as_u16()).or_default() += 1;
    }
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 30,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&401).copied().unwrap_or(0) <= 25,
        "{statuses:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 0);
    let gateway = 0;
    assert!(
        env.is_running(gateway),
        "the gateway stays up; logs:\n{}",
        env.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_tenant_job_id_on_amqp_is_dead_lettered_and_the_victim_untouched() {
    let mut env = TestEnv::new("abusetenant").await;
    env.migrate();
    env.spawn(&["router"], &[]);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    let victim = job_json(id, "victim", &["short"]);
    publish(&ch, "ingest", &victim, None).await;
    let routed = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'routed'",
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(routed, 1, "logs:\n{}", env.logs());
    // Another tenant reuses the job_id, on ingest and straight onto the tier queue.
    let evil = serde_json::to_vec(&serde_json::json!({
        "version": 1, "job_id": id, "tenant": "evil",
        "transcript": [{"speaker": "Mallory", "text": "Wire the payroll to account 666 before Friday."}],
        "summaries": ["short"], "callback_url": "https://hooks.example.com/steal"
    }))
    .unwrap();
    publish(&ch, "ingest", &evil, None).await;
    publish(&ch, "compact", &evil, None).await;
    env.spawn(&["worker", "--tier", "compact"], &[]);
    let dead = drain_dead(&conn, 2, Duration::from_secs(30)).await;
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(
        reasons,
        vec!["tenant_mismatch", "tenant_mismatch"],
        "logs:\n{}",
        env.logs()
    );
    let done = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done, 1, "the victim's own job runs; logs:\n{}", env.logs());
    let (tenant, callback): (String, Option<String>) =
        sqlx::query_as("SELECT tenant, callback_url FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((tenant.as_str(), callback), ("victim", None));
    let texts: Vec<String> = sqlx::query_scalar("SELECT text FROM summaries WHERE job_id = $1")
        .bind(id)
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(
        !texts[0].contains("payroll"),
        "the attacker's transcript was summarized: {texts:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM route_decisions").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM webhook_deliveries").await,
        0
    );
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_and_a_slow_receiver_send_every_webhook_once() {
    let mut env = TestEnv::new("abusetwice").await;
    env.migrate();
    create_tenant(&env, "acme");
    let hits: Hits = Arc::default();
    // Each answer takes 5 s: 16 in a row would outlast a 60 s lease.
    let recv = receiver(hits.clone(), Duration::from_secs(5)).await;
    let n = 16;
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        sqlx::query(
            "INSERT INTO jobs (job_id, tenant, status, callback_url) VALUES ($1, 'acme', 'succeeded', $2)",
        )
        .bind(id)
        .bind(format!("http://{recv}/hook"))
        .execute(&env.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO webhook_deliveries (job_id, tenant, url, event, payload)
             VALUES ($1, 'acme', $2, 'job.completed', '{}'::jsonb)",
        )
        .bind(id)
        .bind(format!("http://{recv}/hook"))
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let started = Instant::now();
    for _ in 0..2 {
        start_gateway(&mut env, &[("RECAP_WEBHOOK_ALLOW", recv.as_str())]).await;
    }
    let delivered = env
        .wait_count(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'",
            n,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(delivered, n, "logs:\n{}", env.logs());
    // Deliveries run side by side (4 at a time per receiver), not in a row.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    // Past the old 60 s lease, nothing is sent again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hits = hits.lock().unwrap().clone();
    let mut per_delivery: HashMap<String, usize> = HashMap::new();
    for (_, d) in &hits {
        *per_delivery.entry(d.clone()).or_default() += 1;
    }
    assert_eq!(
        hits.len() as i64,
        n,
        "every delivery sent exactly once: {per_delivery:?}"
    );
    assert!(per_delivery.values().all(|&c| c == 1), "{per_delivery:?}");
    assert_eq!(env.count("SELECT count(*) FROM webhook_attempts").await, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_a_transition_with_its_event_webhook_and_released_estimate() {
    let mut env = TestEnv::new("abusecancel").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let hits: Hits = Arc::default();
    let recv = receiver(hits.clone(), Duration::ZERO).await;
    let base = start_gateway(&mut env, &[("RECAP_WEBHOOK_ALLOW", recv.as_str())]).await;
    // A router but no worker: jobs stop at `routed`, their estimates booked.
    env.spawn(&["router"], &[]);
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "events-cancel".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "events-cancel".into(),
        "recap.events".into(),
        "job.failed.acme".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let id = Uuid::new_v4();
    let res = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&acme.key)
        .json(&job_body(
            id,
            serde_json::json!({"callback_url": format!("http://{recv}/hook"), "quality": "best"}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let routed = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'routed'",
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(routed, 1, "logs:\n{}", env.logs());
    // What counts against the budget is each job's latest entry: its
    // estimate until an actual one supersedes it.
    let counting = "SELECT entry FROM usage_ledger
        WHERE entry IN ('estimate', 'actual') ORDER BY (entry = 'actual') DESC, id DESC LIMIT 1";
    let before: String = sqlx::query_scalar(counting)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(before, "estimate", "the route booked an estimate");

    let res = http
        .post(format!("{base}/v1/jobs/{id}/cancel"))
        .bearer_auth(&acme.key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let view: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        (view["status"].as_str(), view["error_code"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    let after: String = sqlx::query_scalar(counting)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        after, "actual",
        "the estimate no longer counts against the budget"
    );
    let booked: f64 =
        sqlx::query_scalar("SELECT cost_usd::float8 FROM usage_ledger WHERE entry = 'actual'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(booked, 0.0, "a cancelled job costs nothing");
    // The job.failed webhook is delivered, and the event published.
    let delivered = env
        .wait_count(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered' AND event = 'job.failed'",
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(delivered, 1, "logs:\n{}", env.logs());
    let msg = ch
        .basic_get("events-cancel".into(), Default::default())
        .await
        .unwrap()
        .expect("a job.failed event");
    let ev: serde_json::Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(
        (ev["job_id"].as_str(), ev["error_code"].as_str()),
        (Some(id.to_string().as_str()), Some("cancelled"))
    );
    // A second cancel is refused; a cancel of another tenant's job is a 404.
    let res = http
        .post(format!("{base}/v1/jobs/{id}/cancel"))
        .bearer_auth(&acme.key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 409);
    let other = create_tenant(&env, "other");
    let res = http
        .post(format!("{base}/v1/jobs/{id}/cancel"))
        .bearer_auth(&other.key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_keeps_old_keys_for_its_grace_and_one_key_can_be_revoked() {
    let mut env = TestEnv::new("abusekeys").await;
    env.migrate();
    let acme = create_tenant(&env, "acme");
    let base = start_gateway(&mut env, &[]).await;
    let http = reqwest::Client::new();
    let status = |key: String| {
        let http = http.clone();
        let url = format!("{base}/v1/jobs");
        async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let rotate = env
        .command(&["tenants", "rotate", "acme", "--grace-s", "3"])
        .output()
        .unwrap();
    assert!(
        rotate.status.success(),
        "{}",
        String::from_utf8_lossy(&rotate.stderr)
    );
    let text = String::from_utf8_lossy(&rotate.stdout).to_string();
    let new_key = text
        .lines()
        .find_map(|l| l.strip_prefix("new api key:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        status(acme.key.clone()).await,
        200,
        "the old key works during the grace"
    );
    assert_eq!(status(new_key.clone()).await, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(status(acme.key.clone()).await, 401, "and not after it");
    assert_eq!(status(new_key.clone()).await, 200);
    // Revoking one key by its prefix leaves the tenant's other keys alone.
    let second = env
        .command(&["tenants", "rotate", "acme", "--grace-s", "600"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&second.stdout).to_string();
    let third_key = text
        .lines()
        .find_map(|l| l.strip_prefix("new api key:"))
        .unwrap()
        .trim()
        .to_string();
    run_ok(&mut env.command(&["tenants", "revoke", "acme", "--key", &new_key[..10]]));
    assert_eq!(status(new_key).await, 401);
    assert_eq!(status(third_key).await, 200);
    let out = env
        .command(&["tenants", "revoke", "acme", "--key", "rk_nothing"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown prefix is an error");
}

/// Broker users made from deploy/rabbitmq/definitions.json's permissions,
/// in one test vhost under names of their own; deleted on drop.
struct RoleUsers {
    urls: HashMap<String, String>,
    names: Vec<String>,
}

impl RoleUsers {
    fn create(vhost: &str) -> RoleUsers {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/rabbitmq/definitions.json");
        let defs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let suffix = &Uuid::new_v4().simple().to_string()[..8];
        let mut users = RoleUsers {
            urls: HashMap::new(),
            names: Vec::new(),
        };
        for user in defs["users"].as_array().unwrap() {
            // Services run without management tags.
            assert_eq!(user["tags"], serde_json::json!([]), "{user}");
        }
        for p in defs["permissions"].as_array().unwrap() {
            let role = p["user"].as_str().unwrap();
            let name = format!("{role}-{suffix}");
            let password = Uuid::new_v4().simple().to_string();
            rabbitmqctl_ok(&["-q", "add_user", &name, &password]);
            users.names.push(name.clone());
            let perm = |k: &str| p[k].as_str().unwrap().to_string();
            rabbitmqctl_ok(&[
                "-q",
                "set_permissions",
                "-p",
                vhost,
                &name,
                &perm("configure"),
                &perm("write"),
                &perm("read"),
            ]);
            users.urls.insert(
                role.to_string(),
                format!("amqp://{name}:{password}@127.0.0.1:5672/{vhost}"),
            );
        }
        users
    }

    fn url(&self, role: &str) -> &str {
        self.urls
            .get(role)
            .unwrap_or_else(|| panic!("definitions.json has no {role}"))
    }
}

impl Drop for RoleUsers {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["-q", "delete_user", name])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_runs_with_only_its_broker_permissions() {
    let mut env = TestEnv::new("abuseroles").await;
    let roles = RoleUsers::create(&env.name);
    // migrate declares the topology as recap-migrate.
    run_ok(
        env.command(&["migrate"])
            .env("RECAP_AMQP_URL", roles.url("recap-migrate")),
    );
    let acme = create_tenant(&env, "acme");
    env.spawn(
        &["router"],
        &[("RECAP_AMQP_URL", roles.url("recap-router"))],
    );
    env.spawn(
        &["worker", "--tier", "compact"],
        &[("RECAP_AMQP_URL", roles.url("recap-worker"))],
    );
    let base = start_gateway(&mut env, &[("RECAP_AMQP_URL", roles.url("recap-gateway"))]).await;

    // A job through the gateway, one from a producer, and one the router
    // refuses (it dead-letters it): every role publishes and consumes.
    let via_gateway = Uuid::new_v4();
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&acme.key)
        .json(&job_body(via_gateway, serde_json::json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status().as_u16(),
        202,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let producer = lapin::Connection::connect(
        roles.url("recap-producer"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("the producer connects");
    let ch = confirm_channel(&producer).await;
    publish(
        &ch,
        "ingest",
        &job_json(Uuid::new_v4(), "acme", &["short"]),
        None,
    )
    .await;
    publish(&ch, "ingest", b"{not a job", None).await;
    env.wait_succeeded(2, Duration::from_secs(60)).await;
    let guest = env.amqp().await;
    let dead = drain_dead(&guest, 1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1, "logs:\n{}", env.logs());
    assert!(
        !env.logs().contains("ACCESS_REFUSED"),
        "a role lacks a permission it uses; logs:\n{}",
        env.logs()
    );

    // A producer writes recap.jobs and nothing else: it reads no work
    // queue and publishes no events.
    assert_read_refused(&producer, "recap.compact").await;
    let ch = confirm_channel(&producer).await;
    let forged = async {
        ch.basic_publish(
            "recap.events".into(),
            "job.completed.acme".into(),
            lapin::options::BasicPublishOptions::default(),
            b"{}",
            lapin::BasicProperties::default(),
        )
        .await?
        .await
    }
    .await;
    // The broker closes the channel (ACCESS_REFUSED); the confirm never acks.
    let acked = matches!(&forged, Ok(c) if c.is_ack());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !acked && !ch.status().connected(),
        "the producer published an event: {forged:?}"
    );
    // The gateway's user reads no queue either.
    let gateway = lapin::Connection::connect(
        roles.url("recap-gateway"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    assert_read_refused(&gateway, "recap.ingest").await;
}

/// The broker refuses this connection's user a `basic.get` on `queue`.
async fn assert_read_refused(conn: &lapin::Connection, queue: &str) {
    let taken = conn
        .create_channel()
        .await
        .unwrap()
        .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
        .await;
    assert!(
        matches!(&taken, Err(e) if format!("{e:?}").contains("ACCESS_REFUSED")),
        "read {queue}: {taken:?}"
    );
}
