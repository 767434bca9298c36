//! Agent Pods that lost their AgentJob controller ownerReference, and Pods whose job is deleted.
//!
//! The admission policy (deploy/admission/pods.yaml) lets whoever may patch a Pod remove its
//! AgentJob ownerReference: the garbage collector does exactly that on an orphaning delete
//! (`kubectl delete agentjob --cascade=orphan`), under an identity that differs between
//! distributions, and a policy refusing it to everyone else would block such deletes wherever it
//! guessed the identity wrong. Left so, the Pod was no Pod of its job's any more: its attempt
//! failed as `PodDeleted`, a retry started beside it, the orphan sweep released its usage
//! finalizer, and it ran on with its meter (which the meter API then refused, so what it spent
//! next was never told), outside the operator's control, holding its node and its tools
//! (tests/gate_attacks.rs an_agent_pod_stripped_of_its_owner_is_taken_back_not_left_running_beside_a_retry).
//! So the operator does not rely on the policy for this:
//! - **A job that still stands takes its Pod back** (`take_back`): a Pod of its namespace
//!   labelled and named as its Pod, holding the usage finalizer and controlled by no AgentJob
//!   (`snapshot::lost_job_pod`) gets the job's controller ownerReference again, and a
//!   `PodOwnerRestored` Warning Event names it. Only the operator makes Pods with those labels,
//!   and nobody else may remove them or the finalizer, so the Pod is provably the job's. It is
//!   taken back, not stopped: the attempt the heads approved goes on as if nothing had happened
//!   (no second attempt, its meter served again, its usage read when it ends), which is all an
//!   attacker loses; stopping it would only cost its own team an attempt. It is taken back on a
//!   fresh read of the job, as Kubernetes' controllers adopt orphans: an orphaning delete
//!   removes the owners before the job goes, while the cache may not show the deletion yet.
//! - **A Pod whose job is deleted or being deleted is stopped** (`stop`, from the job's
//!   deletion and from `pod_finalizer::sweep`): deleted unless it has ended, then let go, so an
//!   orphaning delete leaves no agent running without a job. What it spent goes where a deleted
//!   job's usage goes (nowhere: its status went with it), as with any other delete
//!   (tests/usage_durability.rs an_orphaning_delete_of_a_running_job_stops_its_pod_and_loses_no_recorded_usage).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

use super::error::{ApplyError, ObserveError};
use super::{Context, Result};
use crate::api::AgentJob;

/// The job's metadata as stored now (None: no job of that name), decoded as the watch decodes
/// it (decode.rs), so that a job whose input nests too deep for serde_json is still read.
pub(super) async fn stored_job(ctx: &Context, namespace: &str, name: &str) -> Result<Option<ObjectMeta>, kube::Error> {
    let api: Api<super::decode::Decoded<AgentJob>> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(api.get_opt(name).await?.map(|decoded| match decoded.0 {
        Ok(job) => job.metadata,
        Err(undecodable) => undecodable.metadata,
    }))
}

/// Whether the stored job is the one of `uid` and not being deleted. Pure.
pub fn stands(stored: Option<&ObjectMeta>, uid: &str) -> bool {
    stored.is_some_and(|m| m.uid.as_deref() == Some(uid) && m.deletion_timestamp.is_none())
}

/// The Pod's owners with the job's controller reference back in front; any other owner is kept,
/// no longer as controller (a Pod has one). Pure.
pub fn owners_with(job: &OwnerReference, owners: &[OwnerReference]) -> Vec<OwnerReference> {
    let others = owners.iter().filter(|o| o.uid != job.uid).map(|o| OwnerReference { controller: None, ..o.clone() });
    std::iter::once(job.clone()).chain(others).collect()
}

/// Gives `lost` (the job's Pods that lost their controller ownerReference) back to `job`, if it
/// still stands. Nothing else of the job is decided in this reconcile: the watch brings the Pods
/// back as the job's, and the next reconcile follows them as before.
pub(super) async fn take_back(job: &AgentJob, ctx: &Context, lost: &[Arc<Pod>]) -> Result<Action> {
    let (namespace, name, uid) = (job.namespace().unwrap_or_default(), job.name_any(), job.metadata.uid.clone().unwrap_or_default());
    let stored = stored_job(ctx, &namespace, &name).await.map_err(|source| ObserveError::RecheckJob {
        namespace: namespace.clone(),
        job: name.clone(),
        source,
    })?;
    let Some(owner) = job.controller_owner_ref(&()).filter(|_| stands(stored.as_ref(), &uid)) else {
        // Being deleted, or gone: its Pods are stopped (`stop`), never taken back.
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PatchParams { field_manager: Some(ctx.settings.field_manager.clone()), ..PatchParams::default() };
    let mut taken = Vec::new();
    for pod in lost {
        let mut metadata = serde_json::json!({ "ownerReferences": owners_with(&owner, pod.owner_references()) });
        // Only over the version read: an owner changed meanwhile is looked at again.
        if let Some(version) = pod.resource_version() {
            metadata["resourceVersion"] = version.into();
        }
        match api.patch_metadata(&pod.name_any(), &params, &Patch::Merge(serde_json::json!({ "metadata": metadata }))).await {
            Ok(_) => taken.push(pod.name_any()),
            // Gone since: the next reconcile finds it gone, as any deleted Pod.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(ApplyError::TakeBackPod { namespace, pod: pod.name_any(), source }.into()),
        }
    }
    if !taken.is_empty() {
        let note = format!(
            "Pod(s) {} had lost their controller ownerReference to this job while it still stands (an orphaning delete removes \
             it only from the Pods of a job being deleted); taken back: the attempt goes on, supervised and metered as before",
            taken.join(", ")
        );
        tracing::warn!(job = %name, %namespace, pods = ?taken, "took back agent Pods that had lost their owner");
        ctx.publish_event(&job.object_ref(&()), EventType::Warning, "PodOwnerRestored", &note, "TakeBackPod").await;
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Stops an agent Pod whose job is deleted or being deleted: deletes it, unless it has ended or
/// is being deleted already. A Pod gone meanwhile is fine. Its usage finalizer is the caller's
/// to release.
pub(super) async fn stop(ctx: &Context, pod: &Pod) -> Result<(), ApplyError> {
    let ended = matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
    if ended || pod.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let namespace = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    // Only the Pod read: one of that name made since is not this one.
    let params = DeleteParams {
        preconditions: pod.metadata.uid.clone().map(|uid| kube::api::Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name_any(), &params).await {
        Ok(_) => {
            tracing::info!(pod = %pod.name_any(), %namespace, "stopped an agent Pod whose job is deleted");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(source) => Err(ApplyError::StopPod { namespace, pod: pod.name_any(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: "o".into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    #[test]
    fn the_job_is_the_controller_again_and_other_owners_stay_as_owners() {
        let job = owner("AgentJob", "job", true);
        assert_eq!(owners_with(&job, &[]), std::slice::from_ref(&job));
        let taken = owners_with(&job, &[owner("ConfigMap", "cm", true), owner("Secret", "s", false)]);
        assert_eq!(
            taken.iter().map(|o| (o.uid.as_str(), o.controller)).collect::<Vec<_>>(),
            [("job", Some(true)), ("cm", None), ("s", None)]
        );
        // Never twice.
        assert_eq!(owners_with(&job, &[owner("AgentJob", "job", false)]), [job]);
    }

    #[test]
    fn a_job_stands_while_stored_with_its_uid_and_not_being_deleted() {
        let meta = |uid: &str, deleting: bool| ObjectMeta {
            uid: Some(uid.into()),
            deletion_timestamp: deleting.then(|| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())),
            ..ObjectMeta::default()
        };
        assert!(stands(Some(&meta("u", false)), "u"));
        assert!(!stands(Some(&meta("u", true)), "u"), "an orphaning delete under way");
        assert!(!stands(Some(&meta("other", false)), "u"), "a namesake");
        assert!(!stands(None, "u"));
    }
}
