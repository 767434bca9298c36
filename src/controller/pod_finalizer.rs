//! The usage-tracking finalizer on agent Pods (domain/pod_builder.rs `USAGE_FINALIZER`).
//!
//! A Pod keeps it until what it can tell (its attempt's result and usage) is in its job's status,
//! so deleting a finished Pod before the operator read it loses nothing: it stays, terminating,
//! with its termination message readable. The finalizer goes:
//! - after the status write that records the Pod's attempt as settled (`releasable`);
//! - when the Pod's attempt is not recorded and never will be (the Pod is finished or deleted);
//! - when the job is deleted, or the Pod has no job any more (`sweep`): the Pods go with their
//!   job through the garbage collector, which the finalizer must not block forever.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::error::ApplyError;
use super::{Context, snapshot};
use crate::api::{AgentJob, AgentJobStatus, AttemptResult, JobPhase};
use crate::domain::decide::PodView;
use crate::domain::pod_builder::USAGE_FINALIZER;

pub fn holds_finalizer(pod: &Pod) -> bool {
    pod.finalizers().iter().any(|f| f == USAGE_FINALIZER)
}

/// Whether a job's Pod may let go of the finalizer, given the job's status as stored. Pure.
/// `deleting`: the Pod has a deletionTimestamp.
/// `scheduled`: the Pod was bound to a node.
pub fn releasable(status: &AgentJobStatus, pod: &PodView, deleting: bool, scheduled: bool) -> bool {
    // Deleted before it ever ran on a node: no kubelet will terminate it and it spent nothing.
    // Let go, it vanishes and its attempt fails as a deleted Pod's (decide.rs, PodDeleted).
    if deleting && !scheduled && pod.state == crate::domain::decide::PodState::Active {
        return true;
    }
    // A finished or rejected job never reads its Pods again.
    if status.phase.is_some_and(JobPhase::is_terminal) {
        return true;
    }
    match status.attempts.iter().find(|a| a.pods.contains(&pod.name)) {
        // Its attempt's result and usage are recorded (settled, or superseded and then settled).
        Some(attempt) => attempt.result != AttemptResult::Running,
        // An attempt the decision did not adopt (unproven, or of someone else's making): nothing of
        // it will ever be recorded; once it has finished or is being deleted, it is let go.
        None => deleting || !matches!(pod.state, crate::domain::decide::PodState::Active),
    }
}

/// Removes the finalizer from the job's Pods that `releasable` lets go, after `status` was
/// stored. A Pod already gone is fine.
pub async fn release_settled(ctx: &Context, job: &AgentJob, owned: &[Arc<Pod>], status: &AgentJobStatus) -> Result<(), ApplyError> {
    let all = job.metadata.deletion_timestamp.is_some();
    for pod in owned.iter().filter(|p| holds_finalizer(p)) {
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
        let release = all || snapshot::pod_view(pod).is_none_or(|view| releasable(status, &view, deleting, scheduled));
        if release {
            release_pod(ctx, pod).await?;
        }
    }
    Ok(())
}

/// The patch the Job controller uses for its tracking finalizer: it removes only ours, whatever
/// other finalizers come and go meanwhile.
async fn release_pod(ctx: &Context, pod: &Pod) -> Result<(), ApplyError> {
    let namespace = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({ "metadata": { "$deleteFromPrimitiveList/finalizers": [USAGE_FINALIZER] } });
    let params = PatchParams { field_manager: Some(ctx.settings.field_manager.clone()), ..PatchParams::default() };
    match api.patch(&pod.name_any(), &params, &Patch::Strategic(patch)).await {
        Ok(_) => {
            tracing::debug!(pod = %pod.name_any(), namespace = ?pod.namespace(), "released usage finalizer");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ApplyError::ReleaseFinalizer { namespace, pod: pod.name_any(), source }),
    }
}

/// Pods holding the finalizer whose job is not in the cache, or that have no AgentJob controller
/// any more (an orphaning delete dropped it): they will never be reconciled as a job's Pods.
/// Only in the namespace an operator of one namespace watches: a decoy elsewhere is not its to
/// release, and its job is not one it could see.
fn orphan_candidates(ctx: &Context) -> Vec<Arc<Pod>> {
    let uids: BTreeSet<String> = ctx.caches.jobs.state().iter().filter_map(|j| j.metadata.uid.clone()).collect();
    let scope = ctx.settings.namespace.as_deref();
    ctx.caches.pods.state_filter(|p| {
        scope.is_none_or(|ns| p.metadata.namespace.as_deref() == Some(ns))
            && holds_finalizer(p)
            && snapshot::pod_controller_job_uid(p).is_none_or(|uid| !uids.contains(uid))
    })
}

/// Whether a Pod's job is gone: asked of the API, not the cache, which may lag behind a job
/// just created (then the Pod is still its job's, and the job's reconcile handles it).
async fn job_gone(ctx: &Context, pod: &Pod) -> Result<bool, kube::Error> {
    let Some(owner) = pod.owner_references().iter().find(|o| o.controller == Some(true) && o.kind == "AgentJob") else {
        return Ok(true);
    };
    let api: Api<AgentJob> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let job = api.get_opt(&owner.name).await?;
    Ok(job.is_none_or(|j| j.metadata.uid.as_deref() != Some(owner.uid.as_str())))
}

/// Releases orphaned Pods whenever the Pod watch pokes `trigger` (a Pod holding the finalizer
/// whose job is not cached) and every few minutes as a safety net.
pub async fn sweep(ctx: Arc<Context>, trigger: Arc<tokio::sync::Notify>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(120), trigger.notified()).await;
        if !ctx.caches.synced() {
            continue;
        }
        for pod in orphan_candidates(&ctx) {
            let released = match job_gone(&ctx, &pod).await {
                Ok(true) => release_pod(&ctx, &pod).await.map(|()| true).map_err(|e| e.to_string()),
                Ok(false) => Ok(false),
                Err(e) => Err(format!("GET its AgentJob: {e}")),
            };
            match released {
                Ok(true) => {
                    tracing::info!(pod = %pod.name_any(), namespace = ?pod.namespace(), "released usage finalizer of a Pod whose job is gone")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(pod = %pod.name_any(), namespace = ?pod.namespace(), %error, "could not release usage finalizer")
                }
            }
        }
    }
}

/// For the Pod watch: whether this Pod should wake the sweeper (one cache lookup, by owner name).
pub fn is_orphan_hint(jobs: &kube::runtime::reflector::Store<AgentJob>, pod: &Pod) -> bool {
    if !holds_finalizer(pod) {
        return false;
    }
    let owner = pod.owner_references().iter().find(|o| o.controller == Some(true) && o.kind == "AgentJob");
    owner.is_none_or(|o| {
        let cached = jobs.get(&kube::runtime::reflector::ObjectRef::new(&o.name).within(&pod.namespace().unwrap_or_default()));
        cached.is_none_or(|j| j.metadata.uid.as_deref() != Some(o.uid.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Attempt;
    use crate::domain::decide::PodState;

    fn view(name: &str, state: PodState) -> PodView {
        PodView { name: name.into(), agent: "a".into(), attempt: 1, generation: Some(1), state, meter: Default::default() }
    }

    fn status(result: AttemptResult, phase: Option<JobPhase>) -> AgentJobStatus {
        AgentJobStatus {
            phase,
            attempts: vec![Attempt {
                attempt: 1,
                generation: 1,
                pods: vec!["j-a-1".into()],
                result,
                learned: Some(false),
                ..Attempt::default()
            }],
            ..AgentJobStatus::default()
        }
    }

    #[test]
    fn held_until_the_attempt_is_recorded() {
        let done = view("j-a-1", PodState::Succeeded { message: Some("{}".into()) });
        // Finished (even deleted) but not yet in status: held, its report is still to be read.
        assert!(!releasable(&status(AttemptResult::Running, Some(JobPhase::Running)), &done, false, true));
        assert!(!releasable(&status(AttemptResult::Running, Some(JobPhase::Running)), &done, true, true));
        // Recorded: let go, whatever the job does next (a retry, success).
        assert!(releasable(&status(AttemptResult::Failed, Some(JobPhase::Running)), &done, false, true));
        assert!(releasable(&status(AttemptResult::Succeeded, Some(JobPhase::Succeeded)), &done, false, true));
    }

    #[test]
    fn unrecorded_pods_go_once_finished_or_deleted_and_finished_jobs_release_all() {
        let recorded = status(AttemptResult::Running, Some(JobPhase::Running));
        let stray = view("j-a-7", PodState::Active);
        assert!(!releasable(&recorded, &stray, false, true), "may still be adopted");
        assert!(releasable(&recorded, &stray, true, true));
        assert!(releasable(&recorded, &view("j-a-7", PodState::Failed { reason: "x".into(), message: None }), false, true));
        assert!(releasable(&status(AttemptResult::Running, Some(JobPhase::Rejected)), &view("j-a-1", PodState::Active), false, true));
        // Recorded and running: held while it may still run; deleted before it was scheduled, let go.
        let running = view("j-a-1", PodState::Active);
        assert!(!releasable(&recorded, &running, true, true));
        assert!(releasable(&recorded, &running, true, false));
    }
}
