//! What the estimator has learned from finished attempts, per (namespace, jobType, model), compact
//! and bounded enough to persist in one ConfigMap whatever the number of jobs ever run.
//!
//! **Keys.** A jobType is a name any author picks, so it is learned per namespace: one tenant's
//! runs never move another team's estimate. Namespaces only meet in the *pooled prior* that a
//! cold key starts from (see [`Learned`]), and that pool is robust: the median over namespaces of
//! each namespace's own median ratio, so one namespace is one vote however extreme its runs.
//!
//! **Per key and model** it keeps ([`ModelStats`]):
//! * the last [`WINDOW`] runs as `(y, z)`, `y = ln(tokens used)`, `z = ln(tokens of the spec's
//!   prior)`, rounded to 1/10000 (0.01 %); the location forecasters of [`super::forecasters`] read
//!   them, so the declared size's elasticity is learned from the runs rather than fixed;
//! * the experts' tracked losses, which weigh them (exponentially weighted aggregation);
//! * `p90Offset`, ln(p90/p50), calibrated online against the forecasts actually made (adaptive
//!   conformal inference, Gibbs & Candès 2021, in relative steps so it adapts at any scale):
//!   `offset *= exp(GAMMA * ([r > offset] - 0.1))` with `r` the run's log residual, so that one
//!   run in ten lands above the p90 whatever the tail's shape;
//! * the input / cached input / output fractions, to price a token forecast.
//!
//! **What is learned from**: an attempt's usage of the models its spec names, with a price and
//! non-zero tokens; anything else (a model the spec did not name, an unpriced one, empty usage)
//! is implausible as a sample of this job and left out. Each attempt counts once: the last
//! [`SEEN_CAP`] attempt keys (`<job uid>/<attempt>`) are remembered.
//!
//! **Bounds**: a key-model is about 1,550 bytes of JSON (80 pairs and a dozen numbers); at most
//! [`MAX_KEYS`] (namespace, jobType) keys of at most [`MAX_MODELS`] models are kept, so the state
//! stays well under the ConfigMap limit; beyond, the namespace holding the most gives up its least
//! recently updated key, so one namespace's made-up jobTypes never evict another team's history.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::forecasters::{self, ModelLosses, median};
use super::pricing::{PriceTable, TokenCounts};
#[cfg(test)]
use super::prior::prior_offset;
use super::prior::{CrossMember, NamespaceEffect, OFFSET_RANGE, PoolMember, Prior, namespace_effect};

/// Runs kept per key and model (the `recent` experts read them all, `long-flat` up to them all,
/// see [`forecasters::SHORTER_WINDOW`]). A version 4 state of 40-run windows grows into 80 as it
/// learns: nothing to migrate.
pub const WINDOW: usize = 80;
/// Own runs from which a key no longer listens to the pooled prior at all.
pub const POOL_RUNS: u64 = 10;
/// Step of the online calibration of the p90 offset, relative: a run above the p90 widens it by
/// exp(0.9 GAMMA) = 9.4 %, one within narrows it by exp(-0.1 GAMMA) = 1 %.
pub const GAMMA: f64 = 0.1;
/// Attempt keys remembered for deduplication.
pub const SEEN_CAP: usize = 512;
/// (namespace, jobType) keys remembered.
pub const MAX_KEYS: usize = 256;
/// Models remembered per key (a job names a handful).
pub const MAX_MODELS: usize = 8;
/// Runs a key-model needs before its level counts in a namespace's effect.
pub const EFFECT_RUNS: usize = 3;
/// Key-models remembered in all (a window is about 1,550 bytes of JSON: 512 keep the state near
/// 0.80 MB, within a ConfigMap's 1 MiB).
pub const MAX_KEY_MODELS: usize = 512;
/// Version 3 had two experts: it is migrated on load (see [`EstimatorState::from_json`]);
/// version 2 learned per jobType across namespaces and is discarded (and relearned).
pub const VERSION: u32 = 4;
/// Statistics of one model's usage within a (namespace, jobType) key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelStats {
    /// Samples ever recorded.
    pub n: u64,
    /// The last [`WINDOW`] runs, `[ln tokens, ln prior tokens]`, oldest first.
    pub runs: Vec<[f64; 2]>,
    /// Each expert's recent absolute log error (see [`super::forecasters`]).
    pub losses: ModelLosses,
    pub p90_offset: f64,
    pub input_frac: f64,
    pub cached_frac: f64,
    pub output_frac: f64,
    /// Prompt-cache writes (5-minute, 1-hour): absent in a state saved before they were counted,
    /// and left out while 0 (most models write no cache) to keep the stored state small.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_frac: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_1h_frac: f64,
}

fn is_zero(f: &f64) -> bool {
    *f == 0.0
}

impl ModelStats {
    fn member(&self) -> PoolMember<'_> {
        PoolMember { runs: &self.runs, p90_offset: self.p90_offset }
    }

    /// ln of the median ratio of usage to the spec's prior over the window.
    pub fn ratio(&self) -> Option<f64> {
        median(self.runs.iter().map(|r| r[0] - r[1]).collect())
    }

    /// The token mix as counts per million, for splitting a forecast total.
    pub fn mix(&self) -> TokenCounts {
        let per = |f: f64| (f * 1e6).round() as i64;
        TokenCounts {
            input: per(self.input_frac),
            cached_input: per(self.cached_frac),
            output: per(self.output_frac),
            cache_write: per(self.cache_write_frac),
            cache_write_1h: per(self.cache_write_1h_frac),
        }
    }
}

/// Statistics of one (namespace, jobType) key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyStats {
    /// Attempts recorded.
    pub n: u64,
    /// Logical clock of the last update, for evicting the least recently updated key.
    pub updated: u64,
    pub models: BTreeMap<String, ModelStats>,
}

/// What the estimator knows when estimating a job of one (namespace, jobType): the key's own
/// statistics and the priors a model without own runs borrows from. The approval gate passes it
/// through under its former name [`JobTypeStats`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Learned {
    pub namespace: String,
    pub job_type: String,
    pub own: KeyStats,
    /// Per model: the pool of the namespaces that ran this jobType on it.
    pub pooled: BTreeMap<String, Prior>,
    /// The pool over every model of this jobType, for a model no namespace ran it on.
    pub pooled_any: Option<Prior>,
    /// For a jobType no namespace ran yet: the prior learned across the other jobTypes
    /// ([`Prior::across_job_types`]).
    pub cluster: Option<Prior>,
    /// Per model: the windows of the other namespaces running this jobType on it, from which
    /// the similar ones lend their runs to the long forecaster ([`forecasters::experts`]).
    pub neighbours: BTreeMap<String, Vec<Vec<[f64; 2]>>>,
    /// How this namespace's usage compares with others' on the other jobTypes they share; only
    /// computed while the key still listens to a prior.
    pub namespace_effect: Option<NamespaceEffect>,
}

/// Kept so the approval gate's `Observed::learned` needs no change.
pub type JobTypeStats = Learned;

/// Where a model's forecast comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    /// ln of the p50 tokens.
    pub mu: f64,
    /// ln(p90 / p50).
    pub p90_offset: f64,
    /// Own runs of this key and model.
    pub own_runs: u64,
    /// The prior used (always computed; its weight is zero from [`POOL_RUNS`] own runs on).
    pub prior: Prior,
    pub prior_weight: f64,
    pub mix: Option<TokenCounts>,
}

impl Learned {
    /// The forecast of one model's tokens for a job whose prior for it is `prior_tokens`.
    pub fn locate(&self, model: &str, prior_tokens: f64) -> Located {
        let z = prior_tokens.max(1.0).ln();
        let own = self.own.models.get(model).filter(|m| m.n > 0 && !m.runs.is_empty());
        let n = own.map_or(0, |m| m.n);
        let prior = self.prior_for(model);
        // The prior's weight: `worth` runs against the key's n, fading out entirely at POOL_RUNS
        // own runs, so that a warm key's estimate cannot be moved by other namespaces at all.
        let prior_weight = prior.worth / (n as f64 + prior.worth) * (1.0 - n as f64 / POOL_RUNS as f64).max(0.0);
        let (prior_mu, prior_offset) = prior.at(z);
        match own {
            None => Located { mu: prior_mu, p90_offset: prior_offset, own_runs: 0, prior, prior_weight: 1.0, mix: None },
            Some(m) => {
                let neighbours = self.neighbours.get(model).map_or(&[][..], Vec::as_slice);
                let own_mu = forecasters::combine(&m.runs, neighbours, z, &m.losses);
                Located {
                    mu: (1.0 - prior_weight) * own_mu + prior_weight * prior_mu,
                    p90_offset: m.p90_offset,
                    own_runs: n,
                    prior,
                    prior_weight,
                    mix: Some(m.mix()),
                }
            }
        }
    }

    /// The prior of a model: this namespace's other models of the jobType (a jobType switching
    /// model keeps its tenant's scale), else the namespaces' pool for the model, for any model,
    /// the prior across jobTypes, and the spec alone. A borrowed pool is moved by the namespace's effect
    /// (how its usage compares with other namespaces' on the jobTypes they share).
    fn prior_for(&self, model: &str) -> Prior {
        let siblings: Vec<PoolMember<'_>> =
            self.own.models.iter().filter(|(m, s)| *m != model && !s.runs.is_empty()).map(|(_, s)| s.member()).collect();
        Prior::pool(&siblings, true, format!("{}/{}: other models", self.namespace, self.job_type))
            .or_else(|| {
                let pooled = self.pooled.get(model).cloned().or_else(|| self.pooled_any.clone()).or_else(|| self.cluster.clone());
                pooled.map(|p| p.for_namespace(self.namespace_effect))
            })
            .unwrap_or_else(Prior::spec)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EstimatorState {
    pub version: u32,
    /// Incremented by every recorded attempt.
    pub clock: u64,
    /// jobType → namespace → statistics.
    pub job_types: BTreeMap<String, BTreeMap<String, KeyStats>>,
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

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

impl EstimatorState {
    /// What is known for a job of `job_type` in `namespace` (see [`Learned`]).
    pub fn stats(&self, namespace: &str, job_type: &str) -> Option<Learned> {
        let keys = self.job_types.get(job_type);
        let own = keys.and_then(|k| k.get(namespace)).cloned().unwrap_or_default();
        let mut pooled = BTreeMap::new();
        let mut any = Vec::new();
        let mut neighbours: BTreeMap<String, Vec<Vec<[f64; 2]>>> = BTreeMap::new();
        // The priors are what *other* namespaces know: this key's own runs are used as such.
        let others = keys.into_iter().flat_map(|k| k.iter()).filter(|(ns, _)| *ns != namespace);
        for (_, stats) in others {
            for (model, m) in stats.models.iter().filter(|(_, m)| !m.runs.is_empty()) {
                pooled.entry(model.clone()).or_insert_with(Vec::new).push(m.member());
                neighbours.entry(model.clone()).or_default().push(m.runs.clone());
            }
            // One vote per namespace over every model: a tenant running the jobType on eight
            // models is not eight namespaces.
            if let Some(most) = stats.models.values().filter(|m| !m.runs.is_empty()).max_by_key(|m| m.runs.len()) {
                any.push(most.member());
            }
        }
        let pooled: BTreeMap<String, Prior> = pooled
            .into_iter()
            .filter_map(|(model, ms)| {
                let source = format!("{job_type} on {model} pooled over {} namespace(s)", ms.len());
                Prior::across_namespaces(&ms, source).map(|p| (model, p))
            })
            .collect();
        let pooled_any = Prior::across_namespaces(&any, format!("{job_type} pooled over its models and namespaces"));
        // Only a jobType no other namespace ran needs the prior across jobTypes (the costly one to compute).
        let cluster = if any.is_empty() { self.across_job_types(job_type) } else { None };
        let namespace_effect = if own.n < POOL_RUNS { self.namespace_effect(namespace, job_type) } else { None };
        let learned = Learned {
            namespace: namespace.into(),
            job_type: job_type.into(),
            own,
            pooled,
            pooled_any,
            cluster,
            neighbours,
            namespace_effect,
        };
        Some(learned)
    }

    /// The prior of a jobType no namespace ran: see [`Prior::across_job_types`].
    fn across_job_types(&self, job_type: &str) -> Option<Prior> {
        let mut by_namespace: BTreeMap<&str, Vec<CrossMember<'_>>> = BTreeMap::new();
        for (t, (_, keys)) in self.job_types.iter().filter(|(t, _)| *t != job_type).enumerate() {
            for (namespace, stats) in keys {
                let members = stats.models.values().filter(|m| !m.runs.is_empty()).map(|m| CrossMember { job_type: t, member: m.member() });
                by_namespace.entry(namespace).or_default().extend(members);
            }
        }
        let voters: usize = by_namespace.values().map(Vec::len).sum();
        let source = format!("other jobTypes: {voters} key-model(s) of {} namespace(s)", by_namespace.len());
        let namespaces: Vec<Vec<CrossMember<'_>>> = by_namespace.into_values().collect();
        Prior::across_job_types(&namespaces, source)
    }

    /// See [`namespace_effect`]: compared on every other jobType and model the namespace ran,
    /// at elasticity 1 (levels `ln tokens - ln prior`).
    fn namespace_effect(&self, namespace: &str, job_type: &str) -> Option<NamespaceEffect> {
        // A level from a handful of runs is mostly noise: comparisons need EFFECT_RUNS on each side.
        let level = |m: &ModelStats| if m.runs.len() >= EFFECT_RUNS { median(m.runs.iter().map(|r| r[0] - r[1]).collect()) } else { None };
        let mut pairs = Vec::new();
        for (_, keys) in self.job_types.iter().filter(|(t, _)| *t != job_type) {
            let Some(own) = keys.get(namespace) else { continue };
            for (model, m) in &own.models {
                let others: Vec<f64> =
                    (keys.iter().filter(|(ns, _)| *ns != namespace)).filter_map(|(_, s)| s.models.get(model).and_then(level)).collect();
                if let (Some(l), false) = (level(m), others.is_empty()) {
                    pairs.push((l, others));
                }
            }
        }
        namespace_effect(&pairs)
    }

    /// Records one attempt's usage; false (and no change) when the attempt was recorded before
    /// or had no plausible usage (see the module doc). `prior` is
    /// [`super::prior::prior_tokens`] of the attempt's job.
    pub fn record(
        &mut self,
        key: &str,
        namespace: &str,
        job_type: &str,
        per_model: &BTreeMap<String, TokenCounts>,
        prior: &BTreeMap<String, TokenCounts>,
        prices: &PriceTable,
    ) -> bool {
        if self.seen.iter().any(|k| k == key) {
            return false;
        }
        let used: Vec<(&String, &TokenCounts)> =
            per_model.iter().filter(|(m, t)| t.total() > 0 && prior.contains_key(*m) && prices.get(m).is_some()).collect();
        if used.is_empty() {
            return false;
        }
        self.seen.push(key.to_string());
        if self.seen.len() > SEEN_CAP {
            let excess = self.seen.len() - SEEN_CAP;
            self.seen.drain(..excess);
        }
        // The forecasts this attempt was given (as far as the state can tell), to calibrate against.
        let before = self.stats(namespace, job_type).unwrap_or_default();
        self.clock += 1;
        let clock = self.clock;
        let stats = self.job_types.entry(job_type.to_string()).or_default().entry(namespace.to_string()).or_default();
        stats.n += 1;
        stats.updated = clock;
        for (model, tokens) in used {
            if !stats.models.contains_key(model) && stats.models.len() >= MAX_MODELS {
                continue;
            }
            let expected = prior[model].total().max(1) as f64;
            let located = before.locate(model, expected);
            let (y, z) = ((tokens.total() as f64).ln(), expected.ln());
            let m = stats.models.entry(model.clone()).or_default();
            if m.n == 0 {
                // The first run was forecast from a borrowed prior: how far it missed says how
                // good the prior was, not how spread this key's runs are, so it calibrates nothing.
                *m = ModelStats { p90_offset: located.prior.key_offset, ..ModelStats::default() };
            } else {
                let neighbours = before.neighbours.get(model).map_or(&[][..], Vec::as_slice);
                forecasters::update_losses(&mut m.losses, &forecasters::experts(&m.runs, neighbours, z), y);
                let residual = y - located.mu;
                let step = if residual > located.p90_offset { 0.9 } else { -0.1 };
                m.p90_offset = (m.p90_offset * (GAMMA * step).exp()).clamp(OFFSET_RANGE.0, OFFSET_RANGE.1);
            }
            m.runs.push([round4(y), round4(z)]);
            if m.runs.len() > WINDOW {
                m.runs.remove(0);
            }
            m.n += 1;
            let total = tokens.total() as f64;
            let alpha = 1.0 / (m.n.min(20) as f64);
            m.input_frac += alpha * (tokens.input.max(0) as f64 / total - m.input_frac);
            m.cached_frac += alpha * (tokens.cached_input.max(0) as f64 / total - m.cached_frac);
            m.output_frac += alpha * (tokens.output.max(0) as f64 / total - m.output_frac);
            m.cache_write_frac += alpha * (tokens.cache_write.max(0) as f64 / total - m.cache_write_frac);
            m.cache_write_1h_frac += alpha * (tokens.cache_write_1h.max(0) as f64 / total - m.cache_write_1h_frac);
        }
        self.evict();
        true
    }

    fn key_count(&self) -> usize {
        self.job_types.values().map(BTreeMap::len).sum()
    }

    fn key_model_count(&self) -> usize {
        self.job_types.values().flat_map(BTreeMap::values).map(|s| s.models.len()).sum()
    }

    /// Drops keys beyond MAX_KEYS keys or MAX_KEY_MODELS key-models: the least recently updated
    /// key of the namespace holding the most keys. A jobType is a name any author picks, so
    /// a namespace running ever new ones evicts its own keys, never another team's while it holds
    /// more keys than they do; least recently updated alone let it wipe every other team's history
    /// (tests/estimator.rs a_namespace_running_ever_new_job_types_evicts_its_own_keys_not_another_teams).
    fn evict(&mut self) {
        while self.key_count() > MAX_KEYS || self.key_model_count() > MAX_KEY_MODELS {
            let mut held: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
            for (ns, stats) in self.job_types.values().flat_map(|k| k.iter()) {
                let entry = held.entry(ns.as_str()).or_insert((0, u64::MAX));
                entry.0 += 1;
                entry.1 = entry.1.min(stats.updated);
            }
            // The most held; between equals, the one whose oldest key is oldest (plain LRU then),
            // then the first by name.
            let heaviest = held
                .into_iter()
                .max_by_key(|(ns, (count, oldest))| (*count, std::cmp::Reverse(*oldest), std::cmp::Reverse(*ns)))
                .map(|(ns, _)| ns.to_string())
                .expect("more than the bound, so not empty");
            let oldest = self
                .job_types
                .iter()
                .flat_map(|(t, k)| k.iter().map(move |(ns, s)| (s.updated, t.clone(), ns.clone())))
                .filter(|(_, _, ns)| *ns == heaviest)
                .min()
                .expect("the heaviest namespace holds a key");
            let keys = self.job_types.get_mut(&oldest.1).expect("just seen");
            keys.remove(&oldest.2);
            if keys.is_empty() {
                self.job_types.remove(&oldest.1);
            }
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the state always serializes")
    }

    /// Parses a persisted state. A missing, corrupt or unknown-version state gives an empty state
    /// and the warning to log: the estimator then starts over from its prior.
    ///
    /// * Version 3 (the same keys, runs and calibration, but two experts) is **migrated**: every
    ///   run, p90 offset and token mix is kept; the experts' losses restart even (they are an
    ///   average over the last ~20 runs, so the weights are relearned within as many runs).
    /// * Version 2 (per jobType, shared across namespaces) is discarded and relearned: its numbers
    ///   mix tenants and cannot be split back into namespaces.
    pub fn from_json(s: Option<&str>) -> (EstimatorState, Option<String>) {
        let Some(s) = s else { return (EstimatorState::default(), None) };
        let mut value: serde_json::Value = match serde_json::from_str(s) {
            Ok(value) => value,
            Err(e) => return (EstimatorState::default(), Some(format!("estimator state does not parse ({e}): starting over"))),
        };
        let mut note = None;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(3) => {
                migrate_v3(&mut value);
                note = Some(format!("estimator state version 3 migrated to {VERSION}: runs and calibration kept, expert weights restart"));
            }
            Some(v) if v != u64::from(VERSION) => {
                let warning = format!("estimator state has version {v}, expected {VERSION}: discarding it and relearning");
                return (EstimatorState::default(), Some(warning));
            }
            _ => {}
        }
        match serde_json::from_value::<EstimatorState>(value) {
            Ok(state) => (state.sanitized(), note),
            Err(e) => (EstimatorState::default(), Some(format!("estimator state does not parse ({e}): starting over"))),
        }
    }

    /// Drops what a hand-edited state could hold beyond the bounds, and non-finite numbers.
    fn sanitized(mut self) -> Self {
        let finite = |m: &ModelStats| {
            let numbers = [m.p90_offset, m.input_frac, m.cached_frac, m.output_frac];
            numbers.iter().chain(&m.losses).chain(m.runs.iter().flatten()).all(|x| x.is_finite()) && m.p90_offset > 0.0
        };
        for keys in self.job_types.values_mut() {
            for stats in keys.values_mut() {
                stats.models.retain(|_, m| finite(m));
                while stats.models.len() > MAX_MODELS {
                    let last = stats.models.keys().next_back().cloned().expect("non-empty");
                    stats.models.remove(&last);
                }
                for m in stats.models.values_mut() {
                    let excess = m.runs.len().saturating_sub(WINDOW);
                    m.runs.drain(..excess);
                    m.p90_offset = m.p90_offset.clamp(OFFSET_RANGE.0, OFFSET_RANGE.1);
                }
            }
            keys.retain(|_, s| !s.models.is_empty());
        }
        self.job_types.retain(|_, k| !k.is_empty());
        self.evict();
        if self.seen.len() > SEEN_CAP {
            let excess = self.seen.len() - SEEN_CAP;
            self.seen.drain(..excess);
        }
        self
    }
}

/// Version 3 → 4 in place: the experts' losses restart even (see [`EstimatorState::from_json`]).
fn migrate_v3(value: &mut serde_json::Value) {
    value["version"] = VERSION.into();
    let keys = value.get_mut("jobTypes").and_then(serde_json::Value::as_object_mut).into_iter().flat_map(|t| t.values_mut());
    let stats = keys.filter_map(serde_json::Value::as_object_mut).flat_map(|k| k.values_mut());
    let models = stats.filter_map(|s| s.get_mut("models").and_then(serde_json::Value::as_object_mut)).flat_map(|m| m.values_mut());
    for model in models.filter_map(serde_json::Value::as_object_mut) {
        model.insert("losses".into(), serde_json::json!([0.0f64; forecasters::EXPERTS].to_vec()));
    }
}

#[cfg(test)]
#[path = "learning_tests.rs"]
mod tests;
