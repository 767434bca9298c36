//! Which jobs a change wakes (a job's own transitions, Pods, quotas, tools, RBAC): only those it
//! could move, found through the indexes (index.rs), never by scanning every job on every event.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use super::access::{RbacScope, TermHeads};
use super::index::{Key, Released};
use super::triggers::Triggers;
use super::watches::WatchBackoff;
use super::{Caches, snapshot};
use crate::api::{AgentJob, JobPhase};

fn job_ref(key: &Key) -> ObjectRef<AgentJob> {
    ObjectRef::new(&key.1).within(&key.0)
}

/// A Pod stopped holding node resources (it finished, went, or left the node): wakes the jobs
/// waiting for resources that this could let start: short of node room and now fitting on that
/// node, or short of quota in that Pod's namespace. In a busy cluster foreign Pods finish all the
/// time; each used to wake every waiting job.
pub fn capacity_released(caches: &Caches, requeue: &super::triggers::Triggers<AgentJob>, released: &[Released]) {
    if released.is_empty() {
        return;
    }
    let index = &caches.index;
    // A relist may report many Pods gone from the same node and namespace.
    let released: std::collections::BTreeSet<(&String, &String)> = released.iter().map(|r| (&r.node, &r.namespace)).collect();
    for (node, namespace) in released {
        let free = caches.nodes.get(&ObjectRef::new(node)).map(|n| snapshot::node_view(&n, index.pods().used_on(node)).free);
        for key in index.jobs().unblocked_by(free.as_ref(), namespace) {
            let _ = requeue.send(job_ref(&key));
        }
    }
}

/// A Node changed (capacity, readiness, taints): the jobs short of node room.
pub fn jobs_short_of_nodes(caches: &Caches) -> Vec<ObjectRef<AgentJob>> {
    caches.index.jobs().waiting().filter(|(_, s)| s.is_some_and(|s| s.node)).map(|(k, _)| job_ref(&k)).collect()
}

/// How long RBAC changes are gathered before the jobs they may concern are looked at again.
const RBAC_COALESCE: Duration = Duration::from_millis(500);

/// Any change to RBAC may make or unmake a category head. Only metadata is watched; rules are
/// never read. What a change costs, in a cluster where RBAC changes all the time:
/// - `Init` and `InitApply` (a relist replaying every Role and binding) are no change; the
///   relist's `InitDone` counts as a change anywhere, since changes may have been missed while
///   disconnected. Watch errors are no change either (the watch backs off and relists).
/// - Each change drops at once the cached head answers it may have changed (revoked rights stop
///   counting at once): those about its namespace for a Role or RoleBinding, all of them for a
///   ClusterRole or ClusterRoleBinding (`access::RbacScope`). When the burst has been gathered
///   (`RBAC_COALESCE`) they are dropped again, covering answers fetched meanwhile.
/// - Then, once per burst, the jobs awaiting approval that have votes are looked at again; a job
///   without a vote has nothing an RBAC change could count or uncount. Their answers about
///   namespaces the burst did not touch are still cached: no reviews are sent for them.
/// - Changes reach the gatherer through a channel of one: a burst waiting there is one change;
///   the scopes it touched wait in a set (bounded: past `MAX_SCOPES` namespaces it is the cluster).
///
/// The watch lives as long as the process (watches.rs): a retaken term lists no RBAC again. What
/// it drops goes to the current term's answers (`heads`); a new term starts with none cached
/// (`access::TermHeads`), and its requeues to the current term's controller (none while standing
/// by: a new term reconciles every job once anyway).
pub async fn watch_rbac(client: Client, heads: TermHeads, caches: Caches, requeue: Triggers<AgentJob>) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use kube::core::PartialObjectMeta;
    let wc = watcher::Config::default();
    // Init and InitApply replay a relist; errors are followed by one.
    fn namespaced<K: kube::Resource>(event: Result<watcher::Event<K>, watcher::Error>) -> Option<RbacScope> {
        match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => {
                Some(object.meta().namespace.clone().map_or(RbacScope::Cluster, RbacScope::Namespace))
            }
            Ok(watcher::Event::InitDone) => Some(RbacScope::Cluster),
            _ => None,
        }
    }
    fn cluster_wide<K>(event: Result<watcher::Event<K>, watcher::Error>) -> Option<RbacScope> {
        matches!(event, Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)).then_some(RbacScope::Cluster)
    }
    let changes = futures::stream::select_all([
        watcher(Api::<PartialObjectMeta<Role>>::all(client.clone()), wc.clone()).backoff(WatchBackoff::new()).map(namespaced).boxed(),
        watcher(Api::<PartialObjectMeta<RoleBinding>>::all(client.clone()), wc.clone())
            .backoff(WatchBackoff::new())
            .map(namespaced)
            .boxed(),
        watcher(Api::<PartialObjectMeta<ClusterRole>>::all(client.clone()), wc.clone())
            .backoff(WatchBackoff::new())
            .map(cluster_wide)
            .boxed(),
        watcher(Api::<PartialObjectMeta<ClusterRoleBinding>>::all(client), wc).backoff(WatchBackoff::new()).map(cluster_wide).boxed(),
    ])
    .filter_map(future::ready);
    let touched = std::sync::Mutex::new(std::collections::BTreeSet::<RbacScope>::new());
    let (changed, mut gathered) = mpsc::channel::<()>(1);
    let watch = changes.for_each(|scope| {
        heads.forget(&scope);
        {
            let mut touched = touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if scope == RbacScope::Cluster || touched.len() >= MAX_SCOPES {
                touched.clear();
                touched.insert(RbacScope::Cluster);
            } else if !touched.contains(&RbacScope::Cluster) {
                touched.insert(scope);
            }
        }
        let _ = changed.try_send(());
        future::ready(())
    });
    let act = async {
        while gathered.recv().await.is_some() {
            tokio::time::sleep(RBAC_COALESCE).await;
            let burst = std::mem::take(&mut *touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            for scope in &burst {
                heads.forget(scope);
            }
            for job in awaiting_with_votes(&caches) {
                let _ = requeue.send(job);
            }
        }
    };
    future::join(watch, act).await;
}

/// Beyond this many namespaces touched in one burst, the burst counts as a change anywhere.
const MAX_SCOPES: usize = 256;

fn awaiting_with_votes(caches: &Caches) -> Vec<ObjectRef<AgentJob>> {
    let awaiting: Vec<Key> = caches.index.jobs().awaiting_approval().collect();
    let votes = caches.index.votes();
    awaiting.iter().filter(|(ns, name)| !votes.naming(ns, name).is_empty()).map(job_ref).collect()
}

fn is_running(job: &AgentJob) -> bool {
    job.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Running)
}

/// Called from the AgentJob watch for each event before the cache takes it in, so the cache
/// still holds the previous copy; the requeues sent here are handled after the cache update.
/// - A job entering or leaving Running changes its tools' `status.inUse`.
/// - A job leaving Running (finished, failed, or deleted while running) frees node capacity and
///   rate limit: every job waiting for capacity is looked at again, highest priority first being
///   the readiness step's business (`snapshot::rate_limit_claims_ahead`, `queued_ahead_of`).
/// - After a relist, transitions may have been missed: everything waiting is looked at again.
pub fn requeue_on_transition(
    jobs: &kube::runtime::reflector::Store<AgentJob>,
    index: &super::index::Indexes,
    requeue: &super::triggers::Triggers<AgentJob>,
    tool_requeue: &super::triggers::Triggers<crate::api::AgentTool>,
    event: &kube::runtime::watcher::Event<AgentJob>,
) {
    use kube::runtime::watcher::Event;
    let (old, new): (Option<Arc<AgentJob>>, Option<&AgentJob>) = match event {
        Event::Apply(job) => (jobs.get(&ObjectRef::from_obj(job)), Some(job)),
        Event::Delete(job) => (jobs.get(&ObjectRef::from_obj(job)).or_else(|| Some(Arc::new(job.clone()))), None),
        Event::InitDone => {
            for waiting in waiting_jobs(jobs) {
                let _ = requeue.send(waiting);
            }
            let tools: std::collections::BTreeSet<String> =
                jobs.state_filter(|j| !j.spec.tools.is_empty()).iter().flat_map(|j| tools_of(j).collect::<Vec<_>>()).collect();
            for tool in tools {
                let _ = tool_requeue.send(ObjectRef::new(&tool));
            }
            return;
        }
        Event::Init | Event::InitApply(_) => return,
    };
    let was_running = old.as_deref().is_some_and(is_running);
    let now_running = new.is_some_and(is_running);
    if was_running == now_running {
        return;
    }
    let job = new.or(old.as_deref()).expect("one of old and new is a job");
    for tool in tools_of(job) {
        let _ = tool_requeue.send(ObjectRef::new(&tool));
    }
    if was_running {
        for waiting in waiting_for_capacity(index) {
            let _ = requeue.send(waiting);
        }
    }
}

/// Approved jobs that wait for node capacity, quota or rate limit. Jobs still awaiting approval
/// are left out: capacity does not move them, and with thousands of them every finished Pod or
/// Node update would reconcile them all; their readiness checks are refreshed when a vote comes
/// and on the resync.
fn waiting_for_capacity(index: &super::index::Indexes) -> Vec<ObjectRef<AgentJob>> {
    index.jobs().waiting().map(|((ns, name), _)| ObjectRef::new(&name).within(&ns)).collect()
}

/// After a relist: every job that waits, for votes or for capacity.
fn waiting_jobs(jobs: &kube::runtime::reflector::Store<AgentJob>) -> Vec<ObjectRef<AgentJob>> {
    refs(&jobs.state_filter(|j| {
        j.status.as_ref().is_some_and(|s| s.phase == Some(JobPhase::WaitingForResources) || s.phase == Some(JobPhase::AwaitingApproval))
    }))
}

fn refs(jobs: &[Arc<AgentJob>]) -> Vec<ObjectRef<AgentJob>> {
    jobs.iter().map(|j| ObjectRef::from_obj(j.as_ref())).collect()
}

fn tools_of(job: &AgentJob) -> impl Iterator<Item = String> + '_ {
    job.spec.tools.iter().map(|t| t.name.clone())
}

pub fn jobs_affected_by_pod(caches: &Caches, pod: &Pod) -> Vec<ObjectRef<AgentJob>> {
    let namespace = pod.namespace().unwrap_or_default();
    let owner: Vec<ObjectRef<AgentJob>> = pod
        .owner_references()
        .iter()
        .filter(|o| o.controller == Some(true) && o.kind == "AgentJob" && o.api_version.starts_with("agentgate.dev/"))
        .map(|o| ObjectRef::new(&o.name).within(&namespace))
        .collect();
    // A Pod posing as a job (its uid label names a job that is not its controller here) wakes
    // that job, which reports it. An agent Pod costs one cache lookup: its controller has the uid.
    let posed_as = snapshot::labelled_job_uid(pod)
        .filter(|uid| !owner.iter().any(|o| caches.jobs.get(o).is_some_and(|j| j.metadata.uid.as_deref() == Some(*uid))))
        .and_then(|uid| caches.index.jobs().by_uid(uid).map(|(ns, name)| ObjectRef::new(&name).within(&ns)));
    // A Pod that stops or goes wakes the waiting jobs its capacity could let start, once the
    // index has taken it in (wakeups::capacity_released), not every waiting job.
    owner.into_iter().chain(posed_as).collect()
}

pub fn jobs_waiting_for_capacity(caches: &Caches, namespace: Option<&str>) -> Vec<ObjectRef<AgentJob>> {
    waiting_for_capacity(&caches.index).into_iter().filter(|j| namespace.is_none() || j.namespace.as_deref() == namespace).collect()
}

pub fn jobs_naming_tool(caches: &Caches, tool: &str) -> Vec<ObjectRef<AgentJob>> {
    caches.index.jobs().unfinished_naming(tool).map(|(ns, name)| ObjectRef::new(&name).within(&ns)).collect()
}
