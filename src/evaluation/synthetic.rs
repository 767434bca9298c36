//! Synthetic traces shaped like agent workloads, for testing the estimator without a cluster.
//!
//! Each job type has a median token count per model, and every run multiplies it by
//! `exp(scale * t)`, with `t` drawn from a Student-t of 3 to 8 degrees of freedom: log-t tails.
//! `scale` is 0.3 to 0.6, so that the 1st and 99th percentiles of one task's runs are 10× to 90×
//! apart, around the 30× measured between repeated runs of coding agents on one task. Most of the
//! variation is shared by the job's agents (a hard task is hard for all of them), a little is per
//! model. Workloads drift: each job type's median takes a small random-walk step per run, and half
//! of them change abruptly (×0.4 to ×2.5) somewhere in the middle of the trace, as when a
//! prompt or a repository changes. Jobs of one type differ in size: each declares its own
//! `estimatedCalls` (log-normal around the type's typical count), and its usage follows. The
//! trace is deterministic for a given seed.

use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::{TraceRecord, TraceUsage};
use crate::domain::estimate::{EstimateInput, prior_tokens};

/// How usage follows the work a job declares: twice the tool calls, 2^0.8 = 1.74 times the tokens
/// (more calls mean more tokens, not proportionally: context is shared between them).
const SIZE_ELASTICITY: f64 = 0.8;

/// A small, fast, seedable generator (SplitMix64); good enough for test data, not for secrets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }

    /// Uniform in `low..high` (`high` exclusive; `low` when the range is empty).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % high.saturating_sub(low).max(1)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Student-t with `df` degrees of freedom: a normal over the root of a scaled chi-square.
    pub fn student_t(&mut self, df: u32) -> f64 {
        let chi2: f64 = (0..df).map(|_| self.normal().powi(2)).sum();
        self.normal() / (chi2 / f64::from(df)).sqrt()
    }
}

struct Agent {
    name: &'static str,
    model: &'static str,
    median_tokens: f64,
}

struct JobType {
    name: &'static str,
    category: &'static str,
    agents: Vec<Agent>,
    tools: Vec<(&'static str, i64)>,
    /// Scale of the log-t noise.
    scale: f64,
    df: u32,
    cached_fraction: f64,
    output_fraction: f64,
    /// Relative frequency in the trace.
    weight: f64,
    /// Multiplies the medians once the trace reaches `shift_at` (a fraction of the records).
    shift: f64,
    shift_at: f64,
    /// ln of the drift accumulated so far.
    drift: f64,
}

/// jobType, category, (agent, model) pairs, (tool, typical estimatedCalls) pairs.
type Template = (&'static str, &'static str, &'static [(&'static str, &'static str)], &'static [(&'static str, i64)]);

const TEMPLATES: &[Template] = &[
    ("security_vulnerability_scan", "core-security", &[("scanner", "gpt-4o-mini"), ("fixer", "claude-sonnet-4")], &[("bandit-scanner", 5)]),
    ("content_generation", "marketing", &[("writer", "gpt-4.1")], &[("image-processor", 3)]),
    ("product_import", "catalog", &[("importer", "gemini-2.5-flash")], &[("catalog-api", 20)]),
    ("code_review", "engineering", &[("reviewer", "claude-sonnet-4")], &[("git", 8)]),
    ("data_migration", "platform", &[("planner", "gpt-4o"), ("runner", "gpt-4o-mini")], &[("sql", 30)]),
    ("support_triage", "support", &[("triager", "claude-3-5-haiku")], &[("ticketing", 4)]),
    ("report_summarization", "finance", &[("summarizer", "gemini-2.5-pro")], &[]),
    ("test_generation", "engineering", &[("tester", "gpt-4.1-mini"), ("checker", "claude-3-5-haiku")], &[("git", 6), ("ci", 2)]),
];

/// `records` records over the first `job_types` templates (at most 8), in completion order.
pub fn generate(records: usize, job_types: usize, seed: u64) -> Vec<TraceRecord> {
    let mut rng = Rng::new(seed);
    let mut types: Vec<JobType> = TEMPLATES
        .iter()
        .take(job_types.clamp(1, TEMPLATES.len()))
        .enumerate()
        .map(|(i, (name, category, agents, tools))| JobType {
            name,
            category,
            agents: agents
                .iter()
                .map(|(agent, model)| Agent { name: agent, model, median_tokens: (rng.between(20_000f64.ln(), 1_500_000f64.ln())).exp() })
                .collect(),
            tools: tools.to_vec(),
            scale: rng.between(0.3, 0.6),
            df: [3, 4, 5, 8][rng.below(4)],
            cached_fraction: rng.between(0.0, 0.6),
            output_fraction: rng.between(0.08, 0.3),
            weight: rng.between(0.5, 2.0),
            shift: if i % 2 == 0 { rng.between(0.4_f64.ln(), 2.5_f64.ln()).exp() } else { 1.0 },
            shift_at: rng.between(0.3, 0.7),
            drift: 0.0,
        })
        .collect();
    let total_weight: f64 = types.iter().map(|t| t.weight).sum();
    let start = Timestamp::from_second(1_772_323_200).expect("2026-03-01 is a valid time");
    (0..records)
        .map(|i| {
            let mut pick = rng.uniform() * total_weight;
            let index = types.iter().position(|t| {
                pick -= t.weight;
                pick < 0.0
            });
            let job = &mut types[index.unwrap_or(0)];
            job.drift += 0.02 * rng.normal();
            let shifted = if (i as f64) >= job.shift_at * records as f64 { job.shift.ln() } else { 0.0 };
            let shared = job.scale * rng.student_t(job.df);
            let calls: Vec<(&str, i64)> =
                job.tools.iter().map(|&(name, typical)| (name, (typical as f64 * (0.6 * rng.normal()).exp()).round() as i64)).collect();
            let models: Vec<String> = job.agents.iter().map(|a| a.model.to_string()).collect();
            let prior =
                |calls: Vec<i64>| prior_tokens(&EstimateInput { job_type: String::new(), agent_models: models.clone(), tool_calls: calls });
            let (typical_prior, this_prior) = (prior(job.tools.iter().map(|t| t.1).collect()), prior(calls.iter().map(|c| c.1).collect()));
            let usage = job
                .agents
                .iter()
                .map(|agent| {
                    let own = 0.15 * rng.normal();
                    let size = this_prior[agent.model].total() as f64 / typical_prior[agent.model].total() as f64;
                    let total =
                        (agent.median_tokens.ln() + SIZE_ELASTICITY * size.ln() + job.drift + shifted + shared + own).exp().max(100.0);
                    let cached = (total * (job.cached_fraction * rng.between(0.8, 1.2)).min(0.9)).round() as i64;
                    let output = (total * job.output_fraction * rng.between(0.8, 1.2)).round() as i64;
                    let input = (total.round() as i64 - cached - output).max(1);
                    TraceUsage {
                        model: agent.model.into(),
                        input_tokens: input,
                        cached_input_tokens: cached,
                        output_tokens: output,
                        cache_write_input_tokens: 0,
                        cache_write_1h_input_tokens: 0,
                    }
                })
                .collect();
            let agents: Vec<_> = job
                .agents
                .iter()
                .map(|a| json!({"name": a.name, "image": format!("ghcr.io/acme/{}:1", a.name), "model": a.model}))
                .collect();
            let spec = json!({
                "jobType": job.name,
                "category": job.category,
                "agents": {"primary": agents[0], "supporting": agents[1..]},
                "tools": calls.iter().map(|(name, calls)| json!({"name": name, "estimatedCalls": calls})).collect::<Vec<_>>(),
                "budget": {"maxCostUSD": "100"},
            });
            let completed = start.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(420 * i as i64)).unwrap_or(start);
            TraceRecord { completed_at: Some(completed.to_string()), namespace: Some(format!("team-{}", job.category)), spec, usage }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        assert_eq!(generate(50, 4, 7), generate(50, 4, 7));
        assert_ne!(generate(50, 4, 7), generate(50, 4, 8));
    }

    #[test]
    fn student_t_has_heavier_tails_than_a_normal() {
        let mut rng = Rng::new(1);
        let n = 200_000;
        let beyond = |xs: Vec<f64>| xs.iter().filter(|x| x.abs() > 4.0).count() as f64 / n as f64;
        let t3 = beyond((0..n).map(|_| rng.student_t(3)).collect());
        let normal = beyond((0..n).map(|_| rng.normal()).collect());
        // P(|t3| > 4) = 0.028, P(|z| > 4) = 0.00006
        assert!((0.022..0.034).contains(&t3), "{t3}");
        assert!(normal < 0.0005, "{normal}");
    }

    #[test]
    fn records_parse_back_and_name_known_models() {
        let records = generate(30, 8, 3);
        let text: String = records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        assert_eq!(super::super::parse_traces(&text).unwrap(), records);
        let prices = crate::domain::pricing::PriceTable::builtin();
        for r in &records {
            assert!(r.usage.iter().all(|u| prices.get(&u.model).is_some() && u.input_tokens > 0));
            assert!(super::super::estimate_input(&r.spec).is_ok());
        }
    }
}
