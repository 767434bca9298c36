//! Which jobs a change elsewhere in the cluster wakes: only those it could move, found through
//! the indexes (index.rs), never by scanning every job on every foreign event.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, future};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::index::{Key, Released};
use super::{Caches, Context, snapshot};
use crate::api::AgentJob;

fn job_ref(key: &Key) -> ObjectRef<AgentJob> {
    ObjectRef::new(&key.1).within(&key.0)
}

/// A Pod stopped holding node resources (it finished, went, or left the node): wakes the jobs
/// waiting for resources that this could let start: short of node room and now fitting on that
/// node, or short of quota in that Pod's namespace. In a busy cluster foreign Pods finish all the
/// time; each used to wake every waiting job.
pub fn capacity_released(caches: &Caches, requeue: &mpsc::UnboundedSender<ObjectRef<AgentJob>>, released: &[Released]) {
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
    caches.index.jobs().waiting().filter(|(_, s)| s.is_some_and(|s| s.node)).map(|(k, _)| job_ref(k)).collect()
}

/// How long RBAC changes are gathered before the jobs they may concern are looked at again.
const RBAC_COALESCE: Duration = Duration::from_millis(500);

/// Any change to RBAC may make or unmake a category head. Only metadata is watched; rules are
/// never read. What a change costs, in a cluster where RBAC changes all the time:
/// - `Init` and `InitApply` (a relist replaying every Role and binding) are no change; the
///   relist's `InitDone` counts as one, since changes may have been missed while disconnected.
///   Watch errors are no change either (the watch backs off and relists).
/// - The cached head answers are forgotten on the first change of a burst (revoked rights stop
///   counting at once) and again when the burst has been gathered (`RBAC_COALESCE`), covering
///   answers fetched meanwhile.
/// - Then, once per burst, the jobs awaiting approval that have votes are looked at again; a job
///   without a vote has nothing an RBAC change could count or uncount.
/// - Changes reach the gatherer through a channel of one: a burst waiting there is one change.
pub async fn watch_rbac(client: Client, ctx: Arc<Context>) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use kube::core::PartialObjectMeta;
    let wc = watcher::Config::default();
    // Init and InitApply replay a relist; errors are followed by one.
    fn is_change<K>(event: Result<watcher::Event<K>, watcher::Error>) -> bool {
        matches!(event, Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone))
    }
    let changes = futures::stream::select_all([
        watcher(Api::<PartialObjectMeta<Role>>::all(client.clone()), wc.clone()).default_backoff().map(is_change).boxed(),
        watcher(Api::<PartialObjectMeta<RoleBinding>>::all(client.clone()), wc.clone()).default_backoff().map(is_change).boxed(),
        watcher(Api::<PartialObjectMeta<ClusterRole>>::all(client.clone()), wc.clone()).default_backoff().map(is_change).boxed(),
        watcher(Api::<PartialObjectMeta<ClusterRoleBinding>>::all(client), wc).default_backoff().map(is_change).boxed(),
    ])
    .filter(|change| future::ready(*change));
    let (changed, mut gathered) = mpsc::channel::<()>(1);
    let watch = changes.for_each(|_| {
        // The first change of a burst: forget now, the rest of the burst waits in the channel.
        if changed.try_send(()).is_ok() {
            ctx.heads.forget_all();
        }
        future::ready(())
    });
    let act = async {
        while gathered.recv().await.is_some() {
            tokio::time::sleep(RBAC_COALESCE).await;
            ctx.heads.forget_all();
            for job in awaiting_with_votes(&ctx.caches) {
                let _ = ctx.requeue.send(job);
            }
        }
    };
    future::join(watch, act).await;
}

fn awaiting_with_votes(caches: &Caches) -> Vec<ObjectRef<AgentJob>> {
    let awaiting: Vec<Key> = caches.index.jobs().awaiting_approval().cloned().collect();
    let votes = caches.index.votes();
    awaiting.iter().filter(|(ns, name)| !votes.naming(ns, name).is_empty()).map(job_ref).collect()
}
