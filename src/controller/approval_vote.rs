//! ApprovalVote status: each vote says whether it counted and why, next to the job's tally.

use std::sync::Arc;

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Context;
use crate::api::{AgentJob, ApprovalVote, ApprovalVoteStatus, JobPhase};
use crate::domain::tally::Tally;

/// Writes each vote's verdict where it changed. Failures are logged, not fatal: the job's own
/// status carries the same information.
pub async fn record_verdicts(ctx: &Context, votes: &[Arc<ApprovalVote>], tally: &Tally, job: &AgentJob) {
    // Once a job has started or finished, its votes are history; their verdicts stay as written.
    if job.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_terminal() || p == JobPhase::Running) {
        return;
    }
    // Only counted votes and those the job's status lists get a verdict: a flood of junk votes
    // naming one job costs no write per vote (domain/tally.rs `listed`). A vote whose status
    // still says it counts is always corrected (at most one per voter counts).
    let listed: std::collections::HashSet<String> = tally.ignored_for_status().into_iter().map(|i| i.name).collect();
    let ignored: std::collections::HashSet<&str> = tally.ignored.iter().map(|i| i.name.as_str()).collect();
    let writes = votes.iter().filter_map(|vote| {
        let name = vote.name_any();
        let said_counted = vote.status.as_ref().and_then(|s| s.counted) == Some(true);
        if ignored.contains(name.as_str()) && !listed.contains(&name) && !said_counted {
            return None;
        }
        let (counted, message) = tally.verdict(&name);
        let status = ApprovalVoteStatus { counted: Some(counted), message: Some(message), observed_generation: vote.metadata.generation };
        (vote.status.as_ref() != Some(&status)).then(|| write_verdict(ctx, vote, status))
    });
    futures::future::join_all(writes).await;
}

async fn write_verdict(ctx: &Context, vote: &ApprovalVote, status: ApprovalVoteStatus) {
    let api: Api<ApprovalVote> = Api::namespaced(ctx.client.clone(), &vote.namespace().unwrap_or_default());
    // Every field of the verdict is always set, so a merge patch replaces it whole; it costs the
    // apiserver less than a server-side apply.
    let patch = json!({"status": status});
    let params = PatchParams { field_manager: Some(ctx.settings.field_manager.clone()), ..PatchParams::default() };
    if let Err(e) = api.patch_status(&vote.name_any(), &params, &Patch::Merge(&patch)).await {
        tracing::warn!(vote = %vote.name_any(), error = %e, "could not record vote verdict");
    }
}
