//! The consumer loop shared by the router and the workers: take deliveries,
//! hand them to a handler, and carry out its verdicts on the broker. The
//! handler never acks; this loop acks only after the handler's verdict
//! (and, for dead letters, the `dead` row and the dead-letter publish)
//! is durable.
//!
//! Deliveries that are already waiting when one arrives go to the handler
//! together, up to the consumer's batch size, so that their database work
//! shares one commit and their publishes share one round of confirms. A
//! lone delivery is never held back to wait for company; but while
//! `amqp.batches_in_flight` batches are being handled, no new batch starts,
//! so under load deliveries gather in the prefetch window and the next
//! batch takes them all (one small batch per refill is what the broker's
//! ack-paced delivery gives otherwise).

use crate::config::Config;
use crate::metrics::metrics;
use crate::probes::Readiness;
use crate::queue::{self, H_ATTEMPT, H_DETAIL, H_REASON, H_SOURCE};
use crate::shutdown::Shutdown;
use crate::store::{self, Status};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use recap_engine::Cancel;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use uuid::Uuid;

/// What to do with a delivery once the handler is through with it.
#[derive(Debug)]
pub enum Verdict {
    /// Done, or a duplicate of something done: ack.
    Ack,
    /// Refused for good (bad input): `dead` row, dead-letter publish, ack.
    DeadLetter {
        code: String,
        detail: String,
        job_id: Option<Uuid>,
        tenant: Option<String>,
    },
    /// The job failed in a way another try may fix: retry after a backoff,
    /// or dead-letter once the attempts are spent.
    Retry {
        code: String,
        detail: String,
        job_id: Uuid,
        tenant: String,
    },
    /// Our side failed (database down, shutdown): give the message back
    /// to the broker untouched after a pause.
    Requeue { detail: String },
}

impl Verdict {
    /// A message the parser refused: dead-lettered with its reason.
    pub fn refused(r: recap_job::Rejection) -> Verdict {
        Verdict::DeadLetter {
            code: r.code.as_str().to_string(),
            detail: r.to_string(),
            job_id: r.job_id,
            tenant: r.tenant,
        }
    }

    /// A message that names another tenant's job_id: dead-lettered as
    /// `tenant_mismatch` without touching that job (no job_id, so that
    /// nothing is written to its row).
    pub fn tenant_mismatch(job: &recap_job::Job) -> Verdict {
        tracing::warn!(job_id = %job.job_id, tenant = %job.tenant, "message names another tenant's job_id; dead-lettered");
        Verdict::DeadLetter {
            code: "tenant_mismatch".into(),
            detail: format!(
                "job_id {} is in use by another tenant than {}",
                job.job_id, job.tenant
            ),
            job_id: None,
            tenant: Some(job.tenant.clone()),
        }
    }

    /// A batch's verdicts, one per delivery; a delivery the handler never
    /// decided goes back to the queue.
    pub fn all(verdicts: Vec<Option<Verdict>>) -> Vec<Verdict> {
        verdicts
            .into_iter()
            .map(|v| {
                v.unwrap_or(Verdict::Requeue {
                    detail: "no verdict reached".into(),
                })
            })
            .collect()
    }
}

/// What a handler gets besides the delivery.
#[derive(Clone)]
pub struct Ctx {
    /// Set when a stopping process runs out of grace: stop work, requeue.
    pub cancel: Cancel,
    /// This broker session's confirm channel: publishes made through it die
    /// with the session, never outlive a reconnect.
    pub publish: Arc<Channel>,
}

pub trait Handler: Send + Sync + 'static {
    /// One verdict per delivery, in the deliveries' order.
    fn handle(
        &self,
        deliveries: &[Delivery],
        ctx: Ctx,
    ) -> impl Future<Output = Vec<Verdict>> + Send;
}

pub struct Consumer<H> {
    pub queue: String,
    pub tier_label: String,
    pub handler: Arc<H>,
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub readiness: Arc<Readiness>,
    /// Most deliveries handed to the handler at once.
    pub batch_size: usize,
}

impl<H: Handler> Consumer<H> {
    /// Consumes until shutdown, reconnecting when the broker goes away.
    pub async fn run(&self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(500);
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            match self.session(shutdown.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.readiness.set_broker(false);
                    tracing::warn!(error = %e, queue = %self.queue, "consumer lost its broker session; reconnecting in {:?}", backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(15));
                }
            }
        }
    }

    /// One connection's worth of consuming. Returns Ok on shutdown, Err when
    /// the connection broke.
    async fn session(&self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let conn = queue::connect(&self.config, &self.queue).await?;
        queue::check_topology(&conn, &self.queue).await?;
        let consume_ch = queue::consumer_channel(&conn, self.config.amqp.prefetch).await?;
        let publish_ch = Arc::new(queue::confirm_channel(&conn).await?);
        let tag = format!("recap-{}-{}", self.queue, std::process::id());
        let mut consumer = consume_ch
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                queue::consumer_arguments(&self.config),
            )
            .await?;
        self.readiness.set_broker(true);
        tracing::info!(queue = %self.queue, prefetch = self.config.amqp.prefetch, "consuming");

        let cancel = Cancel::default();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let in_flight = usize::from(self.config.amqp.batches_in_flight.max(1));
        // The connection's own errors end the session even while every
        // task slot is taken: tasks awaiting an ack or a confirm on a dead
        // connection never finish, and the consumer stream is not polled
        // while the slots are full.
        let mut events = Box::pin(conn.events_listener());
        let broken = loop {
            tokio::select! {
                _ = shutdown.wait() => break None,
                Some(event) = events.next() => {
                    if let lapin::Event::Error(e) = event {
                        break Some(anyhow::anyhow!("connection error: {e}"));
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = consumer.next(), if tasks.len() < in_flight => match next {
                    Some(Ok(delivery)) => {
                        let mut batch = vec![delivery];
                        let mut ended = None;
                        // Take what is already here; never wait for more.
                        while batch.len() < self.batch_size {
                            match consumer.next().now_or_never() {
                                Some(Some(Ok(d))) => batch.push(d),
                                Some(Some(Err(e))) => {
                                    ended = Some(anyhow::anyhow!("consumer error: {e}"));
                                    break;
                                }
                                Some(None) => {
                                    ended = Some(anyhow::anyhow!("consumer stream ended (channel closed)"));
                                    break;
                                }
                                None => break,
                            }
                        }
                        let this = self.clone_parts(publish_ch.clone(), cancel.clone());
                        tasks.spawn(async move { this.process(batch).await });
                        if ended.is_some() {
                            break ended;
                        }
                    }
                    Some(Err(e)) => break Some(anyhow::anyhow!("consumer error: {e}")),
                    None => break Some(anyhow::anyhow!("consumer stream ended (channel closed)")),
                },
            }
        };

        if broken.is_none() {
            // Stop taking new work first; what is in flight may finish.
            self.readiness.set_stopping();
            let _ = consume_ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
            let grace = Duration::from_secs(self.config.worker.shutdown_grace_s);
            tracing::info!(inflight = tasks.len(), ?grace, "draining in-flight jobs");
            let drained =
                tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
                    .await;
            if drained.is_err() {
                tracing::warn!("grace period over: cancelling in-flight jobs (they are requeued)");
                cancel.cancel();
                while tasks.join_next().await.is_some() {}
            }
            let _ = consume_ch.close(200, "shutdown".into()).await;
            let _ = conn.close(200, "shutdown".into()).await;
            return Ok(());
        }
        // The connection broke: unacked deliveries return to the queue on
        // their own. Stop the tasks; their acks could not reach the broker.
        cancel.cancel();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        Err(broken.unwrap_or_else(|| anyhow::anyhow!("connection lost")))
    }

    fn clone_parts(&self, publish: Arc<Channel>, cancel: Cancel) -> Task<H> {
        Task {
            queue: self.queue.clone(),
            tier_label: self.tier_label.clone(),
            handler: self.handler.clone(),
            pool: self.pool.clone(),
            config: self.config.clone(),
            publish,
            cancel,
            received: std::time::Instant::now(),
        }
    }
}

/// One delivery's processing, owning what it needs.
struct Task<H> {
    queue: String,
    tier_label: String,
    handler: Arc<H>,
    pool: PgPool,
    config: Arc<Config>,
    publish: Arc<Channel>,
    cancel: Cancel,
    /// When the delivery arrived: the broker's consumer timeout runs from
    /// here.
    received: std::time::Instant,
}

impl<H: Handler> Task<H> {
    async fn process(self, batch: Vec<Delivery>) {
        metrics()
            .batch_deliveries
            .with_label_values(&[&self.tier_label])
            .observe(batch.len() as f64);
        let gauge = metrics()
            .inflight_jobs
            .with_label_values(&[&self.tier_label]);
        gauge.add(batch.len() as f64);
        // A delivery the broker makes for the last time is refused here:
        // were it run and its consumer killed once more, the broker would
        // drop it into recap.dead with its row left `running` forever.
        let limit = self.config.retry.delivery_limit;
        let (last, fresh): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|d| is_last_delivery(&d.properties, limit));
        // The refused ones first: verdicts and deliveries stay in one order.
        let spent = last.len();
        let batch: Vec<Delivery> = last.into_iter().chain(fresh).collect();
        let mut verdicts: Vec<Verdict> = batch[..spent]
            .iter()
            .map(|d| self.delivery_limit_reached(d))
            .collect();
        if spent < batch.len() {
            verdicts.extend(
                self.handler
                    .handle(
                        &batch[spent..],
                        Ctx {
                            cancel: self.cancel.clone(),
                            publish: self.publish.clone(),
                        },
                    )
                    .await,
            );
        }
        gauge.sub(batch.len() as f64);
        if verdicts.len() != batch.len() {
            // A handler bug; give back what has no verdict rather than guess.
            tracing::error!(
                deliveries = batch.len(),
                verdicts = verdicts.len(),
                "handler returned the wrong number of verdicts"
            );
            verdicts.resize_with(batch.len(), || Verdict::Requeue {
                detail: "no verdict from the handler".into(),
            });
        }
        // The plain acks go first and to the connection together (one I/O
        // loop wake-up for the batch, not a thread hand-off per ack), so
        // that a requeue waiting out a database outage holds none of them;
        // the rest are settled one by one.
        let (acks, rest): (Vec<_>, Vec<_>) = batch
            .iter()
            .zip(verdicts)
            .partition(|(_, verdict)| matches!(verdict, Verdict::Ack));
        futures::future::join_all(acks.into_iter().map(|(d, v)| self.settle(d, v))).await;
        for (delivery, verdict) in rest {
            self.settle(delivery, verdict).await;
        }
    }

    /// The dead letter of a delivery that no consumer ever brought to an
    /// end: its job (when the body names one) ends `dead`.
    fn delivery_limit_reached(&self, delivery: &Delivery) -> Verdict {
        // Only the ids: parsing the transcript may be what killed the
        // consumers before.
        let (job_id, tenant) = recap_job::peek_ids(&delivery.data, &self.config.limits);
        let limit = self.config.retry.delivery_limit;
        Verdict::DeadLetter {
            code: "delivery_limit".into(),
            detail: format!(
                "delivered {} times without an outcome (retry.delivery_limit {limit}): \
                 its consumer stopped or died each time",
                limit + 1
            ),
            job_id,
            tenant,
        }
    }

    /// Carries out one verdict; a failure leaves the delivery unacked.
    async fn settle(&self, delivery: &Delivery, verdict: Verdict) {
        let attempt = queue::header_int(&delivery.properties, H_ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(1)
            .max(1);
        if let Err(e) = self.carry_out(delivery, verdict, attempt).await {
            // Nothing was acked: the broker redelivers when the channel closes.
            tracing::error!(error = %e, "could not settle a delivery; it stays unacked");
        }
    }

    async fn carry_out(
        &self,
        delivery: &Delivery,
        verdict: Verdict,
        attempt: u32,
    ) -> anyhow::Result<()> {
        match verdict {
            Verdict::Ack => {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Verdict::DeadLetter {
                code,
                detail,
                job_id,
                tenant,
            } => {
                self.dead_letter(delivery, job_id, tenant.as_deref(), &code, &detail)
                    .await?;
            }
            Verdict::Retry {
                code,
                detail,
                job_id,
                tenant,
            } => {
                if attempt >= self.config.retry.max_attempts {
                    let detail = format!("gave up after {attempt} attempts: {detail}");
                    self.dead_letter(delivery, Some(job_id), Some(&tenant), &code, &detail)
                        .await?;
                } else {
                    let delays = &self.config.retry.backoff_ms;
                    let ms = delays[(attempt as usize - 1).min(delays.len() - 1)];
                    let mut headers = queue::forwarded_headers(&delivery.properties);
                    headers.insert(
                        queue::short(H_ATTEMPT),
                        lapin::types::AMQPValue::LongInt((attempt + 1) as i32),
                    );
                    headers.insert(queue::short(H_REASON), queue::string_value(&code));
                    let props = copy_props(&delivery.properties, headers);
                    // The delay exchange is a fanout: the routing key travels
                    // with the message and brings it back to its own queue.
                    queue::publish_confirmed(
                        &self.publish,
                        &queue::delay_name(ms),
                        delivery.routing_key.as_str(),
                        &delivery.data,
                        props,
                    )
                    .await?;
                    tracing::warn!(%job_id, attempt, delay_ms = ms, code = %code, detail = %detail, "job failed; retrying after backoff");
                    delivery.ack(BasicAckOptions::default()).await?;
                }
            }
            Verdict::Requeue { detail } => {
                tracing::warn!(detail = %detail, "requeueing delivery");
                // Hold the delivery until the database answers again (or a
                // while passes), so that an outage does not become a hot loop
                // that burns the delivery limit and dead-letters good jobs.
                self.wait_for_database().await;
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// Waits, with backoff, until PostgreSQL answers: for up to ten minutes,
    /// and never past the broker's consumer timeout for this delivery.
    async fn wait_for_database(&self) {
        let mut pause = Duration::from_millis(500);
        let start = std::time::Instant::now();
        let timeout = Duration::from_secs(self.config.amqp.consumer_timeout_s);
        let margin = Duration::from_secs(self.config.amqp.consumer_timeout_margin_s());
        let until = (self.received + timeout)
            .checked_sub(margin)
            .unwrap_or(start)
            .min(start + Duration::from_secs(600));
        loop {
            let now = std::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep(pause.min(until - now)).await;
            if crate::store::ping(&self.pool).await {
                return;
            }
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    /// Records the death, publishes the message to `recap.dead` with its
    /// reason, and only then acks. If the database is down the message is
    /// requeued instead: a job never vanishes without its row.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        job_id: Option<Uuid>,
        tenant: Option<&str>,
        code: &str,
        detail: &str,
    ) -> anyhow::Result<()> {
        if let Some(id) = job_id {
            if let Err(e) =
                store::mark_ended(&self.pool, id, tenant, Status::Dead, code, detail).await
            {
                tracing::error!(error = %e, %id, "cannot record dead job; requeueing");
                self.wait_for_database().await;
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await?;
                return Ok(());
            }
        }
        if let Some(id) = job_id {
            let payload = crate::webhooks::event_payload(
                "job.failed",
                id,
                tenant.unwrap_or("(unknown)"),
                "dead",
                serde_json::json!({"error_code": code, "error": detail}),
            );
            if let Err(e) = crate::webhooks::publish_event(&self.publish, &payload).await {
                tracing::warn!(%id, error = %e, "failure event not published");
            }
        }
        let mut headers = queue::forwarded_headers(&delivery.properties);
        headers.insert(queue::short(H_REASON), queue::string_value(code));
        headers.insert(queue::short(H_DETAIL), queue::string_value(detail));
        headers.insert(queue::short(H_SOURCE), queue::string_value(&self.queue));
        let props = copy_props(&delivery.properties, headers);
        queue::publish_confirmed(
            &self.publish,
            queue::EXCHANGE_DEAD,
            code,
            &delivery.data,
            props,
        )
        .await?;
        let m = metrics();
        m.dead_letters_total.with_label_values(&[code]).inc();
        // A dead letter is a job's end too: it counts in the error ratio.
        m.jobs_total
            .with_label_values(&[&self.tier_label, "", "dead"])
            .inc();
        tracing::warn!(job_id = ?job_id, code, detail, queue = %self.queue, "dead-lettered");
        delivery.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

/// Whether the broker will not deliver this message again: a quorum queue
/// counts the returns of a message in `x-delivery-count` and dead-letters
/// it once they pass its `x-delivery-limit`.
pub fn is_last_delivery(props: &BasicProperties, delivery_limit: u32) -> bool {
    queue::header_int(props, queue::H_DELIVERY_COUNT)
        .is_some_and(|n| n >= i64::from(delivery_limit))
}

/// The original properties with new headers; persistent whatever the
/// producer said, since the copy must survive a broker restart.
fn copy_props(orig: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(ct) = orig.content_type() {
        p = p.with_content_type(ct.clone());
    }
    if let Some(id) = orig.message_id() {
        p = p.with_message_id(id.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    fn with_count(n: Option<AMQPValue>) -> BasicProperties {
        let mut h = FieldTable::default();
        if let Some(v) = n {
            h.insert("x-delivery-count".into(), v);
        }
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn the_delivery_the_broker_makes_last_is_the_one_at_the_limit() {
        // First delivery: no header. Then 1, 2, ... returns before this one.
        assert!(!is_last_delivery(&with_count(None), 5));
        assert!(!is_last_delivery(&BasicProperties::default(), 5));
        for n in 0..5 {
            assert!(!is_last_delivery(
                &with_count(Some(AMQPValue::LongLongInt(n))),
                5
            ));
        }
        assert!(is_last_delivery(
            &with_count(Some(AMQPValue::LongLongInt(5))),
            5
        ));
        assert!(is_last_delivery(
            &with_count(Some(AMQPValue::LongInt(9))),
            5
        ));
        assert!(is_last_delivery(
            &with_count(Some(AMQPValue::ShortShortUInt(1))),
            1
        ));
        // What recap publishes on from a delivery drops the count and
        // keeps the rest.
        let mut h = FieldTable::default();
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(4));
        h.insert(queue::short(H_ATTEMPT), AMQPValue::LongInt(2));
        let fwd = queue::forwarded_headers(&BasicProperties::default().with_headers(h));
        assert!(!fwd.contains_key("x-delivery-count"));
        assert_eq!(fwd.inner().get(H_ATTEMPT), Some(&AMQPValue::LongInt(2)));
        assert!(queue::forwarded_headers(&BasicProperties::default())
            .inner()
            .is_empty());
        // A header of another type is not a count.
        assert!(!is_last_delivery(
            &with_count(Some(AMQPValue::LongString("5".into()))),
            5
        ));
    }
}
