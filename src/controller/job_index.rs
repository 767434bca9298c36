//! The indexes over cached jobs (index.rs explains how indexes are kept): jobs by uid, queue
//! position, approval and tool, and each job's requester. One entry per job of the cluster, so
//! they are kept compact (README "Memory at 10,000 jobs"): entries are keyed by the job's uid in
//! 16 bytes, a job's namespace and name are `Arc<str>`s shared by every lookup that names it and
//! namespaces are interned (a cluster has few). At 10,000 jobs they took 7.8 MiB with a
//! `String` copy of a job's namespace, name and uid in each map.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use super::index::{Change, Entries, Few, Key, link, unlink};
use super::snapshot;
use crate::api::{AgentJob, JobPhase};
use crate::domain::readiness::Resources;

/// A uid as the indexes keep it: the 16 bytes of the UUID the apiserver assigns, or the text of
/// anything else (never from the apiserver; two texts are one `Uid` only if they are equal).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Uid {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl Uid {
    pub fn of(text: &str) -> Uid {
        const HYPHENS: [usize; 4] = [8, 13, 18, 23];
        let bytes = text.as_bytes();
        if bytes.len() == 36 && HYPHENS.iter().all(|&i| bytes[i] == b'-') {
            let digits = bytes.iter().enumerate().filter(|(i, _)| !HYPHENS.contains(i)).map(|(_, &c)| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            });
            let mut uuid = [0u8; 16];
            let mut canonical = true;
            for (n, digit) in digits.enumerate() {
                match digit {
                    Some(d) => uuid[n / 2] |= d << if n % 2 == 0 { 4 } else { 0 },
                    None => canonical = false,
                }
            }
            if canonical {
                return Uid::Uuid(uuid);
            }
        }
        Uid::Other(text.into())
    }
}

fn uid_of(job: &AgentJob) -> Option<Uid> {
    job.metadata.uid.as_deref().map(Uid::of)
}

/// A job's namespace and name, shared by the entry and every lookup naming the job.
type JobKey = (Arc<str>, Arc<str>);

fn text(key: &JobKey) -> Key {
    (key.0.to_string(), key.1.to_string())
}

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
    key: JobKey,
    phase: Option<JobPhase>,
    /// The tools it names, sorted: a `BTreeSet` took a 0.3 KB node for one tool.
    tools: Box<[Box<str>]>,
    /// While it waits for resources: its place in the queue and what it lacks. Boxed, and its
    /// key (a copy of the job's) only made then: most of 10,000 jobs wait for anything else.
    waiting: Option<Box<(QueueKey, Shortage)>>,
}

impl JobEntry {
    fn of(job: &AgentJob, namespaces: &mut HashSet<Arc<str>>) -> Option<JobEntry> {
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
        let namespace = job.metadata.namespace.as_deref().unwrap_or_default();
        let namespace = match namespaces.get(namespace) {
            Some(interned) => interned.clone(),
            None => {
                let interned: Arc<str> = namespace.into();
                namespaces.insert(interned.clone());
                interned
            }
        };
        // A running job stays filed under the tools its attempt claims after a spec edit drops
        // them: their readiness checks and status.inUse must still count it (tests/tools.rs
        // a_running_job_cannot_take_or_give_back_rate_limit_by_editing_its_spec).
        let tools = snapshot::tools_named_or_claimed(job);
        Some(JobEntry { key: (namespace, job.name_any().into()), phase, tools: tools.into_iter().map(Box::from).collect(), waiting })
    }

    fn terminal(&self) -> bool {
        self.phase.is_some_and(JobPhase::is_terminal)
    }
}

/// Jobs by uid, with lookups by queue position, approval and tool. The lookups name a job by its
/// key, so no two entries may hold one key at once: a job's name is free again only once it is
/// gone, and the watch (or a relist's `InitDone`, gone jobs first) delivers that first.
#[derive(Clone, Debug, Default)]
pub struct JobIndex {
    entries: Entries<JobEntry, Uid>,
    /// Every indexed job's namespace, once.
    namespaces: HashSet<Arc<str>>,
    /// WaitingForResources jobs in queue order.
    waiting: BTreeMap<QueueKey, Uid>,
    awaiting_approval: BTreeSet<JobKey>,
    /// Tool → Running jobs that name it.
    running_by_tool: HashMap<String, Few<JobKey>>,
    /// Tool → unfinished jobs that name it.
    unfinished_by_tool: HashMap<String, Few<JobKey>>,
}

impl JobIndex {
    pub fn objects(&self) -> usize {
        self.entries.objects()
    }

    pub fn apply(&mut self, event: &Event<AgentJob>) {
        let namespaces = &mut self.namespaces;
        let changes = self.entries.apply_by(event, uid_of, |job| JobEntry::of(job, namespaces));
        for Change { key: uid, old, new } in changes {
            if let Some(old) = &old {
                self.unlink(old);
            }
            if let Some(new) = &new {
                self.link(uid, new);
            }
            // The interner's and `old`'s are the last: no job is left in that namespace.
            if let Some(old) = old
                && new.is_none()
                && Arc::strong_count(&old.key.0) == 2
            {
                self.namespaces.remove(&old.key.0);
            }
        }
    }

    fn link(&mut self, uid: Uid, e: &JobEntry) {
        if let Some(waiting) = &e.waiting {
            self.waiting.insert(waiting.0.clone(), uid);
        }
        if e.phase == Some(JobPhase::AwaitingApproval) {
            self.awaiting_approval.insert(e.key.clone());
        }
        for tool in &e.tools {
            if e.phase == Some(JobPhase::Running) {
                link(&mut self.running_by_tool, tool, &e.key);
            }
            if !e.terminal() {
                link(&mut self.unfinished_by_tool, tool, &e.key);
            }
        }
    }

    fn unlink(&mut self, e: &JobEntry) {
        if let Some(waiting) = &e.waiting {
            self.waiting.remove(&waiting.0);
        }
        self.awaiting_approval.remove(&e.key);
        for tool in &e.tools {
            unlink(&mut self.running_by_tool, tool, &e.key);
            unlink(&mut self.unfinished_by_tool, tool, &e.key);
        }
    }

    /// The namespace and name of the job with this uid.
    pub fn by_uid(&self, uid: &str) -> Option<Key> {
        self.entries.live.get(&Uid::of(uid)).map(|e| text(&e.key))
    }

    /// Jobs waiting for resources that are as urgent as `priority` and `created` or more: the
    /// only ones that can be queued ahead of a job with that key.
    pub fn waiting_up_to(&self, priority: i32, created: Option<k8s_openapi::jiff::Timestamp>) -> Vec<Key> {
        self.waiting.iter().take_while(|(q, _)| (q.0, q.1) <= (priority, created)).map(|(q, _)| (q.2.clone(), q.3.clone())).collect()
    }

    /// Every job waiting for resources, in queue order, with what it lacks.
    pub fn waiting(&self) -> impl Iterator<Item = (Key, Option<&Shortage>)> {
        self.waiting.iter().map(|(q, uid)| {
            let shortage = self.entries.live.get(uid).and_then(|e| e.waiting.as_ref()).map(|w| &w.1);
            ((q.2.clone(), q.3.clone()), shortage)
        })
    }

    pub fn awaiting_approval(&self) -> impl Iterator<Item = Key> {
        self.awaiting_approval.iter().map(text)
    }

    pub fn running_naming(&self, tool: &str) -> impl Iterator<Item = Key> {
        self.running_by_tool.get(tool).into_iter().flat_map(Few::iter).map(text)
    }

    pub fn unfinished_naming(&self, tool: &str) -> impl Iterator<Item = Key> {
        self.unfinished_by_tool.get(tool).into_iter().flat_map(Few::iter).map(text)
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
            .map(|(k, _)| k)
            .collect()
    }
}

/// Each job's `agentgate.dev/requested-by` annotation, which the job cache does not keep
/// (controller::slim::job): in the cached job it cost a `BTreeMap` node of 0.68 KB for one short
/// string, 15 % of the job. Fed from the watch event before it is slimmed and stored, so a job
/// in the store always has its requester here already (a relist swaps in at `InitDone`, the
/// store's after).
///
/// Entries are keyed by the job's uid: between the index's update and the store's, a job deleted
/// and recreated under its name by someone else must not be read with the new one's requester.
/// With the requester, the job's other spec editors (`agentgate.dev/spec-edited-by`, empty
/// when none: no allocation), who may not approve it either.
/// And the groups of each of them (`agentgate.dev/writer-groups`, domain/writer_groups.rs).
#[derive(Clone, Debug, Default)]
pub struct RequesterIndex {
    entries: Entries<Writers, Uid>,
}

/// A job's requester, its other spec editors and the groups of each: interned, since one
/// author's jobs share them (24 bytes a job and no heap of its own, where three `Box<str>` took
/// 48 and the groups' text: `controller::memory` test `what_the_job_indexes_cost_per_job`).
type Writers = (crate::api::Text, crate::api::Text, crate::api::Text);

impl RequesterIndex {
    pub fn apply(&mut self, event: &Event<AgentJob>) {
        self.entries.apply_by(event, uid_of, |job| {
            let requester = job.annotations().get(crate::api::REQUESTED_BY)?;
            let editors = job.annotations().get(crate::api::SPEC_EDITED_BY).map_or("", String::as_str);
            let groups = job.annotations().get(crate::api::WRITER_GROUPS).map_or("", String::as_str);
            Some((requester.into(), editors.into(), groups.into()))
        });
    }

    /// The groups of the job's writers as admission recorded them (empty: none recorded).
    pub fn writer_groups_of(&self, uid: &str) -> Option<String> {
        self.entries.live.get(&Uid::of(uid)).map(|(_, _, g)| g.to_string())
    }

    /// The requester of the job with this `uid`, if its annotation names one.
    pub fn of(&self, uid: &str) -> Option<String> {
        self.entries.live.get(&Uid::of(uid)).map(|(r, _, _)| r.to_string())
    }

    /// The other spec editors of the job with this `uid`, one a line (empty: none).
    pub fn editors_of(&self, uid: &str) -> Option<String> {
        self.entries.live.get(&Uid::of(uid)).map(|(_, e, _)| e.to_string())
    }

    pub fn objects(&self) -> usize {
        self.entries.objects()
    }
}
