//! The AgentJob state machine: from what the caches show to the status the job should have and
//! the one action (start or continue an attempt) that gets it there.
//!
//! Gates run in this order, each blocking the ones after it:
//! estimate (and budget) → input schema → approvals → readiness → run. Approvals come before
//! readiness so nothing is reserved for a job nobody approved; readiness is re-checked at the
//! moment an attempt starts because capacity changes while humans vote.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::approval_policy::{ApprovalTier, requirement};
use super::conditions::{remove_condition, set_condition};
use super::estimate::{EstimateInput, estimate};
use super::money::MicroUsd;
use super::pricing::{PriceTable, TokenCounts};
use super::readiness::Readiness;
use super::report::{accumulate, estimate_error_percent, parse_report, price_usage, tokens_of};
use super::tally::Tally;
use super::validate::{check_against_schema, check_input_size, check_schema};
use crate::api::{
    AgentJob, AgentJobSpec, AgentJobStatus, ApprovalStatus, Attempt, AttemptResult, CostRange, DEFAULT_MAX_RETRIES, Estimate, JobPhase,
    ModelEstimate, TokenRange,
};

/// Condition types, as `kubectl wait --for=condition=...` and kstatus read them.
pub mod condition {
    pub const ESTIMATED: &str = "Estimated";
    pub const INFRASTRUCTURE_READY: &str = "InfrastructureReady";
    pub const APPROVED: &str = "Approved";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const READY: &str = "Ready";
    pub const RECONCILING: &str = "Reconciling";
    pub const STALLED: &str = "Stalled";
    pub const USAGE_REPORTED: &str = "UsageReported";
    pub const SPEC_CHANGE_PENDING: &str = "SpecChangePending";
}

/// A Pod of this job as the Pod cache shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    pub agent: String,
    pub attempt: i32,
    /// The job generation the Pod was built from (None on Pods of older operator versions).
    pub generation: Option<i64>,
    pub state: PodState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Not yet terminated (pending or running).
    Active,
    Succeeded {
        message: Option<String>,
    },
    Failed {
        reason: String,
        message: Option<String>,
    },
}

impl PodState {
    fn terminated(&self) -> bool {
        !matches!(self, PodState::Active)
    }
}

pub struct Observed<'a> {
    pub job: &'a AgentJob,
    pub now: Time,
    pub approval_floor: i32,
    pub approval_tiers: &'a [ApprovalTier],
    /// Reject jobs waiting longer than this for approval.
    pub approval_timeout_seconds: Option<i64>,
    pub prices: &'a PriceTable,
    /// Finished runs of this job's jobType, newest last.
    /// What the estimator learned of this job's jobType (None: the prior alone).
    pub learned: Option<&'a crate::domain::learning::JobTypeStats>,
    pub readiness: &'a Readiness,
    pub tally: &'a Tally,
    pub pods: &'a [PodView],
    /// Pods the status records but the API confirmed deleted.
    pub gone_pods: &'a [String],
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: AgentJobStatus,
    /// Make sure every Pod of this attempt exists (creating is idempotent by name).
    pub ensure_attempt: Option<i32>,
    /// Run without the optional GPU.
    pub drop_gpu: bool,
    pub events: Vec<PlannedEvent>,
}

pub fn approvals_required(spec: &AgentJobSpec, floor: i32) -> i32 {
    spec.approval.as_ref().and_then(|a| a.required).unwrap_or(floor).max(floor)
}

pub fn max_attempts(spec: &AgentJobSpec) -> i32 {
    1 + spec.limits.as_ref().and_then(|l| l.max_retries).unwrap_or(DEFAULT_MAX_RETRIES)
}

pub fn job_type(job: &AgentJob) -> String {
    job.spec.job_type.clone().unwrap_or_else(|| job.metadata.name.clone().unwrap_or_default())
}

pub fn estimate_input(job: &AgentJob) -> EstimateInput {
    let spec = &job.spec;
    EstimateInput {
        job_type: job_type(job),
        agent_models: std::iter::once(&spec.agents.primary).chain(&spec.agents.supporting).map(|a| a.model.clone()).collect(),
        tool_calls: spec.tools.iter().map(|t| i64::from(t.estimated_calls)).collect(),
    }
}

pub fn agent_names(spec: &AgentJobSpec) -> Vec<String> {
    std::iter::once(&spec.agents.primary).chain(&spec.agents.supporting).map(|a| a.name.clone()).collect()
}

pub fn decide(o: &Observed) -> Plan {
    let job = o.job;
    let generation = job.metadata.generation.unwrap_or(1);
    let old = job.status.clone().unwrap_or_default();
    let mut s = old.clone();
    s.observed_generation = Some(generation);
    let mut plan = Plan { status: AgentJobStatus::default(), ensure_attempt: None, drop_gpu: false, events: Vec::new() };

    let settled = match old.phase {
        Some(JobPhase::Succeeded | JobPhase::Failed) => true,
        // A rejection stands until the spec changes (a raised budget, fixed input, new votes).
        Some(JobPhase::Rejected) => old.observed_generation == Some(generation),
        _ => false,
    };
    if settled {
        if old.observed_generation != Some(generation) {
            set_condition(
                &mut s.conditions,
                condition::SPEC_CHANGE_PENDING,
                true,
                "JobFinished",
                format!("generation {generation} was applied after the job finished; it will not run again"),
                generation,
                &o.now,
            );
        }
        plan.status = s;
        return plan;
    }
    if old.phase == Some(JobPhase::Rejected) {
        // The spec changed since the rejection: every gate is evaluated again from scratch.
        s.approval = None;
        remove_condition(&mut s.conditions, condition::STALLED);
    }

    adopt_unrecorded_attempts(&mut s, o, generation);
    settle_superseded_attempts(&mut s, &mut plan, o, generation);
    if let Some(current) = s.attempts.last().filter(|a| a.result == AttemptResult::Running).map(|a| a.attempt)
        && !follow_attempt(&mut s, &mut plan, o, current, generation)
    {
        plan.status = s;
        return finish_plan(plan, &old);
    }
    if matches!(s.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        plan.status = s;
        return finish_plan(plan, &old);
    }

    run_gates(&mut s, &mut plan, o, generation);
    plan.status = s;
    finish_plan(plan, &old)
}

/// Pods of attempts the status does not know yet exist when the operator stopped between
/// creating them and writing status: the attempts are adopted, never started a second time.
/// Every attempt up to the newest is adopted, not only the newest: a failed attempt's retry may
/// have been created (and may have failed and been retried) before any of it was recorded, and
/// the usage its agents reported must still be counted.
fn adopt_unrecorded_attempts(s: &mut AgentJobStatus, o: &Observed, generation: i64) {
    let recorded = s.attempts.last().map(|a| a.attempt).unwrap_or(0);
    let Some(newest) = o.pods.iter().map(|p| p.attempt).max().filter(|n| *n > recorded) else { return };
    // The Pods say which generation they were built from; the spec may have changed since, while
    // the status write was refused. Pods of older versions lack that: the generation last decided
    // on is the best guess.
    let decided_on = o.job.status.as_ref().and_then(|st| st.observed_generation).unwrap_or(generation);
    let job_name = o.job.metadata.name.as_deref().unwrap_or_default();
    for attempt in recorded + 1..=newest {
        let built_from = o.pods.iter().filter(|p| p.attempt == attempt).find_map(|p| p.generation);
        s.attempts.push(Attempt {
            attempt,
            generation: built_from.unwrap_or(decided_on),
            pods: agent_names(&o.job.spec).iter().map(|agent| super::pod_builder::pod_name(job_name, agent, attempt)).collect(),
            start_time: Some(o.now.clone()),
            completion_time: None,
            result: AttemptResult::Running,
            message: None,
            usage: None,
        });
    }
}

/// An attempt still Running in status with a newer one after it ended before the newer one
/// started (the operator stopped before recording how): it is read from its Pods now, so its
/// result and usage are not lost. Its Pods all terminated before the next attempt was created;
/// one missing from the cache has been deleted since, and its report with it.
fn settle_superseded_attempts(s: &mut AgentJobStatus, plan: &mut Plan, o: &Observed, generation: i64) {
    let Some(last) = s.attempts.len().checked_sub(1) else { return };
    let mut settled = false;
    for index in 0..last {
        if s.attempts[index].result != AttemptResult::Running {
            continue;
        }
        let states: Vec<(String, PodState)> = s.attempts[index]
            .pods
            .iter()
            .map(|name| match o.pods.iter().find(|p| &p.name == name).map(|p| &p.state) {
                Some(state) if state.terminated() => (name.clone(), state.clone()),
                _ => (name.clone(), PodState::Failed { reason: "PodDeleted".into(), message: None }),
            })
            .collect();
        settle_attempt(s, plan, o, index, &states, generation);
        settled = true;
    }
    if settled {
        s.usage = Some(total_usage(s, o));
    }
}

/// Follows the running attempt. Returns true when it has finished and the job needs the gates
/// again (a retry); false when the job is still running or has reached a final phase.
fn follow_attempt(s: &mut AgentJobStatus, plan: &mut Plan, o: &Observed, current: i32, generation: i64) -> bool {
    let job = o.job;
    let index = s.attempts.len() - 1;
    let attempt_generation = s.attempts[index].generation;
    if attempt_generation < generation {
        set_condition(
            &mut s.conditions,
            condition::SPEC_CHANGE_PENDING,
            true,
            "AttemptRunning",
            format!("attempt {current} runs generation {attempt_generation}; generation {generation} applies from the next attempt"),
            generation,
            &o.now,
        );
    } else {
        remove_condition(&mut s.conditions, condition::SPEC_CHANGE_PENDING);
    }

    let expected = s.attempts[index].pods.clone();
    let mut states: Vec<(String, PodState)> = Vec::new();
    let mut any_deleted = false;
    for name in &expected {
        match o.pods.iter().find(|p| &p.name == name) {
            Some(p) => states.push((name.clone(), p.state.clone())),
            None if o.gone_pods.contains(name) => {
                any_deleted = true;
                states.push((name.clone(), PodState::Failed { reason: "PodDeleted".into(), message: None }))
            }
            None => states.push((name.clone(), PodState::Active)),
        }
    }
    if !states.iter().all(|(_, st)| st.terminated()) {
        s.phase = Some(JobPhase::Running);
        // A deleted Pod fails the attempt once the others finish; ensuring the attempt's Pods
        // now would create it a second time.
        plan.ensure_attempt = (!any_deleted).then_some(current);
        plan.drop_gpu = s.dropped_resources.iter().any(|d| d == "gpu");
        let running = states.iter().filter(|(_, st)| !st.terminated()).count();
        let ready_msg = attempt_progress(current, max_attempts(&job.spec), running, states.len());
        set_condition(&mut s.conditions, condition::READY, false, "Running", ready_msg.clone(), generation, &o.now);
        set_condition(&mut s.conditions, condition::RECONCILING, true, "Running", ready_msg, generation, &o.now);
        return false;
    }

    // Every Pod of the attempt has terminated: read what the agents reported.
    let (failures, output) = settle_attempt(s, plan, o, index, &states, generation);
    s.usage = Some(total_usage(s, o));

    if failures.is_empty() {
        s.phase = Some(JobPhase::Succeeded);
        s.output = output;
        s.completion_time = Some(o.now.clone());
        let msg = format!("attempt {current} succeeded");
        set_condition(&mut s.conditions, condition::SUCCEEDED, true, "Succeeded", msg.clone(), generation, &o.now);
        set_condition(&mut s.conditions, condition::READY, true, "Succeeded", msg.clone(), generation, &o.now);
        remove_condition(&mut s.conditions, condition::RECONCILING);
        plan.events.push(PlannedEvent {
            warning: false,
            reason: "Succeeded".into(),
            note: format!("{msg}; cost ${}", s.usage.as_ref().map(|u| u.cost_usd.as_str()).unwrap_or("0")),
        });
        return false;
    }
    let note = format!("attempt {current} failed: {}", failures.join("; "));
    if current >= max_attempts(&job.spec) {
        s.phase = Some(JobPhase::Failed);
        s.completion_time = Some(o.now.clone());
        let msg = format!("{note}; no retries left ({} attempt(s))", max_attempts(&job.spec));
        set_condition(&mut s.conditions, condition::SUCCEEDED, false, "AttemptsExhausted", msg.clone(), generation, &o.now);
        set_condition(&mut s.conditions, condition::READY, false, "AttemptsExhausted", msg.clone(), generation, &o.now);
        set_condition(&mut s.conditions, condition::STALLED, true, "AttemptsExhausted", msg.clone(), generation, &o.now);
        remove_condition(&mut s.conditions, condition::RECONCILING);
        plan.events.push(PlannedEvent { warning: true, reason: "Failed".into(), note: msg });
        return false;
    }
    plan.events.push(PlannedEvent { warning: true, reason: "AttemptFailed".into(), note: format!("{note}; retrying") });
    true
}

/// Reads what the agents of a finished attempt reported into it: usage, result, message and
/// completion time, and the UsageReported condition. Returns the failures (none if it
/// succeeded) and the primary agent's output.
fn settle_attempt(
    s: &mut AgentJobStatus,
    plan: &mut Plan,
    o: &Observed,
    index: usize,
    states: &[(String, PodState)],
    generation: i64,
) -> (Vec<String>, Option<serde_json::Value>) {
    let job = o.job;
    let current = s.attempts[index].attempt;
    let mut tokens: BTreeMap<String, TokenCounts> = BTreeMap::new();
    let mut report_problems = Vec::new();
    let mut failures = Vec::new();
    let mut output = None;
    let primary_pod =
        super::pod_builder::pod_name(job.metadata.name.as_deref().unwrap_or_default(), &job.spec.agents.primary.name, current);
    for (name, state) in states {
        let message = match state {
            PodState::Succeeded { message } => message,
            PodState::Failed { reason, message } => {
                failures.push(format!("{name}: {reason}"));
                message
            }
            PodState::Active => unreachable!("all pods terminated"),
        };
        match parse_report(message.as_deref().unwrap_or_default()) {
            Ok(report) => {
                accumulate(&mut tokens, &report.usage);
                if *name == primary_pod {
                    output = report.output;
                }
            }
            Err(why) => report_problems.push(format!("{name}: {why}")),
        }
    }
    let (attempt_usage, unpriced) = price_usage(&tokens, o.prices);
    if failures.is_empty()
        && let Err(errors) = check_against_schema("output", output.as_ref(), job.spec.output_schema.as_ref())
    {
        failures.push(format!("output does not match outputSchema: {}", errors.join("; ")));
    }

    if report_problems.is_empty() && unpriced.is_empty() {
        set_condition(
            &mut s.conditions,
            condition::USAGE_REPORTED,
            true,
            "Reported",
            format!("attempt {current}: every agent reported its usage"),
            generation,
            &o.now,
        );
    } else {
        let mut parts = report_problems.clone();
        if !unpriced.is_empty() {
            parts.push(format!("no price for model(s) {}: their cost is not counted", unpriced.join(", ")));
        }
        let reason = if report_problems.is_empty() { "UnpricedModel" } else { "MalformedReport" };
        let note = format!("attempt {current}: {}", parts.join("; "));
        set_condition(&mut s.conditions, condition::USAGE_REPORTED, false, reason, note.clone(), generation, &o.now);
        plan.events.push(PlannedEvent { warning: true, reason: reason.into(), note });
    }

    let attempt = &mut s.attempts[index];
    attempt.completion_time = Some(o.now.clone());
    attempt.usage = Some(attempt_usage);
    attempt.result = if failures.is_empty() { AttemptResult::Succeeded } else { AttemptResult::Failed };
    attempt.message = Some(if failures.is_empty() { "all agents succeeded".into() } else { failures.join("; ") });
    (failures, output)
}

/// Usage is the sum over every attempt: a retry never overwrites what was spent before.
fn total_usage(s: &AgentJobStatus, o: &Observed) -> crate::api::Usage {
    let mut all_tokens: BTreeMap<String, TokenCounts> = BTreeMap::new();
    for a in &s.attempts {
        if let Some(u) = &a.usage {
            accumulate(&mut all_tokens, &tokens_of(u));
        }
    }
    let (mut total, _) = price_usage(&all_tokens, o.prices);
    total.estimate_error_percent = s.estimate.as_ref().and_then(|e| estimate_error_percent(total.total_tokens, e.tokens.p50));
    total
}

fn run_gates(s: &mut AgentJobStatus, plan: &mut Plan, o: &Observed, generation: i64) {
    let job = o.job;
    let spec = &job.spec;

    // Estimate and input are checked once per generation; a failure of either rejects the job.
    if s.estimate.as_ref().map(|e| e.generation) != Some(generation) {
        let forecast = estimate(&estimate_input(job), o.learned, o.prices);
        match forecast {
            Err(unknown) => {
                s.phase = Some(JobPhase::Pending);
                s.estimate = None;
                let msg = unknown.to_string();
                set_condition(&mut s.conditions, condition::ESTIMATED, false, "UnknownModel", msg.clone(), generation, &o.now);
                waiting(s, "UnknownModel", &msg, generation, &o.now);
                return;
            }
            Ok(f) => {
                s.estimate = Some(Estimate {
                    generation,
                    tokens: TokenRange { p50: f.tokens_p50, p90: f.tokens_p90 },
                    cost_usd: CostRange { p50: f.cost_p50.to_string(), p90: f.cost_p90.to_string() },
                    method: f.method.to_string(),
                    samples: f.samples as i64,
                    models: f
                        .models
                        .iter()
                        .map(|m| ModelEstimate {
                            model: m.model.clone(),
                            tokens: TokenRange { p50: m.tokens_p50, p90: m.tokens_p90 },
                            cost_usd: CostRange { p50: m.cost_p50.to_string(), p90: m.cost_p90.to_string() },
                        })
                        .collect(),
                });
                let msg = format!(
                    "p50 ${} / p90 ${}, {} / {} tokens ({}, {} sample(s))",
                    f.cost_p50, f.cost_p90, f.tokens_p50, f.tokens_p90, f.method, f.samples
                );
                set_condition(&mut s.conditions, condition::ESTIMATED, true, "Estimated", msg, generation, &o.now);
                if let Some(reason) = over_budget(spec, f.cost_p90, f.tokens_p90) {
                    reject(s, plan, "BudgetExceeded", &reason, generation, &o.now);
                    return;
                }
                if let Err(why) = check_input_size(spec.input.as_ref()) {
                    reject(s, plan, "InvalidInput", &why, generation, &o.now);
                    return;
                }
                // The output schema is only applied after the run: a schema that cannot be
                // evaluated must stop the job before anything is spent.
                if let Some(Err(why)) = spec.output_schema.as_ref().map(|schema| check_schema("output", schema)) {
                    reject(s, plan, "InvalidOutputSchema", &why, generation, &o.now);
                    return;
                }
                if let Err(errors) = check_against_schema("input", spec.input.as_ref(), spec.input_schema.as_ref()) {
                    reject(
                        s,
                        plan,
                        "InvalidInput",
                        &format!("input does not match inputSchema: {}", errors.join("; ")),
                        generation,
                        &o.now,
                    );
                    return;
                }
            }
        }
    }

    let t = o.tally;
    let cost_p90 = s.estimate.as_ref().and_then(|e| MicroUsd::parse(&e.cost_usd.p90));
    let need = requirement(o.approval_floor, o.approval_tiers, &spec.category, cost_p90, spec.approval.as_ref().and_then(|a| a.required));
    s.approval = Some(ApprovalStatus {
        required: need.required,
        approved: t.approvers.len() as i32,
        summary: format!("{}/{}", t.approvers.len(), need.required),
        approvers: t.approvers.clone(),
        rejected_by: t.rejected_by.as_ref().map(|r| r.voter.clone()),
        ignored_votes: t.ignored.clone(),
    });
    let r = o.readiness;
    s.checks = r.checks.clone();
    s.missing_tools = r.missing_tools.clone();
    s.insufficient_resources = r.insufficient_resources.clone();
    s.dropped_resources = r.dropped.clone();
    let failing: Vec<&str> = r.checks.iter().filter(|c| !c.passed).map(|c| c.message.as_str()).collect();
    let infra_msg = if failing.is_empty() { "all readiness checks passed".to_string() } else { failing.join("; ") };
    set_condition(
        &mut s.conditions,
        condition::INFRASTRUCTURE_READY,
        r.ready(),
        r.blocked_reason.unwrap_or("Ready"),
        infra_msg.clone(),
        generation,
        &o.now,
    );

    if let Some(rejecter) = &t.rejected_by {
        let msg = format!(
            "{} rejected the job (vote {}){}",
            rejecter.voter,
            rejecter.vote,
            rejecter.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        );
        set_condition(&mut s.conditions, condition::APPROVED, false, "Rejected", msg.clone(), generation, &o.now);
        reject(s, plan, "VoteRejected", &msg, generation, &o.now);
        return;
    }
    let enough = t.approvers.len() as i32 >= need.required;
    let human_ok = need.human_group.as_deref().is_none_or(|g| t.approved_by_member_of(g));
    if !(enough && human_ok) {
        let mut msg = format!("{} of {} approvals from category {} heads", t.approvers.len(), need.required, spec.category);
        if let Some(group) = need.human_group.as_deref().filter(|_| !human_ok) {
            msg.push_str(&format!("; one must come from a member of {group}"));
        }
        if let Some(because) = &need.because {
            msg.push_str(&format!(" ({because})"));
        }
        let waiting_since = super::conditions::find(&s.conditions, condition::APPROVED)
            .filter(|c| c.status == "False" && c.reason == "AwaitingApproval")
            .map(|c| c.last_transition_time.0)
            .unwrap_or(o.now.0);
        let waited = o.now.0.duration_since(waiting_since).as_secs();
        if let Some(limit) = o.approval_timeout_seconds.filter(|limit| waited > *limit) {
            let msg = format!("no approval within {limit}s: {msg}");
            set_condition(&mut s.conditions, condition::APPROVED, false, "ApprovalTimeout", msg.clone(), generation, &o.now);
            reject(s, plan, "ApprovalTimeout", &msg, generation, &o.now);
            return;
        }
        set_condition(&mut s.conditions, condition::APPROVED, false, "AwaitingApproval", msg.clone(), generation, &o.now);
        s.phase = Some(JobPhase::AwaitingApproval);
        waiting(s, "AwaitingApproval", &msg, generation, &o.now);
        return;
    }
    let approvers: Vec<&str> = t.approvers.iter().map(|a| a.voter.as_str()).collect();
    set_condition(
        &mut s.conditions,
        condition::APPROVED,
        true,
        "Approved",
        format!("approved by {}", approvers.join(", ")),
        generation,
        &o.now,
    );

    if let Some(reason) = r.blocked_reason {
        s.phase = Some(JobPhase::WaitingForResources);
        waiting(s, reason, &infra_msg, generation, &o.now);
        return;
    }

    let next = s.attempts.last().map(|a| a.attempt).unwrap_or(0) + 1;
    let job_name = job.metadata.name.as_deref().unwrap_or_default();
    s.attempts.push(Attempt {
        attempt: next,
        generation,
        pods: agent_names(spec).iter().map(|a| super::pod_builder::pod_name(job_name, a, next)).collect(),
        start_time: Some(o.now.clone()),
        completion_time: None,
        result: AttemptResult::Running,
        message: None,
        usage: None,
    });
    s.phase = Some(JobPhase::Running);
    s.start_time.get_or_insert_with(|| o.now.clone());
    remove_condition(&mut s.conditions, condition::SPEC_CHANGE_PENDING);
    plan.ensure_attempt = Some(next);
    plan.drop_gpu = r.dropped.iter().any(|d| d == "gpu");
    let pods = s.attempts.last().map_or(0, |a| a.pods.len());
    let progress = attempt_progress(next, max_attempts(spec), pods, pods);
    set_condition(&mut s.conditions, condition::READY, false, "Running", progress.clone(), generation, &o.now);
    set_condition(&mut s.conditions, condition::RECONCILING, true, "Running", progress, generation, &o.now);
    let msg = format!("attempt {next} of {} started", max_attempts(spec));
    let dropped = if plan.drop_gpu { " without the optional GPU (no node has one free)" } else { "" };
    plan.events.push(PlannedEvent { warning: false, reason: "AttemptStarted".into(), note: format!("{msg}{dropped}") });
}

/// How long to hold a job's first status back, if at all.
///
/// A job applied together with its votes (one manifest, a pipeline) reaches the operator a moment
/// before them. Writing `AwaitingApproval` and then `Running` would cost two status writes and
/// two Events where one of each says the same, so the first status waits up to `vote_wait` from
/// the job's creation, but only when all it would say is that the job waits for votes: an
/// estimate over budget, bad input or an unknown model is reported at once.
pub fn hold_first_status(
    old: &AgentJobStatus,
    plan: &Plan,
    age: std::time::Duration,
    vote_wait: std::time::Duration,
) -> Option<std::time::Duration> {
    let first = old.phase.is_none();
    let only_waits_for_votes = plan.status.phase == Some(JobPhase::AwaitingApproval) && plan.ensure_attempt.is_none();
    (first && only_waits_for_votes && age < vote_wait).then(|| vote_wait - age)
}

/// The Ready message of a running attempt. An attempt just started reads the same as one whose
/// Pods the cache then shows unfinished, so seeing its Pods appear costs no status write.
fn attempt_progress(attempt: i32, max: i32, unfinished: usize, pods: usize) -> String {
    format!("attempt {attempt} of {max} running: {unfinished} of {pods} agent Pod(s) not finished")
}

pub fn over_budget(spec: &AgentJobSpec, cost_p90: MicroUsd, tokens_p90: i64) -> Option<String> {
    // The schema admits only well-formed budgets; an unparsable one can only mean a stale CRD.
    let budget = MicroUsd::parse(&spec.budget.max_cost_usd);
    match budget {
        None => Some(format!("budget.maxCostUSD {:?} is not a decimal USD amount", spec.budget.max_cost_usd)),
        Some(b) if cost_p90 > b => Some(format!("estimated p90 cost ${cost_p90} exceeds budget.maxCostUSD ${b}")),
        Some(_) => spec
            .budget
            .max_tokens
            .filter(|max| tokens_p90 > *max)
            .map(|max| format!("estimated p90 tokens {tokens_p90} exceed budget.maxTokens {max}")),
    }
}

fn waiting(s: &mut AgentJobStatus, reason: &str, message: &str, generation: i64, now: &Time) {
    set_condition(&mut s.conditions, condition::READY, false, reason, message, generation, now);
    set_condition(&mut s.conditions, condition::RECONCILING, true, reason, message, generation, now);
    remove_condition(&mut s.conditions, condition::STALLED);
}

fn reject(s: &mut AgentJobStatus, plan: &mut Plan, reason: &str, message: &str, generation: i64, now: &Time) {
    s.phase = Some(JobPhase::Rejected);
    set_condition(&mut s.conditions, condition::READY, false, reason, message, generation, now);
    set_condition(&mut s.conditions, condition::STALLED, true, reason, message, generation, now);
    remove_condition(&mut s.conditions, condition::RECONCILING);
    plan.events.push(PlannedEvent { warning: true, reason: reason.into(), note: message.into() });
}

/// Adds an Event for a phase change the steps above did not already announce.
fn finish_plan(mut plan: Plan, old: &AgentJobStatus) -> Plan {
    let ready_reason = |s: &AgentJobStatus| super::conditions::find(&s.conditions, condition::READY).map(|c| c.reason.clone());
    let changed = plan.status.phase != old.phase || ready_reason(&plan.status) != ready_reason(old);
    if changed
        && plan.events.is_empty()
        && let Some(reason) = ready_reason(&plan.status)
    {
        let note = super::conditions::find(&plan.status.conditions, condition::READY).map(|c| c.message.clone()).unwrap_or_default();
        plan.events.push(PlannedEvent { warning: false, reason, note });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Approver, ReadinessCheck, Usage};
    use crate::domain::conditions::find;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::{Value, json};

    fn now() -> Time {
        Time(Timestamp::from_second(1_750_000_000).unwrap())
    }

    /// Two agents on two priced models, one required tool with 5 calls, a roomy budget, no
    /// retries: the estimate is 14_700 + 12_300 = 27_000 tokens at p50 and 81_000 at p90.
    fn manifest() -> Value {
        json!({
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "AgentJob",
            "metadata": {"name": "scan", "namespace": "team-security", "uid": "uid-1", "generation": 1},
            "spec": {
                "jobType": "security_scan",
                "category": "core-security",
                "agents": {
                    "primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:2.1", "model": "gpt-4o-mini"},
                    "supporting": [{"name": "fixer", "image": "ghcr.io/acme/fixer:1.4", "model": "claude-sonnet-4"}]
                },
                "tools": [{"name": "bandit", "required": true, "minRateLimit": 10, "estimatedCalls": 5}],
                "resources": {"cpu": "500m", "memory": "512Mi"},
                "budget": {"maxCostUSD": "5.00"}
            }
        })
    }

    /// The manifest with each `(JSON pointer, value)` set, parsed as the apiserver would hand it over.
    fn job(patches: &[(&str, Value)]) -> AgentJob {
        let mut m = manifest();
        for (pointer, value) in patches {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            m.pointer_mut(parent)
                .unwrap_or_else(|| panic!("no {parent} in the fixture"))
                .as_object_mut()
                .unwrap()
                .insert(key.into(), value.clone());
        }
        serde_json::from_value(m).expect("fixture is a valid AgentJob")
    }

    fn check(name: &str, passed: bool, message: &str) -> ReadinessCheck {
        ReadinessCheck { name: name.into(), passed, message: message.into() }
    }

    fn ready() -> Readiness {
        Readiness {
            checks: vec![
                check("tool/bandit", true, "required tool bandit is ready with 50 calls/min spare"),
                check("nodes", true, "a schedulable node fits one agent Pod"),
            ],
            ..Readiness::default()
        }
    }

    fn ready_without_gpu() -> Readiness {
        Readiness {
            checks: vec![check("nodes", true, "no node has nvidia.com/gpu free; running without the optional GPU")],
            dropped: vec!["gpu".into()],
            ..Readiness::default()
        }
    }

    fn short_of_cpu() -> Readiness {
        Readiness {
            checks: vec![
                check("tool/bandit", true, "ready"),
                check("nodes", false, "none of 1 schedulable node(s) has room for one agent Pod: short of cpu"),
            ],
            insufficient_resources: vec!["cpu".into()],
            blocked_reason: Some("InsufficientResources"),
            ..Readiness::default()
        }
    }

    fn approver(voter: &str) -> Approver {
        Approver { voter: voter.into(), vote: format!("scan-{voter}"), decided_at: Some(now()), reason: None }
    }

    fn approvals(voters: &[&str]) -> Tally {
        Tally { required: 2, approvers: voters.iter().map(|v| approver(v)).collect(), ..Tally::default() }
    }

    fn approved() -> Tally {
        approvals(&["alice", "bob"])
    }

    fn rejected() -> Tally {
        Tally { rejected_by: Some(Approver { reason: Some("scope too broad".into()), ..approver("carol") }), ..approvals(&["alice"]) }
    }

    fn pod(agent: &str, attempt: i32, state: PodState) -> PodView {
        PodView { name: format!("scan-{agent}-{attempt}"), agent: agent.into(), attempt, generation: Some(1), state }
    }

    fn report(model: &str, input: i64, output: i64, out: Value) -> Option<String> {
        Some(
            json!({"usage": [{"model": model, "inputTokens": input, "cachedInputTokens": 0, "outputTokens": output}], "output": out})
                .to_string(),
        )
    }

    fn succeeded(message: Option<String>) -> PodState {
        PodState::Succeeded { message }
    }

    fn failed(message: Option<String>) -> PodState {
        PodState::Failed { reason: "Error".into(), message }
    }

    /// Attempt 1 of both agents finished with usage reports: 37_000 tokens, $0.066.
    fn both_reported(attempt: i32) -> Vec<PodView> {
        vec![
            pod("scanner", attempt, succeeded(report("gpt-4o-mini", 20_000, 5_000, json!({"findings": 3})))),
            pod("fixer", attempt, succeeded(report("claude-sonnet-4", 10_000, 2_000, json!({})))),
        ]
    }

    fn step(job: &AgentJob, readiness: &Readiness, tally: &Tally, pods: &[PodView], gone_pods: &[String]) -> Plan {
        let prices = PriceTable::builtin();
        decide(&Observed {
            job,
            now: now(),
            approval_floor: 2,
            approval_tiers: &[],
            approval_timeout_seconds: None,
            prices: &prices,
            learned: None,
            readiness,
            tally,
            pods,
            gone_pods,
        })
    }

    /// The job as it is stored after `plan` was applied.
    fn after(mut job: AgentJob, plan: Plan) -> AgentJob {
        job.status = Some(plan.status);
        job
    }

    /// A job whose attempt 1 was started (approved and ready) and recorded in status.
    fn running(patches: &[(&str, Value)]) -> AgentJob {
        let j = job(patches);
        let plan = step(&j, &ready(), &approved(), &[], &[]);
        assert_eq!(plan.ensure_attempt, Some(1), "fixture: attempt 1 starts");
        after(j, plan)
    }

    fn with_generation(mut job: AgentJob, generation: i64) -> AgentJob {
        job.metadata.generation = Some(generation);
        job
    }

    fn cond<'a>(plan: &'a Plan, type_: &str) -> Option<(&'a str, &'a str, &'a str)> {
        find(&plan.status.conditions, type_).map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
    }

    fn usage(plan: &Plan) -> &Usage {
        plan.status.usage.as_ref().expect("usage recorded")
    }

    const NO_RETRIES: &[(&str, Value)] = &[];

    struct Case {
        name: &'static str,
        job: AgentJob,
        readiness: Readiness,
        tally: Tally,
        pods: Vec<PodView>,
        gone_pods: Vec<String>,
        phase: JobPhase,
        /// Reason of the Ready condition.
        ready_reason: &'static str,
        ensure_attempt: Option<i32>,
        /// Reasons of the planned Events, in order.
        events: &'static [&'static str],
        /// Further assertions; gets the case name for its messages.
        more: fn(&str, &Plan),
    }

    impl Default for Case {
        fn default() -> Self {
            Case {
                name: "",
                job: job(&[]),
                readiness: ready(),
                tally: Tally { required: 2, ..Tally::default() },
                pods: vec![],
                gone_pods: vec![],
                phase: JobPhase::Pending,
                ready_reason: "",
                ensure_attempt: None,
                events: &[],
                more: |_, _| {},
            }
        }
    }

    fn cases() -> Vec<Case> {
        let retries: &[(&str, Value)] = &[("/spec/limits", json!({"maxRetries": 1}))];
        vec![
            Case {
                name: "new job without votes is estimated and awaits approval",
                phase: JobPhase::AwaitingApproval,
                ready_reason: "AwaitingApproval",
                events: &["AwaitingApproval"],
                more: |name, plan| {
                    let s = &plan.status;
                    assert_eq!(s.observed_generation, Some(1), "{name}");
                    let e = s.estimate.as_ref().expect("estimate");
                    assert_eq!(
                        (e.generation, e.tokens.p50, e.tokens.p90, e.method.as_str(), e.samples),
                        (1, 27_000, 81_000, "prior", 0),
                        "{name}"
                    );
                    assert_eq!(e.models.iter().map(|m| m.model.as_str()).collect::<Vec<_>>(), ["claude-sonnet-4", "gpt-4o-mini"], "{name}");
                    assert_eq!(cond(plan, condition::ESTIMATED).map(|c| (c.0, c.1)), Some(("True", "Estimated")), "{name}");
                    assert_eq!(
                        cond(plan, condition::APPROVED),
                        Some(("False", "AwaitingApproval", "0 of 2 approvals from category core-security heads")),
                        "{name}"
                    );
                    assert_eq!(cond(plan, condition::INFRASTRUCTURE_READY).map(|c| (c.0, c.1)), Some(("True", "Ready")), "{name}");
                    assert_eq!(cond(plan, condition::RECONCILING).map(|c| c.0), Some("True"), "{name}");
                    assert_eq!(s.approval.as_ref().map(|a| a.summary.as_str()), Some("0/2"), "{name}");
                    assert!(s.attempts.is_empty(), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "estimate over the cost budget rejects",
                job: job(&[("/spec/budget", json!({"maxCostUSD": "0.01"}))]),
                tally: approved(),
                phase: JobPhase::Rejected,
                ready_reason: "BudgetExceeded",
                events: &["BudgetExceeded"],
                more: |name, plan| {
                    let (_, _, msg) = cond(plan, condition::READY).unwrap();
                    assert!(msg.contains("exceeds budget.maxCostUSD $0.01"), "{name}: {msg}");
                    assert_eq!(cond(plan, condition::STALLED).map(|c| (c.0, c.1)), Some(("True", "BudgetExceeded")), "{name}");
                    assert!(plan.status.estimate.is_some(), "{name}: the estimate that exceeded is shown");
                    assert!(plan.events[0].warning, "{name}");
                    assert!(plan.status.attempts.is_empty(), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "estimate over maxTokens rejects",
                job: job(&[("/spec/budget", json!({"maxCostUSD": "5.00", "maxTokens": 50_000}))]),
                tally: approved(),
                phase: JobPhase::Rejected,
                ready_reason: "BudgetExceeded",
                events: &["BudgetExceeded"],
                more: |name, plan| {
                    let (_, _, msg) = cond(plan, condition::READY).unwrap();
                    assert_eq!(msg, "estimated p90 tokens 81000 exceed budget.maxTokens 50000", "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "input not matching inputSchema rejects",
                job: job(&[
                    ("/spec/input", json!({"scanDepth": "full"})),
                    ("/spec/inputSchema", json!({"type": "object", "required": ["repositoryPath"]})),
                ]),
                tally: approved(),
                phase: JobPhase::Rejected,
                ready_reason: "InvalidInput",
                events: &["InvalidInput"],
                more: |name, plan| {
                    let (_, _, msg) = cond(plan, condition::READY).unwrap();
                    assert!(msg.starts_with("input does not match inputSchema: ") && msg.contains("repositoryPath"), "{name}: {msg}");
                    assert_eq!(cond(plan, condition::STALLED).map(|c| c.1), Some("InvalidInput"), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "input matching inputSchema passes on to approval",
                job: job(&[
                    ("/spec/input", json!({"repositoryPath": "/src"})),
                    ("/spec/inputSchema", json!({"type": "object", "required": ["repositoryPath"]})),
                ]),
                phase: JobPhase::AwaitingApproval,
                ready_reason: "AwaitingApproval",
                events: &["AwaitingApproval"],
                ..Case::default()
            },
            Case {
                name: "unknown model leaves the job Pending, not estimated at zero",
                job: job(&[("/spec/agents/supporting", json!([{"name": "fixer", "image": "fixer", "model": "my-llm"}]))]),
                tally: approved(),
                phase: JobPhase::Pending,
                ready_reason: "UnknownModel",
                events: &["UnknownModel"],
                more: |name, plan| {
                    assert_eq!(plan.status.estimate, None, "{name}");
                    let (status, reason, msg) = cond(plan, condition::ESTIMATED).unwrap();
                    assert_eq!((status, reason), ("False", "UnknownModel"), "{name}");
                    assert!(msg.contains("my-llm"), "{name}: {msg}");
                    assert_eq!(cond(plan, condition::STALLED), None, "{name}: a price table update can fix it");
                },
                ..Case::default()
            },
            Case {
                name: "a counted Reject rejects the job",
                tally: rejected(),
                phase: JobPhase::Rejected,
                ready_reason: "VoteRejected",
                events: &["VoteRejected"],
                more: |name, plan| {
                    assert_eq!(plan.status.approval.as_ref().and_then(|a| a.rejected_by.as_deref()), Some("carol"), "{name}");
                    let (status, reason, msg) = cond(plan, condition::APPROVED).unwrap();
                    assert_eq!((status, reason), ("False", "Rejected"), "{name}");
                    assert_eq!(msg, "carol rejected the job (vote scan-carol): scope too broad", "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "approved but not ready waits for resources with the readiness reason",
                tally: approved(),
                readiness: short_of_cpu(),
                phase: JobPhase::WaitingForResources,
                ready_reason: "InsufficientResources",
                events: &["InsufficientResources"],
                more: |name, plan| {
                    let s = &plan.status;
                    assert_eq!(cond(plan, condition::APPROVED), Some(("True", "Approved", "approved by alice, bob")), "{name}");
                    let (status, reason, msg) = cond(plan, condition::INFRASTRUCTURE_READY).unwrap();
                    assert_eq!((status, reason), ("False", "InsufficientResources"), "{name}");
                    assert!(msg.contains("short of cpu"), "{name}: {msg}");
                    assert_eq!(s.insufficient_resources, ["cpu"], "{name}");
                    assert_eq!(s.checks.len(), 2, "{name}");
                    assert!(s.attempts.is_empty(), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "approval is awaited before readiness matters",
                tally: approvals(&["alice"]),
                readiness: short_of_cpu(),
                phase: JobPhase::AwaitingApproval,
                ready_reason: "AwaitingApproval",
                events: &["AwaitingApproval"],
                more: |name, plan| {
                    assert_eq!(cond(plan, condition::INFRASTRUCTURE_READY).map(|c| c.0), Some("False"), "{name}: readiness is still shown");
                    assert_eq!(plan.status.approval.as_ref().map(|a| a.summary.as_str()), Some("1/2"), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "approved and ready starts attempt 1",
                tally: approved(),
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                events: &["AttemptStarted"],
                more: |name, plan| {
                    let s = &plan.status;
                    assert_eq!(s.attempts.len(), 1, "{name}");
                    let a = &s.attempts[0];
                    assert_eq!((a.attempt, a.generation, a.result), (1, 1, AttemptResult::Running), "{name}");
                    assert_eq!(a.pods, ["scan-scanner-1", "scan-fixer-1"], "{name}");
                    assert!(s.start_time.is_some(), "{name}");
                    assert!(!plan.drop_gpu, "{name}");
                    assert_eq!(
                        cond(plan, condition::READY).map(|c| c.2),
                        Some("attempt 1 of 1 running: 2 of 2 agent Pod(s) not finished"),
                        "{name}"
                    );
                },
                ..Case::default()
            },
            Case {
                name: "approved and ready without the optional GPU starts without it",
                tally: approved(),
                readiness: ready_without_gpu(),
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                events: &["AttemptStarted"],
                more: |name, plan| {
                    assert!(plan.drop_gpu, "{name}");
                    assert_eq!(plan.status.dropped_resources, ["gpu"], "{name}");
                    assert!(plan.events[0].note.contains("without the optional GPU"), "{name}: {}", plan.events[0].note);
                },
                ..Case::default()
            },
            Case {
                name: "running attempt with its Pods active keeps running",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                events: &[],
                more: |name, plan| {
                    assert_eq!(
                        cond(plan, condition::READY).map(|c| c.2),
                        Some("attempt 1 of 1 running: 2 of 2 agent Pod(s) not finished"),
                        "{name}"
                    );
                    assert_eq!(plan.status.attempts.len(), 1, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "running attempt whose Pods the cache has not shown yet keeps running",
                job: running(NO_RETRIES),
                tally: approved(),
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                events: &[],
                ..Case::default()
            },
            Case {
                name: "one agent done and one running is still running",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: vec![pod("scanner", 1, PodState::Active), both_reported(1).remove(1)],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                more: |name, plan| {
                    assert_eq!(
                        cond(plan, condition::READY).map(|c| c.2),
                        Some("attempt 1 of 1 running: 1 of 2 agent Pod(s) not finished"),
                        "{name}"
                    );
                    assert_eq!(plan.status.usage, None, "{name}: no usage before the attempt ends");
                },
                ..Case::default()
            },
            Case {
                name: "running attempt keeps running when readiness or votes change meanwhile",
                job: running(NO_RETRIES),
                tally: rejected(),
                readiness: short_of_cpu(),
                pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                ..Case::default()
            },
            Case {
                name: "all agents succeeded with reports: Succeeded with summed usage",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: both_reported(1),
                phase: JobPhase::Succeeded,
                ready_reason: "Succeeded",
                events: &["Succeeded"],
                more: |name, plan| {
                    let s = &plan.status;
                    let u = usage(plan);
                    assert_eq!(
                        (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.total_tokens),
                        (30_000, 0, 7_000, 37_000),
                        "{name}"
                    );
                    assert_eq!(u.cost_usd, "0.066", "{name}");
                    assert_eq!(u.models.len(), 2, "{name}");
                    assert_eq!(u.estimate_error_percent, Some(37), "{name}: (37000 - 27000) / 27000");
                    assert_eq!(s.output, Some(json!({"findings": 3})), "{name}: output of the primary agent");
                    assert_eq!(s.attempts[0].result, AttemptResult::Succeeded, "{name}");
                    assert_eq!(s.attempts[0].usage.as_ref().map(|u| u.total_tokens), Some(37_000), "{name}");
                    assert!(s.completion_time.is_some() && s.attempts[0].completion_time.is_some(), "{name}");
                    assert_eq!(cond(plan, condition::SUCCEEDED).map(|c| c.0), Some("True"), "{name}");
                    assert_eq!(cond(plan, condition::READY).map(|c| c.0), Some("True"), "{name}");
                    assert_eq!(cond(plan, condition::RECONCILING), None, "{name}");
                    assert_eq!(cond(plan, condition::USAGE_REPORTED).map(|c| (c.0, c.1)), Some(("True", "Reported")), "{name}");
                    assert!(plan.events[0].note.ends_with("cost $0.066"), "{name}: {}", plan.events[0].note);
                },
                ..Case::default()
            },
            Case {
                name: "output not matching outputSchema fails the attempt",
                job: running(&[("/spec/outputSchema", json!({"type": "object", "required": ["report"]}))]),
                tally: approved(),
                pods: both_reported(1),
                phase: JobPhase::Failed,
                ready_reason: "AttemptsExhausted",
                events: &["Failed"],
                more: |name, plan| {
                    let msg = plan.status.attempts[0].message.as_deref().unwrap_or_default();
                    assert!(msg.starts_with("output does not match outputSchema") && msg.contains("report"), "{name}: {msg}");
                    assert_eq!(usage(plan).total_tokens, 37_000, "{name}: a failed attempt's usage still counts");
                    assert_eq!(plan.status.output, None, "{name}: invalid output is not published");
                },
                ..Case::default()
            },
            Case {
                name: "a failed Pod with retries left starts attempt 2 and keeps attempt 1's usage",
                job: running(retries),
                tally: approved(),
                pods: vec![
                    pod("scanner", 1, failed(report("gpt-4o-mini", 1_000, 100, json!(null)))),
                    pod("fixer", 1, succeeded(report("claude-sonnet-4", 2_000, 200, json!({})))),
                ],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(2),
                events: &["AttemptFailed", "AttemptStarted"],
                more: |name, plan| {
                    let s = &plan.status;
                    assert_eq!(s.attempts.len(), 2, "{name}");
                    let (first, second) = (&s.attempts[0], &s.attempts[1]);
                    assert_eq!(first.result, AttemptResult::Failed, "{name}");
                    assert_eq!(first.message.as_deref(), Some("scan-scanner-1: Error"), "{name}");
                    assert_eq!(first.usage.as_ref().map(|u| u.total_tokens), Some(3_300), "{name}");
                    assert_eq!((second.attempt, second.result), (2, AttemptResult::Running), "{name}");
                    assert_eq!(second.pods, ["scan-scanner-2", "scan-fixer-2"], "{name}");
                    assert_eq!(usage(plan).total_tokens, 3_300, "{name}: attempt 1's usage is kept in the total");
                    assert_eq!(
                        cond(plan, condition::READY).map(|c| c.2),
                        Some("attempt 2 of 2 running: 2 of 2 agent Pod(s) not finished"),
                        "{name}"
                    );
                    assert!(plan.events[0].warning && plan.events[0].note.ends_with("; retrying"), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a failed Pod with retries left but no capacity waits for resources",
                job: running(retries),
                tally: approved(),
                readiness: short_of_cpu(),
                pods: vec![pod("scanner", 1, failed(None)), both_reported(1).remove(1)],
                phase: JobPhase::WaitingForResources,
                ready_reason: "InsufficientResources",
                events: &["MalformedReport", "AttemptFailed"],
                more: |name, plan| {
                    assert_eq!(plan.status.attempts.len(), 1, "{name}");
                    assert_eq!(plan.status.attempts[0].result, AttemptResult::Failed, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a failure on the last attempt fails the job and stalls it",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: vec![pod("scanner", 1, failed(report("gpt-4o-mini", 1_000, 100, json!(null)))), both_reported(1).remove(1)],
                phase: JobPhase::Failed,
                ready_reason: "AttemptsExhausted",
                events: &["Failed"],
                more: |name, plan| {
                    assert_eq!(cond(plan, condition::STALLED).map(|c| (c.0, c.1)), Some(("True", "AttemptsExhausted")), "{name}");
                    assert_eq!(cond(plan, condition::SUCCEEDED).map(|c| (c.0, c.1)), Some(("False", "AttemptsExhausted")), "{name}");
                    assert_eq!(cond(plan, condition::RECONCILING), None, "{name}");
                    let (_, _, msg) = cond(plan, condition::READY).unwrap();
                    assert!(msg.contains("scan-scanner-1: Error") && msg.contains("no retries left (1 attempt(s))"), "{name}: {msg}");
                    assert!(plan.status.completion_time.is_some(), "{name}");
                    assert_eq!(usage(plan).total_tokens, 1_100 + 12_000, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a malformed report is recorded, and no tokens are invented for it",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: vec![
                    pod("scanner", 1, succeeded(report("gpt-4o-mini", 20_000, 5_000, json!({"findings": 3})))),
                    pod("fixer", 1, succeeded(Some("Traceback (most recent call last): boom".into()))),
                ],
                phase: JobPhase::Succeeded,
                ready_reason: "Succeeded",
                events: &["MalformedReport", "Succeeded"],
                more: |name, plan| {
                    let (status, reason, msg) = cond(plan, condition::USAGE_REPORTED).unwrap();
                    assert_eq!((status, reason), ("False", "MalformedReport"), "{name}");
                    assert!(msg.contains("scan-fixer-1") && msg.contains("not a usage report"), "{name}: {msg}");
                    assert!(plan.events[0].warning, "{name}");
                    let u = usage(plan);
                    assert_eq!(u.total_tokens, 25_000, "{name}: only the scanner's reported tokens");
                    assert_eq!(u.models.iter().map(|m| m.model.as_str()).collect::<Vec<_>>(), ["gpt-4o-mini"], "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a report naming an unpriced model keeps its tokens and says so",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: vec![
                    pod("scanner", 1, succeeded(report("gpt-4o-mini", 20_000, 5_000, json!({"findings": 3})))),
                    pod("fixer", 1, succeeded(report("my-llm", 1_000, 1_000, json!({})))),
                ],
                phase: JobPhase::Succeeded,
                ready_reason: "Succeeded",
                events: &["UnpricedModel", "Succeeded"],
                more: |name, plan| {
                    let (status, reason, msg) = cond(plan, condition::USAGE_REPORTED).unwrap();
                    assert_eq!((status, reason), ("False", "UnpricedModel"), "{name}");
                    assert!(msg.contains("my-llm"), "{name}: {msg}");
                    assert_eq!((usage(plan).total_tokens, usage(plan).cost_usd.as_str()), (27_000, "0.006"), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "Pods of an attempt missing from status are adopted, not started again",
                // The operator created attempt 1's Pods and stopped before writing status.
                job: after(job(&[]), step(&job(&[]), &ready(), &approvals(&["alice"]), &[], &[])),
                tally: approved(),
                pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                events: &["Running"],
                more: |name, plan| {
                    let s = &plan.status;
                    assert_eq!(s.attempts.len(), 1, "{name}: {:?}", s.attempts);
                    assert_eq!((s.attempts[0].attempt, s.attempts[0].result), (1, AttemptResult::Running), "{name}");
                    assert_eq!(s.attempts[0].pods, ["scan-scanner-1", "scan-fixer-1"], "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "an adopted attempt whose Pods already finished is read, not rerun",
                job: after(job(&[]), step(&job(&[]), &ready(), &approvals(&["alice"]), &[], &[])),
                tally: approved(),
                pods: both_reported(1),
                phase: JobPhase::Succeeded,
                ready_reason: "Succeeded",
                events: &["Succeeded"],
                more: |name, plan| {
                    assert_eq!(plan.status.attempts.len(), 1, "{name}");
                    assert_eq!(usage(plan).total_tokens, 37_000, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a failed attempt whose retry was created before its end was recorded keeps its usage",
                // Attempt 1 is recorded Running; the operator saw it fail, created attempt 2's
                // Pods and stopped before writing status.
                job: running(retries),
                tally: approved(),
                pods: vec![
                    pod("scanner", 1, failed(report("gpt-4o-mini", 20_000, 5_000, json!({})))),
                    pod("fixer", 1, succeeded(report("claude-sonnet-4", 10_000, 2_000, json!({})))),
                    pod("scanner", 2, PodState::Active),
                    pod("fixer", 2, PodState::Active),
                ],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(2),
                more: |name, plan| {
                    let a = &plan.status.attempts;
                    assert_eq!(
                        a.iter().map(|a| (a.attempt, a.result)).collect::<Vec<_>>(),
                        [(1, AttemptResult::Failed), (2, AttemptResult::Running)],
                        "{name}"
                    );
                    assert_eq!(a[0].usage.as_ref().map(|u| u.total_tokens), Some(37_000), "{name}");
                    assert_eq!(a[0].message.as_deref(), Some("scan-scanner-1: Error"), "{name}");
                    assert_eq!(usage(plan).total_tokens, 37_000, "{name}: attempt 1's usage is counted while attempt 2 runs");
                },
                ..Case::default()
            },
            Case {
                name: "every unrecorded attempt is adopted and read, not only the newest",
                // Attempts 2 and 3 were created, and 2 failed, while no status write got through.
                job: running(&[("/spec/limits", json!({"maxRetries": 2}))]),
                tally: approved(),
                pods: [1, 2]
                    .into_iter()
                    .flat_map(|n| {
                        [
                            pod("scanner", n, failed(report("gpt-4o-mini", 20_000, 5_000, json!({})))),
                            pod("fixer", n, succeeded(report("claude-sonnet-4", 10_000, 2_000, json!({})))),
                        ]
                    })
                    .chain(both_reported(3))
                    .collect(),
                phase: JobPhase::Succeeded,
                ready_reason: "Succeeded",
                events: &["Succeeded"],
                more: |name, plan| {
                    let a = &plan.status.attempts;
                    let results: Vec<_> = a.iter().map(|a| (a.attempt, a.result)).collect();
                    assert_eq!(results, [(1, AttemptResult::Failed), (2, AttemptResult::Failed), (3, AttemptResult::Succeeded)], "{name}");
                    assert!(a.iter().all(|a| a.usage.as_ref().map(|u| u.total_tokens) == Some(37_000)), "{name}: {a:?}");
                    assert_eq!(usage(plan).total_tokens, 3 * 37_000, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a Pod confirmed deleted fails the attempt",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: vec![both_reported(1).remove(0)],
                gone_pods: vec!["scan-fixer-1".into()],
                phase: JobPhase::Failed,
                ready_reason: "AttemptsExhausted",
                events: &["MalformedReport", "Failed"],
                more: |name, plan| {
                    assert_eq!(plan.status.attempts[0].message.as_deref(), Some("scan-fixer-1: PodDeleted"), "{name}");
                    assert_eq!(usage(plan).total_tokens, 25_000, "{name}: the remaining agent's usage counts");
                },
                ..Case::default()
            },
            Case {
                name: "a Pod confirmed deleted while another runs is not created again",
                job: running(NO_RETRIES),
                tally: approved(),
                pods: vec![pod("scanner", 1, PodState::Active)],
                gone_pods: vec!["scan-fixer-1".into()],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: None,
                more: |name, plan| {
                    assert_eq!(
                        cond(plan, condition::READY).map(|c| c.2),
                        Some("attempt 1 of 1 running: 1 of 2 agent Pod(s) not finished"),
                        "{name}"
                    );
                },
                ..Case::default()
            },
            Case {
                name: "a spec change during an attempt applies from the next attempt",
                job: with_generation(running(NO_RETRIES), 2),
                tally: approved(),
                pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                more: |name, plan| {
                    assert_eq!(cond(plan, condition::SPEC_CHANGE_PENDING).map(|c| (c.0, c.1)), Some(("True", "AttemptRunning")), "{name}");
                    assert_eq!(plan.status.observed_generation, Some(2), "{name}");
                    assert_eq!(plan.status.attempts[0].generation, 1, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a Rejected job whose generation did not change stays Rejected",
                job: after(job(&[]), step(&job(&[]), &ready(), &rejected(), &[], &[])),
                tally: approved(),
                phase: JobPhase::Rejected,
                ready_reason: "VoteRejected",
                more: |name, plan| {
                    assert_eq!(
                        plan.status.approval.as_ref().and_then(|a| a.rejected_by.as_deref()),
                        Some("carol"),
                        "{name}: status untouched"
                    );
                    assert!(plan.status.attempts.is_empty(), "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a Rejected job whose generation changed is evaluated again",
                job: with_generation(after(job(&[]), step(&job(&[]), &ready(), &rejected(), &[], &[])), 2),
                tally: approved(),
                phase: JobPhase::Running,
                ready_reason: "Running",
                ensure_attempt: Some(1),
                events: &["AttemptStarted"],
                more: |name, plan| {
                    let s = &plan.status;
                    assert_eq!(s.estimate.as_ref().map(|e| e.generation), Some(2), "{name}: estimated again");
                    assert_eq!(s.approval.as_ref().and_then(|a| a.rejected_by.as_deref()), None, "{name}");
                    assert_eq!(cond(plan, condition::STALLED), None, "{name}");
                    assert_eq!(s.attempts[0].generation, 2, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a budget-Rejected job with a raised budget is evaluated again",
                job: {
                    let low = job(&[("/spec/budget", json!({"maxCostUSD": "0.01"}))]);
                    let plan = step(&low, &ready(), &approvals(&[]), &[], &[]);
                    with_generation(after(job(&[]), plan), 2)
                },
                phase: JobPhase::AwaitingApproval,
                ready_reason: "AwaitingApproval",
                events: &["AwaitingApproval"],
                more: |name, plan| {
                    assert_eq!(cond(plan, condition::STALLED), None, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a Succeeded job stays Succeeded",
                job: after(running(NO_RETRIES), step(&running(NO_RETRIES), &ready(), &approved(), &both_reported(1), &[])),
                tally: rejected(),
                pods: both_reported(1),
                phase: JobPhase::Succeeded,
                ready_reason: "Succeeded",
                more: |name, plan| {
                    assert_eq!(cond(plan, condition::SPEC_CHANGE_PENDING), None, "{name}");
                    assert_eq!(usage(plan).total_tokens, 37_000, "{name}: not counted twice");
                },
                ..Case::default()
            },
            Case {
                name: "a Succeeded job with a new generation says it will not run again",
                job: with_generation(
                    after(running(NO_RETRIES), step(&running(NO_RETRIES), &ready(), &approved(), &both_reported(1), &[])),
                    2,
                ),
                tally: approved(),
                pods: both_reported(1),
                phase: JobPhase::Succeeded,
                ready_reason: "Succeeded",
                more: |name, plan| {
                    assert_eq!(cond(plan, condition::SPEC_CHANGE_PENDING).map(|c| (c.0, c.1)), Some(("True", "JobFinished")), "{name}");
                    assert_eq!(plan.status.attempts.len(), 1, "{name}");
                },
                ..Case::default()
            },
            Case {
                name: "a Failed job stays Failed",
                job: after(
                    running(NO_RETRIES),
                    step(
                        &running(NO_RETRIES),
                        &ready(),
                        &approved(),
                        &[pod("scanner", 1, failed(None)), pod("fixer", 1, failed(None))],
                        &[],
                    ),
                ),
                tally: approved(),
                phase: JobPhase::Failed,
                ready_reason: "AttemptsExhausted",
                ..Case::default()
            },
        ]
    }

    #[test]
    fn decide_table() {
        let cases = cases();
        assert!(cases.len() >= 10);
        for case in cases {
            let name = case.name;
            let plan = step(&case.job, &case.readiness, &case.tally, &case.pods, &case.gone_pods);
            assert_eq!(plan.status.phase, Some(case.phase), "{name}: phase; conditions {:#?}", plan.status.conditions);
            assert_eq!(cond(&plan, condition::READY).map(|c| c.1), Some(case.ready_reason), "{name}: Ready reason");
            assert_eq!(plan.ensure_attempt, case.ensure_attempt, "{name}: ensure_attempt");
            let events: Vec<&str> = plan.events.iter().map(|e| e.reason.as_str()).collect();
            assert_eq!(events, case.events, "{name}: events {:#?}", plan.events);
            assert_eq!(plan.status.observed_generation, case.job.metadata.generation, "{name}: observedGeneration");
            (case.more)(name, &plan);
            if case.job.status.as_ref().and_then(|s| s.phase).is_some_and(JobPhase::is_terminal)
                && case.job.status.as_ref().and_then(|s| s.observed_generation) == case.job.metadata.generation
            {
                assert_eq!(Some(&plan.status), case.job.status.as_ref(), "{name}: a settled job's status does not change");
            }
            // Deciding again on what was just decided changes nothing: no flapping, no new attempt.
            if plan.ensure_attempt.is_none() && plan.status.attempts.iter().all(|a| a.result != AttemptResult::Running) {
                let again = step(&after(case.job.clone(), plan.clone()), &case.readiness, &case.tally, &case.pods, &case.gone_pods);
                assert_eq!(again.status, plan.status, "{name}: deciding twice is stable");
                assert!(again.events.is_empty(), "{name}: no repeated events {:?}", again.events);
            }
        }
    }

    #[test]
    fn first_status_waits_briefly_only_for_votes() {
        use std::time::Duration;
        let wait = Duration::from_secs(1);
        let young = Duration::from_millis(300);
        let fresh = job(&[]);
        let unvoted = step(&fresh, &ready(), &Tally { required: 2, ..Tally::default() }, &[], &[]);
        assert_eq!(unvoted.status.phase, Some(JobPhase::AwaitingApproval));
        let none = AgentJobStatus::default();
        assert_eq!(hold_first_status(&none, &unvoted, young, wait), Some(Duration::from_millis(700)), "a new job waits for its votes");
        assert_eq!(hold_first_status(&none, &unvoted, wait, wait), None, "no longer than vote_wait from creation");
        assert_eq!(hold_first_status(&none, &unvoted, young, Duration::ZERO), None, "0 turns the wait off");
        let written = after(fresh.clone(), unvoted.clone()).status.unwrap();
        assert_eq!(hold_first_status(&written, &unvoted, young, wait), None, "a job with a status is never held back");

        let started = step(&fresh, &ready(), &approved(), &[], &[]);
        assert_eq!(hold_first_status(&none, &started, young, wait), None, "votes complete: the job starts at once");
        let over_budget = job(&[("/spec/budget/maxCostUSD", json!("0.000001"))]);
        let refused = step(&over_budget, &ready(), &Tally { required: 2, ..Tally::default() }, &[], &[]);
        assert_eq!(refused.status.phase, Some(JobPhase::Rejected));
        assert_eq!(hold_first_status(&none, &refused, young, wait), None, "a refusal is reported at once");
    }

    #[test]
    fn pods_of_a_started_attempt_appearing_change_no_status() {
        let started = running(&[]);
        let pods = [pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)];
        let plan = step(&started, &ready(), &approved(), &pods, &[]);
        assert_eq!(Some(&plan.status), started.status.as_ref(), "the Pods the start created, seen unfinished, are no news");
        assert!(plan.events.is_empty(), "{:?}", plan.events);
    }

    #[test]
    fn pods_found_before_any_status_keep_the_generation_they_were_built_from() {
        // Started at first sight (votes applied with the job), its status write refused because
        // the spec changed in between: the Pods are all there is of generation 1.
        let changed = with_generation(job(&[]), 2);
        let pods = [pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)];
        let plan = step(&changed, &ready(), &approved(), &pods, &[]);
        let attempt = &plan.status.attempts[0];
        assert_eq!((attempt.attempt, attempt.generation, attempt.result), (1, 1, AttemptResult::Running));
        assert_eq!(plan.ensure_attempt, Some(1), "the attempt is followed, not started again");
        let pending = cond(&plan, condition::SPEC_CHANGE_PENDING).expect("SpecChangePending");
        assert_eq!(pending.0, "True");
        assert!(pending.2.contains("generation 2 applies from the next attempt"), "{}", pending.2);
    }

    #[test]
    fn approvals_and_attempts_from_spec() {
        let cases: &[(&str, AgentJob, i32, i32, i32)] = &[
            ("the floor applies when the job asks for nothing", job(&[]), 2, 2, 1),
            ("a job may raise the floor", job(&[("/spec/approval", json!({"required": 3}))]), 2, 3, 1),
            ("a job may not lower the floor", job(&[("/spec/approval", json!({"required": 1}))]), 2, 2, 1),
            ("maxRetries adds attempts", job(&[("/spec/limits", json!({"maxRetries": 3}))]), 1, 1, 4),
        ];
        for (name, job, floor, want_required, want_attempts) in cases {
            assert_eq!(approvals_required(&job.spec, *floor), *want_required, "{name}");
            assert_eq!(max_attempts(&job.spec), *want_attempts, "{name}");
        }
    }
}
