//! What the estimator has learned from finished attempts, compact enough to persist in one
//! ConfigMap whatever the number of jobs ever run.
//!
//! Per (jobType, model) it keeps the count `n`, a recency-weighted mean and variance of
//! `ln(total tokens)` and the mean input / cached input / output fractions. Every new sample
//! first multiplies the weight of everything before it by [`DECAY`], so a workload that changes
//! is relearned within a few runs: the effective sample size `weight` tends to `1/(1-DECAY)` = 10.
//! The last [`SEEN_CAP`] attempt keys (`<job uid>/<attempt>`) are kept so that an attempt is never
//! counted twice (a re-reconcile after a restart sees the same usage "appear" again), and at most
//! [`MAX_JOB_TYPES`] job types are kept, the least recently updated going first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::pricing::TokenCounts;

/// Weight left to the past at each new sample.
pub const DECAY: f64 = 0.9;
/// Attempt keys remembered for deduplication.
pub const SEEN_CAP: usize = 512;
/// Job types remembered.
pub const MAX_JOB_TYPES: usize = 256;
/// Models remembered per job type (a job names a handful).
pub const MAX_MODELS: usize = 16;
pub const VERSION: u32 = 1;

/// Statistics of one model's usage within a job type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelStats {
    /// Samples ever recorded.
    pub n: u64,
    /// Sum of the decayed sample weights: the effective sample size (at most 1/(1-DECAY)).
    pub weight: f64,
    /// Recency-weighted mean of ln(total tokens).
    pub mean_ln: f64,
    /// Recency-weighted (population) variance of ln(total tokens).
    pub var_ln: f64,
    /// Recency-weighted mean fractions of input, cached input and output tokens.
    pub input_frac: f64,
    pub cached_frac: f64,
    pub output_frac: f64,
}

impl ModelStats {
    fn add(&mut self, tokens: &TokenCounts) {
        let total = tokens.total() as f64;
        let x = total.ln();
        self.n += 1;
        self.weight = self.weight * DECAY + 1.0;
        let alpha = 1.0 / self.weight;
        let diff = x - self.mean_ln;
        let incr = alpha * diff;
        self.mean_ln += incr;
        self.var_ln = (1.0 - alpha) * (self.var_ln + diff * incr);
        self.input_frac += alpha * (tokens.input.max(0) as f64 / total - self.input_frac);
        self.cached_frac += alpha * (tokens.cached_input.max(0) as f64 / total - self.cached_frac);
        self.output_frac += alpha * (tokens.output.max(0) as f64 / total - self.output_frac);
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
    pub fn record(&mut self, key: &str, job_type: &str, per_model: &BTreeMap<String, TokenCounts>) -> bool {
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
            stats.models.entry(model.clone()).or_default().add(tokens);
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
            [m.weight, m.mean_ln, m.var_ln, m.input_frac, m.cached_frac, m.output_frac].iter().all(|x| x.is_finite())
                && m.weight > 0.0
                && m.var_ln >= 0.0
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
                name: "first sample sets the mean, no variance",
                steps: vec![rec("u/1", "scan", 10_000, true)],
                check: |s| {
                    let m = &s.stats("scan").unwrap().models["m"];
                    assert_eq!(m.n, 1);
                    assert!((m.mean_ln - 10_000f64.ln()).abs() < 1e-9);
                    assert_eq!(m.var_ln, 0.0);
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
                name: "two samples: mean and variance of the logs",
                steps: vec![rec("a/1", "scan", 1_000, true), rec("b/1", "scan", 100_000, true)],
                check: |s| {
                    let m = &s.stats("scan").unwrap().models["m"];
                    // weights 0.9 and 1: mean leans to the newer sample
                    let (a, b) = (1_000f64.ln(), 100_000f64.ln());
                    let mean = (0.9 * a + b) / 1.9;
                    assert!((m.mean_ln - mean).abs() < 1e-9, "{}", m.mean_ln);
                    let var = (0.9 * (a - mean).powi(2) + (b - mean).powi(2)) / 1.9;
                    assert!((m.var_ln - var).abs() < 1e-9, "{} vs {var}", m.var_ln);
                },
            },
            Case {
                name: "decay: a changed workload is relearned",
                steps: (0..30).map(|_| rec("", "scan", 1_000, true)).chain((0..20).map(|_| rec("", "scan", 100_000, true))).collect(),
                check: |s| {
                    let m = &s.stats("scan").unwrap().models["m"];
                    assert_eq!(m.n, 50);
                    assert!(m.weight < 10.0 && m.weight > 9.0);
                    // 20 new samples leave 0.9^20 ≈ 12% of the weight to the old workload
                    assert!(m.mean_ln.exp() > 50_000.0, "p50 {}", m.mean_ln.exp());
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
                    assert!(s.to_json().contains("\"version\":1"));
                },
            },
        ];
        for case in cases {
            let mut state = EstimatorState::default();
            for (i, step) in case.steps.iter().enumerate() {
                let Step::Record { key, job_type, total, counted } = step;
                let key = if key.is_empty() { format!("k{i}") } else { key.to_string() };
                let got = state.record(&key, job_type, &usage("m", total * 8 / 10, 0, total - total * 8 / 10));
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
        s.record("a/1", "scan", &usage("m", 10, 80, 10));
        let mix = s.stats("scan").unwrap().models["m"].mix();
        assert_eq!(mix, TokenCounts { input: 100_000, cached_input: 800_000, output: 100_000 });
    }
}
