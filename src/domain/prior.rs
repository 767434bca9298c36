//! What a forecast starts from before its key has runs of its own: the spec's size
//! ([`prior_tokens`]) and the priors borrowed from what other keys learned ([`Prior`]).
//!
//! It sits below both [`super::learning`] (which builds the pooled priors) and
//! [`super::estimate`] (which prices a forecast), so that neither imports the other's internals.
//!
//! A borrowed prior is a *robust pool*: each member (a namespace's runs of a jobType on a model)
//! is one vote, the pool's level the median of the members' median levels, so one namespace's
//! extreme runs cannot move it further than to the next namespace's level. A namespace that runs
//! every jobType bigger than the others (a team with larger repositories) carries that into a
//! jobType it has not run yet: [`namespace_effect`] is the median, over the jobTypes it shares
//! with other namespaces, of how far its level sits from theirs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::forecasters::{self, median};
use super::pricing::TokenCounts;

pub const PER_AGENT: TokenCounts = TokenCounts { input: 6_000, cached_input: 0, output: 1_500, cache_write: 0, cache_write_1h: 0 };
pub const PER_TOOL_CALL: TokenCounts = TokenCounts { input: 2_000, cached_input: 0, output: 400, cache_write: 0, cache_write_1h: 0 };
pub const PRIOR_P90_RATIO: f64 = 3.0;
/// The calibrated offset ln(p90/p50) stays within these bounds (p90 between 1.05× and 55× the p50).
pub const OFFSET_RANGE: (f64, f64) = (0.05, 4.0);

/// What the estimator needs to know about a job.
#[derive(Clone, Debug, PartialEq)]
pub struct EstimateInput {
    pub job_type: String,
    /// Model of each agent, primary first.
    pub agent_models: Vec<String>,
    /// Estimated calls of each tool the job names.
    pub tool_calls: Vec<i64>,
}

/// Prior token medians per model: every agent costs PER_AGENT, tool calls are shared evenly
/// between the agents (the remainder goes to the primary, which drives the run).
pub fn prior_tokens(input: &EstimateInput) -> BTreeMap<String, TokenCounts> {
    let calls: i64 = input.tool_calls.iter().sum();
    let agents = input.agent_models.len().max(1) as i64;
    let mut per_model: BTreeMap<String, TokenCounts> = BTreeMap::new();
    for (i, model) in input.agent_models.iter().enumerate() {
        let my_calls = calls / agents + if i == 0 { calls % agents } else { 0 };
        let tokens = PER_AGENT.add(&TokenCounts {
            input: PER_TOOL_CALL.input * my_calls,
            cached_input: 0,
            output: PER_TOOL_CALL.output * my_calls,
            ..Default::default()
        });
        let entry = per_model.entry(model.clone()).or_default();
        *entry = entry.add(&tokens);
    }
    per_model
}

/// ln(p90/p50) before anything is learned: p90 = 3 × p50.
pub fn prior_offset() -> f64 {
    PRIOR_P90_RATIO.ln()
}

/// One member of a pool: a key-model's window of `[ln tokens, ln prior tokens]` runs and its
/// calibrated p90 offset.
#[derive(Clone, Copy, Debug)]
pub struct PoolMember<'a> {
    pub runs: &'a [[f64; 2]],
    pub p90_offset: f64,
}

/// A prior a key without runs of a model starts from: `ln p50 = ratio + elasticity * z` (`z` the
/// ln of the spec's prior tokens), and the p90 offset to go with it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prior {
    pub ratio: f64,
    pub elasticity: f64,
    /// How many runs of the key's own it is worth: the spec's guess half a run (it is often 10×
    /// off for a new workload, so one real run outweighs it two to one), a pool of what other
    /// namespaces or models ran one.
    pub worth: f64,
    pub p90_offset: f64,
    /// The keys' own median p90 offset, without the spread between keys: where a new key's
    /// calibration starts once it has runs of its own.
    pub key_offset: f64,
    /// Where it comes from, for `kubectl agentgate estimate`.
    pub source: String,
    /// A *thin* pool's votes (fewer than [`POOL_QUORUM`] namespaces, of a jobType or across
    /// jobTypes): each namespace's level at `elasticity` (ln tokens less `elasticity` times ln
    /// prior), read by [`Prior::at`]. Empty for a pool of a quorum of namespaces, the key's own
    /// models and the spec.
    #[serde(skip)]
    pub votes: Vec<f64>,
    /// Whether the spec's guess is one more of the thin pool's votes: for the pool of a jobType
    /// (namespaces running the same work should agree, and the spec's guess is evidence of its
    /// size), not across jobTypes (which differ by up to 67x in our trace families whatever
    /// their specs say, so the guess would only pull the first estimate towards a fixed constant).
    #[serde(skip)]
    pub spec_votes: bool,
}

impl Prior {
    /// The spec alone: usage as the prior says, p90 = 3 × p50.
    pub fn spec() -> Prior {
        Prior {
            ratio: 0.0,
            elasticity: 1.0,
            worth: 0.5,
            p90_offset: prior_offset(),
            key_offset: prior_offset(),
            source: "spec".into(),
            votes: Vec::new(),
            spec_votes: false,
        }
    }

    /// The robust pool of several key-models: their median elasticity, the median of their
    /// levels at that elasticity, and their median p90 offset widened by how far the members are
    /// apart (a new key may sit anywhere among them).
    ///
    /// Across job types (`fit = false`) the elasticity is 1: how usage follows the declared size
    /// within one job type says nothing of how two job types' sizes compare.
    pub fn pool(members: &[PoolMember<'_>], fit: bool, source: String) -> Option<Prior> {
        let slopes = members.iter().map(|m| if fit { forecasters::elasticity(m.runs) } else { 1.0 });
        let elasticity = median(slopes.collect())?;
        let ratios: Vec<f64> = members.iter().filter_map(|m| median(m.runs.iter().map(|r| r[0] - elasticity * r[1]).collect())).collect();
        let ratio = median(ratios.clone())?;
        let between = median(ratios.iter().map(|r| (r - ratio).abs()).collect()).unwrap_or(0.0);
        let key_offset = median(members.iter().map(|m| m.p90_offset).collect()).unwrap_or(prior_offset());
        let p90_offset = (key_offset + between).clamp(OFFSET_RANGE.0, OFFSET_RANGE.1);
        Some(Prior { ratio, elasticity, worth: 1.0, p90_offset, key_offset, source, votes: Vec::new(), spec_votes: false })
    }

    /// The pool of other namespaces' runs of a jobType, each member one namespace (see
    /// [`Prior::pool`]). Fewer than [`POOL_QUORUM`] namespaces cannot outvote one of them, so
    /// such a *thin* pool keeps their levels as votes for [`Prior::at`], which bounds how far
    /// they move a new key from the spec's guess (`tests/estimator.rs`
    /// `one_other_namespace_cannot_set_a_new_keys_estimate`: before, a single namespace's runs of
    /// one token each were another team's first estimate of the jobType).
    pub fn across_namespaces(members: &[PoolMember<'_>], source: String) -> Option<Prior> {
        let mut prior = Prior::pool(members, true, source)?;
        if members.len() < POOL_QUORUM {
            let e = prior.elasticity;
            prior.votes = members.iter().filter_map(|m| median(m.runs.iter().map(|r| r[0] - e * r[1]).collect())).collect();
            prior.spec_votes = true;
            prior.source = format!("{} (thin: fewer than {POOL_QUORUM}, weighed with the spec)", prior.source);
        }
        Some(prior)
    }

    /// `(ln p50, ln(p90/p50))` of a job whose spec's prior is `z` (ln tokens).
    ///
    /// A thin pool (see [`Prior::across_namespaces`]) is not trusted alone: each namespace's level
    /// counts only within [`THIN_CAP`]× of the spec's guess `z`, and the spec's guess is one more
    /// vote, so the p50 is the mean (in ln) of the clamped levels and `z`. One namespace moves a
    /// new key's p50 at most √10× from the spec's guess, two at most 10^(2/3)×, whatever
    /// their runs. And where the pool pulls the p50 below the spec's guess, the p90 stays at
    /// least the spec's own p90 (3× its guess): a tenant's tiny runs cannot lower another team's
    /// p90, which the budget and the approval policy read.
    pub fn at(&self, z: f64) -> (f64, f64) {
        if self.votes.is_empty() {
            return (self.elasticity * z + self.ratio, self.p90_offset);
        }
        let cap = THIN_CAP.ln();
        let levels: f64 = self.votes.iter().map(|v| (v + self.elasticity * z).clamp(z - cap, z + cap)).sum();
        let spec = if self.spec_votes { 1.0 } else { 0.0 };
        let mu = (levels + spec * z) / (self.votes.len() as f64 + spec);
        let offset = self.p90_offset.max(z + prior_offset() - mu).clamp(OFFSET_RANGE.0, OFFSET_RANGE.1);
        (mu, offset)
    }

    /// The same prior for a namespace whose level sits `effect` (ln) from the other namespaces'.
    pub fn for_namespace(mut self, effect: Option<NamespaceEffect>) -> Prior {
        if let Some(e) = effect.filter(|e| e.ln.abs() > 1e-9) {
            self.ratio += e.ln;
            self.votes.iter_mut().for_each(|v| *v += e.ln);
            self.source = format!("{}, x{:.2} for the namespace (from {} jobType-model(s))", self.source, e.ln.exp(), e.from);
        }
        self
    }
}

/// A key-model of another jobType, in the prior across jobTypes: `job_type` numbers its jobType.
#[derive(Clone, Copy, Debug)]
pub struct CrossMember<'a> {
    pub job_type: usize,
    pub member: PoolMember<'a>,
}

impl Prior {
    /// The prior of a jobType nobody ran yet, from every other jobType's key-models, given per
    /// namespace: how a key-model's typical usage (median `y`) follows its typical declared size
    /// (median `z`: agents and tool calls) **across** jobTypes. Each namespace with key-models of
    /// [`CROSS_MIN_SIZES`] distinct sizes measures a slope (Theil–Sen over its own key-models,
    /// so a team's overall scale does not count as a size effect); the elasticity is the median
    /// of those slopes once [`CROSS_MIN_NAMESPACES`] namespaces have one (0.5 before; clamped to
    /// 0..1.5).
    ///
    /// The level is the weighted median of `y - elasticity z` with **each jobType one vote**
    /// (shared between the namespaces that ran it, and within a namespace between its models),
    /// since what a new jobType's level is drawn from is the spread of jobTypes' levels; but no
    /// namespace weighs more than the median namespace's total ([`cross_weights`]), so one
    /// tenant's many jobTypes of extreme runs move it no further than one namespace can
    /// (`learning_tests.rs` `a_tenants_many_extreme_job_types_are_one_vote_in_a_new_job_types_prior`).
    /// One vote per namespace instead (before) let a namespace running a few jobTypes weigh as
    /// much as one running all of them: over the first records of job types after a trace's
    /// fourth, seeds 1-8 of five families, 3.80x against 3.19x now (median ratio).
    ///
    /// Where jobTypes' sizes say nothing of their usage the slope is near 0 and a new jobType
    /// starts at the cluster's typical usage; where bigger declared work means more tokens it
    /// follows. The p90 is widened by how far key-models sit from that line, and the prior is
    /// worth half a run, as the spec's: a first own run outweighs it two to one.
    pub fn across_job_types(namespaces: &[Vec<CrossMember<'_>>], source: String) -> Option<Prior> {
        let typical = |c: &CrossMember<'_>| {
            let m = c.member;
            Some(CrossPoint {
                z: median(m.runs.iter().map(|r| r[1]).collect())?,
                y: median(m.runs.iter().map(|r| r[0]).collect())?,
                offset: m.p90_offset,
                job_type: c.job_type,
            })
        };
        let points: Vec<Vec<CrossPoint>> =
            namespaces.iter().map(|members| members.iter().filter_map(typical).collect::<Vec<_>>()).filter(|p| !p.is_empty()).collect();
        let slopes: Vec<f64> = points
            .iter()
            .filter_map(|p| {
                let sizes = p.iter().map(|x| [x.y, x.z]).collect::<Vec<[f64; 2]>>();
                let distinct = distinct_sizes(&sizes);
                (distinct >= CROSS_MIN_SIZES).then(|| forecasters::theil_sen_any(&sizes)).flatten()
            })
            .collect();
        let elasticity = if slopes.len() >= CROSS_MIN_NAMESPACES { median(slopes).unwrap_or(0.5) } else { 0.5 }.clamp(0.0, 1.5);
        let weights = cross_weights(&points);
        let vote = |f: &dyn Fn(&CrossPoint) -> f64| -> Vec<(f64, f64)> {
            points.iter().zip(&weights).flat_map(|(p, w)| p.iter().zip(w).map(|(x, w)| (f(x), *w))).collect()
        };
        let residual = |x: &CrossPoint| x.y - elasticity * x.z;
        let ratio = forecasters::weighted_median(vote(&residual))?;
        let spread = |x: &CrossPoint| (residual(x) - ratio).abs();
        let between = forecasters::weighted_median(vote(&spread)).unwrap_or(0.0);
        let key_offset = forecasters::weighted_median(vote(&|x: &CrossPoint| x.offset)).unwrap_or(prior_offset());
        let p90_offset = (key_offset + between).clamp(OFFSET_RANGE.0, OFFSET_RANGE.1);
        // Fewer than POOL_QUORUM namespaces cannot outvote one of them: as in a thin pool of a
        // jobType (`Prior::across_namespaces`), each counts only within THIN_CAP of the spec's
        // guess, and the p90 stays at least the spec's where they pull the p50 below the guess.
        // Before, the only other namespace of a young cluster set every new jobType's first
        // estimate alone, and one of two moved it without bound (`learning_tests.rs`
        // `one_or_two_namespaces_cannot_set_a_new_job_types_prior`). The spec's guess is not a
        // vote here (see `spec_votes`): it cost the first estimates of the trace families
        // (median ratio over the first records of seeds 1-8, drift 2.87x to 3.85x).
        let thin = points.len() < POOL_QUORUM;
        let votes = if thin { points.iter().filter_map(|p| median(p.iter().map(residual).collect())).collect() } else { Vec::new() };
        let thin_note =
            if thin { format!(" (thin: fewer than {POOL_QUORUM} namespaces, each within {THIN_CAP}x of the spec)") } else { String::new() };
        Some(Prior {
            ratio,
            elasticity,
            worth: 0.5,
            p90_offset,
            key_offset,
            source: format!("{source}, elasticity {elasticity:.2}{thin_note}"),
            votes,
            spec_votes: false,
        })
    }
}

/// A key-model's typical run in the prior across jobTypes.
struct CrossPoint {
    z: f64,
    y: f64,
    offset: f64,
    job_type: usize,
}

/// The weights of the points (per namespace) in the prior across jobTypes: each jobType one
/// vote, shared evenly between the namespaces that ran it and within a namespace between its
/// models; then each namespace's total is capped at the median of the namespaces' totals (and
/// its points scaled down alike), so a namespace running many jobTypes weighs no more than a
/// typical one.
fn cross_weights(points: &[Vec<CrossPoint>]) -> Vec<Vec<f64>> {
    let job_types = points.iter().flatten().map(|x| x.job_type + 1).max().unwrap_or(0);
    // Namespaces per jobType, and each namespace's models per jobType.
    let mut namespaces_of = vec![0usize; job_types];
    let per_namespace: Vec<Vec<usize>> = points
        .iter()
        .map(|p| {
            let mut models = vec![0usize; job_types];
            p.iter().for_each(|x| models[x.job_type] += 1);
            models.iter().enumerate().filter(|(_, m)| **m > 0).for_each(|(t, _)| namespaces_of[t] += 1);
            models
        })
        .collect();
    let raw: Vec<Vec<f64>> = points
        .iter()
        .zip(&per_namespace)
        .map(|(p, models)| p.iter().map(|x| 1.0 / (namespaces_of[x.job_type] * models[x.job_type]) as f64).collect())
        .collect();
    let totals: Vec<f64> = raw.iter().map(|w| w.iter().sum()).collect();
    let cap = median(totals.clone()).unwrap_or(1.0);
    raw.into_iter().zip(totals).map(|(w, total)| w.into_iter().map(|x| x * (cap / total).min(1.0)).collect()).collect()
}

/// Distinct sizes (`z` more than 0.05 apart) among one namespace's key-models.
fn distinct_sizes(runs: &[[f64; 2]]) -> usize {
    let mut sizes: Vec<f64> = runs.iter().map(|r| r[1]).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.windows(2).filter(|w| w[1] - w[0] > 0.05).count() + usize::from(!sizes.is_empty())
}

/// Namespaces a pool of other namespaces needs to be trusted alone: with three, one namespace's
/// runs move its median no further than the next namespace's level.
pub const POOL_QUORUM: usize = 3;
/// How far (×) from the spec's guess one namespace of a thin pool counts ([`Prior::at`]).
pub const THIN_CAP: f64 = 10.0;

/// Key-models of distinct sizes a namespace needs before its slope across jobTypes counts.
pub const CROSS_MIN_SIZES: usize = 3;
/// Namespaces with such a slope needed before the cross-jobType elasticity is learned.
pub const CROSS_MIN_NAMESPACES: usize = 3;

/// How far a namespace's usage sits from other namespaces' on the same work, in ln.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NamespaceEffect {
    pub ln: f64,
    /// jobType-models it was measured on.
    pub from: usize,
}

/// The median, over the (jobType, model) pairs the namespace shares with others, of its level
/// (median `ln tokens - ln prior`) less the median of the other namespaces' levels, shrunk by
/// `k / (k + 1)` for `k` pairs (one comparison is weak evidence). `pairs` holds, per pair, the
/// namespace's own level and the others' levels. Where fewer than [`POOL_QUORUM`] others ran a
/// pair, each counts only within [`THIN_CAP`]× of this namespace's own level: one tenant running
/// the jobTypes it shares with a team at one token (or a billion) moved that team's estimates of
/// every jobType new to it without bound; now at most 10× alone, √10× as one of two
/// (tests/estimator.rs `another_namespace_cannot_skew_a_teams_namespace_effect`).
pub fn namespace_effect(pairs: &[(f64, Vec<f64>)]) -> Option<NamespaceEffect> {
    let cap = THIN_CAP.ln();
    let level_of_others = |own: f64, others: &[f64]| {
        let thin = others.len() < POOL_QUORUM;
        median(others.iter().map(|o| if thin { o.clamp(own - cap, own + cap) } else { *o }).collect())
    };
    let diffs: Vec<f64> = pairs.iter().filter_map(|(own, others)| Some(own - level_of_others(*own, others)?)).collect();
    let k = diffs.len() as f64;
    let ln = median(diffs)? * k / (k + 1.0);
    Some(NamespaceEffect { ln, from: k as usize })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_extreme_member_moves_a_pool_no_further_than_the_next_member() {
        let runs = |level: f64| -> Vec<[f64; 2]> { (0..10).map(|i| [level + 0.01 * i as f64, 0.0]).collect() };
        let (a, b, c) = (runs(10.0), runs(10.2), runs(10.4));
        let member = |r: &[[f64; 2]]| PoolMember { runs: r.to_vec().leak(), p90_offset: 1.0 };
        let calm = Prior::pool(&[member(&a), member(&b), member(&c)], true, "calm".into()).unwrap();
        let wild = Prior::pool(&[member(&a), member(&b), member(&runs(1e6))], true, "wild".into()).unwrap();
        assert!((wild.ratio - calm.ratio).abs() < 0.21, "{} vs {}", wild.ratio, calm.ratio);
    }

    #[test]
    fn a_thin_pool_moves_a_new_key_a_bounded_factor_from_the_spec() {
        let runs = |level: f64| -> Vec<[f64; 2]> { (0..20).map(|i| [level + 0.01 * (i % 3) as f64, 10.0]).collect() };
        let member = |r: Vec<[f64; 2]>| PoolMember { runs: r.leak(), p90_offset: 0.5 };
        let z = 10.0;
        for extreme in [0.0, 40.0] {
            let alone = Prior::across_namespaces(&[member(runs(extreme))], "one".into()).unwrap();
            let (mu, offset) = alone.at(z);
            assert!((mu - z).abs() <= 10f64.ln() / 2.0 + 1e-9, "one namespace at {extreme}: {mu}");
            assert!(mu + offset >= z + prior_offset() - 1e-9, "the p90 stays at least the spec's: {mu} + {offset}");
        }
        // Two namespaces: at most 10^(2/3) from the spec; three or more: the plain median, as before.
        let two = Prior::across_namespaces(&[member(runs(0.0)), member(runs(0.0))], "two".into()).unwrap();
        assert!((two.at(z).0 - (z - 2.0 * 10f64.ln() / 3.0)).abs() < 1e-9, "{:?}", two.at(z));
        let three = Prior::across_namespaces(&[member(runs(11.0)), member(runs(11.2)), member(runs(0.0))], "three".into()).unwrap();
        assert!(three.votes.is_empty() && (three.at(z).0 - 11.0 - 0.01).abs() < 0.02, "{:?}", three.at(z));
    }

    #[test]
    fn each_job_type_is_one_vote_and_no_namespace_weighs_more_than_the_median_one() {
        let point = |job_type: usize| CrossPoint { z: 0.0, y: 0.0, offset: 1.0, job_type };
        // "a" ran jobTypes 0 and 1 (on two models), "b" jobType 1, "c" jobType 2, "d" jobTypes 3 to 12.
        let points = vec![vec![point(0), point(1), point(1)], vec![point(1)], vec![point(2)], (3..13).map(point).collect()];
        let w = cross_weights(&points);
        // jobType 1 is shared by a and b (half each), a's half split between its two models.
        assert_eq!((w[1].clone(), w[2].clone()), (vec![0.5], vec![1.0]));
        assert!((w[0][1] / w[0][0] - 0.25).abs() < 1e-12 && w[0][1] == w[0][2], "{:?}", w[0]);
        // Totals 1.5, 0.5, 1 and 10: d is capped at the median total, 1.25, and so is a.
        let totals: Vec<f64> = w.iter().map(|w| w.iter().sum()).collect();
        assert!((totals[3] - 1.25).abs() < 1e-12 && (totals[0] - 1.25).abs() < 1e-12, "{totals:?}");
        assert!(w[3].iter().all(|x| (x - 0.125).abs() < 1e-12), "{:?}", w[3]);
    }

    #[test]
    fn a_namespace_effect_needs_comparisons_and_is_shrunk() {
        assert_eq!(namespace_effect(&[]), None);
        assert_eq!(namespace_effect(&[(1.0, vec![])]), None, "nobody else ran it");
        let e = namespace_effect(&[(2.0, vec![0.0, 0.1]), (1.9, vec![0.0]), (2.1, vec![-0.2])]).unwrap();
        assert_eq!(e.from, 3);
        assert!((e.ln - 1.95 * 0.75).abs() < 1e-9, "median of 1.95, 1.9, 2.3, shrunk by 3/4: {e:?}");
        let prior = Prior::spec().for_namespace(Some(e));
        assert!((prior.ratio - e.ln).abs() < 1e-12 && prior.source.contains("for the namespace"), "{prior:?}");
    }

    #[test]
    fn one_or_two_other_namespaces_move_a_namespace_effect_a_bounded_factor() {
        let cap = THIN_CAP.ln();
        // The only other namespace ran the shared jobTypes at one token: its level is ~-9.
        let alone = namespace_effect(&[(0.0, vec![-9.0]), (0.1, vec![-9.0])]).unwrap();
        assert!((alone.ln - cap * 2.0 / 3.0).abs() < 0.1, "at most 10x before the shrink: {alone:?}");
        let one_of_two = namespace_effect(&[(0.0, vec![0.2, -9.0]), (0.1, vec![0.3, -9.0])]).unwrap();
        assert!(one_of_two.ln <= (cap / 2.0) * 2.0 / 3.0 + 0.1, "at most sqrt(10)x as one of two: {one_of_two:?}");
        // Three others: the median holds on its own, nothing is capped.
        let quorum = namespace_effect(&[(3.0, vec![0.0, 0.1, -9.0])]).unwrap();
        assert!((quorum.ln - 3.0 * 0.5).abs() < 1e-9, "{quorum:?}");
    }
}
