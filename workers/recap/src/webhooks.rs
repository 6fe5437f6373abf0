//! Completion events and webhooks.
//!
//! When a job ends, the same transaction that ends it writes a
//! `webhook_deliveries` row (an outbox) if the job gave a `callback_url`;
//! the gateway's dispatcher delivers it: POSTed as JSON, signed with
//! HMAC-SHA256 under the tenant's secret over `"{timestamp}.{body}"`
//! (header `Recap-Signature: t=<unix seconds>,v1=<hex>`; receivers reject
//! stale timestamps against replay), retried with exponential backoff, and
//! every attempt recorded in `webhook_attempts`.

use crate::queue::{self, EXCHANGE_EVENTS};
use crate::shutdown::Shutdown;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::PgPool;
use std::time::{Duration, Instant};

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
    secret: Option<String>,
}

/// Claims due deliveries with a lease, so that several gateways share the work.
async fn claim(pool: &PgPool) -> Result<Vec<Due>, sqlx::Error> {
    let rows: Vec<(i64, String, serde_json::Value, String, i32, Option<String>)> = sqlx::query_as(
        "WITH due AS (
             SELECT id FROM webhook_deliveries
             WHERE status = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT 16 FOR UPDATE SKIP LOCKED)
         UPDATE webhook_deliveries d SET next_attempt_at = now() + interval '60 seconds'
         FROM due WHERE d.id = due.id
         RETURNING d.id, d.url, d.payload, d.event, d.attempts,
                   (SELECT webhook_secret FROM tenants t WHERE t.tenant = d.tenant)",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, url, payload, event, attempts, secret)| Due {
            id,
            url,
            payload,
            event,
            attempts,
            secret,
        })
        .collect())
}

async fn deliver(pool: &PgPool, http: &reqwest::Client, d: Due) -> Result<(), sqlx::Error> {
    let attempt = d.attempts + 1;
    let started = Instant::now();
    let body = serde_json::to_vec(&d.payload).unwrap_or_default();
    let result: Result<u16, String> = match &d.secret {
        None => {
            Err("the tenant has no webhook secret (create it with `recap tenants create`)".into())
        }
        Some(secret) => {
            let ts = chrono::Utc::now().timestamp();
            http.post(&d.url)
                .header("content-type", "application/json")
                .header("recap-signature", sign(secret, ts, &body))
                .header("recap-event", &d.event)
                .header("recap-delivery", d.id.to_string())
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.without_url().to_string())
        }
    };
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let (status, error) = match &result {
        Ok(s) => (Some(*s as i32), None),
        Err(e) => (None, Some(e.clone())),
    };
    sqlx::query("INSERT INTO webhook_attempts (delivery_id, attempt, http_status, error, duration_ms) VALUES ($1, $2, $3, $4, $5)")
        .bind(d.id)
        .bind(attempt)
        .bind(status)
        .bind(&error)
        .bind(ms)
        .execute(pool)
        .await?;
    let ok = matches!(result, Ok(s) if (200..300).contains(&s));
    let give_up = !ok && (attempt >= MAX_ATTEMPTS || d.secret.is_none());
    let next =
        chrono::Utc::now() + chrono::Duration::from_std(backoff(attempt)).unwrap_or_default();
    sqlx::query(
        "UPDATE webhook_deliveries SET attempts = $2, last_status = $3, last_error = $4,
                status = CASE WHEN $5 THEN 'delivered' WHEN $6 THEN 'failed' ELSE 'pending' END,
                delivered_at = CASE WHEN $5 THEN now() ELSE NULL END,
                next_attempt_at = $7
         WHERE id = $1",
    )
    .bind(d.id)
    .bind(attempt)
    .bind(status)
    .bind(&error)
    .bind(ok)
    .bind(give_up)
    .bind(next)
    .execute(pool)
    .await?;
    if !ok {
        tracing::warn!(delivery = d.id, attempt, status = ?status, error = ?error, "webhook delivery failed");
    }
    Ok(())
}

/// Delivers due webhooks until shutdown.
pub fn spawn_dispatcher(pool: PgPool, mut shutdown: Shutdown) {
    tokio::spawn(async move {
        let http = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are not delivered");
                return;
            }
        };
        loop {
            match claim(&pool).await {
                Ok(due) if !due.is_empty() => {
                    for d in due {
                        if let Err(e) = deliver(&pool, &http, d).await {
                            tracing::warn!(error = %e, "recording a webhook attempt failed");
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "webhook dispatcher cannot read the outbox"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.wait() => return,
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
