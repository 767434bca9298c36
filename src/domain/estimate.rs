//! Cost and token estimate of a job before it runs: a p50 and a p90, never a single number.
//!
//! Agent workloads are heavy-tailed (the same task can vary 30x in tokens between runs), so the
//! estimator works in log space. For each model a job uses:
//!
//! * **prior**: `agents_on_model * PER_AGENT + (tool calls attributed to it) * PER_TOOL_CALL`
//!   tokens ([`prior_tokens`]). It is the spec's own size signal (agents, declared calls): how
//!   much usage follows it is learned (see [`super::forecasters`]), not assumed.
//! * **history** of the job's (namespace, jobType, model), as learned by [`super::learning`]:
//!   several location forecasters weighed by their recent errors give `ln p50`, and a calibrated
//!   offset gives `ln p90 = ln p50 + offset`.
//! * **borrowed prior** while the key has few runs: the namespace's other models of the jobType,
//!   else the robust pool of the other namespaces, else the prior learned across jobTypes from their
//!   declared sizes ([`super::prior::Prior::across_job_types`]), else the spec
//!   ([`super::learning::Learned::locate`]). Its weight is `w/(n+w)` fading to zero at
//!   [`super::learning::POOL_RUNS`] own runs `n`, with `w` one run for what other namespaces or
//!   models learned and half a run for the spec's and the prior across jobTypes.
//!
//! Token totals split into input, cached input, cache writes and output by the history's mix (or the prior's
//! 80/20), and each part is priced with the model's integer price, so cached tokens cost less and
//! no float reaches a dollar figure. The job's p50 and p90 are the sums over its models (the
//! models of one job move together: a hard task is hard for every agent).
//!
//! `samples` is the number of attempts recorded for the job's key; the method is `prior` with
//! none and nothing to borrow, `pooled` with none but a borrowed prior, `blend` while the prior
//! still has a say, `history` from [`HISTORY_ONLY_SAMPLES`] on.

use std::collections::BTreeSet;

use super::learning::{JobTypeStats, POOL_RUNS};
use super::money::MicroUsd;
use super::pricing::{PriceTable, TokenCounts};
/// The spec's prior lives in [`super::prior`]; re-exported here, where callers look for it.
pub use super::prior::{EstimateInput, PER_AGENT, PER_TOOL_CALL, PRIOR_P90_RATIO, prior_tokens};

/// From this many samples on the estimate is called `history` rather than `blend`: the prior no
/// longer has a say.
const HISTORY_ONLY_SAMPLES: usize = POOL_RUNS as usize;

#[derive(Clone, Debug, PartialEq)]
pub struct ModelForecast {
    pub model: String,
    pub tokens_p50: i64,
    pub tokens_p90: i64,
    pub cost_p50: MicroUsd,
    pub cost_p90: MicroUsd,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Forecast {
    pub models: Vec<ModelForecast>,
    pub tokens_p50: i64,
    pub tokens_p90: i64,
    pub cost_p50: MicroUsd,
    pub cost_p90: MicroUsd,
    pub method: &'static str,
    pub samples: usize,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("no price for model(s) {}: add them to the price table", .0.join(", "))]
pub struct UnknownModels(pub Vec<String>);

/// The forecast of a job from its spec and what was learned of its jobType (see the module doc).
pub fn estimate(input: &EstimateInput, stats: Option<&JobTypeStats>, prices: &PriceTable) -> Result<Forecast, UnknownModels> {
    check_prices(input, prices)?;
    let mut forecasts = Vec::new();
    let mut borrowed = false;
    for (model, prior) in prior_tokens(input) {
        let (mu, offset, mix) = match stats {
            None => ((prior.total() as f64).ln(), PRIOR_P90_RATIO.ln(), prior),
            Some(learned) => {
                let located = learned.locate(&model, prior.total() as f64);
                borrowed |= located.prior.source != "spec";
                (located.mu, located.p90_offset, located.mix.unwrap_or(prior))
            }
        };
        forecasts.push(model_forecast(model, mu, offset, &mix, prices));
    }
    let samples = stats.map_or(0, |s| s.own.n as usize);
    let mut forecast = total(forecasts, samples);
    if samples == 0 && borrowed {
        forecast.method = "pooled";
    }
    Ok(forecast)
}

fn check_prices(input: &EstimateInput, prices: &PriceTable) -> Result<(), UnknownModels> {
    let models: BTreeSet<&str> = input.agent_models.iter().map(String::as_str).collect();
    let unknown: Vec<String> = models.iter().filter(|m| prices.get(m).is_none()).map(|m| m.to_string()).collect();
    if unknown.is_empty() { Ok(()) } else { Err(UnknownModels(unknown)) }
}

fn model_forecast(model: String, mu: f64, p90_offset: f64, mix: &TokenCounts, prices: &PriceTable) -> ModelForecast {
    let p50 = mu.exp();
    let p90 = (mu + p90_offset.max(0.0)).exp();
    let price = prices.get(&model).expect("unknown models were rejected above");
    ModelForecast {
        tokens_p50: p50.round() as i64,
        tokens_p90: p90.round() as i64,
        cost_p50: price.cost(&split_like(p50, mix)),
        cost_p90: price.cost(&split_like(p90, mix)),
        model,
    }
}

fn total(forecasts: Vec<ModelForecast>, samples: usize) -> Forecast {
    Forecast {
        tokens_p50: forecasts.iter().map(|f| f.tokens_p50).sum(),
        tokens_p90: forecasts.iter().map(|f| f.tokens_p90).sum(),
        cost_p50: forecasts.iter().map(|f| f.cost_p50).sum(),
        cost_p90: forecasts.iter().map(|f| f.cost_p90).sum(),
        models: forecasts,
        method: match samples {
            0 => "prior",
            n if n >= HISTORY_ONLY_SAMPLES => "history",
            _ => "blend",
        },
        samples,
    }
}

/// Splits a token total into the parts of `mix` (input, cached input, cache writes), in its
/// proportions; output takes the rest.
fn split_like(total: f64, mix: &TokenCounts) -> TokenCounts {
    let whole = mix.total().max(1) as f64;
    let part = |n: i64| (total * n as f64 / whole).round() as i64;
    let (input, cached_input, cache_write, cache_write_1h) =
        (part(mix.input), part(mix.cached_input), part(mix.cache_write), part(mix.cache_write_1h));
    let output = (total.round() as i64 - input - cached_input - cache_write - cache_write_1h).max(0);
    TokenCounts { input, cached_input, output, cache_write, cache_write_1h }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::learning::EstimatorState;
    use crate::domain::money::MicroUsd;

    fn input(models: &[&str], calls: &[i64]) -> EstimateInput {
        EstimateInput { job_type: "scan".into(), agent_models: models.iter().map(|m| m.to_string()).collect(), tool_calls: calls.to_vec() }
    }

    /// Runs of `scan` in namespace `ns`, each with its own declared calls.
    fn learn(state: &mut EstimatorState, ns: &str, runs: &[(&str, &[i64], TokenCounts)]) {
        for (model, calls, tokens) in runs {
            let prior = prior_tokens(&input(&[model], calls));
            let key = format!("{ns}/{}", state.clock);
            assert!(state.record(&key, ns, "scan", &[(model.to_string(), *tokens)].into(), &prior, &PriceTable::builtin()));
        }
    }

    fn learned(samples: &[(&str, TokenCounts)]) -> EstimatorState {
        let mut state = EstimatorState::default();
        let runs: Vec<(&str, &[i64], TokenCounts)> = samples.iter().map(|(m, t)| (*m, &[][..], *t)).collect();
        learn(&mut state, "ns", &runs);
        state
    }

    fn tokens(input: i64, output: i64) -> TokenCounts {
        TokenCounts { input, cached_input: 0, output, ..Default::default() }
    }

    fn forecast(state: &EstimatorState, ns: &str, models: &[&str], calls: &[i64]) -> Forecast {
        estimate(&input(models, calls), state.stats(ns, "scan").as_ref(), &PriceTable::builtin()).unwrap()
    }

    #[test]
    fn prior_counts_agents_and_tool_calls() {
        let f = estimate(&input(&["gpt-4o-mini"], &[5, 2]), None, &PriceTable::builtin()).unwrap();
        assert_eq!((f.method, f.samples), ("prior", 0));
        assert_eq!(f.tokens_p50, 7_500 + 7 * 2_400);
        assert_eq!(f.tokens_p90, 3 * f.tokens_p50);
        // 20_000 input at 0.15 + 4_300 output at 0.60 per million
        assert_eq!(f.cost_p50, MicroUsd(20_000 * 15 / 100 + 4_300 * 60 / 100));
        let empty = forecast(&EstimatorState::default(), "ns", &["gpt-4o-mini"], &[5, 2]);
        assert_eq!((empty.method, empty.tokens_p50, empty.tokens_p90), ("prior", f.tokens_p50, f.tokens_p90), "nothing learned: the spec");
    }

    #[test]
    fn two_models_get_separate_forecasts_and_sum() {
        let f = estimate(&input(&["gpt-4o-mini", "claude-sonnet-4"], &[3]), None, &PriceTable::builtin()).unwrap();
        assert_eq!(f.models.len(), 2);
        let primary = f.models.iter().find(|m| m.model == "gpt-4o-mini").unwrap();
        let support = f.models.iter().find(|m| m.model == "claude-sonnet-4").unwrap();
        assert_eq!(primary.tokens_p50, 7_500 + 2 * 2_400, "primary takes the remainder call");
        assert_eq!(support.tokens_p50, 7_500 + 2_400);
        assert_eq!(f.cost_p90, primary.cost_p90.saturating_add(support.cost_p90));
    }

    #[test]
    fn same_model_on_two_agents_is_one_forecast() {
        let f = estimate(&input(&["gpt-4o", "gpt-4o"], &[]), None, &PriceTable::builtin()).unwrap();
        assert_eq!(f.models.len(), 1);
        assert_eq!(f.tokens_p50, 15_000);
    }

    #[test]
    fn unknown_model_is_an_error_not_zero() {
        let err = estimate(&input(&["gpt-4o", "my-llm"], &[]), None, &PriceTable::builtin()).unwrap_err();
        assert_eq!(err.0, vec!["my-llm".to_string()]);
        assert!(err.to_string().contains("my-llm"));
    }

    #[test]
    fn history_takes_over_from_the_prior() {
        let state = learned(&[("gpt-4o-mini", tokens(80_000, 20_000)); 20]);
        let f = forecast(&state, "ns", &["gpt-4o-mini"], &[]);
        assert_eq!((f.method, f.samples), ("history", 20));
        assert!(f.tokens_p50.abs_diff(100_000) <= 10, "p50 {} (ln rounded to 1/10000)", f.tokens_p50);
        assert!(f.tokens_p90 > f.tokens_p50);
    }

    #[test]
    fn one_sample_outweighs_the_spec_prior() {
        let state = learned(&[("gpt-4o-mini", tokens(80_000, 20_000))]);
        let f = forecast(&state, "ns", &["gpt-4o-mini"], &[]);
        assert_eq!((f.method, f.samples), ("blend", 1));
        // The spec's prior is worth half a run: its weight is 0.5/(1+0.5) * (1 - 1/10) = 0.3.
        let want = (0.7 * 100_000f64.ln() + 0.3 * 7_500f64.ln()).exp();
        assert!((f.tokens_p50 as f64 / want - 1.0).abs() < 2e-3, "{} vs {want}", f.tokens_p50);
        // One run calibrates nothing yet: p90 = 3 x p50.
        assert!((f.tokens_p90 as f64 / f.tokens_p50 as f64 - 3.0).abs() < 1e-3, "{f:?}");
    }

    #[test]
    fn cached_tokens_in_history_lower_the_cost() {
        let uncached = learned(&[("gpt-4o", tokens(90_000, 10_000)); 10]);
        let cached = learned(&[("gpt-4o", TokenCounts { input: 10_000, cached_input: 80_000, output: 10_000, ..Default::default() }); 10]);
        let a = forecast(&uncached, "ns", &["gpt-4o"], &[]);
        let b = forecast(&cached, "ns", &["gpt-4o"], &[]);
        assert_eq!(a.tokens_p50, b.tokens_p50);
        assert!(b.cost_p50 < a.cost_p50);
    }

    /// The estimator learns the share of cache writes and prices it at the write rate, so a
    /// jobType that writes its cache a lot is estimated at what it costs.
    #[test]
    fn cache_writes_in_history_raise_the_cost() {
        let plain = learned(&[("claude-sonnet-4", tokens(90_000, 10_000)); 10]);
        let writes = TokenCounts { input: 10_000, cached_input: 0, output: 10_000, cache_write: 60_000, cache_write_1h: 20_000 };
        let writing = learned(&[("claude-sonnet-4", writes); 10]);
        let a = forecast(&plain, "ns", &["claude-sonnet-4"], &[]);
        let b = forecast(&writing, "ns", &["claude-sonnet-4"], &[]);
        assert_eq!(a.tokens_p50, b.tokens_p50);
        assert!(b.cost_p50 > a.cost_p50, "{} vs {}", b.cost_p50, a.cost_p50);
    }

    /// Runs declaring 2 to 32 calls: usage follows the calls (`elasticity` 1) or ignores them (0).
    fn sized_runs(elasticity: f64) -> EstimatorState {
        let mut state = EstimatorState::default();
        let calls: Vec<[i64; 1]> = (0..40).map(|i| [2i64 << (i % 5)]).collect();
        let runs: Vec<(&str, &[i64], TokenCounts)> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let prior = prior_tokens(&input(&["gpt-4o"], c))["gpt-4o"].total() as f64;
                let total = 4.0 * prior.powf(elasticity) * 30_000f64.powf(1.0 - elasticity) * (1.0 + 0.05 * (i % 3) as f64);
                ("gpt-4o", &c[..], tokens((total * 0.8) as i64, (total * 0.2) as i64))
            })
            .collect();
        learn(&mut state, "ns", &runs);
        state
    }

    #[test]
    fn the_elasticity_of_usage_to_declared_calls_is_learned() {
        let (small, big) =
            (prior_tokens(&input(&["gpt-4o"], &[2]))["gpt-4o"].total(), prior_tokens(&input(&["gpt-4o"], &[32]))["gpt-4o"].total());
        let prior_ratio = big as f64 / small as f64;
        let follows = sized_runs(1.0);
        let ratio =
            forecast(&follows, "ns", &["gpt-4o"], &[32]).tokens_p50 as f64 / forecast(&follows, "ns", &["gpt-4o"], &[2]).tokens_p50 as f64;
        assert!((ratio / prior_ratio - 1.0).abs() < 0.1, "usage follows the calls: {ratio} vs {prior_ratio}");
        let ignores = sized_runs(0.0);
        let ratio =
            forecast(&ignores, "ns", &["gpt-4o"], &[32]).tokens_p50 as f64 / forecast(&ignores, "ns", &["gpt-4o"], &[2]).tokens_p50 as f64;
        assert!(ratio < 1.3, "usage ignores the calls, so does the forecast: {ratio} (the spec's ratio is {prior_ratio})");
    }

    #[test]
    fn a_steady_workload_narrows_the_range() {
        let steady: Vec<(&str, TokenCounts)> = (0..150).map(|i| ("gpt-4o", tokens(90_000 + (i % 5) * 1_000, 10_000))).collect();
        let f = forecast(&learned(&steady), "ns", &["gpt-4o"], &[]);
        let ratio = f.tokens_p90 as f64 / f.tokens_p50 as f64;
        assert!(ratio < 1.4, "p90/p50 {ratio} after 150 runs within 5 % of each other");
    }

    #[test]
    fn one_namespaces_extreme_runs_count_for_nothing_in_another_namespaces_estimate() {
        let mut state = EstimatorState::default();
        let usual: Vec<(&str, &[i64], TokenCounts)> = (0..12).map(|i| ("gpt-4o", &[][..], tokens(80_000 + i * 1_000, 20_000))).collect();
        learn(&mut state, "team-a", &usual);
        learn(&mut state, "team-b", &usual);
        learn(&mut state, "team-c", &usual);
        let cold_before = forecast(&state, "team-new", &["gpt-4o"], &[]);
        assert_eq!(cold_before.method, "pooled");
        // What team-a would be told had team-b never run anything.
        let mut without_b = state.clone();
        without_b.job_types.get_mut("scan").unwrap().remove("team-b");
        let alone = forecast(&without_b, "team-a", &["gpt-4o"], &[]);
        // team-b drives its own estimate to the ground, then to the sky (50 runs each: more than
        // what is left of the other extreme in its 80-run window).
        let tiny: Vec<(&str, &[i64], TokenCounts)> = (0..50).map(|_| ("gpt-4o", &[][..], tokens(1, 1))).collect();
        let huge: Vec<(&str, &[i64], TokenCounts)> = (0..50).map(|_| ("gpt-4o", &[][..], tokens(1_000_000_000, 1))).collect();
        for extreme in [tiny, huge] {
            learn(&mut state, "team-b", &extreme);
            let b = forecast(&state, "team-b", &["gpt-4o"], &[]).tokens_p50;
            assert!(!(100..1_000_000_000).contains(&b), "team-b learns its own runs: {b}");
            assert_eq!(forecast(&state, "team-a", &["gpt-4o"], &[]), alone, "team-b's runs count for nothing in team-a's estimate");
            // A new namespace's prior is the median of three namespaces: team-b is one vote.
            let cold = forecast(&state, "team-new", &["gpt-4o"], &[]);
            assert!((cold.tokens_p50 as f64 / cold_before.tokens_p50 as f64 - 1.0).abs() < 0.02, "{cold:?} vs {cold_before:?}");
        }
    }

    #[test]
    fn one_sample_moves_a_warm_estimate_a_bounded_step() {
        let usual: Vec<(&str, TokenCounts)> = (0..30).map(|i| ("gpt-4o", tokens(80_000 + (i % 7) * 2_000, 20_000))).collect();
        let mut state = learned(&usual);
        let before = forecast(&state, "ns", &["gpt-4o"], &[]).tokens_p50 as f64;
        learn(&mut state, "ns", &[("gpt-4o", &[], tokens(i64::MAX / 4, 0))]);
        let after = forecast(&state, "ns", &["gpt-4o"], &[]).tokens_p50 as f64;
        assert!(after / before < 1.1, "a run 10^13 times the usual moved the p50 from {before} to {after}");
    }

    #[test]
    fn a_new_model_borrows_from_the_job_types_other_models() {
        let state = learned(&[("gpt-4o", tokens(400_000, 100_000)); 12]);
        let switched = forecast(&state, "ns", &["claude-sonnet-4"], &[]);
        assert_eq!((switched.method, switched.samples), ("history", 12), "the key has history, the model has none");
        assert!(switched.tokens_p50.abs_diff(500_000) < 1_000, "the namespace's other model's scale: {switched:?}");
    }
}
