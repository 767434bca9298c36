//! Property tests of the two parsers that take hostile input inside the operator: the agents'
//! termination messages (`domain::report`) and the jobs' JSON Schemas and input
//! (`domain::validate`). 100,000 generated cases in all: none may panic, take long or answer
//! with an unbounded message, and the whole binary stays within a fixed memory budget.

use std::time::{Duration, Instant};

use agentgate::domain::report::parse_report;
use agentgate::domain::validate::{MAX_ERROR_BYTES, MAX_ERRORS, check_against_schema, check_input_size, check_schema};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};

/// A single case slower than this is a bug (an exponential path), not a slow machine.
const SLOW: Duration = Duration::from_secs(2);
/// A parse error is one line of explanation (300 bytes plus a little context).
const MAX_REPORT_ERROR: usize = 400;

fn config(cases: u32) -> Config {
    // No regression files: a failure prints its minimal input, and CI has no place to keep them.
    Config { cases, failure_persistence: None, ..Config::default() }
}

fn run<S: Strategy>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let started = Instant::now();
    let mut runner = TestRunner::new(config(cases));
    runner
        .run(&strategy, |value| {
            let case = Instant::now();
            let result = test(value);
            prop_assert!(case.elapsed() < SLOW, "one case took {:?}", case.elapsed());
            result
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {} cases in {:.1?}", runner.config().cases, started.elapsed());
}

/// Numbers a hostile writer picks: boundaries, huge, negative, fractional, exponents.
fn hostile_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(json!(5e-324)),
        Just(json!(1_000_000_000_001i64)),
    ]
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[a-z0-9-]{1,20}",
        // Bidi overrides, zero-width characters, homoglyphs, control characters.
        "[\u{202e}\u{200b}\u{feff}\u{0430}\u{0000}\u{001b}a-c]{0,12}",
        (1usize..5000).prop_map(|n| "x".repeat(n)),
        Just("gpt-4o-mini".to_string()),
    ]
}

/// Any JSON value: deep, wide, long, numeric extremes.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf =
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool), hostile_number(), hostile_string().prop_map(Value::String),];
    // Shallow and small on purpose: generating big trees costs more than checking them, and
    // depth has its own strategies below.
    leaf.prop_recursive(5, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(hostile_string(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `levels` of `[` ... `]` (or `{"a":` ... `}`) around a value.
fn nested(levels: usize, objects: bool, inner: &str) -> String {
    if objects {
        format!("{}{inner}{}", "{\"a\":".repeat(levels), "}".repeat(levels))
    } else {
        format!("{}{inner}{}", "[".repeat(levels), "]".repeat(levels))
    }
}

fn check_report(message: &str) -> Result<(), TestCaseError> {
    match parse_report(message) {
        Ok(report) => {
            prop_assert!(report.usage.len() <= 64);
            for counts in report.usage.values() {
                for n in [counts.input, counts.cached_input, counts.output] {
                    // Up to 64 entries of at most 10^12 each may add up per model.
                    prop_assert!((0..=64_000_000_000_000).contains(&n), "token count {n}");
                }
            }
            // What is kept can be written back and read again by any client (serde_json's
            // 128-level limit, with the job's own levels around it).
            if let Some(output) = &report.output {
                let text = serde_json::to_string(output).unwrap();
                let wrapped = format!("{{\"items\":[{{\"status\":{{\"output\":{text}}}}}]}}");
                prop_assert!(serde_json::from_str::<Value>(&wrapped).is_ok(), "output too deep to read back");
            }
        }
        Err(why) => prop_assert!(!why.is_empty() && why.len() <= MAX_REPORT_ERROR, "error of {} bytes: {why:.200}", why.len()),
    }
    Ok(())
}

#[test]
fn termination_messages_never_panic_and_errors_stay_short() {
    // Arbitrary text, including what a crashing agent leaves (FallbackToLogsOnError).
    run("report: any string", 25_000, any::<String>(), |s| check_report(&s));
    run("report: any bytes", 10_000, prop::collection::vec(any::<u8>(), 0..2048), |b| check_report(&String::from_utf8_lossy(&b)));

    // Well-formed JSON of the right shape with hostile contents.
    let usage_entry = (
        prop_oneof![hostile_string().prop_map(Value::String), json_value()],
        hostile_number(),
        prop_oneof![hostile_number(), Just(Value::Null)],
        hostile_number(),
        prop::option::of(("[a-z]{1,8}", json_value())),
    )
        .prop_map(|(model, input, cached, output, extra)| {
            let mut entry = json!({"model": model, "inputTokens": input, "outputTokens": output});
            if !cached.is_null() {
                entry["cachedInputTokens"] = cached;
            }
            if let Some((key, value)) = extra {
                entry[key] = value;
            }
            entry
        });
    let report = (prop::collection::vec(usage_entry, 0..8), prop::option::of(json_value()))
        .prop_map(|(usage, output)| json!({"usage": usage, "output": output}).to_string());
    run("report: hostile usage", 20_000, report, |s| check_report(&s));

    // Nesting around and inside the report, up to well past serde_json's limit.
    let deep = (1usize..400, any::<bool>(), any::<bool>()).prop_map(|(levels, objects, inside)| {
        if inside { format!("{{\"usage\": [], \"output\": {}}}", nested(levels, objects, "1")) } else { nested(levels, objects, "{}") }
    });
    run("report: deep nesting", 5_000, deep, |s| check_report(&s));
    assert_memory_bounded();
}

/// JSON Schema keywords put together without regard for sense: combinators, `$ref`s into
/// `$defs` (including cycles and dangling ones), patterns, extreme bounds.
fn hostile_schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        prop::sample::select(vec!["string", "integer", "number", "object", "array", "boolean", "null", "nonsense"])
            .prop_map(|t| json!({"type": t})),
        "[a-z+*()|^$\\\\.\\[\\]{},?0-9]{0,16}".prop_map(|p| json!({"pattern": p})),
        hostile_number().prop_map(|n| json!({"minimum": n})),
        hostile_number().prop_map(|n| json!({"multipleOf": n})),
        hostile_number().prop_map(|n| json!({"maxLength": n})),
        (0usize..6).prop_map(|i| json!({"$ref": format!("#/$defs/d{i}")})),
        Just(json!({"$ref": "#"})),
        Just(json!({"$ref": "https://example.invalid/s.json"})),
        json_value().prop_map(|v| json!({"const": v})),
        prop::collection::vec(json_value(), 0..4).prop_map(|v| json!({"enum": v})),
        Just(json!(true)),
        Just(json!(false)),
        json_value(),
    ];
    let schema = leaf.prop_recursive(6, 64, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(|v| json!({"anyOf": v})),
            prop::collection::vec(inner.clone(), 1..4).prop_map(|v| json!({"allOf": v})),
            prop::collection::vec(inner.clone(), 1..4).prop_map(|v| json!({"oneOf": v})),
            inner.clone().prop_map(|v| json!({"not": v})),
            inner.clone().prop_map(|v| json!({"items": v})),
            prop::collection::btree_map("[a-c]", inner.clone(), 1..3).prop_map(|m| json!({"properties": m})),
            (inner.clone(), inner.clone(), inner).prop_map(|(i, t, e)| json!({"if": i, "then": t, "else": e})),
        ]
    });
    (schema.clone(), prop::collection::vec(schema, 0..6)).prop_map(|(mut root, defs)| {
        if let Value::Object(map) = &mut root {
            let defs: Map<String, Value> = defs.into_iter().enumerate().map(|(i, d)| (format!("d{i}"), d)).collect();
            map.insert("$defs".into(), Value::Object(defs));
        }
        root
    })
}

/// `a0` is `anyOf: [a1, a1]` and so on: 2^levels evaluations unless refused up front.
fn any_of_bomb(levels: usize, width: usize) -> Value {
    let mut defs = Map::new();
    for i in 0..levels {
        let next = json!({"$ref": format!("#/$defs/a{}", i + 1)});
        defs.insert(format!("a{i}"), json!({"anyOf": vec![next; width]}));
    }
    defs.insert(format!("a{levels}"), json!({"type": "string"}));
    json!({"$defs": defs, "$ref": "#/$defs/a0"})
}

fn check_validation(schema: &Value, instance: &Value) -> Result<(), TestCaseError> {
    for what in ["input", "output"] {
        if let Err(errors) = check_against_schema(what, Some(instance), Some(schema)) {
            prop_assert!(!errors.is_empty() && errors.len() <= MAX_ERRORS + 1, "{} errors", errors.len());
            for e in &errors {
                prop_assert!(e.len() <= MAX_ERROR_BYTES + '…'.len_utf8(), "error of {} bytes", e.len());
            }
        }
    }
    // Compiling alone agrees with validating: a schema refused up front is refused either way.
    if let Err(why) = check_schema("input", schema) {
        prop_assert!(why.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        prop_assert!(check_against_schema("input", Some(instance), Some(schema)).is_err());
    }
    Ok(())
}

#[test]
fn schemas_and_input_never_panic_run_long_or_answer_at_length() {
    run("schema: hostile schema and value", 25_000, (hostile_schema(), json_value()), |(schema, instance)| {
        check_validation(&schema, &instance)
    });
    run("schema: bombs", 2_000, (1usize..60, 1usize..6, json_value()), |(levels, width, instance)| {
        check_validation(&any_of_bomb(levels, width), &instance)
    });
    run("schema: any value as a schema", 8_000, (json_value(), json_value()), |(schema, instance)| check_validation(&schema, &instance));
    run("input: size and depth", 5_000, json_value(), |input| {
        if let Err(why) = check_input_size(Some(&input)) {
            prop_assert!(why.len() <= MAX_ERROR_BYTES);
        }
        Ok(())
    });
    assert_memory_bounded();
}

/// Peak resident memory of this test binary so far: both tests run in one process, so this is
/// a bound on everything they kept.
fn assert_memory_bounded() {
    // SAFETY: getrusage only writes into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let peak_mib = usage.ru_maxrss / 1024;
    eprintln!("peak resident memory: {peak_mib} MiB");
    assert!(peak_mib < 512, "peak resident memory {peak_mib} MiB");
}
