//! What proves that an attempt of a job is real: its Pods (in the job's namespace, controlled by
//! the job, created only by the operator: deploy/admission/pods.yaml) and the current votes.
//! Never the job's status: whoever may write `agentjobs/status` could record an attempt nobody
//! approved, and the operator would then create its Pods (tests/gate_attacks.rs
//! a_forged_status_attempt_starts_nothing).

use super::approval_policy::{requirement, tier_cost};
use super::decide::{Observed, Plan, PlannedEvent, estimate_input};
use super::estimate::estimate;
use super::tally::Tally;
use crate::api::{AgentJobStatus, AttemptResult};

/// The current votes tallied for `generation`: the reconciler tallies every generation an
/// attempt or a Pod names.
fn tally_of<'a>(o: &'a Observed, generation: i64) -> Option<&'a Tally> {
    if o.job.metadata.generation.unwrap_or(1) == generation { Some(o.tally) } else { o.other_tallies.get(&generation) }
}

/// Whether the votes that count now reach the quorum for `generation`, by the same rules that
/// start an attempt: enough approvals from distinct heads, none rejecting, the tier's human
/// group. The requirement is worked out from a fresh estimate of the spec, not from status.
pub fn approved_by_current_votes(o: &Observed, generation: i64) -> bool {
    let Some(t) = tally_of(o, generation) else { return false };
    let spec = &o.job.spec;
    let cost_p90 = estimate(&estimate_input(o.job), o.learned, o.prices).ok().map(|f| f.cost_p90);
    let cost = tier_cost(cost_p90, &spec.budget.max_cost_usd);
    let need = requirement(o.approval_floor, o.approval_tiers, &spec.category, cost, spec.approval.as_ref().and_then(|a| a.required));
    t.rejected_by.is_none()
        && t.approvers.len() as i32 >= need.required
        && need.human_group.as_deref().is_none_or(|g| t.approved_by_member_of(g))
}

/// Pods of attempts the status does not know yet exist when the operator stopped between
/// creating them and writing status: the attempts are adopted, never started a second time.
/// Every attempt up to the newest is adopted, not only the newest: a failed attempt's retry may
/// have been created (and may have failed and been retried) before any of it was recorded, and
/// the usage its agents reported must still be counted.
///
/// Only while the current votes approve the generation the Pods were built from: Pods found
/// without that are not adopted, and their reports are not read (a Warning Event says so).
pub fn adopt_unrecorded_attempts(s: &mut AgentJobStatus, plan: &mut Plan, o: &Observed, generation: i64) {
    let recorded = s.attempts.last().map(|a| a.attempt).unwrap_or(0);
    let Some(newest) = o.pods.iter().map(|p| p.attempt).max().filter(|n| *n > recorded) else { return };
    // The Pods say which generation they were built from; the spec may have changed since, while
    // the status write was refused. Pods of older versions lack that: the generation last decided
    // on is the best guess.
    let decided_on = o.job.status.as_ref().and_then(|st| st.observed_generation).unwrap_or(generation);
    for attempt in recorded + 1..=newest {
        let built_from = o.pods.iter().filter(|p| p.attempt == attempt).find_map(|p| p.generation).unwrap_or(decided_on);
        if !approved_by_current_votes(o, built_from) {
            let pods: Vec<&str> = o.pods.iter().filter(|p| p.attempt >= attempt).map(|p| p.name.as_str()).collect();
            plan.events.push(PlannedEvent {
                warning: true,
                reason: "UnapprovedPodsIgnored".into(),
                note: format!(
                    "Pod(s) {} of attempt {attempt} (generation {built_from}) exist, but the current votes do not approve \
                     generation {built_from}: not adopted, their reports not read",
                    pods.join(", ")
                ),
            });
            return;
        }
        s.attempts.push(super::decide::running_attempt(o.job, attempt, built_from, &o.now));
    }
}

/// A Running attempt in status whose Pods the API confirms do not exist, for a generation the
/// current votes do not approve, was not started by the operator (it creates Pods before it
/// records an attempt) or has lost both its Pods and its approval: it is dropped, and the job goes
/// through the gates again, instead of the operator creating its Pods or failing the job for them.
pub fn drop_unproven_attempt(s: &mut AgentJobStatus, plan: &mut Plan, o: &Observed) {
    let Some(last) = s.attempts.last().filter(|a| a.result == AttemptResult::Running) else { return };
    // An attempt always has a Pod per agent: one naming none is made up, approved or not.
    let no_pod = last.pods.iter().all(|name| o.gone_pods.contains(name) && !o.pods.iter().any(|p| &p.name == name));
    if !no_pod || (!last.pods.is_empty() && approved_by_current_votes(o, last.generation)) {
        return;
    }
    let note = format!(
        "status recorded attempt {} (generation {}) but none of its Pods exist and the current votes do not approve \
         generation {}: it was not started by agentgate and is ignored",
        last.attempt, last.generation, last.generation
    );
    s.attempts.pop();
    if s.attempts.is_empty() {
        s.start_time = None;
    }
    plan.events.push(PlannedEvent { warning: true, reason: "UnprovenAttemptIgnored".into(), note });
}
