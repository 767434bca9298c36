//! Indexes over the watch caches, kept up to date from the same watch events the caches take in
//! (the linkerd policy-controller's approach): a reconcile looks up the few objects of its own
//! job instead of scanning every cached Pod, job and vote of the cluster.
//!
//! An index only names candidates (namespace and name); the reconcile still reads each object
//! from its reflector store and applies the same predicate as before (`snapshot::is_job_pod`,
//! a vote's `jobRef`), so an index that lags its store by an event can make a reconcile miss an
//! object for that moment (the event that updates the index triggers the reconcile again), never
//! read one the predicate would refuse.
//!
//! Pure: no I/O. Each index is a map from an object's key to the small entry derived from it
//! plus lookups derived from the entries, and every watch event is turned into the changed
//! entries (`Change`), so the derived lookups never scan. A relist (`Init`, `InitApply`…,
//! `InitDone`) is buffered and swapped in at `InitDone`, like the reflector's own store, with a
//! change for each object that was added, changed or has gone meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use super::snapshot;
use crate::api::{AgentJob, ApprovalVote, JobPhase};
use crate::domain::readiness::Resources;

/// Namespace and name.
pub type Key = (String, String);

fn key_of<K: kube::Resource>(obj: &K) -> Key {
    (obj.meta().namespace.clone().unwrap_or_default(), obj.meta().name.clone().unwrap_or_default())
}

/// An entry changed by an event: what it was and what it is now (None: absent).
#[derive(Debug, PartialEq)]
pub struct Change<E> {
    pub key: Key,
    pub old: Option<E>,
    pub new: Option<E>,
}

/// Entries by key, with a relist buffered until `InitDone`.
#[derive(Clone, Debug)]
struct Entries<E> {
    live: HashMap<Key, E>,
    relisting: Option<HashMap<Key, E>>,
}

impl<E> Default for Entries<E> {
    fn default() -> Self {
        Entries { live: HashMap::new(), relisting: None }
    }
}

impl<E> Entries<E> {
    /// Objects indexed (`GET /debug/memory`).
    pub fn objects(&self) -> usize {
        self.live.len()
    }
}

impl<E: Clone + PartialEq> Entries<E> {
    /// The entries that changed; `entry` derives an object's entry (None: not indexed).
    fn apply<K: kube::Resource>(&mut self, event: &Event<K>, entry: impl Fn(&K) -> Option<E>) -> Vec<Change<E>> {
        let set = |live: &mut HashMap<Key, E>, key: Key, new: Option<E>| {
            let old = match &new {
                Some(e) => live.insert(key.clone(), e.clone()),
                None => live.remove(&key),
            };
            (old != new).then_some(Change { key, old, new })
        };
        match event {
            Event::Apply(obj) => set(&mut self.live, key_of(obj), entry(obj)).into_iter().collect(),
            Event::Delete(obj) => set(&mut self.live, key_of(obj), None).into_iter().collect(),
            Event::Init => {
                self.relisting = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                if let Some(e) = entry(obj) {
                    self.relisting.get_or_insert_default().insert(key_of(obj), e);
                }
                Vec::new()
            }
            Event::InitDone => {
                let mut listed = self.relisting.take().unwrap_or_default();
                let gone: Vec<Key> = self.live.keys().filter(|k| !listed.contains_key(*k)).cloned().collect();
                let mut changes: Vec<_> = gone.into_iter().filter_map(|k| set(&mut self.live, k, None)).collect();
                changes.extend(listed.drain().filter_map(|(k, e)| set(&mut self.live, k, Some(e))));
                changes
            }
        }
    }
}

fn link(map: &mut HashMap<String, BTreeSet<Key>>, at: &str, key: &Key) {
    map.entry(at.to_string()).or_default().insert(key.clone());
}

fn unlink(map: &mut HashMap<String, BTreeSet<Key>>, at: &str, key: &Key) {
    if let Some(set) = map.get_mut(at) {
        set.remove(key);
        if set.is_empty() {
            map.remove(at);
        }
    }
}

fn add(total: &mut Resources, r: &Resources, sign: i128) {
    total.cpu_milli += sign * r.cpu_milli;
    total.memory_bytes += sign * r.memory_bytes;
    for (k, v) in &r.extended {
        *total.extended.entry(k.clone()).or_default() += sign * v;
    }
}

// ---------------------------------------------------------------------------------------------
// Pods

/// What the operator looks up a Pod by.
#[derive(Clone, Debug, PartialEq)]
pub struct PodEntry {
    /// The uid its controller ownerReference names, when that controller is an AgentJob.
    controller_job: Option<String>,
    /// The job uid its label names (decoys carry a victim's).
    labelled_job: Option<String>,
    /// The node it is bound to and its requests there, while it holds them.
    holds: Option<(String, Resources)>,
}

impl PodEntry {
    fn of(pod: &Pod) -> Option<PodEntry> {
        let entry = PodEntry {
            controller_job: snapshot::pod_controller_job_uid(pod).map(str::to_string),
            labelled_job: snapshot::labelled_job_uid(pod).map(str::to_string),
            holds: snapshot::holds_node_resources(pod)
                .then(|| pod.spec.as_ref().and_then(|s| s.node_name.clone()))
                .flatten()
                .map(|node| (node, snapshot::pod_requests(pod))),
        };
        (entry.controller_job.is_some() || entry.labelled_job.is_some() || entry.holds.is_some()).then_some(entry)
    }
}

/// Node capacity a Pod gave back: it finished, went, or is no longer bound there.
#[derive(Clone, Debug, PartialEq)]
pub struct Released {
    pub node: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    entries: Entries<PodEntry>,
    /// (namespace, controlling job uid) → names of the Pods there it controls.
    by_controller: HashMap<Key, BTreeSet<String>>,
    /// Labelled job uid → Pods carrying it.
    by_label: HashMap<String, BTreeSet<Key>>,
    /// Requests of the Pods that hold resources on each node.
    used: HashMap<String, Resources>,
}

impl PodIndex {
    pub fn objects(&self) -> usize {
        self.entries.objects()
    }

    /// Takes in one watch event; returns the node capacity it released.
    pub fn apply(&mut self, event: &Event<Pod>) -> Vec<Released> {
        let changes = self.entries.apply(event, PodEntry::of);
        let mut released = Vec::new();
        for Change { key, old, new } in changes {
            if let Some(old) = &old {
                self.unlink(&key, old);
            }
            if let Some(new) = &new {
                self.link(&key, new);
            }
            let node = |e: &Option<PodEntry>| e.as_ref().and_then(|e| e.holds.as_ref()).map(|(n, _)| n.clone());
            if let Some(was_on) = node(&old)
                && node(&new).as_ref() != Some(&was_on)
            {
                released.push(Released { node: was_on, namespace: key.0.clone() });
            }
        }
        released
    }

    fn link(&mut self, key: &Key, e: &PodEntry) {
        if let Some(uid) = &e.controller_job {
            self.by_controller.entry((key.0.clone(), uid.clone())).or_default().insert(key.1.clone());
        }
        if let Some(uid) = &e.labelled_job {
            link(&mut self.by_label, uid, key);
        }
        if let Some((node, r)) = &e.holds {
            add(self.used.entry(node.clone()).or_default(), r, 1);
        }
    }

    fn unlink(&mut self, key: &Key, e: &PodEntry) {
        if let Some(uid) = &e.controller_job {
            let at = (key.0.clone(), uid.clone());
            if let Some(names) = self.by_controller.get_mut(&at) {
                names.remove(&key.1);
                if names.is_empty() {
                    self.by_controller.remove(&at);
                }
            }
        }
        if let Some(uid) = &e.labelled_job {
            unlink(&mut self.by_label, uid, key);
        }
        if let Some((node, r)) = &e.holds {
            let emptied = self.used.get_mut(node).map(|total| {
                add(total, r, -1);
                total.cpu_milli == 0 && total.memory_bytes == 0 && total.extended.values().all(|v| *v == 0)
            });
            if emptied == Some(true) {
                self.used.remove(node);
            }
        }
    }

    /// Pods in `namespace` whose controller ownerReference names `job_uid`, and Pods anywhere
    /// labelled with it: the candidates for a job's Pods and for its decoys.
    pub fn job_candidates(&self, namespace: &str, job_uid: &str) -> BTreeSet<Key> {
        let controlled = self
            .by_controller
            .get(&(namespace.to_string(), job_uid.to_string()))
            .into_iter()
            .flatten()
            .map(|n| (namespace.to_string(), n.clone()));
        controlled.chain(self.by_label.get(job_uid).into_iter().flatten().cloned()).collect()
    }

    /// Requests held on `node`.
    pub fn used_on(&self, node: &str) -> Option<&Resources> {
        self.used.get(node)
    }

    /// Requests held per node.
    pub fn used(&self) -> &HashMap<String, Resources> {
        &self.used
    }
}

// ---------------------------------------------------------------------------------------------
// Jobs

/// Where a job stands in the capacity queue: lower priority first, then older, then by key.
pub type QueueKey = (i32, Option<k8s_openapi::jiff::Timestamp>, String, String);

/// What a job waiting for resources lacks, from its status (`insufficientResources`).
#[derive(Clone, Debug, PartialEq)]
pub struct Shortage {
    /// Room on a node (cpu, memory, a GPU…).
    pub node: bool,
    /// A ResourceQuota of its namespace.
    pub quota: bool,
    /// One agent Pod's requests, without an optional GPU: the least a node must have free to
    /// let any of its Pods in.
    pub per_pod: Option<Resources>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobEntry {
    uid: Option<String>,
    phase: Option<JobPhase>,
    tools: BTreeSet<String>,
    /// While it waits for resources: its place in the queue and what it lacks. Boxed, and its
    /// key (a copy of the job's) only made then: most of 10,000 jobs wait for anything else,
    /// and an entry is 90 B instead of 240 (`GET /debug/memory`).
    waiting: Option<Box<(QueueKey, Shortage)>>,
}

impl JobEntry {
    pub fn of(job: &AgentJob) -> Option<JobEntry> {
        let status = job.status.as_ref();
        let phase = status.and_then(|s| s.phase);
        let waiting = (phase == Some(JobPhase::WaitingForResources)).then(|| {
            let short = status.map(|s| s.insufficient_resources.as_slice()).unwrap_or_default();
            let need = snapshot::pod_need(job);
            let shortage = Shortage {
                node: short.iter().any(|s| !s.starts_with("quota/")),
                quota: short.iter().any(|s| s.starts_with("quota/")),
                per_pod: need.map(|n| {
                    let mut per_pod = n.per_pod;
                    if let Some(gpu) = &n.optional_gpu {
                        per_pod.extended.remove(gpu);
                    }
                    per_pod
                }),
            };
            Box::new((snapshot::queue_key(job), shortage))
        });
        Some(JobEntry { uid: job.metadata.uid.clone(), phase, tools: job.spec.tools.iter().map(|t| t.name.clone()).collect(), waiting })
    }

    fn terminal(&self) -> bool {
        self.phase.is_some_and(JobPhase::is_terminal)
    }
}

#[derive(Clone, Debug, Default)]
pub struct JobIndex {
    entries: Entries<JobEntry>,
    by_uid: HashMap<String, Key>,
    /// WaitingForResources jobs in queue order.
    waiting: BTreeMap<QueueKey, Key>,
    awaiting_approval: BTreeSet<Key>,
    /// Tool → Running jobs that name it.
    running_by_tool: HashMap<String, BTreeSet<Key>>,
    /// Tool → unfinished jobs that name it.
    unfinished_by_tool: HashMap<String, BTreeSet<Key>>,
}

impl JobIndex {
    pub fn objects(&self) -> usize {
        self.entries.objects()
    }

    pub fn apply(&mut self, event: &Event<AgentJob>) {
        for Change { key, old, new } in self.entries.apply(event, JobEntry::of) {
            if let Some(old) = &old {
                self.unlink(&key, old);
            }
            if let Some(new) = &new {
                self.link(&key, new);
            }
        }
    }

    fn link(&mut self, key: &Key, e: &JobEntry) {
        if let Some(uid) = &e.uid {
            self.by_uid.insert(uid.clone(), key.clone());
        }
        if let Some(waiting) = &e.waiting {
            self.waiting.insert(waiting.0.clone(), key.clone());
        }
        if e.phase == Some(JobPhase::AwaitingApproval) {
            self.awaiting_approval.insert(key.clone());
        }
        for tool in &e.tools {
            if e.phase == Some(JobPhase::Running) {
                link(&mut self.running_by_tool, tool, key);
            }
            if !e.terminal() {
                link(&mut self.unfinished_by_tool, tool, key);
            }
        }
    }

    fn unlink(&mut self, key: &Key, e: &JobEntry) {
        if let Some(uid) = &e.uid
            && self.by_uid.get(uid) == Some(key)
        {
            self.by_uid.remove(uid);
        }
        if let Some(waiting) = &e.waiting {
            self.waiting.remove(&waiting.0);
        }
        self.awaiting_approval.remove(key);
        for tool in &e.tools {
            unlink(&mut self.running_by_tool, tool, key);
            unlink(&mut self.unfinished_by_tool, tool, key);
        }
    }

    pub fn by_uid(&self, uid: &str) -> Option<&Key> {
        self.by_uid.get(uid)
    }

    /// Jobs waiting for resources that are as urgent as `priority` and `created` or more: the
    /// only ones that can be queued ahead of a job with that key.
    pub fn waiting_up_to(&self, priority: i32, created: Option<k8s_openapi::jiff::Timestamp>) -> Vec<Key> {
        self.waiting.iter().take_while(|(q, _)| (q.0, q.1) <= (priority, created)).map(|(_, k)| k.clone()).collect()
    }

    /// Every job waiting for resources, in queue order, with what it lacks.
    pub fn waiting(&self) -> impl Iterator<Item = (&Key, Option<&Shortage>)> {
        self.waiting.values().map(|k| (k, self.entries.live.get(k).and_then(|e| e.waiting.as_ref()).map(|w| &w.1)))
    }

    pub fn awaiting_approval(&self) -> impl Iterator<Item = &Key> {
        self.awaiting_approval.iter()
    }

    pub fn running_naming(&self, tool: &str) -> impl Iterator<Item = &Key> {
        self.running_by_tool.get(tool).into_iter().flatten()
    }

    pub fn unfinished_naming(&self, tool: &str) -> impl Iterator<Item = &Key> {
        self.unfinished_by_tool.get(tool).into_iter().flatten()
    }

    /// Waiting jobs that a release of capacity on a node (whose capacity left is `node_free`,
    /// None when the node is unknown) in `namespace` could let start: those short of node room
    /// whose agent Pod now fits there, and those short of quota in that namespace. Jobs waiting
    /// for anything else (a rate limit, a tool) wait on in peace.
    pub fn unblocked_by(&self, node_free: Option<&Resources>, namespace: &str) -> Vec<Key> {
        self.waiting()
            .filter(|(key, shortage)| {
                let Some(s) = shortage else { return false };
                let fits = |per_pod: &Option<Resources>| match (per_pod, node_free) {
                    (Some(need), Some(free)) => need.fits_in(free),
                    _ => false,
                };
                (s.node && fits(&s.per_pod)) || (s.quota && key.0 == namespace)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Votes

#[derive(Clone, Debug, Default)]
pub struct VoteIndex {
    entries: Entries<String>,
    /// (namespace, job name) → names of the votes there naming it.
    by_job: HashMap<Key, BTreeSet<String>>,
}

impl VoteIndex {
    pub fn objects(&self) -> usize {
        self.entries.objects()
    }

    pub fn apply(&mut self, event: &Event<ApprovalVote>) {
        for Change { key, old, new } in self.entries.apply(event, |v: &ApprovalVote| Some(v.spec.job_ref.name.clone())) {
            if let Some(job) = old {
                let at = (key.0.clone(), job);
                if let Some(votes) = self.by_job.get_mut(&at) {
                    votes.remove(&key.1);
                    if votes.is_empty() {
                        self.by_job.remove(&at);
                    }
                }
            }
            if let Some(job) = new {
                self.by_job.entry((key.0.clone(), job)).or_default().insert(key.1);
            }
        }
    }

    /// Names of the votes in `namespace` whose `jobRef.name` is `job`.
    pub fn naming(&self, namespace: &str, job: &str) -> Vec<String> {
        self.by_job.get(&(namespace.to_string(), job.to_string())).into_iter().flatten().cloned().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// ResourceQuotas

/// ResourceQuotas by namespace: a job's readiness reads its own namespace's, never copies the
/// whole quota cache (one entry per namespace or more in a shared cluster) per reconcile.
#[derive(Clone, Debug, Default)]
pub struct QuotaIndex {
    entries: Entries<()>,
    by_namespace: HashMap<String, BTreeSet<String>>,
}

impl QuotaIndex {
    pub fn apply(&mut self, event: &Event<ResourceQuota>) {
        for Change { key: (namespace, name), old, new } in self.entries.apply(event, |_| Some(())) {
            if old.is_some()
                && let Some(names) = self.by_namespace.get_mut(&namespace)
            {
                names.remove(&name);
                if names.is_empty() {
                    self.by_namespace.remove(&namespace);
                }
            }
            if new.is_some() {
                self.by_namespace.entry(namespace).or_default().insert(name);
            }
        }
    }

    /// Names of the quotas in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Key> {
        self.by_namespace.get(namespace).into_iter().flatten().map(|name| (namespace.to_string(), name.clone())).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Requesters

/// Each job's `agentgate.dev/requested-by` annotation, which the job cache does not keep
/// (controller::slim::job): in the cached job it cost a `BTreeMap` node of 0.68 KB for one short
/// string, 15 % of the job. Fed from the watch event before it is slimmed and stored, so a job
/// in the store always has its requester here already (a relist swaps in at `InitDone`, the
/// store's after).
///
/// An entry is bound to the job's uid: between the index's update and the store's, a job deleted
/// and recreated under its name by someone else must not be read with the new one's requester.
/// With the requester, the job's other spec editors (`agentgate.dev/spec-edited-by`, empty
/// when none: no allocation), who may not approve it either.
#[derive(Clone, Debug, Default)]
pub struct RequesterIndex {
    entries: Entries<(Box<str>, Box<str>, Box<str>)>,
}

impl RequesterIndex {
    pub fn apply(&mut self, event: &Event<AgentJob>) {
        self.entries.apply(event, |job| {
            let requester = job.annotations().get(crate::api::REQUESTED_BY)?;
            let editors = job.annotations().get(crate::api::SPEC_EDITED_BY).map_or("", String::as_str);
            Some((job.uid()?.into(), requester.as_str().into(), editors.into()))
        });
    }

    /// The requester of the job at `key` with this `uid`, if its annotation names one.
    pub fn of(&self, key: &Key, uid: &str) -> Option<String> {
        self.entries.live.get(key).filter(|(u, _, _)| &**u == uid).map(|(_, r, _)| r.to_string())
    }

    /// The other spec editors of the job at `key` with this `uid`, one a line (empty: none).
    pub fn editors_of(&self, key: &Key, uid: &str) -> Option<String> {
        self.entries.live.get(key).filter(|(u, _, _)| &**u == uid).map(|(_, _, e)| e.to_string())
    }

    pub fn objects(&self) -> usize {
        self.entries.objects()
    }
}

/// The indexes the controllers share, each behind its own lock (held only for a lookup or
/// an event, never across an await).
#[derive(Default)]
pub struct Indexes {
    pub pods: std::sync::Mutex<PodIndex>,
    pub jobs: std::sync::Mutex<JobIndex>,
    pub votes: std::sync::Mutex<VoteIndex>,
    pub quotas: std::sync::Mutex<QuotaIndex>,
    pub requesters: std::sync::Mutex<RequesterIndex>,
}

impl Indexes {
    pub fn pods(&self) -> std::sync::MutexGuard<'_, PodIndex> {
        self.pods.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub fn jobs(&self) -> std::sync::MutexGuard<'_, JobIndex> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub fn votes(&self) -> std::sync::MutexGuard<'_, VoteIndex> {
        self.votes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub fn quotas(&self) -> std::sync::MutexGuard<'_, QuotaIndex> {
        self.quotas.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub fn requesters(&self) -> std::sync::MutexGuard<'_, RequesterIndex> {
        self.requesters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The object named by `key` in `store`, when it is cached.
pub fn cached<K>(store: &kube::runtime::reflector::Store<K>, key: &Key) -> Option<std::sync::Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&kube::runtime::reflector::ObjectRef::new(&key.1).within(&key.0))
}

/// `obj`'s namespace and name.
pub fn key<K: ResourceExt>(obj: &K) -> Key {
    key_of(obj)
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
