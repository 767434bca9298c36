//! The shell around [`super::plan`]: a loop woken by the Service, AgentTool (and Namespace)
//! watches that applies the plan with server-side apply and publishes Events on the Services.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::{
    DISCOVERED, DISCOVERED_FROM, DISCOVERY_CONFLICT, DISCOVERY_ERROR, DesiredTool, ExistingTool, FIELD_MANAGER, ServiceView, Warning,
    Write, plan,
};
use crate::api::AgentTool;
use crate::controller::{Context, RESYNC, UNSYNCED_RETRY};

/// Bursts of watch events (a relist, a `kubectl apply` of many Services) are decided once.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A failed write is tried again after this long.
const RETRY: Duration = Duration::from_secs(5);

/// The namespaces discovered in (their metadata, selected by the server), watched for as long as
/// the process lives (controller/watches.rs), so a retaken term lists them no more than the
/// Services; every change wakes `trigger`. None (and no watch) without a selector.
pub fn watch_namespaces(
    client: &kube::Client,
    selector: Option<&str>,
    trigger: Arc<Notify>,
) -> Option<(Store<PartialObjectMeta<Namespace>>, impl Future<Output = ()> + Send + 'static + use<>)> {
    let (store, writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let watch = watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default().labels(selector?))
        .backoff(crate::controller::watches::WatchBackoff::new())
        .reflect(writer)
        .touched_objects()
        .for_each(move |_| {
            trigger.notify_one();
            std::future::ready(())
        });
    Some((store, watch))
}

/// Runs discovery until dropped. `trigger` is notified by the Service, AgentTool and Namespace
/// watches; `namespaces`, from [`watch_namespaces`].
pub async fn run(ctx: Arc<Context>, trigger: Arc<Notify>, namespaces: Option<Store<PartialObjectMeta<Namespace>>>) {
    // Opt-in: without a selector no namespace is discovered in, and nothing is touched.
    if ctx.settings.discovery_namespace_selector.is_none() || namespaces.is_none() {
        tracing::info!("tool discovery is off (no --discovery-namespace-selector)");
        return std::future::pending().await;
    }
    discover(ctx, trigger, namespaces).await
}

async fn discover(ctx: Arc<Context>, trigger: Arc<Notify>, namespaces: Option<Store<PartialObjectMeta<Namespace>>>) {
    let mut memory = Memory::default();
    loop {
        tokio::select! {
            _ = trigger.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        use futures::FutureExt;
        let ready = |r: Option<Result<(), reflector::store::WriterDropped>>| matches!(r, Some(Ok(())));
        let synced = namespaces.as_ref().is_none_or(|s| ready(s.wait_until_ready().now_or_never()))
            && ready(ctx.caches.services.wait_until_ready().now_or_never())
            && ready(ctx.caches.tools.wait_until_ready().now_or_never());
        if !synced {
            tokio::time::sleep(UNSYNCED_RETRY).await;
            trigger.notify_one();
            continue;
        }
        if !pass(&ctx, namespaces.as_ref(), &mut memory).await {
            let trigger = trigger.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RETRY).await;
                trigger.notify_one();
            });
        }
    }
}

/// What earlier passes did.
#[derive(Default)]
struct Memory {
    /// Warnings already published, per Service, so that each is published once while it lasts.
    reported: BTreeMap<(String, String), BTreeSet<(&'static str, String)>>,
    /// Per tool, the last applied tool and the uid and generation the apply returned. When the
    /// plan asks for the same again and the tool's spec has not changed since, the difference the
    /// plan saw lies in fields another manager owns (a description set by hand, say), which an
    /// apply leaves as they are: applying again would only repeat a no-op on every pass.
    applied: BTreeMap<String, (DesiredTool, Mark)>,
}

/// What discovery sets on a tool, besides its spec, with the generation that tells a spec change.
#[derive(Clone, Debug, PartialEq)]
struct Mark {
    uid: Option<String>,
    generation: Option<i64>,
    discovered: Option<String>,
    from: Option<String>,
    error: Option<String>,
    conflict: Option<String>,
}

impl Mark {
    fn of(tool: &AgentTool) -> Mark {
        Mark {
            uid: tool.metadata.uid.clone(),
            generation: tool.metadata.generation,
            discovered: tool.labels().get(DISCOVERED).cloned(),
            from: tool.annotations().get(DISCOVERED_FROM).cloned(),
            error: tool.annotations().get(DISCOVERY_ERROR).cloned(),
            conflict: tool.annotations().get(DISCOVERY_CONFLICT).cloned(),
        }
    }
}

/// One decision over the caches, applied. False when a write should be tried again.
async fn pass(ctx: &Context, namespaces: Option<&Store<PartialObjectMeta<Namespace>>>, memory: &mut Memory) -> bool {
    let services: Vec<ServiceView> = ctx.caches.services.state().iter().filter_map(|s| ServiceView::of(s)).collect();
    let tools: Vec<ExistingTool> = ctx.caches.tools.state().iter().map(|t| ExistingTool::of(t)).collect();
    let in_scope = |ns: &str| namespaces.is_none_or(|store| store.get(&ObjectRef::new(ns)).is_some());
    let mut plan = plan(&services, &tools, &in_scope);

    let mut all_done = true;
    let api: Api<AgentTool> = Api::all(ctx.client.clone());
    for write in &plan.writes {
        match write {
            Write::Apply { tool, uid, create } => {
                let cached = ctx.caches.tools.get(&ObjectRef::new(&tool.name)).map(|t| Mark::of(&t));
                if cached.is_some()
                    && memory.applied.get(&tool.name).is_some_and(|(last, mark)| last == tool.as_ref() && Some(mark) == cached.as_ref())
                {
                    continue;
                }
                let (namespace, service) = tool.from.split_once('/').unwrap_or_default();
                let mut metadata = json!({
                    "name": tool.name,
                    "labels": {DISCOVERED: "true"},
                    "annotations": {DISCOVERED_FROM: tool.from},
                });
                if let Some(error) = &tool.error {
                    metadata["annotations"][DISCOVERY_ERROR] = json!(error);
                }
                if let Some(conflict) = &tool.conflict {
                    metadata["annotations"][DISCOVERY_CONFLICT] = json!(conflict);
                }
                if let Some(uid) = uid {
                    // Refused (immutable field) if the tool was deleted and recreated meanwhile.
                    metadata["uid"] = json!(uid);
                }
                let patch = json!({"apiVersion": AgentTool::api_version(&()), "kind": AgentTool::kind(&()), "metadata": metadata, "spec": tool.spec});
                match api.patch(&tool.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
                    Ok(applied) => {
                        let mark = Mark::of(&applied);
                        memory.applied.insert(tool.name.clone(), (tool.as_ref().clone(), mark.clone()));
                        if cached.as_ref() == Some(&mark) {
                            continue; // a no-op
                        }
                        tracing::info!(tool = %tool.name, from = %tool.from, create, "applied discovered AgentTool");
                        let (reason, note) = if *create {
                            ("ToolDiscovered", format!("created AgentTool {} from this Service", tool.name))
                        } else {
                            ("ToolUpdated", format!("updated AgentTool {} from this Service's labels and annotations", tool.name))
                        };
                        publish(ctx, namespace, service, EventType::Normal, reason, note).await;
                    }
                    Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                        // Retrying cannot help; a change to the Service or the tool triggers anew.
                        tracing::warn!(tool = %tool.name, from = %tool.from, error = %s.message, "discovered AgentTool refused");
                        plan.warnings.push(Warning {
                            namespace: namespace.into(),
                            service: service.into(),
                            reason: "ToolApplyFailed",
                            note: format!("AgentTool {} could not be applied: {}", tool.name, s.message),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(tool = %tool.name, from = %tool.from, error = %e, "applying discovered AgentTool failed; retrying");
                        all_done = false;
                    }
                }
            }
            Write::Delete { name, uid, from, why } => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions { uid: uid.clone(), resource_version: None }),
                    ..DeleteParams::default()
                };
                match api.delete(name, &dp).await {
                    Ok(_) => {
                        tracing::info!(tool = %name, %from, %why, "deleted discovered AgentTool");
                        let (namespace, service) = from.split_once('/').unwrap_or_default();
                        publish(ctx, namespace, service, EventType::Normal, "ToolRemoved", format!("deleted AgentTool {name}: {why}"))
                            .await;
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        tracing::warn!(tool = %name, error = %e, "deleting discovered AgentTool failed; retrying");
                        all_done = false;
                    }
                }
            }
        }
    }

    let mut now: BTreeMap<(String, String), BTreeSet<(&'static str, String)>> = BTreeMap::new();
    for w in plan.warnings {
        now.entry((w.namespace, w.service)).or_default().insert((w.reason, w.note));
    }
    for ((namespace, service), warnings) in &now {
        let before = memory.reported.get(&(namespace.clone(), service.clone()));
        for (reason, note) in warnings.iter().filter(|w| before.is_none_or(|b| !b.contains(*w))) {
            tracing::warn!(%namespace, %service, reason, %note, "tool discovery");
            publish(ctx, namespace, service, EventType::Warning, reason, note.clone()).await;
        }
    }
    memory.reported = now;
    memory.applied.retain(|name, _| {
        plan.writes.iter().any(|w| matches!(w, Write::Apply { tool, .. } if &tool.name == name))
            || ctx.caches.tools.get(&ObjectRef::new(name)).is_some()
    });
    all_done
}

/// An Event on the Service, if it still exists, through the operator's bounded Event queue like
/// every other Event. The queue's series key includes the note, so a changed note (a conflict's
/// new state) is a new Event rather than a count on the old one; `pass` publishes each warning
/// once while it lasts.
async fn publish(ctx: &Context, namespace: &str, service: &str, type_: EventType, reason: &str, note: String) {
    let Some(svc) = ctx.caches.services.get(&ObjectRef::<Service>::new(service).within(namespace)) else { return };
    ctx.publish_event(&svc.object_ref(&()), type_, reason, &note, "Discover").await;
}
