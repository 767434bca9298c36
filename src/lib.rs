//! agentgate: a Kubernetes operator that estimates, checks, gates on approval and meters AI-agent jobs.

pub mod api;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod evaluation;
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
