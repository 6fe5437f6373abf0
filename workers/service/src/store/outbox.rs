//! The outbox: events a transition leaves for webhooks, written in the
//! transition's own transaction so that the state and its notification
//! commit together.

use super::*;

/// Writes the webhook outbox row for a job that ended, when it gave a
/// callback URL; in the caller's transaction, so that the end and the
/// notification commit together.
pub(super) async fn enqueue_webhook(
    tx: &mut Tx,
    job_id: Uuid,
    payload: &serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (job_id, tenant, url, event, payload)
         SELECT job_id, tenant, callback_url, $2, $3 FROM jobs WHERE job_id = $1 AND callback_url IS NOT NULL
         ON CONFLICT (job_id, event) DO NOTHING",
    )
    .bind(job_id)
    .bind(payload["event"].as_str().unwrap_or("job.completed"))
    .bind(payload)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The `job.failed` event of a cancelled job.
pub fn cancel_event(job_id: Uuid, tenant: &str) -> serde_json::Value {
    crate::webhooks::event_payload(
        "job.failed",
        job_id,
        tenant,
        Status::Failed.as_str(),
        serde_json::json!({"error_code": "cancelled", "error": "cancelled by the client"}),
    )
}

/// The `job.completed` outbox rows of jobs that succeeded here and gave a
/// callback URL.
pub(super) async fn enqueue_completion_webhooks(
    tx: &mut Tx,
    callbacks: &[&(&Job, Completion<'_>)],
) -> Result<(), StoreError> {
    for (job, done) in callbacks.iter().map(|i| (i.0, &i.1)) {
        let payload = crate::webhooks::event_payload(
            "job.completed",
            job.job_id,
            &job.tenant,
            "succeeded",
            serde_json::json!({
                "model": done.model,
                "tier": done.tier,
                "cost_usd": done.cost_usd,
                "summaries": done.outputs.iter().map(|o| serde_json::json!({"kind": o.kind, "text": o.text})).collect::<Vec<_>>(),
            }),
        );
        enqueue_webhook(tx, job.job_id, &payload).await?;
    }
    Ok(())
}
