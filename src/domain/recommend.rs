//! Cost advice from the cluster's own finished jobs: what a jobType's runs in one namespace cost,
//! with which model, how often they succeeded and what their attempts spent. Nothing is assumed
//! about a model the namespace has not run, and no advice is given on fewer than [`MIN_SAMPLES`]
//! finished jobs: each recommendation names the jobs' figures it rests on.
//!
//! Pure: the operator calls [`for_job`] with its watch cache's jobs when a job finishes and stores
//! the result in that same status write (controller/recommendations.rs); `kubectl agentgate
//! recommend` calls [`for_namespace`] with the jobs it listed.

use std::collections::BTreeMap;

use super::decide::{OUTPUT_MISMATCH, job_type};
use super::money::MicroUsd;
use super::pricing::{PriceTable, TokenCounts};
use super::validate::bounded_to;
use crate::api::{AgentJob, AttemptResult, JobPhase, Recommendation, RecommendationKind};

/// Fewest finished jobs any advice rests on; a comparison of models needs this many of each.
pub const MIN_SAMPLES: usize = 5;
/// Only the newest finished jobs of a jobType count: older ones ran on other prices and prompts,
/// and the work per finishing job stays bounded.
pub const MAX_SAMPLES: usize = 200;
/// At most this many recommendations per job, largest saving first (the CRD's bound too).
pub const MAX_RECOMMENDATIONS: usize = 5;
/// A model is worth switching to when its runs cost at most this share of the current one's.
const CHEAPER_AT_MOST_PERCENT: i64 = 80;
/// Outcomes are comparable when the cheaper model's success and valid-output rates are at most
/// this many percentage points lower.
const OUTCOME_TOLERANCE_POINTS: f64 = 5.0;
/// Below this share of input read from cache, a caching provider's discount goes unused.
const CACHE_NEAR_ZERO: f64 = 0.05;
/// The saving of caching is stated for this share of input read from cache (a stable system
/// prompt and tool list usually make up at least half of an agent's input).
const CACHE_TARGET_SHARE_PERCENT: i64 = 50;
/// A budget this many times the p90 actual cost is far above what runs need.
const BUDGET_FAR_ABOVE_P90: i64 = 10;
/// A p90 actual cost at or above this share of the budget makes rejections likely.
const BUDGET_NEAR_PERCENT: i64 = 80;
/// Failed attempts taking at least this share of the spend are worth fixing.
const RETRY_SHARE_PERCENT: i64 = 25;
/// A supporting agent taking at least this share of the spend dominates it.
const SUPPORTING_DOMINATES_PERCENT: i64 = 50;
const MAX_SUMMARY: usize = 500;
const MAX_EVIDENCE: usize = 1000;

/// One finished job, as the advice reads it.
struct Run<'a> {
    primary_model: &'a str,
    succeeded: bool,
    output_invalid: bool,
    cost: MicroUsd,
    /// Tokens and cost per model, over every attempt.
    models: BTreeMap<&'a str, (TokenCounts, MicroUsd)>,
    attempts: Vec<(AttemptResult, MicroUsd, Option<&'a str>)>,
    job: &'a AgentJob,
}

fn usd(text: &str) -> MicroUsd {
    MicroUsd::parse(text).unwrap_or_default()
}

fn finished(job: &AgentJob) -> bool {
    matches!(job.status.as_ref().and_then(|s| s.phase), Some(JobPhase::Succeeded | JobPhase::Failed))
}

fn completed_at(job: &AgentJob) -> Option<i64> {
    job.status.as_ref()?.completion_time.as_ref().map(|t| t.0.as_second())
}

/// The finished jobs of `job_type` in `namespace` that reported usage, newest first, at most
/// [`MAX_SAMPLES`]. Jobs of any other namespace are never read, whatever the caller passed.
fn runs<'a>(namespace: &str, job_type_: &str, jobs: &[&'a AgentJob]) -> Vec<Run<'a>> {
    let mut mine: Vec<&AgentJob> = jobs
        .iter()
        .copied()
        .filter(|j| j.metadata.namespace.as_deref() == Some(namespace) && finished(j) && job_type(j) == job_type_)
        .filter(|j| j.status.as_ref().is_some_and(|s| s.usage.is_some()))
        .collect();
    mine.sort_by(|a, b| completed_at(b).cmp(&completed_at(a)).then_with(|| a.metadata.name.cmp(&b.metadata.name)));
    mine.truncate(MAX_SAMPLES);
    mine.into_iter()
        .map(|job| {
            let status = job.status.as_ref().expect("filtered on status");
            let usage = status.usage.as_ref().expect("filtered on usage");
            let models = usage
                .models
                .iter()
                .map(|m| {
                    let tokens = super::report::model_tokens(m);
                    (m.model.as_str(), (tokens, usd(&m.cost_usd)))
                })
                .collect();
            let attempts = status
                .attempts
                .iter()
                .map(|a| (a.result, a.usage.as_ref().map_or(MicroUsd(0), |u| usd(&u.cost_usd)), a.message.as_deref()))
                .collect::<Vec<_>>();
            Run {
                primary_model: &job.spec.agents.primary.model,
                succeeded: status.phase == Some(JobPhase::Succeeded),
                output_invalid: attempts.iter().any(|(_, _, m)| m.is_some_and(|m| m.starts_with(OUTPUT_MISMATCH))),
                cost: usd(&usage.cost_usd),
                models,
                attempts,
                job,
            }
        })
        .collect()
}

/// Advice on `reference`'s configuration (its models, budget and agents), from the finished
/// jobs of its jobType in its namespace among `jobs` (which may hold anything: others are
/// skipped). `reference` is usually one of them, with its final status.
pub fn for_job(reference: &AgentJob, jobs: &[&AgentJob], prices: &PriceTable) -> Vec<Recommendation> {
    let Some(namespace) = reference.metadata.namespace.as_deref() else { return Vec::new() };
    let type_ = job_type(reference);
    let runs = runs(namespace, &type_, jobs);
    if runs.len() < MIN_SAMPLES {
        return Vec::new();
    }
    let rejected_for_budget = jobs
        .iter()
        .filter(|j| j.metadata.namespace.as_deref() == Some(namespace) && job_type(j) == type_)
        .filter(|j| {
            j.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| c.type_ == "Ready" && matches!(c.reason.as_str(), "BudgetExceeded" | "BudgetExhausted"))
            })
        })
        .count();
    let mut advice: Vec<Recommendation> =
        [cheaper_model(reference, &type_, &runs), budget(reference, &type_, &runs, rejected_for_budget), retry_spend(&type_, &runs)]
            .into_iter()
            .flatten()
            .chain(prompt_cache(reference, &type_, &runs, prices))
            .chain(supporting_agents(reference, &type_, &runs, prices))
            .collect();
    advice.sort_by(|a, b| usd(&b.saving_over_samples_usd).cmp(&usd(&a.saving_over_samples_usd)).then(a.kind.cmp(&b.kind)));
    advice.truncate(MAX_RECOMMENDATIONS);
    advice
}

/// The advice of one jobType, as `kubectl agentgate recommend` reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobTypeAdvice {
    pub job_type: String,
    /// Finished jobs of the jobType with usage (at most [`MAX_SAMPLES`] counted).
    pub finished_jobs: usize,
    /// The newest of them, whose configuration the advice is about.
    pub reference_job: String,
    pub recommendations: Vec<Recommendation>,
}

/// Advice for every jobType (or only `only`) with finished jobs in `namespace`, each about the
/// configuration of its newest finished job.
pub fn for_namespace(namespace: &str, jobs: &[&AgentJob], only: Option<&str>, prices: &PriceTable) -> Vec<JobTypeAdvice> {
    let mut newest: BTreeMap<String, (&AgentJob, usize)> = BTreeMap::new();
    for job in jobs.iter().copied().filter(|j| j.metadata.namespace.as_deref() == Some(namespace) && finished(j)) {
        let type_ = job_type(job);
        if only.is_some_and(|o| o != type_) || job.status.as_ref().is_none_or(|s| s.usage.is_none()) {
            continue;
        }
        let entry = newest.entry(type_).or_insert((job, 0));
        entry.1 += 1;
        let key = |j: &AgentJob| (completed_at(j), j.metadata.name.clone());
        if key(job) > key(entry.0) {
            entry.0 = job;
        }
    }
    newest
        .into_iter()
        .map(|(job_type, (reference, count))| JobTypeAdvice {
            job_type,
            finished_jobs: count.min(MAX_SAMPLES),
            reference_job: reference.metadata.name.clone().unwrap_or_default(),
            recommendations: for_job(reference, jobs, prices),
        })
        .collect()
}

fn percent(part: i64, whole: i64) -> i64 {
    if whole <= 0 { 0 } else { ((i128::from(part) * 100 + i128::from(whole) / 2) / i128::from(whole)) as i64 }
}

fn mean(total: MicroUsd, n: usize) -> MicroUsd {
    MicroUsd(if n == 0 { 0 } else { total.0 / n as i64 })
}

fn recommendation(
    kind: RecommendationKind,
    summary: String,
    evidence: String,
    samples: usize,
    per_run: MicroUsd,
    over: MicroUsd,
) -> Recommendation {
    Recommendation {
        kind,
        summary: bounded_to(&summary, MAX_SUMMARY),
        evidence: bounded_to(&evidence, MAX_EVIDENCE),
        samples: samples as i64,
        saving_per_run_usd: MicroUsd(per_run.0.max(0)).to_string(),
        saving_over_samples_usd: MicroUsd(over.0.max(0)).to_string(),
    }
}

struct Outcomes {
    n: usize,
    succeeded: f64,
    valid_output: f64,
    mean_cost: MicroUsd,
}

fn outcomes(runs: &[&Run]) -> Outcomes {
    let n = runs.len().max(1) as f64;
    Outcomes {
        n: runs.len(),
        succeeded: 100.0 * runs.iter().filter(|r| r.succeeded).count() as f64 / n,
        valid_output: 100.0 * runs.iter().filter(|r| !r.output_invalid).count() as f64 / n,
        mean_cost: mean(runs.iter().map(|r| r.cost).sum(), runs.len()),
    }
}

fn describe(model: &str, o: &Outcomes) -> String {
    format!("{model}: {} runs, {:.0}% succeeded, {:.0}% valid output, mean ${} a run", o.n, o.succeeded, o.valid_output, o.mean_cost)
}

/// The cheapest other primary model of this jobType here whose runs did as well.
fn cheaper_model(reference: &AgentJob, type_: &str, runs: &[Run]) -> Option<Recommendation> {
    let mine = reference.spec.agents.primary.model.as_str();
    let mut by_model: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for run in runs {
        by_model.entry(run.primary_model).or_default().push(run);
    }
    let current = outcomes(by_model.get(mine)?);
    if current.n < MIN_SAMPLES {
        return None;
    }
    let (model, other) = by_model
        .iter()
        .filter(|(m, _)| **m != mine)
        .map(|(m, r)| (*m, outcomes(r)))
        .filter(|(_, o)| {
            o.n >= MIN_SAMPLES
                && i128::from(o.mean_cost.0) * 100 <= i128::from(current.mean_cost.0) * i128::from(CHEAPER_AT_MOST_PERCENT)
                && o.mean_cost < current.mean_cost
                && o.succeeded >= current.succeeded - OUTCOME_TOLERANCE_POINTS
                && o.valid_output >= current.valid_output - OUTCOME_TOLERANCE_POINTS
        })
        .min_by_key(|(m, o)| (o.mean_cost, m.to_string()))?;
    let per_run = MicroUsd(current.mean_cost.0 - other.mean_cost.0);
    Some(recommendation(
        RecommendationKind::CheaperModel,
        format!("use {model} instead of {mine} for the primary agent of {type_}: its runs here did as well for less"),
        format!("runs whose primary agent used {}; {}", describe(mine, &current), describe(model, &other)),
        current.n + other.n,
        per_run,
        MicroUsd(per_run.0.saturating_mul(current.n as i64)),
    ))
}

/// Models of the reference's agents whose provider discounts cached input, that read almost
/// none of it from cache.
fn prompt_cache(reference: &AgentJob, type_: &str, runs: &[Run], prices: &PriceTable) -> Vec<Recommendation> {
    let spec = &reference.spec.agents;
    let mut models: Vec<&str> = std::iter::once(&spec.primary).chain(&spec.supporting).map(|a| a.model.as_str()).collect();
    models.sort();
    models.dedup();
    models
        .into_iter()
        .filter_map(|model| {
            let price = prices.get(model)?;
            if price.cached_input_per_million >= price.input_per_million {
                return None; // no discount: caching saves nothing here
            }
            let using: Vec<&TokenCounts> = runs.iter().filter_map(|r| r.models.get(model).map(|(t, _)| t)).collect();
            if using.len() < MIN_SAMPLES {
                return None;
            }
            let (input, cached) =
                using.iter().fold((0i64, 0i64), |(i, c), t| (i.saturating_add(t.input), c.saturating_add(t.cached_input)));
            let all_input = input.saturating_add(cached);
            if all_input == 0 || (cached as f64) >= CACHE_NEAR_ZERO * all_input as f64 {
                return None;
            }
            let moved = (i128::from(all_input) * i128::from(CACHE_TARGET_SHARE_PERCENT) / 100 - i128::from(cached)) as i64;
            let over = MicroUsd(price.input_per_million.of(moved).0 - price.cached_input_per_million.of(moved).0);
            if over.0 <= 0 {
                return None;
            }
            Some(recommendation(
                RecommendationKind::PromptCache,
                format!(
                    "let {model} cache the prompt of {type_} (a stable prefix first: system prompt, tools, then the task): \
                     its provider bills cached input at ${}/M instead of ${}/M",
                    price.cached_input_per_million.0, price.input_per_million.0
                ),
                format!(
                    "{} runs used {model}: {cached} of {all_input} input tokens ({:.1}%) were read from cache; \
                     with {CACHE_TARGET_SHARE_PERCENT}% read from cache they would have cost ${over} less",
                    using.len(),
                    100.0 * cached as f64 / all_input as f64
                ),
                using.len(),
                mean(over, using.len()),
                over,
            ))
        })
        .collect()
}

/// Nearest-rank p90 of the succeeded runs' cost.
fn cost_percentiles(runs: &[Run]) -> Option<(usize, MicroUsd, MicroUsd, MicroUsd)> {
    let mut costs: Vec<MicroUsd> = runs.iter().filter(|r| r.succeeded).map(|r| r.cost).collect();
    if costs.len() < MIN_SAMPLES {
        return None;
    }
    costs.sort();
    let rank = |p: usize| costs[(costs.len() * p).div_ceil(100).max(1) - 1];
    Some((costs.len(), rank(50), rank(90), *costs.last().expect("not empty")))
}

/// Rounded up to the cent: what a budget is written as.
fn to_cents_up(v: i128) -> MicroUsd {
    MicroUsd(i64::try_from((v.max(0) + 9_999) / 10_000 * 10_000).unwrap_or(i64::MAX))
}

fn budget(reference: &AgentJob, type_: &str, runs: &[Run], rejected: usize) -> Option<Recommendation> {
    let budget = MicroUsd::parse(&reference.spec.budget.max_cost_usd)?;
    let (n, p50, p90, max) = cost_percentiles(runs)?;
    let figures = format!("{n} succeeded runs of {type_}: p50 ${p50}, p90 ${p90}, max ${max}");
    if p90.0 > 0 && i128::from(budget.0) >= i128::from(p90.0) * i128::from(BUDGET_FAR_ABOVE_P90) {
        let suggested = to_cents_up(i128::from(p90.0) * 2).max(to_cents_up(i128::from(max.0)));
        return Some(recommendation(
            RecommendationKind::BudgetTooHigh,
            format!("lower spec.budget.maxCostUSD of {type_} from ${budget} to ${suggested} (2× the p90): a runaway run is stopped sooner"),
            format!(
                "{figures}; the budget ${budget} is {}× the p90, so a run gone wrong may spend ${} more than any run needed",
                budget.0 / p90.0,
                MicroUsd(budget.0 - suggested.0)
            ),
            n,
            MicroUsd(0),
            MicroUsd(0),
        ));
    }
    if i128::from(p90.0) * 100 >= i128::from(budget.0) * i128::from(BUDGET_NEAR_PERCENT) {
        let suggested = to_cents_up(i128::from(p90.0) * 3 / 2);
        return Some(recommendation(
            RecommendationKind::BudgetTooTight,
            format!(
                "raise spec.budget.maxCostUSD of {type_} from ${budget} to ${suggested}, or make runs cheaper: estimates learn the \
                 p90 and a p90 over the budget rejects the job (BudgetExceeded)"
            ),
            format!(
                "{figures}; the p90 is {}% of the budget ${budget}; {rejected} job(s) of {type_} here were already rejected or \
                 stopped for budget",
                percent(p90.0, budget.0)
            ),
            n,
            MicroUsd(0),
            MicroUsd(0),
        ));
    }
    None
}

fn retry_spend(type_: &str, runs: &[Run]) -> Option<Recommendation> {
    let total: MicroUsd = runs.iter().map(|r| r.cost).sum();
    let failed: Vec<&(AttemptResult, MicroUsd, Option<&str>)> =
        runs.iter().flat_map(|r| &r.attempts).filter(|(result, _, _)| *result == AttemptResult::Failed).collect();
    let failed_cost: MicroUsd = failed.iter().map(|(_, c, _)| *c).sum();
    if total.0 <= 0 || i128::from(failed_cost.0) * 100 < i128::from(total.0) * i128::from(RETRY_SHARE_PERCENT) {
        return None;
    }
    let attempts: usize = runs.iter().map(|r| r.attempts.len()).sum();
    let mut causes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, message) in &failed {
        *causes.entry(bounded_to(message.unwrap_or("no message"), 160)).or_default() += 1;
    }
    let (cause, count) = causes.iter().max_by_key(|(m, c)| (**c, std::cmp::Reverse((*m).clone())))?;
    Some(recommendation(
        RecommendationKind::RetrySpend,
        format!(
            "fix what makes attempts of {type_} fail (or lower spec.limits.maxRetries): {}% of its spend went to failed attempts",
            percent(failed_cost.0, total.0)
        ),
        format!(
            "{} of {attempts} attempts over {} runs failed, costing ${failed_cost} of ${total}; most common failure ({count}×): {cause:?}",
            failed.len(),
            runs.len()
        ),
        runs.len(),
        mean(failed_cost, runs.len()),
        failed_cost,
    ))
}

/// Supporting agents of the reference whose model (used by no other agent of the job, so its
/// usage is theirs alone) takes most of the spend.
fn supporting_agents(reference: &AgentJob, type_: &str, runs: &[Run], prices: &PriceTable) -> Vec<Recommendation> {
    let agents = &reference.spec.agents;
    let primary_model = agents.primary.model.as_str();
    agents
        .supporting
        .iter()
        .filter_map(|agent| {
            let model = agent.model.as_str();
            // Runs where this agent ran alone on its model: its share of their spend is exact.
            let alone: Vec<(&Run, &(TokenCounts, MicroUsd))> = runs
                .iter()
                .filter(|r| {
                    let a = &r.job.spec.agents;
                    let all = || std::iter::once(&a.primary).chain(&a.supporting);
                    all().any(|s| s.name == agent.name && s.model == model) && all().filter(|s| s.model == model).count() == 1
                })
                .filter_map(|r| r.models.get(model).map(|u| (r, u)))
                .collect();
            if alone.len() < MIN_SAMPLES {
                return None;
            }
            let agent_cost: MicroUsd = alone.iter().map(|(_, (_, c))| *c).sum();
            let total: MicroUsd = alone.iter().map(|(r, _)| r.cost).sum();
            if total.0 <= 0 || i128::from(agent_cost.0) * 100 < i128::from(total.0) * i128::from(SUPPORTING_DOMINATES_PERCENT) {
                return None;
            }
            let tokens = alone.iter().fold(TokenCounts::default(), |sum, (_, (t, _))| sum.add(t));
            let repriced = prices.get(primary_model).filter(|_| primary_model != model).map(|p| p.cost(&tokens));
            let over = repriced.map_or(MicroUsd(0), |r| MicroUsd((agent_cost.0 - r.0).max(0)));
            let how = if over.0 > 0 {
                format!("at the primary's model {primary_model}'s prices the same tokens would have cost ${over} less")
            } else {
                "no model of this job is cheaper for it: give it less to read or write".into()
            };
            Some(recommendation(
                RecommendationKind::SupportingAgentCost,
                format!(
                    "supporting agent {} ({model}) takes {}% of the spend of {type_}: give it a cheaper model or less work",
                    agent.name,
                    percent(agent_cost.0, total.0)
                ),
                format!("{} runs: {} spent ${agent_cost} of ${total} ({} tokens); {how}", alone.len(), agent.name, tokens.total()),
                alone.len(),
                mean(over, alone.len()),
                over,
            ))
        })
        .collect()
}

#[cfg(test)]
#[path = "recommend_tests.rs"]
mod tests;
