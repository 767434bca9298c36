//! Persistence of what the estimator learned ([`crate::domain::learning`]) in the ConfigMap
//! `agentgate-estimator` (key `state.json`) of the operator's lease namespace, so it survives
//! the deletion of the jobs it learned from and operator restarts. Only the leader runs this.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::domain::learning::EstimatorState;

pub const CONFIG_MAP: &str = "agentgate-estimator";
pub const KEY: &str = "state.json";
pub const FIELD_MANAGER: &str = "agentgate-estimator";
/// Changes are written back at most this often (and once more on shutdown).
pub const DEBOUNCE: Duration = Duration::from_secs(3);

pub struct Learner {
    pub state: tokio::sync::Mutex<EstimatorState>,
    dirty: AtomicBool,
    /// Held across a write: a flush that finds nothing dirty returns only once a write in
    /// flight has ended, so "flushed" means "in the ConfigMap" (controller/learning_mark.rs).
    writing: tokio::sync::Mutex<()>,
    namespace: String,
}

impl Learner {
    /// Reads the persisted state; missing or corrupt gives an empty state (and a warning).
    ///
    /// An unreachable apiserver is waited out, never taken for a missing state: starting empty
    /// would overwrite what was learned with the first write back.
    pub async fn load(client: &Client, namespace: &str) -> Learner {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let mut delay = Duration::from_millis(500);
        let text = loop {
            match api.get_opt(CONFIG_MAP).await {
                Ok(cm) => break cm.and_then(|cm| cm.data?.remove(KEY)),
                Err(e) => {
                    tracing::warn!(%e, retry_in = ?delay, "reading the estimator state; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        let (state, warning) = EstimatorState::from_json(text.as_deref());
        if let Some(w) = warning {
            tracing::warn!(configmap = %format!("{namespace}/{CONFIG_MAP}"), "{w}");
        }
        tracing::info!(job_types = state.job_types.len(), "loaded the estimator state");
        Learner {
            state: tokio::sync::Mutex::new(state),
            dirty: AtomicBool::new(false),
            writing: tokio::sync::Mutex::new(()),
            namespace: namespace.to_string(),
        }
    }

    /// Marks the state as changed: the writer applies it within DEBOUNCE.
    pub fn touch(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the state back if it changed since the last write. False when the write failed
    /// (it is retried by the writer).
    pub async fn flush(&self, client: &Client) -> bool {
        let _writing = self.writing.lock().await;
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return true;
        }
        let text = self.state.lock().await.to_json();
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIG_MAP, "labels": {"app.kubernetes.io/managed-by": "agentgate"}},
            "data": {KEY: text},
        });
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
        if let Err(e) = api.patch(CONFIG_MAP, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm)).await {
            tracing::warn!(%e, "could not write the estimator state; will retry");
            self.dirty.store(true, Ordering::Release);
            return false;
        }
        true
    }

    /// Writes changes back every DEBOUNCE; runs until dropped.
    pub async fn run_writer(&self, client: Client) {
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            self.flush(&client).await;
        }
    }
}
