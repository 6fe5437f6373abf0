//! recap as a library: the roles (router, worker, gateway), the store,
//! the queue, and the commands, which the `recap` binary (`main.rs`)
//! dispatches to. `startup` is the composition root the long-running roles
//! share.

pub mod bench;
pub mod calibrate;
pub mod config;
pub mod consume;
pub mod engines;
pub mod enqueue;
pub mod eval;
pub mod gateway;
pub mod hub;
pub mod metrics;
pub mod models;
pub mod policy;
pub mod policy_cmd;
pub mod probes;
pub mod queue;
pub mod router;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod submit;
pub mod summarize;
pub mod tenants;
pub mod train;
pub mod webhooks;
pub mod worker;
