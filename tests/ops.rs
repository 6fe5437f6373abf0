//! The dashboards and alerts, tested for real: promtool checks the rules and
//! the Compose scrape config, then a real Prometheus scrapes a running
//! gateway, router and worker and RabbitMQ's prometheus plugin while jobs go
//! through, and every PromQL expression of the Grafana dashboard and of the
//! alert rules is evaluated through Prometheus' HTTP API. Each must parse
//! and return a series, or be a documented zero; a query that names a
//! metric nobody exports fails.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

const DASHBOARD: &str = include_str!("../deploy/grafana/dashboards/recap.json");
const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yml");
const METRICS_RS: &str = include_str!("../workers/service/src/metrics.rs");

/// Expressions allowed to be empty in this run, and why (see deploy/grafana/README.md).
const DOCUMENTED_ZERO: [(&str, &str); 8] = [
    (
        "recap_cascades_total",
        "the extractive engine never cascades",
    ),
    ("recap_model_load_failures_total", "every model loads"),
    (
        "RecapBacklogGrowing",
        "alert condition: no backlog in a healthy run",
    ),
    ("RecapHighErrorRatio", "alert condition: no failed jobs"),
    (
        "RecapBudgetNearlySpent",
        "alert condition: the budget is far from spent",
    ),
    (
        "RecapNoReadyWorkers",
        "alert condition: the worker is ready",
    ),
    (
        "RecapWorkersAbsent",
        "alert condition: a compact worker reports",
    ),
    (
        "recap_generation_tokens_per_second",
        "the extractive engine has no decode phase",
    ),
];

fn tool(name: &str) {
    assert!(
        Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "{name} is missing: scripts/test installs Debian's prometheus package"
    );
}

fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        if (rest.starts_with("recap_") || rest.starts_with("rabbitmq_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_works_against_a_real_prometheus() {
    tool("promtool");
    tool("prometheus");
    let mut env = TestEnv::new("ops").await;
    env.migrate();
    let dir = env.dir.path().to_path_buf();

    // promtool: the rules, and the Compose config with its rule file path.
    let alerts = dir.join("alerts.yml");
    std::fs::write(&alerts, ALERTS).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&alerts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let compose_cfg = include_str!("../deploy/prometheus/prometheus.yml")
        .replace("/etc/prometheus/alerts.yml", alerts.to_str().unwrap());
    std::fs::write(dir.join("compose-prometheus.yml"), compose_cfg).unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.join("compose-prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check config: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The fleet, each process with its own metrics port.
    let create = env
        .command(&["tenants", "create", "acme"])
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&create.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("api key:").map(|k| k.trim().to_string()))
        .expect("api key");
    let budget = env
        .command(&["budget", "set", "acme", "--daily", "100"])
        .output()
        .unwrap();
    assert!(budget.status.success());
    // The gateway serves its API on one port and its metrics on another.
    let (gw, router, worker) = (free_port(), free_port(), free_port());
    let gw_addr = free_addr();
    env.spawn(
        &["gateway"],
        &[
            ("RECAP_GATEWAY_LISTEN", &gw_addr),
            ("RECAP_METRICS_LISTEN", &format!("127.0.0.1:{gw}")),
        ],
    );
    env.spawn(
        &["router"],
        &[("RECAP_METRICS_LISTEN", &format!("127.0.0.1:{router}"))],
    );
    env.spawn(
        &["worker", "--tier", "compact"],
        &[("RECAP_METRICS_LISTEN", &format!("127.0.0.1:{worker}"))],
    );

    let prom_port = free_port();
    let config = format!(
        r#"
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{}"]
scrape_configs:
  - job_name: recap
    static_configs: [{{targets: ["127.0.0.1:{gw}", "127.0.0.1:{router}", "127.0.0.1:{worker}"]}}]
  - job_name: rabbitmq
    metrics_path: /metrics/per-object
    static_configs: [{{targets: ["127.0.0.1:15692"]}}]
"#,
        alerts.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut prom);
    let http = reqwest::Client::new();
    let query = |q: String| {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
                .query(&[("query", q.as_str())])
                .send()
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        }
    };

    // Jobs through the gateway and a poison one straight to the broker.
    for _ in 0..50 {
        if reqwest::get(format!("http://{gw_addr}/healthz"))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..6 {
        let body = serde_json::json!({
            "job_id": Uuid::new_v4(),
            "transcript": "Alice: We agreed to ship on Friday.\nBob: I'll update the roadmap.",
            "summaries": ["short", "decisions"],
            "quality": if i == 0 { "best" } else { "balanced" },
        });
        let res = http
            .post(format!("http://{gw_addr}/v1/jobs"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 202);
    }
    let conn = env.amqp().await;
    publish(&confirm_channel(&conn).await, "ingest", b"not json", None).await;
    env.wait_count(
        "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
        5,
        Duration::from_secs(30),
    )
    .await;

    // Wait until Prometheus has several scrapes of every target.
    let mut ok = false;
    for _ in 0..60 {
        if let Some(v) =
            query("count(up == 1) >= 4 and count(count_over_time(up[1m])) >= 4".into()).await
        {
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ok,
        "Prometheus never scraped all targets; logs:\n{}",
        env.logs()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Every expression: dashboard panels, then alert rules.
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    let mut alert_name = String::new();
    for line in ALERTS.lines() {
        let l = line.trim();
        if let Some(n) = l.strip_prefix("- alert:") {
            alert_name = n.trim().to_string();
        } else if let Some(e) = l.strip_prefix("expr:") {
            exprs.push((alert_name.clone(), e.trim().to_string()));
        }
    }
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    let mut failures = Vec::new();
    for (name, expr) in &exprs {
        for metric in metric_names(expr) {
            let base = metric
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            let known = if base.starts_with("recap_") {
                METRICS_RS.contains(&format!("\"{base}\""))
            } else {
                query(format!("count({{__name__=\"{base}\"}})"))
                    .await
                    .is_some_and(|v| !v["data"]["result"].as_array().unwrap().is_empty())
            };
            if !known {
                failures.push(format!("{name}: `{base}` is exported by nobody"));
            }
        }
        let v = query(expr.clone()).await.unwrap_or_default();
        if v["status"] != "success" {
            failures.push(format!("{name}: `{expr}` does not evaluate: {v}"));
            continue;
        }
        let empty = v["data"]["result"].as_array().is_none_or(|r| r.is_empty());
        let documented = DOCUMENTED_ZERO
            .iter()
            .any(|(k, _)| name == k || expr.contains(k));
        if empty && !documented {
            failures.push(format!("{name}: `{expr}` returned no series"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // And one alert really fires: the poison message sits in recap.dead.
    let dead = query("sum(rabbitmq_queue_messages{queue=\"recap.dead\"}) > 0".into())
        .await
        .unwrap();
    assert!(
        !dead["data"]["result"].as_array().unwrap().is_empty(),
        "{dead}"
    );
}
