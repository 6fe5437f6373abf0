//! Configuration: one TOML file (`RECAP_CONFIG` or `--config`), then
//! environment overrides, then validation. A bad value stops the process
//! with a message that names the key; nothing starts half-configured.

use recap_job::Limits;
use recap_policy::Tier;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`{env}: {message}")]
    Invalid {
        key: String,
        env: String,
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    let env = ENV_OVERRIDES
        .iter()
        .find(|(_, k)| *k == key)
        .map(|(e, _)| format!(" (env {e})"))
        .unwrap_or_default();
    ConfigError::Invalid {
        key: key.to_string(),
        env,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub database: DatabaseConfig,
    pub limits: Limits,
    pub retry: RetryConfig,
    pub worker: WorkerConfig,
    pub models: ModelsConfig,
    pub tiers: BTreeMap<String, TierConfig>,
    pub metrics: MetricsConfig,
    pub policy: PolicySection,
    pub gateway: GatewayConfig,
    pub router: RouterConfig,
    pub budgets: BudgetsConfig,
}

/// The budget of every tenant that has none of its own (`recap budget set`
/// gives one its own). `inf` is no limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetsConfig {
    pub default_daily_usd: f64,
    pub default_monthly_usd: f64,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        BudgetsConfig {
            default_daily_usd: 100.0,
            default_monthly_usd: 2000.0,
        }
    }
}

impl BudgetsConfig {
    pub fn defaults(&self) -> crate::store::DefaultBudget {
        let limit = |v: f64| v.is_finite().then_some(v);
        crate::store::DefaultBudget {
            daily_usd: limit(self.default_daily_usd),
            monthly_usd: limit(self.default_monthly_usd),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Most ingest deliveries routed together: one commit for their
    /// decisions, one round of confirms for their tier publishes. Only
    /// deliveries already waiting are batched (never more than
    /// `amqp.prefetch`); a lone job is not held back.
    pub batch_size: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig { batch_size: 128 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: String,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Requests per second per tenant (token bucket), and the burst.
    pub rate_per_s: f64,
    pub burst: f64,
    /// Requests per second per client address, counted before the API key
    /// is looked up (so that floods of bad keys do not reach PostgreSQL),
    /// and the burst.
    pub client_rate_per_s: f64,
    pub client_burst: f64,
    /// Seconds a client has to send a request's headers (slowloris).
    pub header_timeout_s: u64,
    /// Seconds a whole request may take, its body included (a trickled body).
    pub request_timeout_s: u64,
    /// Requests handled at once; connections beyond it wait.
    pub max_concurrent_requests: usize,
    /// Open connections at once; more are accepted only as others close.
    pub max_connections: usize,
    /// Hosts (`host` or `host:port`) that webhooks may reach over plain
    /// http and at non-public addresses: test receivers and development
    /// only. Every other callback must be https to a public address.
    pub webhook_allow: Vec<String>,
}

impl GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes < 1024 {
            return Err(invalid("gateway.max_body_bytes", "must be at least 1024"));
        }
        for (key, rate, burst) in [
            ("gateway.rate_per_s", self.rate_per_s, self.burst),
            (
                "gateway.client_rate_per_s",
                self.client_rate_per_s,
                self.client_burst,
            ),
        ] {
            if rate.is_nan() || rate <= 0.0 || burst.is_nan() || burst < 1.0 {
                return Err(invalid(key, "rate must be above 0 and burst at least 1"));
            }
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "gateway.listen",
                format!("must be HOST:PORT, got {:?}", self.listen),
            ));
        }
        for (key, v) in [
            ("gateway.header_timeout_s", self.header_timeout_s),
            ("gateway.request_timeout_s", self.request_timeout_s),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, format!("must be 1-3600 seconds, got {v}")));
            }
        }
        for (key, v) in [
            (
                "gateway.max_concurrent_requests",
                self.max_concurrent_requests,
            ),
            ("gateway.max_connections", self.max_connections),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return Err(invalid(key, format!("must be 1-1000000, got {v}")));
            }
        }
        crate::webhooks::egress::AllowList::parse(&self.webhook_allow)
            .map_err(|e| invalid("gateway.webhook_allow", e))?;
        Ok(())
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            rate_per_s: 50.0,
            burst: 200.0,
            client_rate_per_s: 100.0,
            client_burst: 400.0,
            header_timeout_s: 10,
            request_timeout_s: 30,
            max_concurrent_requests: 512,
            max_connections: 4096,
            webhook_allow: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// The cost policy file (TOML); default: the shipped config/policy.toml.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub url: String,
    /// Unacked deliveries per consumer: with `batches_in_flight` x the batch
    /// size, it bounds the jobs a process works on at once.
    pub prefetch: u16,
    /// Batches a consumer works on at once. While that many are in flight,
    /// new deliveries wait in the prefetch window and the next batch takes
    /// them together: under load, batches fill (prefetch >= (this + 1) x
    /// batch size keeps them full); a lone delivery still goes at once.
    pub batches_in_flight: u16,
    /// The broker's delivery acknowledgement timeout (RabbitMQ's
    /// `consumer_timeout`, 30 min by default), in seconds. recap asks for it
    /// per consumer (`x-consumer-timeout`, honoured by RabbitMQ 3.12 and
    /// later; older brokers need `consumer_timeout` in rabbitmq.conf), and
    /// keeps every delivery's hold under it: the job deadline must end at
    /// least 30 s before it, and a database outage is waited out only
    /// until then.
    pub consumer_timeout_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries a job gets (the first included) before it is dead-lettered.
    pub max_attempts: u32,
    /// Delay before each retry, in milliseconds; the last repeats.
    pub backoff_ms: Vec<u64>,
    /// Redeliveries (crashed consumer, requeue) before RabbitMQ dead-letters a
    /// message by itself: the guard against poison messages that kill workers.
    pub delivery_limit: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// How long a stopping process waits for in-flight jobs before it
    /// cancels them (they are requeued, not lost).
    pub shutdown_grace_s: u64,
    /// Longest a single job's inference may run.
    pub job_deadline_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Where weights are cached; default `$XDG_CACHE_HOME/recap/models`.
    pub dir: Option<PathBuf>,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// Threads for CPU inference; 0 means all cores.
    pub threads: usize,
    /// Most tokens (prompt and output) one model call may use; longer
    /// transcripts are chunked. Smaller is faster on CPU.
    pub max_context: usize,
    /// A TOML file of the user's own catalog entries (the built-in
    /// catalog's schema), merged over the built-in ones.
    pub catalog: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Catalog id of the model this tier's workers load.
    pub model: String,
    /// Most waiting jobs a worker of this tier takes together (N): one
    /// batched forward pass where the engine supports it, one commit, one
    /// round of confirms. The batch shares one deadline. Needs
    /// `amqp.prefetch` >= N to ever fill.
    #[serde(default = "one")]
    pub batch_size: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the /metrics, /healthz and /readyz listener; empty disables it.
    pub listen: String,
}

impl Default for Config {
    fn default() -> Self {
        let mut tiers = BTreeMap::new();
        tiers.insert(
            "compact".to_string(),
            TierConfig {
                model: "extractive-lead".into(),
                batch_size: 1,
            },
        );
        tiers.insert(
            "large".to_string(),
            TierConfig {
                model: "extractive-lead".into(),
                batch_size: 1,
            },
        );
        Config {
            amqp: AmqpConfig::default(),
            database: DatabaseConfig::default(),
            limits: Limits::default(),
            retry: RetryConfig::default(),
            worker: WorkerConfig::default(),
            models: ModelsConfig::default(),
            tiers,
            metrics: MetricsConfig::default(),
            policy: PolicySection::default(),
            gateway: GatewayConfig::default(),
            router: RouterConfig::default(),
            budgets: BudgetsConfig::default(),
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefetch: 1,
            batches_in_flight: 2,
            consumer_timeout_s: 1800,
        }
    }
}

impl AmqpConfig {
    /// Slack between a job's deadline and the broker's consumer timeout, for
    /// the commit, the ack or the dead-lettering: a quarter of the timeout,
    /// at most 30 s.
    pub fn consumer_timeout_margin_s(&self) -> u64 {
        (self.consumer_timeout_s / 4).min(30)
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/recap".into(),
            max_connections: 8,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            backoff_ms: vec![1_000, 10_000, 60_000],
            delivery_limit: 5,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            shutdown_grace_s: 60,
            job_deadline_s: 900,
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: None,
            device: "cpu".into(),
            threads: 0,
            max_context: 4096,
            catalog: None,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

/// Largest batch a consumer takes (router or tier).
pub const MAX_BATCH: usize = 256;

/// Environment variables that override a key of the file.
pub const ENV_OVERRIDES: [(&str, &str); 25] = [
    ("RECAP_GATEWAY_LISTEN", "gateway.listen"),
    ("RECAP_GATEWAY_RATE", "gateway.rate_per_s"),
    ("RECAP_GATEWAY_BURST", "gateway.burst"),
    ("RECAP_GATEWAY_CLIENT_RATE", "gateway.client_rate_per_s"),
    ("RECAP_GATEWAY_CLIENT_BURST", "gateway.client_burst"),
    ("RECAP_GATEWAY_HEADER_TIMEOUT_S", "gateway.header_timeout_s"),
    (
        "RECAP_GATEWAY_REQUEST_TIMEOUT_S",
        "gateway.request_timeout_s",
    ),
    ("RECAP_WEBHOOK_ALLOW", "gateway.webhook_allow"),
    ("RECAP_POLICY", "policy.file"),
    ("RECAP_AMQP_URL", "amqp.url"),
    ("RECAP_AMQP_PREFETCH", "amqp.prefetch"),
    ("RECAP_AMQP_BATCHES_IN_FLIGHT", "amqp.batches_in_flight"),
    ("RECAP_AMQP_CONSUMER_TIMEOUT_S", "amqp.consumer_timeout_s"),
    ("RECAP_JOB_DEADLINE_S", "worker.job_deadline_s"),
    ("RECAP_DATABASE_URL", "database.url"),
    ("RECAP_MODELS_DIR", "models.dir"),
    ("RECAP_MODELS_CATALOG", "models.catalog"),
    ("RECAP_DEVICE", "models.device"),
    ("RECAP_THREADS", "models.threads"),
    ("RECAP_COMPACT_MODEL", "tiers.compact.model"),
    ("RECAP_LARGE_MODEL", "tiers.large.model"),
    ("RECAP_COMPACT_BATCH_SIZE", "tiers.compact.batch_size"),
    ("RECAP_LARGE_BATCH_SIZE", "tiers.large.batch_size"),
    ("RECAP_ROUTER_BATCH_SIZE", "router.batch_size"),
    ("RECAP_METRICS_LISTEN", "metrics.listen"),
];

impl Config {
    /// The file (if any), then the environment, then validation.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        // A user catalog is read and checked at start, naming its bad key.
        config.catalog()?;
        Ok(config)
    }

    /// The model catalog: the built-in one, with `models.catalog`'s
    /// entries over it.
    pub fn catalog(&self) -> Result<recap_catalog::Catalog, ConfigError> {
        use recap_catalog::Catalog;
        let Some(path) = &self.models.catalog else {
            return Catalog::builtin().map_err(|e| invalid("models.catalog", e.to_string()));
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "models.catalog",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Catalog::with_user(&text, &path.display().to_string())
            .map_err(|e| invalid("models.catalog", e.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for (var, key) in ENV_OVERRIDES {
            let Some(value) = get(var) else { continue };
            let number = |what: &str| -> Result<u64, ConfigError> {
                value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| invalid(key, format!("must be {what}, got {value:?}")))
            };
            match key {
                "amqp.url" => self.amqp.url = value.clone(),
                "amqp.prefetch" => {
                    self.amqp.prefetch = u16::try_from(number("an integer")?)
                        .map_err(|_| invalid(key, "must be at most 65535"))?
                }
                "amqp.batches_in_flight" => {
                    self.amqp.batches_in_flight = u16::try_from(number("an integer")?)
                        .map_err(|_| invalid(key, "must be at most 65535"))?
                }
                "amqp.consumer_timeout_s" => self.amqp.consumer_timeout_s = number("seconds")?,
                "worker.job_deadline_s" => self.worker.job_deadline_s = number("seconds")?,
                "database.url" => self.database.url = value.clone(),
                "models.dir" => self.models.dir = Some(PathBuf::from(&value)),
                "models.catalog" => {
                    self.models.catalog = (!value.trim().is_empty()).then(|| PathBuf::from(&value))
                }
                "models.device" => self.models.device = value.clone(),
                "models.threads" => self.models.threads = number("an integer")? as usize,
                "tiers.compact.model" | "tiers.large.model" => {
                    let tier = key.split('.').nth(1).unwrap_or_default().to_string();
                    self.tiers
                        .entry(tier)
                        .or_insert_with(|| TierConfig {
                            model: String::new(),
                            batch_size: 1,
                        })
                        .model = value.clone();
                }
                "tiers.compact.batch_size" | "tiers.large.batch_size" => {
                    let tier = key.split('.').nth(1).unwrap_or_default().to_string();
                    let n = number("an integer")? as usize;
                    match self.tiers.get_mut(&tier) {
                        Some(t) => t.batch_size = n,
                        None => return Err(invalid(key, format!("tier {tier} is not configured"))),
                    }
                }
                "router.batch_size" => self.router.batch_size = number("an integer")? as usize,
                "metrics.listen" => self.metrics.listen = value.clone(),
                "policy.file" => self.policy.file = Some(PathBuf::from(&value)),
                "gateway.listen" => self.gateway.listen = value.clone(),
                "gateway.rate_per_s"
                | "gateway.burst"
                | "gateway.client_rate_per_s"
                | "gateway.client_burst" => {
                    let v: f64 = value
                        .trim()
                        .parse()
                        .map_err(|_| invalid(key, format!("must be a number, got {value:?}")))?;
                    match key {
                        "gateway.burst" => self.gateway.burst = v,
                        "gateway.rate_per_s" => self.gateway.rate_per_s = v,
                        "gateway.client_burst" => self.gateway.client_burst = v,
                        _ => self.gateway.client_rate_per_s = v,
                    }
                }
                "gateway.header_timeout_s" => self.gateway.header_timeout_s = number("seconds")?,
                "gateway.request_timeout_s" => self.gateway.request_timeout_s = number("seconds")?,
                "gateway.webhook_allow" => {
                    self.gateway.webhook_allow = value
                        .split(',')
                        .map(|h| h.trim().to_string())
                        .filter(|h| !h.is_empty())
                        .collect()
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Every key's range and form, section by section; the first bad key
    /// is named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_broker()?;
        self.validate_database()?;
        self.validate_limits()?;
        self.gateway.validate()?;
        self.validate_budgets()?;
        self.validate_models()?;
        self.validate_tiers()?;
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics.listen",
                format!("must be HOST:PORT, got {:?}", self.metrics.listen),
            ));
        }
        Ok(())
    }

    /// The broker's URL, prefetch and batches, and the batch sizes of the consumers.
    fn validate_broker(&self) -> Result<(), ConfigError> {
        if !(self.amqp.url.starts_with("amqp://") || self.amqp.url.starts_with("amqps://")) {
            return Err(invalid("amqp.url", "must start with amqp:// or amqps://"));
        }
        if self.amqp.url.starts_with("amqps://") {
            return Err(invalid(
                "amqp.url",
                "amqps:// is not supported by this build (lapin is built without TLS); use a TLS-terminating sidecar or amqp://",
            ));
        }
        if !(1..=1000).contains(&self.amqp.prefetch) {
            return Err(invalid(
                "amqp.prefetch",
                format!("must be 1-1000, got {}", self.amqp.prefetch),
            ));
        }
        if !(1..=1000).contains(&self.amqp.batches_in_flight) {
            return Err(invalid(
                "amqp.batches_in_flight",
                format!("must be 1-1000, got {}", self.amqp.batches_in_flight),
            ));
        }
        if !(1..=MAX_BATCH).contains(&self.router.batch_size) {
            return Err(invalid(
                "router.batch_size",
                format!("must be 1-{MAX_BATCH}, got {}", self.router.batch_size),
            ));
        }
        for (name, tier) in &self.tiers {
            if !(1..=MAX_BATCH).contains(&tier.batch_size) {
                return Err(invalid(
                    &format!("tiers.{name}.batch_size"),
                    format!("must be 1-{MAX_BATCH}, got {}", tier.batch_size),
                ));
            }
        }
        Ok(())
    }

    /// The database's URL and pool.
    fn validate_database(&self) -> Result<(), ConfigError> {
        if !(self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        Ok(())
    }

    /// The size limits of a job, and the retries of a failed one.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_transcript_bytes == 0 || l.max_transcript_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_transcript_bytes",
                "must be between 1 and 67108864 (64 MiB)",
            ));
        }
        if l.max_utterances == 0 {
            return Err(invalid("limits.max_utterances", "must be at least 1"));
        }
        if l.max_tenant_len == 0 || l.max_tenant_len > 200 {
            return Err(invalid("limits.max_tenant_len", "must be 1-200"));
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if self.retry.backoff_ms.is_empty() {
            return Err(invalid("retry.backoff_ms", "must list at least one delay"));
        }
        if self.retry.backoff_ms.len() > 20
            || self
                .retry
                .backoff_ms
                .iter()
                .any(|&ms| ms == 0 || ms > 86_400_000)
        {
            return Err(invalid(
                "retry.backoff_ms",
                "at most 20 delays, each 1 ms to 24 h",
            ));
        }
        if self.retry.delivery_limit == 0 {
            return Err(invalid("retry.delivery_limit", "must be at least 1"));
        }
        Ok(())
    }

    /// The default budgets: dollars, or inf for no limit.
    fn validate_budgets(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("budgets.default_daily_usd", self.budgets.default_daily_usd),
            (
                "budgets.default_monthly_usd",
                self.budgets.default_monthly_usd,
            ),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(invalid(
                    key,
                    "must be 0 or more dollars, or inf for no limit",
                ));
            }
        }
        Ok(())
    }

    /// The models' context and device, and the job deadline that must end before the broker's consumer timeout.
    fn validate_models(&self) -> Result<(), ConfigError> {
        if !(512..=1_048_576).contains(&self.models.max_context) {
            return Err(invalid("models.max_context", "must be 512-1048576 tokens"));
        }
        if self.worker.job_deadline_s == 0 {
            return Err(invalid("worker.job_deadline_s", "must be at least 1"));
        }
        // A delivery held past the broker's timeout gets its channel closed
        // and every job on it redelivered: the deadline must end first.
        let margin = self.amqp.consumer_timeout_margin_s();
        if self.worker.job_deadline_s.saturating_add(margin) > self.amqp.consumer_timeout_s {
            return Err(invalid(
                "worker.job_deadline_s",
                format!(
                    "{} s must end at least {margin} s before amqp.consumer_timeout_s \
                     ({} s, the broker's consumer_timeout): raise the broker's timeout \
                     (deploy/rabbitmq/rabbitmq.conf) and amqp.consumer_timeout_s, or lower the deadline",
                    self.worker.job_deadline_s, self.amqp.consumer_timeout_s
                ),
            ));
        }
        if !(self.models.device == "cpu"
            || self.models.device == "cuda"
            || self
                .models
                .device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            return Err(invalid(
                "models.device",
                format!("must be cpu, cuda or cuda:N, got {:?}", self.models.device),
            ));
        }
        Ok(())
    }

    /// The tiers: compact and large only, each naming a model.
    fn validate_tiers(&self) -> Result<(), ConfigError> {
        for (name, tier) in &self.tiers {
            if Tier::parse(name).is_none() {
                return Err(invalid(
                    &format!("tiers.{name}"),
                    "unknown tier; the tiers are compact and large",
                ));
            }
            if tier.model.trim().is_empty() {
                return Err(invalid(&format!("tiers.{name}.model"), "must name a model"));
            }
        }
        Ok(())
    }

    pub fn models_dir(&self) -> PathBuf {
        if let Some(d) = &self.models.dir {
            return d.clone();
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        cache.join("recap").join("models")
    }

    /// A tier's settings, where the config gives the tier a model.
    pub fn tier(&self, tier: Tier) -> Option<&TierConfig> {
        self.tiers.get(tier.as_str())
    }

    pub fn tier_model(&self, tier: Tier) -> Option<&str> {
        self.tier(tier).map(|t| t.model.as_str())
    }
}

/// A URL fit for logs: the password, if any, replaced by `***`.
/// Passwords that ship in examples, defaults and images: a process that
/// meets one refuses to start unless `RECAP_ALLOW_DEV_CREDENTIALS=1`.
const KNOWN_PASSWORDS: [&str; 10] = [
    "guest",
    "recap",
    "change-me",
    "changeme",
    "password",
    "postgres",
    "admin",
    "secret",
    "example",
    "rabbitmq",
];

/// Whether `password` is a placeholder or a well-known default.
pub fn is_known_password(password: &str) -> bool {
    let p = password.trim().to_ascii_lowercase();
    KNOWN_PASSWORDS.contains(&p.as_str()) || p.contains("change-me") || p.contains("changeme")
}

/// The password of a URL's userinfo, or of a `password=` query parameter.
fn url_password(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    if let Some(p) = url.password() {
        return Some(percent_decode(p));
    }
    url.query_pairs()
        .find(|(k, _)| k.eq_ignore_ascii_case("password"))
        .map(|(_, v)| v.into_owned())
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("p={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl Config {
    /// Refuses the broker's and the database's placeholder or default
    /// passwords, unless development credentials are allowed.
    pub fn check_credentials(&self, allow_dev: bool) -> Result<(), ConfigError> {
        if allow_dev {
            return Ok(());
        }
        for (key, url) in [
            ("amqp.url", &self.amqp.url),
            ("database.url", &self.database.url),
        ] {
            if url_password(url).is_some_and(|p| is_known_password(&p)) {
                return Err(invalid(
                    key,
                    format!(
                        "{} uses a placeholder or default password; set a real one \
                         (or RECAP_ALLOW_DEV_CREDENTIALS=1 on a development machine)",
                        redact_url(url)
                    ),
                ));
            }
        }
        Ok(())
    }
}

pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let path = redact_query_password(path);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// `password=...` in a query (libpq and sqlx accept it there) as `***`.
fn redact_query_password(path: &str) -> String {
    let Some((before, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{before}?{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_userinfo_and_query_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db:5432/recap?sslmode=require&password=hunter2"),
            "postgres://app:***@db:5432/recap?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://db/recap?Password=x"),
            "postgres://db/recap?Password=***"
        );
        assert_eq!(redact_url("amqp://u@h/%2f"), "amqp://u@h/%2f");
    }

    #[test]
    fn placeholder_passwords_are_refused_unless_development_is_allowed() {
        let mut c = Config::default();
        // The defaults are guest:guest (RabbitMQ's) and no database password.
        let err = c.check_credentials(false).unwrap_err().to_string();
        assert!(
            err.contains("amqp.url") && err.contains("RECAP_ALLOW_DEV_CREDENTIALS"),
            "{err}"
        );
        assert!(
            !err.contains("guest@"),
            "the password is not repeated: {err}"
        );
        assert!(c.check_credentials(true).is_ok());
        c.amqp.url = "amqp://recap:Zq8-long-random@rabbit:5672/%2f".into();
        assert!(c.check_credentials(false).is_ok());
        for url in [
            "postgres://recap:recap@db/recap",
            "postgres://recap:CHANGE-ME@db/recap",
            "postgres://recap:please-change-me-now@db/recap",
            "postgres://recap@db/recap?password=postgres",
            "postgres://recap:%43HANGEME@db/recap",
        ] {
            c.database.url = url.into();
            let err = c.check_credentials(false).unwrap_err().to_string();
            assert!(err.contains("database.url"), "{url}: {err}");
        }
        c.database.url = "postgres://recap:V3ry-r4ndom@db/recap".into();
        assert!(c.check_credentials(false).is_ok());
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/recap.toml");
        let c = Config::from_file(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.tier_model(Tier::Compact),
            Some("smollm2-135m-qmsum-3pass-lora")
        );
    }

    #[test]
    fn env_overrides_the_file() {
        let mut c: Config =
            toml::from_str("[amqp]\nurl = \"amqp://a/%2f\"\nprefetch = 4\n").unwrap();
        c.apply_env(env(&[
            ("RECAP_AMQP_URL", "amqp://b/v"),
            ("RECAP_DATABASE_URL", "postgres://x/db"),
            ("RECAP_COMPACT_MODEL", "smollm2-135m-instruct-q4_1"),
        ]))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.amqp.url, "amqp://b/v");
        assert_eq!(c.amqp.prefetch, 4);
        assert_eq!(c.database.url, "postgres://x/db");
        assert_eq!(
            c.tier_model(Tier::Compact),
            Some("smollm2-135m-instruct-q4_1")
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: [(&[(&str, &str)], &str); 8] = [
            (&[("RECAP_AMQP_URL", "http://x")], "amqp.url"),
            (
                &[("RECAP_AMQP_BATCHES_IN_FLIGHT", "0")],
                "amqp.batches_in_flight",
            ),
            (&[("RECAP_DATABASE_URL", "mysql://x")], "database.url"),
            (&[("RECAP_AMQP_PREFETCH", "0")], "amqp.prefetch"),
            (&[("RECAP_DEVICE", "tpu")], "models.device"),
            (&[("RECAP_ROUTER_BATCH_SIZE", "0")], "router.batch_size"),
            (
                &[("RECAP_COMPACT_BATCH_SIZE", "0")],
                "tiers.compact.batch_size",
            ),
            (
                &[("RECAP_LARGE_BATCH_SIZE", "100000")],
                "tiers.large.batch_size",
            ),
        ];
        for (vars, key) in cases {
            let mut c = Config::default();
            let err = c
                .apply_env(env(vars))
                .and_then(|_| c.validate())
                .unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{key}`")), "{msg}");
            assert!(msg.contains(vars[0].0), "{msg}");
        }
        let mut c = Config::default();
        let err = c
            .apply_env(env(&[("RECAP_AMQP_PREFETCH", "many")]))
            .unwrap_err();
        assert!(err.to_string().contains("amqp.prefetch"));
    }

    #[test]
    fn unknown_keys_and_tiers_are_refused() {
        let err = toml::from_str::<Config>("[amqp]\nurll = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
        let c: Config = toml::from_str("[tiers.medium]\nmodel = \"x\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tiers.medium"));
        let c: Config = toml::from_str("[retry]\nbackoff_ms = []\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retry.backoff_ms"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
        assert_eq!(redact_url("postgres://u:p@w@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("nonsense"), "nonsense");
    }

    #[test]
    fn the_job_deadline_must_end_before_the_brokers_consumer_timeout() {
        let with = |timeout: &str, deadline: &str| {
            let mut c = Config::default();
            c.apply_env(env(&[
                ("RECAP_AMQP_CONSUMER_TIMEOUT_S", timeout),
                ("RECAP_JOB_DEADLINE_S", deadline),
            ]))
            .unwrap();
            c.validate()
        };
        // The margin: a quarter of the timeout, at most 30 s.
        assert!(with("1800", "1770").is_ok());
        assert!(with("1800", "1771").is_err());
        assert!(with("12", "9").is_ok());
        assert!(with("12", "10").is_err());
        let err = with("1800", "1800").unwrap_err().to_string();
        assert!(
            err.contains("worker.job_deadline_s") && err.contains("RECAP_JOB_DEADLINE_S"),
            "{err}"
        );
        assert!(err.contains("consumer_timeout"), "{err}");
        assert!(with("0", "1").is_err());
    }
}
