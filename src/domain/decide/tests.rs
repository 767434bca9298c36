use super::*;
use crate::api::{Approver, ReadinessCheck, Usage};
use crate::domain::conditions::find;
use crate::domain::vote_wait::VoteWait;
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
    PodView {
        name: format!("scan-{agent}-{attempt}-agentgate"),
        agent: agent.into(),
        attempt,
        generation: Some(1),
        state,
        meter: Default::default(),
    }
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

/// Decides with `tally` as the current votes' tally of every generation up to the job's.
fn step(job: &AgentJob, readiness: &Readiness, tally: &Tally, pods: &[PodView], gone_pods: &[String]) -> Plan {
    let older: BTreeMap<i64, Tally> = (1..job.metadata.generation.unwrap_or(1)).map(|g| (g, tally.clone())).collect();
    step_with(job, readiness, tally, &older, pods, gone_pods)
}

fn step_with(
    job: &AgentJob,
    readiness: &Readiness,
    tally: &Tally,
    other_tallies: &BTreeMap<i64, Tally>,
    pods: &[PodView],
    gone_pods: &[String],
) -> Plan {
    step_expecting(job, readiness, tally, other_tallies, pods, gone_pods, &[])
}

/// As `step_with`, with `expected` as the Pods created but not yet shown by the watch.
fn step_expecting(
    job: &AgentJob,
    readiness: &Readiness,
    tally: &Tally,
    other_tallies: &BTreeMap<i64, Tally>,
    pods: &[PodView],
    gone_pods: &[String],
    expected: &[String],
) -> Plan {
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
        other_tallies,
        pods,
        gone_pods,
        expected_pods: expected,
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

/// `job` with attempt 1 metered: each agent's meter reported the tokens [`both_reported`]'s
/// agents claim, at $0.02 per agent, and the scanner's meter refused `refusals` calls for budget.
fn metered(mut job: AgentJob, refusals: i64) -> AgentJob {
    let grant = |agent: &str, model: &str, input: i64, output: i64, refusals: i64| crate::api::MeterGrant {
        pod: format!("scan-{agent}-1-agentgate"),
        pod_uid: format!("uid-{agent}"),
        attempt: 1,
        session: format!("session-{agent}"),
        sequence: 3,
        granted_usd: "0.03".into(),
        spent_usd: "0.02".into(),
        settled: true,
        usage: Some(Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: input + output,
            cost_usd: "0.02".into(),
            models: vec![crate::api::ModelUsage {
                model: model.into(),
                input_tokens: input,
                output_tokens: output,
                cost_usd: "0.02".into(),
                ..Default::default()
            }],
            ..Usage::default()
        }),
        budget_refusals: refusals,
    };
    let status = job.status.get_or_insert_with(Default::default);
    status.meter = Some(Box::new(crate::api::MeterStatus {
        granted_usd: "0.06".into(),
        spent_usd: "0.04".into(),
        committed_usd: "0.04".into(),
        grants: vec![grant("scanner", "gpt-4o-mini", 20_000, 5_000, refusals), grant("fixer", "claude-sonnet-4", 10_000, 2_000, 0)],
    }));
    job
}

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

/// Decides `case` and checks its expectations, then that deciding again changes nothing.
fn check_case(case: Case) {
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

/// One `#[test]` per case, so that the first failing case hides none of the others.
macro_rules! decide_table {
    ($($test:ident: $case:expr;)+) => {
        $(
            #[test]
            fn $test() {
                check_case($case);
            }
        )+
    };
}

/// The job with one retry allowed (two attempts).
fn retries() -> Vec<(&'static str, Value)> {
    vec![("/spec/limits", json!({"maxRetries": 1}))]
}

mod decide_table {
    use super::*;

    decide_table! {
        a_meter_refused_a_call_for_budget_the_job_ends_budgetexhausted_not_retried_output_and_usage_kept: Case {
            name: "a meter refused a call for budget: the job ends BudgetExhausted, not retried, output and usage kept",
            // Both agents exited 0 (the scanner handled the 402 and reported what it had).
            job: metered(running(&retries()), 2),
            tally: approved(),
            pods: both_reported(1),
            phase: JobPhase::Failed,
            ready_reason: "BudgetExhausted",
            events: &["BudgetExhausted"],
            more: |name, plan| {
                let s = &plan.status;
                assert_eq!(s.output.as_deref(), Some(&json!({"findings": 3})), "{name}: the primary's output is kept");
                assert_eq!((usage(plan).total_tokens, usage(plan).cost_usd.as_str()), (37_000, "0.04"), "{name}: the metered usage");
                let a = &s.attempts[0];
                assert_eq!(a.result, AttemptResult::Failed, "{name}");
                assert_eq!(
                    a.message.as_deref(),
                    Some("BudgetExhausted: the agent meters refused 2 call(s) the budget could not cover"),
                    "{name}"
                );
                let (_, _, msg) = cond(plan, condition::READY).unwrap();
                assert!(msg.contains("spent $0.04 of budget.maxCostUSD $5.00; output and usage so far kept; not retried"), "{name}: {msg}");
                assert_eq!(cond(plan, condition::STALLED).map(|c| (c.0, c.1)), Some(("True", "BudgetExhausted")), "{name}");
                assert_eq!(cond(plan, condition::SUCCEEDED).map(|c| (c.0, c.1)), Some(("False", "BudgetExhausted")), "{name}");
                assert_eq!(cond(plan, condition::USAGE_REPORTED).map(|c| c.1), Some("Metered"), "{name}");
                assert_eq!(plan.events[0].note, *msg, "{name}: the Event says the same");
                assert!(plan.events[0].warning, "{name}");
            },
            ..Case::default()
        };
        an_agent_ignoring_402_until_its_deadline_still_ends_budgetexhausted_not_retried: Case {
            name: "an agent ignoring 402 until its deadline still ends BudgetExhausted, not retried",
            // A hostile agent kept calling after the refusals and was stopped at
            // activeDeadlineSeconds: no report of its own, its meter's usage all the same.
            job: metered(running(&retries()), 40),
            tally: approved(),
            pods: vec![
                pod("scanner", 1, PodState::Failed { reason: "DeadlineExceeded".into(), message: None }),
                pod("fixer", 1, succeeded(report("claude-sonnet-4", 10_000, 2_000, json!({})))),
            ],
            phase: JobPhase::Failed,
            ready_reason: "BudgetExhausted",
            events: &["MalformedReport", "BudgetExhausted"],
            more: |name, plan| {
                let s = &plan.status;
                assert_eq!(s.output, None, "{name}: the primary reported nothing");
                assert_eq!(usage(plan).cost_usd, "0.04", "{name}: the meters' usage");
                let message = s.attempts[0].message.as_deref().unwrap();
                assert!(message.starts_with("BudgetExhausted: the agent meters refused 40 call(s)"), "{name}: {message}");
                assert!(message.contains("scan-scanner-1-agentgate: DeadlineExceeded"), "{name}: {message}");
                let (_, _, msg) = cond(plan, condition::READY).unwrap();
                assert!(msg.contains("usage so far kept (no output reported); not retried"), "{name}: {msg}");
            },
            ..Case::default()
        };
        while_the_agents_run_a_meter_s_refusal_is_said_once_in_ready: Case {
            name: "while the agents run, a meter's refusal is said once in Ready",
            job: metered(running(NO_RETRIES), 1),
            tally: approved(),
            pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
            phase: JobPhase::Running,
            ready_reason: "Running",
            // Every Pod of the attempt is cached: none to create.
            ensure_attempt: None,
            more: |name, plan| {
                let (_, _, msg) = cond(plan, condition::READY).unwrap();
                assert!(msg.ends_with("the job ends BudgetExhausted when its agents exit"), "{name}: {msg}");
            },
            ..Case::default()
        };
        a_metered_attempt_without_refusals_succeeds_as_before: Case {
            name: "a metered attempt without refusals succeeds as before",
            job: metered(running(NO_RETRIES), 0),
            tally: approved(),
            pods: both_reported(1),
            phase: JobPhase::Succeeded,
            ready_reason: "Succeeded",
            events: &["Succeeded"],
            more: |name, plan| {
                assert_eq!(plan.status.attempts[0].message.as_deref(), Some("all agents succeeded"), "{name}");
                assert_eq!(usage(plan).cost_usd, "0.04", "{name}");
            },
            ..Case::default()
        };
        new_job_without_votes_is_estimated_and_awaits_approval: Case {
            name: "new job without votes is estimated and awaits approval",
            phase: JobPhase::AwaitingApproval,
            ready_reason: "AwaitingApproval",
            // A new job's first wait for votes is announced by its status alone.
            events: &[],
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
        };
        estimate_over_the_cost_budget_rejects: Case {
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
        };
        estimate_over_maxtokens_rejects: Case {
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
        };
        input_not_matching_inputschema_rejects: Case {
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
        };
        input_matching_inputschema_passes_on_to_approval: Case {
            name: "input matching inputSchema passes on to approval",
            job: job(&[
                ("/spec/input", json!({"repositoryPath": "/src"})),
                ("/spec/inputSchema", json!({"type": "object", "required": ["repositoryPath"]})),
            ]),
            phase: JobPhase::AwaitingApproval,
            ready_reason: "AwaitingApproval",
            // A new job's first wait for votes is announced by its status alone.
            events: &[],
            ..Case::default()
        };
        unknown_model_leaves_the_job_pending_not_estimated_at_zero: Case {
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
        };
        a_counted_reject_rejects_the_job: Case {
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
        };
        approved_but_not_ready_waits_for_resources_with_the_readiness_reason: Case {
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
        };
        approval_is_awaited_before_readiness_matters: Case {
            name: "approval is awaited before readiness matters",
            tally: approvals(&["alice"]),
            readiness: short_of_cpu(),
            phase: JobPhase::AwaitingApproval,
            ready_reason: "AwaitingApproval",
            // A new job's first wait for votes is announced by its status alone.
            events: &[],
            more: |name, plan| {
                assert_eq!(cond(plan, condition::INFRASTRUCTURE_READY).map(|c| c.0), Some("False"), "{name}: readiness is still shown");
                assert_eq!(plan.status.approval.as_ref().map(|a| a.summary.as_str()), Some("1/2"), "{name}");
            },
            ..Case::default()
        };
        approved_and_ready_starts_attempt_1: Case {
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
                assert_eq!(a.pods, ["scan-scanner-1-agentgate", "scan-fixer-1-agentgate"], "{name}");
                assert!(s.start_time.is_some(), "{name}");
                assert!(!plan.drop_gpu, "{name}");
                assert_eq!(
                    cond(plan, condition::READY).map(|c| c.2),
                    Some("attempt 1 of 1 running: 2 of 2 agent Pod(s) not finished"),
                    "{name}"
                );
            },
            ..Case::default()
        };
        approved_and_ready_without_the_optional_gpu_starts_without_it: Case {
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
        };
        running_attempt_with_its_pods_active_keeps_running: Case {
            name: "running attempt with its Pods active keeps running",
            job: running(NO_RETRIES),
            tally: approved(),
            pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
            phase: JobPhase::Running,
            ready_reason: "Running",
            // Every Pod of the attempt is cached: none to create.
            ensure_attempt: None,
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
        };
        running_attempt_whose_pods_the_cache_has_not_shown_yet_keeps_running: Case {
            name: "running attempt whose Pods the cache has not shown yet keeps running",
            job: running(NO_RETRIES),
            tally: approved(),
            phase: JobPhase::Running,
            ready_reason: "Running",
            ensure_attempt: Some(1),
            events: &[],
            ..Case::default()
        };
        one_agent_done_and_one_running_is_still_running: Case {
            name: "one agent done and one running is still running",
            job: running(NO_RETRIES),
            tally: approved(),
            pods: vec![pod("scanner", 1, PodState::Active), both_reported(1).remove(1)],
            phase: JobPhase::Running,
            ready_reason: "Running",
            // Every Pod of the attempt is cached: none to create.
            ensure_attempt: None,
            more: |name, plan| {
                assert_eq!(
                    cond(plan, condition::READY).map(|c| c.2),
                    Some("attempt 1 of 1 running: 1 of 2 agent Pod(s) not finished"),
                    "{name}"
                );
                assert_eq!(plan.status.usage, None, "{name}: no usage before the attempt ends");
            },
            ..Case::default()
        };
        running_attempt_keeps_running_when_readiness_changes_meanwhile: Case {
            name: "running attempt keeps running when readiness changes meanwhile",
            job: running(NO_RETRIES),
            tally: approved(),
            readiness: short_of_cpu(),
            pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
            phase: JobPhase::Running,
            ready_reason: "Running",
            // Every Pod of the attempt is cached: none to create.
            ensure_attempt: None,
            ..Case::default()
        };
        running_attempt_whose_votes_turned_into_a_rejection_is_followed_but_not_ensured: Case {
            // Its Pods run on; none is created any more for a generation the votes no longer approve.
            name: "running attempt whose votes turned into a rejection is followed but not ensured",
            job: running(NO_RETRIES),
            tally: rejected(),
            pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
            phase: JobPhase::Running,
            ready_reason: "Running",
            ensure_attempt: None,
            ..Case::default()
        };
        all_agents_succeeded_with_reports_succeeded_with_summed_usage: Case {
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
                assert_eq!((u.input_tokens, u.cached_input_tokens, u.output_tokens, u.total_tokens), (30_000, 0, 7_000, 37_000), "{name}");
                assert_eq!(u.cost_usd, "0.066", "{name}");
                assert_eq!(u.models.len(), 2, "{name}");
                assert_eq!(u.estimate_error_percent, Some(37), "{name}: (37000 - 27000) / 27000");
                assert_eq!(s.output.as_deref(), Some(&json!({"findings": 3})), "{name}: output of the primary agent");
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
        };
        output_not_matching_outputschema_fails_the_attempt: Case {
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
        };
        a_failed_pod_with_retries_left_starts_attempt_2_and_keeps_attempt_1_s_usage: Case {
            name: "a failed Pod with retries left starts attempt 2 and keeps attempt 1's usage",
            job: running(&retries()),
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
                assert_eq!(first.message.as_deref(), Some("scan-scanner-1-agentgate: Error"), "{name}");
                assert_eq!(first.usage.as_ref().map(|u| u.total_tokens), Some(3_300), "{name}");
                assert_eq!((second.attempt, second.result), (2, AttemptResult::Running), "{name}");
                assert_eq!(second.pods, ["scan-scanner-2-agentgate", "scan-fixer-2-agentgate"], "{name}");
                assert_eq!(usage(plan).total_tokens, 3_300, "{name}: attempt 1's usage is kept in the total");
                assert_eq!(
                    cond(plan, condition::READY).map(|c| c.2),
                    Some("attempt 2 of 2 running: 2 of 2 agent Pod(s) not finished"),
                    "{name}"
                );
                assert!(plan.events[0].warning && plan.events[0].note.ends_with("; retrying"), "{name}");
            },
            ..Case::default()
        };
        a_failed_pod_with_retries_left_but_no_capacity_waits_for_resources: Case {
            name: "a failed Pod with retries left but no capacity waits for resources",
            job: running(&retries()),
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
        };
        a_failure_on_the_last_attempt_fails_the_job_and_stalls_it: Case {
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
                assert!(msg.contains("scan-scanner-1-agentgate: Error") && msg.contains("no retries left (1 attempt(s))"), "{name}: {msg}");
                assert!(plan.status.completion_time.is_some(), "{name}");
                assert_eq!(usage(plan).total_tokens, 1_100 + 12_000, "{name}");
            },
            ..Case::default()
        };
        a_malformed_report_is_recorded_and_no_tokens_are_invented_for_it: Case {
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
                assert!(msg.contains("scan-fixer-1-agentgate") && msg.contains("not a usage report"), "{name}: {msg}");
                assert!(plan.events[0].warning, "{name}");
                let u = usage(plan);
                assert_eq!(u.total_tokens, 25_000, "{name}: only the scanner's reported tokens");
                assert_eq!(u.models.iter().map(|m| m.model.as_str()).collect::<Vec<_>>(), ["gpt-4o-mini"], "{name}");
            },
            ..Case::default()
        };
        a_report_naming_an_unpriced_model_keeps_its_tokens_and_says_so: Case {
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
        };
        pods_of_an_attempt_missing_from_status_are_adopted_not_started_again: Case {
            name: "Pods of an attempt missing from status are adopted, not started again",
            // The operator created attempt 1's Pods and stopped before writing status.
            job: after(job(&[]), step(&job(&[]), &ready(), &approvals(&["alice"]), &[], &[])),
            tally: approved(),
            pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
            phase: JobPhase::Running,
            ready_reason: "Running",
            // Every Pod of the attempt is cached: none to create.
            ensure_attempt: None,
            events: &["Running"],
            more: |name, plan| {
                let s = &plan.status;
                assert_eq!(s.attempts.len(), 1, "{name}: {:?}", s.attempts);
                assert_eq!((s.attempts[0].attempt, s.attempts[0].result), (1, AttemptResult::Running), "{name}");
                assert_eq!(s.attempts[0].pods, ["scan-scanner-1-agentgate", "scan-fixer-1-agentgate"], "{name}");
            },
            ..Case::default()
        };
        an_adopted_attempt_whose_pods_already_finished_is_read_not_rerun: Case {
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
        };
        a_failed_attempt_whose_retry_was_created_before_its_end_was_recorded_keeps_its_usage: Case {
            name: "a failed attempt whose retry was created before its end was recorded keeps its usage",
            // Attempt 1 is recorded Running; the operator saw it fail, created attempt 2's
            // Pods and stopped before writing status.
            job: running(&retries()),
            tally: approved(),
            pods: vec![
                pod("scanner", 1, failed(report("gpt-4o-mini", 20_000, 5_000, json!({})))),
                pod("fixer", 1, succeeded(report("claude-sonnet-4", 10_000, 2_000, json!({})))),
                pod("scanner", 2, PodState::Active),
                pod("fixer", 2, PodState::Active),
            ],
            phase: JobPhase::Running,
            ready_reason: "Running",
            // Every Pod of the attempt is cached: none to create.
            ensure_attempt: None,
            more: |name, plan| {
                let a = &plan.status.attempts;
                assert_eq!(
                    a.iter().map(|a| (a.attempt, a.result)).collect::<Vec<_>>(),
                    [(1, AttemptResult::Failed), (2, AttemptResult::Running)],
                    "{name}"
                );
                assert_eq!(a[0].usage.as_ref().map(|u| u.total_tokens), Some(37_000), "{name}");
                assert_eq!(a[0].message.as_deref(), Some("scan-scanner-1-agentgate: Error"), "{name}");
                assert_eq!(usage(plan).total_tokens, 37_000, "{name}: attempt 1's usage is counted while attempt 2 runs");
            },
            ..Case::default()
        };
        every_unrecorded_attempt_is_adopted_and_read_not_only_the_newest: Case {
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
        };
        a_pod_confirmed_deleted_fails_the_attempt: Case {
            name: "a Pod confirmed deleted fails the attempt",
            job: running(NO_RETRIES),
            tally: approved(),
            pods: vec![both_reported(1).remove(0)],
            gone_pods: vec!["scan-fixer-1-agentgate".into()],
            phase: JobPhase::Failed,
            ready_reason: "AttemptsExhausted",
            events: &["MalformedReport", "Failed"],
            more: |name, plan| {
                assert_eq!(plan.status.attempts[0].message.as_deref(), Some("scan-fixer-1-agentgate: PodDeleted"), "{name}");
                assert_eq!(usage(plan).total_tokens, 25_000, "{name}: the remaining agent's usage counts");
            },
            ..Case::default()
        };
        a_pod_confirmed_deleted_while_another_runs_is_not_created_again: Case {
            name: "a Pod confirmed deleted while another runs is not created again",
            job: running(NO_RETRIES),
            tally: approved(),
            pods: vec![pod("scanner", 1, PodState::Active)],
            gone_pods: vec!["scan-fixer-1-agentgate".into()],
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
        };
        a_spec_change_during_an_attempt_applies_from_the_next_attempt: Case {
            name: "a spec change during an attempt applies from the next attempt",
            job: with_generation(running(NO_RETRIES), 2),
            tally: approved(),
            pods: vec![pod("scanner", 1, PodState::Active), pod("fixer", 1, PodState::Active)],
            phase: JobPhase::Running,
            ready_reason: "Running",
            // Every Pod of the attempt is cached: none to create.
            ensure_attempt: None,
            more: |name, plan| {
                assert_eq!(cond(plan, condition::SPEC_CHANGE_PENDING).map(|c| (c.0, c.1)), Some(("True", "AttemptRunning")), "{name}");
                assert_eq!(plan.status.observed_generation, Some(2), "{name}");
                assert_eq!(plan.status.attempts[0].generation, 1, "{name}");
            },
            ..Case::default()
        };
        a_rejected_job_whose_generation_did_not_change_stays_rejected: Case {
            name: "a Rejected job whose generation did not change stays Rejected",
            job: after(job(&[]), step(&job(&[]), &ready(), &rejected(), &[], &[])),
            tally: approved(),
            phase: JobPhase::Rejected,
            ready_reason: "VoteRejected",
            more: |name, plan| {
                assert_eq!(plan.status.approval.as_ref().and_then(|a| a.rejected_by.as_deref()), Some("carol"), "{name}: status untouched");
                assert!(plan.status.attempts.is_empty(), "{name}");
            },
            ..Case::default()
        };
        a_rejected_job_whose_generation_changed_is_evaluated_again: Case {
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
        };
        a_budget_rejected_job_with_a_raised_budget_is_evaluated_again: Case {
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
        };
        a_succeeded_job_stays_succeeded: Case {
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
        };
        a_succeeded_job_with_a_new_generation_says_it_will_not_run_again: Case {
            name: "a Succeeded job with a new generation says it will not run again",
            job: with_generation(after(running(NO_RETRIES), step(&running(NO_RETRIES), &ready(), &approved(), &both_reported(1), &[])), 2),
            tally: approved(),
            pods: both_reported(1),
            phase: JobPhase::Succeeded,
            ready_reason: "Succeeded",
            more: |name, plan| {
                assert_eq!(cond(plan, condition::SPEC_CHANGE_PENDING).map(|c| (c.0, c.1)), Some(("True", "JobFinished")), "{name}");
                assert_eq!(plan.status.attempts.len(), 1, "{name}");
            },
            ..Case::default()
        };
        a_failed_job_stays_failed: Case {
            name: "a Failed job stays Failed",
            job: after(
                running(NO_RETRIES),
                step(&running(NO_RETRIES), &ready(), &approved(), &[pod("scanner", 1, failed(None)), pod("fixer", 1, failed(None))], &[]),
            ),
            tally: approved(),
            phase: JobPhase::Failed,
            ready_reason: "AttemptsExhausted",
            ..Case::default()
        };
    }
}

/// `now()` minus `ms` milliseconds.
fn ago(ms: i64) -> Time {
    Time(Timestamp::from_millisecond(1_750_000_000_000 - ms).unwrap())
}

#[test]
fn first_status_waits_briefly_only_for_votes() {
    use std::time::Duration;
    let wait = Duration::from_secs(1);
    let fresh = job(&[]);
    let unvoted = step(&fresh, &ready(), &Tally { required: 2, ..Tally::default() }, &[], &[]);
    assert_eq!(unvoted.status.phase, Some(JobPhase::AwaitingApproval));
    let none = AgentJobStatus::default();
    let hold = |old: &AgentJobStatus, plan: &Plan, created: i64, wait: Duration| {
        hold_first_status(old, plan, Some(&ago(created)), &now(), &VoteWait::configured(wait))
    };
    assert_eq!(hold(&none, &unvoted, 1_300, wait), Some(Duration::from_millis(700)), "a new job waits for its votes");
    assert_eq!(hold(&none, &unvoted, 2_000, wait), None, "no longer than vote_wait from creation");
    assert_eq!(hold(&none, &unvoted, 1_300, Duration::ZERO), None, "0 turns the wait off");
    assert_eq!(hold_first_status(&none, &unvoted, None, &now(), &VoteWait::configured(wait)), None, "no creation time, no wait");
    let written = after(fresh.clone(), unvoted.clone()).status.unwrap();
    assert_eq!(hold(&written, &unvoted, 1_300, wait), None, "a job with a status is never held back");

    let started = step(&fresh, &ready(), &approved(), &[], &[]);
    assert_eq!(hold(&none, &started, 1_300, wait), None, "votes complete: the job starts at once");
    let over_budget = job(&[("/spec/budget/maxCostUSD", json!("0.000001"))]);
    let refused = step(&over_budget, &ready(), &Tally { required: 2, ..Tally::default() }, &[], &[]);
    assert_eq!(refused.status.phase, Some(JobPhase::Rejected));
    assert_eq!(hold(&none, &refused, 1_300, wait), None, "a refusal is reported at once");
    let vetoed = step(&fresh, &ready(), &rejected(), &[], &[]);
    assert_eq!(vetoed.status.phase, Some(JobPhase::Rejected));
    assert_eq!(hold(&none, &vetoed, 0, wait), None, "a rejecting vote is reported at once, however new the job");
}

#[test]
fn a_new_job_waiting_for_votes_is_announced_by_its_status_alone() {
    let fresh = job(&[]);
    let waiting = step(&fresh, &ready(), &approvals(&["alice"]), &[], &[]);
    assert_eq!(waiting.status.phase, Some(JobPhase::AwaitingApproval));
    assert!(waiting.events.is_empty(), "{:?}", waiting.events);
    let approved_cond = find(&waiting.status.conditions, condition::APPROVED).unwrap();
    assert_eq!((approved_cond.status.as_str(), approved_cond.reason.as_str()), ("False", "AwaitingApproval"), "status says it");
    assert_eq!(waiting.status.approval.as_ref().map(|a| a.summary.as_str()), Some("1/2"));
    // A job that comes back to wait for votes (rejected, then its spec changed) is news.
    let vetoed = after(fresh.clone(), step(&fresh, &ready(), &rejected(), &[], &[]));
    let mut changed = vetoed.clone();
    changed.metadata.generation = Some(2);
    let again = step(&changed, &ready(), &Tally { required: 2, ..Tally::default() }, &[], &[]);
    assert_eq!(again.status.phase, Some(JobPhase::AwaitingApproval));
    assert_eq!(again.events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), ["AwaitingApproval"]);
    // A rejection on the first status is announced as ever.
    let refused = step(&fresh, &ready(), &rejected(), &[], &[]);
    assert_eq!(refused.events.iter().map(|e| (e.reason.as_str(), e.warning)).collect::<Vec<_>>(), [("VoteRejected", true)]);
}

#[test]
fn first_status_waits_a_whole_vote_wait_despite_second_timestamps() {
    use std::time::Duration;
    let wait = Duration::from_secs(1);
    let unvoted = step(&job(&[]), &ready(), &Tally { required: 2, ..Tally::default() }, &[], &[]);
    let none = AgentJobStatus::default();
    // Created 0.1 s ago at 12:00:00.9, the job reads 12:00:00 at 12:00:01.0: a second "old".
    assert_eq!(
        hold_first_status(&none, &unvoted, Some(&ago(1_000)), &now(), &VoteWait::configured(wait)),
        Some(wait),
        "the stamp's second is not counted"
    );
    assert_eq!(hold_first_status(&none, &unvoted, Some(&ago(0)), &now(), &VoteWait::configured(wait)), Some(wait));
}

#[test]
fn approvals_still_arriving_extend_the_first_status_wait_up_to_a_bound() {
    use std::time::Duration;
    let wait = Duration::from_secs(1);
    let none = AgentJobStatus::default();
    let voted_at = |ms: i64| {
        let mut t = approvals(&["alice"]);
        t.approvers[0].decided_at = Some(ago(ms));
        step(&job(&[]), &ready(), &t, &[], &[])
    };
    let one_of_two = voted_at(1_000);
    assert_eq!(one_of_two.status.phase, Some(JobPhase::AwaitingApproval));
    let hold = |plan: &Plan, created: i64| hold_first_status(&none, plan, Some(&ago(created)), &now(), &VoteWait::configured(wait));
    assert_eq!(hold(&one_of_two, 2_500), Some(wait), "an approval just in: the second may follow");
    assert_eq!(hold(&voted_at(1_600), 2_500), Some(Duration::from_millis(400)));
    assert_eq!(hold(&voted_at(2_500), 2_500), None, "no approval since the wait ran out");
    assert_eq!(hold(&one_of_two, 4_500), Some(Duration::from_millis(500)), "never past 4 vote waits from creation");
    assert_eq!(hold(&one_of_two, 5_000), None);
    // Votes that do not count extend nothing: only the job's own approvals hold its status back.
    let ignored = Tally {
        required: 2,
        ignored: vec![crate::api::IgnoredVote { name: "scan-mallory".into(), why: "not a head".into() }],
        ..Tally::default()
    };
    let junk = step(&job(&[]), &ready(), &ignored, &[], &[]);
    assert_eq!(hold(&junk, 2_500), None, "an ignored vote is no reason to wait");
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
    assert_eq!(plan.ensure_attempt, None, "the attempt is followed (its Pods are there), not started again");
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

// Status is no proof of approval (domain/provenance.rs; tests/gate_attacks.rs on the real
// control plane).

fn unvoted() -> Tally {
    Tally { required: 2, ..Tally::default() }
}

#[test]
fn a_forged_running_attempt_without_pods_or_votes_is_dropped_not_started() {
    // What someone with agentjobs/status write records: attempt 1 Running, no vote cast.
    let forged = running(NO_RETRIES);
    let gone = ["scan-scanner-1-agentgate".to_string(), "scan-fixer-1-agentgate".to_string()];
    let plan = step(&forged, &ready(), &unvoted(), &[], &gone);
    assert_eq!(plan.ensure_attempt, None, "no Pod is created for it");
    assert!(plan.status.attempts.is_empty(), "{:?}", plan.status.attempts);
    assert_eq!(plan.status.phase, Some(JobPhase::AwaitingApproval));
    assert_eq!(plan.status.approval.as_ref().map(|a| a.summary.as_str()), Some("0/2"));
    assert_eq!(plan.status.usage, None);
    let event = plan.events.iter().find(|e| e.reason == "UnprovenAttemptIgnored").expect("an UnprovenAttemptIgnored Event");
    assert!(event.warning && event.note.contains("status recorded attempt 1 (generation 1) but none of its Pods exist"), "{event:?}");

    // Before the API confirms the Pods missing (a slow cache), it is followed, but nothing created.
    let plan = step(&forged, &ready(), &unvoted(), &[], &[]);
    assert_eq!(plan.ensure_attempt, None);

    // An approved attempt whose Pods were deleted still fails as before: it did run.
    let plan = step(&forged, &ready(), &approved(), &[], &gone);
    assert_eq!(plan.status.phase, Some(JobPhase::Failed));
}

#[test]
fn a_forged_attempt_naming_no_pod_is_dropped_even_when_approved() {
    let mut forged = running(NO_RETRIES);
    forged.status.as_mut().unwrap().attempts[0].pods.clear();
    let plan = step(&forged, &ready(), &approved(), &[], &[]);
    assert_eq!(plan.status.attempts.iter().map(|a| a.pods.len()).collect::<Vec<_>>(), [2], "dropped, then started for real");
    assert_eq!(plan.ensure_attempt, Some(1));
    let plan = step(&forged, &ready(), &unvoted(), &[], &[]);
    assert!(plan.status.attempts.is_empty());
    assert_eq!(plan.status.phase, Some(JobPhase::AwaitingApproval), "no success out of nothing");
}

#[test]
fn pods_found_without_approving_votes_are_not_adopted_or_read() {
    // Attempt 1's Pods exist and reported, but only one head approves: nothing of them is taken.
    let waiting = after(job(&[]), step(&job(&[]), &ready(), &approvals(&["alice"]), &[], &[]));
    let plan = step(&waiting, &ready(), &approvals(&["alice"]), &both_reported(1), &[]);
    assert!(plan.status.attempts.is_empty(), "{:?}", plan.status.attempts);
    assert_eq!((plan.status.phase, plan.ensure_attempt), (Some(JobPhase::AwaitingApproval), None));
    assert_eq!((plan.status.usage.as_ref(), plan.status.output.as_ref()), (None, None), "no usage or output from them");
    let event = plan.events.iter().find(|e| e.reason == "UnapprovedPodsIgnored").expect("an UnapprovedPodsIgnored Event");
    assert!(event.note.contains("scan-scanner-1-agentgate") && event.note.contains("do not approve generation 1"), "{event:?}");
    // With the quorum they are adopted and read (the crash-recovery case).
    let plan = step(&waiting, &ready(), &approved(), &both_reported(1), &[]);
    assert_eq!(plan.status.phase, Some(JobPhase::Succeeded));
}

#[test]
fn an_attempt_of_an_older_generation_is_ensured_only_while_that_generation_is_approved() {
    // Attempt 1 runs generation 1; the spec is at 2, approved, but generation 1's votes are gone.
    let changed = with_generation(running(NO_RETRIES), 2);
    let older = BTreeMap::from([(1, unvoted())]);
    let plan = step_with(&changed, &ready(), &approved(), &older, &[pod("scanner", 1, PodState::Active)], &[]);
    assert_eq!(plan.status.phase, Some(JobPhase::Running));
    assert_eq!(plan.ensure_attempt, None, "generation 2's votes do not approve generation 1's Pods");
    let older = BTreeMap::from([(1, approved())]);
    let plan = step_with(&changed, &ready(), &approved(), &older, &[pod("scanner", 1, PodState::Active)], &[]);
    assert_eq!(plan.ensure_attempt, Some(1));
}

#[test]
fn a_forged_estimate_skips_no_check() {
    // Over budget, but status claims generation 1 was estimated (cheaply) and so checked.
    let over = job(&[("/spec/budget", json!({"maxCostUSD": "0.01"}))]);
    let honest = step(&job(&[]), &ready(), &unvoted(), &[], &[]);
    let forged = after(over, honest);
    assert_eq!(forged.status.as_ref().unwrap().estimate.as_ref().map(|e| e.generation), Some(1));
    let plan = step(&forged, &ready(), &approved(), &[], &[]);
    assert_eq!(plan.ensure_attempt, None, "no attempt on the word of a forged estimate");
    assert_eq!(plan.status.phase, Some(JobPhase::Rejected));
    assert_eq!(cond(&plan, condition::READY).map(|c| c.1), Some("BudgetExceeded"));
}

#[test]
fn a_forged_estimate_does_not_lower_the_risk_tier() {
    // Jobs estimated at $0.0001 or more need three approvals; status claims a $0 estimate.
    let tiers: Vec<ApprovalTier> = vec!["minCostUSD=0.0001,required=3".parse().unwrap()];
    let mut forged = after(job(&[]), step(&job(&[]), &ready(), &unvoted(), &[], &[]));
    forged.status.as_mut().unwrap().estimate.as_mut().unwrap().cost_usd.p90 = "0".into();
    let prices = PriceTable::builtin();
    let two = approved();
    let plan = decide(&Observed {
        job: &forged,
        now: now(),
        approval_floor: 2,
        approval_tiers: &tiers,
        approval_timeout_seconds: None,
        prices: &prices,
        learned: None,
        readiness: &ready(),
        tally: &two,
        other_tallies: &BTreeMap::new(),
        pods: &[],
        gone_pods: &[],
        expected_pods: &[],
    });
    assert_eq!(plan.ensure_attempt, None, "two approvals where the real estimate needs three");
    assert_eq!(plan.status.phase, Some(JobPhase::AwaitingApproval));
    let (status, reason, _) = cond(&plan, condition::APPROVED).unwrap();
    assert_eq!((status, reason), ("False", "AwaitingApproval"));
    // A tier measures the budget too (approval_policy::tier_cost), which status cannot forge.
    assert_eq!(plan.status.approval.as_ref().map(|a| a.summary.as_str()), Some("2/3"));
}

/// A status written by a newer operator version: a phase and an attempt result this version does
/// not know are read (as none and as Failed), and the phase is re-derived, never run again on
/// the word of a phase it cannot interpret.
#[test]
fn an_unknown_phase_is_rederived() {
    let attempt = json!({"attempt": 1, "generation": 1, "pods": ["scan-scanner-1-agentgate"], "result": "Cancelled"});
    let unknown = |attempts: Value| job(&[("/status", json!({"phase": "Paused", "attempts": attempts}))]);

    // No attempt: every gate again, approval by the current votes included.
    let fresh = unknown(json!([]));
    assert_eq!(fresh.status.as_ref().unwrap().phase, None);
    let plan = step(&fresh, &ready(), &unvoted(), &[], &[]);
    assert_eq!((plan.status.phase, plan.ensure_attempt), (Some(JobPhase::AwaitingApproval), None));

    // An attempt that ended in a way this version does not know: failed, and final even with
    // retries left and approvals in place.
    let mut ended = unknown(json!([attempt]));
    ended.spec.limits = Some(crate::api::JobLimits { max_execution_seconds: None, max_retries: Some(3) });
    assert_eq!(ended.status.as_ref().unwrap().attempts[0].result, AttemptResult::Failed);
    let plan = step(&ended, &ready(), &approved(), &[], &[]);
    assert_eq!((plan.status.phase, plan.ensure_attempt), (Some(JobPhase::Failed), None));

    // A running attempt is followed.
    let mut running_attempt = attempt.clone();
    running_attempt["result"] = json!("Running");
    let plan = step(&unknown(json!([running_attempt])), &ready(), &approved(), &[], &[]);
    assert_eq!(plan.status.phase, Some(JobPhase::Running));
    assert_eq!(plan.ensure_attempt, Some(1), "its Pods are ensured, as for any running attempt");
}

/// The job's jobType as learned after twelve runs in its namespace of 22 million tokens per model
/// (about $94 each, against the fixture's $5.00 budget).
fn learned_expensive(job: &AgentJob) -> crate::domain::learning::Learned {
    let mut state = crate::domain::learning::EstimatorState::default();
    let prior = crate::domain::estimate::prior_tokens(&estimate_input(job));
    let used: BTreeMap<String, TokenCounts> = prior
        .keys()
        .map(|m| (m.clone(), TokenCounts { input: 20_000_000, cached_input: 0, output: 2_000_000, ..Default::default() }))
        .collect();
    for i in 0..12 {
        assert!(state.record(&format!("other-job/{i}"), "team-security", "security_scan", &used, &prior, &PriceTable::builtin()));
    }
    state.stats("team-security", "security_scan").expect("learned")
}

fn step_learned(job: &AgentJob, learned: &crate::domain::learning::Learned, pods: &[PodView]) -> Plan {
    let prices = PriceTable::builtin();
    decide(&Observed {
        job,
        now: now(),
        approval_floor: 2,
        approval_tiers: &[],
        approval_timeout_seconds: None,
        prices: &prices,
        learned: Some(learned),
        readiness: &ready(),
        tally: &approved(),
        other_tallies: &BTreeMap::new(),
        pods,
        gone_pods: &[],
        expected_pods: &[],
    })
}

#[test]
fn a_retry_re_estimated_over_budget_stops_retrying_rather_than_being_rejected() {
    // Attempt 1 started on the spec's estimate (p90 81,000 tokens, well within $5.00) and failed;
    // since then the team's runs of the jobType turned out to cost about $94 each.
    let started = running(&[("/spec/limits", json!({"maxRetries": 1}))]);
    let learned = learned_expensive(&started);
    let plan = step_learned(&started, &learned, &[pod("scanner", 1, failed(None)), pod("fixer", 1, failed(None))]);
    assert_eq!(plan.ensure_attempt, None, "no retry on an estimate over budget");
    assert_eq!(plan.status.phase, Some(JobPhase::Failed), "it ran: Failed, not Rejected");
    let (_, reason, msg) = cond(&plan, condition::READY).unwrap();
    assert_eq!(reason, "BudgetExhausted");
    // Caught by the retry budget (what was spent plus a fresh estimate of one more attempt).
    assert!(msg.contains("another attempt (estimated p90 $") && msg.contains("would exceed budget.maxCostUSD $5"), "{msg}");
    assert_eq!(cond(&plan, condition::SUCCEEDED).map(|c| c.1), Some("BudgetExhausted"));
    assert!(plan.events.iter().any(|e| e.warning && e.reason == "BudgetExhausted"), "{:?}", plan.events);
    // The same estimate before anything ran rejects the job, as before.
    let fresh = job(&[("/spec/limits", json!({"maxRetries": 1}))]);
    let plan = step_learned(&fresh, &learned, &[]);
    assert_eq!((plan.ensure_attempt, plan.status.phase), (None, Some(JobPhase::Rejected)));
    assert_eq!(cond(&plan, condition::READY).map(|c| c.1), Some("BudgetExceeded"));
}

/// Decides with `expected` as the Pods created but not yet shown by the watch.
fn step_expected(job: &AgentJob, pods: &[PodView], gone_pods: &[String], expected: &[&str]) -> Plan {
    let expected: Vec<String> = expected.iter().map(|p| p.to_string()).collect();
    step_expecting(job, &ready(), &approved(), &BTreeMap::new(), pods, gone_pods, &expected)
}

/// The reconcile woken by the job's own status write, before the Pod watch delivered the Pods the
/// previous one created: they are expected, so nothing is created (a POST refused with 409 for
/// ~1% of `make bench`'s jobs) and the status reads as it did (no write either). A Pod neither in
/// the cache nor expected is still created: an expectation covers only the Pods it names.
#[test]
fn an_expected_pod_is_not_created_again() {
    let started = running(NO_RETRIES);
    let plan = step_expected(&started, &[], &[], &["scan-scanner-1-agentgate", "scan-fixer-1-agentgate"]);
    assert_eq!(plan.ensure_attempt, None, "both Pods were created and are on their way through the watch");
    assert_eq!(Some(&plan.status), started.status.as_ref(), "nothing changed: no status write");
    assert!(plan.events.is_empty(), "{:?}", plan.events);

    let plan = step_expected(&started, &[], &[], &["scan-scanner-1-agentgate"]);
    assert_eq!(plan.ensure_attempt, Some(1), "the fixer's Pod is neither cached nor expected");
    let plan = step_expected(&started, &[pod("scanner", 1, PodState::Active)], &[], &["scan-fixer-1-agentgate"]);
    assert_eq!(plan.ensure_attempt, None, "one cached, the other expected");
    let plan = step_expected(&started, &[], &[], &[]);
    assert_eq!(plan.ensure_attempt, Some(1), "without an expectation, missing Pods are created as before");
}

/// The status write that records a new attempt was refused (409) after its Pods were created:
/// the next reconcile starts the same attempt number again and records it, but creates nothing
/// while those Pods are expected. An expectation of another attempt's Pods does not count.
#[test]
fn an_attempt_whose_pods_are_expected_is_recorded_without_creating_them() {
    let fresh = job(NO_RETRIES);
    let plan = step_expected(&fresh, &[], &[], &["scan-scanner-1-agentgate", "scan-fixer-1-agentgate"]);
    assert_eq!(plan.status.phase, Some(JobPhase::Running));
    assert_eq!(plan.status.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1]);
    assert_eq!(plan.ensure_attempt, None);
    assert_eq!(plan.events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), ["AttemptStarted"]);
    assert_eq!(step_expected(&fresh, &[], &[], &["scan-scanner-1-agentgate"]).ensure_attempt, Some(1));
    assert_eq!(step_expected(&fresh, &[], &[], &["scan-scanner-2-agentgate", "scan-fixer-2-agentgate"]).ensure_attempt, Some(1));
}

/// An expectation never hides a deletion the API confirmed (a tenant deleting the Pod right after
/// it was created): the attempt fails as for any deleted Pod, and a retry, if one is left, starts
/// with new Pods. No job waits on an expectation for a Pod that is gone.
#[test]
fn a_pod_confirmed_deleted_fails_its_attempt_even_if_expected() {
    let started = running(&[("/spec/limits", json!({"maxRetries": 1}))]);
    let gone = ["scan-scanner-1-agentgate".to_string(), "scan-fixer-1-agentgate".to_string()];
    let plan = step_expected(&started, &[], &gone, &["scan-scanner-1-agentgate", "scan-fixer-1-agentgate"]);
    let results: Vec<_> = plan.status.attempts.iter().map(|a| (a.attempt, a.result)).collect();
    assert_eq!(results, [(1, AttemptResult::Failed), (2, AttemptResult::Running)]);
    assert_eq!(plan.ensure_attempt, Some(2), "the retry's Pods are created");
}

/// When the attempt was metered the agents' own claims are kept for comparison only, folded
/// like the meters' usage: listed one by one, 16 agents claiming 40 models each over 11
/// attempts grew the job's status by about a MB (report.rs `fold_models`).
#[test]
fn a_metered_attempts_claims_of_many_models_are_folded() {
    let claim = |agent: &str| {
        let usage: Vec<Value> =
            (0..40).map(|m| json!({"model": format!("{agent}-claimed-{m:02}"), "inputTokens": 1, "outputTokens": 1})).collect();
        Some(json!({"usage": usage, "output": {}}).to_string())
    };
    let pods = vec![pod("scanner", 1, succeeded(claim("scanner"))), pod("fixer", 1, succeeded(claim("fixer")))];
    let plan = step(&metered(running(NO_RETRIES), 0), &ready(), &approved(), &pods, &[]);
    let claimed = plan.status.attempts[0].reported_usage.as_ref().expect("the claim is kept");
    assert!(claimed.models.len() <= crate::domain::grants::MAX_MODELS, "{} entries", claimed.models.len());
    assert_eq!(claimed.total_tokens, 160, "every claimed token is still in it");
    assert_eq!(usage(&plan).cost_usd, "0.04", "the meters' usage counts");
}

/// An agent's claim is kept in the attempt beside what the meters measured, and quoted what the
/// agent wrote: a model named with an escape sequence, a carriage return or a bidi override was
/// stored raw in `attempts[].reportedUsage`, where `kubectl describe` and dashboards show it.
#[test]
fn an_agents_claim_naming_a_model_with_hidden_characters_is_malformed_and_not_stored() {
    let forged = "gpt-4o-mini\u{1b}[2K\rApproved by alice, bob\u{202E}";
    let claim = json!({"usage": [{"model": forged, "inputTokens": 1, "outputTokens": 1}], "output": {}}).to_string();
    let fixer = json!({"usage": [{"model": "fixer-model", "inputTokens": 1, "outputTokens": 1}]}).to_string();
    let pods = vec![pod("scanner", 1, succeeded(Some(claim))), pod("fixer", 1, succeeded(Some(fixer)))];
    let plan = step(&metered(running(NO_RETRIES), 0), &ready(), &approved(), &pods, &[]);
    fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
            Value::Object(map) => map.iter().for_each(|(k, v)| {
                out.push(k);
                strings(v, out)
            }),
            _ => {}
        }
    }
    let status = serde_json::to_value(&plan.status).unwrap();
    let mut all = Vec::new();
    strings(&status, &mut all);
    let hidden: Vec<&&str> = all.iter().filter(|s| s.chars().any(crate::domain::terminal_text::is_hidden)).collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    let claimed = plan.status.attempts[0].reported_usage.as_ref().expect("the other agent's claim is kept");
    assert_eq!(claimed.models.iter().map(|m| m.model.as_str()).collect::<Vec<_>>(), ["fixer-model"]);
    let note = &plan.events.iter().find(|e| e.reason == "MalformedReport").expect("said").note;
    assert!(note.contains(r#"usage[0].model "gpt-4o-mini\u001B[2K\rApproved by alice, bob\u202E" holds control"#), "{note}");
    assert_eq!(usage(&plan).cost_usd, "0.04", "the meters' usage counts");
}

/// A meter that ran, with the termination messages of `sessions`: (session id, input, output
/// tokens of gpt-4o-mini, cost).
fn meter_left(sessions: &[(&str, i64, i64, &str)]) -> crate::domain::meter_message::PodMeter {
    use crate::domain::meter_message::{encode, parse};
    let messages = sessions
        .iter()
        .map(|(session, input, output, cost)| {
            let mut u = Usage::default();
            let tokens = TokenCounts { input: *input, output: *output, ..Default::default() };
            crate::domain::report::add_model_usage(&mut u, "gpt-4o-mini", &tokens, MicroUsd::parse(cost).unwrap());
            u.cost_usd = cost.to_string();
            parse(&encode(&crate::domain::grants::session_key(session), &u, 0)).unwrap()
        })
        .collect();
    crate::domain::meter_message::PodMeter { ran: true, messages, exited_cleanly: true }
}

/// The scanner's meter was cut off from the operator after it reported 25,000 tokens ($0.02):
/// its termination message says what it measured after (35,000, $0.05), and that counts, once.
#[test]
fn a_meter_cut_off_from_the_operator_is_counted_from_its_termination_message() {
    let mut pods = both_reported(1);
    pods[0].meter = meter_left(&[("session-scanner", 28_000, 7_000, "0.05")]);
    pods[1].meter = meter_left(&[("session-fixer", 10_000, 2_000, "0.02")]);
    let plan = step(&metered(running(NO_RETRIES), 0), &ready(), &approved(), &pods, &[]);
    assert_eq!(plan.status.phase, Some(JobPhase::Succeeded));
    assert_eq!((usage(&plan).cost_usd.as_str(), usage(&plan).total_tokens), ("0.07", 47_000), "the later figure, not the sum");
    let events: Vec<&str> = plan.events.iter().map(|e| e.reason.as_str()).collect();
    assert!(events.contains(&"UsageFromMeterMessage"), "{events:?}");
    let note = &plan.events.iter().find(|e| e.reason == "UsageFromMeterMessage").unwrap().note;
    assert!(note.contains("scan-scanner-1-agentgate") && !note.contains("fixer"), "only the session it raised: {note}");
    assert_eq!(cond(&plan, condition::USAGE_REPORTED).map(|c| (c.0, c.1)), Some(("True", "Metered")));
    assert!(plan.status.attempts[0].unmeasured_pods.is_empty());
}

/// The scanner's meter was cut off from the operator after the meter API heard $0.02 of the
/// $0.10 granted it, and could not settle: its whole grant stayed committed after the attempt
/// ended (before: committed $0.17, spent $0.05, of which the retry's meters could not draw the
/// $0.08 it never spent). Its termination message says $0.05: the grant is settled to it
/// (after: committed $0.12, spent $0.08). A session whose meter left no message, or was killed
/// rather than stopped, keeps its grant held (what it spent after its last report is unknown);
/// one whose message says less than the meter API heard is settled at what the API heard, never
/// below.
#[test]
fn a_cut_off_meters_grant_is_settled_to_its_termination_message_when_the_attempt_ends() {
    let job = |scanner_granted: &str| {
        let mut job = metered(running(NO_RETRIES), 0);
        let meter = job.status.as_mut().unwrap().meter.as_mut().unwrap();
        meter.grants[0].settled = false;
        meter.grants[0].granted_usd = scanner_granted.into();
        // The fixer's first meter process, killed before it wrote a message.
        meter.grants.push(crate::api::MeterGrant {
            session: "session-fixer-killed".into(),
            granted_usd: "0.05".into(),
            spent_usd: "0.01".into(),
            settled: false,
            usage: Some(Usage { cost_usd: "0.01".into(), ..Usage::default() }),
            ..meter.grants[1].clone()
        });
        crate::domain::grants::recount(meter);
        job
    };
    let before = job("0.10");
    let meter = before.status.as_ref().unwrap().meter.as_deref().unwrap();
    assert_eq!((meter.committed_usd.as_str(), meter.spent_usd.as_str()), ("0.17", "0.05"));
    let mut pods = both_reported(1);
    pods[0].meter = meter_left(&[("session-scanner", 28_000, 7_000, "0.05")]);
    pods[1].meter = meter_left(&[("session-fixer", 10_000, 2_000, "0.02")]);
    let plan = step(&before, &ready(), &approved(), &pods, &[]);
    let meter = plan.status.meter.as_deref().unwrap();
    assert_eq!((meter.committed_usd.as_str(), meter.spent_usd.as_str(), meter.granted_usd.as_str()), ("0.12", "0.08", "0.18"));
    let scanner = &meter.grants[0];
    assert!(scanner.settled);
    assert_eq!((scanner.spent_usd.as_str(), scanner.usage.as_ref().map(|u| u.total_tokens)), ("0.05", Some(35_000)));
    assert!(!meter.grants[2].settled, "no message: its grant stays held");
    assert_eq!(crate::domain::grants::committed(&meter.grants[2]), MicroUsd::parse("0.05").unwrap());

    // The scanner's meter OOM-killed (an agent can make its own meter run out of memory): calls
    // it had in flight may have been billed and are in no message. Its usage counts the message;
    // its grant stays held.
    pods[0].meter.exited_cleanly = false;
    let plan = step(&before, &ready(), &approved(), &pods, &[]);
    assert_eq!(usage(&plan).cost_usd, "0.08", "the message's $0.05, the fixer's $0.02 and $0.01");
    let meter = plan.status.meter.as_deref().unwrap();
    assert!(!meter.grants[0].settled);
    assert_eq!((meter.committed_usd.as_str(), meter.spent_usd.as_str()), ("0.17", "0.05"));

    // A message behind what the meter API heard (an older process's): settled at the API's figure.
    pods[0].meter = meter_left(&[("session-scanner", 5_000, 1_000, "0.01")]);
    let plan = step(&job("0.10"), &ready(), &approved(), &pods, &[]);
    let scanner = &plan.status.meter.as_deref().unwrap().grants[0];
    assert!(scanner.settled);
    assert_eq!((scanner.spent_usd.as_str(), scanner.usage.as_ref().map(|u| u.total_tokens)), ("0.02", Some(25_000)));
}

/// Both meters ran and neither reached the operator nor left a message (killed before they
/// wrote one): the agents claim 37,000 tokens, which could as well have been 0. Their word is not
/// taken: the usage is what was measured ($0), the attempt is marked so the estimator skips
/// it, and the condition and a Warning Event say why.
#[test]
fn a_pod_whose_meter_said_nothing_is_unmeasured_never_counted_from_its_agent() {
    let mut pods = both_reported(1);
    for pod in &mut pods {
        pod.meter = crate::domain::meter_message::PodMeter { ran: true, messages: Vec::new(), exited_cleanly: false };
    }
    let plan = step(&running(NO_RETRIES), &ready(), &approved(), &pods, &[]);
    assert_eq!(plan.status.phase, Some(JobPhase::Succeeded), "the job's result is its agents'");
    assert_eq!((usage(&plan).total_tokens, usage(&plan).cost_usd.as_str()), (0, "0.00"), "not the agents' 37,000");
    let attempt = &plan.status.attempts[0];
    assert_eq!(attempt.unmeasured_pods, ["scan-scanner-1-agentgate", "scan-fixer-1-agentgate"]);
    assert_eq!(attempt.reported_usage.as_ref().map(|u| u.total_tokens), Some(37_000), "the claim is kept beside, for comparison");
    let (status, reason, message) = cond(&plan, condition::USAGE_REPORTED).unwrap();
    assert_eq!((status, reason), ("False", "UsageUnmeasured"), "{message}");
    assert!(message.contains("scan-scanner-1-agentgate") && message.contains("estimator does not learn"), "{message}");
    assert!(plan.events.iter().any(|e| e.warning && e.reason == "UsageUnmeasured"));
    // Pods whose meters never ran (an older operator's, or never started: nor did their agents)
    // are still counted from their agents' reports, as before.
    let plan = step(&running(NO_RETRIES), &ready(), &approved(), &both_reported(1), &[]);
    assert_eq!(usage(&plan).total_tokens, 37_000);
    assert_eq!(cond(&plan, condition::USAGE_REPORTED).map(|c| c.1), Some("Reported"));
}
