//! RabbitMQ: the topology recap declares, and publishing with confirms.
//!
//! ```text
//! recap.jobs (direct) --ingest--> recap.ingest   (router)
//!                     --compact-> recap.compact  (compact workers)
//!                     --large---> recap.large    (large workers)
//! recap.delay.<ms> (fanout) --> queue recap.delay.<ms>, TTL <ms>, dead-letters
//!                               back to recap.jobs with the original routing key
//! recap.dead (fanout) --> recap.dead: refused jobs, exhausted retries, and
//!                         messages over the delivery limit
//! recap.events (topic): job.completed.<tenant>, job.failed.<tenant>
//! ```
//!
//! Work queues are quorum queues with a delivery limit, so a message that
//! kills its consumer every time ends up in `recap.dead` instead of looping.

use crate::config::{redact_url, Config};
use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use recap_policy::Tier;
use uuid::Uuid;

pub const EXCHANGE_JOBS: &str = "recap.jobs";
pub const EXCHANGE_DEAD: &str = "recap.dead";
pub const EXCHANGE_EVENTS: &str = "recap.events";
pub const QUEUE_INGEST: &str = "recap.ingest";
pub const QUEUE_DEAD: &str = "recap.dead";
pub const ROUTE_INGEST: &str = "ingest";

/// Header: why a message was dead-lettered (a stable code).
pub const H_REASON: &str = "x-recap-reason";
/// Header: the human sentence behind the code.
pub const H_DETAIL: &str = "x-recap-detail";
/// Header: the queue the message was taken from when it died.
pub const H_SOURCE: &str = "x-recap-source-queue";
/// Header: the model the router chose (the tier's model, or the extractive baseline).
pub const H_MODEL: &str = "x-recap-model";
/// Header: a shadow run for calibration; its output is recorded, never returned.
pub const H_SHADOW: &str = "x-recap-shadow";
/// Header: set on a job sent on to the large tier by the cascade.
pub const H_CASCADE: &str = "x-recap-cascade";
/// Header: how many tries the job has had (1 on first delivery).
pub const H_ATTEMPT: &str = "x-recap-attempt";

/// Header: how many times a quorum queue has had this message back
/// (absent on its first delivery). Set by the broker, never by recap.
pub const H_DELIVERY_COUNT: &str = "x-delivery-count";

/// A delivery's headers for a message recap publishes on from it (to a
/// tier, a delay queue, recap.dead): all but the broker's return count,
/// which belongs to this delivery and which a queue passes through
/// unchanged on a new message's first delivery.
pub fn forwarded_headers(props: &BasicProperties) -> FieldTable {
    let Some(headers) = props.headers() else {
        return FieldTable::default();
    };
    headers
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != H_DELIVERY_COUNT)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into()
}

/// A tier's work queue, which its routing key reaches.
pub fn tier_queue(tier: Tier) -> String {
    format!("recap.{}", tier.as_str())
}

pub fn delay_name(ms: u64) -> String {
    format!("recap.delay.{ms}ms")
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("publish to {exchange}/{routing_key} was not confirmed by the broker (nack)")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("publish to {exchange}/{routing_key} was returned unroutable: is the topology declared (`recap migrate`)?")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("the RabbitMQ topology is missing {0}: run `recap migrate` first")]
    MissingTopology(String),
}

pub async fn connect(config: &Config, name: &str) -> Result<Connection, QueueError> {
    let conn_props = ConnectionProperties::default().with_client_property(
        "connection_name".into(),
        LongString::from(format!("recap {name} pid {}", std::process::id())),
    );
    Connection::connect(&config.amqp.url, conn_props)
        .await
        .map_err(|source| QueueError::Connect {
            url: redact_url(&config.amqp.url),
            source,
        })
}

/// A channel in confirm mode: every publish on it is confirmed.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, QueueError> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

pub async fn consumer_channel(conn: &Connection, prefetch: u16) -> Result<Channel, QueueError> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch)
}

/// Consumer arguments: the delivery acknowledgement timeout recap was
/// configured for (RabbitMQ 3.12+ applies it to this consumer; older brokers
/// ignore it and use their `consumer_timeout`).
pub fn consumer_arguments(config: &Config) -> FieldTable {
    let mut args = FieldTable::default();
    let ms = config.amqp.consumer_timeout_s.saturating_mul(1000);
    args.insert(
        "x-consumer-timeout".into(),
        AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
    );
    args
}

fn work_queue_args(config: &Config) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(config.retry.delivery_limit as i32),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(EXCHANGE_DEAD.into()),
    );
    // At-least-once dead-lettering needs reject-publish overflow: a message
    // over the delivery limit is moved, never dropped.
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

fn durable_exchange(passive: bool) -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        passive,
        ..ExchangeDeclareOptions::default()
    }
}

/// Declares the whole topology; safe to run any number of times.
pub async fn declare_topology(conn: &Connection, config: &Config) -> Result<(), QueueError> {
    let ch = conn.create_channel().await?;
    let opts = durable_exchange(false);
    ch.exchange_declare(
        EXCHANGE_JOBS.into(),
        ExchangeKind::Direct,
        opts,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        EXCHANGE_DEAD.into(),
        ExchangeKind::Fanout,
        opts,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        EXCHANGE_EVENTS.into(),
        ExchangeKind::Topic,
        opts,
        FieldTable::default(),
    )
    .await?;

    let mut dead_args = FieldTable::default();
    dead_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(QUEUE_DEAD.into(), durable, dead_args)
        .await?;
    ch.queue_bind(
        QUEUE_DEAD.into(),
        EXCHANGE_DEAD.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    let mut work = vec![(QUEUE_INGEST.to_string(), ROUTE_INGEST.to_string())];
    work.extend(Tier::ALL.map(|t| (tier_queue(t), t.as_str().to_string())));
    for (queue, key) in &work {
        ch.queue_declare(queue.as_str().into(), durable, work_queue_args(config))
            .await?;
        ch.queue_bind(
            queue.as_str().into(),
            EXCHANGE_JOBS.into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }

    // One delay queue per distinct backoff: a message waits out the TTL,
    // then dead-letters back to recap.jobs under its own routing key.
    let mut delays = config.retry.backoff_ms.clone();
    delays.sort_unstable();
    delays.dedup();
    for ms in delays {
        let name = delay_name(ms);
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Fanout,
            opts,
            FieldTable::default(),
        )
        .await?;
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(EXCHANGE_JOBS.into()),
        );
        ch.queue_declare(name.as_str().into(), durable, args)
            .await?;
        ch.queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.close(200, "topology declared".into()).await?;
    Ok(())
}

/// Checks, without creating anything, that the queue a process consumes and
/// the exchanges it publishes to exist. Each passive declare that fails
/// closes its channel, so each gets its own.
pub async fn check_topology(conn: &Connection, queue: &str) -> Result<(), QueueError> {
    for exchange in [EXCHANGE_JOBS, EXCHANGE_DEAD, EXCHANGE_EVENTS] {
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            durable_exchange(true),
            FieldTable::default(),
        )
        .await
        .map_err(|_| QueueError::MissingTopology(format!("exchange {exchange}")))?;
        let _ = ch.close(200, "ok".into()).await;
    }
    for q in [queue, QUEUE_DEAD] {
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|_| QueueError::MissingTopology(format!("queue {q}")))?;
        let _ = ch.close(200, "ok".into()).await;
    }
    Ok(())
}

/// Properties of a job message: JSON, persistent, `message_id` = job id.
pub fn job_properties(job_id: Option<Uuid>, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = job_id {
        p = p.with_message_id(id.to_string().into());
    }
    p
}

/// One message to publish.
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub payload: &'a [u8],
    pub props: BasicProperties,
    /// An unroutable message is an error (job queues), or not (events
    /// nobody listens to).
    pub mandatory: bool,
}

/// Publishes and waits for the broker's confirm; an unroutable publish is
/// an error, not a silent drop.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), QueueError> {
    let mut out = publish_all_confirmed(
        ch,
        vec![Outgoing {
            exchange,
            routing_key,
            payload,
            props,
            mandatory: true,
        }],
    )
    .await;
    out.pop().unwrap_or(Ok(()))
}

/// Publishes every message, then waits for all their confirms: the round
/// trips overlap (pipelined confirms) instead of adding up. One result per
/// message, in order; each is confirmed or refused on its own.
pub async fn publish_all_confirmed(
    ch: &Channel,
    messages: Vec<Outgoing<'_>>,
) -> Vec<Result<(), QueueError>> {
    // All publishes are handed to the connection's I/O loop together: one
    // wake-up writes them all, where awaiting each in turn cost a thread
    // hand-off per message. Each has its own delivery tag and confirm, so
    // their order on the wire does not matter.
    let targets: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m.exchange, m.routing_key))
        .collect();
    let sent = futures::future::join_all(messages.into_iter().map(|m| {
        ch.basic_publish(
            m.exchange.into(),
            m.routing_key.into(),
            BasicPublishOptions {
                mandatory: m.mandatory,
                ..BasicPublishOptions::default()
            },
            m.payload,
            m.props,
        )
    }))
    .await;
    let mut results = Vec::with_capacity(sent.len());
    for ((exchange, routing_key), sent) in targets.into_iter().zip(sent) {
        let result = match sent {
            Err(e) => Err(QueueError::from(e)),
            Ok(confirm) => match confirm.await {
                Err(e) => Err(QueueError::from(e)),
                Ok(c) if c.is_nack() => Err(QueueError::Nacked {
                    exchange: exchange.into(),
                    routing_key: routing_key.into(),
                }),
                Ok(c) => match c.take_message() {
                    Some(_) => Err(QueueError::Unroutable {
                        exchange: exchange.into(),
                        routing_key: routing_key.into(),
                    }),
                    None => Ok(()),
                },
            },
        };
        results.push(result);
    }
    results
}

/// Reads a string header.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Reads a boolean header (absent is false).
pub fn header_bool(props: &BasicProperties, key: &str) -> bool {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
        .is_some_and(|v| matches!(v, AMQPValue::Boolean(true)))
}

/// Reads an integer header, whatever integer width the producer used.
pub fn header_int(props: &BasicProperties, key: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(*v as i64),
        AMQPValue::ShortShortUInt(v) => Some(*v as i64),
        AMQPValue::ShortInt(v) => Some(*v as i64),
        AMQPValue::ShortUInt(v) => Some(*v as i64),
        AMQPValue::LongInt(v) => Some(*v as i64),
        AMQPValue::LongUInt(v) => Some(*v as i64),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

pub fn string_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

pub fn short(s: &str) -> ShortString {
    // Header keys are our own constants, well under the 255-byte limit.
    ShortString::from(s)
}
