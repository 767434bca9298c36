//! `agentgate estimator eval` on synthetic traces: calibrated, sharper and more accurate than the
//! naive trailing-median reference. Runs the real binary, as a user would.

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

/// The naive reference's totals row: coverage, mdape, mdape after warmup, cold ratio, sharpness.
fn naive(output: &str) -> [f64; 5] {
    let row = output.lines().find(|l| l.starts_with("ALL (naive)")).expect("a naive totals row");
    let cells: Vec<f64> = row.split_whitespace().skip(3).map(|c| c.parse().unwrap()).collect();
    cells.as_slice().try_into().unwrap_or_else(|_| panic!("row: {row}"))
}

#[test]
fn on_generated_traces_the_estimator_is_calibrated_and_beats_the_naive_reference() {
    let dir = tempfile::tempdir().unwrap();
    for seed in ["1", "2", "3"] {
        let path = dir.path().join(format!("seed-{seed}.jsonl"));
        std::fs::write(&path, agentgate(&["estimator", "synth", "--records", "3000", "--seed", seed])).unwrap();
        let output = agentgate(&["estimator", "eval", "--traces", path.to_str().unwrap()]);
        let ours = summary(&output);
        let [_, _, naive_warm, _, naive_sharpness] = naive(&output);
        println!("seed {seed}: {}", output.lines().last().unwrap());
        println!("seed {seed}: naive mdape_p50_after_warmup={naive_warm} sharpness_p90={naive_sharpness}");
        assert_eq!(ours["records"], 3000.0);
        assert!((0.87..=0.95).contains(&ours["coverage_p90"]), "seed {seed}: coverage {}", ours["coverage_p90"]);
        assert!(ours["mdape_p50_after_warmup"] < naive_warm, "seed {seed}: p50 no better than the naive median:\n{output}");
        assert!(ours["sharpness_p90"] < naive_sharpness, "seed {seed}: p90 no sharper than 3x the median:\n{output}");
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
