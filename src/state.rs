//! State shared by the controller, which writes it, and the HTTP server, which reports it.
//! Its own module so that neither imports the other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::runtime::reflector::Store;

use crate::api::AgentJob;

/// Liveness and readiness as /healthz and /readyz report them.
#[derive(Default)]
pub struct Health {
    pub caches_synced: AtomicBool,
    /// False while this replica stands by for the leader's lease.
    pub leading: AtomicBool,
    /// What keeps the identity admission policies from being in force (empty: nothing); None
    /// while not leading or not yet verified. Reported by /readyz, which stays ready (see README).
    pub identity_problems: std::sync::RwLock<Option<Vec<String>>>,
    /// Writes what the caches of the current term of leadership hold (`GET /debug/memory`);
    /// None while not leading.
    pub memory_report: std::sync::RwLock<Option<MemoryReport>>,
    /// The agent Pods the current term of leadership caches: the meter API serves only tokens
    /// claiming one of them (controller/meter_auth.rs). None while not leading.
    pub agent_pods: std::sync::RwLock<Option<Store<k8s_openapi::api::core::v1::Pod>>>,
}

/// Renders `GET /debug/memory` (controller/memory.rs).
pub type MemoryReport = Arc<dyn Fn() -> String + Send + Sync>;

impl Health {
    /// A standby is ready (it is healthy and waiting); the leader once its caches are synced.
    pub fn ready(&self) -> bool {
        !self.leading.load(Ordering::Relaxed) || self.caches_synced.load(Ordering::Relaxed)
    }
}

/// The job cache of the current term of leadership, if any; replaced at each new term.
pub type JobsForMetrics = Arc<std::sync::RwLock<Option<Store<AgentJob>>>>;
