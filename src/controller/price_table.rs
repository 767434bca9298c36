//! The price table ConfigMap, watched so that an admin's edit applies within a second, without
//! restarting the operator.
//!
//! Key `prices.yaml` of the ConfigMap named by `--price-config-map` (in the operator's namespace)
//! adds to or overrides the base table (built-in list prices plus `--price-table`, if given). A
//! table that does not parse is refused as a whole: the previous one stays in force, and a
//! Warning Event on the ConfigMap says why, so `kubectl describe configmap` shows the mistake.
//! Deleting the ConfigMap goes back to the base table. Jobs that were waiting for a price
//! (`UnknownModel`) are looked at again after every change.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::RwLock;

use super::decode;
use super::triggers::Triggers;
use super::watches::WatchBackoff;
use crate::api::AgentJob;
use crate::domain::conditions::condition;
use crate::domain::pricing::PriceTable;

pub const KEY: &str = "prices.yaml";

/// What a ConfigMap's content means for the price table in force.
#[derive(Debug, PartialEq)]
pub enum Update {
    Replace(PriceTable),
    /// Keep the current table; the reason goes into a Warning Event.
    Refuse(String),
}

/// The table a ConfigMap's data gives on top of `base` (None: the ConfigMap is gone).
pub fn table_from(base: &PriceTable, data: Option<&std::collections::BTreeMap<String, String>>) -> Update {
    let Some(data) = data else { return Update::Replace(base.clone()) };
    match data.get(KEY) {
        None => Update::Refuse(format!("the ConfigMap has no key {KEY:?}: keeping the prices in force")),
        Some(yaml) => match base.overridden_by_yaml(yaml) {
            Ok(table) => Update::Replace(table),
            Err(e) => Update::Refuse(format!("{e}; keeping the prices in force")),
        },
    }
}

/// What the price watch changes and tells: the table in force, the current term's Events
/// (none while standing by: a standby writes nothing) and controller.
pub struct Listeners {
    pub prices: Arc<RwLock<PriceTable>>,
    pub reporter: decode::Reporter,
    pub jobs: Store<AgentJob>,
    pub requeue: Triggers<AgentJob>,
}

/// Runs until the watch ends (never, in practice: the watcher retries with backoff). It lives as
/// long as the process (watches.rs): a retaken term lists nothing again, and `base` is the table
/// the operator started with, not one an earlier term's ConfigMap had already overridden.
pub async fn watch(client: Client, told: Listeners, namespace: String, name: String, base: PriceTable) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).backoff(WatchBackoff::new()).boxed();
    while let Some(event) = events.next().await {
        let (config_map, data) = match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                let data = cm.data.clone().unwrap_or_default();
                (Some(cm), Some(data))
            }
            Ok(watcher::Event::Delete(_)) => (None, None),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(e) => {
                tracing::warn!(%e, configmap = %format!("{namespace}/{name}"), "watching the price table");
                continue;
            }
        };
        match table_from(&base, data.as_ref()) {
            Update::Replace(table) => {
                let models = table.models.len();
                let changed = *told.prices.read().await != table;
                *told.prices.write().await = table;
                if changed {
                    tracing::info!(models, configmap = %format!("{namespace}/{name}"), "price table loaded");
                    if let (Some(cm), Some(events)) = (&config_map, told.reporter.term_events()) {
                        let note = format!("{models} model prices in force");
                        events.record(&cm.object_ref(&()), EventType::Normal, "PriceTableLoaded", note, "LoadPrices").await;
                    }
                    requeue_unpriced(&told);
                }
            }
            Update::Refuse(reason) => {
                tracing::warn!(configmap = %format!("{namespace}/{name}"), "{reason}");
                if let (Some(cm), Some(events)) = (&config_map, told.reporter.term_events()) {
                    events.record(&cm.object_ref(&()), EventType::Warning, "PriceTableInvalid", reason, "LoadPrices").await;
                }
            }
        }
    }
}

/// Jobs whose estimate failed for want of a price get another chance.
fn requeue_unpriced(told: &Listeners) {
    for job in told.jobs.state() {
        let unpriced = job.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == condition::ESTIMATED && c.status == "False" && c.reason == "UnknownModel")
        });
        if unpriced {
            let _ = told.requeue.send(ObjectRef::from_obj(job.as_ref()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(yaml: &str) -> std::collections::BTreeMap<String, String> {
        [(KEY.to_string(), yaml.to_string())].into()
    }

    #[test]
    fn a_valid_table_adds_to_the_base() {
        let base = PriceTable::builtin();
        let Update::Replace(table) = table_from(
            &base,
            Some(&data("models:\n  local-llm: {inputPerMillion: 0.01, cachedInputPerMillion: 0, outputPerMillion: 0.02}\n")),
        ) else {
            panic!("refused")
        };
        assert!(table.get("local-llm").is_some() && table.get("gpt-4o").is_some());
    }

    #[test]
    fn a_broken_table_or_a_missing_key_is_refused_with_the_reason() {
        let base = PriceTable::builtin();
        let broken = table_from(&base, Some(&data("models:\n  x: {inputPerMillion: -3}\n")));
        assert!(matches!(&broken, Update::Refuse(r) if r.contains("keeping the prices in force")), "{broken:?}");
        let missing = table_from(&base, Some(&Default::default()));
        assert!(matches!(&missing, Update::Refuse(r) if r.contains("prices.yaml")), "{missing:?}");
    }

    #[test]
    fn a_deleted_config_map_restores_the_base() {
        let base = PriceTable::builtin();
        assert_eq!(table_from(&base, None), Update::Replace(base));
    }
}
