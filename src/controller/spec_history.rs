//! Where old specs live: one ControllerRevision per generation of a job (as DaemonSets and
//! StatefulSets keep their history), owned by the job so it goes with it, holding
//! `{"spec": <the spec>}` and annotated with the spec's digest. Created once, when the
//! operator first sees the generation (domain/history.rs says when), and deleted when the
//! generation falls out of `status.history`. Tenants' usual roles (view, edit, admin) may read
//! ControllerRevisions but not write them; `kubectl agentgate rerun` still refuses one whose
//! spec does not have the digest the status recorded.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

use super::error::ApplyError;
use super::{Context, Result};
use crate::api::AgentJob;
use crate::domain::history::{JOB_UID_LABEL, SPEC_DIGEST_ANNOTATION, revision_name, spec_digest};

/// The revision holding `job`'s current spec (its generation is `generation`).
pub fn revision_of(job: &AgentJob, generation: i64) -> ControllerRevision {
    let name = job.name_any();
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(revision_name(&name, generation)),
            namespace: job.namespace(),
            labels: Some(BTreeMap::from([
                (JOB_UID_LABEL.to_string(), job.metadata.uid.clone().unwrap_or_default()),
                ("app.kubernetes.io/managed-by".to_string(), "agentgate".to_string()),
            ])),
            annotations: Some(BTreeMap::from([(SPEC_DIGEST_ANNOTATION.to_string(), spec_digest(&job.spec))])),
            // Not blockOwnerDeletion: nothing needs to wait for a revision.
            owner_references: job.controller_owner_ref(&()).map(|mut r| {
                r.block_owner_deletion = None;
                vec![r]
            }),
            ..ObjectMeta::default()
        },
        revision: Some(generation),
        data: RawExtension(serde_json::json!({ "spec": job.spec })),
    }
}

/// Stores the spec of `job`'s generation `generation` before the status that records it is
/// written. Idempotent: a revision already there (an earlier reconcile whose status write was
/// refused) is kept. A transient failure fails the reconcile, which retries; a refusal that
/// retrying will not fix (a ResourceQuota on `count/controllerrevisions.apps`, RBAC) is said
/// in a Warning Event and the job goes on: its history records the generation, and `history`
/// shows its spec as missing. The spec history must never hold a job up
/// (tests/templates_and_history.rs a_quota_on_revisions_does_not_hold_a_job_up).
pub async fn store(job: &AgentJob, ctx: &Context, generation: i64) -> Result<()> {
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    if ctx.stored_revisions.holds(uid, generation) {
        return Ok(());
    }
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let params = PostParams { field_manager: Some(ctx.settings.field_manager.clone()), ..PostParams::default() };
    let revision = revision_of(job, generation);
    match super::metadata_answers::create(&api, &params, &revision).await {
        Ok(_) => {
            ctx.stored_revisions.stored(uid, generation);
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            ctx.stored_revisions.stored(uid, generation);
            Ok(())
        }
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => {
            let note = format!(
                "the spec of generation {generation} was not stored as ControllerRevision {}: {}; it cannot be rerun",
                revision.name_any(),
                s.message
            );
            tracing::warn!(job = %job.name_any(), namespace = ?job.namespace(), %note);
            ctx.publish_event(&job.object_ref(&()), EventType::Warning, "SpecNotStored", &note, "StoreSpec").await;
            Ok(())
        }
        Err(source) => {
            Err(ApplyError::StoreSpec { namespace: job.namespace().unwrap_or_default(), revision: revision.name_any(), source }.into())
        }
    }
}

/// Deletes the revisions of generations that fell out of the history. A failure is logged,
/// not retried: the revision is bounded all the same (it goes with the job).
pub async fn prune(job: &AgentJob, ctx: &Context, generations: &[i64]) {
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let uid = job.meta().uid.clone();
    for generation in generations {
        let name = revision_name(&job.name_any(), *generation);
        // Only the revision this job owns, never a namesake, and only that very object (uid).
        match api.get_opt(&name).await {
            Ok(Some(r)) if r.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref()) => {
                let params =
                    DeleteParams { preconditions: Some(Preconditions { uid: r.uid(), resource_version: None }), ..DeleteParams::default() };
                if let Err(e) = api.delete(&name, &params).await {
                    tracing::warn!(job = %job.name_any(), revision = %name, error = %e, "deleting an old spec revision failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(job = %job.name_any(), revision = %name, error = %e, "reading an old spec revision failed"),
        }
    }
}

/// The revision each job's reconcile stored until its status records the generation: a reconcile
/// that fails after storing it (its Pod create or status write timed out on an overloaded
/// apiserver) does not POST it again on its retry, to be refused with 409 (`make bench` on this
/// VM at a load average of 15: 0.16 such POSTs per job). Only a revision this process created or
/// found is remembered, and only until the status write that records it (`forget`), the job's
/// deletion, or the map's bound.
#[derive(Default)]
pub struct StoredRevisions(std::sync::Mutex<std::collections::HashMap<String, i64>>);

impl StoredRevisions {
    /// Beyond this many jobs whose status has not recorded their stored revision, forget them
    /// all: the worst a forgotten one costs is one POST refused with a 409.
    const CAP: usize = 10_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, i64>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn stored(&self, uid: &str, generation: i64) {
        let mut stored = self.lock();
        if stored.len() >= Self::CAP {
            stored.clear();
        }
        stored.insert(uid.to_string(), generation);
    }

    pub fn holds(&self, uid: &str, generation: i64) -> bool {
        self.lock().get(uid) == Some(&generation)
    }

    /// The job's status now records what was stored for it, or the job is gone.
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::StoredRevisions;

    #[test]
    fn a_stored_revision_is_held_until_forgotten_and_the_map_is_bounded() {
        let stored = StoredRevisions::default();
        stored.stored("uid-1", 2);
        assert!(stored.holds("uid-1", 2));
        assert!(!stored.holds("uid-1", 3), "another generation is stored anew");
        assert!(!stored.holds("uid-2", 2), "per job");
        stored.forget("uid-1");
        assert!(!stored.holds("uid-1", 2));
        for i in 0..StoredRevisions::CAP + 5 {
            stored.stored(&format!("uid-{i}"), 1);
        }
        assert!(stored.lock().len() <= StoredRevisions::CAP);
    }
}
