//! recap without its models: what the gateway runs on, and what the router
//! and the workers share with it. The configuration, the job store (the
//! PostgreSQL state machine every write to `jobs` goes through), the queue
//! topology, webhooks, metrics, probes and shutdown, what every role
//! starts with (`role`), tenants, and the HTTP gateway. Nothing here links
//! candle: the `recap` crate adds the engine, the router and the workers on
//! top.

pub mod config;
pub mod gateway;
pub mod metrics;
pub mod probes;
pub mod process;
pub mod queue;
pub mod role;
pub mod shutdown;
pub mod store;
pub mod tenants;
pub mod webhooks;
