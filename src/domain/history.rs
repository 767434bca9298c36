//! A job's history of spec generations: what each did, recorded in `status.history` by the
//! status write the reconcile makes anyway (no write of its own), and bounded.
//!
//! The full spec of each recorded generation lives in a ControllerRevision owned by the job
//! (as DaemonSets and StatefulSets keep theirs), created once when the operator first sees the
//! generation and deleted when its entry falls out of the history: [`Recorded`] tells the shell
//! which. `kubectl agentgate rerun` only trusts a revision whose spec has the digest this
//! history recorded.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::conditions::{condition, find};
use super::digest::sha256_of_json;
use super::money::MicroUsd;
use crate::api::{AgentJob, AgentJobSpec, AgentJobStatus, Attempt, GenerationRecord, JobPhase};

/// Generations kept in `status.history`, and so revisions kept per job.
pub const HISTORY_LIMIT: usize = 10;

/// Annotation on a revision (and on a rerun job): the digest of the spec it holds.
pub const SPEC_DIGEST_ANNOTATION: &str = "agentgate.dev/spec-digest";
/// Label on a revision: the uid of the job it belongs to (names can exceed a label's 63 bytes).
pub const JOB_UID_LABEL: &str = "agentgate.dev/job-uid";
/// Label on a rerun job: the job it reruns.
pub const RERUN_OF_LABEL: &str = "agentgate.dev/rerun-of";
/// Annotation on a rerun job: `<namespace>/<job> generation <N> uid <uid>`.
pub const RERUN_OF_ANNOTATION: &str = "agentgate.dev/rerun-of";

/// What the shell must do after [`record`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recorded {
    /// The current generation is new to the history: store its spec (a ControllerRevision).
    pub new_generation: Option<i64>,
    /// Generations that fell out of the history: delete their revisions.
    pub dropped: Vec<i64>,
}

pub fn spec_digest(spec: &AgentJobSpec) -> String {
    sha256_of_json(spec)
}

/// The ControllerRevision holding generation `generation` of job `job`.
pub fn revision_name(job: &str, generation: i64) -> String {
    let suffix = format!("-g{generation}");
    // Object names end at 253 bytes; job names are DNS subdomains (ASCII), so byte slicing is safe.
    let keep = job.len().min(253 - suffix.len());
    format!("{}{suffix}", &job[..keep])
}

/// Brings `status.history` up to date with `job`'s current generation and `status` (the status
/// about to be written; `old` is the job's status before). Deterministic: the same inputs give
/// the same history, so a reconcile with nothing new writes nothing.
pub fn record(status: &mut AgentJobStatus, old: &AgentJobStatus, job: &AgentJob, now: &Time) -> Recorded {
    let generation = job.metadata.generation.unwrap_or(1);
    let mut recorded = Recorded::default();
    // A job that had finished before the operator kept histories is left as it is: recording
    // it would cost every such job a status write and a revision when the operator is upgraded.
    // Its current spec can still be rerun (it is the job's own).
    if old.history.is_empty() && old.phase.is_some_and(JobPhase::is_terminal) && old.observed_generation == Some(generation) {
        return recorded;
    }
    if !status.history.iter().any(|h| h.generation == generation) {
        status.history.push(GenerationRecord {
            generation,
            spec_digest: spec_digest(&job.spec).into(),
            observed_time: now.clone(),
            approvals: None,
            approved_by: Vec::new(),
            attempts: 0,
            total_tokens: None,
            cost_usd: None,
            result: "".into(),
        });
        recorded.new_generation = Some(generation);
    }
    status.history.sort_by_key(|h| h.generation);

    // A finished job does not run a generation applied after it finished.
    let finished_before =
        matches!(status.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) && !status.attempts.iter().any(|a| a.generation == generation);
    // The approval status is for the generation the Approved condition was last set for.
    let approval_generation = find(&status.conditions, condition::APPROVED).and_then(|c| c.observed_generation);
    let (attempts, approval, phase) = (&status.attempts, &status.approval, status.phase);
    for entry in status.history.iter_mut() {
        let ran: Vec<&Attempt> = attempts.iter().filter(|a| a.generation == entry.generation).collect();
        entry.attempts = ran.len() as i32;
        let used: Vec<_> = ran.iter().filter_map(|a| a.usage.as_ref()).collect();
        entry.total_tokens = (!used.is_empty()).then(|| used.iter().map(|u| u.total_tokens).sum());
        entry.cost_usd = (!used.is_empty()).then(|| used.iter().filter_map(|u| MicroUsd::parse(&u.cost_usd)).sum::<MicroUsd>().to_string());
        if entry.generation == generation {
            if let Some(a) = approval.as_ref().filter(|_| approval_generation == Some(generation)) {
                entry.approvals = Some(a.summary.clone());
                entry.approved_by = a.approvers.iter().map(|v| v.voter.clone()).collect();
            }
            entry.result = if finished_before { "NotRun".into() } else { phase.map_or("Pending", JobPhase::as_str).into() };
        } else if entry.generation < generation {
            entry.result = match ran.last() {
                Some(last) => format!("{:?}", last.result).into(),
                // What it came to stays said: rejected, or never run because the job had finished.
                None if matches!(entry.result.as_str(), "Rejected" | "NotRun") => entry.result.clone(),
                None => "Superseded".into(),
            };
        }
    }

    let excess = status.history.len().saturating_sub(HISTORY_LIMIT);
    recorded.dropped = status.history.drain(..excess).map(|h| h.generation).collect();
    recorded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApprovalStatus, Approver, AttemptResult, Usage};
    use crate::domain::conditions::set_condition;

    fn job(generation: i64, budget: &str) -> AgentJob {
        let mut job: AgentJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "scan", "namespace": "team", "generation": generation},
            "spec": {"category": "core-security", "agents": {"primary": {"name": "a", "image": "img", "model": "gpt-4o-mini"}},
                     "budget": {"maxCostUSD": budget}}}))
        .unwrap();
        job.metadata.generation = Some(generation);
        job
    }

    /// One reconcile: the status before is the status as it is.
    fn rec(status: &mut AgentJobStatus, job: &AgentJob, now: &Time) -> Recorded {
        let old = status.clone();
        record(status, &old, job, now)
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + seconds).unwrap())
    }

    fn attempt(n: i32, generation: i64, result: AttemptResult, cost: Option<&str>) -> Attempt {
        Attempt {
            attempt: n,
            generation,
            result,
            usage: cost.map(|c| Usage { total_tokens: 100, cost_usd: c.into(), ..Usage::default() }),
            learned: Some(false),
            ..Attempt::default()
        }
    }

    fn approved(status: &mut AgentJobStatus, generation: i64, voters: &[&str]) {
        status.approval = Some(ApprovalStatus {
            required: 2,
            approved: voters.len() as i32,
            summary: format!("{}/2", voters.len()).into(),
            approvers: voters
                .iter()
                .map(|v| Approver { voter: (*v).into(), vote: format!("{v}-vote"), decided_at: None, reason: None })
                .collect(),
            ..ApprovalStatus::default()
        });
        set_condition(&mut status.conditions, condition::APPROVED, voters.len() >= 2, "x", "x", generation, &at(0));
    }

    #[test]
    fn a_new_generation_is_recorded_once_with_its_digest_and_asks_for_its_spec_to_be_stored() {
        let j = job(1, "5");
        let mut status = AgentJobStatus { phase: Some(JobPhase::AwaitingApproval), ..Default::default() };
        let first = record(&mut status, &AgentJobStatus::default(), &j, &at(0));
        assert_eq!(first, Recorded { new_generation: Some(1), dropped: vec![] });
        assert_eq!(status.history.len(), 1);
        assert_eq!(status.history[0].spec_digest, spec_digest(&j.spec));
        assert_eq!(status.history[0].result, "AwaitingApproval");
        // Nothing new: no revision, and the same history (no status write).
        let before = status.clone();
        let again = rec(&mut status, &j, &at(30));
        assert_eq!(again, Recorded::default());
        assert_eq!(status, before, "observedTime and everything else stay as they were");
    }

    #[test]
    fn each_generation_keeps_its_approvals_attempts_usage_and_result() {
        let mut status = AgentJobStatus { phase: Some(JobPhase::Running), ..Default::default() };
        approved(&mut status, 1, &["alice", "bob"]);
        status.attempts = vec![attempt(1, 1, AttemptResult::Failed, Some("0.25")), attempt(2, 1, AttemptResult::Running, None)];
        rec(&mut status, &job(1, "5"), &at(0));
        // Generation 2 applied while attempt 2 still runs generation 1; its approvals are not
        // generation 1's (the Approved condition still speaks of generation 1).
        let r = rec(&mut status, &job(2, "6"), &at(10));
        assert_eq!(r.new_generation, Some(2));
        let (g1, g2) = (&status.history[0], &status.history[1]);
        assert_eq!((g1.approvals.as_deref(), g1.approved_by.clone()), (Some("2/2"), vec!["alice".to_string(), "bob".to_string()]));
        assert_eq!((g1.attempts, g1.total_tokens, g1.cost_usd.as_deref(), g1.result.as_str()), (2, Some(100), Some("0.25"), "Running"));
        assert_eq!((g2.approvals.as_deref(), g2.attempts, g2.result.as_str()), (None, 0, "Running"));
        assert_ne!(g1.spec_digest, g2.spec_digest);

        // Attempt 2 succeeds and the job with it: generation 2 never ran.
        status.attempts[1] = attempt(2, 1, AttemptResult::Succeeded, Some("0.50"));
        status.phase = Some(JobPhase::Succeeded);
        rec(&mut status, &job(2, "6"), &at(20));
        let (g1, g2) = (&status.history[0], &status.history[1]);
        assert_eq!((g1.cost_usd.as_deref(), g1.total_tokens, g1.result.as_str()), (Some("0.75"), Some(200), "Succeeded"));
        assert_eq!(g2.result, "NotRun");
    }

    #[test]
    fn a_rejected_generation_stays_rejected_when_superseded() {
        let mut status = AgentJobStatus { phase: Some(JobPhase::Rejected), ..Default::default() };
        rec(&mut status, &job(1, "0.01"), &at(0));
        status.phase = Some(JobPhase::AwaitingApproval);
        rec(&mut status, &job(2, "5"), &at(5));
        assert_eq!(status.history[0].result, "Rejected");
        status.phase = Some(JobPhase::Pending);
        rec(&mut status, &job(3, "6"), &at(6));
        assert_eq!([status.history[0].result.as_str(), status.history[1].result.as_str()], ["Rejected", "Superseded"]);
    }

    #[test]
    fn history_keeps_the_last_ten_generations_and_names_the_dropped_ones() {
        let mut status = AgentJobStatus { phase: Some(JobPhase::AwaitingApproval), ..Default::default() };
        let mut dropped = Vec::new();
        for g in 1..=13 {
            dropped.extend(rec(&mut status, &job(g, &format!("{g}")), &at(g)).dropped);
        }
        assert_eq!(status.history.len(), HISTORY_LIMIT);
        assert_eq!(status.history.first().map(|h| h.generation), Some(4));
        assert_eq!(dropped, vec![1, 2, 3]);
    }

    #[test]
    fn a_job_finished_before_histories_were_kept_is_left_alone() {
        let old = AgentJobStatus { phase: Some(JobPhase::Succeeded), observed_generation: Some(1), ..Default::default() };
        let mut status = old.clone();
        assert_eq!(record(&mut status, &old, &job(1, "5"), &at(0)), Recorded::default());
        assert_eq!(status, old, "no status write, no revision");
        // Edited afterwards, it records the new generation (its spec is stored then).
        let mut status = old.clone();
        assert_eq!(record(&mut status, &old, &job(2, "6"), &at(0)).new_generation, Some(2));
        // A new job rejected at first sight is recorded.
        let mut status = AgentJobStatus { phase: Some(JobPhase::Rejected), observed_generation: Some(1), ..Default::default() };
        assert_eq!(record(&mut status, &AgentJobStatus::default(), &job(1, "0.01"), &at(0)).new_generation, Some(1));
    }

    #[test]
    fn revision_names_fit_an_object_name() {
        assert_eq!(revision_name("scan", 3), "scan-g3");
        let long = "a".repeat(253);
        assert_eq!(revision_name(&long, 12).len(), 253);
        assert!(revision_name(&long, 12).ends_with("-g12"));
    }
}
