//! Rendering an AgentJobTemplate into a complete, self-contained AgentJob (`kubectl agentgate
//! new`). Pure: the plugin reads the template and creates or prints the result.
//!
//! Only the template's declared parameters can be set, each checked against its type; the
//! result must be a valid AgentJob spec. The rendered job carries no reference the operator
//! follows: it is what the heads approve and what runs, whatever happens to the template later.

use std::collections::BTreeMap;

use serde_json::Value;

use super::digest::sha256_of_json;
use crate::api::{
    AgentJob, AgentJobSpec, AgentJobTemplate, ParameterType, TEMPLATE_DIGEST_ANNOTATION, TEMPLATE_GENERATION_LABEL, TEMPLATE_LABEL,
    TemplateParameter,
};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("--set {0:?}: expected NAME=VALUE")]
    NotAnAssignment(String),
    #[error("unknown parameter {name:?}: template {template} has {known}")]
    UnknownParameter { name: String, template: String, known: String },
    #[error("parameter {0:?} is set twice")]
    SetTwice(String),
    #[error("parameter {name:?} is required (--set {name}=...){}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    MissingRequired { name: String, description: Option<String> },
    #[error("parameter {name:?} must be {expected}, got {value:?}")]
    WrongType { name: String, expected: &'static str, value: String },
    #[error("template {template}: the default of parameter {name:?} is not {expected}")]
    BadDefault { template: String, name: String, expected: &'static str },
    #[error("template {template}: parameter {name:?} is required and has a default; it can only be one")]
    RequiredWithDefault { template: String, name: String },
    #[error("template {template}: parameter {name:?} has path {path:?}, which {why}")]
    BadPath { template: String, name: String, path: String, why: String },
    #[error("template {0}: a name longer than 63 characters cannot be recorded in the job's agentgate.dev/template label")]
    NameTooLong(String),
    #[error("template {template} rendered no valid AgentJob spec: {why}")]
    InvalidJob { template: String, why: String },
}

/// `--set` arguments as given: `NAME=VALUE`, split at the first `=`.
pub fn parse_sets(sets: &[String]) -> Result<Vec<(String, String)>, TemplateError> {
    sets.iter()
        .map(|s| s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| TemplateError::NotAnAssignment(s.clone())))
        .collect()
}

/// The job `template` renders to, named `name` in `namespace`, with `sets` applied.
pub fn render(template: &AgentJobTemplate, name: &str, namespace: &str, sets: &[(String, String)]) -> Result<AgentJob, TemplateError> {
    let template_name = template.metadata.name.clone().unwrap_or_default();
    if template_name.len() > 63 {
        return Err(TemplateError::NameTooLong(template_name));
    }
    let params = &template.spec.parameters;
    let mut given: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, value) in sets {
        if !params.iter().any(|p| &p.name == key) {
            let known = if params.is_empty() {
                "no parameters".to_string()
            } else {
                format!("parameters {}", params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "))
            };
            return Err(TemplateError::UnknownParameter { name: key.clone(), template: template_name, known });
        }
        if given.insert(key, value).is_some() {
            return Err(TemplateError::SetTwice(key.clone()));
        }
    }

    let mut spec = template.spec.job.spec.clone();
    for param in params {
        if param.required && param.default.is_some() {
            return Err(TemplateError::RequiredWithDefault { template: template_name, name: param.name.clone() });
        }
        let value = match (given.get(param.name.as_str()), &param.default) {
            (Some(text), _) => parse_value(param, text)?,
            (None, Some(default)) => {
                if !has_type(default, param.parameter_type) {
                    return Err(TemplateError::BadDefault {
                        template: template_name,
                        name: param.name.clone(),
                        expected: article(param.parameter_type),
                    });
                }
                default.clone()
            }
            (None, None) if param.required => {
                return Err(TemplateError::MissingRequired { name: param.name.clone(), description: param.description.clone() });
            }
            (None, None) => continue,
        };
        let path = param.path.clone().unwrap_or_else(|| param.name.clone());
        set_path(&mut spec, &path, value).map_err(|why| TemplateError::BadPath {
            template: template_name.clone(),
            name: param.name.clone(),
            path: path.clone(),
            why,
        })?;
    }
    let spec: AgentJobSpec =
        serde_json::from_value(spec).map_err(|e| TemplateError::InvalidJob { template: template_name.clone(), why: e.to_string() })?;

    let metadata = template.spec.job.metadata.clone().unwrap_or_default();
    let mut labels = metadata.labels;
    labels.insert(TEMPLATE_LABEL.into(), template_name.clone());
    labels.insert(TEMPLATE_GENERATION_LABEL.into(), template.metadata.generation.unwrap_or(0).to_string());
    let mut annotations = metadata.annotations;
    annotations.insert(TEMPLATE_DIGEST_ANNOTATION.into(), template_digest(template));
    let mut job = AgentJob::new(name, spec);
    job.metadata.namespace = Some(namespace.into());
    job.metadata.labels = Some(labels);
    job.metadata.annotations = Some(annotations);
    Ok(job)
}

/// The template's version by content: `sha256:<hex>` of its spec.
pub fn template_digest(template: &AgentJobTemplate) -> String {
    sha256_of_json(&template.spec)
}

fn article(t: ParameterType) -> &'static str {
    match t {
        ParameterType::String => "a string",
        ParameterType::Integer => "an integer",
        ParameterType::Number => "a number",
        ParameterType::Boolean => "a boolean (true or false)",
        ParameterType::Object => "a JSON object",
        ParameterType::Array => "a JSON array",
    }
}

fn has_type(value: &Value, t: ParameterType) -> bool {
    match t {
        ParameterType::String => value.is_string(),
        ParameterType::Integer => value.is_i64() || value.is_u64(),
        ParameterType::Number => value.is_number(),
        ParameterType::Boolean => value.is_boolean(),
        ParameterType::Object => value.is_object(),
        ParameterType::Array => value.is_array(),
    }
}

/// The command line's text as a value of the parameter's type. A string is taken verbatim
/// (`--set budget=2.50` stays the string "2.50", as budgets are); everything else is JSON.
fn parse_value(param: &TemplateParameter, text: &str) -> Result<Value, TemplateError> {
    let wrong = || TemplateError::WrongType { name: param.name.clone(), expected: article(param.parameter_type), value: text.into() };
    if param.parameter_type == ParameterType::String {
        return Ok(Value::String(text.into()));
    }
    let value: Value = serde_json::from_str(text).map_err(|_| wrong())?;
    if has_type(&value, param.parameter_type) { Ok(value) } else { Err(wrong()) }
}

/// Sets `value` at the dot-separated `path` of `spec`, creating objects on the way; a numeric
/// segment indexes an existing array element.
fn set_path(spec: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let segments: Vec<&str> = path.split('.').collect();
    let mut at = spec;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        at = match at {
            Value::Object(map) => {
                let slot = map.entry(segment.to_string()).or_insert(Value::Null);
                if !last && slot.is_null() {
                    *slot = Value::Object(Default::default());
                }
                slot
            }
            Value::Array(items) => {
                let index: usize = segment.parse().map_err(|_| format!("indexes an array with {segment:?}, not a number"))?;
                let len = items.len();
                items.get_mut(index).ok_or_else(|| format!("indexes element {index} of an array of {len}"))?
            }
            _ => return Err(format!("goes through {:?}, which is neither an object nor an array", segments[..i].join("."))),
        };
        if last {
            *at = value;
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template() -> AgentJobTemplate {
        let mut t: AgentJobTemplate = serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJobTemplate", "metadata": {"name": "security-scan", "generation": 3},
            "spec": {
                "parameters": [
                    {"name": "repository", "type": "string", "path": "input.repository", "required": true, "description": "repository to scan"},
                    {"name": "budget", "type": "string", "path": "budget.maxCostUSD", "default": "2.50"},
                    {"name": "maxRetries", "type": "integer", "path": "limits.maxRetries"},
                    {"name": "deep", "type": "boolean", "path": "input.deep", "default": false},
                    {"name": "paths", "type": "array", "path": "input.paths"}
                ],
                "job": {
                    "metadata": {"labels": {"team": "security"}},
                    "spec": {"jobType": "security-scan", "category": "core-security",
                             "agents": {"primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:1", "model": "gpt-4o-mini"}},
                             "budget": {"maxCostUSD": "1"}}
                }
            }
        }))
        .unwrap();
        t.metadata.generation = Some(3);
        t
    }

    fn sets(pairs: &[&str]) -> Vec<(String, String)> {
        parse_sets(&pairs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn renders_a_complete_job_with_parameters_defaults_and_the_template_version() {
        let t = template();
        let job =
            render(&t, "scan-api", "team-security", &sets(&["repository=github.com/acme/api", "maxRetries=2", "paths=[\"src\"]"])).unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some("scan-api"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("team-security"));
        assert_eq!(job.spec.input.as_deref(), Some(&json!({"repository": "github.com/acme/api", "deep": false, "paths": ["src"]})));
        assert_eq!(job.spec.budget.max_cost_usd, "2.50", "the default replaces the template's value");
        assert_eq!(job.spec.limits.as_ref().and_then(|l| l.max_retries), Some(2));
        let labels = job.metadata.labels.clone().unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("security"));
        assert_eq!(labels.get(TEMPLATE_LABEL).map(String::as_str), Some("security-scan"));
        assert_eq!(labels.get(TEMPLATE_GENERATION_LABEL).map(String::as_str), Some("3"));
        assert_eq!(job.metadata.annotations.clone().unwrap().get(TEMPLATE_DIGEST_ANNOTATION), Some(&template_digest(&t)));
        // What `-o yaml` prints for Git: the job as written, nothing the server would add.
        let yaml = serde_saphyr::to_string(&job).unwrap();
        for absent in ["status", "uid", "creationTimestamp", "resourceVersion", "null"] {
            assert!(!yaml.contains(absent), "{absent} in\n{yaml}");
        }
    }

    #[test]
    fn the_digest_changes_with_the_template_content() {
        let mut edited = template();
        edited.spec.job.spec["budget"]["maxCostUSD"] = json!("3");
        assert_ne!(template_digest(&template()), template_digest(&edited));
    }

    #[test]
    fn bad_input_names_the_parameter() {
        let t = template();
        let err = |args: &[&str]| render(&t, "j", "ns", &sets(args)).unwrap_err().to_string();
        assert_eq!(
            err(&["repository=x", "model=gpt-4o"]),
            "unknown parameter \"model\": template security-scan has parameters repository, budget, maxRetries, deep, paths"
        );
        assert_eq!(err(&[]), "parameter \"repository\" is required (--set repository=...): repository to scan");
        assert_eq!(err(&["repository=x", "maxRetries=two"]), "parameter \"maxRetries\" must be an integer, got \"two\"");
        assert_eq!(err(&["repository=x", "maxRetries=1.5"]), "parameter \"maxRetries\" must be an integer, got \"1.5\"");
        assert_eq!(err(&["repository=x", "deep=yes"]), "parameter \"deep\" must be a boolean (true or false), got \"yes\"");
        assert_eq!(err(&["repository=x", "paths={}"]), "parameter \"paths\" must be a JSON array, got \"{}\"");
        assert_eq!(err(&["repository=x", "repository=y"]), "parameter \"repository\" is set twice");
        assert_eq!(parse_sets(&["repository".into()]).unwrap_err().to_string(), "--set \"repository\": expected NAME=VALUE");
        // Bounds (maxRetries 1..10 and the like) are the CRD schema's: the plugin has the
        // apiserver check the rendered job (a dry-run create) before printing it.
    }

    #[test]
    fn a_template_that_renders_no_job_spec_says_so() {
        let mut t = template();
        t.spec.job.spec.as_object_mut().unwrap().remove("category");
        let e = render(&t, "j", "ns", &sets(&["repository=x"])).unwrap_err().to_string();
        assert_eq!(e, "template security-scan rendered no valid AgentJob spec: missing field `category`");
    }

    #[test]
    fn template_bugs_are_reported_as_such() {
        let mut t = template();
        t.spec.parameters[1].default = Some(json!(2.5));
        assert_eq!(
            render(&t, "j", "ns", &sets(&["repository=x"])).unwrap_err().to_string(),
            "template security-scan: the default of parameter \"budget\" is not a string"
        );
        let mut t = template();
        t.spec.parameters[0].default = Some(json!("."));
        assert_eq!(
            render(&t, "j", "ns", &sets(&["repository=x"])).unwrap_err().to_string(),
            "template security-scan: parameter \"repository\" is required and has a default; it can only be one"
        );
        let mut t = template();
        t.spec.parameters[2].path = Some("agents.primary.name.x".into());
        assert_eq!(
            render(&t, "j", "ns", &sets(&["repository=x", "maxRetries=1"])).unwrap_err().to_string(),
            "template security-scan: parameter \"maxRetries\" has path \"agents.primary.name.x\", which goes through \"agents.primary.name\", which is neither an object nor an array"
        );
    }

    #[test]
    fn a_template_name_must_fit_a_label() {
        let mut t = template();
        t.metadata.name = Some("t".repeat(64));
        assert!(matches!(render(&t, "j", "ns", &sets(&["repository=x"])), Err(TemplateError::NameTooLong(_))));
    }

    #[test]
    fn array_elements_are_reached_by_index() {
        let mut t = template();
        t.spec.job.spec["tools"] = json!([{"name": "github", "estimatedCalls": 5}]);
        t.spec
            .parameters
            .push(serde_json::from_value(json!({"name": "calls", "type": "integer", "path": "tools.0.estimatedCalls"})).unwrap());
        let job = render(&t, "j", "ns", &sets(&["repository=x", "calls=40"])).unwrap();
        assert_eq!(job.spec.tools[0].estimated_calls, 40);
        t.spec.parameters.last_mut().unwrap().path = Some("tools.1.estimatedCalls".into());
        assert!(
            render(&t, "j", "ns", &sets(&["repository=x", "calls=40"])).unwrap_err().to_string().contains("element 1 of an array of 1")
        );
    }
}
