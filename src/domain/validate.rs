//! Checking a job's input (and its agents' output) against the JSON Schema the job declares.
//!
//! Schemas come from users, so they are compiled with remote and file `$ref` resolution
//! compiled out (no network or filesystem reach from a manifest) and size-limited first.

use serde_json::Value;

const MAX_SCHEMA_BYTES: usize = 64 * 1024;
const MAX_SCHEMA_DEPTH: usize = 32;
const MAX_ERRORS: usize = 10;

/// `Err` lists each failing path with what is wrong there, or why the schema itself is unusable.
pub fn check_against_schema(what: &str, value: Option<&Value>, schema: Option<&Value>) -> Result<(), Vec<String>> {
    let Some(schema) = schema else { return Ok(()) };
    let size = serde_json::to_vec(schema).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_SCHEMA_BYTES {
        return Err(vec![format!("{what}Schema is {size} bytes, at most {MAX_SCHEMA_BYTES} allowed")]);
    }
    if depth(schema) > MAX_SCHEMA_DEPTH {
        return Err(vec![format!("{what}Schema nests deeper than {MAX_SCHEMA_DEPTH} levels")]);
    }
    let validator = jsonschema::validator_for(schema).map_err(|e| vec![format!("{what}Schema is not a valid JSON Schema: {e}")])?;
    let null = Value::Null;
    let instance = value.unwrap_or(&null);
    let mut errors: Vec<String> = validator
        .iter_errors(instance)
        .take(MAX_ERRORS + 1)
        .map(|e| {
            let path = e.instance_path().to_string();
            format!("{what}{}: {e}", if path.is_empty() { String::new() } else { path })
        })
        .collect();
    if errors.len() > MAX_ERRORS {
        errors.truncate(MAX_ERRORS);
        errors.push("(more errors not shown)".into());
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
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
        assert!(check_against_schema("input", Some(&json!({})), Some(&remote)).is_err());
        let mut deep = json!({"type": "object"});
        for _ in 0..40 {
            deep = json!({"properties": {"a": deep}});
        }
        assert!(check_against_schema("input", Some(&json!({})), Some(&deep)).unwrap_err()[0].contains("nests deeper"));
        let broken = json!({"type": "no-such-type"});
        assert!(check_against_schema("input", Some(&json!({})), Some(&broken)).unwrap_err()[0].contains("not a valid JSON Schema"));
    }
}
