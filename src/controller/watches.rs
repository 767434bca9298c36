//! The watches, their caches and indexes, kept for the life of the process; the controllers that
//! write run only while this replica leads (`lead` in mod.rs) and get their triggers from here
//! (triggers.rs).
//!
//! Why they outlive a term: a leader that lost its lease to a slow apiserver and retook it used
//! to drop every cache and relist them all, 20,000 foreign Pods included, for 6-13 s before it
//! served again (README "In a busy cluster"). Now a new term reconciles every cached job and tool
//! once, from the warm caches, with no LIST (tests/leader.rs
//! `a_leader_that_loses_and_retakes_its_lease_serves_again_without_relisting`). The small
//! watches are kept too (RBAC, identity admission policies, the price ConfigMap, the discovered
//! namespaces): each term used to list them again, and counted no vote until the policies were
//! listed. What is not kept is the head checks' cached answers: each term starts with none
//! (access::TermHeads), so an RBAC change made while this replica stood by cannot leave a
//! revoked head counted.
//!
//! Why they start at the first term and not at process start: a standby that has never led
//! holds no cache and opens no watch, as kube-controller-manager's standbys do. Each warm
//! standby would double the operator's memory (the caches are most of it: README "Memory at
//! 10,000 jobs") and the apiserver's watch load, for a takeover that is at most a lease (15 s)
//! plus one relist away anyway, and that happens only when a leader dies. A lost and retaken
//! lease, the case that relisted again and again, keeps its caches; so does a replica that led
//! once and now stands by, which may well lead again.

use std::sync::Arc;

use futures::{StreamExt, future, stream};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ResourceQuota, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use super::relist::OnceStored;
use super::triggers::Triggers;
use super::{
    Caches, PAGE_SIZE, Settings, access, agent_tool, decode, discovery, feed, identity_policies, index, meter_keys, pod_expectations,
    pod_finalizer, poke, price_table, scoped, slim, spec_history, tasks, wakeups,
};
use crate::api::{AgentJob, AgentTool, ApprovalVote};
use crate::domain::pricing::PriceTable;
use crate::metrics::Metrics;
use crate::state::Health;
use tokio::sync::RwLock;

/// Everything the watches keep between terms of leadership.
pub struct Watches {
    pub caches: Caches,
    /// Whole AgentTools, for the tool controller (`caches.tools` holds only their metadata).
    pub tools_whole: Store<AgentTool>,
    pub pod_expectations: Arc<pod_expectations::PodExpectations>,
    pub stored_revisions: Arc<spec_history::StoredRevisions>,
    pub secret_watch: Arc<agent_tool::SecretWatch>,
    pub meter_keys: Arc<meter_keys::KeysCache>,
    /// Jobs and tools to reconcile, handed to the current term's controllers.
    pub jobs_to_reconcile: Triggers<AgentJob>,
    pub tools_to_reconcile: Triggers<AgentTool>,
    /// Woken by every Service and AgentTool change; see discovery.rs.
    pub discovery_trigger: Arc<tokio::sync::Notify>,
    /// The namespaces tools are discovered in (`--discovery-namespace-selector`; None without).
    pub discovery_namespaces: Option<Store<PartialObjectMeta<Namespace>>>,
    /// Woken by Pods that hold the usage finalizer but whose job is not cached (pod_finalizer.rs).
    pub orphan_trigger: Arc<tokio::sync::Notify>,
    pub reporter: decode::Reporter,
    /// The current term's cached head answers, which the RBAC watch drops from (access.rs).
    pub heads: access::TermHeads,
    /// Whether the identity admission policies are in force, as their watches last saw them.
    pub identity: Arc<identity_policies::Gate>,
    tasks: tasks::Tasks,
}

impl Watches {
    /// Starts every watch, each on a task of its own, for as long as this value lives. The price
    /// ConfigMap's edits apply on top of `base_prices` into `prices`.
    pub fn start(
        client: &Client,
        settings: &Settings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        prices: Arc<RwLock<PriceTable>>,
        base_prices: PriceTable,
    ) -> Watches {
        let wc = watcher::Config::default();
        let (jobs, jobs_writer) = reflector::store();
        let (pods, pods_writer) = reflector::store();
        let (nodes, nodes_writer) = reflector::store();
        let (quotas, quotas_writer) = reflector::store();
        let (tools, tools_writer) = reflector::store();
        let (votes, votes_writer) = reflector::store();
        let (services, services_writer) = reflector::store();
        let (endpoint_slices, slices_writer) = reflector::store();
        let (tools_whole, tools_whole_writer) = reflector::store();
        let index = Arc::new(index::Indexes::default());
        let caches = Caches { jobs, pods, nodes, quotas, tools, votes, services, endpoint_slices, index };
        let watches = Watches {
            caches: caches.clone(),
            tools_whole: tools_whole.clone(),
            pod_expectations: Default::default(),
            stored_revisions: Default::default(),
            secret_watch: Default::default(),
            meter_keys: Default::default(),
            jobs_to_reconcile: Triggers::default(),
            tools_to_reconcile: Triggers::default(),
            discovery_trigger: Default::default(),
            discovery_namespaces: None,
            orphan_trigger: Default::default(),
            reporter: decode::Reporter::new(metrics.clone()),
            heads: Default::default(),
            identity: Default::default(),
            tasks: tasks::Tasks::default(),
        };
        let Watches { jobs_to_reconcile: requeue, tools_to_reconcile: tool_requeue, reporter, .. } = &watches;
        let mut tasks = tasks::Tasks::default();

        // Jobs entering or leaving Running requeue what waits on them, once the cache shows the change.
        let job_stream = decode::decoded_only(
            watcher(scoped::<decode::Decoded<AgentJob>>(client, &settings.namespace), wc.clone().page_size(PAGE_SIZE)),
            caches.jobs.clone(),
            reporter.clone(),
        )
        .backoff(WatchBackoff::new())
        // Before the slim, which leaves the requester out of the cached job (index.rs).
        .inspect(feed(&caches.index, |i, event| i.requesters().apply(event)))
        .modify(slim::job)
        .inspect({
            let (jobs, index, requeue, tool_requeue) = (caches.jobs.clone(), caches.index.clone(), requeue.clone(), tool_requeue.clone());
            let (expectations, revisions) = (watches.pod_expectations.clone(), watches.stored_revisions.clone());
            move |event| {
                if let Ok(event) = event {
                    wakeups::requeue_on_transition(&jobs, &index, &requeue, &tool_requeue, event);
                    if let watcher::Event::Delete(job) = event {
                        let uid = job.metadata.uid.as_deref().unwrap_or_default();
                        expectations.forget(uid);
                        revisions.forget(uid);
                    }
                }
            }
        })
        .reflect(jobs_writer)
        .inspect(feed(&caches.index, |i, event| i.jobs().apply(event)))
        .applied_once_stored()
        .filter_map(|job| future::ready(job.ok().map(|job| ObjectRef::from_obj(&job))));

        // Every Pod of the cluster is watched, slimmed and indexed, and agentgate's own Pods are
        // cached and mapped to the jobs they concern, on a task of its own (with 20,000 foreign
        // Pods the heaviest watch by far). Every Pod is indexed (node capacity); foreign Pods are
        // neither stored nor passed on.
        let pod_triggers = watcher(scoped::<Pod>(client, &None), wc.clone())
            .backoff(WatchBackoff::new())
            .modify(slim::pod)
            .modify({
                let (caches, namespace) = (caches.clone(), settings.namespace.clone());
                move |pod| slim::pod_scope(pod, namespace.as_deref(), |uid| caches.index.jobs().by_uid(uid).is_some())
            })
            .inspect({
                let (caches, requeue) = (caches.clone(), requeue.clone());
                move |event| {
                    if let Ok(event) = event {
                        let released = caches.index.pods().apply(event);
                        wakeups::capacity_released(&caches, &requeue, &released);
                    }
                }
            })
            .filter_map({
                let mut store = pods_writer;
                move |event| future::ready(event.map(|event| slim::store_agentgate_pods(&mut store, event)).transpose())
            })
            // Once stored: a reconcile that finds the expectation gone finds the Pod in the cache.
            .inspect({
                let expectations = watches.pod_expectations.clone();
                move |event| {
                    if let Ok(event) = event {
                        expectations.apply(event);
                    }
                }
            })
            .touched_once_stored()
            .filter_map(|pod| future::ready(pod.ok()))
            .flat_map({
                let (caches, orphans) = (caches.clone(), watches.orphan_trigger.clone());
                move |pod: Pod| {
                    if pod_finalizer::is_orphan_hint(&caches.jobs, &pod) {
                        orphans.notify_one();
                    }
                    stream::iter(wakeups::jobs_affected_by_pod(&caches, &pod))
                }
            });
        tasks.spawn_feeder(send_all(pod_triggers, requeue));

        let node_triggers = stored(watcher(Api::<Node>::all(client.clone()), wc.clone()), slim::node, nodes_writer, |_| {})
            .filter_map(|node| future::ready(node.ok()))
            .flat_map({
                let caches = caches.clone();
                move |_node: Node| stream::iter(wakeups::jobs_short_of_nodes(&caches))
            });
        let quota_triggers = stored(
            watcher(scoped::<ResourceQuota>(client, &settings.namespace), wc.clone()),
            slim::metadata,
            quotas_writer,
            feed(&caches.index, |i, event| i.quotas().apply(event)),
        )
        .filter_map(|quota| future::ready(quota.ok()))
        .flat_map({
            let caches = caches.clone();
            move |quota: ResourceQuota| stream::iter(wakeups::jobs_waiting_for_capacity(&caches, quota.namespace().as_deref()))
        });
        let tool_triggers = stored(
            decode::decoded_only(
                watcher(Api::<decode::Decoded<AgentTool>>::all(client.clone()), wc.clone()),
                caches.tools.clone(),
                reporter.clone(),
            ),
            slim::metadata,
            tools_writer,
            |_| {},
        )
        .inspect(poke(&watches.discovery_trigger))
        .filter_map(|tool| future::ready(tool.ok()))
        .flat_map({
            let caches = caches.clone();
            move |tool: AgentTool| stream::iter(wakeups::jobs_naming_tool(&caches, &tool.name_any()))
        });
        let vote_triggers = stored(
            decode::decoded_only(
                watcher(scoped::<decode::Decoded<ApprovalVote>>(client, &settings.namespace), wc.clone().page_size(PAGE_SIZE)),
                caches.votes.clone(),
                reporter.clone(),
            ),
            slim::vote,
            votes_writer,
            feed(&caches.index, |i, event| i.votes().apply(event)),
        )
        .filter_map(|vote| {
            future::ready(vote.ok().and_then(|vote| vote.namespace().map(|ns| ObjectRef::new(&vote.spec.job_ref.name).within(&ns))))
        });
        let job_triggers = stream::select_all([
            job_stream.boxed(),
            node_triggers.boxed(),
            quota_triggers.boxed(),
            tool_triggers.boxed(),
            vote_triggers.boxed(),
        ]);
        tasks.spawn_feeder(send_all(job_triggers, requeue));

        let services = watcher(Api::<Service>::all(client.clone()), wc.clone().page_size(PAGE_SIZE));
        let service_triggers = stored(services, slim::service, services_writer, |_| {})
            .inspect(poke(&watches.discovery_trigger))
            .filter_map(|svc| future::ready(svc.ok()))
            .flat_map({
                let caches = caches.clone();
                move |svc: Service| {
                    stream::iter(agent_tool::tools_using_service(&caches, &svc.namespace().unwrap_or_default(), &svc.name_any()))
                }
            });
        let slices = watcher(Api::<EndpointSlice>::all(client.clone()), wc.clone());
        let slice_triggers =
            stored(slices, slim::endpoint_slice, slices_writer, |_| {}).filter_map(|slice| future::ready(slice.ok())).flat_map({
                let caches = caches.clone();
                move |slice: EndpointSlice| {
                    let service = slice.labels().get("kubernetes.io/service-name").cloned().unwrap_or_default();
                    stream::iter(agent_tool::tools_using_service(&caches, &slice.namespace().unwrap_or_default(), &service))
                }
            });
        // Only Secrets' metadata is requested (never their data), and nothing is cached: a change
        // only triggers the tools naming the Secret, whose reconcile GETs it to look for the key,
        // and forgets the meter keys read from it (meter_keys.rs).
        let secret_triggers = watcher(Api::<PartialObjectMeta<Secret>>::all(client.clone()), wc.clone())
            .backoff(WatchBackoff::new())
            .inspect({
                let (secret_watch, meter_keys, keys_secret) =
                    (watches.secret_watch.clone(), watches.meter_keys.clone(), settings.meter.keys_secret.clone());
                move |event| {
                    secret_watch.observe(event);
                    meter_keys.observe(event, &keys_secret);
                }
            })
            .touched_objects()
            .filter_map(|secret| future::ready(secret.ok()))
            .flat_map({
                let caches = caches.clone();
                move |secret: PartialObjectMeta<Secret>| {
                    stream::iter(agent_tool::tools_using_secret(&caches, &secret.namespace().unwrap_or_default(), &secret.name_any()))
                }
            });
        // The tool controller's own watch: whole tools, every one a trigger once stored.
        let tool_self_triggers = decode::decoded_only(
            watcher(Api::<decode::Decoded<AgentTool>>::all(client.clone()), wc.clone()),
            tools_whole,
            reporter.clone(),
        )
        .backoff(WatchBackoff::new())
        .reflect(tools_whole_writer)
        .applied_once_stored()
        .filter_map(|tool| future::ready(tool.ok().map(|tool| ObjectRef::from_obj(&tool))));
        let tool_triggers =
            stream::select_all([tool_self_triggers.boxed(), service_triggers.boxed(), slice_triggers.boxed(), secret_triggers.boxed()]);
        tasks.spawn_feeder(send_all(tool_triggers, tool_requeue));

        // The small watches, kept too: before, each term listed them again.
        tasks.spawn_feeder(wakeups::watch_rbac(client.clone(), watches.heads.clone(), caches.clone(), requeue.clone()));
        let identity_listeners = identity_policies::Listeners { metrics, health, jobs: caches.jobs.clone(), requeue: requeue.clone() };
        tasks.spawn_feeder(identity_policies::run(watches.identity.clone(), client.clone(), identity_listeners));
        if let Some(name) = &settings.price_config_map {
            let price_listeners =
                price_table::Listeners { prices, reporter: reporter.clone(), jobs: caches.jobs.clone(), requeue: requeue.clone() };
            let namespace = settings.state_namespace.clone();
            tasks.spawn_feeder(price_table::watch(client.clone(), price_listeners, namespace, name.clone(), base_prices));
        }
        let selector = settings.discovery_namespace_selector.as_deref();
        let discovery_namespaces =
            discovery::watch_namespaces(client, selector, watches.discovery_trigger.clone()).map(|(store, watch)| {
                tasks.spawn_feeder(watch);
                store
            });

        Watches { tasks, discovery_namespaces, ..watches }
    }

    /// The term ended (or was lost before it began): triggers go nowhere until the next one.
    pub fn stand_by(&self) {
        self.jobs_to_reconcile.close();
        self.tools_to_reconcile.close();
    }

    /// Resolves only if a watch task ended: it panicked, and the operator then stops as a whole
    /// rather than go on deaf to a kind of event.
    pub async fn ended(&mut self) {
        self.tasks.ended().await
    }
}

/// True once every cache has its first full list (it stays so: a relist is swapped in whole).
pub fn synced(caches: &Caches, tools_whole: &Store<AgentTool>) -> bool {
    use futures::FutureExt;
    caches.synced() && matches!(tools_whole.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// The pipeline most kept watches share: retried after `WatchBackoff`, slimmed by `slim`, stored
/// through `writer`, each event then shown to `after_store` (an index), and every object touched
/// passed on once the store holds it (relist.rs).
fn stored<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    slim: impl FnMut(&mut K) + Send + 'static,
    writer: reflector::store::Writer<K>,
    after_store: impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    events.backoff(WatchBackoff::new()).modify(slim).reflect(writer).inspect(after_store).touched_once_stored()
}

/// Hands every object of `triggers` to the current term's controller (dropped while standing by).
fn send_all<K>(
    triggers: impl futures::Stream<Item = ObjectRef<K>> + Send + 'static,
    to: &Triggers<K>,
) -> impl Future<Output = ()> + Send + 'static
where
    K: kube::runtime::reflector::Lookup<DynamicType = ()> + Send + Sync + 'static,
{
    let to = to.clone();
    triggers.for_each(move |object| {
        let _ = to.send(object);
        future::ready(())
    })
}

/// The kept watches' backoff after an error: 800 ms doubling to at most 5 s, back to 800 ms once
/// a watch has run 120 s without one. kube's default doubles to 30 s, which was harmless while
/// every term started fresh watches; now the watches outlive the term, and so does what they
/// accumulated through an apiserver outage. A watch that failed through a 26 s outage waited up
/// to 30 s more after the apiserver was back, and the burst of tests/restarts.rs
/// `two_replicas_ride_out_an_apiserver_outage_longer_than_the_lease` took 52.5 s to finish
/// against the 45 s it allows. A retry every 5 s of a dozen watches costs a down apiserver nothing.
pub(super) struct WatchBackoff(kube::runtime::utils::ResetTimerBackoff<Doubling>);

impl WatchBackoff {
    pub(super) fn new() -> Self {
        WatchBackoff(kube::runtime::utils::ResetTimerBackoff::new(Doubling::FIRST, std::time::Duration::from_secs(120)))
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

/// The delay before the next retry, doubled by each, up to `MAX`.
pub(super) struct Doubling(std::time::Duration);

impl Doubling {
    const FIRST: Doubling = Doubling(std::time::Duration::from_millis(800));
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Iterator for Doubling {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let delay = self.0;
        self.0 = (delay * 2).min(Self::MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for Doubling {
    fn reset(&mut self) {
        *self = Doubling::FIRST;
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;
    use kube::runtime::utils::Backoff;
    use std::time::Duration;

    #[test]
    fn a_kept_watch_retries_within_five_seconds_however_long_the_outage() {
        let mut backoff = WatchBackoff::new();
        let delays: Vec<Duration> = (&mut backoff).take(8).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [800, 1600, 3200, 5000, 5000, 5000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(800)));
    }
}
