use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::Condition;
use serde_json::json;

use super::*;
use crate::api::{Attempt, AttemptResult, Usage};
use crate::domain::report::price_usage;

fn tokens(input: i64, cached: i64, output: i64) -> TokenCounts {
    TokenCounts { input, cached_input: cached, output, ..Default::default() }
}

fn at(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap())
}

fn priced(per_model: &[(&str, TokenCounts)]) -> Usage {
    let map: BTreeMap<String, TokenCounts> = per_model.iter().map(|(m, t)| (m.to_string(), *t)).collect();
    price_usage(&map, &PriceTable::builtin()).0
}

/// A finished job of `job_type` in `ns` whose primary agent `agent` ran `model`, with one
/// attempt that used `used` (per model) and succeeded or failed.
fn finished(ns: &str, name: &str, job_type: &str, model: &str, used: &[(&str, TokenCounts)], succeeded: bool, t: i64) -> AgentJob {
    let mut job: AgentJob = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"jobType": job_type, "category": "c", "budget": {"maxCostUSD": "1"},
                 "agents": {"primary": {"name": "agent", "image": "i", "model": model}}}}))
    .unwrap();
    let usage = priced(used);
    let result = if succeeded { AttemptResult::Succeeded } else { AttemptResult::Failed };
    let status = job.status.get_or_insert_with(Default::default);
    status.phase = Some(if succeeded { JobPhase::Succeeded } else { JobPhase::Failed });
    status.completion_time = Some(at(t));
    status.attempts = vec![attempt(1, result, usage.clone(), if succeeded { "all agents succeeded" } else { "agent: Error" })];
    status.usage = Some(Box::new(usage));
    job
}

fn attempt(n: i32, result: AttemptResult, usage: Usage, message: &str) -> Attempt {
    Attempt {
        attempt: n,
        generation: 1,
        result,
        message: Some(message.into()),
        usage: Some(usage),
        learned: Some(true),
        ..Attempt::default()
    }
}

fn budget(mut job: AgentJob, usd: &str) -> AgentJob {
    job.spec.budget.max_cost_usd = usd.into();
    job
}

/// `count` jobs `<prefix>-<i>` of jobType `scan`, each using `per_run` tokens of `model`.
fn batch(ns: &str, prefix: &str, model: &str, per_run: TokenCounts, count: usize, succeeded: usize, t0: i64) -> Vec<AgentJob> {
    (0..count).map(|i| finished(ns, &format!("{prefix}-{i}"), "scan", model, &[(model, per_run)], i < succeeded, t0 + i as i64)).collect()
}

fn refs(jobs: &[AgentJob]) -> Vec<&AgentJob> {
    jobs.iter().collect()
}

fn kinds(advice: &[Recommendation]) -> Vec<RecommendationKind> {
    advice.iter().map(|r| r.kind).collect()
}

fn of(advice: &[Recommendation], kind: RecommendationKind) -> &Recommendation {
    advice.iter().find(|r| r.kind == kind).unwrap_or_else(|| panic!("no {kind:?} in {advice:#?}"))
}

const RUN: TokenCounts = TokenCounts { input: 100_000, cached_input: 0, output: 10_000, cache_write: 0, cache_write_1h: 0 };

#[test]
fn a_cheaper_model_with_the_same_outcomes_is_recommended_with_its_saving() {
    // gpt-4o: 100k input, 10k output = $0.25 + $0.10 = $0.35 a run; gpt-4o-mini: $0.015 + $0.006 = $0.021.
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0);
    jobs.extend(batch("team-a", "small", "gpt-4o-mini", RUN, 5, 5, 100));
    let reference = &jobs[4];
    let advice = for_job(reference, &refs(&jobs), &PriceTable::builtin());
    let cheaper = of(&advice, RecommendationKind::CheaperModel);
    assert_eq!(cheaper.saving_per_run_usd, "0.329");
    assert_eq!(cheaper.saving_over_samples_usd, "1.645", "5 runs × $0.329");
    assert_eq!(cheaper.samples, 10);
    assert!(cheaper.summary.contains("use gpt-4o-mini instead of gpt-4o"), "{}", cheaper.summary);
    for figure in ["gpt-4o: 5 runs, 100% succeeded, 100% valid output, mean $0.35", "gpt-4o-mini: 5 runs", "mean $0.021"] {
        assert!(cheaper.evidence.contains(figure), "{figure} in {}", cheaper.evidence);
    }
    // Advice is about the reference's own model: on a gpt-4o-mini job there is nothing cheaper.
    let on_small = for_job(&jobs[9], &refs(&jobs), &PriceTable::builtin());
    assert!(!kinds(&on_small).contains(&RecommendationKind::CheaperModel), "{on_small:#?}");
}

#[test]
fn no_recommendation_below_the_sample_minimum() {
    // Four of each model: everything else would make every rule fire (see the test above and below).
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, MIN_SAMPLES - 1, MIN_SAMPLES - 1, 0);
    jobs.extend(batch("team-a", "small", "gpt-4o-mini", RUN, MIN_SAMPLES - 1, MIN_SAMPLES - 1, 100));
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    assert!(!kinds(&advice).contains(&RecommendationKind::CheaperModel), "4 runs of gpt-4o are not enough: {advice:#?}");
    // A jobType with fewer finished jobs in all than the minimum gets nothing at all.
    let few = batch("team-a", "few", "gpt-4o", RUN, MIN_SAMPLES - 1, 0, 0);
    let few: Vec<AgentJob> = few.into_iter().map(|j| budget(j, "500")).collect();
    assert_eq!(for_job(&few[0], &refs(&few), &PriceTable::builtin()), vec![]);
    // One more and the prompt-cache, budget and retry advice appear.
    let five: Vec<AgentJob> = batch("team-a", "few", "gpt-4o", RUN, MIN_SAMPLES, 0, 0);
    let advice = for_job(&five[0], &refs(&five), &PriceTable::builtin());
    assert!(
        kinds(&advice).contains(&RecommendationKind::PromptCache) && kinds(&advice).contains(&RecommendationKind::RetrySpend),
        "{advice:#?}"
    );
}

#[test]
fn another_namespace_never_contributes_nor_receives_advice() {
    // team-b ran the same jobType cheaply, and lots of it; team-a has only gpt-4o runs.
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0);
    jobs.extend(batch("team-b", "small", "gpt-4o-mini", RUN, 50, 50, 100));
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    assert!(!kinds(&advice).contains(&RecommendationKind::CheaperModel), "{advice:#?}");
    assert!(advice.iter().all(|r| !r.evidence.contains("gpt-4o-mini") && r.samples <= 5), "{advice:#?}");
    // team-b's own advice never counts team-a's runs either.
    let theirs = for_job(&jobs[5], &refs(&jobs), &PriceTable::builtin());
    assert!(theirs.iter().all(|r| !r.evidence.contains("gpt-4o:") && r.samples <= 50), "{theirs:#?}");
    // The namespace report lists only the namespace's own jobTypes and jobs.
    let report = for_namespace("team-a", &refs(&jobs), None, &PriceTable::builtin());
    assert_eq!(report.len(), 1);
    assert_eq!((report[0].finished_jobs, report[0].reference_job.as_str()), (5, "big-4"));
    // A job without a namespace gets no advice at all.
    let mut loose = jobs[0].clone();
    loose.metadata.namespace = None;
    assert!(for_job(&loose, &refs(&jobs), &PriceTable::builtin()).is_empty());
}

#[test]
fn a_cheaper_model_that_fails_more_or_breaks_the_output_is_not_recommended() {
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 10, 10, 0);
    jobs.extend(batch("team-a", "small", "gpt-4o-mini", RUN, 10, 8, 100)); // 80% succeeded vs 100%
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    assert!(!kinds(&advice).contains(&RecommendationKind::CheaperModel), "{advice:#?}");

    // Same success rate, but two of its runs needed a retry after output that missed the schema.
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 10, 10, 0);
    let mut small = batch("team-a", "small", "gpt-4o-mini", RUN, 10, 10, 100);
    for job in small.iter_mut().take(2) {
        let status = job.status.as_mut().unwrap();
        let first = attempt(1, AttemptResult::Failed, priced(&[]), &format!("{OUTPUT_MISMATCH}: /verdict is required"));
        status.attempts.insert(0, first);
    }
    jobs.extend(small);
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    assert!(!kinds(&advice).contains(&RecommendationKind::CheaperModel), "80% valid output is not comparable: {advice:#?}");

    // Within the tolerance (one failure in 30 runs, 3 points) it is.
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 30, 30, 0);
    jobs.extend(batch("team-a", "small", "gpt-4o-mini", RUN, 30, 29, 100));
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    assert!(kinds(&advice).contains(&RecommendationKind::CheaperModel), "{advice:#?}");
}

#[test]
fn a_model_only_slightly_cheaper_is_not_worth_a_switch() {
    // gpt-4.1 ($0.28 a run) against gpt-4o ($0.35): 80% of the cost, just at the threshold.
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0);
    jobs.extend(batch("team-a", "mid", "gpt-4.1", RUN, 5, 5, 100));
    assert!(kinds(&for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin())).contains(&RecommendationKind::CheaperModel));
    // claude-sonnet-4 costs more: nothing to recommend from it.
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0);
    jobs.extend(batch("team-a", "pricier", "claude-sonnet-4", RUN, 5, 5, 100));
    assert!(!kinds(&for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin())).contains(&RecommendationKind::CheaperModel));
}

#[test]
fn prompt_cache_near_zero_on_a_caching_provider() {
    let jobs = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0);
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    let cache = of(&advice, RecommendationKind::PromptCache);
    // Half of 500k input tokens moved from $2.50/M to $1.25/M: 250k × $1.25/M = $0.3125.
    assert_eq!((cache.saving_over_samples_usd.as_str(), cache.saving_per_run_usd.as_str()), ("0.3125", "0.0625"));
    assert!(cache.evidence.contains("0 of 500000 input tokens (0.0%) were read from cache"), "{}", cache.evidence);
    assert!(cache.summary.contains("$1.25/M instead of $2.50/M"), "{}", cache.summary);

    // Already caching 10%: above the near-zero line.
    let caching = batch("team-a", "big", "gpt-4o", tokens(90_000, 10_000, 10_000), 5, 5, 0);
    assert!(!kinds(&for_job(&caching[0], &refs(&caching), &PriceTable::builtin())).contains(&RecommendationKind::PromptCache));

    // A provider without a cache discount: nothing to gain.
    let prices = PriceTable::with_overrides_from_yaml(
        "models:\n  gpt-4o: {inputPerMillion: 2.5, cachedInputPerMillion: 2.5, outputPerMillion: 10}\n",
    )
    .unwrap();
    assert!(!kinds(&for_job(&jobs[0], &refs(&jobs), &prices)).contains(&RecommendationKind::PromptCache));
}

#[test]
fn budget_far_above_the_p90_or_too_close_to_it() {
    // Runs cost $0.021 (gpt-4o-mini); budget $1: 47× the p90.
    let jobs = batch("team-a", "small", "gpt-4o-mini", RUN, 5, 5, 0);
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    let high = of(&advice, RecommendationKind::BudgetTooHigh);
    assert!(high.summary.contains("from $1.00 to $0.05"), "2× $0.021 rounded up to the cent: {}", high.summary);
    assert!(high.evidence.contains("p90 $0.021") && high.evidence.contains("47× the p90"), "{}", high.evidence);
    assert_eq!(high.saving_per_run_usd, "0.00", "a lower budget saves no spend, it caps the risk");

    // $0.35 runs against a $0.40 budget: the p90 is 88% of it; one job was already rejected.
    let mut jobs: Vec<AgentJob> = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0).into_iter().map(|j| budget(j, "0.40")).collect();
    let mut rejected = budget(finished("team-a", "rejected", "scan", "gpt-4o", &[], true, 50), "0.30");
    let status = rejected.status.as_mut().unwrap();
    status.phase = Some(JobPhase::Rejected);
    status.usage = None;
    status.conditions.push(Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: "BudgetExceeded".into(),
        message: "".into(),
        observed_generation: None,
        last_transition_time: at(50),
    });
    jobs.push(rejected);
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    let tight = of(&advice, RecommendationKind::BudgetTooTight);
    assert!(tight.summary.contains("from $0.40 to $0.53"), "1.5× $0.35 rounded up: {}", tight.summary);
    assert!(tight.evidence.contains("88% of the budget") && tight.evidence.contains("1 job(s)"), "{}", tight.evidence);
    assert!(!kinds(&advice).contains(&RecommendationKind::BudgetTooHigh));

    // A budget in between: no budget advice.
    let jobs: Vec<AgentJob> = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0).into_iter().map(|j| budget(j, "1")).collect();
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    assert!(!kinds(&advice).iter().any(|k| matches!(k, RecommendationKind::BudgetTooHigh | RecommendationKind::BudgetTooTight)));
}

#[test]
fn retries_burning_a_large_share_of_the_spend() {
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0);
    // Two jobs needed a second attempt; their first attempts failed the same way and cost $0.35 each.
    for job in jobs.iter_mut().take(2) {
        let status = job.status.as_mut().unwrap();
        let one = priced(&[("gpt-4o", RUN)]);
        status.attempts.insert(0, attempt(1, AttemptResult::Failed, one, "agent: OOMKilled"));
        status.usage = Some(Box::new(priced(&[("gpt-4o", RUN.add(&RUN))])));
    }
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    let retry = of(&advice, RecommendationKind::RetrySpend);
    assert_eq!((retry.saving_over_samples_usd.as_str(), retry.saving_per_run_usd.as_str()), ("0.70", "0.14"));
    assert!(retry.summary.contains("29% of its spend"), "$0.70 of $2.45: {}", retry.summary);
    assert!(retry.evidence.contains("2 of 7 attempts over 5 runs failed") && retry.evidence.contains("(2×): \"agent: OOMKilled\""));

    // One retry in five runs (1/6 of the spend) is below the line.
    let mut jobs = batch("team-a", "big", "gpt-4o", RUN, 5, 5, 0);
    let status = jobs[0].status.as_mut().unwrap();
    status.attempts.insert(0, attempt(1, AttemptResult::Failed, priced(&[("gpt-4o", RUN)]), "x"));
    status.usage = Some(Box::new(priced(&[("gpt-4o", RUN.add(&RUN))])));
    assert!(!kinds(&for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin())).contains(&RecommendationKind::RetrySpend));
}

#[test]
fn a_supporting_agent_whose_cost_dominates() {
    let researcher = tokens(200_000, 0, 20_000); // claude-opus-4: $3.00 + $1.50 = $4.50
    let jobs: Vec<AgentJob> = (0..5)
        .map(|i| {
            let mut job = finished(
                "team-a",
                &format!("j{i}"),
                "scan",
                "gpt-4o-mini",
                &[("gpt-4o-mini", RUN), ("claude-opus-4", researcher)],
                true,
                i,
            );
            job.spec.agents.supporting =
                vec![serde_json::from_value(json!({"name": "researcher", "image": "i", "model": "claude-opus-4"})).unwrap()];
            budget(job, "6")
        })
        .collect();
    let advice = for_job(&jobs[0], &refs(&jobs), &PriceTable::builtin());
    let support = of(&advice, RecommendationKind::SupportingAgentCost);
    assert!(support.summary.contains("supporting agent researcher (claude-opus-4) takes 100% of the spend"), "{}", support.summary);
    // The same 220k tokens at gpt-4o-mini's prices: $0.03 + $0.012 = $0.042 instead of $4.50.
    assert_eq!(support.saving_per_run_usd, "4.458");
    assert!(support.evidence.contains("researcher spent $22.50 of $22.605"), "{}", support.evidence);
    assert_eq!(advice[0].kind, RecommendationKind::SupportingAgentCost, "largest saving first: {advice:#?}");

    // When the supporting agent shares its model with the primary its usage cannot be told apart.
    let shared: Vec<AgentJob> = jobs
        .iter()
        .cloned()
        .map(|mut j| {
            j.spec.agents.primary.model = "claude-opus-4".into();
            j
        })
        .collect();
    assert!(!kinds(&for_job(&shared[0], &refs(&shared), &PriceTable::builtin())).contains(&RecommendationKind::SupportingAgentCost));
}

#[test]
fn advice_is_bounded_and_only_the_newest_runs_count() {
    let mut jobs = batch("team-a", "old", "gpt-4o", RUN, MAX_SAMPLES, MAX_SAMPLES, 0);
    jobs.extend(batch("team-a", "new", "gpt-4o-mini", RUN, MAX_SAMPLES, MAX_SAMPLES, 10_000));
    jobs.push(finished("team-a", "latest", "scan", "gpt-4o", &[("gpt-4o", RUN)], true, 20_000));
    let advice = for_job(&jobs[jobs.len() - 1], &refs(&jobs), &PriceTable::builtin());
    // The newest 200 are one gpt-4o run and 199 gpt-4o-mini runs: too few gpt-4o runs to compare.
    assert!(!kinds(&advice).contains(&RecommendationKind::CheaperModel), "{advice:#?}");
    assert!(advice.len() <= MAX_RECOMMENDATIONS && advice.iter().all(|r| r.samples as usize <= MAX_SAMPLES));
    for r in &advice {
        assert!(r.summary.len() <= MAX_SUMMARY + 3 && r.evidence.len() <= MAX_EVIDENCE + 3, "{r:#?}");
    }
    let report = for_namespace("team-a", &refs(&jobs), Some("scan"), &PriceTable::builtin());
    assert_eq!((report[0].reference_job.as_str(), report[0].finished_jobs), ("latest", MAX_SAMPLES));
    assert!(for_namespace("team-a", &refs(&jobs), Some("other"), &PriceTable::builtin()).is_empty());
}
