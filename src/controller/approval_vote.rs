//! ApprovalVote status: a vote that does not count says why, next to the job's tally.

use std::sync::Arc;

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Context;
use crate::api::{AgentJob, ApprovalVote, ApprovalVoteStatus, JobPhase};
use crate::domain::tally::Tally;

/// Writes the verdict of each vote that does not count, and of each whose verdict changed.
/// Failures are logged, not fatal: the job's own status carries the same information.
///
/// A vote that counts is named in the job's `status.approval` (approvers, or `rejectedBy`) and
/// gets no status write of its own: on the happy path that was two of the ~5.6 API writes per
/// job (README "Performance"). Its status is written only to take back an earlier "not
/// counted" (a head granted later, identity policies now in force), so no vote's status ever
/// says the opposite of the job's tally. A vote that does not count always says why in its own
/// status, as it did (tests/vote_attacks.rs).
pub async fn record_verdicts(ctx: &Context, votes: &[Arc<ApprovalVote>], tally: &Tally, job: &AgentJob) {
    // Once a job has started or finished, its votes are history; their verdicts stay as written.
    if job.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_terminal() || p == JobPhase::Running) {
        return;
    }
    // Only the ignored votes the job's status lists get a verdict: a flood of junk votes naming
    // one job costs no write per vote (domain/tally.rs `listed`). A vote whose status still
    // says it counts is always corrected (at most one per voter counts).
    let listed: std::collections::HashSet<String> = tally.ignored_for_status().into_iter().map(|i| i.name).collect();
    let verdicts = tally.verdicts();
    let writes = votes.iter().filter_map(|vote| {
        let name = vote.name_any();
        let said = vote.status.as_ref().and_then(|s| s.counted);
        let (counted, message) = verdicts.of(&name);
        let wanted = if counted { said == Some(false) } else { listed.contains(&name) || said == Some(true) };
        if !wanted {
            return None;
        }
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
