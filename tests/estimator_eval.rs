//! `agentgate estimator eval` on synthetic traces of every family `agentgate estimator synth`
//! generates (see the README's estimator section): calibrated, and more accurate than the naive
//! trailing-median reference on each, without being told which family it is on. Runs the real
//! binary, as a user would.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn agentgate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agentgate")).args(args).output().expect("running agentgate");
    assert!(out.status.success(), "agentgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `key=value` pairs of the summary line, which must be exactly the documented format.
fn summary(output: &str) -> BTreeMap<String, f64> {
    let last = output.lines().last().expect("some output");
    let keys: Vec<&str> = last.split(' ').map(|kv| kv.split('=').next().unwrap()).collect();
    assert_eq!(
        keys,
        ["records", "coverage_p90", "mdape_p50", "mdape_p50_after_warmup", "cold_start_ratio", "sharpness_p90"],
        "last line: {last}"
    );
    last.split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap_or_else(|_| panic!("{kv} is not a number")))
        })
        .collect()
}

/// A totals row (`ALL (naive)`, `ALL (hindsight)`): coverage, mdape, mdape after warmup, cold
/// ratio, sharpness, cold ratio per key.
fn totals(output: &str, name: &str) -> [f64; 6] {
    let row = output.lines().find(|l| l.starts_with(&format!("ALL ({name})"))).expect("a totals row");
    let cells: Vec<f64> = row.split_whitespace().skip(3).map(|c| c.parse().unwrap()).collect();
    cells.as_slice().try_into().unwrap_or_else(|_| panic!("row: {row}"))
}

fn naive(output: &str) -> [f64; 6] {
    totals(output, "naive")
}

fn evaluate(dir: &Path, family: &str, seed: &str) -> (BTreeMap<String, f64>, String) {
    let path = dir.join(format!("{family}-{seed}.jsonl"));
    std::fs::write(&path, agentgate(&["estimator", "synth", "--family", family, "--records", "3000", "--seed", seed])).unwrap();
    let output = agentgate(&["estimator", "eval", "--traces", path.to_str().unwrap()]);
    (summary(&output), output)
}

/// Per family: the margin by which the p50's MdAPE after warm-up must beat the naive one, and
/// how much wider than the hindsight reference's the p90 may be (hindsight knows each key's whole
/// trace, so a calibrated forecaster cannot be much sharper).
///
/// The traces are generated with seeds 11 and 12; the estimator's constants were tuned on seeds 1
/// and 2 of the first four families only. `regimes` was never run while tuning (see
/// `src/evaluation/families.rs`): it is the held-out family.
///
/// On `stationary` the naive trailing median of the job type, pooled over identical namespaces,
/// is at the noise floor (hindsight's constant per key does no better): the estimator beats it
/// on seeds 11 and 12 (by 0.007) but only ties it over seeds 1-8 (see the README), so the margin
/// asserted there is nought. Nor is its p90 always sharper there: on seed 12 (log-t tails with 2 degrees of freedom) a
/// calibrated p90 is 3.10x the p50 against the naive 3x at coverage 0.902, so the last figure (how
/// much wider than the naive 3x the p90 may be where 3x is calibrated) is 1.05 for it. On
/// `regimes` hindsight knows each key's level jumps in advance: the p90 may be 30 % wider than its.
const FAMILIES: [(&str, f64, f64, f64); 5] = [
    ("drift", 0.03, 1.1, 1.0),
    ("stationary", 0.0, 1.1, 1.05),
    ("tenants", 0.2, 1.1, 1.0),
    ("mixture", 0.02, 1.0, 1.0),
    ("regimes", 0.05, 1.3, 1.0),
];
const SEEDS: [&str; 2] = ["11", "12"];

#[test]
fn on_every_family_the_estimator_is_calibrated_and_beats_the_naive_reference() {
    let dir = tempfile::tempdir().unwrap();
    for (family, margin, width, versus_naive) in FAMILIES {
        for seed in SEEDS {
            let (ours, output) = evaluate(dir.path(), family, seed);
            let [naive_coverage, _, naive_warm, _, naive_sharpness, _] = naive(&output);
            let [_, _, hindsight_warm, _, hindsight_sharpness, _] = totals(&output, "hindsight");
            println!("{family} seed {seed}: {}", output.lines().last().unwrap());
            println!(
                "{family} seed {seed}: naive mdape_p50_after_warmup={naive_warm} coverage={naive_coverage}; hindsight {hindsight_warm}"
            );
            assert_eq!(ours["records"], 3000.0);
            assert!((0.87..=0.95).contains(&ours["coverage_p90"]), "{family} seed {seed}: coverage {}", ours["coverage_p90"]);
            assert!(
                ours["mdape_p50_after_warmup"] < naive_warm - margin,
                "{family} seed {seed}: p50 not better than the naive median by {margin}:\n{output}"
            );
            assert!(ours["sharpness_p90"] < hindsight_sharpness * width, "{family} seed {seed}: p90 wider than hindsight's:\n{output}");
            if naive_coverage >= 0.87 {
                // Where 3x the median is itself calibrated, the estimator's p90 is sharper.
                assert!(
                    ours["sharpness_p90"] < naive_sharpness * versus_naive,
                    "{family} seed {seed}: p90 no sharper than 3x the median:\n{output}"
                );
            }
        }
    }
}

#[test]
fn the_shipped_sample_evaluates_to_the_documented_last_line() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/traces/sample.jsonl");
    let output = agentgate(&["estimator", "eval", "--traces", sample.to_str().unwrap(), "--warmup", "10"]);
    let figures = summary(&output);
    assert_eq!(figures["records"], 240.0);
    for job_type in ["security_vulnerability_scan", "content_generation", "product_import", "code_review"] {
        assert!(output.lines().any(|l| l.starts_with(job_type)), "no row for {job_type}:\n{output}");
    }
}

#[test]
fn a_malformed_trace_is_refused_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, "{\"spec\": {\"agents\": {\"primary\": {\"model\": \"gpt-4o\"}}}, \"usage\": []}\n{\"spec\": 1\n").unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_agentgate")).args(["estimator", "eval", "--traces", path.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.jsonl: line 2:"), "{stderr}");
}
