//! Evaluation as pure code: ROUGE scores, QMSum cases, bootstrap confidence
//! intervals, the quality-cost frontier and the reports. The `recap eval`
//! command runs the engines and does the IO around these.

pub mod frontier;
pub mod qmsum;
pub mod report;
pub mod rouge;
pub mod stats;
