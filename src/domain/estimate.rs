//! Cost and token estimate of a job before it runs: a p50 and a p90, never a single number.
//!
//! Agent workloads are heavy-tailed (the same task can vary 30x in tokens between runs), so the
//! estimator works in log space. For each model a job uses:
//!
//! * **prior**: `agents_on_model * PER_AGENT + (tool calls attributed to it) * PER_TOOL_CALL`
//!   tokens as the median, and `p90 = PRIOR_P90_RATIO * p50` (a log-normal with
//!   sigma = ln(3)/1.2816, the spread observed between repeated agent runs).
//! * **history** of the same jobType: per model, `mu = mean(ln total_tokens)` and
//!   `sigma = stdev(ln total_tokens)` (at least the prior's sigma while samples are few).
//! * **blend**: with `n` samples, `w = n / (n + PRIOR_WEIGHT)`; `ln p50 = w*mu + (1-w)*ln prior`,
//!   `sigma = w*sigma_hist + (1-w)*sigma_prior`, `p90 = p50 * exp(1.2816 * sigma)`.
//!
//! Token totals split into input, cached input and output by the history's mix (or the prior's
//! 80/20), and each part is priced with the model's price, so cached tokens cost less.
//!
//! [`estimate_with_stats`] does the same from the persisted statistics of
//! [`super::learning`] instead of raw samples: `mu` and `sigma` are their recency-weighted mean
//! and standard deviation of `ln total_tokens`, the history's weight uses the effective sample
//! size (`weight`, at most 10 with the decay) in place of `n`, the mix is the mean fractions,
//! and `samples` (which picks `blend` or `history`) is the number of attempts recorded.

use std::collections::{BTreeMap, BTreeSet};

use super::learning::JobTypeStats;
use super::money::MicroUsd;
use super::pricing::{PriceTable, TokenCounts};

pub const PER_AGENT: TokenCounts = TokenCounts { input: 6_000, cached_input: 0, output: 1_500 };
pub const PER_TOOL_CALL: TokenCounts = TokenCounts { input: 2_000, cached_input: 0, output: 400 };
pub const PRIOR_P90_RATIO: f64 = 3.0;
const Z90: f64 = 1.2815515655446004;
/// Samples needed before history outweighs the prior.
const PRIOR_WEIGHT: f64 = 2.0;
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

/// One finished run of a job type: tokens per model.
pub type UsageSample = BTreeMap<String, TokenCounts>;

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

pub fn estimate(input: &EstimateInput, history: &[UsageSample], prices: &PriceTable) -> Result<Forecast, UnknownModels> {
    check_prices(input, prices)?;
    let sigma_prior = PRIOR_P90_RATIO.ln() / Z90;
    let mut forecasts = Vec::new();
    for (model, prior) in prior_tokens(input) {
        let observed: Vec<&TokenCounts> = history.iter().filter_map(|s| s.get(&model)).filter(|t| t.total() > 0).collect();
        let (mu, sigma, mix) = if observed.is_empty() {
            ((prior.total() as f64).ln(), sigma_prior, prior)
        } else {
            let logs: Vec<f64> = observed.iter().map(|t| (t.total() as f64).ln()).collect();
            let mean = logs.iter().sum::<f64>() / logs.len() as f64;
            let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (logs.len().max(2) - 1) as f64;
            let mix = observed.iter().fold(TokenCounts::default(), |acc, t| acc.add(t));
            let (mu, sigma) = blend(observed.len() as f64, mean, var.sqrt(), &prior);
            (mu, sigma, mix)
        };
        forecasts.push(model_forecast(model, mu, sigma, &mix, prices));
    }
    Ok(total(forecasts, history.len()))
}

/// [`estimate`] from the learned statistics of the job's type (see the module doc).
pub fn estimate_with_stats(input: &EstimateInput, stats: Option<&JobTypeStats>, prices: &PriceTable) -> Result<Forecast, UnknownModels> {
    check_prices(input, prices)?;
    let sigma_prior = PRIOR_P90_RATIO.ln() / Z90;
    let mut forecasts = Vec::new();
    for (model, prior) in prior_tokens(input) {
        let learned = stats.and_then(|s| s.models.get(&model)).filter(|m| m.n > 0 && m.weight > 0.0);
        let (mu, sigma, mix) = match learned {
            None => ((prior.total() as f64).ln(), sigma_prior, prior),
            Some(m) => {
                let (mu, sigma) = blend(m.weight, m.mean_ln, m.var_ln.max(0.0).sqrt(), &prior);
                (mu, sigma, m.mix())
            }
        };
        forecasts.push(model_forecast(model, mu, sigma, &mix, prices));
    }
    Ok(total(forecasts, stats.map_or(0, |s| s.n as usize)))
}

fn check_prices(input: &EstimateInput, prices: &PriceTable) -> Result<(), UnknownModels> {
    let models: BTreeSet<&str> = input.agent_models.iter().map(String::as_str).collect();
    let unknown: Vec<String> = models.iter().filter(|m| prices.get(m).is_none()).map(|m| m.to_string()).collect();
    if unknown.is_empty() { Ok(()) } else { Err(UnknownModels(unknown)) }
}

/// `w = n / (n + PRIOR_WEIGHT)`; returns the blended `(ln p50, sigma)`.
fn blend(n: f64, mean: f64, sigma_hist: f64, prior: &TokenCounts) -> (f64, f64) {
    let sigma_prior = PRIOR_P90_RATIO.ln() / Z90;
    let w = n / (n + PRIOR_WEIGHT);
    let mu = w * mean + (1.0 - w) * (prior.total() as f64).ln();
    let sigma = w * sigma_hist.max(sigma_prior / 2.0) + (1.0 - w) * sigma_prior;
    (mu, sigma)
}

fn model_forecast(model: String, mu: f64, sigma: f64, mix: &TokenCounts, prices: &PriceTable) -> ModelForecast {
    let p50 = mu.exp();
    let p90 = (mu + Z90 * sigma).exp();
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
fn prior_tokens(input: &EstimateInput) -> BTreeMap<String, TokenCounts> {
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

    fn input(models: &[&str], calls: &[i64]) -> EstimateInput {
        EstimateInput { job_type: "scan".into(), agent_models: models.iter().map(|m| m.to_string()).collect(), tool_calls: calls.to_vec() }
    }

    fn sample(model: &str, input: i64, output: i64) -> UsageSample {
        [(model.to_string(), TokenCounts { input, cached_input: 0, output })].into()
    }

    #[test]
    fn prior_counts_agents_and_tool_calls() {
        let f = estimate(&input(&["gpt-4o-mini"], &[5, 2]), &[], &PriceTable::builtin()).unwrap();
        assert_eq!(f.method, "prior");
        assert_eq!(f.samples, 0);
        assert_eq!(f.tokens_p50, 7_500 + 7 * 2_400);
        assert_eq!(f.tokens_p90, 3 * f.tokens_p50);
        // 20_000 input at 0.15 + 4_300 output at 0.60 per million
        assert_eq!(f.cost_p50, MicroUsd(20_000 * 15 / 100 + 4_300 * 60 / 100));
    }

    #[test]
    fn two_models_get_separate_forecasts_and_sum() {
        let f = estimate(&input(&["gpt-4o-mini", "claude-sonnet-4"], &[3]), &[], &PriceTable::builtin()).unwrap();
        assert_eq!(f.models.len(), 2);
        let primary = f.models.iter().find(|m| m.model == "gpt-4o-mini").unwrap();
        let support = f.models.iter().find(|m| m.model == "claude-sonnet-4").unwrap();
        assert_eq!(primary.tokens_p50, 7_500 + 2 * 2_400, "primary takes the remainder call");
        assert_eq!(support.tokens_p50, 7_500 + 2_400);
        assert_eq!(f.cost_p90, primary.cost_p90.saturating_add(support.cost_p90));
    }

    #[test]
    fn same_model_on_two_agents_is_one_forecast() {
        let f = estimate(&input(&["gpt-4o", "gpt-4o"], &[]), &[], &PriceTable::builtin()).unwrap();
        assert_eq!(f.models.len(), 1);
        assert_eq!(f.tokens_p50, 15_000);
    }

    #[test]
    fn unknown_model_is_an_error_not_zero() {
        let err = estimate(&input(&["gpt-4o", "my-llm"], &[]), &[], &PriceTable::builtin()).unwrap_err();
        assert_eq!(err.0, vec!["my-llm".to_string()]);
        assert!(err.to_string().contains("my-llm"));
    }

    #[test]
    fn history_pulls_the_median_towards_observed_usage() {
        let history: Vec<UsageSample> = (0..20).map(|_| sample("gpt-4o-mini", 80_000, 20_000)).collect();
        let f = estimate(&input(&["gpt-4o-mini"], &[]), &history, &PriceTable::builtin()).unwrap();
        assert_eq!(f.method, "history");
        assert_eq!(f.samples, 20);
        assert!(f.tokens_p50 > 70_000 && f.tokens_p50 < 100_000, "p50 {}", f.tokens_p50);
        assert!(f.tokens_p90 > f.tokens_p50);
    }

    #[test]
    fn few_samples_blend_with_the_prior() {
        let history = vec![sample("gpt-4o-mini", 80_000, 20_000)];
        let f = estimate(&input(&["gpt-4o-mini"], &[]), &history, &PriceTable::builtin()).unwrap();
        assert_eq!(f.method, "blend");
        assert!(f.tokens_p50 > 7_500 && f.tokens_p50 < 100_000, "p50 {}", f.tokens_p50);
    }

    #[test]
    fn cached_tokens_in_history_lower_the_cost() {
        let prices = PriceTable::builtin();
        let uncached: Vec<UsageSample> = (0..10).map(|_| sample("gpt-4o", 90_000, 10_000)).collect();
        let cached: Vec<UsageSample> =
            (0..10).map(|_| [("gpt-4o".to_string(), TokenCounts { input: 10_000, cached_input: 80_000, output: 10_000 })].into()).collect();
        let a = estimate(&input(&["gpt-4o"], &[]), &uncached, &prices).unwrap();
        let b = estimate(&input(&["gpt-4o"], &[]), &cached, &prices).unwrap();
        assert_eq!(a.tokens_p50, b.tokens_p50);
        assert!(b.cost_p50 < a.cost_p50);
    }

    fn learned(samples: &[UsageSample]) -> crate::domain::learning::EstimatorState {
        let mut state = crate::domain::learning::EstimatorState::default();
        for (i, s) in samples.iter().enumerate() {
            assert!(state.record(&format!("u/{i}"), "scan", s));
        }
        state
    }

    #[test]
    fn stats_with_one_sample_match_the_sample_form() {
        let history = vec![sample("gpt-4o-mini", 80_000, 20_000)];
        let state = learned(&history);
        let a = estimate(&input(&["gpt-4o-mini"], &[]), &history, &PriceTable::builtin()).unwrap();
        let b = estimate_with_stats(&input(&["gpt-4o-mini"], &[]), state.stats("scan"), &PriceTable::builtin()).unwrap();
        assert_eq!((b.method, b.samples), ("blend", 1));
        assert_eq!(a.tokens_p50, b.tokens_p50);
        assert_eq!(a.tokens_p90, b.tokens_p90);
        assert!(a.cost_p50.0.abs_diff(b.cost_p50.0) <= 1);
    }

    #[test]
    fn stats_without_the_job_type_are_the_prior() {
        let a = estimate(&input(&["gpt-4o-mini"], &[5]), &[], &PriceTable::builtin()).unwrap();
        let b = estimate_with_stats(&input(&["gpt-4o-mini"], &[5]), None, &PriceTable::builtin()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn many_learned_samples_are_history() {
        let history: Vec<UsageSample> = (0..20).map(|_| sample("gpt-4o-mini", 80_000, 20_000)).collect();
        let state = learned(&history);
        let f = estimate_with_stats(&input(&["gpt-4o-mini"], &[]), state.stats("scan"), &PriceTable::builtin()).unwrap();
        assert_eq!((f.method, f.samples), ("history", 20));
        // the decayed weight stays below 10, so the prior keeps a sixth of the say
        assert!(f.tokens_p50 > 50_000 && f.tokens_p50 < 100_000, "p50 {}", f.tokens_p50);
    }
}
