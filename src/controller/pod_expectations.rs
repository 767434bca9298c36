//! Pods this operator created that the Pod watch has not shown yet: kube-controller-manager's
//! "expectations". A reconcile woken by the job's own status write can run before the Pod's watch
//! event reaches the cache; without this it POSTed the Pod again and got a 409 (~1% of `make
//! bench`'s jobs, one API write each). While a Pod is expected, `decide` plans no create for it
//! and the reconcile does not GET it to tell a slow cache from a deleted Pod
//! (`decide::Observed::expected_pods`).
//!
//! An expectation ends when the Pod watch shows the Pod (added, changed or deleted: a tenant
//! deleting the Pod right after its creation must not hold the job up), when the create fails,
//! when the job goes, or after [`EXPECTATION_TTL`], so that a lost watch event never wedges a job:
//! the reconcile then looks the Pod up again, and creates it if it is missing (a 409 is handled as
//! it always was). Only the operator's own creates make an expectation: nothing a tenant writes
//! (status, a Pod of that name) can make one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher;

use crate::domain::snapshot;

/// How long a created Pod is expected at most. The watch shows a Pod within a second or two even
/// under `make bench`'s burst; an expectation that outlives this was lost (a relist that skipped
/// the Pod), and the job is looked at again then (`PodExpectations::pending`).
pub const EXPECTATION_TTL: Duration = Duration::from_secs(30);

struct Expected {
    attempt: i32,
    pods: Vec<String>,
    until: Instant,
}

/// Expected Pods by job uid, for the newest attempt each job created Pods for.
pub struct PodExpectations {
    jobs: Mutex<HashMap<String, Expected>>,
    /// Size at which the next `creating` drops expired entries (jobs deleted during a relist
    /// never get a Delete event): amortised, never a scan per create.
    sweep_at: Mutex<usize>,
}

impl Default for PodExpectations {
    fn default() -> Self {
        PodExpectations { jobs: Mutex::default(), sweep_at: Mutex::new(Self::SWEEP_FROM) }
    }
}

impl PodExpectations {
    /// Beyond this many jobs with Pods in flight, forget them all: the worst a forgotten
    /// expectation costs is one create refused with a 409, as without expectations.
    const CAP: usize = 50_000;
    const SWEEP_FROM: usize = 1024;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Expected>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called before POSTing `pod` of `attempt` of job `uid`, so that a watch event arriving
    /// before the POST returns already finds it. Another attempt's expectation is replaced.
    pub fn creating(&self, uid: &str, attempt: i32, pod: &str, now: Instant) {
        let mut jobs = self.lock();
        if !jobs.contains_key(uid) {
            let mut sweep_at = self.sweep_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if jobs.len() >= *sweep_at {
                jobs.retain(|_, e| e.until > now);
                *sweep_at = (jobs.len() * 2).max(Self::SWEEP_FROM);
            }
            if jobs.len() >= Self::CAP {
                jobs.clear();
            }
        }
        let entry = jobs.entry(uid.to_string()).or_insert_with(|| Expected { attempt, pods: Vec::new(), until: now });
        if entry.attempt != attempt || entry.until <= now {
            *entry = Expected { attempt, pods: Vec::new(), until: now };
        }
        if !entry.pods.iter().any(|p| p == pod) {
            entry.pods.push(pod.to_string());
        }
        entry.until = now + EXPECTATION_TTL;
    }

    /// The Pod watch showed `pod` of job `uid` (or its create failed): it is no longer on its way.
    pub fn observed(&self, uid: &str, pod: &str) {
        let mut jobs = self.lock();
        if let Some(entry) = jobs.get_mut(uid) {
            entry.pods.retain(|p| p != pod);
            if entry.pods.is_empty() {
                jobs.remove(uid);
            }
        }
    }

    /// The job is gone: nothing of it is expected any more.
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// The Pods of job `uid` still expected at `now`, and how long until they no longer are.
    pub fn pending(&self, uid: &str, now: Instant) -> (Vec<String>, Option<Duration>) {
        let mut jobs = self.lock();
        match jobs.get(uid) {
            Some(entry) if entry.until > now => (entry.pods.clone(), Some(entry.until - now)),
            Some(_) => {
                jobs.remove(uid);
                (Vec::new(), None)
            }
            None => (Vec::new(), None),
        }
    }

    /// Applies a Pod watch event once the store has it: every Pod the event shows ends the
    /// expectation of its controlling job.
    pub fn apply(&self, event: &watcher::Event<Pod>) {
        if let watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) | watcher::Event::Delete(pod) = event
            && let Some(uid) = snapshot::pod_controller_job_uid(pod)
        {
            self.observed(uid, &pod.name_any());
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(pending: (Vec<String>, Option<Duration>)) -> Vec<String> {
        pending.0
    }

    #[test]
    fn a_created_pod_is_expected_until_the_watch_shows_it() {
        let (e, t) = (PodExpectations::default(), Instant::now());
        e.creating("uid-1", 1, "scan-scanner-1", t);
        e.creating("uid-1", 1, "scan-fixer-1", t);
        assert_eq!(names(e.pending("uid-1", t)), ["scan-scanner-1", "scan-fixer-1"]);
        assert_eq!(e.pending("uid-1", t).1, Some(EXPECTATION_TTL));
        assert!(names(e.pending("uid-2", t)).is_empty(), "per job");
        e.observed("uid-1", "scan-scanner-1");
        assert_eq!(names(e.pending("uid-1", t)), ["scan-fixer-1"]);
        e.observed("uid-1", "scan-fixer-1");
        assert_eq!(e.len(), 0, "a job with nothing in flight takes no room");
    }

    /// A lost watch event never wedges a job: past the bound, nothing is expected and the
    /// reconcile looks the Pod up (and creates it if missing) again.
    #[test]
    fn an_expectation_expires() {
        let (e, t) = (PodExpectations::default(), Instant::now());
        e.creating("uid-1", 1, "scan-scanner-1", t);
        let later = t + EXPECTATION_TTL;
        assert_eq!(e.pending("uid-1", later), (Vec::new(), None));
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn a_new_attempt_replaces_the_last_and_a_deleted_job_is_forgotten() {
        let (e, t) = (PodExpectations::default(), Instant::now());
        e.creating("uid-1", 1, "scan-scanner-1", t);
        e.creating("uid-1", 2, "scan-scanner-2", t);
        assert_eq!(names(e.pending("uid-1", t)), ["scan-scanner-2"]);
        e.forget("uid-1");
        assert_eq!(e.len(), 0);
    }

    /// Only the job controlling the Pod is concerned: a decoy labelled with the job's uid (no
    /// controller) shown by the watch ends nothing.
    #[test]
    fn a_watch_event_ends_the_expectation_of_the_pods_controller_only() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let (e, t) = (PodExpectations::default(), Instant::now());
        e.creating("uid-1", 1, "scan-scanner-1", t);
        let mut pod = Pod::default();
        pod.metadata.name = Some("scan-scanner-1".into());
        pod.metadata.labels = Some([(crate::domain::pod_builder::LABEL_JOB_UID.to_string(), "uid-1".to_string())].into());
        e.apply(&watcher::Event::Apply(pod.clone()));
        assert_eq!(names(e.pending("uid-1", t)), ["scan-scanner-1"], "a decoy is no sign of the operator's Pod");
        pod.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "agentgate.dev/v1alpha1".into(),
            kind: "AgentJob".into(),
            name: "scan".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        e.apply(&watcher::Event::Delete(pod));
        assert!(names(e.pending("uid-1", t)).is_empty(), "deleted right after its creation: not expected any more");
    }

    #[test]
    fn expired_entries_are_swept_and_the_map_is_bounded() {
        let (e, t) = (PodExpectations::default(), Instant::now());
        for i in 0..PodExpectations::SWEEP_FROM {
            e.creating(&format!("old-{i}"), 1, "p", t);
        }
        e.creating("new", 1, "p", t + EXPECTATION_TTL);
        assert_eq!(e.len(), 1, "the expired ones went when the map reached the sweep size");
        for i in 0..PodExpectations::CAP + 10 {
            e.creating(&format!("live-{i}"), 1, "p", t + EXPECTATION_TTL);
        }
        assert!(e.len() <= PodExpectations::CAP, "{}", e.len());
    }
}
