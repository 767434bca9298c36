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

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use super::snapshot;
use crate::api::ApprovalVote;
use crate::domain::readiness::Resources;

pub use super::job_index::{JobEntry, JobIndex, QueueKey, RequesterIndex, Shortage, Uid};

/// Namespace and name.
pub type Key = (String, String);

fn key_of<K: kube::Resource>(obj: &K) -> Key {
    (obj.meta().namespace.clone().unwrap_or_default(), obj.meta().name.clone().unwrap_or_default())
}

/// An entry changed by an event: what it was and what it is now (None: absent).
#[derive(Debug, PartialEq)]
pub struct Change<E, Id = Key> {
    pub key: Id,
    pub old: Option<E>,
    pub new: Option<E>,
}

/// Entries by key (an object's namespace and name, or what `Entries::apply_by` keys it by), with
/// a relist buffered until `InitDone`.
#[derive(Clone, Debug)]
pub(super) struct Entries<E, Id = Key> {
    pub(super) live: HashMap<Id, E>,
    relisting: Option<HashMap<Id, E>>,
}

impl<E, Id> Default for Entries<E, Id> {
    fn default() -> Self {
        Entries { live: HashMap::new(), relisting: None }
    }
}

impl<E, Id> Entries<E, Id> {
    /// Objects indexed (`GET /debug/memory`).
    pub fn objects(&self) -> usize {
        self.live.len()
    }
}

impl<E: Clone + PartialEq> Entries<E> {
    /// The entries that changed; `entry` derives an object's entry (None: not indexed).
    fn apply<K: kube::Resource>(&mut self, event: &Event<K>, entry: impl FnMut(&K) -> Option<E>) -> Vec<Change<E>> {
        self.apply_by(event, |obj| Some(key_of(obj)), entry)
    }
}

impl<E: Clone + PartialEq, Id: Clone + Eq + std::hash::Hash> Entries<E, Id> {
    /// `apply`, with objects keyed by `id` (None: not indexed).
    pub(super) fn apply_by<K>(
        &mut self,
        event: &Event<K>,
        id: impl Fn(&K) -> Option<Id>,
        mut entry: impl FnMut(&K) -> Option<E>,
    ) -> Vec<Change<E, Id>> {
        let set = |live: &mut HashMap<Id, E>, key: Id, new: Option<E>| {
            let old = match &new {
                Some(e) => live.insert(key.clone(), e.clone()),
                None => live.remove(&key),
            };
            (old != new).then_some(Change { key, old, new })
        };
        match event {
            Event::Apply(obj) => id(obj).and_then(|key| set(&mut self.live, key, entry(obj))).into_iter().collect(),
            Event::Delete(obj) => id(obj).and_then(|key| set(&mut self.live, key, None)).into_iter().collect(),
            Event::Init => {
                self.relisting = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                if let Some(key) = id(obj)
                    && let Some(e) = entry(obj)
                {
                    self.relisting.get_or_insert_default().insert(key, e);
                }
                Vec::new()
            }
            Event::InitDone => {
                let mut listed = self.relisting.take().unwrap_or_default();
                let gone: Vec<Id> = self.live.keys().filter(|k| !listed.contains_key(*k)).cloned().collect();
                let mut changes: Vec<_> = gone.into_iter().filter_map(|k| set(&mut self.live, k, None)).collect();
                changes.extend(listed.drain().filter_map(|(k, e)| set(&mut self.live, k, Some(e))));
                changes
            }
        }
    }
}

/// The few objects one thing has (a job's Pods or votes, the Pods labelled with a job's uid, the
/// jobs naming a tool), sorted: a `Vec` while there are at most `Few::MAX_VEC`, since a
/// `BTreeSet`'s first node alone takes 0.3-0.6 KB (the Pod index took 1,960 B a Pod and the vote
/// index 485 B a vote, with one each). More (a tenant's thousand decoys or votes) make it a
/// `BTreeSet`, so that an insert stays O(log n).
#[derive(Clone, Debug)]
pub(super) enum Few<T> {
    Sorted(Vec<T>),
    Many(BTreeSet<T>),
}

impl<T> Default for Few<T> {
    fn default() -> Self {
        Few::Sorted(Vec::new())
    }
}

impl<T: Ord> Few<T> {
    const MAX_VEC: usize = 32;

    pub(super) fn insert(&mut self, item: T) {
        match self {
            Few::Sorted(items) => match items.binary_search(&item) {
                Ok(_) => {}
                Err(at) if items.len() < Self::MAX_VEC => items.insert(at, item),
                Err(_) => {
                    let mut many: BTreeSet<T> = std::mem::take(items).into_iter().collect();
                    many.insert(item);
                    *self = Few::Many(many);
                }
            },
            Few::Many(many) => {
                many.insert(item);
            }
        }
    }

    pub(super) fn remove(&mut self, item: &T) {
        match self {
            Few::Sorted(items) => {
                if let Ok(at) = items.binary_search(item) {
                    items.remove(at);
                }
            }
            Few::Many(many) => {
                many.remove(item);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            Few::Sorted(items) => items.is_empty(),
            Few::Many(many) => many.is_empty(),
        }
    }

    /// In order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        let (sorted, many) = match self {
            Few::Sorted(items) => (Some(items.iter()), None),
            Few::Many(many) => (None, Some(many.iter())),
        };
        sorted.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

pub(super) fn link<T: Ord + Clone>(map: &mut HashMap<String, Few<T>>, at: &str, key: &T) {
    map.entry(at.to_string()).or_default().insert(key.clone());
}

pub(super) fn unlink<T: Ord>(map: &mut HashMap<String, Few<T>>, at: &str, key: &T) {
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
    by_controller: HashMap<Key, Few<String>>,
    /// Labelled job uid → Pods carrying it.
    by_label: HashMap<String, Few<Key>>,
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
            .flat_map(Few::iter)
            .map(|n| (namespace.to_string(), n.clone()));
        controlled.chain(self.by_label.get(job_uid).into_iter().flat_map(Few::iter).cloned()).collect()
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
// Votes

#[derive(Clone, Debug, Default)]
pub struct VoteIndex {
    entries: Entries<String>,
    /// (namespace, job name) → names of the votes there naming it.
    by_job: HashMap<Key, Few<String>>,
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
        self.by_job.get(&(namespace.to_string(), job.to_string())).into_iter().flat_map(Few::iter).cloned().collect()
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
