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
use super::provenance;
use super::readiness::Readiness;
use super::report::{accumulate, estimate_error_percent, parse_report, price_usage, tokens_of};
use super::tally::Tally;
use super::validate::{check_against_schema, check_input_size, check_schema};
use crate::api::{
    AgentJob, AgentJobSpec, AgentJobStatus, ApprovalStatus, Attempt, AttemptResult, CostRange, DEFAULT_MAX_RETRIES, Estimate, JobPhase,
    ModelEstimate, TokenRange,
};

/// Re-exported from [`super::conditions`], where the condition types now live.
pub use super::conditions::condition;

/// A Pod of this job as the Pod cache shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    pub agent: String,
    pub attempt: i32,
    /// The job generation the Pod was built from (None on Pods of older operator versions).
    pub generation: Option<i64>,
    pub state: PodState,
    /// What its status says of its meter (domain/meter_message.rs).
    pub meter: crate::domain::meter_message::PodMeter,
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
    /// The current votes tallied for the job's current generation.
    pub tally: &'a Tally,
    /// The current votes tallied for other generations that an attempt or a Pod names: Pods are
    /// created or adopted only for a generation these (or `tally`) approve.
    pub other_tallies: &'a BTreeMap<i64, Tally>,
    pub pods: &'a [PodView],
    /// Pods the status records but the API confirmed deleted.
    pub gone_pods: &'a [String],
    /// Pods of this job the operator created that the Pod cache does not show yet: the watch has
    /// not delivered them (kube-controller-manager's "expectations"). None is created again while
    /// it is expected, which a reconcile woken by the job's own status write, ahead of the Pod's
    /// watch event, did: a POST refused with 409 for ~1% of `make bench`'s jobs
    /// (decide/tests.rs an_expected_pod_is_not_created_again). The shell forgets an expectation
    /// once the watch shows the Pod or its deletion, or after a bound (controller/pod_expectations.rs).
    pub expected_pods: &'a [String],
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
    /// Create the Pods of this attempt that neither the cache shows nor are expected
    /// (`Observed::expected_pods`); None when there is none to create.
    pub ensure_attempt: Option<i32>,
    /// Run without the optional GPU.
    pub drop_gpu: bool,
    pub events: Vec<PlannedEvent>,
}

/// A new Running attempt of `job`, with the Pods it has one per agent, and the tools' rate limit
/// it holds: claimed by the spec it starts from, so editing a running job's `minRateLimit` (or its
/// tools) moves nothing (tests/tools.rs
/// `a_running_job_cannot_take_or_give_back_rate_limit_by_editing_its_spec`). Unknown (None) when
/// `job` is at another generation than the attempt's.
pub fn running_attempt(job: &AgentJob, attempt: i32, generation: i64, now: &Time) -> Attempt {
    let job_name = job.metadata.name.as_deref().unwrap_or_default();
    let tool_claims = (job.metadata.generation == Some(generation))
        .then(|| job.spec.tools.iter().map(|t| crate::api::ToolClaim { name: t.name.clone(), min_rate_limit: t.min_rate_limit }).collect());
    Attempt {
        attempt,
        generation,
        pods: agent_names(&job.spec).iter().map(|a| super::pod_builder::pod_name(job_name, a, attempt)).collect(),
        start_time: Some(now.clone()),
        completion_time: None,
        result: AttemptResult::Running,
        message: None,
        usage: None,
        reported_usage: None,
        unmeasured_pods: Vec::new(),
        learned: Some(false),
        tool_claims,
    }
}

/// The reason (Ready, Succeeded and Stalled conditions, Warning Event) of a job that ended for
/// its budget: a meter refused a call the budget could not cover, or a retry would not fit; and
/// how the message of an attempt a meter refused a call for budget starts.
pub const BUDGET_EXHAUSTED: &str = "BudgetExhausted";

/// How an attempt's message starts when its output did not match `outputSchema`: the
/// recommendations count such attempts as invalid output (domain/recommend.rs).
pub const OUTPUT_MISMATCH: &str = "output does not match outputSchema";

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
    let mut old = job.status.clone().unwrap_or_default();
    old.phase = old.phase.or_else(|| rederive_phase(&old));
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

    // Status is no proof of approval: what it records is checked against the Pods and the
    // current votes first (domain/provenance.rs).
    provenance::adopt_unrecorded_attempts(&mut s, &mut plan, o, generation);
    provenance::drop_unproven_attempt(&mut s, &mut plan, o);
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

/// The phase of a status that has attempts but no phase this version knows (a newer operator
/// version wrote it: `api::agent_job_status::known_phase`), from its last attempt: followed while it
/// runs, final once it has ended. Final even if retries were left: this version does not know
/// why the newer one stopped, and must not spend on its behalf. Without attempts, none: every
/// gate is evaluated again, votes included (decide/tests.rs an_unknown_phase_is_rederived).
pub fn rederive_phase(status: &AgentJobStatus) -> Option<JobPhase> {
    status.attempts.last().map(|a| match a.result {
        AttemptResult::Running => JobPhase::Running,
        AttemptResult::Succeeded => JobPhase::Succeeded,
        AttemptResult::Failed => JobPhase::Failed,
    })
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
                s.estimate = Some(Box::new(Estimate {
                    generation,
                    tokens: TokenRange { p50: f.tokens_p50, p90: f.tokens_p90 },
                    cost_usd: CostRange { p50: f.cost_p50.to_string().into(), p90: f.cost_p90.to_string().into() },
                    method: f.method.into(),
                    samples: f.samples as i64,
                    models: f
                        .models
                        .iter()
                        .map(|m| ModelEstimate {
                            model: m.model.as_str().into(),
                            tokens: TokenRange { p50: m.tokens_p50, p90: m.tokens_p90 },
                            cost_usd: CostRange { p50: m.cost_p50.to_string().into(), p90: m.cost_p90.to_string().into() },
                        })
                        .collect(),
                }));
                let msg = format!(
                    "p50 ${} / p90 ${}, {} / {} tokens ({}, {} sample(s))",
                    f.cost_p50, f.cost_p90, f.tokens_p50, f.tokens_p90, f.method, f.samples
                );
                set_condition(&mut s.conditions, condition::ESTIMATED, true, "Estimated", msg, generation, &o.now);
                if let Err((reason, why)) = spec_checks(spec, f.cost_p90, f.tokens_p90) {
                    reject(s, plan, reason, &why, generation, &o.now);
                    return;
                }
            }
        }
    }

    let t = o.tally;
    let cost_p90 = s.estimate.as_ref().and_then(|e| MicroUsd::parse(&e.cost_usd.p90));
    let cost = super::approval_policy::tier_cost(cost_p90, &spec.budget.max_cost_usd);
    let need = requirement(o.approval_floor, o.approval_tiers, &spec.category, cost, spec.approval.as_ref().and_then(|a| a.required));
    s.approval = Some(ApprovalStatus {
        required: need.required,
        approved: t.approvers.len() as i32,
        summary: format!("{}/{}", t.approvers.len(), need.required).into(),
        approvers: t.approvers.clone(),
        rejected_by: t.rejected_by.as_ref().map(|r| r.voter.clone()),
        ignored_votes: t.ignored_for_status(),
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

    // The checks above ran when status first recorded this generation's estimate; status is no
    // proof of that (a status writer could record an estimate to skip them), so an attempt
    // starts only if they pass again now, on a fresh estimate (decide/tests.rs
    // a_forged_estimate_skips_no_check).
    match estimate(&estimate_input(job), o.learned, o.prices) {
        Err(unknown) => {
            s.phase = Some(JobPhase::Pending);
            waiting(s, "UnknownModel", &unknown.to_string(), generation, &o.now);
            return;
        }
        Ok(f) => {
            if let Err((reason, why)) = spec_checks(spec, f.cost_p90, f.tokens_p90) {
                // A retry re-estimated over budget (the jobType's estimate rose since approval)
                // stops retrying, as when what was spent plus the estimate would not fit
                // (retry_budget.rs): Failed, not Rejected, which would read as never run and be
                // re-evaluated on the next spec change (decide/tests.rs
                // a_retry_re_estimated_over_budget_stops_retrying_rather_than_being_rejected).
                // The fresh estimate still decides, so a forged recorded one buys no retry.
                if reason == "BudgetExceeded" && s.attempts.iter().any(|a| a.generation == generation) {
                    let msg = format!("not retried: the job was re-estimated over its budget since it started: {why}");
                    attempts::stop(s, plan, "BudgetExhausted", msg, generation, &o.now);
                    return;
                }
                reject(s, plan, reason, &why, generation, &o.now);
                return;
            }
            // Nor may it lower the risk tier, and so the approvals needed.
            if !provenance::approved_by_current_votes(o, generation) {
                let msg = format!(
                    "{} approval(s) from category {} heads fall short of what the current estimate (p90 ${}) requires",
                    t.approvers.len(),
                    spec.category,
                    f.cost_p90
                );
                set_condition(&mut s.conditions, condition::APPROVED, false, "AwaitingApproval", msg.clone(), generation, &o.now);
                s.phase = Some(JobPhase::AwaitingApproval);
                waiting(s, "AwaitingApproval", &msg, generation, &o.now);
                return;
            }
        }
    }

    let next = s.attempts.last().map(|a| a.attempt).unwrap_or(0) + 1;
    s.attempts.push(running_attempt(job, next, generation, &o.now));
    s.phase = Some(JobPhase::Running);
    s.start_time.get_or_insert_with(|| o.now.clone());
    remove_condition(&mut s.conditions, condition::SPEC_CHANGE_PENDING);
    // Pods created for this attempt number before its status write was refused are not created
    // again while the watch has yet to show them.
    let created = s.attempts.last().is_some_and(|a| a.pods.iter().all(|p| o.expected_pods.contains(p)));
    plan.ensure_attempt = (!created).then_some(next);
    plan.drop_gpu = r.dropped.iter().any(|d| d == "gpu");
    let pods = s.attempts.last().map_or(0, |a| a.pods.len());
    let progress = attempt_progress(next, max_attempts(spec), pods, pods);
    set_condition(&mut s.conditions, condition::READY, false, "Running", progress.clone(), generation, &o.now);
    set_condition(&mut s.conditions, condition::RECONCILING, true, "Running", progress, generation, &o.now);
    let msg = format!("attempt {next} of {} started", max_attempts(spec));
    let dropped = if plan.drop_gpu { " without the optional GPU (no node has one free)" } else { "" };
    plan.events.push(PlannedEvent { warning: false, reason: "AttemptStarted".into(), note: format!("{msg}{dropped}") });
}

/// Budget and input checks of a spec against its estimate: the reason and message of the first
/// that fails. Each failure rejects the job.
fn spec_checks(spec: &AgentJobSpec, cost_p90: MicroUsd, tokens_p90: i64) -> Result<(), (&'static str, String)> {
    if let Some(reason) = over_budget(spec, cost_p90, tokens_p90) {
        return Err(("BudgetExceeded", reason));
    }
    check_input_size(spec.input.as_deref()).map_err(|why| ("InvalidInput", why))?;
    // The output schema is only applied after the run: a schema that cannot be evaluated must
    // stop the job before anything is spent.
    if let Some(Err(why)) = spec.output_schema.as_ref().map(|schema| check_schema("output", schema)) {
        return Err(("InvalidOutputSchema", why));
    }
    check_against_schema("input", spec.input.as_deref(), spec.input_schema.as_deref())
        .map_err(|errors| ("InvalidInput", format!("input does not match inputSchema: {}", errors.join("; "))))
}

/// How long to hold a job's first status back, if at all.
///
/// A job applied together with its votes (one manifest, a pipeline) reaches the operator a moment
/// before them. Writing `AwaitingApproval` and then `Running` would cost two status writes where
/// one says the same, so the first status waits up to `wait.wait` from the job's creation
/// (domain/vote_wait.rs says how long), but only when all it would say is that the job waits for
/// votes: an estimate over budget, bad input, an unknown model or a rejecting vote is reported at
/// once. Approvals that count and keep coming (a loaded apiserver delays each vote of a pipeline)
/// extend the wait to `wait.wait` after the newest, never past `wait.longest` from creation:
/// only the job's own counted approvals do, so no one else's votes hold its status back.
pub fn hold_first_status(
    old: &AgentJobStatus,
    plan: &Plan,
    created: Option<&Time>,
    now: &Time,
    wait: &super::vote_wait::VoteWait,
) -> Option<std::time::Duration> {
    let first = old.phase.is_none();
    let only_waits_for_votes = plan.status.phase == Some(JobPhase::AwaitingApproval) && plan.ensure_attempt.is_none();
    if !first || !only_waits_for_votes {
        return None;
    }
    let since = |t: &Time| -> std::time::Duration {
        let elapsed = now.0.duration_since(t.0).try_into().unwrap_or_default();
        std::time::Duration::saturating_sub(elapsed, TIMESTAMP_RESOLUTION)
    };
    let waited = since(created?);
    let newest_approval = plan.status.approval.iter().flat_map(|a| &a.approvers).filter_map(|a| a.decided_at.as_ref()).map(since).min();
    let remaining =
        newest_approval.map_or(std::time::Duration::ZERO, |v| wait.wait.saturating_sub(v)).max(wait.wait.saturating_sub(waited));
    let remaining = remaining.min(wait.longest.saturating_sub(waited));
    (!remaining.is_zero()).then_some(remaining)
}

/// Kubernetes timestamps have whole seconds: a job created at 12:00:00.9 reads 12:00:00. A wait
/// counted from one starts at the end of its second, else a 1 s vote wait lasted 0.1 s for such a
/// job, and a third of the bench's burst was written `AwaitingApproval` before its votes
/// (decide/tests.rs first_status_waits_a_whole_vote_wait_despite_second_timestamps).
const TIMESTAMP_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(1);

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

/// Adds an Event for a phase change the steps above did not already announce, except a new job's
/// first wait for its votes: every job that needs approval starts there, its status says so
/// (`Approved=False AwaitingApproval`, `status.approval`), and an Event would repeat it at the cost
/// of one of the four writes an approved job takes (README "Performance"). A rejection, a vote
/// that does not count and every later phase still get theirs
/// (decide/tests.rs a_new_job_waiting_for_votes_is_announced_by_its_status_alone).
fn finish_plan(mut plan: Plan, old: &AgentJobStatus) -> Plan {
    let ready_reason = |s: &AgentJobStatus| super::conditions::find(&s.conditions, condition::READY).map(|c| c.reason.clone());
    let changed = plan.status.phase != old.phase || ready_reason(&plan.status) != ready_reason(old);
    let first_wait_for_votes = old.phase.is_none()
        && plan.status.phase == Some(JobPhase::AwaitingApproval)
        && ready_reason(&plan.status).as_deref() == Some("AwaitingApproval");
    if changed
        && !first_wait_for_votes
        && plan.events.is_empty()
        && let Some(reason) = ready_reason(&plan.status)
    {
        let note = super::conditions::find(&plan.status.conditions, condition::READY).map(|c| c.message.clone()).unwrap_or_default();
        plan.events.push(PlannedEvent { warning: false, reason: reason.to_string(), note: note.to_string() });
    }
    plan
}

mod attempts;
use attempts::{follow_attempt, settle_superseded_attempts};

#[cfg(test)]
mod tests;
