//! Checking a job's input (and its agents' output) against the JSON Schema the job declares.
//!
//! Schemas and input come from users and run inside the operator, so every cost is bounded
//! before any work is done:
//! - remote and file `$ref` resolution is compiled out (no network or filesystem reach);
//! - a schema is size- and depth-limited, may only `$ref` into itself, may not `$ref` in a cycle,
//!   and may not expand through `$ref`s to more than [`MAX_EXPANDED_NODES`] nodes. A 1 KiB schema
//!   of 30 `anyOf`s that each `$ref` the next twice otherwise costs 2^30 evaluations;
//! - `pattern`s run on the linear-time `regex` engine, not a backtracking one, and compiling
//!   them is bounded too: at most [`MAX_SCHEMA_PATTERNS`] distinct regular expressions, each
//!   within [`PATTERN_SIZE_LIMIT`]. One `\pL{200}` took 0.1-0.2 s to compile under the regex
//!   crate's default 10 MiB limit, and a 64 KiB schema holds 2,300 of them: one job kept a
//!   reconcile worker busy for over ten minutes per generation (tests/isolation.rs
//!   `a_schema_full_of_costly_patterns_is_refused_at_once_and_others_are_served`);
//! - the input is size- and depth-limited (it becomes an environment variable of every agent),
//!   and its values times the schema's subschemas may not pass [`MAX_VALIDATION_CHECKS`];
//! - errors are few and short, since they end up in status conditions and Events.

use std::collections::BTreeMap;

use serde_json::Value;

const MAX_SCHEMA_BYTES: usize = 64 * 1024;
const MAX_SCHEMA_DEPTH: usize = 32;
/// Schema nodes after inlining every `$ref`: bounds validation at this many checks per value.
pub const MAX_EXPANDED_NODES: u64 = 20_000;
/// Checks one validation may take at most, bounded by the value's nodes times the schema's
/// (with `$ref`s inlined). Within the two limits above, a 64 KiB input of 32,000 zeros against
/// a 3.6 KiB schema of 19,900 subschemas (97 references to 100 `minimum`s) took 3×10^8 checks
/// and 14 s of a reconcile's worker thread (tests/isolation.rs
/// `an_input_checked_against_a_schema_at_a_cost_of_their_product_is_refused_at_once`); this
/// many take about 0.1 s at that pace.
pub const MAX_VALIDATION_CHECKS: u64 = 2_000_000;
/// Distinct regular expressions a schema compiles: `pattern` values and `patternProperties` keys.
pub const MAX_SCHEMA_PATTERNS: usize = 32;
/// Compiled size of one pattern (the regex crate's `size_limit`, 10 MiB by default): within it a
/// pattern compiles in milliseconds, and `^[\p{L} ]{1,20}$` still fits.
pub const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// Each pattern's lazy DFA cache while matching (the regex crate's default is 2 MiB): bounds the
/// memory of the 32 patterns of a schema together.
const PATTERN_DFA_SIZE_LIMIT: usize = 256 << 10;
/// Agents get the input as one environment variable; Linux refuses a single one over 128 KiB.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
pub const MAX_INPUT_DEPTH: usize = 32;
pub const MAX_ERRORS: usize = 10;
/// Longest single error message, in bytes: messages quote the offending value.
pub const MAX_ERROR_BYTES: usize = 300;

/// `Err` lists each failing path with what is wrong there, or why the schema itself is unusable.
/// At most [`MAX_ERRORS`] + 1 entries of at most [`MAX_ERROR_BYTES`] (+ an ellipsis) each.
pub fn check_against_schema(what: &str, value: Option<&Value>, schema: Option<&Value>) -> Result<(), Vec<String>> {
    let Some(schema) = schema else { return Ok(()) };
    let (validator, expanded) = compile(what, schema).map_err(|e| vec![e])?;
    let null = Value::Null;
    let instance = value.unwrap_or(&null);
    let checks = expanded.saturating_mul(nodes(instance));
    if checks > MAX_VALIDATION_CHECKS {
        return Err(vec![format!(
            "{what} has {} values and {what}Schema {expanded} subschemas: checking one against the other takes up to {checks} \
             checks, at most {MAX_VALIDATION_CHECKS} allowed: make the schema or the {what} smaller",
            nodes(instance)
        )]);
    }
    let mut errors: Vec<String> = validator
        .iter_errors(instance)
        .take(MAX_ERRORS + 1)
        .map(|e| {
            // The path names the input's keys and the error may quote its values, raw: escaped
            // before cut, so the cut never lands inside an escape.
            let path = e.instance_path().to_string();
            bounded(&super::terminal_text::message(&format!("{what}{path}: {e}")))
        })
        .collect();
    if errors.len() > MAX_ERRORS {
        errors.truncate(MAX_ERRORS);
        errors.push("(more errors not shown)".into());
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// Whether `schema` is one the operator will evaluate: `Err` says why not.
pub fn check_schema(what: &str, schema: &Value) -> Result<(), String> {
    compile(what, schema).map(|_| ())
}

/// Whether the input fits where it goes (an environment variable) and nests reasonably.
pub fn check_input_size(input: Option<&Value>) -> Result<(), String> {
    let Some(input) = input else { return Ok(()) };
    let size = serde_json::to_vec(input).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_INPUT_BYTES {
        return Err(format!(
            "spec.input is {size} bytes as JSON, at most {MAX_INPUT_BYTES} allowed: agents receive it in the AGENTGATE_INPUT environment variable"
        ));
    }
    if depth(input) > MAX_INPUT_DEPTH {
        return Err(format!("spec.input nests deeper than {MAX_INPUT_DEPTH} levels"));
    }
    Ok(())
}

/// The validator, and the schema's nodes with every `$ref` inlined.
fn compile(what: &str, schema: &Value) -> Result<(jsonschema::Validator, u64), String> {
    let size = serde_json::to_vec(schema).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_SCHEMA_BYTES {
        return Err(format!("{what}Schema is {size} bytes, at most {MAX_SCHEMA_BYTES} allowed"));
    }
    if depth(schema) > MAX_SCHEMA_DEPTH {
        return Err(format!("{what}Schema nests deeper than {MAX_SCHEMA_DEPTH} levels"));
    }
    let expanded = expanded_nodes(schema).map_err(|why| format!("{what}Schema {why}"))?;
    if expanded > MAX_EXPANDED_NODES {
        return Err(format!("{what}Schema expands through $ref to more than {MAX_EXPANDED_NODES} subschemas"));
    }
    let patterns = distinct_patterns(schema);
    if patterns > MAX_SCHEMA_PATTERNS {
        return Err(format!(
            "{what}Schema has {patterns} distinct patterns (pattern, patternProperties), at most {MAX_SCHEMA_PATTERNS} allowed: \
             each is compiled into a regular expression"
        ));
    }
    let patterns = jsonschema::PatternOptions::regex().size_limit(PATTERN_SIZE_LIMIT).dfa_size_limit(PATTERN_DFA_SIZE_LIMIT);
    let validator = jsonschema::options().with_pattern_options(patterns).build(schema).map_err(|e| {
        let e = e.to_string();
        // A pattern over the size limit is reported like a malformed one: say which limit.
        let hint = if e.contains("is not a \"regex\"") { " (a pattern may compile to at most 1 MiB)" } else { "" };
        bounded(&format!("{what}Schema is not a valid JSON Schema: {e}{hint}"))
    })?;
    Ok((validator, expanded))
}

/// Distinct strings the schema would compile as regular expressions: every string under a
/// `pattern` key and every key of a `patternProperties` object, wherever they are (also inside
/// `const` or `examples`, which over-counts safely). The compiler caches them by text.
fn distinct_patterns(schema: &Value) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![schema];
    while let Some(node) = stack.pop() {
        match node {
            Value::Object(map) => {
                for (key, child) in map {
                    match (key.as_str(), child) {
                        ("pattern", Value::String(p)) => {
                            seen.insert(p.as_str());
                        }
                        ("patternProperties", Value::Object(props)) => seen.extend(props.keys().map(String::as_str)),
                        _ => {}
                    }
                    stack.push(child);
                }
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    seen.len()
}

/// Nodes of `schema` with every `$ref` replaced by its target, saturating. `Err` for a `$ref`
/// that is not a JSON pointer into the schema itself, or one that (indirectly) contains itself.
fn expanded_nodes(schema: &Value) -> Result<u64, String> {
    struct Walk<'a> {
        root: &'a Value,
        /// Expanded size of each `$ref` target already computed.
        done: BTreeMap<String, u64>,
        /// `$ref` targets being expanded, to find cycles.
        open: Vec<String>,
    }
    impl Walk<'_> {
        fn size(&mut self, node: &Value) -> Result<u64, String> {
            // Depth is already bounded by MAX_SCHEMA_DEPTH and `$ref` nesting by the cycle
            // check, so recursion here cannot overflow the stack.
            let children = match node {
                Value::Object(map) => {
                    for key in ["$dynamicRef", "$recursiveRef"] {
                        if map.contains_key(key) {
                            return Err(format!("uses {key}, which is not supported"));
                        }
                    }
                    let mut sum = 0u64;
                    if let Some(reference) = map.get("$ref") {
                        sum = sum.saturating_add(self.target(reference)?);
                    }
                    for (key, child) in map {
                        if key != "$ref" {
                            sum = sum.saturating_add(self.size(child)?);
                        }
                    }
                    sum
                }
                Value::Array(items) => {
                    let mut sum = 0u64;
                    for item in items {
                        sum = sum.saturating_add(self.size(item)?);
                    }
                    sum
                }
                _ => 0,
            };
            Ok(children.saturating_add(1))
        }

        fn target(&mut self, reference: &Value) -> Result<u64, String> {
            let Some(reference) = reference.as_str() else { return Err("has a $ref that is not a string".into()) };
            let Some(pointer) = reference.strip_prefix('#') else {
                return Err(format!("has $ref {:?}: only references into the schema itself (#/...) are allowed", short(reference)));
            };
            if let Some(size) = self.done.get(pointer) {
                return Ok(*size);
            }
            if self.open.iter().any(|p| p == pointer) {
                return Err(format!("has a $ref cycle through {:?}: recursive schemas are not supported", short(reference)));
            }
            // `$ref`s are URI fragments: `%25` is `%`, `%20` a space, before the JSON pointer is read.
            let pointer_decoded = percent_encoding::percent_decode_str(pointer).decode_utf8_lossy();
            let Some(target) = self.root.pointer(&pointer_decoded) else {
                return Err(format!("has $ref {:?}, which points nowhere in the schema", short(reference)));
            };
            self.open.push(pointer.to_string());
            let size = self.size(target);
            self.open.pop();
            let size = size?;
            self.done.insert(pointer.to_string(), size);
            Ok(size)
        }
    }
    Walk { root: schema, done: BTreeMap::new(), open: Vec::new() }.size(schema)
}

fn short(s: &str) -> String {
    bounded_to(s, 80)
}

/// `s` cut to [`MAX_ERROR_BYTES`] on a character boundary, with an ellipsis when cut.
pub fn bounded(s: &str) -> String {
    bounded_to(s, MAX_ERROR_BYTES)
}

/// `s` cut to `max` bytes on a character boundary, with an ellipsis when cut.
pub fn bounded_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Values in `value`, itself and every one nested in it.
fn nodes(value: &Value) -> u64 {
    let mut count = 0u64;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        count += 1;
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    count
}

fn depth(value: &Value) -> usize {
    // Iterative so a hostile document cannot overflow the stack.
    let mut max = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "required": ["repositoryPath"], "properties": {
            "repositoryPath": {"type": "string", "pattern": "^/"},
            "scanDepth": {"enum": ["quick", "full"]}}})
    }

    /// Within the size, depth and expansion limits, 32,000 zeros against 19,900 subschemas took
    /// 3×10^8 checks and 14 s; refused before any, while a big input against a small schema is
    /// still checked.
    #[test]
    fn an_input_checked_against_a_schema_at_a_cost_of_their_product_is_refused_at_once() {
        let minimums: Vec<Value> = (1..=100).map(|i| json!({"minimum": -i})).collect();
        let zeros = json!({"type": "array", "items": {"allOf": vec![json!({"$ref": "#/$defs/m"}); 97]}});
        let costly = json!({"$defs": {"m": {"allOf": minimums}}, "properties": {"zeros": zeros}});
        let input = json!({"zeros": vec![0; 32_000]});
        assert!(check_input_size(Some(&input)).is_ok() && check_schema("input", &costly).is_ok(), "within every other limit");
        let started = std::time::Instant::now();
        let errors = check_against_schema("input", Some(&input), Some(&costly)).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("input has 32002 values and inputSchema 19900 subschemas") && errors[0].contains("at most 2000000"),
            "{errors:?}"
        );
        let plain = json!({"properties": {"zeros": {"type": "array", "items": {"type": "integer", "minimum": 0}}}});
        assert_eq!(check_against_schema("input", Some(&input), Some(&plain)), Ok(()));
        let negative = json!({"zeros": [0, -1]});
        assert!(check_against_schema("input", Some(&negative), Some(&plain)).unwrap_err()[0].starts_with("input/zeros/1: -1 is less than"));
    }

    #[test]
    fn valid_input_passes_and_missing_schema_accepts_anything() {
        assert!(check_against_schema("input", Some(&json!({"repositoryPath": "/src", "scanDepth": "full"})), Some(&schema())).is_ok());
        assert!(check_against_schema("input", Some(&json!(42)), None).is_ok());
    }

    #[test]
    fn invalid_input_names_each_failing_path() {
        let errors =
            check_against_schema("input", Some(&json!({"repositoryPath": "src", "scanDepth": "deep"})), Some(&schema())).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("input/repositoryPath:")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("input/scanDepth:")), "{errors:?}");
        let missing = check_against_schema("input", None, Some(&schema())).unwrap_err();
        assert!(missing[0].contains("null"), "{missing:?}");
    }

    #[test]
    fn hostile_schemas_are_refused_not_followed() {
        let remote = json!({"$ref": "https://example.invalid/schema.json"});
        assert!(check_against_schema("input", Some(&json!({})), Some(&remote)).unwrap_err()[0].contains("only references into the schema"));
        let mut deep = json!({"type": "object"});
        for _ in 0..40 {
            deep = json!({"properties": {"a": deep}});
        }
        assert!(check_against_schema("input", Some(&json!({})), Some(&deep)).unwrap_err()[0].contains("nests deeper"));
        let broken = json!({"type": "no-such-type"});
        assert!(check_against_schema("input", Some(&json!({})), Some(&broken)).unwrap_err()[0].contains("not a valid JSON Schema"));
    }

    /// `a0` is `anyOf: [a1, a1]`, ... : 2^levels evaluations for a value none of them accepts.
    fn any_of_bomb(levels: usize) -> Value {
        let mut defs = serde_json::Map::new();
        for i in 0..levels {
            let next = format!("#/$defs/a{}", i + 1);
            defs.insert(format!("a{i}"), json!({"anyOf": [{"$ref": next}, {"$ref": next}]}));
        }
        defs.insert(format!("a{levels}"), json!({"type": "string"}));
        json!({"$defs": defs, "$ref": "#/$defs/a0"})
    }

    #[test]
    fn schema_bombs_are_refused_before_they_run() {
        let started = std::time::Instant::now();
        let errors = check_against_schema("input", Some(&json!(1)), Some(&any_of_bomb(40))).unwrap_err();
        assert!(errors[0].contains("expands through $ref to more than 20000 subschemas"), "{errors:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "refusing took {:?}", started.elapsed());
        // A few levels are an ordinary schema that shares definitions.
        assert!(check_against_schema("input", Some(&json!("x")), Some(&any_of_bomb(5))).is_ok());

        let cases: &[(&str, Value, &str)] = &[
            ("direct cycle", json!({"$ref": "#"}), "$ref cycle"),
            ("recursion through properties", json!({"properties": {"a": {"$ref": "#"}}}), "$ref cycle"),
            (
                "mutual recursion",
                json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
                "$ref cycle",
            ),
            ("dangling", json!({"$ref": "#/$defs/nope"}), "points nowhere"),
            ("anchor", json!({"$ref": "other.json#/x"}), "only references into the schema"),
            ("dynamic", json!({"$dynamicRef": "#meta"}), "$dynamicRef"),
            ("not a string", json!({"$ref": 7}), "not a string"),
        ];
        for (name, schema, want) in cases {
            let err = check_schema("input", schema).unwrap_err();
            assert!(err.contains(want), "{name}: {err}");
        }
        // References by escaped pointer still resolve.
        let escaped = json!({"$defs": {"a/b": {"type": "string"}, "c d": {"type": "string"}},
            "anyOf": [{"$ref": "#/$defs/a~1b"}, {"$ref": "#/$defs/c%20d"}]});
        assert!(check_against_schema("input", Some(&json!("x")), Some(&escaped)).is_ok());
    }

    #[test]
    fn patterns_run_in_linear_time() {
        let schema = json!({"type": "string", "pattern": "^(a+)+$"});
        let started = std::time::Instant::now();
        let evil = format!("{}!", "a".repeat(5000));
        assert!(check_against_schema("input", Some(&json!(evil)), Some(&schema)).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "took {:?}", started.elapsed());
    }

    /// Compiling a pattern is not linear in its text: `\pL{200}` is 8 bytes and took 0.1-0.2 s.
    #[test]
    fn costly_patterns_are_refused_before_they_compile() {
        let many: Vec<Value> = (0..2000).map(|i| json!({"pattern": format!("\\p{{L}}{{200}}{i}")})).collect();
        let started = std::time::Instant::now();
        let err = check_schema("input", &json!({"allOf": many})).unwrap_err();
        assert!(err.contains("2000 distinct patterns") && err.contains("at most 32"), "{err}");
        let keys: serde_json::Map<String, Value> = (0..40).map(|i| (format!("^k{i}$"), json!({}))).collect();
        let err = check_schema("input", &json!({"patternProperties": keys})).unwrap_err();
        assert!(err.contains("40 distinct patterns"), "{err}");
        let huge = check_schema("input", &json!({"pattern": "\\p{L}{200}"})).unwrap_err();
        assert!(huge.contains("at most 1 MiB"), "{huge}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "refusing took {:?}", started.elapsed());
        // The same pattern repeated is compiled once, and ordinary patterns pass.
        let repeated: Vec<Value> = (0..100).map(|_| json!({"pattern": "^[a-z]+$"})).collect();
        assert!(check_against_schema("input", Some(&json!("abc")), Some(&json!({"allOf": repeated}))).is_ok());
        let letters = json!({"type": "string", "pattern": "^[\\p{L} ]{1,20}$"});
        assert!(check_against_schema("input", Some(&json!("Grüße aus Köln")), Some(&letters)).is_ok());
        assert!(check_against_schema("input", Some(&json!("42")), Some(&letters)).is_err());
    }

    #[test]
    fn errors_are_short_even_for_huge_values() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "integer"}});
        let huge = "x".repeat(100_000);
        let mut input = serde_json::Map::new();
        for i in 0..50 {
            input.insert(format!("k{i}"), json!(huge.clone()));
        }
        let errors = check_against_schema("input", Some(&Value::Object(input)), Some(&schema)).unwrap_err();
        assert_eq!(errors.len(), MAX_ERRORS + 1, "{errors:?}");
        assert!(errors.iter().all(|e| e.len() <= MAX_ERROR_BYTES + '…'.len_utf8()), "{errors:?}");
    }

    #[test]
    fn input_is_limited_in_size_and_depth() {
        assert!(check_input_size(None).is_ok());
        assert!(check_input_size(Some(&json!({"repositoryPath": "/src"}))).is_ok());
        let big = json!({"blob": "x".repeat(MAX_INPUT_BYTES)});
        assert!(check_input_size(Some(&big)).unwrap_err().contains("AGENTGATE_INPUT"));
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!({"a": deep});
        }
        assert!(check_input_size(Some(&deep)).unwrap_err().contains("nests deeper than 32"));
    }
}
