//! The location forecasters the estimator combines, and their combination (pure functions over a
//! key's recent runs).
//!
//! Each run of a (namespace, jobType, model) key is kept as `(y, z)`: `y = ln(tokens used)`,
//! `z = ln(tokens the spec's prior expects)` (agents on the model and declared tool calls, see
//! [`super::prior::prior_tokens`]). The forecasters read `y - b z`, the run's usage net of
//! the declared size, with `b` the **elasticity** of usage to the spec's prior, learned as the
//! Theil–Sen slope of `y` on `z` over the key's window (median of pairwise slopes, robust to
//! blow-ups; 0.5 until there are enough pairs with distinct `z`; clamped to 0..1.5). So a job
//! declaring more calls is forecast higher exactly as far as this key's runs say usage follows
//! the declaration: `b` near 1 when it does, near 0 when declarations are noise.
//!
//! | expert | forecast of `y` |
//! |---|---|
//! | long | median of `y - b z` over the key's last [`SHORTER_WINDOW`] runs and those of *similar* namespaces, plus `b z_now` |
//! | long-flat | the same with `b = 0` over the jobType's last [`LONG_FLAT_RUNS`] runs across the similar namespaces: for stationary workloads whose declarations are noise (a fitted `b` then only adds noise, and a longer median less noise) |
//! | recent | the same as long, but a weighted median: a run's weight halves every [`HALF_LIFE`] runs of the jobType (a run `a` places back in one of `k` pooled namespaces counts as `a k` runs back) |
//! | short | the same with a half-life of [`SHORT_HALF_LIFE`] runs, for abrupt shifts |
//!
//! *Similar namespaces*: other namespaces running the same jobType on the same model whose own
//! median of `y - b z` is within [`SIMILAR`] (ln 1.5) of this key's, or within [`SIMILAR_Z`]
//! standard errors of the difference (heavy-tailed workloads: two namespaces alike differ by more
//! than ln 1.5 by chance). They lend their runs to both
//! medians, which matters when several teams run the same workload (twice the data, half the
//! noise). A namespace unlike this one (another scale, or a tenant's extreme runs) is left out
//! entirely; a namespace that runs like this one can shift it by less than 1.5× however it runs.
//!
//! They are weighed by exponentially weighted aggregation (the "hedge" of online learning):
//! each expert's recent absolute error in log space is tracked (`losses`, decayed by
//! [`LOSS_DECAY`] per run, each error capped at [`LOSS_CAP`] so one blow-up cannot sink an
//! expert) and `w_k ∝ π_k exp(-ETA loss_k)`, `π` ([`PRIOR_WEIGHTS`]) favouring `long-flat`.
//! On a stationary workload the long median keeps the weight; when the workload drifts or its mix
//! changes the recent ones earn it, without the estimator being told which workload it is on.
//! The absolute log error is the loss because the p50 is judged by its median relative error,
//! which it orders alike. The forecasts are combined by their weighted median, averaged with
//! those within [`BAND`] of it ([`combine`]): a bimodal workload is forecast in one mode, not
//! between the two.
//!
//! All experts are medians, so one run moves each by at most one order statistic, and their
//! combination (a weighted median, a mean of the ones near it) stays within the experts'
//! forecasts: that bounds how far a single sample moves the estimate, whatever its size.

/// The experts, in the order of [`ModelLosses`]: (name, follows the declared size, half-life in
/// runs of the jobType or `None` for the plain median, runs of each namespace read, runs of the
/// jobType read across the pooled namespaces).
pub const EXPERT_SPECS: [(&str, bool, Option<f64>, usize, f64); EXPERTS] = [
    ("long", true, None, SHORTER_WINDOW, f64::INFINITY),
    ("long-flat", false, None, super::learning::WINDOW, LONG_FLAT_RUNS),
    ("recent", true, Some(HALF_LIFE), super::learning::WINDOW, f64::INFINITY),
    ("short", true, Some(SHORT_HALF_LIFE), super::learning::WINDOW, f64::INFINITY),
];
/// Runs of the jobType `long-flat` reads, all pooled namespaces together: with three namespaces
/// alike, 80 runs of each is 240 runs of the jobType, which lags a slow drift more than the median
/// of fewer runs is noisy (`stationary` seeds 1-8, `long-flat` alone: 0.4581 over 80 runs of each
/// namespace, 0.4563 over the jobType's last 100, 0.4582 over 60, 0.4569 over 150).
pub const LONG_FLAT_RUNS: f64 = 100.0;
/// Weight of each expert before any loss is tracked: `long-flat` four times the others. Where
/// the experts' recent errors differ by chance (a stationary workload) it keeps the say; a
/// drift or a mix change that makes it 0.035 (ln) worse than another expert hands over
/// (exp(-ETA 0.035) = 1/4).
pub const PRIOR_WEIGHTS: [f64; EXPERTS] = [1.0, 4.0, 1.0, 1.0];
/// Experts whose forecasts are within this (ln 1.65) of the weighted median of the forecasts are
/// averaged; the others are left out (see [`combine`]).
pub const BAND: f64 = 0.5;
/// Runs of each namespace the `long` expert reads. `long-flat` reads up to the whole window (80
/// runs of a namespace, [`LONG_FLAT_RUNS`] of the jobType): on a
/// stationary heavy-tailed workload run by one namespace, medians over 40 runs lost to the naive
/// median of the job type's last 60 costs (MdAPE after warm-up +0.011 over eight seeds of
/// `stationary` with one namespace per job type, +0.004 with `long-flat` over 80), while `long`
/// over 80 too lagged the easy/hard share swings of `mixture` (seed 11: 0.467, naive 0.471).
pub const SHORTER_WINDOW: usize = 40;
/// Number of experts. (An expert pooling every namespace, similar or not, was tried: it let one
/// tenant's extreme runs move another namespace's estimate, which
/// `one_namespaces_extreme_runs_count_for_nothing_in_another_namespaces_estimate` caught.)
pub const EXPERTS: usize = 4;

/// Half-life of a run's weight in the recent expert, in runs of the jobType.
pub const HALF_LIFE: f64 = 30.0;
/// Half-life of the short expert.
pub const SHORT_HALF_LIFE: f64 = 8.0;
/// Namespaces whose level is within this (ln) of a key's lend it their runs: ln 1.5.
pub const SIMILAR: f64 = 0.405;
/// ... or indistinguishable from it: within this many standard errors of the difference.
pub const SIMILAR_Z: f64 = 2.0;
/// Weight left to an expert's past loss at each run (an effective memory of ~20 runs).
pub const LOSS_DECAY: f64 = 0.95;
/// An expert's error counts for at most this much (ln 7.4: a 7× miss).
pub const LOSS_CAP: f64 = 2.0;
/// Learning rate of the weights: an expert whose recent error is 0.025 (in ln) worse has
/// exp(-1) = 0.37 times its prior weight (20 before: 0.4430 on `mixture` seeds 1-8, 40: 0.4115,
/// with the weighted median of [`combine`]).
pub const ETA: f64 = 40.0;
/// Slopes fitted from fewer pairs than this (with distinct `z`) are not trusted: b = 0.5.
const MIN_SLOPE_PAIRS: usize = 6;

/// Each expert's tracked loss, in the order of [`EXPERT_SPECS`].
pub type ModelLosses = [f64; EXPERTS];

/// The middle value, or the mean of the two middle values; None when empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

/// Theil–Sen slope of `y` on `z`: the median of the pairwise slopes, robust to outlying runs
/// (up to ~29 % of them). Pairs whose `z` barely differ carry no information about the slope
/// and are left out.
pub fn theil_sen(runs: &[[f64; 2]]) -> Option<f64> {
    let mut slopes = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            let dz = b[1] - a[1];
            if dz.abs() > 0.05 {
                slopes.push((b[0] - a[0]) / dz);
            }
        }
    }
    if slopes.len() < MIN_SLOPE_PAIRS { None } else { median(slopes) }
}

/// [`theil_sen`] from any number of pairs (for a handful of points, each one a key-model).
pub fn theil_sen_any(points: &[[f64; 2]]) -> Option<f64> {
    let mut slopes = Vec::new();
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            if (b[1] - a[1]).abs() > 0.05 {
                slopes.push((b[0] - a[0]) / (b[1] - a[1]));
            }
        }
    }
    median(slopes)
}

/// The elasticity of usage to the spec's prior over `runs` (see the module doc).
pub fn elasticity(runs: &[[f64; 2]]) -> f64 {
    theil_sen(runs).unwrap_or(0.5).clamp(0.0, 1.5)
}

/// Each expert's forecast of `y` for a job whose prior is `z_now`, from the key's `runs` (oldest
/// first, non-empty) and other namespaces' runs of the same jobType and model.
pub fn experts(runs: &[[f64; 2]], neighbours: &[Vec<[f64; 2]>], z_now: f64) -> ModelLosses {
    let fitted = elasticity(runs);
    let mut by_slope: Vec<((f64, usize), NetRuns)> = Vec::new();
    let mut forecasts = [0.0; EXPERTS];
    for (k, (_, follows, half_life, window, jobtype_runs)) in EXPERT_SPECS.iter().enumerate() {
        let b = if *follows { fitted } else { 0.0 };
        let key = (b, *window);
        if !by_slope.iter().any(|(x, _)| *x == key) {
            let last = |r: &[[f64; 2]]| r[r.len().saturating_sub(*window)..].to_vec();
            let theirs: Vec<Vec<[f64; 2]>> = neighbours.iter().map(|n| last(n)).collect();
            by_slope.push((key, similar_runs(&last(runs), &theirs, b)));
        }
        let (_, aged) = by_slope.iter().find(|(x, _)| *x == key).expect("just inserted");
        let read: Vec<f64> = aged.iter().filter(|(_, age)| age < jobtype_runs).map(|(x, _)| *x).collect();
        let level = match half_life {
            None => median(read),
            Some(h) => weighted_median(aged.iter().map(|(x, age)| (*x, 0.5f64.powf(age / h))).collect()),
        };
        forecasts[k] = level.unwrap_or(0.0) + b * z_now;
    }
    forecasts
}

/// The median of `xs` and its standard error (1.25 x the spread over the root of the count, the
/// spread a MAD scaled to a normal's standard deviation).
fn located(xs: &[f64]) -> Option<(f64, f64)> {
    let m = median(xs.to_vec())?;
    let mad = median(xs.iter().map(|x| (x - m).abs()).collect())?;
    Some((m, 1.25 * 1.4826 * mad / (xs.len() as f64).sqrt()))
}

/// Runs net of the declared size, each with its age in runs of the jobType.
type NetRuns = Vec<(f64, f64)>;

/// The runs net of the declared size (`y - b z`) of the key and of the similar namespaces, each
/// with its age in runs of the jobType.
fn similar_runs(runs: &[[f64; 2]], neighbours: &[Vec<[f64; 2]>], b: f64) -> NetRuns {
    let net = |rs: &[[f64; 2]]| rs.iter().map(|r| r[0] - b * r[1]).collect::<Vec<f64>>();
    let own = net(runs);
    let (level, error) = located(&own).unwrap_or((0.0, 0.0));
    let mut groups = vec![own];
    for other in neighbours {
        let theirs = net(other);
        if located(&theirs).is_some_and(|(l, e)| (l - level).abs() < SIMILAR.max(SIMILAR_Z * (e * e + error * error).sqrt())) {
            groups.push(theirs);
        }
    }
    // Namespaces run at comparable rates, so with k of them pooled, a run `age` places back in its
    // own window is about `age * k` runs of the jobType back.
    let k = groups.len() as f64;
    groups.iter().flat_map(|g| g.iter().rev().enumerate().map(move |(age, x)| (*x, age as f64 * k))).collect()
}

/// The smallest value at which the cumulated weight reaches half the total; None when empty.
pub fn weighted_median(mut values: Vec<(f64, f64)>) -> Option<f64> {
    values.sort_by(|a, b| a.0.total_cmp(&b.0));
    let half = values.iter().map(|v| v.1).sum::<f64>() / 2.0;
    let mut cumulated = 0.0;
    values
        .into_iter()
        .find(|v| {
            cumulated += v.1;
            cumulated >= half
        })
        .map(|v| v.0)
}

/// The weights of the experts given their tracked losses (they sum to one).
pub fn weights(losses: &ModelLosses) -> ModelLosses {
    let best = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let mut raw = losses.map(|l| (-ETA * (l - best)).exp());
    for (w, prior) in raw.iter_mut().zip(PRIOR_WEIGHTS) {
        *w *= prior;
    }
    let sum: f64 = raw.iter().sum();
    raw.map(|w| w / sum)
}

/// The combined forecast of `y`: the weighted median of the experts' forecasts, refined by the
/// weighted mean of those within [`BAND`] of it. A mean of all of them lands between the modes
/// of a bimodal workload, where no run is (`mixture` seeds 1-8: 0.4430 with the weighted mean,
/// 0.4119 with the weighted median at the same learning rate); the mean of the close ones keeps
/// what averaging gains where the experts agree up to noise.
pub fn combine(runs: &[[f64; 2]], neighbours: &[Vec<[f64; 2]>], z_now: f64, losses: &ModelLosses) -> f64 {
    combine_forecasts(&experts(runs, neighbours, z_now), &weights(losses))
}

/// See [`combine`].
pub fn combine_forecasts(forecasts: &ModelLosses, weights: &ModelLosses) -> f64 {
    let pairs = forecasts.iter().zip(weights).map(|(f, w)| (*f, *w));
    let Some(middle) = weighted_median(pairs.clone().collect()) else { return 0.0 };
    let near: Vec<(f64, f64)> = pairs.filter(|(f, _)| (f - middle).abs() <= BAND).collect();
    let total: f64 = near.iter().map(|(_, w)| w).sum();
    if total > 0.0 { near.iter().map(|(f, w)| f * w).sum::<f64>() / total } else { middle }
}

/// The losses after a run `y` that the experts forecast as `forecasts`.
pub fn update_losses(losses: &mut ModelLosses, forecasts: &ModelLosses, y: f64) {
    for (loss, f) in losses.iter_mut().zip(forecasts) {
        *loss = LOSS_DECAY * *loss + (1.0 - LOSS_DECAY) * (y - f).abs().min(LOSS_CAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theil_sen_finds_the_slope_despite_an_outlier() {
        let mut runs: Vec<[f64; 2]> = (0..20).map(|i| [2.0 + 0.7 * (i as f64 / 4.0), i as f64 / 4.0]).collect();
        runs[5][0] += 10.0;
        assert!((theil_sen(&runs).unwrap() - 0.7).abs() < 1e-9);
        assert_eq!(theil_sen(&[[1.0, 3.0]; 10]), None, "no spread in z, no slope");
    }

    #[test]
    fn experts_read_the_window_and_similar_namespaces() {
        // y = z + 1 for the first runs, then the workload doubles its usage per prior (ln 2).
        let runs: Vec<[f64; 2]> = (0..40).map(|i| [(i % 3) as f64 + 1.0 + if i >= 23 { 2f64.ln() } else { 0.0 }, (i % 3) as f64]).collect();
        assert!((elasticity(&runs) - 1.0).abs() < 1e-9);
        let [long, flat, recent, short] = experts(&runs, &[], 2.0);
        assert!((long - 3.0).abs() < 1e-9, "median ratio over the window is still 1: {long}");
        assert!((recent - (3.0 + 2f64.ln())).abs() < 1e-9, "the 17 runs since the change weigh more than the 23 before: {recent}");
        assert!((short - recent).abs() < 1e-9, "{short}");
        assert!((flat - 2.0).abs() < 1e-9, "ignoring the declared size: the median run, {flat}");
        // A similar namespace (×1.2) lends its runs; an unlike one (×3) is left out.
        let similar: Vec<[f64; 2]> = (0..40).map(|i| [(i % 3) as f64 + 1.0 + 1.2f64.ln(), (i % 3) as f64]).collect();
        let unlike: Vec<[f64; 2]> = (0..200).map(|i| [(i % 3) as f64 + 1.0 + 3f64.ln(), (i % 3) as f64]).collect();
        let [with_similar, ..] = experts(&runs, std::slice::from_ref(&similar), 2.0);
        assert!(with_similar > long && with_similar <= long + 1.2f64.ln() + 1e-12, "{with_similar}");
        assert_eq!(experts(&runs, &[unlike], 2.0), [long, flat, recent, short], "an unlike namespace lends nothing");
    }

    #[test]
    fn weighted_median_halves_the_weight() {
        assert_eq!(weighted_median(vec![]), None);
        assert_eq!(weighted_median(vec![(3.0, 1.0), (1.0, 1.0), (2.0, 1.0)]), Some(2.0));
        assert_eq!(weighted_median(vec![(3.0, 5.0), (1.0, 1.0), (2.0, 1.0)]), Some(3.0));
    }

    #[test]
    fn weights_favour_the_expert_with_the_smallest_recent_error() {
        let even = weights(&[0.3; EXPERTS]);
        let prior_total: f64 = PRIOR_WEIGHTS.iter().sum();
        assert!(
            even.iter().zip(PRIOR_WEIGHTS).all(|(w, p)| (w - p / prior_total).abs() < 1e-12),
            "equal losses: the prior weights {even:?}"
        );
        let w = weights(&[0.5, 0.5, 0.4, 0.5]);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((w[2] / w[0] - (ETA * 0.1).exp()).abs() < 1e-6, "{w:?}");
        let mut losses = [0.0; EXPERTS];
        for _ in 0..50 {
            update_losses(&mut losses, &[1.0, 1.0, 2.0, 1.0], 2.0);
        }
        assert!(weights(&losses)[2] > 0.99, "the expert that is right takes over from the favoured one: {losses:?}");
        update_losses(&mut losses, &[1.0, 1.0, 2.0, 1.0], 1e9);
        assert!(losses.iter().all(|l| *l <= LOSS_CAP), "a blow-up counts for at most LOSS_CAP: {losses:?}");
    }

    #[test]
    fn the_combination_stays_in_the_mode_the_weights_point_to() {
        // Two experts at the easy mode (ln 10), two at the hard one (ln 10 + ln 6): the mean would
        // sit between them, where no run is; the combination stays with the heavier side.
        let forecasts = [10.0, 10.1, 11.8, 11.7];
        let easy = combine_forecasts(&forecasts, &[0.3, 0.3, 0.2, 0.2]);
        assert!((easy - 10.05).abs() < 1e-12, "the mean of the easy experts: {easy}");
        let hard = combine_forecasts(&forecasts, &[0.1, 0.1, 0.4, 0.4]);
        assert!((hard - 11.75).abs() < 1e-12, "{hard}");
        // Experts that agree up to noise are averaged by weight.
        let close = combine_forecasts(&[10.0, 10.2, 10.1, 10.3], &[0.25; EXPERTS]);
        assert!((close - 10.15).abs() < 1e-12, "{close}");
    }

    #[test]
    fn long_flat_reads_the_job_types_last_runs_across_similar_namespaces() {
        // Three namespaces alike, 80 runs each, the last 18 of each higher: long-flat reads about
        // the last LONG_FLAT_RUNS runs of the jobType (34 of each, most of them new), not all 240.
        let old_then_new =
            |shift: f64| -> Vec<[f64; 2]> { (0..80).map(|i| [if i < 62 { 0.0 } else { shift } + 0.001 * (i % 7) as f64, 0.0]).collect() };
        let (own, a, b) = (old_then_new(0.3), old_then_new(0.3), old_then_new(0.3));
        let [long, flat, ..] = experts(&own, &[a, b], 0.0);
        assert!(flat >= 0.3, "18 of the 34 runs of each namespace it reads are new: {flat}");
        assert!(long < 0.3, "long reads each namespace's last 40 runs, of which 22 are old: {long}");
    }
}
