//! AgentJobTemplate: a cluster-scoped, admin-curated recipe for a recurring AgentJob.
//!
//! A template is never referenced by a running job: `kubectl agentgate new` renders it into a
//! complete, self-contained AgentJob, so the heads approve exactly what runs and editing the
//! template later changes no existing job. The rendered job records the template's name and
//! version ([`TEMPLATE_LABEL`], [`TEMPLATE_GENERATION_LABEL`], [`TEMPLATE_DIGEST_ANNOTATION`]).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;

/// Label on a rendered job: the template it came from.
pub const TEMPLATE_LABEL: &str = "agentgate.dev/template";
/// Label on a rendered job: `metadata.generation` of the template when it was rendered.
pub const TEMPLATE_GENERATION_LABEL: &str = "agentgate.dev/template-generation";
/// Annotation on a rendered job: `sha256:<hex>` of the template's spec, which, unlike the
/// generation, survives deleting and re-creating the template.
pub const TEMPLATE_DIGEST_ANNOTATION: &str = "agentgate.dev/template-digest";

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "AgentJobTemplate",
    shortname = "ajt",
    category = "agentgate",
    doc = "A recipe for a recurring AgentJob, curated by cluster admins; `kubectl agentgate new` renders it into a self-contained job.",
    printcolumn(name = "Description", type_ = "string", json_path = ".spec.description"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentJobTemplateSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// What `kubectl agentgate new --set NAME=VALUE` may change; nothing else can be set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub parameters: Vec<TemplateParameter>,

    pub job: JobTemplate,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTemplate {
    /// Labels and annotations every rendered job carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    /// An AgentJob spec; fields a required parameter provides may be left out. Checked as a
    /// whole AgentJob spec when rendered.
    #[schemars(schema_with = "schema::free_form")]
    pub spec: serde_json::Value,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateParameter {
    /// What `--set` names.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z][A-Za-z0-9_.-]*$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    #[serde(rename = "type")]
    pub parameter_type: ParameterType,
    /// Where the value goes in the job's spec, dot-separated (`input.repository`,
    /// `budget.maxCostUSD`, `agents.supporting.0.model`); defaults to the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"))]
    pub path: Option<String>,
    /// Rendering fails without a value for it. A required parameter has no default (CEL cannot
    /// see an untyped field, so rendering checks this).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// Used when the parameter is not set; without one, the template's own value stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::any_value")]
    pub default: Option<serde_json::Value>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum ParameterType {
    String,
    Integer,
    Number,
    Boolean,
    /// Any JSON object, given as JSON on the command line.
    Object,
    /// Any JSON array, given as JSON on the command line.
    Array,
}

impl ParameterType {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}
