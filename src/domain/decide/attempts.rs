//! Following an attempt: its Pods' states and reports become its result and usage (the meters'
//! measurement where it was metered), and usage sums over every attempt.

use super::*;

/// An attempt still Running in status with a newer one after it ended before the newer one
/// started (the operator stopped before recording how): it is read from its Pods now, so its
/// result and usage are not lost. Its Pods all terminated before the next attempt was created;
/// one missing from the cache has been deleted since, and its report with it.
pub(super) fn settle_superseded_attempts(s: &mut AgentJobStatus, plan: &mut Plan, o: &Observed, generation: i64) {
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
        s.usage = Some(Box::new(total_usage(s, o)));
    }
}

/// Follows the running attempt. Returns true when it has finished and the job needs the gates
/// again (a retry); false when the job is still running or has reached a final phase.
pub(super) fn follow_attempt(s: &mut AgentJobStatus, plan: &mut Plan, o: &Observed, current: i32, generation: i64) -> bool {
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
        // now would create it a second time. Missing Pods are created only while the current
        // votes approve the attempt's generation: status alone never starts anything.
        let approved = provenance::approved_by_current_votes(o, attempt_generation);
        // A Pod created and not yet shown by the watch is not missing (Observed::expected_pods).
        let missing = expected.iter().any(|name| !o.pods.iter().any(|p| &p.name == name) && !o.expected_pods.contains(name));
        plan.ensure_attempt = (!any_deleted && approved && missing).then_some(current);
        plan.drop_gpu = s.dropped_resources.iter().any(|d| d == "gpu");
        let running = states.iter().filter(|(_, st)| !st.terminated()).count();
        let mut ready_msg = attempt_progress(current, max_attempts(&job.spec), running, states.len());
        // Said once, not counted, so more refusals cost no status write of the operator's.
        if crate::domain::grants::attempt_budget_refusals(s.meter.as_deref(), current) > 0 {
            ready_msg.push_str(&format!(
                "; the agent meters refused calls the budget could not cover: the job ends {BUDGET_EXHAUSTED} when its agents exit"
            ));
        }
        set_condition(&mut s.conditions, condition::READY, false, "Running", ready_msg.clone(), generation, &o.now);
        set_condition(&mut s.conditions, condition::RECONCILING, true, "Running", ready_msg, generation, &o.now);
        return false;
    }

    // Every Pod of the attempt has terminated: read what the agents reported.
    let (failures, output) = settle_attempt(s, plan, o, index, &states, generation);
    s.usage = Some(Box::new(total_usage(s, o)));

    if failures.is_empty() {
        s.phase = Some(JobPhase::Succeeded);
        s.output = output.map(Box::new);
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
    // No retry when a meter refused a call for budget (a retry's calls would draw on less), none
    // is left, or what was spent plus another attempt's estimate would exceed the budget
    // (domain/retry_budget.rs).
    let stop = if crate::domain::grants::attempt_budget_refusals(s.meter.as_deref(), current) > 0 {
        // What the agents produced before the budget ran out is kept, as their usage is.
        s.output = output.map(Box::new);
        let spent = s.usage.as_ref().map_or("0", |u| u.cost_usd.as_str());
        let kept = if s.output.is_some() { "output and usage so far kept" } else { "usage so far kept (no output reported)" };
        Some((
            BUDGET_EXHAUSTED,
            format!("{note}; spent ${spent} of budget.maxCostUSD ${}; {kept}; not retried", job.spec.budget.max_cost_usd),
        ))
    } else if current >= max_attempts(&job.spec) {
        Some(("AttemptsExhausted", format!("{note}; no retries left ({} attempt(s))", max_attempts(&job.spec))))
    } else {
        // Estimated afresh, as the start of any attempt is (run_gates): status is no proof of an
        // estimate, and a lowered one would buy a retry the budget cannot cover (tests/estimator.rs
        // a_retry_must_fit_what_was_spent_plus_a_fresh_estimate_not_a_forged_one).
        let next = estimate(&estimate_input(job), o.learned, o.prices)
            .ok()
            .map(|f| crate::domain::retry_budget::NextAttempt { cost_p90: f.cost_p90, tokens_p90: f.tokens_p90 });
        crate::domain::retry_budget::next_attempt_fits(&job.spec, s.usage.as_deref(), next)
            .err()
            .map(|why| (BUDGET_EXHAUSTED, format!("{note}; not retried: {why}")))
    };
    if let Some((reason, msg)) = stop {
        self::stop(s, plan, reason, msg, generation, &o.now);
        return false;
    }
    plan.events.push(PlannedEvent { warning: true, reason: "AttemptFailed".into(), note: format!("{note}; retrying") });
    true
}

/// Ends a job that will not be retried: Failed, with `reason` on its conditions and Event.
pub(super) fn stop(s: &mut AgentJobStatus, plan: &mut Plan, reason: &str, msg: String, generation: i64, now: &Time) {
    s.phase = Some(JobPhase::Failed);
    s.completion_time = Some(now.clone());
    set_condition(&mut s.conditions, condition::SUCCEEDED, false, reason, msg.clone(), generation, now);
    set_condition(&mut s.conditions, condition::READY, false, reason, msg.clone(), generation, now);
    set_condition(&mut s.conditions, condition::STALLED, true, reason, msg.clone(), generation, now);
    remove_condition(&mut s.conditions, condition::RECONCILING);
    // "Failed" as before for the attempts running out; the budget running out says so.
    let event = if reason == "AttemptsExhausted" { "Failed" } else { reason };
    plan.events.push(PlannedEvent { warning: true, reason: event.into(), note: msg });
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
    let job_name = job.metadata.name.as_deref().unwrap_or_default();
    let is_primary = |pod: &str| crate::domain::pod_builder::is_agent_pod_name(pod, job_name, &job.spec.agents.primary.name, current);
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
                if report.output_truncated {
                    let note = format!(
                        "{name}: the report was cut at the 4 KiB termination-message cap; usage kept, output lost (keep output within AGENTGATE_OUTPUT_MAX_BYTES)"
                    );
                    plan.events.push(PlannedEvent { warning: true, reason: "OutputTruncated".into(), note });
                }
                if is_primary(name) {
                    output = report.output;
                }
            }
            Err(why) => report_problems.push(format!("{name}: {why}")),
        }
    }
    let (attempt_usage, unpriced) = price_usage(&tokens, o.prices);
    if failures.is_empty()
        && let Err(errors) = check_against_schema("output", output.as_ref(), job.spec.output_schema.as_deref())
    {
        failures.push(format!("{OUTPUT_MISMATCH}: {}", errors.join("; ")));
    }
    // Whatever the agents did after it, an attempt a meter refused a call for budget did not run
    // to its end within the budget: it fails, first of all for that. The meter is the only
    // source: the agent cannot write its grant entry (controller/meter_api.rs) nor its meter's
    // termination message. What the meters measured comes through both channels, the second
    // one a tenant cutting the meter off from the operator cannot stop (domain/meter_message.rs).
    let pod_meters: Vec<(&str, &crate::domain::meter_message::PodMeter)> =
        states.iter().filter_map(|(name, _)| o.pods.iter().find(|p| &p.name == name).map(|p| (name.as_str(), &p.meter))).collect();
    let crate::domain::meter_message::Measurement { usage, budget_refusals: refusals, unmeasured, raised_by_messages, final_by_message } =
        crate::domain::meter_message::measure_attempt(s.meter.as_deref(), current, &pod_meters);
    // Every meter of the attempt has stopped: a grant its meter could not settle (cut off from
    // the operator) is settled to what its message says it spent, so that a retry's meters can
    // draw on the rest and `status.meter` says what was spent.
    if let Some(meter) = s.meter.as_deref_mut() {
        crate::domain::grants::settle_from_messages(meter, current, &final_by_message);
    }
    if refusals > 0 {
        failures.insert(0, format!("{BUDGET_EXHAUSTED}: the agent meters refused {refusals} call(s) the budget could not cover"));
    }

    // A metered attempt's usage is what its meters measured; the agents' claim is kept beside it
    // for comparison and never counted (domain/grants.rs).
    // A Pod whose meter ran and said nothing through either channel is never counted from its
    // agent's own report (the agent writes it: it could say 0): the attempt counts what was
    // measured, $0 if nothing, and says so.
    let metered = usage.or_else(|| {
        (!unmeasured.is_empty()).then(|| crate::api::Usage { cost_usd: MicroUsd(0).to_string(), ..crate::api::Usage::default() })
    });
    if !raised_by_messages.is_empty() {
        let note = format!(
            "attempt {current}: the meter API was told less than the agent meters measured (cut off from the operator?); \
             counted from their termination messages: {}",
            raised_by_messages.join(", ")
        );
        plan.events.push(PlannedEvent { warning: true, reason: "UsageFromMeterMessage".into(), note });
    }
    if !unmeasured.is_empty() {
        let note = format!(
            "attempt {current}: the meter of {} ran and reported no usage, neither to the meter API nor in its termination message: \
             its usage is unknown, not taken from the agent's own report; the attempt counts what the meters measured (${}) \
             and the estimator does not learn it",
            unmeasured.join(", "),
            metered.as_ref().map_or("0.00", |u| u.cost_usd.as_str())
        );
        set_condition(&mut s.conditions, condition::USAGE_REPORTED, false, "UsageUnmeasured", note.clone(), generation, &o.now);
        plan.events.push(PlannedEvent { warning: true, reason: "UsageUnmeasured".into(), note });
    } else if metered.is_some() {
        // The meters priced every call they let through; a claim's prices do not matter.
        let mut note = format!("attempt {current}: usage measured by the agent meters");
        if !report_problems.is_empty() {
            note = format!("{note}; the agents' own reports: {}", report_problems.join("; "));
            plan.events.push(PlannedEvent { warning: true, reason: "MalformedReport".into(), note: note.clone() });
        }
        set_condition(&mut s.conditions, condition::USAGE_REPORTED, true, "Metered", note, generation, &o.now);
    } else if report_problems.is_empty() && unpriced.is_empty() {
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

    if let Some(measured) = &metered
        && report_problems.is_empty()
        && let Some(why) = crate::domain::grants::claim_mismatch(measured, &tokens)
    {
        let note = format!("attempt {current}: the agents' usage report disagrees with the meter, which is what counts: {why}");
        plan.events.push(PlannedEvent { warning: true, reason: "UsageClaimMismatch".into(), note });
    }
    let attempt = &mut s.attempts[index];
    attempt.completion_time = Some(o.now.clone());
    attempt.unmeasured_pods = unmeasured;
    match metered {
        Some(measured) => {
            // Kept for comparison only, never counted: folded like the meters' usage, so that
            // agents claiming many models cannot grow the status (tests.rs
            // a_metered_attempts_claims_of_many_models_are_folded).
            let mut claimed = attempt_usage;
            crate::domain::report::fold_models(&mut claimed, crate::domain::grants::MAX_MODELS);
            attempt.reported_usage = Some(claimed);
            attempt.usage = Some(measured);
        }
        None => attempt.usage = Some(attempt_usage),
    }
    // Recorded by this version, so learned by it, whoever started the attempt.
    attempt.learned = Some(false);
    attempt.result = if failures.is_empty() { AttemptResult::Succeeded } else { AttemptResult::Failed };
    attempt.message = Some(if failures.is_empty() { "all agents succeeded".into() } else { failures.join("; ") });
    (failures, output)
}

/// Usage is the sum over every attempt: a retry never overwrites what was spent before.
fn total_usage(s: &AgentJobStatus, o: &Observed) -> crate::api::Usage {
    if s.attempts.iter().any(|a| a.reported_usage.is_some()) {
        // Metered costs include calls charged their reservation (no tokens to price): summed as
        // the meters charged them, not re-priced.
        let usages: Vec<&crate::api::Usage> = s.attempts.iter().filter_map(|a| a.usage.as_ref()).collect();
        let mut total = crate::domain::grants::sum_usages(&usages);
        total.estimate_error_percent = s.estimate.as_ref().and_then(|e| estimate_error_percent(total.total_tokens, e.tokens.p50));
        return total;
    }
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
