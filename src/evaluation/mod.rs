//! Offline evaluation of the estimator: replay a trace of finished jobs in order, predicting
//! each from its spec alone before learning its actual usage, exactly as the operator does
//! between a job's admission and its end.
//!
//! The replay drives the operator's own [`estimate`] and [`EstimatorState::record`],
//! so what it measures is what a cluster would see. Next to it runs a naive reference, the one
//! a spreadsheet would give: the trailing median of the job type's last [`NAIVE_WINDOW`] costs
//! as p50 and three times that as p90. And a hindsight reference that no forecaster can be:
//! knowing each (namespace, jobType)'s whole trace in advance, its p50 is the median of the key's
//! costs, scaled by the job's declared size (the spec's prior) when that fits the key better in
//! hindsight, and its p90 the 90th percentile of the key's costs around that p50. It tells how
//! much of the error is the workload's own noise.
//!
//! Its cold-start figures are those of a *hindsight cold-start reference* ([`cold_oracle`]): a
//! forecaster that knows every other job type's level over the whole trace but not the new job
//! type's own. A job type's first record is forecast at the median of the other job types'
//! levels (in cost per token of the spec's guess, following the declared size with an elasticity
//! `b` of 0, 1 or the hindsight slope across job types, whichever does best); a (namespace,
//! jobType)'s first record at the median of the job type's other namespaces' levels (the
//! cross-jobType centre where it has none). What it cannot reach is bounded by the workload: how
//! far job types (or namespaces) differ in ways nothing in their specs tells.
//!
//! Figures (all over priced records, in replay order):
//! * `coverage_p90`: fraction of records whose actual cost is at most the predicted p90;
//! * `mdape_p50`: median of `|p50 - actual| / actual` (a fraction: 0.40 is 40 %);
//! * `mdape_p50_after_warmup`: the same over records whose job type had at least `warmup`
//!   earlier records;
//! * `cold_start_ratio`: median over each job type's first record of `max(actual/p50, p50/actual)`;
//!   (in the table only, `COLD_KEY`: the same over each (namespace, jobType)'s first record, where
//!   a known jobType meets a new namespace);
//! * `sharpness_p90`: median of `p90 / p50` (1.0 would be a point forecast).

pub mod families;
pub mod synthetic;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::domain::estimate::{EstimateInput, estimate, prior_tokens};
use crate::domain::forecasters;
use crate::domain::learning::EstimatorState;
use crate::domain::money::MicroUsd;
use crate::domain::pricing::{PriceTable, TokenCounts};

/// Costs the naive reference's median looks back over.
pub const NAIVE_WINDOW: usize = 60;
/// The naive reference's p90 as a multiple of its p50.
pub const NAIVE_P90_FACTOR: f64 = 3.0;

/// One finished job: its spec as submitted and the usage it reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// An AgentJob spec. Only what the estimator reads is required: `agents` with models;
    /// `jobType`, `category` and `tools[].estimatedCalls` when present.
    pub spec: serde_json::Value,
    pub usage: Vec<TraceUsage>,
}

/// Tokens of one model, in the agents' termination-message format: `inputTokens` excludes the
/// cached input tokens, which are counted (and priced) separately.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceUsage {
    pub model: String,
    pub input_tokens: i64,
    #[serde(default)]
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    /// Prompt-cache writes (5-minute, 1-hour TTL); absent in traces written before: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_input_tokens: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_1h_input_tokens: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// What the estimator reads from a spec, without requiring a complete, valid AgentJob.
pub fn estimate_input(spec: &serde_json::Value) -> Result<EstimateInput, String> {
    let agents = spec.get("agents").ok_or("spec.agents is missing")?;
    let model = |agent: &serde_json::Value, at: &str| {
        agent.get("model").and_then(|m| m.as_str()).map(str::to_string).ok_or_else(|| format!("{at}.model is missing"))
    };
    let mut agent_models = vec![model(agents.get("primary").ok_or("spec.agents.primary is missing")?, "spec.agents.primary")?];
    for (i, agent) in agents.get("supporting").and_then(|s| s.as_array()).into_iter().flatten().enumerate() {
        agent_models.push(model(agent, &format!("spec.agents.supporting[{i}]"))?);
    }
    let tool_calls = spec
        .get("tools")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
        .map(|t| t.get("estimatedCalls").and_then(|c| c.as_i64()).unwrap_or(0));
    let text = |field: &str| spec.get(field).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_string);
    Ok(EstimateInput {
        job_type: text("jobType").or_else(|| text("category")).unwrap_or_else(|| "default".into()),
        agent_models,
        tool_calls: tool_calls.collect(),
    })
}

/// Reads JSON lines; blank lines are skipped, a malformed one is an error naming its line.
pub fn parse_traces(text: &str) -> Result<Vec<TraceRecord>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1)))
        .collect()
}

/// Prediction and outcome of one record, for one forecaster.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Outcome {
    actual: f64,
    p50: f64,
    p90: f64,
}

impl Outcome {
    fn covered(&self) -> bool {
        self.actual <= self.p90
    }

    fn ape(&self) -> f64 {
        (self.p50 - self.actual).abs() / self.actual
    }

    fn ratio(&self) -> f64 {
        (self.actual / self.p50).max(self.p50 / self.actual)
    }
}

/// The figures of one forecaster over a set of records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Scores {
    pub records: usize,
    pub coverage_p90: f64,
    pub mdape_p50: f64,
    pub mdape_p50_after_warmup: f64,
    pub cold_start_ratio: f64,
    pub sharpness_p90: f64,
    /// Median cold-start ratio over each (namespace, jobType)'s first record.
    pub cold_start_key_ratio: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    pub warmup: usize,
    pub estimator: Scores,
    pub naive: Scores,
    pub hindsight: Scores,
    /// Per job type: the estimator's, the naive reference's and the hindsight reference's scores.
    pub by_job_type: BTreeMap<String, [Scores; 3]>,
    /// The elasticity the hindsight cold-start reference follows the declared size with.
    pub cold_oracle_elasticity: f64,
    /// Records left out, with the reason (an unpriced model, a malformed spec, no tokens).
    pub skipped: Vec<String>,
}

struct Scored {
    job_type: String,
    /// (namespace, jobType), as the estimator learns.
    key: (String, String),
    /// ln of the spec's prior tokens (all models).
    size: f64,
    /// ln of the spec's prior tokens priced (the spec's guess of the cost).
    spec_cost: f64,
    earlier_samples: usize,
    /// Whether this is its (namespace, jobType)'s first record.
    first_of_key: bool,
    ours: Outcome,
    naive: Outcome,
    hindsight: Outcome,
    /// The hindsight cold-start reference's ratio on this record if it is its job type's first,
    /// and if it is its (namespace, jobType)'s first ([`cold_oracle`]).
    cold_oracle: (Option<f64>, Option<f64>),
}

/// Replays `records` in order: predict from the spec, then learn the actual usage.
pub fn evaluate(records: &[TraceRecord], prices: &PriceTable, warmup: usize) -> Evaluation {
    let mut state = EstimatorState::default();
    let mut naive_history: BTreeMap<String, VecDeque<f64>> = BTreeMap::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut keys_seen: std::collections::BTreeSet<(String, String)> = std::collections::BTreeSet::new();
    let mut scored = Vec::new();
    let mut skipped = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let input = match estimate_input(&record.spec) {
            Ok(input) => input,
            Err(e) => {
                skipped.push(format!("record {}: {e}", i + 1));
                continue;
            }
        };
        let usage = usage_by_model(&record.usage);
        let actual = match actual_cost(&usage, prices) {
            Ok(cost) if cost.0 > 0 => cost,
            Ok(_) => {
                skipped.push(format!("record {}: no tokens or a zero cost", i + 1));
                continue;
            }
            Err(e) => {
                skipped.push(format!("record {}: {e}", i + 1));
                continue;
            }
        };
        let namespace = record.namespace.clone().unwrap_or_else(|| "default".into());
        let forecast = match estimate(&input, state.stats(&namespace, &input.job_type).as_ref(), prices) {
            Ok(forecast) => forecast,
            Err(e) => {
                skipped.push(format!("record {}: {e}", i + 1));
                continue;
            }
        };
        let usd = |m: MicroUsd| m.0.max(1) as f64;
        let ours = Outcome { actual: usd(actual), p50: usd(forecast.cost_p50), p90: usd(forecast.cost_p90) };
        let history = naive_history.entry(input.job_type.clone()).or_default();
        // With nothing to take a median of, the naive reference starts where the estimator does.
        let naive_p50 = median(history.iter().copied().collect()).unwrap_or(ours.p50);
        let naive = Outcome { actual: ours.actual, p50: naive_p50, p90: naive_p50 * NAIVE_P90_FACTOR };
        let earlier_samples = seen.get(&input.job_type).copied().unwrap_or(0);
        let prior = prior_tokens(&input);
        let size = (prior.values().map(TokenCounts::total).sum::<i64>().max(1) as f64).ln();
        let spec_cost = usd(actual_cost(&prior, prices).unwrap_or(MicroUsd(1))).ln();
        let key = (namespace.clone(), input.job_type.clone());
        let first_of_key = keys_seen.insert(key.clone());
        scored.push(Scored {
            job_type: input.job_type.clone(),
            key,
            size,
            spec_cost,
            earlier_samples,
            first_of_key,
            ours,
            naive,
            hindsight: ours,
            cold_oracle: (None, None),
        });

        state.record(&format!("trace/{i}"), &namespace, &input.job_type, &usage, &prior, prices);
        history.push_back(ours.actual);
        if history.len() > NAIVE_WINDOW {
            history.pop_front();
        }
        *seen.entry(input.job_type).or_default() += 1;
    }
    hindsight(&mut scored);
    let cold_oracle_elasticity = cold_oracle(&mut scored);
    let hindsight_scores = |records: &[&Scored]| {
        let mut s = scores(records, warmup, |s| s.hindsight);
        s.cold_start_ratio = median(records.iter().filter_map(|s| s.cold_oracle.0).collect()).unwrap_or(f64::NAN);
        s.cold_start_key_ratio = median(records.iter().filter_map(|s| s.cold_oracle.1).collect()).unwrap_or(f64::NAN);
        s
    };
    let mut by_job_type = BTreeMap::new();
    for job_type in seen.keys() {
        let mine: Vec<&Scored> = scored.iter().filter(|s| &s.job_type == job_type).collect();
        let three = [scores(&mine, warmup, |s| s.ours), scores(&mine, warmup, |s| s.naive), hindsight_scores(&mine)];
        by_job_type.insert(job_type.clone(), three);
    }
    let all: Vec<&Scored> = scored.iter().collect();
    Evaluation {
        warmup,
        estimator: scores(&all, warmup, |s| s.ours),
        naive: scores(&all, warmup, |s| s.naive),
        hindsight: hindsight_scores(&all),
        by_job_type,
        cold_oracle_elasticity,
        skipped,
    }
}

/// Fills in the hindsight reference (see the module doc): per key, `ln p50 = m + b * size` with
/// `b` 0 or 1, whichever gives the key the smaller median error, `m` the median of
/// `ln cost - b * size` over the key, and p90 its 90th percentile.
fn hindsight(scored: &mut [Scored]) {
    let mut keys: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, s) in scored.iter().enumerate() {
        keys.entry(s.key.clone()).or_default().push(i);
    }
    for members in keys.values() {
        let fit = |b: f64| {
            let residuals: Vec<f64> = members.iter().map(|&i| scored[i].ours.actual.ln() - b * scored[i].size).collect();
            let m = forecasters::median(residuals.clone()).unwrap_or(0.0);
            let error = forecasters::median(residuals.iter().map(|r| (r - m).abs()).collect()).unwrap_or(0.0);
            let mut sorted = residuals;
            sorted.sort_by(f64::total_cmp);
            let q90 = sorted[((sorted.len() as f64 * 0.9).ceil() as usize).clamp(1, sorted.len()) - 1];
            (error, b, m, q90)
        };
        let (_, b, m, q90) = if fit(1.0).0 < fit(0.0).0 { fit(1.0) } else { fit(0.0) };
        for &i in members {
            let s = &mut scored[i];
            // 1e-9 so that the run at the 90th percentile itself is covered despite the rounding of ln/exp.
            s.hindsight = Outcome { actual: s.ours.actual, p50: (m + b * s.size).exp(), p90: (q90 + b * s.size + 1e-9).exp() };
        }
    }
}

/// See the module doc. With elasticity `b` a record's level is `ln cost - spec_cost + (1 - b)
/// size` (cost per token of the spec's guess, net of `b` times the declared size: with `b = 1`
/// the ratio to the spec's guess), a job type's or key's level the median of its records'; the
/// forecast of a first record is the centre of the others' levels put back at its own
/// `spec_cost` and size. Of `b` = 0, 1 and the Theil–Sen slope of the job types' levels on their
/// median sizes (clamped to 0..1.5), it takes the one with the smallest job-type cold-start
/// ratio, fills in each first record's `cold_oracle` and returns that `b`.
fn cold_oracle(scored: &mut [Scored]) -> f64 {
    let level = |s: &Scored, b: f64| s.ours.actual.ln() - s.spec_cost + (1.0 - b) * s.size;
    let levels_by = |scored: &[Scored], b: f64, group: &dyn Fn(&Scored) -> (String, String)| {
        let mut by: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
        for s in scored {
            by.entry(group(s)).or_default().push(level(s, b));
        }
        by.into_iter().filter_map(|(k, v)| Some((k, median(v)?))).collect::<BTreeMap<_, _>>()
    };
    let by_job_type = |s: &Scored| (s.job_type.clone(), String::new());
    // The ratio of a first record forecast at `centre` (a level at elasticity `b`).
    let ratio = |s: &Scored, b: f64, centre: f64| (level(s, b) - centre).abs().exp();
    let centre_of_others = |levels: &BTreeMap<(String, String), f64>, job_type: &str| {
        median(levels.iter().filter(|(k, _)| k.0 != job_type).map(|(_, l)| *l).collect())
    };
    let job_type_ratio = |b: f64| {
        let levels = levels_by(scored, b, &by_job_type);
        let firsts = scored.iter().filter(|s| s.earlier_samples == 0);
        median(firsts.filter_map(|s| Some(ratio(s, b, centre_of_others(&levels, &s.job_type)?))).collect()).unwrap_or(f64::NAN)
    };
    let flat = levels_by(scored, 0.0, &by_job_type);
    let mut sizes: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for s in scored.iter() {
        sizes.entry(s.job_type.as_str()).or_default().push(s.size);
    }
    let points: Vec<[f64; 2]> =
        sizes.iter().filter_map(|(t, zs)| Some([*flat.get(&(t.to_string(), String::new()))?, median(zs.clone())?])).collect();
    let slope = forecasters::theil_sen_any(&points).unwrap_or(0.0).clamp(0.0, 1.5);
    let candidates = [0.0, 1.0, slope].map(|b| (b, job_type_ratio(b)));
    let (b, _) = candidates.into_iter().min_by(|x, y| x.1.total_cmp(&y.1)).expect("three candidates");
    let job_types = levels_by(scored, b, &by_job_type);
    let keys = levels_by(scored, b, &|s: &Scored| (s.key.1.clone(), s.key.0.clone()));
    for s in scored.iter_mut() {
        let first = if s.earlier_samples == 0 { centre_of_others(&job_types, &s.job_type).map(|c| ratio(s, b, c)) } else { None };
        let first_of_key = s.first_of_key.then(|| {
            let others: Vec<f64> = keys.iter().filter(|(k, _)| k.0 == s.key.1 && k.1 != s.key.0).map(|(_, l)| *l).collect();
            median(others).or_else(|| centre_of_others(&job_types, &s.job_type)).map(|c| ratio(s, b, c))
        });
        s.cold_oracle = (first, first_of_key.flatten());
    }
    b
}

fn usage_by_model(usage: &[TraceUsage]) -> BTreeMap<String, TokenCounts> {
    let mut by_model: BTreeMap<String, TokenCounts> = BTreeMap::new();
    for u in usage {
        let tokens = TokenCounts {
            input: u.input_tokens.max(0),
            cached_input: u.cached_input_tokens.max(0),
            output: u.output_tokens.max(0),
            cache_write: u.cache_write_input_tokens.max(0),
            cache_write_1h: u.cache_write_1h_input_tokens.max(0),
        };
        let entry = by_model.entry(u.model.clone()).or_default();
        *entry = entry.add(&tokens);
    }
    by_model
}

fn actual_cost(usage: &BTreeMap<String, TokenCounts>, prices: &PriceTable) -> Result<MicroUsd, String> {
    usage
        .iter()
        .map(|(model, tokens)| prices.get(model).map(|p| p.cost(tokens)).ok_or_else(|| format!("no price for model {model:?}")))
        .sum::<Result<MicroUsd, String>>()
}

fn scores(records: &[&Scored], warmup: usize, pick: impl Fn(&Scored) -> Outcome) -> Scores {
    let outcomes: Vec<Outcome> = records.iter().map(|s| pick(s)).collect();
    let n = outcomes.len();
    let firsts: Vec<f64> = records.iter().filter(|s| s.earlier_samples == 0).map(|s| pick(s).ratio()).collect();
    let warm: Vec<f64> = records.iter().filter(|s| s.earlier_samples >= warmup).map(|s| pick(s).ape()).collect();
    Scores {
        records: n,
        coverage_p90: if n == 0 { f64::NAN } else { outcomes.iter().filter(|o| o.covered()).count() as f64 / n as f64 },
        mdape_p50: median(outcomes.iter().map(Outcome::ape).collect()).unwrap_or(f64::NAN),
        mdape_p50_after_warmup: median(warm).unwrap_or(f64::NAN),
        cold_start_ratio: median(firsts).unwrap_or(f64::NAN),
        sharpness_p90: median(outcomes.iter().map(|o| o.p90 / o.p50).collect()).unwrap_or(f64::NAN),
        cold_start_key_ratio: median(records.iter().filter(|s| s.first_of_key).map(|s| pick(s).ratio()).collect()).unwrap_or(f64::NAN),
    }
}

pub use crate::domain::forecasters::median;

impl Evaluation {
    /// The per-jobType table, the totals, and as the last line the machine-readable summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let header = ["JOB TYPE", "RECORDS", "COVERAGE_P90", "MDAPE_P50", "MDAPE_WARM", "COLD_RATIO", "SHARPNESS_P90", "COLD_KEY"];
        let mut rows: Vec<[String; 8]> = Vec::new();
        let fmt = |x: f64| if x.is_nan() { "-".to_string() } else { format!("{x:.3}") };
        let row = |name: String, s: &Scores| {
            [
                name,
                s.records.to_string(),
                fmt(s.coverage_p90),
                fmt(s.mdape_p50),
                fmt(s.mdape_p50_after_warmup),
                fmt(s.cold_start_ratio),
                fmt(s.sharpness_p90),
                fmt(s.cold_start_key_ratio),
            ]
        };
        for (job_type, [ours, naive, hindsight]) in &self.by_job_type {
            rows.push(row(job_type.clone(), ours));
            rows.push(row(format!("  naive {job_type}"), naive));
            rows.push(row(format!("  hindsight {job_type}"), hindsight));
        }
        rows.push(row("ALL (estimator)".into(), &self.estimator));
        rows.push(row("ALL (naive)".into(), &self.naive));
        rows.push(row("ALL (hindsight)".into(), &self.hindsight));
        out += &crate::text_table::render(&header, &rows, 2);
        let _ = writeln!(
            out,
            "naive reference: p50 = median of the job type's last {NAIVE_WINDOW} costs, p90 = {NAIVE_P90_FACTOR} x p50; hindsight: each namespace x job type's median (and 90th percentile) over the whole trace, scaled by the declared size where that fits; MDAPE_WARM counts records after {} earlier samples of their job type",
            self.warmup
        );
        let _ = writeln!(
            out,
            "hindsight COLD_RATIO / COLD_KEY: a first record forecast at the median of the other job types' (namespaces') whole-trace levels per token of the spec's guess, following the declared size with elasticity {:.2}: what knowing everything but the new job type's own level reaches",
            self.cold_oracle_elasticity
        );
        for reason in self.skipped.iter().take(10) {
            let _ = writeln!(out, "skipped {reason}");
        }
        if self.skipped.len() > 10 {
            let _ = writeln!(out, "skipped {} more records", self.skipped.len() - 10);
        }
        let s = &self.estimator;
        let _ = writeln!(
            out,
            "records={} coverage_p90={:.4} mdape_p50={:.4} mdape_p50_after_warmup={:.4} cold_start_ratio={:.4} sharpness_p90={:.4}",
            s.records, s.coverage_p90, s.mdape_p50, s.mdape_p50_after_warmup, s.cold_start_ratio, s.sharpness_p90
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(job_type: &str, model: &str, input: i64, output: i64) -> TraceRecord {
        TraceRecord {
            completed_at: None,
            namespace: None,
            spec: json!({"jobType": job_type, "category": "c", "agents": {"primary": {"name": "a", "model": model}}}),
            usage: vec![TraceUsage {
                model: model.into(),
                input_tokens: input,
                cached_input_tokens: 0,
                output_tokens: output,
                cache_write_input_tokens: 0,
                cache_write_1h_input_tokens: 0,
            }],
        }
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn spec_fields_are_read_leniently() {
        let input = estimate_input(&json!({
            "category": "sec",
            "agents": {"primary": {"model": "gpt-4o"}, "supporting": [{"model": "claude-sonnet-4"}]},
            "tools": [{"name": "t", "estimatedCalls": 4}, {"name": "u"}]
        }))
        .unwrap();
        assert_eq!(input.job_type, "sec", "category stands in for a missing jobType");
        assert_eq!(input.agent_models, ["gpt-4o", "claude-sonnet-4"]);
        assert_eq!(input.tool_calls, [4, 0]);
        assert_eq!(estimate_input(&json!({"agents": {"primary": {}}})).unwrap_err(), "spec.agents.primary.model is missing");
    }

    /// A trace written before cache writes were counted reads them as 0; a newer one prices them.
    #[test]
    fn traces_read_cache_writes_and_old_traces_without_them() {
        let old = r#"{"completedAt": "2026-01-01T00:00:00Z", "namespace": "a", "spec": {}, "usage": [{"model": "claude-sonnet-4", "inputTokens": 10, "outputTokens": 1}]}"#;
        let new = r#"{"completedAt": "2026-01-01T00:00:00Z", "namespace": "a", "spec": {}, "usage": [{"model": "claude-sonnet-4", "inputTokens": 10, "outputTokens": 1, "cacheWriteInputTokens": 1000000, "cacheWrite1hInputTokens": 1000000}]}"#;
        let records = parse_traces(&format!("{old}\n{new}\n")).unwrap();
        assert_eq!((records[0].usage[0].cache_write_input_tokens, records[0].usage[0].cache_write_1h_input_tokens), (0, 0));
        let cost = |r: &TraceRecord| actual_cost(&usage_by_model(&r.usage), &PriceTable::builtin()).unwrap();
        assert_eq!(cost(&records[1]).0 - cost(&records[0]).0, 3_750_000 + 6_000_000);
        assert_eq!(serde_json::to_value(&records[0].usage[0]).unwrap().get("cacheWriteInputTokens"), None, "written back as read");
    }

    #[test]
    fn malformed_line_is_named() {
        let err = parse_traces("\n{\"spec\": {}, \"usage\": []}\nnot json\n").unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
    }

    #[test]
    fn a_constant_workload_is_learned_and_scored() {
        let records: Vec<TraceRecord> = (0..40).map(|_| record("scan", "gpt-4o-mini", 80_000, 20_000)).collect();
        let eval = evaluate(&records, &PriceTable::builtin(), 20);
        let s = eval.estimator;
        assert_eq!(s.records, 40);
        assert!(s.mdape_p50_after_warmup < 0.05, "learned a constant: {s:?}");
        assert!(s.cold_start_ratio > 1.5, "the prior (7,500 tokens) is far from 100,000: {s:?}");
        assert!(eval.naive.mdape_p50_after_warmup < 1e-9, "the median of identical costs is exact");
        assert!(eval.hindsight.mdape_p50 < 1e-9 && eval.hindsight.coverage_p90 == 1.0, "{:?}", eval.hindsight);
        assert_eq!(eval.naive.sharpness_p90, 3.0);
        assert!(eval.render().lines().last().unwrap().starts_with("records=40 coverage_p90="));
    }

    #[test]
    fn the_hindsight_cold_start_reference_knows_every_other_job_types_level() {
        // Three job types of the same spec at 1x, 2x and 4x one another: the first record of the
        // middle one is forecast at the median of the other two (exact), the outer ones 2.83x off.
        let records: Vec<TraceRecord> = (0..30)
            .map(|i| {
                let (job_type, input) = [("small", 8_000), ("middle", 16_000), ("large", 32_000)][i % 3];
                record(job_type, "gpt-4o-mini", input, input / 4)
            })
            .collect();
        let eval = evaluate(&records, &PriceTable::builtin(), 5);
        let [_, _, middle] = eval.by_job_type["middle"];
        assert!((middle.cold_start_ratio - 1.0).abs() < 1e-3, "{middle:?}");
        assert!((eval.hindsight.cold_start_ratio - 8f64.sqrt()).abs() < 1e-2, "{:?}", eval.hindsight);
        assert!(eval.render().contains("  hindsight middle "), "{}", eval.render());
    }

    #[test]
    fn namespaces_of_one_job_type_are_forecast_apart() {
        // Two tenants alternate runs of one job type, one using 8x the other's tokens: the naive
        // median of the job type sits between them, the estimator learns each.
        let records: Vec<TraceRecord> = (0..100)
            .map(|i| {
                let mut r = record("scan", "gpt-4o-mini", if i % 2 == 0 { 80_000 } else { 640_000 }, 20_000);
                r.namespace = Some(format!("team-{}", i % 2));
                r
            })
            .collect();
        let eval = evaluate(&records, &PriceTable::builtin(), 20);
        assert!(eval.estimator.mdape_p50_after_warmup < 0.01, "{:?}", eval.estimator);
        assert!(eval.naive.mdape_p50_after_warmup > 0.5, "{:?}", eval.naive);
        assert!(eval.estimator.cold_start_key_ratio > 1.0, "the second tenant's first run was forecast from the first's");
    }

    #[test]
    fn unpriced_and_empty_records_are_skipped_with_a_reason() {
        let mut unknown = record("scan", "my-llm", 1, 1);
        unknown.usage[0].model = "gpt-4o".into();
        let records = vec![unknown, record("scan", "gpt-4o", 0, 0), record("scan", "gpt-4o", 10, 10)];
        let eval = evaluate(&records, &PriceTable::builtin(), 20);
        assert_eq!(eval.estimator.records, 1);
        assert_eq!(eval.skipped.len(), 2);
        assert!(eval.skipped[0].contains("my-llm"), "{:?}", eval.skipped);
        assert!(eval.skipped[1].contains("no tokens"), "{:?}", eval.skipped);
    }
}
