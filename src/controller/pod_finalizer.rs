//! The usage-tracking finalizer on agent Pods (domain/pod_builder.rs `USAGE_FINALIZER`).
//!
//! A Pod keeps it until what it can tell (its attempt's result and usage) is in its job's status,
//! so deleting a finished Pod before the operator read it loses nothing: it stays, terminating,
//! with its termination message readable. The finalizer goes:
//! - after the status write that records the Pod's attempt as settled (`releasable`);
//! - when the Pod's attempt is not recorded and never will be (the Pod is finished or deleted);
//! - when the job is deleted, or the Pod has no job any more (`sweep`): the Pods go with their
//!   job through the garbage collector, which the finalizer must not block forever; a Pod still
//!   running is stopped first, so that an orphaning delete leaves none running (lost_pods.rs).
//!   A Pod that lost its owner while its job stands keeps it: the job takes the Pod back.

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
/// any more (an orphaning delete dropped it, or a tenant did): they will never be reconciled as a
/// job's Pods unless their job takes them back (lost_pods.rs).
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

/// What the sweep does with a candidate.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Its job stands: the job's reconcile reads it, or takes it back (lost_pods.rs).
    Keep,
    /// No job of its namespace claims it: let go, not stopped (a decoy posing as another
    /// namespace's job, or a Pod without the job labels, is not the operator's to delete).
    Release,
    /// Its job is gone or being deleted: stopped, then let go.
    Stop,
}

/// Its job, asked of the API, not the cache, which may lag behind a job just created (then the
/// Pod is still its job's, and the job's reconcile handles it): the AgentJob controller it names,
/// or, when it has none, the job its labels and name say it is a Pod of (snapshot::labelled_job),
/// in its own namespace only.
async fn fate(ctx: &Context, pod: &Pod) -> Result<Fate, kube::Error> {
    let namespace = pod.namespace().unwrap_or_default();
    let owner = pod.owner_references().iter().find(|o| o.controller == Some(true) && o.kind == "AgentJob");
    let (name, uid, owned) = match (owner, snapshot::labelled_job(pod)) {
        (Some(owner), _) => (owner.name.clone(), owner.uid.clone(), true),
        (None, Some((job, uid))) => {
            let elsewhere = ctx.caches.index.jobs().by_uid(uid).is_some_and(|(ns, _)| ns != namespace);
            if elsewhere {
                return Ok(Fate::Release);
            }
            (job.to_string(), uid.to_string(), false)
        }
        (None, None) => return Ok(Fate::Release),
    };
    let stored = super::lost_pods::stored_job(ctx, &namespace, &name).await?;
    let same = stored.as_ref().is_some_and(|m| m.uid.as_deref() == Some(uid.as_str()));
    // A Pod its job still controls while the job is deleted goes with the job's own deletion
    // (agent_job.rs); one that lost its owner to an orphaning delete is stopped here.
    Ok(if super::lost_pods::stands(stored.as_ref(), &uid) || (owned && same) { Fate::Keep } else { Fate::Stop })
}

/// Releases orphaned Pods, and stops those whose job is deleted, whenever the Pod watch pokes
/// `trigger` (a Pod holding the finalizer whose job is not cached) and every few minutes as a
/// safety net.
pub async fn sweep(ctx: Arc<Context>, trigger: Arc<tokio::sync::Notify>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(120), trigger.notified()).await;
        if !ctx.caches.synced() {
            continue;
        }
        for pod in orphan_candidates(&ctx) {
            let done = match fate(&ctx, &pod).await {
                Ok(Fate::Keep) => Ok(None),
                Ok(Fate::Release) => {
                    release_pod(&ctx, &pod).await.map(|()| Some("released usage finalizer of a Pod no job of its namespace claims"))
                }
                Ok(Fate::Stop) => match super::lost_pods::stop(&ctx, &pod).await {
                    Ok(()) => {
                        release_pod(&ctx, &pod).await.map(|()| Some("stopped a Pod whose job is deleted and released its usage finalizer"))
                    }
                    Err(e) => Err(e),
                },
                Err(e) => {
                    tracing::warn!(pod = %pod.name_any(), namespace = ?pod.namespace(), error = %e, "could not read a Pod's AgentJob");
                    Ok(None)
                }
            };
            match done {
                Ok(Some(what)) => tracing::info!(pod = %pod.name_any(), namespace = ?pod.namespace(), "{what}"),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(pod = %pod.name_any(), namespace = ?pod.namespace(), %error, "could not release or stop an orphaned Pod")
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
