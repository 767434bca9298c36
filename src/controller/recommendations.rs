//! Cost advice on a finishing job (domain/recommend.rs), from the AgentJob watch cache: the
//! namespace's jobs of the same jobType, with the finishing job's new status in place of the
//! cached one. Computed once, when the job reaches Succeeded or Failed, and stored with the very
//! status write that records it: no extra write, and a finished job's status never changes again
//! because of other jobs.

use kube::ResourceExt;

use super::Context;
use crate::api::{AgentJob, AgentJobStatus, JobPhase};
use crate::domain::decide::job_type;
use crate::domain::pricing::PriceTable;
use crate::domain::recommend;

/// Sets `new.recommendations` when this write finishes the job.
pub fn add_on_finish(job: &AgentJob, ctx: &Context, old: &AgentJobStatus, new: &mut AgentJobStatus, prices: &PriceTable) {
    let finishing = matches!(new.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) && !old.phase.is_some_and(JobPhase::is_terminal);
    if !finishing {
        return;
    }
    let namespace = job.namespace();
    let type_ = job_type(job);
    let uid = job.metadata.uid.as_deref();
    // Only this namespace's jobs of this jobType are taken out of the cache (the domain filters
    // again): another tenant's jobs never inform, nor receive, this one's advice.
    let others = ctx.caches.jobs.state_filter(|j| j.namespace() == namespace && job_type(j) == type_ && j.metadata.uid.as_deref() != uid);
    let mut finished = job.clone();
    finished.status = Some(new.clone());
    let jobs: Vec<&AgentJob> = others.iter().map(|j| j.as_ref()).chain(std::iter::once(&finished)).collect();
    new.recommendations = recommend::for_job(&finished, &jobs, prices);
}
