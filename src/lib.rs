//! agentgate: a Kubernetes operator that estimates, checks, gates on approval and meters AI-agent jobs.

pub mod api;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod evaluation;
pub mod kube_client;
pub mod leader;
pub mod meter;
pub mod metrics;
pub mod plugin;
pub mod review;
pub mod server;
pub mod signal;
pub mod state;
pub mod telemetry;
pub mod text_table;

// The operator's allocator (main.rs) in the unit tests too, so that they can size what the caches
// hold with its per-thread counter (controller/memory.rs).
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
