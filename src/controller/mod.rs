//! The Kubernetes shell around the domain logic: watch caches in, API writes out.

pub mod access;
pub mod agent_job;
mod agent_pods;
pub mod agent_tool;
pub mod approval_vote;
pub mod decode;
pub mod discovery;
pub mod error;
pub mod estimator_store;
pub mod events;
pub mod identity_policies;
pub mod index;
pub mod job_index;
pub mod learning_mark;
pub mod memory;
pub mod metadata_answers;
pub mod meter_api;
mod meter_auth;
mod meter_conn;
pub mod meter_keys;
pub mod meter_tls;
pub mod pod_expectations;
pub mod pod_finalizer;
pub mod price_table;
pub mod recommendations;
pub mod relist;
pub mod resync;
pub mod slim;
pub mod spec_history;
// Moved to the domain (it is pure, and the plugin needs it too); re-exported so `super::snapshot` still reads.
pub use crate::domain::snapshot;
pub mod tasks;
pub mod tool_pinning;
pub mod wakeups;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{RwLock, mpsc};

use crate::api::{AgentJob, AgentTool, ApprovalVote};
use crate::domain::pricing::PriceTable;
use crate::metrics::Metrics;
use crate::state::{Health, JobsForMetrics};
use relist::OnceStored;

pub use error::{Error, Result};

/// Operator settings, from the command line (and the chart's values).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch one namespace only; all namespaces when None.
    pub namespace: Option<String>,
    pub approval_floor: i32,
    pub approval_tiers: Vec<crate::domain::approval_policy::ApprovalTier>,
    pub approval_timeout_seconds: Option<i64>,
    pub field_manager: String,
    /// Discover AgentTools only from Services in namespaces matching this label selector;
    /// discovery is off when None (opt-in: see discovery.rs).
    pub discovery_namespace_selector: Option<String>,
    /// Namespace of the leader Lease, where the estimator's state ConfigMap lives too.
    pub state_namespace: String,
    /// ConfigMap in `state_namespace` whose `prices.yaml` is watched and applied on top of the
    /// prices the operator started with.
    pub price_config_map: Option<String>,
    /// How long a new job's first status waits for votes applied with it
    /// (`decide::hold_first_status`).
    pub vote_wait: std::time::Duration,
    /// Reconciles of each controller in flight at once.
    pub max_concurrent_reconciles: u16,
    /// Which ServiceAccounts' votes count, and how many per job (`--robot-voters`, `--max-robot-votes`).
    pub voters: crate::domain::tally::VoterPolicy,
    /// The meter injected into every agent Pod (`--meter-*`).
    pub meter: crate::domain::meter_sidecar::MeterConfig,
    /// The meter API's certificate as the operator serves it now: new agent Pods get its CA at
    /// creation, so a CA the issuer rotated reaches them without an operator restart. None with
    /// `--meter-api-tls off`.
    pub meter_api_tls: Option<meter_tls::LiveCa>,
}

/// Watch caches every reconcile reads instead of calling the API.
#[derive(Clone)]
pub struct Caches {
    pub jobs: Store<AgentJob>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub quotas: Store<ResourceQuota>,
    pub tools: Store<AgentTool>,
    pub votes: Store<ApprovalVote>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    /// Pods by owning job and node, jobs by queue position and tool, votes by job: fed by the
    /// same watch events as the stores above, so that a reconcile never scans them (index.rs).
    pub index: Arc<index::Indexes>,
}

impl Caches {
    /// True once every cache has its first full list. Never awaited inside a reconcile: the
    /// caches fill only while the controller polls its trigger streams, so waiting there could
    /// stall the very streams that would end the wait.
    pub fn synced(&self) -> bool {
        use futures::FutureExt;
        [
            self.jobs.wait_until_ready().boxed(),
            self.pods.wait_until_ready().boxed(),
            self.nodes.wait_until_ready().boxed(),
            self.quotas.wait_until_ready().boxed(),
            self.tools.wait_until_ready().boxed(),
            self.votes.wait_until_ready().boxed(),
            self.services.wait_until_ready().boxed(),
            self.endpoint_slices.wait_until_ready().boxed(),
        ]
        .into_iter()
        .all(|ready| matches!(ready.now_or_never(), Some(Ok(()))))
    }
}

/// A reconcile that arrives before the caches are synced comes back after this long.
pub const UNSYNCED_RETRY: Duration = Duration::from_millis(200);

pub struct Context {
    pub client: Client,
    pub events: events::EventQueue,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub prices: Arc<RwLock<PriceTable>>,
    pub caches: Caches,
    pub heads: access::HeadChecker,
    /// Jobs to look at again because something they wait for (capacity, rate limit) freed up.
    pub requeue: mpsc::UnboundedSender<ObjectRef<AgentJob>>,
    pub tool_requeue: mpsc::UnboundedSender<ObjectRef<AgentTool>>,
    pub secret_watch: agent_tool::SecretWatch,
    /// The namespaces' meter keys Secrets as last read, while `secret_watch` runs.
    pub meter_keys: meter_keys::KeysCache,
    /// How late recent jobs' approvals came: how long new jobs wait for theirs.
    pub vote_lateness: std::sync::Mutex<crate::domain::vote_wait::VoteLateness>,
    /// What the cost estimator learned from finished attempts, persisted by its own writer.
    pub learner: Arc<estimator_store::Learner>,
    pub status_writes: StatusWrites,
    /// Pods created and not yet shown by the Pod watch (pod_expectations.rs).
    pub pod_expectations: Arc<pod_expectations::PodExpectations>,
    /// Spec revisions stored and not yet recorded in their job's status (spec_history.rs).
    pub stored_revisions: Arc<spec_history::StoredRevisions>,
    /// Whether the identity admission policies are in force; no vote counts while they are not.
    pub identity: identity_policies::Gate,
    pub health: Arc<Health>,
}

/// The resourceVersion each job had when this operator last wrote its status, until the watch
/// cache shows a newer one: a cached copy still at that version has not seen the write.
#[derive(Default)]
pub struct StatusWrites(std::sync::Mutex<std::collections::HashMap<String, String>>);

impl StatusWrites {
    /// Beyond this many jobs written and not reconciled since, forget them all: the worst a
    /// forgotten entry costs is one status write refused with a 409, as without this guard.
    const CAP: usize = 50_000;

    pub fn wrote_over(&self, uid: &str, previous_version: Option<String>) {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= Self::CAP {
            map.clear();
        }
        if let Some(version) = previous_version {
            map.insert(uid.to_string(), version);
        }
    }

    /// True while the cached copy is the one the last write replaced; forgets the job once the
    /// cache has moved past it.
    pub fn predates_own_write(&self, uid: &str, cached_version: Option<&str>) -> bool {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(uid) {
            Some(replaced) if Some(replaced.as_str()) == cached_version => true,
            Some(_) => {
                map.remove(uid);
                false
            }
            None => false,
        }
    }
}

impl Context {
    /// Records an Event on `reference`; a failure is logged, never fatal. The note is escaped and
    /// cut to the 1 KiB the Events API accepts (`events::EventQueue::record`).
    pub async fn publish_event(&self, reference: &ObjectReference, type_: EventType, reason: &str, note: &str, action: &'static str) {
        self.events.record(reference, type_, reason, note.to_string(), action).await;
    }
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Objects per list request of the job, vote and Service watches: a relist holds a few MiB of
/// (possibly huge) objects at a time, not all of the cluster's at once (tests/isolation.rs: 400
/// Services of 250 KiB, RSS 60 MiB paged, 120 MiB with kube's default of 500). Triggers from a
/// relist wait for its last page (relist.rs): without that, votes relisted on a first page after
/// an apiserver restart were never counted (tests/restarts.rs).
const PAGE_SIZE: u32 = 50;

/// Starts the watches and both controllers and runs until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    prices: Arc<RwLock<PriceTable>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    jobs_for_metrics: JobsForMetrics,
    shutdown: impl future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let wc = watcher::Config::default();
    let (pods, pods_writer) = reflector::store();
    let (nodes, nodes_writer) = reflector::store();
    let (quotas, quotas_writer) = reflector::store();
    let (tools, tools_writer) = reflector::store();
    let (votes, votes_writer) = reflector::store();
    let (services, services_writer) = reflector::store();
    let (endpoint_slices, slices_writer) = reflector::store();

    let index = Arc::new(index::Indexes::default());
    let pod_expectations = Arc::new(pod_expectations::PodExpectations::default());
    let stored_revisions = Arc::new(spec_history::StoredRevisions::default());
    let (requeue, requeue_rx) = mpsc::unbounded_channel();
    let (tool_requeue, tool_requeue_rx) = mpsc::unbounded_channel();
    // Jobs entering or leaving Running requeue what waits on them, once the cache shows the change.
    let (jobs, jobs_writer) = reflector::store();
    let events = events::EventQueue::start(events::Publisher::new(client.clone(), "agentgate", std::env::var("POD_NAME").ok()));
    let reporter = decode::Reporter::new(metrics.clone(), events.clone());
    let job_stream = decode::decoded_only(
        watcher(scoped::<decode::Decoded<AgentJob>>(&client, &settings.namespace), wc.clone().page_size(PAGE_SIZE)),
        jobs.clone(),
        reporter.clone(),
    )
    .default_backoff()
    // Before the slim, which leaves the requester out of the cached job (index.rs).
    .inspect(feed(&index, |i, event| i.requesters().apply(event)))
    .modify(slim::job)
    .inspect({
        let (jobs, index, requeue, tool_requeue) = (jobs.clone(), index.clone(), requeue.clone(), tool_requeue.clone());
        let (expectations, revisions) = (pod_expectations.clone(), stored_revisions.clone());
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
    .inspect(feed(&index, |i, event| i.jobs().apply(event)))
    .applied_once_stored();
    let controller_config = kube::runtime::controller::Config::default().concurrency(settings.max_concurrent_reconciles);
    let job_controller = kube::runtime::Controller::for_stream(job_stream, jobs.clone())
        .with_config(controller_config.clone())
        .trigger_backoff(NoTriggerBackoff);
    let caches = Caches { jobs, pods, nodes, quotas, tools, votes, services, endpoint_slices, index };
    *jobs_for_metrics.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(caches.jobs.clone());
    *health.agent_pods.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(caches.pods.clone());
    *metrics.tools.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(caches.tools.clone());
    *health.memory_report.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some({
        let (caches, approval_timeout) = (caches.clone(), settings.approval_timeout_seconds);
        Arc::new(move || memory::report(&caches, approval_timeout))
    });
    let learner = Arc::new(estimator_store::Learner::load(&client, &settings.state_namespace).await);
    let ctx = Arc::new(Context {
        events,
        client: client.clone(),
        metrics,
        settings: settings.clone(),
        prices,
        caches: caches.clone(),
        heads: access::HeadChecker::new(client.clone()),
        requeue,
        tool_requeue,
        secret_watch: agent_tool::SecretWatch::default(),
        meter_keys: meter_keys::KeysCache::default(),
        vote_lateness: Default::default(),
        learner: learner.clone(),
        status_writes: StatusWrites::default(),
        pod_expectations: pod_expectations.clone(),
        stored_revisions: stored_revisions.clone(),
        identity: identity_policies::Gate::default(),
        health: health.clone(),
    });
    // Woken by every Service and AgentTool change; see discovery.rs.
    let discovery_trigger = Arc::new(tokio::sync::Notify::new());

    // Woken by Pods that hold the usage finalizer but whose job is not cached (pod_finalizer.rs).
    let orphan_trigger = Arc::new(tokio::sync::Notify::new());
    // Every Pod of the cluster is watched, slimmed and indexed, and agentgate's own Pods are
    // cached and mapped to the jobs they concern, on a task of its own (with 20,000 foreign Pods
    // the heaviest watch by far): only those jobs reach the job controller's task, through a
    // bounded channel.
    let mut tasks = tasks::Tasks::default();
    // Every Pod is indexed (node capacity); foreign Pods are neither stored nor passed on.
    let pod_triggers = tasks::on_own_task(
        &mut tasks,
        watcher(scoped::<Pod>(&client, &None), wc.clone())
            .default_backoff()
            .modify(slim::pod)
            .modify({
                let (caches, namespace) = (caches.clone(), settings.namespace.clone());
                move |pod| slim::pod_scope(pod, namespace.as_deref(), |uid| caches.index.jobs().by_uid(uid).is_some())
            })
            .inspect({
                let (caches, requeue) = (caches.clone(), ctx.requeue.clone());
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
            .inspect(move |event| {
                if let Ok(event) = event {
                    pod_expectations.apply(event);
                }
            })
            .touched_once_stored()
            .filter_map(|pod| future::ready(pod.ok()))
            .flat_map({
                let caches = caches.clone();
                let orphans = orphan_trigger.clone();
                move |pod: Pod| {
                    if pod_finalizer::is_orphan_hint(&caches.jobs, &pod) {
                        orphans.notify_one();
                    }
                    futures::stream::iter(wakeups::jobs_affected_by_pod(&caches, &pod))
                }
            }),
    );
    let node_stream = watcher(Api::<Node>::all(client.clone()), wc.clone())
        .default_backoff()
        .modify(slim::node)
        .reflect(nodes_writer)
        .touched_once_stored();
    let quota_stream = watcher(scoped::<ResourceQuota>(&client, &settings.namespace), wc.clone())
        .default_backoff()
        .modify(slim::metadata)
        .reflect(quotas_writer)
        .inspect(feed(&caches.index, |i, event| i.quotas().apply(event)))
        .touched_once_stored();
    let tool_stream = decode::decoded_only(
        watcher(Api::<decode::Decoded<AgentTool>>::all(client.clone()), wc.clone()),
        caches.tools.clone(),
        reporter.clone(),
    )
    .default_backoff()
    .modify(slim::metadata)
    .reflect(tools_writer)
    .touched_once_stored()
    .inspect(poke(&discovery_trigger));
    let vote_stream = decode::decoded_only(
        watcher(scoped::<decode::Decoded<ApprovalVote>>(&client, &settings.namespace), wc.clone().page_size(PAGE_SIZE)),
        caches.votes.clone(),
        reporter.clone(),
    )
    .default_backoff()
    .modify(slim::vote)
    .reflect(votes_writer)
    .inspect(feed(&caches.index, |i, event| i.votes().apply(event)))
    .touched_once_stored();

    let jobs_for = caches.clone();
    let job_controller = job_controller
        .reconcile_on(pod_triggers)
        .watches_stream(node_stream, {
            let caches = caches.clone();
            move |_node: Node| wakeups::jobs_short_of_nodes(&caches)
        })
        .watches_stream(quota_stream, {
            let caches = caches.clone();
            move |quota: ResourceQuota| wakeups::jobs_waiting_for_capacity(&caches, quota.namespace().as_deref())
        })
        .watches_stream(tool_stream, move |tool: AgentTool| wakeups::jobs_naming_tool(&jobs_for, &tool.name_any()))
        .watches_stream(vote_stream, |vote: ApprovalVote| vote.namespace().map(|ns| ObjectRef::new(&vote.spec.job_ref.name).within(&ns)))
        .reconcile_on(tokio_stream_from(requeue_rx))
        .graceful_shutdown_on(shutdown.clone())
        .run(agent_job::reconcile, agent_job::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));

    let service_stream = watcher(Api::<Service>::all(client.clone()), wc.clone().page_size(PAGE_SIZE))
        .default_backoff()
        .modify(slim::service)
        .reflect(services_writer)
        .touched_once_stored()
        .inspect(poke(&discovery_trigger));
    let slice_stream = watcher(Api::<EndpointSlice>::all(client.clone()), wc.clone())
        .default_backoff()
        .modify(slim::endpoint_slice)
        .reflect(slices_writer)
        .touched_once_stored();
    // Only Secrets' metadata is requested (never their data), and nothing is cached: a change
    // only triggers the tools naming the Secret, whose reconcile GETs it to look for the key, and
    // forgets the meter keys read from it (meter_keys.rs).
    let secret_stream = watcher(Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>>::all(client.clone()), wc.clone())
        .default_backoff()
        .inspect({
            let ctx = ctx.clone();
            move |event| {
                ctx.secret_watch.observe(event);
                ctx.meter_keys.observe(event, &ctx.settings.meter.keys_secret);
            }
        })
        .touched_objects()
        .filter(|secret| future::ready(secret.is_ok()));
    // Like `Controller::new`, but its watch backs off on its own like every other trigger stream
    // (see `NoTriggerBackoff`).
    let (tool_controller_store, tool_controller_writer) = reflector::store();
    let tool_self_stream = decode::decoded_only(
        watcher(Api::<decode::Decoded<AgentTool>>::all(client.clone()), wc.clone()),
        tool_controller_store.clone(),
        reporter,
    )
    .default_backoff()
    .reflect(tool_controller_writer)
    .applied_once_stored();
    let tool_controller = kube::runtime::Controller::for_stream(tool_self_stream, tool_controller_store)
        .with_config(controller_config)
        .trigger_backoff(NoTriggerBackoff)
        .watches_stream(service_stream, {
            let caches = caches.clone();
            move |svc: Service| agent_tool::tools_using_service(&caches, &svc.namespace().unwrap_or_default(), &svc.name_any())
        })
        .watches_stream(slice_stream, {
            let caches = caches.clone();
            move |slice: EndpointSlice| {
                let service = slice.labels().get("kubernetes.io/service-name").cloned().unwrap_or_default();
                agent_tool::tools_using_service(&caches, &slice.namespace().unwrap_or_default(), &service)
            }
        })
        .watches_stream(secret_stream, {
            let caches = caches.clone();
            move |secret: kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>| {
                agent_tool::tools_using_secret(&caches, &secret.namespace().unwrap_or_default(), &secret.name_any())
            }
        })
        .reconcile_on(tokio_stream_from(tool_requeue_rx))
        .graceful_shutdown_on(shutdown)
        .run(agent_tool::reconcile, agent_tool::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));

    let rbac_changes = wakeups::watch_rbac(client.clone(), ctx.clone());
    let price_changes = async {
        match &settings.price_config_map {
            Some(name) => {
                let base = ctx.prices.read().await.clone();
                price_table::watch(ctx.clone(), settings.state_namespace.clone(), name.clone(), base).await
            }
            None => std::future::pending().await,
        }
    };
    let mark_ready = async {
        while !caches.synced() {
            tokio::time::sleep(UNSYNCED_RETRY).await;
        }
        health.caches_synced.store(true, Ordering::Relaxed);
        tracing::info!("watch caches synced");
        std::future::pending::<()>().await
    };
    // Each controller on a task of its own (tasks.rs); the rest is light and stays here.
    tasks.spawn_controller(job_controller);
    tasks.spawn_controller(tool_controller);
    tokio::select! {
        _ = tasks.ended() => {}
        _ = mark_ready => {}
        _ = rbac_changes => {}
        _ = price_changes => {}
        _ = discovery::run(ctx.clone(), discovery_trigger) => {}
        _ = learner.run_writer(client.clone()) => {}
        _ = identity_policies::run(ctx.clone()) => {}
        _ = pod_finalizer::sweep(ctx.clone(), orphan_trigger.clone()) => {}
    }
    *health.identity_problems.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    // Shutdown: what was learned since the last write is not lost.
    learner.flush(&client).await;
}

/// The controllers' backoff over all their trigger streams together: none, because every watch
/// stream already backs off on its own (`default_backoff`).
///
/// kube-runtime's default here is a second exponential backoff around the merged streams, which
/// pauses every watch whenever any one of them fails, and only resets after an item arrives
/// while awake. After a kube-apiserver restart each of the job controller's six watches fails
/// during the outage and once more with 410 Gone when it resumes, and those errors, taken one at
/// a time, escalate that shared pause to 30 s and beyond: the caches and every reconcile stood
/// still for over a minute after the apiserver was back (tests/restarts.rs).
struct NoTriggerBackoff;

impl Iterator for NoTriggerBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoTriggerBackoff {
    fn reset(&mut self) {}
}

/// A stream inspector that wakes `trigger` on every item.
fn poke<T>(trigger: &Arc<tokio::sync::Notify>) -> impl FnMut(&T) + Send + 'static + use<T> {
    let trigger = trigger.clone();
    move |_| trigger.notify_one()
}

/// A stream inspector that applies every watch event (not the errors) to one of the indexes, as
/// the event reaches the store.
fn feed<K, E>(
    index: &Arc<index::Indexes>,
    apply: impl Fn(&index::Indexes, &watcher::Event<K>) + Send + 'static,
) -> impl FnMut(&Result<watcher::Event<K>, E>) + Send + 'static {
    let index = index.clone();
    move |event| {
        if let Ok(event) = event {
            apply(&index, event);
        }
    }
}

/// tokio-stream's `UnboundedReceiverStream`, in one line: tokio-stream is not in the build
/// (Cargo.lock), and a crate for this alone is not worth its compile time.
fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::UnboundedReceiver<T>) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Requeue delays: a safety net, not how jobs make progress (watches do that).
pub const RESYNC: Duration = Duration::from_secs(300);
