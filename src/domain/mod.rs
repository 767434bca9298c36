//! Domain logic as pure functions over plain data: no Kubernetes I/O in here.
//!
//! The reconciler dereferences the watch caches into these types ([`snapshot`]), calls [`decide::decide`],
//! builds Pods with [`pod_builder`], and applies the result.

pub mod approval_policy;
pub mod conditions;
pub mod decide;
pub mod digest;
pub mod estimate;
pub mod forecasters;
pub mod grants;
pub mod history;
pub mod learning;
pub mod meter_sidecar;
pub mod meter_tls;
pub mod meter_token;
pub mod money;
pub mod pod_builder;
pub mod pricing;
pub mod prior;
pub mod provenance;
pub mod quantity;
pub mod readiness;
pub mod recommend;
pub mod report;
pub mod retry_budget;
pub mod snapshot;
pub mod tally;
pub mod template;
pub mod terminal_text;
pub mod validate;
pub mod vote_wait;
pub mod writer_groups;
