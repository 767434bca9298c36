//! Cost and token estimate of a job before it runs: a p50 and a p90, never a single number.
//!
//! Agent workloads are heavy-tailed (the same task can vary 30x in tokens between runs), so the
//! estimator works in log space. For each model a job uses:
//!
//! * **prior**: `agents_on_model * PER_AGENT + (tool calls attributed to it) * PER_TOOL_CALL`
//!   tokens as the median, and `p90 = PRIOR_P90_RATIO * p50`.
//! * **history** of the same jobType, as learned by [`super::learning`]: `location`, how far
//!   (in ln) the type's runs are from their prior, and the calibrated offset `q90 * spread`
//!   (ln of p90/p50). Learning the ratio to the prior rather than raw tokens keeps what the spec
//!   says: a job declaring 40 tool calls is forecast above one of its type declaring 10.
//! * **blend**: `w = n / (n + PRIOR_WEIGHT)` with `n` the samples ever recorded (not the decayed
//!   weight, so the prior's pull vanishes instead of biasing every later forecast);
//!   `ln p50 = ln prior + w * location` (the prior is location 0) and
//!   `ln p90 = ln p50 + w * q90 * spread + (1 - w) * ln PRIOR_P90_RATIO`.
//!   The prior is a guess from the spec, often off by 10× for a new workload, so one real run
//!   already outweighs it (PRIOR_WEIGHT is one half).
//!
//! Token totals split into input, cached input and output by the history's mix (or the prior's
//! 80/20), and each part is priced with the model's integer price, so cached tokens cost less and
//! no float reaches a dollar figure. The job's p50 and p90 are the sums over its models (the
//! models of one job move together: a hard task is hard for every agent).
//!
//! `samples` is the number of attempts recorded for the jobType; the method is `prior` with
//! none, `blend` with a few, `history` from [`HISTORY_ONLY_SAMPLES`] on.

use std::collections::{BTreeMap, BTreeSet};

use super::learning::JobTypeStats;
use super::money::MicroUsd;
use super::pricing::{PriceTable, TokenCounts};

pub const PER_AGENT: TokenCounts = TokenCounts { input: 6_000, cached_input: 0, output: 1_500 };
pub const PER_TOOL_CALL: TokenCounts = TokenCounts { input: 2_000, cached_input: 0, output: 400 };
pub const PRIOR_P90_RATIO: f64 = 3.0;
/// Effective samples at which history and prior have an equal say.
const PRIOR_WEIGHT: f64 = 0.5;
/// From this many samples on the estimate is called `history` rather than `blend`.
const HISTORY_ONLY_SAMPLES: usize = 10;

/// What the estimator needs to know about a job.
#[derive(Clone, Debug, PartialEq)]
pub struct EstimateInput {
    pub job_type: String,
    /// Model of each agent, primary first.
    pub agent_models: Vec<String>,
    /// Estimated calls of each tool the job names.
    pub tool_calls: Vec<i64>,
}

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
    let prior_offset = PRIOR_P90_RATIO.ln();
    let mut forecasts = Vec::new();
    for (model, prior) in prior_tokens(input) {
        let prior_ln = (prior.total() as f64).ln();
        let learned = stats.and_then(|s| s.models.get(&model)).filter(|m| m.n > 0 && m.weight > 0.0);
        let (mu, offset, mix) = match learned {
            None => (prior_ln, prior_offset, prior),
            Some(m) => {
                let w = m.n as f64 / (m.n as f64 + PRIOR_WEIGHT);
                (prior_ln + w * m.location, w * m.p90_offset() + (1.0 - w) * prior_offset, m.mix())
            }
        };
        forecasts.push(model_forecast(model, mu, offset, &mix, prices));
    }
    Ok(total(forecasts, stats.map_or(0, |s| s.n as usize)))
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

/// Prior token medians per model: every agent costs PER_AGENT, tool calls are shared evenly
/// between the agents (the remainder goes to the primary, which drives the run).
pub fn prior_tokens(input: &EstimateInput) -> BTreeMap<String, TokenCounts> {
    let calls: i64 = input.tool_calls.iter().sum();
    let agents = input.agent_models.len().max(1) as i64;
    let mut per_model: BTreeMap<String, TokenCounts> = BTreeMap::new();
    for (i, model) in input.agent_models.iter().enumerate() {
        let my_calls = calls / agents + if i == 0 { calls % agents } else { 0 };
        let tokens =
            PER_AGENT.add(&TokenCounts { input: PER_TOOL_CALL.input * my_calls, cached_input: 0, output: PER_TOOL_CALL.output * my_calls });
        let entry = per_model.entry(model.clone()).or_default();
        *entry = entry.add(&tokens);
    }
    per_model
}

/// Splits a token total into input, cached input and output in the proportions of `mix`.
fn split_like(total: f64, mix: &TokenCounts) -> TokenCounts {
    let whole = mix.total().max(1) as f64;
    let input = (total * mix.input as f64 / whole).round() as i64;
    let cached_input = (total * mix.cached_input as f64 / whole).round() as i64;
    TokenCounts { input, cached_input, output: (total.round() as i64 - input - cached_input).max(0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::learning::EstimatorState;
    use crate::domain::money::MicroUsd;

    fn input(models: &[&str], calls: &[i64]) -> EstimateInput {
        EstimateInput { job_type: "scan".into(), agent_models: models.iter().map(|m| m.to_string()).collect(), tool_calls: calls.to_vec() }
    }

    fn learned(samples: &[(&str, TokenCounts)]) -> EstimatorState {
        let mut state = EstimatorState::default();
        for (i, (model, tokens)) in samples.iter().enumerate() {
            let prior = prior_tokens(&input(&[model], &[]));
            assert!(state.record(&format!("u/{i}"), "scan", &[(model.to_string(), *tokens)].into(), &prior));
        }
        state
    }

    fn tokens(input: i64, output: i64) -> TokenCounts {
        TokenCounts { input, cached_input: 0, output }
    }

    #[test]
    fn prior_counts_agents_and_tool_calls() {
        let f = estimate(&input(&["gpt-4o-mini"], &[5, 2]), None, &PriceTable::builtin()).unwrap();
        assert_eq!((f.method, f.samples), ("prior", 0));
        assert_eq!(f.tokens_p50, 7_500 + 7 * 2_400);
        assert_eq!(f.tokens_p90, 3 * f.tokens_p50);
        // 20_000 input at 0.15 + 4_300 output at 0.60 per million
        assert_eq!(f.cost_p50, MicroUsd(20_000 * 15 / 100 + 4_300 * 60 / 100));
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
    fn history_pulls_the_median_towards_observed_usage() {
        let state = learned(&[("gpt-4o-mini", tokens(80_000, 20_000)); 20]);
        let f = estimate(&input(&["gpt-4o-mini"], &[]), state.stats("scan"), &PriceTable::builtin()).unwrap();
        assert_eq!((f.method, f.samples), ("history", 20));
        // after 20 samples the prior (7,500) keeps 2.4 % of the say in log space
        assert!(f.tokens_p50 > 90_000 && f.tokens_p50 < 100_000, "p50 {}", f.tokens_p50);
        assert!(f.tokens_p90 > f.tokens_p50);
    }

    #[test]
    fn one_sample_outweighs_the_prior_two_to_one() {
        let state = learned(&[("gpt-4o-mini", tokens(80_000, 20_000))]);
        let f = estimate(&input(&["gpt-4o-mini"], &[]), state.stats("scan"), &PriceTable::builtin()).unwrap();
        assert_eq!((f.method, f.samples), ("blend", 1));
        let want = ((2.0 * 100_000f64.ln() + 7_500f64.ln()) / 3.0).exp().round() as i64;
        assert!(f.tokens_p50.abs_diff(want) <= 1, "{} vs {want}", f.tokens_p50);
        assert!((f.tokens_p90 as f64 / f.tokens_p50 as f64 - 3.0).abs() < 1e-3, "the spread is still the prior's: {f:?}");
    }

    #[test]
    fn cached_tokens_in_history_lower_the_cost() {
        let prices = PriceTable::builtin();
        let uncached = learned(&[("gpt-4o", tokens(90_000, 10_000)); 10]);
        let cached = learned(&[("gpt-4o", TokenCounts { input: 10_000, cached_input: 80_000, output: 10_000 }); 10]);
        let a = estimate(&input(&["gpt-4o"], &[]), uncached.stats("scan"), &prices).unwrap();
        let b = estimate(&input(&["gpt-4o"], &[]), cached.stats("scan"), &prices).unwrap();
        assert_eq!(a.tokens_p50, b.tokens_p50);
        assert!(b.cost_p50 < a.cost_p50);
    }

    #[test]
    fn history_keeps_what_the_spec_says() {
        // Runs without tools used 4x their prior: a run declaring 10 tool calls has a larger prior,
        // and its forecast is 4x that, not the tool-less runs' usage.
        let state = learned(&[("gpt-4o", tokens(24_000, 6_000)); 20]);
        let plain = estimate(&input(&["gpt-4o"], &[]), state.stats("scan"), &PriceTable::builtin()).unwrap();
        let bigger = estimate(&input(&["gpt-4o"], &[10]), state.stats("scan"), &PriceTable::builtin()).unwrap();
        let prior_ratio = (7_500.0 + 10.0 * 2_400.0) / 7_500.0;
        let ratio = bigger.tokens_p50 as f64 / plain.tokens_p50 as f64;
        assert!((ratio - prior_ratio).abs() < 0.01, "{ratio} vs {prior_ratio}");
    }

    #[test]
    fn a_steady_workload_narrows_the_range() {
        let steady: Vec<(&str, TokenCounts)> = (0..40).map(|i| ("gpt-4o", tokens(90_000 + (i % 5) * 1_000, 10_000))).collect();
        let state = learned(&steady);
        let f = estimate(&input(&["gpt-4o"], &[]), state.stats("scan"), &PriceTable::builtin()).unwrap();
        let ratio = f.tokens_p90 as f64 / f.tokens_p50 as f64;
        assert!(ratio < 1.6, "p90/p50 {ratio} after 40 runs within 5 % of each other");
    }
}
