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
pub mod lost_pods;
pub mod memory;
pub mod metadata_answers;
pub mod meter_api;
mod meter_auth;
pub(crate) mod meter_conn;
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
pub mod triggers;
pub mod wakeups;
pub mod watches;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::sync::RwLock;

use crate::api::{AgentJob, AgentTool, ApprovalVote};
use crate::domain::pricing::PriceTable;
use crate::metrics::Metrics;
use crate::state::{Health, JobsForMetrics};

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
    /// True once every cache has its first full list (it stays true: a relist is swapped in
    /// whole). Never awaited inside a reconcile, which comes back after `UNSYNCED_RETRY` instead
    /// of holding one of the controller's concurrent slots.
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
    /// This term's cached head answers: a new term starts with none (access::TermHeads).
    pub heads: Arc<access::HeadChecker>,
    /// Jobs to look at again because something they wait for (capacity, rate limit) freed up.
    pub requeue: triggers::Triggers<AgentJob>,
    pub tool_requeue: triggers::Triggers<AgentTool>,
    pub secret_watch: Arc<agent_tool::SecretWatch>,
    /// The namespaces' meter keys Secrets as last read, while `secret_watch` runs.
    pub meter_keys: Arc<meter_keys::KeysCache>,
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
    pub identity: Arc<identity_policies::Gate>,
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

/// One term of leadership: both controllers and every writer, reading the caches of `watches`
/// (which outlive the term, watches.rs), until `shutdown` resolves. The future is dropped when
/// the lease is lost, and with it every task of the term: no write may start after that.
/// `replay`: the watches ran before this term, and what they asked to reconcile while this
/// replica stood by went nowhere, so every cached job and tool is reconciled once, from the warm
/// caches, with no relist.
#[allow(clippy::too_many_arguments)]
pub async fn lead(
    client: Client,
    settings: Settings,
    prices: Arc<RwLock<PriceTable>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    jobs_for_metrics: JobsForMetrics,
    watches: &mut watches::Watches,
    replay: bool,
    shutdown: impl future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let caches = watches.caches.clone();
    // Opened before anything is replayed: a change from here on reaches this term either way.
    let (_jobs_term, job_triggers) = watches.jobs_to_reconcile.open();
    let (_tools_term, tool_triggers) = watches.tools_to_reconcile.open();
    // Before any reconcile may ask: this term's head answers, none cached yet.
    let (_heads_term, heads) = watches.heads.open(client.clone());
    // What the kept identity policy watches last saw (None while standing by, state.rs).
    *health.identity_problems.write().unwrap_or_else(std::sync::PoisonError::into_inner) = watches.identity.problems();
    let (events, _events_sender) =
        events::EventQueue::start_for_term(events::Publisher::new(client.clone(), "agentgate", std::env::var("POD_NAME").ok()));
    let _reporting = Reporting::start(&watches.reporter, events.clone());
    *jobs_for_metrics.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(caches.jobs.clone());
    *health.agent_pods.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(caches.pods.clone());
    *metrics.tools.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(caches.tools.clone());
    *health.memory_report.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some({
        let (caches, approval_timeout) = (caches.clone(), settings.approval_timeout_seconds);
        Arc::new(move || memory::report(&caches, approval_timeout))
    });
    // Read again at every term: another replica may have led and learned since.
    let learner = Arc::new(estimator_store::Learner::load(&client, &settings.state_namespace).await);
    let ctx = Arc::new(Context {
        events,
        client: client.clone(),
        metrics,
        settings: settings.clone(),
        prices,
        caches: caches.clone(),
        heads,
        requeue: watches.jobs_to_reconcile.clone(),
        tool_requeue: watches.tools_to_reconcile.clone(),
        secret_watch: watches.secret_watch.clone(),
        meter_keys: watches.meter_keys.clone(),
        vote_lateness: Default::default(),
        learner: learner.clone(),
        status_writes: StatusWrites::default(),
        pod_expectations: watches.pod_expectations.clone(),
        stored_revisions: watches.stored_revisions.clone(),
        identity: watches.identity.clone(),
        health: health.clone(),
    });

    // The controllers' only triggers are the watches' (triggers.rs): each watch backs off on its
    // own, and its errors never reach a controller, so kube-runtime's shared trigger backoff
    // (which paused every watch for 30 s and more after an apiserver restart, tests/restarts.rs)
    // has nothing left to act on.
    let controller_config = kube::runtime::controller::Config::default().concurrency(settings.max_concurrent_reconciles);
    let job_controller = kube::runtime::Controller::for_stream(futures::stream::pending(), caches.jobs.clone())
        .with_config(controller_config.clone())
        .reconcile_on(job_triggers)
        .graceful_shutdown_on(shutdown.clone())
        .run(agent_job::reconcile, agent_job::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    let tool_controller = kube::runtime::Controller::for_stream(futures::stream::pending(), watches.tools_whole.clone())
        .with_config(controller_config)
        .reconcile_on(tool_triggers)
        .graceful_shutdown_on(shutdown)
        .run(agent_tool::reconcile, agent_tool::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));

    let (discovery_trigger, orphan_trigger) = (watches.discovery_trigger.clone(), watches.orphan_trigger.clone());
    let discovery_namespaces = watches.discovery_namespaces.clone();
    let mark_ready = {
        let (jobs_to, tools_to, tools_whole) =
            (watches.jobs_to_reconcile.clone(), watches.tools_to_reconcile.clone(), watches.tools_whole.clone());
        let (caches, health, discovery, orphans) = (caches.clone(), health.clone(), discovery_trigger.clone(), orphan_trigger.clone());
        async move {
            while !watches::synced(&caches, &tools_whole) {
                tokio::time::sleep(UNSYNCED_RETRY).await;
            }
            health.caches_synced.store(true, Ordering::Relaxed);
            tracing::info!("watch caches synced");
            if replay {
                let (jobs, tools) = (caches.jobs.state(), tools_whole.state());
                tracing::info!(jobs = jobs.len(), tools = tools.len(), "reconciling every cached job and tool once");
                for job in jobs {
                    let _ = jobs_to.send(ObjectRef::from_obj(job.as_ref()));
                }
                for tool in tools {
                    let _ = tools_to.send(ObjectRef::from_obj(tool.as_ref()));
                }
                // What a first list pokes: one discovery pass and one orphan sweep per term.
                discovery.notify_one();
                orphans.notify_one();
            }
            std::future::pending::<()>().await
        }
    };
    // Each controller on a task of its own (tasks.rs); the rest is light and stays here.
    let mut tasks = tasks::Tasks::default();
    tasks.spawn_controller(job_controller);
    tasks.spawn_controller(tool_controller);
    tokio::select! {
        _ = tasks.ended() => {}
        _ = watches.ended() => {}
        _ = mark_ready => {}
        _ = discovery::run(ctx.clone(), discovery_trigger, discovery_namespaces) => {}
        _ = learner.run_writer(client.clone()) => {}
        _ = pod_finalizer::sweep(ctx.clone(), orphan_trigger) => {}
    }
    *health.identity_problems.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    // Shutdown: what was learned since the last write is not lost.
    learner.flush(&client).await;
}

/// The undecodable objects' Events go through the term's queue while it lasts, and nowhere
/// once it ends (dropped with the term's future when the lease is lost).
struct Reporting(decode::Reporter);

impl Reporting {
    fn start(reporter: &decode::Reporter, events: events::EventQueue) -> Reporting {
        reporter.lead(Some(events));
        Reporting(reporter.clone())
    }
}

impl Drop for Reporting {
    fn drop(&mut self) {
        self.0.lead(None);
    }
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

/// Requeue delays: a safety net, not how jobs make progress (watches do that).
pub const RESYNC: Duration = Duration::from_secs(300);
