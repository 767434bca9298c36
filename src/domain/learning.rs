//! What the estimator has learned from finished attempts, compact enough to persist in one
//! ConfigMap whatever the number of jobs ever run.
//!
//! Per (jobType, model) it keeps, for `x = ln(total tokens / prior tokens)` of each attempt (the
//! prior of [`super::estimate`], computed from the attempt's own spec, so a job that declares
//! twice the tool calls is expected to use more than its type's usual):
//!
//! * `location`: a recency-weighted, outlier-resistant mean of `x`, the forecast's ln(p50/prior). Each
//!   sample moves it by `alpha * clamp(x - location, ±HUBER * spread)` with `alpha = 1/weight`:
//!   a Huber-type M-estimate, so one run 30× the usual (agent runs have such tails) shifts it by
//!   a bounded step instead of dragging it;
//! * `spread`: the recency-weighted mean absolute deviation of `x` around `location`;
//! * `q90`: the 90th percentile of the one-step-ahead residual `r = (x - location) / spread`,
//!   tracked online before each update: `q90 += GAMMA * (0.9 - [r <= q90])`. This is adaptive
//!   conformal calibration (Gibbs & Candès, 2021): whatever the shape of the tail, the long-run
//!   share of attempts above `location + q90 * spread` tends to 10 %, and it re-adapts when the
//!   workload changes;
//! * `weight`: the effective sample size. Every new sample first multiplies the weight of
//!   everything before it by [`DECAY`], so `weight` tends to `1/(1-DECAY)` = 20 and a workload
//!   that changes is relearned within a few dozen runs;
//! * the mean input / cached input / output fractions, to price a token forecast.
//!
//! The last [`SEEN_CAP`] attempt keys (`<job uid>/<attempt>`) are kept so that an attempt is never
//! counted twice (a re-reconcile after a restart sees the same usage "appear" again), and at most
//! [`MAX_JOB_TYPES`] job types are kept, the least recently updated going first. The state of one
//! (jobType, model) is nine numbers, so the ConfigMap stays small however many jobs ran.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::pricing::TokenCounts;

/// Weight left to the past at each new sample.
pub const DECAY: f64 = 0.95;
/// Residuals beyond this many spreads move the location no further.
pub const HUBER: f64 = 2.0;
/// Step of the online quantile tracking of `q90`, in spreads.
pub const GAMMA: f64 = 0.08;
/// Consecutive runs beyond the p90 band that reset the location (see [`ModelStats::add`]).
pub const RESTART_STREAK: u32 = 3;
/// Attempt keys remembered for deduplication.
pub const SEEN_CAP: usize = 512;
/// Job types remembered.
pub const MAX_JOB_TYPES: usize = 256;
/// Models remembered per job type (a job names a handful).
pub const MAX_MODELS: usize = 16;
pub const VERSION: u32 = 2;
/// Mean absolute deviation of a normal is 0.7979 sigma; the first spread is the prior's
/// (p90 = 3 × p50, i.e. sigma = ln 3 / 1.2816) in that unit.
pub const PRIOR_SPREAD: f64 = 0.6839;
/// q90 of a normal in mean-absolute-deviation units (1.2816 / 0.7979).
pub const INITIAL_Q90: f64 = 1.6062;

/// Statistics of one model's usage within a job type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelStats {
    /// Samples ever recorded.
    pub n: u64,
    /// Sum of the decayed sample weights: the effective sample size (at most 1/(1-DECAY)).
    pub weight: f64,
    /// Robust recency-weighted location of ln(total tokens / prior tokens).
    pub location: f64,
    /// Recency-weighted mean absolute deviation of that log ratio around the location.
    pub spread: f64,
    /// Calibrated 90th percentile of (x - location) / spread.
    pub q90: f64,
    /// Consecutive samples beyond ±q90 spreads on the same side (negative: below).
    #[serde(default)]
    pub streak: i32,
    /// Recency-weighted mean fractions of input, cached input and output tokens.
    pub input_frac: f64,
    pub cached_frac: f64,
    pub output_frac: f64,
}

impl ModelStats {
    /// `prior` is the spec's prior token count for this model: what is learned is how far off it
    /// is for the job type, so jobs of one type that declare more work get larger forecasts.
    fn add(&mut self, tokens: &TokenCounts, prior: i64) {
        let total = tokens.total() as f64;
        let x = total.ln() - (prior.max(1) as f64).ln();
        let fractions = |t: &TokenCounts| [t.input, t.cached_input, t.output].map(|part| part.max(0) as f64 / total);
        if self.weight > 0.0 {
            let residual = (x - self.location) / self.spread;
            self.q90 = (self.q90 + GAMMA * if residual > self.q90 { 0.9 } else { -0.1 }).clamp(0.25, 8.0);
            self.streak = match (residual > self.q90, residual < -self.q90) {
                (true, _) => self.streak.max(0) + 1,
                (_, true) => self.streak.min(0) - 1,
                _ => 0,
            };
            if self.streak.unsigned_abs() >= RESTART_STREAK {
                // A stable workload puts three runs in a row beyond its p90 (or below its mirror
                // image) about once in a thousand: the workload changed, and the clipped location
                // would take dozens of runs to follow. Start over from this run.
                *self = ModelStats { n: self.n, q90: self.q90, ..ModelStats::default() };
            }
        }
        self.n += 1;
        if self.weight == 0.0 {
            let q90 = if self.n == 1 { INITIAL_Q90 } else { self.q90 };
            let [input_frac, cached_frac, output_frac] = fractions(tokens);
            *self = ModelStats {
                n: self.n,
                weight: 1.0,
                location: x,
                spread: PRIOR_SPREAD,
                q90,
                streak: 0,
                input_frac,
                cached_frac,
                output_frac,
            };
            return;
        }
        self.weight = self.weight * DECAY + 1.0;
        let alpha = 1.0 / self.weight;
        let deviation = x - self.location;
        self.location += alpha * deviation.clamp(-HUBER * self.spread, HUBER * self.spread);
        // Unclipped, so a workload that jumps widens the spread at once and the clipped location
        // can follow within a few runs; q90 absorbs what the tails add to it.
        self.spread = (self.spread + alpha * (deviation.abs() - self.spread)).max(0.02);
        let [input, cached, output] = fractions(tokens);
        self.input_frac += alpha * (input - self.input_frac);
        self.cached_frac += alpha * (cached - self.cached_frac);
        self.output_frac += alpha * (output - self.output_frac);
    }

    /// ln(p90 / p50) as learned.
    pub fn p90_offset(&self) -> f64 {
        self.q90 * self.spread
    }

    /// The token mix as counts per million, for splitting a forecast total.
    pub fn mix(&self) -> TokenCounts {
        let per = |f: f64| (f * 1e6).round() as i64;
        TokenCounts { input: per(self.input_frac), cached_input: per(self.cached_frac), output: per(self.output_frac) }
    }
}

/// Statistics of one job type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobTypeStats {
    /// Attempts recorded.
    pub n: u64,
    /// Logical clock of the last update, for evicting the least recently updated job type.
    pub updated: u64,
    pub models: BTreeMap<String, ModelStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EstimatorState {
    pub version: u32,
    /// Incremented by every recorded attempt.
    pub clock: u64,
    pub job_types: BTreeMap<String, JobTypeStats>,
    /// Keys of the last SEEN_CAP recorded attempts, oldest first.
    pub seen: Vec<String>,
}

impl Default for EstimatorState {
    fn default() -> Self {
        EstimatorState { version: VERSION, clock: 0, job_types: BTreeMap::new(), seen: Vec::new() }
    }
}

/// The key of one attempt: `<job uid>/<attempt>`.
pub fn attempt_key(job_uid: &str, attempt: i32) -> String {
    format!("{job_uid}/{attempt}")
}

impl EstimatorState {
    /// Records one attempt's usage; false (and no change) when the attempt was recorded before
    /// or reported no tokens.
    /// `prior` is [`super::estimate::prior_tokens`] of the attempt's job; a model it lacks (an
    /// agent reporting a model its spec did not name) is measured against one agent's prior.
    pub fn record(
        &mut self,
        key: &str,
        job_type: &str,
        per_model: &BTreeMap<String, TokenCounts>,
        prior: &BTreeMap<String, TokenCounts>,
    ) -> bool {
        if self.seen.iter().any(|k| k == key) {
            return false;
        }
        let used: Vec<(&String, &TokenCounts)> = per_model.iter().filter(|(_, t)| t.total() > 0).collect();
        if used.is_empty() {
            return false;
        }
        self.seen.push(key.to_string());
        if self.seen.len() > SEEN_CAP {
            let excess = self.seen.len() - SEEN_CAP;
            self.seen.drain(..excess);
        }
        self.clock += 1;
        let clock = self.clock;
        let stats = self.job_types.entry(job_type.to_string()).or_default();
        stats.n += 1;
        stats.updated = clock;
        for (model, tokens) in used {
            if !stats.models.contains_key(model) && stats.models.len() >= MAX_MODELS {
                continue;
            }
            let expected = prior.get(model).unwrap_or(&super::estimate::PER_AGENT).total();
            stats.models.entry(model.clone()).or_default().add(tokens, expected);
        }
        while self.job_types.len() > MAX_JOB_TYPES {
            let oldest = self.job_types.iter().min_by_key(|(_, s)| s.updated).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.job_types.remove(&k),
                None => break,
            };
        }
        true
    }

    pub fn stats(&self, job_type: &str) -> Option<&JobTypeStats> {
        self.job_types.get(job_type).filter(|s| s.n > 0)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the state always serializes")
    }

    /// Parses a persisted state. A missing, corrupt or unknown-version state gives an empty
    /// state and the warning to log: the estimator then starts over from its prior.
    pub fn from_json(s: Option<&str>) -> (EstimatorState, Option<String>) {
        let Some(s) = s else { return (EstimatorState::default(), None) };
        match serde_json::from_str::<EstimatorState>(s) {
            Ok(state) if state.version == VERSION => (state.sanitized(), None),
            Ok(state) => (
                EstimatorState::default(),
                Some(format!("estimator state has version {}, expected {VERSION}: starting over", state.version)),
            ),
            Err(e) => (EstimatorState::default(), Some(format!("estimator state does not parse ({e}): starting over"))),
        }
    }

    /// Drops what a hand-edited state could hold beyond the bounds, and non-finite numbers.
    fn sanitized(mut self) -> Self {
        let finite = |m: &ModelStats| {
            [m.weight, m.location, m.spread, m.q90, m.input_frac, m.cached_frac, m.output_frac].iter().all(|x| x.is_finite())
                && m.weight > 0.0
                && m.spread > 0.0
                && m.q90 > 0.0
        };
        for stats in self.job_types.values_mut() {
            stats.models.retain(|_, m| finite(m));
        }
        self.job_types.retain(|_, s| !s.models.is_empty());
        while self.job_types.len() > MAX_JOB_TYPES {
            let oldest = self.job_types.iter().min_by_key(|(_, s)| s.updated).map(|(k, _)| k.clone()).expect("non-empty");
            self.job_types.remove(&oldest);
        }
        if self.seen.len() > SEEN_CAP {
            let excess = self.seen.len() - SEEN_CAP;
            self.seen.drain(..excess);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prior of one token, so the learned location is ln(total tokens) itself.
    fn unit_prior() -> BTreeMap<String, TokenCounts> {
        usage("m", 1, 0, 0)
    }

    fn usage(model: &str, input: i64, cached: i64, output: i64) -> BTreeMap<String, TokenCounts> {
        [(model.to_string(), TokenCounts { input, cached_input: cached, output })].into()
    }

    enum Step {
        Record { key: &'static str, job_type: &'static str, total: i64, counted: bool },
    }

    struct Case {
        name: &'static str,
        steps: Vec<Step>,
        check: fn(&EstimatorState),
    }

    fn rec(key: &'static str, job_type: &'static str, total: i64, counted: bool) -> Step {
        Step::Record { key, job_type, total, counted }
    }

    #[test]
    fn table() {
        let cases = vec![
            Case {
                name: "first sample sets the location; spread and q90 start at the prior's",
                steps: vec![rec("u/1", "scan", 10_000, true)],
                check: |s| {
                    let m = &s.stats("scan").unwrap().models["m"];
                    assert_eq!(m.n, 1);
                    assert!((m.location - 10_000f64.ln()).abs() < 1e-9);
                    assert_eq!((m.spread, m.q90), (PRIOR_SPREAD, INITIAL_Q90));
                    assert!((m.p90_offset() - 3f64.ln()).abs() < 1e-3, "p90 = 3 x p50 until learned");
                    assert!((m.input_frac - 0.8).abs() < 1e-9 && (m.output_frac - 0.2).abs() < 1e-9);
                },
            },
            Case {
                name: "the same attempt is counted once",
                steps: vec![rec("u/1", "scan", 10_000, true), rec("u/1", "scan", 10_000, false)],
                check: |s| assert_eq!(s.stats("scan").unwrap().n, 1),
            },
            Case {
                name: "another attempt of the same job counts",
                steps: vec![rec("u/1", "scan", 10_000, true), rec("u/2", "scan", 10_000, true)],
                check: |s| assert_eq!(s.stats("scan").unwrap().n, 2),
            },
            Case {
                name: "zero usage is not a sample",
                steps: vec![rec("u/1", "scan", 0, false)],
                check: |s| assert!(s.stats("scan").is_none() && s.seen.is_empty()),
            },
            Case {
                name: "a near sample moves the location by its weight; a far one by at most HUBER spreads",
                steps: vec![rec("a/1", "scan", 10_000, true), rec("b/1", "scan", 12_000, true), rec("c/1", "scan", 10_000_000, true)],
                check: |s| {
                    let m = &s.stats("scan").unwrap().models["m"];
                    let (a, b) = (10_000f64.ln(), 12_000f64.ln());
                    // weights 0.95 and 1: the second sample has alpha = 1/1.95
                    let after_b = a + (b - a) / 1.95;
                    let spread_b = PRIOR_SPREAD + ((b - a) - PRIOR_SPREAD) / 1.95;
                    let weight_c = 1.95 * DECAY + 1.0;
                    let want = after_b + HUBER * spread_b / weight_c;
                    assert!((m.location - want).abs() < 1e-9, "{} vs {want}", m.location);
                    assert!(m.location.exp() < 25_000.0, "1000x outlier moved p50 only to {}", m.location.exp());
                    assert!(m.q90 > INITIAL_Q90, "a sample above p90 raises q90");
                },
            },
            Case {
                name: "q90 settles where one sample in ten is above it",
                steps: (0..2000).map(|i| rec("", "scan", if i % 10 == 0 { 40_000 } else { 10_000 + (i % 7) * 500 }, true)).collect(),
                check: |s| {
                    let m = &s.stats("scan").unwrap().models["m"];
                    let p90 = (m.location + m.p90_offset()).exp();
                    assert!(p90 > 13_000.0 && p90 < 40_000.0, "p90 {p90} sits between the body and the 10 % tail");
                },
            },
            Case {
                name: "a changed workload is relearned within a few runs",
                steps: (0..30).map(|_| rec("", "scan", 1_000, true)).chain((0..20).map(|_| rec("", "scan", 100_000, true))).collect(),
                check: |s| {
                    let m = &s.stats("scan").unwrap().models["m"];
                    assert_eq!(m.n, 50);
                    assert!(m.weight < 18.0, "the change restarted the statistics");
                    assert!(m.location.exp() > 50_000.0, "p50 {}", m.location.exp());
                },
            },
            Case {
                name: "job types are bounded, least recently updated evicted",
                steps: (0..MAX_JOB_TYPES + 10)
                    .map(|i| rec("", Box::leak(format!("t{i}").into_boxed_str()), 1_000, true))
                    .chain([rec("", "t20", 1_000, true), rec("", "new", 1_000, true)])
                    .collect(),
                check: |s| {
                    assert_eq!(s.job_types.len(), MAX_JOB_TYPES);
                    assert!(s.stats("t0").is_none() && s.stats("t10").is_none());
                    assert!(s.stats("t20").is_some(), "updated lately, kept");
                    assert!(s.stats("new").is_some());
                },
            },
            Case {
                name: "seen keys are bounded",
                steps: (0..SEEN_CAP + 5).map(|_| rec("", "scan", 1_000, true)).collect(),
                check: |s| {
                    assert_eq!(s.seen.len(), SEEN_CAP);
                    assert_eq!(s.seen[0], "k5");
                },
            },
            Case {
                name: "roundtrip through JSON",
                steps: vec![rec("a/1", "scan", 1_000, true), rec("b/1", "review", 5_000, true)],
                check: |s| {
                    let (back, warning) = EstimatorState::from_json(Some(&s.to_json()));
                    assert_eq!(warning, None);
                    assert_eq!(&back, s);
                    assert!(s.to_json().contains("\"version\":2"));
                },
            },
        ];
        for case in cases {
            let mut state = EstimatorState::default();
            for (i, step) in case.steps.iter().enumerate() {
                let Step::Record { key, job_type, total, counted } = step;
                let key = if key.is_empty() { format!("k{i}") } else { key.to_string() };
                let got = state.record(&key, job_type, &usage("m", total * 8 / 10, 0, total - total * 8 / 10), &unit_prior());
                assert_eq!(got, *counted, "{}: step {i}", case.name);
            }
            (case.check)(&state);
        }
    }

    #[test]
    fn missing_corrupt_or_foreign_state_is_empty() {
        for (text, warns) in [
            (None, false),
            (Some("{not json"), true),
            (Some(""), true),
            (Some(r#"{"version":99,"clock":0,"jobTypes":{},"seen":[]}"#), true),
        ] {
            let (state, warning) = EstimatorState::from_json(text);
            assert_eq!(state, EstimatorState::default(), "{text:?}");
            assert_eq!(warning.is_some(), warns, "{text:?}");
        }
    }

    #[test]
    fn cached_tokens_make_their_own_fraction() {
        let mut s = EstimatorState::default();
        s.record("a/1", "scan", &usage("m", 10, 80, 10), &unit_prior());
        let mix = s.stats("scan").unwrap().models["m"].mix();
        assert_eq!(mix, TokenCounts { input: 100_000, cached_input: 800_000, output: 100_000 });
    }
}
