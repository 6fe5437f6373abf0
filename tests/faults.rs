//! Faults: a worker killed with SIGKILL in the middle of inference, and a
//! RabbitMQ restart under load. Nothing is lost and nothing is done twice.
//! The broker restart runs on a private RabbitMQ node started by the test on
//! free ports, so it never disturbs the shared broker or other tests.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A temporary folder any user may write: the private services run as
/// their own users (rabbitmq, postgres), not as the test's root.
fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    tmp
}

/// A RabbitMQ node of the test's own: its own name, ports, data and config.
struct PrivateRabbit {
    node: String,
    port: u16,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl PrivateRabbit {
    fn new() -> PrivateRabbit {
        PrivateRabbit::with_conf("")
    }

    /// A node with extra lines in its rabbitmq.conf.
    fn with_conf(extra: &str) -> PrivateRabbit {
        use std::os::unix::fs::PermissionsExt;
        // rabbitmq-server drops to the rabbitmq user: its folder must be open to it.
        let tmp = open_tempdir();
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let node = format!(
            "recap-{}@localhost",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n{extra}"),
        )
        .unwrap();
        for f in ["enabled_plugins", "rabbitmq.conf"] {
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        PrivateRabbit {
            node,
            port,
            dir,
            _tmp: tmp,
        }
    }

    fn env(&self, c: &mut Command) {
        c.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"));
    }

    fn start(&self) {
        let mut c = Command::new("rabbitmq-server");
        c.arg("-detached");
        self.env(&mut c);
        assert!(c.status().unwrap().success(), "rabbitmq-server -detached");
        // The node must register with epmd before await_startup can reach it.
        let start = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let out = Command::new("rabbitmqctl")
                .args(["-n", &self.node, "-q", "--timeout", "60", "await_startup"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "private RabbitMQ did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn stop(&self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "-q", "stop"])
            .output();
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_nothing_and_doubles_nothing() {
    let mut env = TestEnv::new("brokerrestart").await;
    let rabbit = PrivateRabbit::new();
    rabbit.start();
    env.amqp_url = rabbit.url();
    env.migrate();
    // The whole load is queued before any consumer starts, so the restart
    // lands while most of it is still waiting, however fast the fleet runs
    // (CI once finished 2,000 jobs published one confirm at a time before
    // the restart came).
    let total = 3000i64;
    {
        let conn = env.amqp().await;
        let ch = confirm_channel(&conn).await;
        let jobs: Vec<(Uuid, Vec<u8>)> = (0..total)
            .map(|_| {
                let id = Uuid::new_v4();
                (id, job_json(id, "acme", &["short", "decisions"]))
            })
            .collect();
        publish_jobs(&ch, "ingest", &jobs).await;
        let _ = conn.close(200, "bye".into()).await;
    }
    let fast = [("RECAP_AMQP_PREFETCH", "8")];
    let router = env.spawn(&["router"], &fast);
    let worker = env.spawn(&["worker", "--tier", "compact"], &fast);
    let before = env
        .wait_count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            30,
            Duration::from_secs(60),
        )
        .await;
    rabbit.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        env.is_running(router) && env.is_running(worker),
        "processes ride out the outage"
    );
    // Read while the broker is down: nothing more can be acked now.
    let during_outage = env
        .count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        .await;
    // The fault hit mid-load: some jobs had finished, most had not.
    assert!(
        before >= 30 && during_outage < total,
        "the restart came mid-load ({before} done before, {during_outage} during, of {total})"
    );
    rabbit.start();
    env.wait_succeeded(total, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, total);
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, 2 * total);
    assert_eq!(
        env.count("SELECT count(*) FROM route_decisions").await,
        total
    );
    let conn = env.amqp().await;
    assert_eq!(queue_depth(&conn, "recap.dead").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_inference_then_the_job_completes_exactly_once() {
    let mut env = TestEnv::new("kill9").await;
    env.migrate();
    // A policy without cascade or shadow: the job stays on the compact tier.
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"kill9\"\nrules = []\n").unwrap();
    let policy = policy.to_str().unwrap().to_string();
    let vars = [
        ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
        ("RECAP_POLICY", policy.as_str()),
    ];
    env.spawn(&["router"], &vars);
    let worker = env.spawn(&["worker", "--tier", "compact"], &vars);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    publish(
        &ch,
        "ingest",
        &job_json(id, "acme", &["overview", "action_items"]),
        Some(&id.to_string()),
    )
    .await;
    // Wait until the worker is inside inference, then kill it outright.
    let start = Instant::now();
    loop {
        let running = env
            .count(&format!(
                "SELECT count(*) FROM jobs WHERE job_id = '{id}' AND status = 'running'"
            ))
            .await;
        if running == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job never started; logs:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.signal(worker, libc::SIGKILL);
    env.wait_exit(worker, Duration::from_secs(10));
    assert_eq!(
        env.count("SELECT count(*) FROM summaries").await,
        0,
        "killed before it committed"
    );
    // A new worker takes the redelivered job.
    env.spawn(&["worker", "--tier", "compact"], &vars);
    let done = env
        .wait_count(
            &format!("SELECT count(*) FROM jobs WHERE job_id = '{id}' AND status = 'succeeded'"),
            1,
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(done, 1, "logs:\n{}", env.logs());
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, 2);
    assert_eq!(
        env.count(&format!(
            "SELECT attempts::bigint FROM jobs WHERE job_id = '{id}'"
        ))
        .await,
        2
    );
    assert_eq!(queue_depth(&conn, "recap.compact").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_its_worker_every_time_ends_dead_at_the_delivery_limit() {
    let mut env = TestEnv::new("poison").await;
    // Two returns allowed: the third delivery is the broker's last.
    let config = env.dir.path().join("recap.toml");
    std::fs::write(
        &config,
        "[retry]\ndelivery_limit = 2\n[tiers.compact]\nmodel = \"smollm2-135m-instruct-q4_1\"\n",
    )
    .unwrap();
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"poison\"\nrules = []\n").unwrap();
    let (config, policy) = (
        config.to_str().unwrap().to_string(),
        policy.to_str().unwrap().to_string(),
    );
    let vars = [
        ("RECAP_CONFIG", config.as_str()),
        ("RECAP_POLICY", policy.as_str()),
    ];
    run_ok(env.command(&["migrate"]).env("RECAP_CONFIG", &config));
    env.spawn(&["router"], &vars);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    publish(
        &ch,
        "ingest",
        &job_json(id, "acme", &["overview", "action_items"]),
        Some(&id.to_string()),
    )
    .await;
    // Each worker is killed inside the job's inference: the job kills
    // its consumer every time.
    let attempts = format!("SELECT attempts::bigint FROM jobs WHERE job_id = '{id}'");
    for attempt in 1..=2i64 {
        let worker = env.spawn(&["worker", "--tier", "compact"], &vars);
        let started = env
            .wait_count(
                &format!(
                    "SELECT count(*) FROM jobs WHERE job_id = '{id}' AND attempts >= {attempt}"
                ),
                1,
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(
            started,
            1,
            "try {attempt} never started; logs:\n{}",
            env.logs()
        );
        env.signal(worker, libc::SIGKILL);
        env.wait_exit(worker, Duration::from_secs(10));
    }
    // The next worker gets the broker's last delivery and ends the job
    // instead of running it into a third death.
    let worker = env.spawn(&["worker", "--tier", "compact"], &vars);
    let dead = drain_dead(&conn, 1, Duration::from_secs(60)).await;
    assert_eq!(dead.len(), 1, "logs:\n{}", env.logs());
    assert_eq!(dead[0].reason, "delivery_limit", "{}", dead[0].detail);
    assert!(
        dead[0].detail.contains("delivered 3 times"),
        "{}",
        dead[0].detail
    );
    let (status, code): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_code FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), code.as_deref()),
        ("dead", Some("delivery_limit"))
    );
    assert_eq!(
        env.count(&attempts).await,
        2,
        "the last delivery was not run"
    );
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, 0);
    assert!(env.is_running(worker), "the worker lives on");
    env.wait_drained(&["recap.compact"], Duration::from_secs(10))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_makes_the_model_fail_is_retried_with_backoff_then_dead_with_its_reason() {
    let mut env = TestEnv::new("modelfail").await;
    let config = env.dir.path().join("recap.toml");
    // One second of inference is not enough for SmolLM2 on this job: every
    // try ends in deadline_exceeded.
    std::fs::write(
        &config,
        "[retry]\nmax_attempts = 3\nbackoff_ms = [300, 600]\n[worker]\njob_deadline_s = 1\n[tiers.compact]\nmodel = \"smollm2-135m-instruct-q4_1\"\n",
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_string();
    run_ok(env.command(&["migrate"]).env("RECAP_CONFIG", &cfg));
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"t\"\nrules = []\n").unwrap();
    let vars = [
        ("RECAP_CONFIG", cfg.as_str()),
        ("RECAP_POLICY", policy.to_str().unwrap()),
    ];
    env.spawn(&["router"], &vars);
    let worker = env.spawn(&["worker", "--tier", "compact"], &vars);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    publish_long_job(&ch, id, 20, &["overview", "action_items", "decisions"]).await;
    let dead = drain_dead(&conn, 1, Duration::from_secs(120)).await;
    assert_eq!(dead.len(), 1, "logs:\n{}", env.logs());
    assert_eq!(dead[0].reason, "deadline_exceeded", "{}", dead[0].detail);
    assert!(
        dead[0].detail.contains("after 3 attempts"),
        "{}",
        dead[0].detail
    );
    let (status, code, attempts): (String, Option<String>, i32) =
        sqlx::query_as("SELECT status, error_code, attempts FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), code.as_deref(), attempts),
        ("dead", Some("deadline_exceeded"), 3)
    );
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, 0);
    assert!(env.is_running(worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_brokers_consumer_timeout_is_cut_by_its_deadline_first() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let mut env = TestEnv::new("consumertimeout").await;
    // A broker that times out unacknowledged deliveries after 12 s.
    let rabbit = PrivateRabbit::with_conf("consumer_timeout = 12000\n");
    rabbit.start();
    env.amqp_url = rabbit.url();
    // The worker's configuration: two tries, 300 ms apart (migrate declares
    // the delay queue for it).
    let config = env.dir.path().join("recap.toml");
    std::fs::write(&config, "[retry]\nmax_attempts = 2\nbackoff_ms = [300]\n").unwrap();
    let out = env
        .command(&["migrate"])
        .env("RECAP_CONFIG", &config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Control: the timeout bites. A consumer that holds a delivery past it has
    // its channel closed by the broker.
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "control".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    ch.basic_publish(
        "".into(),
        "control".into(),
        lapin::options::BasicPublishOptions::default(),
        b"held",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "control".into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let held = consumer
        .next()
        .await
        .expect("a delivery")
        .expect("delivery ok");
    assert_eq!(held.data, b"held");
    let start = Instant::now();
    while ch.status().connected() && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed_after = start.elapsed();
    assert!(
        !ch.status().connected(),
        "the broker closed the holder's channel"
    );
    assert!(closed_after >= Duration::from_secs(11), "{closed_after:?}");

    // A worker whose deadline could outlast the timeout refuses to start.
    let out = env
        .command(&["worker", "--tier", "compact"])
        .env("RECAP_AMQP_CONSUMER_TIMEOUT_S", "12")
        .env("RECAP_JOB_DEADLINE_S", "900")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("worker.job_deadline_s") && stderr.contains("consumer_timeout"),
        "{stderr}"
    );

    // A worker configured for this broker: a job that would run far longer
    // than 12 s is cut by its 3 s deadline on every try, retried, then dead
    // with its reason; the broker never times the worker out.
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"t\"\nrules = []\n").unwrap();
    let vars = [
        ("RECAP_CONFIG", config.to_str().unwrap()),
        ("RECAP_POLICY", policy.to_str().unwrap()),
        ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
        ("RECAP_AMQP_CONSUMER_TIMEOUT_S", "12"),
        ("RECAP_JOB_DEADLINE_S", "3"),
    ];
    env.spawn(&["router"], &vars);
    let worker = env.spawn(&["worker", "--tier", "compact"], &vars);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let id = Uuid::new_v4();
    // About 1,000 tokens and four kinds: 16 s of work for SmolLM2 in a
    // release build on 2 cores, longer than the broker's 12 s. One prefill
    // takes about 3 s (more with the other tests beside it) and is not
    // interruptible; the 3 s deadline is checked between decoded tokens.
    publish_long_job(
        &ch,
        id,
        60,
        &["overview", "action_items", "decisions", "short"],
    )
    .await;
    let dead = drain_dead(&conn, 1, Duration::from_secs(180)).await;
    assert_eq!(dead.len(), 1, "logs:\n{}", env.logs());
    assert_eq!(dead[0].reason, "deadline_exceeded", "{}", dead[0].detail);
    let attempts = env
        .count(&format!(
            "SELECT attempts::bigint FROM jobs WHERE job_id = '{id}'"
        ))
        .await;
    assert_eq!(attempts, 2, "no try was lost to a broker timeout");
    assert!(env.is_running(worker));
    let logs = env.logs();
    assert!(
        !logs.contains("consumer stream ended") && !logs.contains("PRECONDITION_FAILED"),
        "the broker never closed the worker's channel:\n{logs}"
    );
}

/// Publishes a job of `lines` utterances asking for `kinds`: long enough
/// that SmolLM2 needs many seconds for it.
async fn publish_long_job(ch: &lapin::Channel, id: Uuid, lines: usize, kinds: &[&str]) {
    let long: String = (0..lines)
        .map(|i| format!("Alice: point number {i} about the launch plan and the budget.\n"))
        .collect();
    let mut v: serde_json::Value =
        serde_json::from_slice(&job_json(id, "acme", kinds)).expect("job json");
    v["transcript"] = serde_json::json!(long);
    publish(
        ch,
        "ingest",
        &serde_json::to_vec(&v).expect("json"),
        Some(&id.to_string()),
    )
    .await;
}

/// A PostgreSQL cluster of the test's own, on a free port.
struct PrivatePostgres {
    port: u16,
    data: PathBuf,
    _tmp: tempfile::TempDir,
}

impl PrivatePostgres {
    fn new() -> PrivatePostgres {
        // initdb refuses root: the cluster belongs to the postgres user.
        let tmp = open_tempdir();
        let data = tmp.path().join("data");
        let out = Command::new("runuser")
            .args([
                "-u", "postgres", "--", "initdb", "-A", "trust", "-U", "postgres", "-D",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PrivatePostgres {
            port: free_port(),
            data,
            _tmp: tmp,
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.data.parent().unwrap().display()
        );
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--", "pg_ctl", "-D"])
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(self.data.parent().unwrap().join("pg.log"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        self.pg_ctl(&["-w", "start"]);
    }

    fn stop(&self) {
        self.pg_ctl(&["-w", "-m", "fast", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", "pg_ctl", "-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

async fn readyz(addr: &str) -> Option<u16> {
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    Some(res.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_seconds_under_load_loses_nothing() {
    let mut env = TestEnv::new("pgdown").await;
    let pg = PrivatePostgres::new();
    pg.start();
    env.db_url = pg.url();
    env.pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.db_url)
        .await
        .unwrap();
    env.migrate();
    let addr = format!("127.0.0.1:{}", free_port());
    let fast = [("RECAP_AMQP_PREFETCH", "4")];
    env.spawn(&["router"], &fast);
    let w = env.spawn(
        &["worker", "--tier", "compact"],
        &[
            ("RECAP_AMQP_PREFETCH", "4"),
            ("RECAP_METRICS_LISTEN", &addr),
        ],
    );
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let total = 1500i64;
    let first_half: Vec<(Uuid, Vec<u8>)> = (0..total / 2)
        .map(|_| {
            let id = Uuid::new_v4();
            (id, job_json(id, "acme", &["short"]))
        })
        .collect();
    publish_jobs(&ch, "ingest", &first_half).await;
    env.wait_count(
        "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
        50,
        Duration::from_secs(60),
    )
    .await;
    let before = env
        .count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        .await;
    pg.stop();
    // The fault hits mid-load: some jobs had finished, some had not.
    assert!(
        (50..total / 2).contains(&before),
        "the outage came mid-load ({before} of {} done)",
        total / 2
    );
    // Load keeps coming while the database is away.
    for _ in 0..total / 2 {
        let id = Uuid::new_v4();
        publish(
            &ch,
            "ingest",
            &job_json(id, "acme", &["short"]),
            Some(&id.to_string()),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        readyz(&addr).await,
        Some(503),
        "readiness turns false while the database is down"
    );
    tokio::time::sleep(Duration::from_secs(27)).await;
    assert!(env.is_running(w));
    pg.start();
    env.pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.db_url)
        .await
        .unwrap();
    env.wait_succeeded(total, Duration::from_secs(240)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, total);
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, total);
    assert_eq!(
        queue_depth(&conn, "recap.dead").await,
        0,
        "nothing was dead-lettered by the outage"
    );
    assert_eq!(readyz(&addr).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_turns_unready_first_and_finishes_in_flight_work() {
    let mut env = TestEnv::new("graceful").await;
    env.migrate();
    let policy = env.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = \"g\"\nrules = []\n").unwrap();
    let policy = policy.to_str().unwrap().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let vars = [
        ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
        ("RECAP_POLICY", policy.as_str()),
    ];
    env.spawn(&["router"], &vars);
    let w = env.spawn(
        &["worker", "--tier", "compact"],
        &[vars[0], vars[1], ("RECAP_METRICS_LISTEN", addr.as_str())],
    );
    let start = Instant::now();
    while readyz(&addr).await != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "worker never ready; logs:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    // Long enough that the job is still in flight when the signal comes.
    for id in &ids {
        publish_long_job(&ch, *id, 40, &["overview", "action_items"]).await;
    }
    while env
        .count("SELECT count(*) FROM jobs WHERE status = 'running'")
        .await
        == 0
    {
        assert!(start.elapsed() < Duration::from_secs(120), "no job started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.signal(w, libc::SIGTERM);
    // Not ready while the in-flight job drains; the process still answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        readyz(&addr).await,
        Some(503),
        "readiness turns false first"
    );
    assert!(env.is_running(w), "still draining the in-flight job");
    assert_eq!(env.wait_exit(w, Duration::from_secs(120)), Some(0));
    // The job in flight finished; the others stayed queued for the next worker.
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'running'")
            .await,
        0
    );
    let finished = env
        .count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        .await;
    assert!(finished >= 1, "the in-flight job finished before exit");
    env.spawn(&["worker", "--tier", "compact"], &vars);
    env.wait_succeeded(3, Duration::from_secs(240)).await;
    assert_eq!(env.count("SELECT count(*) FROM summaries").await, 6);
}
