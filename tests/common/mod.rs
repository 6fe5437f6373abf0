//! The integration-test harness: every test gets its own PostgreSQL
//! database and its own RabbitMQ vhost on the real services, starts the real
//! `recap` binary, and talks to it only through the broker and the database.
#![allow(dead_code)]

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const AMQP_BASE: &str = "amqp://guest:guest@127.0.0.1:5672";
pub const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432";

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A run's success and its stdout and stderr together.
pub fn outcome(out: std::io::Result<std::process::Output>) -> (bool, String) {
    let out = out.expect("run recap");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_recap"))
}

/// A private database and vhost, dropped with the value.
pub struct TestEnv {
    pub name: String,
    pub amqp_url: String,
    pub db_url: String,
    pub pool: PgPool,
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (RabbitMQ is installed by scripts/test)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command that must succeed; its output, or a failure showing the
/// command and its stderr.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `rabbitmqctl` with `args`, which must succeed (users, permissions).
pub fn rabbitmqctl_ok(args: &[&str]) {
    rabbitmqctl(args)
}

impl TestEnv {
    pub async fn new(test: &str) -> TestEnv {
        let name = format!(
            "recap_{}_{}",
            test,
            &Uuid::new_v4().simple().to_string()[..10]
        );
        rabbitmqctl(&["-q", "add_vhost", &name]);
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            &name,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{PG_BASE}/postgres"))
            .await
            .expect("PostgreSQL answers on 127.0.0.1:5432");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let db_url = format!("{PG_BASE}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await
            .expect("connect test database");
        TestEnv {
            amqp_url: format!("{AMQP_BASE}/{name}"),
            db_url,
            pool,
            name,
            dir: tempfile::tempdir().expect("temp dir"),
            children: Vec::new(),
        }
    }

    /// A `recap` command with this environment's broker and database.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .env("RECAP_AMQP_URL", &self.amqp_url)
            .env("RECAP_DATABASE_URL", &self.db_url)
            .env("RECAP_METRICS_LISTEN", "")
            // Test brokers run as guest/guest: development credentials.
            .env("RECAP_ALLOW_DEV_CREDENTIALS", "1")
            .env("RECAP_LOG", "warn")
            .env_remove("RECAP_CONFIG")
            .stdin(Stdio::null());
        c
    }

    pub fn migrate(&self) {
        run_ok(&mut self.command(&["migrate"]));
    }

    /// Starts a long-running `recap` process, killed when the env drops.
    pub fn spawn(&mut self, args: &[&str], env: &[(&str, &str)]) -> usize {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let log = std::fs::File::create(self.dir.path().join(format!(
            "{}-{}.log",
            args.join("_"),
            self.children.len()
        )))
        .expect("log file");
        c.stdout(Stdio::null()).stderr(log);
        self.children.push(c.spawn().expect("start recap"));
        self.children.len() - 1
    }

    pub fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i]
    }

    pub fn pid(&self, i: usize) -> i32 {
        self.children[i].id() as i32
    }

    pub fn signal(&self, i: usize, sig: i32) {
        // SAFETY: kill(2) on a child we started; no memory is involved.
        unsafe {
            libc::kill(self.pid(i), sig);
        }
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        matches!(self.children[i].try_wait(), Ok(None))
    }

    /// Waits for a child to exit and returns its exit code.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.children[i].try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                out.push_str(&format!("--- {}\n", e.file_name().to_string_lossy()));
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    pub async fn amqp(&self) -> Connection {
        Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .expect("connect to the test vhost")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .expect("count query")
            .get::<i64, _>(0)
    }

    /// Messages in this vhost's `queue` as the broker counts them:
    /// (ready, delivered but not yet acknowledged).
    pub fn queue_counts(&self, queue: &str) -> (u64, u64) {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "-p", &self.name, "--no-table-headers"])
            .args(["name", "messages_ready", "messages_unacknowledged"])
            .output()
            .expect("rabbitmqctl runs");
        assert!(out.status.success(), "rabbitmqctl list_queues failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let row = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() == 3 && f[0] == queue)
            .unwrap_or_else(|| panic!("no queue {queue} in {text}"));
        (
            row[1].parse().expect("a count"),
            row[2].parse().expect("a count"),
        )
    }

    /// Waits until each queue holds nothing, ready or unacknowledged, so
    /// that every copy has been taken and settled; fails after `timeout`.
    pub async fn wait_drained(&self, queues: &[&str], timeout: Duration) {
        let start = Instant::now();
        loop {
            let counts: Vec<(u64, u64)> = queues.iter().map(|q| self.queue_counts(q)).collect();
            if counts.iter().all(|c| *c == (0, 0)) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{queues:?} still hold (ready, unacked) {counts:?} after {timeout:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls `sql` (a count) until it reaches `want`; returns the last value.
    pub async fn wait_count(&self, sql: &str, want: i64, timeout: Duration) -> i64 {
        let start = Instant::now();
        loop {
            let n = self.count(sql).await;
            if n >= want || start.elapsed() > timeout {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until exactly `want` jobs have succeeded, failing the test with
    /// the processes' logs if that does not happen in time.
    pub async fn wait_succeeded(&self, want: i64, timeout: Duration) {
        let done = self
            .wait_count(
                "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
                want,
                timeout,
            )
            .await;
        assert_eq!(done, want, "logs:\n{}", self.logs());
    }

    /// A job's `summaries` rows, by kind: (kind, engine, model, text,
    /// input_tokens, output_tokens).
    pub async fn summary_rows(
        &self,
        job_id: Uuid,
    ) -> Vec<(String, String, String, String, i32, i32)> {
        sqlx::query_as(
            "SELECT kind, engine, model, text, input_tokens, output_tokens FROM summaries WHERE job_id = $1 ORDER BY kind",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await
        .expect("summaries rows")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

pub async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    ch
}

/// Publishes raw bytes the way a producer would: persistent, JSON, confirmed.
pub async fn publish(ch: &Channel, routing_key: &str, body: &[u8], message_id: Option<&str>) {
    let confirm = send(ch, routing_key, body, message_id).await;
    check_confirmed(confirm, routing_key).await;
}

/// Publishes many jobs with pipelined confirms (all sent, then all awaited):
/// a load test's backlog goes in at broker speed, not at one round trip each.
pub async fn publish_jobs(ch: &Channel, routing_key: &str, jobs: &[(Uuid, Vec<u8>)]) {
    let mut confirms = Vec::with_capacity(jobs.len());
    for (id, body) in jobs {
        confirms.push(send(ch, routing_key, body, Some(&id.to_string())).await);
    }
    for confirm in confirms {
        check_confirmed(confirm, routing_key).await;
    }
}

async fn send(
    ch: &Channel,
    routing_key: &str,
    body: &[u8],
    message_id: Option<&str>,
) -> lapin::PublisherConfirm {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    ch.basic_publish(
        "recap.jobs".into(),
        routing_key.into(),
        BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        },
        body,
        props,
    )
    .await
    .expect("publish")
}

async fn check_confirmed(confirm: lapin::PublisherConfirm, routing_key: &str) {
    let confirm = confirm.await.expect("confirm");
    assert!(confirm.is_ack(), "broker nacked the publish");
    assert!(
        confirm.take_message().is_none(),
        "publish to {routing_key} was unroutable"
    );
}

pub fn job_json(job_id: Uuid, tenant: &str, kinds: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "version": 1,
        "job_id": job_id,
        "tenant": tenant,
        "transcript": [
            {"speaker": "Alice", "text": "Welcome. Today we plan the Q3 launch."},
            {"speaker": "Bob", "text": "We agreed to move the launch to Friday."},
            {"speaker": "Alice", "text": "I'll update the roadmap and tell marketing."},
            {"speaker": "Carol", "text": "Budget is approved for two more contractors."}
        ],
        "summaries": kinds,
        "quality": "balanced"
    }))
    .expect("json")
}

/// A dead letter: its reason header and body.
pub struct DeadLetter {
    pub reason: String,
    pub detail: String,
    pub body: Vec<u8>,
}

fn header(h: &FieldTable, key: &str) -> String {
    match h.inner().get(key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
        _ => String::new(),
    }
}

/// Takes up to `want` messages from recap.dead, waiting up to `timeout`.
pub async fn drain_dead(conn: &Connection, want: usize, timeout: Duration) -> Vec<DeadLetter> {
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < want && start.elapsed() < timeout {
        match ch
            .basic_get("recap.dead".into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            Some(msg) => {
                let d = msg.delivery;
                let h = d.properties.headers().clone().unwrap_or_default();
                out.push(DeadLetter {
                    reason: header(&h, "x-recap-reason"),
                    detail: header(&h, "x-recap-detail"),
                    body: d.data.clone(),
                });
                d.ack(BasicAckOptions::default()).await.expect("ack");
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    out
}

/// Messages waiting in a queue (declared passively).
pub async fn queue_depth(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    q.message_count()
}

pub struct Tenant {
    pub key: String,
    pub secret: String,
}

pub fn create_tenant(env: &TestEnv, name: &str) -> Tenant {
    let out = env
        .command(&["tenants", "create", name])
        .output()
        .expect("run recap tenants create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {label} in {text}"))
    };
    Tenant {
        key: field("api key:"),
        secret: field("webhook secret:"),
    }
}

pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

pub async fn start_gateway(env: &mut TestEnv, extra: &[(&str, &str)]) -> String {
    let addr = free_addr();
    let mut vars = vec![("RECAP_GATEWAY_LISTEN", addr.as_str())];
    vars.extend_from_slice(extra);
    env.spawn(&["gateway"], &vars);
    let base = format!("http://{addr}");
    for _ in 0..100 {
        if reqwest::get(format!("{base}/healthz")).await.is_ok() {
            return base;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway did not start; logs:\n{}", env.logs());
}

pub fn job_body(id: Uuid, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({
        "job_id": id,
        "transcript": [
            {"speaker": "Alice", "text": "We agreed to ship on Friday."},
            {"speaker": "Bob", "text": "I'll update the roadmap."}
        ],
        "summaries": ["short"]
    });
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

/// The text a process serves at `/metrics`.
pub async fn scrape(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("metrics endpoint answers")
        .text()
        .await
        .expect("metrics body")
}

/// The sum of every sample of `name` whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let has = |k: &str, v: &str| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
            if labels.iter().all(|(k, v)| has(k, v)) {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// Writes, in `dir`, a policy that also runs every job on the large tier as
/// a shadow (and nothing else), and returns its path.
pub fn shadow_every_job_policy(dir: &std::path::Path) -> std::path::PathBuf {
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "version = \"shadow-all\"\nrules = [\"shadow\"]\n[shadow]\nrate = 1.0\nseed = 1\n",
    )
    .expect("write the policy");
    policy
}
