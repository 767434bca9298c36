use super::*;
use crate::domain::prior::{EstimateInput, prior_tokens};

fn usage(model: &str, input: i64, cached: i64, output: i64) -> BTreeMap<String, TokenCounts> {
    [(model.to_string(), TokenCounts { input, cached_input: cached, output, ..Default::default() })].into()
}

/// A prior of one token per model named, so that `z` is 0 and `y` is ln(total tokens).
fn unit_prior(models: &[&str]) -> BTreeMap<String, TokenCounts> {
    models.iter().map(|m| (m.to_string(), TokenCounts { input: 1, cached_input: 0, output: 0, ..Default::default() })).collect()
}

fn record(state: &mut EstimatorState, key: &str, ns: &str, total: i64) -> bool {
    let prices = PriceTable::builtin();
    state.record(key, ns, "scan", &usage("gpt-4o", total * 8 / 10, 0, total - total * 8 / 10), &unit_prior(&["gpt-4o"]), &prices)
}

fn model<'a>(state: &'a EstimatorState, ns: &str) -> &'a ModelStats {
    &state.job_types["scan"][ns].models["gpt-4o"]
}

#[test]
fn the_first_sample_is_kept_and_calibrates_nothing() {
    let mut s = EstimatorState::default();
    assert!(record(&mut s, "u/1", "ns", 10_000));
    let m = model(&s, "ns").clone();
    assert_eq!((m.n, m.runs.clone()), (1, vec![[round4(10_000f64.ln()), 0.0]]));
    // It was forecast from the spec (1 token) and far above that p90, which says how far off the
    // spec was, not how spread the key's runs are: the offset stays the prior's.
    assert_eq!(m.p90_offset, prior_offset());
    record(&mut s, "u/2", "ns", 100_000);
    assert!((model(&s, "ns").p90_offset - prior_offset() * (0.9 * GAMMA).exp()).abs() < 1e-12, "10x the first run: above the p90");
    assert!((m.input_frac - 0.8).abs() < 1e-9 && (m.output_frac - 0.2).abs() < 1e-9);
}

#[test]
fn an_attempt_counts_once_and_empty_or_implausible_usage_not_at_all() {
    let mut s = EstimatorState::default();
    let prices = PriceTable::builtin();
    assert!(record(&mut s, "u/1", "ns", 10_000));
    assert!(!record(&mut s, "u/1", "ns", 10_000), "the same attempt again");
    assert!(record(&mut s, "u/2", "ns", 10_000), "another attempt of the job");
    assert!(!record(&mut s, "u/3", "ns", 0), "no tokens");
    let other = usage("claude-sonnet-4", 5_000, 0, 1_000);
    assert!(!s.record("u/4", "ns", "scan", &other, &unit_prior(&["gpt-4o"]), &prices), "a model the spec does not name");
    let unpriced = usage("my-llm", 5_000, 0, 1_000);
    assert!(!s.record("u/5", "ns", "scan", &unpriced, &unit_prior(&["my-llm"]), &prices), "a model without a price");
    assert_eq!((s.job_types["scan"]["ns"].n, s.seen.len()), (2, 2));
}

#[test]
fn namespaces_are_learned_apart() {
    let mut s = EstimatorState::default();
    for i in 0..5 {
        record(&mut s, &format!("a/{i}"), "team-a", 10_000);
        record(&mut s, &format!("b/{i}"), "team-b", 80_000);
    }
    let ratio = |ns: &str| model(&s, ns).ratio().unwrap().exp();
    assert!((ratio("team-a") / 10_000.0 - 1.0).abs() < 1e-4 && (ratio("team-b") / 80_000.0 - 1.0).abs() < 1e-4);
    let learned = s.stats("team-a", "scan").unwrap();
    assert_eq!(learned.own.n, 5);
    // The other namespace is team-a's prior (and not a similar one: 8x apart).
    let pool = &learned.pooled["gpt-4o"];
    assert!((pool.ratio - 80_000f64.ln()).abs() < 1e-3, "{pool:?}");
    assert_eq!(learned.neighbours["gpt-4o"].len(), 1);
    // A third namespace's prior is the median of the two (their mean), widened by how far apart they are.
    let third = s.stats("team-c", "scan").unwrap();
    let pool = &third.pooled["gpt-4o"];
    assert!((pool.ratio - (10_000f64.ln() + 80_000f64.ln()) / 2.0).abs() < 1e-3, "{pool:?}");
    assert!((pool.p90_offset - pool.key_offset - 8f64.ln() / 2.0).abs() < 1e-3, "{pool:?}");
}

#[test]
fn the_p90_offset_settles_where_one_run_in_ten_is_above_it() {
    let mut s = EstimatorState::default();
    let mut rng = crate::evaluation::synthetic::Rng::new(3);
    let mut above = 0;
    for i in 0..3000 {
        let total = (11.0 + 0.5 * rng.student_t(3)).exp() as i64;
        let learned = s.stats("ns", "scan").unwrap();
        let located = learned.locate("gpt-4o", 1.0);
        if i >= 1000 && (total as f64).ln() > located.mu + located.p90_offset {
            above += 1;
        }
        record(&mut s, &format!("k/{i}"), "ns", total);
    }
    let share = above as f64 / 2000.0;
    assert!((0.08..0.12).contains(&share), "{share} of runs above the p90");
}

#[test]
fn runs_keys_and_seen_are_bounded() {
    let mut s = EstimatorState::default();
    for i in 0..WINDOW + 5 {
        record(&mut s, &format!("w/{i}"), "ns", 1_000 + i as i64);
    }
    assert_eq!(model(&s, "ns").runs.len(), WINDOW);
    assert_eq!(model(&s, "ns").runs[0][0], round4(1_005f64.ln()), "the oldest go first");
    for i in 0..MAX_KEYS + 10 {
        record(&mut s, &format!("k/{i}"), &format!("ns-{i}"), 1_000);
    }
    record(&mut s, "again", "ns-20", 1_000);
    for i in 0..SEEN_CAP {
        record(&mut s, &format!("new/{i}"), "ns-new", 1_000);
    }
    assert_eq!(s.key_count(), MAX_KEYS);
    let namespaces = &s.job_types["scan"];
    assert!(!namespaces.contains_key("ns") && !namespaces.contains_key("ns-0") && !namespaces.contains_key("ns-10"));
    assert!(namespaces.contains_key("ns-20") && namespaces.contains_key("ns-new"), "recently updated keys stay");
    assert_eq!(s.seen.len(), SEEN_CAP);
    assert_eq!(s.seen[0], "new/0", "the oldest keys go first");
    // A full state stays well under the ConfigMap limit of 1 MiB: every key with two models and
    // full windows of realistic numbers (built directly: recording 20,000 runs is slow unoptimized).
    let mut filled = model(&s, "ns-new").clone();
    filled.runs = (0..WINDOW).map(|i| [round4(12.3456 + i as f64 / 1000.0), round4(9.8765 + i as f64 / 700.0)]).collect();
    filled.losses = [0.1235; forecasters::EXPERTS];
    let mut full = EstimatorState::default();
    for k in 0..MAX_KEYS {
        let models = [("gpt-4o".to_string(), filled.clone()), ("claude-sonnet-4".to_string(), filled.clone())].into();
        let key = KeyStats { n: 1_000_000, updated: 1_000_000, models };
        full.job_types.entry("security_vulnerability_scan".into()).or_default().insert(format!("namespace-{k:04}"), key);
    }
    full.seen = (0..SEEN_CAP).map(|i| format!("0b5a7e6c-1f7d-4c1e-9a51-2f0c8c1d{i:04}/1")).collect();
    assert_eq!(full.key_model_count(), MAX_KEY_MODELS);
    let size = full.to_json().len();
    println!("a full state is {size} bytes");
    assert!(size < 900_000, "{size} bytes for {MAX_KEYS} keys of two models");
    // One more model anywhere evicts the least recently updated key: the cap holds in key-models too.
    full.job_types.get_mut("security_vulnerability_scan").unwrap().get_mut("namespace-0001").unwrap().updated = 2_000_000;
    let mut more = full.job_types["security_vulnerability_scan"]["namespace-0001"].clone();
    more.models.insert("gpt-4.1".into(), filled.clone());
    full.job_types.get_mut("security_vulnerability_scan").unwrap().insert("namespace-0001".into(), more);
    full.evict();
    assert!(full.key_model_count() <= MAX_KEY_MODELS);
    assert!(!full.job_types["security_vulnerability_scan"].contains_key("namespace-0000"), "the oldest key went");
    assert_eq!(full.job_types["security_vulnerability_scan"]["namespace-0001"].models.len(), 3);
}

#[test]
fn roundtrip_through_json() {
    let mut s = EstimatorState::default();
    record(&mut s, "a/1", "ns", 1_000);
    record(&mut s, "b/1", "other", 5_000);
    let (back, warning) = EstimatorState::from_json(Some(&s.to_json()));
    assert_eq!(warning, None);
    assert_eq!(back, s);
    assert!(s.to_json().contains("\"version\":4"));
}

#[test]
fn missing_corrupt_or_other_version_state_is_empty() {
    let version_2 = r#"{"version":2,"clock":3,"jobTypes":{"scan":{"n":3,"updated":3,"models":{}}},"seen":["a/1"]}"#;
    for (text, warns) in [(None, false), (Some("{not json"), true), (Some(""), true), (Some(version_2), true)] {
        let (state, warning) = EstimatorState::from_json(text);
        assert_eq!(state, EstimatorState::default(), "{text:?}");
        assert_eq!(warning.is_some(), warns, "{text:?}");
    }
    let (_, warning) = EstimatorState::from_json(Some(version_2));
    assert!(warning.unwrap().contains("version 2, expected 4: discarding it and relearning"));
}

#[test]
fn a_hand_edited_state_is_brought_back_within_bounds() {
    let mut s = EstimatorState::default();
    record(&mut s, "a/1", "ns", 1_000);
    let mut m = model(&s, "ns").clone();
    m.runs = vec![[1.0, 0.0]; WINDOW * 2];
    m.p90_offset = 1e9;
    s.job_types.get_mut("scan").unwrap().get_mut("ns").unwrap().models.insert("gpt-4o".into(), m);
    s.job_types
        .get_mut("scan")
        .unwrap()
        .get_mut("ns")
        .unwrap()
        .models
        .insert("bad".into(), ModelStats { p90_offset: f64::NAN, ..ModelStats::default() });
    let clean = s.sanitized();
    assert_eq!(model(&clean, "ns").runs.len(), WINDOW);
    assert_eq!(model(&clean, "ns").p90_offset, OFFSET_RANGE.1);
    assert!(!clean.job_types["scan"]["ns"].models.contains_key("bad"));
}

#[test]
fn cached_tokens_make_their_own_fraction() {
    let mut s = EstimatorState::default();
    s.record("a/1", "ns", "scan", &usage("gpt-4o", 10, 80, 10), &unit_prior(&["gpt-4o"]), &PriceTable::builtin());
    assert_eq!(model(&s, "ns").mix(), TokenCounts { input: 100_000, cached_input: 800_000, output: 100_000, ..Default::default() });
}

/// A state written by the previous release (version 3: two experts' losses per model).
const VERSION_3: &str = r#"{"version":3,"clock":12,"jobTypes":{"scan":{"team-a":{"n":12,"updated":12,"models":{"gpt-4o":{"n":12,"runs":[[11.5129,8.9227],[11.6,8.9227],[11.4,8.9227],[11.52,8.9227],[11.55,8.9227]],"losses":[0.21,0.35],"p90Offset":0.6,"inputFrac":0.7,"cachedFrac":0.1,"outputFrac":0.2}}}}},"seen":["u/1","u/2"]}"#;

#[test]
fn a_version_3_state_is_migrated_without_losing_what_it_learned() {
    let (state, note) = EstimatorState::from_json(Some(VERSION_3));
    assert!(note.unwrap().contains("version 3 migrated to 4"));
    assert_eq!((state.version, state.clock, state.seen.clone()), (VERSION, 12, vec!["u/1".to_string(), "u/2".to_string()]));
    let m = model(&state, "team-a");
    assert_eq!((m.n, m.runs.len(), m.p90_offset, m.input_frac), (12, 5, 0.6, 0.7), "runs, calibration and mix are kept");
    assert_eq!(m.losses, [0.0; forecasters::EXPERTS], "the experts restart even");
    // What it learned still makes the estimate: the median run (ln 11.52, about 100,000 tokens).
    let located = state.stats("team-a", "scan").unwrap().locate("gpt-4o", 7_500.0);
    assert_eq!((located.own_runs, located.prior_weight), (12, 0.0));
    assert!((located.mu - 11.52).abs() < 0.1, "{located:?}");
    assert_eq!(located.p90_offset, 0.6);
    // It is written back as version 4 and reads back as itself.
    let (again, note) = EstimatorState::from_json(Some(&state.to_json()));
    assert_eq!((again, note), (state, None));
}

#[test]
fn a_namespace_that_runs_bigger_elsewhere_starts_bigger_on_a_job_type_new_to_it() {
    let mut s = EstimatorState::default();
    let prices = PriceTable::builtin();
    let run = |s: &mut EstimatorState, ns: &str, job_type: &str, total: i64, i: usize| {
        let used = usage("gpt-4o", total * 8 / 10, 0, total - total * 8 / 10);
        assert!(s.record(&format!("{ns}/{job_type}/{i}"), ns, job_type, &used, &unit_prior(&["gpt-4o"]), &prices));
    };
    // The same cluster without "big".
    let mut alone = EstimatorState::default();
    for i in 0..5 {
        for (job_type, scale) in [("lint", 1), ("docs", 3), ("scan", 10)] {
            run(&mut s, "small", job_type, 10_000 * scale, i);
            run(&mut alone, "small", job_type, 10_000 * scale, i);
            run(&mut s, "big", job_type, 40_000 * scale, i);
        }
        run(&mut s, "small", "triage", 20_000, i);
        run(&mut alone, "small", "triage", 20_000, i);
    }
    // "big" has run 4x "small" on lint, docs and scan: on triage, which only "small" ran, it starts
    // at 4x (shrunk by 3/4 in ln for three comparisons), not at what "small" used. (One
    // namespace is a thin pool, which the spec's guess then tempers: see prior.rs.)
    let located = s.stats("big", "triage").unwrap().locate("gpt-4o", 1.0);
    let want = 20_000f64.ln() + 4f64.ln() * 0.75;
    assert!((located.prior.ratio - want).abs() < 1e-3 && (located.prior.votes[0] - want).abs() < 1e-3, "{located:?}");
    assert!(located.prior.source.contains("for the namespace (from 3 jobType-model(s))"), "{}", located.prior.source);
    // And "small" is not moved by "big" on its own job type. (Its five runs still hear the
    // prior across jobTypes a little, and that prior, of two namespaces, is thin: each counts
    // within 10x of the spec's guess, one token here.)
    let own = s.stats("small", "triage").unwrap().locate("gpt-4o", 1.0);
    let without_big = alone.stats("small", "triage").unwrap().locate("gpt-4o", 1.0);
    assert!((own.mu - without_big.mu).abs() < 0.05, "{own:?} against {without_big:?}");
    assert!((own.mu - 20_000f64.ln()).abs() < 0.5, "{own:?}");
}

/// Five runs of `job_type` in `ns` on gpt-4o, `total` tokens each, for a job declaring `calls`.
fn runs_of(s: &mut EstimatorState, ns: &str, job_type: &str, calls: i64, total: i64) {
    let input = EstimateInput { job_type: job_type.into(), agent_models: vec!["gpt-4o".into()], tool_calls: vec![calls] };
    for i in 0..5 {
        let used = usage("gpt-4o", total * 8 / 10, 0, total - total * 8 / 10);
        assert!(s.record(&format!("{ns}/{job_type}/{i}"), ns, job_type, &used, &prior_tokens(&input), &PriceTable::builtin()));
    }
}

fn new_job_type(s: &EstimatorState, ns: &str, calls: i64) -> Located {
    let input = EstimateInput { job_type: "never-run".into(), agent_models: vec!["gpt-4o".into()], tool_calls: vec![calls] };
    s.stats(ns, "never-run").unwrap().locate("gpt-4o", prior_tokens(&input)["gpt-4o"].total() as f64)
}

#[test]
fn a_job_type_nobody_ran_follows_how_usage_scales_with_declared_work_across_job_types() {
    let prior = |calls: i64| 7_500 + 2_400 * calls;
    // Three teams (one running everything 3x the others) whose jobTypes use 10x the spec's
    // prior: a jobType declaring more work uses more.
    let mut follows = EstimatorState::default();
    // ... and a cluster where every jobType uses about 200,000 tokens whatever it declares.
    let mut ignores = EstimatorState::default();
    for (team, scale) in [("team-0", 1), ("team-1", 1), ("team-2", 3)] {
        for (i, calls) in [1, 3, 8, 20, 50, 120].into_iter().enumerate() {
            runs_of(&mut follows, team, &format!("type-{i}"), calls, prior(calls) * 10 * scale);
            runs_of(&mut ignores, team, &format!("type-{i}"), calls, 200_000 + 1_000 * i as i64);
        }
    }
    let (small, big) = (new_job_type(&follows, "team-new", 2), new_job_type(&follows, "team-new", 100));
    assert!((small.prior.elasticity - 1.0).abs() < 0.01, "team-2's scale is not a size effect: {:?}", small.prior);
    assert!((small.mu - (prior(2) as f64 * 10.0).ln()).abs() < 0.05, "{small:?}");
    assert!((big.mu - (prior(100) as f64 * 10.0).ln()).abs() < 0.05, "{big:?}");
    assert!(small.prior.source.contains("other jobTypes: 18 key-model(s) of 3 namespace(s)"), "{}", small.prior.source);
    let (small, big) = (new_job_type(&ignores, "team-new", 2), new_job_type(&ignores, "team-new", 100));
    assert!(small.prior.elasticity < 0.05, "{:?}", small.prior);
    for located in [small, big] {
        assert!((located.mu - 202_500f64.ln()).abs() < 0.05, "the cluster's typical jobType, whatever it declares: {located:?}");
    }
}

#[test]
fn a_tenants_many_extreme_job_types_are_one_vote_in_a_new_job_types_prior() {
    let mut s = EstimatorState::default();
    for (ns, scale) in [("team-a", 9), ("team-b", 10), ("team-c", 11)] {
        for calls in [2, 8, 30] {
            runs_of(&mut s, ns, &format!("work-{calls}"), calls, (7_500 + 2_400 * calls) * scale);
        }
    }
    let calm = new_job_type(&s, "team-new", 5);
    assert!((calm.prior.elasticity - 1.0).abs() < 0.01, "{:?}", calm.prior);
    // A tenant runs twenty jobTypes of its own, of every declared size, each a hundred million tokens.
    for i in 0..20 {
        runs_of(&mut s, "mallory", &format!("mallory-{i}"), 1 + 3 * i, 100_000_000);
    }
    let stormy = new_job_type(&s, "team-new", 5);
    assert!(stormy.prior.source.contains("of 4 namespace(s)"), "{}", stormy.prior.source);
    assert!((stormy.prior.elasticity - calm.prior.elasticity).abs() < 1e-3, "one slope against three: {:?}", stormy.prior);
    // Four namespaces, one vote each: the level moves to the next namespace's at most.
    assert!((stormy.mu - calm.mu).abs() <= 11f64.ln() - 10f64.ln() + 1e-9, "{calm:?} -> {stormy:?}");
}

#[test]
fn a_tenant_running_a_job_type_on_many_models_is_one_vote_in_the_any_model_pool() {
    let mut s = EstimatorState::default();
    let prices = PriceTable::builtin();
    let models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"];
    for i in 0..12 {
        for ns in ["team-a", "team-b"] {
            s.record(&format!("{ns}/{i}"), ns, "scan", &usage("gpt-4o", 80_000, 0, 20_000), &unit_prior(&["gpt-4o"]), &prices);
        }
        // One tenant runs the jobType on three models at one token each: three key-models, one namespace.
        for model in models {
            s.record(&format!("wild/{model}/{i}"), "wild", "scan", &usage(model, 1, 0, 0), &unit_prior(&[model]), &prices);
        }
    }
    let any = s.stats("team-new", "scan").unwrap().pooled_any.unwrap();
    assert!((any.ratio - 100_000f64.ln()).abs() < 0.01, "two namespaces at 100k against one at 1 token: {any:?}");
}

#[test]
fn one_or_two_namespaces_cannot_set_a_new_job_types_prior() {
    let spec = |calls: i64| ((7_500 + 2_400 * calls) as f64).ln();
    let cap = crate::domain::prior::THIN_CAP.ln();
    // A young cluster where only one tenant ran anything: one jobType at one token a run, or at
    // a billion. Another team's first job of a jobType nobody ran stays within 10x of the
    // spec's guess, and its p90 never drops below the spec's (3x the guess).
    for extreme in [1, 1_000_000_000] {
        let mut s = EstimatorState::default();
        runs_of(&mut s, "mallory", "mallory-work", 4, extreme);
        let first = new_job_type(&s, "team-new", 5);
        assert!(first.prior.source.contains("thin"), "{}", first.prior.source);
        assert!((first.mu - spec(5)).abs() <= cap + 1e-9, "one namespace at {extreme} tokens: {first:?}");
        assert!(first.mu + first.p90_offset >= spec(5) + prior_offset() - 1e-9, "{first:?}");
    }
    // An honest team at 10x the spec, then the tenant at one token: two votes, each within 10x
    // of the guess, so the tenant moves the new jobType's p50 by at most 10x, where before it
    // halved the distance in ln to one token (a 100x lower p50 here).
    let mut s = EstimatorState::default();
    runs_of(&mut s, "team-a", "work", 4, (7_500 + 2_400 * 4) * 10);
    let honest = new_job_type(&s, "team-new", 4);
    runs_of(&mut s, "mallory", "mallory-work", 4, 1);
    let poisoned = new_job_type(&s, "team-new", 4);
    assert!((honest.mu - poisoned.mu).abs() <= cap + 1e-3, "{honest:?} -> {poisoned:?}");
    assert!(poisoned.mu + poisoned.p90_offset >= spec(4) + prior_offset() - 1e-9, "{poisoned:?}");
    // From three namespaces on it is the plain one-vote-per-namespace median, as before.
    runs_of(&mut s, "team-b", "work", 4, (7_500 + 2_400 * 4) * 11);
    let quorum = new_job_type(&s, "team-new", 4);
    assert!(!quorum.prior.source.contains("thin") && quorum.mu > spec(4) + 2.0, "{quorum:?}");
}
