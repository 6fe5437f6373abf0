//! recap as a library: the roles (router, worker, gateway), the store,
//! the queue, and the commands, which the `recap` binary (`main.rs`)
//! dispatches to. `startup` is the composition root the long-running roles
//! share; `process` is what each binary does before its runtime starts.
//!
//! What runs no model (config, store, queue, webhooks, metrics, probes,
//! the gateway) lives in `recap-service` and is re-exported here, so that
//! `recap::store` and `crate::store` name the same module.
//! The benchmarks' side is a separate binary, `recap-bench`
//! (`src/bin/recap-bench/`), outside the serving one.

pub mod calibrate;
pub mod consume;
pub mod engines;
pub mod enqueue;
pub mod eval;
pub mod hub;
pub mod models;
pub mod policy;
pub mod policy_cmd;
pub mod router;
pub mod startup;
pub mod submit;
pub mod summarize;
pub mod train;
pub mod worker;

pub use recap_service::{
    config, gateway, metrics, probes, process, queue, shutdown, store, tenants, webhooks,
};
