//! What the operator's heap holds, for `GET /debug/memory` (server.rs) and `make bench`'s scale
//! row: jemalloc's own totals (what is allocated, what its pages hold resident, its metadata) and
//! each watch cache and index, sized by deep-copying it one object at a time on this thread and
//! reading jemalloc's per-thread allocation counter around the copy. The copies are dropped at
//! once, so a report costs the CPU of one copy of the caches and the memory of the largest copy:
//! one object of a store, an index whole (the job index: ~2 MiB at 10,000 jobs). An index's
//! lock is held while it is copied, so watch events wait that long to reach it.
//!
//! Sizes are jemalloc's size classes of every allocation an object owns plus its inline size;
//! a store's hash table slots are counted at their inline size per entry, and the estimate
//! ignores what hashing leaves empty. Without jemalloc as the global allocator (the library's
//! tests) every size reads 0 and the report says so.

use std::ffi::{CStr, c_void};
use std::fmt::Write as _;

use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};

use super::Caches;

fn read<T: Copy + Default>(name: &CStr) -> Option<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: `value` is a valid `T` of `len` bytes, the size jemalloc's ctl expects for `name`
    // (checked after the call: a size mismatch is an error, never a partial write).
    let rc = unsafe { tikv_jemalloc_sys::mallctl(name.as_ptr(), (&raw mut value).cast::<c_void>(), &mut len, std::ptr::null_mut(), 0) };
    (rc == 0 && len == std::mem::size_of::<T>()).then_some(value)
}

/// Bytes this thread has allocated and not freed since it started (wraps; only differences count).
fn thread_net() -> u64 {
    let allocated: u64 = read(c"thread.allocated").unwrap_or(0);
    let deallocated: u64 = read(c"thread.deallocated").unwrap_or(0);
    allocated.wrapping_sub(deallocated)
}

/// Heap bytes `value` owns, inline part included: what a boxed deep copy of it allocates.
pub fn heap_size<T: Clone>(value: &T) -> usize {
    let before = thread_net();
    let copy = Box::new(value.clone());
    let size = thread_net().wrapping_sub(before);
    drop(copy);
    usize::try_from(size).unwrap_or(usize::MAX)
}

/// jemalloc's totals, refreshed: allocated (live objects), active (their pages), resident
/// (pages in RAM, dirty ones not yet returned included), metadata, retained (virtual only).
#[derive(Debug, Default)]
pub struct AllocatorStats {
    pub allocated: usize,
    pub active: usize,
    pub resident: usize,
    pub metadata: usize,
    pub mapped: usize,
    pub retained: usize,
}

pub fn allocator_stats() -> AllocatorStats {
    let mut epoch: u64 = 1;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: "epoch" reads and writes one u64; both pointers are valid for that long.
    let _ = unsafe { tikv_jemalloc_sys::mallctl(c"epoch".as_ptr(), (&raw mut epoch).cast(), &mut len, (&raw mut epoch).cast(), len) };
    let stat = |name: &CStr| read::<usize>(name).unwrap_or(0);
    AllocatorStats {
        allocated: stat(c"stats.allocated"),
        active: stat(c"stats.active"),
        resident: stat(c"stats.resident"),
        metadata: stat(c"stats.metadata"),
        mapped: stat(c"stats.mapped"),
        retained: stat(c"stats.retained"),
    }
}

/// One line of the report: objects and their estimated bytes.
#[derive(Debug, PartialEq)]
pub struct Part {
    pub name: &'static str,
    pub count: usize,
    pub bytes: usize,
}

/// A store: each object deep-copied, plus its key (an `ObjectRef`: name, namespace,
/// resourceVersion and uid) and a hash table slot.
fn store_part<K>(name: &'static str, store: &Store<K>) -> Part
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let objects = store.state();
    let slot = std::mem::size_of::<(ObjectRef<K>, std::sync::Arc<K>)>();
    // An `Arc`'s two counters sit next to the object.
    let key_heap = |o: &K| heap_size(&ObjectRef::from_obj(o)).saturating_sub(std::mem::size_of::<ObjectRef<K>>());
    let bytes = objects.iter().map(|o| heap_size(&**o) + 2 * std::mem::size_of::<usize>() + key_heap(o) + slot).sum();
    Part { name, count: objects.len(), bytes }
}

/// Every cache and index, in the order the report prints them.
pub fn parts(caches: &Caches, approval_timeout_seconds: Option<i64>) -> Vec<Part> {
    let index = &caches.index;
    let indexed = |name, count, bytes| Part { name, count, bytes };
    vec![
        store_part("AgentJob cache", &caches.jobs),
        store_part("ApprovalVote cache", &caches.votes),
        store_part("Pod cache (agentgate's)", &caches.pods),
        store_part("AgentTool cache", &caches.tools),
        store_part("Node cache", &caches.nodes),
        store_part("ResourceQuota cache", &caches.quotas),
        store_part("Service cache", &caches.services),
        store_part("EndpointSlice cache", &caches.endpoint_slices),
        {
            let jobs = index.jobs();
            indexed("job index", jobs.objects(), heap_size(&*jobs))
        },
        {
            let pods = index.pods();
            indexed("Pod index", pods.objects(), heap_size(&*pods))
        },
        {
            let votes = index.votes();
            indexed("vote index", votes.objects(), heap_size(&*votes))
        },
        {
            let requesters = index.requesters();
            indexed("requester index", requesters.objects(), heap_size(&*requesters))
        },
        requeue_schedule(&caches.jobs, approval_timeout_seconds),
    ]
}

/// kube-runtime's scheduler holds the next resync of each job `resync::next_check` schedules
/// on the clock twice, in a map and in a timer wheel, as a `ReconcileRequest` whose `ObjectRef`
/// carries the job's name, namespace, resourceVersion and uid. Private to kube-runtime, so
/// estimated: two copies of that request per such job and a map slot's worth of bookkeeping.
fn requeue_schedule(jobs: &Store<crate::api::AgentJob>, approval_timeout_seconds: Option<i64>) -> Part {
    use kube::runtime::controller::ReconcileRequest;
    let phase = |j: &crate::api::AgentJob| j.status.as_ref().and_then(|s| s.phase);
    let unfinished: Vec<_> = jobs.state_filter(|j| super::resync::rechecked_on_the_clock(phase(j), approval_timeout_seconds));
    let request = std::mem::size_of::<ReconcileRequest<crate::api::AgentJob>>();
    let key_heap = |j: &crate::api::AgentJob| {
        heap_size(&ObjectRef::from_obj(j)).saturating_sub(std::mem::size_of::<ObjectRef<crate::api::AgentJob>>())
    };
    let bytes = unfinished.iter().map(|j| 2 * (request + key_heap(j)) + 64).sum();
    Part { name: "requeue schedule (estimate)", count: unfinished.len(), bytes }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The plain-text report `GET /debug/memory` serves.
pub fn report(caches: &Caches, approval_timeout_seconds: Option<i64>) -> String {
    let parts = parts(caches, approval_timeout_seconds);
    let stats = allocator_stats();
    let mut out = String::new();
    if stats.allocated == 0 {
        out.push_str("jemalloc is not this process's allocator: no sizes to report\n");
        return out;
    }
    let mib = |b: usize| b as f64 / MIB;
    let _ = writeln!(
        out,
        "allocator (jemalloc, MiB): allocated {:.1}, active {:.1}, resident {:.1}, metadata {:.1}, mapped {:.1}, retained {:.1}",
        mib(stats.allocated),
        mib(stats.active),
        mib(stats.resident),
        mib(stats.metadata),
        mib(stats.mapped),
        mib(stats.retained)
    );
    let listed: usize = parts.iter().map(|p| p.bytes).sum();
    for p in &parts {
        let per = p.bytes.checked_div(p.count).unwrap_or(0);
        let _ = writeln!(out, "{:<28} {:>7} objects {:>7.1} MiB {:>6} B each", p.name, p.count, mib(p.bytes), per);
    }
    let _ = writeln!(out, "{:<28} {:>7}         {:>7.1} MiB", "everything else allocated", "", mib(stats.allocated.saturating_sub(listed)));
    out
}

#[cfg(test)]
mod tests {
    /// A job as `make bench`'s scale row leaves 8,500 of its 10,000 (awaiting approval), as the
    /// watch delivers it: what each part costs cached, to read with `--nocapture`, and a bound
    /// on the whole so that a field added to the cached copy is a decision.
    #[test]
    fn what_a_cached_job_awaiting_approval_costs() {
        let mut job: crate::api::AgentJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"annotations": {"agentgate.dev/requested-by": "admin"}, "creationTimestamp": "2026-11-30T11:33:26Z",
                "generation": 1, "name": "scale-00002", "namespace": "bench-scale", "resourceVersion": "312",
                "uid": "50e68a4d-4412-4de4-bcf6-460940d0db1f"},
            "spec": {"agents": {"primary": {"image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini", "name": "agent"}},
                "budget": {"maxCostUSD": "5.00"}, "category": "bench", "jobType": "bench", "resources": {"cpu": "10m", "memory": "16Mi"}},
            "status": {"approval": {"approved": 0, "required": 2, "summary": "0/2"},
                "checks": [{"message": "a schedulable node fits one agent Pod", "name": "nodes", "passed": true}],
                "conditions": [
                    {"lastTransitionTime": "2026-11-30T11:33:27Z", "message": "p50 $0.0018 / p90 $0.0054, 7500 / 22500 tokens (prior, 0 sample(s))",
                     "observedGeneration": 1, "reason": "Estimated", "status": "True", "type": "Estimated"},
                    {"lastTransitionTime": "2026-11-30T11:33:27Z", "message": "all readiness checks passed", "observedGeneration": 1,
                     "reason": "Ready", "status": "True", "type": "InfrastructureReady"},
                    {"lastTransitionTime": "2026-11-30T11:33:27Z", "message": "0 of 2 approvals from category bench heads",
                     "observedGeneration": 1, "reason": "AwaitingApproval", "status": "False", "type": "Approved"},
                    {"lastTransitionTime": "2026-11-30T11:33:27Z", "message": "0 of 2 approvals from category bench heads",
                     "observedGeneration": 1, "reason": "AwaitingApproval", "status": "False", "type": "Ready"},
                    {"lastTransitionTime": "2026-11-30T11:33:27Z", "message": "0 of 2 approvals from category bench heads",
                     "observedGeneration": 1, "reason": "AwaitingApproval", "status": "True", "type": "Reconciling"}],
                "estimate": {"costUSD": {"p50": "0.0018", "p90": "0.0054"}, "generation": 1, "method": "prior",
                    "models": [{"costUSD": {"p50": "0.0018", "p90": "0.0054"}, "model": "gpt-4o-mini", "tokens": {"p50": 7500, "p90": 22500}}],
                    "samples": 0, "tokens": {"p50": 7500, "p90": 22500}},
                "history": [{"approvals": "0/2", "attempts": 0, "generation": 1, "observedTime": "2026-11-30T11:33:27Z",
                    "result": "AwaitingApproval", "specDigest": "sha256:f4158aeddce01ec5d1dca9f800422cb52a13c4e44c9b7901ede8cd261095750a"}],
                "observedGeneration": 1, "phase": "AwaitingApproval"}}))
        .unwrap();
        crate::controller::slim::job(&mut job);
        let status = job.status.as_ref().unwrap();
        let heap = |total: usize, inline: usize| total - inline;
        let parts = [
            ("inline (metadata, spec, status)", std::mem::size_of::<crate::api::AgentJob>()),
            ("metadata strings", heap(super::heap_size(&job.metadata), std::mem::size_of_val(&job.metadata))),
            ("spec strings", heap(super::heap_size(&job.spec), std::mem::size_of_val(&job.spec))),
            ("5 conditions", heap(super::heap_size(&status.conditions), std::mem::size_of_val(&status.conditions))),
            ("estimate", heap(super::heap_size(&status.estimate), std::mem::size_of_val(&status.estimate))),
            ("history", heap(super::heap_size(&status.history), std::mem::size_of_val(&status.history))),
            (
                "checks and approval",
                heap(super::heap_size(&status.checks), std::mem::size_of_val(&status.checks))
                    + heap(super::heap_size(&status.approval), std::mem::size_of_val(&status.approval)),
            ),
        ];
        for (what, bytes) in parts {
            println!("{what:<34} {bytes:>5} B");
        }
        let whole = super::heap_size(&job);
        println!("{:<34} {whole:>5} B", "whole job");
        // 3.6 KB with `String`s in its conditions and its empty status structs inline; 2.8 KB
        // with `Arc<str>` conditions, its other repeated status strings and its history's spec
        // digest `String`s, its estimate and free-form spec values inline (the job's `Arc` in
        // jemalloc's 1,536-byte class; it is 1,264 now, and one more field can take it back there).
        assert!(whole < 2150, "a cached job awaiting approval costs {whole} B");
        let arc = std::mem::size_of::<crate::api::AgentJob>() + 2 * std::mem::size_of::<usize>();
        assert!(arc <= 1280, "a cached job's Arc is {arc} B: over jemalloc's 1,280-byte size class, it takes 1,536");
        let conditions = heap(super::heap_size(&status.conditions), std::mem::size_of_val(&status.conditions));
        assert!(conditions <= 5 * std::mem::size_of::<crate::api::Condition>() + 64, "five conditions cost {conditions} B");
    }

    /// The job and requester indexes at 10,000 jobs awaiting approval in one namespace, as the
    /// scale row leaves most of its jobs: per job, to read with `--nocapture`, and bounded.
    #[test]
    fn what_the_job_indexes_cost_per_job() {
        use kube::runtime::watcher::Event;
        let jobs = 10_000;
        let (mut index, mut requesters) =
            (crate::controller::index::JobIndex::default(), crate::controller::index::RequesterIndex::default());
        for n in 0..jobs {
            let job: crate::api::AgentJob = serde_json::from_value(serde_json::json!({
                "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
                "metadata": {"annotations": {"agentgate.dev/requested-by": "admin",
                    "agentgate.dev/writer-groups": "admin\tsystem:masters\tsystem:authenticated"}, "name": format!("scale-{n:05}"),
                    "namespace": "bench-scale", "uid": format!("50e68a4d-4412-4de4-bcf6-{n:012x}")},
                "spec": {"agents": {"primary": {"image": "i", "model": "gpt-4o-mini", "name": "agent"}},
                    "budget": {"maxCostUSD": "5.00"}, "category": "bench"},
                "status": {"phase": "AwaitingApproval"}}))
            .unwrap();
            requesters.apply(&Event::Apply(job.clone()));
            index.apply(&Event::Apply(job));
        }
        let (job_index, requester_index) = (super::heap_size(&index) / jobs, super::heap_size(&requesters) / jobs);
        println!("job index {job_index} B a job, requester index {requester_index} B a job");
        // 565 and 247 B with a `String` copy of a job's namespace, name and uid in each map.
        assert!(job_index < 300 && requester_index < 120, "{job_index} B, {requester_index} B");
    }

    #[test]
    fn a_values_heap_size_counts_what_it_owns() {
        let text = "x".repeat(1000);
        let size = super::heap_size(&text);
        assert!((1000 + 24..1200).contains(&size), "{size}");
        let nested = vec![text.clone(), text];
        assert!(super::heap_size(&nested) > 2 * size, "{}", super::heap_size(&nested));
    }
}
