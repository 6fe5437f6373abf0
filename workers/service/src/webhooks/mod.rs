//! Completion events and webhooks.
//!
//! When a job ends, the same transaction that ends it writes a
//! `webhook_deliveries` row (an outbox) if the job gave a `callback_url`;
//! the gateway's dispatcher delivers it: POSTed as JSON, signed with
//! HMAC-SHA256 under the tenant's secret over `"{timestamp}.{body}"`
//! (header `Recap-Signature: t=<unix seconds>,v1=<hex>`; receivers reject
//! stale timestamps against replay), retried with exponential backoff, and
//! every attempt recorded in `webhook_attempts`. Callbacks go only to
//! public addresses over https (see [`egress`]); a refused one is recorded
//! with its reason and not retried.

pub mod egress;

use crate::queue::{self, EXCHANGE_EVENTS};
use crate::shutdown::Shutdown;
use egress::{AllowList, Refusal};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::PgPool;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub const MAX_ATTEMPTS: i32 = 8;

/// `t=<ts>,v1=<hex hmac>` for a body sent at `ts`.
pub fn sign(secret: &str, ts: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={ts},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delay before attempt `n + 1` after `n` failed ones: 1 s, 2 s, 4 s, ... 5 min.
pub fn backoff(attempts: i32) -> Duration {
    Duration::from_secs((1u64 << attempts.clamp(0, 16) as u32).min(300))
}

/// The event a job's end publishes (and POSTs, where it has a callback).
pub fn event_payload(
    event: &str,
    job_id: uuid::Uuid,
    tenant: &str,
    status: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "event": event,
        "job_id": job_id,
        "tenant": tenant,
        "status": status,
        "at": chrono::Utc::now(),
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v
}

/// Publishes `job.completed.<tenant>` or `job.failed.<tenant>` on recap.events.
pub async fn publish_event(
    ch: &lapin::Channel,
    payload: &serde_json::Value,
) -> Result<(), queue::QueueError> {
    publish_events(ch, std::slice::from_ref(payload))
        .await
        .pop()
        .unwrap_or(Ok(()))
}

/// Publishes events with pipelined confirms; one result per event.
pub async fn publish_events(
    ch: &lapin::Channel,
    payloads: &[serde_json::Value],
) -> Vec<Result<(), queue::QueueError>> {
    let encoded: Vec<(String, Vec<u8>)> = payloads
        .iter()
        .map(|p| {
            let event = p["event"].as_str().unwrap_or("job.completed");
            let tenant = p["tenant"].as_str().unwrap_or("unknown");
            (
                format!("{event}.{tenant}"),
                serde_json::to_vec(p).unwrap_or_default(),
            )
        })
        .collect();
    let messages = encoded
        .iter()
        .map(|(key, body)| queue::Outgoing {
            exchange: EXCHANGE_EVENTS,
            routing_key: key,
            payload: body,
            props: lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
            // No queue need be bound: an event nobody listens to is not an error.
            mandatory: false,
        })
        .collect();
    queue::publish_all_confirmed(ch, messages).await
}

struct Due {
    id: i64,
    url: String,
    payload: serde_json::Value,
    event: String,
    attempts: i32,
    lease: uuid::Uuid,
    secret: Option<String>,
}

/// Deliveries claimed at a time.
const CLAIM: usize = 16;
/// Deliveries in flight at once, over all receivers.
const IN_FLIGHT: usize = 64;
/// Deliveries in flight at once to one receiver (host and port), so that
/// a slow receiver holds up only its own deliveries.
const PER_HOST: usize = 4;
/// One request, from connect to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A claimed delivery that has not started by then goes back unsent.
const START_BY: Duration = Duration::from_secs(90);
/// A claim's lease: longer than the longest a claimed delivery can take
/// (START_BY, then one request), so that no other dispatcher re-claims a
/// delivery still in flight. The final update is guarded on the lease too.
const LEASE: Duration = Duration::from_secs(120);

/// Claims up to `n` due deliveries, each under a fresh lease.
async fn claim(pool: &PgPool, n: usize) -> Result<Vec<Due>, sqlx::Error> {
    type Row = (
        i64,
        String,
        serde_json::Value,
        String,
        i32,
        uuid::Uuid,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "WITH due AS (
             SELECT id FROM webhook_deliveries
             WHERE status = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE webhook_deliveries d
            SET next_attempt_at = now() + make_interval(secs => $2), lease = gen_random_uuid()
         FROM due WHERE d.id = due.id
         RETURNING d.id, d.url, d.payload, d.event, d.attempts, d.lease,
                   (SELECT webhook_secret FROM tenants t WHERE t.tenant = d.tenant)",
    )
    .bind(n as i64)
    .bind(LEASE.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, url, payload, event, attempts, lease, secret)| Due {
            id,
            url,
            payload,
            event,
            attempts,
            lease,
            secret,
        })
        .collect())
}

/// What one attempt came to.
enum Outcome {
    Status(u16),
    Failed(String),
    Refused(Refusal),
    NoSecret,
}

/// Resolves callback hosts and lets through only vetted addresses, so that
/// the connection goes where the guard looked (no DNS rebinding between
/// the check and the connect).
struct GuardedResolver {
    allow: Arc<AllowList>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let allowed = self.allow.permits_host(&host);
        Box::pin(async move {
            let found: Vec<IpAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|_| Box::new(Refusal::Unresolved(host.clone())))?
                .map(|a| a.ip())
                .collect();
            let vetted = egress::vet(&host, &found, allowed).map_err(Box::new)?;
            let addrs: reqwest::dns::Addrs =
                Box::new(vetted.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Resolves a callback host and vets every address it has.
pub async fn vet_name(t: &egress::Target) -> Result<Vec<IpAddr>, Refusal> {
    let found: Vec<IpAddr> = tokio::net::lookup_host((t.host.as_str(), t.port))
        .await
        .map_err(|_| Refusal::Unresolved(t.host.clone()))?
        .map(|a| a.ip())
        .collect();
    egress::vet(&t.host, &found, false)
}

/// The HTTP client of webhook deliveries: guarded resolver, no redirects,
/// no proxy from the environment (a proxy would resolve the name itself).
pub fn client(allow: Arc<AllowList>) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver { allow }))
        .build()
}

/// The guard's refusal behind a request error, where it is one.
fn refusal_in(e: &reqwest::Error) -> Option<Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refusal>() {
            return Some(r.clone());
        }
        // Connectors carry resolver errors inside io::Error too.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<Refusal>());
        if let Some(r) = inner {
            return Some(r.clone());
        }
        source = s.source();
    }
    None
}

/// An error and its causes, for the attempt record ("error sending
/// request" alone says nothing).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

struct Dispatcher {
    pool: PgPool,
    http: reqwest::Client,
    allow: Arc<AllowList>,
    hosts: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Dispatcher {
    fn host_slot(&self, key: &str) -> Arc<Semaphore> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(PER_HOST)))
            .clone()
    }

    fn forget_idle_host(&self, key: &str) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.get(key).is_some_and(|s| Arc::strong_count(s) == 1) {
            hosts.remove(key);
        }
    }

    async fn deliver(&self, d: Due) -> Result<(), sqlx::Error> {
        let target = egress::check_url(&d.url, &self.allow);
        let key = match &target {
            Ok(t) => format!("{}:{}", t.host, t.port),
            Err(_) => String::new(),
        };
        let slot = self.host_slot(&key);
        let permit = tokio::time::timeout(START_BY, slot.acquire_owned()).await;
        let Ok(Ok(_permit)) = permit else {
            self.forget_idle_host(&key);
            return self.release(&d).await;
        };
        let started = Instant::now();
        // Vetted here for a clear refusal; the resolver vets again at the
        // connect, so that a name rebound in between is refused too.
        let target = match target {
            Ok(t) if t.literal.is_none() && !t.allowed => vet_name(&t).await.map(|_| t),
            other => other,
        };
        let outcome = match (target, &d.secret) {
            (Err(refusal), _) => Outcome::Refused(refusal),
            (Ok(_), None) => Outcome::NoSecret,
            (Ok(_), Some(secret)) => self.send(&d, secret).await,
        };
        drop(_permit);
        self.forget_idle_host(&key);
        self.record(&d, outcome, started.elapsed().as_secs_f64() * 1e3)
            .await
    }

    async fn send(&self, d: &Due, secret: &str) -> Outcome {
        let body = serde_json::to_vec(&d.payload).unwrap_or_default();
        let ts = chrono::Utc::now().timestamp();
        let sent = self
            .http
            .post(&d.url)
            .header("content-type", "application/json")
            .header("recap-signature", sign(secret, ts, &body))
            .header("recap-event", &d.event)
            .header("recap-delivery", d.id.to_string())
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_redirection() => {
                Outcome::Refused(Refusal::Redirect(r.status().as_u16()))
            }
            Ok(r) => Outcome::Status(r.status().as_u16()),
            Err(e) => match refusal_in(&e) {
                Some(r) => Outcome::Refused(r),
                None => Outcome::Failed(error_chain(&e.without_url())),
            },
        }
    }

    /// Gives a claimed delivery back unsent (its host was busy too long).
    async fn release(&self, d: &Due) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = now(), lease = NULL
             WHERE id = $1 AND lease = $2",
        )
        .bind(d.id)
        .bind(d.lease)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records the attempt and the delivery's new state in one transaction,
    /// only while the lease is still this dispatcher's.
    async fn record(&self, d: &Due, outcome: Outcome, ms: f64) -> Result<(), sqlx::Error> {
        let attempt = d.attempts + 1;
        let (status, error, ok, final_) = match &outcome {
            Outcome::Status(s) => (Some(*s as i32), None, (200..300).contains(s), false),
            Outcome::Failed(e) => (None, Some(e.clone()), false, false),
            Outcome::Refused(r) => {
                let status = match r {
                    Refusal::Redirect(s) => Some(*s as i32),
                    _ => None,
                };
                (status, Some(format!("refused: {r}")), false, r.is_final())
            }
            Outcome::NoSecret => (
                None,
                Some(
                    "the tenant has no webhook secret (create it with `recap tenants create`)"
                        .to_string(),
                ),
                false,
                true,
            ),
        };
        let give_up = !ok && (final_ || attempt >= MAX_ATTEMPTS);
        let next =
            chrono::Utc::now() + chrono::Duration::from_std(backoff(attempt)).unwrap_or_default();
        let mut tx = self.pool.begin().await?;
        let held = sqlx::query(
            "UPDATE webhook_deliveries SET attempts = $2, last_status = $3, last_error = $4,
                    status = CASE WHEN $5 THEN 'delivered' WHEN $6 THEN 'failed' ELSE 'pending' END,
                    delivered_at = CASE WHEN $5 THEN now() ELSE NULL END,
                    next_attempt_at = $7, lease = NULL
             WHERE id = $1 AND lease = $8",
        )
        .bind(d.id)
        .bind(attempt)
        .bind(status)
        .bind(&error)
        .bind(ok)
        .bind(give_up)
        .bind(next)
        .bind(d.lease)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held == 0 {
            tracing::warn!(
                delivery = d.id,
                "the delivery's lease passed to another dispatcher before its attempt was recorded"
            );
            return Ok(());
        }
        sqlx::query("INSERT INTO webhook_attempts (delivery_id, attempt, http_status, error, duration_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(d.id)
            .bind(attempt)
            .bind(status)
            .bind(&error)
            .bind(ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if !ok {
            tracing::warn!(delivery = d.id, attempt, status = ?status, error = ?error, gave_up = give_up, "webhook delivery failed");
        }
        Ok(())
    }
}

/// Delivers due webhooks until shutdown: concurrently, at most PER_HOST at
/// a time to one receiver, and only to addresses the guard allows.
pub fn spawn_dispatcher(pool: PgPool, allow: AllowList, mut shutdown: Shutdown) {
    tokio::spawn(async move {
        let allow = Arc::new(allow);
        let http = match client(allow.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are not delivered");
                return;
            }
        };
        let dispatcher = Arc::new(Dispatcher {
            pool,
            http,
            allow,
            hosts: Default::default(),
        });
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits().min(CLAIM);
            if free > 0 {
                match claim(&dispatcher.pool, free).await {
                    Ok(due) if !due.is_empty() => {
                        for d in due {
                            let Ok(slot) = slots.clone().acquire_owned().await else {
                                return;
                            };
                            let dispatcher = dispatcher.clone();
                            tasks.spawn(async move {
                                let _slot = slot;
                                if let Err(e) = dispatcher.deliver(d).await {
                                    tracing::warn!(error = %e, "recording a webhook attempt failed");
                                }
                            });
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook dispatcher cannot read the outbox")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.wait() => {
                    // Let requests in flight finish and be recorded; the rest
                    // keep their lease and are delivered after it passes.
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        while tasks.join_next().await.is_some() {}
                    })
                    .await;
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_and_body() {
        // Expected value from: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            sign("whsec_test", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
        assert_ne!(sign("a", 1, b"x"), sign("b", 1, b"x"));
        assert_ne!(sign("a", 1, b"x"), sign("a", 2, b"x"));
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(20), Duration::from_secs(300));
    }
}
